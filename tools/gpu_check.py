"""GPU check: the op's correctness, the benchmark, compile, 2:4 kernels and FSDP2, in one run.

    pip install --no-deps --no-build-isolation -e . && python tools/gpu_check.py --json gpu.json
    python tools/gpu_check.py --device cpu --quick --json cpu.json     # CPU smoke run (< 2 min)
    python tools/gpu_check.py --parts 1,4 --json p.json                # a subset

Installs nothing, needs no network, and is sized to finish in under 8 minutes on one H200 (a
``--budget-s`` deadline skips what is left past it). Parts:

1. correctness: the op (:func:`lors_fx.ops.sparse_lora_linear`) on the device, fp32 and bf16,
   ``grad_mode`` lors/exact, recompute on/off, 2-D/3-D inputs, a 2:4 and a 50% unstructured base,
   against a CPU float64 reference (:func:`~lors_fx.ops.reference_sparse_lora_linear` for exact,
   :func:`~lors_fx.methods.baselines.lors_closed_form` for lors); error = max |diff| / max |ref|
   of y, dx, dA, dB, within :data:`TOLERANCES`. Then 20 AdamW steps of ``optimize(compile=False)``
   on the toy Llama, merge, audit (no new nonzero, no kept weight lost), and a bf16 merge rigged so
   kept weights cancel to 0 (merged zeros == base zeros, pruned bits unchanged).
2. benchmark: :func:`lors_fx.bench.harness.run_case` on a Llama-2-7B MLP (4096<->11008) and
   attention (4096x4096) layer, bf16, T 2048/8192, r 16/64: LoRS (the op) against LoRA, SQFT and
   SPP: step time, saved bytes, peak (``torch.cuda.max_memory_allocated`` above the step's start)
   and LoRS's fraction of the plain bf16 matmul roofline of the same shapes.
3. compile: ``optimize(..., LorsConfig(fw_compiler="inductor", bw_compiler="inductor"))`` on the
   toy Llama and a SmolLM2-135M-shaped Llama (random weights, 50% pruned): graphs, breaks,
   recompiles, saved bytes (:func:`lors_fx.report`), step time against the eager op.
4. 2:4 kernels (CUDA): ``x @ W'.T`` through :mod:`lors_fx.semi_structured` against dense, at the
   part-2 shapes, with and without compressing ``W'`` (which a training step must do every step).
5. FSDP2: ``tools/train_fsdp.py`` under torchrun, one process (nccl on CUDA, gloo on CPU).

``--quick``: small shapes (MLP 256<->688, T=64), few repeats; a CPU run always takes the small
shapes, with one intra-op thread unless ``--threads`` or ``OMP_NUM_THREADS`` says otherwise (the
shapes are tiny, and oversubscribed shared cores slow them down many times). Each part is
wrapped: an exception is recorded (``status: "error: ..."`` and the last frames of its
traceback) and the next part runs; the JSON is rewritten after each part, so a crashed process
leaves the parts done so far.
Part statuses: ``ok``, ``failed`` (a check did not hold), ``partial`` (some rows errored),
``error: ...``, ``skipped: <reason>``. JSON: ``{"schema", "machine", "args", "parts": {"1":
{"name", "status", "seconds", "summary", "tables", ...}}}``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import importlib.metadata
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import torch
import torch.nn.functional as F
from tabulate import tabulate

import lors_fx
from lors_fx import LorsConfig
from lors_fx.bench.harness import run_case
from lors_fx.methods.baselines import lors_closed_form
from lors_fx.methods.measure import saved_bytes
from lors_fx.ops import (build_merged_weight, masked_update_nonzeros, reference_sparse_lora_linear,
                         sparse_lora_linear)
from lors_fx.semi_structured import (compress_semi_structured, semi_structured_linear,
                                     semi_structured_status)
from lors_fx.testing.toy import build_toy_llama, toy_batches
from lors_fx.workflows.prune import magnitude_prune_

SCHEMA = "lors_fx.gpu_check/1"
REPO = Path(__file__).resolve().parents[1]
PART_NAMES = {1: "correctness", 2: "benchmark", 3: "compile", 4: "semi-structured 2:4",
              5: "FSDP2"}
#: max |device - float64 reference| / max |reference|, per output and gradient, by dtype
TOLERANCES = {"fp32": 1e-4, "bf16": 3e-2}
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
NO_CUDA = "skipped: no CUDA"


def _no_cuda() -> str:
    """The status of a CUDA-only part run without CUDA."""
    if torch.cuda.is_available():
        return f"{NO_CUDA} device selected (--device cpu)"
    return NO_CUDA


@dataclass
class Context:
    """What every part gets: the device, the size of the run and the deadline."""

    device: torch.device
    quick: bool
    deadline: float

    @property
    def cuda(self) -> bool:
        """The run is on a CUDA device."""
        return self.device.type == "cuda"

    def over_budget(self) -> bool:
        """``--budget-s`` is spent: start no new case."""
        return time.monotonic() > self.deadline


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], object], device: torch.device, repeats: int, warmup: int = 2,
             inner: int = 1) -> float:
    """Median milliseconds of one ``fn()`` call over ``repeats`` rounds of ``inner`` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
    return 1e3 * statistics.median(times)


