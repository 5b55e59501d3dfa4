"""Worker of tests/distributed/test_deepspeed.py: a tiny pruned Llama with LoRS adapters under
DeepSpeed ZeRO.

Run by the test with ``python -m torch.distributed.run --nproc_per_node=2 --master_port=P
tests/distributed/_ds_worker.py STAGE OUT_DIR [--compile]``. Each rank:

1. builds the same model (:func:`build_lors_model`: tiny pruned Llama, float64, LoRS adapters r=4
   with a seeded nonzero ``lora_B``, eager op) and snapshots its masks;
2. wraps it with :func:`lors_fx.distributed.deepspeed.initialize` (ZeRO ``STAGE``);
3. runs one forward/backward on its own batch ``random_batch(seed=rank)``, records the loss and
   the full (averaged) adapter gradients (:func:`full_adapter_grads`), steps;
4. runs ``STEPS - 1`` more steps, then gathers every weight and checks the zero pattern of the
   base weights (:func:`lors_fx.audit`) and of the effective weights the op computes
   (``sparse_lora_linear`` on an identity input = ``(W + s*(B@A)*M).T``);
5. saves the adapters (:func:`save_adapters_deepspeed`, rank 0 writes ``OUT_DIR/adapter``) and the
   logits of the trained model on :data:`LOGITS_SEED`'s batch (no grad, every rank takes part);
6. writes ``OUT_DIR/rank{R}.pt`` (a dict of tensors, numbers and strings).

``--compile`` uses ``optimize(..., compile=True)`` instead (to see what ZeRO does with it); the
worker then records the error of ``initialize`` or of the first step in ``error`` and exits 0.
(ZeRO-3: ``initialize`` refuses the compiled model; ZeRO-2: one graph, eager gradients.)

The model is float64 under ZeRO-2 (its optimizer keeps float32 gradient partitions and master
weights, so the reduced gradients match a float64 single-process run to float32 precision) and
float32 under ZeRO-3, whose parameter partitioning (``zero.Init``) accepts only fp32/bf16/fp16
(:func:`dtype_for`).
"""
from __future__ import annotations

import os
import sys
import time
import traceback
import warnings

os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
from lors_fx.compiler import compile_state_of

DTYPE = torch.float64     # ZeRO-2 keeps float64 params (its master copy is float32 at most)
RANK_BATCH, SEQ = 2, 16   # micro batch per rank
STEPS = 3                 # optimizer steps
LOGITS_SEED = 100         # the fixed batch whose logits are compared
LR = 1e-2
CONFIG = dict(r=4, lora_alpha=8)


def dtype_for(stage: int) -> torch.dtype:
    """The model dtype of a stage: ZeRO-3's ``zero.Init`` asserts fp32/bf16/fp16 parameters."""
    return torch.float32 if stage == 3 else DTYPE


def build_model_plain(dtype=DTYPE):
    """The tiny pruned Llama (seed 0, 50% unstructured) in ``dtype``, without adapters."""
    from lors_fx.testing.tiny_models import build_model

    return build_model("llama", "50%", seed=0).to(dtype)


def build_lors_model(dtype=DTYPE, compile=False):
    """:func:`build_model_plain` with LoRS adapters, ``lora_A``/``lora_B`` drawn from a fixed
    generator (``lora_B`` nonzero, so ``lora_A`` gets a gradient). Identical on every rank and in
    the test's single-process reference."""
    from lors_fx import LorsConfig, lors_modules, optimize

    model = build_model_plain(dtype)
    optimize(model, LorsConfig(**CONFIG), compile=compile)
    generator = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for _, module in sorted(lors_modules(model).items()):
            module.lora_A.copy_(torch.randn(module.lora_A.shape, generator=generator) * 0.1)
            module.lora_B.copy_(torch.randn(module.lora_B.shape, generator=generator) * 0.1)
    return model


def rank_batch(rank: int, step: int = 0):
    """The batch of ``rank`` at optimizer step ``step`` (step 0: ``random_batch(seed=rank)``)."""
    from lors_fx.testing.tiny_models import random_batch

    return random_batch(RANK_BATCH, SEQ, seed=rank + 1000 * step)


def logits_batch():
    from lors_fx.testing.tiny_models import random_batch

    return random_batch(RANK_BATCH, SEQ, seed=LOGITS_SEED)


@torch.no_grad()
def effective_weights(model):
    """``{module: W + s*(B@A)*M}`` as the op computes it (identity input), full weights needed."""
    from lors_fx import lors_modules
    from lors_fx.ops import sparse_lora_linear

    out = {}
    for name, module in lors_modules(model).items():
        weight = module.weight
        eye = torch.eye(weight.shape[1], dtype=weight.dtype)
        y = sparse_lora_linear(eye, weight, module.lora_A, module.lora_B, bias=None,
                               scaling=module.scaling)
        out[name] = y.t().contiguous()
    return out


def _gathered(params):
    import contextlib

    import deepspeed

    if any(hasattr(p, "ds_id") for p in params):
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=None)
    return contextlib.nullcontext()


