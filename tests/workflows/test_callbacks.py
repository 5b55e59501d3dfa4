"""lors_fx.workflows.callbacks: StopOnNonFiniteLoss stops a diverged HF Trainer run."""
import math
from types import SimpleNamespace

import pytest
import torch
from transformers import TrainerCallback

from lors_fx import lors_modules
from lors_fx.testing.toy import build_toy_llama, toy_batches
from lors_fx.workflows.callbacks import StopOnNonFiniteLoss
from lors_fx.workflows.data import TextBlocks
from lors_fx.workflows.train import prepare_model


def _trainer(tmp_path, model, callbacks, steps=3):
    from transformers import Trainer, TrainingArguments

    batches = toy_batches(1, batch_size=8, seq_len=16, seed=1)
    ids = batches[0]["input_ids"]
    data = TextBlocks(ids, ids.clone(), torch.zeros_like(ids, dtype=torch.int32))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=steps, learning_rate=1e-2,
                             per_device_train_batch_size=4, logging_steps=1, save_strategy="no",
                             report_to=[], remove_unused_columns=False, use_cpu=True,
                             disable_tqdm=True)
    return Trainer(model=model, args=args, train_dataset=data, callbacks=callbacks)


def _lors_llama():
    model = build_toy_llama(seed=0)
    prepare_model(model, "lors", r=4, init="zeros")
    return model


def test_a_finite_run_is_not_stopped(tmp_path):
    output = _trainer(tmp_path, _lors_llama(), [StopOnNonFiniteLoss()]).train()
    assert output.global_step == 3 and math.isfinite(output.training_loss)


def test_a_nan_adapter_stops_before_the_optimizer_step(tmp_path):
    """NaN loss -> NaN gradients: raised before the optimizer writes them into the adapters
    (the Trainer's logged loss stays finite: it filters NaN steps out by default)."""
    model = _lors_llama()
    module = lors_modules(model)["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        module.lora_A[0, 1] = float("nan")
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(FloatingPointError, match="non-finite gradients before optimizer step 1"):
        _trainer(tmp_path, model, [StopOnNonFiniteLoss()]).train()
    for name, param in model.named_parameters():
        if param.requires_grad:  # the optimizer never ran
            assert torch.equal(param.isnan(), before[name].isnan()), name


class _CorruptAfterStep(TrainerCallback):
    """Turns one adapter entry into inf after the second optimizer step."""

    def __init__(self, module):
        self.module = module

    def on_optimizer_step(self, args, state, control, **kwargs):
        if state.global_step == 1:
            with torch.no_grad():
                self.module.lora_B[2, 0] = float("inf")


def test_a_parameter_that_became_non_finite_stops_the_run(tmp_path):
    model = _lors_llama()
    module = lors_modules(model)["model.layers.1.self_attn.v_proj"]
    callbacks = [_CorruptAfterStep(module), StopOnNonFiniteLoss(check_gradients=False)]
    with pytest.raises(FloatingPointError, match=r"became non-finite at step 2: "
                                                 r"model\.layers\.1\.self_attn\.v_proj\.lora_B"):
        _trainer(tmp_path, model, callbacks).train()


@pytest.mark.parametrize("key", ["loss", "eval_loss"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_logged_loss_raises(key, value):
    callback = StopOnNonFiniteLoss()
    state = SimpleNamespace(global_step=7)
    callback.on_log(None, state, None, logs={"loss": 1.0, "learning_rate": float("nan")})
    with pytest.raises(FloatingPointError, match=rf"{key} = {value} at step 7"):
        callback.on_log(None, state, None, logs={key: value})
