"""Training checkpoints that resume to the same adapters, written so that a kill never corrupts one.

A checkpoint is a directory ``OUT/checkpoint-<step>`` holding

- the trainable parameters: LoRS adapters as :func:`lors_fx.save_adapters` writes them (so a
  checkpoint is also an adapter directory for ``lors-fx merge``), other methods'
  ``trainable.safetensors``;
- ``training_state.pt``: the optimizer's and the LR scheduler's ``state_dict`` and the RNG states
  (torch CPU and CUDA, Python's ``random``, NumPy's), tensors and plain data only, read back with
  ``torch.load(weights_only=True)``: loading a checkpoint never runs code from it;
- ``trainer_state.json``: the step, the data position (micro-batches consumed), the settings
  that decide the trajectory, the trainable parameters' names and shapes and the history so far
  (losses, learning rates, evals), written last.

Writes are atomic: everything goes to ``checkpoint-<step>.tmp`` first, is flushed to disk, and
the directory is renamed into place, so a kill during a save leaves the previous checkpoints as
they were and at worst a ``.tmp`` (or ``.old``) directory that :func:`find_checkpoint` ignores.
:func:`stop_on_sigterm` turns SIGTERM into a flag the loop checks after each optimizer step
(save, then stop), and puts the previous handler back when training ends.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import threading
from typing import Callable, Dict, Iterator, List

import numpy as np
import torch
from torch import nn

from lors_fx.adapters import is_optimized
from lors_fx.serialization import load_adapters, save_adapters

__all__ = ["TRAINER_STATE_NAME", "TRAINING_STATE_NAME", "TRAINABLE_NAME", "write_atomically",
           "save_trainable", "save_checkpoint", "checkpoint_steps", "find_checkpoint",
           "load_checkpoint", "data_digest", "history_of", "stop_on_sigterm",
           "TrainingInterrupted"]

TRAINER_STATE_NAME = "trainer_state.json"
TRAINING_STATE_NAME = "training_state.pt"
TRAINABLE_NAME = "trainable.safetensors"
_FORMAT = 1
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
#: TrainConfig fields that decide the trajectory: a resumed run must use the same values
TRAJECTORY_FIELDS = ("steps", "batch_size", "grad_accum", "lr", "weight_decay", "warmup",
                     "min_lr_ratio", "max_grad_norm", "seed")


def _fsync_tree(path: str) -> None:
    """Flush every file under ``path`` and the directories themselves to disk."""
    for root, _, files in os.walk(path):
        for name in files:
            with open(os.path.join(root, name), "rb") as handle:
                os.fsync(handle.fileno())
        _fsync_dir(root)


def _fsync_dir(path: str) -> None:
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except OSError:  # platforms that cannot open a directory
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def write_atomically(path: str, write: Callable[[str], None]) -> str:
    """``write(tmp)`` into ``path + ".tmp"``, flush it, then rename it to ``path`` (an older
    ``path`` is first renamed to ``path + ".old"``: a directory cannot be renamed over a
    non-empty one). A failure removes the temporary directory and leaves ``path`` untouched; a
    kill leaves at most a ``.tmp``/``.old`` directory, which the next save of ``path`` removes
    and :func:`find_checkpoint` ignores. Returns ``path``."""
    path = os.path.normpath(path)
    tmp, old = path + ".tmp", path + ".old"
    for stale in (tmp, old):
        shutil.rmtree(stale, ignore_errors=True)
    os.makedirs(tmp)
    try:
        write(tmp)
        _fsync_tree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(path):
        os.replace(path, old)
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(path) or ".")
    shutil.rmtree(old, ignore_errors=True)
    return path


def _kind(model: nn.Module) -> str:
    """What a checkpoint of ``model`` holds: LoRS adapter files or a baseline's parameters."""
    return "lors_adapters" if is_optimized(model) else "trainable"


