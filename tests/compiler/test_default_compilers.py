"""The default compiled path: ``LorsConfig()``'s ``"auto"`` compilers resolve to inductor where it
can run (compiled block by block), equal the eager op in loss and gradients, save nothing the
eager op does not, and fall back to the eager graph compilers with the reason reported."""
from __future__ import annotations

import pytest
import torch

import lors_fx
from lors_fx import LorsConfig
from lors_fx.compiler import _torch_private as private
from lors_fx import ops
from lors_fx.compiler import compile_state_of, decompile_model
from lors_fx.compiler.loss import CompiledLoss
from lors_fx.compiler.compilers import COMPILER_ENV, inductor_unavailable, resolve_compiler
from lors_fx.methods.measure import saved_bytes
from lors_fx.testing.toy import build_toy_llama, toy_batches

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_explicit_compilers_win_and_the_environment_overrides_auto(monkeypatch):
    monkeypatch.setenv(COMPILER_ENV, "eager")
    assert resolve_compiler("inductor", "cpu") == ("inductor", None)
    assert resolve_compiler("auto", "cpu") == ("eager", f"{COMPILER_ENV}=eager")
    monkeypatch.setenv(COMPILER_ENV, "tvm")
    with pytest.raises(ValueError, match="expected 'eager' or 'inductor'"):
        resolve_compiler("auto", "cpu")


def test_auto_without_a_cxx_compiler_is_eager_with_the_reason(monkeypatch):
    monkeypatch.delenv(COMPILER_ENV, raising=False)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    compiler, reason = resolve_compiler("auto", "cpu")
    assert compiler == "eager" and "no C++ compiler" in reason
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    assert "triton" in inductor_unavailable("cuda")
    assert "not used" in inductor_unavailable("mps")


def _pair():
    """The same optimized toy Llama twice (same adapters): eager op, and the default path."""
    eager, default = build_toy_llama(seed=0), build_toy_llama(seed=0)
    lors_fx.optimize(eager, LorsConfig(), compile=False)
    lors_fx.optimize(default, LorsConfig())  # compile=True, fw/bw "auto"
    with torch.no_grad():
        for name, param in eager.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    default.load_state_dict(eager.state_dict())
    return eager, default


