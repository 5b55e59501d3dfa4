"""Fine-tuning loop for pruned models: LoRS and the baselines it is compared with.

:func:`prepare_model` attaches the adapters of one method from the registry
(:mod:`lors_fx.methods.registry`: ``lors`` through :func:`lors_fx.optimize`, with gradient init
by default; ``sqft``, ``spp``, ``lora`` as wrapper modules), and :func:`train` runs a plain loop:
AdamW, linear warm-up then cosine decay, gradient accumulation, gradient clipping, a tqdm bar with
the loss and tokens/s, periodic eval, and resumable checkpoints
(:mod:`lors_fx.workflows.checkpoint`: adapters, optimizer, LR schedule, step, data position and
RNG, written atomically; ``train(..., resume_from=DIR)`` continues an interrupted run to the same
final adapters, and SIGTERM saves one and stops). ``lors-fx train`` (:mod:`lors_fx.cli.train`)
wraps both.

The same model works with the Hugging Face ``Trainer`` (the adapters are parameters of the model,
everything else is frozen; :func:`lors_fx.optimize` installs the compiled forward on the model)::

    from transformers import Trainer, TrainingArguments
    from lors_fx import LorsConfig, optimize, save_adapters
    from lors_fx.workflows.callbacks import StopOnNonFiniteLoss
    from lors_fx.workflows.data import build_lm_splits, load_texts

    splits = build_lm_splits(load_texts("embedded"), tokenizer, block_size=256)
    calib = list(splits.train.batches(4))[:16]                  # gradient init: 64 examples
    optimize(model, LorsConfig(r=16, lora_alpha=32, init="gradient"), init_data=calib)
    args = TrainingArguments(output_dir="out", max_steps=1000, learning_rate=2e-4,
                             per_device_train_batch_size=4, gradient_accumulation_steps=4,
                             lr_scheduler_type="cosine", warmup_steps=0.03, logging_steps=10,
                             save_strategy="no", report_to=[], remove_unused_columns=False)
    Trainer(model=model, args=args, train_dataset=splits.train,
            callbacks=[StopOnNonFiniteLoss()]).train()        # stop on NaN, do not run on
    save_adapters(model, "out/adapters")                       # then: lors-fx merge

``splits.train`` (a :class:`lors_fx.workflows.data.TextBlocks`) is a map-style dataset of
``{"input_ids", "labels"}`` dicts, which the Trainer's default collator stacks.
``remove_unused_columns=False`` because the compiled forward's signature is ``(*args, **kwargs)``;
``warmup_steps`` below 1 is a ratio (transformers 5 removed ``warmup_ratio``). tests/workflows/test_train.py
runs this recipe for 2 steps on a tiny Llama (eager op path, ``compile=False``).
"""
from __future__ import annotations

import itertools
import math
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, Iterable, Iterator, List, Optional

import torch
from torch import nn

from lors_fx.methods.registry import TRAINING_METHODS, attach_method, get_method
from lors_fx.workflows.checkpoint import (TRAJECTORY_FIELDS, TrainingInterrupted, data_digest,
                                          find_checkpoint, history_of, load_checkpoint,
                                          save_checkpoint, save_trainable, stop_on_sigterm,
                                          write_atomically)
from lors_fx.workflows.data import mean_token_loss

__all__ = ["TRAIN_METHODS", "TrainConfig", "TrainResult", "TrainingInterrupted",
           "cosine_with_warmup", "prepare_model", "train", "mean_loss"]

#: the methods :func:`prepare_model` accepts (a view of the registry: ``lors`` is LoRS through
#: lors_fx.optimize, the others are baselines)
TRAIN_METHODS = tuple(TRAINING_METHODS)


