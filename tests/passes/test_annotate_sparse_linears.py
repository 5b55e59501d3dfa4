"""annotate_sparse_linears: Before (linear calls) / Expected (same graph, SparseSite in meta)."""
import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lors_fx import LorsConfig
from lors_fx.ops import sparse_lora_linear
from lors_fx.passes.annotate_sparse_linears import annotate_sparse_linears
from lors_fx.passes.manager import SITE_META_KEY, PassContext, SparseSite, run_passes
from lors_fx.workflows.prune import magnitude_prune_
from tests.passes._graphs import (MaskedAdapterLinear, TwoProductLinear, assert_graphs_equal,
                                  capture, module_with)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

X = torch.randn(3, 8, generator=torch.Generator().manual_seed(1))
X16 = torch.randn(3, 16, generator=torch.Generator().manual_seed(1))


def two_four(d_out, d_in, seed=0):
    """A (d_out, d_in) weight with exactly 2 nonzeros in every 4 consecutive inputs."""
    generator = torch.Generator().manual_seed(seed)
    return magnitude_prune_(torch.randn(d_out, d_in, generator=generator), pattern="2:4")


class Mlp(nn.Module):
    """16 -> 16 -> 8, each weight pruned per row (16 inputs: 50% is not an N:M pattern)."""

    def __init__(self, sparsity=(0.5, 0.0)):
        super().__init__()
        torch.manual_seed(0)
        self.up, self.down = nn.Linear(16, 16), nn.Linear(16, 8)
        magnitude_prune_(self.up.weight, sparsity[0])
        magnitude_prune_(self.down.weight, sparsity[1])

    def forward(self, x):
        return self.down(torch.relu(self.up(x)))


def _three_linears(sites=None):
    """Before: ``addmm(c_fc.bias, linear(relu(linear(x, up)), down), c_fc.weight)``, weights read
    by ``get_attr``: ``up`` (8, 16) 50% unstructured, ``down`` (16, 8) dense, ``c_fc`` a GPT-2
    Conv1D-style weight stored (d_in, d_out) = (16, 12), 2:4 along its inputs. ``sites``
    (``{node name: SparseSite}``) writes the Expected annotations."""
    torch.manual_seed(0)
    root = module_with({
        "up.weight": nn.Parameter(magnitude_prune_(torch.randn(8, 16), 0.5), requires_grad=False),
        "up.bias": nn.Parameter(torch.randn(8)),
        "down.weight": nn.Parameter(torch.randn(16, 8)),
        "down.bias": nn.Parameter(torch.randn(16)),
        "c_fc.weight": nn.Parameter(two_four(12, 16).t().contiguous(), requires_grad=False),
        "c_fc.bias": nn.Parameter(torch.randn(12)),
    })
    graph = fx.Graph()
    x = graph.placeholder("x")
    up = graph.call_function(F.linear, (x, graph.get_attr("up.weight"), graph.get_attr("up.bias")))
    down = graph.call_function(F.linear, (graph.call_function(torch.relu, (up,)),
                                          graph.get_attr("down.weight"),
                                          graph.get_attr("down.bias")))
    c_fc = graph.call_function(torch.addmm, (graph.get_attr("c_fc.bias"), down,
                                             graph.get_attr("c_fc.weight")))
    graph.output(c_fc)
    gm = fx.GraphModule(root, graph)
    for node in gm.graph.nodes:
        if sites and node.name in sites:
            node.meta[SITE_META_KEY] = sites[node.name]
    return gm


def test_before_expected_sites_in_meta_and_graph_unchanged():
    gm = _three_linears()
    ctx = PassContext()
    [result] = run_passes(gm, [annotate_sparse_linears], ctx)
    assert result.count == 2 and result.details == {"sites": ["up", "c_fc"], "nodes": 2}
    up = SparseSite(fqn="up", shape=(8, 16), sparsity=0.5, pattern="unstructured")
    c_fc = SparseSite(fqn="c_fc", shape=(12, 16), sparsity=0.5, pattern="2:4")  # (d_out, d_in)
    expected = _three_linears({"linear": up, "addmm": c_fc})
    assert_graphs_equal(gm, expected, meta_keys=(SITE_META_KEY,))
    assert ctx.sites == {"up": up, "c_fc": c_fc}


def _annotated(gm):
    return {n.name: n.meta[SITE_META_KEY] for n in gm.graph.nodes if SITE_META_KEY in n.meta}


