"""A tiny pass manager: run graph passes in order, validate after each, record what changed.

A pass is a function ``(gm: torch.fx.GraphModule, ctx: PassContext) -> PassResult``. It mutates
``gm.graph`` in place and returns how many things it changed (``count``: sites annotated, matches
rewritten, nodes tagged...). The manager times it, counts the nodes it created and erased, and
after each pass runs ``graph.lint()`` and ``gm.recompile()`` so a broken graph fails at the pass
that broke it, not three passes later.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence

from torch import fx, nn

__all__ = ["PassContext", "PassResult", "SparseSite", "GraphPass", "run_passes", "SITE_META_KEY",
           "RegisteredPass", "PASSES", "STAGES", "register_pass", "passes_for"]

#: ``node.meta`` key under which annotate_sparse_linears stores a :class:`SparseSite`.
SITE_META_KEY = "lors_site"


@dataclass
class SparseSite:
    """A linear call whose weight is sparse: what the report and the rewrite need to know (for a
    quantized base also its bits, group size and quantization-aware flag)."""

    fqn: str                       # module qualified name, from nn_module_stack
    shape: tuple                   # weight (d_out, d_in)
    sparsity: float                # fraction of zeros
    pattern: str                   # "unstructured" | "N:M" | "dense"
    rank: Optional[int] = None     # adapter rank, once known
    grad_mode: Optional[str] = None
    rewritten: bool = False        # replaced by the lors op
    # a quantized base (lors_fx.quantized): sparsity and pattern are the codes' (M = Q != 0)
    bits: Optional[int] = None            # code width, 4 or 8; None for a float weight
    group_size: Optional[int] = None      # inputs per scale
    quant_aware: Optional[bool] = None    # the op's quantization-aware forward (Q(W'))


@dataclass
class PassContext:
    """What passes share: the config, the root module (real weights by FQN) and the sites found.

    ``model`` may be None for hand-built graphs; passes then read weights from placeholders'
    ``meta["val"]``/``meta["example_value"]`` or ``get_attr`` targets.
    """

    config: Any = None
    model: Optional[nn.Module] = None
    sites: Dict[str, SparseSite] = field(default_factory=dict)
    notes: List[str] = field(default_factory=list)
    extra: Dict[str, Any] = field(default_factory=dict)


@dataclass
class PassResult:
    """What one pass did. ``count`` is the pass's own measure of change (0 = nothing to do)."""

    name: str
    count: int = 0
    nodes_created: int = 0
    nodes_erased: int = 0
    seconds: float = 0.0
    details: Dict[str, Any] = field(default_factory=dict)

    @property
    def changed(self) -> bool:
        return bool(self.count or self.nodes_created or self.nodes_erased)


GraphPass = Callable[[fx.GraphModule, PassContext], PassResult]

#: Where a pass runs: ``"forward"`` on dynamo's torch-IR graph before aot_autograd, ``"joint"`` on
#: the joint forward+backward graph before the partitioner, ``"report"`` on the partitioned forward,
#: ``"lower"`` on each partitioned graph (forward and backward) that goes to inductor.
STAGES = ("forward", "joint", "report", "lower")


@dataclass(frozen=True)
class RegisteredPass:
    """A pass in :data:`PASSES`: its stage, its place in the stage, and when a config enables it."""

    name: str
    stage: str
    order: int
    function: GraphPass
    enabled: Callable[[Any], bool]


#: Every pass of the package by name (filled by :func:`register_pass` as the modules import).
PASSES: Dict[str, RegisteredPass] = {}


def register_pass(stage: str, order: int, enabled: Optional[Callable[[Any], bool]] = None):
    """Decorator: add a pass to :data:`PASSES` under its function name.

    ``order`` sorts the passes of one stage; ``enabled(config)`` (default: always) says whether a
    :class:`~lors_fx.LorsConfig` (or None) turns the pass on in :func:`passes_for`.
    """
    if stage not in STAGES:
        raise ValueError(f"register_pass: stage must be one of {STAGES}, got {stage!r}")

    def decorate(function: GraphPass) -> GraphPass:
        name = function.__name__
        if name in PASSES and PASSES[name].function is not function:
            raise ValueError(f"register_pass: a pass named {name!r} is already registered")
        PASSES[name] = RegisteredPass(name, stage, order, function,
                                      enabled if enabled is not None else (lambda config: True))
        return function

    return decorate


def passes_for(stage: str, config: Any = None) -> List[GraphPass]:
    """The registered passes of ``stage`` that ``config`` enables, in order."""
    chosen = sorted((p for p in PASSES.values() if p.stage == stage and p.enabled(config)),
                    key=lambda p: p.order)
    return [p.function for p in chosen]


def run_passes(gm: fx.GraphModule, passes: Sequence[GraphPass], ctx: PassContext,
               *, validate: bool = True) -> List[PassResult]:
    """Run ``passes`` on ``gm`` in order; return one :class:`PassResult` per pass.

    Node counts come from node identity before and after, so a pass need not count them itself.
    With ``validate`` the graph is linted and recompiled after every pass; an error names the pass.
    """
    results = []
    for graph_pass in passes:
        name = getattr(graph_pass, "__name__", type(graph_pass).__name__)
        before = set(gm.graph.nodes)
        start = time.perf_counter()
        result = graph_pass(gm, ctx)
        if not isinstance(result, PassResult):
            raise TypeError(f"pass {name} returned {type(result).__name__}, not PassResult")
        if validate:
            try:
                gm.graph.lint()
                gm.recompile()
            except Exception as error:  # re-raised with the pass's name
                raise RuntimeError(f"pass {name} left an invalid graph: {error}") from error
        result.seconds = time.perf_counter() - start
        after = set(gm.graph.nodes)
        result.name = result.name or name
        result.nodes_created = len(after - before)
        result.nodes_erased = len(before - after)
        results.append(result)
    return results
