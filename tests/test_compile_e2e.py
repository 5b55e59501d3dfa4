"""End to end: tiny pruned HF causal LMs through ``optimize(model, config, compile=True)``.

Per model (Llama, Qwen2, Mistral, Gemma3 text, GPT-2; 50% unstructured, and 2:4 for two of them):
one dynamo graph and no graph break; every adapted linear rewritten to the lors op; loss and
adapter gradients equal the eager path (``compile=False`` on a copy: the same op, so fp32
tolerance); the partitioned forward saves no W'-sized tensor and fewer bytes than the
un-rewritten graph; ``state_dict`` keys unchanged; 20 AdamW steps match eager training and keep
the zero pattern (audit of the merged weights); ``generate()`` works (Llama). Also: block
checkpointing inside the backend, and the HF Trainer on a compiled model (needs ``accelerate``).

About 3-4 minutes on 2 busy CPU cores; each case compiles one graph (dynamo, aot_autograd, and
the side trace of the un-rewritten graph for the "before" bytes).
"""
import copy

import pytest
import torch

import lors_fx
from lors_fx import LorsConfig, audit, lors_modules, merge, optimize, snapshot_masks

from lors_fx.testing.tiny_models import build_model, random_batch
from lors_fx.compiler import compile_state_of

CASES = [("llama", "50%"), ("qwen2", "50%"), ("mistral", "50%"), ("gemma3", "50%"),
         ("gpt2", "50%"), ("llama", "2:4"), ("gpt2", "2:4")]
# batch*seq = 24 rows: no activation shares a 2-D shape with a weight (32/64/128 wide)
BATCH, SEQ, STEPS = 2, 12, 20


pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def _loss_and_grads(model, batch):
    model.zero_grad(set_to_none=True)
    loss = model(**batch).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                           if p.grad is not None}


@pytest.mark.parametrize("name,pattern", CASES, ids=[f"{n}-{p}" for n, p in CASES])
def test_compiled_training_equals_eager_and_saves_no_w_prime(name, pattern):
    model = build_model(name, pattern)
    masks = snapshot_masks(model)
    config = LorsConfig(r=4, lora_alpha=8.0)
    eager = optimize(copy.deepcopy(model), config, compile=False)
    optimize(model, config, compile=True)
    torch.manual_seed(1)
    for module in lors_modules(model).values():  # nonzero B so that W' != W
        torch.nn.init.normal_(module.lora_B, std=0.05)
    eager.load_state_dict(model.state_dict())  # same adapters (their init is random)
    assert list(model.state_dict()) == list(eager.state_dict())  # no _orig_mod. prefix
    adapted = lors_modules(model)
    assert len(adapted) == (8 if name == "gpt2" else 14)

    batch = random_batch(BATCH, SEQ)
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads)
    assert all(n.endswith(("lora_A", "lora_B")) for n in grads)  # everything else frozen
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6)

    result = lors_fx.report(model)
    assert result.compiled and result.fallback is None
    assert result.graph_breaks == 0 and result.recompiles == 0 and len(result.graphs) == 1
    assert sorted(s.fqn for s in result.sites) == sorted(adapted)
    assert result.rewritten == len(adapted)
    assert all(s.pattern == ("2:4" if pattern == "2:4" else "unstructured")
               for s in result.sites)
    forward = result.graphs[0]["forward"]
    assert forward.code.count("torch.ops.lors.sparse_lora_linear.default(") == len(adapted)
    weight_shapes = {tuple(sorted(s.shape)) for s in result.sites}
    dense = [r for r in result.saved_after if r["kind"] != "parameter"
             and tuple(sorted(r["shape"])) in weight_shapes]
    assert not dense, dense
    assert [r for r in result.saved_before if r["kind"] != "parameter"
            and tuple(sorted(r["shape"])) in weight_shapes]  # the naive form saved W'
    assert result.saved_bytes_after < result.saved_bytes_before

    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2)
                  for m in (model, eager)]
    for step in range(STEPS):
        step_batch = random_batch(BATCH, SEQ, seed=step + 1)
        for m, optimizer in zip((model, eager), optimizers):
            optimizer.zero_grad(set_to_none=True)
            m(**step_batch).loss.backward()
            optimizer.step()
    state = compile_state_of(model)
    assert len(state.graphs) == 1 and state.graph_breaks == 0 and state.fallback is None
    for (key, value), (ref_key, ref_value) in zip(model.state_dict().items(),
                                                  eager.state_dict().items()):
        assert key == ref_key
        torch.testing.assert_close(value, ref_value, rtol=1e-4, atol=1e-5)
    assert audit(merge(copy.deepcopy(model)), masks).ok

    if name == "llama" and pattern == "50%":
        model.eval()
        eager.eval()
        prompt = batch["input_ids"][:1, :5]
        out = model.generate(prompt, max_new_tokens=4, do_sample=False)
        assert out.shape == (1, 9)
        assert torch.equal(out, eager.generate(prompt, max_new_tokens=4, do_sample=False))
        assert len(state.graphs) == 1  # generation ran the eager op path


