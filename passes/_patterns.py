"""The two adapter patterns the forward passes match, and the emitter of the LoRS op.

- :func:`match_masked_adapter`: ``linear(x, [W +] s*(B@A)*M, bias)``, the naive masked form
  (walked back from the linear; used by ``rewrite_masked_adapters`` and ``annotate_sparse_linears``).
- :func:`match_peft_lora`: PEFT's ``base(x) + lora_B(lora_A(dropout(x))) * s`` (walked back from the
  ``add``; used by ``convert_peft_lora`` and ``annotate_sparse_linears``).
- :func:`emit_lors_op`: the ``torch.ops.lors.sparse_lora_linear[_keep]`` call that replaces either.

Passes import this module and :mod:`._match` (the primitives), never each other.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple

import torch
from torch import fx, nn

from lors_fx.ops import DEFAULT_CHUNK_BYTES
from lors_fx.passes._match import (NoMatch, copy_meta, is_linear_call, is_op, linear_args,
                                   mul_factors, param_of, real_value, require_single_user,
                                   scalar_of, shape_of, strip_transposes)
from lors_fx.passes.manager import PassContext

__all__ = ["MaskedAdapter", "match_masked_adapter", "PeftLora", "match_peft_lora", "op_settings",
           "emit_lors_op", "strip_casts", "dtype_of", "cast_to"]


# ----------------------------------------------------------------------------------------------
# The matcher: walk back from a linear
# ----------------------------------------------------------------------------------------------


@dataclass
class MaskedAdapter:
    """A matched ``linear(x, [W +] s*(B@A)*M, bias)``; ``base`` is the weight node given to the op
    (the parameter, or its ``.t()`` for Conv1D), ``intermediates`` the nodes the rewrite frees."""

    linear: fx.Node
    x: Any
    base: Any
    lora_A: fx.Node
    lora_B: fx.Node
    bias: Any
    scaling: float
    include_base: bool
    w_eff: fx.Node
    intermediates: List[fx.Node] = field(default_factory=list)


def _same_weight(a: Any, b: Any, ctx: PassContext, gm) -> bool:
    if a is b:
        return True
    (src_a, flip_a), (src_b, flip_b) = strip_transposes(a), strip_transposes(b)
    if flip_a != flip_b:
        return False
    if src_a is src_b:
        return True
    hit_a, hit_b = param_of(src_a, ctx, gm), param_of(src_b, ctx, gm)
    return hit_a is not None and hit_b is not None and hit_a[1] is hit_b[1]


def strip_casts(node: Any) -> Tuple[Any, List[fx.Node]]:
    """Unwrap dtype casts around a node (a mask, a weight, an adapter): ``(inner node, cast
    nodes)``, outermost cast first."""
    casts = []
    while isinstance(node, fx.Node) and is_op(node, "cast"):
        casts.append(node)
        node = node.args[0]
    return node, casts


def _ne_zero_operand(node: Any) -> Optional[Any]:
    """``W`` when ``node`` is ``W != 0`` (either order), else None."""
    if not is_op(node, "ne") or len(node.args) != 2 or node.kwargs:
        return None
    left, right = node.args
    if scalar_of(right) == 0.0 and isinstance(left, fx.Node):
        return left
    if scalar_of(left) == 0.0 and isinstance(right, fx.Node):
        return right
    return None


def _split_delta(delta: fx.Node, ctx: PassContext, gm):
    """Parse ``s*(B@A)*M`` into ``(B@A node, A, B, s, mask leaf, mask operand, interior)``."""
    interior: List[fx.Node] = []
    leaves, scale = mul_factors(delta, interior)
    products = [leaf for leaf in leaves if is_op(leaf, "matmul")]
    others = [leaf for leaf in leaves if leaf not in products]
    if len(products) != 1 or len(others) != 1 or not interior:
        raise NoMatch(f"{delta.name} is not s*(B@A)*M")
    product, mask = products[0], others[0]
    require_single_user(product, "product")
    lora_B, lora_A = product.args[:2]
    shape_A, shape_B = shape_of(lora_A, ctx, gm), shape_of(lora_B, ctx, gm)
    if shape_A is not None and shape_B is not None and (len(shape_A) != 2 or len(shape_B) != 2):
        raise NoMatch(f"{product.name} is not a 2-D product")
    return product, lora_A, lora_B, scale, mask, interior + [product]


def _check_mask(mask: Any, base: Any, ctx: PassContext, gm, nodes: List[fx.Node]) -> Any:
    """Accept ``mask`` when it is ``base != 0`` in the graph or, for a tensor input, in value.
    Returns the base weight the mask was read from (None when the mask does not say)."""
    inner, casts = strip_casts(mask)
    operand = _ne_zero_operand(inner)
    if operand is not None:
        for node in casts + [inner]:
            require_single_user(node, "mask")
        nodes.extend(casts + [inner])
        chain = operand
        while isinstance(chain, fx.Node) and strip_transposes(chain)[0] is not chain:
            nodes.append(chain)  # a separate .t() for the mask dies with it (erased if unused)
            chain = chain.args[0]
        if base is not None and not _same_weight(operand, base, ctx, gm):
            raise NoMatch(f"mask {inner.name} is not read from the base weight")
        return operand
    if base is None or casts or not isinstance(mask, fx.Node) \
            or mask.op not in ("placeholder", "get_attr"):
        raise NoMatch(f"mask {getattr(mask, 'name', mask)} is not W != 0")
    mask_value, base_value = real_value(mask, ctx, gm), real_value(base, ctx, gm)
    if mask_value is None or base_value is None:
        raise NoMatch(f"mask {mask.name} is a tensor whose value is unknown")
    zero_one = bool(((mask_value == 0) | (mask_value == 1)).all())
    if mask_value.shape != base_value.shape or not zero_one \
            or not torch.equal(mask_value != 0, base_value != 0):
        raise NoMatch(f"mask {mask.name} is not equal to (W != 0)")
    return base


def _shapes_agree(base: Any, lora_A: Any, lora_B: Any, ctx: PassContext, gm) -> bool:
    """``B @ A`` has W's shape (no broadcasting) where all three shapes are known."""
    shape_W, shape_A, shape_B = (shape_of(n, ctx, gm) for n in (base, lora_A, lora_B))
    if None in (shape_W, shape_A, shape_B):
        return True
    return len(shape_W) == 2 and shape_A[-1] == shape_W[1] and shape_B[0] == shape_W[0]


