"""The engine of ``lors-fx inspect``: the inspection run (build, prune, quantize on request,
optimize, compile, one training step, report), the theoretical saved bytes, the "before" graph
capture, readable graph code and diffs (models are built by :mod:`lors_fx.testing.tiny_models`;
the rewritten region is drawn by :mod:`lors_fx.cli.inspect_dot`).

With ``bits`` (``--bits 4|8 [--group-size G]``) the pruned model is quantized round-to-nearest
(:func:`lors_fx.quantized.quantize_model`, sparsity-aware: pruned weights stay code 0) before
:func:`lors_fx.optimize`, so its sites are ``LorsQuantLinear`` s and the rewrite emits
``lors::quant_lora_linear``; a model that is already quantized is used as it is. The formula
below holds for a quantized site too: the naive form's ``W'`` and mask are dense in the compute
dtype whatever the codes' width, and the op saves ``x`` only.

Theoretical saved-for-backward bytes of one target linear (weight ``d_out x d_in``, ``T = batch *
seq`` tokens, ``e`` bytes per element of the compute dtype), what autograd keeps between forward
and backward for it, parameters not counted (they are alive anyway)::

    naive masked form, y = x @ (W + s*(B@A)*M).T:  x + W' + M = T*d_in*e + d_out*d_in*(e + 1)
    LoRS (lors op, recompute=True):                x          = T*d_in*e

(``M`` is the bool mask ``W != 0``, one byte per element; ``W'`` is rebuilt in backward by the op.)
Per site, not deduplicated: projections that read the same ``x`` (q/k/v, gate/up) count it once
each, so the totals are an upper bound for both forms; the difference, ``W' + M`` per site, is
exact. On the meta device there are no values: every target linear is treated as pruned to the
requested sparsity/pattern and only these theoretical numbers are reported.
"""
from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx, nn

from lors_fx.api import optimize
from lors_fx.cli.inspect_code import (CAPTURE_PASS_NAME, CaptureBefore, display_code,
                                      readable_code, readable_names, unified_diff)
from lors_fx.compiler import compile_model, compile_state_of, default_forward_passes, report
from lors_fx.config import LorsConfig
from lors_fx.quant import QuantSpec
from lors_fx.quantized import is_quantized_model, quantize_model, quantized_modules
from lors_fx.sparsity import sparsity_of
from lors_fx.testing.tiny_models import UnknownModel, load_named_model, prune_, random_batch
from lors_fx.testing.tiny_models import resolve_model as resolve_named
from lors_fx.testing.tiny_models import target_linears

__all__ = ["BadArgument", "theoretical_bytes", "CaptureBefore", "readable_code", "unified_diff",
           "Inspection", "run_inspection"]


class BadArgument(ValueError):
    """A command-line argument that cannot be used (exit code 2)."""


def resolve_model(name: str) -> Tuple[str, str]:
    """:func:`lors_fx.testing.tiny_models.resolve_model`, raising :class:`BadArgument` on a bad name."""
    try:
        return resolve_named(name)
    except UnknownModel as error:
        raise BadArgument(str(error)) from None


def theoretical_bytes(shape: Tuple[int, int], tokens: int, element_size: int) -> Dict[str, int]:
    """Saved-for-backward bytes of one site (module docstring): ``x``, ``w_eff``, ``mask``,
    ``naive`` (= x + W' + mask) and ``lors`` (= x)."""
    d_out, d_in = shape
    x = tokens * d_in * element_size
    w_eff = d_out * d_in * element_size
    mask = d_out * d_in  # torch.bool: one byte per element
    return {"x": x, "w_eff": w_eff, "mask": mask, "naive": x + w_eff + mask, "lors": x}


# ---------------------------------------------------------------------------------------------
# The inspection run
# ---------------------------------------------------------------------------------------------


