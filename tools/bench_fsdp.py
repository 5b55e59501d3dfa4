"""Per-rank cost of LoRS vs SQFT under FSDP2: what each rank saves for backward, and step time.

    torchrun --nproc_per_node=2 tools/bench_fsdp.py --json out/bench_fsdp.json

Each rank builds the same model (SmolLM2-135M's block shapes, ``--layers`` decoder blocks, random
weights, 50% magnitude-pruned), attaches one method (``lors``: lors_fx.optimize, eager op;
``sqft``: the naive masked form under autograd, lors_fx.methods.baselines), shards it with
:func:`lors_fx.distributed.shard_model` and runs ``--repeats`` training steps of ``--tokens``
tokens per rank. Measured per rank, rank 0 reported:

- ``sharded_params``: bytes of this rank's parameter shards (the base is split over the ranks);
- ``saved``: bytes autograd keeps for backward in one forward
  (:class:`lors_fx.methods.measure.SavedBytes`), every saved Parameter skipped (FSDP2's gathered
  weights are Parameters and are freed after the forward, so they are not counted);
- ``step_s``: median wall time of a step (forward, backward, AdamW).

SQFT's ``W'`` and mask are built from the all-gathered weight, so they are full-size on every
rank whatever the number of ranks; LoRS saves only the inputs. Timings on shared CPUs are noisy:
compare the two methods within one run.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.distributed as dist

SHAPES = dict(hidden_size=576, intermediate_size=1536, num_attention_heads=9,
              num_key_value_heads=3, vocab_size=49152)  # SmolLM2-135M's


def build(method: str, layers: int, r: int):
    from lors_fx import LorsConfig, optimize
    from lors_fx.methods import apply_method
    from lors_fx.distributed import shard_model
    from lors_fx.testing.tiny_models import build_tiny, prune_

    model = build_tiny("llama", seed=0, num_hidden_layers=layers, **SHAPES)
    prune_(model, "50%")
    model.train()
    if method == "lors":
        optimize(model, LorsConfig(r=r, lora_alpha=2 * r), compile=False)
    else:
        apply_method(model, method, r=r)
    shard_model(model)
    return model


def saved_non_parameter_bytes(run) -> int:
    """Bytes one forward saves for backward, Parameters skipped; then the backward runs."""
    from lors_fx.methods.measure import SavedBytes

    with SavedBytes(skip_parameters=True) as saved:
        loss = run()
    loss.backward()
    return saved.total


def measure(method: str, args, rank: int, world: int) -> dict:
    from lors_fx.testing.tiny_models import random_batch

    model = build(method, args.layers, args.r)
    local = sum(p.to_local().numel() * p.element_size() if hasattr(p, "to_local")
                else p.numel() * p.element_size() for p in model.parameters())
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    batch = random_batch(1, args.tokens, seed=rank, vocab_size=SHAPES["vocab_size"])
    saved = saved_non_parameter_bytes(lambda: model(**batch).loss)
    optimizer.zero_grad()
    times = []
    for _ in range(args.repeats):
        dist.barrier()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        times.append(time.perf_counter() - start)
    return {"method": method, "sharded_params": local, "saved": saved,
            "step_s": statistics.median(times)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--tokens", type=int, default=256, help="tokens per rank per step")
    p.add_argument("--r", type=int, default=16)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", help="write the rows here (rank 0)")
    args = p.parse_args(argv)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    rows = [measure(method, args, rank, world) for method in ("lors", "sqft")]
    if rank == 0:
        from tabulate import tabulate
        lors = rows[0]
        table = [[r["method"], f"{r['sharded_params'] / 2**20:.1f}", f"{r['saved'] / 2**20:.1f}",
                  f"{r['saved'] / lors['saved']:.2f}x", f"{r['step_s']:.3f}",
                  f"{r['step_s'] / lors['step_s']:.2f}x"] for r in rows]
        print(f"FSDP2, {world} ranks (gloo, CPU), {args.layers} SmolLM2-shaped blocks, "
              f"{args.tokens} tokens/rank, r={args.r}; per rank:")
        print(tabulate(table, headers=["method", "param shards MiB", "saved MiB", "saved vs LoRS",
                                       "step s", "step vs LoRS"]))
        if args.json:
            with open(args.json, "w", encoding="utf-8") as handle:
                json.dump({"world": world, **vars(args), "rows": rows}, handle, indent=2)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
