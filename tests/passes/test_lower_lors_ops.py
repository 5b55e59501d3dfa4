"""lower_lors_ops: the op calls of a partitioned graph become aten ops with the op's semantics
(float64 reference, non-finite adapters, dtype casts), shapes that are not static stay opaque,
and ``LorsConfig(fuse_build=False)`` turns the pass off."""
from __future__ import annotations

import pytest
import torch
from torch.fx.experimental.proxy_tensor import make_fx

import lors_fx.ops  # noqa: F401  (registers the lors ops)
from lors_fx import LorsConfig
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.passes import PassContext, lower_lors_ops, passes_for, run_passes

aten = torch.ops.aten
S = 2.0


def _pruned(d_out, d_in, dtype=torch.float64, seed=0):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator, dtype=dtype)
    return weight * (torch.rand(d_out, d_in, generator=generator) > 0.5).to(dtype)


def _adapters(d_out, d_in, r=3, dtype=torch.float64, seed=1):
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(r, d_in, generator=generator, dtype=dtype),
            torch.randn(d_out, r, generator=generator, dtype=dtype))


def _linear_fn(include_base=True):
    def fn(x, weight, lora_A, lora_B, bias):
        return torch.ops.lors.sparse_lora_linear(x, weight, lora_A, lora_B, bias, S, "lors",
                                                 include_base, 1 << 26)
    return fn


def _masked_weight(weight, lora_A, lora_B):
    return torch.ops.lors.masked_weight(weight, lora_A, lora_B, S, True)


def _lower(fn, *inputs, tracing_mode="fake"):
    gm = make_fx(fn, tracing_mode=tracing_mode)(*inputs)
    ctx = PassContext(config=LorsConfig())
    [result] = run_passes(gm, [lower_lors_ops], ctx)
    return gm, result, ctx


def _targets(gm):
    return [node.target for node in gm.graph.nodes if node.op == "call_function"]


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("transposed_x", [False, True])
def test_lowered_linear_equals_the_float64_reference(bias, transposed_x):
    weight = _pruned(6, 8)
    lora_A, lora_B = _adapters(6, 8)
    x = torch.randn(8, 5, 2, dtype=torch.float64).permute(2, 1, 0) if transposed_x \
        else torch.randn(2, 5, 8, dtype=torch.float64)
    b = torch.randn(6, dtype=torch.float64) if bias else None
    gm, result, _ = _lower(_linear_fn(), x, weight, lora_A, lora_B, b)
    targets = _targets(gm)
    assert result.count == 1
    assert torch.ops.lors.sparse_lora_linear.default not in targets
    assert aten.where.self in targets and aten.mm.default in targets
    expected = reference_sparse_lora_linear(x, weight, lora_A, lora_B, b, scaling=S)
    torch.testing.assert_close(gm(x, weight, lora_A, lora_B, b), expected, rtol=0, atol=1e-12)


def test_lowered_delta_has_no_base():
    weight = _pruned(6, 8)
    lora_A, lora_B = _adapters(6, 8)
    x = torch.randn(3, 8, dtype=torch.float64)
    gm, result, _ = _lower(_linear_fn(include_base=False), x, weight, lora_A, lora_B, None)
    assert result.count == 1
    delta = x @ (S * (lora_B @ lora_A) * (weight != 0)).t()
    torch.testing.assert_close(gm(x, weight, lora_A, lora_B, None), delta, rtol=0, atol=1e-12)


