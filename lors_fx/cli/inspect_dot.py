"""Graphviz DOT of the region ``lors-fx inspect`` rewrote (``--dot FILE``), written by hand: no
pydot / graphviz dependency. Inputs are labelled with module paths where dynamo named them after
one (:func:`lors_fx.cli.inspect_code.readable_names`)."""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import fx

from lors_fx.cli.inspect_code import readable_names
from lors_fx.passes._match import is_lors_op as is_sparse_lors_op
from lors_fx.passes._quant_patterns import is_quant_lors_op
from lors_fx.passes.manager import SITE_META_KEY

__all__ = ["dot_text", "rewritten_region", "is_lors_op"]


def is_lors_op(node: Any) -> bool:
    """A call of either LoRS op: ``lors::sparse_lora_linear[_keep]`` or
    ``lors::quant_lora_linear``."""
    return is_sparse_lors_op(node) or is_quant_lors_op(node)


def _innermost(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    return list(stack)[-1] if stack else None


def rewritten_region(gm: fx.GraphModule, before: bool) -> Tuple[List[fx.Node], List[fx.Node]]:
    """``(region nodes, boundary inputs)``: before, each annotated site's linear and the chain
    inside its module (mask, B@A, scale, W', and ``lors.dequantize`` on a quantized base); after,
    each lors op call."""
    region: List[fx.Node] = []
    seen = set()
    roots = [n for n in gm.graph.nodes if (SITE_META_KEY in n.meta if before else is_lors_op(n))]
    for root in roots:
        module = _innermost(root)
        stack = [root]
        while stack:
            node = stack.pop()
            if node in seen:
                continue
            seen.add(node)
            region.append(node)
            if before:
                stack.extend(a for a in node.all_input_nodes
                             if a.op == "call_function" and _innermost(a) == module)
    inputs = []
    for node in region:
        for arg in node.all_input_nodes:
            if arg not in seen:
                seen.add(arg)
                inputs.append(arg)
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    return sorted(region, key=order.get), sorted(inputs, key=order.get)


def _shape_text(node: fx.Node) -> str:
    value = node.meta.get("val", node.meta.get("example_value"))
    if isinstance(value, torch.Tensor):
        dtype = str(value.dtype).replace("torch.", "")
        return f"{dtype}[{', '.join(str(d) for d in value.shape)}]"
    return ""


def _target_text(node: fx.Node) -> str:
    if node.op in ("placeholder", "get_attr", "output"):
        return node.op
    target = node.target
    return getattr(target, "__name__", None) or str(target)


def _quote(text: str) -> str:
    """A DOT quoted string; newlines become DOT's ``\\n`` line breaks."""
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped + '"'


def _cluster(name: str, label: str, gm: fx.GraphModule, before: bool, prefix: str,
             names: Dict[str, str]) -> List[str]:
    region, inputs = rewritten_region(gm, before)
    lines = [f"  subgraph cluster_{name} {{", f"    label={_quote(label)};"]
    members = set(region) | set(inputs)
    for node in inputs:
        short = names.get(node.name, node.name)
        short = short if len(short) <= 48 else "..." + short[-45:]
        lines.append(f"    {prefix}{node.name} [label={_quote(short + chr(10) + _shape_text(node))}"
                     f", shape=box, style=dashed];")
    for node in region:
        color = "palegreen" if is_lors_op(node) else (
            "lightpink" if SITE_META_KEY not in node.meta else "lightblue")
        label = f"{node.name}\n{_target_text(node)}\n{_shape_text(node)}"
        site = node.meta.get(SITE_META_KEY)
        if site is not None:
            label += f"\n{site.fqn}"
        lines.append(f"    {prefix}{node.name} [label={_quote(label)}, style=filled, "
                     f"fillcolor={color}];")
    for node in region:
        for arg in node.all_input_nodes:
            if arg in members:
                lines.append(f"    {prefix}{arg.name} -> {prefix}{node.name};")
    lines.append("  }")
    return lines


def dot_text(before: Optional[fx.GraphModule], after: Optional[fx.GraphModule],
             title: str = "lors_fx rewritten region",
             model: Optional[torch.nn.Module] = None) -> str:
    """Graphviz DOT of the rewritten region: the naive masked-adapter chains of the dynamo graph
    before the rewrite (pink: mask, ``B@A``, scale, ``W'``; blue: the site's linear) and the
    lors op calls after it (green); dashed boxes are the region's inputs (module paths, spelled
    as ``model`` spells them when given)."""
    lines = ["digraph lors_fx {", f"  label={_quote(title)};", "  rankdir=TB;",
             "  node [fontname=\"monospace\", fontsize=10, shape=box];"]
    if before is not None:
        lines += _cluster("before", "before: naive masked form (dynamo graph)", before, True,
                          "b_", readable_names(before, model))
    if after is not None:
        lines += _cluster("after", "after: lors::sparse_lora_linear / lors::quant_lora_linear "
                                   "(rewritten dynamo graph)",
                          after, False, "a_", readable_names(after, model))
    lines.append("}")
    return "\n".join(lines) + "\n"
