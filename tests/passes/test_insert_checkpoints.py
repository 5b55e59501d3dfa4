"""insert_checkpoints: Before/Expected on a hand-built joint graph (the tags written by hand), and
on real aot_autograd joint graphs.

Real joint graphs are captured once per model (a ``partition_fn`` that keeps a copy), then each
test tags a fresh copy, runs torch's min-cut partitioner and counts what the forward saves.
"""
from __future__ import annotations

import pytest
import torch
import transformers
from torch import fx, nn

from lors_fx.compiler import compile_state_of
from lors_fx.compiler._torch_private import (AC_GRAPH_ID_META_KEY, RECOMPUTE_META_KEY,
                                             CheckpointPolicy, aot_backend, boxed,
                                             min_cut_partition, partition_context)
from lors_fx.config import LorsConfig
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.passes._match import copy_graph_module
from lors_fx.passes.insert_checkpoints import (BLOCK_META_KEY, _knapsack, find_blocks,
                                               forward_nodes, insert_checkpoints,
                                               make_partition_fn, normalize_module_path,
                                               saved_activation_bytes)
from lors_fx.passes.manager import PassContext
from lors_fx.workflows.prune import magnitude_prune_
from tests.passes._graphs import assert_graphs_equal

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D, D_HIDDEN, RANK = 32, 64, 4


class MaskedAdapterLinear(nn.Module):
    """A 50%-pruned frozen linear with a naive masked adapter (SQFT form: autograd keeps W')."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        weight = torch.randn(d_out, d_in) / d_in ** 0.5
        weight[torch.rand_like(weight) < 0.5] = 0.0
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(RANK, d_in) / d_in ** 0.5)
        self.lora_B = nn.Parameter(torch.randn(d_out, RANK) * 0.1)

    def forward(self, x):
        return reference_sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, scaling=2.0)


class Block(nn.Module):
    def __init__(self, dropout: float = 0.0):
        super().__init__()
        self.up = MaskedAdapterLinear(D, D_HIDDEN)
        self.act = nn.GELU()
        self.drop = nn.Dropout(dropout)
        self.down = nn.Linear(D_HIDDEN, D)

    def forward(self, x):
        return x + self.down(self.drop(self.act(self.up(x))))


class TinyStack(nn.Module):
    """Four Linear+GELU residual blocks in a ModuleList, then a loss."""

    def __init__(self, layers: int = 4, dropout: float = 0.0):
        super().__init__()
        self.layers = nn.ModuleList(Block(dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(D)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.norm(x).pow(2).mean()


def identity_compiler(gm, example_inputs):
    return boxed(gm.forward)


def tiny_llama():
    config = transformers.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                                      num_attention_heads=4, num_key_value_heads=2,
                                      vocab_size=128, use_cache=False)
    return transformers.LlamaForCausalLM(config)


def _capture(model, run):
    """Compile ``model``, run ``run`` once; return (joint graph copy, partition kwargs)."""
    captured = {}

    def partition(joint_gm, joint_inputs, **kwargs):
        captured["joint"], captured["kwargs"] = copy_graph_module(joint_gm), kwargs
        return min_cut_partition(joint_gm, joint_inputs, **kwargs)

    torch.compiler.reset()
    compiled = torch.compile(model, backend=aot_backend(identity_compiler, partition_fn=partition))
    run(compiled).backward()
    return captured["joint"], captured["kwargs"]


def _llama_inputs():
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(1))
    return dict(input_ids=ids, labels=ids)


@pytest.fixture(scope="module")
def stack_capture():
    torch.manual_seed(0)
    model = TinyStack()
    x = torch.randn(2, 8, D)
    joint, kwargs = _capture(model, lambda m: m(x))
    return model, joint, kwargs


@pytest.fixture(scope="module")
def llama_capture():
    torch.manual_seed(0)
    model = tiny_llama()
    inputs = _llama_inputs()
    joint, kwargs = _capture(model, lambda m: m(**inputs).loss)
    return model, joint, kwargs


@pytest.fixture(params=["stack", "llama"])
def capture(request, stack_capture, llama_capture):
    return {"stack": stack_capture, "llama": llama_capture}[request.param]


def _run(capture, policy):
    """Tag a copy of the joint graph with ``policy`` and partition it.

    Returns (PassResult, ctx, a copy of the tagged joint graph, saved activation bytes, fw graph).
    """
    model, joint, kwargs = capture
    gm = copy_graph_module(joint)
    ctx = PassContext(config=LorsConfig(checkpoint=policy), model=model,
                      extra={"partition_kwargs": kwargs})
    result = insert_checkpoints(gm, ctx)
    tagged = copy_graph_module(gm)
    with partition_context(gm):
        fw_gm, _ = min_cut_partition(gm, None, **kwargs)
    return result, ctx, tagged, saved_activation_bytes(fw_gm, kwargs["num_fwd_outputs"]), fw_gm


def _layer_prefix(model):
    return "model.layers" if hasattr(model, "model") else "layers"


# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source, expected", [
    ("L['args'][0].model.layers.0.mlp", "model.layers.0.mlp"),
    ("L['self'].model.layers[3].self_attn", "model.layers.3.self_attn"),
    ("getattr(L['self'].transformer.h, '2').attn", "transformer.h.2.attn"),
    ("L['self']._modules['blocks']._modules['1']", "blocks.1"),
    ("L['fn'].encoder.block.0.layer.1", "encoder.block.0.layer.1"),
])
def test_normalize_module_path(source, expected):
    assert normalize_module_path(source) == expected


def _module_stack(path):
    """Dynamo's ``nn_module_stack`` of a node run inside module ``path`` (``"layers.0.act"``)."""
    parts = path.split(".")
    return {str(i): (f"L['self'].{'.'.join(parts[:i + 1])}", nn.Module) for i in range(len(parts))}