def match_masked_adapter(linear: fx.Node, ctx: PassContext, gm: fx.GraphModule) -> MaskedAdapter:
    """Match ``linear(x, W + s*(B@A)*M, bias)`` (or the delta form ``linear(x, s*(B@A)*M)``)
    ending at ``linear``. Raises :class:`NoMatch` with the reason otherwise."""
    if not is_op(linear, "linear"):
        raise NoMatch(f"{linear.name} is not a functional linear")
    x, w_eff, bias = linear_args(linear, gm)
    if not isinstance(w_eff, fx.Node):
        raise NoMatch(f"{linear.name}'s weight is not a node")
    require_single_user(w_eff, "effective weight")
    nodes: List[fx.Node] = [w_eff]
    if is_op(w_eff, "add") and len(w_eff.args) == 2 and set(w_eff.kwargs) <= {"alpha"}:
        alpha = scalar_of(w_eff.kwargs.get("alpha", 1.0))
        reasons = []
        for base, delta in (w_eff.args, w_eff.args[::-1]):
            if not isinstance(delta, fx.Node) or delta is base:
                continue
            if alpha != 1.0 and delta is not w_eff.args[1]:
                continue
            try:
                product, lora_A, lora_B, scale, mask, interior = _split_delta(delta, ctx, gm)
                require_single_user(delta, "delta")
                _check_mask(mask, base, ctx, gm, interior)
            except NoMatch as reason:
                reasons.append(str(reason))
                continue
            if not _shapes_agree(base, lora_A, lora_B, ctx, gm):
                reasons.append("adapter shapes do not match the weight")
                continue
            return MaskedAdapter(linear, x, base, lora_A, lora_B, bias, scale * (alpha or 0.0),
                                 True, w_eff, nodes + interior)
        raise NoMatch(f"{w_eff.name} is not W + s*(B@A)*M ({'; '.join(reasons) or 'no delta'})")
    product, lora_A, lora_B, scale, mask, interior = _split_delta(w_eff, ctx, gm)
    base = _check_mask(mask, None, ctx, gm, interior)
    if bias is not None:
        raise NoMatch(f"{linear.name}: delta form with a bias")
    if not _shapes_agree(base, lora_A, lora_B, ctx, gm):
        raise NoMatch(f"{linear.name}: adapter shapes do not match the weight")
    return MaskedAdapter(linear, x, base, lora_A, lora_B, None, scale, False, w_eff, interior)

