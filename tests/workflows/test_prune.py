"""lors_fx.workflows.prune: exact sparsity/patterns, what is never pruned, and that the calibrated methods
reconstruct a layer's output better than magnitude pruning (tiny random Llama, CPU, seconds)."""
from __future__ import annotations

import argparse
import copy
import json
import math

import pytest
import torch
from torch import nn

from lors_fx.cli.prune import add_prune_arguments, prune_main
from lors_fx.workflows.prune import find_blocks, magnitude_prune_, prune_model
from lors_fx.sparsity import detect_nm

METHODS = ("magnitude", "wanda", "sparsegpt")


def tiny_llama(seed=0, tie=False, outliers=True):
    """Tiny random Llama; with ``outliers`` the RMSNorm gains are log-normal, so a few input
    channels of every projection carry most of the activation norm (as in real LLMs)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=64, use_cache=False, tie_word_embeddings=tie)
    model = LlamaForCausalLM(config).eval()
    if outliers:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("layernorm.weight"):
                    param.copy_(torch.exp(1.5 * torch.randn(param.shape)))
    return model


def calibration(seed=1, n=8, length=32):
    return torch.randint(128, (n, length), generator=torch.Generator().manual_seed(seed))


def linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("pattern", [None, "2:4", "4:8"])
def test_exact_sparsity_and_untouched_modules(method, pattern):
    model = tiny_llama()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = prune_model(model, method, pattern=pattern, calibration=calibration(), progress=False)
    targets = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)} - {"lm_head"}
    assert {r.name for r in rows} == targets and len(rows) == 14
    for name, module in model.named_modules():
        if name not in targets:
            continue
        weight = module.weight
        if pattern is None:
            assert (weight == 0).sum().item() == weight.numel() // 2, name
            if method != "sparsegpt":  # magnitude and Wanda: exactly floor(s * d_in) per row
                assert ((weight == 0).sum(1) == weight.shape[1] // 2).all(), name
            assert detect_nm(weight) is None
        else:
            n, m = map(int, pattern.split(":"))
            groups = (weight != 0).reshape(weight.shape[0], -1, m).sum(-1)
            assert (groups == n).all(), name  # exactly N nonzeros in every group
            assert detect_nm(weight) == ("2:4" if pattern == "2:4" else "4:8")
    after = model.state_dict()
    for key, value in before.items():
        if not any(key == f"{t}.weight" for t in targets):
            assert torch.equal(after[key], value), key  # lm_head, embeddings, norms
    if method != "sparsegpt":  # kept weights keep their values; SparseGPT updates them
        for key, value in before.items():
            if key.endswith("proj.weight"):
                kept = after[key] != 0
                assert torch.equal(after[key][kept], value[kept])


@pytest.mark.parametrize("method", METHODS)
def test_unstructured_floor_rule(method):
    model = tiny_llama()
    prune_model(model, method, sparsity=0.3, calibration=calibration(), progress=False)
    weight = model.model.layers[1].mlp.down_proj.weight  # 64 x 128
    if method == "sparsegpt":
        assert (weight == 0).sum().item() == math.floor(0.3 * weight.numel())
    else:
        assert ((weight == 0).sum(1) == math.floor(0.3 * 128)).all()


def _dense_inputs(model, module, ids):
    seen = []
    handle = module.register_forward_hook(lambda m, i, o: seen.append(i[0].detach()))
    with torch.no_grad():
        model(input_ids=ids)
    handle.remove()
    return torch.cat([x.reshape(-1, x.shape[-1]) for x in seen])


def _relative_error(x, dense_weight, pruned_weight):
    dense_weight, pruned_weight = dense_weight.detach(), pruned_weight.detach()
    return float((x @ (dense_weight - pruned_weight).T).norm() / (x @ dense_weight.T).norm())


@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_wanda_and_sparsegpt_reconstruct_better_than_magnitude(pattern):
    base = tiny_llama()
    ids = calibration()
    errors = {}
    for name in ("self_attn.q_proj", "mlp.gate_proj"):
        layer = base.model.layers[0].get_submodule(name)
        x = _dense_inputs(base, layer, ids)
        for method in METHODS:
            model = copy.deepcopy(base)
            prune_model(model, method, pattern=pattern, calibration=ids, progress=False)
            pruned = model.model.layers[0].get_submodule(name).weight
            errors[name, method] = _relative_error(x, layer.weight, pruned)
    for name in ("self_attn.q_proj", "mlp.gate_proj"):
        assert errors[name, "wanda"] < 0.8 * errors[name, "magnitude"], errors
        assert errors[name, "sparsegpt"] < 0.8 * errors[name, "magnitude"], errors


def test_sparsegpt_compensates_correlated_inputs():
    """Correlated inputs without outlier channels (Wanda ~ magnitude here): SparseGPT's OBS
    updates of the kept weights cancel most of the pruning error."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 32))
    x = torch.randn(512, 8) @ torch.randn(8, 64) + 0.1 * torch.randn(512, 64)
    dense = model[0].weight.detach().clone()
    errors = {}
    for method in METHODS:
        for pattern in (None, "2:4"):
            pruned = copy.deepcopy(model)
            prune_model(pruned, method, pattern=pattern, calibration=list(x.split(128)),
                        exclude=(), progress=False)
            errors[method, pattern] = _relative_error(x, dense, pruned[0].weight)
    for pattern in (None, "2:4"):
        assert errors["sparsegpt", pattern] < 0.5 * errors["magnitude", pattern], errors
        assert errors["sparsegpt", pattern] < 0.5 * errors["wanda", pattern], errors