def _graph_with_stacks(paths):
    """A chain of relu nodes, node i carrying an nn_module_stack that ends at ``paths[i]``."""
    graph = torch.fx.Graph()
    value = graph.placeholder("primals_1")
    for path in paths:
        value = graph.call_function(torch.relu, (value,))
        value.meta["nn_module_stack"] = _module_stack(path)
    graph.output(value)
    return graph


def _two_block_joint(tags=None):
    """A joint graph in aot_autograd's form, by hand: blocks ``layers.0`` and ``layers.1`` (an mm
    and a relu each), a loss outside the blocks, and a backward node (it reads a tangent).
    ``tags`` = ``{node name: meta}`` writes the Expected annotations.

        mm0 = mm(primals_1, primals_2)     layers.0.linear
        relu0 = relu(mm0)                  layers.0.act
        mm1 = mm(relu0, primals_3)         layers.1.linear
        relu1 = relu(mm1)                  layers.1.act
        loss = sum(relu1)                  norm
        grad = mul(tangents_1, relu1)      (backward)
    """
    aten = torch.ops.aten
    graph = fx.Graph()
    x, w0, w1, tangent = (graph.placeholder(name) for name in
                          ("primals_1", "primals_2", "primals_3", "tangents_1"))
    nodes = {}

    def call(name, target, args, path=None):
        nodes[name] = graph.create_node("call_function", target, args, name=name)
        if path is not None:
            nodes[name].meta["nn_module_stack"] = _module_stack(path)
        return nodes[name]

    relu0 = call("relu0", aten.relu.default, (call("mm0", aten.mm.default, (x, w0),
                                                     "layers.0.linear"),), "layers.0.act")
    relu1 = call("relu1", aten.relu.default, (call("mm1", aten.mm.default, (relu0, w1),
                                                     "layers.1.linear"),), "layers.1.act")
    loss = call("loss", aten.sum.default, (relu1,), "norm")
    graph.output([loss, call("grad", aten.mul.Tensor, (tangent, relu1))])
    for name, meta in (tags or {}).items():
        nodes[name].meta.update(meta)
    return fx.GraphModule(nn.Module(), graph)


def _tags(block, graph_id=None, policy=None):
    tags = {BLOCK_META_KEY: block}
    if graph_id is not None:
        tags.update({RECOMPUTE_META_KEY: policy, AC_GRAPH_ID_META_KEY: graph_id})
    return tags


RECOMPUTE, SAVE = CheckpointPolicy.MUST_RECOMPUTE, CheckpointPolicy.MUST_SAVE
TAG_KEYS = (RECOMPUTE_META_KEY, AC_GRAPH_ID_META_KEY, BLOCK_META_KEY)


