"""Graph passes of lors_fx, installed as ``lors_fx.passes`` (see pyproject's package-dir).

Each pass is one module with a function ``(gm, ctx) -> PassResult`` and a Before/After docstring;
:func:`run_passes` runs them in order.
"""
from .manager import GraphPass, PassContext, PassResult, SITE_META_KEY, SparseSite, run_passes

__all__ = ["GraphPass", "PassContext", "PassResult", "SITE_META_KEY", "SparseSite", "run_passes"]
