"""saved_tensor_report: list what a partitioned forward graph saves for backward (analysis only).

After partitioning, the forward graph returns the user outputs first (``num_fwd_outputs`` of them,
mutated inputs included) and then the values the backward reads: tensors, then symbolic ints.
Those saved tensors are what a training step keeps alive between forward and backward, so they
are what LoRS has to keep small: for each adapted linear it should save ``x`` (plus parameters,
which exist anyway), never the dense ``W' = W + s*(B@A)*M``.

Each saved tensor becomes one row: ``name``, ``shape`` (symbolic dims as strings), ``dtype``,
``bytes`` (from size hints; None if a dim has no hint), and ``kind``:

- ``"parameter"``: a forward input (primal) that is a model parameter or buffer: saving it costs
  nothing, it is alive anyway;
- ``"input"``: any other forward input (the batch, a hidden state handed over from an earlier
  graph);
- ``"activation"``: computed in the forward.

A saved view (``view(primals_5, [-1, 64])``: the op saves ``x`` reshaped to 2-D) takes the kind
of the tensor it aliases (``view_of``), and the totals count each aliased storage once: a view
costs no memory of its own.

Before (naive masked form, ``W`` 64x32 50% zeros, ``x`` 8x32 that requires grad)::

    fw outputs: (sum, | primals_1, primals_2, primals_3, primals_4, relu, t_3)
    rows: primals_1 (64, 32) parameter | ... | primals_4 (8, 32) input
          relu (8, 64) activation      | t_3 (64, 32) activation   <- W', 8 KiB
    details: saved_bytes = 11264, activation_bytes = 10240

After (``rewrite_masked_adapters``: one ``lors::sparse_lora_linear`` call)::

    fw outputs: (sum, | primals_1, primals_2, primals_3, relu, view)
    rows: ... relu (8, 64) activation | view (8, 32) activation     <- x only
    details: saved_bytes = 3072, activation_bytes = 3072

Precondition: ``fw_gm`` is a partitioned forward graph. The user-output count comes from
``ctx.extra["num_fwd_outputs"]`` (the backend records the partitioner's kwarg); without it, from
``ctx.extra["bw_gm"]``: the saved values are the backward's non-tangent placeholders, matched by
name. Primal ``i`` is described by ``ctx.extra["input_names"][i]`` = ``(kind, name)`` when given
(the backend builds it from the identity of dynamo's example inputs with the model's parameters);
otherwise every primal is an ``"input"``.

Count: saved tensors. ``details``: ``rows``, ``total_bytes`` (all saved storages),
``parameter_bytes``, ``input_bytes``, ``activation_bytes``, ``saved_bytes`` (= total minus
parameters: what the saving really costs), ``unknown_bytes`` (rows without a size hint),
``symints`` (names of saved symbolic ints).
"""
from __future__ import annotations

import math
from typing import Any, Dict, List, Optional

import torch
from torch import fx

from lors_fx.compiler._torch_private import is_tangent, is_view_op, size_hint
from lors_fx.passes.manager import PassContext, PassResult, register_pass

__all__ = ["saved_tensor_report", "saved_values", "tensor_bytes"]

_KINDS = ("parameter", "input", "activation")


def tensor_bytes(value: Any) -> Optional[int]:
    """Bytes of a (fake) tensor from its shape and dtype; None when a dim has no size hint."""
    if not isinstance(value, torch.Tensor):
        return None
    dims = [size_hint(d) for d in value.shape]
    if any(d is None for d in dims):
        return None
    return math.prod(dims) * value.element_size()


def _node_value(node: fx.Node) -> Any:
    return node.meta.get("val", node.meta.get("example_value"))


def saved_values(fw_gm: fx.GraphModule, ctx: PassContext) -> List[fx.Node]:
    """The forward's outputs that the backward reads (tensors and symbolic ints), in order."""
    output = next(iter(fw_gm.graph.find_nodes(op="output")))
    outputs = list(output.args[0]) if isinstance(output.args[0], (tuple, list)) else [output.args[0]]
    num_fwd_outputs = ctx.extra.get("num_fwd_outputs")
    if num_fwd_outputs is not None:
        return [n for n in outputs[num_fwd_outputs:] if isinstance(n, fx.Node)]
    bw_gm = ctx.extra.get("bw_gm")
    if bw_gm is None:
        raise ValueError("saved_tensor_report: need ctx.extra['num_fwd_outputs'] or "
                         "ctx.extra['bw_gm'] to tell saved values from user outputs")
    wanted = {n.name for n in bw_gm.graph.find_nodes(op="placeholder") if not is_tangent(n)}
    return [n for n in outputs if isinstance(n, fx.Node) and n.name in wanted]


def _primal_kind(node: fx.Node, placeholders: List[fx.Node], ctx: PassContext) -> tuple:
    input_names = ctx.extra.get("input_names")
    if input_names is not None and node in placeholders:
        index = placeholders.index(node)
        if index < len(input_names):
            return tuple(input_names[index])
    return "input", node.name


def _view_root(node: fx.Node) -> fx.Node:
    """Follow aten view ops (``view``, ``t``, ``transpose``...) back to the tensor they alias: a
    saved view of an input costs no memory of its own."""
    while is_view_op(node) and node.args and isinstance(node.args[0], fx.Node):
        node = node.args[0]
    return node


def _shape(value: Any) -> tuple:
    return tuple(d if isinstance(d, int) else str(d) for d in value.shape)


@register_pass("report", order=10)
def saved_tensor_report(fw_gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """List the tensors a partitioned forward graph saves for backward, with their bytes and kind.

    Analysis only: the graph is not changed. See the module docstring for the rows and totals.
    """
    placeholders = list(fw_gm.graph.find_nodes(op="placeholder"))
    rows: List[Dict[str, Any]] = []
    symints: List[str] = []
    totals = dict.fromkeys(_KINDS, 0)
    counted = set()  # storages (view roots) already in the totals
    unknown = 0
    for node in saved_values(fw_gm, ctx):
        value = _node_value(node)
        if not isinstance(value, torch.Tensor):
            symints.append(node.name)  # saved sizes (SymInt): a few bytes, not tensors
            continue
        root = _view_root(node)
        if root.op == "placeholder":
            kind, source = _primal_kind(root, placeholders, ctx)
        else:
            kind, source = "activation", None
        nbytes = tensor_bytes(value)
        # A view shares its base's storage: count the base once, however many views are saved.
        root_bytes = tensor_bytes(_node_value(root)) if root is not node else nbytes
        if root_bytes is None:
            unknown += 1
        elif root not in counted:
            counted.add(root)
            totals[kind] += root_bytes
        rows.append({"name": node.name, "source": source, "shape": _shape(value),
                     "dtype": str(value.dtype).replace("torch.", ""), "bytes": nbytes,
                     "kind": kind, "view_of": None if root is node else root.name})
    total = sum(totals.values())
    details = {"rows": rows, "total_bytes": total, "parameter_bytes": totals["parameter"],
               "input_bytes": totals["input"], "activation_bytes": totals["activation"],
               "saved_bytes": total - totals["parameter"], "unknown_bytes": unknown,
               "symints": symints}
    return PassResult("saved_tensor_report", len(rows), details=details)
