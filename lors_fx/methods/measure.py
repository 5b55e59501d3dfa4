"""What a training step costs in memory, measured the same way by the benchmark, the demo and the
tools: the bytes autograd saves for backward, and the peak allocated during a step.

- :class:`SavedBytes` / :func:`saved_bytes`: exact, from ``torch.autograd.graph.saved_tensors_hooks``
  (each storage counted once; storages of tensors alive anyway, such as parameters, excluded).
- :func:`peak_bytes`: CUDA: ``torch.cuda.max_memory_allocated`` above the step's start. CPU: the
  profiler's allocation events (``profile_memory=True``) cumulated in time order, exact for
  tensors of PyTorch's CPU allocator, blind to oneDNN scratch and Python objects.
"""
from __future__ import annotations

from typing import Callable, Dict, Iterable

import torch
from torch import nn
from torch.profiler import ProfilerActivity, profile

from lors_fx.compiler._torch_private import profiler_memory_events

__all__ = ["SavedBytes", "saved_bytes", "peak_bytes"]


class SavedBytes:
    """Context that counts the bytes of the distinct storages autograd saves inside it.

    ``exclude``: tensors whose storages are not counted (parameters, the input leaf: they are
    alive anyway). ``skip_parameters``: also skip every ``nn.Parameter`` saved (FSDP2 gathers
    its weights into Parameters that are freed after the forward, so no storage list names
    them). The count is :attr:`total` once the block exits::

        with SavedBytes(exclude=model.parameters()) as saved:
            loss = model(**batch).loss
        loss.backward()
        print(saved.total)
    """

    def __init__(self, exclude: Iterable[torch.Tensor] = (), *, skip_parameters: bool = False):
        self._excluded = {t.untyped_storage().data_ptr() for t in exclude}
        self._skip_parameters = skip_parameters
        self._seen: Dict[int, int] = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, tensor: torch.Tensor) -> torch.Tensor:
        if not (self._skip_parameters and isinstance(tensor, nn.Parameter)):
            storage = tensor.untyped_storage()
            if storage.data_ptr() not in self._excluded:
                self._seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    @property
    def total(self) -> int:
        """Bytes counted so far."""
        return sum(self._seen.values())

    def __enter__(self) -> "SavedBytes":
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._hooks.__exit__(*exc)


def saved_bytes(forward: Callable, exclude: Iterable[torch.Tensor] = ()) -> int:
    """Bytes of the distinct storages autograd saves while ``forward()`` runs; storages of
    ``exclude`` (parameters: alive anyway) are not counted. The output is dropped."""
    with SavedBytes(exclude) as counter:
        out = forward()
    del out
    return counter.total


def peak_bytes(step: Callable, device: torch.device) -> int:
    """Peak bytes allocated while ``step()`` runs, above the allocated bytes at its start."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    level = peak = 0
    for _, nbytes in profiler_memory_events(prof, "CPU"):
        level += nbytes
        peak = max(peak, level)
    return peak
