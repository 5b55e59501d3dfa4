#!/usr/bin/env python
"""Whole-model training step: lors_fx's default path against torch.compile'd PEFT LoRA and the rest.

Usage::

    python tools/bench_compile.py [--layers N --hidden H --intermediate I --heads H --kv-heads K
                                   --vocab V --seq T --r R --repeats K --warmup W
                                   --compiler inductor|eager --checkpoint POLICY --threads N
                                   --bits 4|8 --group-size G --settle N --only NAMES --json FILE]

The defaults are issue 13's case: a Llama with SmolLM2-135M's layer shapes (hidden 576, MLP 1536,
9/3 heads), 4 layers, vocabulary 8,192, every ``nn.Linear`` but ``lm_head`` 50% magnitude-pruned
per row, batch 1 x 512 tokens, r=16, alpha=32, fp32, one whole step (forward, backward, AdamW).
One process, one copy of the model per method:

- ``lors_fx optimize() defaults``: ``lors_fx.optimize(model, LorsConfig(r, alpha))``: what a user
  gets (inductor where it can run, compiled block by block).
- ``lors_fx compiled, op kept opaque (fuse_build=False)``: the default without
  ``lower_lors_ops`` (the op's build stays a Python op inside inductor's graphs).
- ``lors_fx compiled whole model (scope='model')``: one graph for the whole model instead of one
  per decoder block.
- with ``--bits 4|8``: ``optimize()`` on the model quantized round-to-nearest (``--group-size``,
  default 64), compiled plain and quantization-aware, and QA on the eager op.
- ``lors_fx compiled, eager compilers``: the same with ``fw_compiler=bw_compiler="eager"`` (the
  default before inductor became it).
- ``lors_fx eager op (compile=False)``: the custom op, no torch.compile.
- ``authors' form``: an ``autograd.Function`` that saves x, W, A, B and rebuilds W' in backward
  (the LoRS authors' kind of op, reimplemented).
- ``SQFT eager`` / ``SQFT compiled``: ``W' = W + s (B A) * M`` in plain torch (autograd keeps W').
- ``SPP (checkpointed)``: SPP's authors' gradient-checkpointed form (``lors_fx.methods``).
- ``PEFT LoRA eager`` / ``PEFT LoRA compiled``: real PEFT (``get_peft_model``), not
  sparsity-preserving; the compiled one (``torch.compile``, inductor) is the reference of the
  ratios. ``PEFT LoRA compiled per block``: each decoder layer compiled on its own
  (``layer.compile()``, regional compilation as lors_fx's default does): what one graph per block
  costs PEFT itself.

Per method: the first step's time (compile included), the median (and the minimum: on a shared
machine the least disturbed step) step time (forward + backward + AdamW step) over ``--repeats``
steps taken *interleaved* across methods after ``--warmup`` steps (each round starts one method
later, and each timed step follows ``--settle`` untimed steps of the same method, as in a training
loop: a step timed right after another model's inherits that model's freed memory and caches, which
made the default's ratio 2-3% worse in earlier tables, see docs/benchmarks.md), the median process
CPU time per step (``time.process_time``, all threads: less sensitive than wall time to other
processes on a shared machine), their ratios to the reference, the bytes saved for backward
(``torch.autograd.graph.saved_tensors_hooks`` on one forward; storages deduplicated, parameters and
buffers excluded by storage pointer; for a compiled graph the hook sees what the compiled autograd
function saves), and the step's peak memory: the high-water mark of live tensor bytes above the
step's starting level, from ``torch.profiler`` memory events of one steady-state step (in process:
it counts allocations made inside the step only, so the methods do not disturb each other). A
method that cannot run (a module missing, an error) gets a row ``unavailable: <reason>``.
"""
from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
import traceback
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from lors_fx._nn import replace_module
from lors_fx.methods.measure import peak_bytes, saved_bytes
from lors_fx.compiler import compile_state_of
from lors_fx.workflows.prune import magnitude_prune_

try:
    from tabulate import tabulate
except ImportError:  # pragma: no cover - tabulate is a dependency; keep the tool usable anyway
    tabulate = None


# ---------------------------------------------------------------------------------------------
# Model and baselines
# ---------------------------------------------------------------------------------------------


