"""Adapters: attach (targets, keys, freezing, errors that change nothing), forward vs the float64
reference (Linear and GPT-2 Conv1D, dropout), merge (outputs, bit-exact zero pattern), save/load."""
import dataclasses
import json
import math
import os

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from lors_fx import (LorsConfig, LorsConv1D, LorsLinear, attach_adapters, load_adapter_config,
                     load_adapters, merge, restore_adapters, save_adapters)
from lors_fx.adapters import lors_modules, reference_sparse_lora_dropout_form
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.state import state_of
from lors_fx.serialization import LORS_PEFT_TYPE
from lors_fx.testing.toy import build_toy_llama
from tests._toy import assert_unchanged, randomize_adapters, snapshot, sparse_mlp, tiny_gpt2

TOL64 = dict(rtol=1e-10, atol=1e-12)  # float64 op vs float64 reference


def test_attach_list_targets_keys_and_freezing(toy_llama):
    model = toy_llama
    weights = {n: m.weight for n, m in model.named_modules() if n.endswith(("q_proj", "v_proj"))}
    old_keys = list(model.state_dict())
    config = LorsConfig(r=4, target_modules=["q_proj", "v_proj"])
    names = attach_adapters(model, config)
    assert names == [f"model.layers.{i}.self_attn.{p}" for i in (0, 1)
                     for p in ("q_proj", "v_proj")]
    assert state_of(model).config is config
    keys = list(model.state_dict())
    assert [k for k in keys if "lora_" not in k] == old_keys  # base keys unchanged, same order
    assert sorted(k for k in keys if "lora_" in k) == sorted(
        f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))
    for name in names:
        module = model.get_submodule(name)
        assert isinstance(module, LorsLinear) and module.weight is weights[name]  # reused
        assert module.lora_A.shape == (4, 64) and module.lora_B.shape == (module.out_features, 4)
        assert torch.count_nonzero(module.lora_B) == 0 and torch.count_nonzero(module.lora_A) > 0
        assert module.scaling == config.scaling
        assert "r=4" in repr(module) and "sparsity=0.500" in repr(module)
        before = module.weight.detach().clone()
        module.reset_parameters()  # re-draws the adapter only, never the pruned base
        assert torch.equal(module.weight, before) and torch.count_nonzero(module.lora_B) == 0
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(trainable) == sorted(f"{n}.{p}" for n in names for p in ("lora_A", "lora_B"))


def test_attach_regex_and_auto_targets(toy_llama):
    model = toy_llama
    names = attach_adapters(model, LorsConfig(r=2, target_modules=r"model\.layers\.0\..*_proj"))
    assert len(names) == 7 and all(n.startswith("model.layers.0.") for n in names)
    model = build_toy_llama(seed=0)
    names = attach_adapters(model, LorsConfig(r=2, exclude_modules=["lm_head", "up_proj"]))
    assert len(names) == 12 and not any(n.endswith("up_proj") for n in names)
    # None: dense linears are skipped silently
    mlp = sparse_mlp()
    with torch.no_grad():
        mlp[2].weight.fill_(0.5)
    assert attach_adapters(mlp, LorsConfig(r=2)) == ["0", "4"]
    assert type(mlp[2]) is nn.Linear


def _int_weight_mlp():
    model = sparse_mlp(sizes=(8, 8, 8))
    model[0].weight = nn.Parameter(torch.randint(-2, 3, (8, 8), dtype=torch.int8) *
                                   (torch.arange(8) % 2).to(torch.int8), requires_grad=False)
    return model


def _dense_mlp():
    return sparse_mlp(sparsity=0.0)


BAD_INPUTS = [
    ("unknown", sparse_mlp, dict(target_modules=["0", "q_proj"]), ValueError, "unknown target"),
    ("dense", lambda: sparse_mlp(sparsity=0.1), dict(target_modules=["0"]), ValueError,
     r"dense .*0 \(0\.09"),
    ("none found", _dense_mlp, dict(), ValueError, "no target found"),
    ("regex none", sparse_mlp, dict(target_modules="nothing.*"), ValueError, "no target found"),
    ("int weight", _int_weight_mlp, dict(), TypeError, "target 0 has a torch.int8 weight"),
    ("r too big", lambda: sparse_mlp(sizes=(64, 128, 8)), dict(r=9), ValueError,
     "r=9 is larger than min.* of target 2"),
]


@pytest.mark.parametrize("label,build,fields,error,match", BAD_INPUTS,
                         ids=[b[0] for b in BAD_INPUTS])
