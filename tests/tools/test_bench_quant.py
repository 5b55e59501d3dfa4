"""tools/bench_quant.py and tools/quant_quality.py, quick runs on a tiny Llama: the JSON fields and
rows exist and the values are sane (finite, positive; exact byte counts; the audit). No timings."""
from __future__ import annotations

import copy
import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from lors_fx.quant import QuantSpec, pack_codes
from lors_fx.quantized import quantize_model, quantized_modules
from lors_fx.sparsity import snapshot_masks
from lors_fx.testing.tiny_models import build_model

ROOT = Path(__file__).resolve().parents[2]


def _tool(name):
    spec = importlib.util.spec_from_file_location(f"_tool_{name}", ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def _finite_positive(value):
    return isinstance(value, (int, float)) and math.isfinite(value) and value > 0


@pytest.fixture(scope="module")
def bench_quant():
    return _tool("bench_quant")


@pytest.fixture(scope="module")
def bench_result(bench_quant, tmp_path_factory):
    path = tmp_path_factory.mktemp("bench_quant") / "out.json"
    result = bench_quant.main(["--quick", "--dtypes", "fp32", "bf16", "--json", str(path)])
    return result, json.loads(path.read_text())


def test_bytes_are_exact(bench_result):
    result, on_disk = bench_result
    for data in (result, on_disk):
        sizes = {(s["weights"].split()[0], s["grid"]): s for s in data["bytes"]}
        # codes (half a byte / a byte) + one bf16 scale per group, over 2 bytes per weight
        assert sizes[("SmolLM2-135M", "int4 g64")]["vs_bf16"] == pytest.approx((0.5 + 2 / 64) / 2)
        assert sizes[("SmolLM2-135M", "int8 g64")]["vs_bf16"] == pytest.approx((1 + 2 / 64) / 2)
        assert sizes[("Llama-7B", "int4 g128")]["vs_bf16"] == pytest.approx((0.5 + 2 / 128) / 2)
        # 576 is not a multiple of 128: no g128 grid for SmolLM2
        assert sizes[("SmolLM2-135M", "int4 g128")]["bytes"] is None
        assert sizes[("SmolLM2-135M", "int4 g64")]["holds"] is True
        assert sizes[("Llama-7B", "int8 g128")]["holds"] is True


def test_step_rows(bench_result, bench_quant):
    result, on_disk = bench_result
    assert on_disk["schema"] == "lors_fx.bench_quant/1"
    rows = {(r["row"], r["dtype"]): r for r in result["steps"]}
    assert set(rows) == {(name, d) for name in bench_quant.ROWS for d in ("fp32", "bf16")}
    for (name, dtype), row in rows.items():
        if name == "qlora@nf4" and row["status"].startswith("unavailable"):
            continue  # bitsandbytes is optional
        assert row["status"] == "ok", (name, dtype, row["status"])
        for key in ("step_ms", "vs_lors", "loss", "trainable_params", "base_bytes",
                    "base_vs_bf16", "model_bytes", "optimizer_state_bytes", "saved_bytes",
                    "step_peak_bytes", "total_peak_bytes"):
            assert _finite_positive(row[key]), (name, dtype, key, row[key])
        assert row["total_peak_bytes"] == (row["model_bytes"] + row["optimizer_state_bytes"]
                                           + row["step_peak_bytes"])
    for dtype in ("fp32", "bf16"):
        lors, int4 = rows[("lors", dtype)], rows[("lors@int4", dtype)]
        naive = rows[("naive@int4", dtype)]
        assert lors["vs_lors"] == pytest.approx(1.0)
        assert int4["base_bytes"] < rows[("lors@int8", dtype)]["base_bytes"] < lors["base_bytes"]
        assert int4["trainable_params"] == lors["trainable_params"] == naive["trainable_params"]
        # the op saves x only: as much as on the float base; the naive form also keeps W'
        assert int4["saved_bytes"] == lors["saved_bytes"] < naive["saved_bytes"]
    # scales in the compute dtype: bf16 scales, group 32
    assert rows[("lors@int4", "bf16")]["base_vs_bf16"] == pytest.approx((0.5 + 2 / 32) / 2)


def test_gradient_checkpointing_rows_save_less(bench_quant, bench_result):
    """``--gradient-checkpointing`` turns HF's activation checkpointing on in every row: the LoRS
    rows then save less for backward than without it, and the same on int4 as on the float base."""
    result = bench_quant.main(["--quick", "--dtypes", "fp32", "--rows", "lors", "lors@int4",
                               "--gradient-checkpointing"])
    plain = {r["row"]: r for r in bench_result[0]["steps"] if r["dtype"] == "fp32"}
    rows = {r["row"]: r for r in result["steps"]}
    for name in ("lors", "lors@int4"):
        assert rows[name]["status"] == "ok", rows[name]["status"]
        assert rows[name]["saved_bytes"] < plain[name]["saved_bytes"], name
        assert rows[name]["loss"] == pytest.approx(plain[name]["loss"], rel=1e-5), name
    assert rows["lors@int4"]["saved_bytes"] == rows["lors"]["saved_bytes"]


def test_goals_listed(bench_result):
    goals = {g["goal"]: g for g in bench_result[0]["goals"]}
    assert "total peak, lors@int4 bf16 <= 0.5x lors bf16" in goals
    assert "step time, lors@int4 <= 1.25x lors (fp32)" in goals
    for goal in goals.values():
        assert _finite_positive(goal["ratio"])


@pytest.mark.parametrize("rounding", ["rtn", "keep", "plain"])
def test_quant_quality_quick(tmp_path, rounding):
    tool = _tool("quant_quality")
    path = tmp_path / "quality.json"
    result = tool.main(["--quick", "--rounding", rounding, "--json", str(path)])
    on_disk = json.loads(path.read_text())
    assert on_disk["schema"] == "lors_fx.quant_quality/1"
    assert on_disk["settings"]["group_size"] == 32 and on_disk["settings"]["steps"] == 2
    lost = result["quantization"]
    assert lost["kept_weights"] > 0 and 0 <= lost["rounded_to_zero"] < lost["kept_weights"]
    if rounding != "plain":  # the sparsity-aware rounding keeps every kept weight nonzero
        assert lost["rounded_to_zero"] == 0
    for key in ("dense", "pruned", "pruned_quantized"):
        assert _finite_positive(result["perplexity"][key])
    (seed,) = result["seeds"]
    qa, post = seed["qa_lors"], seed["lors_then_quantize"]
    for value in (qa["ppl_tuned"], qa["ppl_merged"], post["ppl_tuned_float"], post["ppl_rtn"],
                  post["ppl_base_grid"]):
        assert _finite_positive(value)
    # merged int4 == trained (QA), and the zero pattern and the grid are intact
    assert qa["merge_relative_difference"] <= tool.MERGE_TOLERANCE
    assert qa["audit_ok"] and qa["clean"] and qa["checked"] > 0
    assert qa["new_nonzeros"] == qa["lost_nonzeros"] == 0
    assert qa["codes_differ_from_mask"] == [] and qa["off_grid"] == []
    assert len(result["goals"]) == 4


def test_plain_rounding_prunes_what_rounds_to_zero():
    tool = _tool("quant_quality")

    model = build_model("llama")
    with torch.no_grad():  # one outlier per row: its group's small kept weights round to 0
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[1] >= 16:
                module.weight[:, 0] = 100.0
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules()
               if isinstance(m, torch.nn.Linear)}
    keep = copy.deepcopy(model)
    assert tool.quantize(keep, QuantSpec(4, 16), "keep") == 0
    lost = tool.quantize(model, QuantSpec(4, 16), "plain")
    assert lost > 0
    counted = 0
    for name, module in quantized_modules(model).items():
        codes, weight = module.codes, weights[name]
        assert not ((weight == 0) & (codes != 0)).any()  # never a new nonzero
        counted += int(((weight != 0) & (codes == 0)).sum())
        # keep: the same scales, and every kept weight nonzero (lifted to +-1 where it rounds to 0)
        other = quantized_modules(keep)[name]
        assert torch.equal(other.weight_scale, module.weight_scale)
        assert torch.equal(other.codes != 0, weight != 0)
    assert counted == lost


def test_audit_catches_a_broken_merge():
    tool = _tool("quant_quality")

    model = build_model("llama")
    masks = snapshot_masks(model)
    quantize_model(model, QuantSpec(4, 16))
    scales = {n: m.weight_scale.clone() for n, m in quantized_modules(model).items()}
    assert tool.audit_quantized(model, masks, scales, 4)["clean"]
    name, module = next(iter(quantized_modules(model).items()))
    module.weight_scale.mul_(1.5)  # another grid
    codes = module.codes
    codes[0][codes[0] == 0] = 1  # pruned positions made nonzero
    module.weight_packed.copy_(pack_codes(codes, 4))
    checks = tool.audit_quantized(model, masks, scales, 4)
    assert not checks["clean"] and checks["new_nonzeros"] > 0
    assert checks["codes_differ_from_mask"] == [name] and checks["off_grid"] == [name]
    assert torch.isfinite(module.weight).all()
