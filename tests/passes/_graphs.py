"""Graph builders for the pass tests: tiny modules, a capturing dynamo backend, aot numerics.

``capture(model, *inputs)`` returns what the lors backend sees: dynamo's GraphModule, the real
example inputs, and a PassContext whose ``extra["placeholder_params"]`` maps placeholders to
``(fqn, tensor)`` by identity (parameters and buffers), as the backend builds it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F
from torch import fx, nn

from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.passes.manager import PassContext, run_passes


def prune_(weight: torch.Tensor, sparsity: float = 0.5, seed: int = 0) -> torch.Tensor:
    """Zero the smallest-magnitude ``sparsity`` fraction of ``weight`` in place (per tensor)."""
    with torch.no_grad():
        k = int(weight.numel() * sparsity)
        if k:
            threshold = weight.abs().flatten().kthvalue(k).values
            weight.masked_fill_(weight.abs() <= threshold, 0.0)
    return weight


def placeholder_params(gm: fx.GraphModule, example_inputs, model: nn.Module) -> Dict[str, tuple]:
    """``{placeholder name: (fqn, tensor)}`` by identity of example inputs and named tensors."""
    named = {id(t): (name, t) for name, t in list(model.named_parameters())
             + list(model.named_buffers())}
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    return {node.name: named[id(value)] for node, value in zip(placeholders, example_inputs)
            if id(value) in named}


@dataclass
class Captured:
    gm: fx.GraphModule
    example_inputs: list
    ctx: PassContext


def capture(model: nn.Module, *inputs, config=None) -> Captured:
    """Dynamo's first graph of ``model(*inputs)`` (fullgraph), with a ready PassContext."""
    torch._dynamo.reset()
    graphs: List[tuple] = []

    def backend(gm, example_inputs):
        graphs.append((gm, list(example_inputs)))
        return gm.forward

    torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    gm, example_inputs = graphs[0]
    ctx = PassContext(config=config, model=model,
                      extra={"placeholder_params": placeholder_params(gm, example_inputs, model)})
    return Captured(gm, example_inputs, ctx)


def aot_eager(gm: fx.GraphModule, example_inputs):
    """``gm`` through aot_autograd with eager (boxed) forward/backward compilers."""
    from functorch.compile import make_boxed_func
    from torch._functorch.aot_autograd import aot_module_simplified

    def compiler(graph, _inputs):
        return make_boxed_func(graph.forward)

    return aot_module_simplified(gm, example_inputs, fw_compiler=compiler, bw_compiler=compiler)


def passes_backend(passes, config, record: dict) -> Callable:
    """A dynamo backend: run ``passes`` (recorded in ``record``) then aot_autograd (eager)."""

    def backend(gm, example_inputs):
        model = record["model"]
        ctx = PassContext(config=config, model=model, extra={
            "placeholder_params": placeholder_params(gm, example_inputs, model)})
        record["results"] = run_passes(gm, passes, ctx)
        record["ctx"], record["gm"] = ctx, gm
        return aot_eager(gm, example_inputs)

    return backend


def compile_with(model: nn.Module, passes, config=None):
    """``(compiled model, record)``; record gets ``results``, ``ctx``, ``gm`` on the first call."""
    torch._dynamo.reset()
    record = {"model": model}
    return torch.compile(model, backend=passes_backend(passes, config, record),
                         fullgraph=True), record


