"""Graph passes of lors_fx, installed as ``lors_fx.passes`` (see pyproject's package-dir).

Each pass is one module with a function ``(gm, ctx) -> PassResult`` and a Before/After docstring;
:func:`run_passes` runs them in order.
"""
from .manager import GraphPass, PassContext, PassResult, SITE_META_KEY, SparseSite, run_passes

__all__ = ["GraphPass", "PassContext", "PassResult", "SITE_META_KEY", "SparseSite", "run_passes"]
from .annotate_sparse_linears import annotate_sparse_linears
from .convert_peft_lora import convert_peft_lora
from .rewrite_masked_adapters import rewrite_masked_adapters

__all__ += ["annotate_sparse_linears", "convert_peft_lora", "rewrite_masked_adapters"]
