"""Benchmark harness: LoRS against LoRA, SQFT, SPP and full sparse fine-tuning on the same model.

    python tools/bench.py --quick                       # one small shape, < 1 minute
    python tools/bench.py --workloads llama_mlp --tokens 512 --ranks 16 --dtypes fp32 --json out.json
    python tools/bench.py --compile                     # also torch.compile'd rows (slow on CPU)

Each case (workload x T x r x dtype) builds one pruned model (seeded; ``--sparsity`` of each target
weight zeroed by per-row magnitude), gives every method its own copy, randomises the adapter
factors that start at zero, then measures, all methods in one process:

- ``max_err_y`` / ``max_err_grad`` (and ``rel_``): max abs difference of the output and of the
  trainable-parameter gradients against a float64 copy running the method's own formula
  (:meth:`formula` of :mod:`lors_fx.baselines`; LoRS ``grad_mode="lors"`` against its closed form).
- ``saved_bytes``: bytes autograd saves for backward in one forward, exact, counted with
  ``saved_tensors_hooks`` (parameters and the input leaf excluded, storages counted once).
- ``peak_bytes``: peak of the step (forward + backward + AdamW step + zero_grad) above the
  allocated memory at its start. CUDA: ``torch.cuda.max_memory_allocated``. CPU: the profiler's
  allocation events (``profile_memory=True``), cumulated in time order over one untimed step:
  exact for tensors from PyTorch's CPU allocator, blind to oneDNN scratch and Python objects.
- ``step_ms``: median over ``--steps`` interleaved steps after ``--warmup``; ``vs_lora``/``vs_sqft``.
- ``flops`` (FlopCounterMode, one forward + backward of the eager model), ``gflops`` = flops /
  step time, ``roofline_frac`` = gflops / GFLOP/s of plain matmuls of the same linear shapes
  (forward and input-gradient, timed in the same round-robin: the practical roofline).

JSON (``--json``): ``{"schema", "machine", "args", "peak_memory_method", "cases", "targets"}``;
each case ``{"workload", "tokens", "r", "dtype", "linear_shapes", "matmul_ms", "matmul_gflops",
"rows"}``; each row has :data:`ROW_KEYS` (``None`` where a method is unavailable, with the reason
in ``status``). ``targets`` checks the issue's goals on ``llama_mlp``, T=512, r=16, fp32.
"""
from __future__ import annotations

import copy
import json
import math
import statistics
import time
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .baselines import (apply_method, install_mask_reapply, lors_closed_form,
                        randomize_adapters_, set_reference_mode, trainable_parameters)

__all__ = ["build_workload", "saved_bytes", "run_case", "ROW_KEYS",
           "CASE_KEYS", "TOP_KEYS", "WORKLOADS", "TARGETS"]

SCHEMA = "lors_fx.bench/1"
WORKLOADS = ("llama_mlp", "llama_attn", "smollm2")
EXTRA_METHODS = ("lors_fx_eager", "lors_fx_compiled")
ROW_KEYS = ("method", "status", "step_ms", "step_ms_min", "step_ms_all", "vs_lora", "vs_sqft", "saved_bytes",
            "saved_vs_lora", "saved_vs_sqft", "peak_bytes", "peak_vs_lora", "peak_vs_sqft",
            "trainable_params", "optimizer_state_bytes", "flops", "gflops", "roofline_frac",
            "max_err_y", "max_err_grad", "rel_err_y", "rel_err_grad")
CASE_KEYS = ("workload", "tokens", "r", "dtype", "linear_shapes", "matmul_ms", "matmul_gflops",
             "rows")
TOP_KEYS = ("schema", "machine", "args", "peak_memory_method", "cases", "targets")
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
# Workloads
# ---------------------------------------------------------------------------------------------

class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h))


