"""What the compiler records: per dynamo graph (:class:`GraphRecord`) and per model
(:class:`LorsCompileState`, kept in the model's :class:`lors_fx.state.LorsState` as ``compiled``)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

from torch import fx, nn

from lors_fx.config import LorsConfig
from lors_fx.passes.manager import PassResult, SparseSite
from lors_fx.state import state_of

__all__ = ["GraphRecord", "LorsCompileState", "compile_state_of", "is_compiled"]


@dataclass
class GraphRecord:
    """What the backend did to one dynamo graph."""

    index: int
    compile_id: Optional[tuple] = None      # (frame_id, frame_compile_id)
    recompile: bool = False
    passes: List[PassResult] = field(default_factory=list)        # forward passes
    joint_passes: List[PassResult] = field(default_factory=list)  # on the joint graph
    sites: Dict[str, SparseSite] = field(default_factory=dict)
    saved_before: Optional[PassResult] = None
    saved_after: Optional[PassResult] = None
    dynamo_graph: Optional[fx.GraphModule] = None   # after the forward passes
    forward: Optional[fx.GraphModule] = None        # partitioned (or inference) forward
    backward: Optional[fx.GraphModule] = None
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    #: what ran each partitioned graph: ``{"forward": "inductor"|"eager", "backward": ...}``
    compilers: Dict[str, str] = field(default_factory=dict)
    #: why a graph runs eagerly although inductor was asked for or "auto"
    compiler_notes: List[str] = field(default_factory=list)
    #: the "lower" passes on each graph inductor compiled (``{"forward": [...], "backward": ...}``)
    #: and the graphs it compiled (``forward``/``backward`` above are before them)
    lower_passes: Dict[str, List[PassResult]] = field(default_factory=dict)
    lowered: Dict[str, fx.GraphModule] = field(default_factory=dict)


@dataclass
class LorsCompileState:
    """Everything the backend and :func:`compile_model` recorded for one model (or backend)."""

    config: Optional[LorsConfig] = None
    graphs: List[GraphRecord] = field(default_factory=list)
    graph_breaks: int = 0
    graph_break_reasons: Dict[str, int] = field(default_factory=dict)
    fallback: Optional[str] = None        # why the model runs the eager op path, if it does
    notes: List[str] = field(default_factory=list)
    original_forward: Optional[Callable] = None
    compiled_roots: List[nn.Module] = field(default_factory=list)  # blocks compiled one by one
    use_cache: Optional[bool] = None  # the HF config's use_cache before compile (restored)

    @property
    def compile_seconds(self) -> float:
        """Backend time over every graph: passes, partition, the "before" report and the
        fw compiler (inductor compiles the backward graph lazily, at the first backward)."""
        return sum(record.seconds for record in self.graphs)

    @property
    def recompiles(self) -> int:
        """Graphs compiled because a guard of an already compiled frame failed."""
        return sum(record.recompile for record in self.graphs)

    def __deepcopy__(self, memo):
        # A deep copy of a compiled model is an uncompiled-looking copy: GraphModules hold fake
        # tensors and the original forward is bound to the old model, so share nothing.
        return LorsCompileState(config=self.config, notes=list(self.notes) +
                                ["copied from a compiled model: the copy runs uncompiled"])


def compile_state_of(model: nn.Module) -> Optional[LorsCompileState]:
    """The compiler's record for ``model`` (None when it was never compiled)."""
    state = state_of(model)
    return None if state is None else state.compiled


def is_compiled(model: nn.Module) -> bool:
    """True while ``model``'s forward is the compiled one (:func:`compile_model` and not undone)."""
    compiled = compile_state_of(model)
    return compiled is not None and compiled.original_forward is not None
