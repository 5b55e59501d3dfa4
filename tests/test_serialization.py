"""Adapter files: a failed restore changes nothing and names the file; the mask fingerprint saved
with the adapters refuses another pruning of the same model; files stay readable by older code."""
import dataclasses
import json
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from lors_fx import (LorsConfig, load_adapter_config, load_adapters, lors_modules, optimize,
                     restore_adapters, save_adapters)
from lors_fx.serialization import FINGERPRINT_KEY, mask_fingerprint, read_mask_fingerprint
from lors_fx.testing.toy import build_toy_llama
from tests._toy import assert_unchanged, randomize_adapters, snapshot, tiny_gpt2

REPRUNED = "model.layers.1.self_attn.v_proj"  # the module another_pruning changes


def _saved(tmp_path, name="good", build=build_toy_llama, seed=5):
    model = build()
    optimize(model, LorsConfig(r=4), compile=False)
    randomize_adapters(model, seed)
    save_adapters(model, str(tmp_path / name))
    return model, tmp_path / name


def another_pruning(model, module=REPRUNED):
    """Same model, same sparsity, another zero pattern: in row 0 of ``module`` one kept weight
    moves to a pruned position."""
    weight = model.get_submodule(module).weight
    with torch.no_grad():
        kept, pruned = (weight[0] != 0).nonzero()[0, 0], (weight[0] == 0).nonzero()[0, 0]
        weight[0, pruned], weight[0, kept] = weight[0, kept].item(), 0.0
    return model


def _copy(src, dst, *, config=None, weights=None):
    """``src``'s adapter directory copied to ``dst``, its config text or weight bytes replaced."""
    dst.mkdir()
    (dst / "adapter_config.json").write_text(
        config if config is not None else (src / "adapter_config.json").read_text())
    (dst / "adapter_model.safetensors").write_bytes(
        weights if weights is not None else (src / "adapter_model.safetensors").read_bytes())
    return dst


