"""Small module helpers shared by every layer: which modules are linears, their weight as
``(d_out, d_in)``, PEFT's name matching, and swapping a submodule by its qualified name."""
from __future__ import annotations

from typing import Iterable, Tuple

import torch
from torch import nn

__all__ = ["is_conv1d", "is_linear_like", "linear_dims", "oriented_weight", "suffix_match",
           "matches_any", "replace_module"]


def is_conv1d(module: nn.Module) -> bool:
    """GPT-2's ``Conv1D`` (weight stored ``(d_in, d_out)``), found by class name so transformers
    need not be imported; LoRS's own ``LorsConv1D`` keeps that layout too."""
    return type(module).__name__ in ("Conv1D", "LorsConv1D") and \
        isinstance(getattr(module, "weight", None), torch.Tensor)


def is_linear_like(module: nn.Module) -> bool:
    """An ``nn.Linear`` (or subclass) or a GPT-2 ``Conv1D``."""
    return isinstance(module, nn.Linear) or is_conv1d(module)


def oriented_weight(module: nn.Module) -> torch.Tensor:
    """The weight as ``(d_out, d_in)``: a transposed view for ``Conv1D``, so N:M groups and
    masks run along the input dimension for every layer type."""
    return module.weight.t() if is_conv1d(module) else module.weight


def linear_dims(module: nn.Module) -> Tuple[int, int]:
    """``(d_out, d_in)`` of a Linear or Conv1D."""
    d_out, d_in = oriented_weight(module).shape
    return d_out, d_in


def suffix_match(fqn: str, name: str) -> bool:
    """PEFT's rule: ``name`` is the whole qualified name or its dotted suffix
    (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``, not ``model.layers.0.xq_proj``)."""
    return fqn == name or fqn.endswith("." + name)


def matches_any(fqn: str, names: Iterable[str]) -> bool:
    """True when :func:`suffix_match` holds for one of ``names``."""
    return any(suffix_match(fqn, name) for name in names)


def replace_module(model: nn.Module, fqn: str, new: nn.Module) -> nn.Module:
    """Put ``new`` where ``model.get_submodule(fqn)`` is; returns the module it replaced."""
    if not fqn:
        raise ValueError("replace_module: the model itself cannot be replaced (empty name)")
    parent_name, _, child = fqn.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old
