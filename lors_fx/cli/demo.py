"""``lors-fx demo``: prune SmolLM2-135M, fine-tune it with LoRS, merge, audit, measure.

The workflow is :func:`lors_fx.workflows.demo.run_demo`; this module is its command line: the
flags (defaults from :data:`~lors_fx.workflows.demo.DemoSettings.DEFAULTS`), the table, the
``--json`` file, and exit code 1 when the zero-pattern audit or the merge check fails.
"""
from __future__ import annotations

import argparse
import json
import sys

from lors_fx.workflows.demo import MERGE_TOLERANCE, DemoSettings, format_summary, run_demo
from lors_fx.workflows.prune import PRUNE_METHODS
from lors_fx.workflows.train import TRAIN_METHODS

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx demo`` (the defaults are sized for a laptop CPU)."""
    d = DemoSettings.DEFAULTS
    add = parser.add_argument
    add("--steps", type=int, default=d["steps"], help="fine-tuning steps (100)")
    add("--method", choices=TRAIN_METHODS, default=d["method"], help="fine-tuning method (lors)")
    add("--prune", choices=PRUNE_METHODS, default=d["prune"])
    add("--sparsity", type=float, default=d["sparsity"], help="unstructured sparsity (0.5)")
    add("--pattern", default=d["pattern"], help="N:M pattern instead, e.g. 2:4")
    add("--seq-len", type=int, default=d["seq_len"], help="training block length (128)")
    add("--batch-size", type=int, default=d["batch_size"], help="blocks per step (2)")
    add("--lr", type=float, default=d["lr"], help="AdamW learning rate (1e-3)")
    add("-r", "--rank", type=int, default=d["rank"])
    add("--init", choices=("gradient", "zeros"), default=d["init"], help="LoRS adapter init")
    add("--init-samples", type=int, default=d["init_samples"],
        help="blocks averaged by the gradient init (4)")
    add("--calib-samples", type=int, default=d["calib_samples"],
        help="calibration blocks of seq-len tokens for pruning (16)")
    add("--eval-tokens", type=int, default=d["eval_tokens"], help="held-out tokens scored (4096)")
    add("--max-length", type=int, default=d["max_length"], help="perplexity window (512)")
    add("--stride", type=int, default=d["stride"], help="perplexity stride (default max_length)")
    add("--compare-steps", type=int, default=d["compare_steps"],
        help="timed steps per method for LoRS vs SQFT (0 skips the comparison)")
    add("--bits", type=int, choices=(4, 8), default=d["bits"],
        help="also quantize the pruned model (sparsity-aware int4/int8), train quantization-"
        "aware and merge back to a sparse quantized model")
    add("--group-size", type=int, default=d["group_size"],
        help="with --bits: inputs per scale (64: SmolLM2's 576-wide inputs take no 128)")
    add("--quant-method", choices=("gptq", "rtn"), default=d["quant_method"],
        help="with --bits: GPTQ on the calibration blocks (default) or round to nearest")
    add("--seed", type=int, default=d["seed"])
    add("--tokenizer", default=d["tokenizer"], metavar="PATH",
        help="tokenizer directory to use instead of SmolLM2's own (must fit its vocabulary)")
    add("--json", metavar="FILE", default=d["json"], help="also write every number as JSON")
    add("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``lors-fx demo``; 1 (and a loud message) when the audit or the merge check fails."""
    summary = run_demo(args)
    print(format_summary(summary))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    failures = []
    if summary["method"] != "lora" and not summary["audit_ok"]:
        failures.append(f"zero-pattern audit failed: {summary['audit']}")
    if summary["merge_relative_difference"] > MERGE_TOLERANCE:
        failures.append(f"merged perplexity {summary['ppl_merged']:.6f} differs from unmerged "
                        f"{summary['ppl_tuned']:.6f} by {summary['merge_relative_difference']:.2e} "
                        f"relative (> {MERGE_TOLERANCE:g})")
    for failure in failures:
        print(f"lors-fx demo: FAILED: {failure}", file=sys.stderr)
    return 1 if failures else 0
