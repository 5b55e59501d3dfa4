"""2:4 semi-structured kernels for the merged weight ``W'`` (CUDA, compute capability >= 8.0).

LoRS keeps the zero pattern of ``W`` in ``W' = W + s*(B@A)*M``, so a 2:4-pruned base gives a 2:4
``W'`` at every step, and ``x @ W'.T`` (the forward; it reduces over ``d_in``, the dim the pattern
runs along) can run on PyTorch's semi-structured sparse kernels
(:func:`torch.sparse.to_sparse_semi_structured`, cuSPARSELt by default). The input gradient
``g @ W'`` reduces over ``d_out``, along which ``W'`` has no 2:4 pattern: it stays dense. ``W'``
changes with the adapters, so training pays one compression of ``W'`` per step; whether that pays
off is measured by ``tools/gpu_check.py`` (part 4).

Constraints (torch 2.11-2.14, ``torch/sparse/semi_structured.py``): a 2-D contiguous CUDA tensor;
with cuSPARSELt (what :func:`~torch.sparse.to_sparse_semi_structured` picks unless a private flag
forces CUTLASS) float16 or bfloat16, both dims multiples of 16 (the dense operand is padded to
multiples of 8 by torch itself). At most 2 nonzeros in each group of 4 consecutive inputs:
compression keeps 2 values per group, so a denser group would be silently truncated.

Only public torch names are used (``torch.sparse.to_sparse_semi_structured``,
``torch.sparse.SparseSemiStructuredTensor``, ``torch.backends.cusparselt``).
"""
from __future__ import annotations

import warnings
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from lors_fx import ops as lors_ops  # also registers torch.ops.lors.masked_weight (W' build)

__all__ = ["SEMI_STRUCTURED_DTYPES", "MIN_COMPUTE_CAPABILITY", "SHAPE_MULTIPLE",
           "has_2to4_pattern", "semi_structured_status", "compress_semi_structured",
           "semi_structured_linear", "semi_structured_lora_linear"]

#: dtypes the default (cuSPARSELt) backend multiplies in floating point.
SEMI_STRUCTURED_DTYPES = (torch.float16, torch.bfloat16)
#: sparse tensor cores: Ampere (8.0) or newer.
MIN_COMPUTE_CAPABILITY = (8, 0)
#: cuSPARSELt's minimum (and granularity) of both dims of the sparse operand for fp16/bf16.
SHAPE_MULTIPLE = 16

_PROTOTYPE_WARNING = "The PyTorch API of SparseSemiStructuredTensor is in prototype stage"


def has_2to4_pattern(weight: Tensor) -> bool:
    """True when ``weight`` (``d_out x d_in``) has at most 2 nonzeros in every group of 4
    consecutive inputs of every row (``d_in % 4 == 0``): what 2:4 compression keeps exactly.
    NaN counts as nonzero. Any device; reads one bool back (a host sync on CUDA)."""
    if weight.dim() != 2 or weight.shape[1] % 4:
        return False
    d_out, d_in = weight.shape
    if weight.numel() == 0:
        return True
    per_group = (weight != 0).reshape(d_out, d_in // 4, 4).sum(-1, dtype=torch.int32)
    return bool((per_group <= 2).all())


def _shape_reasons(weight: Tensor) -> list:
    d_out, d_in = weight.shape
    reasons = []
    if weight.dtype not in SEMI_STRUCTURED_DTYPES:
        reasons.append(f"dtype {weight.dtype}: the 2:4 kernels (cuSPARSELt) take float16 or "
                       "bfloat16")
    if d_out % SHAPE_MULTIPLE or d_in % SHAPE_MULTIPLE or min(d_out, d_in) < SHAPE_MULTIPLE:
        reasons.append(f"shape {d_out}x{d_in}: both dims must be multiples of {SHAPE_MULTIPLE} "
                       f"(and at least {SHAPE_MULTIPLE})")
    if d_in % 4 == 0 and not has_2to4_pattern(weight):
        reasons.append("not a 2:4 pattern: some group of 4 consecutive inputs has more than 2 "
                       "nonzeros (e.g. unstructured sparsity)")
    elif d_in % 4:
        reasons.append(f"not a 2:4 pattern: d_in={d_in} is not a multiple of 4")
    return reasons


def _device_reasons(device: torch.device) -> list:
    if not torch.cuda.is_available():
        return ["no CUDA: PyTorch's 2:4 semi-structured kernels need an NVIDIA GPU with compute "
                "capability >= 8.0 (Ampere or newer)"]
    if device.type != "cuda":
        return [f"device {device}: the 2:4 kernels run on CUDA tensors only"]
    reasons = []
    capability = torch.cuda.get_device_capability(device)
    if tuple(capability) < MIN_COMPUTE_CAPABILITY:
        reasons.append(f"compute capability {capability[0]}.{capability[1]} < 8.0: no sparse "
                       "tensor cores")
    cusparselt = getattr(torch.backends, "cusparselt", None)
    if cusparselt is None or not cusparselt.is_available():
        reasons.append("cuSPARSELt is not available in this torch build "
                       "(torch.backends.cusparselt.is_available() is False)")
    return reasons


def semi_structured_status(weight: Tensor,
                           device: Optional[Union[str, torch.device]] = None) -> Tuple[bool, str]:
    """``(ok, reason)``: can :func:`semi_structured_linear` run ``F.linear(x, weight)`` on the 2:4
    kernels on ``device`` (default: the weight's own)?

    ``ok`` needs CUDA with compute capability >= 8.0 and cuSPARSELt, a 2-D float16/bfloat16
    weight whose dims are multiples of 16, and an exact 2:4 pattern along the input dim
    (:func:`has_2to4_pattern`). ``reason`` lists every unmet condition, ``"; "``-separated, or says
    why it is fine.
    """
    if weight.dim() != 2:
        return False, f"weight must be 2-D (d_out, d_in), got shape {tuple(weight.shape)}"
    device = weight.device if device is None else torch.device(device)
    reasons = _shape_reasons(weight) + _device_reasons(device)
    if reasons:
        return False, "; ".join(reasons)
    return True, (f"ok: {weight.shape[0]}x{weight.shape[1]} {weight.dtype} 2:4 on "
                  f"{torch.cuda.get_device_name(device)}")


def compress_semi_structured(weight: Tensor, *, check: bool = True):
    """``weight`` (detached, made contiguous) as a ``torch.sparse.SparseSemiStructuredTensor``.

    Raises ``RuntimeError`` with :func:`semi_structured_status`'s reason when the kernels cannot
    take it (``check=False`` skips that scan: for a weight already checked once). PyTorch's
    one-time "prototype" warning is silenced here only.
    """
    if check:
        ok, reason = semi_structured_status(weight)
        if not ok:
            raise RuntimeError(f"compress_semi_structured: {reason}")
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_PROTOTYPE_WARNING, category=UserWarning)
        return torch.sparse.to_sparse_semi_structured(weight.detach().contiguous())


