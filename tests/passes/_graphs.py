"""Graph builders for the pass tests: tiny modules, a capturing dynamo backend, aot numerics, and
the structural comparison of a pass's output with a hand-built Expected graph.

``capture(model, *inputs)`` returns what the lors backend sees: dynamo's GraphModule, the real
example inputs, and a PassContext whose ``extra["placeholder_params"]`` maps placeholders to
``(fqn, tensor)`` by identity (parameters and buffers), as the backend builds it.

``assert_graphs_equal(actual, expected)`` is the TVM-style check: both graphs are reduced to
their node sequences (op, target, arguments, with node arguments replaced by positions) and must
be equal; placeholders compare by position and ``get_attr`` nodes by target, so an Expected graph
built by hand on the same root module matches whatever order the pass left its leaves in.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn
from torch.fx.node import map_arg

from lors_fx.compiler._torch_private import aot_backend, boxed
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.passes.manager import PassContext, run_passes
from lors_fx.workflows.prune import magnitude_prune_


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
    """Dynamo's first graph of ``model(*inputs)`` (fullgraph), with a ready PassContext.

    Dynamo is reset first: a test may capture several instances of one module class, and each
    must give a first graph of its own (not a recompile, nor the recompile limit's fallback)."""
    torch.compiler.reset()
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
    return aot_backend(eager_compiler)(gm, example_inputs)


def eager_compiler(graph: fx.GraphModule, _example_inputs):
    """An aot_autograd fw/bw compiler that runs the partitioned graph as it is."""
    return boxed(graph.forward)


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
    torch.compiler.reset()
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
        magnitude_prune_(self.base.weight, sparsity)
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


# ----------------------------------------------------------------------------------------------
# Before/Expected: hand-built graphs and their structural comparison
# ----------------------------------------------------------------------------------------------


def module_with(tensors: Mapping[str, torch.Tensor]) -> nn.Module:
    """A root module holding ``tensors`` under dotted names (``"proj.weight"``), as parameters
    (``nn.Parameter`` values, their ``requires_grad`` kept) or buffers: what ``get_attr`` nodes of
    hand-built graphs read, and what the passes measure sparsity and shapes on."""
    root = nn.Module()
    for name, value in tensors.items():
        owner = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(owner, part):
                owner.add_module(part, nn.Module())
            owner = getattr(owner, part)
        if isinstance(value, nn.Parameter):
            owner.register_parameter(leaf, value)
        else:
            owner.register_buffer(leaf, value)
    return root


def graph_signature(gm: fx.GraphModule, meta_keys: Sequence[str] = ()) -> Dict[str, Any]:
    """The graph as plain data: how many placeholders, the targets of its ``get_attr`` nodes
    (sorted, one entry per node), and every other node in order as
    ``(op, target, args, kwargs[, {meta key: value}])``, node arguments replaced by
    ``("input", i)``, ``("attr", target)`` or ``("node", position)``."""
    refs: Dict[fx.Node, tuple] = {}
    inputs, attrs, nodes = 0, [], []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            refs[node], inputs = ("input", inputs), inputs + 1
        elif node.op == "get_attr":
            refs[node] = ("attr", node.target)
            attrs.append(node.target)
        else:
            refs[node] = ("node", len(nodes))
            entry = (node.op, node.target, map_arg(node.args, refs.__getitem__),
                     map_arg(node.kwargs, refs.__getitem__))
            if meta_keys:
                entry += ({key: node.meta.get(key) for key in meta_keys},)
            nodes.append(entry)
    return {"inputs": inputs, "attrs": sorted(attrs), "nodes": nodes}


def _format_entry(index: int, entry: tuple) -> str:
    op, target, args, kwargs = entry[:4]
    name = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    meta = f"  meta={entry[4]}" if len(entry) > 4 else ""
    return f"  %{index} = {op}[{name}]{tuple(args)} {dict(kwargs) or ''}{meta}"


def assert_graphs_equal(actual: fx.GraphModule, expected: fx.GraphModule,
                        meta_keys: Sequence[str] = ()) -> None:
    """Assert that ``actual`` (a pass's output) has the node sequence of the hand-built
    ``expected``: same ops, targets and arguments in the same order, placeholders by position,
    ``get_attr`` by target, and equal ``node.meta[key]`` for each of ``meta_keys``."""
    actual.graph.lint()
    got, want = graph_signature(actual, meta_keys), graph_signature(expected, meta_keys)
    if got == want:
        return
    lines = []
    for label, signature in (("actual", got), ("expected", want)):
        lines.append(f"{label}: {signature['inputs']} inputs, attrs {signature['attrs']}")
        lines += [_format_entry(i, entry) for i, entry in enumerate(signature["nodes"])]
    first = next((i for i, (a, b) in enumerate(zip(got["nodes"], want["nodes"])) if a != b),
                 min(len(got["nodes"]), len(want["nodes"])))
    raise AssertionError(f"graphs differ (first at node %{first}):\n" + "\n".join(lines))
