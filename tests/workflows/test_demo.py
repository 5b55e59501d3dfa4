"""`lors-fx demo`: the pieces on a toy model, and the real thing (SmolLM2-135M) for 2 steps."""
import json

import torch
from torch import nn

from lors_fx import cli
from lors_fx.cli import demo as cli_demo
from lors_fx.methods import wrapped_modules
from lors_fx.workflows.demo import measure_step, merge_model
from lors_fx.workflows.train import prepare_model

from lors_fx.testing.toy import build_toy_llama, toy_batches


def test_measure_step_lors_uses_less_memory_than_sqft():
    model = build_toy_llama(seed=0)
    batch = toy_batches(1, batch_size=2, seq_len=16, seed=1)[0]
    rows = {m: measure_step(model, m, batch, steps=1, r=4) for m in ("lors", "sqft")}
    assert rows["lors"]["trainable_params"] == rows["sqft"]["trainable_params"] > 0
    assert rows["lors"]["step_seconds"] > 0 and rows["sqft"]["step_seconds"] > 0
    # SQFT keeps a dense W' per adapted linear for backward; LoRS rebuilds it
    assert 0 < rows["lors"]["peak_bytes"] < rows["sqft"]["peak_bytes"]
    assert not any("lora" in n for n, _ in model.named_parameters())  # measured on copies


def test_merge_model_keeps_outputs_and_zeros_for_a_baseline():
    model = build_toy_llama(seed=0)
    zeros = {n: m.weight == 0 for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    prepare_model(model, "sqft", r=4)
    with torch.no_grad():
        for module in wrapped_modules(model).values():
            module.lora_B.normal_(0, 0.05)
    ids = toy_batches(1, batch_size=2, seq_len=12, seed=2)[0]["input_ids"]
    with torch.no_grad():
        before = model(input_ids=ids).logits
        merge_model(model)
        after = model(input_ids=ids).logits
    assert not wrapped_modules(model)
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-5)
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            assert torch.equal(module.weight == 0, zeros[name]), name


def test_failed_merge_check_exits_1(monkeypatch, capsys):
    summary = {"method": "lors", "audit_ok": True, "audit": "audit ok", "ppl_merged": 10.01,
               "ppl_tuned": 10.0, "merge_relative_difference": 1e-3}
    monkeypatch.setattr(cli_demo, "run_demo", lambda args: summary)
    monkeypatch.setattr(cli_demo, "format_summary", lambda s: "table")
    assert cli.main(["demo", "--steps", "1"]) == 1
    assert "FAILED: merged perplexity" in capsys.readouterr().err


def test_demo_two_steps_on_smollm2(tmp_path, capfd):
    """The README's first command, shrunk: SmolLM2-135M, Wanda 50%, LoRS 2 steps, merge; with
    --no-progress nothing but the table reaches the terminal (no bar: ours, the gradient init's,
    transformers'; no profiler line from the LoRS vs SQFT memory measurement)."""
    out = tmp_path / "demo.json"
    code = cli.main(["demo", "--steps", "2", "--seq-len", "32", "--batch-size", "1",
                     "--eval-tokens", "96", "--max-length", "48", "--calib-samples", "2",
                     "--init-samples", "1", "--compare-steps", "1", "--no-progress",
                     "--json", str(out)])
    printed = capfd.readouterr()
    assert code == 0, printed.err[-2000:]
    assert printed.err == "", printed.err[-2000:]
    assert "perplexity, merged" in printed.out
    data = json.loads(out.read_text())
    assert data["steps"] == 2 and data["method"] == "lors" and data["init"] == "gradient"
    assert data["audit_ok"] and data["new_nonzeros"] == 0 and data["lost_nonzeros"] == 0
    assert data["sparsity_before"] == data["sparsity_after"] == 0.5  # exact per-row Wanda
    assert data["ppl_pruned"] > data["ppl_dense"] > 1
    assert data["merge_relative_difference"] <= 1e-4
    assert data["eval"]["tokens"] > 0


def test_demo_bits_4_two_steps_on_smollm2(tmp_path, capfd):
    """`lors-fx demo --bits 4`, shrunk: Wanda 50% + int4 g64, QA-LoRS 2 steps, merged back to a
    sparse int4 model whose perplexity equals the trained one; the audit holds."""
    out = tmp_path / "demo.json"
    code = cli.main(["demo", "--bits", "4", "--steps", "2", "--seq-len", "32", "--batch-size",
                     "1", "--eval-tokens", "96", "--max-length", "48", "--calib-samples", "2",
                     "--init-samples", "1", "--compare-steps", "1", "--no-progress",
                     "--json", str(out)])
    printed = capfd.readouterr()
    assert code == 0, printed.err[-2000:]
    assert "int4 g64" in printed.out and "QA-LoRS" in printed.out
    data = json.loads(out.read_text())
    quantization = data["quantization"]
    assert quantization["bits"] == 4 and quantization["group_size"] == 64
    assert quantization["quantized_linears"] == data["quantized_layers_after_merge"] > 0
    assert quantization["linear_bytes_quantized"] / quantization["linear_bytes_float"] < 0.15
    assert data["audit_ok"] and data["new_nonzeros"] == 0 and data["lost_nonzeros"] == 0
    assert data["sparsity_before"] == data["sparsity_after"] == 0.5
    assert data["ppl_pruned"] != quantization["ppl_pruned_float"]
    assert data["merge_relative_difference"] <= 1e-4
    assert [row["method"] for row in data["compare"]] == ["lors", "qa-lors int4"]
