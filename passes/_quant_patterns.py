"""The quantized masked-adapter pattern, its sites and the emitter of ``lors::quant_lora_linear``.

The naive form on a quantized base (:func:`lors_fx.quant_ops.reference_quantized_lora_linear`, what
a :class:`lors_fx.adapter_layers.LorsQuantLinear` emits under dynamo) is the float pattern of
:mod:`._patterns` with the base weight computed by one ``lors::dequantize`` call::

    W = lors.dequantize(packed, scales, bits)            (optionally cast to x's dtype)
    linear(x, W + s*(B@A)*(W != 0), bias)                (A, B optionally cast)

- :func:`match_quantized_adapter`: that pattern, walked back from the linear (the float matcher
  does the ``W + s*(B@A)*M`` part, in every spelling it accepts);
- :func:`quant_site_for`: the :class:`SparseSite` of a quantized base (sparsity and pattern of the
  codes, ``bits``, ``group_size``, ``quant_aware``);
- :func:`emit_quant_op`: the ``torch.ops.lors.quant_lora_linear.default`` call replacing a match.

A helper module beside :mod:`._match` and :mod:`._patterns` (both near the module size limit);
passes import it, never each other.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional

import torch
from torch import fx

from lors_fx.passes._match import (NoMatch, copy_meta, is_op, linear_args, min_sparsity_of,
                                   module_fqn_of, param_of, require_single_user, shape_of)
from lors_fx.passes._patterns import cast_to, dtype_of, match_masked_adapter, strip_casts
from lors_fx.passes.manager import PassContext, SparseSite
from lors_fx.quant import unpack_codes
# importing quant_ops registers the lors ops matched and emitted here
from lors_fx.quant_ops import dequantize_op
from lors_fx.sparsity import pattern_of, sparsity_of

__all__ = ["QUANT_OP", "dequantize_op", "is_dequantize", "is_quant_lors_op", "dequantize_args", "QuantizedAdapter",
           "match_quantized_adapter", "quant_site_for", "emit_quant_op"]

#: The op the rewrite emits.
QUANT_OP = torch.ops.lors.quant_lora_linear.default


def is_dequantize(node: Any) -> bool:
    """True for a call of ``torch.ops.lors.dequantize`` (packet or overload)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        torch.ops.lors.dequantize, torch.ops.lors.dequantize.default)


def is_quant_lors_op(node: Any) -> bool:
    """True for a call of ``torch.ops.lors.quant_lora_linear`` (packet or overload)."""
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in (
        QUANT_OP, torch.ops.lors.quant_lora_linear)


def dequantize_args(node: fx.Node) -> tuple:
    """``(packed, scales, bits)`` of a ``lors::dequantize`` call; raises NoMatch when ``bits`` is
    not a constant 4 or 8."""
    args = list(node.args) + [None] * (3 - len(node.args))
    packed = node.kwargs.get("packed", args[0])
    scales = node.kwargs.get("scales", args[1])
    bits = node.kwargs.get("bits", args[2])
    if bits not in (4, 8) or isinstance(bits, bool):
        raise NoMatch(f"{node.name}: bits is not a constant 4 or 8 ({bits!r})")
    return packed, scales, bits


@dataclass
class QuantizedAdapter:
    """A matched naive quantized adapter; ``intermediates`` are the nodes the rewrite frees (the
    dequantize call and the casts included)."""

    linear: fx.Node
    x: Any
    packed: Any
    scales: Any
    bits: int
    lora_A: Any
    lora_B: Any
    bias: Any
    scaling: float
    intermediates: List[fx.Node] = field(default_factory=list)

    def rank(self, ctx: PassContext, gm) -> Optional[int]:
        """``lora_A``'s first dim, where its shape is known."""
        shape = shape_of(self.lora_A, ctx, gm)
        return shape[0] if shape is not None and len(shape) == 2 else None


def _reads_dequantize(weight: Any) -> bool:
    """Cheap precheck: ``weight`` is ``add(W, ...)`` with ``W`` a (cast) dequantize call."""
    return is_op(weight, "add") and any(is_dequantize(strip_casts(arg)[0])
                                        for arg in weight.args[:2])


def _uncast_adapter(node: Any, nodes: List[fx.Node]) -> Any:
    """The adapter behind its dtype casts (the op casts A and B itself); the casts join
    ``nodes``. Each cast must have one user, else freeing it would be wrong."""
    inner, casts = strip_casts(node)
    for cast in casts:
        require_single_user(cast, "adapter cast")
    nodes.extend(casts)
    return inner


