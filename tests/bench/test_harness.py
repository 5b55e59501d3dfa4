"""The benchmark harness: --quick runs end to end and writes the documented JSON (never timing)."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lors_fx.bench import harness as bench

from lors_fx.cli import bench as cli_bench
from lors_fx.methods import METHODS, apply_method

ROOT = Path(__file__).resolve().parents[2]


def _args(argv):
    return cli_bench.add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


def _check_result(result, methods):
    assert set(bench.TOP_KEYS) <= set(result)
    assert result["schema"] == bench.SCHEMA
    assert result["peak_memory_method"].startswith(("cpu:", "cuda:"))
    assert len(result["cases"]) == 1
    case = result["cases"][0]
    assert set(bench.CASE_KEYS) <= set(case)
    assert [row["method"] for row in case["rows"]] == methods
    for row in case["rows"]:
        assert set(bench.ROW_KEYS) <= set(row), row["method"]
        assert row["status"] == "ok", (row["method"], row["status"])
        # a fast wrong method cannot win: fp32 against the float64 formula of the same method
        assert row["rel_err_y"] < 1e-4 and row["rel_err_grad"] < 1e-4, row
        assert row["step_ms"] > 0 and len(row["step_ms_all"]) == 3
        assert row["saved_bytes"] > 0 and row["peak_bytes"] > 0 and row["flops"] > 0
        assert row["trainable_params"] > 0 and row["optimizer_state_bytes"] > 0
    rows = {row["method"]: row for row in case["rows"]}
    # the ratios are the rows' own numbers divided by the baseline's
    assert rows["lors"]["vs_lora"] == pytest.approx(rows["lors"]["step_ms"]
                                                    / rows["lora"]["step_ms"])
    assert rows["lors"]["saved_vs_sqft"] == pytest.approx(rows["lors"]["saved_bytes"]
                                                          / rows["sqft"]["saved_bytes"])
    # exact, not timing: the op saves x only (the MLP's inputs), SQFT also a dense W' per linear
    assert rows["lors"]["saved_bytes"] < rows["sqft"]["saved_bytes"]
    assert rows["full_sparse_ft"]["trainable_params"] > rows["lors"]["trainable_params"]
    # the custom op's forward is counted too (registered flop formula), not only its backward
    assert rows["lors"]["flops"] > rows["lora"]["flops"]


def test_quick_in_process(tmp_path, capsys):
    path = tmp_path / "quick.json"
    result = cli_bench.bench_main(_args(["--quick", "--json", str(path)]))
    methods = list(METHODS) + ["lors_fx_eager"]
    _check_result(result, methods)
    on_disk = json.loads(path.read_text())
    _check_result(on_disk, methods)
    out = capsys.readouterr().out
    assert "llama_mlp" in out and "xSQFT" in out and "peak memory" in out


@pytest.mark.parametrize("quiet", [False, True], ids=["bar", "no-progress"])
def test_quick_as_a_script(tmp_path, quiet):
    path = tmp_path / "out.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "bench.py"), "--quick",
                           "--methods", "lora", "sqft", "lors", "full_sparse_ft",
                           "--json", str(path)] + (["--no-progress"] if quiet else []),
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    _check_result(json.loads(path.read_text()), ["lora", "sqft", "lors", "full_sparse_ft"])
    assert ("bench:" in done.stderr) is not quiet  # the tqdm bar, or none with --no-progress


def test_unknown_method_is_a_clear_error():
    with pytest.raises(SystemExit, match="unknown method"):
        cli_bench.bench_main(_args(["--quick", "--methods", "dora"]))


def test_plot_without_matplotlib_says_so(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    message = cli_bench._plot([], str(tmp_path / "x.png"))
    assert "matplotlib is not installed" in message
    assert not (tmp_path / "x.png").exists()


def test_targets_are_checked_on_the_issue_case():
    rows = [{"method": "lors", "step_ms": 10.0, "saved_bytes": 40, "peak_bytes": 50},
            {"method": "lora", "step_ms": 10.0, "saved_bytes": 40, "peak_bytes": 45},
            {"method": "spp", "step_ms": 30.0, "saved_bytes": 90, "peak_bytes": 100},
            {"method": "sqft", "step_ms": 12.0, "saved_bytes": 100, "peak_bytes": 100}]
    case = {"workload": "llama_mlp", "tokens": 512, "r": 16, "dtype": "fp32", "rows": rows}
    targets = {t["target"]: t["holds"] for t in bench._targets([case])}
    assert targets == {"step <= 1.10x LoRA": True, "step <= 0.50x SPP": True,
                       "step <= 0.75x SQFT": False, "saved <= 1.00x LoRA": True,
                       "saved <= 0.45x SQFT": True, "peak <= 0.55x SQFT": True}
    assert bench._targets([{**case, "tokens": 2048}]) == []


@pytest.mark.parametrize("workload", ["llama_attn", "smollm2"])
def test_other_workloads_build_and_prune(workload):
    model, hidden = bench.build_workload(workload, scale=1 / 32, layers=1)
    shapes = bench.prune_(model, 0.5)
    assert shapes and all(len(s) == 2 for s in shapes)
    y = model(torch.randn(1, 8, hidden))
    assert y.shape == (1, 8, hidden)


def test_config_workload(tmp_path):
    from transformers import LlamaConfig
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2)
    path = tmp_path / "config.json"
    path.write_text(config.to_json_string())
    model, hidden = bench.build_workload("config", layers=1, config_path=str(path))
    assert hidden == 64 and len(model.model.layers) == 1


def test_failing_and_unavailable_methods_become_rows(monkeypatch):
    real = bench._build_method

    def fake(method, *args):
        if method == "sqft":
            raise bench._Unavailable("no backend here")
        if method == "spp":
            raise RuntimeError("boom")
        return real(method, *args)

    monkeypatch.setattr(bench, "_build_method", fake)
    args = _args(["--quick"])
    args.scale, args.tokens, args.steps = 1 / 64, [16], 1
    case = bench.run_case("llama_mlp", 16, 4, "fp32", ["lora", "sqft", "spp"], args)
    rows = {row["method"]: row for row in case["rows"]}
    assert rows["lora"]["status"] == "ok" and rows["lora"]["step_ms"] > 0
    assert rows["sqft"]["status"] == "unavailable: no backend here"
    assert rows["spp"]["status"] == "error: RuntimeError: boom"
    assert rows["sqft"]["step_ms"] is None and rows["lora"]["vs_sqft"] is None


def test_flop_formulas_are_given_to_the_counter_only():
    """The LoRS ops' FLOPs are counted without registering a formula in torch's global table."""
    from torch.utils.flop_counter import flop_registry

    model, hidden = bench.build_workload("llama_mlp", scale=1 / 64)
    bench.prune_(model, 0.5)
    apply_method(model, "lors", r=4)
    x = torch.randn(1, 8, hidden, requires_grad=True)
    assert bench._count_flops(model, x) > 0
    assert torch.ops.lors.sparse_lora_linear not in flop_registry
    assert torch.ops.aten.addmm_ not in flop_registry


@pytest.mark.usefixtures("fresh_dynamo")
def test_the_compiled_row_stays_compiled(monkeypatch):
    """Counting FLOPs traces the forward under a dispatch mode; on the model optimize() compiled
    in place that used to break the graph and run the row on the eager op for good."""
    from lors_fx import ops
    from lors_fx.compiler import compile_state_of
    from lors_fx.compiler.compilers import COMPILER_ENV, inductor_unavailable

    real, built = bench._build_method, {}
    monkeypatch.delenv(COMPILER_ENV, raising=False)  # the default compilers, as users run it

    def keep(method, *args):
        built[method] = real(method, *args)
        return built[method]

    monkeypatch.setattr(bench, "_build_method", keep)
    args = _args(["--quick"])
    args.scale, args.tokens, args.steps = 1 / 64, [16], 1
    case = bench.run_case("llama_mlp", 16, 4, "fp32", ["lora", "lors_fx_compiled"], args)
    rows = {row["method"]: row for row in case["rows"]}
    assert rows["lors_fx_compiled"]["status"] == "ok" and rows["lors_fx_compiled"]["flops"] > 0
    model = built["lors_fx_compiled"][0]
    state = compile_state_of(model)
    assert state.graphs and state.fallback is None
    if inductor_unavailable("cpu"):
        return  # the eager compilers run the op inside the graph: nothing more to tell apart
    calls, forward = [], ops._forward
    monkeypatch.setattr(ops, "_forward", lambda *a, **k: calls.append(1) or forward(*a, **k))
    model(torch.randn(1, 16, 64, requires_grad=True)).sum().backward()  # the case's x shape
    assert calls == [], [r.notes for r in state.graphs]  # inductor's lowered graphs, not the op
