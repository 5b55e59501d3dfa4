#!/usr/bin/env python
"""LoRS on a quantized base: bytes of the base, and one whole training step (memory, time).

Usage::

    python tools/bench_quant.py [--model smollm2|tiny] [--layers N] [--batch 2] [--seq 128]
                                [--r 16] [--dtypes fp32 bf16] [--group-size 64] [--rows ...]
                                [--repeats 7] [--warmup 1] [--gradient-checkpointing]
                                [--json FILE] [--quick]

Part 1, bytes (exact, no run): for the linears of SmolLM2-135M (210: q, k, v, o, gate, up, down
of 30 layers; hidden 576, MLP 1536), of the Llama-7B MLP (4096 <-> 11008) and of the benchmark's
``llama_mlp`` at scale 0.5 (2048 <-> 5504), the bytes of codes + scales (+ bias) of a
:class:`lors_fx.quantized.QuantizedLinear` per grid (int4 / int8, group 128 / 64 / 32, scales in
bfloat16), over the same weights in bfloat16; a grid whose group does not divide a ``d_in`` is
``n/a`` (SmolLM2's 576 is not a multiple of 128). With bitsandbytes installed, QLoRA's NF4
(blocksize 64, float32 absmax, no double quantization, as PEFT's QLoRA recipe without
``bnb_4bit_use_double_quant``) is measured on real tensors of the same shapes.

Part 2, one training step of the whole model (``--model smollm2``: the embedded SmolLM2-135M, every
linear but ``lm_head`` 50% magnitude-pruned per row; batch ``--batch`` x ``--seq`` random tokens;
r=16, alpha=32; forward + backward + AdamW step + zero_grad), per compute dtype, each row on its
own copy:

- ``lors``: LoRS (``lors_fx.optimize(compile=False)``) on the unquantized base of that dtype;
- ``lors@int4`` / ``lors@int8``: the same on the base quantized round-to-nearest
  (``quantize_model(QuantSpec(bits, --group-size))``, scales in that dtype);
- ``lors_qa@int4``: with ``LorsConfig(quant_aware=True)``;
- ``naive@int4``: the QA-SparsePEFT-style naive masked form on the same int4 base
  (:class:`lors_fx.bench.quant_rows.NaiveQuantLinear`: the whole dequantized weight every
  forward, autograd keeps ``W'``);
- ``qlora@nf4``: PEFT LoRA on a bitsandbytes 4-bit NF4 base (QLoRA; compute dtype = the row's
  dtype; adapters float32, PEFT's default), when bitsandbytes imports;
- ``peft_lora``: PEFT LoRA on the unquantized base (QLoRA's own reference).

Columns: the adapted linears' base bytes (and over bfloat16), the model's bytes (parameters +
buffers, + bitsandbytes' quantization state), AdamW state, saved for backward (one forward,
``saved_tensors_hooks``, storages alive anyway excluded), the step's peak above its start
(``torch.profiler`` allocation events: :func:`lors_fx.methods.measure.peak_bytes`), the total
peak = model + AdamW state + step peak (what the process holds at the step's high-water mark),
and the median (min) step time over ``--repeats`` steps interleaved across the rows of a dtype
(one rotating round-robin: load drifts hit every row alike), with ratios to ``lors`` of the same
dtype. A row that cannot run is ``unavailable: <reason>``.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

import lors_fx
from lors_fx import LorsConfig
from lors_fx._nn import replace_module
from lors_fx.bench.quant_rows import NaiveQuantLinear
from lors_fx.methods.measure import peak_bytes, saved_bytes
from lors_fx.quant import QuantSpec
from lors_fx.quantized import QuantizedLinear, quantize_model
from lors_fx.testing.tiny_models import SMOLLM2_CONFIG
from lors_fx.workflows.prune import prune_model

try:
    from tabulate import tabulate
except ImportError:  # pragma: no cover - tabulate is a dependency
    tabulate = None

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
ROWS = ("lors", "lors@int4", "lors_qa@int4", "lors@int8", "naive@int4", "qlora@nf4", "peft_lora")
TARGET_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BYTE_GRIDS = ((4, 128), (4, 64), (4, 32), (8, 128), (8, 64))
BOUNDS = {4: 0.27, 8: 0.52}


class Unavailable(Exception):
    """A row that cannot run here (a package missing, a group that does not divide)."""


# ---------------------------------------------------------------------------------------------
# Part 1: bytes of the base
# ---------------------------------------------------------------------------------------------

def smollm2_shapes(layers: int = 30) -> List[tuple]:
    """``(d_out, d_in)`` of SmolLM2-135M's adapted linears (lm_head excluded: tied)."""
    hidden, mlp = SMOLLM2_CONFIG["hidden_size"], SMOLLM2_CONFIG["intermediate_size"]
    kv = hidden // SMOLLM2_CONFIG["num_attention_heads"] * SMOLLM2_CONFIG["num_key_value_heads"]
    per_layer = [(hidden, hidden), (kv, hidden), (kv, hidden), (hidden, hidden), (mlp, hidden),
                 (mlp, hidden), (hidden, mlp)]
    return per_layer * layers