def _bad_dirs(tmp_path, good):
    raw = (good / "adapter_model.safetensors").read_bytes()
    config = json.loads((good / "adapter_config.json").read_text())
    return {
        "truncated": (_copy(good, tmp_path / "truncated", weights=raw[: len(raw) // 2]),
                      "adapter_model.safetensors"),
        "garbage": (_copy(good, tmp_path / "garbage", weights=b"\x00garbage" * 64),
                    "adapter_model.safetensors"),
        "bad_json": (_copy(good, tmp_path / "bad_json", config="{not json"),
                     "adapter_config.json"),
        "other_r": (_copy(good, tmp_path / "other_r", config=json.dumps({**config, "r": 2})),
                    None),  # config and tensors disagree: found after the adapters are attached
    }


@pytest.mark.parametrize("case", ["truncated", "garbage", "bad_json", "other_r"])
def test_a_failed_restore_leaves_the_model_as_it_was_and_a_retry_works(tmp_path, case):
    model, good = _saved(tmp_path)
    path, named = _bad_dirs(tmp_path, good)[case]
    fresh = build_toy_llama(seed=0)
    snap = snapshot(fresh)
    with pytest.raises(ValueError) as error:
        restore_adapters(fresh, str(path))
    if named:  # file errors name the file
        assert str(path / named) in str(error.value)
    assert_unchanged(fresh, snap)  # no adapters, nothing frozen, no lors_fx state
    restore_adapters(fresh, str(good))  # a retry starts clean (was: "optimize called twice")
    for name, module in lors_modules(model).items():
        assert torch.equal(fresh.get_submodule(name).lora_B, module.lora_B), name


def test_a_failed_compiled_restore_rolls_back_too(tmp_path):
    _, good = _saved(tmp_path)
    path, _ = _bad_dirs(tmp_path, good)["truncated"]
    fresh = build_toy_llama(seed=0)
    snap = snapshot(fresh)
    forward = fresh.forward
    with pytest.raises(ValueError, match="truncated"):
        restore_adapters(fresh, str(path), compile=True)
    assert_unchanged(fresh, snap)
    assert fresh.forward == forward


def test_load_errors_name_the_file(tmp_path):
    _, good = _saved(tmp_path)
    bad = _bad_dirs(tmp_path, good)
    target = build_toy_llama(seed=0)
    optimize(target, LorsConfig(r=4), compile=False)
    snap = snapshot(target)
    for case in ("truncated", "garbage", "bad_json"):
        path, named = bad[case]
        with pytest.raises(ValueError, match=str(path / named)):
            load_adapters(target, str(path))
    with pytest.raises(ValueError, match=str(bad["bad_json"][0] / "adapter_config.json")):
        load_adapter_config(str(bad["bad_json"][0]))
    assert_unchanged(target, snap)


def test_the_fingerprint_is_in_the_header_and_the_format_only_gains_a_key(tmp_path):
    model, good = _saved(tmp_path)
    with safe_open(str(good / "adapter_model.safetensors"), framework="pt") as handle:
        metadata = handle.metadata()
    assert set(metadata) == {"format", FINGERPRINT_KEY} and metadata["format"] == "pt"
    fingerprint = read_mask_fingerprint(str(good))
    assert fingerprint == mask_fingerprint(model)
    assert sorted(fingerprint["modules"]) == sorted(lors_modules(model))
    assert len(fingerprint["digest"]) == 64
    # adapter_config.json has exactly the keys it had: an older reader (LorsConfig.from_dict after
    # popping the three keys it knows, safetensors' load_file) still reads the files
    saved = json.loads((good / "adapter_config.json").read_text())
    config_keys = {f.name for f in dataclasses.fields(LorsConfig)}
    assert set(saved) == config_keys | {"peft_type", "lors_fx_version", "scaling"}
    for key in ("peft_type", "lors_fx_version", "scaling"):
        saved.pop(key)
    assert LorsConfig.from_dict(saved).target_modules == list(lors_modules(model))
    assert len(load_file(str(good / "adapter_model.safetensors"))) == 2 * len(lors_modules(model))


def test_fingerprint_follows_the_zero_pattern_only():
    model = build_toy_llama(seed=0)
    optimize(model, LorsConfig(r=4), compile=False)
    first = mask_fingerprint(model)
    randomize_adapters(model, 1)  # adapters and kept values do not matter
    with torch.no_grad():
        weight = model.get_submodule(REPRUNED).weight
        weight.mul_(torch.where(weight != 0, 3.0, 1.0))
    assert mask_fingerprint(model) == first
    another_pruning(model)
    second = mask_fingerprint(model)
    assert second["digest"] != first["digest"]
    assert [n for n in first["modules"] if first["modules"][n] != second["modules"][n]] == \
        [REPRUNED]


def test_load_and_restore_refuse_another_pruning_naming_the_module(tmp_path):
    _, good = _saved(tmp_path)
    other = another_pruning(build_toy_llama(seed=0))
    snap = snapshot(other)
    with pytest.raises(ValueError, match=rf"zero pattern differs.*first at {REPRUNED} \(1 of 14"):
        restore_adapters(other, str(good))
    assert_unchanged(other, snap)
    optimize(other, LorsConfig(r=4), compile=False)
    snap = snapshot(other)
    with pytest.raises(ValueError, match=f"first at {REPRUNED}"):
        load_adapters(other, str(good))
    assert_unchanged(other, snap)


def test_files_without_a_fingerprint_still_load_with_a_note(tmp_path):
    model, good = _saved(tmp_path)
    old = tmp_path / "old"
    tensors = load_file(str(good / "adapter_model.safetensors"))
    old.mkdir()
    save_file(tensors, str(old / "adapter_model.safetensors"), metadata={"format": "pt"})
    (old / "adapter_config.json").write_text((good / "adapter_config.json").read_text())
    assert read_mask_fingerprint(str(old)) is None
    with pytest.warns(UserWarning, match="no mask fingerprint"):
        fresh = restore_adapters(another_pruning(build_toy_llama(seed=0)), str(old))
    for name, module in lors_modules(model).items():
        assert torch.equal(fresh.get_submodule(name).lora_A, module.lora_A), name
    with warnings.catch_warnings():  # a file with a fingerprint loads without the note
        warnings.simplefilter("error")
        restore_adapters(build_toy_llama(seed=0), str(good))


def test_conv1d_adapters_round_trip_with_a_fingerprint(tmp_path):
    model, good = _saved(tmp_path, build=tiny_gpt2)
    assert read_mask_fingerprint(str(good)) == mask_fingerprint(model)
    fresh = restore_adapters(tiny_gpt2(), str(good))
    for name, module in lors_modules(model).items():
        assert torch.equal(fresh.get_submodule(name).lora_B, module.lora_B), name
    other = tiny_gpt2()
    name = next(iter(lors_modules(model)))
    another_pruning(other, name)
    with pytest.raises(ValueError, match=f"first at {name}"):
        restore_adapters(other, str(good))
