#!/usr/bin/env python
"""QA-LoRS on a pruned int4 SmolLM2-135M against "LoRS on the float pruned model, merge, then
quantize", over seeds, with the demo's data and settings (``lors-fx demo --bits 4``).

    python tools/quant_seeds.py --seeds 0 1 2 [--lr 1e-3 --qa-lr LR] --json out/quant_seeds.json

Per seed: ``qa_lors``: the Wanda-50% model quantized (GPTQ, int4 g64, calibrated scales), QA-LoRS
(``LorsConfig(quant_aware=True)``, gradient init) for ``--steps`` steps, merged onto the grid;
``lors_then_quantize``: LoRS on the float pruned model, same steps and seed, merged, then quantized
by the same GPTQ. Both end as sparse int4 models; their perplexities are compared on the same
held-out tokens. Also: merged == trained (QA), the zero-pattern audit, the log-perplexity gap
recovered (to dense, from the pruned int4 model).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import time

import torch

from lors_fx.api import merge
from lors_fx.quantized import quantized_modules
from lors_fx.sparsity import audit, snapshot_masks
from lors_fx.workflows.data import build_lm_splits, calibration_sample, load_texts, split_documents
from lors_fx.workflows.embedded import load_smollm2
from lors_fx.workflows.evaluate import text_perplexity
from lors_fx.workflows.prune import prune_model
from lors_fx.workflows.quantize import quantize_pruned_model
from lors_fx.workflows.train import TrainConfig, prepare_model, train


def _train(model, splits, seed, steps, quant_aware, lr):
    torch.manual_seed(seed)
    init_data = list(splits.train.batches(2, shuffle=True, seed=seed + 99))[:4]
    prepare_model(model, "lors", r=16, init="gradient", init_data=init_data, init_samples=4,
                  progress=False, **({"quant_aware": True} if quant_aware else {}))
    train(model, splits.train, TrainConfig(steps=steps, batch_size=2, lr=lr, seed=seed,
                                           warmup_ratio=0.1, progress=False))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3, help="AdamW learning rate of both runs")
    parser.add_argument("--qa-lr", type=float, default=None,
                        help="the QA-LoRS run's learning rate instead (default: --lr)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    start = time.time()
    model, tokenizer = load_smollm2(torch.float32, progress=False)
    model.config.use_cache = False
    texts = load_texts("embedded")
    _, held = split_documents(len(texts), 0.1, 0)
    held_out = [texts[i] for i in held]
    splits = build_lm_splits(texts, tokenizer, block_size=128, eval_fraction=0.1, seed=0)
    calibration = calibration_sample(splits.train, 16, seed=0)
    ppl = lambda m: text_perplexity(m, tokenizer, held_out, max_length=512, stride=512,
                                    max_tokens=args.eval_tokens, progress=False).perplexity
    result = {"dense": ppl(model)}
    prune_model(model, "wanda", sparsity=0.5, calibration=calibration, progress=False)
    masks = snapshot_masks(model)
    result["pruned"] = ppl(model)
    quantized = copy.deepcopy(model)
    quantize_pruned_model(quantized, 4, args.group_size, method="gptq", calibration=calibration,
                          progress=False)
    result["pruned_int4"] = ppl(quantized)
    print(f"[{time.time() - start:.0f} s] {result}", flush=True)
    gap = math.log(result["pruned_int4"]) - math.log(result["dense"])
    result["seeds"] = []
    for seed in args.seeds:
        row = {"seed": seed}
        qa = copy.deepcopy(quantized)
        _train(qa, splits, seed, args.steps, quant_aware=True,
               lr=args.lr if args.qa_lr is None else args.qa_lr)
        row["qa_trained"] = ppl(qa)
        merge(qa)
        row["qa_merged"] = ppl(qa)
        check = audit(qa, masks)
        row["qa_audit_ok"] = check.ok and not check.lost_nonzeros
        row["qa_quantized_layers"] = len(quantized_modules(qa))
        row["gap_recovered"] = (math.log(result["pruned_int4"]) - math.log(row["qa_merged"])) / gap
        del qa
        floating = copy.deepcopy(model)
        _train(floating, splits, seed, args.steps, quant_aware=False, lr=args.lr)
        row["lors_float_trained"] = ppl(floating)
        merge(floating)
        quantize_pruned_model(floating, 4, args.group_size, method="gptq",
                              calibration=calibration, progress=False)
        row["lors_then_quantize"] = ppl(floating)
        check = audit(floating, masks)
        row["lors_then_quantize_audit_ok"] = check.ok and not check.lost_nonzeros
        del floating
        result["seeds"].append(row)
        print(f"[{time.time() - start:.0f} s] {row}", flush=True)
    result["seconds"] = round(time.time() - start)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