def semi_structured_linear(x: Tensor, weight_prime: Tensor, bias: Optional[Tensor] = None, *,
                           check: bool = True) -> Tensor:
    """``F.linear(x, W', bias)`` with ``W'`` on the 2:4 kernels (forward only, CUDA).

    ``weight_prime`` is a dense 2:4 ``(d_out, d_in)`` weight, compressed on every call (as a
    training step would have to: ``W'`` follows the adapters), or one already compressed by
    :func:`compress_semi_structured`. ``x`` is ``(..., d_in)`` in the weight's dtype. There is no
    backward (``g @ W'`` has no 2:4 pattern along ``d_out``): with ``x.requires_grad`` under grad
    mode it raises; use it under ``torch.no_grad()`` or on a detached ``x``.
    """
    if torch.is_grad_enabled() and x.requires_grad:
        raise RuntimeError("semi_structured_linear: forward only (g @ W' cannot use the 2:4 "
                           "kernels); call it under torch.no_grad() or on a detached x")
    if x.dtype != weight_prime.dtype:
        raise TypeError(f"semi_structured_linear: x is {x.dtype} but the weight is "
                        f"{weight_prime.dtype}")
    if isinstance(weight_prime, torch.sparse.SparseSemiStructuredTensor):
        compressed = weight_prime
    else:
        compressed = compress_semi_structured(weight_prime, check=check)
    d_out, d_in = compressed.shape
    if x.shape[-1] != d_in:
        raise ValueError(f"semi_structured_linear: x's last dim {tuple(x.shape)} does not match "
                         f"the weight's d_in={d_in}")
    y = F.linear(x.reshape(-1, d_in), compressed, bias)
    return y.reshape(*x.shape[:-1], d_out)


class _SemiStructuredLors(torch.autograd.Function):
    """The LoRS op with its forward ``x @ W'.T`` on the 2:4 kernels (``grad_mode="lors"``)."""

    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, bias, scaling):
        A, B = lora_A.to(weight.dtype), lora_B.to(weight.dtype)
        w_eff = torch.ops.lors.masked_weight.default(weight, A, B, scaling, True)
        y = semi_structured_linear(x, w_eff, bias, check=False)
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling, ctx.has_bias = scaling, bias is not None
        return y

    @staticmethod
    def backward(ctx, grad_y):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        A, B = lora_A.to(weight.dtype), lora_B.to(weight.dtype)
        x2d, g2d = x.reshape(-1, x.shape[-1]), grad_y.reshape(-1, grad_y.shape[-1])
        grad_x = grad_A = grad_B = grad_bias = None
        if ctx.needs_input_grad[0]:  # g @ W' reduces over d_out: no 2:4 pattern there, dense
            w_eff = torch.ops.lors.masked_weight.default(weight, A, B, s, True)
            grad_x = (g2d @ w_eff).reshape(x.shape)
        if ctx.needs_input_grad[2]:
            grad_A = torch.mm((g2d @ B).t(), x2d).mul_(s).to(lora_A.dtype)
        if ctx.needs_input_grad[3]:
            grad_B = torch.mm(g2d.t(), x2d @ A.t()).mul_(s).to(lora_B.dtype)
        if ctx.has_bias and ctx.needs_input_grad[4]:
            grad_bias = g2d.sum(0)
        return grad_x, None, grad_A, grad_B, grad_bias, None


def semi_structured_lora_linear(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                bias: Optional[Tensor] = None, scaling: float = 1.0,
                                grad_mode: str = "lors") -> Tensor:
    """:func:`lors_fx.ops.sparse_lora_linear` (``grad_mode="lors"``, ``recompute=True``) with the
    forward's ``x @ W'.T`` on the 2:4 kernels: ``W'`` is built (as the op builds it), compressed
    and multiplied; only ``x`` is saved, and the backward rebuilds ``W'`` for the dense ``g @ W'``.
    What ``LorsConfig(semi_structured=True)`` runs for each layer :func:`semi_structured_status`
    accepts (CUDA, Ampere or newer, float16/bfloat16, an exact 2:4 base). Only
    ``grad_mode="lors"`` (the exact mode's chunked gradient is the op's)."""
    if grad_mode != "lors":
        raise ValueError(f"semi_structured_lora_linear: grad_mode must be 'lors' (of "
                         f"{lors_ops.GRAD_MODES}), got {grad_mode!r}")
    return _SemiStructuredLors.apply(x, weight, lora_A, lora_B, bias, float(scaling))
