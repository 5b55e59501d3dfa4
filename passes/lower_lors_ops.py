"""Lower the LoRS ops of a partitioned graph into aten ops that inductor fuses.

Runs on the forward and the backward graph *after* the partitioner (what is saved for backward is
decided: ``x`` only, the op is opaque there) and only when that graph goes to inductor.

Before (forward graph)::

    %y = call_function[lors.sparse_lora_linear.default](x, W, A, B, bias, 2.0, "lors", True, n)

After::

    %p     = call_function[aten.mm](B, A)              # rank-r product, d_out x d_in
    %t     = call_function[aten.mul.Tensor](%p, 2.0)
    %t_1   = call_function[aten.add.Tensor](W, %t)
    %pr    = call_function[aten.eq.Scalar](W, 0)
    %w_eff = call_function[aten.where.self](%pr, 0.0, %t_1)  # one fused kernel with %t, %t_1
    %x2d   = call_function[aten.reshape](x, [-1, d_in])  # a copy only if x is not viewable
    %y2d   = call_function[aten.mm](%x2d, aten.permute(%w_eff, [1, 0]))   # aten.addmm with a bias
    %y     = call_function[aten.view](%y2d, [..., d_out])

and in the backward graph each ``lors.masked_weight.default(W, A, B, s, include_base)`` (the
rebuild of ``W'`` for ``grad_x``) becomes the same ``%p .. %w_eff`` chain. Inductor fuses the
scale, the add and the mask into one pass over the weight (the op's eager build makes three: a
sign, an abs and an addcmul per row chunk) and drops the op's Python dispatch. ``W'`` is still
built twice and never saved: the graphs are already partitioned.

Semantics are the op's: kept entries ``W + s*(B@A)`` (NaN and inf stay visible), pruned entries
exactly 0 whatever the adapters hold (a ``where``, never a multiplication by the mask). The
adapters are cast to ``W``'s dtype first, as the op does.

The tokens (leading dims of ``x``) may be symbolic (a recompile with dynamic shapes): the output
view reads them with ``aten.sym_size``. Skipped (the op stays, a note says why): a weight or
adapter whose shape is not static, a 1-D ``x``; never touched: the ``recompute=False`` op
(``sparse_lora_linear_keep``, which returns ``W'``) and the quantized ops: traced into one fused
kernel, their build (int4 unpacking, group scales, the QA rounding) ran slower under inductor's
CPU code (not vectorized: the byte and group indices are not affine) than the op's chunked eager
build, 3.4 vs 2.8 ms for a 1536x576 int4 g64 weight, 5.6 vs 4.3 ms quantization-aware
(docs/benchmarks.md).

Count: op calls lowered.
"""
from __future__ import annotations

from typing import Any, List, Optional

import torch
from torch import fx

from lors_fx.compiler._torch_private import fake_mode_of
from lors_fx.passes.manager import PassContext, PassResult, register_pass

__all__ = ["lower_lors_ops"]

aten = torch.ops.aten


