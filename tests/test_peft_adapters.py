"""PEFT end to end, against real PEFT: optimize converts PEFT's LoRA layers in place (reusing their
parameters), training keeps the mask, save_pretrained keeps the trained values, merge returns a
sparse plain model, and adapter files go both ways (PEFT dir -> restore_adapters; lors_fx dir ->
PEFT refuses with a message)."""
from __future__ import annotations

import os

import pytest
import torch

import lors_fx
from lors_fx import LorsConfig, lors_modules, merge, optimize, remove_adapters, restore_adapters
from lors_fx.adapters import SITE_ATTRIBUTE
from lors_fx.peft_adapters import PeftSite, peft_lora_layers
from lors_fx.serialization import save_adapters
from lors_fx.testing.toy import build_toy_llama, toy_batches
from tests._toy import assert_unchanged, snapshot

peft = pytest.importorskip("peft", reason="peft is not installed (pip install 'lors-fx[dev]'): "
                                          "these tests run lors_fx on real PEFT models")

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_llama(seed=0, dtype=torch.float32, **lora):
    """The pruned toy Llama wrapped by ``get_peft_model`` (r=4, every projection), lora_B random
    so that the adapters are not a no-op."""
    base = build_toy_llama(seed=seed).to(dtype)
    options = dict(r=4, lora_alpha=8, target_modules=TARGETS, lora_dropout=0.0)
    options.update(lora)
    model = peft.get_peft_model(base, peft.LoraConfig(**options))
    torch.manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    return model


def masks_of(model):
    return {n: (p != 0) for n, p in model.named_parameters() if n.endswith("proj.weight")
            or n.endswith("base_layer.weight")}


def plain_masks(model):
    return {n.replace("base_model.model.", "").replace(".base_layer", ""): m
            for n, m in masks_of(model).items()}


def reference_logits(model, ids):
    """The masked form computed by hand in float64 on a copy: W + s*(B@A)*M per PEFT layer."""
    ref = build_toy_llama(seed=0).double()
    state = dict(ref.named_parameters())
    for fqn, layer in peft_lora_layers(model).items():
        name = fqn.replace("base_model.model.", "")
        W = layer.base_layer.weight.double()
        A, B = layer.lora_A["default"].weight.double(), layer.lora_B["default"].weight.double()
        s = layer.scaling["default"]
        with torch.no_grad():
            state[f"{name}.weight"].copy_(W + s * (B @ A) * (W != 0))
    return ref(ids).logits


def assert_restores_the_same_model(trained_model, path):
    """``restore_adapters(fresh pruned base, path)`` computes what ``trained_model`` computes."""
    ids = torch.randint(0, 128, (2, 12))
    fresh = build_toy_llama(seed=0)
    restore_adapters(fresh, path)
    assert len(lors_modules(fresh)) == len(lors_modules(trained_model))
    with torch.no_grad():
        torch.testing.assert_close(fresh(input_ids=ids).logits,
                                   trained_model(input_ids=ids).logits, rtol=1e-5, atol=1e-5)


def train_steps(model, steps=3, lr=1e-2):
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    for batch in toy_batches(steps, batch_size=2, seq_len=16):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return params


def test_optimize_converts_every_peft_layer_in_place_and_never_adapts_an_adapter():
    model = peft_llama()
    names_before = [n for n, _ in model.named_parameters()]
    lora_params = {id(p) for n, p in model.named_parameters() if "lora_" in n}
    optimize(model, LorsConfig(), compile=False)
    adapters = lors_modules(model)
    assert len(adapters) == 14 and all(isinstance(a, PeftSite) for a in adapters.values())
    assert not any("lora_A" in n or "lora_B" in n for n in adapters)  # not PEFT's own linears
    # PEFT's parameters, same objects, same names: optimizer groups and save_pretrained hold
    assert [n for n, _ in model.named_parameters()] == names_before
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == lora_params
    ids = torch.randint(0, 128, (2, 12))
    torch.testing.assert_close(model(input_ids=ids).logits.double(), reference_logits(model, ids),
                               rtol=1e-4, atol=1e-4)


def test_training_keeps_the_mask_and_save_pretrained_keeps_the_trained_values(tmp_path):
    model = peft_llama()
    masks = plain_masks(model)
    optimize(model, LorsConfig(), compile=False)
    params = train_steps(model)
    assert all(p.grad is None for p in params)  # zero_grad ran; the step changed them
    model.save_pretrained(tmp_path / "peft")
    from safetensors.torch import load_file

    saved = load_file(os.path.join(tmp_path, "peft", "adapter_model.safetensors"))
    live = dict(model.named_parameters())
    for key, value in saved.items():
        torch.testing.assert_close(value, live[key.replace(".weight", ".default.weight")],
                                   rtol=0, atol=0)
    plain = merge(model)
    assert type(plain).__name__ == "LlamaForCausalLM" and not peft_lora_layers(plain)
    for name, mask in plain_masks(plain).items():
        assert torch.equal(mask, masks[name]), name  # no new nonzero, no lost one


