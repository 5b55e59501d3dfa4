"""The LoRS custom op: the only place the sparse-adapter math lives.

For a frozen weight ``W`` (d_out x d_in) whose zeros are the mask ``M = (W != 0)``, adapters
``lora_A`` (r x d_in), ``lora_B`` (d_out x r) and scale ``s``::

    W' = W + s * (lora_B @ lora_A) * M          y = x @ W'.T + bias

The forward is exact. The backward never keeps a dense d_out x d_in tensor alive between forward
and backward when ``recompute=True``: only ``x`` is saved (the parameters are referenced, not
copied) and ``W'`` is rebuilt for ``grad_x``.

Gradient modes
--------------
``"lors"`` (the paper's graph rearrangement, default), straight-through through the mask::

    dlora_B = s * g.T @ (x @ lora_A.T)          dlora_A = s * (g @ lora_B).T @ x

Only skinny products: the cost is that of plain LoRA. The authors' code drops ``s`` from these
two gradients; we keep it (a constant rescale under Adam; it matters with SGD or weight decay).

``"exact"``: the true gradient of the masked product, ``G = g.T @ x``::

    dlora_B = s * (G * M) @ lora_A.T            dlora_A = s * lora_B.T @ (G * M)

computed in row chunks of ``G`` so the dense transient stays under ``chunk_bytes``.

Building W'
-----------
``W'`` is built as ``addmm(W, B, A, alpha=s) * |sign(W)|``: the add of ``W`` rides inside the
GEMM, and the 0/1 mask in W's dtype is rebuilt from ``W`` (nothing stored, so it survives FSDP
sharding). The mask is applied in row chunks through one small reused buffer (1 MiB on CPU, so
the chunk is still in cache when it is used; 64 MiB elsewhere), so building ``W'`` costs one
weight-sized tensor (``W'`` itself), not two: that was the backward's memory peak. A same-dtype 0/1
mask beats a bool mask (``masked_fill_``/``where``) and a stored mask; docs/benchmarks.md ("Building
W'") has the measurements. At a pruned position ``(0 + s*d) * 0`` is a (possibly negative) zero,
except when ``s*d`` overflows: ``inf * 0`` is NaN, a new "nonzero". So the masked product goes
through ``nan_to_num_(nan=0)`` (keeping ``+-inf``): one more elementwise pass, far cheaper than a
bool-mask ``where``. The price: a *kept* entry of ``W'`` that is NaN (only possible when the adapters are
already non-finite or their product overflows as ``inf - inf``) becomes 0 in the transient ``W'``;
the adapters' gradients still carry the NaN, so divergence stays visible (GradScaler sees it).
``merge`` (:func:`build_merged_weight`) uses ``torch.where`` so the stored zeros keep their bits.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = [
    "GRAD_MODES",
    "DEFAULT_CHUNK_BYTES",
    "sparse_lora_linear",
    "sparse_lora_delta",
    "reference_sparse_lora_linear",
    "build_merged_weight",
    "masked_update_nonzeros",
]

GRAD_MODES = ("lors", "exact")
#: Default bound on the dense transient of the exact backward (per adapted linear).
DEFAULT_CHUNK_BYTES = 64 * 2**20

_FLOAT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


# --- Kernels (plain torch, shared by the forward, the backward and merge)


def _mask_like(weight: Tensor) -> Tensor:
    """0/1 mask of ``weight != 0`` in weight's dtype (``|sign(W)|``; NaN-free weights assumed)."""
    return weight.sign().abs_()


#: Row-chunk size of the mask pass: on CPU small enough that a chunk of the mask stays in cache
#: while it is applied; on accelerators large, so the loop launches few kernels. Either way the
#: mask never costs a whole weight-sized transient beside W'.
_MASK_CHUNK_BYTES = {"cpu": 2**20}
_MASK_CHUNK_BYTES_DEFAULT = 64 * 2**20


def _scrub_(w_eff: Tensor) -> Tensor:
    # inf * 0 = NaN at a pruned position would be a new nonzero (see module docstring).
    return w_eff.nan_to_num_(nan=0.0, posinf=float("inf"), neginf=float("-inf"))