SHAPE_SETS = {
    "SmolLM2-135M (210 linears)": smollm2_shapes,
    "Llama-7B MLP (4096<->11008)": lambda: [(11008, 4096), (11008, 4096), (4096, 11008)],
    "llama_mlp x0.5 (2048<->5504)": lambda: [(5504, 2048), (5504, 2048), (2048, 5504)],
}


def quantized_bytes(shapes: List[tuple], bits: int, group: int) -> Optional[int]:
    """Bytes of codes + scales (bfloat16) of QuantizedLinear layers of these shapes (built on the
    meta device: the real buffers' sizes, no memory); None when ``group`` does not divide a d_in."""
    if any(d_in % group for _, d_in in shapes):
        return None
    total = 0
    for d_out, d_in in set(shapes):
        layer = QuantizedLinear(d_in, d_out, bits=bits, group_size=group, bias=False,
                                dtype=torch.bfloat16, device="meta")
        size = sum(b.numel() * b.element_size() for b in layer.buffers())
        total += size * shapes.count((d_out, d_in))
    return total


def nf4_bytes(shapes: List[tuple]) -> Optional[int]:
    """Bytes of bitsandbytes NF4 (blocksize 64, float32 absmax, its 16-value code table) of these
    shapes, measured with ``bitsandbytes.functional.quantize_4bit`` on random bf16 weights (64 rows
    of each shape, scaled to its rows); None without bitsandbytes."""
    try:
        import bitsandbytes.functional as bnbf
    except Exception:  # noqa: BLE001 - any import failure means "not here"
        return None
    total = 0
    for d_out, d_in in set(shapes):
        # blocks of 64 never straddle rows when 64 divides d_in: 64 rows give the per-row bytes
        rows = 64 if d_in % 64 == 0 and d_out % 64 == 0 else d_out
        packed, state = bnbf.quantize_4bit(torch.randn(rows, d_in, dtype=torch.bfloat16),
                                           blocksize=64, quant_type="nf4")
        table = state.code.numel() * state.code.element_size()  # one 16-value table per layer
        per_rows = packed.numel() * packed.element_size() + \
            state.absmax.numel() * state.absmax.element_size()
        total += (per_rows * (d_out // rows) + table) * shapes.count((d_out, d_in))
    return total


def bytes_table() -> List[dict]:
    """Part 1: one row per shape set and grid."""
    out = []
    for label, make in SHAPE_SETS.items():
        shapes = make()
        bf16 = sum(2 * d_out * d_in for d_out, d_in in shapes)
        grids = [(f"int{b} g{g}", quantized_bytes(shapes, b, g), BOUNDS[b]) for b, g in BYTE_GRIDS]
        grids.append(("nf4 g64 (bitsandbytes)", nf4_bytes(shapes), None))
        for grid, nbytes, bound in grids:
            ratio = None if nbytes is None else nbytes / bf16
            out.append({"weights": label, "grid": grid, "bf16_bytes": bf16, "bytes": nbytes,
                        "vs_bf16": ratio, "bound": bound,
                        "holds": None if ratio is None or bound is None else ratio <= bound})
    return out


# ---------------------------------------------------------------------------------------------
# Part 2: the model and its rows
# ---------------------------------------------------------------------------------------------

def build_base(args) -> nn.Module:
    """The pruned float32 model: SmolLM2-135M (embedded) or a tiny Llama (``--model tiny``)."""
    if args.model == "smollm2":
        from lors_fx.workflows.embedded import load_smollm2
        model, _ = load_smollm2(torch.float32, progress=False)
    else:
        import transformers
        torch.manual_seed(args.seed)
        config = transformers.LlamaConfig(hidden_size=128, intermediate_size=256,
                                          num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, vocab_size=512,
                                          tie_word_embeddings=True)
        model = transformers.LlamaForCausalLM(config)
    if args.layers:
        model.model.layers = model.model.layers[: args.layers]
        model.config.num_hidden_layers = args.layers
    model.config.use_cache = False
    prune_model(model, "magnitude", sparsity=args.sparsity, progress=False)
    return model.train()


def _freeze(model: nn.Module) -> None:
    for parameter in model.parameters():
        parameter.requires_grad_(False)


def _lors(model, args, bits=None, quant_aware=False):
    if bits is not None:
        quantize_model(model, QuantSpec(bits, args.group_size))
    lors_fx.optimize(model, LorsConfig(r=args.r, lora_alpha=2 * args.r,
                                       quant_aware=quant_aware), compile=False)
    return model


def _naive(model, args):
    quantize_model(model, QuantSpec(4, args.group_size))
    _freeze(model)
    for name, module in list(model.named_modules()):
        if isinstance(module, QuantizedLinear):
            replace_module(model, name, NaiveQuantLinear(module, args.r, 2.0 * args.r))
    return model


def _peft(model, args):
    from peft import LoraConfig, get_peft_model
    config = LoraConfig(r=args.r, lora_alpha=2 * args.r, lora_dropout=0.0,
                        target_modules=TARGET_MODULES)
    return get_peft_model(model, config)


def _qlora(base: nn.Module, dtype: torch.dtype, args):
    """PEFT LoRA on a bitsandbytes NF4 base: the pruned model saved, reloaded 4-bit."""
    try:
        importlib.import_module("bitsandbytes")
    except Exception as error:  # noqa: BLE001
        raise Unavailable(f"bitsandbytes does not import: {type(error).__name__}: {error}")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                               bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=False)
    with tempfile.TemporaryDirectory() as folder:
        base.save_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, device_map="cpu",
                                                     quantization_config=quant)
    model.config.use_cache = False
    return _peft(model, args).train()