@dataclass
class Inspection:
    """What one ``lors-fx inspect`` run produced: ``data`` (the JSON document, keys in
    :mod:`lors_fx.cli.inspect`), the ``model`` and the GraphModules (``before``/``after``: the
    first dynamo graph before/after the forward passes; ``forward``/``backward``: the first
    training graph's partitioned graphs)."""

    data: Dict[str, Any]
    model: nn.Module
    graphs: Dict[str, Optional[fx.GraphModule]] = field(default_factory=dict)


class _Stages:
    """A tqdm bar over the run's stages (on stderr) that also times each stage."""

    def __init__(self, names: List[str], progress: bool):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=len(names), desc="lors-fx inspect", unit="stage", file=sys.stderr,
                        disable=not progress, leave=False)
        self.seconds: Dict[str, float] = {}

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.bar.set_description(f"lors-fx inspect: {name}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = round(time.perf_counter() - start, 4)
            self.bar.update(1)

    def close(self):
        self.bar.close()


def _pattern_text(sparsity: Optional[float], pattern: Optional[str]) -> Tuple[float, str]:
    if pattern:
        n, m = (int(v) for v in pattern.split(":"))
        return 1.0 - n / m, pattern
    return (0.5 if sparsity is None else sparsity), "unstructured"


def _max_positions(model: nn.Module) -> Optional[int]:
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int):
            return value
    return None


def _prune_or_keep(model, config, sparsity, pattern, notes) -> Dict[str, Any]:
    """Magnitude-prune a dense model as requested; keep an already sparse (or quantized) one as
    it is."""
    if is_quantized_model(model):
        if sparsity is not None or pattern is not None:
            notes.append("--sparsity/--pattern ignored: the model is already quantized")
        return {"applied": False, "method": None, "sparsity": None, "pattern": None,
                "note": "quantized model: its zero codes are the sparsity, used as it is"}
    targets = dict(target_linears(model, config.exclude_modules))
    modules = dict(model.named_modules())
    current = [sparsity_of(modules[name].weight.detach()) for name in targets]
    target_sparsity, pattern_name = _pattern_text(sparsity, pattern)
    if current and min(current) >= config.min_sparsity:
        note = (f"already sparse (mean sparsity {sum(current) / len(current):.3f} over "
                f"{len(current)} target linears): used as it is")
        if sparsity is not None or pattern is not None:
            notes.append("--sparsity/--pattern ignored: the model is already sparse")
        return {"applied": False, "method": None, "sparsity": None, "pattern": None,
                "note": note}
    prune_(model, pattern=pattern, sparsity=None if pattern else target_sparsity,
           exclude=tuple(config.exclude_modules))
    what = f"{target_sparsity:.0%} unstructured per output row" if not pattern else \
        f"{pattern} along the input dim"
    return {"applied": True, "method": "magnitude", "sparsity": target_sparsity,
            "pattern": pattern_name, "note": f"dense model pruned on the fly by magnitude to "
                                             f"{what} ({len(targets)} target linears)"}


def _spec_text(spec: QuantSpec) -> str:
    group = "one scale per row" if spec.group_size is None else f"group {spec.group_size}"
    return f"int{spec.bits}, {group}"


def _quantize(model, config, spec: Optional[QuantSpec], stage, notes) -> Dict[str, Any]:
    """Quantize the pruned model round-to-nearest as requested (``spec``); keep an already
    quantized one as it is. Returns the ``quantization`` entry of the JSON."""
    entry = {"applied": False, "method": None, "bits": None, "group_size": None,
             "quant_aware": config.quant_aware, "note": "float base (no --bits)"}
    present = quantized_modules(model)
    if present:
        first = next(iter(present.values()))
        if spec is not None:
            notes.append("--bits/--group-size ignored: the model is already quantized")
        return {**entry, "bits": first.bits, "group_size": first.group_size,
                "note": f"already quantized ({len(present)} linears, e.g. int{first.bits}, "
                        f"group {first.group_size}): used as it is"}
    if spec is None:
        return entry
    with stage("quantize"):
        try:
            names = quantize_model(model, spec, exclude=tuple(config.exclude_modules))
        except ValueError as error:
            raise BadArgument(f"--bits/--group-size: {error}") from None
    return {**entry, "applied": True, "method": "round-to-nearest", "bits": spec.bits,
            "group_size": spec.group_size,
            "note": f"quantized round-to-nearest to {_spec_text(spec)} ({len(names)} linears; "
                    f"pruned weights stay code 0)" + (", quantization-aware adapters"
                                                      if config.quant_aware else "")}


