"""The LoRS custom op: the only place the sparse-adapter math lives.

Frozen weight ``W`` (d_out x d_in), mask ``M = (W != 0)``, ``lora_A`` (r x d_in), ``lora_B`` (d_out x r)::

    W' = W + s * (lora_B @ lora_A) * M          y = x @ W'.T + bias

The forward is exact. With ``recompute=True`` no dense d_out x d_in tensor lives from forward to
backward: only ``x`` is saved (parameters are referenced) and ``W'`` is rebuilt for ``grad_x``.

Gradient modes
--------------
``"lors"`` (the paper's graph rearrangement, default), straight-through through the mask::

    dlora_B = s * g.T @ (x @ lora_A.T)          dlora_A = s * (g @ lora_B).T @ x

Only skinny products (the cost of plain LoRA). The authors' code drops ``s`` from these two
gradients; we keep it (a constant rescale under Adam; it matters with SGD or weight decay).

``"exact"``: the true gradient of the masked product, ``G = g.T @ x``::

    dlora_B = s * (G * M) @ lora_A.T            dlora_A = s * lora_B.T @ (G * M)

computed in row chunks of ``G`` so the dense transient stays under ``chunk_bytes``.

Building W'
-----------
Kept entries of ``W'`` equal ``W + s*(B@A)``, NaN and inf included (a diverged adapter shows in the
loss); pruned entries are exactly 0 whatever the adapters hold. The mask is read from ``W``
(nothing stored: it survives FSDP sharding), in row chunks through one small reused buffer (1 MiB
on CPU, so the chunk is still in cache; 64 MiB elsewhere): one weight-sized tensor, not two. On
CPU, when ``r * max|A| * max|B| * |s|`` proves ``s*(B@A)`` finite: ``P = B@A``, then per chunk
``P <- addcmul(W, P, |sign(W)|, value=s)`` (a same-dtype 0/1 mask: a bool ``masked_fill_`` is several
times slower there; and no copy of ``W`` into the GEMM's output, which ``addmm(W, ...)`` makes);
else (``inf * 0`` is NaN), and always on accelerators (no host sync), ``addmm(W, B, A, alpha=s)``
then ``masked_fill_(W == 0, 0)``. Measurements: docs/benchmarks.md.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["GRAD_MODES", "DEFAULT_CHUNK_BYTES", "sparse_lora_linear", "sparse_lora_delta",
           "reference_sparse_lora_linear", "build_merged_weight", "masked_update_nonzeros"]

GRAD_MODES = ("lors", "exact")
#: Default bound on the dense transient of the exact backward (per adapted linear).
DEFAULT_CHUNK_BYTES = 64 * 2**20

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --- Kernels (plain torch, shared by the forward, the backward and merge)


#: Row-chunk size of the mask pass: on CPU small enough to stay in cache while it is applied; on
#: accelerators large (few kernel launches). Never a weight-sized transient beside W'.
_MASK_CHUNK_BYTES = {"cpu": 2**20}
_MASK_CHUNK_BYTES_DEFAULT = 64 * 2**20


def _product_is_finite(lora_A: Tensor, lora_B: Tensor, scaling: float) -> bool:
    """True when every entry (and partial sum) of ``s * B @ A`` is provably finite, from
    ``r * max|A| * max|B| * |s|``; always False off CPU, where reading the maxima back would
    synchronise the device. NaN or inf in an adapter gives False."""
    if lora_A.device.type != "cpu":
        return False
    if lora_A.numel() == 0 or lora_B.numel() == 0:
        return True
    peak = lora_A.detach().abs().amax() * lora_B.detach().abs().amax()
    return abs(scaling) * lora_A.shape[0] * float(peak) < torch.finfo(lora_A.dtype).max / 2


def _row_chunks(weight: Tensor):
    """Rows per chunk of the mask pass and the ``(start, stop)`` of each chunk."""
    chunk_bytes = _MASK_CHUNK_BYTES.get(weight.device.type, _MASK_CHUNK_BYTES_DEFAULT)
    rows = _chunk_rows(*weight.shape, weight.element_size(), chunk_bytes, buffers=1)
    return rows, [(i, min(weight.shape[0], i + rows)) for i in range(0, weight.shape[0], rows)]


def _masked_sum_(product: Tensor, weight: Tensor, scaling: float, include_base: bool) -> Tensor:
    """``product <- W + s*product*|sign(W)|`` (or without ``W``) in row chunks via one reused mask
    buffer (each chunk of ``W`` read once); exact only for a finite ``product``."""
    rows, chunks = _row_chunks(weight)
    buffer = weight.new_empty((rows, weight.shape[1]))
    for start, stop in chunks:
        mask = torch.sign(weight[start:stop], out=buffer[: stop - start]).abs_()
        part = product[start:stop]
        if include_base:
            torch.addcmul(weight[start:stop], part, mask, value=scaling, out=part)
        else:
            part.mul_(mask.mul_(scaling))
    return product


def _zero_pruned_(w_eff: Tensor, weight: Tensor) -> Tensor:
    """``w_eff[weight == 0] = 0`` in row chunks; kept entries untouched, NaN and inf included."""
    rows, chunks = _row_chunks(weight)
    buffer = torch.empty((rows, weight.shape[1]), dtype=torch.bool, device=weight.device)
    for start, stop in chunks:
        pruned = torch.eq(weight[start:stop], 0, out=buffer[: stop - start])
        w_eff[start:stop].masked_fill_(pruned, 0)
    return w_eff


def _effective_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                      include_base: bool) -> Tensor:
    """``W' = W + s*(B@A)*M`` (or ``s*(B@A)*M`` without the base); a fresh tensor."""
    if _product_is_finite(lora_A, lora_B, scaling):
        return _masked_sum_(torch.mm(lora_B, lora_A), weight, scaling, include_base)
    w_eff = torch.addmm(weight, lora_B, lora_A, beta=1.0 if include_base else 0.0, alpha=scaling)
    return _zero_pruned_(w_eff, weight)