def build_row(name: str, base: nn.Module, dtype: torch.dtype, args) -> nn.Module:
    """Row ``name`` on its own copy of ``base`` in ``dtype`` (with ``--gradient-checkpointing``:
    Hugging Face's per-layer activation checkpointing turned on, non-reentrant)."""
    model = _build_row(name, base, dtype, args)
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def _build_row(name: str, base: nn.Module, dtype: torch.dtype, args) -> nn.Module:
    if name == "qlora@nf4":
        return _qlora(base, dtype, args)
    model = copy.deepcopy(base).to(dtype)
    try:
        if name == "lors":
            return _lors(model, args)
        if name in ("lors@int4", "lors@int8"):
            return _lors(model, args, int(name[-1]))
        if name == "lors_qa@int4":
            return _lors(model, args, 4, quant_aware=True)
        if name == "naive@int4":
            return _naive(model, args)
    except ValueError as error:  # a group that does not divide a d_in
        raise Unavailable(str(error)) from error
    if name == "peft_lora":
        return _peft(model, args).train()
    raise ValueError(f"unknown row {name!r}; known: {ROWS}")


# ---------------------------------------------------------------------------------------------
# Measuring a row
# ---------------------------------------------------------------------------------------------

def _quant_state_tensors(model: nn.Module) -> List[torch.Tensor]:
    """bitsandbytes keeps each 4-bit weight's absmax and code table outside the state tensors
    that parameters() and buffers() list: they count as weight bytes too."""
    found = []
    for parameter in model.parameters():
        state = getattr(parameter, "quant_state", None)
        for key in ("absmax", "code"):
            tensor = getattr(state, key, None)
            if isinstance(tensor, torch.Tensor):
                found.append(tensor)
    return found


