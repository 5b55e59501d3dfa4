"""The LoRS op on a quantized base (:mod:`lors_fx.quant`): codes ``Q``, scales, ``M = (Q != 0)``::

    W' = dq(Q) + s * (lora_B @ lora_A) * M          y = x @ W'.T + bias

With ``quant_aware=True`` (QA, SQFT's idea) the forward uses ``Q(W')`` on the base's own grid
instead (sparsity-aware rounding: kept weights stay nonzero, pruned ones 0), with a
straight-through gradient, so the merged quantized model computes exactly what was trained.

``W'`` is built in row chunks: each chunk of codes is dequantized into a small reused buffer and
summed into ``P = B @ A`` in place, so the only weight-sized tensor is ``W'`` itself (never a whole
dequantized weight beside it). Saved for backward: ``x`` (the codes, scales and adapters are
referenced); the backward rebuilds ``W'`` for ``grad_x``. The gradient modes are those of
:mod:`lors_fx.ops` (``"lors"`` factorized, ``"exact"`` masked and chunked).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from lors_fx.ops import (DEFAULT_CHUNK_BYTES, GRAD_MODES, _chunk_rows, _linear,
                         _product_is_finite, _row_chunks)
from lors_fx.quant import (QMAX, code_dtype, dequantize, dequantize_rows, fake_quantize_rows_,
                           pack_codes, round_to_codes)

__all__ = ["quantized_lora_linear", "reference_quantized_lora_linear",
           "quantized_effective_weight", "merge_quantized_codes", "dequantize_op"]

_COMPUTE_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def quantized_effective_weight(packed: Tensor, scales: Tensor, lora_A: Tensor, lora_B: Tensor,
                               scaling: float, bits: int, quant_aware: bool) -> Tensor:
    """``W'`` in ``scales``' dtype, built in row chunks (the forward's and the backward's build,
    and merge's); kept entries follow the adapters (NaN included), pruned ones are exactly 0."""
    dtype = scales.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    product = torch.mm(B, A)  # becomes W'
    finite = _product_is_finite(A, B, scaling)
    rows, chunks = _row_chunks(product)
    base = product.new_empty((rows, product.shape[1]))
    mask = torch.empty_like(base)
    for start, stop in chunks:
        dq = dequantize_rows(packed, scales, bits, start, stop, base[: stop - start])
        part = product[start:stop]
        ones = torch.sign(dq, out=mask[: stop - start]).abs_()  # M as 0/1 in the compute dtype
        if finite:
            torch.addcmul(dq, part, ones, value=scaling, out=part)
        else:  # inf * 0 would put NaN at pruned positions
            part.mul_(scaling).add_(dq).masked_fill_(dq == 0, 0)
        if quant_aware:
            fake_quantize_rows_(part, scales[start:stop], ones, bits)
    return product


# The W' build as an op, so that tracing the backward (aot_autograd) keeps it opaque: the
# finiteness check reads the adapters' values.
@torch.library.custom_op("lors::quant_masked_weight", mutates_args=())
def _quant_masked_weight(packed: Tensor, scales: Tensor, lora_A: Tensor, lora_B: Tensor,
                         scaling: float, bits: int, quant_aware: bool) -> Tensor:
    return quantized_effective_weight(packed, scales, lora_A, lora_B, scaling, bits, quant_aware)


_quant_masked_weight.register_fake(
    lambda packed, scales, lora_A, *args: scales.new_empty((packed.shape[0], lora_A.shape[1])))


@torch.library.custom_op("lors::quant_lora_linear", mutates_args=())
def _qop(x: Tensor, packed: Tensor, scales: Tensor, lora_A: Tensor, lora_B: Tensor,
         bias: Optional[Tensor], scaling: float, grad_mode: str, bits: int, quant_aware: bool,
         chunk_bytes: int) -> Tensor:
    w_eff = quantized_effective_weight(packed, scales, lora_A, lora_B, scaling, bits, quant_aware)
    return _linear(x, w_eff, bias)


_qop.register_fake(lambda x, packed, *args: x.new_empty((*x.shape[:-1], packed.shape[0])))


def _qop_setup(ctx, inputs, output):
    x, packed, scales, lora_A, lora_B, bias = inputs[:6]
    ctx.scaling, ctx.grad_mode, ctx.bits, ctx.quant_aware, ctx.chunk_bytes = inputs[6:]
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, packed, scales, lora_A, lora_B)


