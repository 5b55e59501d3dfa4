#!/usr/bin/env python
"""Where a training step's time goes: lors_fx's default path against torch.compile'd PEFT LoRA.

Usage::

    python tools/profile_step.py [--steps 3] [--top 14] [bench_compile.py's model flags]

Builds the two models of ``tools/bench_compile.py`` (same flags and defaults: SmolLM2-135M's layer
shapes, 4 layers, 512 tokens), runs 3 warm-up steps, then profiles ``--steps`` steps of each with
``torch.profiler`` (CPU) and prints the ops with the most self CPU time per step. Profiling
inflates the times; compare the two columns, not the absolute values.
"""
from __future__ import annotations

import os
import sys

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_compile as bc  # noqa: E402  (the sibling tool: same models and flags)


def profile_method(runner: "bc.Runner", steps: int, top: int) -> list:
    """``[(op name, self CPU ms per step, calls per step)]`` of ``steps`` profiled steps."""
    for _ in range(3):
        runner.step()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(steps):
            runner.step()
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events) / (1e3 * steps)
    rows = sorted(((e.key, e.self_cpu_time_total / (1e3 * steps), e.count // steps)
                   for e in events), key=lambda row: -row[1])
    return [("total", total, 0)] + rows[:top]


def main(argv=None) -> None:
    """Print the top ops of each method."""
    argv = list(sys.argv[1:] if argv is None else argv)
    steps = int(argv.pop(argv.index("--steps") + 1)) if "--steps" in argv else 3
    if "--steps" in argv:
        argv.remove("--steps")
    top = int(argv.pop(argv.index("--top") + 1)) if "--top" in argv else 14
    if "--top" in argv:
        argv.remove("--top")
    args = bc.parse_args(argv)
    torch.set_num_threads(args.threads or 2)
    torch.manual_seed(0)
    ids = torch.randint(0, args.vocab, (args.batch, args.seq))
    batch = {"input_ids": ids, "labels": ids}
    for name, build in (("lors_fx optimize() defaults", lambda: bc.setup_lors(args, True)),
                        (bc.REFERENCE, lambda: bc.setup_peft(args, compiled=True))):
        print(f"== {name}")
        for key, ms, calls in profile_method(bc.Runner(build(), batch), steps, top):
            print(f"   {ms:9.2f} ms  x{calls:4d}  {key[:90]}")


if __name__ == "__main__":
    main()