def test_merge_returns_a_sparse_plain_model_with_the_trained_outputs():
    model = peft_llama()
    masks = plain_masks(model)
    optimize(model, LorsConfig(), compile=False)
    train_steps(model)
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        trained = model(input_ids=ids).logits
    plain = merge(model)
    with torch.no_grad():
        torch.testing.assert_close(plain(input_ids=ids).logits, trained, rtol=1e-5, atol=1e-5)
    assert all(torch.equal(m, masks[n]) for n, m in plain_masks(plain).items())
    assert lors_fx.state_of(plain) is None and all(not p.requires_grad or "lora" not in n
                                                   for n, p in plain.named_parameters())


def test_peft_merge_and_unload_on_a_converted_model_keeps_the_zeros():
    model = peft_llama()
    masks = plain_masks(model)
    optimize(model, LorsConfig(), compile=False)
    plain = model.merge_and_unload()
    assert all(torch.equal(m, masks[n]) for n, m in plain_masks(plain).items())


def test_peft_merge_and_unload_without_lors_fills_pruned_positions():
    """What the README warns of: PEFT's own merge writes B@A densely."""
    model = peft_llama()
    masks = plain_masks(model)
    plain = model.merge_and_unload()
    new = sum(int((m & ~masks[n]).sum()) for n, m in plain_masks(plain).items())
    assert new > 0


def test_compiled_path_equals_eager_on_a_peft_model():
    eager, compiled = peft_llama(), peft_llama()
    optimize(eager, LorsConfig(), compile=False)
    optimize(compiled, LorsConfig(), compile=True)
    [batch] = toy_batches(1, batch_size=2, seq_len=16)
    losses = []
    for model in (eager, compiled):
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    grads = [{n: p.grad for n, p in m.named_parameters() if p.requires_grad}
             for m in (eager, compiled)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 28
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-4, atol=1e-6)
    report = lors_fx.report(compiled)
    assert "rewrite_masked_adapters" in str(report)


def test_gradient_init_on_peft_layers_keeps_the_output():
    model = peft_llama()
    ids = torch.randint(0, 128, (2, 12))
    base_logits = build_toy_llama(seed=0)(input_ids=ids).logits
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_A" in n}
    optimize(model, LorsConfig(init="gradient", init_samples=4), compile=False,
             init_data=toy_batches(2, batch_size=2, seq_len=16))
    after = {n: p for n, p in model.named_parameters() if "lora_A" in n}
    assert all(not torch.equal(before[n], after[n]) for n in before)
    assert all(float(p.detach().abs().max()) == 0 for n, p in model.named_parameters()
               if "lora_B" in n)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=ids).logits, base_logits, rtol=0, atol=1e-6)


def test_remove_adapters_gives_peft_its_dense_forward_back():
    model = peft_llama()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        dense = model(input_ids=ids).logits
        optimize(model, LorsConfig(), compile=False)
        masked = model(input_ids=ids).logits
        assert not torch.allclose(masked, dense)
        remove_adapters(model)
        torch.testing.assert_close(model(input_ids=ids).logits, dense, rtol=0, atol=0)
    assert not lors_modules(model) and lors_fx.state_of(model) is None
    assert all(SITE_ATTRIBUTE not in m.__dict__ for m in model.modules())


@pytest.mark.parametrize("case", ["dora", "convert_off", "targets", "two_active"])
def test_refusals_change_nothing(case):
    model = peft_llama(use_dora=(case == "dora"))
    config = LorsConfig()
    if case == "convert_off":
        config = LorsConfig(convert_peft=False)
    elif case == "targets":
        config = LorsConfig(target_modules=["q_proj"])
    elif case == "two_active":
        model.add_adapter("other", peft.LoraConfig(r=4, target_modules=["q_proj"]))
        model.base_model.set_adapter(["default", "other"])
    snap = snapshot(model)
    expected = {"dora": "DoRA", "convert_off": "convert_peft=False",
                "targets": "target_modules", "two_active": "active adapters"}[case]
    with pytest.raises(ValueError, match=expected):
        optimize(model, config, compile=False)
    assert_unchanged(model, snap)
    assert all(SITE_ATTRIBUTE not in m.__dict__ for m in model.modules())


def test_dense_base_layers_stay_peft_lora_and_are_named():
    base = build_toy_llama(seed=0)
    torch.manual_seed(3)
    base.model.layers[0].self_attn.q_proj.weight.data.normal_()  # a dense layer
    model = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=TARGETS))
    with pytest.warns(UserWarning, match=r"layers\.0\.self_attn\.q_proj \(dense base"):
        optimize(model, LorsConfig(), compile=False)
    assert len(lors_modules(model)) == 13


def test_restore_adapters_reads_a_peft_directory(tmp_path):
    """A PEFT-saved adapter (here after LoRS training) comes back as LoRS adapters on the plain
    base and computes what the trained PEFT model computed."""
    model = peft_llama()
    optimize(model, LorsConfig(), compile=False)
    train_steps(model)
    model.save_pretrained(tmp_path)
    assert_restores_the_same_model(model, str(tmp_path))


