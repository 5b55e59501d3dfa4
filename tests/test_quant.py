"""The sparsity-aware grid (lors_fx.quant): rounding keeps the mask, packing round-trips, the
chunked dequant equals the whole one, and the errors are within the documented steps."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lors_fx.quant import (QMAX, QuantSpec, compute_scales, dequantize, dequantize_rows,
                           fake_quantize_rows_, pack_codes, resolve_group_size, round_to_codes,
                           search_scales, unpack_codes)


def _pruned(rows, cols, seed, sparsity=0.5, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(rows, cols, generator=generator, dtype=torch.float64)
    weight[torch.rand(rows, cols, generator=generator) < sparsity] = 0
    return weight.to(dtype)


@settings(max_examples=60, deadline=None)
@given(bits=st.sampled_from([4, 8]), group=st.sampled_from([2, 4, 8, 16]),
       rows=st.integers(1, 9), groups=st.integers(1, 4), seed=st.integers(0, 2**16),
       sparsity=st.floats(0.0, 0.95), scale_exp=st.integers(-30, 30))
def test_round_trip_keeps_the_mask_and_stays_within_a_step(bits, group, rows, groups, seed,
                                                            sparsity, scale_exp):
    weight = _pruned(rows, group * groups, seed, sparsity) * 2.0 ** scale_exp
    scales = compute_scales(weight, bits, group)
    codes = round_to_codes(weight, scales, weight != 0, bits)
    assert torch.equal(codes != 0, weight != 0)  # zeros stay code 0, kept weights never 0
    assert int(codes.abs().max()) <= QMAX[bits]
    packed = pack_codes(codes, bits)
    assert torch.equal(unpack_codes(packed, bits), codes)
    restored = dequantize(packed, scales, bits)
    assert torch.equal(restored != 0, weight != 0)
    step = scales.repeat_interleave(group, dim=1).double()
    error = (restored.double() - weight.double()).abs()
    small = weight.double().abs() < step / 2  # kept weights under half a step round away to +-1
    kept = weight != 0
    # half a step (plus float32 rounding of the product) for every kept weight above half a step,
    # and under one step for those below it
    assert (error[kept & ~small] <= step[kept & ~small] * (0.5 + 1e-5)).all()
    assert (error[kept & small] < step[kept & small]).all()


def test_every_code_packs_and_unpacks():
    for bits in (4, 8):
        values = torch.arange(-QMAX[bits], QMAX[bits] + 1, dtype=torch.int8)
        codes = torch.cartesian_prod(values, values).view(-1, 2).repeat(1, 2)
        assert torch.equal(unpack_codes(pack_codes(codes, bits), bits), codes)


def test_four_bit_codes_take_half_a_byte():
    codes = torch.ones(8, 32, dtype=torch.int8)
    assert pack_codes(codes, 4).shape == (8, 16) and pack_codes(codes, 4).dtype == torch.uint8
    assert pack_codes(codes, 8).dtype == torch.int8


@pytest.mark.parametrize("bits", [4, 8])
def test_dequantize_rows_in_chunks_equals_the_whole(bits):
    weight = _pruned(13, 32, seed=1)
    scales = compute_scales(weight, bits, 8)
    packed = pack_codes(round_to_codes(weight, scales, weight != 0, bits), bits)
    whole = dequantize(packed, scales, bits)
    parts = torch.cat([dequantize_rows(packed, scales, bits, i, min(13, i + 4),
                                       torch.empty(min(13, i + 4) - i, 32)) for i in range(0, 13, 4)])
    assert torch.equal(parts, whole)


def test_scales_are_zero_only_for_all_pruned_groups_and_positive_for_tiny_weights():
    weight = torch.zeros(2, 8)
    weight[1, 4] = 1e-44  # a float32 denormal: absmax / 7 underflows
    scales = compute_scales(weight, 4, 4)
    assert scales[0].eq(0).all() and scales[1, 0] == 0
    assert scales[1, 1] > 0
    codes = round_to_codes(weight, scales, weight != 0, 4)
    assert codes[1, 4] == 1 and int((codes != 0).sum()) == 1


def test_an_exact_zero_kept_position_rounds_to_plus_one():
    values = torch.tensor([[0.0, -0.01, 0.01, 0.0]])
    kept = torch.tensor([[True, True, True, False]])
    codes = round_to_codes(values, torch.tensor([[1.0]]), kept, 4)
    assert codes.tolist() == [[1, -1, 1, 0]]


def test_values_beyond_the_grid_saturate_at_qmax_and_the_extra_negative_level():
    codes = round_to_codes(torch.tensor([[100.0, -100.0, -7.6, 7.6]]), torch.tensor([[1.0]]),
                           torch.tensor([[True, True, True, True]]), 4)
    assert codes.tolist() == [[7, -8, -8, 7]]  # [-8, 7]: what compressed-tensors' grid holds


def test_fake_quantize_equals_the_dequantized_codes_and_keeps_nan_visible():
    weight = _pruned(6, 16, seed=2)
    scales = compute_scales(weight, 4, 8)
    kept = weight != 0
    expected = dequantize(pack_codes(round_to_codes(weight, scales, kept, 4), 4), scales, 4)
    assert torch.equal(fake_quantize_rows_(weight.clone(), scales, kept, 4), expected)
    poisoned = weight.clone()
    index = kept.nonzero()[0]
    poisoned[index[0], index[1]] = math.nan
    out = fake_quantize_rows_(poisoned, scales, kept, 4)
    assert math.isnan(float(out[index[0], index[1]]))
    assert (out[~kept] == 0).all()
    with pytest.raises(FloatingPointError, match="NaN/inf"):
        round_to_codes(poisoned, scales, kept, 4)


@pytest.mark.parametrize("bits,group,message", [(3, 128, "bits must be 4 or 8"),
                                                 (4, 0, "positive int"), (4, 7, "even"),
                                                 (True, 128, "bits must be 4 or 8")])
def test_bad_specs_are_refused(bits, group, message):
    with pytest.raises(ValueError, match=message):
        QuantSpec(bits, group)


def test_a_group_that_does_not_divide_d_in_is_refused_with_the_divisors():
    with pytest.raises(ValueError, match=r"group_size=128 does not divide d_in=576.*64"):
        resolve_group_size(QuantSpec(4, 128), 576, "q_proj")
    assert resolve_group_size(QuantSpec(4, None), 576) == 576
    with pytest.raises(ValueError, match="odd"):
        resolve_group_size(QuantSpec(4, None), 575)


def test_nan_weights_are_refused():
    weight = torch.ones(2, 4)
    weight[0, 0] = math.nan
    with pytest.raises(ValueError, match="NaN or inf"):
        compute_scales(weight, 4, 4)


def test_searched_scales_spare_the_tiny_weights_of_an_outlier_input_channel():
    """Wanda keeps tiny weights where inputs are huge; absmax scales force them to a whole step
    (the output error scales with the input), the importance-weighted search does not."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(32, 64, generator=generator)
    weight[:, 5] = 0.01 * torch.sign(torch.randn(32, generator=generator))  # tiny, kept
    weight[torch.rand(32, 64, generator=generator) < 0.5] = 0
    weight[:, 5] = 0.01
    importance = torch.ones(64)
    importance[5] = 1e6  # the outlier channel: its inputs are 1000x the others
    x = torch.randn(256, 64, generator=generator) * importance.sqrt()

    def output_error(scales):
        codes = round_to_codes(weight, scales, weight != 0, 4)
        assert torch.equal(codes != 0, weight != 0)
        return float(((x @ (dequantize(pack_codes(codes, 4), scales, 4) - weight).t()) ** 2).mean())

    absmax = compute_scales(weight, 4, 32)
    searched = search_scales(weight, 4, 32, importance)
    assert output_error(searched) < 0.1 * output_error(absmax)
    plain = search_scales(weight, 4, 32)  # no importance: the plain squared error
    error = lambda s: float(((dequantize(pack_codes(round_to_codes(weight, s, weight != 0, 4), 4),
                                         s, 4) - weight) ** 2).sum())
    assert error(plain) <= error(absmax) + 1e-9
    assert torch.equal(search_scales(torch.zeros(2, 32), 4, 32), torch.zeros(2, 1))
