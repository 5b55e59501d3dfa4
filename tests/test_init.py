"""Gradient-based init: lora_A spans the top-r right singular subspace of the true averaged weight
gradient (float64 autograd + dense SVD reference), the model is unchanged at step 0, masked option,
streaming per layer, HF dict batches, errors that change nothing."""
import copy

import pytest
import torch
import torch.nn.functional as F

from lors_fx import LorsConfig, attach_adapters, gradient_init, lors_modules, optimize
from lors_fx.init import PEFT_ROW_NORM
from lors_fx.testing.toy import build_toy_llama, toy_batches
from tests._toy import assert_unchanged, snapshot, sparse_mlp, tiny_gpt2

# fp32 hooks + randomized SVD vs float64 autograd + dense SVD: projector difference (Frobenius).
# Measured ~1e-5 with relative spectral gaps S[r-1]/S[r] >= 1.05 (asserted below).
PROJECTOR_TOL = 1e-4


def _data(seed=0, n_batches=4, batch=8):
    generator = torch.Generator().manual_seed(seed)
    return [(torch.randn(batch, 24, generator=generator),
             torch.randn(batch, 8, generator=generator)) for _ in range(n_batches)]


def _loss_fn(model, batch):
    x, y = batch
    return F.mse_loss(model(x), y)


def _reference_gradients(plain, batches, total):
    """``{layer index: sum_b (n_b/N) dloss_b/dW}`` by autograd on a float64 copy."""
    model = copy.deepcopy(plain).double()
    for p in model.parameters():
        p.requires_grad_(True)
    grads = {i: torch.zeros_like(model[i].weight) for i in (0, 2)}
    for x, y in batches:
        loss = F.mse_loss(model(x.double()), y.double())
        g = torch.autograd.grad(loss, [model[0].weight, model[2].weight])
        for i, gi in zip((0, 2), g):
            grads[i] += gi * (x.shape[0] / total)
    return grads


def _projector_gap(lora_A, grad, r):
    A = lora_A.detach().double() / PEFT_ROW_NORM  # rows scaled to PEFT's norm by default
    _, _, Vh = torch.linalg.svd(grad)
    true = Vh[:r].t() @ Vh[:r]
    return float(torch.linalg.matrix_norm(A.t() @ A - true))


@pytest.mark.parametrize("mask_gradient", [False, True])
@pytest.mark.parametrize("max_gradient_bytes", [None, 1], ids=["one-pass", "per-layer"])
def test_lora_A_spans_top_right_singular_subspace(mask_gradient, max_gradient_bytes):
    plain = sparse_mlp(sizes=(24, 16, 8), seed=2)
    batches = _data()
    model = copy.deepcopy(plain)
    attach_adapters(model, LorsConfig(r=3, init_samples=32))
    extra = {} if max_gradient_bytes is None else {"max_gradient_bytes": max_gradient_bytes}
    torch.manual_seed(0)
    shares = gradient_init(model, batches, loss_fn=_loss_fn, mask_gradient=mask_gradient,
                           progress=False, **extra)
    reference = _reference_gradients(plain, batches, total=32)
    for index in (0, 2):
        module = model[index]
        grad = reference[index]
        if mask_gradient:
            grad = grad * (plain[index].weight != 0)
        S = torch.linalg.svdvals(grad)
        assert S[2] > 1.05 * S[3]  # a spectral gap: the subspace is well defined
        assert _projector_gap(module.lora_A, grad, 3) < PROJECTOR_TOL
        A = module.lora_A.detach().double()
        # orthogonal rows of PEFT's Kaiming-uniform norm 1/sqrt(3)
        torch.testing.assert_close(A @ A.t(), torch.eye(3, dtype=torch.float64) / 3, atol=1e-5,
                                   rtol=0)
        assert torch.count_nonzero(module.lora_B) == 0
        expected_share = float(S[:3].pow(2).sum() / S.pow(2).sum())
        assert shares[str(index)] == pytest.approx(expected_share, abs=1e-4)
    # The mask changes the answer (so the option is really applied).
    other = copy.deepcopy(plain)
    attach_adapters(other, LorsConfig(r=3, init_samples=32))
    gradient_init(other, batches, loss_fn=_loss_fn, mask_gradient=not mask_gradient,
                  progress=False)
    A0, A1 = model[0].lora_A.detach().double(), other[0].lora_A.detach().double()
    assert float(torch.linalg.matrix_norm(A0.t() @ A0 - A1.t() @ A1)) > 1e-2


def test_samples_limit_and_model_unchanged_at_step0():
    plain = sparse_mlp(sizes=(24, 16, 8), seed=2)
    batches = _data(n_batches=4)
    model = copy.deepcopy(plain)
    attach_adapters(model, LorsConfig(r=3))
    base = {k: v.clone() for k, v in model.state_dict().items() if "lora_" not in k}
    x = torch.randn(5, 24)
    with torch.no_grad():
        before = model(x)
    gradient_init(model, iter(batches), loss_fn=_loss_fn, samples=12, progress=False)
    with torch.no_grad():
        after = model(x)
        assert torch.equal(after, before)
        torch.testing.assert_close(after, plain(x), rtol=1e-6, atol=1e-6)
    for key, value in base.items():
        assert torch.equal(model.state_dict()[key], value)
    assert all(p.grad is None for p in model.parameters())
    assert not model[0].weight.requires_grad
    # only the first 12 examples were used: 8 of batch 0 + 4 of batch 1
    used = [batches[0], (batches[1][0][:4], batches[1][1][:4])]
    reference = _reference_gradients(plain, used, total=12)
    assert _projector_gap(model[0].lora_A, reference[0], 3) < PROJECTOR_TOL


