"""Saved-for-backward bytes and step time of one adapted linear: the LoRS op against the naive form.

    python tools/saved_bytes_op.py                       # Llama-2-7B MLP up-projection, T=512, r=16
    python tools/saved_bytes_op.py --d-in 1024 --d-out 2816 --tokens 512 --json out.json

Saved bytes are counted exactly by :func:`lors_fx.methods.measure.saved_bytes` (saved-tensor hooks;
parameters are saved by reference and excluded; a tensor saved twice is counted once). Step time is forward +
backward, median of ``--repeats`` after one warm-up, all methods interleaved in one process.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from tabulate import tabulate

from lors_fx.methods.measure import saved_bytes
from lors_fx.ops import reference_sparse_lora_linear, sparse_lora_linear


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--d-in", type=int, default=4096)
    parser.add_argument("--d-out", type=int, default=11008)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--r", type=int, default=16)
    parser.add_argument("--sparsity", type=float, default=0.5)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args(argv)

    torch.manual_seed(0)
    weight = torch.randn(args.d_out, args.d_in)
    weight[torch.rand_like(weight) < args.sparsity] = 0
    lora_A = torch.randn(args.r, args.d_in, requires_grad=True)
    lora_B = torch.randn(args.d_out, args.r, requires_grad=True)
    scaling = 2.0
    # x is an activation (non-leaf), as in a real network, so saving it costs memory.
    x_leaf = torch.randn(args.tokens, args.d_in, requires_grad=True)

    methods = {
        "naive masked (SQFT-style autograd)": lambda x: reference_sparse_lora_linear(
            x, weight, lora_A, lora_B, None, scaling),
        "lors op, grad_mode=lors": lambda x: sparse_lora_linear(
            x, weight, lora_A, lora_B, scaling=scaling),
        "lors op, grad_mode=exact": lambda x: sparse_lora_linear(
            x, weight, lora_A, lora_B, scaling=scaling, grad_mode="exact"),
        "lors op, recompute=False": lambda x: sparse_lora_linear(
            x, weight, lora_A, lora_B, scaling=scaling, recompute=False),
    }
    params = [weight, lora_A, lora_B, x_leaf]
    rows, times = {}, {name: [] for name in methods}
    for name, method in methods.items():
        rows[name] = saved_bytes(lambda: method(x_leaf * 1.0), params)
    for repeat in range(args.repeats + 1):
        for name, method in methods.items():
            start = time.perf_counter()
            method(x_leaf * 1.0).square().mean().backward()
            if repeat:
                times[name].append(time.perf_counter() - start)
    naive = "naive masked (SQFT-style autograd)"
    table = []
    for name in methods:
        table.append({
            "method": name,
            "saved_MiB": rows[name] / 2**20,
            "saved_vs_naive": rows[name] / rows[naive],
            "step_ms": 1e3 * statistics.median(times[name]),
            "time_vs_naive": statistics.median(times[name]) / statistics.median(times[naive]),
        })
    print(f"d_out={args.d_out} d_in={args.d_in} T={args.tokens} r={args.r} "
          f"sparsity={args.sparsity} fp32, threads={torch.get_num_threads()}, "
          f"x itself = {args.tokens * args.d_in * 4 / 2**20:.2f} MiB")
    print(tabulate(table, headers="keys", floatfmt=".3f"))
    if args.json_path:
        with open(args.json_path, "w", encoding="utf-8") as handle:
            json.dump({"args": vars(args), "rows": table}, handle, indent=2)


if __name__ == "__main__":
    main()