# W' rebuilt in backward: an op, so that tracing the backward (aot_autograd) keeps it opaque; the
# finiteness check reads the adapters' values, which a traced graph cannot branch on.
@torch.library.custom_op("lors::masked_weight", mutates_args=())
def _masked_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                   include_base: bool) -> Tensor:
    return _effective_weight(weight, lora_A, lora_B, scaling, include_base)


_masked_weight.register_fake(lambda weight, *args: weight.new_empty(weight.shape))


def _linear(x: Tensor, w_eff: Tensor, bias: Optional[Tensor]) -> Tensor:
    """``x @ w_eff.T + bias`` written into a fresh ``(..., d_out)`` tensor: a reshaped 2-D result
    would be a view, which FSDP2 warns about on every wrapped module's output."""
    y = x.new_empty((*x.shape[:-1], w_eff.shape[0]))
    x2d, y2d = x.reshape(-1, x.shape[-1]), y.view(-1, w_eff.shape[0])
    if bias is None:
        torch.mm(x2d, w_eff.t(), out=y2d)
    else:
        torch.addmm(bias, x2d, w_eff.t(), out=y2d)
    return y


def _compute_dtype_params(weight: Tensor, lora_A: Tensor, lora_B: Tensor):
    return lora_A.to(weight.dtype), lora_B.to(weight.dtype)


def _forward(x, weight, lora_A, lora_B, bias, scaling, include_base):
    A, B = _compute_dtype_params(weight, lora_A, lora_B)
    w_eff = _effective_weight(weight, A, B, scaling, include_base)
    return _linear(x, w_eff, bias if include_base else None), w_eff


