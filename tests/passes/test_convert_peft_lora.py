"""convert_peft_lora: Before (PEFT's dense LoRA sum) / Expected (the masked LoRS op); on by
default, off with ``convert_peft=False`` or without a config."""
import copy
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.testing import FileCheck

from lors_fx import LorsConfig
from lors_fx.ops import DEFAULT_CHUNK_BYTES, reference_sparse_lora_linear
from lors_fx.passes.convert_peft_lora import convert_peft_lora
from lors_fx.passes.manager import SITE_META_KEY, PassContext, SparseSite, run_passes
from lors_fx.workflows.prune import magnitude_prune_
from tests.passes._graphs import (assert_graphs_equal, capture, compile_with, grads_of,
                                  module_with)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

LORS_OP = torch.ops.lors.sparse_lora_linear.default
ON = LorsConfig(convert_peft=True, grad_mode="exact")
X = torch.randn(2, 3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(1))


class PeftLikeLinear(nn.Module):
    """PEFT's lora.Linear in miniature: base_layer, lora_A/lora_B (no bias), lora_dropout."""

    def __init__(self, d_in=8, d_out=6, r=2, alpha=4.0, dropout=0.0, sparsity=0.5, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.base_layer = nn.Linear(d_in, d_out, dtype=torch.float64)
        magnitude_prune_(self.base_layer.weight, sparsity)
        self.base_layer.weight.requires_grad_(False)
        self.lora_A = nn.Linear(d_in, r, bias=False, dtype=torch.float64)
        self.lora_B = nn.Linear(r, d_out, bias=False, dtype=torch.float64)
        nn.init.normal_(self.lora_B.weight)  # nonzero, so dense and masked LoRA differ
        self.lora_dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.scaling = alpha / r

    def forward(self, x):
        result = self.base_layer(x)
        return result + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def masked_reference(self, x, adapter_input=None):
        """What the converted graph must compute: base(x) + masked delta of adapter_input."""
        W, A, B = self.base_layer.weight, self.lora_A.weight, self.lora_B.weight
        if adapter_input is None:
            return reference_sparse_lora_linear(x, W, A, B, self.base_layer.bias, self.scaling)
        delta = self.scaling * (B @ A) * (W != 0)
        return self.base_layer(x) + F.linear(adapter_input, delta)


def _targets(gm):
    return [n.target for n in gm.graph.nodes if n.op == "call_function"]


# ----------------------------------------------------------------------------------------------
# Before/Expected on hand-built graphs (weights read by get_attr)
# ----------------------------------------------------------------------------------------------


def _peft_root():
    """PEFT's names: a frozen (6, 8) ``base_layer`` pruned per row (4:8), rank-2 lora_A/lora_B."""
    torch.manual_seed(0)
    return module_with({
        "base_layer.weight": nn.Parameter(magnitude_prune_(torch.randn(6, 8), 0.5),
                                          requires_grad=False),
        "base_layer.bias": nn.Parameter(torch.randn(6)),
        "lora_A.weight": nn.Parameter(torch.randn(2, 8)),
        "lora_B.weight": nn.Parameter(torch.randn(6, 2)),
    })


def _peft_leaves(graph):
    x = graph.placeholder("x")
    return (x,) + tuple(graph.get_attr(name) for name in
                        ("base_layer.weight", "base_layer.bias", "lora_A.weight", "lora_B.weight"))


def _before_peft(root, dropout):
    """``linear(x, W, b) + linear(linear(drop(x), A), B) * 2.0``; ``drop`` is the identity (no
    node) for ``dropout=None``, else ``F.dropout(x, dropout, True, False)``."""
    graph = fx.Graph()
    x, W, b, A, B = _peft_leaves(graph)
    result = graph.call_function(F.linear, (x, W, b))
    adapter_input = x if dropout is None else graph.call_function(F.dropout,
                                                                  (x, dropout, True, False))
    hidden = graph.call_function(F.linear, (adapter_input, A))
    delta = graph.call_function(operator.mul, (graph.call_function(F.linear, (hidden, B)), 2.0))
    graph.output(graph.call_function(operator.add, (result, delta)))
    return fx.GraphModule(root, graph)


SITE = SparseSite(fqn="base_layer", shape=(6, 8), sparsity=0.5, pattern="4:8", rank=2,
                  grad_mode="exact", rewritten=True)


def test_before_expected_identity_dropout_becomes_one_op():
    root = _peft_root()
    gm = _before_peft(root, dropout=None)
    [result] = run_passes(gm, [convert_peft_lora], PassContext(config=ON))
    assert result.count == 1 and result.details == {
        "converted": ["base_layer"], "two_product": [], "changes_forward": True}

    graph = fx.Graph()
    x, W, b, A, B = _peft_leaves(graph)
    op = graph.call_function(LORS_OP, (x, W, A, B, b, 2.0, "exact", True, DEFAULT_CHUNK_BYTES))
    op.meta[SITE_META_KEY] = SITE
    graph.output(op)
    assert_graphs_equal(gm, fx.GraphModule(root, graph), meta_keys=(SITE_META_KEY,))


def test_before_expected_real_dropout_keeps_the_base_linear():
    root = _peft_root()
    gm = _before_peft(root, dropout=0.1)
    [result] = run_passes(gm, [convert_peft_lora], PassContext(config=ON))
    assert result.count == 1 and result.details["two_product"] == ["base_layer"]

    graph = fx.Graph()
    x, W, b, A, B = _peft_leaves(graph)
    base = graph.call_function(F.linear, (x, W, b))
    dropped = graph.call_function(F.dropout, (x, 0.1, True, False))
    delta = graph.call_function(LORS_OP, (dropped, W, A, B, None, 2.0, "exact", False,
                                          DEFAULT_CHUNK_BYTES))
    delta.meta[SITE_META_KEY] = SITE
    graph.output(graph.call_function(operator.add, (base, delta)))
    assert_graphs_equal(gm, fx.GraphModule(root, graph), meta_keys=(SITE_META_KEY,))


@pytest.mark.parametrize("config", [None, LorsConfig(convert_peft=False)],
                         ids=["no-config", "convert_peft-False"])
def test_disabled_without_config_or_when_turned_off(config):
    captured = capture(PeftLikeLinear(), X, config=config)
    code = captured.gm.code
    [result] = run_passes(captured.gm, [convert_peft_lora], captured.ctx)
    assert result.count == 0 and "disabled" in result.details and captured.gm.code == code


def test_default_config_converts():
    captured = capture(PeftLikeLinear(), X, config=LorsConfig(grad_mode="exact"))
    [result] = run_passes(captured.gm, [convert_peft_lora], captured.ctx)
    assert result.count == 1 and _targets(captured.gm) == [LORS_OP]


def test_identity_dropout_becomes_one_op_and_changes_forward_to_masked():
    model = PeftLikeLinear()
    captured = capture(model, X, config=ON)
    [add] = [n for n in captured.gm.graph.nodes if n.target is operator.add]
    [result] = run_passes(captured.gm, [convert_peft_lora], captured.ctx)
    assert result.count == 1 and result.details["changes_forward"] is True
    assert result.details["converted"] == ["base_layer"] and result.details["two_product"] == []
    assert _targets(captured.gm) == [LORS_OP]
    FileCheck().check("torch.ops.lors.sparse_lora_linear.default").check_not("_nn.linear") \
        .run(captured.gm.code)
    [op] = captured.gm.graph.find_nodes(op="call_function", target=LORS_OP)
    assert op.args[5:8] == (2.0, "exact", True)
    assert op.meta["stack_trace"] == add.meta["stack_trace"]
    assert op.meta[SITE_META_KEY].rank == 2 and op.meta[SITE_META_KEY].rewritten
    assert any("CHANGES the forward" in note for note in captured.ctx.notes)

    compiled, record = compile_with(model, [convert_peft_lora], ON)
    out, grads, _ = grads_of(model, compiled, X)
    ref = PeftLikeLinear()
    ref.load_state_dict(model.state_dict())
    ref.forward = ref.masked_reference
    ref_out, ref_grads, _ = grads_of(ref, ref, X)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-10)
    assert not torch.allclose(out, model(X))  # dense PEFT LoRA is a different function
    for name in ("x", "lora_A.weight", "lora_B.weight", "base_layer.bias"):
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-10, atol=1e-10)


