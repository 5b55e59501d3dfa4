"""The adapted layers: :class:`LorsLinear`, :class:`LorsConv1D` and :class:`LorsQuantLinear` (a
quantized base), and :func:`adapter_forward`, the forward they share with converted PEFT layers.

Each reuses its base's tensors under the same names (``weight``/``bias``, or ``weight_packed``/
``weight_scale``/``bias`` for a quantized base), so module names and state_dict keys do not change,
and adds ``lora_A`` (r x d_in) and ``lora_B`` (d_out x r), PEFT's shapes. Attaching, merging and
detaching them: :mod:`lors_fx.adapters`.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors_fx.ops import reference_sparse_lora_linear, sparse_lora_delta, sparse_lora_linear
from lors_fx.quant import dequantize
from lors_fx.quant_ops import quantized_lora_linear, reference_quantized_lora_linear
from lors_fx.quantized import QuantizedLinear
from lors_fx.semi_structured import semi_structured_lora_linear
from lors_fx.sparsity import sparsity_of

__all__ = ["LorsLinear", "LorsConv1D", "LorsQuantLinear", "LORS_TYPES", "adapter_forward",
           "adapter_dtype_for", "reference_sparse_lora_dropout_form"]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype_for(weight_dtype: torch.dtype, adapter_dtype: str = "float32") -> torch.dtype:
    """The adapters' dtype on a base of ``weight_dtype`` (:attr:`LorsConfig.adapter_dtype`):
    ``"float32"`` = float32 on a float16/bfloat16 base, else the weight's; ``"weight"`` = the
    weight's."""
    if adapter_dtype == "float32" and weight_dtype in _HALF_DTYPES:
        return torch.float32
    return weight_dtype


def reference_sparse_lora_dropout_form(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                       bias: Optional[Tensor], scaling: float,
                                       dropout: nn.Module) -> Tensor:
    """The naive plain-torch form with adapter dropout (what the compiler sees and rewrites).

    ``y = F.linear(x, W, bias) + F.linear(dropout(x), (s * (B @ A)) * (W != 0))``: the base sees
    ``x``, the masked adapter sees ``dropout(x)``. Its autograd gradient is the ``"exact"`` one.
    """
    delta = (scaling * (lora_B @ lora_A)) * (weight != 0)
    return F.linear(x, weight, bias) + F.linear(dropout(x), delta)


def adapter_forward(adapter, x: Tensor) -> Tensor:
    """``x @ (W + s*(B@A)*M).T + bias`` for one adapted layer: a :class:`LorsLinear` /
    :class:`LorsConv1D`, or the view of a converted PEFT layer (:mod:`lors_fx.peft_adapters`);
    ``adapter`` gives ``true_weight()``, ``bias``, ``lora_A``, ``lora_B``, ``scaling``,
    ``lora_dropout``, ``training`` and the op settings. The adapter input is dropped out in
    training."""
    if isinstance(adapter, LorsQuantLinear):
        # As for the float adapters below: the naive form only inside a dynamo trace, for the
        # compiler's rewrite (rewrite_quantized_adapters) to replace by the op.
        if adapter.emit_reference and torch.compiler.is_compiling():
            return reference_quantized_lora_linear(
                x, adapter.weight_packed, adapter.weight_scale, adapter.lora_A, adapter.lora_B,
                bits=adapter.bits, bias=adapter.bias, scaling=adapter.scaling)
        return quantized_lora_linear(
            x, adapter.weight_packed, adapter.weight_scale, adapter.lora_A, adapter.lora_B,
            bits=adapter.bits, bias=adapter.bias, scaling=adapter.scaling,
            grad_mode=adapter.grad_mode, quant_aware=adapter.quant_aware,
            chunk_bytes=adapter.chunk_bytes)
    weight, bias, s = adapter.true_weight(), adapter.bias, adapter.scaling
    dropout = adapter.training and isinstance(adapter.lora_dropout, nn.Dropout)
    if getattr(adapter, "semi_structured", False) and not dropout \
            and not torch.compiler.is_compiling():  # getattr: modules pickled before the flag
        return semi_structured_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias, s)
    # The naive form exists only for the compiler's passes to rewrite: outside a dynamo trace
    # (eval, generate, a deep copy) it would save W', so the op runs instead.
    if adapter.emit_reference and torch.compiler.is_compiling():
        if dropout:
            return reference_sparse_lora_dropout_form(x, weight, adapter.lora_A, adapter.lora_B,
                                                      bias, s, adapter.lora_dropout)
        return reference_sparse_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias, s)
    options = dict(scaling=s, grad_mode=adapter.grad_mode, recompute=adapter.recompute,
                   chunk_bytes=adapter.chunk_bytes)
    if dropout:
        return F.linear(x, weight, bias) + sparse_lora_delta(
            adapter.lora_dropout(x), weight, adapter.lora_A, adapter.lora_B, **options)
    return sparse_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias=bias, **options)