def _chunk_rows(d_out: int, d_in: int, element_size: int, chunk_bytes: int, buffers: int) -> int:
    """Rows per chunk so that ``buffers`` row-chunk tensors fit in ``chunk_bytes``."""
    return max(1, min(d_out, chunk_bytes // max(1, buffers * d_in * element_size)))


def _backward(ctx, grad_y: Tensor, w_eff: Optional[Tensor]):
    x, weight, lora_A, lora_B = ctx.saved_tensors[:4]
    need_x, _, need_A, need_B, need_bias = ctx.needs_input_grad[:5]
    s = ctx.scaling
    A, B = _compute_dtype_params(weight, lora_A, lora_B)
    d_out, d_in = weight.shape
    x2d = x.reshape(-1, d_in)
    g2d = grad_y.reshape(-1, d_out)

    grad_x = grad_A = grad_B = grad_bias = None
    if need_bias and ctx.has_bias:
        grad_bias = g2d.sum(0)

    if ctx.grad_mode == "lors" or not (need_A or need_B):
        if need_B:
            grad_B = torch.mm(g2d.t(), x2d @ A.t()).mul_(s)
        if need_A:
            grad_A = torch.mm((g2d @ B).t(), x2d).mul_(s)
        if need_x:
            if w_eff is None:
                w_eff = torch.ops.lors.masked_weight.default(weight, A, B, s, ctx.include_base)
            grad_x = g2d @ w_eff
    else:  # exact: masked dense gradient in row chunks
        rows = _chunk_rows(d_out, d_in, weight.element_size(), ctx.chunk_bytes, buffers=2)
        grad_A = torch.zeros_like(A) if need_A else None
        grad_B = torch.empty_like(B) if need_B else None
        grad_x = torch.zeros_like(x2d) if need_x else None
        for start in range(0, d_out, rows):
            stop = min(d_out, start + rows)
            g_chunk = g2d[:, start:stop]
            if need_x:
                if w_eff is None:
                    w_chunk = torch.ops.lors.masked_weight.default(
                        weight[start:stop], A, B[start:stop], s, ctx.include_base)
                else:
                    w_chunk = w_eff[start:stop]
                grad_x.addmm_(g_chunk, w_chunk)
                del w_chunk
            mask = weight[start:stop].sign().abs_()  # 0/1 in weight's dtype
            masked_grad = torch.mm(g_chunk.t(), x2d).mul_(mask)  # (G * M) rows
            del mask
            if need_B:
                torch.mm(masked_grad, A.t(), out=grad_B[start:stop])
            if need_A:
                grad_A.addmm_(B[start:stop].t(), masked_grad)
            del masked_grad
        if need_B:
            grad_B.mul_(s)
        if need_A:
            grad_A.mul_(s)

    grad_x = None if grad_x is None else grad_x.reshape(x.shape)
    grad_A = None if grad_A is None else grad_A.to(lora_A.dtype)
    grad_B = None if grad_B is None else grad_B.to(lora_B.dtype)
    return grad_x, None, grad_A, grad_B, grad_bias


def _setup_context(ctx, inputs):
    bias, ctx.scaling, ctx.grad_mode, ctx.include_base, ctx.chunk_bytes = inputs[4:]
    ctx.has_bias = bias is not None


# The custom ops. `sparse_lora_linear` recomputes W' in backward (saves x only);
# `sparse_lora_linear_keep` returns W' as a second output and saves it (recompute=False ablation).


@torch.library.custom_op("lors::sparse_lora_linear", mutates_args=())
def _op(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
        scaling: float, grad_mode: str, include_base: bool, chunk_bytes: int) -> Tensor:
    return _forward(x, weight, lora_A, lora_B, bias, scaling, include_base)[0]


_op.register_fake(lambda x, weight, *args: x.new_empty((*x.shape[:-1], weight.shape[0])))


def _op_setup(ctx, inputs, output):
    _setup_context(ctx, inputs)
    ctx.save_for_backward(*inputs[:4])


def _op_backward(ctx, grad_y):
    return (*_backward(ctx, grad_y, None), None, None, None, None)


_op.register_autograd(_op_backward, setup_context=_op_setup)


@torch.library.custom_op("lors::sparse_lora_linear_keep", mutates_args=())
def _op_keep(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, bias: Optional[Tensor],
             scaling: float, grad_mode: str, include_base: bool,
             chunk_bytes: int) -> tuple[Tensor, Tensor]:
    return _forward(x, weight, lora_A, lora_B, bias, scaling, include_base)


_op_keep.register_fake(lambda x, weight, *args: (x.new_empty((*x.shape[:-1], weight.shape[0])),
                                                  weight.new_empty(weight.shape)))


def _op_keep_setup(ctx, inputs, output):
    _setup_context(ctx, inputs)
    # W' is returned only to be saved. Without set_materialize_grads(False) autograd passes a
    # dense zero "gradient" for it to backward: one more weight-sized allocation per call.
    ctx.mark_non_differentiable(output[1])
    ctx.set_materialize_grads(False)
    ctx.save_for_backward(*inputs[:4], output[1])


def _op_keep_backward(ctx, grad_y, _grad_w_eff):
    if grad_y is None:  # y did not reach the loss (grads are not materialized for this op)
        return (None,) * 9
    w_eff = ctx.saved_tensors[4]
    return (*_backward(ctx, grad_y, w_eff), None, None, None, None)


_op_keep.register_autograd(_op_keep_backward, setup_context=_op_keep_setup)


# --- Public wrappers


def _check_inputs(x, weight, lora_A, lora_B, bias, grad_mode, chunk_bytes, what):
    if grad_mode not in GRAD_MODES:
        raise ValueError(f"{what}: grad_mode must be one of {GRAD_MODES}, got {grad_mode!r}")
    for name, t in (("x", x), ("weight", weight), ("lora_A", lora_A), ("lora_B", lora_B),
                    ("bias", bias)):
        if t is not None and t.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{what}: {name} must be a floating tensor "
                            f"(float32/bfloat16/float16/float64), got {t.dtype}")
    if weight.dim() != 2 or lora_A.dim() != 2 or lora_B.dim() != 2:
        raise ValueError(f"{what}: weight, lora_A and lora_B must be 2-D, got "
                         f"{tuple(weight.shape)}, {tuple(lora_A.shape)}, {tuple(lora_B.shape)}")
    d_out, d_in = weight.shape
    r = lora_A.shape[0]
    if x.dim() < 1 or x.shape[-1] != d_in:
        raise ValueError(f"{what}: x's last dim {tuple(x.shape)} does not match weight's d_in={d_in}")
    if lora_A.shape != (r, d_in) or lora_B.shape != (d_out, r):
        raise ValueError(f"{what}: expected lora_A ({r}, {d_in}) and lora_B ({d_out}, {r}) for "
                         f"weight {tuple(weight.shape)}, got {tuple(lora_A.shape)} and "
                         f"{tuple(lora_B.shape)}")
    if bias is not None and bias.shape != (d_out,):
        raise ValueError(f"{what}: bias must have shape ({d_out},), got {tuple(bias.shape)}")
    for name, t in (("bias", bias), ("x", x)):
        if t is not None and t.dtype != weight.dtype:
            raise TypeError(f"{what}: {name} is {t.dtype} but weight is {weight.dtype}; cast "
                            f"{name} (or run under torch.autocast)")
    if weight.requires_grad and torch.is_grad_enabled():
        raise RuntimeError(f"{what}: the base weight must be frozen (weight.requires_grad=False): "
                           "LoRS trains only lora_A/lora_B; a gradient for weight is not supported")
    if chunk_bytes is not None and chunk_bytes <= 0:
        raise ValueError(f"{what}: chunk_bytes must be positive, got {chunk_bytes}")


def _call(x, weight, lora_A, lora_B, bias, scaling, grad_mode, recompute, chunk_bytes,
          include_base, what):
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type):
        # Like F.linear under autocast: compute in the autocast dtype (the weight cast is a copy).
        dtype = torch.get_autocast_dtype(device_type)
        x, weight = x.to(dtype), weight.to(dtype)
        bias = None if bias is None else bias.to(dtype)
    _check_inputs(x, weight, lora_A, lora_B, bias, grad_mode, chunk_bytes, what)
    chunk_bytes = DEFAULT_CHUNK_BYTES if chunk_bytes is None else int(chunk_bytes)
    args = (x, weight, lora_A, lora_B, bias, float(scaling), grad_mode, include_base, chunk_bytes)
    if recompute:
        return torch.ops.lors.sparse_lora_linear(*args)
    return torch.ops.lors.sparse_lora_linear_keep(*args)[0]


