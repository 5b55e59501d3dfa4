"""lors_fx.compiler.compiled_model: compile_model on small adapted sparse MLPs.

State_dict keys unchanged, no_grad calls run the eager op path, graph breaks are counted and make
it fall back with a warning, a failing compile falls back, a user error is raised and changes
nothing, recompiles are counted, deep copies run eagerly, a second model with another scaling
and the adapter-dropout form are rewritten too.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lors_fx import LorsConfig, lors_modules
from lors_fx.compiler import compile_model, compile_state_of, decompile_model
from lors_fx.compiler.report import LorsReport, report
from tests.compiler._mlp import SITE_SHAPES, SIZES, T, adapted_mlp, loss_and_grads, w_prime_sized

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_second_model_with_another_scaling_is_rewritten_too():
    """Dynamo would turn a float that changes between models (``scaling``) into a graph input;
    the rewrite needs it constant. Both models, compiled in one process, must be rewritten, and
    no "not rewritten" warning may fire."""
    x = torch.randn(T, SIZES[0])
    for r, alpha in ((4, 8.0), (2, 3.0)):
        config = LorsConfig(r=r, lora_alpha=alpha)
        model = compile_model(adapted_mlp(config), config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            model(x).sum().backward()
        result = report(model)
        assert result.rewritten == len(result.sites) == 3, (r, alpha)


def test_compile_model_matches_eager_and_keeps_state_dict_keys():
    config = LorsConfig(r=4)
    model = adapted_mlp(config)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert compile_model(model, config) is model
    assert list(model.state_dict()) == keys
    assert all(m.emit_reference for m in lors_modules(model).values())
    x = torch.randn(T, SIZES[0])
    loss, grads, _ = loss_and_grads(model, model, x)
    ref_loss, ref_grads, _ = loss_and_grads(eager, eager, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)

    result = report(model)
    assert isinstance(result, LorsReport) and result.compiled
    assert [s.fqn for s in result.sites] == ["0", "2", "4"]
    assert result.rewritten == 3 and all(s.rank == 4 for s in result.sites)
    assert result.saved_bytes_after < result.saved_bytes_before
    assert result.graph_breaks == 0 and result.recompiles == 0 and len(result.graphs) == 1
    assert "sparse_lora_linear" in result.graphs[0]["forward"].code
    text = str(result)
    assert "rewrite_masked_adapters" in text and "saved for backward" in text
    data = json.loads(json.dumps(result.to_dict()))
    assert data["saved_bytes_after"] == result.saved_bytes_after
    assert [s["rewritten"] for s in data["sites"]] == [True, True, True]

    # no_grad calls (eval, generate) run the eager op path and compile nothing
    with torch.no_grad():
        out = model(x)
        torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-6)
    assert len(compile_state_of(model).graphs) == 1
    assert all(m.emit_reference for m in lors_modules(model).values())

    # a deep copy runs eagerly and equally
    clone = copy.deepcopy(model)
    assert not report(clone).compiled
    torch.testing.assert_close(clone(x), eager(x), rtol=1e-5, atol=1e-6)
    assert len(compile_state_of(model).graphs) == 1

    decompile_model(model)
    assert "forward" not in model.__dict__
    assert not any(m.emit_reference for m in lors_modules(model).values())


def test_a_new_input_shape_is_counted_as_a_recompile():
    config = LorsConfig(r=4)
    model = compile_model(adapted_mlp(config), config)
    model(torch.randn(T, SIZES[0])).sum().backward()
    model(torch.randn(T + 3, SIZES[0])).sum().backward()
    state = compile_state_of(model)
    assert len(state.graphs) == 2 and state.recompiles == 1
    assert report(model).recompiles == 1
    assert state.fallback is None


class BrokenMLP(nn.Module):
    """An adapted sparse MLP whose forward forces a dynamo graph break between its layers."""

    def __init__(self, config):
        super().__init__()
        self.net = adapted_mlp(config)

    def forward(self, x):
        h = F.gelu(self.net[0](x))
        torch._dynamo.graph_break()  # no public spelling of an explicit graph break
        return self.net[2](h)


def test_graph_breaks_are_counted_and_fall_back_to_the_eager_op_with_a_warning():
    config = LorsConfig(r=4)
    model = BrokenMLP(config)
    eager = copy.deepcopy(model)
    compile_model(model, config)
    x = torch.randn(T, SIZES[0])
    with pytest.warns(RuntimeWarning, match=r"eager LoRS op path: 1 graph break"):
        loss, grads, _ = loss_and_grads(model, model, x)
    state = compile_state_of(model)
    assert state.graph_breaks == 1 and len(state.graphs) == 2
    assert "graph_break" in next(iter(state.graph_break_reasons))
    assert state.fallback and not any(m.emit_reference for m in lors_modules(model).values())
    ref_loss, ref_grads, _ = loss_and_grads(eager, eager, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:  # the breaking call itself was correct (compiled parts rewritten)
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # later calls: eager op, silently, nothing compiled
        model(x).sum().backward()
    assert len(state.graphs) == 2
    result = report(model)
    assert not result.compiled and result.graph_breaks == 1 and "graph break" in result.fallback


def test_graph_breaks_without_fallback_keep_both_graphs_rewritten():
    config = LorsConfig(r=4)
    model = BrokenMLP(config)
    compile_model(model, config, fallback_on_graph_break=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        model(torch.randn(T, SIZES[0])).sum().backward()
    state = compile_state_of(model)
    assert state.graph_breaks == 1 and state.fallback is None
    assert [sorted(g.sites) for g in state.graphs] == [["net.0"], ["net.2"]]
    assert all(s.rewritten for g in state.graphs for s in g.sites.values())


def _failing_pass(gm, ctx):
    raise RuntimeError("this pass refuses every graph")


def test_a_failing_compile_falls_back_and_reruns_eagerly():
    config = LorsConfig(r=4)
    model = adapted_mlp(config)
    eager = copy.deepcopy(model)
    compile_model(model, config, passes=[_failing_pass])
    x = torch.randn(T, SIZES[0])
    with pytest.warns(RuntimeWarning, match="dynamo could not compile the forward"):
        out = model(x)
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-6)
    assert "this pass refuses" in compile_state_of(model).fallback
    assert not any(m.emit_reference for m in lors_modules(model).values())


def test_a_user_error_is_raised_and_changes_nothing():
    config = LorsConfig(r=4)
    model = compile_model(adapted_mlp(config), config)
    with pytest.raises(ValueError, match="does not match weight's d_in"):  # the op's own check
        model(torch.randn(T, SIZES[0] + 1))
    assert compile_state_of(model).fallback is None
    assert all(m.emit_reference for m in lors_modules(model).values())
    model(torch.randn(T, SIZES[0])).sum().backward()  # and it still compiles afterwards
    assert compile_state_of(model).fallback is None and compile_state_of(model).graphs


def test_adapter_dropout_form_is_rewritten_too():
    config = LorsConfig(r=4, lora_dropout=0.1)
    model = compile_model(adapted_mlp(config), config)
    model(torch.randn(T, SIZES[0])).sum().backward()
    result = report(model)
    assert result.rewritten == 3 and result.graph_breaks == 0 and result.fallback is None
    forward = result.graphs[0]["forward"].code
    assert forward.count("torch.ops.lors.sparse_lora_linear.default(") == 3
    assert not w_prime_sized(result.saved_after, SITE_SHAPES + [(16, 48)])
    assert w_prime_sized(result.saved_before, SITE_SHAPES + [(16, 48)])  # s*(B@A)*M kept
    assert result.saved_bytes_after < result.saved_bytes_before