def test_attach_bad_input_raises_and_changes_nothing(label, build, fields, error, match):
    model = build()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        attach_adapters(model, LorsConfig(**{"r": 2, **fields}))
    assert_unchanged(model, snap)


def test_attach_twice_raises_and_changes_nothing():
    model = sparse_mlp()
    attach_adapters(model, LorsConfig(r=2))
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="optimize called twice"):
        attach_adapters(model, LorsConfig(r=2))
    assert_unchanged(model, snap)


def _linear64(dropout=0.0, seed=0):
    model = sparse_mlp(sizes=(24, 16), seed=seed, dtype=torch.float64)
    attach_adapters(model, LorsConfig(r=3, lora_alpha=5.0, lora_dropout=dropout))
    randomize_adapters(model, seed)
    return model, model[0]


def _conv1d64(dropout=0.0):
    model = tiny_gpt2().double()
    attach_adapters(model, LorsConfig(r=3, lora_alpha=5.0, lora_dropout=dropout,
                                      target_modules=["c_attn", "c_fc"]))
    randomize_adapters(model, 1)
    return model, model.transformer.h[0].attn.c_attn


@pytest.mark.parametrize("emit_reference", [False, True])
@pytest.mark.parametrize("build", [_linear64, _conv1d64], ids=["linear", "conv1d"])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_forward_equals_reference_eval(build, dropout, emit_reference):
    model, module = build(dropout)
    model.eval()
    module.emit_reference = emit_reference
    weight = module.true_weight()
    x = torch.randn(2, 5, weight.shape[1], dtype=torch.float64)
    expected = reference_sparse_lora_linear(x, weight, module.lora_A, module.lora_B, module.bias,
                                            module.scaling)
    torch.testing.assert_close(module(x), expected, **TOL64)
    # The adapter matters: the plain base output differs.
    assert not torch.allclose(module(x), F.linear(x, weight, module.bias))


@pytest.mark.parametrize("emit_reference", [False, True])
@pytest.mark.parametrize("build", [_linear64, _conv1d64], ids=["linear", "conv1d"])
def test_training_dropout_form_equals_formula(build, emit_reference):
    model, module = build(0.3)
    model.train()
    module.emit_reference = emit_reference
    weight, s = module.true_weight(), module.scaling
    x = torch.randn(4, 7, weight.shape[1], dtype=torch.float64)
    torch.manual_seed(123)
    y = module(x)
    torch.manual_seed(123)
    dropped = F.dropout(x, 0.3, training=True)
    expected = F.linear(x, weight, module.bias) + F.linear(
        dropped, s * (module.lora_B @ module.lora_A) * (weight != 0))
    torch.testing.assert_close(y, expected, **TOL64)
    torch.manual_seed(123)
    torch.testing.assert_close(reference_sparse_lora_dropout_form(
        x, weight, module.lora_A, module.lora_B, module.bias, s, module.lora_dropout), expected,
        **TOL64)
    no_dropout = reference_sparse_lora_linear(x, weight, module.lora_A, module.lora_B,
                                              module.bias, s)
    assert not torch.allclose(y, no_dropout)  # dropout was active
    y.sum().backward()
    assert module.lora_A.grad is not None and module.weight.grad is None


def test_conv1d_keeps_layout_and_keys(gpt2):
    model = gpt2
    shapes = {k: v.shape for k, v in model.state_dict().items()}
    c_attn = model.transformer.h[0].attn.c_attn
    weight = c_attn.weight
    attach_adapters(model, LorsConfig(r=4, target_modules=["c_attn"]))
    module = model.transformer.h[0].attn.c_attn
    assert isinstance(module, LorsConv1D) and module.weight is weight
    assert module.lora_A.shape == (4, 32) and module.lora_B.shape == (96, 4)
    state = model.state_dict()
    assert {k: v.shape for k, v in state.items() if "lora_" not in k} == shapes


