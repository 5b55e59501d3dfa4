"""Tests of the custom op ``lors::sparse_lora_linear`` (lors_fx/ops.py).

Numerics are compared against float64 references computed on the *same* inputs (the low-precision
inputs upcast exactly), with an elementwise error bound

    |actual - reference| <= FACTOR[dtype] * eps(dtype) * magnitude + TINY[dtype]

where ``magnitude`` is the same reference evaluated on absolute values (|x|, |W|, |A|, |B|, |g|):
the sum of |terms| that a floating-point dot product's error is proportional to. FACTOR is 64 for
float32/float64 (inner products here are at most ~100 long, and the CPU kernels accumulate in
blocks) and 8 for bfloat16/float16 (a handful of roundings: the cast of fp32 adapters, W', the
product; observed: the CPU kernels accumulate in float32). A wrong formula (a missing ``s``, a
missing mask, the other gradient mode) is off by O(1) of ``magnitude`` and fails.

References:
  * "exact": float64 autograd through :func:`reference_sparse_lora_linear`
    (``W + s*(B@A)*M``), i.e. the true gradient of the masked product.
  * "lors": the closed form ``dB = s*g^T (x A^T)``, ``dA = s*(g B)^T x``, ``dx = g W'``.
"""
from __future__ import annotations

import math
import weakref
from collections import Counter

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from lors_fx import ops
from lors_fx.ops import (build_merged_weight, reference_sparse_lora_linear, sparse_lora_delta,
                         sparse_lora_linear)
from lors_fx.workflows.prune import prune_mask

DTYPES = (torch.float64, torch.float32, torch.bfloat16, torch.float16)
FACTOR = {torch.float64: 64.0, torch.float32: 64.0, torch.bfloat16: 8.0, torch.float16: 8.0}
TINY = {torch.float64: 1e-300, torch.float32: 1e-30, torch.bfloat16: 1e-30, torch.float16: 1e-6}
HYPOTHESIS = settings(max_examples=20, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])
SCALING = 1.5


# ----------------------------------------------------------------------------------------------
# Builders and references
# ----------------------------------------------------------------------------------------------


def make_mask(d_out, d_in, kind, gen):
    """Bool keep-mask: ``"unstructured"`` (about half kept) or ``"2:4"`` (2 of every 4 inputs,
    the library's N:M pruning of random scores)."""
    if kind == "unstructured":
        return torch.rand(d_out, d_in, generator=gen) < 0.5
    assert kind == "2:4" and d_in % 4 == 0
    return ~prune_mask(torch.rand(d_out, d_in, generator=gen), 0.5, (2, 4))


def make_case(seed, d_out, d_in, r, batch, dtype, mask_kind="unstructured", with_bias=False,
              adapter_dtype=None):
    """Inputs in ``dtype`` (adapters in ``adapter_dtype``) and their exact float64 copies."""
    gen = torch.Generator().manual_seed(seed)
    adapter_dtype = adapter_dtype or dtype
    mask = make_mask(d_out, d_in, mask_kind, gen)
    # Kept weights bounded away from 0 so the low-precision cast cannot change the mask.
    W = (torch.rand(d_out, d_in, generator=gen, dtype=torch.float64) + 0.25)
    W = W * torch.where(torch.rand(d_out, d_in, generator=gen) < 0.5, -1.0, 1.0).double()
    W = (W * mask).to(dtype)
    case = {
        "x": torch.randn(*batch, d_in, generator=gen, dtype=torch.float64).to(dtype),
        "weight": W,
        "lora_A": torch.randn(r, d_in, generator=gen, dtype=torch.float64).to(adapter_dtype),
        "lora_B": torch.randn(d_out, r, generator=gen, dtype=torch.float64).to(adapter_dtype),
        "bias": torch.randn(d_out, generator=gen, dtype=torch.float64).to(dtype) if with_bias
        else None,
        "g": torch.randn(*batch, d_out, generator=gen, dtype=torch.float64).to(dtype),
    }
    assert torch.equal(W != 0, mask)
    return case


def as64(case, absolute=False):
    out = {}
    for k, v in case.items():
        if v is None:
            out[k] = None
        else:
            v = v.detach().double()
            out[k] = v.abs() if absolute else v
    return out


def reference_exact(c, scaling, include_base=True):
    """float64 autograd through the naive masked form: (y, dx, dA, dB, dbias)."""
    x = c["x"].clone().requires_grad_()
    A = c["lora_A"].clone().requires_grad_()
    B = c["lora_B"].clone().requires_grad_()
    bias = None if c["bias"] is None else c["bias"].clone().requires_grad_()
    if include_base:
        y = reference_sparse_lora_linear(x, c["weight"], A, B, bias, scaling)
    else:
        y = x @ (scaling * (B @ A) * (c["weight"] != 0)).t()
    leaves = [t for t in (x, A, B, bias) if t is not None]
    grads = torch.autograd.grad(y, leaves, c["g"])
    dx, dA, dB = grads[:3]
    dbias = grads[3] if bias is not None else None
    return y.detach(), dx, dA, dB, dbias


