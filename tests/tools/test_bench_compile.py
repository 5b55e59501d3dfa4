"""tools/bench_compile.py: the order of the timed steps, and one quick run on a tiny Llama (the
rows, the reference's ratios, the sample counts). No timings are checked."""
from __future__ import annotations

import importlib.util
import json
import math
import sys
from collections import Counter
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def bench_compile():
    spec = importlib.util.spec_from_file_location("_tool_bench_compile",
                                                  ROOT / "tools" / "bench_compile.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_turns_rotate_and_settle(bench_compile):
    names = ["a", "b", "c"]
    order = bench_compile.turns(names, repeats=6, settle=1)
    timed = [name for name, is_timed in order if is_timed]
    assert Counter(timed) == {"a": 6, "b": 6, "c": 6}
    # every timed step right after an untimed step of the same method
    for i, (name, is_timed) in enumerate(order):
        if is_timed:
            assert order[i - 1] == (name, False)
    # each round starts one method later: every method is first in two of the six rounds
    rounds = [timed[k:k + 3] for k in range(0, len(timed), 3)]
    assert [r[0] for r in rounds] == ["a", "b", "c", "a", "b", "c"]
    assert all(sorted(r) == names for r in rounds)


def test_turns_without_settle_time_every_step(bench_compile):
    order = bench_compile.turns(["a", "b"], repeats=3, settle=0)
    assert order == [("a", True), ("b", True), ("b", True), ("a", True), ("a", True),
                     ("b", True)]
    assert bench_compile.turns([], repeats=3, settle=1) == []


def test_quick_run_rows_and_reference(bench_compile, tmp_path):
    """A tiny Llama, the eager compilers (conftest), the eager op row and the two PEFT LoRA rows
    that compile: every row measured with one sample per repeat, the reference at ratio 1."""
    pytest.importorskip("peft")
    path = tmp_path / "out.json"
    bench_compile.main(["--layers", "2", "--hidden", "64", "--intermediate", "128", "--heads",
                        "4", "--kv-heads", "2", "--vocab", "128", "--seq", "16", "--r", "4",
                        "--repeats", "3", "--warmup", "0", "--compiler", "eager",
                        "--only", "eager op,per block", "--json", str(path)])
    rows = {row["method"]: row for row in json.loads(path.read_text())["rows"]}
    assert set(rows) == {"lors_fx eager op (compile=False)", "PEFT LoRA compiled per block",
                         bench_compile.REFERENCE}
    for name, row in rows.items():
        assert "unavailable" not in row, (name, row.get("unavailable"))
        assert len(row["step_ms_all"]) == 3
        assert all(math.isfinite(t) and t > 0 for t in row["step_ms_all"])
        assert row["peak_bytes"] > 0 and row["saved_bytes"] > 0
    assert rows[bench_compile.REFERENCE]["ratio_to_lora"] == 1.0
    # the same model and batch: every method starts from the same loss
    losses = {round(row["first_loss"], 4) for row in rows.values()}
    assert len(losses) == 1, losses


@pytest.mark.parametrize("flags", [["--settle", "-1"], ["--repeats", "0"]])
def test_bad_counts_are_refused(bench_compile, flags):
    with pytest.raises(SystemExit):
        bench_compile.parse_args(flags)