@pytest.mark.parametrize("build", [lambda: sparse_mlp(), lambda: tiny_gpt2()], ids=["mlp", "gpt2"])
def test_merge_matches_adapted_and_keeps_zero_pattern_bit_exact(build):
    model = build()
    original = {k: v.clone() for k, v in model.state_dict().items()}
    attach_adapters(model, LorsConfig(r=4))
    randomize_adapters(model, 3, scale=0.3)
    modules = lors_modules(model)
    model.eval()
    x = (torch.randn(3, 64) if isinstance(model, nn.Sequential)
         else {"input_ids": torch.randint(64, (2, 9))})
    run = (lambda: model(x)) if isinstance(x, torch.Tensor) else (lambda: model(**x).logits)
    with torch.no_grad():
        adapted = run()
    assert merge(model) is model
    assert not lors_modules(model) and state_of(model) is None
    with torch.no_grad():
        torch.testing.assert_close(run(), adapted, rtol=1e-5, atol=1e-5)
    for name in modules:
        key = f"{name}.weight"
        before, after = original[key], model.state_dict()[key]
        pruned = before == 0
        assert torch.equal(after == 0, pruned)  # no new nonzero, no kept weight lost
        assert torch.equal(after[pruned].view(torch.int32), before[pruned].view(torch.int32))
        assert not torch.equal(after, before)  # the update landed
    assert all(type(m).__name__ in ("Linear", "Conv1D") for n, m in model.named_modules()
               if n in modules)
    assert set(model.state_dict()) == set(original)


def test_merge_bf16_never_zeroes_a_kept_weight():
    model = sparse_mlp(sizes=(16, 8), dtype=torch.bfloat16)
    attach_adapters(model, LorsConfig(r=1, lora_alpha=1.0))
    module = model[0]
    weight = module.weight.detach().clone()
    with torch.no_grad():  # delta = -W on row 0 exactly: W' would be 0 at kept positions
        module.lora_B.zero_()
        module.lora_B[0, 0] = -1.0
        module.lora_A.copy_(weight[0:1])
    merge(model)
    assert torch.equal(model[0].weight != 0, weight != 0)


def test_merge_restores_requires_grad_and_errors_without_adapters():
    model = sparse_mlp()
    model[0].bias.requires_grad_(False)
    attach_adapters(model, LorsConfig(r=2))
    assert not model[2].weight.requires_grad
    merge(model)
    assert model[2].weight.requires_grad and not model[0].bias.requires_grad
    with pytest.raises(ValueError, match="merge: model has no LoRS adapters"):
        merge(model)


def test_files_from_earlier_versions_with_peft_type_lors_still_load(tmp_path):
    model = _optimized()
    randomize_adapters(model, 5)
    save_adapters(model, str(tmp_path))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    meta["peft_type"] = "LORS"  # what lors_fx wrote before the descriptive type
    (tmp_path / "adapter_config.json").write_text(json.dumps(meta))
    fresh = build_toy_llama(seed=0)
    restore_adapters(fresh, str(tmp_path))
    for name, module in lors_modules(model).items():
        assert torch.equal(module.lora_B, fresh.get_submodule(name).lora_B)


def _optimized(targets=None, r=4, seed=0):
    model = build_toy_llama(seed=seed)
    attach_adapters(model, LorsConfig(r=r, target_modules=targets))
    return model


def test_save_load_round_trip_bit_exact(tmp_path):
    model = _optimized()
    randomize_adapters(model, 5)
    written = save_adapters(model, str(tmp_path))
    tensors = load_file(os.path.join(tmp_path, "adapter_model.safetensors"))
    assert sorted(tensors) == sorted(f"base_model.model.{n}.{p}.weight" for n in written
                                     for p in ("lora_A", "lora_B"))
    meta = json.loads((tmp_path / "adapter_config.json").read_text())
    assert meta["peft_type"] == LORS_PEFT_TYPE and meta["target_modules"] == written
    assert meta["r"] == 4
    assert "lors_fx_version" in meta
    config = load_adapter_config(str(tmp_path))
    assert config.target_modules == written and config.r == 4
    fresh = build_toy_llama(seed=0)
    assert attach_adapters(fresh, config) == written
    assert load_adapters(fresh, str(tmp_path)) == written
    for name, module in lors_modules(model).items():
        other = fresh.get_submodule(name)
        assert torch.equal(module.lora_A, other.lora_A) and torch.equal(module.lora_B, other.lora_B)
    batch = {"input_ids": torch.randint(128, (2, 8))}
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, fresh(**batch).logits)