def reference_lors(c, scaling, include_base=True):
    """float64 closed form of the factorized gradient: (y, dx, dA, dB, dbias)."""
    x, W, A, B, g = c["x"], c["weight"], c["lora_A"], c["lora_B"], c["g"]
    d_out, d_in = W.shape
    w_eff = (W if include_base else torch.zeros_like(W)) + scaling * (B @ A) * (W != 0)
    x2, g2 = x.reshape(-1, d_in), g.reshape(-1, d_out)
    y = x @ w_eff.t()
    if c["bias"] is not None:
        y = y + c["bias"]
    dB = scaling * g2.t() @ (x2 @ A.t())
    dA = scaling * (g2 @ B).t() @ x2
    dx = (g2 @ w_eff).reshape(x.shape)
    dbias = g2.sum(0) if c["bias"] is not None else None
    return y, dx, dA, dB, dbias


def run_op(case, *, grad_mode, recompute, chunk_bytes=None, bias_requires_grad=True,
           include_base=True, scaling=SCALING):
    """Run the op under test; returns (y, dx, dA, dB, dbias) (dbias None when not requested)."""
    x = case["x"].clone().requires_grad_()
    A = case["lora_A"].clone().requires_grad_()
    B = case["lora_B"].clone().requires_grad_()
    bias = case["bias"]
    if bias is not None:
        bias = bias.clone().requires_grad_(bias_requires_grad)
    if include_base:
        y = sparse_lora_linear(x, case["weight"], A, B, bias=bias, scaling=scaling,
                               grad_mode=grad_mode, recompute=recompute, chunk_bytes=chunk_bytes)
    else:
        y = sparse_lora_delta(x, case["weight"], A, B, scaling=scaling, grad_mode=grad_mode,
                              recompute=recompute, chunk_bytes=chunk_bytes)
    leaves = [x, A, B] + ([bias] if bias is not None and bias.requires_grad else [])
    grads = torch.autograd.grad(y, leaves, case["g"])
    dbias = grads[3] if len(grads) == 4 else None
    return y.detach(), grads[0], grads[1], grads[2], dbias


def assert_within(actual, ref, magnitude, dtype, what):
    assert actual is not None and ref is not None, what
    assert actual.shape == ref.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    err = (actual.detach().double() - ref).abs()
    bound = FACTOR[dtype] * torch.finfo(dtype).eps * magnitude + TINY[dtype]
    ratio = (err / bound).max().item() if err.numel() else 0.0
    assert ratio <= 1.0, f"{what} ({dtype}): error {ratio:.3g}x the bound, max err {err.max():.3g}"


def check_against_reference(case, result, grad_mode, dtype, include_base=True,
                            expect_dbias=True):
    ref_fn = reference_lors if grad_mode == "lors" else reference_exact
    ref = ref_fn(as64(case), SCALING, include_base)
    mag = ref_fn(as64(case, absolute=True), SCALING, include_base)
    for name, a, b, m in zip(("y", "grad_x", "grad_lora_A", "grad_lora_B"), result, ref, mag):
        assert_within(a, b, m, dtype, f"{grad_mode} {name}")
    if case["bias"] is not None and expect_dbias:
        assert_within(result[4], ref[4], mag[4], dtype, f"{grad_mode} grad_bias")
    else:
        assert result[4] is None


# ----------------------------------------------------------------------------------------------
# Forward and gradients vs float64
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("mask_kind", ["unstructured", "2:4"])
def test_grid_matches_float64(dtype, grad_mode, recompute, mask_kind):
    """Every dtype x mode x recompute x mask, 3-D x with a bias, vs the float64 reference."""
    case = make_case(7, 12, 16, 4, (2, 3), dtype, mask_kind, with_bias=True)
    result = run_op(case, grad_mode=grad_mode, recompute=recompute)
    assert result[0].dtype == dtype and result[0].shape == (2, 3, 12)
    check_against_reference(case, result, grad_mode, dtype)


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
@HYPOTHESIS
@given(data=st.data())
def test_hypothesis_matches_float64(grad_mode, data):
    """Random shapes (2-D/3-D x), dtypes, masks, bias (with/without grad), recompute, chunking."""
    mask_kind = data.draw(st.sampled_from(["unstructured", "2:4"]), "mask")
    d_in = data.draw(st.integers(1, 8), "d_in/4") * 4 if mask_kind == "2:4" else \
        data.draw(st.integers(1, 24), "d_in")
    d_out = data.draw(st.integers(1, 20), "d_out")
    r = data.draw(st.integers(1, 6), "r")
    batch = data.draw(st.sampled_from([(1,), (5,), (2, 3), (3, 1)]), "batch")
    dtype = data.draw(st.sampled_from(DTYPES), "dtype")
    with_bias = data.draw(st.booleans(), "bias")
    bias_grad = data.draw(st.booleans(), "bias_requires_grad")
    recompute = data.draw(st.booleans(), "recompute")
    chunk_bytes = data.draw(st.sampled_from([None, 1, 100, 1000]), "chunk_bytes")
    seed = data.draw(st.integers(0, 2**16), "seed")
    case = make_case(seed, d_out, d_in, r, batch, dtype, mask_kind, with_bias)
    result = run_op(case, grad_mode=grad_mode, recompute=recompute, chunk_bytes=chunk_bytes,
                    bias_requires_grad=bias_grad)
    check_against_reference(case, result, grad_mode, dtype, expect_dbias=bias_grad)


