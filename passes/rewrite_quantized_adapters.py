"""Rewrite the naive masked adapter on a quantized base into one call of the quantized LoRS op.

Before (what dynamo captures from :func:`lors_fx.quant_ops.reference_quantized_lora_linear`)::

    %weight = call_function[torch.ops.lors.dequantize](packed, scales, 4)
    %to     = call_method[to](B, torch.float32)
    %to_1   = call_method[to](A, torch.float32)
    %matmul = call_function[operator.matmul](%to, %to_1)
    %mul    = call_function[operator.mul](2.0, %matmul)
    %ne     = call_function[operator.ne](%weight, 0)
    %mul_1  = call_function[operator.mul](%mul, %ne)
    %w_eff  = call_function[operator.add](%weight, %mul_1)
    %linear = call_function[torch._C._nn.linear](x, %w_eff, bias)

After::

    %linear = call_function[torch.ops.lors.quant_lora_linear.default](
                  x, packed, scales, A, B, bias, 2.0, "lors", 4, False, 67108864)

The whole dequantized weight and ``W'`` are gone from the graph: the op builds ``W'`` in row
chunks from the codes and saves only ``x`` for backward (the naive form saves ``W'`` and the
mask, dense ``d_out x d_in`` tensors).

Accepted variants: every spelling of ``W + s*(B@A)*M`` the float rewrite accepts
(:func:`lors_fx.passes._patterns.match_masked_adapter`), with ``W`` a ``lors::dequantize`` call
(packet or ``.default``), optionally cast to x's dtype, and ``A``/``B`` optionally cast (the op
casts them itself). Arguments: ``grad_mode`` and ``chunk_bytes`` from ``ctx.config`` (the op's
defaults without one), ``quant_aware`` from the site (the adapter module's ``quant_aware``, else
``config.quant_aware``, else False).

Precondition: torch IR before ``aot_autograd``; the codes are a known buffer (``ctx.extra[
"placeholder_params"]`` or a ``get_attr``), so the site's sparsity can be read from them, and it
is at least ``config.min_sparsity`` (0.25 without a config). Runs before
``rewrite_masked_adapters``, which would otherwise note these linears as skipped.

Count: matched subgraphs rewritten.
"""
from __future__ import annotations

from torch import fx

from lors_fx.passes._match import NoMatch, is_op, linear_args, replace_site
from lors_fx.passes._patterns import op_settings, strip_casts
from lors_fx.passes._quant_patterns import (emit_quant_op, is_dequantize, match_quantized_adapter,
                                            quant_site_for)
from lors_fx.passes.manager import SITE_META_KEY, PassContext, PassResult, register_pass

__all__ = ["rewrite_quantized_adapters"]


@register_pass("forward", order=25)
def rewrite_quantized_adapters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace each naive quantized masked-adapter linear by ``torch.ops.lors.quant_lora_linear``.

    Marks ``ctx.sites[fqn]`` (created when annotate_sparse_linears did not run) as rewritten with
    its grad_mode and rank. ``details``: ``rewritten`` (module FQNs), ``skipped`` (``{node:
    reason}`` for linears on a dequantized base that did not qualify).
    """
    grad_mode, _, chunk_bytes = op_settings(ctx)
    rewritten, skipped, erased = [], {}, set()
    for linear in list(gm.graph.nodes):
        if linear in erased or not is_op(linear, "linear"):
            continue
        try:
            match = match_quantized_adapter(linear, ctx, gm)
        except NoMatch as reason:
            if _reads_dequantize(linear, gm):
                skipped[linear.name] = str(reason)
            continue
        site = quant_site_for(match.packed, match.scales, match.bits, ctx, gm,
                              rank=match.rank(ctx, gm))
        if site is None:
            skipped[linear.name] = "codes unknown (not a model buffer) or not sparse enough"
            continue
        result = emit_quant_op(gm, match, (grad_mode, chunk_bytes), bool(site.quant_aware))
        replace_site(gm, linear, result, site, match.intermediates, grad_mode, erased,
                     SITE_META_KEY)
        rewritten.append(site.fqn)
    for name, reason in skipped.items():
        ctx.notes.append(f"rewrite_quantized_adapters: left {name} unchanged: {reason}")
    return PassResult("rewrite_quantized_adapters", len(rewritten),
                      details={"rewritten": rewritten, "skipped": skipped})


def _reads_dequantize(linear: fx.Node, gm: fx.GraphModule) -> bool:
    """A linear whose weight is computed from a dequantized base (not the base itself: a plain
    quantized linear without an adapter is no candidate): worth a note if skipped."""
    weight = linear_args(linear, gm)[1]
    if not isinstance(weight, fx.Node) or is_dequantize(strip_casts(weight)[0]):
        return False
    return any(is_dequantize(strip_casts(arg)[0]) for arg in weight.all_input_nodes)