def _apply_mask_(w_eff: Tensor, weight: Tensor) -> Tensor:
    """``w_eff *= |sign(weight)|`` in row chunks through one small reused buffer."""
    d_out, d_in = weight.shape
    chunk_bytes = _MASK_CHUNK_BYTES.get(weight.device.type, _MASK_CHUNK_BYTES_DEFAULT)
    rows = _chunk_rows(d_out, d_in, weight.element_size(), chunk_bytes, buffers=1)
    if rows >= d_out:
        return _scrub_(w_eff.mul_(_mask_like(weight)))
    buffer = weight.new_empty((rows, d_in))
    for start in range(0, d_out, rows):
        stop = min(d_out, start + rows)
        mask = torch.sign(weight[start:stop], out=buffer[: stop - start]).abs_()
        _scrub_(w_eff[start:stop].mul_(mask))
    return w_eff


def _effective_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float,
                      include_base: bool, mask: Optional[Tensor] = None) -> Tensor:
    """``W' = W + s*(B@A)*M`` (or ``s*(B@A)*M`` without the base); a fresh tensor."""
    w_eff = torch.addmm(weight, lora_B, lora_A, beta=1.0 if include_base else 0.0, alpha=scaling)
    if mask is None:
        return _apply_mask_(w_eff, weight)
    return _scrub_(w_eff.mul_(mask))


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
    dtype = weight.dtype
    return lora_A.to(dtype), lora_B.to(dtype)


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
                w_eff = _effective_weight(weight, A, B, s, ctx.include_base)
            grad_x = g2d @ w_eff
    else:  # exact: masked dense gradient in row chunks
        rows = _chunk_rows(d_out, d_in, weight.element_size(), ctx.chunk_bytes, buffers=2)
        grad_A = torch.zeros_like(A) if need_A else None
        grad_B = torch.empty_like(B) if need_B else None
        grad_x = torch.zeros_like(x2d) if need_x else None
        for start in range(0, d_out, rows):
            stop = min(d_out, start + rows)
            g_chunk = g2d[:, start:stop]
            mask = _mask_like(weight[start:stop])
            if need_x:
                if w_eff is None:
                    w_chunk = _effective_weight(weight[start:stop], A, B[start:stop], s,
                                                ctx.include_base, mask)
                else:
                    w_chunk = w_eff[start:stop]
                grad_x.addmm_(g_chunk, w_chunk)
                del w_chunk
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

    if grad_x is not None:
        grad_x = grad_x.reshape(x.shape)
    if grad_A is not None:
        grad_A = grad_A.to(lora_A.dtype)
    if grad_B is not None:
        grad_B = grad_B.to(lora_B.dtype)
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


@_op.register_fake
def _op_fake(x, weight, lora_A, lora_B, bias, scaling, grad_mode, include_base, chunk_bytes):
    return x.new_empty((*x.shape[:-1], weight.shape[0]))


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
    y, w_eff = _forward(x, weight, lora_A, lora_B, bias, scaling, include_base)
    return y, w_eff


