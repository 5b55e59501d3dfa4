"""Every private torch API that lors_fx uses, in one small module.

Tested torch range: **2.11 to 2.14** (pinned in ``pyproject.toml``; a warning on import outside
it). The names below carry no stability promise, so a new torch may move them: this is the only
file to fix. What differs inside the range is listed in ``_torch_versions.py``; each difference
is handled in the one function below that needs it.

What is used, and why:

- aot_autograd (``torch._dynamo.backends.common.aot_autograd``) and ``make_boxed_func``: the
  backend's forward/backward split.
- The min-cut partitioner (``torch._functorch.partitioners.min_cut_rematerialization_partition``)
  and the joint graph's ``primals_*``/``tangents_*`` naming (``_is_primal``/``_is_tangent``).
- ``node.meta["recompute"]`` (a public :class:`torch.utils.checkpoint.CheckpointPolicy`) and
  ``node.meta["ac_graph_id"]``, which the min-cut of torch 2.11-2.14 reads (see
  ``passes/insert_checkpoints.py``): ``MUST_RECOMPUTE``/``PREFER_RECOMPUTE`` force recompute,
  ``MUST_SAVE`` bans it; a must-recompute node feeding one of a larger ``ac_graph_id`` is saved.
- Inductor's ``compile_fx_inner``, decomposition table and joint-graph passes
  (``_recursive_joint_graph_passes``), for ``fw_compiler="inductor"``.
- ``torch._guards`` (``TracingContext``, ``CompileContext``, ``detect_fake_mode``): to trace a
  "before" copy of a graph inside a compile, and the compile id (``> 0``: a recompile).
- ``torch._dynamo.utils.counters["graph_break"]``: the graph-break counter.
- ``SymInt.node.hint``: a size hint for symbolic shapes in the saved-tensor report.
- ``torch._dynamo.config.ignore_logging_functions``: transformers' ``logger.warning_once`` would
  otherwise break the graph (GPT-2).
- ``OpOverload.is_view``: which saved tensors alias another.
- ``torch._dynamo.config.recompile_limit``, raised for one block (:func:`recompile_limit_at_least`):
  the benchmark compiles one model per method, and past the limit dynamo silently runs eager.
- The profiler's kineto results (:func:`profiler_memory_events`): the per-allocation sizes of a
  ``profile_memory=True`` run have no public accessor.
- Dynamo's source names in ``nn_module_stack`` (``L['self'].layers[0]``, ``getattr(...)``) and
  aot_autograd's ``meta["autograd_backward"]`` / ``meta["partitioner_tag"]`` on nodes the joint
  graph traced for backward.
- ``torch.utils._python_dispatch._get_current_dispatch_mode``: a compiled call inside a
  ``TorchDispatchMode`` (``FlopCounterMode``) would make dynamo skip the frame for good.
- Dynamo caches compiled graphs per code object: :func:`fresh_entry_point` gives a forward a code
  object of its own (so models whose forwards share decorator code do not share one cache).
"""
from __future__ import annotations

import contextlib
import functools
import re
import types
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.utils.checkpoint import CheckpointPolicy  # public; re-exported for the passes

from lors_fx.compiler._torch_versions import (TESTED_TORCH, LoggingFunctionKey,
                                              check_torch_version, torch_at_least)

__all__ = ["TESTED_TORCH", "CheckpointPolicy", "RECOMPUTE_META_KEY", "AC_GRAPH_ID_META_KEY",
           "is_primal", "is_tangent", "must_recompute", "min_cut_partition", "aot_backend",
           "aot_trace", "partition_context", "boxed", "inductor_compiler",
           "inductor_decompositions", "inductor_joint_graph_passes", "graph_break_count",
           "graph_break_reasons", "current_compile_id", "fake_mode_of", "fresh_tracing",
           "size_hint", "is_view_op", "ignore_logging_function", "dynamo_error_types",
           "module_path_from_source", "is_backward_traced", "recompile_limit_at_least",
           "fresh_entry_point", "clone_function", "dispatch_mode_active"]

#: ``node.meta`` key the partitioner reads for the checkpoint policy of a node.
RECOMPUTE_META_KEY = "recompute"
#: ``node.meta`` key naming the checkpoint region of a node (an int, increasing along the forward).
AC_GRAPH_ID_META_KEY = "ac_graph_id"


check_torch_version()  # warns once, on import, outside the tested range


