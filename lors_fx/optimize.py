"""``optimize(model, config)``: attach LoRS adapters, optionally gradient-init them, compile.

The eager path (``compile=False``) calls the custom op :func:`lors_fx.ops.sparse_lora_linear`
directly from each adapted module; the compiled path hands the model to
:func:`lors_fx.backend.compile_model`, which switches the modules to emit the naive form and lets
the graph passes rewrite it into the op.
"""
from __future__ import annotations

import warnings
from typing import Callable, Iterable, Optional

from torch import nn

from .adapters import attach_adapters, is_optimized, lors_modules, remove_adapters
from .config import LorsConfig

__all__ = ["optimize", "is_optimized", "lors_modules"]


def optimize(model: nn.Module, config: Optional[LorsConfig] = None, *, compile: bool = True,
             init_data: Optional[Iterable] = None,
             loss_fn: Optional[Callable] = None) -> nn.Module:
    """Make ``model`` a LoRS fine-tuning model, in place; returns the same object.

    Steps: find the sparse target linears and attach adapters (every other parameter frozen;
    ``model.lors_config`` = ``config``); with ``config.init == "gradient"`` run
    :func:`lors_fx.gradient_init` on ``init_data`` (and ``loss_fn``); with ``compile=True`` compile
    with the lors backend. Any error leaves the model as it was (adapters are removed again).
    On a model already sharded by FSDP2 the adapters are attached in place and sharded, and they
    run the eager op (with a warning if ``compile=True``; see :mod:`lors_fx.distributed`).

    Args:
        model: a PyTorch / HF model with pruned ``nn.Linear`` (or GPT-2 ``Conv1D``) layers.
        config: a :class:`LorsConfig` (default ``LorsConfig()``).
        compile: compile with the lors torch.compile backend (``False``: eager custom op).
        init_data: batches for the gradient init (required iff ``config.init == "gradient"``).
        loss_fn: ``loss_fn(model, batch) -> loss`` for batches that are not HF dicts with labels.
    """
    config = LorsConfig() if config is None else config
    if not isinstance(config, LorsConfig):
        raise TypeError(f"optimize: config must be a LorsConfig, got {type(config).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"optimize: model must be an nn.Module, got {type(model).__name__}")
    if config.init == "gradient" and init_data is None:
        raise ValueError("optimize: config.init='gradient' needs init_data (an iterable of "
                         "batches: dicts with labels, or tensors with loss_fn)")
    if config.init != "gradient" and init_data is not None:
        raise ValueError("optimize: init_data is only used with config.init='gradient' "
                         f"(config.init={config.init!r})")
    if compile:
        from .compiled_model import compile_model  # imported before any change to the model
    from .distributed import attach_sharded, is_sharded
    if is_sharded(model):  # FSDP2 already sharded it (order B in lors_fx.distributed)
        attach_sharded(model, config)  # checks everything before it changes the model
        if config.init == "gradient":  # every rank's batches; G summed on the first rank
            from .init import gradient_init
            gradient_init(model, init_data, loss_fn=loss_fn, config=config)
        if compile:
            warnings.warn("lors_fx.optimize: the model was sharded before the adapters were "
                          "attached, so FSDP2 hooks every adapted module and a compiled block "
                          "would break at each; running the eager LoRS op (it saves only x too). "
                          "To compile, call optimize before lors_fx.distributed.shard_model",
                          RuntimeWarning, stacklevel=2)
        return model
    attach_adapters(model, config)
    try:
        if config.init == "gradient":
            from .init import gradient_init
            gradient_init(model, init_data, loss_fn=loss_fn, config=config)
        if compile:
            compile_model(model, config)
    except BaseException:
        remove_adapters(model)
        raise
    return model