class _HFBody(nn.Module):
    """A transformers base model fed ``inputs_embeds``; returns the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(inputs_embeds=x, use_cache=False).last_hidden_state


def _hf_body(config, layers: Optional[int]) -> nn.Module:
    from transformers import AutoModel
    if layers is not None:
        config.num_hidden_layers = layers
    config.vocab_size = 32  # inputs_embeds is fed: a full vocabulary would only cost memory
    return _HFBody(AutoModel.from_config(config, attn_implementation="sdpa"))


def build_workload(name: str, scale: float = 0.25, layers: Optional[int] = None,
                   config_path: Optional[str] = None) -> tuple:
    """``(model, hidden)`` for a workload name (``WORKLOADS`` or ``"config"`` with a JSON path).

    ``llama_mlp``: Llama-7B MLP (gate/up 4096->11008, down 11008->4096) times ``scale``;
    ``llama_attn``: its attention (q, k, v, o 4096x4096, head dim 128) times ``scale``;
    ``smollm2``: SmolLM2-135M's decoder (hidden 576, intermediate 1536, 30 layers, 9/3 heads),
    ``layers`` cuts it; ``config``: any transformers config JSON (``layers`` cuts it too).
    Weights are random (seeded by the caller); call :func:`prune_` to sparsify them.
    """
    if name == "llama_mlp":
        hidden = max(16, round(4096 * scale / 16) * 16)
        return _SwiGLU(hidden, max(16, round(11008 * scale / 16) * 16)), hidden
    if name == "llama_attn":
        hidden = max(128, round(4096 * scale / 128) * 128)
        return _Attention(hidden, hidden // 128), hidden
    if name == "smollm2":
        from transformers import LlamaConfig
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=8192, tie_word_embeddings=True)
        return _hf_body(config, layers), 576
    if name == "config":
        from transformers import AutoConfig
        if not config_path:
            raise ValueError("build_workload: the 'config' workload needs config_path")
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
        if "model_type" not in data:
            raise ValueError(f"{config_path}: a transformers config JSON needs 'model_type'")
        config = AutoConfig.for_model(**data)
        return _hf_body(config, layers), config.hidden_size
    raise ValueError(f"build_workload: unknown workload {name!r}; known: {WORKLOADS + ('config',)}")


@torch.no_grad()
def prune_(model: nn.Module, sparsity: float) -> List[tuple]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of each row of every Linear.

    Returns the ``(d_out, d_in)`` shapes of the pruned linears.
    """
    shapes = []
    for module in model.modules():
        if type(module) is nn.Linear:
            weight = module.weight
            k = int(weight.shape[1] * sparsity)
            if k > 0:
                threshold = weight.abs().float().kthvalue(k, dim=1, keepdim=True).values
                weight.masked_fill_(weight.abs().float() <= threshold, 0)
            shapes.append(tuple(weight.shape))
    return shapes


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------

