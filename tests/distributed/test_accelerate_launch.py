"""``accelerate launch`` with accelerate's FSDP2 plugin on CPU (gloo), 2 processes.

Runs ``tools/train_accelerate.py`` under ``accelerate launch --config_file
tools/accelerate_fsdp2.yaml --num_processes 2`` and checks, in this process, against a
single-process run of the same model, data and optimizer:

- the run really was FSDP2 (``FSDPLlamaForCausalLM``, adapters are ``Shard(0)`` DTensors);
- the losses are finite, go down, and equal the single-process losses;
- the saved adapters, loaded into a fresh model, give the rank-0 logits (fp32, atol 1e-5);
- merging those adapters keeps the base zero pattern;
- ``--compile after`` (lors_fx's compiled forward, per decoder block) trains the same.

accelerate 1.15 does not run FSDP on CPU unchanged (it drops the plugin and uses DDP); the script
puts the plugin back (``fsdp_on_cpu``). ``test_accelerate_alone_uses_ddp_on_cpu`` pins what
accelerate does without that: when it fails, accelerate changed and docs/distributed.md should say
so.
"""
import importlib.util
import json
import math
import os
import sys

import pytest
import torch

pytest.importorskip("accelerate", reason="accelerate is not installed (optional: pip install "
                                          "'lors-fx[dev]'): these tests run `accelerate launch`")

import lors_fx  # noqa: E402
from lors_fx.testing.tiny_models import build_model, random_batch  # noqa: E402
from tests.distributed._launch import free_port, run_in_session  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "tools", "train_accelerate.py")
CONFIG = os.path.join(REPO, "tools", "accelerate_fsdp2.yaml")

STEPS, WORLD = 3, 2
LOGITS_ATOL = 1e-5    # fp32: same math, the FSDP run only all-gathers the weights
TRAINING_ATOL = 1e-5  # FSDP's averaged gradients vs one full-batch gradient: rounding only


def _script():
    spec = importlib.util.spec_from_file_location("train_accelerate", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _launch(out, *extra):
    env = dict(os.environ, OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [REPO, env.get("PYTHONPATH")]))
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_USE_FSDP", "WORLD_SIZE", "RANK",
                 "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", CONFIG,
               "--num_processes", str(WORLD), "--main_process_port", str(free_port()),
               SCRIPT, "--steps", str(STEPS), "--out", str(out), *extra]
    code, stdout, stderr = run_in_session(command, timeout=240, env=env, cwd=REPO)
    assert code == 0, f"accelerate launch failed:\n{stdout}\n{stderr[-6000:]}"
    with open(os.path.join(out, "metrics.json"), encoding="utf-8") as handle:
        return json.load(handle), stdout


@pytest.fixture(scope="module")
def fsdp_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("accelerate_fsdp2")
    metrics, stdout = _launch(out)
    return out, metrics, stdout


@pytest.fixture(scope="module")
def reference():
    """The same training in one process on the whole batch: losses and fixed-batch logits."""
    script = _script()
    model = build_model("llama", "50%", seed=0)
    lors_fx.optimize(model, lors_fx.LorsConfig(r=4, lora_alpha=8), compile=False)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = random_batch(2 * WORLD, 16, seed=script.DATA_SEED)
    losses = []
    for _ in range(STEPS):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(loss.item())
    fixed = random_batch(2, 16, seed=script.LOGITS_SEED)
    with torch.no_grad():
        logits = model(input_ids=fixed["input_ids"]).logits
    return losses, logits


def _rank0_logits(out):
    from safetensors.torch import load_file

    return load_file(os.path.join(out, "logits.safetensors"))


