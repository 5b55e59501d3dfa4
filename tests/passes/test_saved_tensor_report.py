"""saved_tensor_report: the rows and byte totals of what a partitioned forward saves for backward.

Before/Expected on a hand-built forward graph (the rows written out; the graph unchanged) and on
real partitions (the naive masked form saves W'; the lors op saves x), plus hand-built graphs for
the bookkeeping: view dedup, kinds, symbolic and unbacked shapes.
"""
import pytest
import torch
from torch import fx, nn
# FakeTensorMode has no public import path: the hand-built graphs need fake values in meta["val"].
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv

from lors_fx import LorsConfig
from lors_fx.compiler._torch_private import aot_backend, min_cut_partition
from lors_fx.ops import reference_sparse_lora_linear
from lors_fx.passes.manager import PassContext
from lors_fx.passes.saved_tensor_report import saved_tensor_report, tensor_bytes
from tests.passes._graphs import assert_graphs_equal, eager_compiler

pytestmark = pytest.mark.usefixtures("fresh_dynamo")

D_IN, D_OUT, R, T = 32, 64, 4, 8


class OneSite(nn.Module):
    """``relu(linear(x, W'))`` with W 50% zeros; ``use_op`` calls the lors op instead."""

    def __init__(self, use_op: bool):
        super().__init__()
        torch.manual_seed(0)
        weight = torch.randn(D_OUT, D_IN)
        weight[torch.rand(D_OUT, D_IN) < 0.5] = 0.0
        self.weight = nn.Parameter(weight, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(R, D_IN))
        self.lora_B = nn.Parameter(torch.randn(D_OUT, R))
        self.use_op = use_op

    def forward(self, x):
        if self.use_op:
            y = torch.ops.lors.sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, None,
                                                  2.0, "lors", True, 2**26)
        else:
            y = reference_sparse_lora_linear(x, self.weight, self.lora_A, self.lora_B, None, 2.0)
        return y.relu()


def partition(model: nn.Module, x: torch.Tensor):
    """``(fw_gm, bw_gm, num_fwd_outputs, input_names)`` of one training graph of ``model(x)``."""
    torch.compiler.reset()
    found = {}
    names = {id(p): n for n, p in model.named_parameters()}

    def partition_fn(joint, inputs, **kwargs):
        fw_gm, bw_gm = min_cut_partition(joint, inputs, **kwargs)
        found.update(fw=fw_gm, bw=bw_gm, n=kwargs["num_fwd_outputs"])
        return fw_gm, bw_gm

    def backend(gm, example_inputs):
        found["input_names"] = [("parameter", names[id(t)]) if id(t) in names
                                else ("input", "x") for t in example_inputs]
        return aot_backend(eager_compiler, partition_fn=partition_fn)(gm, example_inputs)

    torch.compile(model, backend=backend, fullgraph=True)(x).sum().backward()
    return found["fw"], found["bw"], found["n"], found["input_names"]


def report_of(model, x):
    fw_gm, bw_gm, n, input_names = partition(model, x)
    ctx = PassContext(config=LorsConfig(), extra={"num_fwd_outputs": n,
                                                  "input_names": input_names})
    return saved_tensor_report(fw_gm, ctx), fw_gm, bw_gm


def test_naive_form_saves_a_dense_w_prime_and_the_op_saves_x():
    x = torch.randn(T, D_IN, requires_grad=True)
    before, _, _ = report_of(OneSite(use_op=False), x)
    after, fw_after, _ = report_of(OneSite(use_op=True), x)

    dense = [r for r in before.details["rows"]
             if r["kind"] == "activation" and r["dtype"] == "float32"
             and sorted(r["shape"]) == sorted((D_OUT, D_IN))]
    assert dense, before.details["rows"]  # W' (or its transpose) saved: d_out*d_in*4 bytes
    assert dense[0]["bytes"] == D_OUT * D_IN * 4

    rows = after.details["rows"]
    assert not [r for r in rows if r["kind"] != "parameter"
                and sorted(r["shape"]) == sorted((D_OUT, D_IN))]
    x_rows = [r for r in rows if r["kind"] == "input"]
    assert [tuple(r["shape"]) for r in x_rows] == [(T, D_IN)]  # x, as the op's 2-D view
    assert "sparse_lora_linear" in fw_after.code
    assert after.count == len(rows)
    assert after.details["saved_bytes"] < before.details["saved_bytes"]
    # x (input) + relu's output (activation) and nothing else beyond parameters
    assert after.details["saved_bytes"] == T * D_IN * 4 + T * D_OUT * 4
    assert after.details["parameter_bytes"] == sum(r["bytes"] for r in rows
                                                   if r["kind"] == "parameter")
    assert {r["source"] for r in rows if r["kind"] == "parameter"} <= {"weight", "lora_A",
                                                                      "lora_B"}


def test_without_num_fwd_outputs_the_backward_placeholders_name_the_saved_values():
    x = torch.randn(T, D_IN, requires_grad=True)
    fw_gm, bw_gm, n, input_names = partition(OneSite(use_op=True), x)
    by_count = saved_tensor_report(fw_gm, PassContext(extra={"num_fwd_outputs": n}))
    by_name = saved_tensor_report(fw_gm, PassContext(extra={"bw_gm": bw_gm}))
    assert by_count.details["rows"] == by_name.details["rows"]
    assert by_count.count > 0
    # without input_names every primal is an "input"
    assert {r["kind"] for r in by_count.details["rows"]} <= {"input", "activation"}
    with pytest.raises(ValueError, match="num_fwd_outputs"):
        saved_tensor_report(fw_gm, PassContext())


