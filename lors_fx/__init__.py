"""lors_fx: sparsity-preserving low-rank fine-tuning (LoRS) for pruned LLMs.

Public API: :class:`LorsConfig`, :func:`optimize`, :func:`merge`, :func:`remove_adapters`,
:func:`save_adapters`, :func:`load_adapters`, :func:`restore_adapters`, :func:`gradient_init`,
:func:`report`, :func:`backend`, :func:`state_of`, the op :func:`lors_fx.ops.sparse_lora_linear`,
FSDP2 support in :mod:`lors_fx.distributed` and DeepSpeed ZeRO in
:mod:`lors_fx.distributed.deepspeed` (imported on demand). Quantized bases: :class:`QuantSpec`,
:func:`quantize_model`, :class:`QuantizedLinear`, :func:`save_quantized`, :func:`load_quantized`,
:func:`from_compressed_tensors`; calibrated GPTQ / SparseGPT's joint mode in
:mod:`lors_fx.workflows.quantize`. The layers of the package are described
in the README ("Layout").
"""
from lors_fx._version import __version__
from lors_fx import distributed, ops
from lors_fx.adapters import LorsConv1D, LorsLinear, attach_adapters, find_targets
from lors_fx.api import (is_optimized, lors_modules, merge, optimize, remove_adapters,
                         restore_adapters)
from lors_fx.compiler import backend, report
from lors_fx.config import LorsConfig
from lors_fx.init import gradient_init
from lors_fx.quant import QuantSpec
from lors_fx.quant_checkpoint import from_compressed_tensors, load_quantized, save_quantized
from lors_fx.quantized import QuantizedLinear, quantize_model
from lors_fx.serialization import load_adapter_config, load_adapters, save_adapters
from lors_fx.sparsity import audit, snapshot_masks, sparsity_report
from lors_fx.state import LorsState, state_of

__all__ = ["LorsConfig", "ops", "distributed", "audit", "snapshot_masks", "sparsity_report",
           "__version__", "optimize", "is_optimized", "lors_modules", "merge", "remove_adapters",
           "save_adapters", "load_adapters", "load_adapter_config", "restore_adapters",
           "gradient_init", "attach_adapters", "find_targets", "LorsLinear", "LorsConv1D",
           "backend", "report", "LorsState", "state_of", "QuantSpec", "QuantizedLinear",
           "quantize_model", "save_quantized", "load_quantized", "from_compressed_tensors"]
