"""The lors torch.compile backend and compile_model on small sparse MLPs.

- backend: the naive masked form is rewritten to the lors op in the forward GraphModule, the
  partitioned forward saves x instead of W' (saved bytes after < before), loss and adapter
  gradients equal eager (exact: the naive form's autograd, fp32 tolerance; lors: the eager op);
  ``passes=`` and ``report_before=`` are honoured; one inductor case.
- compile_model: state_dict keys unchanged, no_grad calls run the eager op path, graph breaks are
  counted and make it fall back with a warning, a failing compile falls back, a user error is
  raised and changes nothing, recompiles are counted, deep copies run eagerly.
- report: compiled and uncompiled models, tables and JSON.
"""
import copy
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lors_fx
from lors_fx import LorsConfig, attach_adapters, lors_modules
from lors_fx.backend import compile_model, decompile_model
from lors_fx.ops import reference_sparse_lora_linear, sparse_lora_linear
from lors_fx.report import LorsReport, report

from _toy import sparse_mlp

SIZES = (32, 64, 48, 16)
T = 8


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch.compiler.reset()
    yield
    torch.compiler.reset()


class NaiveMLP(nn.Module):
    """Two frozen 50%-sparse linears with hand-attached adapters, written in the naive form
    (``use_op=False``, what the backend must rewrite) or calling the lors op (the eager path)."""

    def __init__(self, grad_mode="lors", use_op=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(SIZES[0], SIZES[1])
        self.fc2 = nn.Linear(SIZES[1], SIZES[2])
        for layer in (self.fc1, self.fc2):
            weight = layer.weight.detach()
            k = weight.shape[1] // 2
            weight.scatter_(1, weight.abs().argsort(dim=1)[:, :k], 0.0)
            layer.weight.requires_grad_(False)
            layer.lora_A = nn.Parameter(torch.randn(4, layer.in_features) * 0.2)
            layer.lora_B = nn.Parameter(torch.randn(layer.out_features, 4) * 0.2)
        self.grad_mode, self.use_op, self.scaling = grad_mode, use_op, 2.0

    def _linear(self, layer, x):
        if self.use_op:
            return sparse_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B,
                                      bias=layer.bias, scaling=self.scaling,
                                      grad_mode=self.grad_mode)
        return reference_sparse_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B,
                                            layer.bias, self.scaling)

    def forward(self, x):
        return self._linear(self.fc2, F.gelu(self._linear(self.fc1, x)))


def _loss_and_grads(model, fn, x):
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, x.grad.clone()


def _compiled(model, config, **kwargs):
    lors_backend = lors_fx.backend(config, model=model, **kwargs)
    return torch.compile(model, backend=lors_backend), lors_backend.state


def _w_prime_sized(rows, sites):
    shapes = [sorted(shape) for shape in sites]
    return [r for r in rows if r["kind"] != "parameter" and sorted(r["shape"]) in shapes]


SITE_SHAPES = [(SIZES[1], SIZES[0]), (SIZES[2], SIZES[1])]


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_backend_rewrites_and_saves_x_instead_of_w_prime(grad_mode):
    config = LorsConfig(r=4, lora_alpha=8.0, grad_mode=grad_mode)
    model = NaiveMLP(grad_mode)
    compiled, state = _compiled(model, config)
    x = torch.randn(T, SIZES[0])
    loss, grads, grad_x = _loss_and_grads(model, compiled, x)

    assert len(state.graphs) == 1 and state.recompiles == 0
    record = state.graphs[0]
    assert {r.name: r.count for r in record.passes} == {"annotate_sparse_linears": 2,
                                                        "rewrite_masked_adapters": 2}
    assert sorted(record.sites) == ["fc1", "fc2"]
    assert all(site.rewritten and site.grad_mode == grad_mode for site in record.sites.values())
    assert record.forward.code.count("torch.ops.lors.sparse_lora_linear.default(") == 2
    # the op's backward rebuilds W' (d_out x d_in) from the parameters instead of loading it
    rebuilt = {tuple(n.meta["val"].shape) for n in record.backward.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}
    assert set(SITE_SHAPES) <= rebuilt
    assert f"'{grad_mode}'" in record.forward.code

    after, before = record.saved_after.details, record.saved_before.details
    assert _w_prime_sized(before["rows"], SITE_SHAPES), before["rows"]
    assert not _w_prime_sized(after["rows"], SITE_SHAPES), after["rows"]
    assert after["saved_bytes"] < before["saved_bytes"]
    # x of each site (2-D views), fc1's output for gelu's backward; nothing weight-sized
    assert after["saved_bytes"] == 4 * T * (SIZES[0] + SIZES[1] + SIZES[1])

    # numerics: exact = autograd of the naive form; lors = the eager op
    reference = NaiveMLP(grad_mode, use_op=(grad_mode == "lors"))
    ref_loss, ref_grads, ref_grad_x = _loss_and_grads(reference, reference, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads) == ["fc1.bias", "fc1.lora_A", "fc1.lora_B",
                                                  "fc2.bias", "fc2.lora_A", "fc2.lora_B"]
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)


