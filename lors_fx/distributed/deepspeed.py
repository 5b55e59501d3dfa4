"""Train a LoRS model with DeepSpeed ZeRO stage 2 or 3 (``deepspeed`` is an optional extra).

Install it after torch: ``pip install --no-build-isolation deepspeed``. Nothing here imports
deepspeed at module import time (``import lors_fx`` never does); each function imports it when
called.

Usage (every rank, under ``torchrun`` / ``deepspeed``)::

    from lors_fx.distributed.deepspeed import initialize, save_adapters_deepspeed, zero_config

    model = lors_fx.optimize(model, LorsConfig(r=8), compile=False)
    engine = initialize(model, zero_config(3, micro_batch_size=4, grad_accum=2, lr=2e-4))
    for batch in loader:
        loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
    save_adapters_deepspeed(engine, "out/adapter")   # every rank calls it; rank 0 writes

Only the adapters (``lora_A`` / ``lora_B``) are trainable and handed to DeepSpeed's optimizer; the
pruned base weights stay frozen. Under ZeRO-3 every parameter is partitioned and gathered by
DeepSpeed's module hooks just before the module that owns it runs. An eager
:class:`lors_fx.LorsLinear` reads only its own ``weight``, ``bias``, ``lora_A`` and ``lora_B``
(the original Parameter objects are re-registered on it), so the op always sees the full,
gathered ``W`` and the mask ``W != 0`` it recomputes is exact. :func:`initialize` checks that and
registers any parameter read across modules as a ZeRO-3 external parameter.

The compiled path (``optimize(..., compile=True)``) is refused under ZeRO-3 (see
:func:`initialize`): dynamo inlines DeepSpeed's per-module gather/release hooks, which are
``torch.compiler.disable``-d, so the whole-model graph breaks at every module, the masked adapters
are not rewritten into the LoRS op (the first step would save ``W'`` and get the naive form's
gradients) and :func:`lors_fx.compiler.compile_model` falls back to the eager op for good
(docs/distributed.md has what was measured). Under ZeRO-2 (parameters not partitioned, no module
hooks) the compiled forward is one graph with no break and gives the eager gradients; it is allowed.
"""
from __future__ import annotations

import contextlib
import importlib
import os
from typing import Dict, List, Optional

import torch
from torch import Tensor, nn

from lors_fx.adapters import lors_modules
from lors_fx.compiler.state import is_compiled
from lors_fx.distributed.fsdp import sharded_audit
from lors_fx.serialization import save_adapters

__all__ = ["deepspeed_missing", "zero_config", "initialize", "save_adapters_deepspeed",
           "full_adapter_grads", "external_parameters", "sharded_audit_deepspeed", "INSTALL_HINT"]

INSTALL_HINT = "pip install --no-build-isolation deepspeed"

_STAGES = (2, 3)


def deepspeed_missing() -> Optional[str]:
    """``None`` when ``import deepspeed`` works, else a one-line reason (with the install hint)."""
    try:
        importlib.import_module("deepspeed")
    except ImportError as error:
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return f"deepspeed is not installed ({first}): {INSTALL_HINT}"
    except Exception as error:  # a broken install (e.g. built against another torch)
        first = (str(error).strip().splitlines() or [""])[0][:200]
        return (f"deepspeed is installed but fails to import ({type(error).__name__}: {first}); "
                f"reinstall it after torch: {INSTALL_HINT}")
    return None


def _require_deepspeed():
    reason = deepspeed_missing()
    if reason is not None:
        raise ImportError(reason)
    import deepspeed
    return deepspeed


