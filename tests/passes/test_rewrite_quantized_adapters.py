"""rewrite_quantized_adapters: Before (naive masked adapter on ``lors.dequantize``) / Expected (one
``lors::quant_lora_linear`` call), the sites it annotates, what it leaves alone, and numerics
against the eager op."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from lors_fx import LorsConfig
from lors_fx.adapter_layers import LorsQuantLinear
from lors_fx.ops import DEFAULT_CHUNK_BYTES
from lors_fx.passes.annotate_sparse_linears import annotate_sparse_linears
from lors_fx.passes.manager import SITE_META_KEY, PassContext, SparseSite, run_passes
from lors_fx.passes.rewrite_masked_adapters import rewrite_masked_adapters
from lors_fx.passes.rewrite_quantized_adapters import rewrite_quantized_adapters
from lors_fx.quant import QuantSpec, unpack_codes
from lors_fx.quant_ops import quantized_lora_linear
from lors_fx.quantized import quantize_linear
from lors_fx.sparsity import pattern_of
from lors_fx.workflows.prune import magnitude_prune_
from tests.passes._graphs import (FORMS, assert_graphs_equal, capture, compile_with, grads_of,
                                  module_with)

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

QUANT_OP = torch.ops.lors.quant_lora_linear.default
DEQUANTIZE = torch.ops.lors.dequantize
D_OUT, D_IN, R, GROUP = 6, 16, 2, 8
X = torch.randn(2, 3, D_IN, generator=torch.Generator().manual_seed(1))


def _quantized(bits=4, bias=True, seed=0, sparsity=0.5):
    """A round-to-nearest QuantizedLinear of a (6, 16) weight pruned per row by magnitude."""
    torch.manual_seed(seed)
    linear = nn.Linear(D_IN, D_OUT, bias=bias)
    if sparsity:
        magnitude_prune_(linear.weight.data, sparsity)
    return quantize_linear(linear, QuantSpec(bits, GROUP), "proj")


def _root(bits=4, sparsity=0.5):
    """``proj``: codes and scales (buffers), a frozen bias, rank-2 adapters."""
    base = _quantized(bits, sparsity=sparsity)
    torch.manual_seed(1)
    return module_with({
        "proj.weight_packed": base.weight_packed, "proj.weight_scale": base.weight_scale,
        "proj.bias": nn.Parameter(base.bias.detach().clone(), requires_grad=False),
        "proj.lora_A": nn.Parameter(torch.randn(R, D_IN)),
        "proj.lora_B": nn.Parameter(torch.randn(D_OUT, R)),
    })


def _leaves(graph):
    x = graph.placeholder("x")
    return (x,) + tuple(graph.get_attr(f"proj.{name}") for name in
                        ("weight_packed", "weight_scale", "lora_A", "lora_B", "bias"))


def _before(root, bits=4, extra_user=False):
    """What dynamo records for ``reference_quantized_lora_linear`` (scale 2.0)."""
    graph = fx.Graph()
    x, packed, scales, A, B, b = _leaves(graph)
    weight = graph.call_function(DEQUANTIZE, (packed, scales, bits))
    B32 = graph.call_method("to", (B, torch.float32))
    A32 = graph.call_method("to", (A, torch.float32))
    product = graph.call_function(operator.matmul, (B32, A32))
    scaled = graph.call_function(operator.mul, (2.0, product))
    mask = graph.call_function(operator.ne, (weight, 0))
    delta = graph.call_function(operator.mul, (scaled, mask))
    w_eff = graph.call_function(operator.add, (weight, delta))
    out = graph.call_function(F.linear, (x, w_eff, b))
    graph.output((out, w_eff) if extra_user else out)
    return fx.GraphModule(root, graph)


def _expected(root, op_args):
    graph = fx.Graph()
    x, packed, scales, A, B, b = _leaves(graph)
    graph.output(graph.call_function(QUANT_OP, (x, packed, scales, A, B, b) + op_args))
    return fx.GraphModule(root, graph)


def _codes_site(root, bits=4, **fields):
    codes = unpack_codes(root.proj.weight_packed, bits)
    return SparseSite(fqn="proj", shape=(D_OUT, D_IN), sparsity=0.5, pattern=pattern_of(codes),
                      rank=R, bits=bits, group_size=GROUP, **fields)


@pytest.mark.parametrize("bits", [4, 8])
def test_before_expected_naive_quantized_linear_becomes_the_op(bits):
    root = _root(bits)
    gm = _before(root, bits)
    [result] = run_passes(gm, [rewrite_quantized_adapters], PassContext())
    assert result.count == 1 and result.details == {"rewritten": ["proj"], "skipped": {}}
    assert result.nodes_created == 1 and result.nodes_erased == 9

    expected = _expected(root, (2.0, "lors", bits, False, DEFAULT_CHUNK_BYTES))
    [op] = [n for n in gm.graph.nodes if n.target is QUANT_OP]
    op.meta.pop(SITE_META_KEY)  # compared below, field by field
    assert_graphs_equal(gm, expected)
    x = X[0]
    torch.testing.assert_close(gm(x), _before(root, bits)(x), rtol=1e-5, atol=1e-6)


def test_before_expected_takes_grad_mode_chunk_bytes_and_quant_aware_from_the_config():
    root = _root()
    gm = _before(root)
    config = LorsConfig(grad_mode="exact", chunk_bytes=4096, quant_aware=True)
    ctx = PassContext(config=config)
    [result] = run_passes(gm, [rewrite_quantized_adapters], ctx)
    assert result.count == 1
    assert_graphs_equal(gm, _expected(root, (2.0, "exact", 4, True, 4096)))
    site = ctx.sites["proj"]
    assert site == _codes_site(root, grad_mode="exact", rewritten=True, quant_aware=True)
    [op] = [n for n in gm.graph.nodes if n.target is QUANT_OP]
    assert op.meta[SITE_META_KEY] is site


def test_a_shared_w_prime_is_left_alone_with_a_note():
    root = _root()
    gm = _before(root, extra_user=True)
    ctx = PassContext()
    [result] = run_passes(gm, [rewrite_quantized_adapters], ctx)
    assert result.count == 0 and list(result.details["skipped"]) == ["linear"]
    assert "users" in result.details["skipped"]["linear"]
    assert not [n for n in gm.graph.nodes if n.target is QUANT_OP]
    assert any("rewrite_quantized_adapters: left linear unchanged" in note for note in ctx.notes)


def test_codes_not_sparse_enough_are_left_alone():
    root = _root(sparsity=0.0)
    gm = _before(root)
    [result] = run_passes(gm, [rewrite_quantized_adapters], PassContext())
    assert result.count == 0 and "not sparse enough" in result.details["skipped"]["linear"]


def test_the_float_rewrite_does_not_touch_the_quantized_form_and_runs_after_it():
    root = _root()
    gm = _before(root)
    results = run_passes(gm, [rewrite_quantized_adapters, rewrite_masked_adapters],
                         PassContext())
    assert [r.count for r in results] == [1, 0]
    assert results[1].details["skipped"] == {}


# ----------------------------------------------------------------------------------------------
# Captured by dynamo: spellings, the adapter module, numerics against the eager op
# ----------------------------------------------------------------------------------------------


class QuantFormLinear(nn.Module):
    """``linear(x, FORM(dq(Q), A, B, dq(Q) != 0, s), b)`` on a quantized base."""

    def __init__(self, form, bits=4):
        super().__init__()
        base = _quantized(bits)
        self.register_buffer("weight_packed", base.weight_packed)
        self.register_buffer("weight_scale", base.weight_scale)
        self.bias = base.bias
        self.lora_A = nn.Parameter(torch.randn(R, D_IN) / 4)
        self.lora_B = nn.Parameter(torch.randn(D_OUT, R))
        self.form, self.bits, self.scaling = form, bits, 2.0

    def forward(self, x):
        W = DEQUANTIZE(self.weight_packed, self.weight_scale, self.bits)
        w_eff = FORMS[self.form](W, self.lora_A, self.lora_B, W != 0, self.scaling)
        return F.linear(x, w_eff, self.bias)


class Parent(nn.Module):
    """Puts the layer one level down so its nodes carry an nn_module_stack."""

    def __init__(self, child):
        super().__init__()
        self.proj = child

    def forward(self, x):
        return self.proj(x)


def _eager_op(layer, x, grad_mode="lors", quant_aware=False):
    return quantized_lora_linear(x, layer.weight_packed, layer.weight_scale, layer.lora_A,
                                 layer.lora_B, bits=layer.bits, bias=layer.bias,
                                 scaling=layer.scaling, grad_mode=grad_mode,
                                 quant_aware=quant_aware)


@pytest.mark.parametrize("form", ["s_left", "delta_first", "mask_on_left", "div_by_constant",
                                  "add_alpha", "mm_product_then_scale"])
def test_every_float_spelling_is_accepted_on_a_dequantized_base(form):
    model = Parent(QuantFormLinear(form))
    compiled, record = compile_with(model, [annotate_sparse_linears, rewrite_quantized_adapters])
    out, grads, _ = grads_of(model, compiled, X)
    assert [r.count for r in record["results"]] == [1, 1]
    assert [n.target for n in record["gm"].graph.nodes if n.op == "call_function"] == [QUANT_OP]
    want, want_grads, _ = grads_of(model, lambda x: _eager_op(model.proj, x), X)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def _adapter(quant_aware=False, bits=4):
    layer = LorsQuantLinear(_quantized(bits), R, 2.0, quant_aware=quant_aware)
    with torch.no_grad():
        layer.lora_B.normal_()
    layer.emit_reference = True
    return layer


@pytest.mark.parametrize("quant_aware", [False, True])
@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_adapter_module_is_rewritten_and_matches_the_eager_op(quant_aware, grad_mode):
    layer = _adapter(quant_aware)
    model = Parent(layer)
    config = LorsConfig(grad_mode=grad_mode)  # quant_aware=False: the module's flag wins
    compiled, record = compile_with(model, [annotate_sparse_linears, rewrite_quantized_adapters],
                                    config)
    out, grads, _ = grads_of(model, compiled, X)
    [op] = [n for n in record["gm"].graph.nodes if n.op == "call_function"]
    assert op.target is QUANT_OP and op.args[6:10] == (2.0, grad_mode, 4, quant_aware)
    site = op.meta[SITE_META_KEY]
    assert (site.fqn, site.bits, site.group_size, site.quant_aware, site.rank, site.rewritten) \
        == ("proj", 4, GROUP, quant_aware, R, True)
    assert "quant_ops.py" in op.meta["stack_trace"] and op.meta["nn_module_stack"]
    layer.emit_reference = False
    want, want_grads, _ = grads_of(model, lambda x: _eager_op(layer, x, grad_mode, quant_aware),
                                   X)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert set(grads) == set(want_grads) == {"proj.lora_A", "proj.lora_B", "x"}
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6)


def test_annotate_marks_the_naive_form_the_op_and_a_plain_dequantized_linear():
    layer = _adapter(quant_aware=True, bits=8)
    captured = capture(Parent(layer), X)
    [result] = run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    assert result.count == 1
    site = captured.ctx.sites["proj"]
    assert (site.bits, site.group_size, site.quant_aware, site.rank, site.shape) == (
        8, GROUP, True, R, (D_OUT, D_IN))
    [linear] = [n for n in captured.gm.graph.nodes if SITE_META_KEY in n.meta]
    assert linear.target is F.linear

    layer.emit_reference = False  # the adapter calls the op itself
    captured = capture(Parent(layer), X)
    run_passes(captured.gm, [annotate_sparse_linears], captured.ctx)
    [op] = [n for n in captured.gm.graph.nodes if SITE_META_KEY in n.meta]
    assert op.target in (QUANT_OP, torch.ops.lors.quant_lora_linear)
    assert op.meta[SITE_META_KEY].bits == 8 and op.meta[SITE_META_KEY].rank == R

    class Plain(nn.Module):  # a quantized linear without adapter: a site without rank
        def __init__(self):
            super().__init__()
            self.proj = layer.base_layer()

        def forward(self, x):
            return F.linear(x, DEQUANTIZE(self.proj.weight_packed, self.proj.weight_scale, 8))

    captured = capture(Plain(), X)
    results = run_passes(captured.gm, [annotate_sparse_linears, rewrite_quantized_adapters],
                         captured.ctx)
    assert [r.count for r in results] == [1, 0] and results[1].details["skipped"] == {}
    assert captured.ctx.sites["proj"].rank is None and captured.ctx.sites["proj"].bits == 8