def _storage_bytes(tensors) -> int:
    seen = {}
    for tensor in tensors:
        if isinstance(tensor, torch.Tensor):
            seen[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
    return sum(seen.values())


def _base_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """The adapted linears' base modules (quantized, bitsandbytes, or float), lm_head excluded."""
    found = {}
    for name, module in model.named_modules():
        if "lora_" in name or name.endswith("lm_head") or name.endswith(".base_layer"):
            continue
        inner = getattr(module, "base_layer", None)  # PEFT's wrapper -> its base (ours: a method)
        module = inner if isinstance(inner, nn.Module) else module
        packed = getattr(module, "weight_packed", None)
        if isinstance(packed, torch.Tensor) or isinstance(module, nn.Linear):
            found[name] = module
    return found


def base_bytes(model: nn.Module) -> tuple:
    """``(bytes, bf16 bytes)`` of the adapted linears' base: codes + scales + bias (ours),
    packed weight + absmax + code table + bias (bitsandbytes), or weight + bias."""
    tensors, bf16 = [], 0
    for module in _base_layers(model).values():
        if isinstance(getattr(module, "weight_packed", None), torch.Tensor):
            tensors += [module.weight_packed, module.weight_scale]
        else:
            weight = module.weight
            tensors.append(weight)
            state = getattr(weight, "quant_state", None)
            tensors += [getattr(state, "absmax", None), getattr(state, "code", None)]
        tensors.append(module.bias)
        bf16 += 2 * module.in_features * module.out_features
        bf16 += 0 if module.bias is None else 2 * module.bias.numel()
    return _storage_bytes(tensors), bf16


def _step_fn(model: nn.Module, optimizer, batch: dict) -> Callable[[], float]:
    def step():
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()
    return step


def measure_row(model: nn.Module, batch: dict, warmup: int) -> tuple:
    """``(row, step)``: every number but the timing, and the step to time."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    step = _step_fn(model, optimizer, batch)
    alive = list(model.parameters()) + list(model.buffers()) + _quant_state_tensors(model)
    saved = saved_bytes(lambda: model(**batch).loss, alive)
    losses = [step() for _ in range(max(1, warmup))]  # AdamW's state exists before the peak step
    model_bytes = _storage_bytes(alive)
    state = _storage_bytes(t for s in optimizer.state.values() for t in s.values())
    peak = peak_bytes(step, torch.device("cpu"))
    base, bf16 = base_bytes(model)
    row = {"status": "ok", "loss": losses[0], "trainable_params": sum(p.numel() for p in params),
           "base_bytes": base, "base_vs_bf16": base / bf16 if bf16 else None,
           "model_bytes": model_bytes, "optimizer_state_bytes": state, "saved_bytes": saved,
           "step_peak_bytes": peak, "total_peak_bytes": model_bytes + state + peak}
    return row, step


def _round_robin(steps: Dict[str, Callable], repeats: int) -> Dict[str, List[float]]:
    times = {name: [] for name in steps}
    order = list(steps)
    for repeat in range(repeats):
        shift = repeat % max(1, len(order))
        for name in order[shift:] + order[:shift]:
            start = time.perf_counter()
            steps[name]()
            times[name].append(time.perf_counter() - start)
    return times


def _failed(error: BaseException) -> dict:
    kind = "unavailable" if isinstance(error, (Unavailable, ImportError)) else "error"
    text = str(error).strip().splitlines()[0][:200] if str(error).strip() else ""
    return {"status": f"{kind}: {type(error).__name__}: {text}"}


def run_dtype(base: nn.Module, dtype_name: str, batch: dict, args, log) -> List[dict]:
    """Every row of one compute dtype: built, measured, then timed interleaved."""
    rows, steps = [], {}
    for name in args.rows:
        log(f"{dtype_name}: {name}")
        row = {"row": name, "dtype": dtype_name}
        try:
            model = build_row(name, base, DTYPES[dtype_name], args)
            measured, steps[name] = measure_row(model, batch, args.warmup)
            row.update(measured)
        except Exception as error:  # noqa: BLE001 - a failing row is a row, not a crash
            row.update(_failed(error))
        rows.append(row)
    times = _round_robin(steps, args.repeats)
    lors_ms = 1e3 * statistics.median(times["lors"]) if times.get("lors") else None
    for row in rows:
        if row["row"] in times:
            values = [1e3 * t for t in times[row["row"]]]
            row.update(step_ms=statistics.median(values), step_ms_min=min(values),
                       step_ms_all=values)
            row["vs_lors"] = row["step_ms"] / lors_ms if lors_ms else None
    return rows


# ---------------------------------------------------------------------------------------------
# Goals, tables, command line
# ---------------------------------------------------------------------------------------------

def _ratio(rows, row, other, key, dtype):
    found = {(r["row"], r["dtype"]): r for r in rows}
    a, b = found.get((row, dtype), {}).get(key), found.get((other, dtype), {}).get(key)
    return a / b if a is not None and b else None


def goals(steps: List[dict], sizes: List[dict], group: Optional[int]) -> List[dict]:
    """The issue's goals, each ``{"goal", "ratio", "bound", "holds"}``."""
    out = [{"goal": f"{s['grid']} bytes on {s['weights']} <= {s['bound']}x bf16",
            "ratio": s["vs_bf16"], "bound": s["bound"], "holds": s["holds"]}
           for s in sizes if s["bound"] is not None and s["bytes"] is not None
           and s["grid"] in ("int4 g128", "int8 g128", f"int4 g{group}", f"int8 g{group}")]
    out.append({"goal": "total peak, lors@int4 bf16 <= 0.5x lors bf16",
                "ratio": _ratio(steps, "lors@int4", "lors", "total_peak_bytes", "bf16"),
                "bound": 0.5})
    out.append({"goal": "(step peak above start, lors@int4 bf16 / lors bf16)",
                "ratio": _ratio(steps, "lors@int4", "lors", "step_peak_bytes", "bf16"),
                "bound": None})
    for dtype in DTYPES:
        out.append({"goal": f"step time, lors@int4 <= 1.25x lors ({dtype})",
                    "ratio": _ratio(steps, "lors@int4", "lors", "step_ms", dtype),
                    "bound": 1.25})
    for goal in out:
        goal.setdefault("holds", None if goal["ratio"] is None or goal["bound"] is None
                        else goal["ratio"] <= goal["bound"])
    return [g for g in out if g["ratio"] is not None]


def _mib(value):
    return None if value is None else value / 2**20


def format_tables(result: dict) -> str:
    """Part 1, part 2 and the goals as tabulate tables."""
    if tabulate is None:
        return json.dumps(result, indent=1)
    sizes = tabulate([[s["weights"], s["grid"], _mib(s["bytes"]), _mib(s["bf16_bytes"]),
                       s["vs_bf16"]] for s in result["bytes"]],
                     headers=["weights", "grid", "MiB", "bf16 MiB", "x bf16"], floatfmt=".4g",
                     missingval="n/a")
    steps = tabulate([[r["row"], r["dtype"], r.get("step_ms"), r.get("vs_lors"),
                       _mib(r.get("base_bytes")), r.get("base_vs_bf16"), _mib(r.get("model_bytes")),
                       _mib(r.get("optimizer_state_bytes")), _mib(r.get("saved_bytes")),
                       _mib(r.get("step_peak_bytes")), _mib(r.get("total_peak_bytes")),
                       "" if r["status"] == "ok" else r["status"]] for r in result["steps"]],
                     headers=["row", "dtype", "step ms", "xLoRS", "base MiB", "base xbf16",
                              "model MiB", "AdamW MiB", "saved MiB", "step peak MiB",
                              "total peak MiB", "status"], floatfmt=".4g", missingval="-")
    goals_table = tabulate([[g["goal"], g["ratio"], g["holds"]] for g in result["goals"]],
                           headers=["issue goal", "ratio", "holds"], floatfmt=".3f")
    return f"{sizes}\n\n{result['title']}\n{steps}\n\n{goals_table}"


def parse_args(argv=None) -> argparse.Namespace:
    """The command line (module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add = parser.add_argument
    add("--model", choices=("smollm2", "tiny"), default="smollm2")
    add("--layers", type=int, help="cut the model to this many layers")
    add("--batch", type=int, default=2)
    add("--seq", type=int, default=128)
    add("--r", type=int, default=16)
    add("--sparsity", type=float, default=0.5)
    add("--group-size", type=int, default=64, help="group of the int4/int8 rows (SmolLM2: 64)")
    add("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    add("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    add("--repeats", type=int, default=7, help="timed steps per row (median)")
    add("--warmup", type=int, default=1)
    add("--seed", type=int, default=0)
    add("--gradient-checkpointing", action="store_true",
        help="every row with Hugging Face's activation checkpointing per decoder layer")
    add("--no-steps", action="store_true", help="part 1 only")
    add("--quick", action="store_true",
        help="tiny Llama, 2x16 tokens, group 32, 2 repeats: a smoke run")
    add("--json", dest="json_path")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.seq, args.group_size, args.repeats, args.layers = "tiny", 16, 32, 2, None
    if "lors" not in args.rows:
        args.rows = ["lors"] + args.rows  # the ratios are to it
    return args


def main(argv=None) -> dict:
    """Run parts 1 and 2, print the tables, write JSON; returns the result."""
    args = parse_args(argv)
    log = lambda text: print(f"[bench_quant] {text}", file=sys.stderr, flush=True)  # noqa: E731
    sizes = bytes_table()
    steps = []
    title = (f"{args.model}{f' ({args.layers} layers)' if args.layers else ''}, batch "
             f"{args.batch}x{args.seq}, r={args.r}, group {args.group_size}, "
             f"{torch.get_num_threads()} threads"
             f"{', activation checkpointing' if args.gradient_checkpointing else ''}")
    if not args.no_steps:
        base = build_base(args)
        generator = torch.Generator().manual_seed(args.seed)
        ids = torch.randint(base.config.vocab_size, (args.batch, args.seq), generator=generator)
        batch = {"input_ids": ids, "labels": ids.clone()}
        for dtype_name in args.dtypes:
            steps += run_dtype(base, dtype_name, batch, args, log)
    result = {"schema": "lors_fx.bench_quant/1", "title": title,
              "machine": {"platform": platform.platform(), "torch": torch.__version__,
                          "threads": torch.get_num_threads(), "cpu_count": os.cpu_count()},
              "args": vars(args), "bytes": sizes, "steps": steps,
              "goals": goals(steps, sizes, args.group_size)}
    print(format_tables(result), flush=True)
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=1, default=lambda v: None if isinstance(
                v, float) and not math.isfinite(v) else str(v))
        print(f"json written to {args.json_path}")
    return result


if __name__ == "__main__":
    main()
