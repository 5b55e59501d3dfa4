"""The lors torch.compile backend (:func:`compile_model`, which installs it, is in compiled_model.py).

Per dynamo graph the backend runs::

    dynamo graph (torch IR, parameters as placeholders)
      -> forward passes: annotate_sparse_linears[, convert_peft_lora], rewrite_quantized_adapters,
         rewrite_masked_adapters
      -> aot_autograd: joint graph
           -> partition_fn: inductor's joint-graph passes (when it compiles), insert_checkpoints
              (policy != "none"), then the min-cut partitioner
           -> saved_tensor_report on the partitioned forward
      -> fw/bw compilers: "inductor", or "eager" (run the GraphModules); "auto" resolves per
         graph (lors_fx.compiler.compilers), and an inductor failure runs that graph eagerly

and records everything in a :class:`LorsCompileState` (per graph: pass results, sites, saved
tensors before and after the rewrite, the forward and backward GraphModules; graph breaks,
recompiles). "Before" is the same dynamo graph without the forward passes, traced and partitioned
once more (with the same joint-graph passes) only to list what it would save; it is never
compiled or run. ``report_before=False`` skips it.

Why the rewrite matters: torch's partitioners save ``W'`` (a dense d_out x d_in tensor per adapted
linear) for the naive masked form; the lors op is opaque to them and saves only ``x``.
"""
from __future__ import annotations

import time
import warnings
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import fx, nn

from lors_fx.compiler import _torch_private as private
from lors_fx.compiler.compilers import device_of, resolve_compiler
from lors_fx.compiler.state import GraphRecord, LorsCompileState
from lors_fx.config import LorsConfig
from lors_fx.passes import PassContext, PassResult, passes_for, run_passes
from lors_fx.passes._match import copy_graph_module

__all__ = ["backend", "default_forward_passes"]

def default_forward_passes(config: Optional[LorsConfig]) -> List[Callable]:
    """The forward passes the backend runs: annotate, rewrite, and (opt-in) PEFT conversion."""
    return passes_for("forward", config)


def _input_names(gm: fx.GraphModule, example_inputs: Sequence[Any],
                 model: Optional[nn.Module]):
    """``(placeholder_params, input_names)`` from the identity of dynamo's example inputs.

    Dynamo hands the real parameters and buffers as example inputs, in placeholder order.
    """
    by_id: Dict[int, str] = {}
    if model is not None:
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            by_id.setdefault(id(tensor), name)
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    placeholder_params, input_names = {}, []
    for node, value in zip(placeholders, example_inputs):
        fqn = by_id.get(id(value))
        if fqn is not None:
            placeholder_params[node.name] = (fqn, value)
            input_names.append(("parameter", fqn))
        else:
            input_names.append(("input", node.name))
    return placeholder_params, input_names


def _partition(joint_gm, joint_inputs, kwargs, ctx, graph_passes, inductor: bool):
    """Joint-graph passes (inductor's first, when it compiles the graphs, as its own partition_fn
    does), min-cut, saved-tensor report: ``(fw, bw, joint results, report)``."""
    if inductor:
        joint_gm = private.inductor_joint_graph_passes(joint_gm, joint_inputs)
    ctx.extra["partition_kwargs"] = dict(kwargs)
    ctx.extra["num_fwd_outputs"] = kwargs["num_fwd_outputs"]
    joint_results = run_passes(joint_gm, graph_passes, ctx)
    fw_gm, bw_gm = private.min_cut_partition(joint_gm, joint_inputs, **kwargs)
    saved = run_passes(fw_gm, passes_for("report", ctx.config), ctx, validate=False)[0]
    return fw_gm, bw_gm, joint_results, saved


class _StopAfterPartition(Exception):
    """Raised by the "before" partition_fn: the saved tensors are known, compile nothing."""


