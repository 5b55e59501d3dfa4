"""Matching helpers shared by the forward-graph passes (torch IR from dynamo, or symbolic_trace).

Dynamo graphs are python-level: parameters are placeholders, ops are ``operator.*`` /
``torch.*`` calls and ``call_method`` nodes. These helpers recognise an op in all three spellings
(plus the aten overload), resolve a node to the real parameter behind it, and flatten products
(``s*(B@A)*M`` in any order) for the matchers in the pass modules.

Name resolution never parses dynamo's placeholder names: the backend puts
``ctx.extra["placeholder_params"] = {placeholder name: (fqn, tensor)}`` (built from the identity of
``example_inputs`` against the model's parameters); hand-built graphs use ``get_attr`` targets.
"""
from __future__ import annotations

import operator
from typing import Any, Dict, List, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import fx, nn

from lors_fx.compiler._torch_private import module_path_from_source
from lors_fx.passes.manager import PassContext, SparseSite
from lors_fx.sparsity import pattern_of, sparsity_of

__all__ = [
    "PLACEHOLDER_PARAMS_KEY", "DEFAULT_MIN_SPARSITY", "aten", "is_op", "is_linear_call",
    "is_lors_op", "param_of", "shape_of", "strip_transposes", "real_value", "scalar_of",
    "module_fqn_of", "requires_grad", "min_sparsity_of", "site_for_weight", "copy_meta",
    "copy_graph_module",
    "erase_if_unused",
    "linear_args", "NoMatch", "require_single_user", "mul_factors",
]

#: ``ctx.extra`` key of the backend's ``{placeholder name: (param FQN, real tensor)}`` map.
PLACEHOLDER_PARAMS_KEY = "placeholder_params"
#: Sparsity threshold when the pass runs without a config.
DEFAULT_MIN_SPARSITY = 0.25

aten = torch.ops.aten

# (call_function targets, call_method names) per op
_OPS: Dict[str, Tuple[frozenset, frozenset]] = {
    # F.linear is torch._C._nn.linear, the target dynamo records.
    "linear": (frozenset({F.linear, aten.linear.default}), frozenset()),
    "matmul": (frozenset({operator.matmul, torch.matmul, torch.mm, aten.mm.default,
                          aten.matmul.default}), frozenset({"matmul", "mm", "__matmul__"})),
    "mul": (frozenset({operator.mul, torch.mul, aten.mul.Tensor, aten.mul.Scalar}),
            frozenset({"mul", "__mul__", "__rmul__"})),
    "div": (frozenset({operator.truediv, torch.div, aten.div.Tensor, aten.div.Scalar}),
            frozenset({"div", "__truediv__"})),
    "add": (frozenset({operator.add, torch.add, aten.add.Tensor}), frozenset({"add", "__add__"})),
    "ne": (frozenset({operator.ne, torch.ne, aten.ne.Scalar, aten.ne.Tensor}),
           frozenset({"ne", "__ne__"})),
    "t": (frozenset({torch.t, aten.t.default, aten.numpy_T.default}), frozenset({"t"})),
    "transpose": (frozenset({torch.transpose, aten.transpose.int}), frozenset({"transpose"})),
    "permute": (frozenset({torch.permute, aten.permute.default}), frozenset({"permute"})),
    "cast": (frozenset({aten._to_copy.default}),
             frozenset({"to", "float", "double", "half", "bfloat16", "type_as", "type"})),
    "addmm": (frozenset({torch.addmm, aten.addmm.default}), frozenset({"addmm"})),
    "dropout": (frozenset({F.dropout, torch.dropout, aten.dropout.default}), frozenset()),
}


def is_op(node: Any, kind: str) -> bool:
    """True when ``node`` calls the op ``kind`` (a key of the table above) in any spelling."""
    if not isinstance(node, fx.Node):
        return False
    functions, methods = _OPS[kind]
    if node.op == "call_function":
        return node.target in functions
    return node.op == "call_method" and node.target in methods