def test_passes_override_and_report_before_off():
    config = LorsConfig(r=4)
    model = NaiveMLP()
    compiled, state = _compiled(model, config, passes=[], report_before=False)
    _loss_and_grads(model, compiled, torch.randn(T, SIZES[0]))
    record = state.graphs[0]
    assert record.passes == [] and record.saved_before is None
    assert "sparse_lora_linear" not in record.forward.code
    # un-rewritten: the default partitioner keeps W' -- exactly what LoRS must avoid
    assert _w_prime_sized(record.saved_after.details["rows"], SITE_SHAPES)


def test_inductor_fw_and_bw_compilers():
    config = LorsConfig(r=4, fw_compiler="inductor", bw_compiler="inductor")
    model = NaiveMLP()
    compiled, state = _compiled(model, config, report_before=False)
    x = torch.randn(T, SIZES[0])
    loss, grads, _ = _loss_and_grads(model, compiled, x)  # inductor builds C++: ~40 s cold
    reference = NaiveMLP(use_op=True)
    ref_loss, ref_grads, _ = _loss_and_grads(reference, reference, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)
    record = state.graphs[0]
    assert record.forward.code.count("torch.ops.lors.sparse_lora_linear.default(") == 2
    assert not _w_prime_sized(record.saved_after.details["rows"], SITE_SHAPES)


# ---------------------------------------------------------------------------------------------
# compile_model
# ---------------------------------------------------------------------------------------------


def _adapted_mlp(config, seed=0):
    model = sparse_mlp(sizes=SIZES, seed=seed)
    attach_adapters(model, config)
    torch.manual_seed(seed + 1)
    for module in lors_modules(model).values():
        nn.init.normal_(module.lora_B, std=0.2)  # nonzero, so W' != W
    return model


def test_second_model_with_another_scaling_is_rewritten_too():
    """Dynamo would turn a float that changes between models (``scaling``) into a graph input;
    the rewrite needs it constant. Both models, compiled in one process, must be rewritten, and
    no "not rewritten" warning may fire."""
    import warnings

    x = torch.randn(T, SIZES[0])
    for r, alpha in ((4, 8.0), (2, 3.0)):
        config = LorsConfig(r=r, lora_alpha=alpha)
        model = compile_model(_adapted_mlp(config), config)
        with warnings.catch_warnings():
            warnings.simplefilter("error", RuntimeWarning)
            model(x).sum().backward()
        result = report(model)
        assert result.rewritten == len(result.sites) == 3, (r, alpha)


def test_compile_model_matches_eager_and_keeps_state_dict_keys():
    config = LorsConfig(r=4)
    model = _adapted_mlp(config)
    eager = copy.deepcopy(model)
    keys = list(model.state_dict())
    assert compile_model(model, config) is model
    assert list(model.state_dict()) == keys
    assert all(m.emit_reference for m in lors_modules(model).values())
    x = torch.randn(T, SIZES[0])
    loss, grads, _ = _loss_and_grads(model, model, x)
    ref_loss, ref_grads, _ = _loss_and_grads(eager, eager, x)
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
    assert len(model._lors_state.graphs) == 1
    assert all(m.emit_reference for m in lors_modules(model).values())

    # a deep copy runs eagerly and equally
    clone = copy.deepcopy(model)
    assert not report(clone).compiled
    torch.testing.assert_close(clone(x), eager(x), rtol=1e-5, atol=1e-6)
    assert len(model._lors_state.graphs) == 1

    decompile_model(model)
    assert "forward" not in model.__dict__
    assert not any(m.emit_reference for m in lors_modules(model).values())


def test_a_new_input_shape_is_counted_as_a_recompile():
    config = LorsConfig(r=4)
    model = compile_model(_adapted_mlp(config), config)
    model(torch.randn(T, SIZES[0])).sum().backward()
    model(torch.randn(T + 3, SIZES[0])).sum().backward()
    state = model._lors_state
    assert len(state.graphs) == 2 and state.recompiles == 1
    assert report(model).recompiles == 1
    assert state.fallback is None