def build_model(args, seed: int = 0) -> nn.Module:
    """A tiny Llama with every non-``lm_head`` linear 50% magnitude-pruned per row, all frozen."""
    import transformers

    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, vocab_size=args.vocab, use_cache=False,
        max_position_embeddings=max(2048, args.seq))
    model = transformers.LlamaForCausalLM(config)
    magnitude_prune_(model, args.sparsity)  # per row, every linear but lm_head
    for param in model.parameters():
        param.requires_grad_(False)
    return model


class _Adapter(nn.Module):
    """A frozen linear plus PEFT-initialised adapters (``lora_A`` Kaiming, ``lora_B`` zeros)."""

    def __init__(self, base: nn.Linear, r: int, alpha: float):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.scaling = alpha / r
        self.lora_A = nn.Parameter(torch.empty(r, base.in_features))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, r))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))


class NaiveMaskedAdapter(_Adapter):
    """SQFT's masked adapter in plain torch: autograd keeps ``W'`` for backward."""

    def forward(self, x):
        from lors_fx.ops import reference_sparse_lora_linear

        return reference_sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, self.bias,
                                            self.scaling)


class DenseLora(_Adapter):
    """PEFT LoRA: ``x W^T + b + s (x A^T) B^T`` (merging it would fill the pruned zeros)."""

    def forward(self, x):
        return F.linear(x, self.weight, self.bias) + self.scaling * F.linear(
            F.linear(x, self.lora_A), self.lora_B)


def swap_linears(model: nn.Module, cls, r: int, alpha: float) -> List[str]:
    """Replace every sparse ``nn.Linear`` (not ``lm_head``) by ``cls(base, r, alpha)``."""
    names = [n for n, m in model.named_modules()
             if type(m) is nn.Linear and not n.endswith("lm_head") and bool((m.weight == 0).any())]
    for name in names:
        replace_module(model, name, cls(model.get_submodule(name), r, alpha))
    return names


# ---------------------------------------------------------------------------------------------
# Methods: each returns a model whose trainable parameters are the adapters
# ---------------------------------------------------------------------------------------------


class AuthorsForm(_Adapter):
    """The LoRS authors' kind of op: an ``autograd.Function`` that saves ``x``, ``W``, ``A``, ``B``
    and rebuilds ``W' = W + s (B A) * M`` in backward (plain torch, no chunking, bool mask);
    reimplemented here from the paper's description, not the authors' file."""

    def forward(self, x):
        return _AuthorsFunction.apply(x, self.weight, self.lora_A, self.lora_B, self.scaling)


class _AuthorsFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, lora_A, lora_B, scaling):
        ctx.save_for_backward(x, weight, lora_A, lora_B)
        ctx.scaling = scaling
        return F.linear(x, weight + scaling * (lora_B @ lora_A) * (weight != 0))

    @staticmethod
    def backward(ctx, g):
        x, weight, lora_A, lora_B = ctx.saved_tensors
        s = ctx.scaling
        x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
        w_eff = weight + s * (lora_B @ lora_A) * (weight != 0)
        return (g @ w_eff, None, s * (g2 @ lora_B).t() @ x2, s * g2.t() @ (x2 @ lora_A.t()),
                None)


def _lors_config(args, compiler: str = "auto", **overrides):
    from lors_fx.config import LorsConfig

    return LorsConfig(r=args.r, lora_alpha=2.0 * args.r, checkpoint=args.checkpoint,
                      fw_compiler=compiler, bw_compiler=compiler, **overrides)


def setup_lors(args, compile: bool, compiler: str = "auto", **overrides) -> nn.Module:
    """``lors_fx.optimize(model, cfg, compile=...)`` (``compiler="auto"``: its defaults;
    ``overrides``: other :class:`LorsConfig` fields)."""
    from lors_fx.api import optimize

    return optimize(build_model(args), _lors_config(args, compiler, **overrides), compile=compile)


