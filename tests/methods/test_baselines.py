"""Baselines: each wrapper computes its paper's formula, its gradients, and keeps (or breaks) M."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lors_fx.methods import (METHODS, SPARSITY_PRESERVING, FullSparseFT, LoraLinear, LorsOpLinear,
                             SppLinear, SqftLinear, apply_method, install_mask_reapply,
                             randomize_adapters_, saved_bytes, set_reference_mode,
                             trainable_parameters, wrapped_modules)

D_IN, D_OUT, R, ALPHA = 12, 40, 4, 8.0  # d_out=40, 16 SPP rows -> blocks of 3 rows, 14 blocks
S = ALPHA / R


def _sparse_linear(dtype=torch.float64, bias=True, seed=0):
    torch.manual_seed(seed)
    linear = nn.Linear(D_IN, D_OUT, bias=bias).to(dtype)
    with torch.no_grad():
        linear.weight[torch.rand(D_OUT, D_IN) < 0.5] = 0
    return linear


def _wrapper(method, dtype=torch.float64, bias=True):
    """A one-module model holding ``method``'s wrapper with random (non-zero) adapters."""
    model = nn.Sequential(_sparse_linear(dtype, bias))
    apply_method(model, method, r=R, alpha=ALPHA)
    randomize_adapters_(model, std=0.3, seed=1)
    return model[0]


def _formula(method, module, x):
    """Each method's forward written from its paper, independent of the wrapper's code."""
    W, b = module.weight, module.bias
    base = x @ W.t() + (0 if b is None else b)
    if method == "lora":
        return base + S * (x @ module.lora_A.t()) @ module.lora_B.t()
    if method in ("sqft", "lors", "lors_exact", "lors_keep"):
        w_eff = W + S * (module.lora_B @ module.lora_A) * (W != 0)
        return x @ w_eff.t() + (0 if b is None else b)
    if method.startswith("spp"):
        rows = torch.arange(D_OUT) // 3  # block of consecutive rows -> row of W_alpha
        delta = S * module.spp_beta * module.spp_alpha[rows] * W
        return base + x @ delta.t()
    assert method == "full_sparse_ft"
    return base


def _lors_closed_form_grads(module, x, g):
    """LoRS's paper gradient: dB = s g^T (x A^T), dA = s (g B)^T x (straight-through)."""
    x2, g2 = x.reshape(-1, D_IN), g.reshape(-1, D_OUT)
    return {"lora_A": S * (g2 @ module.lora_B).t() @ x2,
            "lora_B": S * g2.t() @ (x2 @ module.lora_A.t())}


@pytest.mark.parametrize("method", list(METHODS))
def test_forward_is_the_formula(method):
    module = _wrapper(method)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64)
    torch.testing.assert_close(module(x), _formula(method, module, x), rtol=0, atol=1e-10)


@pytest.mark.parametrize("method", list(METHODS))
def test_gradients_match_the_formula(method):
    module = _wrapper(method)
    x = torch.randn(2, 5, D_IN, dtype=torch.float64, requires_grad=True)
    g = torch.randn(2, 5, D_OUT, dtype=torch.float64)
    names = list(module.adapter_parameters())
    params = [getattr(module, n) for n in names]
    got = torch.autograd.grad(module(x), params + [x], g)
    if method in ("lors", "lors_keep"):
        expected = _lors_closed_form_grads(module, x, g)
        w_eff = module.weight + S * (module.lora_B @ module.lora_A) * (module.weight != 0)
        expected = [expected[n] for n in names] + [g @ w_eff]
    else:
        expected = torch.autograd.grad(_formula(method, module, x), params + [x], g)
    for name, a, b in zip(names + ["x"], got, expected):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10, msg=f"{method}: d{name}")


@pytest.mark.parametrize("method", list(METHODS))
def test_reference_mode_is_the_formula(method):
    module = _wrapper(method)
    x = torch.randn(3, D_IN, dtype=torch.float64)
    set_reference_mode(module)
    torch.testing.assert_close(module(x), _formula(method, module, x), rtol=0, atol=1e-10)


def _mlp(dtype=torch.float32):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(D_IN, D_OUT), nn.GELU(), nn.Linear(D_OUT, D_IN)).to(dtype)
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight[torch.rand_like(layer.weight) < 0.5] = 0
    return model


def _train(model, steps=4, lr=5e-2):
    optimizer = torch.optim.AdamW(trainable_parameters(model), lr=lr, weight_decay=0.1)
    install_mask_reapply(optimizer, model)
    for _ in range(steps):
        x = torch.randn(8, D_IN, dtype=next(model.parameters()).dtype)
        model(x).square().mean().backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("method", SPARSITY_PRESERVING)
