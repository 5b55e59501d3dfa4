"""lors_fx.workflows.quantize (and prune_model's ``bits``): every pruned linear ends quantized with
code 0 exactly where pruned, SparseGPT's joint mode keeps the requested sparsity/N:M, GPTQ
reconstructs a layer's output better than round to nearest on the same mask, and bad arguments
change nothing (tiny random Llama, CPU, seconds)."""
from __future__ import annotations

import copy
import math

import pytest
import torch
from torch import nn

from lors_fx.quant import SCALE_FACTORS, QuantSpec, round_to_codes
from lors_fx.quantized import QuantizedLinear, quantize_linear
from lors_fx.testing.tiny_models import build_model, build_tiny
from lors_fx.workflows.prune import magnitude_prune_, prune_model
from lors_fx.workflows.quantize import quantize_pruned_model

GROUP = 16


def calibration(seed=1, n=16, length=64):
    """1024 random tokens: enough for a well-conditioned X^T X of the 128-wide inputs."""
    return torch.randint(128, (n, length), generator=torch.Generator().manual_seed(seed))


def targets(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}


def layer_inputs(model, ids):
    """``{name: X (tokens x d_in)}`` of every target linear on ``ids``."""
    inputs, handles = {}, []
    for name, module in targets(model).items():
        handles.append(module.register_forward_hook(
            lambda _m, args, _out, n=name: inputs.setdefault(n, []).append(
                args[0].reshape(-1, args[0].shape[-1]))))
    with torch.no_grad():
        model.eval()(ids, use_cache=False)
    for handle in handles:
        handle.remove()
    return {name: torch.cat(parts) for name, parts in inputs.items()}


def output_error(inputs, weights, quantized):
    """``sqrt(sum over layers of ||X W^T - X dq^T||^2)``."""
    return math.sqrt(sum(float((inputs[n] @ (weights[n] - quantized[n].weight).T).pow(2).sum())
                         for n in weights))


def assert_quantized(model, names, bits, group_size, dtype=torch.float32):
    for name in names:
        layer = model.get_submodule(name)
        assert isinstance(layer, QuantizedLinear), name
        assert layer.bits == bits and layer.weight_scale.dtype == dtype, name
        assert layer.group_size == (layer.in_features if group_size is None else group_size)
        assert torch.equal(layer.weight != 0, layer.codes != 0), name  # kept dq stays nonzero


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("method,quant_method", [("wanda", "gptq"), ("wanda", "rtn"),
                                                 ("magnitude", "rtn"), ("magnitude", "gptq")])