def test_real_dropout_becomes_two_product_form():
    model = PeftLikeLinear(dropout=0.5)
    captured = capture(model, X, config=ON)
    original = copy.deepcopy(captured.gm)
    [result] = run_passes(captured.gm, [convert_peft_lora], captured.ctx)
    assert result.count == 1 and result.details["two_product"] == ["base_layer"]
    assert _targets(captured.gm) == [F.linear, F.dropout, LORS_OP, operator.add]
    [op] = captured.gm.graph.find_nodes(op="call_function", target=LORS_OP)
    assert op.args[0].target is F.dropout and op.args[4] is None and op.args[7] is False
    # Same seed, same dropout mask: the rewritten graph computes base(x) + masked delta(drop(x)).
    inputs = captured.example_inputs
    torch.manual_seed(7)
    out = captured.gm(*inputs)[0]
    torch.manual_seed(7)
    dropped = F.dropout(X, 0.5, True)
    torch.testing.assert_close(out, model.masked_reference(X, dropped), rtol=0, atol=1e-10)
    torch.manual_seed(7)
    assert not torch.allclose(original(*inputs)[0], out)


def test_dense_base_and_shared_base_output_are_left_unchanged():
    dense = capture(PeftLikeLinear(sparsity=0.0), X, config=ON)
    [result] = run_passes(dense.gm, [convert_peft_lora], dense.ctx)
    assert result.count == 0

    trainable = PeftLikeLinear()
    trainable.base_layer.weight.requires_grad_(True)
    captured = capture(trainable, X, config=ON)
    [result] = run_passes(captured.gm, [convert_peft_lora], captured.ctx)
    assert result.count == 0 and any("requires grad" in n for n in captured.ctx.notes)

    class BaseUsedTwice(PeftLikeLinear):
        def forward(self, x):
            result = self.base_layer(x)
            return result + self.lora_B(self.lora_A(x)) * self.scaling, result

    shared = capture(BaseUsedTwice(), X, config=ON)
    code = shared.gm.code
    [result] = run_passes(shared.gm, [convert_peft_lora], shared.ctx)
    assert result.count == 0 and shared.gm.code == code