def match_quantized_adapter(linear: fx.Node, ctx: PassContext,
                            gm: fx.GraphModule) -> QuantizedAdapter:
    """Match ``linear(x, W + s*(B@A)*(W != 0), bias)`` with ``W = lors.dequantize(...)`` (through
    casts) ending at ``linear``. Raises :class:`NoMatch` with the reason otherwise."""
    if not is_op(linear, "linear"):
        raise NoMatch(f"{linear.name} is not a functional linear")
    if not _reads_dequantize(linear_args(linear, gm)[1]):
        raise NoMatch(f"{linear.name}'s weight is not W + ... on a lors.dequantize base")
    match = match_masked_adapter(linear, ctx, gm)
    if not match.include_base:
        raise NoMatch(f"{linear.name}: the delta form has no quantized base")
    dequant, casts = strip_casts(match.base)
    if not is_dequantize(dequant):
        raise NoMatch(f"{linear.name}: the base weight is not a lors.dequantize call")
    packed, scales, bits = dequantize_args(dequant)
    nodes = list(match.intermediates) + casts + [dequant]
    lora_A = _uncast_adapter(match.lora_A, nodes)
    lora_B = _uncast_adapter(match.lora_B, nodes)
    return QuantizedAdapter(linear, match.x, packed, scales, bits, lora_A, lora_B, match.bias,
                            match.scaling, nodes)


def _module_of(fqn: str, ctx: PassContext, gm) -> Any:
    for owner in (ctx.model, gm):
        if owner is None:
            continue
        try:
            return owner.get_submodule(fqn) if fqn else owner
        except AttributeError:
            continue
    return None


def _quant_aware(fqn: str, ctx: PassContext, gm) -> bool:
    """The adapter module's ``quant_aware``, else the config's (False without either)."""
    module = _module_of(fqn, ctx, gm)
    if module is not None and isinstance(getattr(module, "quant_aware", None), bool):
        return module.quant_aware
    return bool(getattr(ctx.config, "quant_aware", False))


def quant_site_for(packed: Any, scales: Any, bits: int, ctx: PassContext, gm=None,
                   rank: Optional[int] = None) -> Optional[SparseSite]:
    """The :class:`SparseSite` of a quantized base from its ``packed`` codes node, from
    ``ctx.sites`` or newly measured on the codes; None when the codes are not a known buffer
    (the value is needed), are on the meta device, or are not sparse enough."""
    hit = param_of(packed, ctx, gm)
    if hit is None or hit[1].dim() != 2 or hit[1].device.type == "meta":
        return None
    packed_fqn, value = hit
    suffix = ".weight_packed"
    fqn = packed_fqn[: -len(suffix)] if packed_fqn.endswith(suffix) else module_fqn_of(packed_fqn)
    site = ctx.sites.get(fqn)
    if site is None:
        codes = unpack_codes(value.detach(), bits)
        sparsity = sparsity_of(codes)
        if sparsity < min_sparsity_of(ctx):
            return None
        scale_shape = shape_of(scales, ctx, gm)
        groups = scale_shape[1] if scale_shape is not None and len(scale_shape) == 2 else None
        site = SparseSite(fqn=fqn, shape=tuple(codes.shape), sparsity=sparsity,
                          pattern=pattern_of(codes), bits=bits,
                          group_size=codes.shape[1] // groups if groups else None,
                          quant_aware=_quant_aware(fqn, ctx, gm))
        ctx.sites[fqn] = site
    if rank is not None:
        site.rank = rank
    return site


def emit_quant_op(gm: fx.GraphModule, match: QuantizedAdapter, settings: tuple,
                  quant_aware: bool) -> fx.Node:
    """Insert ``lors::quant_lora_linear`` before ``match.linear`` (``settings`` = ``(grad_mode,
    chunk_bytes)``), copy the linear's meta, make its users use the result; returns the result.

    ``x``, the scales and the bias are cast to the linear's output dtype where it differs (under
    autocast), as :func:`lors_fx.quant_ops.quantized_lora_linear` does eagerly."""
    grad_mode, chunk_bytes = settings
    graph, linear = gm.graph, match.linear
    with graph.inserting_before(linear):
        out_dtype = dtype_of(linear)
        x, scales, bias = (cast_to(graph, node, out_dtype)
                           for node in (match.x, match.scales, match.bias))
        result = graph.call_function(QUANT_OP, (
            x, match.packed, scales, match.lora_A, match.lora_B, bias, float(match.scaling),
            grad_mode, int(match.bits), bool(quant_aware), int(chunk_bytes)))
        copy_meta(result, linear)
    linear.replace_all_uses_with(result)
    return result
