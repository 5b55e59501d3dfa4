"""The ``lors-fx`` command line: an argparse dispatcher over subcommands.

Each subcommand lives in its own module exposing ``add_arguments(parser)`` and ``run(args) -> int``
and is registered in :data:`COMMANDS`. Exit codes: 0 ok, 1 failure, 2 bad arguments. Every command
runs inside :func:`lors_fx.cli._output.command_output`: ``--no-progress`` turns Hugging Face's bars
off too, and lines from other packages that a user can do nothing about stay off the terminal.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import Optional, Sequence

from lors_fx.cli._output import command_output

#: subcommand -> (module implementing it, one-line help)
COMMANDS = {
    "example": ("lors_fx.cli.example", "train a tiny pruned Llama with LoRS and audit its sparsity"),
    "inspect": ("lors_fx.cli.inspect", "show what the LoRS passes did to a model's graphs"),
    "demo": ("lors_fx.cli.demo", "prune SmolLM2-135M, fine-tune it with LoRS, merge, audit, measure"),
    "prune": ("lors_fx.cli.prune", "prune a model (magnitude, Wanda, SparseGPT; unstructured or N:M)"),
    "train": ("lors_fx.cli.train", "fine-tune a pruned model with LoRS (or SQFT, SPP, LoRA)"),
    "merge": ("lors_fx.cli.merge", "merge saved LoRS adapters into the base, audit, save"),
    "eval": ("lors_fx.cli.eval", "perplexity (strided) and zero-shot accuracy (lm-eval)"),
    "bench": ("lors_fx.cli.bench", "benchmark LoRS against LoRA, SQFT, SPP and full sparse FT"),
}
#: commands that run the PyTorch profiler (peak memory), whose C++ code prints ``USDT:`` lines
PROFILING_COMMANDS = ("demo", "bench")


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with one subparser per entry of :data:`COMMANDS`."""
    parser = argparse.ArgumentParser(prog="lors-fx", description="Sparsity-preserving LoRA "
                                     "fine-tuning (LoRS) of pruned models")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(command)
        command.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run ``lors-fx`` with ``argv`` (default ``sys.argv[1:]``); returns the exit code."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as stop:  # argparse: 2 on bad arguments, 0 on --help
        return int(stop.code or 0)
    try:
        with command_output(progress=not getattr(args, "no_progress", False),
                            c_lines=args.command in PROFILING_COMMANDS):
            return int(args._run(args))
    except KeyboardInterrupt:
        print("lors-fx: interrupted", file=sys.stderr)
        return 1
    except Exception as error:  # a failure, reported in one line
        print(f"lors-fx {args.command}: error: {type(error).__name__}: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