class _LorsMixin:
    """Adapter state and forward shared by :class:`LorsLinear` and :class:`LorsConv1D`."""

    def _init_adapter(self, base: nn.Module, r: int, scaling: float, grad_mode: str,
                      recompute: bool, chunk_bytes: Optional[int], lora_dropout: float,
                      adapter_dtype: str = "float32") -> None:
        weight = self._take_base(base)
        d_out, d_in = self.d_out, self.d_in
        self.r = r
        self.scaling = float(scaling)
        self.grad_mode = grad_mode
        self.recompute = recompute
        self.chunk_bytes = chunk_bytes
        self.emit_reference = self.semi_structured = False
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        factory = dict(dtype=adapter_dtype_for(weight.dtype, adapter_dtype), device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **factory))
        self.reset_adapter()
        self.train(base.training)

    def _take_base(self, base: nn.Module) -> Tensor:
        """Reuse the base's Parameter objects (module names and state_dict keys stay as they
        were); returns a tensor with the adapters' device and base dtype."""
        self.weight, self.bias = base.weight, base.bias
        return base.weight

    def reset_adapter(self) -> None:
        """PEFT's default init: lora_A Kaiming-uniform (``a=sqrt(5)``), lora_B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def reset_parameters(self) -> None:
        """Reset the adapter only: re-drawing the pruned base weight would densify it."""
        self.reset_adapter()

    def forward(self, x: Tensor) -> Tensor:
        """``x @ (W + s*(B@A)*M).T + bias`` (adapter input dropped out in training)."""
        return self._adapted(x)

    def extra_repr(self) -> str:
        return self._adapter_repr()

    def true_weight(self) -> Tensor:
        """The weight as ``(d_out, d_in)`` (a transposed view for Conv1D)."""
        raise NotImplementedError

    def _adapted(self, x: Tensor) -> Tensor:
        return adapter_forward(self, x)

    def _adapter_repr(self) -> str:
        weight = self.true_weight()
        sparsity = "meta" if weight.device.type == "meta" else f"{sparsity_of(weight):.3f}"
        return (f"in_features={self.d_in}, out_features={self.d_out}, r={self.r}, "
                f"scaling={self.scaling:g}, grad_mode={self.grad_mode}, sparsity={sparsity}")


class LorsLinear(_LorsMixin, nn.Linear):
    """An ``nn.Linear`` with a sparsity-preserving adapter; reuses the original weight and bias.

    Attributes: ``r``, ``scaling``, ``grad_mode``, ``recompute``, ``chunk_bytes``,
    ``lora_dropout`` (``nn.Dropout`` or ``nn.Identity``), ``emit_reference`` (forward the naive
    plain-torch form for the compiler instead of calling the custom op).
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, *, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None,
                 lora_dropout: float = 0.0, adapter_dtype: str = "float32"):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_adapter(base, r, scaling, grad_mode, recompute, chunk_bytes, lora_dropout,
                           adapter_dtype)

    d_in = property(lambda self: self.in_features)
    d_out = property(lambda self: self.out_features)

    def true_weight(self) -> Tensor:
        return self.weight