def _theoretical_sites(model, config, sparsity, pattern, tokens, element_size, spec=None):
    target_sparsity, pattern_name = _pattern_text(sparsity, pattern)
    quant = {"bits": None, "group_size": None, "quant_aware": None} if spec is None else {
        "bits": spec.bits, "group_size": spec.group_size, "quant_aware": config.quant_aware}
    sites = []
    for fqn, shape in target_linears(model, config.exclude_modules):
        if config.r > min(shape):
            raise ValueError(f"r={config.r} exceeds min(d_in, d_out)={min(shape)} of {fqn}")
        numbers = theoretical_bytes(shape, tokens, element_size)
        sites.append({"fqn": fqn, "shape": list(shape), "sparsity": target_sparsity,
                      "pattern": pattern_name, "rank": config.r, "grad_mode": config.grad_mode,
                      "rewritten": None, **quant, "naive_saved_bytes": numbers["naive"],
                      "lors_saved_bytes": numbers["lors"]})
    return sites


def _theoretical_rows(sites, batch, seq, dtype_name) -> Tuple[list, list]:
    before, after = [], []
    for site in sites:
        d_out, d_in = site["shape"]
        x = {"graph": None, "name": f"{site['fqn']}: x", "source": site["fqn"],
             "shape": [batch, seq, d_in], "dtype": dtype_name,
             "bytes": site["lors_saved_bytes"], "kind": "activation", "view_of": None}
        w_bytes = (site["naive_saved_bytes"] - site["lors_saved_bytes"]) - d_out * d_in
        before += [x, {**x, "name": f"{site['fqn']}: W'", "shape": [d_out, d_in],
                       "bytes": w_bytes},
                   {**x, "name": f"{site['fqn']}: mask", "shape": [d_out, d_in],
                    "dtype": "bool", "bytes": d_out * d_in}]
        after.append(dict(x))
    return before, after


def _forward_passes(config, capture: CaptureBefore) -> list:
    passes = list(default_forward_passes(config))
    names = [getattr(p, "__name__", "") for p in passes]
    at = names.index("annotate_sparse_linears") + 1 if "annotate_sparse_linears" in names else 0
    return passes[:at] + [capture] + passes[at:]


def _training_step(model, batch, seq, stage) -> None:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None) or 128
    inputs = random_batch(batch, seq, seed=0, vocab_size=vocab)
    with stage("compile + forward"):
        loss = model(**inputs).loss
    with stage("backward"):
        loss.backward()


def _training_records(model) -> list:
    state = compile_state_of(model)
    return [] if state is None else [r for r in state.graphs if r.backward is not None]


def _joined(records, attribute: str) -> Optional[str]:
    """Each record's ``attribute`` graph as code: the one inductor compiled (after the "lower"
    passes) where there is one, else the partitioned graph."""
    parts = []
    for r in records:
        lowered = r.lowered.get(attribute)
        graph = lowered if lowered is not None else getattr(r, attribute)
        if graph is not None:
            how = " (lowered for inductor: lower_lors_ops)" if lowered is not None else ""
            parts.append(f"# graph {r.index}: {attribute}{how}\n" + display_code(graph))
    return "\n".join(parts) if parts else None


