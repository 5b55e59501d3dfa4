"""``optimize`` (compile=True) on a quantized tiny Llama: the lors backend rewrites every quantized
adapter to ``lors::quant_lora_linear``; loss and adapter gradients equal the eager op's; the
compiled graph saves ``x``, never a dense ``d_out x d_in`` tensor, at the quantized sites; the
report lists the sites with their bits and group size; a quantization-aware site the rewrite
misses makes the model fall back to the eager op (never a silently non-QA forward)."""
import copy
import warnings

import pytest
import torch
from torch import fx, nn

import lors_fx
from lors_fx import LorsConfig
from lors_fx.adapter_layers import LorsQuantLinear
from lors_fx.compiler import compile_model, compile_state_of
from lors_fx.compiler._torch_private import is_view_op
from lors_fx.compiler.compilers import COMPILER_ENV
from lors_fx.passes.annotate_sparse_linears import annotate_sparse_linears
from lors_fx.quant import QuantSpec
from lors_fx.quantized import quantize_linear, quantize_model
from lors_fx.testing.tiny_models import build_model, random_batch

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

SPEC = QuantSpec(4, 16)
SEQ = 12  # 2 x 12 = 24 tokens: no activation is shaped like a weight (64, 32, 128 wide)
#: fp32: loss and every adapter gradient within this relative error of the eager op's
RTOL = 1e-5


SITES = 7  # one decoder layer: q, k, v, o, gate, up, down


@pytest.fixture(scope="module")
def quantized_llama():
    model = build_model("llama", num_hidden_layers=1)
    quantize_model(model, SPEC)
    return model


@pytest.fixture(scope="module")
def compiled_steps(quantized_llama):
    """``{(quant_aware, grad_mode): _step(..., compile=True)}``, each run once per module."""
    cache = {}

    def get(quant_aware, grad_mode):
        key = (quant_aware, grad_mode)
        if key not in cache:
            torch.compiler.reset()
            cache[key] = _step(quantized_llama, LorsConfig(r=4, quant_aware=quant_aware,
                                                           grad_mode=grad_mode), True)
        return cache[key]

    return get


def _optimized(base, config, compile):
    """A copy of ``base`` optimized with ``config``, lora_B random (so every gradient and the QA
    rounding matter); the same adapters for the same config."""
    model = copy.deepcopy(base)
    torch.manual_seed(0)
    lors_fx.optimize(model, config, compile=compile)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0.0, 0.05)
    return model


def _step(base, config, compile):
    """One training step of :func:`_optimized`: ``(model, loss, {adapter name: grad})``."""
    model = _optimized(base, config, compile)
    loss = model(**random_batch(2, SEQ)).loss
    loss.backward()
    grads = {n: p.grad.detach() for n, p in model.named_parameters() if p.grad is not None}
    return model, loss.detach(), grads


def _assert_relative(got, want, what):
    scale = want.abs().max().clamp_min(1e-30)
    error = ((got - want).abs().max() / scale).item()
    assert error <= RTOL, f"{what}: relative error {error:.2e} > {RTOL:g}"


@pytest.mark.parametrize("quant_aware,grad_mode", [(False, "lors"), (True, "lors"),
                                                   (False, "exact"), (True, "exact")])
def test_compiled_loss_and_gradients_equal_the_eager_op(quantized_llama, compiled_steps,
                                                        quant_aware, grad_mode):
    compiled, loss, grads = compiled_steps(quant_aware, grad_mode)
    config = LorsConfig(r=4, quant_aware=quant_aware, grad_mode=grad_mode)
    _, want_loss, want_grads = _step(quantized_llama, config, compile=False)
    _assert_relative(loss, want_loss, "loss")
    assert sorted(grads) == sorted(want_grads) and len(grads) == 2 * SITES  # A, B per site
    for name, grad in want_grads.items():
        _assert_relative(grads[name], grad, name)

    state = compile_state_of(compiled)
    assert state.fallback is None and len(state.graphs) == 1 and state.graph_breaks == 0
    record = state.graphs[0]
    counts = {r.name: r.count for r in record.passes}
    assert counts["rewrite_quantized_adapters"] == SITES
    assert counts["rewrite_masked_adapters"] == 0
    assert all(s.rewritten and s.bits == 4 and s.group_size == 16 and s.quant_aware == quant_aware
               and s.grad_mode == grad_mode for s in record.sites.values())
    code = record.forward.code
    assert code.count("torch.ops.lors.quant_lora_linear.default(") == SITES
    assert "lors.dequantize" not in code and f"'{grad_mode}'" in code


def _weight_shapes(model):
    return {(m.out_features, m.in_features) for m in model.modules()
            if isinstance(m, LorsQuantLinear)}


