"""Joint-graph analysis shared by the checkpoint pass: the decoder blocks of a joint forward+backward
graph (from ``nn_module_stack``), which nodes are forward, and what nodes cost (FLOPs, bytes saved)."""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional

import torch
from torch import fx, nn

from lors_fx.compiler._torch_private import (is_backward_traced, is_primal, is_tangent,
                                             module_path_from_source)

__all__ = ["Block", "forward_nodes", "find_blocks", "node_flops", "tensor_bytes",
           "saved_activation_bytes", "num_fwd_outputs"]


@dataclass
class Block:
    """One decoder block of the joint graph: its forward nodes and what it costs."""

    name: str
    nodes: List[fx.Node] = field(default_factory=list)
    flops: int = 0
    saved_bytes: int = 0           # static estimate: its nodes that backward reads


def _stack_paths(node: fx.Node) -> List[str]:
    stack = node.meta.get("nn_module_stack") or {}
    paths = []
    for value in stack.values():
        source = value[0] if isinstance(value, tuple) else value
        paths.append(module_path_from_source(source))
    return paths


def _block_candidates(paths: Iterable[str]) -> List[tuple]:
    """``(list_path, block_path)`` pairs, outermost first, for every ``<list>.<i>`` seen."""
    found = []
    for path in paths:
        parts = path.split(".")
        for i in range(1, len(parts)):
            if parts[i].isdigit():
                pair = (".".join(parts[:i]), ".".join(parts[:i + 1]))
                if pair not in found:
                    found.append(pair)
    found.sort(key=lambda pair: pair[1].count("."))
    return found


def _is_module_list(model: Optional[nn.Module], list_path: str) -> bool:
    if model is None:
        return True
    try:
        module = model.get_submodule(list_path)
    except AttributeError:
        return True  # a wrapper changed the root: trust the name
    return isinstance(module, (nn.ModuleList, nn.Sequential))


def forward_nodes(graph: fx.Graph) -> List[fx.Node]:
    """Call nodes of the joint graph's forward: not reachable from a tangent, not backward-traced."""
    backward = set()
    result = []
    for node in graph.nodes:
        if node.op == "placeholder":
            if is_tangent(node):
                backward.add(node)
            continue
        if node.op == "output":
            continue
        if is_backward_traced(node) or any(arg in backward for arg in node.all_input_nodes):
            backward.add(node)
            continue
        result.append(node)
    return result


def find_blocks(graph: fx.Graph, model: Optional[nn.Module] = None) -> List[Block]:
    """The decoder blocks of a joint graph, in forward order (see the module docstring)."""
    fw_nodes = forward_nodes(graph)
    candidates = {node: _block_candidates(_stack_paths(node)) for node in fw_nodes}
    children: Dict[str, set] = {}
    for pairs in candidates.values():
        for list_path, block_path in pairs:
            children.setdefault(list_path, set()).add(block_path)
    lists_ok = {path: len(kids) >= 2 and _is_module_list(model, path)
                for path, kids in children.items()}
    blocks: Dict[str, Block] = {}
    for node in fw_nodes:
        for list_path, block_path in candidates[node]:
            if lists_ok[list_path]:
                blocks.setdefault(block_path, Block(block_path)).nodes.append(node)
                break
    return list(blocks.values())


def tensor_bytes(value) -> int:
    if isinstance(value, torch.Tensor):
        return int(value.numel()) * value.element_size()
    if isinstance(value, (list, tuple)):
        return sum(tensor_bytes(v) for v in value)
    return 0


def node_flops(node: fx.Node) -> int:
    """Rough FLOPs of one node from ``meta["val"]`` shapes: GEMMs 2mnk, attention 4BHLSE, else numel."""
    val = node.meta.get("val")
    if node.op != "call_function" or val is None or node.target is operator.getitem:
        return 0
    args = [a.meta.get("val") if isinstance(a, fx.Node) else a for a in node.args]
    name = str(getattr(node.target, "__name__", node.target))
    try:
        if name.startswith(("mm", "addmm", "bmm", "baddbmm")):
            a, b = (args[1], args[2]) if name.startswith(("addmm", "baddbmm")) else args[:2]
            return 2 * int(a.numel()) * int(b.shape[-1])
        if "scaled_dot_product" in name or "flash_attention" in name:
            q, k = args[0], args[1]
            return 4 * int(q.numel()) * int(k.shape[-2])
        if "sparse_lora_linear" in name:
            x, weight, lora_a = args[0], args[1], args[2]
            tokens = int(x.numel()) // int(x.shape[-1])
            d_out, d_in = (int(s) for s in weight.shape)
            return 2 * tokens * d_out * d_in + 2 * d_out * d_in * int(lora_a.shape[0])
    except (AttributeError, IndexError, TypeError):
        pass
    first = val[0] if isinstance(val, (list, tuple)) and val else val
    return int(first.numel()) if isinstance(first, torch.Tensor) else 0


def saved_activation_bytes(fw_gm: fx.GraphModule, num_fwd_outputs: int,
                           by_name: bool = False):
    """Bytes a partitioned forward graph saves for backward, forward inputs (parameters) excluded.

    The saved values are the forward graph's outputs after its first ``num_fwd_outputs``; those
    that are placeholders (primals: parameters and inputs, which exist anyway) are not counted.
    With ``by_name`` returns ``{node_name: bytes}`` instead of the total.
    """
    output = next(iter(fw_gm.graph.find_nodes(op="output")))
    values = list(output.args[0])[num_fwd_outputs:]
    saved = {}
    for value in values:
        if isinstance(value, fx.Node) and value.op != "placeholder":
            saved[value.name] = tensor_bytes(value.meta.get("val"))
    return saved if by_name else sum(saved.values())


def num_fwd_outputs(joint_gm: fx.GraphModule) -> int:
    output = next(iter(joint_gm.graph.find_nodes(op="output")))
    primals = sum(1 for node in joint_gm.graph.nodes if is_primal(node))
    return len(list(output.args[0])) - primals