def _rel_err(got: torch.Tensor, ref: torch.Tensor) -> float:
    ref = ref.detach().double().cpu()
    err = (got.detach().double().cpu() - ref).abs().max().item()
    return err / max(ref.abs().max().item(), 1e-30)


def _mib(nbytes: Optional[int]) -> Optional[float]:
    return None if nbytes is None else nbytes / 2**20


def _table(title: str, headers: List[str], rows: List[list]) -> dict:
    return {"title": title, "headers": headers, "rows": rows}


# ---------------------------------------------------------------------------------------------
# Part 1: correctness
# ---------------------------------------------------------------------------------------------

def _op_inputs(sizes: dict, base: str, dtype: torch.dtype, three_d: bool, seed: int) -> dict:
    """CPU tensors of one op case, already rounded to ``dtype`` (adapters stay float32, the
    library's default for a half-precision base)."""
    d_out, d_in, r, tokens = sizes["d_out"], sizes["d_in"], sizes["r"], sizes["tokens"]
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator)
    if base == "2:4":
        magnitude_prune_(weight, pattern="2:4")
    else:
        magnitude_prune_(weight, 0.5)
    lead = (2, tokens // 2) if three_d else (tokens,)
    return {"weight": weight.to(dtype),
            "lora_A": torch.randn(r, d_in, generator=generator) / d_in ** 0.5,
            "lora_B": torch.randn(d_out, r, generator=generator) * 0.1,
            "bias": torch.randn(d_out, generator=generator).to(dtype) if three_d else None,
            "x": torch.randn(*lead, d_in, generator=generator).to(dtype),
            "grad_y": torch.randn(*lead, d_out, generator=generator).to(dtype)}


def _op_reference(inputs: dict, grad_mode: str, scaling: float) -> list:
    """``[y, dx, dA, dB]`` in float64 on CPU."""
    x, A, B = (inputs[k].double().requires_grad_() for k in ("x", "lora_A", "lora_B"))
    bias = None if inputs["bias"] is None else inputs["bias"].double()
    formula = lors_closed_form if grad_mode == "lors" else reference_sparse_lora_linear
    y = formula(x, inputs["weight"].double(), A, B, bias, scaling)
    return [y, *torch.autograd.grad(y, (x, A, B), inputs["grad_y"].double())]


def _op_on_device(inputs: dict, grad_mode: str, recompute: bool, scaling: float,
                  device: torch.device) -> list:
    """``[y, dx, dA, dB]`` of the op on ``device``; the exact mode in 8-row chunks."""
    on = {k: None if v is None else v.to(device, copy=True) for k, v in inputs.items()}
    x, A, B = (on[k].requires_grad_() for k in ("x", "lora_A", "lora_B"))
    weight = on["weight"]
    chunk_bytes = 2 * 8 * weight.shape[1] * weight.element_size()
    y = sparse_lora_linear(x, weight, A, B, bias=on["bias"], scaling=scaling,
                           grad_mode=grad_mode, recompute=recompute, chunk_bytes=chunk_bytes)
    return [y, *torch.autograd.grad(y, (x, A, B), on["grad_y"])]


def _op_checks(ctx: Context) -> List[dict]:
    """Every op case: dtype x grad_mode x recompute x input rank x base."""
    sizes = ({"d_out": 64, "d_in": 128, "r": 8, "tokens": 32} if ctx.quick else
             {"d_out": 384, "d_in": 1024, "r": 16, "tokens": 256})
    scaling, checks = 2.0, []
    for dtype_name in DTYPES:
        for base in ("2:4", "50%"):
            for three_d in (False, True):
                inputs = _op_inputs(sizes, base, DTYPES[dtype_name], three_d, seed=len(checks))
                for grad_mode in ("lors", "exact"):
                    reference = _op_reference(inputs, grad_mode, scaling)
                    for recompute in (True, False):
                        got = _op_on_device(inputs, grad_mode, recompute, scaling, ctx.device)
                        errors = [_rel_err(g, r) for g, r in zip(got, reference)]
                        checks.append({
                            "check": "op", "dtype": dtype_name, "grad_mode": grad_mode,
                            "recompute": recompute, "input": "3-D" if three_d else "2-D",
                            "base": base, "err_y": errors[0], "err_dx": errors[1],
                            "err_dA": errors[2], "err_dB": errors[3],
                            "tolerance": TOLERANCES[dtype_name],
                            "passed": max(errors) <= TOLERANCES[dtype_name]})
    return checks


def _train_merge_check(ctx: Context, dtype_name: str, steps: int = 20) -> dict:
    """20 AdamW steps of the eager op on the toy Llama, then merge and audit."""
    torch.manual_seed(0)
    model = build_toy_llama(seed=0).to(device=ctx.device, dtype=DTYPES[dtype_name])
    masks = lors_fx.snapshot_masks(model)
    lors_fx.optimize(model, LorsConfig(r=8, lora_alpha=16), compile=False)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    losses = []
    for batch in toy_batches(steps, seed=0):
        loss = model(**{k: v.to(ctx.device) for k, v in batch.items()}).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    outside = sum(masked_update_nonzeros(m.true_weight(), m.lora_A, m.lora_B, m.scaling)
                  for m in lors_fx.lors_modules(model).values())
    lors_fx.merge(model)
    result = lors_fx.audit(model, masks)
    lost = sum(result.lost_nonzeros.values())
    finite = all(map(math.isfinite, losses))
    return {"check": "train+merge", "dtype": dtype_name, "steps": steps,
            "loss_first": losses[0], "loss_last": losses[-1],
            "w_prime_nonzeros_outside_mask": outside, "audit": result.summary(),
            "new_nonzeros": sum(result.new_nonzeros.values()), "lost_nonzeros": lost,
            "passed": bool(result.ok and outside == 0 and lost == 0 and finite
                           and losses[-1] < losses[0])}


def _merge_bits_check(ctx: Context) -> dict:
    """bf16 merge with kept weights rigged to cancel to exactly 0 (W = -s*B@A there): the merged
    weight must keep every kept weight nonzero (``finfo.tiny``) and the pruned bits unchanged."""
    generator = torch.Generator().manual_seed(3)
    d_out, d_in = 64, 128
    weight = torch.randn(d_out, d_in, generator=generator)
    magnitude_prune_(weight, 0.5)
    weight = weight.to(torch.bfloat16)
    column = torch.randn(d_out, generator=generator).to(torch.bfloat16).float()
    lora_A, lora_B = torch.ones(1, d_in), column[:, None].clone()
    rows = torch.arange(0, d_out, 2)
    first_kept = (weight != 0).float().argmax(1)
    weight[rows, first_kept[rows]] = (-column[rows]).to(torch.bfloat16)
    merged = build_merged_weight(weight.to(ctx.device), lora_A.to(ctx.device),
                                 lora_B.to(ctx.device), 1.0).cpu()
    mask = weight != 0
    same_zeros = torch.equal(merged == 0, ~mask)
    pruned_bits = torch.equal(merged[~mask].view(torch.int16), weight[~mask].view(torch.int16))
    rescued = int(((merged.abs() == torch.finfo(torch.bfloat16).tiny) & mask).sum())
    return {"check": "bf16 merge bits", "dtype": "bf16", "rigged": len(rows),
            "rescued_to_tiny": rescued, "zeros_equal_base_zeros": same_zeros,
            "pruned_bits_unchanged": pruned_bits,
            "passed": bool(same_zeros and pruned_bits and rescued >= len(rows))}


def part_correctness(ctx: Context) -> dict:
    """Part 1: the op against float64, the zero pattern after training and merge, merge bits."""
    op_checks = _op_checks(ctx)
    other = [_train_merge_check(ctx, name) for name in DTYPES] + [_merge_bits_check(ctx)]
    checks = op_checks + other
    failed = [c for c in checks if not c["passed"]]
    op_rows = [[c["dtype"], c["grad_mode"], c["recompute"], c["input"], c["base"], c["err_y"],
                c["err_dx"], c["err_dA"], c["err_dB"], c["tolerance"], c["passed"]]
               for c in op_checks]
    other_rows = [[c["check"], c["dtype"],
                   ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                             for k, v in c.items() if k not in ("check", "dtype", "passed",
                                                                "audit")),
                   c["passed"]] for c in other]
    worst = {name: max(c[k] for c in op_checks if c["dtype"] == name
                       for k in ("err_y", "err_dx", "err_dA", "err_dB")) for name in DTYPES}
    return {"status": "ok" if not failed else "failed", "checks": checks,
            "tolerances": TOLERANCES,
            "summary": (f"{len(checks) - len(failed)}/{len(checks)} checks passed; worst op "
                        "error " + ", ".join(f"{k} {v:.2e}" for k, v in worst.items())),
            "tables": [
                _table("op vs float64 reference (max |diff| / max |ref|)",
                       ["dtype", "grad", "recompute", "x", "base", "y", "dx", "dA", "dB", "tol",
                        "pass"], op_rows),
                _table("zero pattern and merge", ["check", "dtype", "details", "pass"],
                       other_rows)]}