@pytest.mark.parametrize("policy, count, expected_tags", [
    # every block recomputed; a block's output read outside it (relu0 by mm1, relu1 by the loss)
    # is saved, with its own block's ac_graph_id
    ("block", 4, {"mm0": _tags("layers.0", 1, RECOMPUTE), "relu0": _tags("layers.0", 1, SAVE),
                  "mm1": _tags("layers.1", 2, RECOMPUTE), "relu1": _tags("layers.1", 2, SAVE)}),
    # blocks 0, 2, ...: layers.1 only gets its block name
    ("every:2", 2, {"mm0": _tags("layers.0", 1, RECOMPUTE), "relu0": _tags("layers.0", 1, SAVE),
                    "mm1": _tags("layers.1"), "relu1": _tags("layers.1")}),
    ("none", 0, {name: _tags(f"layers.{name[-1]}") for name in ("mm0", "relu0", "mm1",
                                                                "relu1")}),
])
def test_before_expected_hand_built_joint_graph(policy, count, expected_tags):
    gm = _two_block_joint()
    result = insert_checkpoints(gm, PassContext(config=LorsConfig(checkpoint=policy)))
    assert result.count == count
    assert result.details["blocks_found"] == ["layers.0", "layers.1"]
    # the graph is unchanged; only the forward nodes of the blocks carry tags (loss, backward and
    # placeholders none)
    assert_graphs_equal(gm, _two_block_joint(expected_tags), meta_keys=TAG_KEYS)


def test_find_blocks_takes_outermost_list_with_siblings():
    t5_like = _graph_with_stacks(["encoder.block.0.layer.0.attn", "encoder.block.0.layer.1.ff",
                                  "encoder.block.1.layer.0.attn", "encoder.block.1.layer.1.ff",
                                  "encoder.final_norm"])
    blocks = find_blocks(t5_like)
    assert [b.name for b in blocks] == ["encoder.block.0", "encoder.block.1"]
    assert [len(b.nodes) for b in blocks] == [2, 2]
    one_stage = _graph_with_stacks(["stages.0.blocks.0.mlp", "stages.0.blocks.1.mlp",
                                    "stages.0.blocks.2.mlp"])
    assert [b.name for b in find_blocks(one_stage)] == [f"stages.0.blocks.{i}" for i in range(3)]


def test_blocks_found_match_layers(capture):
    model, joint, _ = capture
    blocks = find_blocks(joint.graph, model)
    prefix = _layer_prefix(model)
    assert [b.name for b in blocks] == [f"{prefix}.{i}" for i in range(4)]
    assert all(len(b.nodes) > 5 for b in blocks)
    sizes = {len(b.nodes) for b in blocks[1:]}
    assert len(sizes) == 1  # identical layers -> identical regions
    details = _run(capture, "none")[0].details
    assert details["blocks_found"] == [b.name for b in blocks]
    flops = [details["recompute_flops"][b.name] for b in blocks]
    assert flops[0] > 0 and len(set(flops)) == 1
    assert all(v > 0 for v in details["estimated_saved_bytes"].values())


def test_none_tags_nothing(capture):
    result, _, tagged, _, _ = _run(capture, "none")
    assert result.count == 0 and result.details["blocks_checkpointed"] == []
    assert not any(RECOMPUTE_META_KEY in n.meta for n in tagged.graph.nodes)


def test_block_policy_tags(capture):
    result, _, tagged, _, _ = _run(capture, "block")
    model = capture[0]
    blocks = find_blocks(tagged.graph, model)
    assert result.details["blocks_checkpointed"] == [b.name for b in blocks]
    fw = set(forward_nodes(tagged.graph))
    counted = 0
    for index, block in enumerate(blocks):
        members = set(block.nodes)
        for node in block.nodes:
            policy = node.meta[RECOMPUTE_META_KEY]
            assert node.meta[AC_GRAPH_ID_META_KEY] == index + 1
            leaves = any(u in fw and u not in members for u in node.users)
            expected = CheckpointPolicy.MUST_SAVE if leaves else CheckpointPolicy.MUST_RECOMPUTE
            assert policy == expected, node.format_node()
            counted += 1
    # Every block's output is saved; backward nodes are never tagged.
    assert all(RECOMPUTE_META_KEY not in n.meta for n in tagged.graph.nodes
               if n.op == "call_function" and n not in fw)
    assert result.count >= counted
    recompute = sum(n.meta.get(RECOMPUTE_META_KEY) == CheckpointPolicy.MUST_RECOMPUTE
                    for n in tagged.graph.nodes)
    assert recompute > counted // 2


