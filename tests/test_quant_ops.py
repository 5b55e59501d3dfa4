"""The LoRS op on a quantized base against the float64 naive reference (both gradient modes),
what it saves for backward, quantization-aware training = the merged quantized forward, the
sparsity of W' whatever the adapters hold, and the bad inputs."""
from __future__ import annotations

import math

import pytest
import torch

from lors_fx.quant import compute_scales, dequantize, pack_codes, round_to_codes
from lors_fx.quant_ops import (merge_quantized_codes, quantized_effective_weight,
                               quantized_lora_linear, reference_quantized_lora_linear)

D_OUT, D_IN, R, S = 24, 32, 4, 0.5


def _base(bits, group=16, dtype=torch.float64, seed=0, sparsity=0.5):
    generator = torch.Generator().manual_seed(seed)
    weight = torch.randn(D_OUT, D_IN, generator=generator, dtype=torch.float64)
    weight[torch.rand(D_OUT, D_IN, generator=generator) < sparsity] = 0
    scales = compute_scales(weight, bits, group or D_IN, dtype=dtype)
    return pack_codes(round_to_codes(weight, scales, weight != 0, bits), bits), scales


def _inputs(dtype=torch.float64, seed=1, bias=True):
    generator = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(*shape, generator=generator, dtype=dtype).requires_grad_()
    return (make(3, 5, D_IN), make(R, D_IN), make(D_OUT, R), make(D_OUT) if bias else None)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("group", [8, None])
