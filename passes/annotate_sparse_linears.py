"""Annotate every linear call whose base weight is sparse with a :class:`SparseSite`.

Before (dynamo)::

    %linear = call_function[torch._C._nn.linear](x, W, bias)        # W: 50% zeros

After (same graph; one meta entry added)::

    %linear = call_function[torch._C._nn.linear](x, W, bias)
        meta["lors_site"] = SparseSite(fqn="lin", shape=(6, 8), sparsity=0.5,
                                       pattern="unstructured", rank=None)

Linear sites recognised:

- ``torch._C._nn.linear`` / ``F.linear`` / aten linear (``call_function``), and ``call_module`` of
  an ``nn.Linear`` (``symbolic_trace``'d graphs);
- GPT-2 ``Conv1D``: ``torch.addmm(bias, x.view(-1, d_in), W)`` with ``W`` stored d_in x d_out
  (the site's shape and N:M pattern are read in the (d_out, d_in) orientation);
- calls of ``torch.ops.lors.sparse_lora_linear[_keep]`` (rank from ``lora_A``);
- quantized bases (:mod:`lors_fx.quantized`): calls of ``torch.ops.lors.quant_lora_linear``, the
  naive quantized form ``linear(x, W + s*(B@A)*(W != 0), b)`` with ``W = lors.dequantize(packed,
  scales, bits)``, and a linear straight on ``lors.dequantize``. The site's sparsity and pattern
  are the codes' (``M = Q != 0``), with ``bits``, ``group_size`` and ``quant_aware`` (the
  adapter module's flag, else ``config.quant_aware``).

The base weight is the parameter feeding the linear directly, through ``.t()``/``transpose``/
``permute``, or through the masked-adapter subgraph ``W + s*(B@A)*M`` (and its delta form); a
masked adapter or a PEFT LoRA branch beside it gives the site's ``rank``.

Precondition: torch IR before ``aot_autograd``. The weight's real value must be known
(``ctx.extra["placeholder_params"]`` from the backend, or a ``get_attr``/``call_module`` target);
otherwise the linear is skipped (its sparsity cannot be measured).

Count: distinct sites (module FQNs) annotated, i.e. linears whose weight has sparsity
``>= config.min_sparsity`` (0.25 without a config). ``details["nodes"]`` counts annotated nodes
(a module called twice is one site, two nodes); ``details["sites"]`` lists the FQNs.
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from torch import fx

from lors_fx.passes._match import (NoMatch, is_linear_call, is_lors_op, is_op, linear_args,
                                   param_of, shape_of, site_for_weight, strip_transposes)
from lors_fx.passes._patterns import match_masked_adapter, match_peft_lora, strip_casts
from lors_fx.passes._quant_patterns import (dequantize_args, is_dequantize, is_quant_lors_op,
                                            match_quantized_adapter, quant_site_for)
from lors_fx.passes.manager import (SITE_META_KEY, PassContext, PassResult, SparseSite,
                                    register_pass)

__all__ = ["annotate_sparse_linears"]


def _base_weight(node: fx.Node, ctx: PassContext,
                 gm: fx.GraphModule) -> Optional[Tuple[Any, bool, Optional[int]]]:
    """``(base weight node or attribute name, stored transposed, rank)`` of a linear site."""
    if is_lors_op(node):
        shape_A = shape_of(node.args[2], ctx, gm)
        return node.args[1], False, (shape_A[0] if shape_A and len(shape_A) == 2 else None)
    if is_op(node, "addmm") and len(node.args) >= 3:  # Conv1D: addmm(bias, x2d, W[d_in, d_out])
        return node.args[2], True, None
    if not is_linear_call(node, gm):
        return None
    weight = linear_args(node, gm)[1]
    if isinstance(weight, str):  # call_module nn.Linear
        return weight, False, _peft_rank(node, ctx, gm)
    source, _ = strip_transposes(weight)
    if param_of(source, ctx, gm) is not None:
        return weight, False, _peft_rank(node, ctx, gm)
    try:
        match = match_masked_adapter(node, ctx, gm)
    except NoMatch:
        return None
    shape_A = shape_of(match.lora_A, ctx, gm)
    return match.base, False, (shape_A[0] if shape_A and len(shape_A) == 2 else None)


def _peft_rank(linear: fx.Node, ctx: PassContext, gm: fx.GraphModule) -> Optional[int]:
    """Rank of a PEFT LoRA branch added to this base linear, if there is one."""
    for user in linear.users:
        try:
            match = match_peft_lora(user, ctx, gm)
        except NoMatch:
            continue
        if match.base_linear is linear:
            shape_A = shape_of(linear_args(match.lora_A_linear, gm)[1], ctx, gm)
            return shape_A[0] if shape_A else None
    return None


def _quantized_site(node: fx.Node, ctx: PassContext, gm: fx.GraphModule) -> Optional[SparseSite]:
    """The site of a linear on a quantized base (the op, the naive form, or a linear on
    ``lors.dequantize``); None when ``node`` is none of these or its codes are unknown."""
    if is_quant_lors_op(node) and len(node.args) >= 9:
        shape_A = shape_of(node.args[3], ctx, gm)
        return quant_site_for(node.args[1], node.args[2], node.args[8], ctx, gm,
                              rank=shape_A[0] if shape_A and len(shape_A) == 2 else None)
    if not is_op(node, "linear"):
        return None
    source = strip_casts(linear_args(node, gm)[1])[0]
    try:
        if is_dequantize(source):
            return quant_site_for(*dequantize_args(source), ctx, gm)
        match = match_quantized_adapter(node, ctx, gm)
    except NoMatch:
        return None
    return quant_site_for(match.packed, match.scales, match.bits, ctx, gm, rank=match.rank(ctx, gm))


@register_pass("forward", order=10)
def annotate_sparse_linears(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Record a :class:`SparseSite` in ``node.meta["lors_site"]`` and ``ctx.sites[fqn]`` for every
    linear call on a sparse weight. The graph itself is not changed."""
    sites, nodes = [], 0
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method", "call_module"):
            continue
        site = _quantized_site(node, ctx, gm)
        if site is None:
            found = _base_weight(node, ctx, gm)
            if found is None:
                continue
            weight, transposed, rank = found
            site = site_for_weight(weight, transposed, ctx, gm, rank=rank)
            if site is None:
                continue
        node.meta[SITE_META_KEY] = site
        nodes += 1
        if site.fqn not in sites:
            sites.append(site.fqn)
    return PassResult("annotate_sparse_linears", len(sites),
                      details={"sites": sites, "nodes": nodes})