def backend(config: Optional[LorsConfig] = None, *, model: Optional[nn.Module] = None,
            passes: Optional[Sequence[Callable]] = None,
            joint_passes: Optional[Sequence[Callable]] = None, report_before: bool = True,
            state: Optional[LorsCompileState] = None,
            graph_is_block: bool = False) -> Callable:
    """A ``torch.compile`` backend ``(gm, example_inputs) -> callable`` for LoRS training.

    Args:
        config: the :class:`LorsConfig` (grad mode, recompute, checkpoint policy, compilers).
        model: the module being compiled; its parameters name the graph's placeholders (without
            it, parameters are not recognised and no site is found).
        passes: forward passes to run instead of :func:`default_forward_passes`.
        joint_passes: joint-graph passes instead of ``insert_checkpoints`` (when the policy is
            not ``"none"``).
        report_before: also list what the un-rewritten graph would save (one more trace and
            partition per graph, nothing compiled).
        state: where to record (default: a new :class:`LorsCompileState`).
        graph_is_block: each graph is one decoder block's forward (``compile_model`` with
            ``scope="blocks"``): the checkpoint policy treats the whole graph as that block.

    The returned callable has the state as ``.state``.
    """
    config = LorsConfig() if config is None else config
    state = LorsCompileState(config=config) if state is None else state
    forward_passes = list(default_forward_passes(config) if passes is None else passes)
    graph_passes = list(passes_for("joint", config) if joint_passes is None else joint_passes)

    def compile_graph(gm: fx.GraphModule, example_inputs):
        start = time.perf_counter()
        record = _new_record(state)
        inductor = _choose_compilers(record, config, example_inputs)
        placeholder_params, input_names = _input_names(gm, example_inputs, model)
        original = copy_graph_module(gm) if report_before else None
        ctx = PassContext(config=config, model=model, notes=record.notes,
                          extra={"placeholder_params": placeholder_params,
                                 "input_names": input_names, "graph_is_block": graph_is_block})
        _run_forward_passes(gm, forward_passes, ctx, record)

        def partition_fn(joint_gm, joint_inputs, **kwargs):
            (record.forward, record.backward, record.joint_passes,
             record.saved_after) = _partition(joint_gm, joint_inputs, kwargs, ctx, graph_passes,
                                              any(inductor))
            return record.forward, record.backward

        decompositions = private.inductor_decompositions() if any(inductor) else None
        compiled = private.aot_backend(_graph_compiler(record, inductor[0], False, ctx),
                                       _graph_compiler(record, inductor[1], True, ctx), partition_fn,
                                       decompositions=decompositions)(gm, example_inputs)
        if original is not None and record.backward is not None:
            record.saved_before = _saved_before(original, example_inputs, config, model,
                                                placeholder_params, input_names, graph_passes,
                                                decompositions, record)
        record.seconds = time.perf_counter() - start
        return compiled

    compile_graph.__name__ = compile_graph.__qualname__ = "lors_backend"
    compile_graph.state = state
    return compile_graph


def _choose_compilers(record: GraphRecord, config: LorsConfig, example_inputs) -> tuple:
    """Resolve ``fw_compiler`` / ``bw_compiler`` for this graph's device; record the choice and
    why ``"auto"`` fell to eager. Returns ``(fw is inductor, bw is inductor)``."""
    device = device_of(example_inputs)
    fw, fw_reason = resolve_compiler(config.fw_compiler, device)
    bw, bw_reason = resolve_compiler(config.bw_compiler, device)
    record.compilers = {"forward": fw, "backward": bw}
    reason = fw_reason or bw_reason
    if reason:
        record.compiler_notes.append(f"auto -> eager: {reason}")
    return fw == "inductor", bw == "inductor"