def test_pruned_then_quantized_codes_are_the_mask(method, quant_method, bits):
    model = build_tiny("llama")
    reference = copy.deepcopy(model)
    originals = targets(model)  # pruned in place, then replaced: they keep the pruned weights
    rows = prune_model(model, method, 0.5, calibration=calibration(), bits=bits,
                       group_size=GROUP, quant_method=quant_method, progress=False)
    assert {r.name for r in rows} == set(originals) and len(rows) == 14
    assert all(r.sparsity == 0.5 for r in rows)
    assert_quantized(model, originals, bits, GROUP)
    if method == "magnitude":
        magnitude_prune_(reference, 0.5)
    for name, old in originals.items():
        mask = old.weight != 0
        assert ((~mask).sum(1) == mask.shape[1] // 2).all(), name  # floor(s * d_in) per row
        codes = model.get_submodule(name).codes
        assert torch.equal(codes != 0, mask), name
        if method == "magnitude":
            assert torch.equal(mask, reference.get_submodule(name).weight != 0), name
        if quant_method == "rtn":  # round to nearest on scales searched among absmax * f / qmax
            layer = model.get_submodule(name)
            absmax = quantize_linear(old, QuantSpec(bits, GROUP), name).weight_scale
            factors = torch.tensor(SCALE_FACTORS)
            ratio = layer.weight_scale / absmax
            assert ((ratio.unsqueeze(-1) - factors).abs().amin(-1) < 1e-5).all(), name
            again = round_to_codes(old.weight.detach(), layer.weight_scale, mask, bits)
            assert torch.equal(codes, again), name


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("pattern", [None, "2:4"])
def test_sparsegpt_joint_prunes_and_quantizes_in_one_sweep(pattern, bits):
    model = build_tiny("llama")
    names = list(targets(model))
    rows = prune_model(model, "sparsegpt", pattern=pattern, calibration=calibration(), bits=bits,
                       group_size=GROUP, progress=False)
    assert {r.name for r in rows} == set(names)
    assert_quantized(model, names, bits, GROUP)
    for name in names:
        codes = model.get_submodule(name).codes
        if pattern is None:  # the layer loses exactly floor(s * d_out * d_in)
            assert int((codes == 0).sum()) == codes.numel() // 2, name
        else:
            kept = (codes != 0).reshape(codes.shape[0], -1, 4).sum(-1)
            assert (kept == 2).all(), name
        # error propagation can push a later column past its group's absmax: it saturates on
        # the grid [-8, 7] / [-128, 127]
        low, high = (-8, 7) if bits == 4 else (-128, 127)
        assert low <= int(codes.min()) and int(codes.max()) <= high
    with torch.no_grad():
        assert torch.isfinite(model(calibration(n=2), use_cache=False).logits).all()


def test_sparsegpt_joint_per_channel_in_bfloat16():
    model = build_tiny("llama").to(torch.bfloat16)
    names = list(targets(model))
    prune_model(model, "sparsegpt", pattern="2:4", calibration=calibration(), bits=4,
                group_size=None, progress=False)
    assert_quantized(model, names, 4, None, dtype=torch.bfloat16)
    for name in names:
        layer = model.get_submodule(name)
        assert layer.weight_scale.shape == (layer.out_features, 1)
        assert ((layer.codes != 0).reshape(layer.out_features, -1, 4).sum(-1) == 2).all()


@pytest.mark.parametrize("bits,group_size", [(4, GROUP), (4, None), (8, 32)])
def test_gptq_reconstructs_better_than_rtn_on_the_same_mask(bits, group_size):
    pruned = build_model("llama").eval()
    ids = calibration()
    inputs = layer_inputs(pruned, ids)
    weights = {n: m.weight.detach().clone() for n, m in targets(pruned).items()}
    errors = {}
    for method in ("gptq", "rtn"):
        model = copy.deepcopy(pruned)
        quantize_pruned_model(model, bits, group_size, method, ids, progress=False)
        assert_quantized(model, weights, bits, group_size)
        layers = {n: model.get_submodule(n) for n in weights}
        for name, layer in layers.items():
            assert torch.equal(layer.codes != 0, weights[name] != 0), name
        errors[method] = output_error(inputs, weights, layers)
    assert errors["gptq"] < errors["rtn"], errors


def test_wanda_gptq_reconstructs_better_than_rtn_on_its_mask():
    model = build_tiny("llama")
    originals = targets(model)
    pruned_float = copy.deepcopy(model)
    ids = calibration()
    prune_model(model, "wanda", 0.5, calibration=ids, bits=4, group_size=GROUP, progress=False)
    weights = {n: m.weight.detach().clone() for n, m in originals.items()}
    with torch.no_grad():
        for name, module in targets(pruned_float).items():
            module.weight.copy_(weights[name])
    inputs = layer_inputs(pruned_float, ids)
    gptq = {n: model.get_submodule(n) for n in weights}
    rtn = {n: quantize_linear(m, QuantSpec(4, GROUP), n) for n, m in originals.items()}
    assert output_error(inputs, weights, gptq) < output_error(inputs, weights, rtn)


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, before):
    after = model.state_dict()
    assert after.keys() == before.keys()
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert not any(isinstance(m, QuantizedLinear) for m in model.modules())


BAD_PRUNE = [
    (dict(method="wanda", bits=3), ValueError, "bits"),
    (dict(method="sparsegpt", bits=True), ValueError, "bits"),
    (dict(method="sparsegpt", bits=4, group_size=48), ValueError, "group_size=48"),
    # 64 divides every input dim but down_proj's (96): all are checked before any change
    (dict(method="wanda", bits=4, group_size=64), ValueError, "down_proj"),
    (dict(method="magnitude", bits=8, group_size=64, quant_method="rtn"), ValueError, "down_proj"),
    (dict(method="wanda", bits=4, quant_method="awq"), ValueError, "quant_method"),
    (dict(method="wanda", quant_method="awq"), ValueError, "quant_method"),
    (dict(method="magnitude", bits=4, group_size=GROUP, calibration=None), ValueError,
     "calibration"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_PRUNE)
def test_bad_prune_quantization_arguments_change_nothing(kwargs, error, match):
    model = build_tiny("llama", intermediate_size=96)
    before = _snapshot(model)
    kwargs = {"calibration": calibration(n=2), **kwargs}
    with pytest.raises(error, match=match):
        prune_model(model, progress=False, **kwargs)
    _assert_unchanged(model, before)


BAD_QUANTIZE = [
    (dict(bits=3), ValueError, "bits"),
    (dict(bits=4, group_size=64), ValueError, "down_proj"),
    (dict(bits=4, group_size=GROUP, method="awq"), ValueError, "quant_method"),
    (dict(bits=4, group_size=GROUP, calibration=None), ValueError, "calibration"),
]


@pytest.mark.parametrize("kwargs,error,match", BAD_QUANTIZE)
def test_bad_quantize_pruned_model_arguments_change_nothing(kwargs, error, match):
    model = build_model("llama", intermediate_size=96)
    before = _snapshot(model)
    kwargs = {"calibration": calibration(n=2), **kwargs}
    with pytest.raises(error, match=match):
        quantize_pruned_model(model, progress=False, **kwargs)
    _assert_unchanged(model, before)
