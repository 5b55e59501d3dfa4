"""Which compiler runs the partitioned graphs: ``"auto"`` (the default) picks inductor where it
can run and the eager GraphModules elsewhere, with the reason recorded.

Inductor generates C++/OpenMP kernels on CPU (it needs a C++ compiler: ``$CXX``, ``g++``, ``c++``
or ``clang++``) and Triton kernels on CUDA (it needs ``triton``). Where the requirement is missing,
``"auto"`` resolves to ``"eager"`` and says why; where inductor is chosen but fails to compile a
graph, the backend runs that graph eagerly and records the error (:mod:`lors_fx.compiler.backend`).
The environment variable ``LORS_FX_COMPILER`` (``eager`` or ``inductor``) overrides ``"auto"``, e.g.
to keep test suites fast; an explicit ``LorsConfig.fw_compiler`` / ``bw_compiler`` always wins.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
from typing import Optional, Sequence, Tuple

import torch

__all__ = ["COMPILER_ENV", "inductor_unavailable", "resolve_compiler", "device_of"]

#: Overrides ``"auto"`` when set to ``eager`` or ``inductor``.
COMPILER_ENV = "LORS_FX_COMPILER"
_CXX_NAMES = ("g++", "c++", "clang++")


def inductor_unavailable(device_type: str) -> Optional[str]:
    """Why inductor cannot compile graphs on ``device_type`` here, or None when it can."""
    if device_type == "cpu":
        candidates = [os.environ["CXX"]] if os.environ.get("CXX") else list(_CXX_NAMES)
        if not any(shutil.which(name) for name in candidates):
            return (f"no C++ compiler found ({', '.join(candidates)}): inductor's CPU kernels "
                    f"need one")
        return None
    if device_type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed: inductor's CUDA kernels need it"
        return None
    return f"inductor is not used for {device_type} tensors by lors_fx"


def resolve_compiler(requested: str, device_type: str) -> Tuple[str, Optional[str]]:
    """``(compiler, reason)``: ``requested`` unless it is ``"auto"``; then ``$LORS_FX_COMPILER``
    if set, else inductor where :func:`inductor_unavailable` finds nothing missing, else eager.
    ``reason`` says why ``"auto"`` did not give inductor (None otherwise)."""
    if requested != "auto":
        return requested, None
    forced = os.environ.get(COMPILER_ENV, "").strip().lower()
    if forced in ("eager", "inductor"):
        return forced, (f"{COMPILER_ENV}={forced}" if forced == "eager" else None)
    if forced:
        raise ValueError(f"{COMPILER_ENV}={forced!r}: expected 'eager' or 'inductor'")
    why = inductor_unavailable(device_type)
    return ("eager", why) if why else ("inductor", None)


def device_of(example_inputs: Sequence) -> str:
    """The device type of a graph: that of its first tensor input (cpu without one)."""
    for value in example_inputs:
        if isinstance(value, torch.Tensor):
            return value.device.type
    return "cpu"