def setup_lors_quantized(args, compile: bool = True, **overrides) -> nn.Module:
    """``optimize()`` on the same pruned model with its linears quantized round-to-nearest to
    ``--bits`` (``--group-size`` inputs per scale; ``quantize_model``), compute dtype fp32."""
    from lors_fx.api import optimize
    from lors_fx.quant import QuantSpec
    from lors_fx.quantized import quantize_model

    model = build_model(args)
    quantize_model(model, QuantSpec(args.bits, args.group_size))
    return optimize(model, _lors_config(args, **overrides), compile=compile)


def setup_lors_whole(args) -> nn.Module:
    """``optimize(..., compile=False)`` then ``compile_model(scope="model")``: one graph for the
    whole model instead of one per decoder block (the default's ``scope="auto"``)."""
    from lors_fx.api import optimize
    from lors_fx.compiler import compile_model

    config = _lors_config(args)
    return compile_model(optimize(build_model(args), config, compile=False), config, scope="model")


def setup_baseline(args, cls, compiled: bool) -> nn.Module:
    """Adapters of ``cls``, eager or under ``torch.compile`` (inductor; ``--compiler eager``:
    aot_eager)."""
    model = build_model(args)
    swap_linears(model, cls, args.r, 2.0 * args.r)
    if compiled:
        model.forward = torch.compile(model.forward, backend=_torch_backend(args))
    return model


def _torch_backend(args) -> str:
    return "aot_eager" if args.compiler == "eager" else "inductor"


def setup_peft(args, compiled) -> nn.Module:
    """Real PEFT LoRA (``get_peft_model``, every sparse projection): eager (``compiled=False``),
    torch.compile'd whole (``True``), or each decoder layer compiled on its own (``"blocks"``:
    ``layer.compile()``, PyTorch's regional compilation, what lors_fx's default does)."""
    import peft

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in build_model(args).named_modules()
                      if type(m) is nn.Linear and not n.endswith("lm_head")})
    model = peft.get_peft_model(build_model(args), peft.LoraConfig(
        r=args.r, lora_alpha=2 * args.r, target_modules=targets, lora_dropout=0.0))
    if compiled == "blocks":
        for layer in model.get_base_model().model.layers:
            layer.compile(backend=_torch_backend(args))
    elif compiled:
        model.forward = torch.compile(model.forward, backend=_torch_backend(args))
    return model


def setup_spp(args) -> nn.Module:
    """SPP in its authors' gradient-checkpointed form (lors_fx.methods' ``spp_ckpt``)."""
    from lors_fx.methods.registry import apply_method

    model = build_model(args)
    apply_method(model, "spp_ckpt", r=args.r, alpha=2.0 * args.r)
    return model


REFERENCE = "PEFT LoRA compiled"


def methods(args) -> Dict[str, Callable[[], nn.Module]]:
    """Name -> zero-argument builder, in table order (compiled PEFT LoRA is the reference)."""
    table = {
        "lors_fx optimize() defaults": lambda: setup_lors(args, compile=True),
        "lors_fx compiled, op kept opaque (fuse_build=False)":
            lambda: setup_lors(args, True, fuse_build=False),
        "lors_fx compiled whole model (scope='model')": lambda: setup_lors_whole(args),
        "lors_fx compiled, eager compilers": lambda: setup_lors(args, True, "eager"),
        "lors_fx eager op (compile=False)": lambda: setup_lors(args, compile=False),
        "authors' form (autograd.Function)": lambda: setup_baseline(args, AuthorsForm, False),
        "SQFT eager": lambda: setup_baseline(args, NaiveMaskedAdapter, False),
        "SQFT compiled": lambda: setup_baseline(args, NaiveMaskedAdapter, True),
        "SPP (checkpointed)": lambda: setup_spp(args),
        "PEFT LoRA eager": lambda: setup_peft(args, compiled=False),
        "PEFT LoRA compiled per block": lambda: setup_peft(args, compiled="blocks"),
        REFERENCE: lambda: setup_peft(args, compiled=True),
    }
    if args.bits:
        grid = f"int{args.bits} g{args.group_size}"
        table.update({
            f"lors_fx optimize() on {grid}": lambda: setup_lors_quantized(args),
            f"lors_fx optimize() on {grid}, quantization-aware":
                lambda: setup_lors_quantized(args, quant_aware=True),
            f"lors_fx eager op on {grid}, QA (compile=False)":
                lambda: setup_lors_quantized(args, False, quant_aware=True),
        })
    if args.only:
        wanted = [name.strip() for name in args.only.split(",")]
        table = {k: v for k, v in table.items() if any(w in k for w in wanted) or k == REFERENCE}
    return table