# ---------------------------------------------------------------------------------------------
# Part 2: benchmark (the harness of lors_fx.bench)
# ---------------------------------------------------------------------------------------------

BENCH_METHODS = ["lora", "sqft", "spp", "lors"]


def _bench_grid(ctx: Context) -> dict:
    if ctx.quick:  # scale 1/16: MLP 256 <-> 688, attention 256 (2 heads)
        return {"scale": 1 / 16, "tokens": [64], "ranks": [16], "steps": 3, "warmup": 1}
    return {"scale": 1.0, "tokens": [2048, 8192], "ranks": [16, 64], "steps": 10, "warmup": 2}


def _bench_rows(case: dict) -> List[list]:
    rows = []
    for row in case["rows"]:
        rows.append([case["workload"], case["tokens"], case["r"], row["method"], row["step_ms"],
                     row["vs_lora"], _mib(row["saved_bytes"]), row["saved_vs_lora"],
                     _mib(row["peak_bytes"]), row["peak_vs_sqft"], row["roofline_frac"],
                     case["matmul_gflops"], row["rel_err_y"], row["rel_err_grad"],
                     "" if row["status"] == "ok" else row["status"]])
    return rows


def part_benchmark(ctx: Context) -> dict:
    """Part 2: LoRS vs LoRA, SQFT, SPP through :func:`lors_fx.bench.harness.run_case`, bf16."""
    grid = _bench_grid(ctx)
    cases, skipped, failed = [], [], []
    for workload in ("llama_mlp", "llama_attn"):
        for tokens in grid["tokens"]:
            for r in grid["ranks"]:
                if ctx.over_budget():
                    skipped.append(f"{workload} T={tokens} r={r}")
                    continue
                args = argparse.Namespace(
                    device=str(ctx.device), seed=0, scale=grid["scale"], layers=None,
                    config=None, sparsity=0.5, alpha=None, warmup=grid["warmup"],
                    no_memory=False, steps=grid["steps"])
                try:
                    cases.append(run_case(workload, tokens, r, "bf16", BENCH_METHODS, args))
                except Exception as error:  # e.g. out of memory building the case: recorded
                    failed.append({"case": f"{workload} T={tokens} r={r}",
                                   "error": f"{type(error).__name__}: {str(error)[:300]}",
                                   "traceback": _traceback_tail(error)})
                gc.collect()
                if ctx.cuda:
                    torch.cuda.empty_cache()
    rows = [row for case in cases for row in case["rows"]]
    bad = [r for r in rows if r["status"] != "ok"]
    lors = [r for r in rows if r["method"] == "lors" and r["step_ms"] is not None]
    summary = (f"{len(cases)} cases; lors step x LoRA "
               f"{min(r['vs_lora'] for r in lors):.2f}-{max(r['vs_lora'] for r in lors):.2f}, "
               f"roofline {min(r['roofline_frac'] for r in lors):.2f}-"
               f"{max(r['roofline_frac'] for r in lors):.2f}" if lors else "no lors row ran")
    status = "ok" if not (bad or skipped or failed) else "partial"
    headers = ["workload", "T", "r", "method", "step ms", "xLoRA", "saved MiB", "saved xLoRA",
               "peak MiB", "peak xSQFT", "roofline", "matmul GFLOP/s", "rel err y",
               "rel err grad", "status"]
    summary += f"; over budget, not run: {skipped}" if skipped else ""
    summary += f"; cases that raised: {[f['case'] for f in failed]}" if failed else ""
    return {"status": status, "summary": summary,
            "grid": grid, "methods": BENCH_METHODS, "cases": cases, "not_run": skipped,
            "failed_cases": failed,
            "peak_memory_method": ("torch.cuda.max_memory_allocated above the step's start"
                                   if ctx.cuda else "CPU profiler allocation events"),
            "tables": [_table("bf16, 50% unstructured; roofline = GFLOP/s over plain matmuls of "
                              "the same shapes", headers,
                              [row for case in cases for row in _bench_rows(case)])]}


