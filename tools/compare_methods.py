"""Equal-step quality comparison on SmolLM2-135M: LoRS vs SQFT vs SPP, over seeds (CPU, offline).

    python tools/compare_methods.py --pattern 50% --seeds 0 1 2 --json out/compare_50.json
    python tools/compare_methods.py --pattern 2:4 --seeds 0 1 2 --json out/compare_24.json

The protocol of docs/results.md: load the embedded SmolLM2-135M and the embedded English text
(train / held-out split by document, seed 0), Wanda-prune (16 x 128-token calibration blocks,
seed 0) to ``--pattern``; then for every method and seed a deep copy of the pruned model,
``prepare_model(method, r=16, init=...)`` and ``train(TrainConfig(steps, batch_size=2, lr=1e-3,
warmup_ratio=0.1, seed))`` on 2 x 128-token blocks; perplexity on ``--eval-tokens`` held-out
tokens (512-token windows). The gradient init uses 4 shuffled train blocks (seed 99 + seed).
Methods: ``lors`` (gradient init), ``lors-zeros`` (PEFT's init), ``sqft``, ``spp``.

Prints one row per run and, per method, the mean and the spread (max - min) over seeds; writes
every number to ``--json``. Wall times are for the record only (shared cores).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import sys
import time

import torch

METHODS = {"lors": ("lors", "gradient"), "lors-zeros": ("lors", "zeros"), "sqft": ("sqft", None),
           "spp": ("spp", None)}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--pattern", default="50%", help="'50%%' (unstructured) or an N:M like '2:4'")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--eval-tokens", type=int, default=2048)
    p.add_argument("--json", help="write every number here")
    args = p.parse_args(argv)
    if args.steps < 1 or args.eval_tokens < 512:
        p.error("--steps >= 1 and --eval-tokens >= 512")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    from tabulate import tabulate

    from lors_fx.workflows.data import build_lm_splits, calibration_sample, load_texts, split_documents
    from lors_fx.workflows.embedded import load_smollm2
    from lors_fx.workflows.evaluate import text_perplexity
    from lors_fx.workflows.prune import prune_model
    from lors_fx.workflows.train import TrainConfig, prepare_model, train

    torch.manual_seed(0)
    model, tokenizer = load_smollm2(torch.float32, progress=False)
    model.config.use_cache = False
    texts = load_texts("embedded")
    splits = build_lm_splits(texts, tokenizer, block_size=128, eval_fraction=0.1, seed=0)
    held_out = [texts[i] for i in split_documents(len(texts), 0.1, 0)[1]]

    def perplexity(m) -> float:
        return text_perplexity(m, tokenizer, held_out, max_length=512, stride=512,
                               max_tokens=args.eval_tokens, progress=False).perplexity

    dense = perplexity(model)
    unstructured = args.pattern.endswith("%")
    prune_model(model, "wanda", sparsity=float(args.pattern[:-1]) / 100 if unstructured else None,
                pattern=None if unstructured else args.pattern,
                calibration=calibration_sample(splits.train, 16, seed=0), progress=False)
    pruned = perplexity(model)
    print(f"dense {dense:.3f}, wanda {args.pattern} {pruned:.3f}", flush=True)
    rows = []
    for seed in args.seeds:
        for name in args.methods:
            method, init = METHODS[name]
            trial = copy.deepcopy(model)
            init_data = None
            if init == "gradient":
                init_data = list(splits.train.batches(2, shuffle=True, seed=99 + seed))[:4]
            torch.manual_seed(seed)
            prepare_model(trial, method, r=16, init=init, init_data=init_data, progress=False)
            start = time.perf_counter()
            train(trial, splits.train, TrainConfig(steps=args.steps, batch_size=2, lr=1e-3,
                                                   warmup_ratio=0.1, seed=seed, progress=False))
            seconds = time.perf_counter() - start
            ppl = perplexity(trial)
            gap = (math.log(pruned) - math.log(ppl)) / (math.log(pruned) - math.log(dense))
            rows.append(dict(method=name, seed=seed, perplexity=ppl, gap_recovered=gap,
                             train_seconds=seconds))
            print(f"{name:10s} seed {seed}: ppl {ppl:.3f} ({gap:.1%} of the gap), "
                  f"{seconds:.0f} s", flush=True)
            del trial
    summary = []
    for name in args.methods:
        values = [r["perplexity"] for r in rows if r["method"] == name]
        summary.append([name, len(values), f"{statistics.mean(values):.3f}",
                        f"{max(values) - min(values):.3f}",
                        " / ".join(f"{v:.3f}" for v in values)])
    print(f"\nSmolLM2-135M, Wanda {args.pattern} (dense {dense:.3f}, pruned {pruned:.3f}), "
          f"{args.steps} steps, held-out perplexity:")
    print(tabulate(summary, headers=["method", "seeds", "mean", "spread", "per seed"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(dict(vars(args), dense=dense, pruned=pruned, rows=rows), handle, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
