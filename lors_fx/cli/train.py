"""``lors-fx train MODEL --out DIR``: load (and prune) a model, attach a method, train, save.

The loop and the methods are :mod:`lors_fx.workflows.train`; this module is its command line.
``--save-every N`` writes resumable checkpoints (``OUT/checkpoint-<step>``, atomically);
``--resume OUT`` (or one checkpoint directory) continues a stopped run, given the same other
arguments, to the same final adapters. SIGTERM saves a checkpoint and exits with 143
(:class:`lors_fx.workflows.train.TrainingInterrupted`).

A quantized base (a compressed-tensors checkpoint, or ``--bits 4|8``: the pruned model quantized
here and saved to ``OUT/base``) trains quantization-aware by default (``--no-quant-aware``: plain
LoRS on the codes), so ``lors-fx merge OUT/base OUT/adapters`` computes what was trained.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import torch

from lors_fx.cli._guards import add_tokenizer_argument, note_dense_linears, text_tokenizer
from lors_fx.cli._quant import add_quant_arguments, group_size_of, quantize_for_cli, save_model
from lors_fx.quantized import is_quantized_model
from lors_fx.workflows.data import (build_instruction_splits, build_lm_splits, calibration_sample,
                                    load_instructions, load_texts)
from lors_fx.workflows.embedded import load_model
from lors_fx.workflows.prune import prune_model
from lors_fx.workflows.train import (TRAIN_METHODS, TrainConfig, TrainingInterrupted,
                                     prepare_model, train)

__all__ = ["add_arguments", "run"]

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx train MODEL --out DIR`` (MODEL: a pruned HF directory or 'smollm2')."""
    add = parser.add_argument
    add("model", help="a local (pruned) Hugging Face model directory, or 'smollm2'")
    add_tokenizer_argument(parser)
    add("--out", required=True, help="output directory (adapters in OUT/adapters)")
    add("--method", choices=TRAIN_METHODS, default="lors")
    add("--data", default="embedded", help="training text: 'embedded', a .txt/.json/.jsonl file "
        "or a hub name (default: embedded)")
    add("--instructions", action="store_true", help="--data holds instruction records "
        "(loss on the responses only)")
    add("--block-size", type=int, default=256)
    add("--steps", type=int, default=100)
    add("--batch-size", type=int, default=4)
    add("--grad-accum", type=int, default=1)
    add("--lr", type=float, default=1e-3)
    add("--warmup-ratio", type=float, default=0.05)
    add("--weight-decay", type=float, default=0.0)
    add("-r", "--rank", type=int, default=16)
    add("--alpha", type=float, default=None, help="scale numerator (default 2*r)")
    add("--init", choices=("gradient", "zeros"), default=None,
        help="adapter init (default: gradient for lors, zeros otherwise)")
    add("--init-samples", type=int, default=64)
    add("--compile", action="store_true", help="lors: compile with the lors backend")
    add("--dtype", choices=sorted(_DTYPES), default="fp32",
        help="fp32, or bf16 (whole model and adapters in bf16)")
    add("--prune", default=None, metavar="METHOD", help="prune first (magnitude/wanda/sparsegpt)")
    add("--pattern", default=None, help="with --prune: 'unstructured' or N:M")
    add_quant_arguments(parser)
    add("--no-quant-aware", action="store_true", help="on a quantized base: train plain LoRS "
        "on the codes instead of quantization-aware (the merge then rounds W' to the grid)")
    add("--eval-every", type=int, default=0)
    add("--eval-blocks", type=int, default=8)
    add("--save-every", type=int, default=0, metavar="N", help="write a resumable checkpoint "
        "(adapters, optimizer, LR schedule, step, data position, RNG) every N steps to "
        "OUT/checkpoint-<step>")
    add("--resume", default=None, metavar="DIR", help="continue a stopped run from DIR: a "
        "checkpoint, or a run's OUT (its latest checkpoint); give the same other arguments")
    add("--seed", type=int, default=0)
    add("--json", metavar="FILE", help="also write the result as JSON")
    add("--no-progress", action="store_true")