def run_inspection(kind: str, value: str, *, name: str, sparsity: Optional[float] = None,
                   pattern: Optional[str] = None, r: int = 16, grad_mode: str = "lors",
                   checkpoint: str = "none", batch: int = 2, seq: int = 64,
                   dtype: str = "float32", meta: bool = False, backward_before: bool = False,
                   progress: bool = True, bits: Optional[int] = None,
                   group_size: Optional[int] = 128, quant_aware: bool = False) -> Inspection:
    """Build, prune, quantize (with ``bits``: round-to-nearest, ``group_size`` inputs per scale,
    None = one per row), optimize, compile and run one training step (or, with ``meta``, only
    build on the meta device and compute theoretical bytes); returns the :class:`Inspection`."""
    config = LorsConfig(r=r, grad_mode=grad_mode, checkpoint=checkpoint, quant_aware=quant_aware)
    spec = None if bits is None else QuantSpec(bits, group_size)
    torch_dtype = getattr(torch, dtype)
    names = ["load", "prune"] + ([] if meta else ["quantize"] * (spec is not None) + [
        "optimize", "compile + forward", "backward", "report"])
    stage = _Stages(names + (["naive backward"] if backward_before and not meta else []),
                    progress)
    notes: List[str] = []
    graphs: Dict[str, Optional[fx.GraphModule]] = {}
    try:
        with stage("load"):
            model, source = load_named_model(kind, value, meta=meta, progress=progress)
            model = model.to(torch_dtype)
        limit = _max_positions(model)
        if limit is not None and seq > limit:
            raise BadArgument(f"--seq: {seq} exceeds the model's {limit} positions")
        element_size = torch.empty((), dtype=torch_dtype).element_size()
        data: Dict[str, Any] = {
            "schema": "lors_fx.inspect/1",
            "model": {"name": name, "source": source, "kind": kind,
                      "architecture": type(model).__name__,
                      "parameters": sum(p.numel() for p in model.parameters()), "dtype": dtype,
                      "meta": meta},
            "config": config.to_dict(), "step": {"batch": batch, "seq": seq,
                                                 "tokens": batch * seq},
            "theoretical": meta, "passes": None, "graphs": None, "graph_breaks": None,
            "recompiles": None, "compiled": False, "fallback": None,
            "code": {"forward": None, "backward": None, "diff_forward": None,
                     "diff_backward": None}}
        if meta:
            data.update(_theoretical(model, config, sparsity, pattern, batch, seq, dtype,
                                     element_size, stage, notes, spec))
        else:
            data.update(_measure(model, config, sparsity, pattern, batch, seq, element_size,
                                 stage, notes, graphs, backward_before, spec))
        data["saved"]["naive_theoretical_bytes"] = sum(s["naive_saved_bytes"]
                                                       for s in data["sites"])
        data["saved"]["lors_theoretical_bytes"] = sum(s["lors_saved_bytes"] for s in data["sites"])
        before, after = data["saved"]["before_bytes"], data["saved"]["after_bytes"]
        data["saved"]["ratio"] = None if not before or after is None else after / before
        data["notes"] = notes + data.pop("report_notes", [])
        data["seconds"] = dict(stage.seconds)
    finally:
        stage.close()
    return Inspection(data=data, model=model, graphs=graphs)