# ---------------------------------------------------------------------------------------------
# Part 3: compile (inductor) against the eager op
# ---------------------------------------------------------------------------------------------

def _smollm2_shaped(layers: int, seed: int = 0) -> torch.nn.Module:
    """A Llama with SmolLM2-135M's shapes (hidden 576, intermediate 1536, 9/3 heads), ``layers``
    layers, vocab 8192, random weights 50% magnitude-pruned per row (no hub)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=layers,
                         num_attention_heads=9, num_key_value_heads=3, vocab_size=8192,
                         max_position_embeddings=2048, tie_word_embeddings=True, use_cache=False)
    model = LlamaForCausalLM(config)
    magnitude_prune_(model, 0.5)
    return model


def _random_batch(vocab: int, batch: int, seq: int) -> dict:
    ids = torch.randint(vocab, (batch, seq), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "labels": ids.clone()}


def _stepper(model: torch.nn.Module, batch: dict) -> Callable[[], float]:
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)

    def step() -> float:
        """forward + backward + AdamW step; the loss."""
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()

    return step


def _run_variant(ctx: Context, build: Callable, batch: dict, compiled: bool, repeats: int):
    """One model built, optimized (eager op or inductor), stepped: its measurements."""
    dtype = torch.bfloat16 if ctx.cuda else torch.float32
    model = build().to(device=ctx.device, dtype=dtype)
    config = LorsConfig(r=16, lora_alpha=32, fw_compiler="inductor", bw_compiler="inductor")
    torch.compiler.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        lors_fx.optimize(model, config, compile=compiled)
        step = _stepper(model, batch)
        _sync(ctx.device)
        start = time.perf_counter()
        first_loss = step()
        first_s = time.perf_counter() - start
    out = {"first_step_s": first_s, "first_loss": first_loss,
           "step_ms": _time_ms(step, ctx.device, repeats, warmup=1),
           "warnings": sorted({str(w.message).splitlines()[0][:200] for w in caught})[:5]}
    if compiled:
        report = lors_fx.report(model).to_dict()
        out.update({k: report[k] for k in ("compiled", "fallback", "graph_breaks", "recompiles",
                                           "saved_bytes_before", "saved_bytes_after")})
        out["graphs"] = len(report["graphs"])
        out["rewritten_sites"] = sum(site["rewritten"] for site in report["sites"])
    else:
        params = list(model.parameters())
        out["saved_bytes_eager"] = saved_bytes(lambda: model(**batch).loss, params)
    out["sites"] = len(lors_fx.lors_modules(model))
    return out


def _compile_case(ctx: Context, name: str, build: Callable, batch: dict) -> dict:
    repeats = 3 if ctx.quick else 10
    batch = {k: v.to(ctx.device) for k, v in batch.items()}
    case = {"model": name, "batch": list(batch["input_ids"].shape),
            "eager": _run_variant(ctx, build, batch, False, repeats)}
    try:
        case["inductor"] = _run_variant(ctx, build, batch, True, repeats)
    except Exception as error:  # inductor may fail (no C++ compiler on CPU...): recorded
        case["inductor"] = {"error": f"{type(error).__name__}: {str(error)[:500]}",
                            "traceback": _traceback_tail(error)}
    finally:
        torch.compiler.reset()
    ind, eager = case["inductor"], case["eager"]
    if "error" not in ind:
        ind["vs_eager"] = ind["step_ms"] / eager["step_ms"]
        ind["first_loss_rel_diff"] = (abs(ind["first_loss"] - eager["first_loss"])
                                      / max(abs(eager["first_loss"]), 1e-30))
    return case


def _compile_rows(case: dict) -> List[list]:
    eager, ind = case["eager"], case["inductor"]
    rows = [[case["model"], "eager op", eager["first_step_s"], eager["step_ms"], 1.0, None, None,
             None, None, _mib(eager["saved_bytes_eager"]), None, ""]]
    if "error" in ind:
        rows.append([case["model"], "inductor", None, None, None, None, None, None, None, None,
                     None, ind["error"][:100]])
    else:
        rows.append([case["model"], "inductor", ind["first_step_s"], ind["step_ms"],
                     ind["vs_eager"], ind["graphs"], ind["graph_breaks"], ind["recompiles"],
                     _mib(ind["saved_bytes_before"]), _mib(ind["saved_bytes_after"]),
                     ind["first_loss_rel_diff"], ind["fallback"] or ""])
    return rows


def part_compile(ctx: Context) -> dict:
    """Part 3: the lors backend with inductor on the toy Llama and a SmolLM2-135M-shaped Llama."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++") \
        or shutil.which("clang++")
    smol_layers, smol_batch = (1, (1, 64)) if ctx.quick else (4, (4, 512))
    models = [("toy_llama", lambda: build_toy_llama(seed=0), toy_batches(1, seed=1)[0]),
              (f"smollm2_shaped({smol_layers}L)", lambda: _smollm2_shaped(smol_layers),
               _random_batch(8192, *smol_batch))]
    cases, skipped = [], []
    for name, build, batch in models:
        if ctx.over_budget():
            skipped.append(name)
            continue
        cases.append(_compile_case(ctx, name, build, batch))
    failed = [c["model"] for c in cases if "error" in c["inductor"] or c["inductor"]["fallback"]]
    headers = ["model", "path", "first step s", "step ms", "x eager", "graphs", "breaks",
               "recompiles", "saved MiB before", "saved MiB (after / eager)", "loss rel diff",
               "note"]
    status = "failed" if failed else ("partial" if skipped else "ok")
    summary = "; ".join(f"{c['model']}: " + (f"inductor {c['inductor']['vs_eager']:.2f}x eager"
                                             if "error" not in c["inductor"] else "inductor failed")
                        for c in cases)
    return {"status": status, "summary": summary, "cxx_compiler": cxx, "cases": cases,
            "not_run": skipped,
            "tables": [_table("step = forward + backward + AdamW; saved bytes from "
                              "lors_fx.report (compiled) or saved_tensors_hooks (eager)",
                              headers, [row for case in cases for row in _compile_rows(case)])]}


