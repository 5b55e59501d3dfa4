"""Tests of lors_fx/sparsity.py: N:M detection, patterns, reports and audits."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from lors_fx.sparsity import (AuditResult, SparsityViolation, audit, detect_nm, pattern_of,
                              snapshot_masks, sparsity_of, sparsity_report, weight_mask)
from lors_fx.workflows.prune import prune_mask
from tests._toy import tiny_gpt2


def nm_weight(d_out, d_in, n, m, seed=0, dim=1):
    """Random weight with exactly ``n`` nonzeros in every group of ``m`` consecutive entries
    along ``dim`` (1 = the input dim of an (d_out, d_in) weight): the library's N:M pruning of
    random scores, so which entries survive does not depend on the weight's values."""
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=gen) + 3.0  # nonzero everywhere before pruning
    w = weight if dim == 1 else weight.t()
    keep = ~prune_mask(torch.rand(w.shape, generator=gen), 1 - n / m, (n, m))
    w = w * keep
    return w if dim == 1 else w.t().contiguous()


# ----------------------------------------------------------------------------------------------
# detect_nm / pattern_of
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n,m", [(1, 4), (2, 4), (4, 8)])
def test_detect_nm_exact_patterns(n, m):
    weight = nm_weight(16, 32, n, m)
    # 4:8 built at random has some group of 4 with 3 nonzeros, so 2:4 does not hold: tightest
    # is 4:8. Check the construction really has that property (else the test proves less).
    if (n, m) == (4, 8):
        assert ((weight != 0).reshape(16, 8, 4).sum(-1) > 2).any()
    assert detect_nm(weight) == f"{n}:{m}"
    assert pattern_of(weight) == f"{n}:{m}"


def test_detect_nm_returns_tightest():
    one_four = nm_weight(8, 16, 1, 4)
    # 1:4 also satisfies 2:4 and 4:8; the tightest is reported.
    assert detect_nm(one_four) == "1:4"
    assert detect_nm(nm_weight(8, 16, 2, 4)) == "2:4"  # also 4:8


def test_detect_nm_one_extra_nonzero_breaks_it():
    weight = nm_weight(8, 16, 2, 4)
    zero_col = [c for c in range(8, 12) if weight[3, c] == 0][0]
    weight[3, zero_col] = 1.0  # 3 nonzeros in one group of 4 and 5 in its group of 8
    assert detect_nm(weight) is None
    assert pattern_of(weight) == "unstructured"
    # 3 + 1 nonzeros in each group of 8: 4:8 holds, 2:4 does not
    row = torch.tensor([1.0, 2.0, 3.0, 0.0, 0.0, 0.0, 0.0, 4.0])
    assert detect_nm(row.repeat(4, 2)) == "4:8"
    assert detect_nm(torch.cat([row.repeat(4, 2), torch.ones(4, 1)], dim=1)) is None  # 17 % 8


def test_detect_nm_none_cases():
    gen = torch.Generator().manual_seed(1)
    unstructured = torch.randn(16, 32, generator=gen) * (torch.rand(16, 32, generator=gen) < 0.5)
    assert detect_nm(unstructured) is None
    assert pattern_of(unstructured) == "unstructured"
    # 1 nonzero in 4 but d_in=6 is not divisible by 4 (nor 8)
    odd = torch.zeros(4, 6)
    odd[:, 0] = 1.0
    assert detect_nm(odd) is None
    assert pattern_of(odd) == "unstructured"
    # N:M along the *output* dim only is not N:M along the input dim
    along_out = nm_weight(32, 16, 2, 4, dim=0)
    assert detect_nm(along_out) is None
    assert detect_nm(torch.ones(8)) is None  # not 2-D
    dense = torch.ones(4, 8)
    assert detect_nm(dense) is None
    assert pattern_of(dense) == "dense"


def test_weight_mask_and_sparsity_of():
    weight = torch.tensor([[0.0, -0.0, 1.0, float("nan")]])
    assert weight_mask(weight).tolist() == [[False, False, True, True]]
    assert sparsity_of(weight) == 0.5
    assert sparsity_of(torch.empty(0, 3)) == 0.0


# ----------------------------------------------------------------------------------------------
# sparsity_report
# ----------------------------------------------------------------------------------------------


