"""DeepSpeed ZeRO-2 / ZeRO-3 with LoRS adapters (lors_fx.distributed.deepspeed), 2 CPU ranks on gloo.

For each stage the test launches ``tests/distributed/_ds_worker.py`` with ``torch.distributed.run``
(2 processes, bounded by a timeout) and compares with a single-process run of the same model:

- loss: each rank's loss equals the single-process loss of its batch (``rel 1e-12``);
- gradients: the full adapter gradients DeepSpeed reduced (the average of the two ranks) equal the
  gradient of the mean of the two single-process losses (float64). Under ZeRO-2 the model is
  float64 but DeepSpeed's optimizer keeps float32 gradient partitions, so the tolerance is
  float32's: ``max|g_ds - g_ref| <= 1e-6 * max|g_ref|``; ZeRO-3 partitions only fp32/bf16/fp16
  parameters, so its model is float32 and the tolerances are float32's forward precision
  (:data:`TOLERANCES`);
- zero pattern: after the optimizer steps the base weights and the effective weights the op
  computes (``W + s*(B@A)*M``) have no new nonzero, on every rank (ZeRO-3: gathered weights);
- save/load: the adapters rank 0 saved load into a fresh single-process model, equal the
  (gathered) trained adapters bit for bit, and give the worker's logits (:data:`TOLERANCES`);
  merging them keeps the zero pattern.

Skipped, with the reason, only when deepspeed cannot be imported.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

import lors_fx
from lors_fx.distributed.deepspeed import (deepspeed_missing, external_parameters, initialize,
                                           zero_config)
from tests.distributed import _ds_worker as worker
from tests.distributed._launch import free_port, run_in_session

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
WORKER_PATH = os.path.join(HERE, "_ds_worker.py")

WORLD = 2
TIMEOUT_S = 240
#: per model dtype (worker.dtype_for): the float64 model (ZeRO-2) is compared with the float64
#: single process at float32's precision (ZeRO's float32 gradient partitions); the float32 model
#: (ZeRO-3) at float32's forward precision.
TOLERANCES = {torch.float64: dict(grad_rtol=1e-6, loss_rtol=1e-12, logits_atol=1e-10),
              torch.float32: dict(grad_rtol=1e-5, loss_rtol=1e-5, logits_atol=1e-5)}


def _launch(stage: int, out_dir: str, compile: bool = False) -> str:
    """Run the worker on 2 ranks; returns its output. Kills the whole process group on timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu")
    output = ""
    for _attempt in range(2):  # a second try only if the free port was taken meanwhile
        command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={WORLD}",
                   "--nnodes=1", "--master_addr=127.0.0.1", f"--master_port={free_port()}",
                   WORKER_PATH, str(stage), out_dir] + (["--compile"] if compile else [])
        code, stdout, stderr = run_in_session(command, timeout=TIMEOUT_S, env=env, cwd=REPO)
        output = stdout + stderr
        if code == 0:
            return output
        if "EADDRINUSE" not in output:
            break
    pytest.fail(f"ZeRO-{stage} worker failed (exit {code}):\n{output[-6000:]}")


@pytest.fixture(scope="module")
def reference():
    """Single process: per-rank losses and the gradient of their mean, same model and batches."""
    model = worker.build_lors_model()
    losses = [model(**worker.rank_batch(rank)).loss for rank in range(WORLD)]
    (sum(losses) / WORLD).backward()
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters()
             if p.requires_grad}
    return {"losses": [float(loss.detach()) for loss in losses], "grads": grads}


@pytest.fixture(scope="module", params=[(2, False), (3, False), (2, True)],
                ids=["zero2", "zero3", "zero2-compiled"])
def ds_run(request, tmp_path_factory):
    """One 2-rank worker run: ZeRO-2 and ZeRO-3 with the eager op, and ZeRO-2 with
    ``optimize(..., compile=True)`` (ZeRO-3 refuses a compiled model: see the unit test)."""
    reason = deepspeed_missing()
    if reason is not None:
        pytest.skip(reason)
    stage, compile = request.param
    out_dir = str(tmp_path_factory.mktemp(f"zero{stage}"))
    start = time.perf_counter()
    output = _launch(stage, out_dir, compile)
    seconds = time.perf_counter() - start
    ranks = [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False)
             for r in range(WORLD)]
    print(f"\nZeRO-{stage}{' compiled' if compile else ''}: 2-rank worker took {seconds:.1f} s")
    for result in ranks:
        assert result["error"] is None, result.get("traceback")
        if compile:  # really compiled: one graph, no break, no fallback to the eager op
            assert result["compiled_state"] == {"fallback": None, "graphs": 1,
                                                "graph_breaks": 0}, result["compiled_state"]
        else:
            assert result["compiled_state"] is None
    return {"stage": stage, "compile": compile, "dir": out_dir, "ranks": ranks, "output": output}