@pytest.mark.parametrize("bias", [True, False])
def test_forward_and_exact_gradients_equal_the_float64_reference(bits, group, bias):
    packed, scales = _base(bits, group)
    x, A, B, b = _inputs(bias=bias)
    y = quantized_lora_linear(x, packed, scales, A, B, bits=bits, bias=b, scaling=S,
                              grad_mode="exact", chunk_bytes=D_IN * 8 * 3)  # several chunks
    reference = reference_quantized_lora_linear(x, packed, scales, A, B, bits=bits, bias=b,
                                                scaling=S)
    torch.testing.assert_close(y, reference, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    wrt = [t for t in (x, A, B, b) if t is not None]
    for got, want in zip(torch.autograd.grad(y, wrt, g), torch.autograd.grad(reference, wrt, g)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("bits", [4, 8])
def test_lors_gradients_are_the_factorized_straight_through_ones(bits):
    packed, scales = _base(bits)
    x, A, B, b = _inputs()
    y = quantized_lora_linear(x, packed, scales, A, B, bits=bits, bias=b, scaling=S)
    g = torch.randn_like(y)
    grad_x, grad_A, grad_B, grad_b = torch.autograd.grad(y, (x, A, B, b), g)
    x2, g2 = x.detach().reshape(-1, D_IN), g.reshape(-1, D_OUT)
    weight = dequantize(packed, scales, bits)
    w_eff = weight + S * (B.detach() @ A.detach()) * (weight != 0)
    torch.testing.assert_close(grad_B, S * g2.t() @ (x2 @ A.detach().t()), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_A, S * (g2 @ B.detach()).t() @ x2, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_x.reshape(-1, D_IN), g2 @ w_eff, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grad_b, g2.sum(0))


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_only_x_is_saved_for_backward(grad_mode):
    packed, scales = _base(4, dtype=torch.float32)
    x, A, B, b = _inputs(torch.float32)
    existing = {id(t) for t in (packed, scales, A, B, b)}
    saved = []

    def pack(tensor):
        saved.append(tensor)
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        quantized_lora_linear(x, packed, scales, A, B, bits=4, bias=b, scaling=S,
                              grad_mode=grad_mode).sum().backward()
    new = [t for t in saved if id(t) not in existing]
    assert [tuple(t.shape) for t in new] == [tuple(x.shape)]
    assert not any(t.shape == (D_OUT, D_IN) and t.is_floating_point() for t in saved)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_quant_aware_forward_equals_the_merged_quantized_layer(bits, dtype):
    packed, scales = _base(bits, dtype=dtype)
    x, A, B, b = _inputs(dtype)
    y = quantized_lora_linear(x, packed, scales, A, B, bits=bits, bias=b, scaling=S,
                              quant_aware=True)
    merged = merge_quantized_codes(packed, scales, A, B, S, bits, quant_aware=True)
    merged_y = torch.nn.functional.linear(x, dequantize(merged, scales, bits), b)
    assert torch.equal(y, merged_y)
    assert torch.equal(dequantize(merged, scales, bits) != 0, dequantize(packed, scales, bits) != 0)


def test_quant_aware_gradients_are_straight_through():
    packed, scales = _base(4)
    x, A, B, _ = _inputs(bias=False)
    y = quantized_lora_linear(x, packed, scales, A, B, bits=4, scaling=S, quant_aware=True)
    plain = quantized_lora_linear(x, packed, scales, A, B, bits=4, scaling=S)
    g = torch.randn_like(y)
    qa_A, qa_B = torch.autograd.grad(y, (A, B), g, retain_graph=True)
    plain_A, plain_B = torch.autograd.grad(plain, (A, B), g)
    torch.testing.assert_close(qa_A, plain_A, rtol=0, atol=0)
    torch.testing.assert_close(qa_B, plain_B, rtol=0, atol=0)
    (grad_x,) = torch.autograd.grad(y, x, g)
    w_qa = quantized_effective_weight(packed, scales, A.detach(), B.detach(), S, 4, True)
    torch.testing.assert_close(grad_x.reshape(-1, D_IN), g.reshape(-1, D_OUT) @ w_qa)


def test_bf16_compute_is_close_to_the_float64_reference():
    packed, scales = _base(4, dtype=torch.bfloat16)
    x, A, B, b = _inputs(torch.bfloat16)
    A32, B32 = (t.detach().float().requires_grad_() for t in (A, B))
    y = quantized_lora_linear(x, packed, scales, A32, B32, bits=4, bias=b, scaling=S)
    reference = reference_quantized_lora_linear(
        x.double(), packed, scales.double(), A32.double(), B32.double(), bits=4,
        bias=b.double(), scaling=S)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.double(), reference, rtol=0.05, atol=0.1)
    y.sum().backward()
    assert A32.grad.dtype == torch.float32 and torch.isfinite(A32.grad).all()


@pytest.mark.parametrize("quant_aware", [False, True])
def test_w_eff_is_zero_outside_the_mask_whatever_the_adapters_hold(quant_aware):
    packed, scales = _base(4)
    pruned = dequantize(packed, scales, 4) == 0
    for magnitude in (1e3, 1e200):
        A = torch.full((R, D_IN), magnitude, dtype=torch.float64)
        B = torch.full((D_OUT, R), magnitude, dtype=torch.float64)
        w_eff = quantized_effective_weight(packed, scales, A, B, S, 4, quant_aware)
        assert (w_eff[pruned] == 0).all()
        merged = merge_quantized_codes(packed, scales, A, B, S, 4, quant_aware) \
            if magnitude < 1e100 else None
        if merged is not None:  # saturates at +-qmax, the pattern is kept bit for bit
            assert torch.equal(dequantize(merged, scales, 4) == 0, pruned)


def test_nan_adapters_stay_visible_and_pruned_positions_stay_zero():
    packed, scales = _base(4)
    x, A, B, _ = _inputs(bias=False)
    B = B.detach().clone()
    B[0, 0] = math.nan
    y = quantized_lora_linear(x, packed, scales, A, B, bits=4, scaling=S)
    assert torch.isnan(y[..., 0]).all()
    w_eff = quantized_effective_weight(packed, scales, A.detach(), B, S, 4, False)
    assert (w_eff[dequantize(packed, scales, 4) == 0] == 0).all()


def test_bad_inputs_are_refused():
    packed, scales = _base(4, dtype=torch.float32)
    x, A, B, b = _inputs(torch.float32)
    call = lambda **kw: quantized_lora_linear(**{**dict(x=x, packed=packed, scales=scales,
                                                         lora_A=A, lora_B=B, bits=4), **kw})
    with pytest.raises(ValueError, match="bits must be 4 or 8"):
        call(bits=3)
    with pytest.raises(TypeError, match="uint8"):
        call(packed=packed.to(torch.int32))
    with pytest.raises(TypeError, match="compute dtype"):
        call(x=x.double())
    with pytest.raises(ValueError, match="shapes do not match"):
        call(lora_A=A[:, :-2])
    with pytest.raises(ValueError, match="scales"):
        call(scales=scales[:, :1].repeat(1, 3))
    with pytest.raises(ValueError, match="grad_mode"):
        call(grad_mode="fast")
    with pytest.raises(ValueError, match="bias"):
        call(bias=b[:-1])


def test_autocast_runs_in_the_autocast_dtype():
    packed, scales = _base(4, dtype=torch.float32)
    x, A, B, b = _inputs(torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = quantized_lora_linear(x, packed, scales, A, B, bits=4, bias=b, scaling=S)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert A.grad is not None and A.grad.dtype == torch.float32


def test_the_op_passes_opcheck():
    packed, scales = _base(4, dtype=torch.float32)
    x, A, B, b = _inputs(torch.float32)
    args = (x, packed, scales, A, B, b, S, "lors", 4, False, 2**20)
    torch.library.opcheck(torch.ops.lors.quant_lora_linear.default, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))