# ---------------------------------------------------------------------------------------------
# Part 4: 2:4 semi-structured kernels for x @ W'.T
# ---------------------------------------------------------------------------------------------

def _prime_2to4(ctx: Context, d_out: int, d_in: int, r: int = 16) -> torch.Tensor:
    """A bf16 ``W' = W + s(BA)*M`` on the device, ``W`` magnitude-pruned 2:4."""
    generator = torch.Generator().manual_seed(d_out + d_in)
    weight = torch.randn(d_out, d_in, generator=generator)
    magnitude_prune_(weight, pattern="2:4")
    weight = weight.to(device=ctx.device, dtype=torch.bfloat16)
    lora_A = (torch.randn(r, d_in, generator=generator) / d_in ** 0.5).to(ctx.device)
    lora_B = (torch.randn(d_out, r, generator=generator) * 0.01).to(ctx.device)
    return build_merged_weight(weight, lora_A, lora_B, 2.0)


def _semi_structured_case(ctx: Context, w_prime: torch.Tensor, tokens: int) -> dict:
    """Dense vs 2:4 ``x @ W'.T`` at ``tokens`` rows: times, speedups, errors against float64."""
    d_out, d_in = w_prime.shape
    row = {"shape": f"{d_out}x{d_in}", "tokens": tokens}
    ok, reason = semi_structured_status(w_prime)
    if not ok:
        return {**row, "status": f"skipped: {reason}"}
    x = torch.randn(tokens, d_in, device=ctx.device, dtype=torch.bfloat16)
    compressed = compress_semi_structured(w_prime)
    repeats = 5 if ctx.quick else 20
    dense_ms = _time_ms(lambda: F.linear(x, w_prime), ctx.device, repeats, inner=5)
    compress_ms = _time_ms(lambda: compress_semi_structured(w_prime, check=False), ctx.device,
                           repeats, inner=5)
    sparse_ms = _time_ms(lambda: semi_structured_linear(x, compressed), ctx.device, repeats,
                         inner=5)
    with torch.no_grad():
        err = _rel_err(semi_structured_linear(x, compressed), F.linear(x.double(),
                                                                          w_prime.double()))
        dense_err = _rel_err(F.linear(x, w_prime), F.linear(x.double(), w_prime.double()))
    return {**row, "status": "ok", "dense_ms": dense_ms, "compress_ms": compress_ms,
            "sparse_ms": sparse_ms, "sparse_plus_compress_ms": sparse_ms + compress_ms,
            "speedup_mm": dense_ms / sparse_ms,
            "speedup_with_compress": dense_ms / (sparse_ms + compress_ms),
            "pays_off": dense_ms > sparse_ms + compress_ms, "rel_err": err,
            "dense_rel_err": dense_err}


