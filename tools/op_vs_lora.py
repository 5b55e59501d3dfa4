#!/usr/bin/env python
"""The LoRS op's forward + backward against plain LoRA's, at SmolLM2-135M's four linear shapes.

Usage::

    python tools/op_vs_lora.py [--tokens 512] [--r 16] [--repeats 41] [--threads 2]

One process; for each shape (576x576, 192x576, 1536x576, 576x1536, 50% pruned, fp32) one call of
:func:`lors_fx.ops.sparse_lora_linear` (``grad_mode="lors"``) and of ``x W^T + s (x A^T) B^T``,
each with its backward; the two loops are timed interleaved and the medians printed with their
ratio. A benchmark, not a test: compare ratios from one run.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from lors_fx.ops import sparse_lora_linear

SHAPES = ((576, 576), (192, 576), (1536, 576), (576, 1536))


def _cases(tokens: int, r: int):
    torch.manual_seed(0)
    cases = []
    for d_out, d_in in SHAPES:
        weight = torch.randn(d_out, d_in)
        weight[torch.rand_like(weight) < 0.5] = 0
        lora_A = (torch.randn(r, d_in) * 0.05).requires_grad_()
        lora_B = (torch.randn(d_out, r) * 0.05).requires_grad_()
        x = torch.randn(tokens, d_in, requires_grad=True)
        cases.append((weight, lora_A, lora_B, x, torch.randn(tokens, d_out)))
    return cases


def _step(method: str, cases) -> None:
    for weight, lora_A, lora_B, x, grad in cases:
        if method == "lora":
            y = F.linear(x, weight) + 2.0 * F.linear(F.linear(x, lora_A), lora_B)
        else:
            y = sparse_lora_linear(x, weight, lora_A, lora_B, scaling=2.0)
        y.backward(grad)


def main(argv=None) -> dict:
    """Time both, print ``{method: median ms}`` and the ratio; returns them."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=41)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    cases = _cases(args.tokens, args.r)
    times = {"lors op": [], "lora": []}
    for method in times:
        _step(method, cases)
    for _ in range(args.repeats):
        for method in times:
            start = time.perf_counter()
            _step(method, cases)
            times[method].append(time.perf_counter() - start)
    medians = {m: 1e3 * statistics.median(t) for m, t in times.items()}
    print(f"median ms: lors op {medians['lors op']:.2f}, lora {medians['lora']:.2f}; "
          f"op / lora = {medians['lors op'] / medians['lora']:.3f}")
    return medians


if __name__ == "__main__":
    main()
