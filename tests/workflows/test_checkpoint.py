"""Resumable training checkpoints: a stopped run (crash, failed save, SIGTERM) resumed from its
checkpoint ends with the same adapters, bit for bit, as a run that was never stopped; saves are
atomic; loading runs no code; a checkpoint of another run is refused."""
import os
import signal
import threading

import pytest
import torch
from safetensors.torch import load_file

from lors_fx.workflows import checkpoint as ckpt
from lors_fx.workflows.data import TextBlocks
from lors_fx.workflows.train import (TrainConfig, TrainingInterrupted, _cycle_batches,
                                     prepare_model, train)
from lors_fx.testing.toy import build_toy_llama, toy_batches

STEPS = 6


def _blocks(n=10, seq_len=16, seed=1):
    ids = toy_batches(1, batch_size=n, seq_len=seq_len, seed=seed)[0]["input_ids"]
    return TextBlocks(ids, ids.clone(), torch.zeros_like(ids, dtype=torch.int32))


def _config(out, **changes):
    # 10 blocks, batch 4: 3 micro-batches an epoch (4, 4, 2); 2 per step: a checkpoint at step 2
    # sits in the middle of epoch 1, and 6 steps cross 4 epochs (each its own shuffle)
    fields = dict(steps=STEPS, batch_size=4, grad_accum=2, lr=1e-2, warmup_steps=2,
                  weight_decay=0.01, save_every=2, output_dir=str(out), progress=False, seed=3)
    return TrainConfig(**{**fields, **changes})


def _model(method="lors", r=4):
    model = build_toy_llama(seed=0)
    options = dict(init="zeros", lora_dropout=0.2) if method == "lors" else {}
    prepare_model(model, method, r=r, **options)  # dropout: every step draws from the RNG
    return model


