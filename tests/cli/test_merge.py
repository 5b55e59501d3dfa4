"""`lors-fx merge`: the saved sparse model reloads with plain transformers, same logits and zeros."""
import json

import torch
from torch import nn

from lors_fx import LorsConfig, cli, optimize, restore_adapters, save_adapters
from lors_fx.testing.toy import build_toy_llama


def _trained_adapters(model, seed=0):
    """Give every adapter non-trivial values (as if trained)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)


def _linear_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear)}


def test_merge_saves_a_plain_sparse_model(tmp_path, toy_llama):
    from transformers import AutoModelForCausalLM

    base = toy_llama
    base.save_pretrained(tmp_path / "base")
    base_weights = _linear_weights(base)
    optimize(base, LorsConfig(r=4, lora_alpha=8), compile=False)
    _trained_adapters(base)
    save_adapters(base, str(tmp_path / "adapters"))
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted_logits = base(input_ids=ids).logits

    code = cli.main(["merge", str(tmp_path / "base"), str(tmp_path / "adapters"),
                     "--out", str(tmp_path / "merged"), "--json", str(tmp_path / "audit.json")])
    assert code == 0
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] and audit["new_nonzeros"] == 0 and audit["lost_nonzeros"] == 0

    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")  # plain transformers
    assert not any("lora" in name for name in merged.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted_logits,
                                   atol=2e-5, rtol=1e-5)
    changed = 0
    for name, weight in _linear_weights(merged).items():
        assert torch.equal(weight == 0, base_weights[name] == 0), name  # same zeros, bit exact
        changed += int(not torch.equal(weight, base_weights[name]))
    assert changed >= 14  # every adapted linear moved


def test_merge_refuses_adapters_of_another_base(tmp_path, capsys):
    base = build_toy_llama(seed=0)
    base.save_pretrained(tmp_path / "base")
    other = build_toy_llama(seed=0)
    optimize(other, LorsConfig(r=4, target_modules=["q_proj"]), compile=False)
    save_adapters(other, str(tmp_path / "adapters"))
    other_base = build_toy_llama(seed=0)
    with torch.no_grad():
        other_base.model.layers[0].self_attn.q_proj.weight.fill_(1.0)  # dense: not a target
    other_base.save_pretrained(tmp_path / "dense_q")
    code = cli.main(["merge", str(tmp_path / "dense_q"), str(tmp_path / "adapters"),
                     "--out", str(tmp_path / "merged")])
    assert code == 1
    assert "dense" in capsys.readouterr().err
    assert not (tmp_path / "merged").exists()


def test_attach_saved_adapters_loads_the_values(tmp_path, toy_llama):
    model = toy_llama
    optimize(model, LorsConfig(r=4, init="zeros"), compile=False)
    _trained_adapters(model, seed=3)
    save_adapters(model, str(tmp_path))
    fresh = restore_adapters(build_toy_llama(seed=0), str(tmp_path))
    saved = dict(model.named_parameters())
    for name, param in fresh.named_parameters():
        if "lora_" in name:
            assert torch.equal(param, saved[name]), name


def test_merge_refuses_another_pruning_of_the_same_model(tmp_path, capsys):
    """Same model, same sparsity, another zero pattern in one module: the adapters' saved mask
    fingerprint differs, so nothing is merged or saved and the error names the module."""
    trained = build_toy_llama(seed=0)
    optimize(trained, LorsConfig(r=4), compile=False)
    _trained_adapters(trained)
    save_adapters(trained, str(tmp_path / "adapters"))
    other = build_toy_llama(seed=0)
    weight = other.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():  # row 0: one kept weight moves to a pruned position
        kept, pruned = (weight[0] != 0).nonzero()[0, 0], (weight[0] == 0).nonzero()[0, 0]
        weight[0, pruned], weight[0, kept] = weight[0, kept].item(), 0.0
    other.save_pretrained(tmp_path / "repruned")
    code = cli.main(["merge", str(tmp_path / "repruned"), str(tmp_path / "adapters"),
                     "--out", str(tmp_path / "merged"), "--no-progress"])
    assert code == 1
    err = capsys.readouterr().err
    assert "zero pattern differs" in err and "first at model.layers.1.mlp.down_proj" in err
    assert not (tmp_path / "merged").exists()


def test_merge_takes_a_directory_peft_saved(tmp_path, toy_llama):
    """A PEFT user's adapters (save_pretrained of a PEFT model trained with lors_fx) merge from
    the command line into a sparse plain model that computes what the PEFT model computed."""
    import pytest

    peft = pytest.importorskip("peft", reason="peft is not installed (pip install "
                                              "'lors-fx[dev]')")
    from transformers import AutoModelForCausalLM

    toy_llama.save_pretrained(tmp_path / "base")
    base_weights = _linear_weights(toy_llama)
    model = peft.get_peft_model(toy_llama, peft.LoraConfig(r=4, lora_alpha=8,
                                                           target_modules=["q_proj", "up_proj"]))
    optimize(model, LorsConfig(), compile=False)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    model.save_pretrained(tmp_path / "peft")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted_logits = model(input_ids=ids).logits

    code = cli.main(["merge", str(tmp_path / "base"), str(tmp_path / "peft"), "--no-progress",
                     "--out", str(tmp_path / "merged"), "--json", str(tmp_path / "audit.json")])
    assert code == 0
    audit = json.loads((tmp_path / "audit.json").read_text())
    assert audit["ok"] and audit["new_nonzeros"] == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted_logits,
                                   atol=2e-5, rtol=1e-5)
    for name, weight in _linear_weights(merged).items():
        assert torch.equal(weight == 0, base_weights[name] == 0), name