def test_errors_change_nothing():
    model = sparse_mlp(sizes=(24, 16, 8))
    attach_adapters(model, LorsConfig(r=3))
    snap = snapshot(model)
    with pytest.raises(ValueError, match="batches is empty"):
        gradient_init(model, [], loss_fn=_loss_fn, progress=False)
    with pytest.raises(TypeError, match="need loss_fn"):
        gradient_init(model, _data(), progress=False)
    with pytest.raises(ValueError, match="samples must be a positive int"):
        gradient_init(model, _data(), loss_fn=_loss_fn, samples=0, progress=False)

    def bad_second_batch(model, batch):
        if bad_second_batch.calls == 1:
            raise RuntimeError("boom")
        bad_second_batch.calls += 1
        return _loss_fn(model, batch)
    bad_second_batch.calls = 0
    with pytest.raises(RuntimeError, match="boom"):
        gradient_init(model, _data(), loss_fn=bad_second_batch, progress=False,
                      max_gradient_bytes=1)
    assert_unchanged(model, snap)
    with pytest.raises(ValueError, match="no LoRS adapters"):
        gradient_init(sparse_mlp(), _data(), loss_fn=_loss_fn, progress=False)


@pytest.mark.parametrize("build,vocab", [(build_toy_llama, 128), (tiny_gpt2, 64)],
                         ids=["llama", "gpt2"])
def test_optimize_gradient_init_on_hf_batches(build, vocab):
    model = build()
    batches = toy_batches(2, batch_size=4, seq_len=16, vocab_size=vocab)
    model.eval()
    with torch.no_grad():
        before = model(input_ids=batches[0]["input_ids"]).logits
    config = LorsConfig(r=4, init="gradient", init_samples=6,
                        target_modules=None if vocab == 128 else ["c_attn", "c_fc", "c_proj"])
    optimize(model, config, compile=False, init_data=batches)
    modules = lors_modules(model)
    assert modules
    for module in modules.values():
        A = module.lora_A.detach().double()
        torch.testing.assert_close(A @ A.t(), torch.eye(4, dtype=torch.float64) * PEFT_ROW_NORM**2,
                                   atol=1e-5, rtol=0)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=batches[0]["input_ids"]).logits, before,
                                   rtol=1e-5, atol=1e-5)


class _Twice(torch.nn.Module):
    """One pruned linear applied twice in a forward: its gradient is the sum over both calls."""

    def __init__(self):
        super().__init__()
        self.body = sparse_mlp(sizes=(16, 16), seed=4)
        self.head = torch.nn.Linear(16, 4)

    def forward(self, x):
        return self.head(self.body(F.gelu(self.body(x))))


def test_module_called_twice_accumulates_both_calls():
    plain = _Twice()
    batches = [(torch.randn(8, 16), torch.randn(8, 4)) for _ in range(2)]
    model = copy.deepcopy(plain)
    attach_adapters(model, LorsConfig(r=2, target_modules=["body.0"]))
    gradient_init(model, batches, loss_fn=_loss_fn, progress=False)
    reference = copy.deepcopy(plain).double()
    weight = reference.body[0].weight.requires_grad_(True)
    grad = sum(torch.autograd.grad(F.mse_loss(reference(x.double()), y.double()), weight)[0] / 2
               for x, y in batches)
    S = torch.linalg.svdvals(grad)
    assert S[1] > 1.05 * S[2]
    assert _projector_gap(model.body[0].lora_A, grad, 2) < PROJECTOR_TOL


@pytest.mark.parametrize("row_norm", [1.0, 0.25])
def test_row_norm_scales_rows_and_keeps_the_subspace(row_norm):
    """row_norm sets each lora_A row's norm; the spanned subspace is the same; bad values raise."""
    plain = sparse_mlp(sizes=(24, 16, 8), seed=2)
    batches = _data()
    model = copy.deepcopy(plain)
    attach_adapters(model, LorsConfig(r=3, init_samples=32))
    torch.manual_seed(0)
    gradient_init(model, batches, loss_fn=_loss_fn, progress=False, row_norm=row_norm)
    A = model[0].lora_A.detach().double()
    torch.testing.assert_close(A.norm(dim=1), torch.full((3,), row_norm, dtype=torch.float64),
                               atol=1e-5, rtol=0)
    reference = _reference_gradients(plain, batches, total=32)[0]
    _, _, Vh = torch.linalg.svd(reference)
    true = Vh[:3].t() @ Vh[:3]
    assert float(torch.linalg.matrix_norm(A.t() @ A / row_norm**2 - true)) < PROJECTOR_TOL
    for bad in (0.0, -1.0, float("nan")):
        with pytest.raises(ValueError, match="row_norm"):
            gradient_init(model, batches, loss_fn=_loss_fn, progress=False, row_norm=bad)
