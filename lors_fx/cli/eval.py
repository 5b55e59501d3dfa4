"""``lors-fx eval MODEL [--adapters DIR] [--tasks ...]``: held-out perplexity, then zero-shot
accuracy (lm-eval), of a saved model and its LoRS adapters.

The measurements are :mod:`lors_fx.workflows.evaluate`; this module is their command line.
A quantized checkpoint (compressed-tensors) is evaluated as it is; ``--bits 4|8`` quantizes a
float pruned model first (calibrated on the non-held-out documents), e.g. to see what int4 costs.
"""
from __future__ import annotations

import argparse
import json

from lors_fx.api import restore_adapters
from lors_fx.cli._guards import add_tokenizer_argument, note, text_tokenizer
from lors_fx.cli._output import GIT_NOISE_PREFIXES, filtered_stderr
from lors_fx.cli._quant import add_quant_arguments, quantize_for_cli
from lors_fx.workflows.checks import clamp_max_length
from lors_fx.workflows.data import build_lm_splits, calibration_sample, load_texts, split_documents
from lors_fx.workflows.embedded import load_model
from lors_fx.workflows.evaluate import PAPER_TASKS, text_perplexity, zero_shot

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx eval MODEL [--adapters DIR] [--tasks ...] [--tasks-dir DIR]``."""
    add = parser.add_argument
    add("model", help="a local Hugging Face model directory, or 'smollm2'")
    add("--adapters", default=None, help="a directory written by save_adapters (lors-fx train)")
    add_tokenizer_argument(parser)
    add("--data", default="embedded", help="held-out text: 'embedded', a file or a hub name")
    add("--eval-fraction", type=float, default=0.1,
        help="share of documents held out (split by document, seeded as in lors-fx train)")
    add("--max-length", type=int, default=1024,
        help="perplexity window (1024; cut to the model's max_position_embeddings)")
    add("--stride", type=int, default=None, help="default max_length // 2")
    add("--max-tokens", type=int, default=None, help="score only the first N held-out tokens")
    add("--tasks", nargs="*", default=None,
        help=f"zero-shot tasks (lm-eval); bare --tasks = {' '.join(PAPER_TASKS)}")
    add("--tasks-dir", default=None, help="folder of <task>.jsonl files (offline)")
    add("--limit", type=int, default=None, help="examples per task")
    add_quant_arguments(parser)
    add("--seed", type=int, default=0)
    add("--json", metavar="FILE", help="also write the results as JSON")
    add("--no-progress", action="store_true")


def _window(model, max_length: int, stride):
    """``(max_length, stride)`` cut to the model's positions, with a note when cut."""
    max_length, cut = clamp_max_length(model, max_length)
    if cut:
        note("eval", cut)
        if stride is not None and stride > max_length:
            note("eval", f"--stride {stride} exceeds the window; using {max_length}")
            stride = max_length
    return max_length, stride


def run(args: argparse.Namespace) -> int:
    """Run ``lors-fx eval``: perplexity on held-out text, then zero-shot tasks if asked."""
    from tabulate import tabulate

    progress = not args.no_progress
    model, tokenizer = load_model(args.model, progress=progress)
    tokenizer = text_tokenizer(args, model, tokenizer, "evaluation")
    max_length, stride = _window(model, args.max_length, args.stride)
    texts = load_texts(args.data, progress=progress)
    if args.bits:
        splits = build_lm_splits(texts, tokenizer, block_size=min(256, max_length),
                                 eval_fraction=args.eval_fraction, seed=args.seed)
        quantize_for_cli(model, args, calibration_sample(splits.train, min(32, len(splits.train)),
                                                         seed=args.seed))
    if args.adapters:
        restore_adapters(model, args.adapters)
    _, held_out = split_documents(len(texts), args.eval_fraction, args.seed)
    ppl = text_perplexity(model, tokenizer, [texts[i] for i in held_out],
                          max_length=max_length, stride=stride,
                          max_tokens=args.max_tokens, progress=progress)
    summary = {"model": args.model, "adapters": args.adapters, "data": args.data,
               "perplexity": ppl.to_dict()}
    rows = [["perplexity", f"{ppl.perplexity:.3f}",
             f"{ppl.tokens} tokens, max_length {ppl.max_length}, stride {ppl.stride}"]]
    if args.tasks is not None:
        tasks = args.tasks or list(PAPER_TASKS)
        with filtered_stderr(GIT_NOISE_PREFIXES):  # lm-eval runs `git describe` in the cwd
            summary["zero_shot"] = zero_shot(model, tokenizer, tasks, tasks_dir=args.tasks_dir,
                                             limit=args.limit, progress=progress)
        for task, metrics in summary["zero_shot"].items():
            rows.append([task, f"{metrics.get('acc', float('nan')):.4f}",
                         ", ".join(f"{k} {v:.4f}" for k, v in metrics.items() if k != "acc")])
    print(tabulate(rows, headers=["metric", "value", "details"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    return 0
