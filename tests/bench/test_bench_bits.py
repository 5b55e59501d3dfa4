"""``lors-fx bench --bits``: LoRS rows on a quantized base beside the unquantized ones (never timing)."""
from __future__ import annotations

import argparse
import json
import math

import pytest
import torch

from lors_fx.bench import harness as bench
from lors_fx.bench.quant_rows import (NaiveQuantLinear, base_weight_bytes, build_quant_row,
                                      parse_group_size, parse_quant_row, quant_row_names)
from lors_fx.bench.workloads import build_workload, prune_
from lors_fx.cli import bench as cli_bench

QUANT_ROWS = ["lors@int4", "lors_qa@int4", "sqft@int4", "lors@int8", "lors_qa@int8", "sqft@int8"]


def _args(argv):
    return cli_bench.add_bench_arguments(argparse.ArgumentParser()).parse_args(argv)


def _finite_positive(value):
    return value is not None and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def quick_result(tmp_path_factory):
    path = tmp_path_factory.mktemp("bits") / "bits.json"
    result = cli_bench.bench_main(_args(["--quick", "--bits", "4", "8", "--group-size", "32",
                                         "--methods", "lora", "sqft", "--no-progress",
                                         "--json", str(path)]))
    return result, json.loads(path.read_text())


def test_rows_exist_beside_the_unquantized_ones(quick_result):
    result, on_disk = quick_result
    for data in (result, on_disk):
        assert set(bench.TOP_KEYS) <= set(data)
        assert data["args"]["bits"] == [4, 8] and data["args"]["group_size"] == 32
        rows = data["cases"][0]["rows"]
        # the lors row is added: the quantized rows' step ratio is to it
        assert [row["method"] for row in rows] == ["lora", "sqft", "lors"] + QUANT_ROWS


def test_values_are_sane(quick_result):
    rows = {row["method"]: row for row in quick_result[0]["cases"][0]["rows"]}
    for name in QUANT_ROWS + ["lors"]:
        row = rows[name]
        assert set(bench.ROW_KEYS) <= set(row)
        assert row["status"] == "ok", (name, row["status"])
        for key in ("step_ms", "vs_lors", "saved_bytes", "peak_bytes", "base_weight_bytes",
                    "base_vs_bf16", "flops", "trainable_params"):
            assert _finite_positive(row[key]), (name, key, row[key])
        # fp32 against the float64 formula of the same row
        assert row["rel_err_y"] < 1e-4 and row["rel_err_grad"] < 1e-4, (name, row)
    assert rows["lors"]["vs_lors"] == pytest.approx(1.0)
    # exact byte counts: codes (half a byte / one byte) + one fp32 scale per 32 inputs, no bias
    assert rows["lors@int4"]["base_vs_bf16"] == pytest.approx((0.5 + 4 / 32) / 2)
    assert rows["lors@int8"]["base_vs_bf16"] == pytest.approx((1 + 4 / 32) / 2)
    assert rows["lors"]["base_vs_bf16"] == pytest.approx(2.0)  # fp32 weights
    # the op saves x only, as on the float base (the codes are buffers, alive anyway); the
    # naive form also keeps W' (and the dequantized weight)
    assert rows["lors@int4"]["saved_bytes"] == rows["lors"]["saved_bytes"]
    assert rows["lors@int4"]["saved_bytes"] < rows["sqft@int4"]["saved_bytes"]
    assert rows["lors@int4"]["trainable_params"] == rows["lors"]["trainable_params"]


def test_quant_targets(quick_result):
    targets = quick_result[0]["quant_targets"]
    labels = {(t["row"], t["target"].split(" <=")[0]) for t in targets}
    assert ("lors@int4", "step") in labels and ("lors@int4", "base bytes") in labels
    assert ("sqft@int4", "step") not in labels  # the naive row is compared on memory only
    for target in targets:
        assert _finite_positive(target["ratio"]) and target["holds"] == (
            target["ratio"] <= target["bound"])


def test_a_group_that_does_not_divide_is_an_unavailable_row():
    args = _args(["--quick", "--bits", "4", "--group-size", "128", "--methods", "lors",
                  "--no-memory", "--no-progress"])
    args.steps = 1
    case = bench.run_case("llama_mlp", 16, 4, "fp32", ["lors", "lors@int4"], _set_quick(args))
    row = case["rows"][1]
    assert row["status"].startswith("unavailable") and "d_in=352" in row["status"]
    assert row["step_ms"] is None and case["rows"][0]["status"] == "ok"


def _set_quick(args):
    args.scale, args.layers, args.config, args.warmup = 1 / 32, None, None, 1
    return args


def test_options_are_checked():
    assert parse_group_size("channel") is None and parse_group_size("64") == 64
    for bad in ("0", "-8", "x"):
        with pytest.raises(ValueError, match="group-size"):
            parse_group_size(bad)
    with pytest.raises(SystemExit):
        _args(["--bits", "3"])
    with pytest.raises(SystemExit):
        _args(["--group-size", "0"])
    assert quant_row_names(None) == [] and parse_quant_row("lors") is None
    assert parse_quant_row("lors_qa@int8") == ("lors_qa", 8)


def test_rows_are_built_on_copies_per_channel():
    torch.manual_seed(0)
    base, hidden = build_workload("llama_mlp", 1 / 32)
    prune_(base, 0.5)
    naive = build_quant_row("sqft@int4", base, 4, 8.0, None)
    modules = [m for m in naive.modules() if isinstance(m, NaiveQuantLinear)]
    assert len(modules) == 3 and all(m.weight_scale.shape[1] == 1 for m in modules)
    assert all(type(m) is torch.nn.Linear for m in (base.gate_proj, base.up_proj, base.down_proj))
    assert base_weight_bytes(base) is None  # nothing adapted in the base itself
    x = torch.randn(2, 5, hidden)
    assert torch.isfinite(naive(x)).all()