def test_sparse_linear_is_annotated_dense_is_not():
    captured = capture(Mlp(), X16)
    code = captured.gm.code
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 1 and result.details["sites"] == ["up"]
    assert (result.nodes_created, result.nodes_erased) == (0, 0) and captured.gm.code == code
    [site] = _annotated(captured.gm).values()
    assert captured.ctx.sites == {"up": site}
    assert (site.fqn, site.shape, site.sparsity, site.pattern, site.rank, site.rewritten) == \
        ("up", (16, 16), 0.5, "unstructured", None, False)


@pytest.mark.parametrize("config, expected", [(None, ["down", "up"]),
                                              (LorsConfig(min_sparsity=0.4), ["up"]),
                                              (LorsConfig(min_sparsity=0.6), [])])
def test_min_sparsity_threshold(config, expected):
    captured = capture(Mlp(sparsity=(0.5, 0.375)), X16, config=config)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert sorted(result.details["sites"]) == expected and result.count == len(expected)


def test_n_m_pattern_and_module_called_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 8, bias=False)
            self.lin.weight.data = two_four(8, 8)

        def forward(self, x):
            return self.lin(self.lin(x))

    captured = capture(Twice(), X)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 1 and result.details["nodes"] == 2
    assert captured.ctx.sites["lin"].pattern == "2:4"


def test_masked_adapter_site_has_rank_and_base_weight():
    captured = capture(MaskedAdapterLinear(r=3, dtype=torch.float32), X)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 1
    [(name, site)] = _annotated(captured.gm).items()
    assert captured.gm.graph.find_nodes(op="call_function", target=F.linear)[0].name == name
    assert (site.fqn, site.shape, site.rank) == ("base", (6, 8), 3)


def test_two_product_form_base_and_delta_share_the_site():
    captured = capture(TwoProductLinear(dtype=torch.float32), X)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 1 and result.details["nodes"] == 2
    sites = list(_annotated(captured.gm).values())
    assert sites[0] is sites[1] and sites[0].rank == 2


def test_gpt2_conv1d_addmm_is_read_in_d_out_d_in_orientation():
    from transformers.pytorch_utils import Conv1D

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.c_fc = Conv1D(12, 8)  # nf=12 outputs, nx=8 inputs; weight stored (8, 12)
            with torch.no_grad():
                self.c_fc.weight.copy_(two_four(12, 8).t())

        def forward(self, x):
            return self.c_fc(x)

    captured = capture(Block(), X)
    assert captured.gm.graph.find_nodes(op="call_function", target=torch.addmm)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    site = captured.ctx.sites["c_fc"]
    assert result.count == 1 and site.shape == (12, 8) and site.pattern == "2:4"


def test_existing_lors_op_and_transposed_weight():
    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8, bias=False)
            self.t_weight = nn.Parameter(magnitude_prune_(torch.randn(8, 6), 0.5),
                                         requires_grad=False)
            magnitude_prune_(self.a.weight, 0.5)
            self.a.weight.requires_grad_(False)
            self.lora_A = nn.Parameter(torch.randn(4, 8))
            self.lora_B = nn.Parameter(torch.zeros(8, 4))

        def forward(self, x):
            y = sparse_lora_linear(x, self.a.weight, self.lora_A, self.lora_B, scaling=0.5)
            return F.linear(y, self.t_weight.t())

    captured = capture(Mixed(), X)
    assert captured.gm.graph.find_nodes(op="call_function",  # dynamo keeps the packet
                                        target=torch.ops.lors.sparse_lora_linear)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 2
    assert captured.ctx.sites["a"].rank == 4
    assert captured.ctx.sites["t_weight"].shape == (6, 8)


def test_symbolic_trace_call_module():
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 4))
    magnitude_prune_(model[2].weight, 0.75)
    gm = fx.symbolic_trace(model)
    [result] = run_passes(gm, [annotate_sparse_linears], PassContext())
    assert result.count == 1
    assert gm.graph.find_nodes(op="call_module", target="2")[0].meta[SITE_META_KEY].sparsity == 0.75


def test_unknown_weight_value_is_skipped():
    captured = capture(Mlp(), X16)
    captured.ctx.extra.clear()  # the backend's map is missing: nothing can be measured
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 0 and not _annotated(captured.gm)
