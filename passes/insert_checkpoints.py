"""insert_checkpoints: tag activation-checkpoint regions (one per decoder block) on the joint graph.

Precondition: ``joint_gm`` is aot_autograd's joint graph (forward + backward; ``primals_*`` and
``tangents_*`` placeholders), as handed to a ``partition_fn``, *before* the min-cut partitioner.
Forward nodes carry dynamo's ``nn_module_stack``. The pass only writes ``node.meta``.

What torch's (2.11 to 2.14) ``min_cut_rematerialization_partition`` does with it: ``meta["recompute"]`` in
(``MUST_RECOMPUTE``, ``PREFER_RECOMPUTE``) adds an infinite ``X_in -> sink`` edge (recomputed in
backward, matmuls included: the compute-intensive ban is skipped for must-recompute nodes);
``MUST_SAVE`` bans recompute (saved when backward needs it). ``cleanup_recompute_tags`` turns a
must-recompute node with a must-recompute user of a *larger* ``meta["ac_graph_id"]`` into
``MUST_SAVE`` (the boundary of two adjacent regions); under min-cut it does not save a region's
inputs by itself, so this pass tags them. ``force_save_collectives`` / ``_effectful_ops`` /
``_bw_mutation_src`` only add ``MUST_SAVE`` to nodes that are not must-recompute.

Blocks. A forward node belongs to the block ``<list>.<i>`` (``model.layers.3``, ``transformer.h.0``,
``blocks.1``) found in its ``nn_module_stack``: dynamo's keys are object ids and its values carry
source names such as ``L['self'].model.layers.0.mlp`` or ``getattr(L['self'].layers, '0')``,
normalised here to plain FQNs. A node takes the *outermost* ``<list>.<i>`` of its stack whose list
holds at least two children in the graph (T5-like ``block.0.layer.1``: the decoder block is
``block.0``, not its sub-layer ``layer.1``; a one-stage ``stages.0.blocks.3`` falls through to
``blocks.3``). With ``ctx.model`` the list must resolve to an ``nn.ModuleList``/``nn.Sequential``.

Policy (``LorsConfig.checkpoint``):

- ``none``: nothing tagged.
- ``block``: every block checkpointed. ``every:k``: blocks ``0, k, 2k, ...``; the others are left
  to the partitioner's own choice.
- ``budget:<bytes>``: the least recompute FLOPs such that the forward saves at most ``<bytes>``
  (parameters excluded). Per block we measure, with the real partitioner on copies of the graph,
  the bytes it makes the forward save when left alone and when checkpointed (the latter is its
  output boundary), and count its recompute FLOPs from the shapes in ``meta["val"]``. Choosing
  blocks is then a covering 0/1 knapsack (minimise the FLOPs of the chosen set subject to the bytes
  it frees >= total - budget), solved exactly by dynamic programming over bytes quantised to 4096
  buckets (rounded so the estimate stays conservative). A min-cut formulation (networkx) does not
  fit: a budget is a sum constraint over blocks, not a pairwise cut cost. The choice is then checked
  by partitioning a copy once more; if the per-block estimates were not additive, blocks with the
  best bytes-per-FLOP ratio are added until the check passes. When even checkpointing every block
  cannot meet the budget, every block is checkpointed and a note is added to ``ctx.notes``.

A graph that is one decoder block compiled by itself (``compile_model(scope="blocks")``, as under
FSDP2; ``ctx.extra["graph_is_block"]``) has no ``<list>.<i>`` in its stacks: its whole forward is
then the one block ``<graph>``, so ``block`` saves only the graph's inputs.

A checkpointed block's forward nodes are ``MUST_RECOMPUTE`` with the block's own ``ac_graph_id``;
its outputs (nodes used by forward nodes outside the block) and its inputs (non-placeholder
forward nodes outside it that it reads) are ``MUST_SAVE``. Random ops are recomputed too: for
must-recompute ops tagged ``nondeterministic_seeded`` the partitioner's ``functionalize_rng_ops``
saves the RNG state in forward and replays it in backward (CPU included), as for
``torch.utils.checkpoint`` under compile. Nothing forces the masked weight ``W'`` to be saved:
with the lors op there is no ``W'`` in the forward; in the naive masked form the ``W'`` chain is
inside the block and so is recomputed, which is what we want.

Before (joint graph, one Linear+GELU block of ``blocks``)::

    primals_1 (weight), primals_2 (x), tangents_1
    t = t(primals_1)                       # nn_module_stack: ... blocks.0.linear
    mm = mm(primals_2, t)                  # blocks.0.linear
    gelu = gelu(mm)                        # blocks.0.act
    ... backward: gelu_backward(tangents_1, mm), mm(..., primals_2) ...

After (policy "block")::

    t     meta: recompute=MUST_RECOMPUTE, ac_graph_id=1
    mm    meta: recompute=MUST_RECOMPUTE, ac_graph_id=1
    gelu  meta: recompute=MUST_SAVE,      ac_graph_id=1   # block output
    (backward nodes untouched; min-cut then saves primals_2 and recomputes mm in backward)
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional, Sequence

import torch
from torch import fx

from lors_fx.compiler._torch_private import (AC_GRAPH_ID_META_KEY, RECOMPUTE_META_KEY,
                                             CheckpointPolicy, min_cut_partition,
                                             module_path_from_source, partition_context)
from lors_fx.config import parse_checkpoint_policy
from lors_fx.passes._joint import (Block, find_blocks, forward_nodes, node_flops, num_fwd_outputs,
                                   saved_activation_bytes, tensor_bytes)
from lors_fx.passes._match import copy_graph_module
from lors_fx.passes.manager import PassContext, PassResult, register_pass

#: Dynamo's module source name -> plain FQN (``L['self'].layers[0]`` -> ``layers.0``).
normalize_module_path = module_path_from_source

__all__ = ["Block", "insert_checkpoints", "find_blocks", "normalize_module_path",
           "forward_nodes", "node_flops", "saved_activation_bytes", "make_partition_fn",
           "BLOCK_META_KEY"]

#: ``node.meta`` key where the pass records the block (FQN) a forward node belongs to.
BLOCK_META_KEY = "lors_block"
_BUDGET_BUCKETS = 4096
_SYM_TYPES = (torch.SymInt, torch.SymFloat, torch.SymBool)


# ---------------------------------------------------------------------------------------------
# Tagging
# ---------------------------------------------------------------------------------------------


def _tag_blocks(fw_nodes: Sequence[fx.Node], blocks: Sequence[Block], chosen: Iterable[int],
                node_of: Callable[[fx.Node], fx.Node] = lambda n: n) -> int:
    """Write the tags for the blocks at indices ``chosen``; return the number of nodes tagged."""
    fw_set = {node_of(n) for n in fw_nodes}
    tagged = set()
    for index in sorted(chosen):
        members = {node_of(n) for n in blocks[index].nodes}
        for node in members:
            if isinstance(node.meta.get("val"), _SYM_TYPES):
                continue
            node.meta[RECOMPUTE_META_KEY] = CheckpointPolicy.MUST_RECOMPUTE
            node.meta[AC_GRAPH_ID_META_KEY] = index + 1
            tagged.add(node)
        for node in members:
            outside_users = [u for u in node.users if u in fw_set and u not in members]
            if outside_users and node in tagged:
                node.meta[RECOMPUTE_META_KEY] = CheckpointPolicy.MUST_SAVE
            for arg in node.all_input_nodes:
                if arg.op != "placeholder" and arg in fw_set and arg not in members \
                        and not isinstance(arg.meta.get("val"), _SYM_TYPES):
                    arg.meta[RECOMPUTE_META_KEY] = CheckpointPolicy.MUST_SAVE
                    tagged.add(arg)
    return len(tagged)


def _measure(joint_gm, fw_nodes, blocks, chosen, partition_kwargs, owner) -> Dict[str, int]:
    """Partition a tagged copy; saved bytes per owner (block name or ``"outside"``)."""
    copy = copy_graph_module(joint_gm)
    by_name = {node.name: node for node in copy.graph.nodes}
    _tag_blocks(fw_nodes, blocks, chosen, node_of=lambda n: by_name[n.name])
    with partition_context(copy):
        fw_gm, _ = min_cut_partition(copy, None, **partition_kwargs)
    per_owner: Dict[str, int] = {}
    for name, nbytes in saved_activation_bytes(
            fw_gm, partition_kwargs["num_fwd_outputs"], by_name=True).items():
        key = owner.get(name, "outside")
        per_owner[key] = per_owner.get(key, 0) + nbytes
    return per_owner


def _knapsack(gains: List[int], costs: List[int], need: int) -> List[int]:
    """Indices minimising sum(costs) with sum(gains) >= need (gains quantised down, need up)."""
    if need <= 0:
        return []
    unit = max(1, math.ceil(need / _BUDGET_BUCKETS))
    target = math.ceil(need / unit)
    best = [math.inf] * (target + 1)
    choice: List[Optional[List[int]]] = [None] * (target + 1)
    best[0], choice[0] = 0, []
    for index, (gain, cost) in enumerate(zip(gains, costs)):
        step = gain // unit
        if step <= 0:
            continue
        for level in range(target, -1, -1):
            if choice[level] is None:
                continue
            reach = min(target, level + step)
            if best[level] + cost < best[reach]:
                best[reach], choice[reach] = best[level] + cost, choice[level] + [index]
    return choice[target] if choice[target] is not None else list(range(len(gains)))


def _choose_for_budget(joint_gm, fw_nodes, blocks, budget, partition_kwargs, ctx, details):
    # Owner of a value the forward may save: its block; nodes traced by backward but computable in
    # forward (e.g. ``t(W')``, hoisted and saved by min-cut) inherit the owner of their first
    # owned input.
    owner = {node.name: block.name for block in blocks for node in block.nodes}
    for node in joint_gm.graph.nodes:
        if node.op == "call_function" and node.name not in owner:
            for arg in node.all_input_nodes:
                if arg.name in owner:
                    owner[node.name] = owner[arg.name]
                    break
    everything = range(len(blocks))
    alone = _measure(joint_gm, fw_nodes, blocks, [], partition_kwargs, owner)
    all_in = _measure(joint_gm, fw_nodes, blocks, everything, partition_kwargs, owner)
    total_alone, total_all = sum(alone.values()), sum(all_in.values())
    details.update(measured_saved_bytes_none=total_alone, measured_saved_bytes_all=total_all,
                   measured_saved_bytes_per_block={"unchecked": alone, "checkpointed": all_in})
    if total_all > budget:
        note = (f"insert_checkpoints: budget {budget} B cannot be met (checkpointing all "
                f"{len(blocks)} blocks still saves {total_all} B); checkpointing every block")
        ctx.notes.append(note)
        details["note"] = note
        return list(everything)
    if total_alone <= budget:
        return []
    gains = [alone.get(b.name, 0) - all_in.get(b.name, 0) for b in blocks]
    fixed = max(alone.get("outside", 0), all_in.get("outside", 0))
    need = fixed + sum(alone.get(b.name, 0) for b in blocks) - budget
    chosen = _knapsack(gains, [max(1, b.flops) for b in blocks], need)
    order = sorted(everything, key=lambda i: -gains[i] / max(1, blocks[i].flops))
    while True:
        measured = sum(_measure(joint_gm, fw_nodes, blocks, chosen, partition_kwargs,
                                owner).values())
        if measured <= budget or len(chosen) == len(blocks):
            details["measured_saved_bytes_chosen"] = measured
            return sorted(chosen)
        chosen = chosen + [next(i for i in order if i not in chosen)]


@register_pass("joint", order=10, enabled=lambda config: config is not None and
               parse_checkpoint_policy(config.checkpoint)[0] != "none")
def insert_checkpoints(joint_gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """Tag checkpoint regions per decoder block according to ``ctx.config.checkpoint``.

    ``ctx.extra["partition_kwargs"]`` (the kwargs aot_autograd gave the ``partition_fn``:
    ``num_fwd_outputs``, ``static_lifetime_input_indices``) is used by the ``budget`` policy to
    measure with the real partitioner; without it ``num_fwd_outputs`` is derived from the graph.
    Returns ``count`` = nodes tagged; ``details``: policy, blocks found, blocks checkpointed,
    per-block static saved-bytes estimate and recompute FLOPs (and measurements for ``budget``).
    """
    policy = getattr(ctx.config, "checkpoint", "none") if ctx.config is not None else "none"
    kind, value = parse_checkpoint_policy(policy)
    fw_nodes = forward_nodes(joint_gm.graph)
    blocks = find_blocks(joint_gm.graph, ctx.model)
    if not blocks and ctx.extra.get("graph_is_block") and fw_nodes:
        blocks = [Block("<graph>", list(fw_nodes))]  # a block compiled by itself (FSDP2)
    fw_set = set(fw_nodes)
    for block in blocks:
        block.flops = sum(node_flops(n) for n in block.nodes)
        # Static estimate: what a plain (non-min-cut) partition would save, i.e. the block's
        # nodes that a backward node reads.
        block.saved_bytes = sum(tensor_bytes(n.meta.get("val")) for n in block.nodes
                                if any(u.op != "output" and u not in fw_set for u in n.users))
        for node in block.nodes:
            node.meta[BLOCK_META_KEY] = block.name
    details = {"policy": policy, "blocks_found": [b.name for b in blocks],
               "estimated_saved_bytes": {b.name: b.saved_bytes for b in blocks},
               "recompute_flops": {b.name: b.flops for b in blocks}}
    if kind == "none" or not blocks:
        chosen: List[int] = []
    elif kind == "block":
        chosen = list(range(len(blocks)))
    elif kind == "every":
        chosen = list(range(0, len(blocks), value))
    else:
        kwargs = dict(ctx.extra.get("partition_kwargs") or {})
        kwargs.setdefault("num_fwd_outputs", num_fwd_outputs(joint_gm))
        chosen = _choose_for_budget(joint_gm, fw_nodes, blocks, value, kwargs, ctx, details)
        details["budget_bytes"] = value
    count = _tag_blocks(fw_nodes, blocks, chosen)
    details["blocks_checkpointed"] = [blocks[i].name for i in chosen]
    return PassResult(name="insert_checkpoints", count=count, details=details)


def make_partition_fn(ctx: PassContext, partition: Optional[Callable] = None) -> Callable:
    """A ``partition_fn`` for aot_autograd: run :func:`insert_checkpoints`, then min-cut.

    Records, per compiled graph, the :class:`PassResult` in ``ctx.extra["checkpoint_results"]``
    and the partitioned forward's saved activation bytes in ``ctx.extra["saved_bytes"]``.
    """
    partition = partition or min_cut_partition

    def partition_fn(joint_gm, joint_inputs, **kwargs):
        ctx.extra["partition_kwargs"] = dict(kwargs)
        result = insert_checkpoints(joint_gm, ctx)
        ctx.extra.setdefault("checkpoint_results", []).append(result)
        fw_gm, bw_gm = partition(joint_gm, joint_inputs, **kwargs)
        saved = saved_activation_bytes(fw_gm, kwargs.get("num_fwd_outputs",
                                                         num_fwd_outputs(joint_gm)))
        ctx.extra.setdefault("saved_bytes", []).append(saved)
        return fw_gm, bw_gm

    return partition_fn