def grads_of(model: nn.Module, fn, x: torch.Tensor, seed: int = 0):
    """``(output, {name: grad})`` of ``fn(x)`` against a fixed random cotangent."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    out = fn(x)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed),
                            dtype=out.dtype)
    (out * cotangent).sum().backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.grad is not None}
    grads["x"] = x.grad.clone()
    return out.detach(), grads, cotangent


# ----------------------------------------------------------------------------------------------
# Tiny modules
# ----------------------------------------------------------------------------------------------

#: The masked-adapter spellings the rewrite must accept: (W, A, B, M, s) -> W'.
FORMS: Dict[str, Callable] = {
    "s_left": lambda W, A, B, M, s: W + s * (B @ A) * M,
    "s_mid": lambda W, A, B, M, s: W + (B @ A) * s * M,
    "s_after_mask": lambda W, A, B, M, s: W + ((B @ A) * M) * s,
    "mm_product_then_scale": lambda W, A, B, M, s: W + (torch.mm(B, A) * M) * s,
    "torch_add_matmul": lambda W, A, B, M, s: torch.add(W, s * torch.matmul(B, A) * M),
    "delta_first": lambda W, A, B, M, s: s * (B @ A) * M + W,
    "mask_on_left": lambda W, A, B, M, s: W + M * (B @ A) * s,
    "div_by_constant": lambda W, A, B, M, s: W + (B @ A) * M * (2 * s) / 2,
    "add_alpha": lambda W, A, B, M, s: torch.add(W, (B @ A) * M, alpha=s),
}


class MaskedAdapterLinear(nn.Module):
    """A frozen sparse nn.Linear plus adapters; ``forward`` builds W' in the spelling ``form``."""

    def __init__(self, d_in=8, d_out=6, r=2, alpha=4.0, bias=True, form="reference",
                 sparsity=0.5, dtype=torch.float64, mask="ne", conv1d=False, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.base = nn.Linear(d_in, d_out, bias=bias, dtype=dtype)
        prune_(self.base.weight.data, sparsity)
        if conv1d:  # GPT-2 layout: stored (d_in, d_out)
            self.base.weight = nn.Parameter(self.base.weight.data.t().contiguous())
        self.base.weight.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in, dtype=dtype) / math.sqrt(d_in))
        self.lora_B = nn.Parameter(torch.randn(d_out, r, dtype=dtype))
        self.scaling, self.form, self.mask_kind, self.conv1d = alpha / r, form, mask, conv1d
        if mask == "buffer":
            self.register_buffer("mask", self.weight() != 0)
        elif mask == "wrong_buffer":
            wrong = self.weight() != 0
            wrong[0, :] = True
            self.register_buffer("mask", wrong)

    def weight(self):
        return self.base.weight.t() if self.conv1d else self.base.weight

    def forward(self, x):
        W = self.weight()
        if self.form == "reference":
            return reference_sparse_lora_linear(x, W, self.lora_A, self.lora_B, self.base.bias,
                                                self.scaling)
        M = self.mask if self.mask_kind in ("buffer", "wrong_buffer") else (W != 0)
        if self.mask_kind == "float":
            M = M.to(W.dtype)
        w_eff = FORMS[self.form](W, self.lora_A, self.lora_B, M, self.scaling)
        return F.linear(x, w_eff, self.base.bias)


class TwoProductLinear(MaskedAdapterLinear):
    """``linear(x, W, b) + linear(dropout(x), s*(B@A)*M)`` (lora_dropout > 0)."""

    def __init__(self, p=0.25, **kwargs):
        super().__init__(**kwargs)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        W = self.weight()
        delta = self.scaling * (self.lora_B @ self.lora_A) * (W != 0)
        return F.linear(x, W, self.base.bias) + F.linear(self.drop(x), delta)


class SharedWeffLinear(MaskedAdapterLinear):
    """W' used twice (returned too): the rewrite must leave it alone."""

    def forward(self, x):
        W = self.weight()
        w_eff = W + self.scaling * (self.lora_B @ self.lora_A) * (W != 0)
        return F.linear(x, w_eff, self.base.bias), w_eff


def lors_closed_form(x, g, A, B, s):
    """The ``"lors"`` gradients: dB = s*g^T(x A^T), dA = s*(g B)^T x (2-D x, g)."""
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return s * (g2 @ B).t() @ x2, s * g2.t() @ (x2 @ A.t())
