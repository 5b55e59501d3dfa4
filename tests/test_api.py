"""optimize() on the eager path: long training never breaks the zero pattern, merge equals the
adapted model, a tiny Llama trains end to end in both gradient modes, bad calls change nothing."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lors_fx import LorsConfig, audit, is_optimized, lors_modules, merge, optimize, snapshot_masks
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.state import state_of
from lors_fx.testing.toy import toy_batches
from tests._toy import assert_unchanged, snapshot, sparse_mlp


def _pruned_positions_of_effective_weights(model):
    """Count pruned positions where W' = W + s*(B@A)*M (the reference form, float64) is nonzero."""
    count = 0
    for module in lors_modules(model).values():
        weight = module.true_weight().detach().double()
        eye = torch.eye(weight.shape[1], dtype=torch.float64)
        w_eff = reference_sparse_lora_linear(eye, weight, module.lora_A.detach().double(),
                                             module.lora_B.detach().double(), None,
                                             module.scaling).t()
        count += int(((w_eff != 0) & (weight == 0)).sum())
    return count


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_200_adamw_steps_keep_the_zero_pattern(grad_mode):
    model = sparse_mlp(sizes=(64, 128, 96, 32), seed=1)
    masks = snapshot_masks(model)
    base = {k: v.clone() for k, v in model.state_dict().items()}
    optimize(model, LorsConfig(r=8, grad_mode=grad_mode, lora_dropout=0.1), compile=False)
    assert is_optimized(model) and len(lors_modules(model)) == 3
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2,
                                  weight_decay=0.01)
    generator = torch.Generator().manual_seed(0)
    x_all = torch.randn(256, 64, generator=generator)
    teacher = torch.randn(64, 32, generator=generator) / 8
    y_all = torch.tanh(x_all @ teacher)
    first = None
    for step in range(200):
        index = torch.randint(256, (32,), generator=generator)
        loss = F.mse_loss(model(x_all[index]), y_all[index])
        first = loss.item() if first is None else first
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 40 == 39:
            assert _pruned_positions_of_effective_weights(model) == 0
            merged_copy = merge(copy.deepcopy(model))
            assert audit(merged_copy, masks).ok
    # frozen base: bit-identical, never got a gradient
    for key, value in base.items():
        assert torch.equal(model.state_dict()[key], value), key
    assert all(m.weight.grad is None for m in lors_modules(model).values())
    model.eval()
    with torch.no_grad():
        final = F.mse_loss(model(x_all), y_all).item()
        adapted = model(x_all)
    assert final < 0.75 * first
    merge(model)
    result = audit(model, masks)
    assert result.ok and result.checked == 3, result.summary()
    with torch.no_grad():
        torch.testing.assert_close(model(x_all), adapted, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_tiny_llama_end_to_end_eager(grad_mode, toy_llama):
    model = toy_llama
    masks = snapshot_masks(model)
    optimize(model, LorsConfig(r=8, lora_alpha=16.0, grad_mode=grad_mode), compile=False)
    assert len(lors_modules(model)) == 14  # 2 layers x 7 projections; lm_head excluded
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = toy_batches(1, seed=3)[0]
    model.train()
    losses = []
    for _ in range(6):
        loss = model(**batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1, losses
    merge(model)
    assert audit(model, masks).ok


def test_optimize_twice_raises_and_changes_nothing():
    model = sparse_mlp()
    optimize(model, LorsConfig(r=2), compile=False)
    snap = snapshot(model)
    with pytest.raises(RuntimeError, match="optimize called twice"):
        optimize(model, LorsConfig(r=2), compile=False)
    assert_unchanged(model, snap)


@pytest.mark.parametrize("config,kwargs,error,match", [
    (LorsConfig(r=2, init="gradient"), {}, ValueError, "needs init_data"),
    (LorsConfig(r=2), {"init_data": [torch.zeros(2, 64)]}, ValueError, "only used with"),
    ("r=2", {}, TypeError, "config must be a LorsConfig"),
    (LorsConfig(r=2, init="gradient"), {"init_data": [torch.zeros(2, 64)]}, TypeError,
     "need loss_fn"),  # fails inside gradient_init: the adapters are rolled back
], ids=["gradient-without-data", "data-without-gradient", "config-not-LorsConfig",
        "failure-inside-init"])
def test_optimize_bad_calls_change_nothing(config, kwargs, error, match):
    model = sparse_mlp()
    snap = snapshot(model)
    with pytest.raises(error, match=match):
        optimize(model, config, compile=False, **kwargs)
    assert_unchanged(model, snap)
    assert not is_optimized(model)


def test_compiled_optimize_then_merge_restores_the_eager_forward():
    model = sparse_mlp(sizes=(32, 48, 16))
    x = torch.randn(4, 32)
    optimize(model, LorsConfig(r=4), compile=True)
    assert "forward" in model.__dict__  # compile_model installed its forward
    with torch.no_grad():
        for module in lors_modules(model).values():
            module.lora_B.normal_()
    y = model(x)
    y.sum().backward()
    assert all(m.lora_A.grad is not None for m in lors_modules(model).values())
    merge(model)
    assert "forward" not in model.__dict__ and not is_optimized(model)
    torch.testing.assert_close(model(x), y.detach(), rtol=1e-5, atol=1e-5)


def _plant(model, value, name="lora_A", module_name=None):
    """Put ``value`` in one entry of one adapter (of the first adapted module by default);
    returns the module's name."""
    module_name = module_name or next(iter(lors_modules(model)))
    with torch.no_grad():
        getattr(lors_modules(model)[module_name], name)[0, 1] = value
    return module_name


def _assert_same_bits(model, state):
    """Every state_dict tensor has the same bits (NaN included) as in ``state``."""
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype, key
        assert torch.equal(now[key].view(torch.int32), value.view(torch.int32)), key


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_merge_refuses_non_finite_adapters_and_changes_nothing(compile, value):
    """A diverged adapter would write NaN/inf weights: merge names the module and changes
    nothing (weights, modules, flags, state, the compiled forward)."""
    model = sparse_mlp(sizes=(32, 48, 16))
    optimize(model, LorsConfig(r=4), compile=compile)
    bad = _plant(model, value, "lora_B")
    state, types, flags, attrs = snapshot(model)
    with pytest.raises(FloatingPointError, match=rf"merge: non-finite adapter .*{bad} \(1\)"):
        merge(model)
    _assert_same_bits(model, state)
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert state_of(model) is attrs
    assert ("forward" in model.__dict__) == compile and is_optimized(model)
    with torch.no_grad():
        getattr(lors_modules(model)[bad], "lora_B")[0, 1] = 0.0
    merge(model)
    assert not is_optimized(model)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_a_nan_adapter_makes_the_loss_nan(compile, toy_llama):
    """One NaN in one lora_A: the loss is NaN, so a training loop can stop. It used to be scrubbed
    to 0 inside W': a finite, flat loss while every adapter went NaN. (An MLP projection: CPU
    SDPA returns finite outputs for a NaN in q, so q_proj would not show it in the loss.)"""
    model = toy_llama
    optimize(model, LorsConfig(r=4), compile=compile)
    batch = toy_batches(1, batch_size=2, seq_len=8, seed=1)[0]
    assert torch.isfinite(model(**batch).loss)
    bad = _plant(model, float("nan"), module_name="model.layers.0.mlp.down_proj")
    loss = model(**batch).loss
    assert torch.isnan(loss)
    loss.backward()
    assert torch.isnan(lors_modules(model)[bad].lora_B.grad).any()


def test_restore_adapters_from_a_file_without_adapter_dtype(tmp_path):
    """An adapter_config.json written before ``adapter_dtype`` existed (float16 adapters of a
    float16 model) restores with the default: float32 adapters holding the same values."""
    import json

    from lors_fx import restore_adapters, save_adapters

    model = sparse_mlp(sizes=(32, 48, 16), dtype=torch.float16)
    optimize(model, LorsConfig(r=4, adapter_dtype="weight"), compile=False)
    with torch.no_grad():
        for module in lors_modules(model).values():
            module.lora_B.normal_()
    save_adapters(model, str(tmp_path))
    config_path = tmp_path / "adapter_config.json"
    saved = json.loads(config_path.read_text())
    del saved["adapter_dtype"]
    config_path.write_text(json.dumps(saved))
    fresh = sparse_mlp(sizes=(32, 48, 16), dtype=torch.float16)
    restore_adapters(fresh, str(tmp_path))
    for name, module in lors_modules(fresh).items():
        trained = lors_modules(model)[name]
        for part in ("lora_A", "lora_B"):
            assert getattr(module, part).dtype == torch.float32
            assert torch.equal(getattr(module, part), getattr(trained, part).float())
