"""lors_fx.workflows.train: schedule, accumulation, checkpoints, methods, the HF Trainer recipe, the CLI."""
import math

import pytest
import torch

from lors_fx import load_adapter_config, load_adapters, lors_modules, optimize
from lors_fx.workflows.data import TextBlocks
from lors_fx.workflows.train import (TrainConfig, cosine_with_warmup, mean_loss, prepare_model, train)

from lors_fx.testing.toy import build_toy_llama, toy_batches
from lors_fx.state import state_of


def _blocks(n=16, seq_len=16, seed=0):
    batches = toy_batches(1, batch_size=n, seq_len=seq_len, seed=seed)
    ids = batches[0]["input_ids"]
    return TextBlocks(ids, ids.clone(), torch.zeros_like(ids, dtype=torch.int32))


def _adapter_state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def test_cosine_with_warmup_shape():
    total, warmup = 20, 4
    values = [cosine_with_warmup(s, total, warmup, min_ratio=0.1) for s in range(total)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == pytest.approx(1.0)
    assert all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[-1] > 0.1 and cosine_with_warmup(total, total, warmup, 0.1) == pytest.approx(0.1)
    # halfway through the decay the multiplier is halfway between 1 and min_ratio
    assert cosine_with_warmup(12, total, warmup, 0.0) == pytest.approx(0.5)


@pytest.mark.parametrize("field,value", [("steps", 0), ("batch_size", -1), ("lr", 0.0),
                                         ("warmup_ratio", 1.0), ("max_grad_norm", 0.0),
                                         ("grad_accum", 1.5), ("save_every", 2)])
def test_train_config_rejects(field, value):
    with pytest.raises(ValueError, match=f"TrainConfig.{field}"):
        TrainConfig(**{field: value})


def test_lors_training_lowers_the_eval_loss_and_records_lrs():
    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=8, init="zeros")
    train_blocks, eval_blocks = _blocks(32, seed=1), _blocks(8, seed=2)
    before = mean_loss(model, eval_blocks)
    config = TrainConfig(steps=12, batch_size=8, lr=1e-2, warmup_steps=2, progress=False,
                         eval_every=6)
    result = train(model, train_blocks, config, eval_data=eval_blocks)
    after = mean_loss(model, eval_blocks)
    assert after < before - 0.05
    assert result.steps == 12 and len(result.losses) == 12 and result.tokens == 12 * 8 * 16
    assert [e["step"] for e in result.evals] == [6, 12]
    assert result.evals[-1]["eval_loss"] == pytest.approx(after, rel=1e-6)
    expected = [1e-2 * cosine_with_warmup(s, 12, 2) for s in range(12)]
    assert result.lrs == pytest.approx(expected)
    assert result.tokens_per_second > 0


def test_gradient_accumulation_matches_one_big_batch():
    data = _blocks(16, seed=3)
    states = []
    for batch_size, accum in ((8, 1), (4, 2)):
        model = build_toy_llama(seed=0)
        prepare_model(model, "lors", r=4, init="zeros")
        train(model, data, TrainConfig(steps=3, batch_size=batch_size, grad_accum=accum, lr=1e-2,
                                       progress=False, seed=5))
        states.append(_adapter_state(model))
    assert states[0].keys() == states[1].keys()
    for name in states[0]:
        torch.testing.assert_close(states[0][name], states[1][name], atol=2e-5, rtol=1e-4)


def test_checkpoints_reload_bit_exact(tmp_path):
    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=4, init="zeros")
    result = train(model, _blocks(8), TrainConfig(steps=4, batch_size=4, save_every=2,
                                                  output_dir=str(tmp_path), progress=False))
    assert [p.rsplit("/", 1)[-1] for p in result.checkpoints] == \
        ["checkpoint-2", "checkpoint-4", "adapters"]
    fresh = build_toy_llama(seed=0)
    optimize(fresh, load_adapter_config(result.checkpoints[-1]), compile=False)
    load_adapters(fresh, result.checkpoints[-1])
    for name, param in _adapter_state(model).items():
        assert torch.equal(dict(fresh.named_parameters())[name], param), name


