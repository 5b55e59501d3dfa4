"""Graph passes of lors_fx, installed as ``lors_fx.passes`` (see pyproject's package-dir).

Each pass is one module with a function ``(gm, ctx) -> PassResult`` and a Before/After docstring,
registered in :data:`PASSES` with its stage (:func:`passes_for` lists a stage's passes in order);
:func:`run_passes` runs them. Passes share :mod:`._match` (primitives) and :mod:`._patterns`
(the adapter patterns and the op emitter) and never import each other.
"""
from lors_fx.passes.manager import (PASSES, SITE_META_KEY, STAGES, GraphPass, PassContext,
                                    PassResult, RegisteredPass, SparseSite, passes_for,
                                    register_pass, run_passes)
from lors_fx.passes.annotate_sparse_linears import annotate_sparse_linears
from lors_fx.passes.convert_peft_lora import convert_peft_lora
from lors_fx.passes.rewrite_masked_adapters import rewrite_masked_adapters
from lors_fx.passes.rewrite_quantized_adapters import rewrite_quantized_adapters
from lors_fx.passes.insert_checkpoints import insert_checkpoints
from lors_fx.passes.saved_tensor_report import saved_tensor_report
from lors_fx.passes.lower_lors_ops import lower_lors_ops

__all__ = ["GraphPass", "PassContext", "PassResult", "SITE_META_KEY", "SparseSite", "run_passes",
           "RegisteredPass", "PASSES", "STAGES", "register_pass", "passes_for",
           "annotate_sparse_linears", "convert_peft_lora", "rewrite_masked_adapters",
           "rewrite_quantized_adapters",
           "insert_checkpoints", "saved_tensor_report", "lower_lors_ops"]