# ---------------------------------------------------------------------------------------------
# Measurements
# ---------------------------------------------------------------------------------------------


class Runner:
    """One method's model, optimizer and batch; ``step()`` is forward + backward + AdamW step."""

    def __init__(self, model: nn.Module, batch: dict):
        self.model = model
        self.batch = batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        if not self.params:
            raise RuntimeError("no trainable parameters")
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4)

    def loss(self):
        return self.model(**self.batch).loss

    def step(self) -> float:
        loss = self.loss()
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    def saved_bytes(self) -> int:
        """Bytes of the storages one forward saves for backward, parameters/buffers excluded."""
        return saved_bytes(self.loss, list(self.model.parameters()) + list(self.model.buffers()))

    def peak_bytes(self) -> int:
        """High-water mark of live tensor bytes during one step, above the level at its start."""
        return peak_bytes(self.step, torch.device("cpu"))


def turns(names: List[str], repeats: int, settle: int) -> List[Tuple[str, bool]]:
    """The order of the measured steps: ``(method, timed)`` pairs.

    ``repeats`` rounds over ``names``, each round starting one method later (so a drift in the
    machine's load hits every method alike), and each timed step right after ``settle`` untimed
    steps of the same method: a timed step follows a step of its own model, as in a training
    loop, not a fixed neighbour whose freed memory and caches it would inherit.
    """
    order: List[Tuple[str, bool]] = []
    for repeat in range(repeats):
        shift = repeat % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            order += [(name, False)] * settle + [(name, True)]
    return order


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160] if text else ''}"


def run(args) -> dict:
    """Build every method, warm up, time interleaved steps, measure memory; return the results."""
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    rows: Dict[str, dict] = {}
    runners: Dict[str, Runner] = {}
    for name, build in methods(args).items():
        row = rows.setdefault(name, {"method": name})
        try:
            start = time.perf_counter()
            runner = Runner(build(), batch)
            row["first_loss"] = runner.step()
            row["first_step_s"] = time.perf_counter() - start
            for _ in range(args.warmup):
                runner.step()
            state = compile_state_of(runner.model)
            if state is not None and getattr(state, "fallback", None):
                row["note"] = f"fell back to eager: {state.fallback}"
            runners[name] = runner
        except Exception as error:  # a row says why, the other methods still run
            row["unavailable"] = _reason(error)
            if args.verbose:
                traceback.print_exc()
        print(f"  built {name}: " + (row.get("unavailable") or
                                     f"first step {row['first_step_s']:.1f}s"), file=sys.stderr)
    times: Dict[str, List[float]] = {name: [] for name in runners}
    cpu_times: Dict[str, List[float]] = {name: [] for name in runners}
    for name, timed in turns(list(runners), args.repeats, args.settle):
        if not timed:
            runners[name].step()
            continue
        start, cpu_start = time.perf_counter(), time.process_time()
        runners[name].step()
        times[name].append(time.perf_counter() - start)
        cpu_times[name].append(time.process_time() - cpu_start)
    for name, runner in runners.items():
        rows[name]["step_ms"] = 1e3 * statistics.median(times[name])
        rows[name]["step_ms_min"] = 1e3 * min(times[name])
        rows[name]["cpu_ms"] = 1e3 * statistics.median(cpu_times[name])
        rows[name]["step_ms_all"] = [1e3 * t for t in times[name]]
        rows[name]["saved_bytes"] = runner.saved_bytes()
        rows[name]["peak_bytes"] = runner.peak_bytes()
    reference = rows.get(REFERENCE, {})
    for row in rows.values():
        if reference.get("step_ms") and "step_ms" in row:
            row["ratio_to_lora"] = row["step_ms"] / reference["step_ms"]
            row["ratio_to_lora_min"] = row["step_ms_min"] / reference["step_ms_min"]
            row["cpu_ratio_to_lora"] = row["cpu_ms"] / reference["cpu_ms"]
            row["peak_ratio_to_lora"] = row["peak_bytes"] / max(1, reference["peak_bytes"])
    machine = {"python": platform.python_version(), "torch": torch.__version__,
               "threads": torch.get_num_threads(),
               "processor": platform.processor() or platform.machine()}
    return {"args": vars(args), "machine": machine,
            "peak_memory_method": "torch.profiler memory events, one steady-state step, in process",
            "rows": list(rows.values())}


