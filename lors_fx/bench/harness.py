"""Benchmark harness: LoRS against LoRA, SQFT, SPP and full sparse fine-tuning on the same model.

    python tools/bench.py --quick                       # one small shape, a smoke run
    python tools/bench.py --workloads llama_mlp --tokens 512 --ranks 16 --dtypes fp32 --json out.json
    python tools/bench.py --compile                     # also torch.compile'd rows (slow on CPU)

Each case (workload x T x r x dtype) builds one pruned model (seeded; ``--sparsity`` of each target
weight zeroed by per-row magnitude), gives every method its own copy, randomises the adapter
factors that start at zero, then measures, all methods in one process:

- ``max_err_y`` / ``max_err_grad`` (and ``rel_``): max abs difference of the output and of the
  trainable-parameter gradients against a float64 copy running the method's own formula
  (:meth:`formula` of :mod:`lors_fx.methods.baselines`; LoRS ``grad_mode="lors"`` against its
  closed form).
- ``saved_bytes``: bytes autograd saves for backward in one forward, exact
  (:func:`lors_fx.methods.measure.saved_bytes`; parameters and the input leaf excluded).
- ``peak_bytes``: peak of one untimed step (forward + backward + AdamW step + zero_grad) above
  the allocated memory at its start (:func:`lors_fx.methods.measure.peak_bytes`).
- ``step_ms``: median over ``--steps`` interleaved steps after ``--warmup``; ``vs_lora``/``vs_sqft``.
- ``flops`` (FlopCounterMode, one forward + backward of the eager model; the LoRS ops' forward
  formula is given to that counter only), ``gflops`` = flops / step time, ``roofline_frac`` =
  gflops / GFLOP/s of plain matmuls of the same linear shapes (forward and input-gradient, timed
  in the same round-robin: the practical roofline).

JSON (``--json``): ``{"schema", "machine", "args", "peak_memory_method", "cases", "targets"}``;
each case ``{"workload", "tokens", "r", "dtype", "linear_shapes", "matmul_ms", "matmul_gflops",
"rows"}``; each row has :data:`ROW_KEYS` (``None`` where a method is unavailable, with the reason
in ``status``). ``targets`` checks the issue's goals on ``llama_mlp``, T=512, r=16, fp32;
``quant_targets`` those of the rows on a quantized base (``--bits``: :mod:`lors_fx.bench.quant_rows`,
with ``vs_lors``/``peak_vs_lors`` and ``base_weight_bytes``/``base_vs_bf16`` in every row).
"""
from __future__ import annotations

import copy
import functools
import math
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from lors_fx.adapters import lors_modules
from lors_fx.bench.workloads import WORKLOADS, build_workload, prune_
from lors_fx.methods.baselines import (install_mask_reapply, lors_closed_form, randomize_adapters_,
                                       set_reference_mode, trainable_parameters)
from lors_fx.methods.measure import peak_bytes, saved_bytes
from lors_fx.bench.quant_rows import (base_weight_bytes, build_quant_row, dense_bf16_bytes,
                                     parse_quant_row, quant_reference)
from lors_fx.methods.registry import BENCHMARK_METHODS, METHODS, attach_method, get_method

__all__ = ["build_workload", "prune_", "saved_bytes", "run_case", "ROW_KEYS", "CASE_KEYS",
           "TOP_KEYS", "WORKLOADS", "TARGETS", "EXTRA_METHODS"]

SCHEMA = "lors_fx.bench/1"
#: the benchmark rows that are not wrapper methods (LoRS through lors_fx.optimize)
EXTRA_METHODS = tuple(name for name in BENCHMARK_METHODS if name not in METHODS)
ROW_KEYS = ("method", "status", "step_ms", "step_ms_min", "step_ms_all", "vs_lora", "vs_sqft",
            "vs_lors", "saved_bytes", "saved_vs_lora", "saved_vs_sqft", "saved_vs_lors",
            "peak_bytes", "peak_vs_lora", "peak_vs_sqft", "peak_vs_lors", "base_weight_bytes",
            "base_vs_bf16", "trainable_params", "optimizer_state_bytes", "flops", "gflops",
            "roofline_frac", "max_err_y", "max_err_grad", "rel_err_y", "rel_err_grad")
CASE_KEYS = ("workload", "tokens", "r", "dtype", "linear_shapes", "matmul_ms", "matmul_gflops",
             "rows")
TOP_KEYS = ("schema", "machine", "args", "peak_memory_method", "cases", "targets",
            "quant_targets")
