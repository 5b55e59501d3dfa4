"""Sparsity-aware symmetric integer quantization: the grid, the rounding, packing, chunked dequant.

A weight ``W`` (d_out x d_in) is stored as integer codes ``Q`` and one scale per row and group of
``group_size`` consecutive inputs (``group_size = d_in``: one scale per row, "per channel")::

    W ~ dq(Q) = Q * scale          Q in [-qmax, qmax], qmax = 7 (4 bits) or 127 (8 bits)

Symmetric, no zero point, so a pruned weight is exactly code 0 and ``M = (Q != 0)``. lors_fx's own
scales (``absmax / qmax``) use ``[-qmax, qmax]``; the extra two's-complement level ``-qmax - 1``
(``-8`` / ``-128``), which compressed-tensors' own calibration (``absmax / 7.5``) produces, is
kept as it is wherever a loaded checkpoint has it. A *kept* weight never rounds to 0: where ``round(w / scale)`` is 0 the code is ``+1`` or ``-1`` (the sign of
``w``; ``+1`` for an exact 0), so the mask is read from the codes alone and survives every round
trip (quantize, merge, save, load). Values beyond the grid saturate at ``qmax`` / ``-qmax - 1``.

4-bit codes are packed two to a byte (``uint8``, element ``2j`` in the low nibble, ``2j+1`` in the
high one, two's complement); 8-bit codes are ``int8``. The on-disk format is compressed-tensors'
(:mod:`lors_fx.quant_checkpoint`); this module holds only what no library does: the rounding that
keeps the mask, and the dequant of a row chunk straight into a caller's buffer (the op's ``W'``
build never holds a whole dequantized weight).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

__all__ = ["BITS", "QMAX", "QMIN", "DEFAULT_GROUP_SIZE", "SCALE_FACTORS", "QuantSpec",
           "resolve_group_size", "compute_scales", "search_scales", "round_to_codes", "pack_codes", "unpack_codes", "dequantize_rows",
           "dequantize", "fake_quantize_rows_", "packed_shape", "code_dtype"]

BITS = (4, 8)
QMAX = {4: 7, 8: 127}
#: the lowest code a loaded checkpoint may hold (two's complement); lors_fx's scales never reach it
QMIN = {4: -8, 8: -128}
DEFAULT_GROUP_SIZE = 128
#: candidate scales of :func:`search_scales`, as fractions of ``absmax / qmax`` (1.0: no clipping)
SCALE_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.07, 0.05, 0.035,
                 0.025)


@dataclass(frozen=True)
class QuantSpec:
    """A quantization grid: ``bits`` (4 or 8) and ``group_size`` (inputs per scale; ``None`` = one
    scale per output row). Validated on construction."""

    bits: int = 4
    group_size: Optional[int] = DEFAULT_GROUP_SIZE

    def __post_init__(self):
        if self.bits not in BITS or isinstance(self.bits, bool):
            raise ValueError(f"quantization: bits must be 4 or 8, got {self.bits!r}")
        if self.group_size is not None and (not isinstance(self.group_size, int)
                                            or isinstance(self.group_size, bool)
                                            or self.group_size <= 0):
            raise ValueError(f"quantization: group_size must be a positive int or None (one "
                             f"scale per row), got {self.group_size!r}")
        if self.bits == 4 and self.group_size is not None and self.group_size % 2:
            raise ValueError(f"quantization: 4-bit codes are packed in pairs, so group_size must "
                             f"be even, got {self.group_size}")


def resolve_group_size(spec: QuantSpec, d_in: int, name: str = "weight") -> int:
    """The group size for a ``d_in``-wide weight (``d_in`` for per channel); raises when the group
    does not divide ``d_in`` (or a 4-bit weight has an odd ``d_in``)."""
    group = d_in if spec.group_size is None else spec.group_size
    if d_in % group:
        divisors = [g for g in (256, 128, 64, 32, 16) if d_in % g == 0]
        raise ValueError(f"quantization: group_size={group} does not divide d_in={d_in} of "
                         f"{name}; use one that does ({divisors or 'none of 256..16'}) or "
                         f"group_size=None (per channel)")
    if spec.bits == 4 and d_in % 2:
        raise ValueError(f"quantization: 4-bit codes are packed in pairs; {name} has an odd "
                         f"d_in={d_in}")
    return group


def code_dtype(bits: int) -> torch.dtype:
    """Storage dtype of the packed codes."""
    return torch.uint8 if bits == 4 else torch.int8


def packed_shape(d_out: int, d_in: int, bits: int) -> tuple:
    return (d_out, d_in // 2) if bits == 4 else (d_out, d_in)


@torch.no_grad()
def compute_scales(weight: Tensor, bits: int, group_size: int,
                   dtype: Optional[torch.dtype] = None) -> Tensor:
    """Round-to-nearest scales ``absmax(group) / qmax``, shape ``(d_out, d_in // group_size)``, in
    ``dtype`` (default: the weight's). A group holding any kept weight gets a positive scale (at
    least ``finfo(dtype).tiny``), so its kept weights stay nonzero once dequantized."""
    d_out, d_in = weight.shape
    dtype = weight.dtype if dtype is None else dtype
    absmax = weight.detach().float().abs().view(d_out, d_in // group_size, group_size).amax(-1)
    if not torch.isfinite(absmax).all():
        raise ValueError("quantization: the weight holds NaN or inf")
    scales = (absmax / QMAX[bits]).to(dtype)
    floor = torch.finfo(dtype).tiny
    return torch.where(absmax > 0, scales.clamp_min(floor), torch.zeros_like(scales))


def _round(values: Tensor, scales: Tensor, kept: Tensor, bits: int) -> Tensor:
    """float32 codes: ``|q| = clamp(round(|v| / scale), 1, qmax + 1)`` with the sign of ``v``, then
    at most ``qmax`` (so a kept weight never rounds to 0 and the grid is ``[-qmax - 1, qmax]``;
    ``round`` is symmetric, so this is ``round(v / scale)`` elsewhere),
    times the 0/1 ``kept``: pruned positions are 0, NaN at a kept position stays NaN. In place
    on one float32 copy of the chunk (the QA forward calls it on every chunk of W')."""
    rows, cols = values.shape
    groups = scales.shape[1]
    safe = scales.float().clamp_min(torch.finfo(torch.float32).tiny).unsqueeze(-1)
    q = values.float().abs() if values.dtype != torch.float32 else values.abs()
    q.view(rows, groups, cols // groups).div_(safe)
    q.round_().clamp_(1, QMAX[bits] + 1).copysign_(values).clamp_(max=QMAX[bits])
    return q.mul_(kept if kept.dtype == torch.float32 else kept.to(torch.float32))


@torch.no_grad()
def search_scales(weight: Tensor, bits: int, group_size: int, importance: Optional[Tensor] = None,
                  kept: Optional[Tensor] = None, dtype: Optional[torch.dtype] = None,
                  factors=SCALE_FACTORS) -> Tensor:
    """Scales ``(d_out, d_in // group_size)`` chosen per row and group among ``absmax * f / qmax``
    (``f`` in ``factors``) to minimize ``sum_j importance_j * (w_j - dq(w_j))**2`` under the
    sparsity-aware rounding (kept weights never 0, pruned ones 0).

    Why: a kept weight below half a step is forced to +-1 step. Wanda and SparseGPT keep tiny
    weights exactly where the inputs are huge (outlier channels), and forcing those to
    ``absmax / qmax`` wrecks the model (Wanda-50% SmolLM2-135M, int4 g64: perplexity 58 -> 62,321
    with absmax scales, 109 with scales searched under ``importance = E[x_j^2]``; docs/quantized.md).
    ``importance``: one nonnegative weight per input column (``d_in``), e.g. the calibration
    inputs' sums of squares; None = the plain squared error. ``kept``: the mask (default
    ``weight != 0``). ``dtype``: the scales' dtype (default the weight's); the error is measured
    with the scales rounded to it, as they will be stored."""
    d_out, d_in = weight.shape
    dtype = weight.dtype if dtype is None else dtype
    groups = d_in // group_size
    kept = (weight != 0) if kept is None else kept
    w = weight.detach().float().masked_fill(~kept, 0.0).view(d_out, groups, group_size)
    keep = kept.view(d_out, groups, group_size).float()
    absmax = w.abs().amax(-1)
    if not torch.isfinite(absmax).all():
        raise ValueError("quantization: the weight holds NaN or inf")
    weights = (torch.ones(d_in, device=w.device) if importance is None
               else importance.detach().float().to(w.device)).view(1, groups, group_size)
    best, best_error = None, None
    for factor in factors:
        scale = (absmax * (factor / QMAX[bits])).to(dtype).float().unsqueeze(-1)
        q = (w.abs() / scale.clamp_min(torch.finfo(torch.float32).tiny)).round_()
        q.clamp_(1, QMAX[bits] + 1).copysign_(w).clamp_(max=QMAX[bits]).mul_(keep)
        error = (weights * (w - q * scale).pow_(2)).sum(-1)
        if best is None:
            best, best_error = scale.squeeze(-1), error
        else:
            better = error < best_error
            best = torch.where(better, scale.squeeze(-1), best)
            best_error = torch.where(better, error, best_error)
    floor = torch.finfo(dtype).tiny
    return torch.where(absmax > 0, best.to(dtype).clamp_min(floor), torch.zeros_like(best,
                                                                                      dtype=dtype))


def round_to_codes(values: Tensor, scales: Tensor, kept: Tensor, bits: int) -> Tensor:
    """``int8`` codes of ``values`` (rows x cols) on ``scales`` (rows x cols/group, broadcast over
    each group), in float32: ``round(v / scale)`` clamped to ``[-qmax - 1, qmax]``; where ``kept`` (bool, or
    a float32 0/1 mask) a 0 becomes ``+-1`` (the sign bit of ``v``: ``+1`` for ``+0.0``); where not
    kept the code is 0. Raises on NaN/inf at a kept position (no code holds it)."""
    q = _round(values, scales, kept, bits)
    if not torch.isfinite(q).all():
        raise FloatingPointError("quantization: NaN/inf at a kept position; no code holds it")
    return q.to(torch.int8)


def pack_codes(codes: Tensor, bits: int) -> Tensor:
    """``int8`` codes -> storage (4 bits: two per ``uint8``, low nibble first; 8 bits: as is)."""
    if bits == 8:
        return codes.to(torch.int8).contiguous()
    pairs = codes.to(torch.int8).view(codes.shape[0], -1, 2).view(torch.uint8)
    return ((pairs[..., 0] & 0xF) | (pairs[..., 1] << 4)).contiguous()


def unpack_codes(packed: Tensor, bits: int) -> Tensor:
    """Storage -> ``int8`` codes (the inverse of :func:`pack_codes`)."""
    if bits == 8:
        return packed.to(torch.int8)
    low = (packed << 4).view(torch.int8) >> 4  # arithmetic shift: sign-extends the nibble
    high = packed.view(torch.int8) >> 4
    return torch.stack((low, high), dim=-1).view(packed.shape[0], -1)


def dequantize_rows(packed: Tensor, scales: Tensor, bits: int, start: int, stop: int,
                    out: Tensor) -> Tensor:
    """Rows ``start:stop`` of ``dq(Q)`` written into ``out`` (``(stop - start) x d_in``, the compute
    dtype): codes converted straight into ``out``, then multiplied by their group's scale."""
    rows = stop - start
    part = packed[start:stop]
    if bits == 4:
        pairs = out.view(rows, -1, 2)
        pairs[..., 0].copy_((part << 4).view(torch.int8) >> 4)
        pairs[..., 1].copy_(part.view(torch.int8) >> 4)
    else:
        out.copy_(part)
    groups = scales.shape[1]
    out.view(rows, groups, -1).mul_(scales[start:stop].to(out.dtype).unsqueeze(-1))
    return out


def dequantize(packed: Tensor, scales: Tensor, bits: int, dtype: Optional[torch.dtype] = None,
               d_in: Optional[int] = None) -> Tensor:
    """The whole ``dq(Q)`` (merge, checks, inference helpers; the op never calls this)."""
    d_out = packed.shape[0]
    d_in = packed.shape[1] * (2 if bits == 4 else 1) if d_in is None else d_in
    out = torch.empty((d_out, d_in), dtype=dtype or scales.dtype, device=packed.device)
    return dequantize_rows(packed, scales, bits, 0, d_out, out)


def fake_quantize_rows_(values: Tensor, scales: Tensor, kept: Tensor, bits: int) -> Tensor:
    """``values <- dq(Q(values))`` on the given grid, in place (rows of ``W'`` in quantization-aware
    training): the codes :func:`round_to_codes` gives, times their scale, in ``values``' dtype,
    exactly as :func:`dequantize_rows` computes them. NaN/inf at a kept position stays NaN."""
    q = _round(values, scales, kept, bits)
    view = values.view(values.shape[0], scales.shape[1], -1)
    scale = scales.to(values.dtype).unsqueeze(-1)
    if q.dtype == values.dtype:  # float32: q is integer-valued, so q * scale is the same product
        torch.mul(q.view_as(view), scale, out=view)
    else:
        values.copy_(q)
        view.mul_(scale)
    return values