def run(stage: int, out_dir: str, compile: bool) -> dict:
    import deepspeed
    import lors_fx
    from lors_fx.distributed.deepspeed import (full_adapter_grads, initialize,
                                          save_adapters_deepspeed, zero_config)

    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    world = torch.distributed.get_world_size()
    result = {"rank": rank, "world": world, "stage": stage, "dtype": str(dtype_for(stage)), "error": None,
              "warnings": []}
    model = build_lors_model(dtype_for(stage), compile=compile)
    masks = lors_fx.snapshot_masks(model)
    config = zero_config(stage, micro_batch_size=RANK_BATCH, lr=LR, clip=0.0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            engine = initialize(model, config)
            result["param_dtypes"] = sorted({str(p.dtype) for p in engine.module.parameters()})
            result.update(_partition_summary(engine.module))
            # (hooks in a compiled forward would break its graph: not watched with --compile)
            seen = {} if compile else _watch_weights(engine.module)
            engine.train()
            batch = rank_batch(rank)
            loss = engine(**batch).loss
            engine.backward(loss)
            result["loss"] = float(loss.detach())
            result["grads"] = full_adapter_grads(engine)
            result["forward_weights"] = {name: value == (masks[name].numel(),
                                                         int(masks[name].sum()))
                                         for name, value in seen.items()}
            engine.step()
            for step in range(1, STEPS):
                loss = engine(**rank_batch(rank, step)).loss
                engine.backward(loss)
                engine.step()
            result["last_loss"] = float(loss.detach())
        except Exception as error:  # recorded for the --compile experiment
            if not compile:
                raise
            result["error"] = f"{type(error).__name__}: {error}"
            result["traceback"] = traceback.format_exc()
            return result
        finally:
            result["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    module = engine.module
    result["compiled_state"] = _compiled_summary(module)
    with _gathered(list(module.parameters())):
        audit = lors_fx.audit(module, masks)
        result["audit_ok"] = bool(audit.ok)
        result["audit_new_nonzeros"] = dict(audit.new_nonzeros)
        result["audit_checked"] = audit.checked
        effective = effective_weights(module)
        result["effective_new_nonzeros"] = {
            name: int(((w != 0) & ~masks[name]).sum()) for name, w in effective.items()}
        result["effective_lost_nonzeros"] = {
            name: int(((w == 0) & masks[name]).sum()) for name, w in effective.items()}
        result["adapters"] = {f"{n}.{part}": getattr(m, part).detach().clone()
                              for n, m in lors_fx.lors_modules(module).items()
                              for part in ("lora_A", "lora_B")}
    result["saved"] = save_adapters_deepspeed(engine, os.path.join(out_dir, "adapter"))
    engine.eval()
    with torch.no_grad():
        result["logits"] = engine(**logits_batch()).logits.detach().clone()
    return result


def _partition_summary(model) -> dict:
    """How the parameters are held outside forward: ZeRO-3 leaves each rank an empty ``param``
    and a 1/world ``ds_tensor`` partition."""
    params = list(model.parameters())
    return {"zero3_params": sum(hasattr(p, "ds_id") for p in params), "params": len(params),
            "full_numel": sum(int(getattr(p, "ds_numel", p.numel())) for p in params),
            "local_numel": sum(p.data.numel() for p in params),
            "partition_numel": sum(p.ds_tensor.numel() for p in params
                                   if getattr(p, "ds_tensor", None) is not None)}


def _watch_weights(model) -> dict:
    """Record ``(numel, nonzeros)`` of each LoRS module's weight as its forward sees it (first
    call), through forward pre-hooks registered after DeepSpeed's (which gather under ZeRO-3)."""
    seen = {}

    def make_hook(name):
        def hook(module, args):
            if name not in seen:
                weight = module.weight.detach()
                seen[name] = (weight.numel(), int((weight != 0).sum()))
        return hook

    from lors_fx import lors_modules

    for name, module in lors_modules(model).items():
        module.register_forward_pre_hook(make_hook(name))
    return seen


def _compiled_summary(model):
    state = compile_state_of(model)
    if state is None:
        return None
    return {"fallback": getattr(state, "fallback", None),
            "graphs": len(getattr(state, "graphs", []) or []),
            "graph_breaks": getattr(state, "graph_breaks", None)}


def main(argv) -> int:
    if len(argv) < 2 or argv[0] not in ("2", "3"):
        print("usage: _ds_worker.py STAGE(2|3) OUT_DIR [--compile]", file=sys.stderr)
        return 2
    stage, out_dir, compile = int(argv[0]), argv[1], "--compile" in argv[2:]
    torch.set_num_threads(1)
    start = time.perf_counter()
    result = run(stage, out_dir, compile)
    result["seconds"] = time.perf_counter() - start
    os.makedirs(out_dir, exist_ok=True)
    torch.save(result, os.path.join(out_dir, f"rank{result['rank']}.pt"))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