def _exact_grads(ctx, g2d, x2d, A, B, need_x):
    """``(G * M)`` products in row chunks of ``G = g.T @ x`` (and ``grad_x`` chunk by chunk)."""
    _, packed, scales, lora_A, lora_B = ctx.saved_tensors
    s = ctx.scaling
    d_out, d_in = packed.shape[0], x2d.shape[1]
    rows = _chunk_rows(d_out, d_in, x2d.element_size(), ctx.chunk_bytes, buffers=2)
    grad_A, grad_B = torch.zeros_like(A), torch.empty_like(B)
    grad_x = torch.zeros_like(x2d) if need_x else None
    buffer = x2d.new_empty((rows, d_in))
    for start in range(0, d_out, rows):
        stop = min(d_out, start + rows)
        g_chunk = g2d[:, start:stop]
        if need_x:
            w_chunk = torch.ops.lors.quant_masked_weight.default(
                packed[start:stop], scales[start:stop], lora_A, lora_B[start:stop], s, ctx.bits,
                ctx.quant_aware)
            grad_x.addmm_(g_chunk, w_chunk)
            del w_chunk
        dq = dequantize_rows(packed, scales, ctx.bits, start, stop, buffer[: stop - start])
        masked_grad = torch.mm(g_chunk.t(), x2d).mul_(dq.sign_().abs_())  # (G * M) rows
        torch.mm(masked_grad, A.t(), out=grad_B[start:stop])
        grad_A.addmm_(B[start:stop].t(), masked_grad)
        del masked_grad
    return grad_x, grad_A.mul_(s), grad_B.mul_(s)


def _qop_backward(ctx, grad_y):
    x, packed, scales, lora_A, lora_B = ctx.saved_tensors
    need_x, _, _, need_A, need_B, need_bias = ctx.needs_input_grad[:6]
    s, dtype = ctx.scaling, scales.dtype
    A, B = lora_A.to(dtype), lora_B.to(dtype)
    x2d = x.reshape(-1, x.shape[-1])
    g2d = grad_y.reshape(-1, packed.shape[0])
    grad_x = grad_A = grad_B = None
    grad_bias = g2d.sum(0) if need_bias and ctx.has_bias else None
    if ctx.grad_mode == "exact" and (need_A or need_B):
        grad_x, grad_A, grad_B = _exact_grads(ctx, g2d, x2d, A, B, need_x)
    else:  # the factorized, straight-through gradient: the cost of plain LoRA
        if need_B:
            grad_B = torch.mm(g2d.t(), x2d @ A.t()).mul_(s)
        if need_A:
            grad_A = torch.mm((g2d @ B).t(), x2d).mul_(s)
        if need_x:
            w_eff = torch.ops.lors.quant_masked_weight.default(
                packed, scales, lora_A, lora_B, s, ctx.bits, ctx.quant_aware)
            grad_x = g2d @ w_eff
    grad_x = None if grad_x is None or not need_x else grad_x.reshape(x.shape)
    grad_A = None if grad_A is None or not need_A else grad_A.to(lora_A.dtype)
    grad_B = None if grad_B is None or not need_B else grad_B.to(lora_B.dtype)
    return grad_x, None, None, grad_A, grad_B, grad_bias, None, None, None, None, None


_qop.register_autograd(_qop_backward, setup_context=_qop_setup)


def _check(x, packed, scales, lora_A, lora_B, bias, bits, grad_mode, what):
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"{what}: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    if bits not in QMAX:
        raise ValueError(f"{what}: bits must be 4 or 8, got {bits!r}")
    if packed.dtype != code_dtype(bits) or packed.dim() != 2:
        raise TypeError(f"{what}: {bits}-bit codes must be a 2-D {code_dtype(bits)} tensor, got "
                        f"{packed.dtype} {tuple(packed.shape)}")
    if scales.dtype not in _COMPUTE_DTYPES or x.dtype != scales.dtype:
        raise TypeError(f"{what}: x ({x.dtype}) and scales ({scales.dtype}) must share one "
                        f"floating dtype, the compute dtype")
    d_out = packed.shape[0]
    d_in = packed.shape[1] * (2 if bits == 4 else 1)
    r = lora_A.shape[0]
    if x.shape[-1] != d_in or lora_A.shape != (r, d_in) or lora_B.shape != (d_out, r):
        raise ValueError(f"{what}: shapes do not match a {d_out}x{d_in} base: x "
                         f"{tuple(x.shape)}, lora_A {tuple(lora_A.shape)}, lora_B "
                         f"{tuple(lora_B.shape)}")
    if scales.dim() != 2 or scales.shape[0] != d_out or d_in % scales.shape[1]:
        raise ValueError(f"{what}: scales {tuple(scales.shape)} do not fit a {d_out}x{d_in} base")
    if bias is not None and (bias.shape != (d_out,) or bias.dtype != x.dtype):
        raise ValueError(f"{what}: bias must be ({d_out},) in {x.dtype}, got "
                         f"{bias.dtype} {tuple(bias.shape)}")


