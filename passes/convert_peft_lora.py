"""Opt-in: convert PEFT LoRA on a sparse base into the masked LoRS op.

PEFT's ``lora.Linear`` computes ``result = base_layer(x) + lora_B(lora_A(dropout(x))) * scaling``
(lora_A, lora_B: ``nn.Linear`` without bias; the dropout is ``nn.Identity`` when p = 0).

Before (dynamo, identity dropout)::

    %result   = call_function[torch._C._nn.linear](x, W, bias)
    %linear_1 = call_function[torch._C._nn.linear](x, A_w, None)
    %linear_2 = call_function[torch._C._nn.linear](%linear_1, B_w, None)
    %mul      = call_function[operator.mul](%linear_2, 2.0)
    %result_1 = call_function[operator.add](%result, %mul)

After::

    %result_1 = call_function[torch.ops.lors.sparse_lora_linear.default](
                    x, W, A_w, B_w, bias, 2.0, "lors", True, 67108864)

With a real dropout (``%dropout = dropout(x, 0.1, True, False)`` feeding ``%linear_1``) the base
linear stays and only the adapter branch is replaced (the two-product form)::

    %delta    = call_function[torch.ops.lors.sparse_lora_linear.default](
                    %dropout, W, A_w, B_w, None, 2.0, "lors", False, 67108864)
    %result_1 = call_function[operator.add](%result, %delta)

THIS CHANGES THE FORWARD: PEFT's dense update ``W + s*B@A`` becomes the masked
``W + s*(B@A)*M`` (``M = W != 0``), so the pruned zeros stay zero. On unless
``config.convert_peft is False`` (the default ``None`` means on, as for
:func:`lors_fx.optimize` on a PEFT model); every conversion is recorded in ``details`` and
``ctx.notes``.

Precondition: torch IR before ``aot_autograd``; the base weight's real value is known, it is
frozen, and at least ``config.min_sparsity`` sparse. The adapter branch's nodes (and, with
identity dropout, the base linear) have no other users. ``call_module`` linears of
``symbolic_trace`` are accepted too.

Count: PEFT LoRA branches converted (0, with a "disabled" detail, when ``convert_peft`` is
False).
"""
from __future__ import annotations

from torch import fx

from lors_fx.passes._match import (NoMatch, erase_if_unused, linear_args, requires_grad, shape_of,
                                   site_for_weight)
from lors_fx.passes._patterns import emit_lors_op, match_peft_lora, op_settings
from lors_fx.passes.manager import SITE_META_KEY, PassContext, PassResult, register_pass

__all__ = ["convert_peft_lora"]


@register_pass("forward", order=20,
               enabled=lambda config: getattr(config, "convert_peft", None) is not False)
def convert_peft_lora(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite PEFT LoRA sums on sparse bases into the LoRS op (only with ``convert_peft``).

    ``details``: ``converted`` (module FQNs), ``two_product`` (those kept as base + delta because
    of a real dropout), ``changes_forward`` (True when anything was converted), or ``disabled``.
    """
    if ctx.config is None or getattr(ctx.config, "convert_peft", None) is False:
        return PassResult("convert_peft_lora", 0,
                          details={"disabled": "config.convert_peft is False"})
    grad_mode = op_settings(ctx)[0]
    converted, two_product, gone = [], [], set()
    for add in list(gm.graph.nodes):
        if add in gone:
            continue
        try:
            match = match_peft_lora(add, ctx, gm)
        except NoMatch:
            continue
        include_base = match.adapter_input is match.x
        if include_base and len(match.base_linear.users) != 1:
            continue
        base_weight = linear_args(match.base_linear, gm)[1]
        if requires_grad(base_weight, ctx, gm):
            ctx.notes.append(f"convert_peft_lora: left {add.name} unchanged: the base weight "
                             "requires grad (the op trains only lora_A/lora_B)")
            continue
        shape_A = shape_of(linear_args(match.lora_A_linear, gm)[1], ctx, gm)
        site = site_for_weight(base_weight, False, ctx, gm, rank=shape_A[0])
        if site is None:
            continue
        replaced = match.add if include_base else match.lora_root
        _, weight, bias = linear_args(match.base_linear, gm, materialize=True)
        lora_A = linear_args(match.lora_A_linear, gm, materialize=True)[1]
        lora_B = linear_args(match.lora_B_linear, gm, materialize=True)[1]
        args = (match.adapter_input, weight, lora_A, lora_B, bias if include_base else None,
                match.scaling, include_base)
        result = emit_lors_op(gm, replaced, args, ctx)
        result.meta[SITE_META_KEY] = site
        erased = [replaced] + match.branch + ([match.base_linear] if include_base else [])
        gone.update(erase_if_unused(gm.graph, erased + [n for n in (weight, bias, lora_A, lora_B)
                                                        if isinstance(n, fx.Node)]))
        site.rewritten, site.grad_mode = True, grad_mode
        converted.append(site.fqn)
        if not include_base:
            two_product.append(site.fqn)
        ctx.notes.append(
            f"convert_peft_lora: {site.fqn}: PEFT LoRA converted to the masked LoRS op; this "
            f"CHANGES the forward from dense LoRA W + s*B@A to W + s*(B@A)*M (M = W != 0)")
    details = {"converted": converted, "two_product": two_product,
               "changes_forward": bool(converted)}
    return PassResult("convert_peft_lora", len(converted), details=details)
