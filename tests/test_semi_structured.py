"""lors_fx.semi_structured: the 2:4 pattern check and the status reasons run on CPU; the kernels
themselves (compression, the sparse linear) need CUDA with compute capability >= 8.0."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from lors_fx.ops import build_merged_weight
from lors_fx.semi_structured import (compress_semi_structured, has_2to4_pattern,
                                     semi_structured_linear, semi_structured_status)
from lors_fx.workflows.prune import magnitude_prune_

NEEDS_CUDA = "needs CUDA (Ampere or newer) for the 2:4 kernels"
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NEEDS_CUDA)


def _weight(d_out=64, d_in=128, pattern="2:4", dtype=torch.bfloat16, seed=0, device="cpu"):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(d_out, d_in, generator=generator)
    if ":" in pattern:
        magnitude_prune_(weight, pattern=pattern)
    else:
        magnitude_prune_(weight, float(pattern.rstrip("%")) / 100)
    return weight.to(device=device, dtype=dtype)


# --- has_2to4_pattern (any device)


def test_a_2to4_pruned_weight_has_the_pattern():
    assert has_2to4_pattern(_weight(pattern="2:4"))


def test_sparser_groups_still_count_as_2to4():
    weight = _weight(pattern="2:4")
    weight[:, :8] = 0  # groups with 0 or 1 nonzero: compression stores zeros, still exact
    assert has_2to4_pattern(weight)
    assert has_2to4_pattern(torch.zeros(16, 16))


def test_unstructured_50_percent_is_not_2to4():
    assert not has_2to4_pattern(_weight(pattern="50%"))


def test_one_dense_group_breaks_the_pattern():
    weight = _weight(pattern="2:4")
    weight[3, 4:8] = 1.0
    assert not has_2to4_pattern(weight)


def test_nan_counts_as_nonzero():
    weight = _weight(pattern="2:4")
    group = weight[0, :4]
    group[group == 0] = float("nan")
    assert not has_2to4_pattern(weight)


@pytest.mark.parametrize("shape", [(8, 6), (4,), (2, 4, 4)])
def test_wrong_shapes_are_not_2to4(shape):
    assert not has_2to4_pattern(torch.zeros(shape))


# --- semi_structured_status reasons (CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA reason")
def test_no_cuda_is_the_reason_on_cpu():
    ok, reason = semi_structured_status(_weight())
    assert not ok
    assert "no CUDA" in reason
    assert "2:4 pattern" not in reason and "dtype" not in reason and "shape" not in reason


def test_unstructured_weight_is_refused_as_not_2to4():
    ok, reason = semi_structured_status(_weight(pattern="50%"))
    assert not ok
    assert "not a 2:4 pattern" in reason


def test_float32_is_refused():
    ok, reason = semi_structured_status(_weight(dtype=torch.float32))
    assert not ok
    assert "dtype torch.float32" in reason and "bfloat16" in reason


@pytest.mark.parametrize("shape", [(24, 128), (64, 40), (8, 8)])
def test_shapes_off_the_kernel_granularity_are_refused(shape):
    weight = torch.zeros(shape, dtype=torch.bfloat16)
    ok, reason = semi_structured_status(weight)
    assert not ok
    assert f"shape {shape[0]}x{shape[1]}" in reason and "multiples of 16" in reason


def test_every_unmet_condition_is_listed():
    ok, reason = semi_structured_status(_weight(d_out=24, pattern="50%", dtype=torch.float32))
    assert not ok
    assert "dtype" in reason and "shape" in reason and "not a 2:4 pattern" in reason


def test_a_3d_weight_is_refused():
    ok, reason = semi_structured_status(torch.zeros(2, 16, 16, dtype=torch.bfloat16))
    assert not ok and "2-D" in reason


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA build to ask for cpu")
def test_a_cpu_device_is_refused_when_cuda_exists():
    ok, reason = semi_structured_status(_weight(), device="cpu")
    assert not ok and "CUDA tensors only" in reason


# --- the entry points refuse what they cannot do (CPU)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA error")
def test_compress_raises_with_the_reason_on_cpu():
    with pytest.raises(RuntimeError, match="no CUDA"):
        compress_semi_structured(_weight())


def test_linear_refuses_a_gradient_through_x():
    x = torch.randn(4, 128, dtype=torch.bfloat16, requires_grad=True)
    with pytest.raises(RuntimeError, match="forward only"):
        semi_structured_linear(x, _weight())


def test_linear_refuses_mixed_dtypes():
    with pytest.raises(TypeError, match="float32"):
        semi_structured_linear(torch.randn(4, 128), _weight())


# --- the kernels (CUDA)


def _merged_prime(weight, r=8, scale=2.0, seed=1):
    """``W'`` as LoRS builds it: the 2:4 pattern of ``weight`` kept."""
    generator = torch.Generator().manual_seed(seed)
    lora_A = (torch.randn(r, weight.shape[1], generator=generator) * 0.1).to(weight.device)
    lora_B = (torch.randn(weight.shape[0], r, generator=generator) * 0.1).to(weight.device)
    return build_merged_weight(weight, lora_A, lora_B, scale)


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("x_shape", [(64, 256), (3, 13, 256)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_semi_structured_linear_matches_f_linear(dtype, x_shape, with_bias):
    weight_prime = _merged_prime(_weight(d_out=128, d_in=256, dtype=dtype, device="cuda"))
    ok, reason = semi_structured_status(weight_prime)
    assert ok, reason
    x = torch.randn(x_shape, dtype=dtype, device="cuda")
    bias = torch.randn(128, dtype=dtype, device="cuda") if with_bias else None
    expected = F.linear(x.double(), weight_prime.double(),
                        None if bias is None else bias.double())
    got = semi_structured_linear(x, weight_prime, bias)
    assert got.shape == expected.shape and got.dtype == dtype
    dense = F.linear(x, weight_prime, bias).double()
    scale = expected.abs().max().item()
    # the sparse kernel rounds like the dense one: compare both to the float64 product
    assert (got.double() - expected).abs().max().item() <= \
        2 * (dense - expected).abs().max().item() + 1e-2 * scale


@pytest.mark.cuda
@needs_cuda
def test_a_precompressed_weight_is_reused():
    weight_prime = _merged_prime(_weight(d_out=128, d_in=256, device="cuda"))
    compressed = compress_semi_structured(weight_prime)
    assert isinstance(compressed, torch.sparse.SparseSemiStructuredTensor)
    x = torch.randn(32, 256, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(semi_structured_linear(x, compressed),
                               semi_structured_linear(x, weight_prime), rtol=0, atol=0)


@pytest.mark.cuda
@needs_cuda
def test_status_is_ok_for_a_2to4_bf16_weight_on_ampere_or_newer():
    weight = _weight(d_out=128, d_in=256, device="cuda")
    ok, reason = semi_structured_status(weight)
    if torch.cuda.get_device_capability() < (8, 0):
        assert not ok and "compute capability" in reason
    else:
        assert ok == torch.backends.cusparselt.is_available(), reason


@pytest.mark.cuda
@needs_cuda
def test_compress_refuses_an_unstructured_weight_on_cuda():
    with pytest.raises(RuntimeError, match="not a 2:4 pattern"):
        compress_semi_structured(_weight(d_out=128, d_in=256, pattern="50%", device="cuda"))


# --- LorsConfig(semi_structured=True): the opt-in 2:4 forward of the op


def _toy_2to4(dtype=torch.float32, device="cpu"):
    from lors_fx.testing.toy import build_toy_llama

    model = build_toy_llama(seed=0)
    magnitude_prune_(model, pattern="2:4")  # every projection now has at most 2 of 4 kept
    return model.to(device=device, dtype=dtype)


@pytest.mark.parametrize("fields", [dict(grad_mode="exact"), dict(recompute=False),
                                    dict(lora_dropout=0.1)])
def test_config_refuses_what_the_2to4_path_cannot_do(fields):
    from lors_fx import LorsConfig

    with pytest.raises(ValueError, match="semi_structured"):
        LorsConfig(semi_structured=True, **fields)


def test_compile_true_is_refused_before_anything_changes():
    from lors_fx import LorsConfig, lors_modules, optimize

    model = _toy_2to4()
    with pytest.raises(ValueError, match="compile=False"):
        optimize(model, LorsConfig(semi_structured=True))
    assert not lors_modules(model)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA fallback")
def test_without_cuda_every_layer_runs_the_dense_op_and_is_named():
    from lors_fx import LorsConfig, lors_modules, optimize

    model, plain = _toy_2to4(), _toy_2to4()
    with pytest.warns(UserWarning, match=r"semi_structured: 14 layer\(s\) run the dense op.*no CUDA"):
        optimize(model, LorsConfig(semi_structured=True), compile=False)
    optimize(plain, LorsConfig(), compile=False)
    plain.load_state_dict(model.state_dict())
    assert not any(m.semi_structured for m in lors_modules(model).values())
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, plain(input_ids=ids).logits)


def test_the_2to4_op_has_the_ops_forward_and_gradients(monkeypatch):
    """Everything but the kernel, on CPU: the 2:4 matmul replaced by F.linear, the function's
    forward and its LoRS gradients equal the op's (W' built, x saved, W' rebuilt for dx)."""
    import lors_fx.semi_structured as semi
    from lors_fx.ops import sparse_lora_linear

    monkeypatch.setattr(semi, "semi_structured_linear",
                        lambda x, w, bias=None, check=True: F.linear(x, w, bias))
    weight = _weight(64, 128, dtype=torch.float32)
    generator = torch.Generator().manual_seed(1)
    leaves = [torch.randn(3, 5, 128, generator=generator), torch.randn(8, 128, generator=generator),
              torch.randn(64, 8, generator=generator), torch.randn(64, generator=generator)]
    ours = [t.clone().requires_grad_() for t in leaves]
    theirs = [t.clone().requires_grad_() for t in leaves]
    out = semi.semi_structured_lora_linear(ours[0], weight, ours[1], ours[2], ours[3], 2.0)
    ref = sparse_lora_linear(theirs[0], weight, theirs[1], theirs[2], bias=theirs[3], scaling=2.0)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    grad = torch.randn_like(ref)
    out.backward(grad)
    ref.backward(grad)
    for mine, other in zip(ours, theirs):
        torch.testing.assert_close(mine.grad, other.grad, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="grad_mode must be 'lors'"):
        semi.semi_structured_lora_linear(ours[0], weight, ours[1], ours[2], grad_mode="exact")


@pytest.mark.cuda
@needs_cuda
def test_optimize_with_semi_structured_matches_the_dense_op_on_cuda():
    from lors_fx import LorsConfig, lors_modules, optimize

    model, plain = _toy_2to4(torch.bfloat16, "cuda"), _toy_2to4(torch.bfloat16, "cuda")
    optimize(model, LorsConfig(semi_structured=True), compile=False)
    optimize(plain, LorsConfig(), compile=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora_B"):
                param.normal_(0, 0.05)
    plain.load_state_dict(model.state_dict())
    assert all(m.semi_structured for m in lors_modules(model).values())
    ids = torch.randint(0, 128, (2, 32), device="cuda")
    losses = [m(input_ids=ids, labels=ids).loss for m in (model, plain)]
    torch.testing.assert_close(losses[0], losses[1], rtol=2e-2, atol=2e-2)
    for loss in losses:
        loss.backward()
    for (name, p), (_, q) in zip(model.named_parameters(), plain.named_parameters()):
        if p.requires_grad:
            torch.testing.assert_close(p.grad, q.grad, rtol=5e-2, atol=5e-3, msg=name)
