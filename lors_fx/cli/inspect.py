"""``lors-fx inspect MODEL``: show what the LoRS passes did to a model's graphs.

    lors-fx inspect MODEL [--sparsity 0.5 | --pattern 2:4] [--r 16] [--grad-mode lors|exact]
                    [--checkpoint none|block|every:K|budget:BYTES] [--batch 2 --seq 64]
                    [--dtype float32|bfloat16|float16] [--bits 4|8 [--group-size G|row]
                    [--quant-aware]] [--meta]
                    [--show summary,sites,passes,saved,graph,diff] [--graph forward|backward]
                    [--dot FILE] [--json FILE] [--no-progress]

MODEL is a built-in tiny architecture (``tiny-llama``, ``tiny-qwen2``, ``tiny-mistral``,
``tiny-gemma3``, ``tiny-gpt2``), ``smollm2`` (the embedded real model), a local Hugging Face
model directory, or a config JSON (HF ``config.json`` form, with ``model_type``). A dense model is
magnitude-pruned on the fly (per output row) to ``--sparsity`` (default 0.5) or ``--pattern``; an
already sparse one (every target linear at least ``LorsConfig.min_sparsity`` zeros) is used as is.
``--bits 4|8`` then quantizes it round-to-nearest (``quantize_model``; ``--group-size`` inputs
per scale, default 128, ``row``: one per output row; pruned weights stay code 0; an already
quantized model is used as is): its sites are quantized adapters (``--quant-aware``: QA forward)
rewritten to ``lors::quant_lora_linear``, shown with their base (``int4 g16 [QA]``, ``float``).
The run attaches adapters (:func:`lors_fx.optimize`), compiles with the lors backend, runs one
training step (forward + backward on a random ``--batch x --seq`` batch with labels) and reads
:func:`lors_fx.report`. ``--meta`` builds the model on the meta device from its config only (no
weights, seconds even for 7B): every target linear is treated as pruned as requested and the saved
bytes are theoretical (formula in :mod:`lors_fx.cli.inspect_meta`); nothing is compiled.

``--show`` takes one or more comma-separated views: ``summary`` (default), ``sites``, ``passes``,
``saved``, ``graph`` (the emitted ``--graph forward|backward`` GraphModule, with shapes), ``diff``
(forward: the dynamo graph before vs after the forward passes; backward: the backward the naive
masked form compiles to, from one more compile and step without the rewrite, vs the emitted one).
Exit codes: 0 ok, 2 bad arguments (one line on stderr), 1 failure (one line with the reason).

``--json FILE`` keys (stable; ``null`` where unknown or not applicable)::

    schema            "lors_fx.inspect/1"
    model             {name, source, kind, architecture, parameters, dtype, meta}
    pruning           {applied, method, sparsity, pattern, note}
    quantization      {applied, method, bits, group_size, quant_aware, note}; bits null for a
                      float base
    config            LorsConfig.to_dict()
    step              {batch, seq, tokens}
    theoretical       true on --meta: every number is theoretical, nothing was measured
    sites             [{fqn, shape, sparsity, pattern, rank, grad_mode, rewritten, bits,
                        group_size, quant_aware, naive_saved_bytes, lors_saved_bytes}];
                      rewritten null on --meta, bits/group_size/quant_aware null on a float
                      base (sparsity and pattern of a quantized one are its codes'), the two
                      byte counts theoretical (the formula) in every run
    passes            [{graph, name, count, nodes_created, nodes_erased, seconds}]
                      (null on --meta: no pass ran)
    saved             {before_bytes, after_bytes, ratio, before: [row], after: [row],
                       naive_theoretical_bytes, lors_theoretical_bytes}
                      row = {graph, name, source, shape, dtype, bytes, kind, view_of};
                      before/after measured, theoretical on --meta; *_theoretical_bytes: the
                      sums of the sites' theoretical counts
    graphs            [{index, forward_nodes, backward_nodes}] (null on --meta)
    graph_breaks, recompiles, compiled, fallback (null, null, false, null on --meta)
    code              {forward, backward, diff_forward, diff_backward}: readable code and
                      unified diffs, module paths for dynamo's input names (null on --meta;
                      diff_backward only with --show diff --graph backward, which costs one
                      more compile and step)
    notes             [str]
    seconds           {stage: seconds}

"Theoretical" means the same in the text and in the JSON: computed from the formula in
:mod:`lors_fx.cli.inspect_meta`, not measured. The text views cut code lines (``graph``,
``diff``) to the terminal's width when there is one; ``--json`` keeps them whole.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
from typing import Any, Dict, List, Optional

from lors_fx.cli import inspect_meta as meta_tools
from lors_fx.cli._output import fit_width
from lors_fx.cli.inspect_code import diff_header
from lors_fx.cli.inspect_dot import dot_text
from lors_fx.cli.inspect_meta import BadArgument, run_inspection
from lors_fx.compiler.report import base_text
from lors_fx.config import parse_checkpoint_policy
from lors_fx.quant import DEFAULT_GROUP_SIZE

__all__ = ["add_arguments", "run", "validate", "inspect_model", "render", "dot_text",
           "SHOW_CHOICES"]

SHOW_CHOICES = ("summary", "sites", "passes", "saved", "graph", "diff")
_DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser) -> None:
    """The ``inspect`` arguments. Values are checked by :func:`validate` (one-line errors)."""
    parser.add_argument("model", metavar="MODEL", help="tiny-llama|tiny-qwen2|tiny-mistral|"
                        "tiny-gemma3|tiny-gpt2, smollm2, a HF model directory or a config JSON")
    parser.add_argument("--sparsity", default=None, help="magnitude-prune a dense model to this "
                        "fraction per row, 0 < s < 1 (default 0.5)")
    parser.add_argument("--pattern", default=None, help="magnitude-prune to N:M along the input "
                        "dim instead (e.g. 2:4)")
    parser.add_argument("--r", default="16", help="adapter rank (default 16)")
    parser.add_argument("--grad-mode", default="lors", help="lors (default) or exact")
    parser.add_argument("--checkpoint", default="none",
                        help="none (default), block, every:K or budget:BYTES")
    parser.add_argument("--batch", default="2", help="batch size of the training step (2)")
    parser.add_argument("--seq", default="64", help="sequence length of the training step (64)")
    parser.add_argument("--dtype", default="float32", help="float32 (default), bfloat16, float16")
    parser.add_argument("--bits", default=None, help="quantize the pruned model round-to-nearest "
                        "to 4 or 8 bits before optimize (quantized adapters)")
    parser.add_argument("--group-size", default=None, help="with --bits: inputs per scale "
                        "(default 128), or row for one scale per output row")
    parser.add_argument("--quant-aware", action="store_true", help="with --bits: "
                        "quantization-aware adapters (LorsConfig.quant_aware)")
    parser.add_argument("--meta", action="store_true", help="build on the meta device from the "
                        "config only: sites and theoretical saved bytes, no weights, no compile")
    parser.add_argument("--show", default="summary", help="comma-separated: summary (default), "
                        "sites, passes, saved, graph, diff")
    parser.add_argument("--graph", default="forward", help="forward (default) or backward, for "
                        "--show graph/diff")
    parser.add_argument("--dot", default=None, metavar="FILE",
                        help="write a Graphviz DOT file of the rewritten region")
    parser.add_argument("--json", default=None, metavar="FILE",
                        help="write everything as JSON (keys: see the module docstring)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def _number(text, name: str, kind, low, high=None):
    """``kind(text)`` checked to lie in ``[low, high]``, or in ``(low, high)`` for floats."""
    try:
        value = kind(text)
    except (TypeError, ValueError):
        value = None
    if kind is int:
        ok, bounds = value is not None and value >= low, f"an integer >= {low}"
    else:
        ok, bounds = value is not None and low < value < high, f"a number in ({low}, {high})"
    if not ok:
        raise BadArgument(f"--{name}: must be {bounds}, got {text!r}")
    return value


def validate(args) -> Dict[str, Any]:
    """Check every argument; returns the parsed options or raises :class:`BadArgument`."""
    options: Dict[str, Any] = {}
    options["kind"], options["value"] = meta_tools.resolve_model(args.model)
    if args.sparsity is not None and args.pattern is not None:
        raise BadArgument("--sparsity and --pattern: give one of them (N:M implies its sparsity)")
    options["sparsity"] = None if args.sparsity is None else _number(
        args.sparsity, "sparsity", float, 0, 1)
    options["pattern"] = None
    if args.pattern is not None:
        match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", args.pattern)
        if not match or not 0 < int(match.group(1)) < int(match.group(2)):
            raise BadArgument(f"--pattern: expected N:M with 0 < N < M (e.g. 2:4), "
                              f"got {args.pattern!r}")
        options["pattern"] = f"{int(match.group(1))}:{int(match.group(2))}"
    options["r"] = _number(args.r, "r", int, 1)
    options["batch"] = _number(args.batch, "batch", int, 1)
    options["seq"] = _number(args.seq, "seq", int, 2)
    if args.grad_mode not in ("lors", "exact"):
        raise BadArgument(f"--grad-mode: expected lors or exact, got {args.grad_mode!r}")
    try:
        parse_checkpoint_policy(args.checkpoint)
    except ValueError:
        raise BadArgument(f"--checkpoint: expected none, block, every:K (K >= 1) or "
                          f"budget:BYTES (e.g. budget:512MiB), got {args.checkpoint!r}") from None
    options.update(_quant_options(args))
    if args.dtype not in _DTYPES:
        raise BadArgument(f"--dtype: expected one of {', '.join(_DTYPES)}, got {args.dtype!r}")
    show = [part.strip() for part in str(args.show).split(",") if part.strip()]
    unknown = [part for part in show if part not in SHOW_CHOICES]
    if not show or unknown:
        raise BadArgument(f"--show: expected comma-separated values from "
                          f"{', '.join(SHOW_CHOICES)}, got {args.show!r}")
    options["show"] = list(dict.fromkeys(show))
    if args.graph not in ("forward", "backward"):
        raise BadArgument(f"--graph: expected forward or backward, got {args.graph!r}")
    if args.meta and ({"graph", "diff"} & set(show) or args.dot):
        raise BadArgument("--meta: no graphs are compiled on the meta device; --show graph/diff "
                          "and --dot need a run without --meta")
    return options


def _quant_options(args) -> Dict[str, Any]:
    """``bits``, ``group_size``, ``quant_aware`` from ``--bits/--group-size/--quant-aware``."""
    if args.bits is None:
        if args.group_size is not None or args.quant_aware:
            raise BadArgument("--group-size/--quant-aware: only with --bits 4 or 8")
        return {"bits": None, "group_size": None, "quant_aware": False}
    if str(args.bits).strip() not in ("4", "8"):
        raise BadArgument(f"--bits: expected 4 or 8, got {args.bits!r}")
    bits = int(args.bits)
    group = args.group_size
    if group is None:
        group_size = DEFAULT_GROUP_SIZE
    elif str(group).strip().lower() == "row":
        group_size = None
    else:
        group_size = _number(group, "group-size", int, 1)
        if bits == 4 and group_size % 2:
            raise BadArgument(f"--group-size: 4-bit codes are packed in pairs, the group must "
                              f"be even, got {group_size}")
    return {"bits": bits, "group_size": group_size, "quant_aware": bool(args.quant_aware)}


def inspect_model(model: str, **kwargs):
    """Run the inspection of ``model`` (a MODEL argument) and return an :class:`Inspection`.

    Keyword arguments as the command line's (``sparsity``, ``pattern``, ``r``, ``grad_mode``,
    ``checkpoint``, ``batch``, ``seq``, ``dtype``, ``meta``, ``backward_before``, ``progress``,
    ``bits``, ``group_size``, ``quant_aware``).
    """
    kind, value = meta_tools.resolve_model(model)
    return run_inspection(kind, value, name=model, **kwargs)


# ---------------------------------------------------------------------------------------------
# Rendering
# ---------------------------------------------------------------------------------------------


def _bytes(value: Optional[int]) -> str:
    if value is None:
        return "unknown"
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if value >= size:
            return f"{value:,} B ({value / size:.2f} {unit})"
    return f"{value:,} B"


def _ratio_text(before: Optional[int], after: Optional[int]) -> str:
    if not before or after is None:
        return "unknown"
    return f"{after / before:.3f}x ({before / after:.2f}x less)" if after else "0x"


def _shape(shape) -> str:
    return "x".join(str(d) for d in shape) if shape else "scalar"


def _summary(data: Dict[str, Any]) -> str:
    from tabulate import tabulate

    model, pruning, config, saved = data["model"], data["pruning"], data["config"], data["saved"]
    rewritten = sum(bool(s["rewritten"]) for s in data["sites"])
    rows = [["model", f"{model['name']} ({model['architecture']}, {model['source']})"],
            ["parameters", f"{model['parameters']:,} ({model['dtype']}"
                           f"{', meta device: no weights' if model['meta'] else ''})"],
            ["pruning", pruning["note"]],
            ["quantization", (data.get("quantization") or {}).get("note", "float base")],
            ["LoRS config", f"r={config['r']}, lora_alpha={config['lora_alpha']:g}, "
                            f"grad_mode={config['grad_mode']}, checkpoint={config['checkpoint']}"],
            ["training step", f"batch {data['step']['batch']} x seq {data['step']['seq']}"
                              + (" (not run: --meta)" if data["theoretical"] else "")]]
    if data["theoretical"]:
        rows.append(["sites", f"{len(data['sites'])} target linears (treated as pruned)"])
    else:
        rows.append(["sites", f"{len(data['sites'])} found, {rewritten} rewritten to "
                              f"{_op_names(data['sites'])}"])
        lines = [f"{p['name']} (graph {p['graph']}): matched {p['count']}, "
                 f"+{p['nodes_created']}/-{p['nodes_erased']} nodes, {p['seconds'] * 1e3:.1f} ms"
                 for p in data["passes"]]
        rows += [["passes" if i == 0 else "", line] for i, line in enumerate(lines or ["none"])]
        rows.append(["graphs", f"{len(data['graphs'])}, graph breaks: {data['graph_breaks']}, "
                               f"recompiles: {data['recompiles']}"
                               + (f", fallback: {data['fallback']}" if data["fallback"] else "")])
        rows.append(["saved for backward", f"whole graph, non-parameter, measured: before (naive "
                     f"masked form) "
                     f"{_bytes(saved['before_bytes'])} -> after (LoRS) "
                     f"{_bytes(saved['after_bytes'])}: "
                     f"{_ratio_text(saved['before_bytes'], saved['after_bytes'])}"])
    naive, lors = saved["naive_theoretical_bytes"], saved["lors_theoretical_bytes"]
    rows.append(["adapted linears", f"theoretical: naive masked form (x + W' + bool mask) "
                 f"{_bytes(naive)} vs LoRS (x) {_bytes(lors)}: {_ratio_text(naive, lors)}"])
    text = tabulate(rows, tablefmt="plain")
    notes = "\n".join(f"note: {note}" for note in data["notes"])
    return text + ("\n" + notes if notes else "")


def _op_names(sites: List[Dict[str, Any]]) -> str:
    """The op(s) the sites are rewritten to: float bases -> sparse_lora_linear, quantized ones
    -> quant_lora_linear."""
    quantized = sum(s.get("bits") is not None for s in sites)
    names = (["lors::sparse_lora_linear"] if quantized < len(sites) or not sites else []) + (
        ["lors::quant_lora_linear"] if quantized else [])
    return " / ".join(names)


def _sites(data: Dict[str, Any]) -> str:
    from tabulate import tabulate

    rows = [[s["fqn"], _shape(s["shape"]), "-" if s["sparsity"] is None else f"{s['sparsity']:.3f}",
             s["pattern"], s["rank"], s["grad_mode"],
             "-" if s["rewritten"] is None else ("yes" if s["rewritten"] else "no"),
             base_text(s.get("bits"), s.get("group_size"), s.get("quant_aware")),
             s["naive_saved_bytes"], s["lors_saved_bytes"]] for s in data["sites"]]
    headers = ["site", "shape", "sparsity", "N:M", "rank", "grad_mode", "rewritten", "base",
               "naive saves (B)", "LoRS saves (B)"]
    legend = "byte counts theoretical" + ("; rewritten: - (not compiled, --meta)"
                                          if data["theoretical"] else "")
    return (f"sites: {len(rows)} ({legend})\n"
            + tabulate(rows, headers=headers, tablefmt="simple"))


def _passes(data: Dict[str, Any]) -> str:
    from tabulate import tabulate

    if data["theoretical"]:
        return "passes: none run (--meta: no values to match on)"
    rows = [[p["graph"], p["name"], p["count"], p["nodes_created"], p["nodes_erased"],
             f"{p['seconds'] * 1e3:.2f}"] for p in data["passes"]]
    return tabulate(rows, headers=["graph", "pass", "matched", "created", "erased", "ms"],
                    tablefmt="simple")


def _saved(data: Dict[str, Any]) -> str:
    from tabulate import tabulate

    saved, parts = data["saved"], []
    headers = ["graph", "name", "shape", "dtype", "bytes", "kind"]
    for label, key in (("before (naive masked form)", "before"), ("after (LoRS)", "after")):
        rows = [[r["graph"], r["name"], _shape(r["shape"]), r["dtype"], r["bytes"], r["kind"]]
                for r in saved[key]]
        total = saved[f"{key}_bytes"]
        title = f"saved for backward, {label}: {_bytes(total)} non-parameter" + (
            " (theoretical)" if data["theoretical"] else "")
        parts.append(title + "\n" + tabulate(rows, headers=headers, tablefmt="simple"))
    parts.append(f"ratio after/before: {_ratio_text(saved['before_bytes'], saved['after_bytes'])}")
    return "\n\n".join(parts)


def _code_view(data: Dict[str, Any], view: str, graph: str, width: int) -> str:
    """``--show graph`` or ``--show diff`` (with its header), lines cut to ``width``."""
    if view == "graph":
        return fit_width(data["code"][graph] or f"# no {graph} graph was compiled", width)
    diff = data["code"][f"diff_{graph}"]
    if not diff:
        return f"# no {graph} diff available"
    return fit_width(diff_header(data, graph) + "\n" + diff, width)


def terminal_width() -> int:
    """Columns of the terminal stdout writes to (``$COLUMNS`` first); 0 when it is no terminal
    (a file or a pipe gets whole lines)."""
    if "COLUMNS" not in os.environ and not sys.stdout.isatty():
        return 0
    return shutil.get_terminal_size((0, 0)).columns


def render(data: Dict[str, Any], show: List[str], graph: str, width: int = 0) -> str:
    """The text of the requested ``--show`` views of an inspection's JSON data; code lines cut
    to ``width`` columns (0: whole)."""
    parts = []
    for view in show:
        if view == "summary":
            parts.append(_summary(data))
        elif view == "sites":
            parts.append(_sites(data))
        elif view == "passes":
            parts.append(_passes(data))
        elif view == "saved":
            parts.append(_saved(data))
        else:
            parts.append(_code_view(data, view, graph, width))
    return "\n\n".join(part.rstrip("\n") for part in parts) + "\n"


def run(args) -> int:
    """Run ``lors-fx inspect``: 0 ok, 2 bad arguments, 1 failure (one line on stderr each)."""
    try:
        options = validate(args)
    except BadArgument as error:
        print(f"lors-fx inspect: error: {error}", file=sys.stderr)
        return 2
    try:
        result = run_inspection(
            options["kind"], options["value"], name=args.model, sparsity=options["sparsity"],
            pattern=options["pattern"], r=options["r"], grad_mode=args.grad_mode,
            checkpoint=args.checkpoint, batch=options["batch"], seq=options["seq"],
            dtype=args.dtype, meta=args.meta,
            backward_before="diff" in options["show"] and args.graph == "backward",
            progress=not args.no_progress, bits=options["bits"],
            group_size=options["group_size"], quant_aware=options["quant_aware"])
        data = result.data
        if args.dot:
            with open(args.dot, "w", encoding="utf-8") as handle:
                handle.write(dot_text(result.graphs.get("before"), result.graphs.get("after"),
                                      f"lors_fx inspect {args.model}", result.model))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump(data, handle, indent=2, sort_keys=True, default=str)
                handle.write("\n")
        sys.stdout.write(render(data, options["show"], args.graph, terminal_width()))
    except BadArgument as error:  # found late (e.g. --seq longer than the model allows)
        print(f"lors-fx inspect: error: {error}", file=sys.stderr)
        return 2
    except Exception as error:  # a failure: one line with the reason
        first = (str(error).strip().splitlines() or [""])[0]
        first = first if len(first) <= 300 else first[:297] + "..."
        print(f"lors-fx inspect: error: {type(error).__name__}: {first}", file=sys.stderr)
        return 1
    return 0