def test_lors_and_exact_differ():
    """The two modes are really different gradients (so the references above discriminate)."""
    case = make_case(3, 8, 8, 2, (6,), torch.float64)
    lors = run_op(case, grad_mode="lors", recompute=True)
    exact = run_op(case, grad_mode="exact", recompute=True)
    assert torch.equal(lors[0], exact[0])
    assert torch.allclose(lors[1], exact[1])  # grad_x is the same: g @ W'
    assert (lors[2] - exact[2]).abs().max() > 1e-3
    assert (lors[3] - exact[3]).abs().max() > 1e-3


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@HYPOTHESIS
@given(seed=st.integers(0, 2**16), dtype=st.sampled_from(DTYPES),
       batch=st.sampled_from([(4,), (2, 3)]), chunk_bytes=st.sampled_from([None, 1, 200]))
def test_delta_matches_float64(grad_mode, recompute, seed, dtype, batch, chunk_bytes):
    """``sparse_lora_delta`` = ``x @ (s*(B@A)*M).T`` (no base, no bias), both modes."""
    case = make_case(seed, 10, 12, 3, batch, dtype)
    result = run_op(case, grad_mode=grad_mode, recompute=recompute, chunk_bytes=chunk_bytes,
                    include_base=False)
    check_against_reference(case, result, grad_mode, dtype, include_base=False)


def test_noncontiguous_adapters_exact_chunked():
    """Transposed (non-contiguous) lora_B / lora_A views in the chunked exact backward."""
    case = make_case(11, 9, 8, 3, (7,), torch.float64)
    A_t = case["lora_A"].t().contiguous().requires_grad_()
    B_t = case["lora_B"].t().contiguous().requires_grad_()
    y = sparse_lora_linear(case["x"], case["weight"], A_t.t(), B_t.t(), scaling=SCALING,
                           grad_mode="exact", chunk_bytes=3 * 8 * 8)
    dA_t, dB_t = torch.autograd.grad(y, [A_t, B_t], case["g"])
    _, _, dA, dB, _ = reference_exact(as64(case), SCALING)
    torch.testing.assert_close(dA_t.t(), dA, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dB_t.t(), dB, rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# Custom op registration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("op_name", ["sparse_lora_linear", "sparse_lora_linear_keep"])
@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_opcheck(op_name, grad_mode):
    """torch.library.opcheck: schema, autograd registration, fake tensor, aot dispatch."""
    case = make_case(5, 6, 8, 3, (2, 5), torch.float32, with_bias=True)
    args = (case["x"].requires_grad_(), case["weight"], case["lora_A"].requires_grad_(),
            case["lora_B"].requires_grad_(), case["bias"].requires_grad_(), 0.5, grad_mode, True,
            64)
    op = getattr(torch.ops.lors, op_name).default
    result = torch.library.opcheck(op, args)
    assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("include_base", [True, False])
def test_opcheck_masked_weight(include_base):
    """The backward's W' rebuild (``lors::masked_weight``): an op so that tracing the backward
    keeps it opaque (its mask path depends on the adapters' values)."""
    case = make_case(5, 6, 8, 3, (2,), torch.float32)
    args = (case["weight"], case["lora_A"], case["lora_B"], 0.5, include_base)
    result = torch.library.opcheck(torch.ops.lors.masked_weight.default, args)
    assert all(v == "SUCCESS" for v in result.values()), result


# ----------------------------------------------------------------------------------------------
# Memory: saved-for-backward bytes and the exact mode's chunk transient
# ----------------------------------------------------------------------------------------------


def saved_bytes(fn, params):
    """Bytes saved for backward while running ``fn()``, excluding tensors sharing storage with a
    parameter in ``params`` (autograd saves those by reference; they exist anyway)."""
    param_storages = {p.untyped_storage().data_ptr() for p in params}
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    total, seen = 0, set()
    for t in saved:
        ptr = t.untyped_storage().data_ptr()
        if ptr in param_storages or ptr in seen:
            continue
        seen.add(ptr)
        total += t.untyped_storage().nbytes()
    return total, out


@pytest.fixture
def memory_case():
    case = make_case(2, 64, 48, 4, (3, 10), torch.float32, with_bias=True)
    x = case["x"].requires_grad_()
    A = case["lora_A"].requires_grad_()
    B = case["lora_B"].requires_grad_()
    bias = case["bias"].requires_grad_()
    return x, case["weight"], A, B, bias


def test_saved_bytes_recompute_is_x_only(memory_case):
    x, W, A, B, bias = memory_case
    x_bytes = x.numel() * x.element_size()
    w_bytes = W.numel() * W.element_size()
    op_bytes, _ = saved_bytes(lambda: sparse_lora_linear(x, W, A, B, bias=bias, recompute=True),
                              (W, A, B, bias))
    keep_bytes, _ = saved_bytes(lambda: sparse_lora_linear(x, W, A, B, bias=bias,
                                                           recompute=False), (W, A, B, bias))
    naive_bytes, _ = saved_bytes(lambda: reference_sparse_lora_linear(x, W, A, B, bias, 2.0),
                                 (W, A, B, bias))
    assert op_bytes == x_bytes
    assert keep_bytes == x_bytes + w_bytes
    assert naive_bytes > op_bytes, (
        f"naive saves {naive_bytes} B = {naive_bytes / op_bytes:.2f}x the op's {op_bytes} B")
    # The naive form keeps W' (dense) and the bool mask on top of x.
    assert naive_bytes >= x_bytes + w_bytes, f"naive/op ratio {naive_bytes / op_bytes:.2f}"


class AllocationMeter(TorchDispatchMode):
    """Tracks the bytes of storages *allocated* by aten ops while active, live vs freed.

    An op output whose storage is not one of the op's input storages is a fresh allocation; a
    view / in-place / ``out=`` result shares an input storage and adds a reference to it (when that
    storage was allocated under the meter). A storage is freed when the last Python tensor
    referencing it is collected (weakref finalizers; PyTorch keeps the Python object alive while
    C++ - e.g. autograd - still holds the tensor). Kernel-internal scratch (BLAS workspaces) does
    not pass through the dispatcher and is not counted. ``calls`` counts ops by name.
    """

    def __init__(self):
        super().__init__()
        self.live = {}        # allocation id -> [nbytes, references]
        self.by_ptr = {}      # storage data_ptr -> allocation id
        self.next_id = 0
        self.current = 0
        self.peak = 0
        self.calls = Counter()

    def _release(self, alloc_id, ptr):
        entry = self.live.get(alloc_id)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self.live[alloc_id]
            if self.by_ptr.get(ptr) == alloc_id:
                del self.by_ptr[ptr]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        self.calls[func.overloadpacket.__name__] += 1
        out = func(*args, **kwargs)
        inputs = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                  if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr in inputs:
                alloc_id = self.by_ptr.get(ptr)
                if alloc_id is None:
                    continue  # a view of something allocated before the meter
                self.live[alloc_id][1] += 1
            else:
                nbytes = t.untyped_storage().nbytes()
                if nbytes == 0:
                    continue
                alloc_id = self.next_id
                self.next_id += 1
                self.live[alloc_id] = [nbytes, 1]
                self.by_ptr[ptr] = alloc_id
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, alloc_id, ptr)
        return out


