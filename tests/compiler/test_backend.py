"""lors_fx.compiler.backend: the lors ``torch.compile`` backend on a small sparse MLP.

The naive masked form is rewritten to the lors op in the forward GraphModule, the partitioned
forward saves x instead of W' (saved bytes after < before), loss and adapter gradients equal eager
(exact: the naive form's autograd, fp32 tolerance; lors: the eager op); ``passes=`` and
``report_before=`` are honoured; one inductor case.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lors_fx
from lors_fx import LorsConfig
from lors_fx.ops import reference_sparse_lora_linear, sparse_lora_linear
from lors_fx.workflows.prune import magnitude_prune_
from tests.compiler._mlp import SITE_SHAPES, SIZES, T, loss_and_grads, w_prime_sized

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


class NaiveMLP(nn.Module):
    """Two frozen 50%-sparse linears with hand-attached adapters, written in the naive form
    (``use_op=False``, what the backend must rewrite) or calling the lors op (the eager path)."""

    def __init__(self, grad_mode="lors", use_op=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(SIZES[0], SIZES[1])
        self.fc2 = nn.Linear(SIZES[1], SIZES[2])
        for layer in (self.fc1, self.fc2):
            magnitude_prune_(layer.weight, 0.5)
            layer.weight.requires_grad_(False)
            layer.lora_A = nn.Parameter(torch.randn(4, layer.in_features) * 0.2)
            layer.lora_B = nn.Parameter(torch.randn(layer.out_features, 4) * 0.2)
        self.grad_mode, self.use_op, self.scaling = grad_mode, use_op, 2.0

    def _linear(self, layer, x):
        if self.use_op:
            return sparse_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B,
                                      bias=layer.bias, scaling=self.scaling,
                                      grad_mode=self.grad_mode)
        return reference_sparse_lora_linear(x, layer.weight, layer.lora_A, layer.lora_B,
                                            layer.bias, self.scaling)

    def forward(self, x):
        return self._linear(self.fc2, F.gelu(self._linear(self.fc1, x)))


def _compiled(model, config, **kwargs):
    lors_backend = lors_fx.backend(config, model=model, **kwargs)
    return torch.compile(model, backend=lors_backend), lors_backend.state


@pytest.mark.parametrize("grad_mode", ["lors", "exact"])
def test_backend_rewrites_and_saves_x_instead_of_w_prime(grad_mode):
    config = LorsConfig(r=4, lora_alpha=8.0, grad_mode=grad_mode)
    model = NaiveMLP(grad_mode)
    compiled, state = _compiled(model, config)
    x = torch.randn(T, SIZES[0])
    loss, grads, grad_x = loss_and_grads(model, compiled, x)

    assert len(state.graphs) == 1 and state.recompiles == 0
    record = state.graphs[0]
    assert {r.name: r.count for r in record.passes} == {"annotate_sparse_linears": 2,
                                                        "convert_peft_lora": 0, "rewrite_quantized_adapters": 0,
                                                        "rewrite_masked_adapters": 2}
    assert sorted(record.sites) == ["fc1", "fc2"]
    assert all(site.rewritten and site.grad_mode == grad_mode for site in record.sites.values())
    assert record.forward.code.count("torch.ops.lors.sparse_lora_linear.default(") == 2
    # the op's backward rebuilds W' (d_out x d_in) from the parameters instead of loading it
    rebuilt = {tuple(n.meta["val"].shape) for n in record.backward.graph.nodes
               if n.op == "call_function" and isinstance(n.meta.get("val"), torch.Tensor)}
    assert set(SITE_SHAPES) <= rebuilt
    assert f"'{grad_mode}'" in record.forward.code

    after, before = record.saved_after.details, record.saved_before.details
    assert w_prime_sized(before["rows"], SITE_SHAPES), before["rows"]
    assert not w_prime_sized(after["rows"], SITE_SHAPES), after["rows"]
    assert after["saved_bytes"] < before["saved_bytes"]
    # x of each site (2-D views), fc1's output for gelu's backward; nothing weight-sized
    assert after["saved_bytes"] == 4 * T * (SIZES[0] + SIZES[1] + SIZES[1])

    # numerics: exact = autograd of the naive form; lors = the eager op
    reference = NaiveMLP(grad_mode, use_op=(grad_mode == "lors"))
    ref_loss, ref_grads, ref_grad_x = loss_and_grads(reference, reference, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    assert sorted(grads) == sorted(ref_grads) == ["fc1.bias", "fc1.lora_A", "fc1.lora_B",
                                                  "fc2.bias", "fc2.lora_A", "fc2.lora_B"]
    for name in grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(grad_x, ref_grad_x, rtol=1e-5, atol=1e-6)


def test_passes_override_and_report_before_off():
    config = LorsConfig(r=4)
    model = NaiveMLP()
    compiled, state = _compiled(model, config, passes=[], report_before=False)
    loss_and_grads(model, compiled, torch.randn(T, SIZES[0]))
    record = state.graphs[0]
    assert record.passes == [] and record.saved_before is None
    assert "sparse_lora_linear" not in record.forward.code
    # un-rewritten: the default partitioner keeps W' -- exactly what LoRS must avoid
    assert w_prime_sized(record.saved_after.details["rows"], SITE_SHAPES)


def test_inductor_fw_and_bw_compilers():
    config = LorsConfig(r=4, fw_compiler="inductor", bw_compiler="inductor")
    model = NaiveMLP()
    compiled, state = _compiled(model, config, report_before=False)
    x = torch.randn(T, SIZES[0])
    loss, grads, _ = loss_and_grads(model, compiled, x)  # inductor builds C++: ~40 s cold
    reference = NaiveMLP(use_op=True)
    ref_loss, ref_grads, _ = loss_and_grads(reference, reference, x)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], rtol=1e-4, atol=1e-5)
    record = state.graphs[0]
    assert record.forward.code.count("torch.ops.lors.sparse_lora_linear.default(") == 2
    assert not w_prime_sized(record.saved_after.details["rows"], SITE_SHAPES)
