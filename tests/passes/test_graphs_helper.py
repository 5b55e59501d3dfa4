"""assert_graphs_equal, the Before/Expected comparison of the pass tests: equal graphs pass in
any order of their leaves, and each kind of difference fails (so an Expected cannot pass by
accident)."""
import operator

import pytest
import torch
import torch.nn.functional as F
from torch import fx, nn

from tests.passes._graphs import assert_graphs_equal, module_with

ROOT = module_with({"w": nn.Parameter(torch.ones(2, 2)), "b": nn.Parameter(torch.ones(2))})


def _graph(*, scale=2.0, target=operator.mul, swap=False, attrs_first=False, meta=None,
           extra_attr=False):
    """``linear(x, w * scale, b)`` with one knob changed."""
    graph = fx.Graph()
    if attrs_first:
        w, b = graph.get_attr("w"), graph.get_attr("b")
        x = graph.placeholder("x")
    else:
        x = graph.placeholder("x")
        w, b = graph.get_attr("w"), graph.get_attr("b")
    if extra_attr:
        graph.get_attr("b")  # a dead read the pass should have erased
    scaled = graph.call_function(target, (scale, w) if swap else (w, scale))
    out = graph.call_function(F.linear, (x, scaled, b))
    if meta is not None:
        out.meta["tag"] = meta
    graph.output(out)
    return fx.GraphModule(ROOT, graph)


def test_equal_graphs_pass_whatever_the_order_of_their_leaves():
    assert_graphs_equal(_graph(), _graph(attrs_first=True))
    assert_graphs_equal(_graph(meta=1), _graph(meta=1), meta_keys=("tag",))
    assert_graphs_equal(_graph(meta=1), _graph(meta=2))  # meta is compared only when asked


@pytest.mark.parametrize("changed", [dict(scale=3.0), dict(target=torch.mul), dict(swap=True),
                                     dict(extra_attr=True)],
                         ids=["constant", "target", "argument-order", "dead-get-attr"])
def test_each_difference_fails(changed):
    with pytest.raises(AssertionError, match="graphs differ"):
        assert_graphs_equal(_graph(**changed), _graph())


def test_a_different_meta_value_fails_when_compared():
    with pytest.raises(AssertionError, match="graphs differ"):
        assert_graphs_equal(_graph(meta=1), _graph(meta=2), meta_keys=("tag",))