def is_lors_op(node: Any) -> bool:
    """True for a call of ``torch.ops.lors.sparse_lora_linear[_keep]``."""
    if not isinstance(node, fx.Node) or node.op != "call_function":
        return False
    return node.target in (torch.ops.lors.sparse_lora_linear.default,
                           torch.ops.lors.sparse_lora_linear_keep.default,
                           torch.ops.lors.sparse_lora_linear,
                           torch.ops.lors.sparse_lora_linear_keep)


def is_linear_call(node: Any, gm: Optional[fx.GraphModule] = None) -> bool:
    """``F.linear``/``torch._C._nn.linear``/aten linear, or ``call_module`` of an nn.Linear."""
    if is_op(node, "linear"):
        return True
    if isinstance(node, fx.Node) and node.op == "call_module" and gm is not None:
        return isinstance(gm.get_submodule(node.target), nn.Linear)
    return False


def linear_args(node: fx.Node, gm: fx.GraphModule, materialize: bool = False):
    """``(x, weight, bias)`` of a linear call. For ``call_module`` the weight and bias are the
    module's attribute names, or, with ``materialize``, new ``get_attr`` nodes before ``node``."""
    if node.op == "call_module":
        module = gm.get_submodule(node.target)
        weight = f"{node.target}.weight"
        bias = f"{node.target}.bias" if module.bias is not None else None
        if materialize:
            with gm.graph.inserting_before(node):
                weight = gm.graph.get_attr(weight)
                bias = gm.graph.get_attr(bias) if bias is not None else None
        return node.args[0], weight, bias
    args = list(node.args) + [None] * (3 - len(node.args))
    x = node.kwargs.get("input", args[0])
    weight = node.kwargs.get("weight", args[1])
    bias = node.kwargs.get("bias", args[2])
    return x, weight, bias


# ----------------------------------------------------------------------------------------------
# Values, shapes, names
# ----------------------------------------------------------------------------------------------


def param_of(node: Any, ctx: PassContext, gm: Optional[fx.GraphModule] = None
             ) -> Optional[Tuple[str, torch.Tensor]]:
    """``(fqn, real tensor)`` of the parameter (or buffer) a placeholder/get_attr node stands for.

    Uses the backend's ``ctx.extra["placeholder_params"]`` map, then ``get_attr`` targets on
    ``gm`` (or ``ctx.model``). None when the node is not a known parameter: shapes alone are
    available from :func:`shape_of`.
    """
    if isinstance(node, str) and gm is not None:  # a call_module's attribute name
        return node, gm.get_parameter(node) if _has_param(gm, node) else gm.get_buffer(node)
    if not isinstance(node, fx.Node):
        return None
    if node.op == "placeholder":
        hit = ctx.extra.get(PLACEHOLDER_PARAMS_KEY, {}).get(node.name)
        return (hit[0], hit[1]) if hit is not None else None
    if node.op == "get_attr":
        for owner in (gm, ctx.model):
            if owner is None:
                continue
            try:
                value = _get_attr(owner, node.target)
            except AttributeError:
                continue
            if isinstance(value, torch.Tensor):
                return node.target, value
    return None


def _has_param(module: nn.Module, target: str) -> bool:
    try:
        module.get_parameter(target)
        return True
    except AttributeError:
        return False


def _get_attr(owner: nn.Module, target: str):
    value = owner
    for part in target.split("."):
        value = getattr(value, part)
    return value


def shape_of(node: Any, ctx: Optional[PassContext] = None, gm=None) -> Optional[tuple]:
    """Static shape from ``meta["val"]``/``meta["example_value"]`` or the real parameter."""
    if isinstance(node, fx.Node):
        for key in ("val", "example_value"):
            value = node.meta.get(key)
            if isinstance(value, torch.Tensor):
                return tuple(value.shape)
    if ctx is not None:
        hit = param_of(node, ctx, gm)
        if hit is not None:
            return tuple(hit[1].shape)
    return None


