"""tools/dist_memory.py: the per-rank memory formulas of docs/distributed.md, tied to the op's
measured saved bytes and to ``lors-fx inspect --meta``."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def _load_tool():
    spec = importlib.util.spec_from_file_location("dist_memory", ROOT / "tools" / "dist_memory.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses need the module registered
    spec.loader.exec_module(module)
    return module


dm = _load_tool()
L7, L70 = dm.MODELS["llama2-7b"], dm.MODELS["llama2-70b"]
TINY = dm.ModelSpec("tiny-llama", hidden=64, intermediate=128, layers=2, heads=4, kv_heads=2,
                    vocab=128)  # = lors_fx.testing.tiny_models "tiny-llama"
CASES = [(spec, method, n, seq, ckpt) for spec in (L7, L70) for method in dm.METHODS
         for n in (1, 8, 64) for seq in (2048, 4096) for ckpt in (False, True)]


@pytest.mark.parametrize("spec,method,n,seq,ckpt", CASES)
def test_components_add_up(spec, method, n, seq, ckpt):
    parts = dm.per_rank_bytes(spec, method, n, seq, 1, 16, ckpt)
    total = parts.pop("total")
    assert total == sum(parts.values())
    assert all(isinstance(v, int) and v >= 0 for v in parts.values())
    assert (parts["sqft_wprime_mask"] > 0) == (method == "sqft")


def test_parameter_counts_match_lors_fx_inspect_meta():
    # `lors-fx inspect <config>.json --meta` printed these for the Llama-2 configs
    # (docs/distributed.md, cross-check): 6,738,415,616 and 68,976,648,192 parameters.
    assert dm.param_counts(L7, 16)["total"] == 6_738_415_616
    assert dm.param_counts(L70, 16)["total"] == 68_976_648_192
    # adapters: r * (d_in + d_out) per site; k/v of 70B are 8192 -> 1024 (GQA)
    assert dm.sites(L70)[1] == ("k_proj", 1024, 8192)
    assert dm.param_counts(L7, 16)["adapter"] == 32 * 16 * (4 * 8192 + 3 * 15104)


@pytest.mark.parametrize("spec", [L7, L70])
@pytest.mark.parametrize("seq,ckpt", [(2048, False), (4096, False), (4096, True)])
def test_sqft_minus_lors_is_the_wprime_mask_term(spec, seq, ckpt):
    lors = dm.per_rank_bytes(spec, "lors", 8, seq, 1, 16, ckpt)
    sqft = dm.per_rank_bytes(spec, "sqft", 8, seq, 1, 16, ckpt)
    layers = 1 if ckpt else spec.layers
    wm = layers * sum(o * i * (2 + 1) for _, o, i in dm.sites(spec))  # bf16 W' + bool mask
    assert sqft["sqft_wprime_mask"] == wm
    max_site = max(o * i for _, o, i in dm.sites(spec)) * 2
    transient_gap = 2 * max_site - (max_site + min(dm.MASK_CHUNK, max_site))
    assert sqft["total"] - lors["total"] == wm + transient_gap
    for key in lors:
        if key not in ("sqft_wprime_mask", "transient", "total"):
            assert sqft[key] == lors[key], key
    if not ckpt:  # = naive - lors of `lors-fx inspect --meta`, every layer (cross-check)
        totals = dm.inspect_meta_totals(spec, seq)
        assert sqft["sqft_wprime_mask"] == totals["naive"] - totals["lors"]
    if spec is L7 and not ckpt:
        assert wm == 19_428_016_128  # 24,092,082,176 - 4,664,066,048 in README's inspect run


@pytest.mark.parametrize("spec", [L7, L70])
def test_sharded_terms_scale_as_one_over_n(spec):
    one = dm.per_rank_bytes(spec, "sqft", 1, 4096)
    for n in (2, 8, 64):
        parts = dm.per_rank_bytes(spec, "sqft", n, 4096)
        for key in ("base_shard", "adapter_states"):
            assert abs(parts[key] * n - one[key]) < n, (key, n)  # integer division only
        for key in parts:
            if key not in ("base_shard", "adapter_states", "total"):
                assert parts[key] == one[key], key  # activations, W', gathered: not sharded
    assert one["base_shard"] == dm.param_counts(spec, 16)["total"] * 2
    assert one["adapter_states"] == dm.param_counts(spec, 16)["adapter"] * 16


def test_activation_terms_scale_with_tokens_and_checkpointing():
    a = dm.per_rank_bytes(L7, "lors", 8, 2048, batch=2)
    b = dm.per_rank_bytes(L7, "lors", 8, 4096, batch=1)
    for key in ("act_inputs", "act_x", "act_rest", "act_head"):
        assert a[key] == b[key], key  # only b*T matters
    c = dm.per_rank_bytes(L7, "lors", 8, 4096, checkpoint=True)
    assert c["act_x"] * L7.layers == b["act_x"] and c["act_rest"] * L7.layers == b["act_rest"]
    assert c["act_inputs"] == b["act_inputs"] == 32 * 4096 * 4096 * 2


def _tiny_block(op, dtype):
    """Saved bytes of the 7 adapted linears of one Llama block, wired as in Llama (q/k/v read
    the attention-norm output, gate/up the MLP-norm output), measured with saved_tensors_hooks."""
    from lors_fx.bench.harness import saved_bytes

    torch.manual_seed(0)
    tokens, r = 24, 4
    params = []
    linears = {}
    for name, d_out, d_in in dm.sites(TINY):
        w = torch.randn(d_out, d_in, dtype=dtype)
        w[torch.rand(d_out, d_in) < 0.5] = 0
        a = torch.randn(r, d_in, dtype=dtype, requires_grad=True)
        b = torch.randn(d_out, r, dtype=dtype, requires_grad=True)
        linears[name] = (w, a, b)
        params += [w, a, b]
    leaves = {k: torch.randn(tokens, d, dtype=dtype, requires_grad=True)
              for k, d in (("attn", 64), ("o", 64), ("mlp", 64), ("down", 128))}
    params += list(leaves.values())
    x = {k: v * 1.0 for k, v in leaves.items()}  # activations, as in a network
    inputs = {"q_proj": "attn", "k_proj": "attn", "v_proj": "attn", "o_proj": "o",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "down"}

    def forward():
        return sum(op(x[inputs[n]], *linears[n]).sum() for n in linears)

    return tokens, saved_bytes(forward, params)


@pytest.mark.parametrize("dtype,e", [(torch.bfloat16, 2), (torch.float32, 4)])
def test_x_term_matches_the_ops_measured_saved_bytes(dtype, e):
    from lors_fx.ops import reference_sparse_lora_linear, sparse_lora_linear

    tokens, lors = _tiny_block(lambda x, w, a, b: sparse_lora_linear(x, w, a, b, scaling=2.0),
                               dtype)
    assert lors == dm.x_bytes_block(TINY, tokens, e) == tokens * (3 * 64 + 128) * e
    _, naive = _tiny_block(lambda x, w, a, b: reference_sparse_lora_linear(x, w, a, b, None, 2.0),
                           dtype)
    assert naive - lors == dm.wprime_mask_bytes(TINY, e)


def test_inspect_meta_totals_match_lors_fx_inspect():
    from lors_fx.cli.inspect_meta import run_inspection

    result = run_inspection("tiny", "tiny-llama", name="tiny-llama", dtype="bfloat16", batch=2,
                            seq=16, meta=True, progress=False).data
    totals = dm.inspect_meta_totals(TINY, 32)
    assert result["saved"]["naive_theoretical_bytes"] == totals["naive"]
    assert result["saved"]["lors_theoretical_bytes"] == totals["lors"]
    assert result["model"]["parameters"] == dm.param_counts(TINY, 16)["total"]


@pytest.mark.parametrize("kwargs", [
    dict(method="lora"), dict(ranks=0), dict(ranks=2.0), dict(ranks=True), dict(seq=-1),
    dict(batch=0), dict(r=0), dict(r=1025), dict(live_blocks=0), dict(live_blocks=81)])
def test_bad_inputs_raise(kwargs):
    args = dict(spec=L70, method="lors", ranks=8, seq=4096, batch=1, r=16)
    args.update(kwargs)
    with pytest.raises(ValueError):
        dm.per_rank_bytes(**args)


def test_bad_spec_and_model_name_raise():
    with pytest.raises(TypeError):
        dm.per_rank_bytes({"hidden": 4096}, "lors", 8, 4096)
    with pytest.raises(ValueError, match="unknown model"):
        dm.rows(["llama2-13b"], [8], [4096], 1, 16)
    dm.per_rank_bytes(L70, "lors", 8, 4096, r=1024)  # the k/v width is the limit


def test_cli_prints_and_writes_json(tmp_path, capsys):
    path = tmp_path / "mem.json"
    assert dm.main(["--model", "llama2-7b", "--ranks", "8", "--seq", "4096", "--json",
                    str(path)]) == 0
    out = capsys.readouterr().out
    assert "W'+mask" in out and "not measured" in out
    data = json.loads(path.read_text())
    assert data["schema"] == "lors_fx.dist_memory/1" and len(data["rows"]) == 4
    row = next(r for r in data["rows"] if r["method"] == "sqft" and r["ckpt"] == "none")
    assert row["sqft_wprime_mask"] == pytest.approx(19_428_016_128 / 2**30)
    with pytest.raises(SystemExit) as exit_info:
        dm.main(["--ranks", "0"])
    assert exit_info.value.code == 2