def small_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 12), nn.Linear(12, 6))
    with torch.no_grad():
        model[0].weight.copy_(nm_weight(8, 16, 2, 4, seed=1))
        gen = torch.Generator().manual_seed(2)
        model[2].weight.mul_(torch.rand(12, 8, generator=gen) < 0.4)
        # model[3] stays dense
    return model


def test_sparsity_report_sequential():
    model = small_model()
    rows = {row.name: row for row in sparsity_report(model)}
    assert set(rows) == {"0", "2", "3"}
    assert rows["0"].shape == (8, 16) and rows["0"].pattern == "2:4"
    assert rows["0"].zeros == 64 and rows["0"].numel == 128 and rows["0"].sparsity == 0.5
    expected_zeros = int((model[2].weight == 0).sum())
    assert 0 < expected_zeros < 96
    assert rows["2"].zeros == expected_zeros and rows["2"].pattern == "unstructured"
    assert rows["2"].sparsity == pytest.approx(expected_zeros / 96)
    assert rows["3"].zeros == 0 and rows["3"].pattern == "dense"


def test_sparsity_report_meta_device():
    model = nn.Sequential(nn.Linear(4, 4, device="meta"))
    (row,) = sparsity_report(model)
    assert row.pattern == "meta" and row.shape == (4, 4)


def dense_gpt2():
    """The tests' 1-layer GPT-2 (Conv1D), unpruned: each test writes the pattern it needs."""
    return tiny_gpt2(sparsity=0.0).eval()


def test_sparsity_report_gpt2_conv1d_along_input_dim():
    """GPT-2's Conv1D stores its weight (d_in, d_out): N:M must be read along dim 0."""
    model = dense_gpt2()
    fc = model.transformer.h[0].mlp.c_fc          # Conv1D 32 -> 128, weight (32, 128)
    proj = model.transformer.h[0].mlp.c_proj      # Conv1D 128 -> 32, weight (128, 32)
    assert type(fc).__name__ == "Conv1D" and fc.weight.shape == (32, 128)
    with torch.no_grad():
        # 2:4 along the input dim: groups of 4 consecutive *rows* of the stored weight
        fc.weight.copy_(nm_weight(128, 32, 2, 4, seed=3).t())
        # 2:4 along the output dim (columns of the stored weight): NOT N:M along the input dim
        proj.weight.copy_(nm_weight(32, 128, 2, 4, seed=4, dim=0).t())
    rows = {row.name: row for row in sparsity_report(model)}
    fc_row = rows["transformer.h.0.mlp.c_fc"]
    assert fc_row.shape == (128, 32) and fc_row.pattern == "2:4" and fc_row.sparsity == 0.5
    proj_row = rows["transformer.h.0.mlp.c_proj"]
    assert proj_row.shape == (32, 128) and proj_row.sparsity == 0.5
    assert proj_row.pattern == "unstructured"
    assert rows["transformer.h.0.attn.c_attn"].pattern == "dense"
    assert rows["lm_head"].shape == (64, 32)


# ----------------------------------------------------------------------------------------------
# audit
# ----------------------------------------------------------------------------------------------


def test_audit_unchanged_model_passes():
    model = small_model()
    for reference in (snapshot_masks(model), copy.deepcopy(model)):
        result = audit(model, reference)
        assert isinstance(result, AuditResult)
        assert result.ok and bool(result)
        assert result.checked == 3
        assert result.new_nonzeros == {} and result.lost_nonzeros == {} and result.missing == []
        assert result.non_finite == {}
        assert "audit ok" in result.summary()


