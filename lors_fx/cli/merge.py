"""``lors-fx merge``: fold saved LoRS adapters into their pruned base and save a plain sparse model.

Steps: load the base (a local HF directory or ``smollm2``), snapshot its zero pattern, rebuild the
same adapters from ``adapter_config.json`` (:func:`lors_fx.restore_adapters`: same config, eager
path, then :func:`lors_fx.load_adapters`, which refuses a base whose zero pattern differs from the
mask fingerprint saved with the adapters, e.g. another pruning of the same model, naming the first
module that differs), :func:`lors_fx.merge`, audit that the zero pattern is
bit-for-bit the base's (no pruned weight became nonzero, no kept weight became zero), and
``save_pretrained`` the merged model (plus the tokenizer). The output loads with plain
``transformers.AutoModelForCausalLM.from_pretrained``; it needs no lors_fx. A quantized base (a
compressed-tensors checkpoint, e.g. from ``lors-fx prune --bits 4``) is merged onto its own grid
and saved in the same format (``from_pretrained`` then needs ``compressed-tensors``).
"""
from __future__ import annotations

import argparse
import json
from typing import Dict

import torch
from torch import nn

from lors_fx.api import merge, restore_adapters
from lors_fx.cli._guards import add_tokenizer_argument, text_tokenizer
from lors_fx.cli._quant import save_model
from lors_fx.sparsity import audit, snapshot_masks
from lors_fx.workflows.embedded import load_model

__all__ = ["merge_and_audit", "add_arguments", "run"]


@torch.no_grad()
def merge_and_audit(model: nn.Module, masks: Dict[str, torch.Tensor]) -> dict:
    """:func:`lors_fx.merge` ``model`` and compare its zero pattern with ``masks`` (from
    :func:`lors_fx.snapshot_masks` of the base); returns ``{"ok", "summary", "new_nonzeros",
    "lost_nonzeros", "checked"}``. ``ok`` means the pattern is identical bit for bit."""
    merge(model)
    result = audit(model, masks)
    return {"ok": result.ok and not result.lost_nonzeros, "summary": result.summary(),
            "checked": result.checked, "new_nonzeros": sum(result.new_nonzeros.values()),
            "lost_nonzeros": sum(result.lost_nonzeros.values())}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of ``lors-fx merge MODEL ADAPTERS --out DIR``."""
    parser.add_argument("model", help="the pruned base: a local Hugging Face directory or "
                        "'smollm2' (must be the exact base the adapters were trained on)")
    parser.add_argument("adapters", help="directory written by save_adapters / lors-fx train")
    add_tokenizer_argument(parser)
    parser.add_argument("--out", required=True, help="where to save_pretrained the merged model")
    parser.add_argument("--json", metavar="FILE", help="also write the audit as JSON")
    parser.add_argument("--no-progress", action="store_true")


def run(args: argparse.Namespace) -> int:
    """Run ``lors-fx merge``; 0 when the audit passes (the model is saved), 1 otherwise."""
    import sys

    model, tokenizer = load_model(args.model, progress=not args.no_progress)
    tokenizer = text_tokenizer(args, model, tokenizer)
    masks = snapshot_masks(model)
    restore_adapters(model, args.adapters)
    report = merge_and_audit(model, masks)
    report.update(model=args.model, adapters=args.adapters, out=args.out)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as handle:
            json.dump(report, handle, indent=2)
            handle.write("\n")
    if not report["ok"]:
        print(f"lors-fx merge: {report['summary']} (lost nonzeros: {report['lost_nonzeros']}); "
              f"nothing saved", file=sys.stderr)
        return 1
    save_model(model, tokenizer, args.out)
    print(f"{report['summary']}; zero pattern identical to the base; saved {args.out}")
    return 0
