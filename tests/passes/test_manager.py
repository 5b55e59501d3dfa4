"""run_passes: records counts and node changes, validates after each pass, names the culprit."""
import time

import pytest
import torch
from torch import fx, nn

from lors_fx import LorsConfig
from lors_fx.passes import PassContext, PassResult, run_passes
from lors_fx.passes.annotate_sparse_linears import annotate_sparse_linears
from lors_fx.passes.manager import SITE_META_KEY
from lors_fx.passes.rewrite_masked_adapters import rewrite_masked_adapters

from tests.passes._graphs import MaskedAdapterLinear, capture

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class AddRelu(nn.Module):
    def forward(self, x):
        return torch.relu(x + 1.0)


def relu_to_sigmoid(gm, ctx):
    """A toy pass: replace each relu by sigmoid (one created, one erased per match)."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.target is torch.relu:
            with gm.graph.inserting_after(node):
                new = gm.graph.call_function(torch.sigmoid, node.args)
            node.replace_all_uses_with(new)
            gm.graph.erase_node(node)
            count += 1
    return PassResult("", count)


def noop(gm, ctx):
    return PassResult("noop")


def test_records_counts_names_and_node_changes():
    gm = fx.symbolic_trace(AddRelu())
    results = run_passes(gm, [relu_to_sigmoid, noop], PassContext())
    assert [r.name for r in results] == ["relu_to_sigmoid", "noop"]
    assert [(r.count, r.nodes_created, r.nodes_erased) for r in results] == [(1, 1, 1), (0, 0, 0)]
    assert results[0].changed and not results[1].changed
    assert "torch.sigmoid" in gm.code  # recompiled after the pass
    torch.testing.assert_close(gm(torch.zeros(2)), torch.sigmoid(torch.ones(2)))


def test_seconds_include_the_pass_and_its_validation():
    def slow(gm, ctx):
        time.sleep(0.05)
        return PassResult("slow")

    [result] = run_passes(fx.symbolic_trace(AddRelu()), [slow], PassContext())
    assert result.seconds >= 0.05


def use_before_definition(gm, ctx):
    """A broken pass: makes the first op read the last one (used before it is defined)."""
    first = next(n for n in gm.graph.nodes if n.op == "call_function")
    last = [n for n in gm.graph.nodes if n.op == "call_function"][-1]
    first.args = (last, 1.0)
    return PassResult("use_before_definition", 1)


def test_names_the_pass_that_broke_the_graph():
    gm = fx.symbolic_trace(AddRelu())
    with pytest.raises(RuntimeError, match="pass use_before_definition left an invalid graph"):
        run_passes(gm, [noop, use_before_definition, noop], PassContext())


def test_without_validation_a_broken_graph_is_not_caught():
    gm = fx.symbolic_trace(AddRelu())
    [result] = run_passes(gm, [use_before_definition], PassContext(), validate=False)
    assert result.count == 1
    with pytest.raises(RuntimeError):
        gm.graph.lint()


def test_a_pass_must_return_a_pass_result():
    gm = fx.symbolic_trace(AddRelu())
    with pytest.raises(TypeError, match="returned int"):
        run_passes(gm, [lambda gm, ctx: 3], PassContext())


def test_annotate_then_rewrite_pipeline_shares_the_site():
    captured = capture(MaskedAdapterLinear(dtype=torch.float32),
                       torch.randn(3, 8), config=LorsConfig(grad_mode="exact"))
    results = run_passes(captured.gm, [annotate_sparse_linears, rewrite_masked_adapters],
                         captured.ctx)
    assert [(r.name, r.count) for r in results] == [("annotate_sparse_linears", 1),
                                                    ("rewrite_masked_adapters", 1)]
    assert results[0].nodes_created == results[0].nodes_erased == 0
    assert results[1].nodes_created == 1 and results[1].nodes_erased == 6
    site = captured.ctx.sites["base"]
    [op] = captured.gm.graph.find_nodes(op="call_function",
                                        target=torch.ops.lors.sparse_lora_linear.default)
    assert op.meta[SITE_META_KEY] is site
    assert (site.rewritten, site.grad_mode, site.rank, site.shape) == (True, "exact", 2, (6, 8))
