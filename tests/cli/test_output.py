"""What a command leaves on the terminal: ``--no-progress`` silences Hugging Face's bars too,
DeepSpeed's accelerator line and the profiler's ``USDT:`` lines are dropped, and everything is
restored when the command returns (bar switches, logging filters, file descriptor 2)."""
from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading

import torch
from torch.profiler import ProfilerActivity, profile

from lors_fx import cli
from lors_fx.cli import demo as cli_demo
from lors_fx.cli._output import filtered_stderr, fit_width, progress_bars, quiet_libraries

#: ``lors-fx ARGS`` in a fresh interpreter (``python -m lors_fx.cli.main`` warns: runpy finds the
#: module imported by its package first)
LORS_FX = "import sys; from lors_fx.cli import main; sys.exit(main(sys.argv[1:]))"


def _fd2():
    stat = os.fstat(2)
    return stat.st_dev, stat.st_ino


def _filter_threads():
    return [t for t in threading.enumerate() if t.name == "lors-fx stderr filter"]


def test_filtered_stderr_drops_usdt_lines_keeps_the_rest_and_restores(capfd):
    before = _fd2()
    with filtered_stderr():
        assert _fd2() != before
        os.write(2, b"USDT:2026-01-01 1:1 SyncActivityProfilerHandler.cpp:52] profiler_start\n")
        os.write(2, b"kept line\n")
        os.write(2, b"US")  # a dropped line in pieces
        os.write(2, b"DT: profiler_stop\n")
        os.write(2, b"\rbar 10%\rbar 100%\n")  # progress bars pass unchanged
        os.write(2, b"USB is not USDT\n")
        os.write(2, b"no newline at the end")
    assert _fd2() == before and _filter_threads() == []
    err = capfd.readouterr().err
    assert err == "kept line\n\rbar 10%\rbar 100%\nUSB is not USDT\nno newline at the end"


def test_profiler_usdt_lines_do_not_reach_the_terminal(capfd, monkeypatch):
    def profiled_command(args):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True):
            torch.ones(8).sum()
        print("profiled", file=sys.stderr)
        return 0

    monkeypatch.setattr(cli_demo, "run", profiled_command)
    assert cli.main(["demo", "--no-progress"]) == 0
    err = capfd.readouterr().err
    assert "profiled" in err and "USDT:" not in err


def test_progress_bars_off_inside_and_restored_after():
    from huggingface_hub.utils import are_progress_bars_disabled
    from transformers.utils import logging as hf_logging

    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with progress_bars(False):
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    assert hf_logging.is_progress_bar_enabled() and not are_progress_bars_disabled()
    with progress_bars(True):
        assert hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a caller's own choice survives a command
    try:
        with progress_bars(False):
            pass
        assert not hf_logging.is_progress_bar_enabled() and are_progress_bars_disabled()
    finally:
        hf_logging.enable_progress_bar()


def test_deepspeed_accelerator_line_is_filtered_only_inside():
    logger = logging.getLogger("DeepSpeed")
    record = logger.makeRecord("DeepSpeed", logging.WARNING, "real_accelerator.py", 213,
                               "Setting accelerator to CPU.", None, None)
    other = logger.makeRecord("DeepSpeed", logging.WARNING, "engine.py", 1, "real", None, None)
    filters = list(logger.filters)
    with quiet_libraries():
        assert not logger.filter(record) and logger.filter(other)
    assert logger.filter(record) and logger.filters == filters


def test_fit_width_cuts_long_lines_only():
    text = "short\n" + "x" * 50 + "\nend"
    assert fit_width(text, 0) == text
    assert fit_width(text, 20).split("\n") == ["short", "x" * 17 + "...", "end"]


def test_no_progress_command_prints_only_its_output(tmp_path):
    """A real process (DeepSpeed prints its line once per process, on import): the pruned model
    is saved (save_pretrained imports DeepSpeed through accelerate) and the JSON report is all
    that stdout holds; stderr stays empty."""
    from transformers import LlamaConfig, LlamaForCausalLM

    LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1, vocab_size=64)
                     ).save_pretrained(tmp_path / "dense")
    done = subprocess.run([sys.executable, "-c", LORS_FX, "prune",
                           str(tmp_path / "dense"), "--method", "magnitude", "--out",
                           str(tmp_path / "pruned"), "--json", "--no-progress"],
                          capture_output=True, text=True, timeout=300,
                          env={k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"})
    assert done.returncode == 0, done.stderr
    assert done.stderr == ""
    assert json.loads(done.stdout)["sparsity"] == 0.5
