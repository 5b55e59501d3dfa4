"""A pruned linear stored quantized: :class:`QuantizedLinear` (codes + scales, :mod:`lors_fx.quant`)
and round-to-nearest quantization of a model's sparse linears, :func:`quantize_model`.

The state_dict keys are compressed-tensors' names for the same things (``weight_packed``,
``weight_scale``, ``bias``); the tensors differ only in packing (4-bit codes two to a byte here,
eight to an int32 there: :mod:`lors_fx.quant_checkpoint` converts). GPTQ-style and SparseGPT's
joint prune-and-quantize live in :mod:`lors_fx.workflows.quantize`.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors_fx._nn import is_linear_like, matches_any, oriented_weight, replace_module
from lors_fx.quant import (QMAX, QMIN, QuantSpec, code_dtype, compute_scales, dequantize,
                           pack_codes, packed_shape, resolve_group_size, round_to_codes,
                           search_scales, unpack_codes)
from lors_fx.sparsity import sparsity_of

__all__ = ["QuantizedLinear", "quantize_linear", "quantize_model", "quantized_modules",
           "is_quantized_model", "check_codes_match_mask"]


class QuantizedLinear(nn.Module):
    """``y = x @ dq(Q).T + bias`` with ``Q`` sparsity-aware symmetric codes (pruned = code 0).

    Buffers: ``weight_packed`` (``uint8`` pairs for 4 bits, ``int8`` for 8; ``(d_out, d_in/2)`` or
    ``(d_out, d_in)``) and ``weight_scale`` (``(d_out, d_in / group_size)``, the compute dtype);
    ``bias`` stays a (frozen) Parameter. ``weight`` is a read-only property: the dequantized
    weight, built on each access (for audits and reports; the forward dequantizes in row chunks
    through the LoRS op once adapters are attached).
    """

    def __init__(self, in_features: int, out_features: int, *, bits: int, group_size: int,
                 bias: bool = True, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None):
        super().__init__()
        QuantSpec(bits, group_size)
        if in_features % group_size:
            raise ValueError(f"QuantizedLinear: group_size={group_size} does not divide "
                             f"in_features={in_features}")
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        self.register_buffer("weight_packed", torch.zeros(
            packed_shape(out_features, in_features, bits), dtype=code_dtype(bits), device=device))
        self.register_buffer("weight_scale", torch.zeros(
            (out_features, in_features // group_size), dtype=dtype, device=device))
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device),
                                 requires_grad=False) if bias else None

    @property
    def weight(self) -> Tensor:
        """The dequantized weight ``dq(Q)`` (a fresh tensor: writing to it changes nothing)."""
        return dequantize(self.weight_packed, self.weight_scale, self.bits, d_in=self.in_features)

    @property
    def codes(self) -> Tensor:
        """The ``int8`` codes ``Q`` (unpacked)."""
        return unpack_codes(self.weight_packed, self.bits)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight.to(x.dtype), None if self.bias is None
                        else self.bias.to(x.dtype))

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, group_size={self.group_size}, "
                f"sparsity={sparsity_of(self.codes):.3f}")

    @classmethod
    def from_codes(cls, codes: Tensor, scales: Tensor, bits: int, bias: Optional[Tensor] = None,
                   mask: Optional[Tensor] = None, name: str = "layer") -> "QuantizedLinear":
        """A layer from ``int8`` codes and scales (validated: codes on the grid, scales fit; with
        ``mask``, the codes' zero pattern must equal it)."""
        d_out, d_in = codes.shape
        if scales.dim() != 2 or scales.shape[0] != d_out or d_in % scales.shape[1]:
            raise ValueError(f"{name}: scales {tuple(scales.shape)} do not fit codes "
                             f"{tuple(codes.shape)}")
        if codes.numel() and (int(codes.int().amax()) > QMAX[bits]
                              or int(codes.int().amin()) < QMIN[bits]):
            raise ValueError(f"{name}: codes outside the {bits}-bit grid "
                             f"[{QMIN[bits]}, {QMAX[bits]}]")
        if mask is not None:
            check_codes_match_mask(codes, mask, name)
        layer = cls(d_in, d_out, bits=bits, group_size=d_in // scales.shape[1],
                    bias=bias is not None, dtype=scales.dtype, device=codes.device)
        layer.weight_packed.copy_(pack_codes(codes, bits))
        layer.weight_scale.copy_(scales)
        if bias is not None:
            layer.bias.data.copy_(bias.detach())
        return layer


def check_codes_match_mask(codes: Tensor, mask: Tensor, name: str = "layer") -> None:
    """Raise when the zero pattern of ``codes`` differs from ``mask`` (True = kept)."""
    kept = codes != 0
    if kept.shape != mask.shape:
        raise ValueError(f"{name}: codes {tuple(kept.shape)} and mask {tuple(mask.shape)} differ "
                         f"in shape")
    wrong = kept != mask.bool()
    if wrong.any():
        lost, gained = int((wrong & mask.bool()).sum()), int((wrong & kept).sum())
        raise ValueError(f"{name}: the codes and the mask disagree: {lost} kept weight(s) have "
                         f"code 0 and {gained} pruned weight(s) have a nonzero code")


@torch.no_grad()
def quantize_linear(module: nn.Module, spec: QuantSpec, name: str = "layer",
                    dtype: Optional[torch.dtype] = None,
                    importance: Optional[Tensor] = None) -> QuantizedLinear:
    """Round-to-nearest :class:`QuantizedLinear` of a Linear/Conv1D (kept weights stay nonzero,
    pruned ones are code 0). Scales: with ``importance`` (one weight per input column, e.g. the
    calibration inputs' sums of squares) searched to minimize the importance-weighted error
    (:func:`lors_fx.quant.search_scales`: what a real LLM needs, see there); without, ``absmax /
    qmax``. ``dtype``: the scales' and bias' dtype (default: the weight's)."""
    weight = oriented_weight(module).detach()
    if not weight.is_floating_point():
        raise TypeError(f"{name}: a {weight.dtype} weight cannot be quantized")
    group = resolve_group_size(spec, weight.shape[1], name)
    if importance is not None:
        if importance.shape != (weight.shape[1],):
            raise ValueError(f"{name}: importance must have shape ({weight.shape[1]},), got "
                             f"{tuple(importance.shape)}")
        scales = search_scales(weight, spec.bits, group, importance, dtype=dtype or weight.dtype)
    else:
        scales = compute_scales(weight, spec.bits, group, dtype=dtype or weight.dtype)
    codes = round_to_codes(weight, scales, weight != 0, spec.bits)
    bias = None if module.bias is None else module.bias.detach().to(scales.dtype)
    return QuantizedLinear.from_codes(codes, scales, spec.bits, bias, mask=weight != 0,
                                      name=name)


def quantize_model(model: nn.Module, spec: QuantSpec, *, targets: Optional[Sequence[str]] = None,
                   exclude: Sequence[str] = ("lm_head",), min_sparsity: float = 0.0,
                   dtype: Optional[torch.dtype] = None,
                   importance: Optional[Dict[str, Tensor]] = None) -> List[str]:
    """Replace linears by round-to-nearest :class:`QuantizedLinear` s in place; returns their names.

    ``targets``: name suffixes (default: every Linear/Conv1D); ``exclude``: never quantized
    (``lm_head``: with tied embeddings it is the embedding). ``min_sparsity``: skip linears
    sparser than nothing (0.0 quantizes dense ones too). ``importance``: ``{name: per-input
    weights}`` for :func:`quantize_linear` (calibrated scales; without it the scales are
    ``absmax / qmax``, which on a real pruned LLM can be ruinous: prefer
    :func:`lors_fx.workflows.quantize.quantize_pruned_model`, which measures it). Every layer is
    checked (group size divides ``d_in``, float weight) before any is replaced.
    """
    chosen = []
    for name, module in model.named_modules():
        if not is_linear_like(module) or matches_any(name, exclude):
            continue
        if targets is not None and not matches_any(name, targets):
            continue
        if sparsity_of(oriented_weight(module).detach()) < min_sparsity:
            continue
        resolve_group_size(spec, oriented_weight(module).shape[1], name)
        chosen.append((name, module))
    if not chosen:
        raise ValueError("quantize_model: no linear to quantize (targets="
                         f"{list(targets) if targets else None}, exclude={list(exclude)})")
    for name, module in chosen:
        replace_module(model, name, quantize_linear(
            module, spec, name, dtype, None if importance is None else importance.get(name)))
    return [name for name, _ in chosen]


def quantized_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{fqn: module}`` of every quantized linear (plain or carrying an adapter)."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "weight_packed", None), Tensor) and hasattr(m, "bits")}


def is_quantized_model(model: nn.Module) -> bool:
    return bool(quantized_modules(model))