def _check_int(name: str, value, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"zero_config: {name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_float(name: str, value, *, positive: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"zero_config: {name} must be a number, got {value!r}")
    value = float(value)
    if value != value or value in (float("inf"), float("-inf")) or value < 0 \
            or (positive and value == 0):
        bound = "> 0" if positive else ">= 0"
        raise ValueError(f"zero_config: {name} must be a finite number {bound}, got {value!r}")
    return value


def zero_config(stage: int, *, micro_batch_size: int, grad_accum: int = 1, lr: float = 1e-3,
                weight_decay: float = 0.0, clip: float = 1.0, bf16: bool = False) -> dict:
    """A DeepSpeed config dict for LoRS fine-tuning with ZeRO ``stage`` 2 or 3.

    Args:
        stage: ZeRO stage, 2 (optimizer state + gradients partitioned) or 3 (parameters too).
        micro_batch_size: per-rank batch of one forward/backward
            (``train_micro_batch_size_per_gpu``); the global batch is derived by DeepSpeed from
            the world size.
        grad_accum: micro-batches accumulated per optimizer step (``gradient_accumulation_steps``).
        lr, weight_decay: AdamW's (``torch.optim.AdamW`` through ``torch_adam``, so it runs on CPU
            without DeepSpeed's compiled fused kernels; betas 0.9/0.999, eps 1e-8).
        clip: gradient clipping norm (``0``: no clipping).
        bf16: train in bf16 (DeepSpeed's bf16 mode); ``False``: the model's own dtype.

    Returns a plain dict for :func:`initialize` (``deepspeed.initialize(config=...)``); edit it
    for anything else (offload, bucket sizes). Gradients are reduced with all-reduce
    (``reduce_scatter: False``), which every backend, gloo included, supports, without overlap.
    ZeRO-3 partitions every parameter (``stage3_param_persistence_threshold: 0``). Raises
    ``ValueError`` on an invalid argument.
    """
    if isinstance(stage, bool) or stage not in _STAGES:
        raise ValueError(f"zero_config: stage must be 2 or 3 (ZeRO-2: optimizer state and "
                         f"gradients partitioned, ZeRO-3: parameters too), got {stage!r}")
    micro_batch_size = _check_int("micro_batch_size", micro_batch_size, 1)
    grad_accum = _check_int("grad_accum", grad_accum, 1)
    lr = _check_float("lr", lr, positive=True)
    weight_decay = _check_float("weight_decay", weight_decay, positive=False)
    clip = _check_float("clip", clip, positive=False)
    if not isinstance(bf16, bool):
        raise ValueError(f"zero_config: bf16 must be a bool, got {bf16!r}")
    zero = {"stage": stage, "overlap_comm": False, "contiguous_gradients": True,
            "reduce_scatter": False}
    if stage == 3:
        # Partition every parameter, however small (DeepSpeed's default keeps those under 1e5
        # elements whole on every rank: all the adapters, and every weight of a small model).
        # No 16-bit weight gathering on save: save_adapters_deepspeed gathers only the adapters.
        zero.update(stage3_param_persistence_threshold=0,
                    stage3_gather_16bit_weights_on_model_save=False)
    return {
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "gradient_clipping": clip,
        "optimizer": {"type": "AdamW", "params": {
            "lr": lr, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": weight_decay,
            "torch_adam": True}},
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def external_parameters(model: nn.Module) -> List[tuple]:
    """``[(module, parameter)]`` for every parameter a LoRS module reads but does not own.

    A LoRS module's forward reads ``weight``, ``bias``, ``lora_A`` and ``lora_B``. ZeRO-3 gathers
    a parameter only in the hooks of a module that registers it, so one that is read through a
    plain attribute (not in the module's own ``_parameters``; e.g. a shared Parameter re-attached
    by a transformation) must be registered as an external parameter of the reading module.
    For the modules :func:`lors_fx.optimize` builds the list is empty: they re-register the
    original Parameters as their own.
    """
    found = []
    for module in lors_modules(model).values():
        own = {id(p) for p in module._parameters.values() if p is not None}
        for attr in ("weight", "bias", "lora_A", "lora_B"):
            value = getattr(module, attr, None)
            if isinstance(value, nn.Parameter) and id(value) not in own:
                found.append((module, value))
    return found


_ZERO3_DTYPES = {"torch.float32", "torch.bfloat16", "torch.float16"}


def _zero_stage(ds_config: dict) -> int:
    zero = ds_config.get("zero_optimization", {}) if isinstance(ds_config, dict) else {}
    stage = zero.get("stage", 0) if isinstance(zero, dict) else 0
    return int(stage)


def initialize(model: nn.Module, ds_config: dict):
    """Wrap a LoRS model in a DeepSpeed engine (``deepspeed.initialize``); returns the engine.

    Every rank calls it with the same model (same seed) and config (e.g. :func:`zero_config`).
    Only the trainable parameters (the adapters) are handed to the optimizer. Under ZeRO-3 the
    parameters are partitioned; any parameter a LoRS module reads without owning it
    (:func:`external_parameters`) is registered with
    ``deepspeed.zero.register_external_parameter`` so it is gathered for that module's forward.

    Raises:
        ValueError: ``model`` has no LoRS adapters (call :func:`lors_fx.optimize` first) or no
            trainable parameter; ``ds_config`` is not a dict.
        NotImplementedError: ZeRO-3 with a model compiled by ``optimize(..., compile=True)``
            (see the module docstring: ZeRO-3's module hooks break the graph at every module);
            use ``optimize(..., compile=False)``.
        ValueError: ZeRO-3 with float64 parameters (DeepSpeed partitions fp32/bf16/fp16 only).
        ImportError: deepspeed is not installed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"initialize: model must be an nn.Module, got {type(model).__name__}")
    if not isinstance(ds_config, dict):
        raise ValueError(f"initialize: ds_config must be a dict (e.g. zero_config(...)), got "
                         f"{type(ds_config).__name__}")
    if not lors_modules(model):
        raise ValueError("initialize: model has no LoRS adapters; call "
                         "lors_fx.optimize(model, LorsConfig(...), compile=False) first")
    trainable = [p for p in model.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("initialize: model has LoRS adapters but no trainable parameter "
                         "(were the adapters frozen?)")
    stage = _zero_stage(ds_config)
    if stage == 3 and is_compiled(model):
        raise NotImplementedError(
            "initialize: ZeRO-3 cannot run a model compiled with optimize(..., compile=True): "
            "DeepSpeed's ZeRO-3 parameter gather/release hooks break the compiled graph at every "
            "module, so the masked adapters are not rewritten into the LoRS op (the first step "
            "would use the naive form's 'exact' gradient and save W') before the model falls "
            "back to eager; build it with optimize(model, config, compile=False) (the eager LoRS "
            "op: same gradients, nothing dense saved) or use ZeRO stage 2")
    wide = sorted({str(p.dtype) for p in model.parameters()} - _ZERO3_DTYPES)
    if stage == 3 and wide:
        raise ValueError(f"initialize: ZeRO-3 partitions only float32/bfloat16/float16 parameters "
                         f"(DeepSpeed's zero.Init), the model has {wide}: model.float() first, "
                         f"or use ZeRO stage 2")
    deepspeed = _require_deepspeed()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=trainable,
                                           config=ds_config)
    if stage == 3:
        for module, parameter in external_parameters(engine.module):
            deepspeed.zero.register_external_parameter(module, parameter)
    return engine


def _adapter_params(module: nn.Module) -> Dict[str, nn.Parameter]:
    params = {}
    for name, lors in lors_modules(module).items():
        params[f"{name}.lora_A"] = lors.lora_A
        params[f"{name}.lora_B"] = lors.lora_B
    return params


def _zero3_params(params) -> bool:
    return any(hasattr(p, "ds_id") for p in params)


def save_adapters_deepspeed(engine, path: str) -> List[str]:
    """Save a DeepSpeed engine's adapters in PEFT layout (:func:`lors_fx.save_adapters`).

    Collective: every rank must call it. Under ZeRO-3 only the adapter parameters are gathered
    (``deepspeed.zero.GatheredParameters``, never the base weights); rank 0 writes
    ``path/adapter_model.safetensors`` and ``path/adapter_config.json``, the other ranks write
    nothing. Returns the adapted module names on every rank.
    """
    module = getattr(engine, "module", engine)
    params = list(_adapter_params(module).values())
    if not params:
        raise ValueError("save_adapters_deepspeed: the engine's model has no LoRS adapters")
    if _zero3_params(params):
        deepspeed = _require_deepspeed()
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
            names = save_adapters(module, os.fspath(path))
        _barrier()
        return names
    names = save_adapters(module, os.fspath(path))
    _barrier()
    return names


def _barrier() -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()


def full_adapter_grads(engine) -> Dict[str, Tensor]:
    """``{"<module>.lora_A": full gradient, ...}`` of every adapter, on CPU (for tests/debugging).

    Collective: every rank must call it, after ``engine.backward(loss)`` and before
    ``engine.step()`` (DeepSpeed frees the reduced gradients in the step). The gradients are the
    data-parallel average DeepSpeed reduces (the gradient of the mean of the ranks' losses,
    divided by the accumulation steps), assembled from the ZeRO partitions with
    ``deepspeed.utils.safe_get_full_grad``, in DeepSpeed's gradient dtype: float32 for a float32
    or float64 model (its ZeRO-2/3 partitions and master weights are float32).
    """
    _require_deepspeed()
    from deepspeed.utils import safe_get_full_grad

    module = getattr(engine, "module", engine)
    grads = {}
    for name, param in _adapter_params(module).items():
        grad = safe_get_full_grad(param)
        if grad is None:
            raise RuntimeError(f"full_adapter_grads: no gradient for {name}; call it after "
                               f"engine.backward(loss) and before engine.step()")
        shape = getattr(param, "ds_shape", param.shape)
        grads[name] = grad.detach().reshape(shape).to("cpu").clone()
    return grads


@contextlib.contextmanager
def _gathered_module(lors: nn.Module):
    """``(weight, lora_A, lora_B)`` of one LoRS module, gathered under ZeRO-3 for the duration."""
    params = [lors.weight, lors.lora_A, lors.lora_B]
    if _zero3_params(params):
        with _require_deepspeed().zero.GatheredParameters(params, modifier_rank=None):
            yield lors.true_weight(), lors.lora_A, lors.lora_B
    else:
        yield lors.true_weight(), lors.lora_A, lors.lora_B


def sharded_audit_deepspeed(engine) -> Dict[str, int]:
    """:func:`lors_fx.distributed.sharded_audit` for a DeepSpeed engine: each adapted module is
    gathered in turn (ZeRO-3: ``GatheredParameters`` on that module only) and checked.
    Collective. Returns ``{"checked": modules, "violations": positions}`` on every rank."""
    return sharded_audit(getattr(engine, "module", engine), gather=_gathered_module)