def test_gradient_init_is_the_lors_default_and_keeps_the_output():
    model = build_toy_llama(seed=0)
    batch = toy_batches(1, batch_size=4, seq_len=16, seed=7)[0]
    with torch.no_grad():
        reference = model(input_ids=batch["input_ids"]).logits
    prepare_model(model, "lors", r=4, init_data=[batch], init_samples=4, progress=False)
    assert state_of(model).config.init == "gradient"
    for module in lors_modules(model).values():
        assert torch.count_nonzero(module.lora_B) == 0
        gram = module.lora_A @ module.lora_A.t()  # orthogonal rows of PEFT's norm 1/sqrt(3)
        torch.testing.assert_close(gram, torch.eye(4) / 3, atol=1e-4, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batch["input_ids"]).logits, reference)


def test_prepare_model_errors():
    with pytest.raises(ValueError, match="init_data"):
        prepare_model(build_toy_llama(), "lors")
    with pytest.raises(ValueError, match="only 'zeros'"):
        prepare_model(build_toy_llama(), "sqft", init="gradient")
    with pytest.raises(ValueError, match="method"):
        prepare_model(build_toy_llama(), "dora")
    with pytest.raises(ValueError, match="trainable"):
        train(build_toy_llama().requires_grad_(False), _blocks(4), TrainConfig(steps=1))


def test_a_failed_gradient_init_leaves_the_model_as_it_was():
    """prepare_model's gradient init (with its own memory budget) rolls back as optimize does."""
    model = build_toy_llama(seed=0)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    types = [type(m) for m in model.modules()]
    ids = torch.full((1, 8), 10_000)  # outside the vocabulary: the forward fails
    with pytest.raises(IndexError):
        prepare_model(model, "lors", r=4, init_data=[{"input_ids": ids, "labels": ids}],
                      progress=False)
    assert not lors_modules(model) and state_of(model) is None
    assert [type(m) for m in model.modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags


@pytest.mark.parametrize("method", ["sqft", "spp", "lora"])
def test_baselines_train_only_their_adapters(method):
    model = build_toy_llama(seed=0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    prepare_model(model, method, r=4)
    result = train(model, _blocks(8), TrainConfig(steps=2, batch_size=4, lr=1e-2,
                                                  progress=False))
    assert all(math.isfinite(x) for x in result.losses)
    now = dict(model.named_parameters())
    for name, value in frozen.items():  # base weights keep their names and bits
        assert torch.equal(now[name], value), name
    trainable = [n for n, p in now.items() if p.requires_grad]
    assert trainable and all(n not in frozen for n in trainable)


def test_hf_trainer_recipe_runs_two_steps(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=4, init="zeros")
    before = _adapter_state(model)
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, learning_rate=1e-2,
                             per_device_train_batch_size=4, gradient_accumulation_steps=1,
                             lr_scheduler_type="cosine", warmup_steps=0.0, logging_steps=1,
                             save_strategy="no", report_to=[], remove_unused_columns=False,
                             use_cpu=True, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_blocks(8))
    output = trainer.train()
    assert output.global_step == 2 and math.isfinite(output.training_loss)
    after = _adapter_state(model)
    assert any(not torch.equal(before[n], after[n]) for n in before if n.endswith("lora_B"))


def test_cli_train_writes_adapters(tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from lors_fx import cli
    # a tiny model directory with a byte-level tokenizer: no hub, fast
    from tests.workflows.test_evaluate import byte_tokenizer

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, vocab_size=257,
                                         eos_token_id=256, bos_token_id=256, pad_token_id=256))
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    text = tmp_path / "corpus.txt"  # 12 documents separated by blank lines
    text.write_text("\n\n".join(f"Document {i}: the quick brown fox jumps over the lazy dog "
                                  f"{i} times while the cat sleeps." for i in range(12)))
    out = tmp_path / "run"
    code = cli.main(["train", str(tmp_path / "base"), "--out", str(out), "--prune", "magnitude",
                     "--data", str(text),
                     "--steps", "2", "--batch-size", "2", "--block-size", "32", "-r", "4",
                     "--init-samples", "2", "--no-progress"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "config.json").is_file()
    assert load_adapter_config(str(out / "adapters")).init == "gradient"


def test_bf16_model_trains_in_bf16():
    model = build_toy_llama(seed=0).to(torch.bfloat16)
    prepare_model(model, "lors", r=4, init="zeros")
    result = train(model, toy_batches(2, batch_size=4, seq_len=16),
                   TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False))
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if p.requires_grad)
    assert result.losses[-1] < result.losses[0]