# ---------------------------------------------------------------------------------------------
# Joint graph and partitioner
# ---------------------------------------------------------------------------------------------


def is_primal(node: fx.Node) -> bool:
    """True for a joint graph's forward input placeholder (``primals_*``)."""
    from torch._functorch._aot_autograd.utils import _is_primal

    return _is_primal(node)


def is_tangent(node: fx.Node) -> bool:
    """True for a joint graph's incoming-gradient placeholder (``tangents_*``)."""
    from torch._functorch._aot_autograd.utils import _is_tangent

    return _is_tangent(node)


def must_recompute(node: fx.Node) -> bool:
    """The partitioner's own test: ``MUST_RECOMPUTE`` or ``PREFER_RECOMPUTE``."""
    return node.meta.get(RECOMPUTE_META_KEY) in (CheckpointPolicy.MUST_RECOMPUTE,
                                                 CheckpointPolicy.PREFER_RECOMPUTE)


def min_cut_partition(joint_gm: fx.GraphModule, joint_inputs: Any, *, num_fwd_outputs: int,
                      **kwargs):
    """torch's min-cut rematerialization partitioner: ``(fw_gm, bw_gm)``; kwargs pass through.

    The forward's outputs are the ``num_fwd_outputs`` user outputs, then the values saved for
    backward (tensors, then symbolic ints).
    """
    from torch._functorch.partitioners import min_cut_rematerialization_partition

    return min_cut_rematerialization_partition(joint_gm, joint_inputs,
                                               num_fwd_outputs=num_fwd_outputs, **kwargs)


@contextlib.contextmanager
def partition_context(joint_gm: fx.GraphModule) -> Iterator[None]:
    """Make the joint graph's fake mode visible to the partitioner when it runs outside a compile.

    ``functionalize_rng_ops`` (taken when a recomputed op is seeded-random, e.g. CPU SDPA) calls
    ``detect_fake_mode()``; inside aot_autograd a ``TracingContext`` provides it, but a partition
    run on a copy of the graph (tests, the budget policy's measurements) has none.
    """
    from torch._guards import TracingContext, detect_fake_mode, tracing

    if TracingContext.try_get() is not None:
        yield
        return
    vals = [node.meta.get("val") for node in joint_gm.graph.nodes if node.op == "placeholder"]
    fake_mode = detect_fake_mode(vals)
    if fake_mode is None:
        yield
        return
    with tracing(TracingContext(fake_mode)):
        yield


# ---------------------------------------------------------------------------------------------
# aot_autograd and the fw/bw compilers
# ---------------------------------------------------------------------------------------------


def aot_backend(fw_compiler: Callable, bw_compiler: Optional[Callable] = None,
                partition_fn: Optional[Callable] = None, **kwargs):
    """A ``torch.compile`` backend running aot_autograd with the given compilers/partitioner."""
    from torch._dynamo.backends.common import aot_autograd

    if partition_fn is not None:
        kwargs["partition_fn"] = partition_fn
    return aot_autograd(fw_compiler=fw_compiler, bw_compiler=bw_compiler or fw_compiler, **kwargs)


def aot_trace(gm: fx.GraphModule, example_inputs, *, fw_compiler: Callable,
              partition_fn: Callable, decompositions=None):
    """``aot_module_simplified`` on a dynamo graph: trace the joint graph and partition it.

    Used for the "before" measurement; the caller's ``partition_fn`` may raise to stop there.
    """
    from torch._functorch.aot_autograd import aot_module_simplified

    return aot_module_simplified(gm, example_inputs, fw_compiler=fw_compiler,
                                 bw_compiler=fw_compiler, partition_fn=partition_fn,
                                 decompositions=decompositions)


def boxed(fn: Callable) -> Callable:
    """aot_autograd's calling convention: the compiled callable takes one list of inputs."""
    from torch._functorch.aot_autograd import make_boxed_func

    return make_boxed_func(fn)


def inductor_decompositions() -> dict:
    """The decomposition table inductor expects its input graphs to be lowered with."""
    from torch._inductor.decomposition import select_decomp_table

    return select_decomp_table()