class BrokenMLP(nn.Module):
    """An adapted sparse MLP whose forward forces a dynamo graph break between its layers."""

    def __init__(self, config):
        super().__init__()
        self.net = _adapted_mlp(config)

    def forward(self, x):
        h = F.gelu(self.net[0](x))
        torch._dynamo.graph_break()
        return self.net[2](h)


def test_graph_breaks_are_counted_and_fall_back_to_the_eager_op_with_a_warning():
    config = LorsConfig(r=4)
    model = BrokenMLP(config)
    eager = copy.deepcopy(model)
    compile_model(model, config)
    x = torch.randn(T, SIZES[0])
    with pytest.warns(RuntimeWarning, match=r"eager LoRS op path: 1 graph break"):
        loss, grads, _ = _loss_and_grads(model, model, x)
    state = model._lors_state
    assert state.graph_breaks == 1 and len(state.graphs) == 2
    assert "graph_break" in next(iter(state.graph_break_reasons))
    assert state.fallback and not any(m.emit_reference for m in lors_modules(model).values())
    ref_loss, ref_grads, _ = _loss_and_grads(eager, eager, x)
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
    state = model._lors_state
    assert state.graph_breaks == 1 and state.fallback is None
    assert [sorted(g.sites) for g in state.graphs] == [["net.0"], ["net.2"]]
    assert all(s.rewritten for g in state.graphs for s in g.sites.values())


def _failing_pass(gm, ctx):
    raise RuntimeError("this pass refuses every graph")


def test_a_failing_compile_falls_back_and_reruns_eagerly():
    config = LorsConfig(r=4)
    model = _adapted_mlp(config)
    eager = copy.deepcopy(model)
    compile_model(model, config, passes=[_failing_pass])
    x = torch.randn(T, SIZES[0])
    with pytest.warns(RuntimeWarning, match="dynamo could not compile the forward"):
        out = model(x)
    torch.testing.assert_close(out, eager(x), rtol=1e-5, atol=1e-6)
    assert "this pass refuses" in model._lors_state.fallback
    assert not any(m.emit_reference for m in lors_modules(model).values())


def test_a_user_error_is_raised_and_changes_nothing():
    config = LorsConfig(r=4)
    model = compile_model(_adapted_mlp(config), config)
    with pytest.raises(ValueError, match="does not match weight's d_in"):  # the op's own check
        model(torch.randn(T, SIZES[0] + 1))
    assert model._lors_state.fallback is None
    assert all(m.emit_reference for m in lors_modules(model).values())
    model(torch.randn(T, SIZES[0])).sum().backward()  # and it still compiles afterwards
    assert model._lors_state.fallback is None and model._lors_state.graphs


def test_report_of_an_uncompiled_model_says_what_is_unknown():
    config = LorsConfig(r=4)
    model = _adapted_mlp(config)
    result = report(model)
    assert not result.compiled and result.saved_bytes_before is None
    assert result.saved_bytes_after is None and result.graphs == []
    assert [(s.fqn, s.shape, s.rank, s.grad_mode, s.rewritten) for s in result.sites] == [
        ("0", (64, 32), 4, "lors", False), ("2", (48, 64), 4, "lors", False),
        ("4", (16, 48), 4, "lors", False)]
    assert all(abs(s.sparsity - 0.5) < 1e-9 and s.pattern == "unstructured"
               for s in result.sites)
    assert "unknown" in str(result) and "not compiled" in " ".join(result.notes)
    assert json.loads(json.dumps(result.to_dict()))["saved_bytes_after"] is None
    # compiled but not run yet
    compile_model(model, config)
    assert report(model).saved_bytes_after is None
    assert "no training graph" in " ".join(report(model).notes)


def test_adapter_dropout_form_is_rewritten_too():
    config = LorsConfig(r=4, lora_dropout=0.1)
    model = compile_model(_adapted_mlp(config), config)
    model(torch.randn(T, SIZES[0])).sum().backward()
    result = report(model)
    assert result.rewritten == 3 and result.graph_breaks == 0 and result.fallback is None
    forward = result.graphs[0]["forward"].code
    assert forward.count("torch.ops.lors.sparse_lora_linear.default(") == 3
    assert not _w_prime_sized(result.saved_after, SITE_SHAPES + [(16, 48)])
    assert _w_prime_sized(result.saved_before, SITE_SHAPES + [(16, 48)])  # s*(B@A)*M kept
    assert result.saved_bytes_after < result.saved_bytes_before
