"""Datasets from the Hugging Face hub, through ``datasets`` (optional, imported only here and only
when a name is neither a local file nor an embedded corpus): the shorthands, one clear error when
offline, WikiText's lines grouped back into articles, and ``progress=False`` honoured by the
bars ``datasets`` draws itself (its "Generating split" bars ignore the hub's switch).
"""
from __future__ import annotations

import contextlib
import re
from typing import List, Sequence

__all__ = ["HUB_ALIASES", "load_hub_dataset", "group_wikitext"]

#: shorthand -> (hub path, config)
HUB_ALIASES = {"wikitext-2": ("wikitext", "wikitext-2-raw-v1"),
               "wikitext2": ("wikitext", "wikitext-2-raw-v1"),
               "alpaca": ("tatsu-lab/alpaca", None)}


def group_wikitext(lines: Sequence[str]) -> List[str]:
    """WikiText rows are lines; an article starts at a top-level ``" = Title = "`` heading."""
    docs, current = [], []
    for line in lines:
        if re.fullmatch(r" = [^=].* = \n?", line) and current:
            docs.append("".join(current).strip())
            current = []
        current.append(line)
    if current:
        docs.append("".join(current).strip())
    return [d for d in docs if d]


@contextlib.contextmanager
def _bars(datasets, enabled: bool):
    """``datasets``' own progress bars off inside the block when not ``enabled``, then back to
    what they were."""
    was_disabled = datasets.utils.are_progress_bars_disabled()
    if not enabled and not was_disabled:
        datasets.utils.disable_progress_bars()
    try:
        yield
    finally:
        if not enabled and not was_disabled:
            datasets.utils.enable_progress_bars()


def load_hub_dataset(name: str, split: str, progress: bool = True):
    """``datasets.load_dataset`` of ``name`` (or its shorthand in :data:`HUB_ALIASES`), one
    ``RuntimeError`` naming the way out when ``datasets`` is missing or the hub unreachable."""
    try:
        import datasets
    except ImportError as error:
        raise RuntimeError(f"data: {name!r} is not a local file or embedded name; loading it from "
                           f"the hub needs `pip install datasets`") from error
    path, config = HUB_ALIASES.get(name.lower(), (name, None))
    try:
        with _bars(datasets, progress):
            return datasets.load_dataset(path, config, split=split)
    except Exception as error:  # offline, unknown name, no such split: one clear line
        raise RuntimeError(f"data: could not load hub dataset {path!r} (split {split!r}); offline "
                           f"or unknown? pass a local .txt/.json/.jsonl file or 'embedded' "
                           f"({type(error).__name__}: {str(error).splitlines()[0][:200]})") from error