def save_trainable(model: nn.Module, path: str) -> None:
    """LoRS adapters via :func:`save_adapters`; other methods' trainable parameters as
    ``trainable.safetensors`` (by parameter name)."""
    if is_optimized(model):
        save_adapters(model, path)
        return
    from safetensors.torch import save_file

    save_file({n: p.detach().cpu().contiguous() for n, p in model.named_parameters()
               if p.requires_grad}, os.path.join(path, TRAINABLE_NAME))


def _rng_state() -> dict:
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
            "python": random.getstate(),
            "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached}}


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    saved = state["numpy"]
    np.random.set_state((saved["name"], saved["keys"].numpy().astype(np.uint32), saved["pos"],
                         saved["has_gauss"], saved["cached_gaussian"]))


def data_digest(data) -> dict:
    """What identifies the training data for a resume: its length and, for TextBlocks, a hash
    of the token ids (another corpus or block size would make the data position meaningless)."""
    if hasattr(data, "input_ids") and isinstance(data.input_ids, torch.Tensor):
        ids = data.input_ids.detach().cpu().contiguous()
        return {"length": len(data),
                "sha256": hashlib.sha256(ids.numpy().tobytes()).hexdigest()}
    return {"length": len(data) if hasattr(data, "__len__") else None}


def save_checkpoint(path: str, model: nn.Module, optimizer, scheduler, *, step: int,
                    micro_batches: int, trajectory: dict, data: dict, history: dict) -> str:
    """Write a resumable checkpoint to ``path`` atomically (:func:`write_atomically`)."""
    names = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    state = {"format": _FORMAT, "step": step, "micro_batches": micro_batches,
             "trajectory": trajectory, "data": data, "kind": _kind(model), "trainable": names,
             "history": history}

    def write(tmp: str) -> None:
        save_trainable(model, tmp)
        torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                    "rng": _rng_state()}, os.path.join(tmp, TRAINING_STATE_NAME))
        with open(os.path.join(tmp, TRAINER_STATE_NAME), "w", encoding="utf-8") as handle:
            json.dump(state, handle, indent=1)
            handle.write("\n")

    return write_atomically(path, write)


def _is_checkpoint(path: str) -> bool:
    return os.path.isfile(os.path.join(path, TRAINER_STATE_NAME))


def checkpoint_steps(path: str) -> List[int]:
    """Steps of the complete checkpoints in run directory ``path``, ascending."""
    return sorted(int(m.group(1)) for entry in os.listdir(path)
                  if (m := _CHECKPOINT.fullmatch(entry))
                  and _is_checkpoint(os.path.join(path, entry)))


