"""``lors-fx bench`` / ``tools/bench.py``: the benchmark's command line and output.

The measurements live in :mod:`lors_fx.bench.harness`; this module parses options, runs the grid with a
progress bar, prints tabulate tables, and writes JSON (and an optional plot).
See docs/benchmarks.md for the options, the columns and how each is measured.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
from typing import List

import torch
from tabulate import tabulate

from lors_fx.bench.harness import _DTYPES, EXTRA_METHODS, SCHEMA, WORKLOADS, _targets, run_case
from lors_fx.bench.quant_rows import (parse_group_size, parse_quant_row, quant_row_names,
                                     quant_targets)
from lors_fx.compiler._torch_private import recompile_limit_at_least
from lors_fx.methods.registry import METHODS

__all__ = ["format_case", "add_bench_arguments", "bench_main", "add_arguments", "run", "main"]


def _mib(nbytes):
    return None if nbytes is None else nbytes / 2**20


def _quantized_case(case: dict) -> bool:
    return any("@int" in row["method"] for row in case["rows"])


def format_case(case: dict) -> str:
    """A tabulate table of one case (times in ms, memory in MiB, ratios x); with rows on a
    quantized base (``--bits``), also their ratios to the ``lors`` row and the base's bytes."""
    quantized = _quantized_case(case)
    table = []
    for row in case["rows"]:
        extra = ([row["vs_lors"], row["peak_vs_lors"], _mib(row["base_weight_bytes"]),
                  row["base_vs_bf16"]] if quantized else [])
        table.append([row["method"], row["step_ms"], row["vs_lora"], row["vs_sqft"], *extra,
                      _mib(row["saved_bytes"]), row["saved_vs_sqft"], _mib(row["peak_bytes"]),
                      row["peak_vs_sqft"], row["trainable_params"], row["gflops"],
                      row["roofline_frac"], row["rel_err_y"], row["rel_err_grad"],
                      "" if row["status"] == "ok" else row["status"]])
    headers = ["method", "step ms", "xLoRA", "xSQFT",
               *(["xLoRS", "peak xLoRS", "base MiB", "base xbf16"] if quantized else []),
               "saved MiB", "saved xSQFT", "peak MiB",
               "peak xSQFT", "trainable", "GFLOP/s", "roofline", "rel err y", "rel err grad",
               "status"]
    title = (f"{case['workload']}  T={case['tokens']}  r={case['r']}  {case['dtype']}  "
             f"linears={sorted(set(map(tuple, case['linear_shapes'])))}  plain matmul "
             f"{case['matmul_ms']:.2f} ms = {case['matmul_gflops']:.1f} GFLOP/s")
    body = tabulate(table, headers=headers, floatfmt=".3g", missingval="-")
    return f"{title}\n{body}"


def _plot(cases: List[dict], path: str) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"--plot {path}: matplotlib is not installed (pip install matplotlib); no plot written"
    fig, axes = plt.subplots(len(cases), 2, figsize=(12, 3.2 * len(cases)), squeeze=False)
    for (ax_time, ax_mem), case in zip(axes, cases):
        rows = [row for row in case["rows"] if row["step_ms"] is not None]
        names = [row["method"] for row in rows]
        ax_time.barh(names, [row["step_ms"] for row in rows])
        ax_time.set_xlabel("step ms (median)")
        ax_mem.barh(names, [_mib(row["peak_bytes"]) or 0 for row in rows], label="peak")
        ax_mem.barh(names, [_mib(row["saved_bytes"]) or 0 for row in rows], label="saved",
                    alpha=0.6)
        ax_mem.set_xlabel("MiB")
        ax_mem.legend()
        ax_time.set_title(f"{case['workload']} T={case['tokens']} r={case['r']} {case['dtype']}")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return f"plot written to {path}"