def exact_backward_transient(chunk_bytes, recompute=True, d_out=64, d_in=32, tokens=24):
    """Peak bytes allocated during the exact backward above its unavoidable outputs.

    Accounting: the backward is run with ``torch.autograd.grad`` and a precomputed ``g``, so every
    allocation inside it belongs to the op's backward. Its unavoidable, non-chunk allocations are
    the three gradients it returns (grad_x: tokens x d_in, grad_lora_A: r x d_in, grad_lora_B:
    d_out x r; same dtype as the inputs, so no casts), allocated once before the row loop and live
    to the end. Everything else is the row-chunk transient (the 0/1 mask rows, the recomputed W'
    rows, the (G * M) rows). So ``peak - outputs`` is the transient; returns it with the number of
    chunks (one ``aten.sign`` mask rebuild per chunk).
    """
    case = make_case(4, d_out, d_in, 4, (tokens,), torch.float32)
    x = case["x"].requires_grad_()
    A = case["lora_A"].requires_grad_()
    B = case["lora_B"].requires_grad_()
    y = sparse_lora_linear(x, case["weight"], A, B, grad_mode="exact", recompute=recompute,
                           chunk_bytes=chunk_bytes)
    g = case["g"]
    meter = AllocationMeter()
    with meter:
        grads = torch.autograd.grad(y, [x, A, B], g)
    outputs = sum(t.numel() * t.element_size() for t in grads)
    return meter.peak - outputs, meter.calls["sign"], grads


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
@pytest.mark.parametrize("chunk_bytes", [2048, 3000, 8192])
def test_exact_chunk_transient_bounded(chunk_bytes, recompute):
    """The chunked exact backward's transient stays <= chunk_bytes, with more than one chunk.

    d_in=32 fp32 rows are 128 B; the op keeps two row-chunk buffers live at once, so
    chunk_bytes=2048 gives 8-row chunks (8 chunks of 64 rows) and the bound is met exactly.
    The unchunked (default 64 MiB) run shows the meter sees the buffers: its transient (two full
    64x32 fp32 matrices = 16 KiB) exceeds every bound tested here.
    """
    transient, chunks, grads = exact_backward_transient(chunk_bytes, recompute)
    assert chunks > 1, f"only {chunks} chunk(s): the test would be vacuous"
    assert chunks == math.ceil(64 / max(1, chunk_bytes // (2 * 32 * 4)))
    assert 0 < transient <= chunk_bytes, f"transient {transient} B > chunk_bytes {chunk_bytes} B"
    full, full_chunks, full_grads = exact_backward_transient(None, recompute)
    assert full_chunks == 1
    assert full > 8192, f"unchunked transient {full} B: the meter does not see the chunk buffers"
    for a, b in zip(grads, full_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# Sparsity: the op's W' and merge
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("include_base", [True, False])
@pytest.mark.parametrize("magnitude", [1.0, 1e3, 1e30, float("inf")])
def test_effective_weight_never_nonzero_outside_mask(dtype, include_base, magnitude):
    """W' (and the delta) is exactly 0 outside M, even when s*(B@A) overflows (inf * 0 = NaN
    would be a new nonzero), with signed adapters so the GEMM also produces inf - inf."""
    case = make_case(9, 16, 16, 4, (1,), dtype, "unstructured")
    W = case["weight"]
    A = (case["lora_A"].double() * magnitude).to(dtype)
    B = (case["lora_B"].double() * magnitude).to(dtype)
    w_eff = ops._effective_weight(W, A, B, 3.0, include_base)
    outside = W == 0
    assert outside.any() and (~outside).any()
    assert int((w_eff[outside] != 0).sum()) == 0, "nonzero (or NaN) outside the mask"
    if magnitude == 1.0:
        ref = (W.double() * include_base + 3.0 * (B.double() @ A.double())) * (~outside)
        assert_within(w_eff, ref, W.double().abs() + 3.0 * B.double().abs() @ A.double().abs(),
                      dtype, "W'")
    # The op's forward uses the same W': y only sees kept weights.
    y = sparse_lora_linear(case["x"], W, case["lora_A"], case["lora_B"], scaling=1.0)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_keeps_zero_pattern_bits(dtype):
    """Pruned positions keep their exact stored bits (+0.0 and -0.0), kept ones get W + s*BA."""
    case = make_case(13, 16, 24, 4, (1,), dtype)
    W = case["weight"].clone()
    zeros = (W == 0).nonzero()
    W[tuple(zeros[::2].t())] = -0.0  # some pruned positions store negative zero
    A = case["lora_A"] * 100  # large update: still no new nonzero
    B = case["lora_B"]
    merged = build_merged_weight(W, A, B, SCALING)
    assert merged.dtype == dtype and merged.shape == W.shape
    int_type = {8: torch.int64, 4: torch.int32, 2: torch.int16}[W.element_size()]
    pruned = W == 0
    assert torch.equal(merged.view(int_type)[pruned], W.view(int_type)[pruned])
    assert torch.equal(merged != 0, W != 0)
    ref = W.double() + SCALING * (B.double() @ A.double()) * (~pruned)
    mag = W.double().abs() + SCALING * B.double().abs() @ A.double().abs()
    # One rounding of an (fp32 or fp64) exact-ish result to dtype.
    assert_within(merged, ref, mag, dtype, "merged")


def _vanishing_case(dtype, w_value, update):
    """A 2x4 weight with one kept entry ``w_value`` and an r=1 update adding exactly ``update``
    there (fp32 adapters, s=1), plus a pruned row."""
    W = torch.zeros(2, 4, dtype=dtype)
    W[0, 1] = w_value
    W[0, 3] = 1.0
    assert W[0, 1].item() == w_value
    A = torch.zeros(1, 4, dtype=torch.float32)
    A[0, 1] = update
    B = torch.ones(2, 1, dtype=torch.float32)
    return W, A, B


@pytest.mark.parametrize("dtype,w_value,update,sign", [
    # exact cancellation in fp32: the sign comes from the original weight
    (torch.bfloat16, 0.5, -0.5, 1.0),
    (torch.float16, -0.25, 0.25, -1.0),
    (torch.float32, 0.75, -0.75, 1.0),
    # fp32 result 2**-30 (fp16 flushes it to 0: below half its min subnormal 2**-24)
    (torch.float16, 2.0**-20, -(2.0**-20 - 2.0**-30), 1.0),
    (torch.float16, 2.0**-20, -(2.0**-20 + 2.0**-30), -1.0),  # W > 0 but the result < 0
    # fp32 subnormal result 2**-140: below half bf16's min subnormal 2**-133
    (torch.bfloat16, 2.0**-120, -(2.0**-120 - 2.0**-140), 1.0),
    (torch.bfloat16, 2.0**-120, -(2.0**-120 + 2.0**-140), -1.0),
    (torch.float16, -(2.0**-20), 2.0**-20 + 2.0**-30, 1.0),  # W < 0 but the result > 0
])
def test_merge_never_zeroes_a_kept_weight(dtype, w_value, update, sign):
    """A kept weight the merge would turn into exactly 0 stays a nonzero of the right sign."""
    W, A, B = _vanishing_case(dtype, w_value, update)
    exact = torch.tensor(w_value, dtype=torch.float64) + update
    if exact != 0:  # the case is real: the fp32 sum rounds to 0 only in the target dtype
        assert torch.tensor(w_value + update, dtype=torch.float32).item() != 0
        assert torch.tensor(w_value + update, dtype=torch.float32).to(dtype).item() == 0
    merged = build_merged_weight(W, A, B, 1.0)
    assert torch.equal(merged != 0, W != 0)
    assert merged[0, 1].item() == sign * torch.finfo(dtype).tiny
    assert merged[0, 3].item() == 1.0
    assert torch.equal(merged[1].view(torch.int16 if dtype != torch.float32 else torch.int32),
                       W[1].view(torch.int16 if dtype != torch.float32 else torch.int32))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_merge_keeps_kept_weights_that_cancel_exactly(dtype):
    """W=[[1.5,0],[-2,3]], A=I, B=-W, s=1: every kept weight cancels to exactly 0 and must keep
    its dtype's smallest normal with W's sign (float64 lost all three: its tiny was built in
    float32, where it underflows); the pruned zero keeps its bits."""
    W = torch.tensor([[1.5, 0.0], [-2.0, 3.0]], dtype=dtype)
    merged = build_merged_weight(W, torch.eye(2, dtype=dtype), -W, 1.0)
    tiny = torch.finfo(dtype).tiny
    assert merged.dtype == dtype and torch.equal(merged != 0, W != 0)
    expected = torch.tensor([[tiny, 0.0], [-tiny, tiny]], dtype=dtype)
    assert torch.equal(merged, expected), merged.tolist()
    assert torch.equal(merged[0, 1:].view(torch.uint8), W[0, 1:].view(torch.uint8))


def test_merge_float64_is_not_downcast():
    """A float64 weight merges in float64 (it used to be computed in float32)."""
    case = make_case(21, 8, 8, 2, (1,), torch.float64)
    merged = build_merged_weight(case["weight"], case["lora_A"], case["lora_B"], SCALING)
    W, A, B = case["weight"], case["lora_A"], case["lora_B"]
    expected = W + SCALING * (B @ A) * (W != 0)
    torch.testing.assert_close(merged, expected, rtol=1e-14, atol=1e-14)


# ----------------------------------------------------------------------------------------------
# Bad inputs, autocast, mixed dtypes
# ----------------------------------------------------------------------------------------------


def _good():
    case = make_case(1, 6, 8, 2, (3,), torch.float32, with_bias=True)
    return dict(x=case["x"], weight=case["weight"], lora_A=case["lora_A"],
                lora_B=case["lora_B"], bias=case["bias"])


def _call(**override):
    args = _good()
    kwargs = {k: override.pop(k) for k in ("grad_mode", "chunk_bytes", "recompute")
              if k in override}
    args.update(override)
    return sparse_lora_linear(args["x"], args["weight"], args["lora_A"], args["lora_B"],
                              bias=args["bias"], **kwargs)


@pytest.mark.parametrize("override,error,match", [
    (dict(weight=_good()["weight"].requires_grad_()), RuntimeError, "weight.requires_grad"),
    (dict(x=torch.randn(3, 7)), ValueError, "x's last dim"),
    (dict(lora_A=torch.randn(2, 7)), ValueError, "lora_A"),
    (dict(lora_B=torch.randn(5, 2)), ValueError, "lora_B"),
    (dict(lora_B=torch.randn(6, 3)), ValueError, "lora_B"),
    (dict(lora_A=torch.randn(2, 8, 1)), ValueError, "2-D"),
    (dict(bias=torch.randn(5)), ValueError, "bias"),
    (dict(bias=torch.randn(6, dtype=torch.float64)), TypeError, "bias"),
    (dict(x=torch.randint(0, 3, (3, 8))), TypeError, "x must be a floating"),
    (dict(weight=torch.randint(0, 3, (6, 8))), TypeError, "weight must be a floating"),
    (dict(lora_A=torch.randint(0, 3, (2, 8))), TypeError, "lora_A must be a floating"),
    (dict(x=torch.randn(3, 8, dtype=torch.float64)), TypeError, "x is torch.float64"),
    (dict(grad_mode="dense"), ValueError, "grad_mode"),
    (dict(chunk_bytes=0), ValueError, "chunk_bytes"),
    (dict(chunk_bytes=-5), ValueError, "chunk_bytes"),
])
def test_bad_inputs_raise(override, error, match):
    with pytest.raises(error, match=match):
        _call(**override)


def test_bad_inputs_raise_for_delta():
    args = _good()
    with pytest.raises(ValueError, match="sparse_lora_delta: grad_mode"):
        sparse_lora_delta(args["x"], args["weight"], args["lora_A"], args["lora_B"],
                          grad_mode="nope")


def test_frozen_weight_requiring_grad_ok_under_no_grad():
    args = _good()
    W = args["weight"].clone().requires_grad_()
    with torch.no_grad():
        y = sparse_lora_linear(args["x"], W, args["lora_A"], args["lora_B"])
    assert y.shape == (3, 6)


def test_autocast_bf16_cpu():
    """Under CPU autocast (bf16) y is bf16; fp32 adapters get fp32 grads; values match float64
    computed on the bf16-cast inputs within the bf16 bound."""
    case = make_case(17, 12, 16, 4, (2, 5), torch.float32, with_bias=True)
    x = case["x"].requires_grad_()
    A = case["lora_A"].requires_grad_()
    B = case["lora_B"].requires_grad_()
    bias = case["bias"].requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_lora_linear(x, case["weight"], A, B, bias=bias, scaling=SCALING)
    assert y.dtype == torch.bfloat16
    dx, dA, dB, dbias = torch.autograd.grad(y, [x, A, B, bias], case["g"].bfloat16())
    assert dx.dtype == dA.dtype == dB.dtype == dbias.dtype == torch.float32
    cast = {k: (v.bfloat16() if k in ("x", "weight", "bias", "g") else v) for k, v in case.items()}
    ref, mag = reference_lors(as64(cast), SCALING), reference_lors(as64(cast, True), SCALING)
    for name, a, b, m in zip(("y", "dx", "dA", "dB", "dbias"), (y, dx, dA, dB, dbias), ref, mag):
        assert_within(a, b, m, torch.bfloat16, f"autocast {name}")


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_fp32_adapters_on_bf16_weight(grad_mode):
    """fp32 lora_A/lora_B on a bf16 base: y bf16, adapter grads fp32, within the bf16 bound."""
    case = make_case(19, 12, 16, 4, (6,), torch.bfloat16, adapter_dtype=torch.float32)
    result = run_op(case, grad_mode=grad_mode, recompute=True, chunk_bytes=300)
    assert result[0].dtype == torch.bfloat16 and result[1].dtype == torch.bfloat16
    assert result[2].dtype == torch.float32 and result[3].dtype == torch.float32
    check_against_reference(case, result, grad_mode, torch.bfloat16)


@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
def test_lors_backward_allocations(recompute):
    """The factorized backward allocates no dense d_out x d_in tensor beyond rebuilding W'.

    Measured with :class:`AllocationMeter` above the three returned gradients (see
    :func:`exact_backward_transient`): with ``recompute=True`` the rebuild costs W' (the op
    ``lors::masked_weight``, whose row-chunk mask buffer of at most 1 MiB the meter does not see
    inside the op) plus skinny (tokens x r) products; with ``recompute=False`` only the skinny
    products (autograd used to materialize a dense zero gradient for the kept W').
    """
    d_out, d_in, r, tokens = 64, 48, 4, 24
    case = make_case(6, d_out, d_in, r, (tokens,), torch.float32)
    x = case["x"].requires_grad_()
    A = case["lora_A"].requires_grad_()
    B = case["lora_B"].requires_grad_()
    y = sparse_lora_linear(x, case["weight"], A, B, recompute=recompute)
    meter = AllocationMeter()
    with meter:
        grads = torch.autograd.grad(y, [x, A, B], case["g"])
    transient = meter.peak - sum(t.numel() * t.element_size() for t in grads)
    w_bytes = d_out * d_in * 4
    skinny = 2 * tokens * r * 4
    if recompute:
        assert w_bytes <= transient <= 2 * w_bytes + skinny, transient
    else:
        assert 0 <= transient <= skinny, transient


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_chunked_mask_pass_matches_one_shot_and_never_adds_nonzeros(monkeypatch, dtype):
    """Large weights get their mask applied in row chunks through one reused buffer. Force many
    (uneven) chunks on a small weight: W' must equal the one-shot build bit for bit, and huge
    adapters (inf * 0) must still leave no nonzero or NaN outside M."""
    torch.manual_seed(0)
    d_out, d_in, r = 37, 24, 3
    weight = torch.randn(d_out, d_in, dtype=dtype)
    weight[torch.rand(d_out, d_in) < 0.5] = 0
    for scale in (1.0, 1e30):
        lora_A = (torch.randn(r, d_in) * scale).to(dtype)
        lora_B = (torch.randn(d_out, r) * scale).to(dtype)
        one_shot = ops._effective_weight(weight, lora_A, lora_B, 2.0, True)
        row_bytes = d_in * weight.element_size()
        monkeypatch.setitem(ops._MASK_CHUNK_BYTES, "cpu", 5 * row_bytes)  # 8 chunks, last of 2
        chunked = ops._effective_weight(weight, lora_A, lora_B, 2.0, True)
        monkeypatch.undo()
        assert torch.equal(chunked.isnan(), one_shot.isnan())
        assert torch.equal(torch.nan_to_num(chunked), torch.nan_to_num(one_shot))
        outside = chunked[weight == 0]
        assert not outside.isnan().any() and (outside == 0).all()


# ----------------------------------------------------------------------------------------------
# Non-finite adapters: kept entries follow the reference (NaN and inf included), pruned stay 0
# ----------------------------------------------------------------------------------------------

#: (tensor, row, column, value) planted in the adapters of a make_case(31, 12, 16, 4, ...) case.
BAD_ENTRIES = {
    "nan_in_A": ("lora_A", 1, 3, float("nan")),
    "nan_in_B": ("lora_B", 5, 0, float("nan")),
    "inf_in_A": ("lora_A", 0, 2, float("inf")),
    "minus_inf_in_B": ("lora_B", 7, 2, -float("inf")),
}


def with_bad_entry(case, bad):
    name, row, col, value = BAD_ENTRIES[bad]
    case = dict(case)
    case[name] = case[name].clone()
    case[name][row, col] = value
    return case


def reference_contract(c, scaling, grad_mode):
    """float64 ``(y, dx, dA, dB)`` of the contract: ``W' = where(M, W + s*(B@A), 0)`` (pruned
    entries 0 even where ``B@A`` is NaN/inf); "exact" by autograd through that form, "lors" the
    closed form with the same W'."""
    x = c["x"].clone().requires_grad_()
    A = c["lora_A"].clone().requires_grad_()
    B = c["lora_B"].clone().requires_grad_()
    W = c["weight"]
    w_eff = torch.where(W != 0, W + scaling * (B @ A), torch.zeros_like(W))
    y = torch.nn.functional.linear(x, w_eff, c["bias"])
    dx, dA, dB = torch.autograd.grad(y, [x, A, B], c["g"])
    if grad_mode == "lors":
        x2, g2 = c["x"].reshape(-1, W.shape[1]), c["g"].reshape(-1, W.shape[0])
        dB = scaling * g2.t() @ (x2 @ c["lora_A"].t())
        dA = scaling * (g2 @ c["lora_B"]).t() @ x2
    return y.detach(), dx, dA.detach(), dB.detach()


def assert_matches_with_non_finite(actual, ref, magnitude, dtype, what):
    """Same NaN positions, same +-inf positions, finite entries within :func:`assert_within`."""
    actual = actual.detach().double()
    assert torch.equal(actual.isnan(), ref.isnan()), f"{what}: NaN positions differ"
    assert torch.equal(actual.isposinf(), ref.isposinf()), f"{what}: +inf positions differ"
    assert torch.equal(actual.isneginf(), ref.isneginf()), f"{what}: -inf positions differ"
    finite = torch.isfinite(ref)
    assert_within(actual[finite], ref[finite], magnitude[finite], dtype, what)


@pytest.mark.parametrize("bad", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
@pytest.mark.parametrize("recompute", [True, False], ids=["recompute", "keep"])
def test_non_finite_adapters_match_the_reference(bad, dtype, grad_mode, recompute):
    """A NaN/inf adapter entry reaches y and every gradient exactly as in the float64 reference
    (it used to be scrubbed to 0 at kept positions: NaN in lora_A zeroed a whole input column and
    the loss stayed finite), in both gradient modes, with W' rebuilt in backward or kept, in row
    chunks (chunk_bytes=200)."""
    case = with_bad_entry(make_case(31, 12, 16, 4, (2, 3), dtype, with_bias=True), bad)
    result = run_op(case, grad_mode=grad_mode, recompute=recompute, chunk_bytes=200,
                    bias_requires_grad=False)
    ref = reference_contract(as64(case), SCALING, grad_mode)
    mag = reference_contract(as64(case, absolute=True), SCALING, grad_mode)
    assert not torch.isfinite(ref[0]).all(), "the case must reach y"
    for name, a, b, m in zip(("y", "grad_x", "grad_lora_A", "grad_lora_B"), result, ref, mag):
        assert_matches_with_non_finite(a, b, m, dtype, f"{bad} {grad_mode} {name}")


@pytest.mark.parametrize("bad", sorted(BAD_ENTRIES))
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("include_base", [True, False])
@pytest.mark.parametrize("chunked", [False, True])
def test_effective_weight_with_non_finite_adapters(monkeypatch, bad, dtype, include_base,
                                                   chunked):
    """W' (forward build and the backward's ``lors::masked_weight``): kept entries equal
    ``W + s*(B@A)`` in the weight's dtype, NaN/inf included; pruned entries exactly 0."""
    case = with_bad_entry(make_case(31, 12, 16, 4, (1,), dtype), bad)
    W, A, B = case["weight"], case["lora_A"], case["lora_B"]
    if chunked:  # 4 uneven row chunks
        monkeypatch.setitem(ops._MASK_CHUNK_BYTES, "cpu", 5 * W.shape[1] * W.element_size())
    kept = W != 0
    expected = torch.addmm(W, B, A, beta=float(include_base), alpha=SCALING)[kept]
    for w_eff in (ops._effective_weight(W, A, B, SCALING, include_base),
                  torch.ops.lors.masked_weight(W, A, B, SCALING, include_base)):
        assert (w_eff[~kept] == 0).all(), "NaN or nonzero at a pruned position"
        assert torch.equal(w_eff[kept].isnan(), expected.isnan())
        assert not torch.isfinite(w_eff[kept]).all(), "the case must reach a kept entry"
        torch.testing.assert_close(w_eff[kept], expected, rtol=0, atol=0, equal_nan=True)


def test_fast_mask_path_only_for_provably_finite_products():
    """The bool ``masked_fill_`` pass (slow on CPU) runs only when an adapter is non-finite or
    ``s*(B@A)`` could overflow; finite adapters take the ``mul_`` by ``|sign(W)|`` path."""
    case = make_case(3, 12, 16, 4, (1,), torch.float32)
    W, A, B = case["weight"], case["lora_A"], case["lora_B"]
    assert ops._product_is_finite(A, B, SCALING)
    assert not ops._product_is_finite(with_bad_entry(case, "nan_in_A")["lora_A"], B, SCALING)
    assert not ops._product_is_finite(A, with_bad_entry(case, "minus_inf_in_B")["lora_B"], 1.0)
    assert not ops._product_is_finite(A * 1e19, B * 1e19, 1.0)  # fp32 max is 3.4e38
    assert ops._product_is_finite(A.bfloat16() * 1e18, B.bfloat16() * 1e18, 1.0)  # bf16: 3.4e38
    assert not ops._product_is_finite(A.half() * 100, B.half() * 100, 1.0)  # fp16 max 65504
    for lora_A, expected_fills in ((A, 0), (with_bad_entry(case, "nan_in_A")["lora_A"], 1)):
        meter = AllocationMeter()
        with meter:
            ops._effective_weight(W, lora_A, B, SCALING, True)
        assert meter.calls["masked_fill_"] + meter.calls["masked_fill"] == expected_fills