def find_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint, else its ``checkpoint-<step>`` with the highest
    step (``.tmp`` leftovers of an interrupted save are ignored)."""
    if _is_checkpoint(path):
        return path
    if not os.path.isdir(path):
        raise FileNotFoundError(f"resume: {path!r} is not a directory")
    steps = checkpoint_steps(path)
    if not steps:
        raise FileNotFoundError(f"resume: no checkpoint in {path!r} (no checkpoint-<step> "
                                f"directory with a {TRAINER_STATE_NAME}; train with "
                                f"--save-every N to write them)")
    return os.path.join(path, f"checkpoint-{steps[-1]}")


def _read_state(path: str) -> tuple:
    """``trainer_state.json`` and ``training_state.pt`` of checkpoint ``path`` (no code runs)."""
    state_path = os.path.join(path, TRAINER_STATE_NAME)
    try:
        with open(state_path, encoding="utf-8") as handle:
            state = json.load(handle)
    except ValueError as error:
        raise ValueError(f"resume: {state_path} is not valid JSON ({error})") from error
    if state.get("format") != _FORMAT:
        raise ValueError(f"resume: {state_path} has format {state.get('format')!r}, "
                         f"expected {_FORMAT}")
    tensors_path = os.path.join(path, TRAINING_STATE_NAME)
    try:
        tensors = torch.load(tensors_path, map_location="cpu", weights_only=True)
    except Exception as error:  # missing, truncated, or holding more than tensors and data
        raise ValueError(f"resume: cannot read {tensors_path}: {error}") from error
    return state, tensors


def _check_compatible(state: dict, path: str, model: nn.Module, trajectory: dict,
                      data: dict) -> None:
    """The resumed run trains the same parameters on the same data with the same settings."""
    differ = {k: (state["trajectory"].get(k), v) for k, v in trajectory.items()
              if state["trajectory"].get(k) != v}
    if differ:
        text = ", ".join(f"{k}: {a!r} in the checkpoint, {b!r} now" for k, (a, b) in differ.items())
        raise ValueError(f"resume: {path} was written with other settings ({text}); resume with "
                         f"the same ones (only eval/save frequency and output may change)")
    if state["kind"] != _kind(model):
        held = "LoRS adapters" if state["kind"] == "lors_adapters" else "a baseline's parameters"
        now = "LoRS" if is_optimized(model) else "sqft/spp/lora"
        raise ValueError(f"resume: {path} holds {held}, the model trains {now}: prepare it "
                         f"with the method of the stopped run")
    names = {n: list(p.shape) for n, p in model.named_parameters() if p.requires_grad}
    if names != state["trainable"]:
        only = sorted(set(state["trainable"]) ^ set(names))
        raise ValueError(f"resume: the trainable parameters differ from {path}'s (another "
                         f"method, rank or targets?): {only[:4] or 'same names, other shapes'}")
    if data != state["data"]:
        raise ValueError(f"resume: the training data differs from the one {path} was trained on "
                         f"({state['data']} vs {data}); use the same --data, --block-size, seed")


@torch.no_grad()
def _load_trainable(model: nn.Module, path: str) -> None:
    if is_optimized(model):
        load_adapters(model, path)  # checks keys, shapes and the base's zero pattern
        return
    from safetensors.torch import load_file

    file = os.path.join(path, TRAINABLE_NAME)
    try:
        tensors = load_file(file)
    except Exception as error:
        raise ValueError(f"resume: cannot read {file}: {error}") from error
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise ValueError(f"resume: {file} holds other parameters than the model trains")
    for name, param in params.items():
        param.copy_(tensors[name])


def load_checkpoint(path: str, model: nn.Module, optimizer, scheduler, *, trajectory: dict,
                    data: dict) -> dict:
    """Restore checkpoint ``path`` (from :func:`find_checkpoint`) into ``model``, ``optimizer``,
    ``scheduler`` and the RNGs, after checking that it belongs to this run; returns its
    ``trainer_state.json`` (``step``, ``micro_batches``, ``history``)."""
    state, tensors = _read_state(path)
    _check_compatible(state, path, model, trajectory, data)
    _load_trainable(model, path)
    optimizer.load_state_dict(tensors["optimizer"])
    scheduler.load_state_dict(tensors["scheduler"])
    _set_rng_state(tensors["rng"])
    return state


class TrainingInterrupted(SystemExit):
    """Raised by :func:`lors_fx.workflows.train.train` when SIGTERM arrived, once the current
    optimizer step is done and a checkpoint saved (with an ``output_dir``; or the final adapters,
    when it was the last step). A :class:`SystemExit` with code 143 (128 + SIGTERM), so an
    uncaught one ends the process quietly, as SIGTERM would have, and ``except Exception`` does
    not swallow it. ``result``: the ``TrainResult`` so far; ``checkpoint``: what was saved (or
    ``None``)."""

    def __init__(self, result):
        super().__init__(128 + signal.SIGTERM)
        self.result = result
        self.checkpoint = result.checkpoints[-1] if result.checkpoints else None


@contextlib.contextmanager
def stop_on_sigterm() -> Iterator[threading.Event]:
    """Within the block SIGTERM sets the yielded event instead of killing the process; the
    previous handler is back afterwards. Outside the main thread (where Python cannot install
    handlers) the event is never set."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(signum, frame):  # noqa: ARG001 - the signal API's signature
        stop.set()

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGTERM, previous)


def history_of(result) -> Dict[str, object]:
    """The part of a :class:`TrainResult` a resumed run continues from."""
    return {"losses": result.losses, "lrs": result.lrs, "evals": result.evals,
            "step_seconds": result.step_seconds, "tokens": result.tokens,
            "seconds": result.seconds, "checkpoints": result.checkpoints}