def _graph_compiler(record: GraphRecord, use_inductor: bool, is_backward: bool,
                    ctx: PassContext) -> Callable:
    """aot_autograd's fw/bw compiler: the "lower" passes on a copy of the graph, then inductor;
    or run the GraphModule as it is ("eager"). An inductor failure runs the graph eagerly
    (unlowered), recorded and warned about with the error."""
    def compile_one(graph_gm, inputs):
        if not is_backward and record.forward is None:
            record.forward = graph_gm  # inference graph: no partition
        part = "backward" if is_backward else "forward"
        if use_inductor:
            try:
                lowered = copy_graph_module(graph_gm)
                record.lower_passes[part] = run_passes(
                    lowered, passes_for("lower", ctx.config), ctx)
                record.lowered[part] = lowered
                return private.inductor_compiler(is_backward)(lowered, inputs)
            except Exception as error:  # a slower graph, never a failed training step
                record.compilers[part] = "eager"
                why = f"inductor failed on the {part} graph, ran eagerly: " \
                      f"{type(error).__name__}: {str(error).strip()[:300]}"
                record.compiler_notes.append(why)
                warnings.warn(f"lors_fx: {why}", RuntimeWarning, stacklevel=2)
        return private.boxed(graph_gm.forward)
    return compile_one


def _new_record(state: LorsCompileState) -> GraphRecord:
    """A record for the graph being compiled, appended to ``state``."""
    record = GraphRecord(index=len(state.graphs), compile_id=private.current_compile_id())
    # A recompile = another graph for a frame this backend already compiled (dynamo's own
    # frame_compile_id also counts other models whose forward shares the same code object).
    record.recompile = record.compile_id is not None and any(
        r.compile_id is not None and r.compile_id[0] == record.compile_id[0]
        for r in state.graphs)
    state.graphs.append(record)
    return record


def _run_forward_passes(gm: fx.GraphModule, forward_passes, ctx: PassContext,
                        record: GraphRecord) -> None:
    """The forward passes on the dynamo graph; warns when an adapted linear stays naive."""
    record.passes = run_passes(gm, forward_passes, ctx)
    record.sites = dict(ctx.sites)
    missed = sorted(fqn for fqn, site in ctx.sites.items()
                    if site.rank is not None and not site.rewritten)
    quant_aware = [fqn for fqn in missed if ctx.sites[fqn].quant_aware]
    if quant_aware:  # the naive form would train without Q(W'): fail, compile_model falls back
        raise RuntimeError(f"lors_fx: {len(quant_aware)} quantization-aware adapter(s) not "
                           f"rewritten to lors::quant_lora_linear (the naive form has no "
                           f"quantization-aware forward): {quant_aware[:4]}; notes: "
                           f"{record.notes[:2]}")
    if missed:  # the naive form stays in the graph and saves W': never silently
        warnings.warn(f"lors_fx: {len(missed)} adapted linear(s) not rewritten to the lors op "
                      f"(they keep the naive form and save W'): {missed[:4]}; notes: "
                      f"{record.notes[:2]}", RuntimeWarning, stacklevel=4)
    record.dynamo_graph = gm


def _saved_before(original: fx.GraphModule, example_inputs, config, model, placeholder_params,
                  input_names, graph_passes, decompositions, record) -> Optional[PassResult]:
    """Trace and partition the un-rewritten graph; return its saved-tensor report."""
    ctx = PassContext(config=config, model=model, notes=[],
                      extra={"placeholder_params": placeholder_params,
                             "input_names": input_names})
    found: Dict[str, PassResult] = {}

    def partition_fn(joint_gm, joint_inputs, **kwargs):
        found["report"] = _partition(joint_gm, joint_inputs, kwargs, ctx, graph_passes,
                                     decompositions is not None)[3]
        raise _StopAfterPartition

    def never_compiled(gm, inputs):  # pragma: no cover - the partition stops first
        return private.boxed(gm.forward)

    try:
        with private.fresh_tracing(private.fake_mode_of(example_inputs)):
            private.aot_trace(original, example_inputs, fw_compiler=never_compiled,
                              partition_fn=partition_fn, decompositions=decompositions)
    except _StopAfterPartition:
        pass
    except Exception as error:  # the measurement is a report, never a reason to fail training
        if "report" not in found:
            record.notes.append(f"saved_before not measured: {type(error).__name__}: {error}")
    return found.get("report")