def test_restore_adapters_refuses_peft_options_lors_cannot_represent(tmp_path):
    model = peft_llama(use_dora=True)
    model.save_pretrained(tmp_path)
    fresh = build_toy_llama(seed=0)
    snap = snapshot(fresh)
    with pytest.raises(ValueError, match="use_dora"):
        restore_adapters(fresh, str(tmp_path))
    assert_unchanged(fresh, snap)


def test_lors_fx_files_round_trip_from_a_peft_model_and_peft_refuses_them(tmp_path):
    model = peft_llama()
    optimize(model, LorsConfig(), compile=False)
    train_steps(model)
    names = save_adapters(model, str(tmp_path))
    assert names[0].startswith("model.layers.")  # the base model's names, not the PeftModel's
    assert_restores_the_same_model(model, str(tmp_path))
    with pytest.raises(KeyError, match="restore_adapters"):
        peft.PeftModel.from_pretrained(build_toy_llama(seed=0), str(tmp_path))


def test_merge_of_an_unconverted_peft_model_masks_sparse_layers():
    """Trained through torch.compile(backend=lors_fx.backend(...)) the PEFT layers stay PEFT's;
    lors_fx.merge still merges them under the mask."""
    model = peft_llama()
    masks = plain_masks(model)
    plain = merge(model)
    assert all(torch.equal(m, masks[n]) for n, m in plain_masks(plain).items())


def test_hf_trainer_checkpoint_restores_as_lors_adapters(tmp_path):
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="the HF Trainer needs accelerate")
    model = peft_llama()
    optimize(model, LorsConfig(), compile=False)
    batches = toy_batches(4, batch_size=1, seq_len=16)
    rows = [{k: v[0] for k, v in b.items()} for b in batches]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, save_steps=2,
                                          per_device_train_batch_size=2, learning_rate=1e-2,
                                          report_to=[], use_cpu=True, logging_steps=1,
                                          disable_tqdm=True)
    transformers.Trainer(model=model, args=args, train_dataset=rows).train()
    checkpoint = tmp_path / "checkpoint-2"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert_restores_the_same_model(model, str(checkpoint))


def test_conv1d_bases_convert_with_the_mask_along_the_true_input(gpt2):
    masks = {n: (p != 0) for n, p in gpt2.named_parameters() if p.dim() == 2}
    model = peft.get_peft_model(gpt2, peft.LoraConfig(r=2, target_modules=["c_attn", "c_fc"],
                                                      fan_in_fan_out=True))
    optimize(model, LorsConfig(), compile=False)
    assert len(lors_modules(model)) == 2
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_()
    plain = merge(model)
    for name, param in plain.named_parameters():
        if name in masks and "wte" not in name and "wpe" not in name:
            assert torch.equal(param != 0, masks[name]), name


def test_find_targets_skips_peft_adapter_linears():
    model = peft_llama()
    found = lors_fx.find_targets(model, LorsConfig())
    assert found and not any(".lora_" in name for name, _ in found)


def test_half_precision_base_keeps_fp32_peft_adapters_working():
    model = peft_llama(dtype=torch.bfloat16)
    optimize(model, LorsConfig(), compile=False)
    train_steps(model, steps=2)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert isinstance(next(iter(lors_modules(model).values())), PeftSite)


def test_peft_reloaded_for_inference_converts_and_trains_again(tmp_path):
    """PeftModel.from_pretrained (is_trainable=False freezes the adapters) + optimize: the
    converted layers train again, under the mask."""
    model = peft_llama()
    model.save_pretrained(tmp_path)
    masks = plain_masks(model)
    loaded = peft.PeftModel.from_pretrained(build_toy_llama(seed=0), str(tmp_path))
    assert not any(p.requires_grad for p in loaded.parameters())
    optimize(loaded, LorsConfig(), compile=False)
    params = train_steps(loaded, steps=2)
    assert len(params) == 28
    plain = merge(loaded)
    assert all(torch.equal(m, masks[n]) for n, m in plain_masks(plain).items())


def test_a_converted_model_deep_copies_and_pickles_with_its_masked_layers():
    import copy
    import io

    model = peft_llama()
    optimize(model, LorsConfig(), compile=False)
    ids = torch.randint(0, 128, (1, 8))
    with torch.no_grad():
        expected = model(input_ids=ids).logits
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        for other in (copy.deepcopy(model), torch.load(buffer, weights_only=False)):
            sites = lors_modules(other)
            assert len(sites) == 14
            assert all(site.layer is other.get_submodule(name) for name, site in sites.items())
            torch.testing.assert_close(other(input_ids=ids).logits, expected, rtol=0, atol=0)


def test_the_core_merge_refuses_peft_layers_and_points_to_lors_fx_merge():
    from lors_fx.adapters import merge_adapters

    model = peft_llama()
    optimize(model, LorsConfig(), compile=False)
    snap = snapshot(model)
    with pytest.raises(ValueError, match="use lors_fx.merge"):
        merge_adapters(model)
    assert_unchanged(model, snap)