def test_loss_and_adapter_grads_match_single_process(ds_run, reference):
    ref_grads = reference["grads"]
    scale = max(float(g.abs().max()) for g in ref_grads.values())
    assert scale > 0
    for rank, result in enumerate(ds_run["ranks"]):
        assert result["rank"] == rank and result["world"] == WORLD
        dtype = worker.dtype_for(ds_run["stage"])
        tolerance = TOLERANCES[dtype]
        assert result["param_dtypes"] == [str(dtype)]
        assert result["loss"] == pytest.approx(reference["losses"][rank],
                                               rel=tolerance["loss_rtol"])
        grads = result["grads"]
        assert set(grads) == set(ref_grads)
        worst = max(float((grads[n].double() - ref_grads[n]).abs().max()) for n in ref_grads)
        print(f"ZeRO-{ds_run['stage']}{' compiled' if ds_run['compile'] else ''} rank {rank}: "
              f"max |grad diff| = {worst:.3e} "
              f"(max |grad| = {scale:.3e})")
        assert worst <= tolerance["grad_rtol"] * scale, (worst, scale)
        # lora_B was initialised nonzero, so every lora_A gets a gradient too.
        assert all(float(g.abs().max()) > 0 for g in grads.values())


def test_zero3_partitions_and_the_op_reads_gathered_weights(ds_run):
    for result in ds_run["ranks"]:
        # every LoRS forward saw its whole weight with the original nonzero count (not watched
        # in the compiled run: a hook would break its graph)
        watched = result["forward_weights"]
        assert len(watched) == (0 if ds_run["compile"] else 14) and all(watched.values())
        if ds_run["stage"] == 3:  # really partitioned: empty params, half of each on a rank
            assert result["zero3_params"] == result["params"]
            assert result["local_numel"] == 0
            assert result["full_numel"] / WORLD <= result["partition_numel"] \
                < result["full_numel"] / WORLD + WORLD * result["params"]
        else:
            assert result["zero3_params"] == 0
            assert result["local_numel"] == result["full_numel"]


def test_zero_pattern_kept_after_steps(ds_run):
    for result in ds_run["ranks"]:
        assert result["audit_ok"], result["audit_new_nonzeros"]
        assert result["audit_checked"] > 0
        assert len(result["effective_new_nonzeros"]) == 14
        assert sum(result["effective_new_nonzeros"].values()) == 0
        assert sum(result["effective_lost_nonzeros"].values()) == 0
    # the adapters trained (so the pattern check is not vacuous) and agree across ranks
    first, second = (r["adapters"] for r in ds_run["ranks"])
    initial = worker.build_lors_model(worker.dtype_for(ds_run["stage"]))
    params = dict(initial.named_parameters())
    assert any(not torch.equal(first[n], params[n]) for n in first)
    assert all(torch.equal(first[n], second[n]) for n in first)


def test_saved_adapters_load_into_single_process_model(ds_run):
    path = os.path.join(ds_run["dir"], "adapter")
    assert sorted(os.listdir(path)) == ["adapter_config.json", "adapter_model.safetensors"]
    trained = ds_run["ranks"][0]
    config = lors_fx.load_adapter_config(path)
    dtype = worker.dtype_for(ds_run["stage"])
    model = worker.build_model_plain(dtype)
    masks = lors_fx.snapshot_masks(model)
    lors_fx.optimize(model, config, compile=False)
    loaded = lors_fx.load_adapters(model, path)
    assert loaded == trained["saved"] and len(loaded) == 14
    params = dict(model.named_parameters())
    for name, value in trained["adapters"].items():
        assert torch.equal(params[name].detach(), value), name
    model.eval()
    with torch.no_grad():
        logits = model(**worker.logits_batch()).logits
    torch.testing.assert_close(logits, trained["logits"], rtol=0,
                               atol=TOLERANCES[dtype]["logits_atol"])
    lors_fx.merge(model)
    assert lors_fx.audit(model, masks).ok