def test_blockwise_calibration_matches_sequential_whole_model_reference():
    """Block i is calibrated on the outputs of the already-pruned blocks before it: the same
    masks as hooking the whole (partly pruned) model once per block."""
    base = tiny_llama()
    ids = calibration()
    fast = copy.deepcopy(base)
    prune_model(fast, "wanda", calibration=ids, progress=False)
    reference = copy.deepcopy(base)
    for block in reference.model.layers:
        linears = {n: m for n, m in block.named_modules() if isinstance(m, nn.Linear)}
        norms = {n: torch.zeros(m.in_features) for n, m in linears.items()}

        def accumulate(module, inputs, output, name):
            norms[name] += inputs[0].reshape(-1, inputs[0].shape[-1]).pow(2).sum(0)

        handles = [m.register_forward_hook(lambda mod, i, o, n=n: accumulate(mod, i, o, n))
                   for n, m in linears.items()]
        with torch.no_grad():
            reference(input_ids=ids)
        for handle in handles:
            handle.remove()
        for n, m in linears.items():
            scores = m.weight.abs() * norms[n].sqrt()
            k = m.in_features // 2
            with torch.no_grad():
                m.weight.scatter_(1, scores.topk(k, dim=1, largest=False).indices, 0.0)
    for (name, a), (_, b) in zip(fast.named_parameters(), reference.named_parameters()):
        assert torch.equal(a != 0, b != 0), name


def test_whole_model_fallback_without_blocks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 16))
    assert find_blocks(model) is None
    scales = torch.exp(2 * torch.randn(32))
    x = torch.randn(256, 32) * scales
    dense = model[0].weight.detach().clone()
    errors = {}
    for method in METHODS:
        pruned = copy.deepcopy(model)
        rows = prune_model(pruned, method, calibration=[x[:128], x[128:]], exclude=(),
                           progress=False)
        assert [r.sparsity for r in rows] == [0.5, 0.5]
        errors[method] = _relative_error(x, dense, pruned[0].weight)
    assert errors["wanda"] < 0.8 * errors["magnitude"], errors
    assert errors["sparsegpt"] < 0.8 * errors["magnitude"], errors


def test_magnitude_prune_tensor_linear_model_and_conv1d():
    weight = torch.randn(8, 16)
    original = weight.clone()
    assert magnitude_prune_(weight, 0.25) is weight
    assert ((weight == 0).sum(1) == 4).all()
    kept_min = weight.abs().masked_fill(weight == 0, float("inf")).min(1).values
    pruned_max = original.abs().masked_fill(weight != 0, 0).max(1).values
    assert (pruned_max <= kept_min).all()  # the smallest |W| of each row went
    linear = nn.Linear(16, 4)
    assert magnitude_prune_(linear, pattern="2:4") == {"": 0.5}
    assert detect_nm(linear.weight) == "2:4"
    model = tiny_llama(outliers=False)
    result = magnitude_prune_(model, 0.5)
    assert len(result) == 14 and set(result.values()) == {0.5}
    assert (model.lm_head.weight != 0).all()

    from transformers.pytorch_utils import Conv1D
    conv = Conv1D(nf=4, nx=16)  # weight stored (d_in=16, d_out=4)
    nn.init.normal_(conv.weight)
    magnitude_prune_(conv, pattern="2:4")
    assert detect_nm(conv.weight.t()) == "2:4"