@_op_keep.register_fake
def _op_keep_fake(x, weight, lora_A, lora_B, bias, scaling, grad_mode, include_base, chunk_bytes):
    return x.new_empty((*x.shape[:-1], weight.shape[0])), weight.new_empty(weight.shape)


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
    if bias is not None and bias.dtype != weight.dtype:
        raise TypeError(f"{what}: bias is {bias.dtype} but weight is {weight.dtype}; cast bias (or "
                        "run under torch.autocast)")
    if x.dtype != weight.dtype:
        raise TypeError(f"{what}: x is {x.dtype} but weight is {weight.dtype}; cast x (or run under "
                        "torch.autocast)")
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
        lora_A: ``(r, d_in)``; lora_B: ``(d_out, r)``. May be float32 on a half-precision base:
            they are cast to weight's dtype for the math and their gradients come back in their
            own dtype.
        bias: optional ``(d_out,)``; gets a gradient if it requires one.
        scaling: ``s`` (``lora_alpha / r`` or ``lora_alpha / sqrt(r)``).
        grad_mode: ``"lors"`` (factorized, straight-through, cost of plain LoRA) or ``"exact"``
            (masked dense gradient, chunked).
        recompute: ``True`` saves only ``x`` for backward and rebuilds ``W'``; ``False`` keeps
            ``W'`` (one dense weight-sized tensor per call: an ablation).
        chunk_bytes: bound on the exact backward's dense transient (default 64 MiB). The chunk is
            at least one weight row, so a bound below two rows' bytes is exceeded (rounded up).

    Returns:
        ``y`` of shape ``(..., d_out)``.
    """
    return _call(x, weight, lora_A, lora_B, bias, scaling, grad_mode, recompute, chunk_bytes,
                 True, "sparse_lora_linear")


def sparse_lora_delta(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor, *,
                      scaling: float = 1.0, grad_mode: str = "lors", recompute: bool = True,
                      chunk_bytes: Optional[int] = None) -> Tensor:
    """Only the masked adapter's output: ``x @ (s*(B@A)*M).T`` with ``M = weight != 0``.

    Used for ``lora_dropout > 0``, where the adapter sees ``dropout(x)`` and the base sees ``x``:
    ``y = F.linear(x, W, bias) + sparse_lora_delta(dropout(x), W, A, B, ...)``. That form costs one
    more dense matmul in forward and one more in backward than :func:`sparse_lora_linear`.
    Same arguments and gradient modes as :func:`sparse_lora_linear`; ``weight`` only gives the mask.
    """
    return _call(x, weight, lora_A, lora_B, None, scaling, grad_mode, recompute, chunk_bytes,
                 False, "sparse_lora_delta")


def reference_sparse_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                 bias: Optional[Tensor] = None, scaling: float = 1.0) -> Tensor:
    """The naive masked-adapter form in plain torch (SQFT-style; autograd keeps W' alive).

    This is the pattern the ``rewrite_masked_adapters`` pass matches, and the float64 reference the
    tests compare against (its autograd gradient is the ``"exact"`` gradient).
    """
    mask = weight != 0
    w_eff = weight + scaling * (lora_B @ lora_A) * mask
    return torch.nn.functional.linear(x, w_eff, bias)


@torch.no_grad()
def build_merged_weight(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> Tensor:
    """``W + s*(B@A)*M`` computed in float32 (float64 for a float64 weight) and cast back, keeping
    the zero pattern bit for bit.

    Pruned positions keep their stored bits (``torch.where``); a kept weight that the update (or
    the cast back) turns into exactly zero gets the smallest normal value (``finfo.tiny``) of its
    sign, so the mask read back from ``W != 0`` is unchanged.
    """
    mask = weight != 0
    compute_dtype = torch.promote_types(weight.dtype, torch.float32)
    w_wide = weight.to(compute_dtype)
    merged_wide = torch.addmm(w_wide, lora_B.to(compute_dtype), lora_A.to(compute_dtype),
                              alpha=float(scaling))
    merged = merged_wide.to(weight.dtype)
    vanished = mask & (merged == 0)
    if vanished.any():
        tiny = torch.finfo(weight.dtype).tiny
        # Sign of the exact update; where that is itself 0, the sign of the original weight.
        sign = torch.where(merged_wide < 0, -1.0, torch.where(w_wide < 0, -1.0, 1.0))
        merged = torch.where(vanished, (sign * tiny).to(weight.dtype), merged)
    return torch.where(mask, merged, weight)


@torch.no_grad()
def masked_update_nonzeros(weight: Tensor, lora_A: Tensor, lora_B: Tensor, scaling: float) -> int:
    """Positions outside ``M = W != 0`` where the weight the op multiplies by,
    ``W' = W + s*(B@A)*M`` (built exactly as the forward builds it), is nonzero. 0 = sparse."""
    A, B = _compute_dtype_params(weight, lora_A, lora_B)
    w_eff = _effective_weight(weight, A, B, scaling, True)
    return int(((w_eff != 0) & (weight == 0)).sum())