# ---------------------------------------------------------------- no processes needed below


def test_deepspeed_missing_is_none_when_deepspeed_imports():
    pytest.importorskip("deepspeed", reason="deepspeed is not installed (optional: the ZeRO "
                                            "support); deepspeed_missing() must then say so")
    assert deepspeed_missing() is None


def test_deepspeed_missing_gives_a_one_line_reason_with_the_install_hint(monkeypatch):
    monkeypatch.setitem(sys.modules, "deepspeed", None)  # makes `import deepspeed` fail
    reason = deepspeed_missing()
    assert reason.startswith("deepspeed is not installed (") and "\n" not in reason
    assert reason.endswith(": pip install --no-build-isolation deepspeed")


def test_import_lors_fx_does_not_import_deepspeed():
    code = ("import sys, lors_fx, lors_fx.distributed.deepspeed; "
            "assert 'deepspeed' not in sys.modules, 'deepspeed imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120,
                   env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.parametrize("stage", [2, 3])
def test_zero_config_valid(stage):
    config = zero_config(stage, micro_batch_size=4, grad_accum=2, lr=3e-4, weight_decay=0.01,
                         clip=0.5, bf16=True)
    assert config["zero_optimization"]["stage"] == stage
    assert config["train_micro_batch_size_per_gpu"] == 4
    assert config["gradient_accumulation_steps"] == 2
    assert config["gradient_clipping"] == 0.5
    assert config["optimizer"]["type"] == "AdamW"
    assert config["optimizer"]["params"]["lr"] == 3e-4
    assert config["optimizer"]["params"]["weight_decay"] == 0.01
    assert config["bf16"] == {"enabled": True}


@pytest.mark.parametrize("kwargs, match", [
    (dict(stage=1), "stage must be 2 or 3"),
    (dict(stage=0), "stage must be 2 or 3"),
    (dict(stage=4), "stage must be 2 or 3"),
    (dict(stage="3"), "stage must be 2 or 3"),
    (dict(stage=True), "stage must be 2 or 3"),
    (dict(micro_batch_size=0), "micro_batch_size"),
    (dict(micro_batch_size=2.0), "micro_batch_size"),
    (dict(grad_accum=0), "grad_accum"),
    (dict(lr=0.0), "lr"),
    (dict(lr=float("nan")), "lr"),
    (dict(lr="1e-3"), "lr"),
    (dict(weight_decay=-0.1), "weight_decay"),
    (dict(clip=-1.0), "clip"),
    (dict(clip=float("inf")), "clip"),
    (dict(bf16=1), "bf16"),
])
def test_zero_config_rejects_bad_input(kwargs, match):
    args = dict(stage=2, micro_batch_size=2)
    args.update(kwargs)
    stage = args.pop("stage")
    with pytest.raises(ValueError, match=match):
        zero_config(stage, **args)


def test_initialize_refuses_model_without_adapters():
    model = worker.build_model_plain()
    with pytest.raises(ValueError, match="no LoRS adapters.*optimize"):
        initialize(model, zero_config(2, micro_batch_size=2))


def test_initialize_refuses_bad_config_and_frozen_adapters():
    model = worker.build_lors_model()
    with pytest.raises(ValueError, match="ds_config must be a dict"):
        initialize(model, "ds_config.json")
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable parameter"):
        initialize(model, zero_config(2, micro_batch_size=2))


def test_initialize_refuses_compiled_model_under_zero3():
    model = worker.build_lors_model(compile=True)  # compiles lazily: nothing runs here
    with pytest.raises(NotImplementedError, match=r"ZeRO-3.*compile=False"):
        initialize(model, zero_config(3, micro_batch_size=2))


def test_initialize_refuses_float64_under_zero3_and_changes_nothing():
    model = worker.build_lors_model()  # float64: DeepSpeed's zero.Init would assert
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match=r"ZeRO-3 partitions only .*torch.float64"):
        initialize(model, zero_config(3, micro_batch_size=2))
    assert all(torch.equal(before[n], p) for n, p in model.named_parameters())


def test_external_parameters():
    model = worker.build_lors_model()
    assert external_parameters(model) == []  # LorsLinear owns weight, bias, lora_A, lora_B
    module = next(iter(lors_fx.lors_modules(model).values()))
    weight = module._parameters.pop("weight")
    module.__dict__["weight"] = weight  # read through a plain attribute: not gathered by ZeRO-3
    assert external_parameters(model) == [(module, weight)]
