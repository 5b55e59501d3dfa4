"""Checks a command runs before it spends minutes: does the tokenizer fit the model, does the
window fit its positions, which linears will ``optimize`` leave dense.

Each check either raises one ``ValueError`` that says what to change, or returns what the caller
prints (a note, a list of names): the commands decide where the text goes.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

from torch import nn

from lors_fx._nn import is_linear_like, matches_any
from lors_fx.adapters import lors_modules
from lors_fx.config import LorsConfig
from lors_fx.sparsity import sparsity_of

__all__ = ["tokenizer_size", "embedding_rows", "check_tokenizer_fits", "check_token_ids",
           "context_length", "clamp_max_length", "dense_linears_skipped"]

#: module names inside a PEFT LoRA layer that are adapters themselves, never adaptation targets
_PEFT_ADAPTER_PARTS = frozenset({"lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B"})


def tokenizer_size(tokenizer) -> Optional[int]:
    """How many ids ``tokenizer`` can emit: ``len(tokenizer)`` (a transformers tokenizer counts
    its added tokens there), else its ``vocab_size``; None when it says neither."""
    try:
        return int(len(tokenizer))
    except TypeError:
        size = getattr(tokenizer, "vocab_size", None)
        return int(size) if isinstance(size, int) else None


def embedding_rows(model: nn.Module) -> Optional[int]:
    """Rows of the model's input embedding (the ids it accepts); None when it has none."""
    get = getattr(model, "get_input_embeddings", None)
    embedding = get() if callable(get) else None
    if isinstance(embedding, nn.Embedding):
        return int(embedding.num_embeddings)
    size = getattr(getattr(model, "config", None), "vocab_size", None)
    return int(size) if isinstance(size, int) else None


def check_tokenizer_fits(tokenizer, model: nn.Module) -> None:
    """Raise when ``tokenizer`` can emit ids the model's embedding does not have (they would
    fail deep inside the forward as an ``IndexError``)."""
    size, rows = tokenizer_size(tokenizer), embedding_rows(model)
    if size is not None and rows is not None and size > rows:
        raise ValueError(f"tokenizer: it has {size:,} tokens but the model's embedding has "
                         f"{rows:,} rows, so ids >= {rows:,} cannot be looked up; use the "
                         f"tokenizer the model was trained with (--tokenizer PATH)")


def check_token_ids(input_ids, model: nn.Module) -> None:
    """Raise when a token id in ``input_ids`` (a tensor) is outside the model's embedding."""
    rows = embedding_rows(model)
    if rows is None or input_ids.numel() == 0:
        return
    largest = int(input_ids.max())
    if largest >= rows or int(input_ids.min()) < 0:
        raise ValueError(f"input_ids: token id {largest:,} is outside the model's embedding of "
                         f"{rows:,} rows; the text was tokenised with a tokenizer that does not "
                         f"belong to this model")


def context_length(model: nn.Module) -> Optional[int]:
    """The model's ``max_position_embeddings`` (``n_positions`` for GPT-2); None if unknown."""
    config = getattr(model, "config", None)
    for key in ("max_position_embeddings", "n_positions"):
        value = getattr(config, key, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def clamp_max_length(model: nn.Module, max_length: int,
                     flag: str = "--max-length") -> Tuple[int, Optional[str]]:
    """``(max_length, note)``: ``max_length`` cut to the model's positions, and a note saying so
    (None when it already fits or the model does not say)."""
    limit = context_length(model)
    if limit is None or max_length <= limit:
        return max_length, None
    return limit, (f"{flag} {max_length} exceeds the model's {limit} positions "
                   f"(max_position_embeddings); using {limit}")


def dense_linears_skipped(model: nn.Module,
                          config: Optional[LorsConfig] = None) -> Dict[str, float]:
    """``{name: sparsity}`` of the linears ``optimize(model, config)`` leaves without adapters
    because they are dense (sparsity below ``config.min_sparsity``): partly pruned models
    otherwise lose them without a word. Excluded names (``lm_head``), modules that already have
    adapters and PEFT's own ``lora_A``/``lora_B`` linears are not listed; with explicit
    ``target_modules`` a dense target is an error in ``optimize`` itself, so nothing is listed."""
    config = config if config is not None else LorsConfig()
    if config.target_modules is not None:
        return {}
    adapted = lors_modules(model)
    inside = tuple(f"{name}." for name in adapted)
    skipped = {}
    for name, module in model.named_modules():
        if not name or not is_linear_like(module) or name in adapted or name.startswith(inside):
            continue
        if matches_any(name, config.exclude_modules) or module.weight.device.type == "meta" \
                or _PEFT_ADAPTER_PARTS.intersection(name.split(".")):
            continue
        value = sparsity_of(module.weight.detach())
        if value < config.min_sparsity:
            skipped[name] = value
    return skipped
