"""Guards the subcommands share: where the tokenizer comes from (``--tokenizer PATH`` for a model
saved without one) and whether it fits the model, and the notes a command prints to stderr
before it spends minutes (a window cut to the model's positions, linears left dense).

The checks themselves are :mod:`lors_fx.workflows.checks`; this module adds the flags and the
wording of the command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from torch import nn

from lors_fx.config import LorsConfig
from lors_fx.workflows.checks import check_tokenizer_fits, dense_linears_skipped
from lors_fx.workflows.embedded import load_tokenizer

__all__ = ["add_tokenizer_argument", "text_tokenizer", "note", "note_dense_linears"]

#: at most this many names in one printed list (the rest are counted)
_MAX_NAMES = 30


def add_tokenizer_argument(parser: argparse.ArgumentParser) -> None:
    """``--tokenizer PATH``: the tokenizer to use instead of (or for lack of) the model's."""
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="tokenizer directory (or 'smollm2') for a model saved without one; "
                        "default: the model's own")


def text_tokenizer(args: argparse.Namespace, model: nn.Module, tokenizer,
                   purpose: Optional[str] = None):
    """The tokenizer a command uses: ``--tokenizer`` when given, else the model's. Raises when
    the command needs text (``purpose``, e.g. ``"evaluation"``) and there is none, saying how to
    give one, and when the tokenizer emits ids beyond the model's embedding. With ``purpose``
    None a missing tokenizer is allowed (returns None)."""
    path = getattr(args, "tokenizer", None)
    if path:
        tokenizer = load_tokenizer(path)
    elif tokenizer is None:
        if purpose is None:
            return None
        raise ValueError(f"model: {args.model} has no tokenizer (no tokenizer files beside its "
                         f"weights) and {purpose} needs one: give it with --tokenizer PATH, a "
                         f"directory holding tokenizer.json (e.g. the model it was pruned from) "
                         f"or 'smollm2'")
    check_tokenizer_fits(tokenizer, model)
    return tokenizer


def note(command: str, text: str) -> None:
    """One ``lors-fx COMMAND: note: ...`` line on stderr."""
    print(f"lors-fx {command}: note: {text}", file=sys.stderr, flush=True)


def _names(names: List[str]) -> str:
    shown = ", ".join(names[:_MAX_NAMES])
    return shown + (f" and {len(names) - _MAX_NAMES} more" if len(names) > _MAX_NAMES else "")


def note_dense_linears(command: str, model: nn.Module,
                       config: Optional[LorsConfig] = None) -> List[str]:
    """Print (one note) the linears ``optimize(model, config)`` will leave without adapters
    because they are dense, and return their names; nothing is printed when there are none."""
    config = config if config is not None else LorsConfig()
    skipped = list(dense_linears_skipped(model, config))
    if skipped:
        note(command, f"{len(skipped)} linear(s) are dense (sparsity < {config.min_sparsity:g}) "
                      f"and get no LoRS adapters: {_names(skipped)}")
    return skipped
