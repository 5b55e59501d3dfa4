"""``report(model)``: what lors_fx did to a model, as tables (``str``) or JSON (``to_dict``).

Sites come from the adapter modules (every model) and from the compiled graphs (whether the
rewrite reached them); saved-for-backward bytes, pass timings, graphs, graph breaks and
recompiles come from the compile state :func:`lors_fx.compiler.compile_model` records. For an
uncompiled model, or a compiled one that has not run a training step yet, those are unknown
(``None``) and the report says so. A site on a quantized base shows its bits and group size in
the ``base`` column (``int4 g16``, ``QA`` when its adapter is quantization-aware).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Dict, List, Optional

from torch import fx, nn

from lors_fx.adapters import lors_modules
from lors_fx.compiler.state import compile_state_of
from lors_fx.passes.manager import SparseSite
from lors_fx.sparsity import pattern_of, sparsity_of

__all__ = ["LorsReport", "report", "base_text"]

_SITE_HEADERS = ["module", "shape", "sparsity", "pattern", "rank", "grad_mode", "rewritten",
                 "base"]


@dataclass
class LorsReport:
    """The state of a LoRS model. ``saved_bytes_*`` count non-parameter saved tensors (parameters
    are alive anyway), summed over the latest compile of each compiled frame."""

    sites: List[SparseSite] = field(default_factory=list)
    passes: List[Dict[str, Any]] = field(default_factory=list)
    saved_bytes_before: Optional[int] = None
    saved_bytes_after: Optional[int] = None
    saved_before: List[Dict[str, Any]] = field(default_factory=list)
    saved_after: List[Dict[str, Any]] = field(default_factory=list)
    graphs: List[Dict[str, Any]] = field(default_factory=list)  # index, forward, backward
    graph_breaks: Optional[int] = None
    recompiles: Optional[int] = None
    compiled: bool = False
    fallback: Optional[str] = None
    #: ``{"forward": ..., "backward": ...}`` compiler of each graph (index -> dict)
    compilers: Dict[int, Dict[str, str]] = field(default_factory=dict)
    #: backend seconds over all graphs (passes, partition, report, forward compile)
    compile_seconds: Optional[float] = None
    notes: List[str] = field(default_factory=list)

    @property
    def rewritten(self) -> int:
        """Sites replaced by the lors op in a compiled graph."""
        return sum(site.rewritten for site in self.sites)

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready: everything but the GraphModules (given as node counts)."""
        graphs = [{"index": g["index"],
                   "forward_nodes": _node_count(g.get("forward")),
                   "backward_nodes": _node_count(g.get("backward"))} for g in self.graphs]
        return {"compiled": self.compiled, "fallback": self.fallback,
                "sites": [_site_dict(site) for site in self.sites], "passes": list(self.passes),
                "saved_bytes_before": self.saved_bytes_before,
                "saved_bytes_after": self.saved_bytes_after,
                "saved_before": [_row_dict(r) for r in self.saved_before],
                "saved_after": [_row_dict(r) for r in self.saved_after],
                "graphs": graphs, "graph_breaks": self.graph_breaks,
                "recompiles": self.recompiles,
                "compilers": {str(k): v for k, v in self.compilers.items()},
                "compile_seconds": self.compile_seconds, "notes": list(self.notes)}

    def __str__(self) -> str:
        from tabulate import tabulate

        parts = []
        rows = [[s.fqn, "x".join(map(str, s.shape)), f"{s.sparsity:.3f}", s.pattern, s.rank,
                 s.grad_mode, "yes" if s.rewritten else "no",
                 base_text(s.bits, s.group_size, s.quant_aware)] for s in self.sites]
        parts.append(f"LoRS sites: {len(self.sites)} ({self.rewritten} rewritten to the lors op)")
        parts.append(tabulate(rows, headers=_SITE_HEADERS, tablefmt="simple"))
        if self.passes:
            rows = [[p["graph"], p["name"], p["count"], p["nodes_created"], p["nodes_erased"],
                     f"{p['seconds'] * 1e3:.1f}"] for p in self.passes]
            parts.append(tabulate(rows, headers=["graph", "pass", "count", "created", "erased",
                                                 "ms"], tablefmt="simple"))
        parts.append("saved for backward (non-parameter): before "
                     f"{_mib(self.saved_bytes_before)}, after {_mib(self.saved_bytes_after)}")
        if self.saved_after:
            # parameters are alive anyway: list what the saving costs, count the rest
            shown = [r for r in self.saved_after if r["kind"] != "parameter"]
            rows = [[r["graph"], r["name"], r["kind"], "x".join(map(str, r["shape"])), r["dtype"],
                     r["bytes"], r.get("view_of") or ""] for r in shown]
            parts.append(tabulate(rows, headers=["graph", "saved (after)", "kind", "shape",
                                                 "dtype", "bytes", "view of"], tablefmt="simple")
                         + f"\n({len(self.saved_after) - len(shown)} saved parameters omitted)")
        parts.append(f"graphs: {len(self.graphs)}, graph breaks: {_or_unknown(self.graph_breaks)}"
                     f", recompiles: {_or_unknown(self.recompiles)}"
                     + (f", compile time {self.compile_seconds:.1f} s"
                        if self.compile_seconds is not None else ""))
        if self.compilers:
            kinds = sorted({f"{c.get('forward', '?')}/{c.get('backward', '?')}"
                            for c in self.compilers.values()})
            parts.append(f"compilers (forward/backward): {', '.join(kinds)}")
        if self.fallback:
            parts.append(f"fallback to the eager op path: {self.fallback}")
        parts.extend(f"note: {note}" for note in self.notes)
        return "\n\n".join(parts)


