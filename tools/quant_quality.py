#!/usr/bin/env python
"""Quality of quantization-aware LoRS on a pruned + int4 SmolLM2-135M, against LoRS-then-quantize.

Usage::

    python tools/quant_quality.py [--seeds 0 1 2] [--steps 100] [--bits 4] [--group-size 64]
                                  [--eval-tokens 4096] [--json FILE] [--model smollm2|tiny]

The demo's data and settings (``lors-fx demo``, docs/results.md), so the numbers compare:
SmolLM2-135M-Instruct (embedded), gensim's ``lee_background`` split by document (seed 0), Wanda 50%
per output row on 16 calibration blocks of 128 tokens, r=16, alpha=32, gradient init on 4 shuffled
train batches (seed ``99 + seed``), AdamW lr 1e-3, 10% warm-up then cosine, ``--steps`` steps of
2 x 128 tokens, perplexity on the first ``--eval-tokens`` held-out tokens in 512-token windows.
The pruned model (and its masks) is the same for every seed; the seed sets the init data and the
training order.

Rows (each seed):

- ``qa_lors``: the pruned model quantized round-to-nearest (``quantize_model(QuantSpec(bits,
  group))``), QA-LoRS (``LorsConfig(quant_aware=True)``, eager op), trained, then merged
  (``lors_fx.merge``: the codes of ``Q(W')`` on the base's grid); perplexity before and after
  the merge (they must agree to 1e-4 relative).
- ``lors_then_rtn``: LoRS on the float (fp32) pruned model, same steps, merged, then quantized
  round-to-nearest with the same spec (scales recomputed from the merged weights: the usual
  post-hoc pipeline); ``lors_then_base_grid``: the merged float weights rounded onto the
  quantized base's own scales instead (the grid QA-LoRS trains on).

Rounding (``--rounding``): ``rtn`` (default) and ``gptq`` are
:func:`lors_fx.workflows.quantize.quantize_pruned_model` on the pruning's 16 calibration blocks
(round to nearest on searched, calibrated scales; GPTQ with the mask fixed); ``keep`` is
:func:`lors_fx.quantized.quantize_model` with ``absmax / qmax`` scales (a kept weight
that rounds to 0 gets code +-1, so the mask survives quantization); ``plain`` is round to nearest
on the same scales, where such a weight becomes code 0: pruned from then on (counted as
``rounded_to_zero``), and the quantized base's zero pattern is the one training and merge keep.
On SmolLM2 the ``keep`` rule is harmful: the few kept weights it lifts to +-1 sit in groups whose
absmax is an outlier, so they grow by orders of magnitude (docs/quantized.md).

Audit of the merged QA model: against the pruned model's masks (``lors_fx.snapshot_masks`` /
``lors_fx.audit``): new nonzeros (must be 0) and kept weights turned to 0 (must be 0); the codes'
zero pattern equals the mask (``check_codes_match_mask``); every kept weight on its grid: the
scales are bit for bit the base's and every code is within ``[-qmax - 1, qmax]``.

The goals printed at the end: QA-LoRS recovers >= 50% of the log-perplexity gap between the
pruned int4 model and the dense model; QA-LoRS (merged) beats ``lors_then_rtn`` at equal steps;
merged == trained; the audit is clean.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import sys
import time

import torch
from torch import nn

import lors_fx
from lors_fx._nn import is_linear_like, matches_any, replace_module
from lors_fx.quant import (QMAX, QuantSpec, compute_scales, dequantize, pack_codes,
                           resolve_group_size, round_to_codes)
from lors_fx.quantized import (QuantizedLinear, check_codes_match_mask, quantize_model,
                               quantized_modules)
from lors_fx.sparsity import audit, snapshot_masks
from lors_fx.workflows.data import (ByteTokenizer, build_lm_splits, calibration_sample,
                                    load_texts, split_documents)
from lors_fx.workflows.evaluate import text_perplexity
from lors_fx.workflows.prune import prune_model
from lors_fx.workflows.quantize import quantize_pruned_model
from lors_fx.workflows.train import TrainConfig, prepare_model, train

try:
    from tabulate import tabulate
except ImportError:  # pragma: no cover - tabulate is a dependency
    tabulate = None

MERGE_TOLERANCE = 1e-4
GAP_GOAL = 0.5


class Setup:
    """The model, tokenizer, data splits and held-out text shared by every row and seed."""

    def __init__(self, args):
        self.args = args
        if args.model == "smollm2":
            from lors_fx.workflows.embedded import load_smollm2
            self.model, self.tokenizer = load_smollm2(torch.float32, progress=False)
            texts = load_texts("embedded")
        else:
            self.model, self.tokenizer, texts = _tiny(args.seed_data)
        self.model.config.use_cache = False
        self.splits = build_lm_splits(texts, self.tokenizer, block_size=args.seq_len,
                                      eval_fraction=0.1, seed=args.seed_data)
        _, held_out = split_documents(len(texts), 0.1, args.seed_data)
        self.held_out = [texts[i] for i in held_out]

    def perplexity(self, model: nn.Module) -> float:
        """Held-out perplexity, as the demo measures it."""
        with torch.no_grad():
            return text_perplexity(model, self.tokenizer, self.held_out,
                                   max_length=self.args.max_length, stride=self.args.max_length,
                                   max_tokens=self.args.eval_tokens).perplexity

    def init_data(self, seed: int) -> list:
        return list(self.splits.train.batches(self.args.batch_size, shuffle=True,
                                              seed=seed + 99))[: self.args.init_samples]


def _codes(weight: torch.Tensor, scales: torch.Tensor, bits: int, rounding: str) -> torch.Tensor:
    """int8 codes of ``weight`` on ``scales``: ``keep`` = lors_fx's rule (a kept weight that
    rounds to 0 gets code +-1); ``plain`` = round to nearest, such a weight becomes code 0."""
    kept = weight != 0
    if rounding == "plain":
        d_out, d_in = weight.shape
        ratio = weight.float().view(d_out, scales.shape[1], -1) / scales.float().unsqueeze(-1)
        kept = kept & (ratio.round() != 0).view(d_out, d_in)
    return round_to_codes(weight, scales, kept, bits)


@torch.no_grad()
def quantize(model: nn.Module, spec: QuantSpec, rounding: str, calibration=None) -> int:
    """Quantize every linear but ``lm_head`` (``--rounding``, module docstring); returns how many
    kept weights became code 0."""
    if rounding in ("rtn", "gptq"):
        quantize_pruned_model(model, spec.bits, spec.group_size, rounding, calibration,
                              progress=False)
        return 0
    if rounding == "keep":
        quantize_model(model, spec)
        return 0
    lost = 0
    for name, module in list(model.named_modules()):
        if not is_linear_like(module) or matches_any(name, ("lm_head",)):
            continue
        weight = module.weight.detach()
        group = resolve_group_size(spec, weight.shape[1], name)
        scales = compute_scales(weight, spec.bits, group)
        codes = _codes(weight, scales, spec.bits, rounding)
        lost += int(((weight != 0) & (codes == 0)).sum())
        bias = None if module.bias is None else module.bias.detach()
        replace_module(model, name, QuantizedLinear.from_codes(codes, scales, spec.bits, bias,
                                                               name=name))
    return lost


def _tiny(seed: int):
    """A tiny Llama on bytes and a synthetic corpus (tests: no embedded wheel needed)."""
    import transformers
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=ByteTokenizer.vocab_size, use_cache=False)
    words = "the a model weight sparse grid code adapter merge prune train token".split()
    generator = torch.Generator().manual_seed(seed)
    texts = [" ".join(words[int(i)] for i in torch.randint(len(words), (60,),
                                                            generator=generator))
             for _ in range(30)]
    return transformers.LlamaForCausalLM(config), ByteTokenizer(), texts


def _train(setup: Setup, model: nn.Module, seed: int, **lors_options) -> dict:
    """LoRS with the demo's settings on ``model`` (in place); returns its timings and losses."""
    args = setup.args
    start = time.perf_counter()
    prepare_model(model, "lors", r=args.rank, init="gradient", init_data=setup.init_data(seed),
                  init_samples=args.init_samples, progress=False, **lors_options)
    history = train(model, setup.splits.train, TrainConfig(
        steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=seed, warmup_ratio=0.1,
        progress=args.progress))
    return {"train_seconds": time.perf_counter() - start,
            "step_seconds_median": sorted(history.step_seconds)[len(history.step_seconds) // 2],
            "loss_first": history.losses[0], "loss_last": history.losses[-1]}


def audit_quantized(model: nn.Module, masks: dict, base_scales: dict, bits: int) -> dict:
    """The merged quantized model against the pruned model's masks and the base's grid."""
    result = audit(model, masks)
    codes_match, off_grid = [], []
    for name, module in quantized_modules(model).items():
        try:
            check_codes_match_mask(module.codes, masks[name], name)
        except ValueError:
            codes_match.append(name)
        codes = module.codes.int()  # the grid is [-qmax - 1, qmax] (two's complement)
        if not torch.equal(module.weight_scale, base_scales[name]) or \
                int(codes.amax()) > QMAX[bits] or int(codes.amin()) < -QMAX[bits] - 1:
            off_grid.append(name)
    return {"audit_ok": result.ok, "checked": result.checked,
            "new_nonzeros": sum(result.new_nonzeros.values()),
            "lost_nonzeros": sum(result.lost_nonzeros.values()),
            "codes_differ_from_mask": codes_match, "off_grid": off_grid,
            "clean": result.ok and not result.lost_nonzeros and not codes_match and not off_grid}


def run_qa(setup: Setup, quantized: nn.Module, masks: dict, seed: int) -> dict:
    """QA-LoRS on a copy of the quantized pruned model: train, measure, merge, measure, audit."""
    model = copy.deepcopy(quantized)
    base_scales = {n: m.weight_scale.clone() for n, m in quantized_modules(quantized).items()}
    timings = _train(setup, model, seed, quant_aware=True)
    tuned = setup.perplexity(model)
    lors_fx.merge(model)
    merged = setup.perplexity(model)
    checks = audit_quantized(model, masks, base_scales, setup.args.bits)
    return {"ppl_tuned": tuned, "ppl_merged": merged,
            "merge_relative_difference": abs(merged - tuned) / tuned, **timings, **checks}


@torch.no_grad()
def _onto_grid(model: nn.Module, quantized: nn.Module, bits: int, rounding: str) -> None:
    """Replace each merged float linear's weight by its rounding on the quantized base's scales."""
    for name, base in quantized_modules(quantized).items():
        linear = model.get_submodule(name)
        weight = linear.weight.detach()
        codes = _codes(weight, base.weight_scale.to(weight.dtype), bits,
                       "plain" if rounding == "plain" else "keep")
        packed = pack_codes(codes, bits)
        linear.weight.copy_(dequantize(packed, base.weight_scale, bits, dtype=weight.dtype))


def run_float_then_quantize(setup: Setup, pruned: nn.Module, quantized: nn.Module,
                            seed: int) -> dict:
    """LoRS on the float pruned model, merged, then quantized two ways (module docstring)."""
    args = setup.args
    model = copy.deepcopy(pruned)
    timings = _train(setup, model, seed)
    tuned = setup.perplexity(model)
    lors_fx.merge(model)
    on_grid = copy.deepcopy(model)
    _onto_grid(on_grid, quantized, args.bits, args.rounding)
    quantize(model, QuantSpec(args.bits, args.group_size), args.rounding, setup.calibration)
    return {"ppl_tuned_float": tuned, "ppl_rtn": setup.perplexity(model),
            "ppl_base_grid": setup.perplexity(on_grid), **timings}


def _gap(start: float, dense: float, end: float):
    gap = math.log(start) - math.log(dense)
    return (math.log(start) - math.log(end)) / gap if gap > 0 else None


def prepare(setup: Setup, log) -> tuple:
    """Dense, pruned and pruned+quantized models and their perplexities."""
    args = setup.args
    ppl = {"dense": setup.perplexity(setup.model)}
    log(f"dense perplexity {ppl['dense']:.3f}; pruning: {args.prune} {args.sparsity}")
    calibration = calibration_sample(setup.splits.train, args.calib_samples, seed=args.seed_data)
    setup.calibration = calibration  # the quantizers' calibration too (rtn scales, gptq)
    prune_model(setup.model, args.prune, sparsity=args.sparsity, calibration=calibration,
                progress=False)
    pruned_masks = snapshot_masks(setup.model)
    ppl["pruned"] = setup.perplexity(setup.model)
    quantized = copy.deepcopy(setup.model)
    quantize(quantized, QuantSpec(args.bits, args.group_size), args.rounding, calibration)
    masks = snapshot_masks(quantized)  # the quantized base's zero pattern: what training keeps
    lost = sum(int((pruned_masks[n] & ~m).sum()) for n, m in masks.items())
    kept = sum(int(m.sum()) for m in pruned_masks.values())
    ppl["pruned_quantized"] = setup.perplexity(quantized)
    log(f"pruned {ppl['pruned']:.3f}, pruned + int{args.bits} ({args.rounding}) "
        f"{ppl['pruned_quantized']:.3f}; {lost} of {kept} kept weights rounded to 0")
    return ppl, masks, quantized, {"kept_weights": kept, "rounded_to_zero": lost}


def run(args) -> dict:
    """Every seed; returns the JSON-ready result."""
    start = time.perf_counter()

    def log(text):
        print(f"[quant_quality {time.perf_counter() - start:7.1f} s] {text}", file=sys.stderr,
              flush=True)

    setup = Setup(args)
    ppl, masks, quantized, rounding = prepare(setup, log)
    seeds = []
    for seed in args.seeds:
        log(f"seed {seed}: QA-LoRS on the int{args.bits} base")
        qa = run_qa(setup, quantized, masks, seed)
        log(f"seed {seed}: LoRS on the float base, merge, quantize")
        post = run_float_then_quantize(setup, setup.model, quantized, seed)
        seeds.append({"seed": seed, "qa_lors": qa, "lors_then_quantize": post,
                      "gap_recovered": _gap(ppl["pruned_quantized"], ppl["dense"],
                                            qa["ppl_merged"]),
                      "gap_recovered_lors_then_rtn": _gap(ppl["pruned_quantized"], ppl["dense"],
                                                          post["ppl_rtn"])})
        log(f"seed {seed}: QA {qa['ppl_merged']:.3f}, LoRS then RTN {post['ppl_rtn']:.3f}")
    return {"schema": "lors_fx.quant_quality/1", "settings": {
                k: v for k, v in vars(args).items() if k != "json_path"},
            "machine": {"platform": platform.platform(), "torch": torch.__version__,
                        "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
            "perplexity": ppl, "quantization": rounding, "seeds": seeds, "goals": goals(seeds),
            "seconds": round(time.perf_counter() - start, 1)}


def goals(seeds: list) -> list:
    """The issue's quality goals, one per seed."""
    out = []
    for s in seeds:
        qa, post = s["qa_lors"], s["lors_then_quantize"]
        out += [
            {"seed": s["seed"], "goal": f"QA-LoRS recovers >= {GAP_GOAL:.0%} of the log gap",
             "value": s["gap_recovered"], "holds": s["gap_recovered"] is not None
             and s["gap_recovered"] >= GAP_GOAL},
            {"seed": s["seed"], "goal": "QA-LoRS ppl < LoRS then RTN ppl",
             "value": qa["ppl_merged"] / post["ppl_rtn"],
             "holds": qa["ppl_merged"] < post["ppl_rtn"]},
            {"seed": s["seed"], "goal": f"merged == trained (rel <= {MERGE_TOLERANCE:g})",
             "value": qa["merge_relative_difference"],
             "holds": qa["merge_relative_difference"] <= MERGE_TOLERANCE},
            {"seed": s["seed"], "goal": "audit: 0 new / 0 lost nonzeros, codes == mask, on grid",
             "value": qa["new_nonzeros"] + qa["lost_nonzeros"], "holds": qa["clean"]}]
    return out


def format_tables(result: dict) -> str:
    """The per-seed table and the goals."""
    ppl = result["perplexity"]
    settings, lost = result["settings"], result["quantization"]
    head = (f"dense {ppl['dense']:.3f}, pruned {ppl['pruned']:.3f}, pruned + "
            f"int{settings['bits']} g{settings['group_size']} ({settings['rounding']} rounding: "
            f"{lost['rounded_to_zero']} of {lost['kept_weights']} kept weights rounded to 0) "
            f"{ppl['pruned_quantized']:.3f}")
    rows = [[s["seed"], s["qa_lors"]["ppl_tuned"], s["qa_lors"]["ppl_merged"],
             s["gap_recovered"], s["lors_then_quantize"]["ppl_tuned_float"],
             s["lors_then_quantize"]["ppl_rtn"], s["lors_then_quantize"]["ppl_base_grid"],
             s["gap_recovered_lors_then_rtn"], s["qa_lors"]["new_nonzeros"],
             s["qa_lors"]["lost_nonzeros"]] for s in result["seeds"]]
    headers = ["seed", "QA-LoRS", "QA merged", "gap rec.", "LoRS fp32", "LoRS->RTN",
               "LoRS->base grid", "gap rec. (->RTN)", "new nz", "lost nz"]
    if tabulate is None:
        return json.dumps(result, indent=1)
    goal_rows = [[g["seed"], g["goal"], g["value"], g["holds"]] for g in result["goals"]]
    return "\n\n".join([head, tabulate(rows, headers=headers, floatfmt=".4g"),
                        tabulate(goal_rows, headers=["seed", "goal", "value", "holds"],
                                 floatfmt=".4g")])


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (module docstring); ``--quick``: tiny model, 2 steps, 1 seed."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", choices=("smollm2", "tiny"), default="smollm2")
    add("--seeds", type=int, nargs="+", default=[0, 1, 2])
    add("--steps", type=int, default=100)
    add("--bits", type=int, choices=(4, 8), default=4)
    add("--group-size", type=int, default=64, help="SmolLM2's d_in 576 is not a multiple of 128")
    add("--rounding", choices=("rtn", "gptq", "keep", "plain"), default="rtn",
        help="rtn / gptq: lors_fx.workflows.quantize.quantize_pruned_model (calibrated scales, "
             "on the calibration blocks); keep: quantize_model (absmax scales; a kept weight "
             "never rounds to 0: code +-1); plain: absmax scales, round to nearest, kept weights "
             "that round to 0 become pruned at quantization")
    add("--prune", choices=("wanda", "magnitude", "sparsegpt"), default="wanda")
    add("--sparsity", type=float, default=0.5)
    add("--rank", type=int, default=16)
    add("--lr", type=float, default=1e-3)
    add("--batch-size", type=int, default=2)
    add("--seq-len", type=int, default=128)
    add("--init-samples", type=int, default=4)
    add("--calib-samples", type=int, default=16)
    add("--eval-tokens", type=int, default=4096)
    add("--max-length", type=int, default=512)
    add("--seed-data", type=int, default=0, help="data split and calibration seed")
    add("--progress", action="store_true", help="a progress bar over the training steps")
    add("--quick", action="store_true")
    add("--json", dest="json_path")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.seeds, args.steps, args.group_size = "tiny", [0], 2, 32
        args.seq_len, args.eval_tokens, args.max_length, args.calib_samples = 32, 256, 64, 4
        args.init_samples, args.rank = 1, 4
    return args


def main(argv=None) -> dict:
    """Run, print the tables, write JSON; returns the result."""
    args = parse_args(argv)
    result = run(args)
    print(format_tables(result), flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1)
        print(f"json written to {args.json_path}")
    return result


if __name__ == "__main__":
    main()
