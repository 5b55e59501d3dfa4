"""Every private torch API that lors_fx uses, in one small module.

Tested torch range: **2.13.x** (pinned in ``pyproject.toml``). On import outside that range we warn
once: the names below live in ``torch._functorch``, ``torch._dynamo``, ``torch._inductor`` and
``torch._guards``, which carry no stability promise, so a new torch may move or change them. When
that happens this is the only file to fix.

What is used, and why:

- aot_autograd (``torch._dynamo.backends.common.aot_autograd``) and ``make_boxed_func``: the
  backend's forward/backward split.
- The min-cut partitioner (``torch._functorch.partitioners.min_cut_rematerialization_partition``)
  and the joint graph's ``primals_*``/``tangents_*`` naming (``_is_primal``/``_is_tangent``).
- ``node.meta["recompute"]`` (a public :class:`torch.utils.checkpoint.CheckpointPolicy`) and
  ``node.meta["ac_graph_id"]``, which torch 2.13's min-cut reads (see
  ``passes/insert_checkpoints.py``): ``MUST_RECOMPUTE``/``PREFER_RECOMPUTE`` force recompute,
  ``MUST_SAVE`` bans it; a must-recompute node feeding one of a larger ``ac_graph_id`` is saved.
- Inductor's ``compile_fx_inner`` and decomposition table, for ``fw_compiler="inductor"``.
- ``torch._guards`` (``TracingContext``, ``CompileContext``, ``detect_fake_mode``): to trace a second
  ("before") copy of a graph inside a compile without disturbing the real one, and to read the
  compile id (``frame_compile_id > 0`` is a recompile).
- ``torch._dynamo.utils.counters["graph_break"]``: the graph-break counter.
- ``SymInt.node.hint``: a size hint for symbolic shapes in the saved-tensor report.
- ``torch._dynamo.config.ignore_logging_functions``: transformers' ``logger.warning_once`` would
  otherwise break the graph (GPT-2).
- ``OpOverload.is_view``: which saved tensors alias another.
"""
from __future__ import annotations

import contextlib
import functools
import warnings
from typing import Any, Callable, Iterator, Optional

import torch
from torch import fx, nn
from torch.utils.checkpoint import CheckpointPolicy  # public; re-exported for the passes

__all__ = [
    "TESTED_TORCH",
    "CheckpointPolicy",
    "RECOMPUTE_META_KEY",
    "AC_GRAPH_ID_META_KEY",
    "is_primal",
    "is_tangent",
    "must_recompute",
    "min_cut_partition",
    "aot_backend",
    "aot_trace",
    "partition_context",
    "boxed",
    "inductor_compiler",
    "inductor_decompositions",
    "graph_break_count",
    "graph_break_reasons",
    "current_compile_id",
    "fake_mode_of",
    "fresh_tracing",
    "size_hint",
    "is_view_op",
    "ignore_logging_function",
    "dynamo_error_types",
]

#: The torch minor version lors_fx is tested against.
TESTED_TORCH = (2, 13)
#: ``node.meta`` key the partitioner reads for the checkpoint policy of a node.
RECOMPUTE_META_KEY = "recompute"
#: ``node.meta`` key naming the checkpoint region of a node (an int, increasing along the forward).
AC_GRAPH_ID_META_KEY = "ac_graph_id"


def _check_torch_version() -> None:
    parts = torch.__version__.split("+")[0].split(".")
    try:
        version = (int(parts[0]), int(parts[1]))
    except (IndexError, ValueError):
        version = None
    if version != TESTED_TORCH:
        warnings.warn(f"lors_fx is tested with torch {TESTED_TORCH[0]}.{TESTED_TORCH[1]}.x, found "
                      f"{torch.__version__}: the compiled path uses private torch APIs "
                      "(lors_fx/_torch_private.py) that may have changed", RuntimeWarning,
                      stacklevel=2)


_check_torch_version()


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
    instead of graph breaks (``torch._dynamo.config.ignore_logging_functions``; global)."""
    import torch._dynamo.config as dynamo_config

    dynamo_config.ignore_logging_functions.add(function)


def specialize_floats():
    """Context in which dynamo bakes Python floats (an adapter's ``scaling``) into the graph as
    constants. Without it, a second model with another ``scaling`` makes dynamo turn the float
    into a graph input (``.item()``) and the rewrite no longer sees a constant scale."""
    import torch._dynamo.config as dynamo_config

    return dynamo_config.patch(specialize_float=True)


def fsdp_lazy_initialized(model: nn.Module) -> bool:
    """True once an FSDP2-sharded ``model`` has run its first forward (FSDP2's lazy init then
    fixed the root and the parameter groups; groups added later would not be seen)."""
    for module in model.modules():
        get_state = getattr(module, "_get_fsdp_state", None)
        if callable(get_state) and getattr(get_state(), "_is_root", None) is not None:
            return True
    return False
