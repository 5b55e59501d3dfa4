"""Tests of lors_fx/config.py: validation messages, scaling, JSON, checkpoint policies."""
from __future__ import annotations

import json
import math

import pytest

from lors_fx.config import LorsConfig, parse_checkpoint_policy


@pytest.mark.parametrize("kwargs,field", [
    (dict(r=0), "r"),
    (dict(r=-3), "r"),
    (dict(r=True), "r"),
    (dict(r=2.0), "r"),
    (dict(lora_alpha=0), "lora_alpha"),
    (dict(lora_alpha=-1.0), "lora_alpha"),
    (dict(lora_alpha=float("nan")), "lora_alpha"),
    (dict(lora_alpha=float("inf")), "lora_alpha"),
    (dict(lora_alpha=True), "lora_alpha"),
    (dict(lora_alpha="32"), "lora_alpha"),
    (dict(grad_mode="dense"), "grad_mode"),
    (dict(init="pissa"), "init"),
    (dict(lora_dropout=1.0), "lora_dropout"),
    (dict(lora_dropout=-0.1), "lora_dropout"),
    (dict(min_sparsity=0.0), "min_sparsity"),
    (dict(min_sparsity=1.0), "min_sparsity"),
    (dict(min_sparsity=1.5), "min_sparsity"),
    (dict(checkpoint="every:0"), "checkpoint"),
    (dict(checkpoint="every:x"), "checkpoint"),
    (dict(checkpoint="every"), "checkpoint"),
    (dict(checkpoint="budget:"), "checkpoint"),
    (dict(checkpoint="budget:-5"), "checkpoint"),
    (dict(checkpoint="budget:12XB"), "checkpoint"),
    (dict(checkpoint="budget:1e400"), "checkpoint"),
    (dict(checkpoint="selective"), "checkpoint"),
    (dict(fw_compiler="tvm"), "fw_compiler"),
    (dict(bw_compiler="aot_eager"), "bw_compiler"),
    (dict(target_modules=[]), "target_modules"),
    (dict(target_modules=["q_proj", ""]), "target_modules"),
    (dict(target_modules=["q_proj", 3]), "target_modules"),
    (dict(target_modules="(q_proj"), "target_modules"),
    (dict(chunk_bytes=0), "chunk_bytes"),
    (dict(chunk_bytes=True), "chunk_bytes"),
    (dict(chunk_bytes=1.5), "chunk_bytes"),
    (dict(init_samples=0), "init_samples"),
    (dict(init_samples=True), "init_samples"),
    (dict(use_rslora=1), "use_rslora"),
    (dict(recompute="yes"), "recompute"),
    (dict(convert_peft="yes"), "convert_peft"),
    (dict(init_mask_gradient=0), "init_mask_gradient"),
    (dict(adapter_dtype="float16"), "adapter_dtype"),
    (dict(adapter_dtype=None), "adapter_dtype"),
])
def test_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=rf"^LorsConfig\.{field}: "):
        LorsConfig(**kwargs)


def test_defaults_and_normalisation():
    config = LorsConfig()
    assert config.r == 16 and config.grad_mode == "lors" and config.recompute is True
    assert config.exclude_modules == ["lm_head"]
    config = LorsConfig(target_modules=("q_proj", "v_proj"), exclude_modules="lm_head")
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.exclude_modules == ["lm_head"]
    assert LorsConfig(target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"


@pytest.mark.parametrize("r,alpha,rslora,expected", [
    (16, 32.0, False, 2.0),
    (16, 32.0, True, 8.0),
    (8, 8, False, 1.0),
    (3, 6.0, True, 6.0 / math.sqrt(3)),
])
def test_scaling(r, alpha, rslora, expected):
    assert LorsConfig(r=r, lora_alpha=alpha, use_rslora=rslora).scaling == pytest.approx(
        expected, rel=1e-15)


def test_json_round_trip(tmp_path):
    config = LorsConfig(r=4, lora_alpha=8.0, target_modules=["q_proj", "down_proj"],
                        exclude_modules=("lm_head", "embed"), lora_dropout=0.1, use_rslora=True,
                        grad_mode="exact", recompute=False, chunk_bytes=2**20, init="gradient",
                        init_samples=8, init_mask_gradient=True, min_sparsity=0.4,
                        checkpoint="budget:512MiB", convert_peft=True, fw_compiler="inductor",
                        bw_compiler="inductor", adapter_dtype="weight")
    text = config.to_json()
    assert json.loads(text)["adapter_dtype"] == "weight"
    assert json.loads(text)["target_modules"] == ["q_proj", "down_proj"]
    assert LorsConfig.from_json(text) == config
    path = tmp_path / "lors.json"
    assert config.to_json(str(path)) == text
    assert LorsConfig.from_json(str(path)) == config
    assert LorsConfig.from_dict(config.to_dict()) == config
    regex = LorsConfig(target_modules=r"layers\.\d+\.mlp\..*")
    assert LorsConfig.from_json(regex.to_json()) == regex


def test_adapter_dtype_default_and_files_written_before_it_existed():
    """float32 adapters by default (PEFT's autocast_adapter_dtype); a saved config without the
    field (an adapter_config.json from before it existed) loads with that default."""
    assert LorsConfig().adapter_dtype == "float32"
    old = LorsConfig(r=4, adapter_dtype="weight").to_dict()
    del old["adapter_dtype"]
    assert LorsConfig.from_dict(old) == LorsConfig(r=4)
    assert LorsConfig.from_json(json.dumps(old)).adapter_dtype == "float32"


def test_from_dict_rejects_unknown_keys():
    with pytest.raises(ValueError, match=r"unknown field\(s\) \['rank'\]"):
        LorsConfig.from_dict({"rank": 8})
    with pytest.raises(ValueError, match=r"^LorsConfig\.r: "):
        LorsConfig.from_dict({"r": 0})


@pytest.mark.parametrize("policy,expected", [
    ("none", ("none", 0)),
    ("block", ("block", 0)),
    (" Block ", ("block", 0)),
    ("every:1", ("every", 1)),
    ("every:2", ("every", 2)),
    ("budget:0", ("budget", 0)),
    ("budget:512MiB", ("budget", 512 * 2**20)),
    ("budget:512mb", ("budget", 512 * 2**20)),
    ("budget:1.5KiB", ("budget", 1536)),
    ("budget:2GiB", ("budget", 2 * 2**30)),
    ("budget:2e6", ("budget", 2_000_000)),
    ("budget:100b", ("budget", 100)),
])
def test_parse_checkpoint_policy(policy, expected):
    assert parse_checkpoint_policy(policy) == expected
    assert LorsConfig(checkpoint=policy).checkpoint == policy


@pytest.mark.parametrize("policy", ["", "every:0", "every:-1", "every:1.5", "budget:abc",
                                    "budget:1e", "budget:5 parsecs", "budget:inf", "budget:1e999",
                                    "always"])
def test_parse_checkpoint_policy_rejects(policy):
    with pytest.raises(ValueError, match=r"^LorsConfig\.checkpoint: .*got"):
        parse_checkpoint_policy(policy)