def test_lowered_rebuild_keeps_pruned_entries_zero_with_nonfinite_adapters():
    weight = _pruned(6, 8)
    lora_A, lora_B = _adapters(6, 8)
    gm, result, _ = _lower(_masked_weight, weight, lora_A, lora_B)
    assert result.count == 1
    assert torch.ops.lors.masked_weight.default not in _targets(gm)
    torch.testing.assert_close(gm(weight, lora_A, lora_B),
                               _masked_weight(weight, lora_A, lora_B), rtol=0, atol=1e-12)
    lora_A[0, 1], lora_A[1, 2] = float("nan"), float("inf")
    lowered = gm(weight, lora_A, lora_B)
    pruned = weight == 0
    assert torch.equal(lowered[pruned], torch.zeros_like(lowered[pruned]))  # sparsity is kept
    assert not torch.isfinite(lowered[~pruned]).all()  # a diverged adapter stays visible
    torch.testing.assert_close(lowered, _masked_weight(weight, lora_A, lora_B), equal_nan=True)


def test_float32_adapters_on_a_bfloat16_base_are_cast_like_the_op():
    weight = _pruned(6, 8, dtype=torch.bfloat16)
    lora_A, lora_B = _adapters(6, 8, dtype=torch.float32)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    gm, result, _ = _lower(_linear_fn(), x, weight, lora_A, lora_B, None)
    casts = [n for n in gm.graph.nodes if n.target is aten._to_copy.default]
    assert result.count == 1 and len(casts) == 2
    assert all(n.kwargs["dtype"] is torch.bfloat16 for n in casts)
    out = gm(x, weight, lora_A, lora_B, None)
    assert out.dtype is torch.bfloat16
    torch.testing.assert_close(out, _linear_fn()(x, weight, lora_A, lora_B, None),
                               rtol=2e-2, atol=2e-2)


def test_symbolic_weight_shapes_keep_the_op_opaque_with_a_note():
    weight = _pruned(6, 8)
    lora_A, lora_B = _adapters(6, 8)
    x = torch.randn(3, 8, dtype=torch.float64)
    gm, result, ctx = _lower(_linear_fn(), x, weight, lora_A, lora_B, None,
                             tracing_mode="symbolic")  # every size symbolic, W's too
    assert result.count == 0
    assert torch.ops.lors.sparse_lora_linear.default in _targets(gm)
    assert any("lower_lors_ops" in note and "not static" in note for note in ctx.notes)
    torch.testing.assert_close(gm(x, weight, lora_A, lora_B, None),
                               _linear_fn()(x, weight, lora_A, lora_B, None))


def test_symbolic_token_dims_are_read_from_x():
    weight = _pruned(6, 8)
    lora_A, lora_B = _adapters(6, 8)
    fn = _linear_fn()

    def with_dynamic_tokens(x, weight, lora_A, lora_B):
        return fn(x, weight, lora_A, lora_B, None)

    gm = make_fx(with_dynamic_tokens, tracing_mode="symbolic",
                 _allow_non_fake_inputs=True)(torch.randn(2, 5, 8, dtype=torch.float64),
                                              weight, lora_A, lora_B)
    # make the adapters and the weight static: graph constants instead of symbolic inputs
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    assert len(placeholders) == 4
    ctx = PassContext(config=LorsConfig())
    for node, real in zip(placeholders[1:], (weight, lora_A, lora_B)):
        node.meta["val"] = placeholders[0].meta["val"].fake_mode.from_tensor(
            real, static_shapes=True)
    [result] = run_passes(gm, [lower_lors_ops], ctx)
    assert result.count == 1
    assert aten.sym_size.int in _targets(gm)
    for tokens in (5, 7):
        x = torch.randn(2, tokens, 8, dtype=torch.float64)
        torch.testing.assert_close(gm(x, weight, lora_A, lora_B),
                                   reference_sparse_lora_linear(x, weight, lora_A, lora_B, None,
                                                                scaling=S), rtol=0, atol=1e-12)


def test_fuse_build_false_turns_the_pass_off():
    assert lower_lors_ops in passes_for("lower", LorsConfig())
    assert lower_lors_ops in passes_for("lower", None)
    assert passes_for("lower", LorsConfig(fuse_build=False)) == []
    with pytest.raises(ValueError, match="fuse_build"):
        LorsConfig(fuse_build="yes")