def part_semi_structured(ctx: Context) -> dict:
    """Part 4: ``x @ W'.T`` on the 2:4 kernels vs dense, compression of ``W'`` included."""
    if not ctx.cuda:
        return {"status": _no_cuda(), "summary": "the 2:4 kernels need CUDA (compute "
                                                 "capability >= 8.0)"}
    # the part-2 linears: gate/up, down, attention (quick: their 1/16 scale, as part 2)
    shapes, tokens = (([(688, 256), (256, 688), (256, 256)], [64]) if ctx.quick else
                      ([(11008, 4096), (4096, 11008), (4096, 4096)], [2048, 8192]))
    rows, skipped = [], []
    for d_out, d_in in shapes:
        w_prime = _prime_2to4(ctx, d_out, d_in)
        for t in tokens:
            if ctx.over_budget():
                skipped.append(f"{d_out}x{d_in} T={t}")
                continue
            try:
                rows.append(_semi_structured_case(ctx, w_prime, t))
            except Exception as error:  # a kernel that refuses a shape: recorded, next one
                rows.append({"shape": f"{d_out}x{d_in}", "tokens": t,
                             "status": f"error: {type(error).__name__}: {str(error)[:300]}",
                             "traceback": _traceback_tail(error)})
    ran = [r for r in rows if r["status"] == "ok"]
    pays = [r for r in ran if r["pays_off"]]
    summary = (f"2:4 x@W'^T pays off (compression included) in {len(pays)}/{len(ran)} cases; "
               "g@W' stays dense (W' is 2:4 along d_in, g@W' reduces over d_out)")
    headers = ["W'", "T", "dense ms", "compress ms", "2:4 mm ms", "2:4+compress ms", "x mm",
               "x incl. compress", "pays off", "rel err", "dense rel err", "status"]
    table = [[r["shape"], r["tokens"], r.get("dense_ms"), r.get("compress_ms"),
              r.get("sparse_ms"), r.get("sparse_plus_compress_ms"), r.get("speedup_mm"),
              r.get("speedup_with_compress"), r.get("pays_off"), r.get("rel_err"),
              r.get("dense_rel_err"), "" if r["status"] == "ok" else r["status"][:80]]
             for r in rows]
    return {"status": "ok" if len(ran) == len(rows) and not skipped else "partial",
            "summary": summary, "rows": rows, "not_run": skipped,
            "tables": [_table("bf16, 2:4 base, W' = W + s(BA)*M; speedups = dense / 2:4",
                              headers, table)]}


