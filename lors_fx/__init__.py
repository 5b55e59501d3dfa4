"""lors_fx: sparsity-preserving low-rank fine-tuning (LoRS) for pruned LLMs.

Public API: :class:`LorsConfig`, :func:`optimize`, :func:`merge`, :func:`save_adapters`,
:func:`load_adapters`, :func:`gradient_init`, :func:`report`, the op
:func:`lors_fx.ops.sparse_lora_linear`, FSDP2 support in :mod:`lors_fx.distributed` and DeepSpeed
ZeRO in :mod:`lors_fx.deepspeed_engine` (imported on demand).
"""
__version__ = "0.1.0"

from . import distributed, ops
from .adapters import LorsConv1D, LorsLinear, attach_adapters, find_targets, merge
from .serialization import load_adapter_config, load_adapters, restore_adapters, save_adapters
from .config import LorsConfig
from .init import gradient_init
from .optimize import is_optimized, lors_modules, optimize
from .sparsity import audit, snapshot_masks, sparsity_report

__all__ = ["LorsConfig", "ops", "distributed", "audit", "snapshot_masks", "sparsity_report", "__version__",
           "optimize", "is_optimized", "lors_modules", "merge", "save_adapters", "load_adapters",
           "load_adapter_config", "restore_adapters", "gradient_init", "attach_adapters", "find_targets",
           "LorsLinear", "LorsConv1D", "backend", "report"]
from .backend import backend
from .report import report