def test_bfloat16_sparsegpt_keeps_exact_counts():
    model = tiny_llama().to(torch.bfloat16)
    prune_model(model, "sparsegpt", pattern="2:4", calibration=calibration(), progress=False)
    for layer in model.model.layers:
        weight = layer.mlp.down_proj.weight
        assert weight.dtype == torch.bfloat16
        assert ((weight != 0).reshape(weight.shape[0], -1, 4).sum(-1) == 2).all()


def test_errors_name_the_argument():
    model = tiny_llama(outliers=False)
    with pytest.raises(ValueError, match="method"):
        prune_model(model, "random", progress=False)
    with pytest.raises(ValueError, match="pattern"):
        prune_model(model, "magnitude", pattern="4:2", progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, "magnitude", sparsity=0.3, pattern="2:4", progress=False)
    with pytest.raises(ValueError, match="sparsity"):
        prune_model(model, "magnitude", sparsity=1.0, progress=False)
    with pytest.raises(ValueError, match="calibration"):
        prune_model(model, "wanda", progress=False)
    with pytest.raises(ValueError, match="targets"):
        prune_model(model, "magnitude", targets=["no_such_proj"], progress=False)
    with pytest.raises(ValueError, match="pattern"):
        magnitude_prune_(nn.Linear(6, 3), pattern="2:4")
    tied = tiny_llama(tie=True, outliers=False)
    with pytest.raises(ValueError, match="tied"):
        prune_model(tied, "magnitude", exclude=(), progress=False)
    assert all((p != 0).all() for n, p in model.named_parameters() if n.endswith("proj.weight"))


def test_prune_subcommand_saves_an_exactly_sparse_model(tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    source, out = tmp_path / "dense", tmp_path / "pruned"
    tiny_llama(outliers=False).save_pretrained(source)
    parser = argparse.ArgumentParser()
    add_prune_arguments(parser)
    args = parser.parse_args([str(source), "--method", "magnitude", "--pattern", "2:4",
                              "--out", str(out), "--no-progress"])
    assert prune_main(args) == 0
    printed = capsys.readouterr().out
    assert "model.layers.1.mlp.down_proj" in printed and "2:4" in printed
    reloaded = AutoModelForCausalLM.from_pretrained(out)
    for name, module in reloaded.named_modules():
        if name.endswith("proj"):
            assert detect_nm(module.weight) == "2:4", name
    assert (reloaded.lm_head.weight != 0).all()

    args = parser.parse_args([str(out), "--method", "magnitude", "--sparsity", "0.75", "--json",
                              "--no-progress"])
    assert prune_main(args) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["sparsity"] == 0.75 and len(report["rows"]) == 14
    # already-zero weights score lowest, so the 75% mask lies inside the old 2:4 one
    assert {row["pattern"] for row in report["rows"]} == {"2:4"}


@pytest.mark.parametrize("method", ["wanda", "sparsegpt"])
def test_gpt2_conv1d_blocks_pruned_along_the_true_input_dim(method):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, vocab_size=64,
                                       n_positions=32, bos_token_id=0, eos_token_id=0,
                                       use_cache=False)).eval()
    embeddings = model.transformer.wte.weight.detach().clone()
    rows = prune_model(model, method, pattern="2:4", calibration=torch.randint(64, (4, 16)),
                       progress=False)
    assert len(rows) == 8 and {r.pattern for r in rows} == {"2:4"}
    assert {r.sparsity for r in rows} == {0.5}
    assert torch.equal(model.transformer.wte.weight, embeddings)  # tied lm_head never pruned
    conv = model.transformer.h[1].mlp.c_proj  # weight stored (d_in, d_out)
    assert detect_nm(conv.weight.t()) == "2:4"