def quantized_lora_linear(x: Tensor, packed: Tensor, scales: Tensor, lora_A: Tensor,
                          lora_B: Tensor, *, bits: int, bias: Optional[Tensor] = None,
                          scaling: float = 1.0, grad_mode: str = "lors",
                          quant_aware: bool = False, chunk_bytes: Optional[int] = None) -> Tensor:
    """``y = x @ W'.T + bias`` with ``W' = dq(Q) + s*(B@A)*M`` (``Q(W')`` with ``quant_aware``).

    Args:
        x: ``(..., d_in)`` in the compute dtype (``scales``' dtype; under autocast both are cast).
        packed, scales, bits: the base (:mod:`lors_fx.quant`: ``uint8`` pairs for 4 bits, ``int8``
            for 8; scales ``(d_out, d_in / group_size)``).
        lora_A ``(r, d_in)``, lora_B ``(d_out, r)``: the adapters (float32 on a half base is fine).
        bias, scaling, grad_mode, chunk_bytes: as :func:`lors_fx.ops.sparse_lora_linear`.
        quant_aware: forward with ``Q(W')`` on the base's grid, straight-through gradient.

    Saves only ``x`` for backward; the dequantized weight never exists whole beside ``W'``.
    """
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        dtype = torch.get_autocast_dtype(device_type)
        x, scales = x.to(dtype), scales.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check(x, packed, scales, lora_A, lora_B, bias, bits, grad_mode, "quantized_lora_linear")
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    return torch.ops.lors.quant_lora_linear(x, packed, scales, lora_A, lora_B, bias,
                                            float(scaling), grad_mode, int(bits),
                                            bool(quant_aware), chunk_bytes)


# The whole dq(Q) as one opaque op: the naive form below calls it, so a dynamo graph shows the
# quantized base as one recognisable node (what the compiler's rewrite matches) instead of the
# bit shifts of the unpacking.
@torch.library.custom_op("lors::dequantize", mutates_args=())
def dequantize_op(packed: Tensor, scales: Tensor, bits: int) -> Tensor:
    """``torch.ops.lors.dequantize``: the whole dequantized weight ``dq(Q)`` in ``scales``' dtype
    (:func:`lors_fx.quant.dequantize`); no gradient (codes and scales are frozen buffers)."""
    return dequantize(packed, scales, bits)


dequantize_op.register_fake(lambda packed, scales, bits: scales.new_empty(
    (packed.shape[0], packed.shape[1] * (2 if bits == 4 else 1))))


def reference_quantized_lora_linear(x: Tensor, packed: Tensor, scales: Tensor, lora_A: Tensor,
                                    lora_B: Tensor, *, bits: int, bias: Optional[Tensor] = None,
                                    scaling: float = 1.0) -> Tensor:
    """The naive form in plain torch (QA-SparsePEFT-style: the whole dequantized weight, one
    ``lors::dequantize`` call, and autograd keeps ``W'``): what the compiler's pass
    (``rewrite_quantized_adapters``) matches and the tests compare against."""
    weight = torch.ops.lors.dequantize(packed, scales, int(bits))
    if weight.dtype != x.dtype:
        weight = weight.to(x.dtype)
    w_eff = weight + scaling * (lora_B.to(x.dtype) @ lora_A.to(x.dtype)) * (weight != 0)
    return torch.nn.functional.linear(x, w_eff, bias)


@torch.no_grad()
def merge_quantized_codes(packed: Tensor, scales: Tensor, lora_A: Tensor, lora_B: Tensor,
                          scaling: float, bits: int, quant_aware: bool) -> Tensor:
    """The packed codes of ``W'`` on the base's grid (same scales): ``W'`` is built exactly as
    the forward builds it and rounded sparsity-aware, so the zero pattern is kept bit for bit; for
    a QA-trained adapter the codes are exactly those the training forward used."""
    w_eff = quantized_effective_weight(packed, scales, lora_A, lora_B, scaling, bits, quant_aware)
    kept = dequantize(packed, scales, bits) != 0
    return pack_codes(round_to_codes(w_eff, scales, kept, bits), bits)
