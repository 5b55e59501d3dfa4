"""What a user calls: :func:`optimize`, :func:`merge`, :func:`remove_adapters`,
:func:`restore_adapters` — each one orchestrates the core (adapters, init, files), the compiler and
the FSDP2 path, and leaves the model as it was when it fails.

The eager path (``compile=False``) calls the custom op :func:`lors_fx.ops.sparse_lora_linear`
directly from each adapted module; the compiled path hands the model to
:func:`lors_fx.compiler.compile_model`, which switches the modules to emit the naive form and lets
the graph passes rewrite it into the op.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Callable, Iterable, Optional

from torch import nn

from lors_fx._collectives import is_sharded
from lors_fx.adapters import (attach_adapters, detach_adapters, is_optimized, lors_modules,
                              merge_adapters, refuse_non_finite_adapters)
from lors_fx.compiler import compile_model, decompile_model, is_compiled
from lors_fx.config import LorsConfig
from lors_fx.distributed.fsdp import attach_sharded
from lors_fx.init import gradient_init
from lors_fx.peft_adapters import convert_peft_layers, has_peft_layers, merge_peft
from lors_fx.quant_checkpoint import convert_compressed_tensors
from lors_fx.serialization import load_adapter_config, load_adapters

__all__ = ["optimize", "merge", "remove_adapters", "restore_adapters", "is_optimized",
           "lors_modules"]


def optimize(model: nn.Module, config: Optional[LorsConfig] = None, *, compile: bool = True,
             init_data: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None) -> nn.Module:
    """Make ``model`` a LoRS fine-tuning model, in place; returns the same object.

    Steps: find the sparse target linears and attach adapters (every other parameter frozen;
    ``config`` kept in :func:`lors_fx.state_of` ``(model)``); with ``config.init == "gradient"`` run
    :func:`lors_fx.gradient_init` on ``init_data`` (and ``loss_fn``); with ``compile=True`` compile
    with the lors backend. Any error leaves the model as it was (adapters are removed again).
    On a model already sharded by FSDP2 the adapters are attached in place and sharded, and they
    run the eager op (with a warning if ``compile=True``; see :mod:`lors_fx.distributed`).

    A PEFT model (LoRA layers from ``get_peft_model``, ``PeftModel.from_pretrained`` or
    ``model.add_adapter``) is converted instead (:func:`lors_fx.peft_adapters.convert_peft_layers`):
    each PEFT LoRA layer on a sparse base runs the masked LoRS op on PEFT's own ``lora_A`` /
    ``lora_B``, so ``peft_model.save_pretrained`` and PEFT's optimizer groups keep working; ``r``,
    ``lora_alpha`` and dropout are PEFT's, ``target_modules`` must be None.

    A model loaded from a compressed-tensors checkpoint (``AutoModelForCausalLM.from_pretrained``
    of an int4/int8 ``pack-quantized`` directory, such as :func:`lors_fx.quant_checkpoint.
    save_quantized` writes) has its quantized linears converted first, losslessly, into
    :class:`lors_fx.quantized.QuantizedLinear` (:func:`lors_fx.quant_checkpoint.
    from_compressed_tensors`: bad grids are refused before anything changes); those get adapters
    like any quantized base, and if a later step fails the compressed-tensors layers are put back.

    Args:
        model: a PyTorch / HF model with pruned ``nn.Linear`` (or GPT-2 ``Conv1D``) layers, or a
            PEFT model on such a base.
        config: a :class:`LorsConfig` (default ``LorsConfig()``).
        compile: compile with the lors torch.compile backend (``False``: eager custom op).
        init_data: batches for the gradient init (required iff ``config.init == "gradient"``).
        loss_fn: ``loss_fn(model, batch) -> loss`` for batches that are not HF dicts with labels.
    """
    config = LorsConfig() if config is None else config
    if not isinstance(config, LorsConfig):
        raise TypeError(f"optimize: config must be a LorsConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if config.init == "gradient" and init_data is None:
        raise ValueError("optimize: config.init='gradient' needs init_data (an iterable of "
                         "batches: dicts with labels, or tensors with loss_fn)")
    if config.semi_structured and compile:
        raise ValueError("optimize: semi_structured=True runs the 2:4 kernels on the eager op "
                         "path; pass compile=False")
    if config.init != "gradient" and init_data is not None:
        raise ValueError("optimize: init_data is only used with config.init='gradient' "
                         f"(config.init={config.init!r})")
    conversion = convert_compressed_tensors(model)  # refuses, changing nothing, or converts all
    try:
        return _adapt(model, config, compile, init_data, loss_fn)
    except BaseException:
        conversion.restore()
        raise


def _adapt(model, config, compile, init_data, loss_fn) -> nn.Module:
    """:func:`optimize` once its arguments are checked: a PEFT, sharded or plain model."""
    if has_peft_layers(model):
        return _optimize_peft(model, config, compile, init_data, loss_fn)
    if is_sharded(model):  # FSDP2 already sharded it (order B in lors_fx.distributed)
        attach_sharded(model, config)  # checks everything before it changes the model
        if config.init == "gradient":  # every rank's batches; G summed on the first rank
            gradient_init(model, init_data, loss_fn=loss_fn, config=config)
        if compile:
            warnings.warn("lors_fx.optimize: the model was sharded before the adapters were "
                          "attached, so FSDP2 hooks every adapted module and a compiled block "
                          "would break at each; running the eager LoRS op (it saves only x too). "
                          "To compile, call optimize before lors_fx.distributed.shard_model",
                          RuntimeWarning, stacklevel=2)
        return model
    attach_adapters(model, config)
    return _initialize(model, config, compile, init_data, loss_fn)


def _initialize(model, config, compile, init_data, loss_fn) -> nn.Module:
    """Gradient init and compile of freshly attached adapters; removes them on any failure."""
    try:
        if config.init == "gradient":
            gradient_init(model, init_data, loss_fn=loss_fn, config=config)
        if compile:
            compile_model(model, config)
    except BaseException:
        remove_adapters(model)
        raise
    return model


def _optimize_peft(model, config, compile, init_data, loss_fn) -> nn.Module:
    """:func:`optimize` on a model with PEFT LoRA layers: convert them in place."""
    if config.convert_peft is False:
        raise ValueError("optimize: the model has PEFT LoRA layers and convert_peft=False; "
                         "PEFT's dense B@A would break the sparsity on merge. Leave "
                         "convert_peft at its default (PEFT's layers become masked LoRS "
                         "adapters) or merge PEFT's adapters first (merge_and_unload)")
    if is_sharded(model):
        raise ValueError("optimize: a PEFT model sharded with FSDP2 is not supported; call "
                         "optimize before sharding, or use lors_fx adapters on the plain model")
    convert_peft_layers(model, config)
    return _initialize(model, config, compile, init_data, loss_fn)


def merge(model: nn.Module) -> nn.Module:
    """Fold ``W' = W + s*(B@A)*M`` into each adapted weight and drop the adapters; returns ``model``
    (for a PEFT model: the plain base model, as PEFT's ``merge_and_unload``; see
    :func:`lors_fx.peft_adapters.merge_peft`: every PEFT layer on a sparse base is merged under
    the mask, converted or not).

    A compiled model gets its original forward back first. Uses
    :func:`lors_fx.ops.build_merged_weight` (float32, cast back; the zero pattern is kept bit for
    bit and no kept weight becomes 0). The weight Parameters are updated in place and handed to
    plain ``nn.Linear`` / ``Conv1D`` modules; ``requires_grad`` flags are restored to what they
    were before the adapters were attached. Adapters holding NaN/inf (a diverged run) are refused
    with ``FloatingPointError`` naming the modules, before anything changes.
    """
    if not is_sharded(model):  # a sharded model is refused by merge_adapters
        refuse_non_finite_adapters(model)  # before decompiling: a refused merge changes nothing
    if has_peft_layers(model):
        if is_compiled(model):
            decompile_model(model)
        return merge_peft(model)
    if is_optimized(model) and is_compiled(model):
        decompile_model(model)
    return merge_adapters(model)


def remove_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`optimize` without merging: adapters dropped, forward and flags restored."""
    if is_compiled(model):
        decompile_model(model)
    return detach_adapters(model)


def restore_adapters(model: nn.Module, path: str, *, compile: bool = False) -> nn.Module:
    """Rebuild the adapters saved in ``path`` on a fresh ``model`` and load their values.

    :func:`lors_fx.load_adapter_config` + :func:`optimize` (with ``init="zeros"``: the saved
    values replace any init, so adapters trained with gradient init need no data here) +
    :func:`lors_fx.load_adapters`. Raises if the model's modules, or its zero pattern (the saved
    mask fingerprint), do not match the file, or if a file is unreadable (the error names it);
    any failure leaves ``model`` as it was (adapters removed again), so a retry starts clean.
    Returns ``model``.
    """
    config = dataclasses.replace(load_adapter_config(path), init="zeros")
    optimize(model, config, compile=compile)
    try:
        load_adapters(model, path)
    except BaseException:
        remove_adapters(model)
        raise
    return model
