"""Sparse LoRA adapters on a model's pruned linears: attach, merge, detach (files: serialization).

:func:`attach_adapters` swaps each target ``nn.Linear`` (or GPT-2's ``Conv1D``) for a
:class:`LorsLinear` (:class:`LorsConv1D`) under the same attribute name. The new module reuses the
original ``weight``/``bias`` Parameter objects, so module names and the keys ``<fqn>.weight`` /
``<fqn>.bias`` do not change, and adds ``<fqn>.lora_A`` (r x d_in) and ``<fqn>.lora_B``
(d_out x r), PEFT's shapes. Every other parameter of the model is frozen (PEFT's ``bias="none"``).

A quantized base (:class:`lors_fx.quantized.QuantizedLinear`) gets a :class:`LorsQuantLinear`,
which keeps the codes and scales; merging it re-quantizes ``W'`` onto the base's grid.

The layers themselves and their forward: :mod:`lors_fx.adapter_layers`.
"""
from __future__ import annotations

import warnings
from typing import Dict, List

import torch
from torch import nn

from lors_fx._collectives import is_sharded
from lors_fx._nn import is_conv1d, replace_module
from lors_fx.adapter_layers import (LORS_TYPES, LorsConv1D, LorsLinear, LorsQuantLinear,
                                    adapter_dtype_for, adapter_forward,
                                    reference_sparse_lora_dropout_form)
from lors_fx.config import LorsConfig
from lors_fx.ops import build_merged_weight
from lors_fx.quant_ops import merge_quantized_codes
from lors_fx.quantized import QuantizedLinear
from lors_fx.semi_structured import semi_structured_status
from lors_fx.targets import find_targets
from lors_fx.state import LorsState, clear_state, set_state, state_of

__all__ = [
    "LorsLinear", "LorsConv1D", "LorsQuantLinear", "reference_sparse_lora_dropout_form",
    "find_targets", "attach_adapters", "lors_modules", "adapter_forward", "SITE_ATTRIBUTE",
    "refuse_twice", "enable_semi_structured", "is_optimized", "merge_adapters", "detach_adapters",
    "adapter_dtype_for", "non_finite_adapters", "refuse_non_finite_adapters",
]

#: ``module.__dict__`` key of a converted PEFT layer's LoRS view (:mod:`lors_fx.peft_adapters`).
SITE_ATTRIBUTE = "_lors_peft_site"


def lors_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{fqn: adapter}`` of every adapted layer in ``model``: each :class:`LorsLinear` /
    :class:`LorsConv1D`, and the LoRS view of each converted PEFT LoRA layer (under the PEFT
    layer's name; it has the same attributes: ``lora_A``, ``lora_B``, ``scaling``, ``r``, ...)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, LORS_TYPES):
            found[name] = module
        elif SITE_ATTRIBUTE in module.__dict__:
            found[name] = module.__dict__[SITE_ATTRIBUTE]
    return found


def is_optimized(model: nn.Module) -> bool:
    """True when ``model`` carries LoRS adapters."""
    return bool(lors_modules(model))


def attach_adapters(model: nn.Module, config: LorsConfig) -> List[str]:
    """Replace each target of ``config`` with a LoRS module; freeze everything but the adapters.

    Validates everything (:func:`find_targets`) before changing the model. Records ``config`` and
    the previous ``requires_grad`` flags in the model's :class:`lors_fx.state.LorsState` and returns
    the adapted module names.
    """
    refuse_twice(model)
    targets = find_targets(model, config)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    options = dict(grad_mode=config.grad_mode, recompute=config.recompute,
                   chunk_bytes=config.chunk_bytes, lora_dropout=config.lora_dropout,
                   adapter_dtype=config.adapter_dtype)
    quantized = [name for name, module in targets if isinstance(module, QuantizedLinear)]
    if quantized and (config.lora_dropout > 0 or not config.recompute):
        raise ValueError(f"a quantized base ({quantized[0]}, ...) needs lora_dropout=0 and "
                         f"recompute=True (the op rebuilds W' from the codes), got "
                         f"lora_dropout={config.lora_dropout}, recompute={config.recompute}")
    for name, module in targets:
        if isinstance(module, QuantizedLinear):
            adapter = LorsQuantLinear(module, config.r, config.scaling,
                                      quant_aware=config.quant_aware, **options)
        else:
            cls = LorsConv1D if is_conv1d(module) else LorsLinear
            adapter = cls(module, config.r, config.scaling, **options)
        replace_module(model, name, adapter)
    freeze_all_but_adapters(model)
    set_state(model, LorsState(config=config, requires_grad=flags))
    enable_semi_structured(lors_modules(model), config)
    return [name for name, _ in targets]


def enable_semi_structured(adapters: Dict[str, nn.Module], config: LorsConfig) -> List[str]:
    """With ``config.semi_structured``, turn the 2:4 forward on for each adapter whose base the
    kernels take (:func:`lors_fx.semi_structured.semi_structured_status`); the others are named
    in one warning with the reason. Returns the names turned on."""
    if not config.semi_structured:
        return []
    on, refused = [], {}
    for name, adapter in adapters.items():
        ok, reason = semi_structured_status(adapter.true_weight().detach())
        adapter.semi_structured = ok
        if ok:
            on.append(name)
        else:
            refused.setdefault(reason, []).append(name)
    for reason, names in refused.items():
        warnings.warn(f"lors_fx: semi_structured: {len(names)} layer(s) run the dense op "
                      f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}): {reason}",
                      UserWarning, stacklevel=3)
    return on


