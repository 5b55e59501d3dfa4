"""Benchmark rows on a quantized base (``lors-fx bench --bits 4 8 --group-size 128``).

For each bit width ``b`` the benchmark adds three rows, measured beside the unquantized ones on the
same pruned model (each gets a copy, quantized round-to-nearest with
:func:`lors_fx.quantized.quantize_model`, ``QuantSpec(b, group_size)``, scales in the case's
dtype):

- ``lors@int<b>``: ``lors_fx.optimize(model, LorsConfig(r, alpha), compile=False)`` on the
  quantized copy: the LoRS op on the codes (:func:`lors_fx.quant_ops.quantized_lora_linear`,
  ``W'`` built from the codes in row chunks, only ``x`` saved for backward).
- ``lors_qa@int<b>``: the same with ``LorsConfig(quant_aware=True)``: the forward uses ``Q(W')``
  on the base's grid (straight-through), so the merged quantized model computes what was trained.
- ``sqft@int<b>``: the naive masked form on the same codes, QA-SparsePEFT-style
  (:class:`NaiveQuantLinear`: the whole dequantized weight every forward, plain autograd, which
  keeps ``W'``).

Reference of the error columns (float64): ``lors@int`` rows use LoRS's closed form on the
dequantized base; ``lors_qa@int`` rows the same closed form plus the rounding of ``W'`` taken from
the op itself (``Q(W')`` in the compute dtype: a float64 rounding could flip a code sitting on a
rounding boundary, one grid step, which is not an error of the op); ``sqft@int`` rows their own
formula in float64 (exact masked gradient).
"""
from __future__ import annotations

import copy
import math
import re
from typing import Dict, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors_fx._nn import replace_module
from lors_fx.adapter_layers import LorsQuantLinear
from lors_fx.adapters import lors_modules
from lors_fx.api import optimize
from lors_fx.config import LorsConfig
from lors_fx.methods.baselines import lors_closed_form, randomize_adapters_, wrapped_modules
from lors_fx.quant import QuantSpec
from lors_fx.quant_ops import quantized_effective_weight, reference_quantized_lora_linear
from lors_fx.quantized import QuantizedLinear, quantize_model

__all__ = ["QUANT_KINDS", "QUANT_BOUNDS", "STEP_BOUND", "NaiveQuantLinear", "quant_row_names",
           "parse_quant_row", "parse_group_size", "build_quant_row", "quant_reference",
           "base_weight_bytes", "dense_bf16_bytes", "quant_targets"]

#: row kinds on a quantized base, in the order the benchmark runs them
QUANT_KINDS = ("lors", "lors_qa", "sqft")
#: the issue's bound on the base's linear bytes (codes + scales + bias) over bf16 weights
QUANT_BOUNDS = {4: 0.27, 8: 0.52}
#: the issue's bound on a LoRS step on the quantized base over LoRS on the unquantized one
STEP_BOUND = 1.25
_ROW = re.compile(r"^(lors|lors_qa|sqft)@int(4|8)$")


class NaiveQuantLinear(nn.Module):
    """The naive sparsity-preserving adapter on a quantized base (QA-SparsePEFT-style):
    ``W' = dq(Q) + s (B A) * M`` built whole every forward with plain torch ops, so autograd keeps
    ``W'`` (and the whole ``dq(Q)``) for backward. Shares the base's codes, scales and bias;
    adapters as PEFT's (``lora_A`` Kaiming-uniform, ``lora_B`` zeros, float32)."""

    def __init__(self, base: QuantizedLinear, r: int, alpha: float):
        super().__init__()
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size = base.bits, base.group_size
        self.register_buffer("weight_packed", base.weight_packed)
        self.register_buffer("weight_scale", base.weight_scale)
        self.bias = base.bias
        self.scaling = alpha / r
        device = base.weight_scale.device
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features, device=device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r, device=device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return reference_quantized_lora_linear(
            x, self.weight_packed, self.weight_scale.to(x.dtype), self.lora_A, self.lora_B,
            bits=self.bits, bias=bias, scaling=self.scaling)


def quant_row_names(bits: Optional[Sequence[int]]) -> List[str]:
    """``["lors@int4", "lors_qa@int4", "sqft@int4", ...]`` for each bit width (none for None)."""
    return [f"{kind}@int{b}" for b in (bits or ()) for kind in QUANT_KINDS]


def parse_quant_row(name: str) -> Optional[tuple]:
    """``(kind, bits)`` of a quantized row name, None for any other row."""
    match = _ROW.match(name)
    return None if match is None else (match.group(1), int(match.group(2)))


def parse_group_size(text: str) -> Optional[int]:
    """``--group-size``: a positive int, or ``channel`` (one scale per output row: None)."""
    if str(text).lower() in ("channel", "none"):
        return None
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--group-size: expected a positive int or 'channel', got {text!r}") \
            from None
    if value <= 0:
        raise ValueError(f"--group-size: expected a positive int or 'channel', got {text!r}")
    return value