def test_every_2_tags_alternate_blocks(capture):
    result, _, tagged, _, _ = _run(capture, "every:2")
    blocks = find_blocks(tagged.graph, capture[0])
    assert result.details["blocks_checkpointed"] == [blocks[0].name, blocks[2].name]
    for index, block in enumerate(blocks):
        must_recompute = [n.meta.get(RECOMPUTE_META_KEY) == CheckpointPolicy.MUST_RECOMPUTE
                          for n in block.nodes]
        assert any(must_recompute) == (index % 2 == 0)


def test_saved_bytes_order_none_every2_block(capture):
    saved = {policy: _run(capture, policy)[3] for policy in ("none", "every:2", "block")}
    assert saved["none"] > saved["every:2"] > saved["block"] > 0, saved


def test_budget_between_block_and_none(capture):
    saved_every2 = _run(capture, "every:2")[3]
    saved_block = _run(capture, "block")[3]
    result, ctx, _, saved, _ = _run(capture, f"budget:{saved_every2}")
    assert saved_block < saved_every2
    assert saved <= saved_every2
    assert 0 < len(result.details["blocks_checkpointed"]) < 4
    assert result.details["measured_saved_bytes_chosen"] == saved
    assert ctx.notes == []


def test_budget_loose_checkpoints_nothing(capture):
    saved_none = _run(capture, "none")[3]
    result, _, _, saved, _ = _run(capture, f"budget:{saved_none}")
    assert result.details["blocks_checkpointed"] == [] and result.count == 0
    assert saved == saved_none


def test_impossible_budget_checkpoints_all_and_notes(capture):
    saved_block = _run(capture, "block")[3]
    result, ctx, _, saved, _ = _run(capture, "budget:1")
    assert len(result.details["blocks_checkpointed"]) == 4
    assert saved == saved_block
    assert len(ctx.notes) == 1 and "cannot be met" in ctx.notes[0]
    assert "cannot be met" in result.details["note"]


def test_naive_masked_weight_not_saved_when_checkpointed(stack_capture):
    """Default min-cut saves W' (d_out x d_in, non-parameter) of the naive form; "block" does not."""
    weight_shapes = {(D_HIDDEN, D), (D, D_HIDDEN)}  # W' or its transpose

    def saved_shapes(fw_gm, kwargs):
        out = next(iter(fw_gm.graph.find_nodes(op="output")))
        return [tuple(v.meta["val"].shape) for v in out.args[0][kwargs["num_fwd_outputs"]:]
                if v is not None and v.op != "placeholder" and hasattr(v.meta.get("val"), "shape")]

    kwargs = stack_capture[2]
    assert weight_shapes & set(saved_shapes(_run(stack_capture, "none")[4], kwargs))
    block_shapes = saved_shapes(_run(stack_capture, "block")[4], kwargs)
    assert not weight_shapes & set(block_shapes)
    # Only activations (batch 2 x seq 8: block boundaries, the norm's statistics) are left.
    assert block_shapes and all(shape[:2] == (2, 8) for shape in block_shapes), block_shapes


def test_knapsack_picks_cheapest_cover():
    assert sorted(_knapsack([5, 4, 3], [10, 3, 3], need=7)) == [1, 2]
    assert _knapsack([5, 4, 3], [10, 3, 3], need=0) == []
    assert _knapsack([5, 4, 3], [1, 30, 30], need=5) == [0]


# ---------------------------------------------------------------------------------------------
# Numerics: a real compiled training step with checkpointing equals eager.
# ---------------------------------------------------------------------------------------------


def _grads(model):
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()
            if p.grad is not None}


@pytest.mark.parametrize("which", ["stack", "llama"])
def test_checkpointed_step_matches_eager(which, request):
    torch.manual_seed(0)
    if which == "stack":
        model, x = TinyStack(), torch.randn(2, 8, D)
        step = lambda m: m(x)  # noqa: E731
    else:
        model, inputs = tiny_llama(), _llama_inputs()
        step = lambda m: m(**inputs).loss  # noqa: E731
    eager_loss = step(model)
    eager_loss.backward()
    eager_grads = _grads(model)
    model.zero_grad(set_to_none=True)

    ctx = PassContext(config=LorsConfig(checkpoint="block"), model=model)
    torch.compiler.reset()
    backend = aot_backend(identity_compiler, partition_fn=make_partition_fn(ctx))
    loss = step(torch.compile(model, backend=backend))
    loss.backward()
    grads = _grads(model)

    [result] = ctx.extra["checkpoint_results"]
    assert result.count > 0 and len(result.details["blocks_checkpointed"]) == 4
    # The live compile saved what the offline partition of the same graph with "block" saves.
    captured = request.getfixturevalue(f"{which}_capture")
    assert ctx.extra["saved_bytes"][0] == _run(captured, "block")[3] > 0
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5,
                                   msg=lambda m, n=name: f"{n}: {m}")