def test_symbolic_trace_call_modules():
    model = PeftLikeLinear()
    gm = fx.symbolic_trace(model)
    assert [n.op for n in gm.graph.nodes].count("call_module") == 4  # with nn.Identity
    [result] = run_passes(gm, [convert_peft_lora], PassContext(config=ON))
    assert result.count == 1
    assert [n.op for n in gm.graph.nodes].count("call_module") == 0
    torch.testing.assert_close(gm(X), model.masked_reference(X), rtol=0, atol=1e-10)


@pytest.mark.parametrize("lora_dropout", [0.0, 0.1])
def test_real_peft_model(lora_dropout):
    peft = pytest.importorskip("peft", reason="peft is not installed (optional: pip install "
                                              "'lors-fx[dev]'): this test converts a real "
                                              "PEFT model")

    class Tiny(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.proj = nn.Linear(8, 6, dtype=torch.float64)
            self.other = nn.Linear(6, 6, dtype=torch.float64)  # dense: stays PEFT LoRA
            magnitude_prune_(self.proj.weight, 0.5)

        def forward(self, x):
            return self.other(self.proj(x))

    model = peft.get_peft_model(Tiny(), peft.LoraConfig(r=2, lora_alpha=4,
                                                        target_modules=["proj", "other"],
                                                        lora_dropout=lora_dropout))
    for name, param in model.named_parameters():
        if "lora_B" in name:
            nn.init.normal_(param)
    compiled, record = compile_with(model, [convert_peft_lora], ON)
    out, grads, _ = grads_of(model, compiled, X)
    [result] = record["results"]
    assert result.count == 1 and result.details["converted"] == ["base_model.model.proj"]
    lin = model.base_model.model.proj
    W, A, B = lin.base_layer.weight, lin.lora_A["default"].weight, lin.lora_B["default"].weight
    assert result.details["two_product"] == (["base_model.model.proj"]
                                             if lora_dropout else [])
    assert grads["base_model.model.proj.lora_A.default.weight"].abs().sum() > 0
    if lora_dropout:
        return  # random dropout: numerics of the two-product form are checked above
    hidden = reference_sparse_lora_linear(X, W, A, B, lin.base_layer.bias, 2.0)
    torch.testing.assert_close(out, model.base_model.model.other(hidden), rtol=0, atol=1e-10)