def test_accelerate_fsdp2_really_shards(fsdp_run):
    _, metrics, stdout = fsdp_run
    assert metrics["world_size"] == WORLD and metrics["backend"] == "gloo"
    assert metrics["distributed_type"] == "DistributedType.FSDP" and metrics["fsdp_on_cpu"]
    assert metrics["wrapper"] == "FSDPLlamaForCausalLM"
    assert metrics["adapter_tensor"] == "DTensor"
    assert metrics["adapter_placements"] == "(Shard(dim=0),)"
    assert metrics["adapted_modules"] == 14  # 7 projections x 2 layers
    assert metrics["audit_ok"], metrics["audit"]
    assert stdout.count("audit ok") == WORLD  # every rank audited the gathered weights


def test_losses_finite_decreasing_and_match_single_process(fsdp_run, reference):
    _, metrics, _ = fsdp_run
    losses, (expected, _) = metrics["losses"], reference
    assert len(losses) == STEPS and all(math.isfinite(v) for v in losses)
    assert losses[-1] < losses[0], losses
    assert losses == pytest.approx(expected, abs=TRAINING_ATOL)


def test_saved_adapters_reproduce_rank0_logits_and_merge_keeps_pattern(fsdp_run, reference):
    out, _, _ = fsdp_run
    saved = _rank0_logits(out)
    fixed = random_batch(2, 16, seed=_script().LOGITS_SEED)
    assert torch.equal(saved["input_ids"], fixed["input_ids"])

    fresh = build_model("llama", "50%", seed=0)
    masks = lors_fx.snapshot_masks(fresh)
    lors_fx.optimize(fresh, lors_fx.load_adapter_config(str(out)), compile=False)
    lors_fx.load_adapters(fresh, str(out))
    with torch.no_grad():
        logits = fresh(input_ids=fixed["input_ids"]).logits
    torch.testing.assert_close(logits, saved["logits"], rtol=0, atol=LOGITS_ATOL)
    torch.testing.assert_close(logits, reference[1], rtol=0, atol=TRAINING_ATOL)

    lors_fx.merge(fresh)
    assert not lors_fx.lors_modules(fresh)
    result = lors_fx.audit(fresh, masks)
    assert result.ok, result.summary()
    with torch.no_grad():
        merged = fresh(input_ids=fixed["input_ids"]).logits
    torch.testing.assert_close(merged, saved["logits"], rtol=0, atol=1e-4)


def test_accelerate_alone_uses_ddp_on_cpu(tmp_path, fsdp_run):
    """Without ``fsdp_on_cpu`` accelerate 1.15 drops the FSDP plugin on CPU: gloo + DDP.

    DDP trains the same (the LoRS op needs no sharding), so the losses match the FSDP run.
    """
    metrics, _ = _launch(tmp_path, "--no-fsdp-shim")
    assert metrics["fsdp_on_cpu"] is False
    assert (metrics["distributed_type"], metrics["wrapper"]) == (
        "DistributedType.MULTI_CPU", "DistributedDataParallel"), (
        "accelerate now keeps FSDP on CPU: drop fsdp_on_cpu and update docs/distributed.md",
        metrics)
    assert metrics["adapter_tensor"] == "Parameter" and metrics["audit_ok"]
    assert metrics["losses"] == pytest.approx(fsdp_run[1]["losses"], abs=TRAINING_ATOL)


@pytest.mark.parametrize("when", ["before", "after"])
def test_compile_with_prepare_compiles_each_block(tmp_path, fsdp_run, when):
    """``optimize(compile=True)`` before ``prepare`` (the compiled forward re-scopes itself at the
    first step, once it sees the model sharded) or ``compile_model`` after it: one graph per
    decoder block, FSDP2's hooks run between the graphs, nothing breaks, every adapter is
    rewritten to the lors op."""
    metrics, _ = _launch(tmp_path, "--compile", when)
    state = metrics["compile_state"]
    assert state["fallback"] is None and state["graph_breaks"] == 0, state
    assert state["rewritten_sites"] == state["adapter_sites"] == 14, state
    assert metrics["wrapper"] == "FSDPLlamaForCausalLM" and metrics["audit_ok"]
    assert metrics["losses"] == pytest.approx(fsdp_run[1]["losses"], abs=TRAINING_ATOL)