def strip_transposes(node: Any) -> Tuple[Any, bool]:
    """Walk back through 2-D transposes (``.t()``, ``transpose(0, 1)``, ``permute(1, 0)``):
    ``(source node, transposed an odd number of times)``."""
    flipped = False
    while isinstance(node, fx.Node):
        if is_op(node, "t"):
            pass
        elif is_op(node, "transpose") and sorted(_int_args(node)[:2]) in ([0, 1], [-2, -1],
                                                                          [-1, 0]):
            pass
        elif is_op(node, "permute") and _int_args(node) == [1, 0]:
            pass
        else:
            break
        node, flipped = node.args[0], not flipped
    return node, flipped


def _int_args(node: fx.Node) -> list:
    rest = list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    return [a for a in rest if isinstance(a, int)]


def real_value(node: Any, ctx: PassContext, gm=None) -> Optional[torch.Tensor]:
    """The real tensor behind a parameter node, through transposes; None when unknown."""
    source, flipped = strip_transposes(node)
    hit = param_of(source, ctx, gm)
    if hit is None:
        return None
    value = hit[1].detach()
    return value.t() if flipped and value.dim() == 2 else value


def scalar_of(value: Any) -> Optional[float]:
    """A python number as float (bools excluded); None for nodes and anything else."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def module_fqn_of(weight_fqn: Optional[str], node: Optional[fx.Node] = None) -> Optional[str]:
    """Module FQN of a site: the weight's FQN without ``.weight``, else the innermost entry of
    ``nn_module_stack`` (as a plain FQN)."""
    if weight_fqn:
        fqn = weight_fqn[: -len(".weight")] if weight_fqn.endswith(".weight") else weight_fqn
        # a PEFT layer's base: the site is the PEFT layer, as lors_fx.lors_modules names it
        return fqn[: -len(".base_layer")] if fqn.endswith(".base_layer") else fqn
    stack = node.meta.get("nn_module_stack") if node is not None else None
    if stack:
        return module_path_from_source(list(stack.values())[-1][0])
    return None


def requires_grad(weight: Any, ctx: PassContext, gm=None) -> bool:
    """True when the real parameter behind ``weight`` requires grad: the op gives the base weight
    no gradient, so rewriting a trainable base would silently freeze it."""
    source, _ = strip_transposes(weight) if isinstance(weight, fx.Node) else (weight, False)
    hit = param_of(source, ctx, gm)
    return bool(hit is not None and hit[1].requires_grad)


def min_sparsity_of(ctx: PassContext) -> float:
    """``ctx.config.min_sparsity``, or :data:`DEFAULT_MIN_SPARSITY` without a config."""
    return getattr(ctx.config, "min_sparsity", DEFAULT_MIN_SPARSITY) if ctx.config is not None \
        else DEFAULT_MIN_SPARSITY


def site_for_weight(weight: Any, transposed: bool, ctx: PassContext, gm=None,
                    rank: Optional[int] = None) -> Optional[SparseSite]:
    """The :class:`SparseSite` of a base weight node (a parameter, possibly through transposes),
    from ``ctx.sites`` or newly measured; None when its value is unknown or it is not sparse
    enough. ``transposed`` says the parameter is stored ``(d_in, d_out)`` (Conv1D)."""
    source, flipped = strip_transposes(weight) if isinstance(weight, fx.Node) else (weight, False)
    hit = param_of(source, ctx, gm)
    if hit is None:
        return None
    weight_fqn, value = hit
    if value.dim() != 2 or value.device.type == "meta":
        return None
    fqn = module_fqn_of(weight_fqn)
    site = ctx.sites.get(fqn)
    if site is None:
        oriented = value.detach().t() if (flipped != transposed) else value.detach()
        sparsity = sparsity_of(oriented)
        if sparsity < min_sparsity_of(ctx):
            return None
        site = SparseSite(fqn=fqn, shape=tuple(oriented.shape), sparsity=sparsity,
                          pattern=pattern_of(oriented))
        ctx.sites[fqn] = site
    if rank is not None:
        site.rank = rank
    return site


# ----------------------------------------------------------------------------------------------
# Graph surgery
# ----------------------------------------------------------------------------------------------


def copy_meta(new: fx.Node, old: fx.Node, **overrides) -> None:
    """Copy ``old.meta`` (stack_trace, nn_module_stack, val/example_value, the site annotation)
    onto ``new``, then apply ``overrides``; ``replace_pattern``-style rewrites lose it otherwise."""
    new.meta.update(old.meta)
    new.meta.update(overrides)


def copy_graph_module(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy whose graph (nodes, their meta, the output's meta) is independent of ``gm``'s;
    submodules and attributes are shared, ``gm.meta`` is copied."""
    graph = fx.Graph()
    value, old_output = graph.graph_copy(gm.graph, {}, return_output_node=True)
    graph.output(value).meta = dict(old_output.meta)
    copy = fx.GraphModule(gm, graph)
    copy.meta.update(gm.meta)
    return copy