@dataclass
class TrainConfig:
    """Settings of :func:`train`; validated on construction.

    ``steps`` counts optimizer steps, each over ``grad_accum`` micro-batches of ``batch_size``
    blocks. The learning rate warms up linearly over ``warmup_steps`` (default
    ``round(warmup_ratio * steps)``) and then follows a cosine down to ``min_lr_ratio * lr``.
    ``eval_every``/``save_every`` = 0 disables periodic eval/checkpoints; checkpoints go to
    ``output_dir/checkpoint-<step>`` (resumable: :mod:`lors_fx.workflows.checkpoint`) and the
    final adapters to ``output_dir/adapters``.
    """

    steps: int = 100
    batch_size: int = 4
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.0
    warmup_steps: Optional[int] = None
    warmup_ratio: float = 0.05
    min_lr_ratio: float = 0.0
    max_grad_norm: Optional[float] = 1.0
    eval_every: int = 0
    save_every: int = 0
    output_dir: Optional[str] = None
    seed: int = 0
    progress: bool = True

    def __post_init__(self):
        def positive_int(name, minimum=1):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"TrainConfig.{name}: must be an int >= {minimum}, got {value!r}")

        for name in ("steps", "batch_size", "grad_accum"):
            positive_int(name)
        for name in ("eval_every", "save_every"):
            positive_int(name, 0)
        if self.warmup_steps is not None:
            positive_int("warmup_steps", 0)
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"TrainConfig.lr: must be a finite number > 0, got {self.lr!r}")
        if not 0.0 <= self.warmup_ratio < 1.0:
            raise ValueError(f"TrainConfig.warmup_ratio: must be in [0, 1), got {self.warmup_ratio!r}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"TrainConfig.min_lr_ratio: must be in [0, 1], got {self.min_lr_ratio!r}")
        if self.max_grad_norm is not None and not self.max_grad_norm > 0:
            raise ValueError(f"TrainConfig.max_grad_norm: must be None or > 0, got "
                             f"{self.max_grad_norm!r}")
        if self.save_every and not self.output_dir:
            raise ValueError("TrainConfig.save_every: needs output_dir")

    @property
    def warmup(self) -> int:
        """Warm-up steps actually used."""
        if self.warmup_steps is not None:
            return min(self.warmup_steps, self.steps)
        return round(self.warmup_ratio * self.steps)


@dataclass
class TrainResult:
    """What :func:`train` did: per-step loss and learning rate, eval history, throughput.

    A resumed run's history starts at step 1 (the checkpoint's part is carried over);
    ``interrupted`` is True when SIGTERM stopped the run before its last step (see
    :class:`TrainingInterrupted`), ``resumed_from`` is the checkpoint it continued from.
    """

    steps: int = 0
    losses: List[float] = field(default_factory=list)
    lrs: List[float] = field(default_factory=list)
    evals: List[Dict[str, float]] = field(default_factory=list)
    step_seconds: List[float] = field(default_factory=list)
    tokens: int = 0
    seconds: float = 0.0
    checkpoints: List[str] = field(default_factory=list)
    interrupted: bool = False
    resumed_from: Optional[str] = None

    @property
    def tokens_per_second(self) -> float:
        """Training tokens (inputs) per second of the loop's wall time."""
        return self.tokens / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """A JSON-ready dict (with ``tokens_per_second``)."""
        return {**asdict(self), "tokens_per_second": self.tokens_per_second}


def cosine_with_warmup(step: int, total: int, warmup: int, min_ratio: float = 0.0) -> float:
    """Learning-rate multiplier at optimizer step ``step`` (0-based): ``(step + 1) / warmup``
    during warm-up, then ``min_ratio + (1 - min_ratio) * (1 + cos(pi * progress)) / 2``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def prepare_model(model: nn.Module, method: str = "lors", *, r: int = 16,
                  alpha: Optional[float] = None, init: Optional[str] = None,
                  init_data: Optional[Iterable] = None, init_samples: int = 64,
                  compile: bool = False, max_gradient_bytes: int = 2**30,
                  progress: bool = True, **lors_options) -> nn.Module:
    """Attach ``method``'s adapters to the pruned linears of ``model`` (in place; returns it).

    Args:
        method: one of :data:`TRAIN_METHODS`.
        r, alpha: rank and scale numerator (default ``alpha = 2 * r``).
        init: ``"gradient"`` (LoRS's init, the default for ``lors``; needs ``init_data``) or
            ``"zeros"`` (PEFT's init; the only one for the baselines).
        init_data: batches (dicts with labels) for the gradient init.
        init_samples: examples the gradient init averages over.
        compile: ``lors`` only: compile with the lors backend (``False``: the eager custom op).
        max_gradient_bytes: gradient init: bound on the dense float32 gradient accumulators
            alive at once (1 GiB: SmolLM2-135M's 210 linears in one pass over the data).
        progress: gradient init progress bar.
        lors_options: extra :class:`lors_fx.LorsConfig` fields for ``lors``.
    """
    if method not in TRAINING_METHODS:
        raise ValueError(f"method: expected one of {TRAIN_METHODS}, got {method!r}")
    entry = get_method(TRAINING_METHODS[method])
    if entry.gradient_init:
        attach_method(model, entry.name, r=r, alpha=alpha,
                      init="gradient" if init is None else init, init_data=init_data,
                      init_samples=init_samples, compile=compile,
                      max_gradient_bytes=max_gradient_bytes, progress=progress, **lors_options)
        return model
    if init not in (None, "zeros"):
        raise ValueError(f"init: {method} supports only 'zeros' (gradient init is LoRS's), "
                         f"got {init!r}")
    if lors_options or compile:
        raise ValueError(f"{method}: LorsConfig options and compile apply to 'lors' only")
    attach_method(model, entry.name, r=r, alpha=alpha)
    return model


def _cycle_batches(data, batch_size: int, seed: int, start: int = 0) -> Iterator[dict]:
    """Endless micro-batches from micro-batch ``start`` on (a resume's data position):
    TextBlocks reshuffled each epoch (seed + epoch), or a batch list cycled."""
    if hasattr(data, "batches") and hasattr(data, "input_ids"):
        if len(data) == 0:
            raise ValueError("train_data: no training block (corpus too small for block_size?)")
        per_epoch = -(-len(data) // batch_size)
        for epoch in itertools.count(start // per_epoch):
            epoch_batches = data.batches(batch_size, shuffle=True, seed=seed + epoch)
            skip, start = start % per_epoch, 0
            yield from itertools.islice(epoch_batches, skip, None)
    batches = list(data)
    if not batches:
        raise ValueError("train_data: no batch to train on")
    yield from itertools.islice(itertools.cycle(batches), start % len(batches), None)


def _to_device(batch: dict, device) -> dict:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def mean_loss(model: nn.Module, data, batch_size: int = 4) -> float:
    """Token-weighted mean next-token loss of ``model`` over ``data`` (TextBlocks or batches)."""
    return mean_token_loss(model, data, batch_size=batch_size)


def _optimizer(params: List[nn.Parameter], config: TrainConfig):
    """AdamW and its schedule: linear warm-up, then cosine decay (:func:`cosine_with_warmup`)."""
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: cosine_with_warmup(step, config.steps, config.warmup,
                                                   config.min_lr_ratio))
    return optimizer, scheduler


def _accumulate(model: nn.Module, batches: Iterator[dict], config: TrainConfig, device,
                loss_fn: Optional[Callable], result: TrainResult) -> float:
    """Forward and backward of ``grad_accum`` micro-batches; returns their mean loss."""
    total = 0.0
    for _ in range(config.grad_accum):
        batch = _to_device(next(batches), device)
        loss = loss_fn(model, batch) if loss_fn is not None else model(**batch).loss
        (loss / config.grad_accum).backward()
        total += float(loss.detach()) / config.grad_accum
        result.tokens += int(batch["input_ids"].numel())
    return total


def _trajectory(config: TrainConfig) -> dict:
    """The settings a resumed run must share with the checkpoint (JSON-ready)."""
    return {name: getattr(config, name) for name in TRAJECTORY_FIELDS}


def _checkpoint(model: nn.Module, optimizer, scheduler, config: TrainConfig,
                result: TrainResult, data_id: dict, step: int) -> None:
    """Save the resumable checkpoint of optimizer step ``step`` (1-based), once per step."""
    path = os.path.join(config.output_dir, f"checkpoint-{step}")
    if result.checkpoints and result.checkpoints[-1] == path:
        return
    result.checkpoints.append(path)  # the saved history lists this checkpoint too
    try:
        save_checkpoint(path, model, optimizer, scheduler, step=step,
                        micro_batches=step * config.grad_accum, trajectory=_trajectory(config),
                        data=data_id, history=history_of(result))
    except BaseException:
        result.checkpoints.pop()
        raise


def _resume(path: str, model: nn.Module, optimizer, scheduler, config: TrainConfig,
            result: TrainResult, data_id: dict) -> int:
    """Load the checkpoint at (or latest under) ``path``; returns the micro-batches consumed."""
    checkpoint = find_checkpoint(path)
    state = load_checkpoint(checkpoint, model, optimizer, scheduler,
                            trajectory=_trajectory(config), data=data_id)
    for key, value in state["history"].items():
        setattr(result, key, value)
    result.steps, result.resumed_from = state["step"], checkpoint
    return state["micro_batches"]


def _after_step(model: nn.Module, step: int, config: TrainConfig, result: TrainResult,
                eval_fn: Optional[Callable[[nn.Module], float]], postfix: dict,
                save: Callable[[int], None]) -> None:
    """Periodic eval and checkpoint after optimizer step ``step`` (1-based)."""
    if eval_fn is not None and config.eval_every and step % config.eval_every == 0:
        result.evals.append({"step": step, "eval_loss": float(eval_fn(model))})
        postfix["eval"] = f"{result.evals[-1]['eval_loss']:.3f}"
    if config.save_every and step % config.save_every == 0:
        save(step)


def _steps(model: nn.Module, batches: Iterator[dict], optimizer, scheduler, config: TrainConfig,
           result: TrainResult, hooks: dict) -> None:
    """Optimizer steps ``result.steps + 1 .. config.steps``; ``hooks``: ``eval_fn``,
    ``loss_fn``, ``save(step)`` and ``stop`` (an Event: SIGTERM, checked after each step)."""
    from tqdm.auto import tqdm

    params = [p for group in optimizer.param_groups for p in group["params"]]
    bar = tqdm(range(result.steps, config.steps), desc="train", disable=not config.progress,
               initial=result.steps, total=config.steps)
    start, before = time.perf_counter(), result.seconds
    for step in bar:
        step_start = time.perf_counter()
        lr = optimizer.param_groups[0]["lr"]
        total = _accumulate(model, batches, config, params[0].device, hooks["loss_fn"], result)
        if not math.isfinite(total):
            raise FloatingPointError(f"train: loss is {total} at step {step + 1}; lower the lr")
        # A NaN can stay out of the loss (CPU attention drops it), never out of the gradients.
        norm = torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or math.inf)
        if not math.isfinite(float(norm)):
            raise FloatingPointError(f"train: gradient norm is {float(norm)} at step {step + 1} "
                                     f"(the loss was {total}); lower the lr")
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        result.steps = step + 1
        result.losses.append(total)
        result.lrs.append(lr)
        result.step_seconds.append(time.perf_counter() - step_start)
        result.seconds = before + time.perf_counter() - start
        postfix = {"loss": f"{total:.3f}", "tok/s": f"{result.tokens_per_second:.0f}"}
        _after_step(model, step + 1, config, result, hooks["eval_fn"], postfix, hooks["save"])
        bar.set_postfix(postfix)
        if hooks["stop"].is_set() and step + 1 < config.steps:
            result.interrupted = True
            if config.output_dir:
                hooks["save"](step + 1)
            break
    bar.close()
    result.seconds = before + time.perf_counter() - start


def train(model: nn.Module, train_data, config: Optional[TrainConfig] = None, *,
          eval_data=None, eval_fn: Optional[Callable[[nn.Module], float]] = None,
          loss_fn: Optional[Callable] = None, resume_from: Optional[str] = None) -> TrainResult:
    """Train the parameters of ``model`` that require grad; returns a :class:`TrainResult`.

    Args:
        train_data: a :class:`lors_fx.workflows.data.TextBlocks` (shuffled each epoch, seeded) or a
            sequence of batches (dicts with ``input_ids`` and ``labels``; cycled).
        config: a :class:`TrainConfig`.
        eval_data: TextBlocks or batches for periodic eval (mean loss, :func:`mean_loss`).
        eval_fn: ``eval_fn(model) -> float`` instead of the mean loss on ``eval_data``.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (default ``model(**batch).loss``).
        resume_from: a checkpoint directory, or a run's ``output_dir`` (its latest checkpoint):
            adapters, optimizer, LR schedule, step, data position and RNG are restored, so the
            run ends with the same adapters, bit for bit, as one that was never stopped. The
            model must be prepared as before (same method, targets, rank, base) and ``config``
            must have the same trajectory settings (steps, batch, lr, schedule, seed).

    Each micro-batch's loss is divided by ``grad_accum`` (a mean over micro-batches). SIGTERM
    during training finishes the current optimizer step, saves a checkpoint (with an
    ``output_dir``) and raises :class:`TrainingInterrupted` (exit code 143 if uncaught).
    """
    config = TrainConfig() if config is None else config
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("train: the model has no trainable parameter; call prepare_model first")
    if eval_fn is None and eval_data is not None:
        eval_fn = lambda m: mean_loss(m, eval_data, config.batch_size)  # noqa: E731
    torch.manual_seed(config.seed)
    optimizer, scheduler = _optimizer(params, config)
    result, data_id = TrainResult(), data_digest(train_data)
    position = 0
    if resume_from is not None:
        position = _resume(resume_from, model, optimizer, scheduler, config, result, data_id)
    batches = _cycle_batches(train_data, config.batch_size, config.seed, position)
    model.train()
    with stop_on_sigterm() as stop:
        save = lambda step: _checkpoint(model, optimizer, scheduler, config, result,  # noqa: E731
                                        data_id, step)
        _steps(model, batches, optimizer, scheduler, config, result,
               dict(eval_fn=eval_fn, loss_fn=loss_fn, save=save, stop=stop))
        if config.output_dir and not result.interrupted:
            path = os.path.join(config.output_dir, "adapters")
            write_atomically(path, lambda tmp: save_trainable(model, tmp))
            result.checkpoints.append(path)
        if stop.is_set():  # at a safe point now: stop as the signal asked
            raise TrainingInterrupted(result)
    return result