@register_pass("lower", order=10, enabled=lambda config: getattr(config, "fuse_build", True))
def lower_lors_ops(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace ``lors.sparse_lora_linear`` and ``lors.masked_weight`` calls by aten ops."""
    graph = gm.graph
    lowered, skipped = 0, []
    for node in list(graph.nodes):
        if node.op != "call_function":
            continue
        if node.target is torch.ops.lors.sparse_lora_linear.default:
            result = _lower_linear(graph, node)
        elif node.target is torch.ops.lors.masked_weight.default:
            result = _lower_masked_weight(graph, node)
        else:
            continue
        if result is None:
            skipped.append(node.name)
            continue
        node.replace_all_uses_with(result)
        graph.erase_node(node)
        lowered += 1
    if skipped:
        ctx.notes.append(f"lower_lors_ops: kept {len(skipped)} op call(s) opaque (weight "
                         f"shapes not static, or a 1-D input): {skipped[:4]}")
    graph.eliminate_dead_code()
    return PassResult("lower_lors_ops", count=lowered, details={"kept_opaque": skipped})


def _val(node: Any) -> Optional[torch.Tensor]:
    return node.meta.get("val") if isinstance(node, fx.Node) else None


def _static(*values) -> bool:
    return all(v is not None and all(isinstance(d, int) for d in v.shape) for v in values)


def _call(graph: fx.Graph, target, args, fake_mode, like: fx.Node, **kwargs) -> fx.Node:
    """A call node with ``meta['val']`` computed on the fake values of its arguments."""
    node = graph.call_function(target, args, kwargs)
    for key in ("stack_trace", "nn_module_stack", "source_fn_stack", "seq_nr"):
        if key in like.meta:
            node.meta[key] = like.meta[key]
    fake_args = fx.node.map_arg(args, _val)
    with fake_mode:
        node.meta["val"] = target(*fake_args, **kwargs)
    return node


def _build(graph, weight, lora_A, lora_B, scaling, include_base, fake_mode, like) -> fx.Node:
    """``W' = where(W == 0, 0, W + s*(B@A))`` (without ``W``: ``s*(B@A)``) as aten calls."""
    dtype = _val(weight).dtype
    factors: List[fx.Node] = []
    for adapter in (lora_B, lora_A):
        if _val(adapter).dtype != dtype:
            adapter = _call(graph, aten._to_copy.default, (adapter,), fake_mode, like,
                            dtype=dtype)
        factors.append(adapter)
    product = _call(graph, aten.mm.default, tuple(factors), fake_mode, like)
    update = _call(graph, aten.mul.Tensor, (product, float(scaling)), fake_mode, like)
    if include_base:
        update = _call(graph, aten.add.Tensor, (weight, update), fake_mode, like)
    pruned = _call(graph, aten.eq.Scalar, (weight, 0), fake_mode, like)
    zero = _call(graph, aten.scalar_tensor.default, (0.0,), fake_mode, like, dtype=dtype,
                 device=_val(weight).device)
    return _call(graph, aten.where.self, (pruned, zero, update), fake_mode, like)


def _fake_mode(*nodes):
    """The fake mode the graph's ``meta["val"]`` live in (None for a graph without them)."""
    return fake_mode_of([_val(node) for node in nodes])


def _lower_masked_weight(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    weight, lora_A, lora_B, scaling, include_base = node.args
    fake_mode = _fake_mode(weight, lora_A, lora_B)
    if fake_mode is None or not _static(_val(weight), _val(lora_A), _val(lora_B)):
        return None
    with graph.inserting_before(node):
        return _build(graph, weight, lora_A, lora_B, scaling, include_base, fake_mode, node)


def _lower_linear(graph: fx.Graph, node: fx.Node) -> Optional[fx.Node]:
    x, weight, lora_A, lora_B, bias, scaling, _mode, include_base, _chunk = node.args
    fake_mode = _fake_mode(x, weight, lora_A, lora_B)
    x_val, w_val = _val(x), _val(weight)
    if fake_mode is None or x_val is None or not _static(w_val, _val(lora_A), _val(lora_B)) \
            or x_val.dim() < 2 or (bias is not None and not include_base):
        return None
    d_out, d_in = w_val.shape
    with graph.inserting_before(node):
        w_eff = _build(graph, weight, lora_A, lora_B, scaling, include_base, fake_mode, node)
        x2d = _call(graph, aten.reshape.default, (x, [-1, d_in]), fake_mode, node)
        w_t = _call(graph, aten.permute.default, (w_eff, [1, 0]), fake_mode, node)
        if bias is not None and include_base:
            y2d = _call(graph, aten.addmm.default, (bias, x2d, w_t), fake_mode, node)
        else:
            y2d = _call(graph, aten.mm.default, (x2d, w_t), fake_mode, node)
        if x_val.dim() == 2:
            return y2d
        # leading dims of x (the tokens) may be symbolic after a recompile: read them from x
        lead = [d if isinstance(d, int) else _call(graph, aten.sym_size.int, (x, i), fake_mode,
                                                   node)
                for i, d in enumerate(x_val.shape[:-1])]
        return _call(graph, aten.view.default, (y2d, [*lead, d_out]), fake_mode, node)