def inductor_joint_graph_passes(joint_gm: fx.GraphModule, joint_inputs) -> fx.GraphModule:
    """Inductor's own joint-graph passes (its pattern rewrites), which its ``partition_fn`` runs
    before the min-cut; returns the graph module to partition (maybe a new one). Without them the
    partition of a whole HF model kept one more logits-sized buffer alive in backward."""
    from torch._inductor.compile_fx import _recursive_joint_graph_passes, get_inputs_devices

    device = next(iter(get_inputs_devices(joint_inputs, joint_gm)), None)
    return _recursive_joint_graph_passes(joint_gm, skip_invoke_subgraph=True, input_device=device)


def inductor_compiler(is_backward: bool) -> Callable:
    """An aot_autograd fw/bw compiler that lowers one partitioned graph with inductor.

    ``compile_fx_inner`` returns a boxed ``OutputCode`` (it takes a list of inputs).
    """
    from torch._inductor.compile_fx import compile_fx_inner

    def compile_graph(gm: fx.GraphModule, example_inputs):
        return compile_fx_inner(gm, example_inputs, is_backward=is_backward)

    return compile_graph


# ---------------------------------------------------------------------------------------------
# Dynamo bookkeeping
# ---------------------------------------------------------------------------------------------


def graph_break_count() -> int:
    """Graph breaks dynamo has counted in this process so far (all compiled functions)."""
    from torch._dynamo.utils import counters

    return int(sum(counters["graph_break"].values()))


def graph_break_reasons() -> dict:
    """``{reason: count}`` of the graph breaks dynamo has counted in this process so far."""
    from torch._dynamo.utils import counters

    return dict(counters["graph_break"])


def current_compile_id() -> Optional[tuple]:
    """``(frame_id, frame_compile_id)`` of the dynamo compile in progress, or None.

    ``frame_compile_id > 0`` means the frame is being recompiled (a guard failed).
    """
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    if compile_id is None:
        return None
    return compile_id.frame_id, compile_id.frame_compile_id


def fake_mode_of(example_inputs) -> Any:
    """The fake mode of the compile in progress (or of fake ``example_inputs``), or None."""
    from torch._guards import TracingContext, detect_fake_mode

    context = TracingContext.try_get()
    if context is not None and context.fake_mode is not None:
        return context.fake_mode
    return detect_fake_mode(example_inputs)


@contextlib.contextmanager
def fresh_tracing(fake_mode: Any) -> Iterator[None]:
    """A new ``TracingContext`` on ``fake_mode``, so a side trace does not touch the real one's
    forward metadata, output strides or guards context."""
    from torch._guards import TracingContext, tracing

    if fake_mode is None:
        yield
        return
    current = TracingContext.try_get()
    context = TracingContext(fake_mode)
    if current is not None:
        # Dynamo's symbolic context per input (which dims are static): without it the side trace
        # would fakeify the inputs with fresh dynamic symbols.
        context.tensor_to_context = current.tensor_to_context
    with tracing(context):
        yield


def size_hint(value: Any) -> Optional[int]:
    """A concrete int for an int or a backed ``SymInt`` (its example value); None if unbacked."""
    if isinstance(value, int):
        return value
    if isinstance(value, torch.SymInt):
        node = value.node
        try:
            if node.has_hint():
                return int(node.hint)
        except Exception:  # an unbacked or otherwise hint-less symbol
            return None
    return None


@functools.lru_cache(maxsize=None)
def dynamo_error_types() -> tuple:
    """Exception types that mean "dynamo/aot could not compile this" (not a user error)."""
    from torch._dynamo.exc import TorchDynamoException

    return (TorchDynamoException,)


def is_view_op(node: fx.Node) -> bool:
    """True for a call of an aten overload that returns a view of its first argument."""
    return (node.op == "call_function" and isinstance(node.target, torch._ops.OpOverload)
            and bool(node.target.is_view))


def ignore_logging_function(function: Callable) -> None:
    """Make dynamo treat calls of ``function`` (a logger method or logging function) as no-ops
    instead of graph breaks (``torch._dynamo.config.ignore_logging_functions``; global). torch
    2.11 writes that set into each compile's JSON log: there a :class:`LoggingFunctionKey`."""
    import torch._dynamo.config as dynamo_config

    ignored = dynamo_config.ignore_logging_functions
    if function not in ignored:
        ignored.add(function if torch_at_least((2, 12)) else LoggingFunctionKey(function))


