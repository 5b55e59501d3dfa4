"""Fine-tuning methods as one registry: LoRS and the baselines it is compared with (SQFT, SPP,
LoRA, full sparse fine-tuning), used alike by training, the benchmark and the demo.

:mod:`~lors_fx.methods.registry` (name -> how to attach the method), :mod:`~lors_fx.methods.baselines`
(the wrapper modules of the baselines) and :mod:`~lors_fx.methods.measure` (saved-for-backward
and peak bytes of a step, measured one way for every caller).
"""
from lors_fx.methods.baselines import (FullSparseFT, LoraLinear, LorsOpLinear, SppLinear,
                                       SqftLinear, install_mask_reapply, lors_closed_form,
                                       randomize_adapters_, set_reference_mode,
                                       trainable_parameters, wrapped_modules)
from lors_fx.methods.measure import SavedBytes, peak_bytes, saved_bytes
from lors_fx.methods.registry import (BENCHMARK_METHODS, METHODS, REGISTRY, SPARSITY_PRESERVING,
                                      TRAINING_METHODS, Method, apply_method, attach_method,
                                      get_method)

__all__ = ["Method", "REGISTRY", "METHODS", "SPARSITY_PRESERVING", "TRAINING_METHODS",
           "BENCHMARK_METHODS", "get_method", "attach_method", "apply_method", "LoraLinear",
           "SqftLinear", "SppLinear", "FullSparseFT", "LorsOpLinear", "trainable_parameters",
           "wrapped_modules", "install_mask_reapply", "set_reference_mode",
           "randomize_adapters_", "lors_closed_form", "SavedBytes", "saved_bytes", "peak_bytes"]
