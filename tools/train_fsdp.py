"""Fine-tune a pruned model with LoRS on N processes: FSDP2 or DeepSpeed ZeRO-2/3.

    torchrun --nproc_per_node=2 tools/train_fsdp.py --out out/fsdp               # FSDP2, gloo on CPU
    torchrun --nproc_per_node=8 tools/train_fsdp.py --model PRUNED_DIR --dtype bf16 --compile \\
        --checkpoint block --out out/fsdp                                        # nccl on 8 GPUs
    torchrun --nproc_per_node=2 tools/train_fsdp.py --engine deepspeed --zero 3 --out out/z3
    lors-fx merge out/fsdp/base out/fsdp/adapters --out out/fsdp/merged          # one process

Every rank builds the same model (``--model tiny-llama``: a tiny Llama from its config, seeded;
``smollm2``: the embedded SmolLM2-135M; or a local Hugging Face directory), magnitude-prunes it
unless it is already sparse (``--prune``), and rank 0 saves that base to ``OUT/base``. Then:

- ``fsdp2``: ``lors_fx.optimize`` then :func:`lors_fx.distributed.shard_model` (``--order A``,
  default; compiled per block with ``--compile``), or shard first and attach after (``--order B``,
  eager op). Backend ``nccl`` when CUDA is there, else ``gloo``.
- ``deepspeed``: ``optimize(compile=False)`` then :func:`lors_fx.distributed.deepspeed.initialize`.

Each rank trains on its own slice of the data (random tokens for the tiny model, the embedded
English text otherwise). Rank 0 prints the loss averaged over ranks, tokens/s and peak memory; at
the end every adapted weight is gathered one at a time and checked (no nonzero outside ``W != 0``),
the adapters are gathered (only them) and written by rank 0 to ``OUT/adapters``, and a JSON summary
to ``OUT/summary.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import time

import torch
import torch.distributed as dist


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--engine", choices=("fsdp2", "deepspeed"), default="fsdp2")
    p.add_argument("--zero", type=int, choices=(2, 3), default=3, help="DeepSpeed ZeRO stage")
    p.add_argument("--order", choices=("A", "B"), default="A",
                   help="fsdp2: A = optimize then shard (compilable), B = shard then optimize")
    p.add_argument("--model", default="tiny-llama",
                   help="'tiny-llama', 'smollm2' or a local Hugging Face directory")
    p.add_argument("--prune", default="50%", help="magnitude pattern for a dense model: "
                   "'50%%', '2:4'; a model that is already sparse is used as it is")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=2, help="sequences per rank per step")
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--lora-r", type=int, default=16, help="adapter rank")
    p.add_argument("--lora-alpha", type=float, default=32)
    p.add_argument("--init", choices=("zeros", "gradient"), default="gradient",
                   help="adapter init: 'gradient' (LoRS; each rank's first 2 batches, G averaged "
                        "over all ranks) or 'zeros' (PEFT's)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--compile", action="store_true", help="fsdp2 order A: compile each block")
    p.add_argument("--checkpoint", default="none",
                   help="LorsConfig.checkpoint with --compile: 'none' or 'block' (each block "
                        "is compiled on its own, so every:k / budget: do not apply)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        p.error("--steps and --batch must be >= 1, --seq >= 2")
    if args.compile and (args.engine != "fsdp2" or args.order != "A"):
        p.error("--compile is for --engine fsdp2 --order A (see docs/distributed.md)")
    return args


def build_base(args, rank: int):
    """``(model, tokenizer or None)``: the same pruned model on every rank."""
    from lors_fx.sparsity import sparsity_of
    from lors_fx.testing.tiny_models import build_tiny, prune_

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model == "tiny-llama":
        model, tokenizer = build_tiny("llama", seed=args.seed, num_hidden_layers=4), None
    else:
        from lors_fx.workflows.embedded import load_model
        model, tokenizer = load_model(args.model, progress=rank == 0)
    weights = [m.weight for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]
    if max(sparsity_of(w.detach()) for w in weights) < 0.25:
        prune_(model, args.prune)
    return model.to(dtype).train(), tokenizer


def batches(args, tokenizer, rank: int, world: int, vocab: int):
    """An endless iterator of this rank's ``{"input_ids", "labels"}`` batches."""
    from lors_fx.testing.tiny_models import random_batch

    if tokenizer is None:
        step = 0
        while True:
            yield random_batch(args.batch, args.seq, seed=10_000 * step + rank, vocab_size=vocab)
            step += 1
    from lors_fx.workflows.data import build_lm_splits, load_texts
    blocks = build_lm_splits(load_texts("embedded"), tokenizer, block_size=args.seq).train
    mine = list(range(rank, len(blocks), world))
    while True:
        for start in range(0, len(mine) - args.batch + 1, args.batch):
            index = torch.tensor(mine[start:start + args.batch])
            yield {"input_ids": blocks.input_ids[index], "labels": blocks.labels[index]}


