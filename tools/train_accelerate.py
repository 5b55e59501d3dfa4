"""Train LoRS adapters under ``accelerate launch`` with accelerate's FSDP2 plugin.

    accelerate launch --config_file tools/accelerate_fsdp2.yaml --num_processes 2 \\
        tools/train_accelerate.py --steps 3 --out /tmp/lors-accelerate

What it does, on every rank:

1. ``Accelerator(cpu=<no CUDA>)``; on CPU, :func:`fsdp_on_cpu` puts back the FSDP plugin that
   accelerate drops there (see below).
2. Builds the tiny pruned Llama (``--model llama``, seed ``--seed``) or loads an already pruned HF
   model directory (``--model PATH``), snapshots its zero pattern, attaches LoRS adapters with
   ``lors_fx.optimize(model, LorsConfig(r, lora_alpha), compile=False)`` BEFORE
   ``accelerator.prepare(model, optimizer)`` (AdamW over the adapters only). ``--compile before``
   passes ``compile=True`` instead; ``--compile after`` compiles the prepared model with
   ``lors_fx.compiler.compiled_model.compile_model`` (per decoder block, since it is sharded by then).
3. Trains ``--steps`` AdamW steps on one global batch, ``random_batch(batch * world, seq,
   seed=1000)``, of which each rank takes its own ``batch`` rows: the run equals a single-process
   run on the whole batch (FSDP averages the gradients, the rows have equal token counts), and
   the loss goes down as it fits the batch. Rank 0 prints the loss averaged over the ranks.
4. Audits the zero pattern of every linear weight: under FSDP2 a weight is a DTensor shard
   (``Shard(0)``), so each weight is all-gathered with ``full_tensor()`` (a collective: every rank
   does it) and every rank audits the whole weights against the snapshot.
5. Runs a fixed batch (``random_batch(2, seq, seed=12345)``) without gradients on all ranks;
   rank 0 writes its logits to ``OUT/logits.safetensors``.
6. ``lors_fx.save_adapters(accelerator.unwrap_model(model), OUT)`` on every rank (adapter shards
   are all-gathered; rank 0 writes ``adapter_model.safetensors`` + ``adapter_config.json``), and
   rank 0 writes ``OUT/metrics.json`` (losses, wrapper class, distributed type, audit, compile).

Why :func:`fsdp_on_cpu` (accelerate 1.15.0, CPU only): with ``distributed_type: FSDP`` the
launcher starts the processes with torchrun, but ``PartialState._prepare_backend`` only picks a
backend for an accelerator (cuda, xpu, npu...) unless ``cpu=True``; without it each process runs
alone (``DistributedType.NO``). With ``cpu=True`` it is ``MULTI_CPU`` over gloo, and
``AcceleratorState.__init__`` switches to ``DistributedType.FSDP`` only when the type is one of
``MULTI_GPU/MLU/SDAA/MUSA/NPU/XPU/HPU/NEURON``: the FSDP plugin is silently dropped and
``prepare`` wraps the model in DDP. ``--no-fsdp-shim`` shows that behaviour.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from typing import Dict, Optional

import torch
from torch import nn

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, _REPO)

import lors_fx  # noqa: E402
from lors_fx.distributed import full_tensor  # noqa: E402
from lors_fx.testing.tiny_models import build_model, random_batch  # noqa: E402
from lors_fx.compiler import compile_state_of

#: Seeds of the training batch (every step) and of the fixed batch whose logits are saved.
DATA_SEED = 1000
LOGITS_SEED = 12345
LOGITS_NAME = "logits.safetensors"
METRICS_NAME = "metrics.json"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="llama",
                        help="a tiny model name (llama, qwen2, mistral) or a pruned HF model "
                             "directory (default: llama)")
    parser.add_argument("--pattern", default="50%", help="pruning of a tiny model (default 50%%)")
    parser.add_argument("--seed", type=int, default=0, help="model and adapter init seed")
    parser.add_argument("--steps", type=int, default=3, help="optimizer steps (default 3)")
    parser.add_argument("--batch", type=int, default=2, help="rows per rank and step (default 2)")
    parser.add_argument("--seq", type=int, default=16, help="sequence length (default 16)")
    parser.add_argument("--lr", type=float, default=1e-2, help="AdamW learning rate")
    parser.add_argument("--r", type=int, default=4, help="adapter rank (default 4)")
    parser.add_argument("--lora-alpha", type=float, default=8, help="adapter alpha (default 8)")
    parser.add_argument("--compile", choices=("off", "before", "after"), default="off",
                        help="lors_fx's compiled forward: 'before' = optimize(..., compile=True) "
                             "before prepare (the compiled forward sees the model sharded at "
                             "the first step and compiles each decoder block instead); 'after' "
                             "= compile_model() on the prepared model (per decoder block from "
                             "the start). Both: FSDP2's hooks run between the graphs. Default off")
    parser.add_argument("--no-fsdp-shim", action="store_true",
                        help="do not put the FSDP plugin back on CPU (shows accelerate's "
                             "own behaviour: DDP)")
    parser.add_argument("--out", required=True, help="output directory")
    args = parser.parse_args(argv)
    if args.steps < 1 or args.batch < 1 or args.seq < 2:
        parser.error("--steps and --batch must be >= 1, --seq >= 2")
    return args


def fsdp_on_cpu(accelerator) -> bool:
    """Make accelerate use its FSDP plugin on CPU (gloo), as it does on GPUs; True if it did.

    Only acts when the launcher asked for FSDP (``ACCELERATE_USE_FSDP=true``, set from the yaml)
    and accelerate settled on ``MULTI_CPU``. The plugin is rebuilt from the ``FSDP_*`` variables
    the launcher set from the yaml, exactly as ``Accelerator.__init__`` built it, and the
    distributed type is set to FSDP in both shared states, as ``AcceleratorState`` does on GPUs.
    Call it right after ``Accelerator(...)``, before ``prepare``.
    """
    from accelerate.state import PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    wants_fsdp = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not wants_fsdp or state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin()
    state.distributed_type = DistributedType.FSDP
    PartialState._shared_state["distributed_type"] = DistributedType.FSDP
    return True


def load_model(args) -> nn.Module:
    """The tiny pruned model, or a pruned HF model directory (fp32, train mode)."""
    if os.path.isdir(args.model):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(args.seed)  # the adapters' init
        return AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).train()
    return build_model(args.model, args.pattern, seed=args.seed)


def rank_batch(batch: int, seq: int, rank: int, world: int) -> Dict[str, torch.Tensor]:
    """This rank's ``batch`` rows of the global training batch (``batch * world`` rows)."""
    full = random_batch(batch * world, seq, seed=DATA_SEED)
    return {k: v[rank * batch:(rank + 1) * batch] for k, v in full.items()}


