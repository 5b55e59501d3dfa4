"""QuantizedLinear and round-to-nearest quantize_model; LoRS adapters on a quantized base:
attach, train, merge back onto the grid (QA: bit-exact to what was trained), remove, bad input."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import lors_fx
from lors_fx import LorsConfig
from lors_fx.adapters import LorsQuantLinear, lors_modules
from lors_fx.quant import QuantSpec
from lors_fx.quantized import (QuantizedLinear, check_codes_match_mask, quantize_linear,
                               quantize_model, quantized_modules)
from lors_fx.sparsity import audit, snapshot_masks
from lors_fx.testing.tiny_models import build_model, random_batch


def _quantized_llama(bits=4, group=16, dtype=None):
    model = build_model("llama")
    if dtype is not None:
        model.to(dtype)
    masks = snapshot_masks(model)
    quantize_model(model, QuantSpec(bits, group))
    return model, masks


def _train(model, batch, steps=3):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.mark.parametrize("bits", [4, 8])
def test_quantize_model_keeps_the_mask_and_approximates_the_weights(bits):
    model = build_model("llama")
    dense = {n: m.weight.detach().clone() for n, m in model.named_modules()
             if isinstance(m, nn.Linear) and not n.endswith("lm_head")}
    names = quantize_model(model, QuantSpec(bits, 16))
    assert sorted(names) == sorted(dense)
    for name, module in quantized_modules(model).items():
        assert isinstance(module, QuantizedLinear)
        assert torch.equal(module.codes != 0, dense[name] != 0)
        step = module.weight_scale.repeat_interleave(16, dim=1)
        assert ((module.weight - dense[name]).abs() <= step).all()
    assert {"weight_packed", "weight_scale"} <= {k.rsplit(".", 1)[-1] for k in model.state_dict()}


def test_quantized_memory_is_a_quarter_of_bf16_at_group_128():
    linear = nn.Linear(512, 256, bias=False).to(torch.bfloat16)
    quantized = quantize_linear(linear, QuantSpec(4, 128))
    nbytes = sum(t.numel() * t.element_size() for t in quantized.state_dict().values())
    assert nbytes / (512 * 256 * 2) <= 0.27


def test_a_group_that_does_not_divide_changes_nothing():
    model = build_model("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="does not divide"):
        quantize_model(model, QuantSpec(4, 48))
    assert not quantized_modules(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_codes_and_mask_that_disagree_are_refused():
    codes = torch.tensor([[1, 0, -2, 0]], dtype=torch.int8)
    mask = torch.tensor([[True, True, True, False]])
    with pytest.raises(ValueError, match="1 kept weight.*code 0"):
        check_codes_match_mask(codes, mask, "q_proj")
    with pytest.raises(ValueError, match="disagree"):
        QuantizedLinear.from_codes(codes, torch.ones(1, 1), 4, mask=mask)
    with pytest.raises(ValueError, match=r"outside the 4-bit grid \[-8, 7\]"):
        QuantizedLinear.from_codes(codes * 8, torch.ones(1, 1), 4)
    with pytest.raises(ValueError, match="scales"):
        QuantizedLinear.from_codes(codes, torch.ones(2, 1), 4)


@pytest.mark.parametrize("quant_aware", [False, True])
@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_train_and_merge_onto_the_grid(quant_aware, grad_mode):
    model, masks = _quantized_llama()
    codes_before = {n: m.codes.clone() for n, m in quantized_modules(model).items()}
    lors_fx.optimize(model, LorsConfig(r=4, quant_aware=quant_aware, grad_mode=grad_mode),
                     compile=False)
    adapters = lors_modules(model)
    assert adapters and all(isinstance(m, LorsQuantLinear) for m in adapters.values())
    batch = random_batch()
    _train(model, batch)
    model.eval()
    with torch.no_grad():
        trained = model(**batch).logits
    lors_fx.merge(model)
    merged_layers = quantized_modules(model)
    assert all(isinstance(m, QuantizedLinear) for m in merged_layers.values())
    with torch.no_grad():
        merged = model(**batch).logits
    if quant_aware:  # the merged int4 model computes exactly what was trained
        assert torch.equal(trained, merged)
    assert audit(model, masks).ok
    changed = 0
    for name, module in merged_layers.items():
        assert torch.equal(module.codes != 0, codes_before[name] != 0)  # bit-exact pattern
        changed += int((module.codes != codes_before[name]).sum())
    assert changed > 0  # training moved codes


def test_adapters_reuse_the_buffers_and_remove_restores_them():
    model, _ = _quantized_llama()
    name, layer = next(iter(quantized_modules(model).items()))
    packed = layer.weight_packed
    lors_fx.optimize(model, LorsConfig(r=4), compile=False)
    adapter = lors_modules(model)[name]
    assert adapter.weight_packed is packed
    keys = set(model.state_dict())
    assert {f"{name}.weight_packed", f"{name}.weight_scale", f"{name}.lora_A",
            f"{name}.lora_B"} <= keys
    assert not any(p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    lors_fx.remove_adapters(model)
    restored = model.get_submodule(name)
    assert isinstance(restored, QuantizedLinear) and restored.weight_packed is packed


def test_bf16_base_trains_with_float32_adapters():
    model, masks = _quantized_llama(dtype=torch.bfloat16)
    lors_fx.optimize(model, LorsConfig(r=4, quant_aware=True), compile=False)
    adapter = next(iter(lors_modules(model).values()))
    assert adapter.weight_scale.dtype == torch.bfloat16 and adapter.lora_A.dtype == torch.float32
    _train(model, random_batch())
    assert torch.isfinite(adapter.lora_B).all() and adapter.lora_B.abs().sum() > 0
    lors_fx.merge(model)
    assert audit(model, masks).ok


def test_dropout_on_a_quantized_base_is_refused_and_changes_nothing():
    model, _ = _quantized_llama()
    with pytest.raises(ValueError, match="lora_dropout=0"):
        lors_fx.optimize(model, LorsConfig(r=4, lora_dropout=0.1), compile=False)
    assert not lors_modules(model)
    assert all(isinstance(m, QuantizedLinear) for m in quantized_modules(model).values())
    with pytest.raises(ValueError, match="quant_aware"):
        LorsConfig(quant_aware=True, lora_dropout=0.1)


def test_gradient_init_on_a_quantized_base_leaves_the_model_unchanged_at_step_zero():
    model, _ = _quantized_llama()
    batch = random_batch()
    with torch.no_grad():
        before = model(**batch).logits
    lors_fx.optimize(model, LorsConfig(r=4, init="gradient", init_samples=2), compile=False,
                     init_data=[batch])
    adapter = next(iter(lors_modules(model).values()))
    assert adapter.lora_A.abs().sum() > 0 and adapter.lora_B.abs().sum() == 0
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, before, atol=1e-5)