@pytest.mark.parametrize("use_snapshot", [True, False], ids=["snapshot", "reference_model"])
def test_audit_detects_new_nonzeros_and_nan(use_snapshot):
    model = small_model()
    reference = snapshot_masks(model) if use_snapshot else copy.deepcopy(model)
    pruned = (model[0].weight == 0).nonzero()
    with torch.no_grad():
        model[0].weight[tuple(pruned[0])] = 1e-30
        model[0].weight[tuple(pruned[1])] = float("nan")
        model[2].weight[tuple((model[2].weight == 0).nonzero()[0])] = -2.0
        model[3].weight[0, 0] = -0.0  # a kept weight lost (allowed, reported)
    result = audit(model, reference)
    assert not result.ok and not bool(result)
    assert result.new_nonzeros == {"0": 2, "2": 1}
    assert result.non_finite == {"0": 1}
    assert result.lost_nonzeros == {"3": 1}
    assert "0: 2 new nonzeros" in result.summary() and "FAILED" in result.summary()
    with pytest.raises(SparsityViolation, match="2 new nonzeros"):
        audit(model, reference, raise_on_violation=True)
    assert issubclass(SparsityViolation, AssertionError)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_audit_reports_non_finite_kept_weights(value):
    """A NaN/inf at a *kept* position (what merging a diverged run writes) fails the audit: no
    pruned position changed, yet the model is broken."""
    model = small_model()
    reference = snapshot_masks(model)
    kept = (model[2].weight != 0).nonzero()
    with torch.no_grad():
        model[2].weight[tuple(kept[0])] = value
        model[2].weight[tuple(kept[1])] = value
    result = audit(model, reference)
    assert result.new_nonzeros == {} and result.missing == []
    assert result.non_finite == {"2": 2}
    assert not result.ok and not bool(result)
    assert "2: 2 non-finite (NaN/inf) weights" in result.summary()
    assert "FAILED" in result.summary()
    with pytest.raises(SparsityViolation, match="non-finite"):
        audit(model, reference, raise_on_violation=True)


def test_audit_negative_zero_is_still_pruned():
    model = small_model()
    reference = snapshot_masks(model)
    with torch.no_grad():
        model[0].weight[model[0].weight == 0] = -0.0
    assert audit(model, reference, raise_on_violation=True).ok


def test_audit_lost_nonzeros_do_not_fail():
    model = small_model()
    reference = snapshot_masks(model)
    kept = (model[0].weight != 0).nonzero()
    with torch.no_grad():
        for index in kept[:3]:
            model[0].weight[tuple(index)] = 0.0
    result = audit(model, reference, raise_on_violation=True)
    assert result.ok and result.lost_nonzeros == {"0": 3} and result.new_nonzeros == {}
    assert "3 kept weights are now exactly 0" in result.summary()


def test_audit_missing_module_fails():
    model = small_model()
    reference = snapshot_masks(model)
    reference["9"] = torch.ones(2, 2, dtype=torch.bool)
    result = audit(model, reference)
    assert not result.ok and result.missing == ["9"] and result.checked == 3
    with pytest.raises(SparsityViolation, match="9: missing"):
        audit(model, reference, raise_on_violation=True)


def test_audit_shape_mismatch_raises():
    model = small_model()
    reference = snapshot_masks(model)
    reference["2"] = torch.ones(8, 12, dtype=torch.bool)  # transposed
    with pytest.raises(ValueError, match="audit: 2 has shape"):
        audit(model, reference)
    other = small_model()
    other[3] = nn.Linear(12, 5)
    with pytest.raises(ValueError, match="shape"):
        audit(model, other)


def test_audit_gpt2_conv1d():
    model = dense_gpt2()
    fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight.copy_(nm_weight(128, 32, 2, 4, seed=3).t())
    reference = snapshot_masks(model)
    assert reference["transformer.h.0.mlp.c_fc"].shape == (128, 32)
    assert audit(model, reference).ok
    with torch.no_grad():
        stored = (fc.weight == 0).nonzero()[:5]
        fc.weight[tuple(stored.t())] = 0.5
    result = audit(model, reference)
    assert result.new_nonzeros == {"transformer.h.0.mlp.c_fc": 5}


def test_audit_and_report_see_adapted_gpt2_conv1d():
    """After optimize(), GPT-2's Conv1D is a LorsConv1D: audit and report must still see it."""
    import lors_fx

    model = dense_gpt2()
    fc = model.transformer.h[0].mlp.c_fc
    with torch.no_grad():
        fc.weight.copy_(nm_weight(128, 32, 2, 4, seed=3).t())
    reference = snapshot_masks(model)
    lors_fx.optimize(model, lors_fx.LorsConfig(r=2, target_modules=["c_fc"]), compile=False)
    assert type(model.transformer.h[0].mlp.c_fc).__name__ == "LorsConv1D"
    rows = {row.name: row for row in sparsity_report(model)}
    assert rows["transformer.h.0.mlp.c_fc"].pattern == "2:4"
    assert audit(model, reference).ok
    with torch.no_grad():
        stored = (model.transformer.h[0].mlp.c_fc.weight == 0).nonzero()[:3]
        model.transformer.h[0].mlp.c_fc.weight[tuple(stored.t())] = 0.5
    assert audit(model, reference).new_nonzeros == {"transformer.h.0.mlp.c_fc": 3}
