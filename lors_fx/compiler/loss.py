"""The Hugging Face model's loss under ``torch.compile`` when the decoder blocks are compiled one
by one (``compile_model(scope="blocks")``, the default with inductor).

Regional compilation leaves the head of the model eager: ``lm_head``, the upcast of the logits to
float32 and the cross-entropy. Eager cross-entropy keeps its ``log_softmax`` output (the size of
the float32 logits) for backward and its backward allocates another one; inductor fuses the
log-softmax and the loss and recomputes the softmax in backward. On a Llama with SmolLM2's
shapes and a vocabulary of 8,192 at 512 tokens that is 16 MiB less peak memory per step (one
logits-sized float32 tensor), the same step time (docs/benchmarks.md).

The compiled loss is installed through the model's ``loss_function`` setter (transformers'
``PreTrainedModel``); models without one are left alone. Calls without gradients or inside a
``TorchDispatchMode`` run the original (no compile for evaluation), a compile error runs the original for good with a warning and a note
in the report, and :func:`remove_compiled_loss` (called by ``decompile_model``) restores the
previous loss. The loss holds no adapter, so a graph break in it costs nothing but speed.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
from torch import nn

from lors_fx.compiler import _torch_private as private
from lors_fx.compiler.state import LorsCompileState

__all__ = ["CompiledLoss", "install_compiled_loss", "remove_compiled_loss"]

_MISSING = object()


class CompiledLoss:
    """``model.loss_function`` under ``torch.compile`` (inductor), with the original beside it."""

    def __init__(self, original: Callable, previous, state: LorsCompileState, dynamic):
        self.original, self.previous, self.state = original, previous, state
        self.compiled = torch.compile(original, dynamic=dynamic)
        self.failure: Optional[str] = None
        functools.update_wrapper(self, original)

    def __call__(self, *args, **kwargs):
        if self.failure is not None or not torch.is_grad_enabled() \
                or private.dispatch_mode_active():
            return self.original(*args, **kwargs)
        try:
            return self.compiled(*args, **kwargs)
        except private.dynamo_error_types() as error:
            first = (str(error).strip().splitlines() or [""])[0][:300]
            self.failure = f"the compiled loss failed, the eager loss runs: " \
                           f"{type(error).__name__}: {first}"
        self.state.notes.append(self.failure)
        warnings.warn(f"lors_fx: {self.failure}", RuntimeWarning, stacklevel=2)
        return self.original(*args, **kwargs)

    def __deepcopy__(self, memo):
        # A deep copy of a compiled model runs uncompiled: it gets the original loss.
        return self.original


def install_compiled_loss(model: nn.Module, state: LorsCompileState, dynamic=None) -> bool:
    """Compile ``model.loss_function`` (True), or leave a model without one alone (False)."""
    cls_attribute = getattr(type(model), "loss_function", None)
    if not isinstance(cls_attribute, property) or cls_attribute.fset is None:
        return False
    original = model.loss_function
    if isinstance(original, CompiledLoss):
        return True
    previous = model.__dict__.get("_loss_function", _MISSING)
    model.loss_function = CompiledLoss(original, previous, state, dynamic)
    state.notes.append("loss: compiled with inductor (the decoder blocks are compiled one by one)")
    return True


def remove_compiled_loss(model: nn.Module) -> None:
    """Restore the loss :func:`install_compiled_loss` replaced (no-op when there is none)."""
    installed = model.__dict__.get("_loss_function")
    if not isinstance(installed, CompiledLoss):
        return
    if installed.previous is _MISSING:
        del model.__dict__["_loss_function"]
    else:
        model.__dict__["_loss_function"] = installed.previous
