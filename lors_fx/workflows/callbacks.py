"""Hugging Face ``Trainer`` callbacks for LoRS fine-tuning.

:class:`StopOnNonFiniteLoss` stops a ``Trainer`` run that diverged instead of letting it run on::

    from lors_fx.workflows.callbacks import StopOnNonFiniteLoss
    Trainer(model=model, args=args, train_dataset=data,
            callbacks=[StopOnNonFiniteLoss()]).train()

It raises ``FloatingPointError`` (the ``Trainer`` stops, nothing more is saved) when

- a logged loss (``loss``, ``eval_loss``, ...) is NaN or inf,
- a trainable parameter's gradient is NaN or inf just before the optimizer step (so the adapters
  are still the last finite ones; skipped with ``fp16=True``, whose gradient scaler skips such
  steps on purpose), or
- a trainable parameter is NaN or inf after an optimizer step (e.g. a half-precision adapter that
  an update overflowed).

The ``Trainer`` drops NaN/inf step losses from its logged average by default
(``logging_nan_inf_filter=True``), so a diverged run can log a finite loss: the gradient and
parameter checks are what catch it then. The checks read one flag back per step.
``lors-fx train`` has the same guard built in (its loop raises ``FloatingPointError``).
"""
from __future__ import annotations

import math
from typing import Iterable, List, Optional

import torch
from torch import nn
from transformers import TrainerCallback

__all__ = ["StopOnNonFiniteLoss"]


def _non_finite(named: Iterable[tuple[str, Optional[torch.Tensor]]]) -> List[str]:
    """Names whose tensor holds a NaN or inf (one device read for all of them; a sharded
    tensor is checked on this rank's shard)."""
    local = [(name, t.to_local() if hasattr(t, "to_local") else t) for name, t in named
             if t is not None]
    flags = [(name, torch.isfinite(t.detach()).all()) for name, t in local if t.numel()]
    if not flags:
        return []
    device = flags[0][1].device
    finite = torch.stack([flag.to(device) for _, flag in flags]).tolist()
    return [name for (name, _), ok in zip(flags, finite) if not ok]


def _describe(names: List[str], limit: int = 4) -> str:
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return ", ".join(names[:limit]) + more


class StopOnNonFiniteLoss(TrainerCallback):
    """Raise ``FloatingPointError`` when the logged loss, a gradient or a trainable parameter
    becomes NaN/inf (see the module docstring).

    Args:
        check_gradients: check the trainable parameters' gradients before each optimizer step
            (never with ``fp16=True``).
        check_parameters: check the trainable parameters after each optimizer step.
    """

    def __init__(self, check_gradients: bool = True, check_parameters: bool = True):
        self.check_gradients = check_gradients
        self.check_parameters = check_parameters

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key, value in (logs or {}).items():
            if key.endswith("loss") and isinstance(value, (int, float)) \
                    and not math.isfinite(value):
                raise FloatingPointError(
                    f"StopOnNonFiniteLoss: {key} = {value} at step {state.global_step}: training "
                    f"diverged; lower the learning rate (or use float32 adapters on a half-"
                    f"precision model: LorsConfig(adapter_dtype='float32'))")

    def on_pre_optimizer_step(self, args, state, control, model: Optional[nn.Module] = None,
                              **kwargs):
        if not self.check_gradients or model is None or getattr(args, "fp16", False):
            return
        bad = _non_finite((name, p.grad) for name, p in model.named_parameters()
                          if p.requires_grad)
        if bad:
            raise FloatingPointError(
                f"StopOnNonFiniteLoss: non-finite gradients before optimizer step "
                f"{state.global_step + 1} in {_describe(bad)} (the loss was NaN/inf, or the "
                f"backward overflowed); the parameters are still the last finite ones")

    def on_step_end(self, args, state, control, model: Optional[nn.Module] = None, **kwargs):
        if not self.check_parameters or model is None:
            return
        bad = _non_finite((name, p) for name, p in model.named_parameters() if p.requires_grad)
        if bad:
            raise FloatingPointError(
                f"StopOnNonFiniteLoss: trainable parameters became non-finite at step "
                f"{state.global_step}: {_describe(bad)}; training diverged (lower the learning "
                f"rate; on a float16/bfloat16 model keep adapters in float32, the default)")