# ----------------------------------------------------------------------------------------------
# The pass
# ----------------------------------------------------------------------------------------------


def op_settings(ctx: PassContext) -> tuple:
    """``(grad_mode, recompute, chunk_bytes)`` from ``ctx.config`` with the op's defaults."""
    config = ctx.config
    grad_mode = getattr(config, "grad_mode", "lors") if config is not None else "lors"
    recompute = getattr(config, "recompute", True) if config is not None else True
    chunk_bytes = getattr(config, "chunk_bytes", None) if config is not None else None
    return grad_mode, recompute, int(chunk_bytes or DEFAULT_CHUNK_BYTES)


def emit_lors_op(gm: fx.GraphModule, replaced: fx.Node, args: tuple, ctx: PassContext,
                 w_eff_meta: dict | None = None) -> fx.Node:
    """Insert the op call (``args`` = ``(x, W, A, B, bias, s, include_base)``) before ``replaced``,
    copy its meta, make every user of ``replaced`` use the result; returns the result node."""
    grad_mode, recompute, chunk_bytes = op_settings(ctx)
    x, weight, lora_A, lora_B, bias, scaling, include_base = args
    graph = gm.graph
    with graph.inserting_before(replaced):
        # Under autocast the linear computed in the autocast dtype while x and W are fp32; the
        # op has no autocast kernel, so cast like lors_fx.ops' wrapper does (A, B are cast inside).
        out_dtype = dtype_of(replaced)
        x, weight, bias = (cast_to(graph, node, out_dtype) for node in (x, weight, bias))
        op_args = (x, weight, lora_A, lora_B, bias, float(scaling), grad_mode, include_base,
                   chunk_bytes)
        if recompute:
            result = graph.call_function(torch.ops.lors.sparse_lora_linear.default, op_args)
            copy_meta(result, replaced)
        else:
            keep = graph.call_function(torch.ops.lors.sparse_lora_linear_keep.default, op_args)
            copy_meta(keep, replaced)
            for key in ("val", "example_value"):
                if key in replaced.meta and w_eff_meta and key in w_eff_meta:
                    keep.meta[key] = (replaced.meta[key], w_eff_meta[key])
                else:
                    keep.meta.pop(key, None)
            result = graph.call_function(operator.getitem, (keep, 0))
            copy_meta(result, replaced)
    replaced.replace_all_uses_with(result)
    return result


def dtype_of(node: Any) -> Optional[torch.dtype]:
    """The dtype recorded in a node's ``meta`` (``val``/``example_value``); None when unknown."""
    for key in ("val", "example_value"):
        value = node.meta.get(key) if isinstance(node, fx.Node) else None
        if isinstance(value, torch.Tensor):
            return value.dtype
    return None


def cast_to(graph: fx.Graph, node: Any, dtype: Optional[torch.dtype]) -> Any:
    """``node.to(dtype)`` when its known dtype differs from ``dtype``, else ``node``."""
    current = dtype_of(node)
    if dtype is None or current is None or current == dtype:
        return node
    cast = graph.call_method("to", (node, dtype))
    for key in ("val", "example_value"):
        value = node.meta.get(key)
        if isinstance(value, torch.Tensor):
            try:
                with value.fake_mode:
                    cast.meta[key] = value.to(dtype)
            except Exception:  # noqa: BLE001 (meta is a convenience; aot recomputes it)
                pass
    return cast


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