def gathered_linears(model: nn.Module) -> nn.Module:
    """A stand-in module tree holding every ``nn.Linear``'s whole weight under its own name.

    Every rank must call it (each sharded weight is all-gathered); :func:`lors_fx.audit` then
    reads it like the model itself.
    """
    root = nn.Module()
    for name, module in model.named_modules():
        if not isinstance(module, nn.Linear):
            continue
        full = full_tensor(module.weight).detach().cpu()  # a collective on every rank
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if part not in parent._modules:
                parent.add_module(part, nn.Module())
            parent = parent._modules[part]
        stand_in = nn.Linear(full.shape[1], full.shape[0], bias=False, device="meta")
        stand_in.weight = nn.Parameter(full, requires_grad=False)
        parent.add_module(leaf, stand_in)
    return root


def _compile_state(model: nn.Module) -> Optional[dict]:

    state = compile_state_of(model)
    if state is None:
        return None
    sites = [site for record in state.graphs for site in record.sites.values()
             if site.rank is not None]
    return {"graphs": len(state.graphs), "graph_breaks": state.graph_breaks,
            "fallback": state.fallback, "adapter_sites": len(sites),
            "rewritten_sites": sum(bool(site.rewritten) for site in sites)}


def main(argv=None) -> int:
    args = parse_args(argv)
    import accelerate
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    shim = False if args.no_fsdp_shim else fsdp_on_cpu(accelerator)
    rank, world = accelerator.process_index, accelerator.num_processes
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if world != launched:
        raise RuntimeError(f"accelerate sees {world} process(es) but {launched} were launched: "
                           f"each process would train alone")
    log = accelerator.print

    model = load_model(args)
    base_masks = {name: mask for name, mask in lors_fx.snapshot_masks(model).items()
                  if isinstance(model.get_submodule(name), nn.Linear)}
    lors_fx.optimize(model, lors_fx.LorsConfig(r=args.r, lora_alpha=args.lora_alpha),
                     compile=args.compile == "before")
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, optimizer = accelerator.prepare(model, optimizer)
        plain = accelerator.unwrap_model(model)
        if args.compile == "after":
            from lors_fx.compiler.compiled_model import compile_model

            compile_model(plain)  # scope "auto": per decoder block on a sharded model
        adapter = next(iter(lors_fx.lors_modules(plain).values())).lora_A
        log(f"accelerate {accelerate.__version__}, torch {torch.__version__}: "
            f"{accelerator.distributed_type} over {accelerator.state.backend}, {world} process(es), "
            f"fsdp_on_cpu={shim}, model {type(model).__name__}, lora_A "
            f"{type(adapter).__name__}{getattr(adapter, 'placements', '')}")

        losses = []
        batch = rank_batch(args.batch, args.seq, rank, world)
        for step in range(args.steps):
            loss = model(**batch).loss
            accelerator.backward(loss)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            mean = accelerator.reduce(loss.detach().reshape(1), reduction="mean").item()
            losses.append(mean)
            log(f"step {step + 1}/{args.steps} loss {mean:.6f}")

        result = lors_fx.audit(gathered_linears(plain), base_masks)
        print(f"[rank {rank}] {result.summary()}", flush=True)

        fixed = random_batch(2, args.seq, seed=LOGITS_SEED)
        with torch.no_grad():
            logits = model(input_ids=fixed["input_ids"]).logits.detach().cpu().contiguous()
        written = lors_fx.save_adapters(plain, args.out)
    warned = sorted({f"{w.category.__name__}: {w.message}" for w in caught
                     if "lors_fx" in str(w.message)})
    for line in warned:
        log(f"warning: {line}")

    if accelerator.is_main_process:
        from safetensors.torch import save_file

        save_file({"logits": logits, "input_ids": fixed["input_ids"].contiguous()},
                  os.path.join(args.out, LOGITS_NAME))
        metrics = {
            "losses": losses, "world_size": world, "rank_batch": args.batch, "seq": args.seq,
            "seed": args.seed, "lr": args.lr, "r": args.r, "lora_alpha": args.lora_alpha,
            "distributed_type": str(accelerator.distributed_type),
            "backend": accelerator.state.backend, "fsdp_on_cpu": shim,
            "wrapper": type(model).__name__,
            "adapter_tensor": type(adapter).__name__,
            "adapter_placements": str(getattr(adapter, "placements", None)),
            "audit_ok": result.ok, "audit": result.summary(), "adapted_modules": len(written),
            "compile": args.compile, "compile_state": _compile_state(plain),
            "lors_warnings": warned,
            "versions": {"accelerate": accelerate.__version__, "torch": torch.__version__,
                         "lors_fx": lors_fx.__version__},
        }
        with open(os.path.join(args.out, METRICS_NAME), "w", encoding="utf-8") as handle:
            json.dump(metrics, handle, indent=2)
            handle.write("\n")
        log(f"wrote {args.out}")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return 0 if result.ok else 1


if __name__ == "__main__":
    sys.exit(main())