def sparse_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, *,
                       bias: Optional[Tensor] = None, scaling: float = 1.0,
                       grad_mode: str = "lors", recompute: bool = True,
                       chunk_bytes: Optional[int] = None) -> Tensor:
    """Sparsity-preserving LoRA linear: ``y = x @ (W + s*(B@A)*M).T + bias`` with ``M = W != 0``.

    Args:
        x: input of shape ``(..., d_in)``, same dtype as ``weight`` (or under autocast).
        weight: frozen base weight ``(d_out, d_in)``; its zeros are the mask. Must not require grad.
        lora_A: ``(r, d_in)``; lora_B: ``(d_out, r)``. May be float32 on a half-precision base
            (cast to weight's dtype for the math; gradients come back in their own dtype).
        bias: optional ``(d_out,)``; gets a gradient if it requires one.
        scaling: ``s`` (``lora_alpha / r`` or ``lora_alpha / sqrt(r)``).
        grad_mode: ``"lors"`` (factorized, straight-through, cost of plain LoRA) or ``"exact"``
            (masked dense gradient, chunked).
        recompute: ``True`` saves only ``x`` and rebuilds ``W'``; ``False`` keeps ``W'`` (ablation).
        chunk_bytes: bound on the exact backward's dense transient (default 64 MiB; at least
            one weight row per chunk, so a bound below two rows' bytes is rounded up).

    Returns ``y`` ``(..., d_out)``; kept entries of ``W'`` follow the adapters (NaN included).
    """
    return _call(x, weight, lora_A, lora_B, bias, scaling, grad_mode, recompute, chunk_bytes,
                 True, "sparse_lora_linear")


