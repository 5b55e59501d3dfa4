"""The quantization flags the subcommands share (``--bits``, ``--group-size``, ``--quant-method``)
and what they do: quantize a pruned model on the sparsity-aware grid
(:func:`lors_fx.workflows.quantize.quantize_pruned_model`) and save it in compressed-tensors'
format (:func:`lors_fx.quant_checkpoint.save_quantized`)."""
from __future__ import annotations

import argparse
import os
from typing import Optional

from torch import nn

from lors_fx.quant_checkpoint import save_quantized
from lors_fx.workflows.quantize import QUANT_METHODS, quantize_pruned_model

__all__ = ["add_quant_arguments", "group_size_of", "quantize_for_cli", "save_model"]


def add_quant_arguments(parser: argparse.ArgumentParser, *, group_size: int = 128) -> None:
    """``--bits {4,8}``, ``--group-size N`` (0 = one scale per row) and ``--quant-method``."""
    parser.add_argument("--bits", type=int, choices=(4, 8), default=None,
                        help="quantize the pruned linears: sparsity-aware symmetric int4/int8 "
                        "(pruned weights are code 0, kept ones never 0)")
    parser.add_argument("--group-size", type=int, default=group_size,
                        help=f"with --bits: inputs per scale (default {group_size}; 0 = one "
                        "scale per output row); must divide every quantized layer's d_in")
    parser.add_argument("--quant-method", choices=QUANT_METHODS, default="gptq",
                        help="with --bits: gptq (calibrated; the default) or rtn (round to "
                        "nearest); with --method sparsegpt, gptq is SparseGPT's joint mode")


def group_size_of(args: argparse.Namespace) -> Optional[int]:
    """``--group-size`` as :class:`lors_fx.quant.QuantSpec` takes it (0 -> None: per row)."""
    if args.group_size < 0:
        raise ValueError(f"--group-size: must be >= 0 (0 = one scale per row), got "
                         f"{args.group_size}")
    return args.group_size or None


def quantize_for_cli(model: nn.Module, args: argparse.Namespace, calibration=None) -> list:
    """``--bits``: quantize ``model``'s pruned linears in place (nothing without ``--bits``)."""
    if not getattr(args, "bits", None):
        return []
    return quantize_pruned_model(model, args.bits, group_size_of(args), method=args.quant_method,
                                 calibration=calibration,
                                 progress=not getattr(args, "no_progress", False))


def save_model(model: nn.Module, tokenizer, path: str) -> str:
    """``save_pretrained`` a float model, or :func:`save_quantized` one with quantized linears
    (compressed-tensors' format: plain ``from_pretrained`` loads it); the tokenizer beside it."""
    if any(hasattr(m, "weight_packed") for m in model.modules()):
        save_quantized(model, path, tokenizer=tokenizer)
        return path
    model.save_pretrained(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return os.fspath(path)