def saved_bytes(forward: Callable, exclude: List[torch.Tensor]) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs, counted with
    ``saved_tensors_hooks``; storages of ``exclude`` (parameters: alive anyway) are not counted."""
    excluded = {t.untyped_storage().data_ptr() for t in exclude}
    seen: Dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in excluded:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = forward()
    del out
    return sum(seen.values())


def _peak_bytes(step: Callable, device: torch.device) -> int:
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and str(e.device_type()).endswith("CPU"))
    level = peak = 0
    for _, nbytes in events:
        level += nbytes
        peak = max(peak, level)
    return peak


_FLOPS_REGISTERED = []


def _register_custom_op_flops() -> None:
    """Teach FlopCounterMode the LoRS ops' forward (it cannot see inside an opaque custom op).

    Forward: ``B @ A`` (2 d_out r d_in) + ``x @ W'^T`` (2 T d_in d_out). Their backward runs plain
    aten ops, which the counter sees, except the in-place ``addmm_`` (registered here too).
    """
    if _FLOPS_REGISTERED:
        return
    from torch.utils.flop_counter import register_flop_formula

    def formula(x_shape, w_shape, a_shape, *args, out_shape=None, **kwargs):
        d_out, d_in = w_shape
        tokens = math.prod(x_shape[:-1])
        return 2 * d_out * a_shape[0] * d_in + 2 * tokens * d_in * d_out

    for name in ("sparse_lora_linear", "sparse_lora_linear_keep"):
        op = getattr(torch.ops.lors, name, None)
        if op is not None:
            register_flop_formula(op)(formula)
    from torch.utils.flop_counter import flop_registry
    if torch.ops.aten.addmm_ not in flop_registry:  # the exact backward's dx

        def addmm_inplace(self_shape, a_shape, b_shape, *args, out_shape=None, **kwargs):
            return 2 * a_shape[0] * a_shape[1] * b_shape[1]

        register_flop_formula(torch.ops.aten.addmm_)(addmm_inplace)
    _FLOPS_REGISTERED.append(True)


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


class _Unavailable(Exception):
    pass


def _build_method(method: str, base: nn.Module, r: int, alpha: float, compiled: bool):
    """``(train_model, raw_model)``: raw is eager, train is what is stepped (maybe compiled)."""
    model = copy.deepcopy(base)
    if method in EXTRA_METHODS:
        import lors_fx
        from lors_fx.config import LorsConfig
        config = LorsConfig(r=r, lora_alpha=alpha, min_sparsity=0.1)
        try:
            model = lors_fx.optimize(model, config, compile=method == "lors_fx_compiled")
        except ImportError as error:
            raise _Unavailable(f"lors_fx.backend not importable ({error})") from error
        randomize_adapters_(model)
        return model, model
    apply_method(model, method, r=r, alpha=alpha)
    randomize_adapters_(model)
    return (torch.compile(model) if compiled else model), model


def _reference_copy(raw: nn.Module) -> nn.Module:
    """A float64 copy of ``raw`` whose adapted modules run their plain formula."""
    from .adapters import lors_modules
    ref = copy.deepcopy(raw).double()
    set_reference_mode(ref)
    for module in lors_modules(ref).values():
        if module.grad_mode == "lors":
            module.forward = (lambda x, m=module: lors_closed_form(
                x, m.true_weight(), m.lora_A, m.lora_B, m.bias, m.scaling))
        else:
            module.emit_reference = True
    return ref


def _agreement(train, raw, x, grad_y) -> dict:
    params = trainable_parameters(raw)
    y = train(x * 1.0)
    grads = torch.autograd.grad(y, params, grad_y)
    ref = _reference_copy(raw)
    y_ref = ref(x.detach().double().requires_grad_())
    grads_ref = torch.autograd.grad(y_ref, trainable_parameters(ref), grad_y.double())
    err_y = (y.double() - y_ref).abs().max().item()
    err_g = max((g.double() - gr).abs().max().item() for g, gr in zip(grads, grads_ref))
    scale_g = max(gr.abs().max().item() for gr in grads_ref)
    return {"max_err_y": err_y, "max_err_grad": err_g,
            "rel_err_y": err_y / max(y_ref.abs().max().item(), 1e-30),
            "rel_err_grad": err_g / max(scale_g, 1e-30)}


def run_case(workload: str, tokens: int, r: int, dtype_name: str, methods: List[str], args,
             progress: Optional[Callable[[str], None]] = None) -> dict:
    """Measure every method on one (workload, T, r, dtype) case; returns the case dict."""
    device = torch.device(args.device)
    dtype = _DTYPES[dtype_name]
    _register_custom_op_flops()
    torch.manual_seed(args.seed)
    base, hidden = build_workload(workload, args.scale, args.layers, args.config)
    shapes = prune_(base, args.sparsity)
    base = base.to(device=device, dtype=dtype)
    alpha = 2.0 * r if args.alpha is None else args.alpha
    x_leaf = torch.randn(1, tokens, hidden, dtype=dtype, device=device, requires_grad=True)
    matmul_flops, matmul_run = _matmul_roofline(shapes, tokens, dtype, device)
    grad_y = torch.randn(1, tokens, hidden, dtype=dtype, device=device) * 1e-2
    rows, steps = {}, {}
    for method in methods:
        compiled = method.endswith("+compile")
        name = method[: -len("+compile")] if compiled else method
        row = {key: None for key in ROW_KEYS}
        row.update(method=method, status="ok")
        rows[method] = row
        if progress:
            progress(f"{workload} T={tokens} r={r} {dtype_name}: {method}")
        try:
            train, raw = _build_method(name, base, r, alpha, compiled)
            params = trainable_parameters(raw)
            optimizer = torch.optim.AdamW(params, lr=1e-4, foreach=False)
            install_mask_reapply(optimizer, raw)
            row.update(_agreement(train, raw, x_leaf, grad_y))  # also compiles compiled rows
            row["saved_bytes"] = saved_bytes(lambda: train(x_leaf * 1.0),
                                              list(raw.parameters()) + [x_leaf])
            eager_twin = rows.get("lors_fx_eager" if name == "lors_fx_compiled" else name, {})
            if (compiled or name == "lors_fx_compiled") and eager_twin.get("flops"):
                row["flops"] = eager_twin["flops"]  # the counter would re-trace compiled code
            else:
                from torch.utils.flop_counter import FlopCounterMode
                with FlopCounterMode(display=False) as counter:
                    raw(x_leaf * 1.0).float().square().mean().backward()
                row["flops"] = counter.get_total_flops()
            x_leaf.grad = None
            for p in params:
                p.grad = None

            def step(train=train, optimizer=optimizer):
                train(x_leaf * 1.0).float().square().mean().backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                x_leaf.grad = None

            for _ in range(max(1, args.warmup)):  # AdamW's state exists before the peak step
                step()
            row["peak_bytes"] = _peak_bytes(step, device) if not args.no_memory else None
        except _Unavailable as error:
            row["status"] = f"unavailable: {error}"
            continue
        except Exception as error:  # a failing method is a row, not a crashed benchmark
            row["status"] = f"error: {type(error).__name__}: {str(error).splitlines()[0][:120]}"
            continue
        steps[method] = step
        row["trainable_params"] = sum(p.numel() for p in params)
        row["optimizer_state_bytes"] = sum(t.numel() * t.element_size()
                                           for s in optimizer.state.values()
                                           for t in s.values() if torch.is_tensor(t))
    steps[_MATMUL] = matmul_run  # timed in the same round-robin: the roofline sees the same load
    matmul_run()
    times = {method: [] for method in steps}
    order = list(steps)
    for repeat in range(args.steps):
        for method in order[repeat % max(1, len(order)):] + order[:repeat % max(1, len(order))]:
            _sync(device)
            start = time.perf_counter()
            steps[method]()
            _sync(device)
            times[method].append(time.perf_counter() - start)
    matmul_seconds = statistics.median(times.pop(_MATMUL))
    matmul_ms, matmul_gflops = 1e3 * matmul_seconds, matmul_flops / matmul_seconds / 1e9
    for method, values in times.items():
        rows[method]["step_ms_all"] = [1e3 * v for v in values]
        rows[method]["step_ms"] = 1e3 * statistics.median(values)
        rows[method]["step_ms_min"] = 1e3 * min(values)
        rows[method]["gflops"] = rows[method]["flops"] / statistics.median(values) / 1e9
        rows[method]["roofline_frac"] = rows[method]["gflops"] / matmul_gflops
    for row in rows.values():
        for key, ref_key in (("step_ms", "vs"), ("saved_bytes", "saved_vs"),
                             ("peak_bytes", "peak_vs")):
            for baseline in ("lora", "sqft"):
                other = rows.get(baseline, {}).get(key)
                row[f"{ref_key}_{baseline}"] = (row[key] / other if row[key] is not None
                                                and other else None)
    return {"workload": workload if workload != "config" else f"config:{args.config}",
            "tokens": tokens, "r": r, "dtype": dtype_name, "linear_shapes": shapes,
            "matmul_ms": matmul_ms, "matmul_gflops": matmul_gflops,
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