# ---------------------------------------------------------------------------------------------
# Part 5: FSDP2 through tools/train_fsdp.py
# ---------------------------------------------------------------------------------------------

def _fsdp_run(ctx: Context, name: str, extra: List[str], timeout_s: int) -> dict:
    """``torchrun --nproc_per_node=1 tools/train_fsdp.py`` in a temporary folder."""
    with tempfile.TemporaryDirectory(prefix="gpu_check_fsdp_") as out:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone",
                   "--nproc_per_node=1", str(REPO / "tools" / "train_fsdp.py"), "--out", out,
                   "--init", "zeros", *extra]
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(
            filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
        if not ctx.cuda:
            env["CUDA_VISIBLE_DEVICES"] = ""  # train_fsdp.py picks gloo without CUDA
        start = time.perf_counter()
        try:
            done = subprocess.run(command, env=env, capture_output=True, text=True,
                                  timeout=timeout_s, cwd=REPO)
        except subprocess.TimeoutExpired:
            return {"run": name, "status": f"error: timed out after {timeout_s} s",
                    "seconds": time.perf_counter() - start}
        row = {"run": name, "rc": done.returncode, "seconds": time.perf_counter() - start,
               "command": "python " + " ".join(command[1:]).replace(out, "OUT"),
               "output_tail": (done.stdout + done.stderr)[-1500:]}
        summary_path = Path(out) / "summary.json"
        if done.returncode == 0 and summary_path.exists():
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
            row.update({k: summary.get(k) for k in ("world", "losses", "audit",
                                                    "peak_mib_rank0")})
            row["train_seconds"] = summary.get("seconds")
        violations = (row.get("audit") or {}).get("violations")
        row["status"] = "ok" if done.returncode == 0 and violations == 0 else \
            f"failed: rc={done.returncode}, violations={violations}"
        return row


def part_fsdp(ctx: Context) -> dict:
    """Part 5: FSDP2 with one process (nccl on CUDA, gloo on CPU) for a few steps."""
    runs = [("eager op, fp32", ["--steps", "3", "--seq", "32"])]
    if ctx.cuda and not ctx.quick:
        runs = [("eager op, bf16", ["--steps", "5", "--seq", "256", "--dtype", "bf16"]),
                ("compiled per block, bf16", ["--steps", "5", "--seq", "256", "--dtype", "bf16",
                                              "--compile"])]
    rows = []
    for name, extra in runs:
        if ctx.over_budget():
            rows.append({"run": name, "status": "skipped: time budget spent"})
            continue
        rows.append(_fsdp_run(ctx, name, extra, timeout_s=180))
    table = [[r["run"], "nccl" if ctx.cuda else "gloo", r.get("world"),
              len(r.get("losses") or []), (r.get("losses") or [None])[0],
              (r.get("losses") or [None])[-1], (r.get("audit") or {}).get("violations"),
              r.get("train_seconds"), r.get("peak_mib_rank0"), r["status"][:80]] for r in rows]
    bad = [r for r in rows if r["status"] != "ok"]
    return {"status": "ok" if not bad else "failed", "rows": rows,
            "summary": f"{len(rows) - len(bad)}/{len(rows)} runs ok (tools/train_fsdp.py, "
                       f"torchrun, 1 process, {'nccl' if ctx.cuda else 'gloo'})",
            "tables": [_table("tiny Llama (4 layers), 50% pruned, LoRS adapters, FSDP2",
                              ["run", "backend", "world", "steps", "loss first", "loss last",
                               "violations", "train s", "peak MiB", "status"], table)]}


# ---------------------------------------------------------------------------------------------
# Running the parts
# ---------------------------------------------------------------------------------------------

PARTS = {1: part_correctness, 2: part_benchmark, 3: part_compile, 4: part_semi_structured,
         5: part_fsdp}


def _traceback_tail(error: BaseException, frames: int = 6) -> List[str]:
    tail = traceback.extract_tb(error.__traceback__)[-frames:]
    return [f"{Path(f.filename).name}:{f.lineno} in {f.name}: {f.line}" for f in tail] + \
        traceback.format_exception_only(type(error), error)[-1:]


def run_part(number: int, ctx: Context) -> dict:
    """Run one part; an exception becomes its record (status ``error: ...``)."""
    start = time.perf_counter()
    if ctx.over_budget():
        result = {"status": "skipped: time budget (--budget-s) spent", "summary": ""}
    else:
        try:
            result = PARTS[number](ctx)
            _sync(ctx.device)  # an asynchronous CUDA error belongs to this part
        except Exception as error:
            first = (str(error).splitlines() or [""])[0][:300]
            result = {"status": f"error: {type(error).__name__}: {first}", "summary": "",
                      "traceback": _traceback_tail(error)}
    gc.collect()
    if ctx.cuda:
        try:
            torch.cuda.empty_cache()
        except Exception:  # a poisoned CUDA context: the next part records its own error
            pass
    return {"name": PART_NAMES[number], **result, "seconds": time.perf_counter() - start}


def _version(package: str) -> Optional[str]:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    """Versions, threads and the device, for the JSON."""
    info = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "platform": platform.platform(), "python": platform.python_version(),
            "torch": torch.__version__, "torch_cuda": torch.version.cuda,
            "transformers": _version("transformers"), "triton": _version("triton"),
            "lors_fx": lors_fx.__version__, "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads(),
            "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS"), "device": str(device)}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(gpu=props.name, capability=f"{props.major}.{props.minor}",
                    gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    cusparselt=torch.backends.cusparselt.version())
    return info