def _trainable(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _assert_same_run(model, result, reference_model, reference, extra=()):
    expected = _trainable(reference_model)
    got = _trainable(model)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert torch.equal(got[name], value), name  # bit for bit
    assert result.losses == reference.losses and result.lrs == reference.lrs
    assert result.tokens == reference.tokens and result.steps == reference.steps == STEPS
    assert [os.path.basename(p) for p in result.checkpoints] == \
        sorted((os.path.basename(p) for p in [*reference.checkpoints, *extra]),
               key=lambda name: int(name.partition("-")[2] or 10**9))


@pytest.fixture
def main_thread():
    """The tests that send themselves SIGTERM: only the main thread gets Python's handler (in
    another one the signal would end the test process)."""
    if threading.current_thread() is not threading.main_thread():
        pytest.skip("SIGTERM handlers need the main thread")


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    model = _model()
    result = train(model, _blocks(), _config(tmp_path_factory.mktemp("reference")))
    return model, result


class _Crash(RuntimeError):
    pass


def _loss_fn(on_call=None, action=None):
    """The default loss, with ``action()`` run at its ``on_call``-th call (1-based)."""
    calls = [0]

    def loss_fn(model, batch):
        calls[0] += 1
        if calls[0] == on_call:
            action()
        return model(**batch).loss
    return loss_fn


def _crash():
    raise _Crash("simulated crash")


def test_a_crashed_run_resumes_to_the_same_adapters(tmp_path, uninterrupted):
    reference_model, reference = uninterrupted
    with pytest.raises(_Crash):  # dies in step 3, after checkpoint-2
        train(_model(), _blocks(), _config(tmp_path), loss_fn=_loss_fn(2 * 2 + 1, _crash))
    assert ckpt.checkpoint_steps(str(tmp_path)) == [2]
    model = _model()
    result = train(model, _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    assert result.resumed_from == str(tmp_path / "checkpoint-2") and not result.interrupted
    _assert_same_run(model, result, reference_model, reference)
    final = load_file(str(tmp_path / "adapters" / "adapter_model.safetensors"))
    for key, value in final.items():
        name = key.removeprefix("base_model.model.").removesuffix(".weight")
        assert torch.equal(value, _trainable(reference_model)[name]), key


def test_the_rng_state_is_part_of_the_checkpoint(tmp_path, uninterrupted, monkeypatch):
    """Without the saved RNG state the dropout masks after the resume differ (so the test above
    would catch a checkpoint that forgot it)."""
    reference_model, _ = uninterrupted
    with pytest.raises(_Crash):
        train(_model(), _blocks(), _config(tmp_path), loss_fn=_loss_fn(5, _crash))
    monkeypatch.setattr(ckpt, "_set_rng_state", lambda state: None)
    model = _model()
    train(model, _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    expected = _trainable(reference_model)
    assert any(not torch.equal(p, expected[n]) for n, p in _trainable(model).items())


def test_sigterm_saves_a_checkpoint_and_stops_then_resumes(tmp_path, uninterrupted, main_thread):
    reference_model, reference = uninterrupted
    kill = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    previous = signal.getsignal(signal.SIGTERM)
    # SIGTERM in step 3's first micro-batch: step 3 finishes, checkpoint-3 is saved, and train
    # raises a SystemExit(143) that carries the result
    with pytest.raises(TrainingInterrupted) as stop:
        train(_model(), _blocks(), _config(tmp_path), loss_fn=_loss_fn(5, kill))
    assert isinstance(stop.value, SystemExit) and stop.value.code == 128 + signal.SIGTERM
    result = stop.value.result
    assert result.interrupted and result.steps == 3 and len(result.losses) == 3
    assert stop.value.checkpoint == str(tmp_path / "checkpoint-3")
    assert result.checkpoints[-1] == str(tmp_path / "checkpoint-3")
    assert ckpt.checkpoint_steps(str(tmp_path)) == [2, 3]
    assert not (tmp_path / "adapters").exists()  # no final adapters from a stopped run
    assert signal.getsignal(signal.SIGTERM) is previous  # the handler is put back
    model = _model()
    result = train(model, _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    assert result.resumed_from == str(tmp_path / "checkpoint-3")
    _assert_same_run(model, result, reference_model, reference, extra=["checkpoint-3"])


def test_a_failure_during_a_save_keeps_the_previous_checkpoint(tmp_path, uninterrupted,
                                                               monkeypatch):
    reference_model, reference = uninterrupted
    real_save, calls = torch.save, [0]

    def failing_save(obj, path, *args, **kwargs):  # the 2nd checkpoint dies half-written
        calls[0] += 1
        if calls[0] == 2:
            with open(path, "wb") as handle:
                handle.write(b"half a file")
            raise OSError("simulated: disk full")
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        train(_model(), _blocks(), _config(tmp_path))
    monkeypatch.setattr(torch, "save", real_save)
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-2"]  # no checkpoint-4, no .tmp left
    # a kill (no cleanup) during the next save leaves its temporary directory: ignored
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-4.tmp" / ckpt.TRAINER_STATE_NAME).write_text("{trunc")
    assert ckpt.find_checkpoint(str(tmp_path)) == str(tmp_path / "checkpoint-2")
    model = _model()
    result = train(model, _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    _assert_same_run(model, result, reference_model, reference)
    assert sorted(os.listdir(tmp_path)) == ["adapters", "checkpoint-2", "checkpoint-4",
                                            "checkpoint-6"]
    # resuming from an older checkpoint rewrites the newer ones in place (rename over them)
    model = _model()
    result = train(model, _blocks(), _config(tmp_path),
                   resume_from=str(tmp_path / "checkpoint-2"))
    _assert_same_run(model, result, reference_model, reference)
    assert sorted(os.listdir(tmp_path)) == ["adapters", "checkpoint-2", "checkpoint-4",
                                            "checkpoint-6"]


def test_a_baseline_resumes_bit_exact(tmp_path):
    config = _config(tmp_path / "a", steps=4)
    reference_model = _model("sqft")
    reference = train(reference_model, _blocks(), config)
    assert os.path.isfile(tmp_path / "a" / "checkpoint-2" / ckpt.TRAINABLE_NAME)
    model = _model("sqft")
    result = train(model, _blocks(), _config(tmp_path / "b", steps=4),
                   resume_from=str(tmp_path / "a" / "checkpoint-2"))
    assert result.losses == reference.losses
    for name, value in _trainable(reference_model).items():
        assert torch.equal(_trainable(model)[name], value), name


def test_a_checkpoint_of_another_run_is_refused(tmp_path):
    with pytest.raises(_Crash):
        train(_model(), _blocks(), _config(tmp_path), loss_fn=_loss_fn(5, _crash))
    with pytest.raises(ValueError, match=r"other settings \(lr: 0.01 in the checkpoint, 0.02"):
        train(_model(), _blocks(), _config(tmp_path, lr=2e-2), resume_from=str(tmp_path))
    with pytest.raises(ValueError, match="training data differs"):
        train(_model(), _blocks(seed=9), _config(tmp_path), resume_from=str(tmp_path))
    with pytest.raises(ValueError, match="holds LoRS adapters, the model trains sqft"):
        train(_model("sqft"), _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    with pytest.raises(ValueError, match="trainable parameters differ"):
        train(_model(r=2), _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    other = _model()  # another pruning of the base: the adapters' mask fingerprint differs
    weight = other.model.layers[0].mlp.up_proj.weight
    with torch.no_grad():
        weight[0, (weight[0] == 0).nonzero()[0, 0]] = 1.0
    with pytest.raises(ValueError, match="zero pattern differs.*first at model.layers.0.mlp.up"):
        train(other, _blocks(), _config(tmp_path), resume_from=str(tmp_path))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint in .*empty.*--save-every"):
        train(_model(), _blocks(), _config(tmp_path), resume_from=str(tmp_path / "empty"))
    with pytest.raises(FileNotFoundError, match="is not a directory"):
        train(_model(), _blocks(), _config(tmp_path), resume_from=str(tmp_path / "missing"))


class Exploit:
    def __reduce__(self):
        return (os.system, ("echo should-not-run",))


def test_loading_a_checkpoint_runs_no_code(tmp_path):
    with pytest.raises(_Crash):
        train(_model(), _blocks(), _config(tmp_path), loss_fn=_loss_fn(5, _crash))
    state = tmp_path / "checkpoint-2" / ckpt.TRAINING_STATE_NAME
    torch.save({"optimizer": Exploit()}, str(state))
    with pytest.raises(ValueError, match=f"cannot read {state}"):
        train(_model(), _blocks(), _config(tmp_path), resume_from=str(tmp_path))


@pytest.mark.parametrize("as_list", [False, True])
def test_cycle_batches_from_a_position_continues_the_same_stream(as_list):
    data = _blocks() if not as_list else toy_batches(3, batch_size=2, seq_len=8)
    stream = _cycle_batches(data, 4, seed=3)
    full = [next(stream)["input_ids"] for _ in range(11)]
    for start in (0, 1, 3, 4, 7):
        stream = _cycle_batches(data, 4, seed=3, start=start)
        assert all(torch.equal(next(stream)["input_ids"], full[i]) for i in range(start, 11))


def test_stop_on_sigterm_is_scoped(main_thread):
    previous = signal.getsignal(signal.SIGTERM)
    with ckpt.stop_on_sigterm() as stop:
        assert signal.getsignal(signal.SIGTERM) is not previous
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.wait(5)
    assert signal.getsignal(signal.SIGTERM) is previous
    seen = {}

    def in_a_thread():  # Python only installs handlers in the main thread: a no-op there
        with ckpt.stop_on_sigterm() as event:
            seen["set"] = event.is_set()

    thread = threading.Thread(target=in_a_thread)
    thread.start(), thread.join()
    assert seen == {"set": False} and signal.getsignal(signal.SIGTERM) is previous


def test_write_atomically_never_leaves_a_half_written_directory(tmp_path):
    target = str(tmp_path / "checkpoint-1")
    ckpt.write_atomically(target, lambda d: open(os.path.join(d, "a"), "w").write("old"))

    def half(d):
        open(os.path.join(d, "a"), "w").write("new")
        raise KeyboardInterrupt  # interrupted in the middle

    with pytest.raises(KeyboardInterrupt):
        ckpt.write_atomically(target, half)
    assert open(os.path.join(target, "a")).read() == "old"
    assert sorted(os.listdir(tmp_path)) == ["checkpoint-1"]
    ckpt.write_atomically(target, lambda d: open(os.path.join(d, "b"), "w").write("new"))
    assert os.listdir(target) == ["b"]


def test_sigterm_in_the_last_step_finishes_the_run_then_stops(tmp_path, uninterrupted,
                                                             main_thread):
    reference_model, reference = uninterrupted
    kill = lambda: os.kill(os.getpid(), signal.SIGTERM)  # noqa: E731
    model = _model()
    with pytest.raises(TrainingInterrupted) as stop:
        train(model, _blocks(), _config(tmp_path), loss_fn=_loss_fn(2 * STEPS, kill))
    result = stop.value.result
    assert not result.interrupted and stop.value.checkpoint == str(tmp_path / "adapters")
    _assert_same_run(model, result, reference_model, reference)