def _write_summary(args: argparse.Namespace, init: str, result) -> None:
    """``--json FILE``: the run's settings and :class:`TrainResult` (with ``final_loss``)."""
    if not args.json:
        return
    summary = {"model": args.model, "method": args.method, "init": init,
               "final_loss": result.losses[-1], **result.to_dict()}
    with open(args.json, "w", encoding="utf-8") as handle:
        json.dump(summary, handle, indent=2)
        handle.write("\n")


def _prepare_base(args, model, tokenizer, splits, progress: bool) -> None:
    """``--prune`` and/or ``--bits``: prune (and quantize; SparseGPT's joint mode for
    ``--prune sparsegpt --bits``) or quantize the loaded pruned model, then save that exact base
    to ``OUT/base``: the adapters only make sense on it."""
    if not (args.prune or args.bits):
        return
    if args.bits and args.method != "lors":
        raise ValueError(f"--bits: a quantized base trains with --method lors only (got "
                         f"{args.method})")
    calibration = calibration_sample(splits.train, min(32, len(splits.train)), seed=args.seed)
    if args.prune:
        prune_model(model, args.prune, pattern=args.pattern, progress=progress,
                    calibration=calibration, bits=args.bits, group_size=group_size_of(args),
                    quant_method=args.quant_method)
    else:
        quantize_for_cli(model, args, calibration)
    save_model(model, tokenizer, os.path.join(args.out, "base"))


def run(args: argparse.Namespace) -> int:
    """Run ``lors-fx train``: load, (prune), attach, train, save adapters and tokenizer."""
    progress = not args.no_progress
    model, tokenizer = load_model(args.model, dtype=_DTYPES[args.dtype], progress=progress)
    tokenizer = text_tokenizer(args, model, tokenizer, "training")
    if args.instructions:
        splits = build_instruction_splits(load_instructions(args.data, progress=progress), tokenizer,
                                          block_size=args.block_size, seed=args.seed)
    else:
        splits = build_lm_splits(load_texts(args.data, progress=progress), tokenizer, block_size=args.block_size,
                                 seed=args.seed)
    _prepare_base(args, model, tokenizer, splits, progress)
    config = TrainConfig(steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                         lr=args.lr, warmup_ratio=args.warmup_ratio,
                         weight_decay=args.weight_decay, eval_every=args.eval_every,
                         save_every=args.save_every, output_dir=args.out, seed=args.seed,
                         progress=progress)
    init_data = None
    init = args.init or ("gradient" if args.method == "lors" else "zeros")
    if init == "gradient":
        init_data = list(splits.train.batches(args.batch_size, shuffle=True, seed=args.seed + 99))
    if args.method == "lors":
        note_dense_linears("train", model)
    torch.manual_seed(args.seed)  # the adapters' init (PEFT's Kaiming A, the randomized SVD)
    quant = {"quant_aware": not args.no_quant_aware} if is_quantized_model(model) else {}
    prepare_model(model, args.method, r=args.rank, alpha=args.alpha, init=init,
                  init_data=init_data, init_samples=args.init_samples, compile=args.compile,
                  progress=progress, **quant)
    eval_blocks = splits.eval[: args.eval_blocks] if args.eval_every else None
    eval_data = [eval_blocks] if eval_blocks is not None else None
    stopped = None
    try:
        result = train(model, splits.train, config, eval_data=eval_data, resume_from=args.resume)
    except TrainingInterrupted as stop:  # SIGTERM: a checkpoint (or the final adapters) saved
        result, stopped = stop.result, stop
    _write_summary(args, init, result)
    if not result.interrupted:
        tokenizer.save_pretrained(os.path.join(args.out, "adapters"))
    if stopped is not None:
        resume = (f"; continue with the same arguments and --resume {args.out}"
                  if result.interrupted else "")
        print(f"lors-fx train: stopped by SIGTERM after step {result.steps}/{args.steps}; "
              f"saved {stopped.checkpoint}{resume}", file=sys.stderr)
        return int(stopped.code)
    print(f"trained {result.steps} steps: loss {result.losses[0]:.4f} -> {result.losses[-1]:.4f}, "
          f"{result.tokens_per_second:.0f} tokens/s; saved {result.checkpoints[-1]}")
    return 0