def test_sparsity_kept_after_training_and_merge(method, dtype):
    model = _mlp(dtype)
    masks = {n: (m.weight != 0).clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear)}
    apply_method(model, method, r=R, alpha=ALPHA)
    randomize_adapters_(model, std=0.3)
    _train(model)
    for name, module in wrapped_modules(model).items():
        merged = module.merged_weight()
        assert torch.equal(merged != 0, masks[name]), f"{method}: merge changed the zero pattern"
        assert torch.equal(module.merge().weight != 0, masks[name])
        assert torch.equal(module.weight != 0, masks[name]), f"{method}: training changed M"
        if not isinstance(module, FullSparseFT):
            assert not torch.equal(merged, module.weight), f"{method}: the adapter did nothing"


def test_full_sparse_ft_changes_kept_weights_only():
    model = _mlp()
    before = copy.deepcopy(model)
    apply_method(model, "full_sparse_ft")
    _train(model)
    for layer, old in ((model[0], before[0]), (model[2], before[2])):
        assert isinstance(layer, FullSparseFT)
        assert torch.equal(layer.weight == 0, old.weight == 0)
        assert not torch.equal(layer.weight, old.weight)


def test_lora_merge_breaks_sparsity():
    model = _mlp()
    masks = [(model[i].weight != 0).clone() for i in (0, 2)]
    apply_method(model, "lora", r=R, alpha=ALPHA)
    randomize_adapters_(model, std=0.3)
    _train(model)
    for i, mask in zip((0, 2), masks):
        assert isinstance(model[i], LoraLinear) and not model[i].sparsity_preserving
        merged = model[i].merged_weight()
        assert (merged[~mask] != 0).any(), "LoRA's merged weight should fill pruned positions"
        assert torch.equal(model[i].weight != 0, mask)  # the base itself is frozen


def test_merge_returns_an_equivalent_linear():
    for method in METHODS:
        module = _wrapper(method)
        x = torch.randn(4, D_IN, dtype=torch.float64)
        torch.testing.assert_close(module.merge()(x), module(x), rtol=0, atol=1e-10)


def test_apply_method_targets_and_freezes():
    model = _mlp()
    names = apply_method(model, "sqft", r=R)
    assert names == ["0", "2"]
    assert all(isinstance(model[i], SqftLinear) for i in (0, 2))
    trainable = trainable_parameters(model)
    assert {id(p) for p in trainable} == {id(getattr(model[i], n)) for i in (0, 2)
                                          for n in ("lora_A", "lora_B")}
    assert model[0].scaling == pytest.approx(2.0)  # alpha defaults to 2r
    only = apply_method(_mlp(), "lors", r=R, target_modules=["2"])
    assert only == ["2"]


def test_apply_method_shares_the_base_weight():
    model = _mlp()
    weight = model[0].weight
    apply_method(model, "spp")
    assert model[0].weight is weight and isinstance(model[0], SppLinear)


def test_apply_method_errors():
    with pytest.raises(ValueError, match="unknown method"):
        apply_method(_mlp(), "dora")
    dense = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="no target"):
        apply_method(dense, "lors")
    with pytest.raises(ValueError, match="form"):
        SppLinear(_sparse_linear(), alpha=1.0, r=1, form="sparse")


def test_spp_forms_agree_and_checkpoint_saves_less():
    x_leaf = torch.randn(16, D_IN, dtype=torch.float64, requires_grad=True)
    outs, saved = {}, {}
    for method in ("spp", "spp_dense", "spp_ckpt"):
        module = _wrapper(method)
        outs[method] = module(x_leaf)
        saved[method] = saved_bytes(lambda: module(x_leaf * 1.0),
                                     list(module.parameters()) + [x_leaf])
    torch.testing.assert_close(outs["spp"], outs["spp_dense"], rtol=0, atol=1e-12)
    torch.testing.assert_close(outs["spp_ckpt"], outs["spp_dense"], rtol=0, atol=1e-12)
    assert saved["spp_ckpt"] < saved["spp_dense"]


def test_lors_op_saves_only_x_and_sqft_saves_a_dense_weight():
    x_leaf = torch.randn(16, D_IN, dtype=torch.float64, requires_grad=True)
    saved = {}
    for method in ("lors", "sqft"):
        module = _wrapper(method)
        saved[method] = saved_bytes(lambda: module(x_leaf * 1.0),
                                     list(module.parameters()) + [x_leaf])
    assert saved["lors"] == x_leaf.numel() * 8
    assert saved["sqft"] >= saved["lors"] + D_OUT * D_IN * 8
    assert isinstance(_wrapper("lors"), LorsOpLinear)
