"""Rewrite the naive masked-adapter subgraph into one call of the LoRS custom op.

Before (what dynamo captures from :func:`lors_fx.ops.reference_sparse_lora_linear`)::

    %mask   = call_function[operator.ne](W, 0)
    %matmul = call_function[operator.matmul](B, A)
    %mul    = call_function[operator.mul](2.0, %matmul)
    %mul_1  = call_function[operator.mul](%mul, %mask)
    %w_eff  = call_function[operator.add](W, %mul_1)
    %linear = call_function[torch._C._nn.linear](x, %w_eff, bias)

After::

    %linear = call_function[torch.ops.lors.sparse_lora_linear.default](
                  x, W, A, B, bias, 2.0, "lors", True, 67108864)

(with ``config.recompute=False``: ``sparse_lora_linear_keep.default`` and ``getitem[0]``.)

Also the dropout two-product form ``linear(x, W, b) + linear(drop(x), s*(B@A)*M)``: the first
linear stays, the second becomes the op with ``include_base=False`` (what
:func:`lors_fx.ops.sparse_lora_delta` calls).

Accepted variants: bias or not; the mask as ``W != 0`` (``operator.ne``/``torch.ne``/method/aten,
optionally cast to a dtype) or a tensor input that equals ``W != 0`` in value (checked on the real
tensors; otherwise skipped with a note); the scale on either side of the product, before or after
the mask, or as a division by a constant (several constants multiply);
``torch.mm``/``matmul``/``@``; ``W + ...``, ``... + W`` or ``torch.add``;
``F.linear``/``torch._C._nn.linear``/aten linear; the base weight through ``.t()`` (the GPT-2
Conv1D adapter calls the reference on ``weight.t()``).

Precondition: torch IR (dynamo's graph, or ``symbolic_trace``) before ``aot_autograd``; the base
weight's real value is known (``ctx.extra["placeholder_params"]`` or a ``get_attr``), it is frozen
(the op gives W no gradient) and its sparsity is at least ``config.min_sparsity`` (0.25 without
a config). A match is rewritten only when every intermediate (``w_eff``, the mask, the products)
has no other user.

Count: matched subgraphs rewritten.

Why a hand-written matcher rather than ``subgraph_rewriter.replace_pattern_with_filters``: the
pattern comes in a few dozen spellings (operand order of commutative ops, scale position, casts,
transposes, alpha), each of which would be one pattern, and the mask-as-tensor check and the
single-user condition need the real values and the whole graph anyway. Walking back from each
linear keeps the node's identity, so its ``meta`` (stack_trace, nn_module_stack, val, the site
annotation) is copied directly.
"""
from __future__ import annotations

from torch import fx

from lors_fx.passes._match import (NoMatch, is_op, linear_args, replace_site, requires_grad,
                                   shape_of, site_for_weight, strip_transposes)
from lors_fx.passes._patterns import emit_lors_op, match_masked_adapter, op_settings
from lors_fx.passes.manager import SITE_META_KEY, PassContext, PassResult, register_pass

__all__ = ["rewrite_masked_adapters"]


@register_pass("forward", order=30)
def rewrite_masked_adapters(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Replace each naive masked-adapter linear by ``torch.ops.lors.sparse_lora_linear``.

    Marks ``ctx.sites[fqn]`` (created when annotate_sparse_linears did not run) as rewritten with
    its grad_mode and rank. ``details``: ``rewritten`` (module FQNs), ``skipped``
    (``{node: reason}`` for linears whose weight looked like an adapter but did not qualify).
    """
    grad_mode = op_settings(ctx)[0]
    rewritten, skipped, erased = [], {}, set()
    for linear in list(gm.graph.nodes):
        if linear in erased or linear.op != "call_function":
            continue
        try:
            match = match_masked_adapter(linear, ctx, gm)
        except NoMatch as reason:
            if _looks_adapted(linear):
                skipped[linear.name] = str(reason)
            continue
        if requires_grad(match.base, ctx, gm):
            skipped[linear.name] = "base weight requires grad (the op trains only lora_A/lora_B)"
            continue
        shape_A = shape_of(match.lora_A, ctx, gm)
        rank = shape_A[0] if shape_A is not None and len(shape_A) == 2 else None
        site = site_for_weight(match.base, False, ctx, gm, rank=rank)
        if site is None:
            skipped[linear.name] = "base weight unknown or not sparse enough"
            continue
        args = (match.x, match.base, match.lora_A, match.lora_B, match.bias, match.scaling,
                match.include_base)
        result = emit_lors_op(gm, linear, args, ctx, match.w_eff.meta)
        replace_site(gm, linear, result, site, match.intermediates, grad_mode, erased,
                     SITE_META_KEY)
        rewritten.append(site.fqn)
    for name, reason in skipped.items():
        ctx.notes.append(f"rewrite_masked_adapters: left {name} unchanged: {reason}")
    return PassResult("rewrite_masked_adapters", len(rewritten),
                      details={"rewritten": rewritten, "skipped": skipped})


def _looks_adapted(linear: fx.Node) -> bool:
    """A functional linear whose weight is computed (not a plain input): worth a note if skipped."""
    if not is_op(linear, "linear"):
        return False
    source, _ = strip_transposes(linear_args(linear, None)[1])
    return isinstance(source, fx.Node) and source.op not in ("placeholder", "get_attr")