def _theoretical(model, config, sparsity, pattern, batch, seq, dtype, element_size, stage,
                 notes, spec=None) -> Dict[str, Any]:
    """The ``pruning``/``quantization``/``sites``/``saved`` entries of a meta-device inspection
    (nothing runs)."""
    with stage("prune"):
        sites = _theoretical_sites(model, config, sparsity, pattern, batch * seq, element_size,
                                   spec)
        target_sparsity, pattern_name = _pattern_text(sparsity, pattern)
    before, after = _theoretical_rows(sites, batch, seq, dtype)
    notes.append("theoretical: built on the meta device from the config only; nothing "
                 "was pruned, compiled or run")
    return {"pruning": {"applied": False, "method": None, "sparsity": target_sparsity,
                        "pattern": pattern_name, "note": (
                            f"meta device (no values): every target linear treated as "
                            f"pruned to {pattern or f'{target_sparsity:.0%} unstructured'}"
                            f"; saved bytes are theoretical")},
            "quantization": {"applied": False, "method": None,
                             "bits": None if spec is None else spec.bits,
                             "group_size": None if spec is None else spec.group_size,
                             "quant_aware": config.quant_aware,
                             "note": "float base (no --bits)" if spec is None else
                             f"meta device (no values): sites treated as quantized to "
                             f"{_spec_text(spec)}; nothing was quantized"},
            "sites": sites,
            "saved": {"before_bytes": sum(s["naive_saved_bytes"] for s in sites),
                      "after_bytes": sum(s["lors_saved_bytes"] for s in sites),
                      "before": before, "after": after}}


def _measure(model, config, sparsity, pattern, batch, seq, element_size, stage, notes, graphs,
             backward_before, spec=None) -> Dict[str, Any]:
    """The real run: prune, quantize, optimize + compile, one training step, the report and the
    graphs."""
    with stage("prune"):
        pruning = _prune_or_keep(model, config, sparsity, pattern, notes)
    quantization = _quantize(model, config, spec, stage, notes)
    capture = CaptureBefore()
    with stage("optimize"):
        optimize(model, config, compile=False)
        compile_model(model, config, passes=_forward_passes(config, capture), dynamic=False)
    model.train()
    _training_step(model, batch, seq, stage)
    with stage("report"):
        result = report(model).to_dict()
    tokens = batch * seq
    for site in result["sites"]:
        numbers = theoretical_bytes(tuple(site["shape"]), tokens, element_size)
        site["naive_saved_bytes"], site["lors_saved_bytes"] = numbers["naive"], numbers["lors"]
    records = _training_records(model)
    code = {"forward": _joined(records, "forward"), "backward": _joined(records, "backward"),
            "diff_forward": None, "diff_backward": None}
    diffs = []
    for record in records:
        if record.index < len(capture.graphs) and record.dynamo_graph is not None:
            names = readable_names(record.dynamo_graph, model)
            diffs.append(unified_diff(display_code(capture.graphs[record.index], names),
                                      display_code(record.dynamo_graph, names),
                                      f"graph{record.index}/dynamo.before",
                                      f"graph{record.index}/dynamo.after"))
    code["diff_forward"] = "\n".join(diffs) or None
    if records:
        first = records[0]
        graphs.update(before=capture.graphs[first.index] if first.index < len(capture.graphs)
                      else None, after=first.dynamo_graph, forward=first.forward,
                      backward=first.backward)
    if backward_before and records:
        with stage("naive backward"):  # the same graphs compiled without the rewrite
            compile_model(model, config, passes=[], report_before=False, dynamic=False)
            _training_step(model, batch, seq, lambda name: contextlib.nullcontext())
            naive = _training_records(model)
        pairs = list(zip(naive, records))
        code["diff_backward"] = "\n".join(
            unified_diff(display_code(n.backward), display_code(a.backward),
                         f"graph{a.index}/backward.naive", f"graph{a.index}/backward.lors")
            for n, a in pairs) or None
        graphs["backward_before"] = naive[0].backward if naive else None
    return {"pruning": pruning, "quantization": quantization, "sites": result["sites"],
            "passes": [p for p in result["passes"] if p["name"] != CAPTURE_PASS_NAME],
            "saved": {"before_bytes": result["saved_bytes_before"],
                      "after_bytes": result["saved_bytes_after"],
                      "before": result["saved_before"], "after": result["saved_after"]},
            "graphs": result["graphs"], "graph_breaks": result["graph_breaks"],
            "recompiles": result["recompiles"], "compiled": result["compiled"],
            "fallback": result["fallback"], "code": code, "report_notes": result["notes"]}