def peak_memory_mib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main(argv=None) -> int:
    args = parse_args(argv)
    from lors_fx import LorsConfig, optimize, save_adapters
    from lors_fx.distributed import sharded_audit, shard_model

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else \
        torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    torch.manual_seed(args.seed)
    model, tokenizer = build_base(args, rank)
    if rank == 0:
        model.save_pretrained(os.path.join(args.out, "base"))
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(args.out, "base"))
    model.to(device)
    config = LorsConfig(r=args.lora_r, lora_alpha=args.lora_alpha, checkpoint=args.checkpoint,
                        init=args.init)
    data = batches(args, tokenizer, rank, world, model.config.vocab_size)
    init = {}
    if args.init == "gradient":
        init["init_data"] = [{k: v.to(device) for k, v in next(data).items()} for _ in range(2)]
    engine = None
    if args.engine == "deepspeed":
        from lors_fx.distributed.deepspeed import initialize, zero_config
        from lors_fx.distributed import broadcast_adapters
        optimize(model, config, compile=False, **init)
        broadcast_adapters(model)  # each rank's init saw its own data: rank 0's for all
        engine = initialize(model, zero_config(args.zero, micro_batch_size=args.batch,
                                               lr=args.lr, bf16=args.dtype == "bf16"))
    else:
        if args.order == "A":  # init on each rank's full model; shard_model broadcasts rank 0's
            optimize(model, config, compile=args.compile, **init)
            shard_model(model)
        else:  # init on the sharded model: G averaged over every rank's batches
            shard_model(model)
            optimize(model, config, compile=False, **init)
        params = [p for p in model.parameters() if p.requires_grad]
        optimizer = torch.optim.AdamW(params, lr=args.lr)
    losses, start = [], time.perf_counter()
    for step in range(args.steps):
        batch = {k: v.to(device) for k, v in next(data).items()}
        if engine is not None:
            loss = engine(**batch).loss
            engine.backward(loss)
            engine.step()
        else:
            loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        mean = loss.detach().float().clone()
        dist.all_reduce(mean)
        losses.append(mean.item() / world)
        if rank == 0:
            seconds = time.perf_counter() - start
            tokens = (step + 1) * args.batch * args.seq * world
            print(f"step {step + 1}/{args.steps} loss {losses[-1]:.4f} "
                  f"{tokens / seconds:.0f} tok/s peak {peak_memory_mib(device):.0f} MiB (rank 0)",
                  flush=True)
    adapters = os.path.join(args.out, "adapters")
    if engine is not None:
        from lors_fx.distributed.deepspeed import save_adapters_deepspeed, sharded_audit_deepspeed
        audit = sharded_audit_deepspeed(engine)
        save_adapters_deepspeed(engine, adapters)
    else:
        audit = sharded_audit(model)
        save_adapters(model, adapters)
    summary = dict(vars(args), world=world, losses=losses, audit=audit,
                   seconds=time.perf_counter() - start, peak_mib_rank0=peak_memory_mib(device))
    if rank == 0:
        with open(os.path.join(args.out, "summary.json"), "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
        print(f"zero pattern: {audit['checked']} adapted weights checked, "
              f"{audit['violations']} nonzero(s) outside W != 0")
        print(f"adapters: {adapters}\nmerge: lors-fx merge {os.path.join(args.out, 'base')} "
              f"{adapters} --out {os.path.join(args.out, 'merged')}")
    dist.destroy_process_group()
    return 0 if audit["violations"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
