"""The torch-version layer: the tested range and its warning, and the differences inside the range
(lors_fx/compiler/_torch_versions.py lists them; _torch_private.py handles each in one place).

CI runs this file on torch 2.11, 2.13 and 2.14 (tools/ci_torch_matrix.sh), so each test below is
checked on the versions whose difference it covers.
"""
from __future__ import annotations

import json
import subprocess
import sys
import warnings

import pytest
import torch
from torch import nn

from lors_fx.compiler import _torch_private as private
from lors_fx.compiler._torch_versions import (TESTED_TORCH, TORCH_VERSION, LoggingFunctionKey,
                                              check_torch_version, is_tested_torch,
                                              parse_torch_version)


def test_tested_range_is_2_11_to_2_14():
    assert TESTED_TORCH == ((2, 11), (2, 14))
    assert private.TESTED_TORCH is TESTED_TORCH
    assert is_tested_torch(TORCH_VERSION), f"CI runs a torch outside the range: {torch.__version__}"


@pytest.mark.parametrize("text, parsed", [("2.11.0+cu130", (2, 11)), ("2.13.0+cpu", (2, 13)),
                                          ("2.14.1", (2, 14)), ("2.15.0a0+git1234", (2, 15)),
                                          ("10.2", (10, 2)), ("nightly", None), ("", None)])
def test_parse_torch_version(text, parsed):
    assert parse_torch_version(text) == parsed


@pytest.mark.parametrize("version", ["2.11.0", "2.11.0+cu130", "2.12.1", "2.13.0+cpu", "2.14.1"])
def test_no_warning_inside_the_tested_range(version):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert check_torch_version(version) is None
    assert caught == []


@pytest.mark.parametrize("version", ["2.10.0", "2.15.0", "2.15.0a0+git1234", "3.0.0", "1.13.1",
                                     "nightly"])
def test_warning_outside_the_tested_range(version):
    with pytest.warns(RuntimeWarning, match=r"tested with torch 2\.11 to 2\.14, found "):
        message = check_torch_version(version)
    assert version in message


def test_import_does_not_warn_on_the_installed_torch():
    """The old check warned on anything but 2.13 (on the GPU machine's 2.11 at every import)."""
    code = ("import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    import lors_fx.compiler._torch_private\n"
            "print([str(w.message) for w in caught if 'lors_fx is tested' in str(w.message)])\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            timeout=300, check=True)
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _joint_graph():
    """aot_autograd's joint graph of ``Linear(x).relu().sum()`` and its ``num_fwd_outputs``."""
    torch.compiler.reset()
    captured = {}

    def partition_fn(joint_gm, joint_inputs, **kwargs):
        captured["joint"] = joint_gm
        captured["num_fwd_outputs"] = kwargs["num_fwd_outputs"]
        return private.min_cut_partition(joint_gm, joint_inputs, **kwargs)

    def compiler(gm, _inputs):
        return private.boxed(gm.forward)

    linear = nn.Linear(6, 4)

    def loss(x):
        return linear(x).relu().sum()

    backend = private.aot_backend(compiler, partition_fn=partition_fn)
    torch.compile(loss, backend=backend, fullgraph=True)(torch.randn(3, 6)).backward()
    return captured["joint"], captured["num_fwd_outputs"]


def _closure(start, step):
    seen, stack = set(), list(start)
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(step(node))
    return seen


def test_is_backward_traced_marks_the_backward_that_reads_no_tangent():
    """torch 2.11 has no ``meta["autograd_backward"]``: the weight's transpose for the input
    gradient then read as a forward node, and ``checkpoint="block"`` saved a block's internals."""
    joint, num_fwd_outputs = _joint_graph()
    calls = [n for n in joint.graph.nodes if n.op == "call_function"]
    (outputs,) = [n for n in joint.graph.nodes if n.op == "output"]
    forward_outputs = [a for a in outputs.args[0][:num_fwd_outputs] if isinstance(a, torch.fx.Node)]
    needed_by_forward = _closure(forward_outputs, lambda n: n.all_input_nodes)
    tangents = [n for n in joint.graph.nodes if n.op == "placeholder" and private.is_tangent(n)]
    reads_tangent = _closure(tangents, lambda n: n.users)
    backward = {n for n in calls if private.is_backward_traced(n)}
    assert not backward & needed_by_forward
    assert {n for n in calls if n in reads_tangent} <= backward
    assert backward - reads_tangent, "no tangent-free backward node was recognised"


def test_ignored_logging_functions_keep_the_compile_log_working():
    """torch 2.11 writes ``ignore_logging_functions`` sorted into each compile's JSON log: two
    functions made every compile log a TypeError traceback. The calls must still not break."""
    from torch._dynamo.utils import _get_dynamo_config_for_logging
    from transformers.utils import logging as hf_logging

    logger = hf_logging.get_logger("lors_fx.tests.torch_private")

    def step(x):
        logger.warning_once("lors_fx test: once")
        logger.warning_advice("lors_fx test: advice")
        return x + 1

    with torch._dynamo.config.patch(ignore_logging_functions=set()):
        for function in (hf_logging.warning_once, hf_logging.warning_advice):
            private.ignore_logging_function(function)
            private.ignore_logging_function(function)  # idempotent
            assert function in torch._dynamo.config.ignore_logging_functions
        assert len(torch._dynamo.config.ignore_logging_functions) == 2
        json.loads(_get_dynamo_config_for_logging())
        torch.compiler.reset()
        out = torch.compile(step, backend="eager", fullgraph=True)(torch.zeros(2))
    assert torch.equal(out, torch.ones(2))


def test_logging_function_key_stands_for_its_function():
    def first():
        pass

    def second():
        pass

    keys = {LoggingFunctionKey(second), LoggingFunctionKey(first)}
    assert first in keys and second in keys and (lambda: None) not in keys
    assert LoggingFunctionKey(first) == LoggingFunctionKey(first) != LoggingFunctionKey(second)
    assert json.loads(json.dumps(sorted(keys))) == sorted(str(k) for k in keys)
    assert str(LoggingFunctionKey(first)).endswith("first")
