"""Quantized checkpoints in and out (lors_fx.quant_checkpoint): compressed-tensors' pack-quantized
format, written from QuantizedLinear layers and read back by plain transformers, and the grid
record of adapter files (lors_fx.serialization).

Logits are compared with ``torch.equal`` (bit for bit) on models loaded with eager attention, the
attention the tiny models are built with; with transformers' default (sdpa) the other kernel
alone moves them by ~1e-7, so that one comparison uses atol=1e-6.
"""
from __future__ import annotations

import json
import os

import pytest
import torch

pytest.importorskip("compressed_tensors")
from transformers import AutoModelForCausalLM  # noqa: E402

import lors_fx  # noqa: E402
from lors_fx import LorsConfig  # noqa: E402
from lors_fx.adapter_layers import LorsQuantLinear  # noqa: E402
from lors_fx.quant import QuantSpec, pack_codes  # noqa: E402
from lors_fx.quant_checkpoint import (compressed_tensors_layers, from_compressed_tensors,  # noqa
                                      load_quantized, save_quantized)
from lors_fx.quantized import QuantizedLinear, quantize_model  # noqa: E402
from lors_fx.serialization import GRID_KEY  # noqa: E402
from lors_fx.testing.tiny_models import build_model, random_batch  # noqa: E402

IDS = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))


def quantized(spec=QuantSpec(4, 16), name="llama"):
    model = build_model(name).eval()
    quantize_model(model, spec)
    return model


def plain_load(path, **kwargs):
    """Plain transformers, as a user would load the directory (eager attention, see above)."""
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation="eager", **kwargs).eval()