#: (label, row key, baseline method, bound): the issue's goals for lors on llama_mlp T=512 r=16 fp32.
TARGETS = (("step <= 1.10x LoRA", "step_ms", "lora", 1.10),
           ("step <= 0.50x SPP", "step_ms", "spp", 0.50),
           ("step <= 0.75x SQFT", "step_ms", "sqft", 0.75),
           ("saved <= 1.00x LoRA", "saved_bytes", "lora", 1.00),
           ("saved <= 0.45x SQFT", "saved_bytes", "sqft", 0.45),
           ("peak <= 0.55x SQFT", "peak_bytes", "sqft", 0.55))
_MATMUL = "<plain matmul>"
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


# ---------------------------------------------------------------------------------------------
# FLOPs
# ---------------------------------------------------------------------------------------------

def _lors_op_flops(x_shape, w_shape, a_shape, *args, out_shape=None, **kwargs) -> int:
    """The LoRS ops' forward: ``B @ A`` (2 d_out r d_in) + ``x @ W'^T`` (2 T d_in d_out)."""
    d_out, d_in = w_shape
    tokens = math.prod(x_shape[:-1])
    return 2 * d_out * a_shape[0] * d_in + 2 * tokens * d_in * d_out


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs) -> int:
    """``addmm_`` (the exact backward's dx), which torch's counter has no formula for."""
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _quant_op_flops(x_shape, packed_shape, scales_shape, a_shape, *args, out_shape=None,
                    **kwargs) -> int:
    """The quantized LoRS op's forward: ``B @ A`` + ``x @ W'^T`` (``d_out`` from the codes)."""
    r, d_in = a_shape
    return 2 * packed_shape[0] * r * d_in + 2 * math.prod(x_shape[:-1]) * d_in * packed_shape[0]


def _quant_weight_flops(packed_shape, scales_shape, a_shape, *args, out_shape=None,
                        **kwargs) -> int:
    """The quantized ``W'`` build (the backward's recompute): ``B @ A``."""
    return 2 * packed_shape[0] * a_shape[0] * a_shape[1]


def _flop_counter() -> FlopCounterMode:
    """A FlopCounterMode that also counts the LoRS ops' forward (it cannot see inside an opaque
    custom op; their backward runs plain aten ops, which it sees) and ``addmm_``. The formulas
    are given to this counter only: torch's global FLOP registry is left alone."""
    formulas = {torch.ops.aten.addmm_: _addmm_inplace_flops}
    for name in ("sparse_lora_linear", "sparse_lora_linear_keep"):
        op = getattr(torch.ops.lors, name, None)
        if op is not None:
            formulas[op] = _lors_op_flops
    for name, formula in (("quant_lora_linear", _quant_op_flops),
                          ("quant_masked_weight", _quant_weight_flops)):
        op = getattr(torch.ops.lors, name, None)
        if op is not None:
            formulas[op] = formula
    return FlopCounterMode(display=False, custom_mapping=formulas)


def _count_flops(model: nn.Module, x_leaf: torch.Tensor) -> int:
    """FLOPs of one forward + backward of ``model`` (eager)."""
    with _flop_counter() as counter:
        model(x_leaf * 1.0).float().square().mean().backward()
    return counter.get_total_flops()


# ---------------------------------------------------------------------------------------------
# One case: every method on copies of one pruned model
# ---------------------------------------------------------------------------------------------

@dataclass
class _Case:
    """What every method of a case shares: the pruned model, the input and output gradient."""

    args: object
    device: torch.device
    base: nn.Module
    shapes: List[tuple]
    r: int
    alpha: float
    x_leaf: torch.Tensor
    grad_y: torch.Tensor
    matmul_flops: int
    matmul_run: Callable[[], None]


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _matmul_roofline(shapes, tokens, dtype, device) -> tuple:
    """``(flops, run)``: ``run()`` does plain ``x @ W^T`` and ``g @ W`` for every linear shape."""
    tensors = [(torch.randn(tokens, d_in, dtype=dtype, device=device),
                torch.randn(d_out, d_in, dtype=dtype, device=device),
                torch.randn(tokens, d_out, dtype=dtype, device=device)) for d_out, d_in in shapes]

    def run():
        for x, w, g in tensors:
            x @ w.t()
            g @ w

    return sum(4 * tokens * d_out * d_in for d_out, d_in in shapes), run


