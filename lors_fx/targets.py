"""Which linears :func:`lors_fx.optimize` adapts: :func:`find_targets` (validated, with errors
that name the modules), and the names of PEFT's adapter containers, which are never targets."""
from __future__ import annotations

import re
from typing import List, Tuple

import torch
from torch import nn

from lors_fx._nn import is_linear_like, linear_dims, matches_any
from lors_fx.config import LorsConfig
from lors_fx.quantized import QuantizedLinear
from lors_fx.sparsity import sparsity_of

__all__ = ["find_targets", "ADAPTER_PARTS", "is_adapter_part"]

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
#: Module names PEFT gives its adapter containers: a linear under one is an adapter itself.
ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B",
                           "lora_magnitude_vector"})


def is_adapter_part(fqn: str) -> bool:
    """True for a module under one of PEFT's adapter containers (``...q_proj.lora_B.default``)."""
    return bool(ADAPTER_PARTS.intersection(fqn.split(".")))


def _describe(rows: List[Tuple[str, float]], limit: int = 8) -> str:
    text = ", ".join(f"{name} ({sparsity:.2f})" for name, sparsity in rows[:limit])
    return text + (f", ... ({len(rows) - limit} more)" if len(rows) > limit else "")


def find_targets(model: nn.Module, config: LorsConfig) -> List[Tuple[str, nn.Module]]:
    """The ``(fqn, module)`` pairs that ``config`` adapts, validated; raises on bad input.

    ``config.target_modules``: ``None`` = every ``nn.Linear``/``Conv1D`` whose sparsity is at
    least ``config.min_sparsity``; a list = names matched against the end of each qualified name
    (PEFT); a string = a regex that must match the whole qualified name. ``exclude_modules``
    (suffixes) are never adapted. A named target that is dense, a name that matches no linear,
    a non-float weight or ``r > min(d_in, d_out)`` is an error.
    """
    if not isinstance(config, LorsConfig):
        raise TypeError(f"config must be a LorsConfig, got {type(config).__name__}")
    # PEFT's lora_A/lora_B linears are adapters themselves (a zero lora_B even looks pruned).
    linears = [(name, m) for name, m in model.named_modules()
               if (is_linear_like(m) or isinstance(m, QuantizedLinear)) and not is_adapter_part(name)]
    excluded = lambda fqn: matches_any(fqn, config.exclude_modules)
    spec = config.target_modules

    def sparsity(module):
        weight = module.weight
        if weight.device.type == "meta":
            raise ValueError("find_targets: model is on the meta device; materialize it first")
        return sparsity_of(weight.detach())

    if spec is None:
        seen = [(name, sparsity(m)) for name, m in linears]
        sparse = {name for name, value in seen if value >= config.min_sparsity}
        chosen = [(name, m) for name, m in linears if name in sparse and not excluded(name)]
        if not chosen:
            raise ValueError(f"no target found: no linear module has sparsity >= "
                             f"{config.min_sparsity} (excluding {config.exclude_modules}); seen: "
                             f"{_describe(seen) or 'no nn.Linear/Conv1D at all'}")
    else:
        chosen = _named_targets(linears, spec, excluded, sparsity, config)
    for name, module in chosen:
        _check_target(name, module, config)
    return chosen


def _named_targets(linears, spec, excluded, sparsity, config: LorsConfig):
    """The linears ``spec`` names (a regex string or a list of name suffixes), which must all be
    sparse; raises on a name that matches nothing."""
    if isinstance(spec, str):
        pattern = re.compile(spec)
        chosen = [(n, m) for n, m in linears if pattern.fullmatch(n) and not excluded(n)]
        if not chosen:
            raise ValueError(f"no target found: regex {spec!r} matches no linear module "
                             f"(linears: {_describe([(n, sparsity(m)) for n, m in linears])})")
    else:
        unknown = [name for name in spec if not any(matches_any(n, [name]) for n, _ in linears)]
        if unknown:
            existing = sorted({n.rsplit(".", 1)[-1] for n, _ in linears})
            raise ValueError(f"unknown target module(s) {unknown}: no nn.Linear/Conv1D has "
                             f"that name; linear names in this model: {existing}")
        chosen = [(n, m) for n, m in linears if matches_any(n, spec) and not excluded(n)]
        if not chosen:
            raise ValueError(f"no target found: {spec} only match excluded modules "
                             f"{config.exclude_modules}")
    dense = [(n, sparsity(m)) for n, m in chosen if sparsity(m) < config.min_sparsity]
    if dense:
        raise ValueError(f"target module(s) are dense (sparsity < min_sparsity="
                         f"{config.min_sparsity}): {_describe(dense)}; LoRS adapts pruned "
                         f"linears only (lower min_sparsity or drop them from target_modules)")
    return chosen


def _check_target(name: str, module: nn.Module, config: LorsConfig) -> None:
    if module.weight.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"target {name} has a {module.weight.dtype} weight: LoRS needs a "
                        f"float weight (dequantize integer/quantized modules first)")
    d_out, d_in = (module.out_features, module.in_features) \
        if isinstance(module, QuantizedLinear) else linear_dims(module)
    if config.r > min(d_in, d_out):
        raise ValueError(f"r={config.r} is larger than min(d_in, d_out)={min(d_in, d_out)} "
                         f"of target {name} ({d_out}x{d_in})")
    if name == "":
        raise ValueError("the model itself is a linear: wrap it in a container module")