def refuse_twice(model: nn.Module) -> None:
    """Raise when ``model`` already carries LoRS adapters (optimize called twice)."""
    present = lors_modules(model)
    if present:
        raise RuntimeError(f"optimize called twice: the model already has LoRS adapters (e.g. "
                           f"{next(iter(present))}); merge(model) or start from a fresh model")


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only the adapters' ``lora_A``/``lora_B`` train (PEFT's ``bias="none"``)."""
    trainable = {id(getattr(m, part)) for m in lors_modules(model).values()
                 for part in ("lora_A", "lora_B")}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def _plain_module(module: nn.Module) -> nn.Module:
    """A plain Linear/Conv1D holding ``module``'s weight and bias Parameters."""
    if isinstance(module, LorsQuantLinear):
        return module.base_layer()
    with torch.device("meta"):  # allocate nothing: the Parameters are swapped in right after
        if isinstance(module, LorsLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        else:
            plain = module.base_class(module.nf, module.nx)
    plain.weight = module.weight
    plain.bias = module.bias
    plain.train(module.training)
    return plain


def _restore(model: nn.Module) -> None:
    """Back to the plain model's ``requires_grad`` flags; the state is dropped."""
    state = state_of(model)
    flags = state.requires_grad if state is not None else {}
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
    clear_state(model)


def _refuse_sharded(model: nn.Module, what: str) -> None:
    if is_sharded(model):
        raise ValueError(f"{what}: the model is sharded with FSDP2 (its weights are shards); "
                         f"save_adapters(model, dir) on every rank, then merge in one process: "
                         f"lors-fx merge BASE dir --out MERGED")
    if any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()):
        raise ValueError(f"{what}: the model is partitioned by DeepSpeed ZeRO-3; "
                         f"save_adapters_deepspeed(engine, dir), then lors-fx merge in one process")


def detach_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_adapters` without merging (drops the adapters) on an uncompiled model;
    :func:`lors_fx.api.remove_adapters` is the public form."""
    _refuse_sharded(model, "remove_adapters")
    for name, module in lors_modules(model).items():
        if isinstance(module, LORS_TYPES):
            replace_module(model, name, _plain_module(module))
        else:  # a converted PEFT layer: PEFT's own forward back
            module.uninstall()
    _restore(model)
    return model


@torch.no_grad()
def non_finite_adapters(model: nn.Module) -> Dict[str, int]:
    """``{module name: count}`` of NaN/inf entries in each module's ``lora_A``/``lora_B``."""
    counts = {name: int((~torch.isfinite(m.lora_A)).sum() + (~torch.isfinite(m.lora_B)).sum())
              for name, m in lors_modules(model).items()}
    return {name: count for name, count in counts.items() if count}


def refuse_non_finite_adapters(model: nn.Module, what: str = "merge") -> None:
    """Raise ``FloatingPointError`` naming the modules whose adapters hold NaN/inf: merged, they
    would write non-finite weights (training diverged; merge an earlier checkpoint)."""
    bad = non_finite_adapters(model)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:8])
        more = f", ... ({len(bad) - 8} more)" if len(bad) > 8 else ""
        raise FloatingPointError(
            f"{what}: non-finite adapter values (NaN/inf entries) in {listed}{more}; training "
            f"diverged. Nothing was changed: merge adapters from an earlier checkpoint")


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold ``W' = W + s*(B@A)*M`` into each adapted weight of an uncompiled model and drop the
    adapters (:func:`lors_fx.merge` is the public form).

    Uses :func:`lors_fx.ops.build_merged_weight` (float32, cast back; the zero pattern is kept bit
    for bit and no kept weight becomes 0). The weight Parameters are updated in place and handed
    to plain ``nn.Linear`` / ``Conv1D`` modules; ``requires_grad`` flags are restored to what they
    were before :func:`attach_adapters`. A quantized base gets the codes of ``W'`` on its own grid
    (:func:`lors_fx.quant_ops.merge_quantized_codes`) and becomes a
    :class:`lors_fx.quantized.QuantizedLinear` again. Returns ``model``.
    """
    modules = lors_modules(model)
    if not modules:
        raise ValueError("merge: model has no LoRS adapters")
    if not all(isinstance(m, LORS_TYPES) for m in modules.values()):
        raise ValueError("merge_adapters: the adapters are converted PEFT layers; use "
                         "lors_fx.merge(model), which also unwraps PEFT")
    _refuse_sharded(model, "merge")
    refuse_non_finite_adapters(model)
    for name, module in modules.items():
        if isinstance(module, LorsQuantLinear):  # onto the base's grid, same scales
            module.weight_packed.copy_(merge_quantized_codes(
                module.weight_packed, module.weight_scale, module.lora_A, module.lora_B,
                module.scaling, module.bits, module.quant_aware))
            replace_module(model, name, _plain_module(module))
            continue
        merged = build_merged_weight(module.true_weight(), module.lora_A, module.lora_B,
                                     module.scaling)
        module.weight.copy_(merged.t() if isinstance(module, LorsConv1D) else merged)
        replace_module(model, name, _plain_module(module))
    _restore(model)
    return model