def add_bench_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the benchmark's options to ``parser`` (used by tools/bench.py and ``lors-fx bench``)."""
    add = parser.add_argument
    add("--workloads", nargs="+", choices=WORKLOADS, default=list(WORKLOADS))
    add("--config", help="a transformers config JSON: adds the workload 'config'")
    add("--scale", type=float, default=0.25, help="scale of the Llama-7B shapes (default 0.25)")
    add("--layers", type=int, help="cut smollm2 / --config models to this many layers")
    add("--tokens", type=int, nargs="+", default=[512, 2048], help="T, tokens per step")
    add("--ranks", type=int, nargs="+", default=[16, 64])
    add("--dtypes", nargs="+", choices=sorted(_DTYPES), default=["fp32", "bf16"])
    add("--methods", nargs="+", default=None,
        help=f"subset of {list(METHODS) + list(EXTRA_METHODS)} (default: all eager ones)")
    add("--compile", action="store_true",
        help="also run each baseline under torch.compile (inductor) and lors_fx_compiled")
    add("--alpha", type=float, help="adapter alpha (default 2r: s = 2)")
    add("--bits", type=int, nargs="+", choices=(4, 8),
        help="also run LoRS on the base quantized round-to-nearest to these bits, beside the "
             "unquantized rows: lors@intB, lors_qa@intB (quant-aware), sqft@intB (naive form)")
    add("--group-size", type=_group_size, default=128,
        help="inputs per scale of --bits (default 128; 'channel': one scale per row); it must "
             "divide every d_in (llama_mlp at --scale 0.25 has 2752: use 64, or --scale 0.5)")
    add("--sparsity", type=float, default=0.5)
    add("--steps", type=int, default=10, help="timed steps per method (median)")
    add("--warmup", type=int, default=2)
    add("--seed", type=int, default=0)
    add("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    add("--no-memory", action="store_true", help="skip the peak-memory step")
    add("--quick", action="store_true",
        help="llama_mlp at scale 1/32, T=64, r=8, fp32, 3 steps: a smoke run under a minute")
    add("--json", dest="json_path", help="write the results as JSON")
    add("--plot", help="write a bar chart PNG (needs matplotlib)")
    add("--no-progress", action="store_true", help="no progress bar (the tables still print)")
    return parser


def _group_size(text: str):
    try:
        return parse_group_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _machine(device) -> dict:
    info = {"platform": platform.platform(), "processor": platform.processor(),
            "python": platform.python_version(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "device": str(device)}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _method_list(args: argparse.Namespace) -> List[str]:
    """The rows to run: ``--methods`` (default every eager one), plus the compiled rows."""
    methods = list(args.methods or list(METHODS) + ["lors_fx_eager"])
    unknown = [m for m in methods if m.removesuffix("+compile") not in (*METHODS, *EXTRA_METHODS)
               and parse_quant_row(m) is None]
    if unknown:
        raise SystemExit(f"bench: unknown method(s) {unknown}; known: "
                         f"{list(METHODS) + list(EXTRA_METHODS)}")
    if args.compile:
        methods += [f"{m}+compile" for m in methods if m in METHODS] + ["lors_fx_compiled"]
    bits = getattr(args, "bits", None)
    if bits and "lors" not in methods:  # the quantized rows' step ratio is to this row
        methods.append("lors")
    return list(dict.fromkeys(methods + quant_row_names(bits)))


def _run_grid(args: argparse.Namespace, methods: List[str]) -> List[dict]:
    """Every case of the grid, printed as it completes, under a progress bar."""
    workloads = list(args.workloads) + (["config"] if args.config else [])
    grid = [(w, t, r, d) for w in workloads for t in args.tokens for r in args.ranks
            for d in args.dtypes]
    try:
        from tqdm import tqdm
        bar = tqdm(total=len(grid) * len(methods), desc="bench", leave=False,
                   disable=getattr(args, "no_progress", False))
    except ImportError:
        bar = None

    def progress(text):
        if bar is not None:
            bar.set_postfix_str(text)
            bar.update(1)

    # Every method compiles the workload's forward again (new parameters fail the guards); past
    # dynamo's recompile limit (8) it would silently run eager.
    limit = (recompile_limit_at_least(4 * len(methods)) if args.compile
             else contextlib.nullcontext())
    cases = []
    with limit:
        for workload, tokens, r, dtype in grid:
            cases.append(run_case(workload, tokens, r, dtype, methods, args, progress))
            if bar is not None:
                bar.clear()
            print(format_case(cases[-1]), end="\n\n", flush=True)
    if bar is not None:
        bar.close()
    return cases


def bench_main(args: argparse.Namespace) -> dict:
    """Run the benchmark described by parsed ``args``; print tables, write JSON/plot; return it."""
    if args.quick:
        args.workloads, args.scale, args.tokens, args.ranks = ["llama_mlp"], 1 / 32, [64], [8]
        args.dtypes, args.steps, args.warmup, args.config = ["fp32"], 3, 1, None
    methods = _method_list(args)
    peak_method = ("cuda: max_memory_allocated - memory_allocated at step start"
                   if torch.device(args.device).type == "cuda" else
                   "cpu: torch.profiler allocation events (profile_memory=True) cumulated over "
                   "one untimed step, peak above the step's start")
    cases = _run_grid(args, methods)
    result = {"schema": SCHEMA, "machine": _machine(args.device),
              "args": {k: v for k, v in vars(args).items() if not callable(v)},
              "peak_memory_method": peak_method, "cases": cases, "targets": _targets(cases),
              "quant_targets": quant_targets(cases)}
    print(f"threads={torch.get_num_threads()}  peak memory: {peak_method}")
    if result["targets"]:
        print(tabulate([[t["target"], t["ratio"], t["holds"]] for t in result["targets"]],
                       headers=["issue target (lors, llama_mlp T=512 r=16 fp32)", "ratio",
                                "holds"], floatfmt=".3f"))
    if result["quant_targets"]:
        print(_format_quant_targets(result["quant_targets"]))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
        print(f"json written to {args.json_path}")
    if args.plot:
        print(_plot(cases, args.plot))
    return result


def _format_quant_targets(targets: List[dict]) -> str:
    """The quantized rows' goals as one table (every case with ``--bits`` rows)."""
    table = [[t["workload"], t["tokens"], t["r"], t["dtype"], t["row"], t["target"], t["ratio"],
              t["holds"]] for t in targets]
    return tabulate(table, headers=["workload", "T", "r", "dtype", "row", "issue target (--bits)",
                                    "ratio", "holds"], floatfmt=".3f", missingval="-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """``lors-fx bench`` options (the same as :func:`add_bench_arguments`)."""
    add_bench_arguments(parser)


def run(args: argparse.Namespace) -> int:
    """``lors-fx bench``: run the benchmark; 0 when it completed."""
    bench_main(args)
    return 0


def main(argv=None) -> dict:
    """``python -m lors_fx.cli.bench``: parse ``argv`` and run :func:`bench_main`."""
    parser = add_bench_arguments(argparse.ArgumentParser(description=__doc__.splitlines()[0]))
    return bench_main(parser.parse_args(argv))


if __name__ == "__main__":
    main()