def erase_if_unused(graph: fx.Graph, nodes: List[fx.Node]) -> List[fx.Node]:
    """Erase the given nodes that have no users, users first; returns the erased nodes."""
    erased = []
    order = {node: index for index, node in enumerate(graph.nodes)}
    for node in sorted(set(nodes), key=lambda n: order.get(n, -1), reverse=True):
        if node in order and not node.users and node.op not in ("placeholder", "output"):
            graph.erase_node(node)
            erased.append(node)
    return erased


# ----------------------------------------------------------------------------------------------
# Matching primitives
# ----------------------------------------------------------------------------------------------


class NoMatch(Exception):
    """Raised inside the matcher with the reason a candidate was rejected."""


def require_single_user(node: fx.Node, what: str) -> None:
    if len(node.users) != 1:
        raise NoMatch(f"{what} {node.name} has {len(node.users)} users")


def mul_factors(node: fx.Node, interior: List[fx.Node]) -> Tuple[List[Any], float]:
    """Leaves and the scalar product of a mul/div-by-scalar tree rooted at ``node``."""
    if node.kwargs:
        return [node], 1.0
    if is_op(node, "mul") and len(node.args) == 2:
        interior.append(node)
        leaves, scale = [], 1.0
        for arg in node.args:
            number = scalar_of(arg)
            if number is not None:
                scale *= number
            elif isinstance(arg, fx.Node) and (is_op(arg, "mul") or is_op(arg, "div")):
                require_single_user(arg, "product")
                sub_leaves, sub_scale = mul_factors(arg, interior)
                leaves += sub_leaves
                scale *= sub_scale
            else:
                leaves.append(arg)
        return leaves, scale
    if is_op(node, "div") and len(node.args) == 2 and scalar_of(node.args[1]):
        interior.append(node)
        inner = node.args[0]
        if isinstance(inner, fx.Node) and (is_op(inner, "mul") or is_op(inner, "div")):
            require_single_user(inner, "product")
            leaves, scale = mul_factors(inner, interior)
        else:
            leaves, scale = [inner], 1.0
        return leaves, scale / scalar_of(node.args[1])
    return [node], 1.0


def replace_site(gm: fx.GraphModule, linear: fx.Node, result: fx.Node, site, intermediates,
                 grad_mode: str, erased: set, meta_key: str) -> None:
    """The end of a rewrite: ``result`` (the emitted op) takes ``linear``'s place, carrying the
    site under ``meta_key``; ``linear`` and the match's now unused intermediates are erased (and
    added to ``erased``); the site is marked rewritten with ``grad_mode``."""
    result.meta[meta_key] = site
    gm.graph.erase_node(linear)
    erased.add(linear)
    erased.update(erase_if_unused(gm.graph, intermediates))
    site.rewritten, site.grad_mode = True, grad_mode