def _setup_case(workload: str, tokens: int, r: int, dtype_name: str, args) -> _Case:
    """The seeded pruned model, input, roofline matmuls and output gradient of one case (the
    random draws in this order, so a seed gives the same case)."""
    device, dtype = torch.device(args.device), _DTYPES[dtype_name]
    torch.manual_seed(args.seed)
    base, hidden = build_workload(workload, args.scale, args.layers, args.config)
    shapes = prune_(base, args.sparsity)
    base = base.to(device=device, dtype=dtype)
    alpha = 2.0 * r if args.alpha is None else args.alpha
    x_leaf = torch.randn(1, tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    matmul_flops, matmul_run = _matmul_roofline(shapes, tokens, dtype, device)
    grad_y = torch.randn(1, tokens, hidden, dtype=dtype, device=device) * 1e-2
    return _Case(args, device, base, shapes, r, alpha, x_leaf, grad_y, matmul_flops, matmul_run)


class _Unavailable(Exception):
    pass


def _build_method(method: str, base: nn.Module, r: int, alpha: float, compiled: bool):
    """``(train_model, raw_model)``: raw is eager, train is what is stepped (maybe compiled)."""
    model = copy.deepcopy(base)
    try:
        attach_method(model, method, r=r, alpha=alpha, min_sparsity=0.1)
    except ImportError as error:
        raise _Unavailable(f"{method}: not importable ({error})") from error
    randomize_adapters_(model)
    if get_method(method).wrapper is None:  # lors_fx.optimize compiled it, or not, itself
        return model, model
    return (torch.compile(model) if compiled else model), model


def _reference_copy(raw: nn.Module) -> nn.Module:
    """A float64 copy of ``raw`` whose adapted modules run their plain formula."""
    ref = copy.deepcopy(raw).double()
    set_reference_mode(ref)
    for module in lors_modules(ref).values():
        if module.grad_mode == "lors":
            module.forward = (lambda x, m=module: lors_closed_form(
                x, m.true_weight(), m.lora_A, m.lora_B, m.bias, m.scaling))
        else:
            module.emit_reference = True
    return ref


def _agreement(train, raw, x, grad_y, reference=_reference_copy) -> dict:
    params = trainable_parameters(raw)
    y = train(x * 1.0)
    grads = torch.autograd.grad(y, params, grad_y)
    ref = reference(raw)
    y_ref = ref(x.detach().double().requires_grad_())
    grads_ref = torch.autograd.grad(y_ref, trainable_parameters(ref), grad_y.double())
    err_y = (y.double() - y_ref).abs().max().item()
    err_g = max((g.double() - gr).abs().max().item() for g, gr in zip(grads, grads_ref))
    scale_g = max(gr.abs().max().item() for gr in grads_ref)
    return {"max_err_y": err_y, "max_err_grad": err_g,
            "rel_err_y": err_y / max(y_ref.abs().max().item(), 1e-30),
            "rel_err_grad": err_g / max(scale_g, 1e-30)}


def _train_step(train: nn.Module, optimizer: torch.optim.Optimizer, x_leaf: torch.Tensor) -> None:
    train(x_leaf * 1.0).float().square().mean().backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    x_leaf.grad = None


def _measure_method(method: str, case: _Case, rows: Dict[str, dict]) -> Callable[[], None]:
    """Build ``method`` on a copy of the case's model and fill its row (errors, saved bytes,
    FLOPs, peak, sizes); returns its training step, timed later with the others."""
    compiled = method.endswith("+compile")
    name = method.removesuffix("+compile")
    row, x_leaf = rows[method], case.x_leaf
    quantized = parse_quant_row(name) is not None
    if quantized:
        try:
            train = raw = build_quant_row(name, case.base, case.r, case.alpha,
                                          getattr(case.args, "group_size", 128))
        except ValueError as error:  # the group does not divide a d_in
            raise _Unavailable(str(error)) from error
    else:
        train, raw = _build_method(name, case.base, case.r, case.alpha, compiled)
    params = trainable_parameters(raw)
    optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
    install_mask_reapply(optimizer, raw)
    row.update(_agreement(train, raw, x_leaf, case.grad_y,  # also compiles compiled rows
                          quant_reference if quantized else _reference_copy))
    row["base_weight_bytes"], bf16 = base_weight_bytes(raw), dense_bf16_bytes(raw)
    row["base_vs_bf16"] = row["base_weight_bytes"] / bf16 if bf16 else None
    row["saved_bytes"] = saved_bytes(lambda: train(x_leaf * 1.0),  # alive anyway: not counted
                                     list(raw.parameters()) + list(raw.buffers()) + [x_leaf])
    eager_twin = rows.get("lors_fx_eager" if name == "lors_fx_compiled" else name, {})
    if (compiled or name == "lors_fx_compiled") and eager_twin.get("flops"):
        row["flops"] = eager_twin["flops"]  # the counter would re-trace compiled code
    else:  # on a deep copy of a model compiled in place (it runs eagerly): counting traces
        # the forward under a dispatch mode, which would make the compiled one fall back for good
        row["flops"] = _count_flops(copy.deepcopy(raw) if name == "lors_fx_compiled" else raw,
                                    x_leaf)
    x_leaf.grad = None
    for p in params:
        p.grad = None
    step = functools.partial(_train_step, train, optimizer, x_leaf)
    for _ in range(max(1, case.args.warmup)):  # AdamW's state exists before the peak step
        step()
    row["peak_bytes"] = peak_bytes(step, case.device) if not case.args.no_memory else None
    row["trainable_params"] = sum(p.numel() for p in params)
    row["optimizer_state_bytes"] = sum(t.numel() * t.element_size()
                                       for s in optimizer.state.values()
                                       for t in s.values() if torch.is_tensor(t))
    return step


def _round_robin(steps: Dict[str, Callable[[], None]], repeats: int,
                 device: torch.device) -> Dict[str, List[float]]:
    """Seconds of each step over ``repeats`` rounds, each round starting one step later, so a
    change in machine load hits every method alike."""
    times = {method: [] for method in steps}
    order = list(steps)
    for repeat in range(repeats):
        shift = repeat % max(1, len(order))
        for method in order[shift:] + order[:shift]:
            _sync(device)
            start = time.perf_counter()
            steps[method]()
            _sync(device)
            times[method].append(time.perf_counter() - start)
    return times


def _add_timings(rows: Dict[str, dict], times: Dict[str, List[float]],
                 matmul_gflops: float) -> None:
    for method, values in times.items():
        median = statistics.median(values)
        rows[method]["step_ms_all"] = [1e3 * v for v in values]
        rows[method]["step_ms"] = 1e3 * median
        rows[method]["step_ms_min"] = 1e3 * min(values)
        rows[method]["gflops"] = rows[method]["flops"] / median / 1e9
        rows[method]["roofline_frac"] = rows[method]["gflops"] / matmul_gflops


def _add_ratios(rows: Dict[str, dict]) -> None:
    """``vs_*``, ``saved_vs_*``, ``peak_vs_*``: each row over the lora and sqft rows."""
    for row in rows.values():
        for key, ref_key in (("step_ms", "vs"), ("saved_bytes", "saved_vs"),
                             ("peak_bytes", "peak_vs")):
            for baseline in ("lora", "sqft", "lors"):
                other = rows.get(baseline, {}).get(key)
                row[f"{ref_key}_{baseline}"] = (row[key] / other if row[key] is not None
                                                and other else None)


def run_case(workload: str, tokens: int, r: int, dtype_name: str, methods: List[str], args,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure every method on one (workload, T, r, dtype) case; returns the case dict."""
    case = _setup_case(workload, tokens, r, dtype_name, args)
    rows, steps = {}, {}
    for method in methods:
        rows[method] = {**dict.fromkeys(ROW_KEYS), "method": method, "status": "ok"}
        if progress:
            progress(f"{workload} T={tokens} r={r} {dtype_name}: {method}")
        try:
            steps[method] = _measure_method(method, case, rows)
        except _Unavailable as error:
            rows[method]["status"] = f"unavailable: {error}"
        except Exception as error:  # a failing method is a row, not a crashed benchmark
            rows[method]["status"] = (f"error: {type(error).__name__}: "
                                      f"{str(error).splitlines()[0][:120]}")
    steps[_MATMUL] = case.matmul_run  # timed in the same round-robin: the roofline sees the same load
    case.matmul_run()
    times = _round_robin(steps, args.steps, case.device)
    matmul_seconds = statistics.median(times.pop(_MATMUL))
    matmul_gflops = case.matmul_flops / matmul_seconds / 1e9
    _add_timings(rows, times, matmul_gflops)
    _add_ratios(rows)
    return {"workload": workload if workload != "config" else f"config:{args.config}",
            "tokens": tokens, "r": r, "dtype": dtype_name, "linear_shapes": case.shapes,
            "matmul_ms": 1e3 * matmul_seconds, "matmul_gflops": matmul_gflops,
            "rows": [rows[m] for m in methods]}


def _targets(cases: List[dict]) -> List[dict]:
    out = []
    for case in cases:
        if (case["workload"], case["tokens"], case["r"], case["dtype"]) != ("llama_mlp", 512, 16,
                                                                           "fp32"):
            continue
        rows = {row["method"]: row for row in case["rows"]}
        lors = rows.get("lors", {})
        for label, key, baseline, bound in TARGETS:
            value, other = lors.get(key), rows.get(baseline, {}).get(key)
            ratio = value / other if value is not None and other else None
            out.append({"target": label, "ratio": ratio, "bound": bound,
                        "holds": None if ratio is None else ratio <= bound})
    return out
