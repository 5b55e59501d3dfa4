"""``lors-fx example``: fine-tune a tiny magnitude-pruned Llama with LoRS, then merge and audit.

Everything is built locally (no hub): a 2-layer ``LlamaForCausalLM`` (hidden 64) whose linears,
except ``lm_head``, are pruned to 50% per row by magnitude, and synthetic token sequences that
follow a fixed random permutation (``next = perm[token]``, 10% noise), which the adapters can learn.
The run trains a few AdamW steps on the eager path, merges the adapters into the weights and
audits that no pruned weight became nonzero; a failed audit exits with 1.
"""
from __future__ import annotations

import argparse
import json
from typing import Tuple

import torch
from torch import nn

from lors_fx.api import merge, optimize
from lors_fx.config import LorsConfig
from lors_fx.sparsity import audit, snapshot_masks, sparsity_of
from lors_fx.testing.toy import build_toy_llama, toy_batches

__all__ = ["run_example",
           "add_arguments", "run"]


@torch.no_grad()
def _eval_loss(model: nn.Module, batch: dict) -> float:
    was_training = model.training
    model.eval()
    loss = float(model(**batch).loss)
    model.train(was_training)
    return loss


def run_example(steps: int = 30, seed: int = 0, grad_mode: str = "lors", *, r: int = 8,
                lr: float = 1e-2, progress: bool = True) -> Tuple[dict, list]:
    """Train, merge and audit the toy model; returns ``(summary dict, per-site rows)``."""
    from tqdm.auto import tqdm

    model = build_toy_llama(seed)
    masks = snapshot_masks(model)
    before = {name: sparsity_of(m.weight) for name, m in model.named_modules()
              if isinstance(m, nn.Linear)}
    config = LorsConfig(r=r, lora_alpha=2.0 * r, grad_mode=grad_mode)
    optimize(model, config, compile=False)
    sites = [name for name, m in model.named_modules() if hasattr(m, "lora_A")]
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    train = toy_batches(steps, seed=seed + 1)
    eval_batch = toy_batches(1, batch_size=16, seed=seed + 10_000)[0]
    step0 = _eval_loss(model, eval_batch)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    bar = tqdm(train, desc="lors example", disable=not progress)
    for batch in bar:
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    final = _eval_loss(model, eval_batch)
    merge(model)
    merged = _eval_loss(model, eval_batch)
    result = audit(model, masks)
    after = {name: sparsity_of(m.weight) for name, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    rows = [[name, f"{before[name]:.4f}", f"{after[name]:.4f}"] for name in sites]
    summary = {
        "steps": steps, "seed": seed, "grad_mode": grad_mode, "r": r,
        "step0_loss": step0, "final_loss": final, "merged_loss": merged,
        "adapted_sites": len(sites), "trainable_params": trainable, "total_params": total,
        "sparsity_before": {n: before[n] for n in sites},
        "sparsity_after": {n: after[n] for n in sites},
        "audit_ok": result.ok, "audit": result.summary(),
    }
    return summary, rows


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx example``."""
    parser.add_argument("--steps", type=_positive_int, default=30, help="AdamW steps (30)")
    parser.add_argument("--seed", type=int, default=0, help="seed of model and data (0)")
    parser.add_argument("--grad-mode", choices=("lors", "exact"), default="lors",
                        help="adapter gradient: factorized (lors, the paper) or exact")
    parser.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")


def run(args: argparse.Namespace) -> int:
    """Run ``lors-fx example``; 0 when the sparsity audit passes, 1 otherwise."""
    from tabulate import tabulate

    summary, rows = run_example(args.steps, args.seed, args.grad_mode,
                                progress=not args.no_progress)
    before, after = summary["sparsity_before"].values(), summary["sparsity_after"].values()
    table = [
        ["step-0 loss (eval)", f"{summary['step0_loss']:.4f}"],
        [f"final loss (eval, {summary['steps']} steps)", f"{summary['final_loss']:.4f}"],
        ["merged model loss (eval)", f"{summary['merged_loss']:.4f}"],
        ["adapted sites", summary["adapted_sites"]],
        ["trainable params", f"{summary['trainable_params']:,} of {summary['total_params']:,}"],
        ["sparsity before (min/max)", f"{min(before):.4f} / {max(before):.4f}"],
        ["sparsity after merge (min/max)", f"{min(after):.4f} / {max(after):.4f}"],
        ["audit", summary["audit"]],
    ]
    print(tabulate(table, headers=["lors-fx example", f"grad_mode={summary['grad_mode']}"]))
    print()
    print(tabulate(rows, headers=["site", "sparsity before", "sparsity after merge"]))
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(summary, handle, indent=2)
            handle.write("\n")
    return 0 if summary["audit_ok"] else 1
