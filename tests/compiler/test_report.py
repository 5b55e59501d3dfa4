"""lors_fx.compiler.report: what the report says about a model that is not compiled, or compiled
but not run yet (the compiled case is checked with compile_model in test_compiled_model.py)."""
import json

import pytest

from lors_fx import LorsConfig
from lors_fx.compiler import compile_model
from lors_fx.compiler.report import report
from tests.compiler._mlp import adapted_mlp

pytestmark = pytest.mark.usefixtures("fresh_dynamo")


def test_report_of_an_uncompiled_model_says_what_is_unknown():
    config = LorsConfig(r=4)
    model = adapted_mlp(config)
    result = report(model)
    assert not result.compiled and result.saved_bytes_before is None
    assert result.saved_bytes_after is None and result.graphs == []
    assert [(s.fqn, s.shape, s.rank, s.grad_mode, s.rewritten) for s in result.sites] == [
        ("0", (64, 32), 4, "lors", False), ("2", (48, 64), 4, "lors", False),
        ("4", (16, 48), 4, "lors", False)]
    assert all(abs(s.sparsity - 0.5) < 1e-9 and s.pattern == "unstructured"
               for s in result.sites)
    assert "unknown" in str(result) and "not compiled" in " ".join(result.notes)
    assert json.loads(json.dumps(result.to_dict()))["saved_bytes_after"] is None
    # compiled but not run yet
    compile_model(model, config)
    assert report(model).saved_bytes_after is None
    assert "no training graph" in " ".join(report(model).notes)
