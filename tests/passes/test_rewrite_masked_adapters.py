"""rewrite_masked_adapters: Before (naive masked adapter) / Expected (one lors op call)."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.testing import FileCheck

from lors_fx import LorsConfig
from lors_fx.ops import DEFAULT_CHUNK_BYTES
from lors_fx.passes.manager import SITE_META_KEY, PassContext, SparseSite, run_passes
from lors_fx.passes.rewrite_masked_adapters import rewrite_masked_adapters
from lors_fx.workflows.prune import magnitude_prune_
from tests.passes._graphs import (FORMS, MaskedAdapterLinear, SharedWeffLinear, TwoProductLinear,
                                  aot_eager, assert_graphs_equal, capture, compile_with, grads_of,
                                  lors_closed_form, module_with)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

LORS_OP = torch.ops.lors.sparse_lora_linear.default
KEEP_OP = torch.ops.lors.sparse_lora_linear_keep.default
X = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
VARIANTS = [dict(form="reference")] + [dict(form=f) for f in FORMS] + [
    dict(form="s_left", mask="float"), dict(form="s_left", mask="buffer"),
    dict(form="reference", conv1d=True), dict(form="s_mid", conv1d=True),
    dict(form="reference", bias=False)]


class Parent(nn.Module):
    """Puts the adapter one level down so its nodes carry an nn_module_stack."""

    def __init__(self, child):
        super().__init__()
        self.child = child

    def forward(self, x):
        return self.child(x)


def _ops(gm):
    return [n for n in gm.graph.nodes if n.target is LORS_OP]


# ----------------------------------------------------------------------------------------------
# Before/Expected on hand-built graphs (weights read by get_attr)
# ----------------------------------------------------------------------------------------------


def _adapter_root():
    """``proj``: a frozen (6, 8) weight pruned per row by magnitude (4 of each row's 8 inputs
    kept: the pattern reads as 4:8), a bias and rank-2 adapters."""
    torch.manual_seed(0)
    return module_with({
        "proj.weight": nn.Parameter(magnitude_prune_(torch.randn(6, 8), 0.5), requires_grad=False),
        "proj.bias": nn.Parameter(torch.randn(6)),
        "proj.lora_A": nn.Parameter(torch.randn(2, 8)),
        "proj.lora_B": nn.Parameter(torch.randn(6, 2)),
    })


def _leaves(graph):
    x = graph.placeholder("x")
    return (x,) + tuple(graph.get_attr(f"proj.{name}")
                        for name in ("weight", "lora_A", "lora_B", "bias"))


def _masked_delta(graph, W, A, B):
    """``2.0 * (B @ A) * (W != 0)``, as dynamo records the reference form."""
    mask = graph.call_function(operator.ne, (W, 0))
    product = graph.call_function(operator.matmul, (B, A))
    scaled = graph.call_function(operator.mul, (2.0, product))
    return graph.call_function(operator.mul, (scaled, mask))


def _before_masked_linear(root):
    """``linear(x, W + 2.0 * (B @ A) * (W != 0), b)``"""
    graph = fx.Graph()
    x, W, A, B, b = _leaves(graph)
    w_eff = graph.call_function(operator.add, (W, _masked_delta(graph, W, A, B)))
    graph.output(graph.call_function(F.linear, (x, w_eff, b)))
    return fx.GraphModule(root, graph)


def _before_two_product(root):
    """``linear(x, W, b) + linear(dropout(x), 2.0 * (B @ A) * (W != 0))`` (lora_dropout > 0)."""
    graph = fx.Graph()
    x, W, A, B, b = _leaves(graph)
    base = graph.call_function(F.linear, (x, W, b))
    dropped = graph.call_function(F.dropout, (x, 0.25, True, False))
    delta = graph.call_function(F.linear, (dropped, _masked_delta(graph, W, A, B)))
    graph.output(graph.call_function(operator.add, (base, delta)))
    return fx.GraphModule(root, graph)


def _site(grad_mode):
    return SparseSite(fqn="proj", shape=(6, 8), sparsity=0.5, pattern="4:8", rank=2,
                      grad_mode=grad_mode, rewritten=True)


def test_before_expected_masked_linear_becomes_the_op():
    root = _adapter_root()
    gm = _before_masked_linear(root)
    [result] = run_passes(gm, [rewrite_masked_adapters], PassContext())
    assert result.count == 1 and result.details == {"rewritten": ["proj"], "skipped": {}}

    graph = fx.Graph()
    x, W, A, B, b = _leaves(graph)
    op = graph.call_function(LORS_OP, (x, W, A, B, b, 2.0, "lors", True, DEFAULT_CHUNK_BYTES))
    op.meta[SITE_META_KEY] = _site("lors")
    graph.output(op)
    assert_graphs_equal(gm, fx.GraphModule(root, graph), meta_keys=(SITE_META_KEY,))
    torch.testing.assert_close(gm(X[0].float()), _before_masked_linear(root)(X[0].float()))


def test_before_expected_without_recompute_keeps_w_prime_and_takes_item_0():
    root = _adapter_root()
    gm = _before_masked_linear(root)
    config = LorsConfig(grad_mode="exact", recompute=False, chunk_bytes=4096)
    [result] = run_passes(gm, [rewrite_masked_adapters], PassContext(config=config))
    assert result.count == 1

    graph = fx.Graph()
    x, W, A, B, b = _leaves(graph)
    keep = graph.call_function(KEEP_OP, (x, W, A, B, b, 2.0, "exact", True, 4096))
    out = graph.call_function(operator.getitem, (keep, 0))
    out.meta[SITE_META_KEY] = _site("exact")
    graph.output(out)
    assert_graphs_equal(gm, fx.GraphModule(root, graph), meta_keys=(SITE_META_KEY,))


def test_before_expected_two_product_form_keeps_the_base_linear():
    root = _adapter_root()
    gm = _before_two_product(root)
    [result] = run_passes(gm, [rewrite_masked_adapters], PassContext())
    assert result.count == 1

    graph = fx.Graph()
    x, W, A, B, b = _leaves(graph)
    base = graph.call_function(F.linear, (x, W, b))
    dropped = graph.call_function(F.dropout, (x, 0.25, True, False))
    delta = graph.call_function(LORS_OP, (dropped, W, A, B, None, 2.0, "lors", False,
                                          DEFAULT_CHUNK_BYTES))
    graph.output(graph.call_function(operator.add, (base, delta)))
    assert_graphs_equal(gm, fx.GraphModule(root, graph))


@pytest.mark.parametrize("kwargs", VARIANTS, ids=lambda k: "-".join(map(str, k.values())))
def test_variant_becomes_one_op_call(kwargs):
    captured = capture(MaskedAdapterLinear(**kwargs), X)
    [result] = run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    assert result.count == 1
    (FileCheck().check("torch.ops.lors.sparse_lora_linear.default").check_not("!= 0")
     .check_not("torch._C._nn.linear").check_not(" @ ").run(captured.gm.code))
    [op] = _ops(captured.gm)
    x, weight, lora_A, lora_B, bias, scaling, grad_mode, include_base, chunk = op.args
    assert (scaling, grad_mode, include_base) == (2.0, "lors", True)
    assert (bias is None) == (kwargs.get("bias") is False)
    params = captured.ctx.extra["placeholder_params"]
    assert params[lora_A.name][0] == "lora_A" and params[lora_B.name][0] == "lora_B"
    site = captured.ctx.sites["base"]
    assert site.rewritten and site.rank == 2 and site.grad_mode == "lors"
    assert op.meta[SITE_META_KEY] is site
    assert result.nodes_created == 1 and result.nodes_erased >= 5


def test_meta_is_copied_and_aot_accepts_the_graph():
    model = Parent(MaskedAdapterLinear(form="s_after_mask"))
    captured = capture(model, X)
    [linear] = [n for n in captured.gm.graph.nodes if n.target is F.linear]
    before = dict(linear.meta)
    run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    [op] = _ops(captured.gm)
    assert op.meta["stack_trace"] == before["stack_trace"]
    assert op.meta["nn_module_stack"] == before["nn_module_stack"]
    assert op.meta["example_value"].shape == before["example_value"].shape == (2, 3, 6)
    out = aot_eager(captured.gm, captured.example_inputs)(*captured.example_inputs)
    torch.testing.assert_close(out[0], model(X), rtol=0, atol=1e-10)


@pytest.mark.parametrize("grad_mode", ["exact", "lors"])
@pytest.mark.parametrize("recompute", [True, False])
@pytest.mark.parametrize("kwargs", [dict(form="reference"), dict(form="s_mid", conv1d=True),
                                    dict(form="mask_on_left", bias=False)],
                         ids=["reference", "conv1d", "nobias"])
def test_numerics_match_eager_through_aot(kwargs, grad_mode, recompute):
    model = MaskedAdapterLinear(**kwargs)
    config = LorsConfig(grad_mode=grad_mode, recompute=recompute)
    compiled, record = compile_with(model, [rewrite_masked_adapters], config)
    out, grads, g = grads_of(model, compiled, X)
    assert record["results"][0].count == 1
    expected_op = LORS_OP if recompute else KEEP_OP
    assert [n.target for n in record["gm"].graph.nodes if n.op == "call_function"] == \
        [expected_op] + ([] if recompute else [operator.getitem])
    ref_out, ref_grads, _ = grads_of(model, model, X)  # eager naive form: the exact gradient
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    torch.testing.assert_close(grads["x"], ref_grads["x"], rtol=0, atol=1e-10)
    if kwargs.get("bias") is not False:
        torch.testing.assert_close(grads["base.bias"], ref_grads["base.bias"], rtol=0, atol=1e-10)
    if grad_mode == "exact":
        expected_A, expected_B = ref_grads["lora_A"], ref_grads["lora_B"]
    else:
        expected_A, expected_B = lors_closed_form(X, g, model.lora_A, model.lora_B, 2.0)
        assert not torch.allclose(expected_A, ref_grads["lora_A"])  # the two modes differ here
    torch.testing.assert_close(grads["lora_A"], expected_A, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(grads["lora_B"], expected_B, rtol=1e-10, atol=1e-10)


def test_autocast_keeps_the_linear_output_dtype():
    """Under autocast the captured linear is bf16 while x and W are fp32: the op gets casts."""
    model = MaskedAdapterLinear(d_in=32, d_out=16, dtype=torch.float32)
    x = torch.randn(4, 32, generator=torch.Generator().manual_seed(2))
    compiled, record = compile_with(model, [rewrite_masked_adapters], LorsConfig())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = compiled(x)
        eager = model(x)
    assert record["results"][0].count == 1
    [op] = _ops(record["gm"])
    assert op.args[0].target == "to" and op.args[1].target == "to"
    assert out.dtype == eager.dtype == torch.bfloat16
    exact = MaskedAdapterLinear(d_in=32, d_out=16, dtype=torch.float64)
    exact.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    reference = exact(x.double())
    tolerance = 2e-2 * reference.abs().max().item()  # a few bf16 roundings of the largest value
    torch.testing.assert_close(out.double(), reference, rtol=0, atol=tolerance)
    out.float().sum().backward()
    assert model.lora_A.grad.dtype == torch.float32 and model.lora_A.grad.abs().sum() > 0


def test_chunk_bytes_and_grad_mode_come_from_config():
    captured = capture(MaskedAdapterLinear(), X, config=LorsConfig(grad_mode="exact",
                                                                   chunk_bytes=4096))
    run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    [op] = _ops(captured.gm)
    assert op.args[6:] == ("exact", True, 4096)


def test_two_product_form_keeps_base_linear_and_uses_delta():
    model = TwoProductLinear(p=0.0)
    captured = capture(model, X)
    [result] = run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    assert result.count == 1
    targets = [n.target for n in captured.gm.graph.nodes if n.op == "call_function"]
    assert targets.count(F.linear) == 1 and targets.count(LORS_OP) == 1
    [op] = _ops(captured.gm)
    assert op.args[1].op == "placeholder" and op.args[4] is None and op.args[7] is False
    assert op.args[0].target is torch.nn.functional.dropout  # the adapter sees dropout(x)
    compiled, record = compile_with(model, [rewrite_masked_adapters], LorsConfig(grad_mode="exact"))
    out, grads, _ = grads_of(model, compiled, X)
    ref_out, ref_grads, _ = grads_of(model, model, X)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name in ("x", "lora_A", "lora_B", "base.bias"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("model, reason", [
    (MaskedAdapterLinear(sparsity=0.0), "not sparse enough"),
    (MaskedAdapterLinear(form="s_left", mask="wrong_buffer"), "not equal to (W != 0)"),
    (SharedWeffLinear(), "2 users"),
], ids=["dense", "wrong-mask", "w_eff-used-twice"])
def test_non_matching_graphs_are_left_unchanged(model, reason):
    captured = capture(model, X)
    code = captured.gm.code
    [result] = run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    assert result.count == 0 and not result.changed
    assert captured.gm.code == code
    assert any(reason in note for note in captured.ctx.notes), captured.ctx.notes


def test_trainable_base_weight_is_not_rewritten():
    model = MaskedAdapterLinear()
    model.base.weight.requires_grad_(True)  # the op would silently give W no gradient
    captured = capture(model, X)
    [result] = run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    assert result.count == 0
    assert any("requires grad" in note for note in captured.ctx.notes)


def test_mask_tensor_with_unknown_value_is_skipped():
    captured = capture(MaskedAdapterLinear(form="s_left", mask="buffer"), X)
    captured.ctx.extra["placeholder_params"] = {
        k: v for k, v in captured.ctx.extra["placeholder_params"].items() if v[0] != "mask"}
    [result] = run_passes(captured.gm, [rewrite_masked_adapters], captured.ctx)
    assert result.count == 0
    assert any("value is unknown" in note for note in captured.ctx.notes)


@pytest.mark.parametrize("conv1d", [False, True])
def test_symbolic_trace_graph_with_get_attr(conv1d):
    model = MaskedAdapterLinear(form="s_left", dtype=torch.float32, conv1d=conv1d)
    gm = fx.symbolic_trace(model)
    assert any(n.op == "get_attr" for n in gm.graph.nodes)
    [result] = run_passes(gm, [rewrite_masked_adapters], PassContext())
    assert result.count == 1
    FileCheck().check("torch.ops.lors.sparse_lora_linear.default").check_not("!= 0").run(gm.code)
    x = X.float()
    torch.testing.assert_close(gm(x), model(x), rtol=1e-6, atol=1e-6)


def test_two_adapters_in_one_graph_both_rewritten():
    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.up = MaskedAdapterLinear(d_in=8, d_out=6)
            self.down = MaskedAdapterLinear(d_in=6, d_out=8, form="s_mid", seed=1)

        def forward(self, x):
            return self.down(torch.relu(self.up(x)))

    model = Two()
    compiled, record = compile_with(model, [rewrite_masked_adapters], LorsConfig(grad_mode="exact"))
    out, grads, _ = grads_of(model, compiled, X)
    ref_out, ref_grads, _ = grads_of(model, model, X)
    assert record["results"][0].count == 2
    assert sorted(record["results"][0].details["rewritten"]) == ["down.base", "up.base"]
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    for name in ("x", "up.lora_A", "down.lora_B"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10)
