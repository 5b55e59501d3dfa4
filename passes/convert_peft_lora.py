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
``W + s*(B@A)*M`` (``M = W != 0``), so the pruned zeros stay zero. Hence opt-in
(``config.convert_peft``); every conversion is recorded in ``details`` and ``ctx.notes``.

Precondition: torch IR before ``aot_autograd``; the base weight's real value is known, it is
frozen, and at least ``config.min_sparsity`` sparse. The adapter branch's nodes (and, with
identity dropout, the base linear) have no other users. ``call_module`` linears of
``symbolic_trace`` are accepted too.

Count: PEFT LoRA branches converted (0, with a "disabled" detail, unless ``convert_peft``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional

from torch import fx, nn

from ._match import (NoMatch, erase_if_unused, is_linear_call, is_op, linear_args, mul_factors,
                     require_single_user, requires_grad, scalar_of, shape_of, site_for_weight)
from .manager import SITE_META_KEY, PassContext, PassResult
from .rewrite_masked_adapters import emit_lors_op, op_settings

__all__ = ["convert_peft_lora", "PeftLora", "match_peft_lora"]


@dataclass
class PeftLora:
    """A matched ``base(x) + lora_B(lora_A(dropout(x))) * s`` ending at the ``add`` node."""

    add: fx.Node
    base_linear: fx.Node
    lora_root: fx.Node            # the branch's last node (the mul by s, or lora_B's linear)
    lora_A_linear: fx.Node
    lora_B_linear: fx.Node
    x: Any
    adapter_input: Any            # x, or the dropout node
    dropout: Optional[fx.Node]    # a dropout node that is the identity (erased with the match)
    scaling: float
    branch: List[fx.Node]


def _dropout_input(node: Any, gm: fx.GraphModule):
    """``(input, is identity)`` when ``node`` is a dropout / nn.Identity call, else None."""
    if not isinstance(node, fx.Node):
        return None
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        if isinstance(module, nn.Identity):
            return node.args[0], True
        if isinstance(module, nn.Dropout):
            return node.args[0], module.p == 0 or not module.training
        return None
    if is_op(node, "dropout"):
        args = list(node.args) + [None] * (4 - len(node.args))
        p = node.kwargs.get("p", 0.5 if args[1] is None else args[1])
        training = node.kwargs.get("training", True if args[2] is None else args[2])
        return node.args[0], scalar_of(p) == 0.0 or training is False
    return None


def _bias_free_linear(node: Any, gm: fx.GraphModule):
    if not is_linear_call(node, gm):
        raise NoMatch(f"{getattr(node, 'name', node)} is not a linear")
    x, weight, bias = linear_args(node, gm)
    if bias is not None:
        raise NoMatch(f"{node.name} has a bias (PEFT's lora_A/lora_B have none)")
    return x, weight


def match_peft_lora(add: fx.Node, ctx: PassContext, gm: fx.GraphModule) -> PeftLora:
    """Match PEFT's LoRA sum ending at ``add``; raises :class:`NoMatch` with the reason."""
    if not is_op(add, "add") or len(add.args) != 2 or add.kwargs:
        raise NoMatch(f"{add.name} is not a plain add")
    for base_linear, root in (add.args, add.args[::-1]):
        if not is_linear_call(base_linear, gm) or not isinstance(root, fx.Node):
            continue
        try:
            branch: List[fx.Node] = []
            leaves, scaling = mul_factors(root, branch)
            if len(leaves) != 1:
                raise NoMatch(f"{root.name} is not lora_B(...) * s")
            lora_B_linear = leaves[0]
            hidden, _ = _bias_free_linear(lora_B_linear, gm)
            lora_A_linear = hidden
            adapter_input, _ = _bias_free_linear(lora_A_linear, gm)
            for node in branch + [lora_B_linear, lora_A_linear]:
                require_single_user(node, "adapter node")
            x = linear_args(base_linear, gm)[0]
            dropout = None
            if adapter_input is not x:
                unwrapped = _dropout_input(adapter_input, gm)
                if unwrapped is None or unwrapped[0] is not x:
                    raise NoMatch(f"{lora_A_linear.name}'s input is not (dropout of) x")
                if unwrapped[1]:
                    dropout, adapter_input = adapter_input, x
            _check_shapes(base_linear, lora_A_linear, lora_B_linear, ctx, gm)
        except NoMatch:
            continue
        branch_nodes = branch + [lora_B_linear, lora_A_linear] + ([dropout] if dropout else [])
        return PeftLora(add, base_linear, root, lora_A_linear, lora_B_linear, x, adapter_input,
                        dropout, scaling, branch_nodes)
    raise NoMatch(f"{add.name} is not base(x) + lora_B(lora_A(dropout(x))) * s")


def _check_shapes(base_linear, lora_A_linear, lora_B_linear, ctx, gm) -> None:
    shape_W = shape_of(linear_args(base_linear, gm)[1], ctx, gm)
    shape_A = shape_of(linear_args(lora_A_linear, gm)[1], ctx, gm)
    shape_B = shape_of(linear_args(lora_B_linear, gm)[1], ctx, gm)
    if None in (shape_W, shape_A, shape_B):
        raise NoMatch("unknown adapter shapes")
    if len(shape_W) != 2 or shape_A != (shape_A[0], shape_W[1]) or shape_B != (shape_W[0],
                                                                                shape_A[0]):
        raise NoMatch(f"shapes W{shape_W}, A{shape_A}, B{shape_B} are not a LoRA pair")


def convert_peft_lora(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Rewrite PEFT LoRA sums on sparse bases into the LoRS op (only with ``convert_peft``).

    ``details``: ``converted`` (module FQNs), ``two_product`` (those kept as base + delta because
    of a real dropout), ``changes_forward`` (True when anything was converted), or ``disabled``.
    """
    if ctx.config is None or not getattr(ctx.config, "convert_peft", False):
        return PassResult("convert_peft_lora", 0,
                          details={"disabled": "config.convert_peft is False (opt-in)"})
    grad_mode = op_settings(ctx)[0]
    converted, two_product = [], []
    for add in list(gm.graph.nodes):
        if getattr(add, "_erased", False):
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
        erase_if_unused(gm.graph, erased + [n for n in (weight, bias, lora_A, lora_B)
                                            if isinstance(n, fx.Node)])
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