def test_checkpointed_dropout_replays_rng():
    """Recomputed dropout draws the same mask in backward: grads equal the uncheckpointed ones."""
    x = torch.randn(2, 8, D)
    grads = {}
    for policy in ("none", "block"):
        torch.manual_seed(0)
        model = TinyStack(dropout=0.3)
        ctx = PassContext(config=LorsConfig(checkpoint=policy), model=model)
        torch.compiler.reset()
        compiled = torch.compile(model, backend=aot_backend(
            identity_compiler, partition_fn=make_partition_fn(ctx)))
        torch.manual_seed(1)
        compiled(x).backward()
        grads[policy] = _grads(model)
        assert (ctx.extra["checkpoint_results"][0].count > 0) == (policy == "block")
    assert any(v.abs().sum() > 0 for v in grads["block"].values())
    for name in grads["none"]:
        torch.testing.assert_close(grads["block"][name], grads["none"][name], rtol=1e-5,
                                   atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_optimize_with_block_checkpoint_matches_eager_op():
    """Through the public path: optimize(compile=True, checkpoint="block") vs the eager op."""
    from lors_fx.api import optimize

    inputs = _llama_inputs()
    results = {}
    for compile_, policy in ((False, "none"), (True, "block")):
        torch.manual_seed(0)
        model = tiny_llama()
        magnitude_prune_(model, 0.5)  # every linear but lm_head, per row
        torch.compiler.reset()
        optimize(model, LorsConfig(r=4, checkpoint=policy), compile=compile_)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("lora_B"):
                    param.normal_(0, 0.02, generator=torch.Generator().manual_seed(len(name)))
        loss = model(**inputs).loss
        loss.backward()
        results[policy] = (loss.detach(), _grads(model), model)
    loss, grads, model = results["block"]
    eager_loss, eager_grads, _ = results["none"]
    records = [r for graph in compile_state_of(model).graphs for r in graph.joint_passes
               if r.name == "insert_checkpoints"]
    assert records and records[0].count > 0
    assert len(records[0].details["blocks_checkpointed"]) == 4
    torch.testing.assert_close(loss, eager_loss, rtol=1e-5, atol=1e-6)
    assert grads.keys() == eager_grads.keys() and len(grads) == 4 * 7 * 2
    for name in grads:
        torch.testing.assert_close(grads[name], eager_grads[name], rtol=1e-4, atol=1e-5)


@pytest.fixture(scope="module")
def single_block_capture():
    """One TinyStack block compiled by itself, as compile_model(scope="blocks") does under FSDP2:
    its graph's module stacks hold no ``<list>.<i>``."""
    torch.manual_seed(0)
    model = TinyStack()
    block = model.layers[0]
    x = torch.randn(2, 8, D)
    joint, kwargs = _capture(block, lambda m: m(x).pow(2).mean())
    return block, joint, kwargs


@pytest.mark.parametrize("flag", [False, True])
def test_graph_is_block_checkpoints_the_whole_graph(single_block_capture, flag):
    block, joint, kwargs = single_block_capture
    assert find_blocks(joint.graph, block) == []
    gm = copy_graph_module(joint)
    ctx = PassContext(config=LorsConfig(checkpoint="block"), model=block,
                      extra={"partition_kwargs": kwargs, "graph_is_block": flag})
    result = insert_checkpoints(gm, ctx)
    with partition_context(gm):
        fw_gm, _ = min_cut_partition(gm, None, **kwargs)
    saved = saved_activation_bytes(fw_gm, kwargs["num_fwd_outputs"])
    plain = copy_graph_module(joint)
    with partition_context(plain):
        fw_plain, _ = min_cut_partition(plain, None, **kwargs)
    saved_plain = saved_activation_bytes(fw_plain, kwargs["num_fwd_outputs"])
    if not flag:
        assert result.count == 0 and saved == saved_plain
        return
    assert result.details["blocks_checkpointed"] == ["<graph>"]
    fw = forward_nodes(gm.graph)
    assert fw and all(n.meta.get(RECOMPUTE_META_KEY) is not None for n in fw)
    # Only the block's input is kept (recomputed in backward): less than the partitioner's own.
    assert saved < saved_plain
    assert saved <= 2 * 8 * D * 4
