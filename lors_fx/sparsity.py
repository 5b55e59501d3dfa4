"""Masks, sparsity patterns and audits.

The mask of a weight is ``W != 0``: it is read from the weight every time (no stored mask), so it
survives sharding, saving and loading. A pattern is ``"unstructured"`` or ``"N:M"`` (at most N
nonzeros in every group of M consecutive weights along the input dimension, for the N:M that
pruners emit: 1:4, 2:4, 4:8; the tightest one that holds is reported).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import nn

from lors_fx._collectives import full_tensor
from lors_fx._nn import is_linear_like, oriented_weight

__all__ = [
    "NM_PATTERNS",
    "weight_mask",
    "sparsity_of",
    "detect_nm",
    "pattern_of",
    "SparsityRow",
    "sparsity_report",
    "AuditResult",
    "SparsityViolation",
    "audit",
    "snapshot_masks",
]

NM_PATTERNS = ((1, 4), (2, 4), (4, 8))


def weight_mask(weight: torch.Tensor) -> torch.Tensor:
    """Boolean mask of the kept (nonzero) positions of ``weight``."""
    return weight != 0


def sparsity_of(weight: torch.Tensor) -> float:
    """Fraction of exact zeros in ``weight`` (0.0 for an empty tensor)."""
    numel = weight.numel()
    if numel == 0:
        return 0.0
    # a DTensor shard (FSDP2): the count over all ranks
    return float(full_tensor((weight == 0).sum()).item()) / numel


def _holds_nm(nonzero: torch.Tensor, n: int, m: int) -> bool:
    d_out, d_in = nonzero.shape
    if d_in % m:
        return False
    # Most weights fail on their first rows: check a few before paying for the whole weight.
    for rows in (nonzero[:16], nonzero):
        per_group = rows.reshape(rows.shape[0], d_in // m, m).sum(-1, dtype=torch.int32)
        if not bool((per_group <= n).all()):
            return False
    return True


def detect_nm(weight: torch.Tensor, sparsity: Optional[float] = None) -> Optional[str]:
    """The tightest ``"N:M"`` in :data:`NM_PATTERNS` that holds exactly along the input dim.

    A 2-D weight ``(d_out, d_in)`` satisfies N:M when ``d_in % M == 0`` and every group of M
    consecutive inputs of every row has at most N nonzeros. Returns None when none holds (or
    the weight is not 2-D). ``sparsity`` (the weight's zero fraction, if already known) lets
    patterns that need more zeros than the weight has be skipped without a scan.
    """
    if weight.dim() != 2 or weight.numel() == 0:
        return None
    sparsity = sparsity_of(weight) if sparsity is None else sparsity
    nonzero = weight != 0
    for n, m in NM_PATTERNS:
        if 1.0 - n / m > sparsity + 1e-12:  # N:M forces at least (M-N)/M zeros
            continue
        if _holds_nm(nonzero, n, m):
            return f"{n}:{m}"
    return None


def pattern_of(weight: torch.Tensor) -> str:
    """``"N:M"`` when an N:M pattern holds exactly, ``"dense"`` with no zeros, else
    ``"unstructured"``."""
    sparsity = sparsity_of(weight)
    if sparsity == 0:
        return "dense"
    return detect_nm(weight, sparsity) or "unstructured"


@dataclass
class SparsityRow:
    """One module's weight: name, shape, zero count, sparsity and pattern."""

    name: str
    shape: tuple
    zeros: int
    numel: int
    sparsity: float
    pattern: str


def _linear_weights(model: nn.Module) -> Iterable[tuple[str, torch.Tensor]]:
    """``(name, weight as (d_out, d_in))`` for every nn.Linear and GPT-2 Conv1D (stored d_in x
    d_out, so transposed here: N:M runs along the input dim)."""
    for name, module in model.named_modules():
        weight = getattr(module, "weight", None)
        if is_linear_like(module) and isinstance(weight, torch.Tensor) and weight.dim() == 2:
            yield name, oriented_weight(module)
        elif isinstance(getattr(module, "weight_packed", None), torch.Tensor):
            yield name, weight  # a quantized linear: its dequantized weight (lors_fx.quantized)


def sparsity_report(model: nn.Module) -> List[SparsityRow]:
    """Per linear module (``nn.Linear`` and GPT-2's ``Conv1D``): shape, zeros, sparsity, pattern."""
    rows = []
    for name, weight in _linear_weights(model):
        if weight.device.type == "meta":
            rows.append(SparsityRow(name, tuple(weight.shape), 0, weight.numel(), 0.0, "meta"))
            continue
        zeros = int((weight == 0).sum().item())
        rows.append(SparsityRow(name, tuple(weight.shape), zeros, weight.numel(),
                                zeros / max(1, weight.numel()), pattern_of(weight.detach())))
    return rows


def snapshot_masks(model: nn.Module) -> Dict[str, torch.Tensor]:
    """``{module name: bool mask}`` of every linear weight, a reference for :func:`audit`."""
    return {name: weight_mask(weight.detach()).cpu().clone()
            for name, weight in _linear_weights(model)}


class SparsityViolation(AssertionError):
    """Raised by :func:`audit` (``raise_on_violation=True``) when a pruned weight became nonzero
    (or a weight is NaN/inf)."""


@dataclass
class AuditResult:
    """What :func:`audit` found. ``ok`` is True when no pruned position became nonzero, every
    reference module is present and every weight is finite."""

    checked: int = 0
    new_nonzeros: Dict[str, int] = field(default_factory=dict)
    lost_nonzeros: Dict[str, int] = field(default_factory=dict)
    missing: List[str] = field(default_factory=list)
    non_finite: Dict[str, int] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.new_nonzeros and not self.missing and not self.non_finite

    def __bool__(self) -> bool:
        return self.ok

    def summary(self) -> str:
        if self.ok:
            lost = sum(self.lost_nonzeros.values())
            tail = f" ({lost} kept weights are now exactly 0)" if lost else ""
            return f"audit ok: {self.checked} weights, no pruned position became nonzero{tail}"
        parts = [f"{name}: {count} new nonzeros" for name, count in self.new_nonzeros.items()]
        parts += [f"{name}: {count} non-finite (NaN/inf) weights"
                  for name, count in self.non_finite.items()]
        parts += [f"{name}: missing" for name in self.missing]
        return "audit FAILED: " + "; ".join(parts)


def audit(model: nn.Module, reference, *, raise_on_violation: bool = False) -> AuditResult:
    """Check that no position that is zero in ``reference`` is nonzero in ``model``.

    Args:
        model: the model after training or merging.
        reference: a model with the original weights, or a ``{name: mask}`` dict from
            :func:`snapshot_masks`.
        raise_on_violation: raise :class:`SparsityViolation` instead of returning a failed result.

    Returns:
        An :class:`AuditResult`; ``new_nonzeros`` counts per module the pruned positions that are
        now nonzero (NaN counts as nonzero), ``non_finite`` the NaN/inf weights anywhere (a
        diverged run: a failure), ``lost_nonzeros`` the kept positions now exactly 0 (allowed,
        but reported).
    """
    masks = reference if isinstance(reference, dict) else snapshot_masks(reference)
    current = dict(_linear_weights(model))
    result = AuditResult()
    for name, mask in masks.items():
        weight = current.get(name)
        if weight is None:
            result.missing.append(name)
            continue
        if tuple(weight.shape) != tuple(mask.shape):
            raise ValueError(f"audit: {name} has shape {tuple(weight.shape)} but the reference "
                             f"has {tuple(mask.shape)}")
        now = weight_mask(weight.detach()).cpu()
        result.checked += 1
        new = int((now & ~mask).sum().item())
        lost = int((~now & mask).sum().item())
        if new:
            result.new_nonzeros[name] = new
        if lost:
            result.lost_nonzeros[name] = lost
        non_finite = int((~torch.isfinite(weight.detach())).sum().item())
        if non_finite:
            result.non_finite[name] = non_finite
    if raise_on_violation and not result.ok:
        raise SparsityViolation(result.summary())
    return result
