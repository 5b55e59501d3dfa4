"""The compiler: the lors ``torch.compile`` backend (graph passes, partitioner, saved-tensor report),
:func:`compile_model` that installs it on a model's forward, and :func:`report`.

Modules: :mod:`~lors_fx.compiler.backend` (per dynamo graph), :mod:`~lors_fx.compiler.compiled_model`
(per model: forward routing and fallback), :mod:`~lors_fx.compiler.state` (what is recorded),
:mod:`~lors_fx.compiler.blocks` (decoder blocks), :mod:`~lors_fx.compiler.report`, and
:mod:`~lors_fx.compiler._torch_private` (every private torch API, in one place).
"""
from lors_fx.compiler.backend import backend, default_forward_passes
from lors_fx.compiler.compiled_model import compile_model, decompile_model
from lors_fx.compiler.report import LorsReport, report
from lors_fx.compiler.state import GraphRecord, LorsCompileState, compile_state_of, is_compiled

__all__ = ["backend", "default_forward_passes", "compile_model", "decompile_model", "LorsReport",
           "report", "GraphRecord", "LorsCompileState", "compile_state_of", "is_compiled"]