def format_part(number: int, record: dict) -> str:
    """A part's header line and its tables (tabulate)."""
    lines = [f"== part {number}: {record['name']} -- {record['status']} "
             f"({record['seconds']:.1f} s)"]
    if record.get("summary"):
        lines.append(record["summary"])
    for table in record.get("tables", []):
        lines.append(f"\n{table['title']}")
        lines.append(tabulate(table["rows"], headers=table["headers"], floatfmt=".3g",
                              missingval="-"))
    if record.get("traceback"):
        lines.extend(["traceback (last frames):", *record["traceback"]])
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cuda", "cpu"),
                        default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--quick", action="store_true", help="tiny shapes, few repeats")
    parser.add_argument("--json", dest="json_path", help="write the results to this JSON file")
    parser.add_argument("--parts", default="1,2,3,4,5", help="comma-separated subset of 1-5")
    parser.add_argument("--threads", type=int,
                        help="CPU intra-op threads (default: 1 for a CPU run unless "
                             "OMP_NUM_THREADS is set: its shapes are tiny, and oversubscribed "
                             "shared cores slow them down many times; else torch's default)")
    parser.add_argument("--budget-s", type=float, default=420.0,
                        help="start no new case after this many seconds (default 420, so the "
                             "run ends within 8 minutes)")
    args = parser.parse_args(argv)
    try:
        args.parts = sorted({int(p) for p in args.parts.split(",") if p.strip()})
    except ValueError:
        parser.error(f"--parts: expected numbers 1-5 separated by commas, got {args.parts!r}")
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error(f"--parts: expected numbers 1-5, got {args.parts}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available (use --device cpu)")
    return args


def main(argv=None) -> int:
    """Run the selected parts; print tables; write JSON after each part. 0 when none failed."""
    args = parse_args(argv)
    device = torch.device(args.device)
    # a CPU run takes the small shapes: the Llama-7B ones would take hours there
    args.quick_effective = args.quick or device.type == "cpu"
    if args.threads is None and device.type == "cpu" and "OMP_NUM_THREADS" not in os.environ:
        args.threads = 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    ctx = Context(device, args.quick_effective, time.monotonic() + args.budget_s)
    result = {"schema": SCHEMA, "machine": machine_info(device),
              "args": {k: v for k, v in vars(args).items()}, "tolerances": TOLERANCES,
              "parts": {}}
    start = time.perf_counter()
    for number in args.parts:
        print(f"[gpu_check] part {number} ({PART_NAMES[number]}) ...", file=sys.stderr,
              flush=True)
        record = run_part(number, ctx)
        result["parts"][str(number)] = record
        print(format_part(number, record), end="\n\n", flush=True)
        if args.json_path:
            Path(args.json_path).write_text(json.dumps(result, indent=2, default=str),
                                            encoding="utf-8")
    result["seconds"] = time.perf_counter() - start
    print(tabulate([[n, r["name"], r["status"][:90], r["seconds"]]
                    for n, r in result["parts"].items()],
                   headers=["part", "name", "status", "seconds"], floatfmt=".1f"))
    print(f"total {result['seconds']:.1f} s on {device}"
          + (f" ({result['machine'].get('gpu')})" if device.type == "cuda" else ""))
    if args.json_path:
        Path(args.json_path).write_text(json.dumps(result, indent=2, default=str),
                                        encoding="utf-8")
        print(f"json written to {args.json_path}")
    failed = [r for r in result["parts"].values()
              if r["status"] == "failed" or r["status"].startswith("error")]
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