class LorsConv1D(_LorsMixin, nn.Module):
    """GPT-2's ``Conv1D`` (weight stored d_in x d_out, ``y = x @ W + b``) with a sparse adapter.

    Keeps the original weight Parameter in its stored layout (state_dict shapes unchanged) and
    hands ``weight.t()`` to the op, so the mask runs along the true input dim.
    ``base_class`` remembers the original class, used by :func:`merge`.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, *, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None,
                 lora_dropout: float = 0.0, adapter_dtype: str = "float32"):
        super().__init__()
        self.base_class = type(base)
        self.nx, self.nf = base.weight.shape
        self._init_adapter(base, r, scaling, grad_mode, recompute, chunk_bytes, lora_dropout,
                           adapter_dtype)

    d_in = property(lambda self: self.nx)
    d_out = property(lambda self: self.nf)

    def true_weight(self) -> Tensor:
        return self.weight.t()


class LorsQuantLinear(_LorsMixin, nn.Module):
    """A :class:`lors_fx.quantized.QuantizedLinear` with a sparsity-preserving adapter:
    ``y = x @ (dq(Q) + s*(B@A)*M).T + bias``, ``M = Q != 0`` (:mod:`lors_fx.quant_ops`).

    Holds the base's ``weight_packed`` / ``weight_scale`` buffers and ``bias`` under the same
    names. ``quant_aware``: the forward uses ``Q(W')`` on the base's grid (straight-through), so
    the merged quantized layer computes exactly what was trained. ``true_weight()`` and ``weight``
    are the dequantized base (a fresh tensor per call, for audits and reports).
    """

    def __init__(self, base: QuantizedLinear, r: int, scaling: float, *, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None,
                 lora_dropout: float = 0.0, adapter_dtype: str = "float32",
                 quant_aware: bool = False):
        nn.Module.__init__(self)
        if lora_dropout > 0 or not recompute:
            raise ValueError("a quantized base needs lora_dropout=0 and recompute=True (the op "
                             "rebuilds W' from the codes; dropout would need a second pass over "
                             f"them), got lora_dropout={lora_dropout}, recompute={recompute}")
        self.in_features, self.out_features = base.in_features, base.out_features
        self.bits, self.group_size, self.quant_aware = base.bits, base.group_size, quant_aware
        self._init_adapter(base, r, scaling, grad_mode, recompute, chunk_bytes, lora_dropout,
                           adapter_dtype)

    d_in = property(lambda self: self.in_features)
    d_out = property(lambda self: self.out_features)

    def _take_base(self, base: nn.Module) -> Tensor:
        self.register_buffer("weight_packed", base.weight_packed)
        self.register_buffer("weight_scale", base.weight_scale)
        self.bias = base.bias
        return self.weight_scale

    def true_weight(self) -> Tensor:
        return dequantize(self.weight_packed, self.weight_scale, self.bits, d_in=self.in_features)

    weight = property(true_weight, doc="The dequantized base weight (a fresh tensor).")

    def _adapter_repr(self) -> str:
        return (super()._adapter_repr() + f", bits={self.bits}, group_size={self.group_size}, "
                f"quant_aware={self.quant_aware}")

    def base_layer(self) -> QuantizedLinear:
        """A :class:`QuantizedLinear` holding this layer's codes, scales and bias (no copy)."""
        with torch.device("meta"):
            plain = QuantizedLinear(self.in_features, self.out_features, bits=self.bits,
                                    group_size=self.group_size, bias=self.bias is not None,
                                    dtype=self.weight_scale.dtype)
        plain.weight_packed, plain.weight_scale, plain.bias = (
            self.weight_packed, self.weight_scale, self.bias)
        plain.train(self.training)
        return plain


LORS_TYPES = (LorsLinear, LorsConv1D, LorsQuantLinear)