def test_default_path_is_inductor_per_block_and_equals_the_eager_op(monkeypatch):
    monkeypatch.delenv(COMPILER_ENV, raising=False)
    if inductor_unavailable("cpu"):
        pytest.skip(f"inductor cannot run here: {inductor_unavailable('cpu')}")
    eager, default = _pair()
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    losses = []
    for model in (eager, default):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p_eager), (_, p_default) in zip(eager.named_parameters(),
                                                default.named_parameters()):
        if p_eager.requires_grad:
            torch.testing.assert_close(p_default.grad, p_eager.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
    state = compile_state_of(default)
    assert len(state.compiled_roots) == 2  # scope "auto" -> the decoder blocks
    report = lors_fx.report(default)
    assert set(map(tuple, (c.values() for c in report.compilers.values()))) == \
        {("inductor", "inductor")}
    assert report.compile_seconds > 0 and report.rewritten == 14
    # nothing saved that the eager op does not save (x per adapted linear, as LoRA)
    params = lambda m: list(m.parameters()) + list(m.buffers())  # noqa: E731
    compiled_saved = saved_bytes(lambda: default(**batch).loss, params(default))
    eager_saved = saved_bytes(lambda: eager(**batch).loss, params(eager))
    assert compiled_saved <= eager_saved


def test_a_failing_inductor_runs_the_graph_eagerly_and_says_why(monkeypatch):
    monkeypatch.setenv(COMPILER_ENV, "inductor")

    def broken(is_backward):
        def compile_graph(gm, inputs):
            raise RuntimeError("simulated C++ build failure")
        return compile_graph

    monkeypatch.setattr(private, "inductor_compiler", broken)
    eager, default = _pair()
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    with pytest.warns(RuntimeWarning, match="simulated C\\+\\+ build failure"):
        loss = default(**batch).loss
        loss.backward()
    torch.testing.assert_close(loss.detach(), eager(**batch).loss.detach(), rtol=1e-5,
                               atol=1e-6)
    report = lors_fx.report(default)
    assert all(c["forward"] == "eager" for c in report.compilers.values())
    assert any("inductor failed on the forward graph" in note for note in report.notes)


def test_auto_falls_back_to_eager_whole_model_with_the_reason(monkeypatch):
    monkeypatch.delenv(COMPILER_ENV, raising=False)
    monkeypatch.setenv("CXX", "no-such-c++-compiler")
    monkeypatch.setattr(private, "inductor_joint_graph_passes", None)  # never called here
    _, default = _pair()
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    default(**batch).loss.backward()
    state = compile_state_of(default)
    assert state.compiled_roots == []  # eager compilers: one whole-model graph
    report = lors_fx.report(default)
    assert all(c == {"forward": "eager", "backward": "eager"} for c in report.compilers.values())
    assert any("auto -> eager: no C++ compiler" in note for note in report.notes)
    assert "compilers (forward/backward): eager/eager" in str(report)


def _needs_inductor(monkeypatch):
    monkeypatch.delenv(COMPILER_ENV, raising=False)
    if inductor_unavailable("cpu"):
        pytest.skip(f"inductor cannot run here: {inductor_unavailable('cpu')}")


def _eager_op_calls(monkeypatch):
    """A list that grows by one per forward of the eager op (the lowered graphs never call it)."""
    calls, forward = [], ops._forward

    def counting(*args, **kwargs):
        calls.append(1)
        return forward(*args, **kwargs)

    monkeypatch.setattr(ops, "_forward", counting)
    return calls


def test_default_path_lowers_the_build_and_compiles_the_loss(monkeypatch):
    _needs_inductor(monkeypatch)
    joint_passes, real = [], private.inductor_joint_graph_passes
    monkeypatch.setattr(private, "inductor_joint_graph_passes",
                        lambda gm, inputs: joint_passes.append(gm) or real(gm, inputs))
    _, default = _pair()
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    calls = _eager_op_calls(monkeypatch)
    default(**batch).loss.backward()
    assert calls == []  # every adapted linear ran lowered inside inductor's graphs
    assert joint_passes  # inductor's joint-graph passes ran before the partitioner
    state = compile_state_of(default)
    lors_targets = {torch.ops.lors.sparse_lora_linear.default, torch.ops.lors.masked_weight.default}
    for record in state.graphs:
        assert set(record.lowered) == {"forward", "backward"}
        for graph in record.lowered.values():
            assert not lors_targets & {n.target for n in graph.graph.nodes}
        # the partitioned graphs keep the op: what is saved was decided with it opaque
        assert torch.ops.lors.sparse_lora_linear.default in \
            {n.target for n in record.forward.graph.nodes}
    passes = {(p["name"], p["graph"]): p["count"] for p in lors_fx.report(default).passes}
    assert passes[("lower_lors_ops (forward)", 0)] == 7
    assert passes[("lower_lors_ops (backward)", 0)] > 0
    # another length recompiles with symbolic token dims: still lowered, the op never called
    graphs = len(state.graphs)
    [longer] = toy_batches(1, batch_size=2, seq_len=24)
    default(**longer).loss.backward()
    assert calls == [] and len(state.graphs) > graphs
    assert isinstance(default.loss_function, CompiledLoss)
    assert any("loss: compiled" in note for note in lors_fx.report(default).notes)
    decompile_model(default)
    assert not isinstance(default.loss_function, CompiledLoss)
    assert "_loss_function" not in default.__dict__


def test_the_fused_build_equals_the_opaque_op(monkeypatch):
    _needs_inductor(monkeypatch)
    _, fused = _pair()
    opaque = build_toy_llama(seed=0)
    lors_fx.optimize(opaque, LorsConfig(fuse_build=False))
    opaque.load_state_dict(fused.state_dict())
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    for model in (fused, opaque):
        model(**batch).loss.backward()
    for (name, a), (_, b) in zip(fused.named_parameters(), opaque.named_parameters()):
        if a.requires_grad:
            torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"{name}: {m}")
    for record in compile_state_of(opaque).graphs:
        assert all(r.count == 0 for results in record.lower_passes.values() for r in results)


def test_a_call_inside_a_dispatch_mode_leaves_the_model_compiled(monkeypatch):
    """FlopCounterMode around one call used to make dynamo skip the block's frame for good: the
    model then ran eagerly, silently."""
    from torch.utils.flop_counter import FlopCounterMode

    _needs_inductor(monkeypatch)
    _, default = _pair()
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    default(**batch).loss.backward()
    calls = _eager_op_calls(monkeypatch)
    with FlopCounterMode(display=False) as counter:
        default(**batch).loss.backward()
    assert counter.get_total_flops() > 0 and calls  # that call ran the eager op
    calls.clear()
    default(**batch).loss.backward()
    assert calls == [] and compile_state_of(default).fallback is None
