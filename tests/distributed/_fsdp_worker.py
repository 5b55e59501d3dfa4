"""Worker of tests/distributed/test_fsdp.py: LoRS on a tiny pruned Llama under FSDP2 (gloo, CPU).

Run by the test as ``python -m torch.distributed.run --nproc_per_node=2 --master_port=P
tests/distributed/_fsdp_worker.py OUT_DIR SCENARIO [SCENARIO ...]``. A scenario is
``ORDER-MODE[-ckpt]``:

- ORDER ``A``: ``optimize`` then :func:`lors_fx.distributed.shard_model`; ``B``: shard first, then
  ``optimize`` attaches the adapters in place and shards them; ``C``: ``optimize`` then plain
  ``fully_shard`` calls (as accelerate's ``prepare`` does; the compiled forward re-scopes itself);
- MODE ``eager`` (``compile=False``, the op) or ``compiled`` (the lors backend, per block);
- ``-ckpt``: ``LorsConfig(checkpoint="block")`` (the insert_checkpoints pass) with FSDP2's
  reshard-after-forward; ``-bf16``: FSDP2's ``MixedPrecisionPolicy`` (bf16 compute, float32
  reduce); ``-ginit``: gradient init on the sharded model (order B), each rank on its own
  :func:`init_batch`; ``-hsdp``: a 2-D mesh (replicate x shard = 2 x 1).

For each scenario every rank builds the same float64 model, sets the same nonzero ``lora_B``
(distributed with its parameter's placements) and saves the starting adapters (``OUT/S/init``), runs one forward/backward on its own batch
(``random_batch(seed=rank)``) and records the loss and the full adapter gradients, then takes
:data:`STEPS` AdamW steps, audits the zero pattern of the weights the op actually uses (an
identity input through the op gives ``W'ᵀ``), saves the adapters (``OUT/S/final``, written by rank
0) and the logits of a fixed batch. Rank 0 writes ``OUT/S/result.pt``. Rank 0 also saves the
pruned base once as ``OUT/base`` (a Hugging Face directory, for ``lors-fx merge``).
"""
from __future__ import annotations

import os
import sys

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from lors_fx.compiler import compile_state_of

STEPS = 3
LR = 1e-2
CONFIG = dict(r=4, lora_alpha=8)
LOGITS_SEED = 999


def step_batch(rank: int, step: int, world: int):
    """Batch of ``rank`` at step ``step`` (step 0 is the gradient check's)."""
    from lors_fx.testing.tiny_models import random_batch

    return random_batch(2, 16, seed=rank if step == 0 else 100 + step * world + rank)


def init_batch(rank: int):
    """This rank's gradient-init batch (``-ginit``)."""
    from lors_fx.testing.tiny_models import random_batch

    return random_batch(2, 16, seed=50 + rank)


def base_model():
    from lors_fx.testing.tiny_models import build_model

    return build_model("llama", "50%", seed=0).double()


def effective_weight_violations(model, masks) -> int:
    """Nonzeros outside the saved mask in the weights the op computes (gathered), over all
    adapted modules."""
    from lors_fx import lors_modules
    from lors_fx.distributed import full_tensor
    from lors_fx.ops import sparse_lora_linear

    bad = 0
    with torch.no_grad():
        for name, module in sorted(lors_modules(model).items()):
            full = [full_tensor(t) for t in (module.weight, module.lora_A, module.lora_B)]
            weight, lora_a, lora_b = full
            eye = torch.eye(weight.shape[1], dtype=weight.dtype)
            w_t = sparse_lora_linear(eye, weight, lora_a, lora_b, scaling=module.scaling)
            bad += int(((w_t.t() != 0) & ~masks[name]).sum())
    return bad


def run(scenario: str, out: str, rank: int, world: int) -> None:
    from lors_fx import LorsConfig, lors_modules, optimize, save_adapters, snapshot_masks
    from lors_fx.distributed import shard_model

    order, mode, *extra = scenario.split("-")
    config = LorsConfig(**CONFIG, checkpoint="block" if "ckpt" in extra else "none",
                        init="gradient" if "ginit" in extra else "zeros")
    init = dict(init_data=[init_batch(rank)]) if "ginit" in extra else {}
    compile = mode == "compiled"
    model = base_model()
    masks = snapshot_masks(model)
    if rank == 0 and not os.path.isdir(os.path.join(out, "base")):
        model.save_pretrained(os.path.join(out, "base"))
    options = {}
    if "bf16" in extra:  # FSDP2 mixed precision: bf16 compute, float32 gradient reduction
        from torch.distributed.fsdp import MixedPrecisionPolicy
        options["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16,
                                                    reduce_dtype=torch.float32)
    if "hsdp" in extra:  # 2 replicas x 1 shard: HSDP's all-reduce across the replicas
        from torch.distributed.device_mesh import init_device_mesh
        options["mesh"] = init_device_mesh("cpu", (world, 1),
                                           mesh_dim_names=("replicate", "shard"))
    if order == "A":
        optimize(model, config, compile=compile)
        shard_model(model, **options)
    elif order == "C":  # the user's own fully_shard calls after optimize (as accelerate does)
        from torch.distributed.fsdp import fully_shard
        optimize(model, config, compile=compile)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
    else:
        shard_model(model, **options)
        optimize(model, config, compile=compile, **init)
    from torch.distributed.tensor import distribute_tensor
    generator = torch.Generator().manual_seed(1234)  # the same full lora_B on every rank
    with torch.no_grad():
        for _, module in sorted(lors_modules(model).items()):
            lora_B = module.lora_B
            full = torch.randn(lora_B.shape, generator=generator, dtype=lora_B.dtype) * 0.1
            lora_B.copy_(distribute_tensor(full, lora_B.device_mesh, lora_B.placements))
    folder = os.path.join(out, scenario)
    save_adapters(model, os.path.join(folder, "init"))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR)
    result = {"losses": []}
    for step in range(STEPS):
        loss = model(**step_batch(rank, step, world)).loss
        loss.backward()
        mean = loss.detach().clone()
        dist.all_reduce(mean)
        result["losses"].append(mean.item() / world)
        if step == 0:
            result["grads"] = {name: p.grad.full_tensor() for name, p in model.named_parameters()
                               if p.grad is not None}
        optimizer.step()
        optimizer.zero_grad()
    result["violations"] = effective_weight_violations(model, masks)
    save_adapters(model, os.path.join(folder, "final"))
    from lors_fx.testing.tiny_models import random_batch
    with torch.no_grad():
        result["logits"] = model(**random_batch(1, 12, seed=LOGITS_SEED)).logits
    state = compile_state_of(model)
    result["fallback"] = None if state is None else state.fallback
    result["graphs"] = 0 if state is None else len(state.graphs)
    result["rewritten"] = sorted({site for record in (state.graphs if state else [])
                                  for site, info in record.sites.items() if info.rewritten})
    result["saved_after"] = [record.saved_after.details["saved_bytes"]
                             for record in (state.graphs if state else []) if record.saved_after]
    result["sites_per_graph"] = [len(record.sites) for record in (state.graphs if state else [])]
    result["adapters"] = sorted(lors_modules(model))
    if rank == 0:
        torch.save(result, os.path.join(folder, "result.pt"))


def main() -> None:
    out, scenarios = sys.argv[1], sys.argv[2:]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    try:
        for scenario in scenarios:
            run(scenario, out, rank, world)
            dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
