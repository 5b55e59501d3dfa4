"""Calibration for pruning: run text through a model and collect each target linear's input
statistics (column sums of squares for Wanda, ``X^T X`` for SparseGPT).

Hugging Face decoders are calibrated block by block (:func:`blockwise_statistics`): the inputs of
block 0 are captured once, and each block's linears get their statistics from the block's own
inputs; once the caller has pruned them, the pruned block is run to make the next block's inputs.
So activations of only one block are held at a time, and each block sees the inputs the pruned
model upstream of it produces. Other models use whole-model hooks (:func:`collect_input_stats`).
"""
from __future__ import annotations

from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lors_fx._nn import is_linear_like, oriented_weight

__all__ = ["InputStats", "calibration_batches", "run_model", "find_blocks",
           "collect_input_stats", "blockwise_statistics"]


class InputStats:
    """Running input statistics of one linear: column sums of squares (Wanda) or ``X^T X``."""

    def __init__(self, d_in: int, hessian: bool, device):
        self.count = 0
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.xtx = (torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
                    if hessian else None)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sumsq += x.pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)


def calibration_batches(calibration) -> List[dict]:
    """Calibration inputs as a list of ``{"input_ids": (B, T), ...}`` (labels dropped)."""
    if calibration is None:
        return []
    if isinstance(calibration, Tensor):
        calibration = [calibration] if calibration.dim() == 1 else list(calibration.split(8))
    elif hasattr(calibration, "input_ids") and isinstance(calibration.input_ids, Tensor):
        calibration = list(calibration.input_ids.split(8))  # a lors_fx.workflows.data.TextBlocks
    batches = []
    for item in calibration:
        if isinstance(item, Tensor):
            item = {"input_ids": item}
        elif not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError(f"calibration: expected input_ids tensors or dicts with input_ids, "
                            f"got {type(item).__name__}")
        item = {k: v for k, v in item.items() if k != "labels"}
        if item["input_ids"].dim() == 1:
            item = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in item.items()}
        batches.append(item)
    return batches


def run_model(model: nn.Module, batch: dict, device) -> None:
    """One forward of ``model`` on ``batch`` (an HF model without its KV cache)."""
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if hasattr(model, "config"):
        model(**batch, use_cache=False)
    elif len(batch) == 1:
        model(batch["input_ids"])
    else:
        model(**batch)


def find_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder block list of a model (``model.model.layers``, ``transformer.h``...): the
    ``nn.ModuleList`` of same-class, non-linear blocks holding the most linear layers, or None."""
    best, best_count = None, 0
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and len({type(b) for b in module}) == 1 and not is_linear_like(module[0])):
            count = sum(1 for m in module.modules() if is_linear_like(m))
            if count > best_count:
                best, best_count = module, count
    return best


def collect_input_stats(modules: Dict[str, nn.Module], hessian: bool,
                        run: Callable[[], object]) -> Dict[str, InputStats]:
    """Run ``run()`` with input hooks on ``modules``; returns their statistics."""
    stats, handles = {}, []
    for name, module in modules.items():
        weight = oriented_weight(module)
        stats[name] = InputStats(weight.shape[1], hessian, weight.device)
        handles.append(module.register_forward_hook(
            lambda _m, inputs, _out, s=stats[name]: s.add(inputs[0])))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def _capture_block_inputs(model, blocks, batches, device) -> List[Tuple[list, dict]]:
    captured = []

    def hook(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                run_model(model, batch, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def blockwise_statistics(model: nn.Module, blocks: nn.ModuleList, modules: Dict[str, nn.Module],
                         batches: List[dict], hessian: bool, bar: Callable = iter
                         ) -> Iterator[Dict[str, Tuple[nn.Module, InputStats]]]:
    """For each block holding some of ``modules``, yield ``{name: (module, input statistics)}``
    of those; when the caller has pruned them and asks for the next, the pruned block is run to
    make the next block's inputs. ``bar`` wraps the block list (a progress bar)."""
    device = next(model.parameters()).device
    inputs = _capture_block_inputs(model, blocks, batches, device)
    for block in bar(blocks):
        own = {n: m for n, m in modules.items() if any(m is sub for sub in block.modules())}
        if own:
            stats = collect_input_stats(own, hessian, lambda: [block(*a, **k) for a, k in inputs])
            yield {name: (module, stats[name]) for name, module in own.items()}
        for args, kwargs in inputs:  # the pruned block makes the next block's inputs
            hidden = _block_output(block(*args, **kwargs))
            if args:
                args[0] = hidden
            else:
                kwargs["hidden_states"] = hidden