def test_block_checkpointing_runs_inside_the_backend():
    model = build_model("llama", "50%")
    config = LorsConfig(r=4, checkpoint="block")
    eager = optimize(copy.deepcopy(model), config, compile=False)
    optimize(model, config, compile=True)
    torch.manual_seed(1)
    for module in lors_modules(model).values():
        torch.nn.init.normal_(module.lora_B, std=0.05)
    eager.load_state_dict(model.state_dict())  # same adapters (their init is random)
    batch = random_batch(BATCH, SEQ)
    loss, grads = _loss_and_grads(model, batch)
    ref_loss, ref_grads = _loss_and_grads(eager, batch)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for key in ref_grads:
        torch.testing.assert_close(grads[key], ref_grads[key], rtol=1e-5, atol=1e-6)
    record = compile_state_of(model).graphs[0]
    (joint,) = record.joint_passes
    assert joint.name == "insert_checkpoints" and joint.count > 0
    assert joint.details["blocks_checkpointed"] == ["model.layers.0", "model.layers.1"]
    result = lors_fx.report(model)
    assert result.rewritten == 14 and result.graph_breaks == 0
    assert any(p["name"] == "insert_checkpoints" for p in result.passes)
    # "before" is partitioned with the same checkpoint tags: W' is recomputed there too
    assert result.saved_bytes_after <= result.saved_bytes_before
    weight_shapes = {tuple(sorted(s.shape)) for s in result.sites}
    assert not [r for r in result.saved_after if r["kind"] != "parameter"
                and tuple(sorted(r["shape"])) in weight_shapes]
    # the checkpointed blocks' lors ops run again in the backward
    backward = result.graphs[0]["backward"].code
    assert backward.count("torch.ops.lors.sparse_lora_linear.default(") >= 2 * 4  # 12 of 14


def test_hf_trainer_trains_the_compiled_model(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (optional: pip install "
                                              "'lors-fx[dev]'): the HF Trainer needs it")
    from transformers import Trainer, TrainingArguments

    model = build_model("llama", "50%")
    masks = snapshot_masks(model)
    optimize(model, LorsConfig(r=4), compile=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    data = [{k: v[0] for k, v in random_batch(1, SEQ, seed=i).items()} for i in range(8)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                             learning_rate=1e-2, report_to=[], save_strategy="no",
                             logging_steps=1, use_cpu=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    output = trainer.train()
    assert output.global_step == 3 and output.training_loss > 0
    state = compile_state_of(model)
    assert len(state.graphs) == 1 and state.graph_breaks == 0 and state.fallback is None
    assert lors_fx.report(model).rewritten == 14
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
    assert audit(merge(copy.deepcopy(model)), masks).ok
