"""Shared by the multi-process tests: a free port, and a launcher run that cannot leak workers."""
from __future__ import annotations

import os
import signal
import socket
import subprocess

import pytest


def free_port() -> int:
    """A TCP port nobody listens on right now (a launch may still race for it)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_in_session(command, *, timeout: float, env=None, cwd=None) -> tuple:
    """Run ``command`` (torchrun, accelerate launch...) in its own session and return
    ``(returncode, stdout, stderr)``. On a timeout the whole process group (the launcher and its
    workers) is killed and the test fails with the tail of the output."""
    process = subprocess.Popen(command, cwd=cwd, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(f"{' '.join(map(str, command[:6]))} ... did not finish in {timeout} s:\n"
                    f"{stdout[-3000:]}\n{stderr[-3000:]}")
    return process.returncode, stdout, stderr
