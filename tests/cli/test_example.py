"""`lors-fx example` through cli.main and as `python -m lors_fx.cli.main`: exit codes, output, JSON."""
import json
import os
import subprocess
import sys

import pytest

from lors_fx import cli

from lors_fx.cli import example


def test_example_runs_and_prints_the_audit(capsys, tmp_path):
    out_json = tmp_path / "result.json"
    code = cli.main(["example", "--steps", "3", "--no-progress", "--json", str(out_json)])
    out = capsys.readouterr().out
    assert code == 0
    assert "audit ok" in out and "step-0 loss" in out and "adapted sites" in out
    data = json.loads(out_json.read_text())
    assert data["audit_ok"] is True and data["adapted_sites"] == 14 and data["steps"] == 3
    assert data["sparsity_after"] == data["sparsity_before"]
    assert abs(data["merged_loss"] - data["final_loss"]) < 1e-4


@pytest.mark.parametrize("argv", [
    [], ["nope"], ["example", "--steps", "0"], ["example", "--steps", "x"],
    ["example", "--grad-mode", "sparse"], ["example", "--unknown"],
])
def test_bad_arguments_exit_2(argv, capsys):
    assert cli.main(argv) == 2
    assert "usage" in capsys.readouterr().err


def test_help_exits_0(capsys):
    assert cli.main(["example", "--help"]) == 0
    assert "--grad-mode" in capsys.readouterr().out


def test_failed_audit_exits_1(monkeypatch, capsys):
    def fake(steps, seed, grad_mode, progress=True):
        summary = {"steps": steps, "grad_mode": grad_mode, "step0_loss": 1.0, "final_loss": 1.0,
                   "merged_loss": 1.0, "adapted_sites": 1, "trainable_params": 1,
                   "total_params": 2, "sparsity_before": {"a": 0.5}, "sparsity_after": {"a": 0.4},
                   "audit_ok": False, "audit": "audit FAILED: a: 3 new nonzeros"}
        return summary, [["a", "0.5", "0.4"]]
    monkeypatch.setattr(example, "run_example", fake)
    assert cli.main(["example", "--no-progress"]) == 1
    assert "audit FAILED" in capsys.readouterr().out


def test_exception_exits_1_with_one_line(monkeypatch, capsys):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")
    monkeypatch.setattr(example, "run_example", broken)
    assert cli.main(["example"]) == 1
    assert "disk on fire" in capsys.readouterr().err


def test_module_entry_point_subprocess():
    env = dict(os.environ, TQDM_DISABLE="1")
    done = subprocess.run([sys.executable, "-m", "lors_fx.cli.main", "example", "--steps", "2"],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    assert "audit ok" in done.stdout