def format_table(result: dict) -> str:
    """The results as a text table (tabulate's ``github`` format when available)."""
    headers = ["method", "step ms (median)", "x LoRA", "step ms (min)", "x LoRA (min)",
               "CPU ms (median)", "x LoRA (CPU)", "first step s", "saved MiB", "peak MiB",
               "peak x LoRA",
               "loss@1"]
    lines = []
    for row in result["rows"]:
        if "unavailable" in row:
            lines.append([row["method"], f"unavailable: {row['unavailable']}"] + [""] * 10)
            continue
        lines.append([row["method"], f"{row['step_ms']:.1f}",
                      f"{row['ratio_to_lora']:.2f}" if "ratio_to_lora" in row else "",
                      f"{row['step_ms_min']:.1f}",
                      f"{row['ratio_to_lora_min']:.2f}" if "ratio_to_lora_min" in row else "",
                      f"{row['cpu_ms']:.1f}",
                      f"{row['cpu_ratio_to_lora']:.2f}" if "cpu_ratio_to_lora" in row else "",
                      f"{row['first_step_s']:.1f}", f"{row['saved_bytes'] / 2**20:.2f}",
                      f"{row['peak_bytes'] / 2**20:.2f}",
                      f"{row['peak_ratio_to_lora']:.2f}" if "peak_ratio_to_lora" in row else "",
                      f"{row['first_loss']:.4f}"])
    if tabulate is not None:
        return tabulate(lines, headers=headers, tablefmt="github")
    return "\n".join(" | ".join(str(c) for c in line) for line in [headers] + lines)


def parse_args(argv=None) -> argparse.Namespace:
    """Command-line flags (see the module docstring)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--hidden", type=int, default=576)
    parser.add_argument("--intermediate", type=int, default=1536)
    parser.add_argument("--heads", type=int, default=9)
    parser.add_argument("--kv-heads", type=int, default=3)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--settle", type=int, default=1,
                        help="untimed steps of a method right before each of its timed steps "
                             "(0: time the step that follows another method's)")
    parser.add_argument("--compiler", choices=("inductor", "eager"), default="inductor",
                        help="the torch.compile backend of the compiled baselines: inductor, or "
                             "eager (aot_eager: the partitioned graphs as they are); lors_fx's "
                             "default row always uses its own defaults")
    parser.add_argument("--checkpoint", default="none",
                        help="LorsConfig.checkpoint policy of the lors_fx rows")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch.set_num_threads (0: torch's default); 1 is steadiest on a "
                             "shared machine")
    parser.add_argument("--bits", type=int, choices=(4, 8),
                        help="also run lors_fx on the model quantized to this many bits "
                             "(QuantSpec; compiled plain and quantization-aware, QA eager)")
    parser.add_argument("--group-size", type=int, default=64,
                        help="inputs per scale with --bits (default 64: divides 576)")
    parser.add_argument("--json", help="write the results to this file")
    parser.add_argument("--only", help="comma-separated substrings of the method names to run "
                        "(the reference, compiled PEFT LoRA, always runs)")
    parser.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    args = parser.parse_args(argv)
    if args.settle < 0 or args.repeats < 1:
        parser.error("--settle must be >= 0 and --repeats >= 1")
    return args


def main(argv=None) -> dict:
    """Run the benchmark, print the table, write JSON on request."""
    args = parse_args(argv)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    result = run(args)
    print(f"tiny Llama: layers={args.layers} hidden={args.hidden} intermediate="
          f"{args.intermediate} T={args.seq} batch={args.batch} r={args.r} sparsity="
          f"{args.sparsity}; compiler={args.compiler}; median of {args.repeats} interleaved "
          f"steps after {args.warmup} warm-up; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads")
    print(f"peak memory: {result['peak_memory_method']}")
    print(format_table(result))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(result, handle, indent=2, default=str)
        print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
