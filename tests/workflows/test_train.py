"""lors_fx.workflows.train: schedule, accumulation, checkpoints, methods, the HF Trainer recipe, the CLI."""
import json
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


def _cli_base(tmp_path):
    """A tiny model directory with a byte-level tokenizer (no hub, fast) and a 12-document
    corpus; returns the ``lors-fx train`` arguments before ``--out``'s value."""
    from transformers import LlamaConfig, LlamaForCausalLM

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
    return ["train", str(tmp_path / "base"), "--prune", "magnitude", "--data", str(text),
            "--batch-size", "2", "--block-size", "32", "-r", "4", "--init-samples", "2",
            "--no-progress"]


def test_cli_train_writes_adapters(tmp_path, capsys):
    from lors_fx import cli

    out = tmp_path / "run"
    code = cli.main([*_cli_base(tmp_path), "--out", str(out), "--steps", "2"])
    assert code == 0, capsys.readouterr().err
    assert (out / "adapters" / "adapter_model.safetensors").is_file()
    assert (out / "base" / "config.json").is_file()
    assert load_adapter_config(str(out / "adapters")).init == "gradient"


def test_bf16_model_trains_in_bf16():
    """The bf16 base computes in bf16; its adapters are float32 (LorsConfig.adapter_dtype)."""
    model = build_toy_llama(seed=0).to(torch.bfloat16)
    prepare_model(model, "lors", r=4, init="zeros")
    result = train(model, toy_batches(2, batch_size=4, seq_len=16),
                   TrainConfig(steps=4, batch_size=4, lr=1e-2, progress=False))
    assert all(p.dtype == torch.float32 for p in model.parameters() if p.requires_grad)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters() if not p.requires_grad)
    assert result.losses[-1] < result.losses[0]


def test_train_stops_on_a_non_finite_loss():
    """A NaN adapter entry makes the loss NaN (the op no longer scrubs it away), and the loop
    raises instead of training a dead model."""
    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=4, init="zeros")
    with torch.no_grad():
        lors_modules(model)["model.layers.0.mlp.down_proj"].lora_A[0, 1] = float("nan")
    with pytest.raises(FloatingPointError, match="loss is nan at step 1"):
        train(model, _blocks(8), TrainConfig(steps=3, batch_size=4, progress=False))


def test_cli_train_resume_ends_with_the_adapters_of_an_uninterrupted_run(tmp_path, capsys,
                                                                       monkeypatch):
    """``lors-fx train --save-every 2``, stopped by SIGTERM in step 3 (exit 143, checkpoint-3
    saved), then ``--resume OUT``: the final adapter file equals an uninterrupted run's, bit for
    bit (same process, same thread count; the checkpoint holds optimizer, schedule, step, data
    position and RNG)."""
    import os
    import signal

    from safetensors.torch import load_file

    from lors_fx import cli
    from lors_fx.cli import train as cli_train

    args = [*_cli_base(tmp_path), "--steps", "5", "--save-every", "2", "--eval-every", "2"]
    # each run as in a fresh process: the gradient init's random projection (svd_lowrank) draws
    # from the global RNG, which --seed does not set; the resumed run's init is overwritten
    torch.manual_seed(0)
    assert cli.main([*args, "--out", str(tmp_path / "a")]) == 0, capsys.readouterr().err
    real_train, calls = cli_train.train, [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == 3:  # first micro-batch of step 3
            os.kill(os.getpid(), signal.SIGTERM)
        return model(**batch).loss

    monkeypatch.setattr(cli_train, "train", lambda *a, **k: real_train(*a, loss_fn=loss_fn, **k))
    capsys.readouterr()
    torch.manual_seed(0)
    assert cli.main([*args, "--out", str(tmp_path / "b")]) == 128 + signal.SIGTERM
    err = capsys.readouterr().err
    assert "stopped by SIGTERM after step 3/5" in err and f"--resume {tmp_path / 'b'}" in err
    assert sorted(os.listdir(tmp_path / "b")) == ["base", "checkpoint-2", "checkpoint-3"]
    monkeypatch.setattr(cli_train, "train", real_train)
    code = cli.main([*args, "--out", str(tmp_path / "b"), "--resume", str(tmp_path / "b"),
                     "--json", str(tmp_path / "b.json")])
    assert code == 0, capsys.readouterr().err
    expected = load_file(str(tmp_path / "a" / "adapters" / "adapter_model.safetensors"))
    got = load_file(str(tmp_path / "b" / "adapters" / "adapter_model.safetensors"))
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in expected)
    summary = json.loads((tmp_path / "b.json").read_text())
    assert summary["resumed_from"] == str(tmp_path / "b" / "checkpoint-3")
    assert summary["steps"] == 5 and len(summary["losses"]) == 5


def test_cli_train_sigterm_in_a_subprocess_saves_and_exits_143(tmp_path):
    """A real SIGTERM to a running ``lors-fx train``: it saves a checkpoint and exits with 143."""
    import os
    import signal
    import subprocess
    import sys
    import time
    from pathlib import Path

    from lors_fx.workflows.checkpoint import TRAINER_STATE_NAME, find_checkpoint

    out = tmp_path / "run"
    command = [sys.executable, "-m", "lors_fx.cli.main", *_cli_base(tmp_path), "--out", str(out),
               "--steps", "100000", "--save-every", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore")
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, env=env, cwd=Path(__file__).resolve().parents[2])
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint-1" / TRAINER_STATE_NAME).is_file():  # training is running
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    assert "stopped by SIGTERM" in stderr and "--resume" in stderr
    latest = find_checkpoint(str(out))
    state = json.loads((Path(latest) / TRAINER_STATE_NAME).read_text())
    assert latest.endswith(f"checkpoint-{state['step']}") and 1 <= state["step"] < 100000
    assert not [p for p in os.listdir(out) if p.endswith((".tmp", ".old"))]
    assert not (out / "adapters").exists()


def test_train_stops_on_a_non_finite_gradient_the_loss_hides():
    """A NaN in a q_proj adapter stays out of the loss (CPU attention drops it) but not out of
    the gradients: the loop stops on the gradient norm."""
    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=4, init="zeros")
    with torch.no_grad():
        lors_modules(model)["model.layers.0.self_attn.q_proj"].lora_B[0, 1] = float("nan")
    batches = toy_batches(1, batch_size=2, seq_len=8)
    with pytest.raises(FloatingPointError, match="gradient norm is nan at step 1"):
        train(model, batches, TrainConfig(steps=2, batch_size=2, progress=False))



@pytest.mark.parametrize("init", ["zeros", "gradient"])
def test_cli_train_seed_decides_the_adapters_init(tmp_path, capsys, init):
    """--seed seeds the adapters' init (PEFT's Kaiming lora_A, the gradient init's randomized
    SVD): the same seed twice gives the same adapters bit for bit, another seed other ones."""
    from safetensors.torch import load_file

    from lors_fx import cli

    runs = []
    for name, seed in (("first", 3), ("again", 3), ("other", 4)):
        out = tmp_path / name
        argv = [*_cli_base(tmp_path), "--out", str(out), "--steps", "1", "--seed", str(seed),
                "--init", init]
        torch.randn(7 + len(runs))  # a different global RNG state for each run
        code = cli.main(argv)
        assert code == 0, capsys.readouterr().err
        runs.append(load_file(str(out / "adapters" / "adapter_model.safetensors")))
    assert runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][key], runs[1][key]) for key in runs[0])
    lora_A = [key for key in runs[0] if "lora_A" in key]
    assert any(not torch.equal(runs[0][key], runs[2][key]) for key in lora_A)
