"""tools/gpu_check.py end to end on CPU: parts 1 (correctness), 2 (benchmark, small shapes),
4 (CUDA-only) and 5 (FSDP2 through torchrun, gloo) of a quick run, as a subprocess; the JSON must
say what ran, that every correctness check held, and why part 4 did not run. Part 3 (inductor)
is left out for time (its compile is most of the script's CPU run; the default compiled path is
tested in tests/compiler/test_default_compilers.py). No timings are checked."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_quick_cpu_run_records_checks_and_skips(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "gpu_check.py"), "--device", "cpu",
                           "--quick", "--json", str(out), "--parts", "1,2,4,5"],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["schema"] == "lors_fx.gpu_check/1"
    assert set(result["parts"]) == {"1", "2", "4", "5"}
    for part in ("2", "5"):
        assert result["parts"][part]["status"] == "ok", result["parts"][part]

    correctness = result["parts"]["1"]
    assert correctness["status"] == "ok", correctness.get("traceback")
    checks = correctness["checks"]
    assert all(check["passed"] for check in checks), [c for c in checks if not c["passed"]]
    ops = [check for check in checks if check["check"] == "op"]
    # fp32/bf16 x lors/exact x recompute on/off x 2-D/3-D x 2:4/50%
    assert len(ops) == 32
    assert {(c["dtype"], c["grad_mode"], c["recompute"], c["input"], c["base"]) for c in ops} == {
        (d, g, r, x, b) for d in ("fp32", "bf16") for g in ("lors", "exact")
        for r in (True, False) for x in ("2-D", "3-D") for b in ("2:4", "50%")}
    names = {check["check"] for check in checks}
    assert {"train+merge", "bf16 merge bits"} <= names

    semi = result["parts"]["4"]
    assert semi["status"].startswith("skipped: no CUDA")
    assert semi["summary"]
    assert "part 1: correctness -- ok" in done.stdout


def _load_gpu_check(monkeypatch):
    """tools/gpu_check.py as a module (registered, as its dataclass needs, for this test only)."""
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "tools" / "gpu_check.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "gpu_check", module)
    spec.loader.exec_module(module)
    return module


def test_a_failing_part_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    gpu_check = _load_gpu_check(monkeypatch)

    def broken(ctx):
        raise ValueError("boom")

    monkeypatch.setitem(gpu_check.PARTS, 1, broken)
    out = tmp_path / "out.json"
    rc = gpu_check.main(["--device", "cpu", "--quick", "--parts", "1,4", "--json", str(out)])
    assert rc == 1
    parts = json.loads(out.read_text(encoding="utf-8"))["parts"]
    assert parts["1"]["status"] == "error: ValueError: boom"
    assert any("in broken" in line for line in parts["1"]["traceback"])
    assert parts["4"]["status"].startswith("skipped: no CUDA")