def _hand_built_forward(shape_env=None, dims=(4, 8)):
    """fw graph: out = relu(x) * w; saves relu, view(relu), w, the view of x, a SymInt."""
    mode = FakeTensorMode(shape_env=shape_env)
    graph = fx.Graph()
    aten = torch.ops.aten
    with mode:
        x_val = torch.empty(*dims)
        w_val = torch.empty(dims[-1])
    x = graph.placeholder("primals_1")
    x.meta["val"] = x_val
    w = graph.placeholder("primals_2")
    w.meta["val"] = w_val
    relu = graph.create_node("call_function", aten.relu.default, (x,), name="relu")
    view = graph.create_node("call_function", aten.view.default, (relu, [-1]), name="view")
    x_view = graph.create_node("call_function", aten.view.default, (x, [-1]), name="view_1")
    out = graph.create_node("call_function", aten.mul.Tensor, (relu, w), name="mul")
    size = graph.create_node("call_function", aten.sym_size.int, (x, 0), name="sym_size_int")
    with mode:
        relu.meta["val"] = torch.empty(*dims)
        view.meta["val"] = relu.meta["val"].view(-1)
        x_view.meta["val"] = x_val.view(-1)
        out.meta["val"] = torch.empty(*dims)
    size.meta["val"] = dims[0]
    graph.output((out, relu, view, w, x_view, size))
    return fx.GraphModule(nn.Module(), graph)


def test_before_expected_rows_of_a_hand_built_forward():
    gm = _hand_built_forward()
    ctx = PassContext(extra={"num_fwd_outputs": 1,
                             "input_names": [("input", "x"), ("parameter", "w")]})
    result = saved_tensor_report(gm, ctx)
    row = dict(source=None, dtype="float32", view_of=None)
    assert result.details["rows"] == [
        {**row, "name": "relu", "shape": (4, 8), "bytes": 128, "kind": "activation"},
        {**row, "name": "view", "shape": (32,), "bytes": 128, "kind": "activation",
         "view_of": "relu"},
        {**row, "name": "primals_2", "source": "w", "shape": (8,), "bytes": 32,
         "kind": "parameter"},
        {**row, "name": "view_1", "source": "x", "shape": (32,), "bytes": 128, "kind": "input",
         "view_of": "primals_1"},
    ]
    assert result.count == 4
    assert_graphs_equal(gm, _hand_built_forward())  # analysis only: the graph is unchanged


def test_views_count_once_and_kinds_follow_the_aliased_tensor():
    gm = _hand_built_forward()
    code = gm.code
    ctx = PassContext(extra={"num_fwd_outputs": 1,
                             "input_names": [("input", "x"), ("parameter", "w")]})
    result = saved_tensor_report(gm, ctx)
    rows = {r["name"]: r for r in result.details["rows"]}
    assert list(rows) == ["relu", "view", "primals_2", "view_1"]
    assert rows["view"]["view_of"] == "relu" and rows["view"]["kind"] == "activation"
    assert rows["view_1"]["view_of"] == "primals_1" and rows["view_1"]["kind"] == "input"
    assert rows["primals_2"]["kind"] == "parameter" and rows["primals_2"]["source"] == "w"
    assert result.details["activation_bytes"] == 4 * 8 * 4  # relu once, not relu + its view
    assert result.details["input_bytes"] == 4 * 8 * 4
    assert result.details["parameter_bytes"] == 8 * 4
    assert result.details["saved_bytes"] == 2 * 4 * 8 * 4
    assert result.details["symints"] == ["sym_size_int"]
    assert result.count == 4
    assert gm.code == code  # analysis only


def test_symbolic_shapes_use_size_hints_and_unbacked_ones_are_unknown():
    shape_env = ShapeEnv()
    mode = FakeTensorMode(shape_env=shape_env)
    with mode:
        backed = mode.from_tensor(torch.empty(6, 8), symbolic_context=None)
    symbol = shape_env.create_unbacked_symint()
    with mode:
        unbacked = torch.empty(symbol, 8)
    assert tensor_bytes(unbacked) is None
    assert tensor_bytes(backed) == 6 * 8 * 4
    assert tensor_bytes("not a tensor") is None

    # A dynamic compile: symbolic dims come out as strings, bytes from their hints.
    x = torch.randn(T, D_IN, requires_grad=True)
    torch._dynamo.mark_dynamic(x, 0)  # dynamo's documented API for this; no torch.compiler one
    fw_gm, _, n, input_names = partition(OneSite(use_op=True), x)
    result = saved_tensor_report(fw_gm, PassContext(extra={"num_fwd_outputs": n,
                                                            "input_names": input_names}))
    inputs = [r for r in result.details["rows"] if r["kind"] == "input"]
    assert inputs and isinstance(inputs[0]["shape"][0], str)
    assert inputs[0]["bytes"] == T * D_IN * 4
    assert result.details["unknown_bytes"] == 0


def test_unbacked_rows_are_counted_as_unknown():
    shape_env = ShapeEnv()
    gm = _hand_built_forward()
    mode = FakeTensorMode(shape_env=shape_env)
    relu = next(n for n in gm.graph.nodes if n.name == "relu")
    with mode:
        relu.meta["val"] = torch.empty(shape_env.create_unbacked_symint(), 8)
    result = saved_tensor_report(gm, PassContext(extra={"num_fwd_outputs": 1}))
    rows = {r["name"]: r for r in result.details["rows"]}
    assert rows["relu"]["bytes"] is None
    assert result.details["unknown_bytes"] == 2  # relu and its view
    assert result.details["activation_bytes"] == 0
