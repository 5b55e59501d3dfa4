"""lors_fx: sparsity-preserving low-rank fine-tuning (LoRS) for pruned LLMs.

Public API: :class:`LorsConfig`, :func:`optimize`, :func:`merge`, :func:`save_adapters`,
:func:`load_adapters`, :func:`gradient_init`, :func:`report`, and the op
:func:`lors_fx.ops.sparse_lora_linear`.
"""
from . import ops
from .config import LorsConfig
from .sparsity import audit, snapshot_masks, sparsity_report

__version__ = "0.1.0"

__all__ = ["LorsConfig", "ops", "audit", "snapshot_masks", "sparsity_report", "__version__"]
