"""``lors-fx inspect --bits 4 --group-size 16``: the tiny model is quantized after pruning, its
sites are shown as quantized (bits, group size, QA) with the saved bytes, and the rewrite emits
``lors::quant_lora_linear``; --meta with --bits; bad quantization arguments exit 2."""
import contextlib
import io
import json
import re

import pytest

from lors_fx import LorsConfig, cli
from lors_fx.cli import inspect_meta
from lors_fx.quant import QuantSpec
from lors_fx.quantized import quantize_model, quantized_modules
from lors_fx.testing.tiny_models import build_model

SEQ = "12"  # batch 2 x 12 = 24 tokens: no activation shape collides with a weight shape
SITES = 14
QUANT_OP = "torch.ops.lors.quant_lora_linear.default("


def _main(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def quantized_run(tmp_path_factory):
    """tiny-llama quantized to int4 group 16, QA adapters: summary, sites, saved, diff, JSON."""
    path = tmp_path_factory.mktemp("inspect") / "out.json"
    code, out, err = _main(["inspect", "tiny-llama", "--bits", "4", "--group-size", "16",
                            "--quant-aware", "--seq", SEQ, "--r", "8", "--no-progress",
                            "--show", "summary,sites,saved,diff", "--json", str(path)])
    assert code == 0, err
    return {"out": out, "data": json.loads(path.read_text())}


def test_summary_says_quantized_and_rewritten_to_the_quantized_op(quantized_run):
    out = quantized_run["out"]
    assert f"{SITES} found, {SITES} rewritten to lors::quant_lora_linear" in out
    assert "quantized round-to-nearest to int4, group 16" in out
    assert re.search(r"rewrite_quantized_adapters \(graph 0\): matched 14", out)
    assert re.search(r"rewrite_masked_adapters \(graph 0\): matched 0", out)


def test_sites_view_shows_bits_group_qa_and_saved_bytes(quantized_run):
    out = quantized_run["out"]
    section = out[out.index(f"sites: {SITES}"):out.index("saved for backward, before")]
    assert "base" in section.splitlines()[1]
    rows = [line for line in section.splitlines() if line.startswith("model.layers.")]
    assert len(rows) == SITES
    for row in rows:
        # ... rank grad_mode rewritten base naive-saves lors-saves
        assert re.search(r"\s8\s+lors\s+yes\s+int4 g16 QA\s+\d+\s+\d+$", row), row


def test_json_sites_and_quantization(quantized_run):
    data = quantized_run["data"]
    assert data["quantization"] == {
        "applied": True, "method": "round-to-nearest", "bits": 4, "group_size": 16,
        "quant_aware": True, "note": data["quantization"]["note"]}
    assert data["config"]["quant_aware"] is True
    assert len(data["sites"]) == SITES
    for site in data["sites"]:
        assert (site["bits"], site["group_size"], site["quant_aware"], site["rewritten"]) == (
            4, 16, True, True)
        assert site["pattern"] == "unstructured" and site["sparsity"] == 0.5
        assert 0 < site["lors_saved_bytes"] < site["naive_saved_bytes"]


def test_saved_bytes_have_no_dense_weight_after_the_rewrite(quantized_run):
    data = quantized_run["data"]
    weights = {tuple(site["shape"]) for site in data["sites"]}

    def dense(rows):
        return [r for r in rows if r["kind"] != "parameter" and tuple(r["shape"][-2:]) in weights]

    saved = data["saved"]
    assert dense(saved["before"]) and dense(saved["after"]) == []
    assert 0 < saved["after_bytes"] < saved["before_bytes"]
    assert f"{saved['after_bytes']:,} B" in quantized_run["out"]


def test_graph_code_and_diff_show_the_quantized_op(quantized_run):
    data, out = quantized_run["data"], quantized_run["out"]
    assert data["code"]["forward"].count(QUANT_OP) == SITES
    assert "lors.dequantize" not in data["code"]["forward"]
    code = [line for line in data["code"]["diff_forward"].splitlines()
            if not line[1:].strip().startswith("#")]  # not the "# File: ..." comments
    added = [line for line in code if line.startswith("+")]
    removed = [line for line in code if line.startswith("-")]
    assert sum(QUANT_OP in line for line in added) == SITES
    assert sum("torch.ops.lors.dequantize(" in line for line in removed) == SITES
    assert f"one torch.ops.lors.quant_lora_linear call each ({SITES} of {SITES})" in out


def test_meta_with_bits_marks_the_theoretical_sites_quantized(tmp_path):
    path = tmp_path / "meta.json"
    code, out, err = _main(["inspect", "tiny-llama", "--meta", "--bits", "8", "--group-size",
                            "row", "--no-progress", "--show", "summary,sites",
                            "--json", str(path)])
    assert code == 0, err
    data = json.loads(path.read_text())
    assert data["quantization"]["bits"] == 8 and data["quantization"]["applied"] is False
    assert {(s["bits"], s["group_size"], s["quant_aware"]) for s in data["sites"]} == {
        (8, None, False)}
    assert out.count(" int8 ") == SITES and "nothing was quantized" in out


@pytest.mark.parametrize("argv,message", [
    (["--group-size", "16"], "only with --bits"),
    (["--quant-aware"], "only with --bits"),
    (["--bits", "3"], "--bits: expected 4 or 8"),
    (["--bits", "4", "--group-size", "7"], "must be even"),
    (["--bits", "4", "--group-size", "0"], "--group-size: must be an integer >= 1"),
    (["--bits", "4", "--group-size", "48"], "--bits/--group-size:"),  # 48 does not divide 64
])
def test_bad_quantization_arguments_exit_2_with_one_line(argv, message):
    code, out, err = _main(["inspect", "tiny-llama", "--no-progress"] + argv)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and message in err, err


def test_an_already_quantized_model_is_used_as_it_is():
    model = build_model("llama", num_hidden_layers=1)
    quantize_model(model, QuantSpec(8, 32))
    notes = []
    pruning = inspect_meta._prune_or_keep(model, LorsConfig(), 0.5, None, notes)
    entry = inspect_meta._quantize(model, LorsConfig(), QuantSpec(4, 16),
                                   lambda name: contextlib.nullcontext(), notes)
    assert pruning["applied"] is False and "zero codes are the sparsity" in pruning["note"]
    assert (entry["applied"], entry["bits"], entry["group_size"]) == (False, 8, 32)
    assert notes == ["--sparsity/--pattern ignored: the model is already quantized",
                     "--bits/--group-size ignored: the model is already quantized"]
    assert {m.bits for m in quantized_modules(model).values()} == {8}  # not re-quantized