def base_text(bits: Optional[int], group_size: Optional[int], quant_aware: Optional[bool]) -> str:
    """A site's base in a table: ``"float"``, or a quantized one as ``"int4 g16"`` (``" QA"``
    added when its adapter is quantization-aware)."""
    if bits is None:
        return "float"
    group = f" g{group_size}" if group_size else ""
    return f"int{bits}{group}{' QA' if quant_aware else ''}"


def _node_count(gm: Optional[fx.GraphModule]) -> Optional[int]:
    return None if gm is None else len(gm.graph.nodes)


def _site_dict(site: SparseSite) -> Dict[str, Any]:
    data = asdict(site)
    data["shape"] = list(site.shape)
    return data


def _row_dict(row: Dict[str, Any]) -> Dict[str, Any]:
    return {**row, "shape": [d if isinstance(d, int) else str(d) for d in row["shape"]]}


def _mib(value: Optional[int]) -> str:
    return "unknown" if value is None else f"{value} B ({value / 2**20:.3f} MiB)"


def _or_unknown(value: Optional[int]) -> str:
    return "unknown" if value is None else str(value)


def _module_sites(model: nn.Module) -> Dict[str, SparseSite]:
    sites = {}
    for fqn, module in lors_modules(model).items():
        weight = module.true_weight().detach()
        meta = weight.device.type == "meta"
        sites[fqn] = SparseSite(fqn=fqn, shape=tuple(weight.shape),
                                sparsity=0.0 if meta else sparsity_of(weight),
                                pattern="meta" if meta else pattern_of(weight),
                                rank=module.r, grad_mode=module.grad_mode, rewritten=False,
                                bits=getattr(module, "bits", None),
                                group_size=getattr(module, "group_size", None),
                                quant_aware=getattr(module, "quant_aware", None))
    return sites


def _latest_per_frame(graphs: list) -> list:
    """The most recent compile of each frame (older ones are replaced by recompiles)."""
    latest: Dict[Any, Any] = {}
    for record in graphs:
        frame = record.compile_id[0] if record.compile_id else ("graph", record.index)
        latest[frame] = record
    return sorted(latest.values(), key=lambda r: r.index)


def report(model: nn.Module) -> LorsReport:
    """Describe ``model``'s LoRS sites, passes, saved tensors, graphs, breaks and recompiles."""
    result = LorsReport()
    sites = _module_sites(model)
    state = compile_state_of(model)
    if state is None:
        result.sites = list(sites.values())
        result.notes.append("not compiled (eager op path): saved-for-backward bytes, passes and "
                            "graphs are unknown")
        return result
    result.compiled = state.original_forward is not None and state.fallback is None
    result.fallback = state.fallback
    result.graph_breaks = state.graph_breaks
    result.recompiles = state.recompiles
    result.compile_seconds = state.compile_seconds
    result.notes.extend(state.notes)
    for record in state.graphs:
        for fqn, site in record.sites.items():
            known = sites.get(fqn)
            if known is None:  # a sparse linear without an adapter (or a converted PEFT one)
                sites[fqn] = SparseSite(**asdict(site))
            elif site.rewritten:
                known.rewritten = True
        lowered = [(f"{r.name} ({part})", r) for part, results in record.lower_passes.items()
                   for r in results]
        for name, result_ in [(r.name, r) for r in record.passes + record.joint_passes] + lowered:
            result.passes.append({"graph": record.index, "name": name,
                                  "count": result_.count, "nodes_created": result_.nodes_created,
                                  "nodes_erased": result_.nodes_erased,
                                  "seconds": result_.seconds})
        result.graphs.append({"index": record.index, "forward": record.forward,
                              "backward": record.backward})
        if record.compilers:
            result.compilers[record.index] = dict(record.compilers)
        result.notes.extend(f"graph {record.index}: {note}"
                            for note in record.notes + record.compiler_notes)
    result.sites = list(sites.values())
    training = [r for r in _latest_per_frame(state.graphs) if r.saved_after is not None]
    if not training:
        result.notes.append("no training graph compiled yet: run one training step (a forward "
                            "with gradients enabled) to measure saved-for-backward bytes")
        return result
    result.saved_bytes_after = sum(r.saved_after.details["saved_bytes"] for r in training)
    for record in training:
        result.saved_after.extend({"graph": record.index, **row}
                                  for row in record.saved_after.details["rows"])
    if all(r.saved_before is not None for r in training):
        result.saved_bytes_before = sum(r.saved_before.details["saved_bytes"] for r in training)
        for record in training:
            result.saved_before.extend({"graph": record.index, **row}
                                       for row in record.saved_before.details["rows"])
    else:
        result.notes.append("saved bytes before the rewrite not measured (report_before=False, "
                            "or the side trace failed: see the graph notes)")
    return result