def test_load_errors_change_nothing(tmp_path):
    model = _optimized()
    randomize_adapters(model, 5)
    save_adapters(model, str(tmp_path / "good"))
    target = _optimized()
    snap = snapshot(target)
    # wrong targets
    with pytest.raises(ValueError, match="target modules differ"):
        load_adapters(_optimized(targets=["q_proj"]), str(tmp_path / "good"))
    # r differs
    with pytest.raises(ValueError, match="r=4 in file but 2"):
        load_adapters(_optimized(r=2), str(tmp_path / "good"))
    # one tensor of the wrong shape (all others fine): nothing is copied
    bad = tmp_path / "bad"
    bad.mkdir()
    tensors = load_file(str(tmp_path / "good" / "adapter_model.safetensors"))
    key = sorted(tensors)[-1]
    tensors[key] = torch.zeros(tensors[key].shape[0] + 1, tensors[key].shape[1])
    save_file(tensors, str(bad / "adapter_model.safetensors"))
    good_config = tmp_path / "good" / "adapter_config.json"
    (bad / "adapter_config.json").write_text(good_config.read_text())
    with pytest.raises(ValueError, match=rf"{key} has shape \(.*\) in the file but \(.*\) in "):
        load_adapters(target, str(bad))
    assert_unchanged(target, snap)
    # pickles are refused, as paths and as the only file in a directory
    pickle_dir = tmp_path / "pickle"
    pickle_dir.mkdir()
    torch.save({}, str(pickle_dir / "adapter_model.bin"))
    with pytest.raises(ValueError, match="refusing to load"):
        load_adapters(target, str(pickle_dir / "adapter_model.bin"))
    with pytest.raises(FileNotFoundError, match="pickle file"):
        load_adapters(target, str(pickle_dir))
    # a model without adapters
    with pytest.raises(ValueError, match="no LoRS adapters"):
        load_adapters(build_toy_llama(), str(tmp_path / "good"))
    assert_unchanged(target, snap)


def test_restore_adapters_of_a_gradient_init_run_needs_no_data(tmp_path):

    model = _optimized()
    randomize_adapters(model, 6)
    state_of(model).config = dataclasses.replace(state_of(model).config, init="gradient")
    save_adapters(model, str(tmp_path))
    assert load_adapter_config(str(tmp_path)).init == "gradient"  # the record is kept
    fresh = restore_adapters(build_toy_llama(seed=0), str(tmp_path))
    assert state_of(fresh).config.init == "zeros"
    for name, module in lors_modules(model).items():
        assert torch.equal(module.lora_A, fresh.get_submodule(name).lora_A)
        assert torch.equal(module.lora_B, fresh.get_submodule(name).lora_B)
    other = build_toy_llama(seed=0)
    del other.model.layers[1]
    with pytest.raises(ValueError, match="unknown target module"):
        restore_adapters(other, str(tmp_path))
    assert not lors_modules(other)  # a failed restore leaves the model as it was


@pytest.mark.parametrize("weight_dtype,option,expected", [
    (torch.float16, "float32", torch.float32),
    (torch.bfloat16, "float32", torch.float32),
    (torch.float32, "float32", torch.float32),
    (torch.float64, "float32", torch.float64),  # never narrower than the weight
    (torch.float16, "weight", torch.float16),
    (torch.bfloat16, "weight", torch.bfloat16),
    (torch.float64, "weight", torch.float64),
])
def test_adapter_dtype(weight_dtype, option, expected):
    """float32 adapters on half-precision bases by default (PEFT's autocast_adapter_dtype);
    ``adapter_dtype="weight"`` keeps the weight's dtype. Gradients come back in the adapters'
    dtype; the base stays as it was."""
    model = sparse_mlp(sizes=(16, 24, 8), dtype=weight_dtype)
    attach_adapters(model, LorsConfig(r=2, adapter_dtype=option))
    for module in lors_modules(model).values():
        assert module.lora_A.dtype == module.lora_B.dtype == expected
        assert module.weight.dtype == weight_dtype
    model(torch.randn(3, 16, dtype=weight_dtype)).float().sum().backward()
    for module in lors_modules(model).values():
        assert module.lora_A.grad.dtype == module.lora_B.grad.dtype == expected


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_llama_trains_adamw_steps_without_nan(dtype):
    """A float16 (bfloat16) tiny Llama with default adapters trains 6 AdamW steps: finite losses
    and adapters, the loss goes down. float16 adapters made NaN entries in one step (AdamW's
    eps=1e-8 is 0 in float16)."""
    from lors_fx import optimize
    from lors_fx.testing.toy import toy_batches

    model = build_toy_llama(seed=0).to(dtype)
    optimize(model, LorsConfig(r=4), compile=False)
    params = [p for p in model.parameters() if p.requires_grad]
    assert params and all(p.dtype == torch.float32 for p in params)
    optimizer = torch.optim.AdamW(params, lr=1e-2)
    batch = toy_batches(1, batch_size=4, seq_len=16, seed=3)[0]
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        assert all(p.grad.dtype == torch.float32 for p in params)
        optimizer.step()
        losses.append(loss.item())
        assert all(bool(torch.isfinite(p).all()) for p in params), f"NaN after {len(losses)}"
    assert all(map(math.isfinite, losses)) and losses[-1] < losses[0], losses