def layers(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


def snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, \
        {n: type(m) for n, m in model.named_modules()}


def same(model, before):
    state, types = snapshot(model)
    return types == before[1] and state.keys() == before[0].keys() and all(
        torch.equal(state[k], before[0][k]) for k in state)


def disk_codes(path, name, bits):
    """The codes as stored in the directory, unpacked by compressed-tensors itself."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from safetensors.torch import load_file

    tensors = load_file(os.path.join(path, "model.safetensors"))
    shape = torch.Size(tensors[f"{name}.weight_shape"].tolist())
    return unpack_from_int32(tensors[f"{name}.weight_packed"], bits, shape), \
        tensors[f"{name}.weight_scale"]


@pytest.mark.parametrize("spec, strategy, dtype", [(QuantSpec(4, 16), "group", torch.float32),
                                                   (QuantSpec(4, None), "channel", torch.float32),
                                                   (QuantSpec(8, 32), "group", torch.float32),
                                                   (QuantSpec(8, None), "channel", torch.float32),
                                                   (QuantSpec(4, 16), "group", torch.bfloat16)])
def test_save_loads_in_plain_transformers_with_our_codes_scales_and_logits(tmp_path, spec,
                                                                           strategy, dtype):
    model = build_model("llama").eval()
    rotary = model.model.rotary_emb.inv_freq  # from_pretrained keeps it float32 in a bf16 model
    model.to(dtype).model.rotary_emb.inv_freq = rotary
    quantize_model(model, spec)
    ours, before = logits(model), snapshot(model)
    names = save_quantized(model, str(tmp_path))
    assert same(model, before) and names == list(layers(model))
    qconfig = json.loads((tmp_path / "config.json").read_text())["quantization_config"]
    weights = qconfig["config_groups"]["group_0"]["weights"]
    assert (qconfig["format"], qconfig["ignore"]) == ("pack-quantized", ["lm_head"])
    assert (weights["num_bits"], weights["strategy"], weights["symmetric"], weights["type"]) == (
        spec.bits, strategy, True, "int")
    for name, layer in layers(model).items():  # the codes on disk are exactly ours
        codes, scales = disk_codes(str(tmp_path), name, spec.bits)
        assert torch.equal(codes, layer.codes) and torch.equal(scales, layer.weight_scale)

    loaded = plain_load(str(tmp_path))
    assert torch.equal(logits(loaded), ours)  # bit for bit
    for name, layer in layers(model).items():  # decompressed by the first forward
        assert torch.equal(loaded.get_submodule(name).weight, layer.weight)
        assert torch.equal(loaded.get_submodule(name).weight == 0, layer.codes == 0)

    back = load_quantized(str(tmp_path), attn_implementation="eager").eval()
    assert layers(back).keys() == layers(model).keys()
    for name, layer in layers(model).items():
        other = back.get_submodule(name)
        assert (other.bits, other.group_size) == (layer.bits, layer.group_size)
        assert torch.equal(other.weight_packed, layer.weight_packed)
        assert torch.equal(other.weight_scale, layer.weight_scale)
    assert torch.equal(logits(back), ours)


def test_default_attention_and_biases_and_mixed_grids(tmp_path):
    model = build_model("qwen2").eval()  # q/k/v projections have a bias
    quantize_model(model, QuantSpec(8, None), targets=["mlp.down_proj"])
    quantize_model(model, QuantSpec(4, 16))  # the rest
    ours = logits(model)

    class Tokenizer:  # what save_quantized asks of a tokenizer
        def save_pretrained(self, path):
            (tmp_path / "tokenizer.json").write_text("{}")

    save_quantized(model, str(tmp_path), tokenizer=Tokenizer())
    assert (tmp_path / "tokenizer.json").exists()
    groups = json.loads((tmp_path / "config.json").read_text())["quantization_config"][
        "config_groups"]
    assert len(groups) == 2 and all(g["targets"] != ["Linear"] for g in groups.values())
    assert torch.equal(logits(plain_load(str(tmp_path))), ours)
    default = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()  # sdpa attention
    torch.testing.assert_close(logits(default), ours, rtol=0, atol=1e-6)
    back = load_quantized(str(tmp_path))
    assert {n: (m.bits, m.group_size) for n, m in layers(back).items()} == {
        n: (m.bits, m.group_size) for n, m in layers(model).items()}
    assert torch.equal(back.get_submodule("model.layers.0.self_attn.q_proj").bias,
                       model.get_submodule("model.layers.0.self_attn.q_proj").bias)


def train(model, steps=3):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=2e-2)
    model.train()
    for step in range(steps):
        loss = model(**random_batch(seed=step)).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


def test_whole_story_quantize_train_merge_save_load(tmp_path):
    model = quantized(QuantSpec(4, 16))
    base = {n: m.codes.clone() for n, m in layers(model).items()}
    lors_fx.optimize(model, LorsConfig(r=4, quant_aware=True), compile=False)
    assert all(isinstance(m, LorsQuantLinear) for m in lors_fx.lors_modules(model).values())
    trained = logits(train(model))
    lors_fx.merge(model)
    merged = {n: m.codes for n, m in layers(model).items()}
    assert merged.keys() == base.keys()
    assert any(not torch.equal(merged[n], base[n]) for n in base)  # training moved codes
    assert all(torch.equal(merged[n] != 0, base[n] != 0) for n in base)  # zero pattern kept
    assert torch.equal(logits(model), trained)
    save_quantized(model, str(tmp_path))
    loaded = plain_load(str(tmp_path))
    assert torch.equal(logits(loaded), trained)
    new_nonzeros = sum(int(((loaded.get_submodule(n).weight != 0) & (base[n] == 0)).sum())
                       for n in base)
    lost = sum(int(((loaded.get_submodule(n).weight == 0) & (base[n] != 0)).sum()) for n in base)
    assert (new_nonzeros, lost) == (0, 0)


@pytest.mark.parametrize("decompressed", [False, True])
def test_optimize_accepts_a_model_plain_transformers_loaded(tmp_path, decompressed):
    model = quantized(QuantSpec(4, 16))
    layer = model.get_submodule("model.layers.0.mlp.up_proj")  # one all-pruned group: scale 0
    codes = layer.codes
    codes[0, :16] = 0
    layer.weight_packed.copy_(pack_codes(codes, 4))
    layer.weight_scale[0, 0] = 0
    ours = logits(model)
    save_quantized(model, str(tmp_path))
    loaded = plain_load(str(tmp_path))
    assert len(compressed_tensors_layers(loaded)) == len(layers(model))
    assert loaded.hf_quantizer is not None and hasattr(loaded, "ct_decompress_hook")
    if decompressed:  # a forward first: compressed-tensors has dequantized every weight
        assert torch.equal(logits(loaded), ours)
    lors_fx.optimize(loaded, LorsConfig(r=4, quant_aware=True), compile=False)
    adapters = lors_fx.lors_modules(loaded)
    assert adapters.keys() == layers(model).keys() and not compressed_tensors_layers(loaded)
    assert loaded.hf_quantizer is None and not hasattr(loaded, "ct_decompress_hook")
    for name, adapter in adapters.items():
        assert isinstance(adapter, LorsQuantLinear)
        assert torch.equal(adapter.weight_packed, model.get_submodule(name).weight_packed)
        assert torch.equal(adapter.weight_scale, model.get_submodule(name).weight_scale)
    assert torch.equal(logits(loaded), ours)  # lora_B = 0: the model is unchanged
    trained = logits(train(loaded, steps=1))
    lors_fx.merge(loaded)
    save_quantized(loaded, str(tmp_path / "merged"))
    assert torch.equal(logits(plain_load(str(tmp_path / "merged"))), trained)


def test_optimize_that_fails_puts_the_compressed_tensors_layers_back(tmp_path):
    save_quantized(quantized(), str(tmp_path))
    loaded = plain_load(str(tmp_path))
    modules, quantizer = compressed_tensors_layers(loaded), loaded.hf_quantizer
    with pytest.raises(ValueError, match="unknown target"):
        lors_fx.optimize(loaded, LorsConfig(r=4, target_modules=["nope"]), compile=False)
    assert compressed_tensors_layers(loaded) == modules and loaded.hf_quantizer is quantizer
    assert hasattr(loaded, "ct_decompress_hook") and len(loaded._forward_pre_hooks) == 1
    assert logits(loaded).isfinite().all()  # the hook still decompresses on the first forward


def ct_model(bits=4, symmetric=True, divisor=None, zero_point=0, activations=None,
             strategy="group"):
    """A pruned tiny Llama quantized in memory by compressed-tensors itself
    (apply_quantization_config), scales absmax / divisor per group of 32 (or row, or tensor)."""
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, apply_quantization_config)

    model = build_model("llama").eval()
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy,
                            group_size=32 if strategy == "group" else None)
    scheme = QuantizationScheme(targets=["Linear"], weights=args, input_activations=activations)
    apply_quantization_config(model, QuantizationConfig(config_groups={"group_0": scheme},
                                                        ignore=["lm_head"]), show_progress=False)
    for module in compressed_tensors_layers(model).values():
        weight = module.weight.detach()
        width = {"group": 32, "channel": weight.shape[1], "tensor": weight.numel()}[strategy]
        absmax = weight.reshape(-1, width).abs().amax(-1)
        module.weight_scale.data.copy_((absmax / (divisor or 2 ** (bits - 1) - 1)).view_as(
            module.weight_scale))
        if hasattr(module, "weight_zero_point"):
            module.weight_zero_point.data.fill_(zero_point)
    return model


def ct_checkpoint(path, format="pack-quantized", **kwargs):
    """A checkpoint written by compressed-tensors itself (:func:`ct_model` + ModelCompressor),
    loaded by plain transformers."""
    from compressed_tensors.compressors import ModelCompressor

    model = ct_model(**kwargs)
    compressor = ModelCompressor.from_pretrained_model(model, format)
    compressor.compress_model(model)
    model.save_pretrained(path)
    compressor.update_config(path)
    # transformers 5.24 + compressed-tensors 0.20.1 cannot load the zero points they pack for an
    # asymmetric group grid (shape mismatch): load them re-initialized, the scheme says the rest
    return plain_load(path, ignore_mismatched_sizes=not kwargs.get("symmetric", True))


@pytest.mark.parametrize("bits, strategy, format", [(4, "group", "pack-quantized"),
                                                    (8, "channel", "pack-quantized"),
                                                    (4, "tensor", "pack-quantized"),
                                                    (8, "channel", "int-quantized")])
def test_a_checkpoint_written_by_compressed_tensors_converts_losslessly(tmp_path, bits, strategy,
                                                                       format):
    loaded = ct_checkpoint(str(tmp_path), format, bits=bits, strategy=strategy)
    expected = list(compressed_tensors_layers(loaded))
    assert from_compressed_tensors(loaded) == expected and not compressed_tensors_layers(loaded)
    assert {(m.bits, m.group_size == m.in_features) for m in layers(loaded).values()} == {
        (bits, strategy != "group")}
    assert torch.equal(logits(loaded), logits(plain_load(str(tmp_path))))


def test_an_in_memory_compressed_tensors_model_converts_to_what_its_forward_runs():
    model = ct_model()  # not compressed: its forward fake-quantizes the float weights
    reference = logits(model)
    from_compressed_tensors(model)
    assert torch.equal(logits(model), reference)


def test_a_decompressed_weight_off_its_grid_is_refused(tmp_path):
    save_quantized(quantized(), str(tmp_path))
    loaded = plain_load(str(tmp_path))
    logits(loaded)  # decompresses: float weights, used as they are from now on
    with torch.no_grad():
        loaded.get_submodule("model.layers.1.mlp.up_proj").weight[0, :2] += 1e-3
    before = snapshot(loaded)
    with pytest.raises(ValueError, match="not on its grid"):
        from_compressed_tensors(loaded)
    assert same(loaded, before)


@pytest.mark.parametrize("case, match", [
    (dict(symmetric=False, zero_point=3), "asymmetric"),
    (dict(bits=3), "3-bit"),
    ("activations", "quantizes activations"),
])
def test_bad_checkpoints_are_refused_and_nothing_changes(tmp_path, case, match):
    if case == "activations":
        from compressed_tensors.quantization import QuantizationArgs
        case = dict(activations=QuantizationArgs(num_bits=8, strategy="token", dynamic=True))
    loaded = ct_checkpoint(str(tmp_path), **case)
    before, hooks = snapshot(loaded), dict(loaded._forward_pre_hooks)
    with pytest.raises(ValueError, match=match):
        lors_fx.optimize(loaded, LorsConfig(r=4), compile=False)
    with pytest.raises(ValueError, match=match):
        from_compressed_tensors(loaded)
    assert same(loaded, before) and dict(loaded._forward_pre_hooks) == hooks
    assert loaded.hf_quantizer is not None and not lors_fx.is_optimized(loaded)


@pytest.mark.parametrize("change, match", [(dict(type="float"), "type 'float'"),
                                           (dict(symmetric=False), "asymmetric"),
                                           ("zero_point", "asymmetric"),
                                           (dict(strategy="block", block_structure=[16, 16]),
                                            "strategy 'block'")])
def test_a_grid_lors_fx_cannot_hold_is_refused(tmp_path, change, match):
    save_quantized(quantized(), str(tmp_path))
    loaded = plain_load(str(tmp_path))
    module = loaded.get_submodule("model.layers.1.mlp.up_proj")  # one layer among many
    if change == "zero_point":
        module.register_parameter("weight_zero_point", torch.nn.Parameter(
            torch.ones_like(module.weight_scale, dtype=torch.int8), requires_grad=False))
    else:
        scheme = module.quantization_scheme
        module.quantization_scheme = scheme.model_copy(
            update={"weights": scheme.weights.model_copy(update=change)})
    before = snapshot(loaded)
    with pytest.raises(ValueError, match=match):
        from_compressed_tensors(loaded)
    assert same(loaded, before)


def test_save_refuses_adapters_and_conv1d_and_changes_nothing(tmp_path):
    model = quantized()
    lors_fx.optimize(model, LorsConfig(r=4), compile=False)
    before = snapshot(model)
    with pytest.raises(ValueError, match=r"lors_fx\.merge\(model\)"):
        save_quantized(model, str(tmp_path / "adapted"))
    assert same(model, before) and not (tmp_path / "adapted").exists()
    gpt2 = quantized(name="gpt2")  # Conv1D projections: compressed-tensors has no form for them
    with pytest.raises(ValueError, match="not an nn.Linear"):
        save_quantized(gpt2, str(tmp_path / "gpt2"))
    with pytest.raises(ValueError, match="no QuantizedLinear"):
        save_quantized(build_model("llama"), str(tmp_path / "float"))
    (tmp_path / "file").write_text("")
    with pytest.raises(ValueError, match="is a file"):
        save_quantized(quantized(), str(tmp_path / "file"))


def adapters_on(spec, quant_aware, path=None):
    model = quantized(spec)
    lors_fx.optimize(model, LorsConfig(r=4, quant_aware=quant_aware), compile=False)
    if path is not None:
        train(model, steps=1)
        lors_fx.save_adapters(model, path)
    return model


def test_quant_aware_adapters_onto_another_grid_are_refused(tmp_path):
    path = str(tmp_path / "qa")
    adapters_on(QuantSpec(4, 16), True, path)
    grids = json.loads(_metadata(path)[GRID_KEY])
    assert grids["model.layers.0.mlp.up_proj"]["bits"] == 4 and all(
        g["quant_aware"] and g["group_size"] == 16 for g in grids.values())
    other = adapters_on(QuantSpec(4, 32), True)  # same zero pattern, another grid
    before = snapshot(other)
    with pytest.raises(ValueError, match="trained quant_aware"):
        lors_fx.load_adapters(other, path)
    assert same(other, before)
    fresh = quantized(QuantSpec(8, 16))
    with pytest.raises(ValueError, match="trained quant_aware"):
        lors_fx.restore_adapters(fresh, path)
    assert not lors_fx.is_optimized(fresh)
    lors_fx.restore_adapters(quantized(QuantSpec(4, 16)), path)  # its own grid loads


def test_other_adapters_onto_another_grid_warn_and_old_files_load(tmp_path):
    path = str(tmp_path / "plain")
    trained = adapters_on(QuantSpec(4, 16), False, path)
    other = adapters_on(QuantSpec(8, 16), False)
    with pytest.warns(UserWarning, match="not on the grid of"):
        lors_fx.load_adapters(other, path)
    _drop_metadata(path, GRID_KEY)  # a file written before the grid record
    fresh = adapters_on(QuantSpec(4, 16), False)
    lors_fx.load_adapters(fresh, path)
    for name, module in lors_fx.lors_modules(fresh).items():
        assert torch.equal(module.lora_B, lors_fx.lors_modules(trained)[name].lora_B)


def _metadata(path):
    from safetensors import safe_open

    with safe_open(os.path.join(path, "adapter_model.safetensors"), framework="pt") as handle:
        return handle.metadata()


def _drop_metadata(path, key):
    from safetensors.torch import load_file, save_file

    file = os.path.join(path, "adapter_model.safetensors")
    metadata = {k: v for k, v in _metadata(path).items() if k != key}
    save_file(load_file(file), file, metadata=metadata)


def test_compressed_tensors_own_calibration_with_code_minus_8_is_kept_through_a_merge(tmp_path):
    """compressed-tensors' calibration (absmax / 7.5) reaches code -8: it converts losslessly, and
    merging zero adapters (B = 0) gives back the very same codes, -8 included."""
    loaded = ct_checkpoint(str(tmp_path), bits=4, divisor=7.5)
    reference = logits(loaded)
    from_compressed_tensors(loaded)
    codes = {name: m.codes.clone() for name, m in layers(loaded).items()}
    assert any(int(c.min()) == -8 for c in codes.values())
    assert torch.equal(logits(loaded), reference)
    lors_fx.optimize(loaded, LorsConfig(r=4, quant_aware=True), compile=False)
    lors_fx.merge(loaded)
    assert all(torch.equal(m.codes, codes[name]) for name, m in layers(loaded).items())