def test_compiled_graph_saves_x_and_no_dense_weight_at_quantized_sites(compiled_steps):
    model = compiled_steps(False, "lors")[0]
    record = compile_state_of(model).graphs[0]
    shapes = _weight_shapes(model)

    def dense(report):
        return [r for r in report.details["rows"]
                if r["kind"] != "parameter" and tuple(r["shape"][-2:]) in shapes]

    assert dense(record.saved_before)  # the naive form saves W' (and the mask)
    assert dense(record.saved_after) == []
    assert record.saved_after.details["saved_bytes"] < record.saved_before.details["saved_bytes"]
    # each op's x is saved for backward (the storage it views, as the report counts it)
    saved = {r["view_of"] or r["name"] for r in record.saved_after.details["rows"]}
    ops = [n for n in record.forward.graph.nodes
           if n.target is torch.ops.lors.quant_lora_linear.default]
    assert len(ops) == SITES and all(_view_root(op.args[0]).name in saved for op in ops)
    # and the backward rebuilds W' from the codes where it needs grad_x (all but the first
    # layer's q/k/v, whose input needs no gradient)
    rebuilt = [n for n in record.backward.graph.nodes
               if n.target is torch.ops.lors.quant_masked_weight.default]
    assert len(rebuilt) == SITES - 3


def _view_root(node):
    while is_view_op(node) and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def test_report_lists_quantized_sites_with_bits_group_and_saved_bytes(compiled_steps):
    model = compiled_steps(True, "lors")[0]
    report = lors_fx.report(model)
    assert len(report.sites) == SITES and report.rewritten == SITES
    assert all((s.bits, s.group_size, s.quant_aware) == (4, 16, True) for s in report.sites)
    assert 0 < report.saved_bytes_after < report.saved_bytes_before
    data = report.to_dict()
    assert {(s["bits"], s["group_size"], s["quant_aware"]) for s in data["sites"]} == {
        (4, 16, True)}
    text = str(report)
    assert text.count("int4 g16 QA") == SITES and "saved for backward" in text
    assert f"after {report.saved_bytes_after} B" in text


def test_a_missed_quant_aware_site_falls_back_to_the_eager_op(quantized_llama):
    config = LorsConfig(r=4, quant_aware=True)
    _, want_loss, _ = _step(quantized_llama, config, compile=False)
    model = _optimized(quantized_llama, config, compile=False)
    compile_model(model, config, passes=[annotate_sparse_linears])  # no rewrite
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loss = model(**random_batch(2, SEQ)).loss
    state = compile_state_of(model)
    assert state.fallback is not None and "quantization-aware" in state.fallback
    assert any("eager LoRS op path" in str(w.message) for w in caught)
    _assert_relative(loss.detach(), want_loss, "loss after the fallback")


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        linear = nn.Linear(32, 16)
        with torch.no_grad():
            linear.weight[torch.rand(16, 32) < 0.5] = 0
        self.proj = quantize_linear(linear, SPEC, "proj")

    def forward(self, x):
        return self.proj(x).square().mean()


def test_default_inductor_path_matches_the_eager_op(monkeypatch):
    monkeypatch.delenv(COMPILER_ENV, raising=False)
    results = {}
    for compile in (True, False):
        model = _Block()
        torch.manual_seed(1)
        lors_fx.optimize(model, LorsConfig(r=4, quant_aware=True, min_sparsity=0.25),
                         compile=compile)
        with torch.no_grad():
            model.proj.lora_B.normal_()
        loss = model(torch.randn(5, 32, generator=torch.Generator().manual_seed(2)))
        loss.backward()
        results[compile] = (loss.detach(), model.proj.lora_A.grad, model.proj.lora_B.grad)
        if compile:
            record = compile_state_of(model).graphs[0]
            assert record.compilers == {"forward": "inductor", "backward": "inductor"}
            assert record.compiler_notes == [] and record.sites["proj"].rewritten
    for got, want in zip(results[True], results[False]):
        _assert_relative(got, want, "inductor vs eager")


def test_inductor_compiles_the_quantization_aware_model(quantized_llama, monkeypatch):
    """The default compilers (inductor): the quantized ops stay opaque inside inductor's graphs
    (lower_lors_ops lowers only the float op: inductor's CPU code for the int4 unpack and the
    group scales was slower than the op's chunked build), loss and gradients equal the eager
    op's."""
    from lors_fx.compiler.compilers import inductor_unavailable

    monkeypatch.delenv(COMPILER_ENV, raising=False)
    if inductor_unavailable("cpu"):
        pytest.skip(f"inductor cannot run here: {inductor_unavailable('cpu')}")
    torch.compiler.reset()
    config = LorsConfig(r=4, quant_aware=True)
    compiled, loss, grads = _step(quantized_llama, config, compile=True)
    _, want_loss, want_grads = _step(quantized_llama, config, compile=False)
    _assert_relative(loss, want_loss, "loss")
    for name, grad in want_grads.items():
        _assert_relative(grads[name], grad, name)
    record = compile_state_of(compiled).graphs[0]
    assert record.compilers == {"forward": "inductor", "backward": "inductor"}
    assert all(r.count == 0 for results in record.lower_passes.values() for r in results)
    assert "lors.quant_lora_linear" in record.lowered["forward"].code