def build_quant_row(name: str, base: nn.Module, r: int, alpha: float,
                    group_size: Optional[int]) -> nn.Module:
    """A copy of ``base`` quantized (round to nearest) and adapted as the row ``name`` says, its
    zero-initialised adapter factors randomised (as every benchmark row). Raises ``ValueError``
    when the group does not divide a ``d_in`` (the message names the layer)."""
    kind, bits = parse_quant_row(name)
    model = copy.deepcopy(base)
    quantize_model(model, QuantSpec(bits, group_size), min_sparsity=0.1)
    if kind == "sqft":
        for parameter in model.parameters():
            parameter.requires_grad_(False)
        for module_name, module in list(model.named_modules()):
            if isinstance(module, QuantizedLinear):
                replace_module(model, module_name, NaiveQuantLinear(module, r, alpha))
    else:
        optimize(model, LorsConfig(r=r, lora_alpha=alpha, quant_aware=kind == "lors_qa"),
                 compile=False)
    randomize_adapters_(model)
    return model


def _closed_form(module: nn.Module, rounded: Optional[Tensor]):
    """The float64 forward of one :class:`LorsQuantLinear` copy: LoRS's closed form on the
    dequantized base, plus (QA) the op's own rounding shift ``Q(W') - W'`` as a constant."""

    def forward(x):
        y = lors_closed_form(x, module.true_weight(), module.lora_A, module.lora_B, module.bias,
                             module.scaling)
        if rounded is None:
            return y
        weight = module.true_weight()
        w_eff = weight + module.scaling * (module.lora_B @ module.lora_A) * (weight != 0)
        return y + F.linear(x, (rounded.to(w_eff.dtype) - w_eff).detach())

    return forward


@torch.no_grad()
def _qa_weights(raw: nn.Module) -> Dict[str, Tensor]:
    """``Q(W')`` of every quant-aware layer, in its compute dtype, as the op builds it."""
    return {name: quantized_effective_weight(m.weight_packed, m.weight_scale, m.lora_A,
                                             m.lora_B, m.scaling, m.bits, True)
            for name, m in lors_modules(raw).items()
            if isinstance(m, LorsQuantLinear) and m.quant_aware}


def quant_reference(raw: nn.Module) -> nn.Module:
    """A float64 copy of a quantized row's model running its formula (module docstring)."""
    rounded = _qa_weights(raw)
    ref = copy.deepcopy(raw).double()
    for name, module in lors_modules(ref).items():
        if isinstance(module, LorsQuantLinear):
            module.forward = _closed_form(module, rounded.get(name))
    return ref


def _tensor_bytes(tensors) -> int:
    seen = {}
    for tensor in tensors:
        if tensor is not None:
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _base_tensors(module: nn.Module) -> list:
    """The base tensors of one adapted linear: codes + scales + bias, or weight + bias."""
    if isinstance(getattr(module, "weight_packed", None), Tensor):
        return [module.weight_packed, module.weight_scale, module.bias]
    return [module.weight, module.bias]


def _adapted_linears(model: nn.Module) -> List[nn.Module]:
    """Every adapted linear of a benchmark row: LoRS layers, baseline wrappers, naive rows."""
    found = {**lors_modules(model), **wrapped_modules(model)}
    found.update((n, m) for n, m in model.named_modules() if isinstance(m, NaiveQuantLinear))
    return list(found.values())


def base_weight_bytes(model: nn.Module) -> Optional[int]:
    """Bytes of the base weights of the adapted linears (codes + scales + bias for a quantized
    base; weight + bias otherwise), each storage once; None when no adapted linear is found."""
    modules = _adapted_linears(model)
    return _tensor_bytes(t for m in modules for t in _base_tensors(m)) if modules else None


def dense_bf16_bytes(model: nn.Module) -> Optional[int]:
    """What the adapted linears' weights and biases take in bfloat16 (the issue's baseline)."""
    modules = _adapted_linears(model)
    if not modules:
        return None
    total = 0
    for module in modules:
        bias = module.bias
        total += 2 * module.in_features * module.out_features if hasattr(module, "in_features") \
            else 2 * module.weight.numel()
        total += 0 if bias is None else 2 * bias.numel()
    return total


def quant_targets(cases: List[dict]) -> List[dict]:
    """The issue's goals on each case that has quantized rows: every ``lors*@int<b>`` step
    ``<= 1.25x`` the ``lors`` row of the same case (same dtype); every ``@int<b>`` row's base bytes
    ``<= 0.27x`` (int4) / ``0.52x`` (int8) of the same weights in bfloat16."""
    out = []
    for case in cases:
        rows = {row["method"]: row for row in case["rows"]}
        where = {k: case[k] for k in ("workload", "tokens", "r", "dtype")}
        for name, row in rows.items():
            parsed = parse_quant_row(name)
            if parsed is None:
                continue
            kind, bits = parsed
            checks = [(f"base bytes <= {QUANT_BOUNDS[bits]}x bf16", row.get("base_vs_bf16"),
                       QUANT_BOUNDS[bits])]
            if kind != "sqft":
                other = rows.get("lors", {}).get("step_ms")
                ratio = row["step_ms"] / other if row.get("step_ms") and other else None
                checks.append((f"step <= {STEP_BOUND}x LoRS ({case['dtype']})", ratio,
                               STEP_BOUND))
            for label, ratio, bound in checks:
                out.append({**where, "row": name, "target": label, "ratio": ratio,
                            "bound": bound, "holds": None if ratio is None else ratio <= bound})
    return out
