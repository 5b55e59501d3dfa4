"""What reaches the terminal while a ``lors-fx`` command runs, scoped to the command.

- :func:`progress_bars` (:func:`lors_fx.workflows.embedded.hf_progress_bars`): with
  ``--no-progress``, the bars Hugging Face draws itself (transformers' "Loading weights",
  "Writing model shards", the hub's downloads) are off too, not only ours.
- :func:`quiet_libraries`: lines from other packages that a user can do nothing about do not
  reach the terminal: DeepSpeed's accelerator line, logged when ``save_pretrained`` makes
  accelerate import it, and the PyTorch profiler's ``USDT:`` lines, which its C++ code writes to
  file descriptor 2 on every profile (the demo's peak-memory measurement). The latter needs the
  descriptor itself: it is pointed at a pipe whose reader forwards every other line, unbuffered.
- :func:`command_output`: both, around a whole command (:func:`lors_fx.cli.main.main`); the
  descriptor-level filter only for the commands that run the profiler (``demo``, ``bench``).

Everything is restored on exit (bar switches, logging filters, file descriptor 2), so calling
``main`` from Python leaves the process as it found it.
"""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from typing import Iterator, Sequence

from lors_fx.workflows.embedded import hf_progress_bars as progress_bars

__all__ = ["progress_bars", "quiet_libraries", "command_output", "filtered_stderr",
           "C_NOISE_PREFIXES", "GIT_NOISE_PREFIXES", "fit_width"]

#: lines written to stderr by C/C++ code of other packages that are dropped (line starts)
C_NOISE_PREFIXES = (b"USDT:",)
#: what lm-eval's child ``git describe`` prints outside a git checkout (lm-eval records the
#: commit it runs in; the zero-shot numbers do not depend on it)
GIT_NOISE_PREFIXES = (b"fatal: not a git repository",)


class _DeepSpeedAcceleratorLine(logging.Filter):
    """Drops DeepSpeed's "Setting (ds_)accelerator to ..." records (logged on import)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.filename != "real_accelerator.py"


def _pump(read_fd: int, write_fd: int, drop: Sequence[bytes]) -> None:
    """Copy ``read_fd`` to ``write_fd`` until EOF, leaving out lines that start with one of
    ``drop``, then close both. Text is forwarded as soon as it cannot be such a line (progress
    bars, which end in ``\r`` or not at all, are not held back)."""
    pending, state = b"", "start"  # state of the current line: start, keep or drop
    try:
        while True:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            buffer, pending = pending + chunk, b""
            while buffer:
                if state == "start":
                    if any(buffer.startswith(p) for p in drop):
                        state = "drop"
                    elif any(p.startswith(buffer) for p in drop):
                        pending = buffer  # too short to tell yet
                        break
                    else:
                        state = "keep"
                ends = [i for i in (buffer.find(b"\n"), buffer.find(b"\r")) if i >= 0]
                cut = min(ends) + 1 if ends else len(buffer)
                if state == "keep":
                    os.write(write_fd, buffer[:cut])
                state = "start" if ends else state
                buffer = buffer[cut:]
        if pending and state != "drop":
            os.write(write_fd, pending)
    finally:
        os.close(read_fd)
        os.close(write_fd)


@contextlib.contextmanager
def filtered_stderr(drop: Sequence[bytes] = C_NOISE_PREFIXES) -> Iterator[None]:
    """File descriptor 2 through a filter that drops lines starting with one of ``drop``, for
    text written by C code (Python's own ``sys.stderr`` writes pass through it too). On exit the
    descriptor is restored and what was written is forwarded before this returns (a child
    process still holding the pipe keeps being forwarded, by the daemon thread, until it ends).
    Only around code that needs it: what a crash writes last could stay in the pipe."""
    for stream in (sys.stderr, sys.__stderr__):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.flush()
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 (a detached process): nothing to filter
        yield
        return
    read_fd, write_fd = os.pipe()
    os.dup2(write_fd, 2)
    os.close(write_fd)
    pump = threading.Thread(target=_pump, args=(read_fd, os.dup(saved), tuple(drop)),
                            name="lors-fx stderr filter", daemon=True)
    pump.start()
    try:
        yield
    finally:
        for stream in (sys.stderr, sys.__stderr__):
            with contextlib.suppress(AttributeError, ValueError, OSError):
                stream.flush()
        os.dup2(saved, 2)  # the pipe's last writer closes: the pump reads EOF and stops
        os.close(saved)
        pump.join(timeout=2)


@contextlib.contextmanager
def quiet_libraries(c_lines: bool = False) -> Iterator[None]:
    """DeepSpeed's accelerator line kept off the terminal, and with ``c_lines`` the lines of
    :data:`C_NOISE_PREFIXES` (the profiler's ``USDT:``) too."""
    deepspeed_logger = logging.getLogger("DeepSpeed")  # the logger DeepSpeed creates on import
    accelerator_line = _DeepSpeedAcceleratorLine()
    deepspeed_logger.addFilter(accelerator_line)
    try:
        with filtered_stderr() if c_lines else contextlib.nullcontext():
            yield
    finally:
        deepspeed_logger.removeFilter(accelerator_line)


@contextlib.contextmanager
def command_output(progress: bool, c_lines: bool = False) -> Iterator[None]:
    """:func:`quiet_libraries` (``c_lines``: for commands that run the profiler) and, unless
    ``progress``, :func:`progress_bars` off."""
    with quiet_libraries(c_lines), progress_bars(progress):
        yield


def fit_width(text: str, width: int) -> str:
    """``text`` with every line longer than ``width`` cut to it, ending in ``...``; unchanged
    when ``width`` is 0 (no terminal: the full lines, e.g. for a file)."""
    if width <= 0:
        return text
    keep = max(width - 3, 1)
    return "\n".join(line if len(line) <= width else line[:keep] + "..."
                     for line in text.split("\n"))