def sparse_lora_delta(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, *,
                      scaling: float = 1.0, grad_mode: str = "lors", recompute: bool = True,
                      chunk_bytes: Optional[int] = None) -> Tensor:
    """Only the masked adapter's output: ``x @ (s*(B@A)*M).T`` with ``M = weight != 0``.

    For ``lora_dropout > 0``: ``y = F.linear(x, W, bias) + sparse_lora_delta(dropout(x), W, A, B,
    ...)``, one more dense matmul in forward and in backward than :func:`sparse_lora_linear`.
    Same arguments and gradient modes as :func:`sparse_lora_linear`; ``weight`` only gives the mask.
    """
    return _call(x, weight, lora_A, lora_B, None, scaling, grad_mode, recompute, chunk_bytes,
                 False, "sparse_lora_delta")


def reference_sparse_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                 bias: Optional[Tensor] = None, scaling: float = 1.0) -> Tensor:
    """The naive masked-adapter form in plain torch (SQFT-style; autograd keeps W' alive).

    This is the pattern the ``rewrite_masked_adapters`` pass matches, and the float64 reference the
    tests compare against (its autograd gradient is the ``"exact"`` gradient). With non-finite
    adapters it also puts NaN at pruned positions (``inf * False``), where the op keeps 0.
    """
    mask = weight != 0
    w_eff = weight + scaling * (lora_B @ lora_A) * mask
    return torch.nn.functional.linear(x, w_eff, bias)


@torch.no_grad()
def build_merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``W + s*(B@A)*M`` computed in float32 (float64 for a float64 weight) and cast back, keeping
    the zero pattern bit for bit: pruned positions keep their stored bits (``torch.where``); a kept
    weight that the update (or the cast back) makes exactly 0 gets weight's dtype's smallest normal
    (``finfo.tiny``) with the sign of the wide result (of W where that is 0)."""
    mask = weight != 0
    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    w_wide = weight.to(compute_dtype)
    merged_wide = torch.addmm(w_wide, lora_B.to(compute_dtype), lora_A.to(compute_dtype),
                              alpha=float(scaling))
    merged = merged_wide.to(weight.dtype)
    vanished = mask & (merged == 0)
    if vanished.any():
        # built in weight's dtype: float64's tiny underflows to 0 in float32
        sign_source = torch.where(merged_wide != 0, merged_wide, w_wide).to(weight.dtype)
        tiny = torch.full_like(merged, torch.finfo(weight.dtype).tiny).copysign_(sign_source)
        merged = torch.where(vanished, tiny, merged)
    return torch.where(mask, merged, weight)


@torch.no_grad()
def masked_update_nonzeros(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> int:
    """Positions outside ``M = W != 0`` where the weight the op multiplies by,
    ``W' = W + s*(B@A)*M`` (built exactly as the forward builds it), is nonzero. 0 = sparse."""
    A, B = _compute_dtype_params(weight, lora_A, lora_B)
    w_eff = _effective_weight(weight, A, B, scaling, True)
    return int(((w_eff != 0) & (weight == 0)).sum())