def specialize_floats():
    """Context in which dynamo bakes Python floats (an adapter's ``scaling``) into the graph as
    constants. Without it, a second model with another ``scaling`` makes dynamo turn the float
    into a graph input (``.item()``) and the rewrite no longer sees a constant scale."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(specialize_float=True)


def dispatch_mode_active() -> bool:
    """True inside a ``TorchDispatchMode`` (``FlopCounterMode``, a debug mode): a compiled call
    there makes dynamo skip the frame for good, so compiled forwards run eagerly instead."""
    from torch.utils._python_dispatch import _get_current_dispatch_mode

    return _get_current_dispatch_mode() is not None


def fsdp_lazy_initialized(model: nn.Module) -> bool:
    """True once an FSDP2-sharded ``model`` has run its first forward (FSDP2's lazy init then
    fixed the root and the parameter groups; groups added later would not be seen)."""
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if callable(get_state) and getattr(get_state(), "_is_root", None) is not None:
            return True
    return False


_GETATTR = re.compile(r"getattr\(([^()]*?),\s*['\"]([^'\"]+)['\"]\)")
_ROOT = re.compile(r"^[LG]\[['\"][^'\"]*['\"]\](\[\d+\])?")


def module_path_from_source(source: str) -> str:
    """Dynamo's module source name -> plain FQN (``L['self'].layers[0]`` -> ``layers.0``)."""
    text = str(source)
    while True:
        new = _GETATTR.sub(r"\1.\2", text)
        if new == text:
            break
        text = new
    text = _ROOT.sub("", text)
    text = re.sub(r"\._modules\[['\"]([^'\"]+)['\"]\]", r".\1", text)
    text = re.sub(r"\[['\"]?([^'\"\]]+)['\"]?\]", r".\1", text)
    return text.strip(".")


def is_backward_traced(node: fx.Node) -> bool:
    """True for a joint-graph node that aot_autograd traced while running the backward.

    torch 2.12+ flags it ``meta["autograd_backward"]``; 2.11 does not, but aot_autograd tags every
    node traced after the forward ``meta["partitioner_tag"] = "is_backward"`` (2.11-2.14)."""
    return bool(node.meta.get("autograd_backward")) or \
        node.meta.get("partitioner_tag") == "is_backward"


def recompile_limit_at_least(limit: int):
    """Context in which dynamo's ``recompile_limit`` is at least ``limit`` (restored on exit).

    Every model compiled on the same forward code recompiles it (new parameters fail the
    guards); past the limit dynamo silently runs the frame eagerly.
    """
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(recompile_limit=max(dynamo_config.recompile_limit, int(limit)))


def profiler_memory_events(prof, device_type: Optional[str] = None) -> list:
    """``[(start ns, bytes)]`` of the allocator events (frees negative) a
    ``torch.profiler.profile(profile_memory=True)`` recorded, in time order; ``device_type``
    (e.g. ``"CPU"``) keeps one device's events."""
    return sorted((event.start_ns(), event.nbytes())
                  for event in prof.profiler.kineto_results.events()
                  if event.name() == "[memory]"
                  and (device_type is None or str(event.device_type()).endswith(device_type)))


def fresh_entry_point(forward: Callable) -> Callable:
    """``forward`` (a bound method) re-bound to a copy of its function with its own code object.

    Dynamo keeps its compiled-graph cache (and recompile limit) per code object. HF forwards of
    different models share decorator wrappers' code, so compiling them directly would pile every
    model's graphs onto one cache (and count them as recompiles of one another). The copy keeps
    the same frame structure, so graph breaks are counted as for the original. Anything that is
    not a plain bound method gets a one-line trampoline with a fresh code object instead.
    """
    function, owner = getattr(forward, "__func__", None), getattr(forward, "__self__", None)
    if isinstance(function, types.FunctionType) and owner is not None:
        return types.MethodType(clone_function(function), owner)
    namespace = {"_lors_forward": forward}
    exec("def lors_compiled_forward(*args, **kwargs):\n"  # noqa: S102 - a fixed source
         "    return _lors_forward(*args, **kwargs)\n", namespace)
    return namespace["lors_compiled_forward"]


def clone_function(function: types.FunctionType) -> types.FunctionType:
    """``function`` with a code object of its own (same globals, defaults and closure)."""
    clone = types.FunctionType(function.__code__.replace(), function.__globals__,
                               function.__name__, function.__defaults__, function.__closure__)
    clone.__kwdefaults__ = function.__kwdefaults__
    functools.update_wrapper(clone, function)
    return clone
