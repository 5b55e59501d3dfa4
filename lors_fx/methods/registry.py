"""Fine-tuning methods as one registry: a name -> how to attach that method to a model.

As torchao's ``quantize_(model, config)`` finds the handler of a config, :func:`attach_method`
finds the :class:`Method` of a name and runs its handler, which adapts the sparse linears of the
model in place. There are two handlers:

- :func:`_swap_in_wrappers`: every target ``nn.Linear`` becomes a wrapper module of
  :mod:`lors_fx.methods.baselines` (``lora``, ``sqft``, the ``spp`` variants, ``full_sparse_ft``,
  and ``lors``/``lors_exact``/``lors_keep``: the LoRS op alone in a wrapper, so the benchmark
  compares the formulas on equal terms).
- :func:`_attach_lors_fx`: LoRS adapters through :func:`lors_fx.optimize` (``lors_fx``, and the
  benchmark's ``lors_fx_eager``/``lors_fx_compiled``): the library's own path, with gradient init,
  compile, the model's state, and the model left as it was when something fails.

Training, the demo and the benchmark all go through :func:`attach_method`; the names each offers
are views of :data:`REGISTRY`: :data:`METHODS` (the wrapper methods, :func:`apply_method`),
:data:`TRAINING_METHODS` (``lors-fx train`` / ``demo``, where ``lors`` is ``lors_fx``) and
:data:`BENCHMARK_METHODS`.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Sequence

from torch import nn

from lors_fx._nn import matches_any, replace_module
from lors_fx.adapters import lors_modules
from lors_fx.api import optimize, remove_adapters
from lors_fx.compiler import compile_model
from lors_fx.config import LorsConfig
from lors_fx.init import gradient_init
from lors_fx.methods.baselines import FullSparseFT, LoraLinear, LorsOpLinear, SppLinear, SqftLinear
from lors_fx.state import state_of

__all__ = ["Method", "REGISTRY", "METHODS", "SPARSITY_PRESERVING", "TRAINING_METHODS",
           "BENCHMARK_METHODS", "get_method", "attach_method", "apply_method"]


@dataclass(frozen=True)
class Method:
    """One fine-tuning method: its handler and what the callers need to know about it.

    ``attach(model, method, r=, alpha=, **options)`` adapts ``model`` in place and returns the
    qualified names of the adapted modules; ``options`` are the method's defaults (a caller's
    options override them).
    """

    name: str
    attach: Callable[..., List[str]]
    description: str
    #: the baselines' module class swapped in for each target linear (None: not a wrapper)
    wrapper: Optional[type] = None
    options: Mapping[str, Any] = field(default_factory=dict)
    #: training and merge keep the zero pattern of W
    sparsity_preserving: bool = True
    #: accepts ``init="gradient"`` (LoRS's init)
    gradient_init: bool = False
    #: a row the benchmark accepts
    benchmark: bool = True


def _wrapper_targets(model: nn.Module, target_modules: Optional[Sequence[str]],
                     min_sparsity: float, exclude_modules: Sequence[str]) -> List[str]:
    """Plain ``nn.Linear`` names: those matching ``target_modules`` (PEFT's dotted suffixes),
    else those with at least ``min_sparsity`` zeros; never one matching ``exclude_modules``."""
    targets = []
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or matches_any(name, exclude_modules):
            continue
        if target_modules is not None:
            if matches_any(name, target_modules):
                targets.append(name)
        elif (module.weight == 0).float().mean().item() >= min_sparsity:
            targets.append(name)
    return targets


def _swap_in_wrappers(model: nn.Module, method: Method, *, r: int, alpha: float,
                      target_modules: Optional[Sequence[str]] = None, min_sparsity: float = 0.1,
                      exclude_modules: Sequence[str] = ("lm_head",), **options) -> List[str]:
    """Freeze ``model`` and swap each target linear for ``method.wrapper`` (sharing its weight)."""
    targets = _wrapper_targets(model, target_modules, min_sparsity, exclude_modules)
    if not targets:
        raise ValueError(f"apply_method: no target nn.Linear found (target_modules="
                         f"{target_modules}, min_sparsity={min_sparsity})")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    # full fine-tuning trains W itself: no rank, no scale
    sizes = {} if method.wrapper is FullSparseFT else {"r": r, "alpha": alpha}
    for name in targets:
        replace_module(model, name, method.wrapper(model.get_submodule(name), **sizes, **options))
    return targets


def _attach_lors_fx(model: nn.Module, method: Method, *, r: int, alpha: float,
                    compile: bool = False, init_data: Optional[Iterable] = None,
                    max_gradient_bytes: Optional[int] = None, progress: bool = True,
                    **config_fields) -> List[str]:
    """LoRS through :func:`lors_fx.optimize` with ``LorsConfig(r, alpha, **config_fields)``.

    With ``init="gradient"`` and a ``max_gradient_bytes`` budget (optimize keeps its default
    one), the adapters are attached first, then initialised with that budget, then compiled;
    any failure removes them again, as optimize does.
    """
    config = LorsConfig(r=r, lora_alpha=alpha, **config_fields)
    if config.init != "gradient":
        optimize(model, config, compile=compile)
    elif init_data is None:
        raise ValueError("init: 'gradient' needs init_data (batches with labels); pass "
                         "init='zeros' to start from PEFT's init")
    elif max_gradient_bytes is None:
        optimize(model, config, compile=compile, init_data=init_data)
    else:
        optimize(model, dataclasses.replace(config, init="zeros"), compile=False)
        try:
            gradient_init(model, init_data, config=config,
                          max_gradient_bytes=max_gradient_bytes, progress=progress)
            state_of(model).config = config  # the state records how the adapters were set
            if compile:
                compile_model(model, config)
        except BaseException:
            remove_adapters(model)
            raise
    return list(lors_modules(model))


#: name -> :class:`Method`, in the order the benchmark runs them.
REGISTRY: Dict[str, Method] = {method.name: method for method in (
    Method("lora", _swap_in_wrappers, "PEFT LoRA: y = x W^T + b + s (x A^T) B^T; merging fills "
           "the pruned zeros", LoraLinear, sparsity_preserving=False),
    Method("sqft", _swap_in_wrappers, "SQFT SparsePEFT: W' = W + s (B A) * M every forward, "
           "plain autograd", SqftLinear),
    Method("spp", _swap_in_wrappers, "SPP, the authors' blockwise forward", SppLinear,
           {"form": "blocks"}),
    Method("spp_dense", _swap_in_wrappers, "SPP with dW materialised", SppLinear,
           {"form": "dense"}),
    Method("spp_ckpt", _swap_in_wrappers, "SPP dense under activation checkpointing", SppLinear,
           {"form": "dense", "checkpoint": True}),
    Method("full_sparse_ft", _swap_in_wrappers, "W trainable, W <- W * M after each step",
           FullSparseFT),
    Method("lors", _swap_in_wrappers, "the LoRS op in a wrapper module", LorsOpLinear,
           {"grad_mode": "lors", "recompute": True}),
    Method("lors_exact", _swap_in_wrappers, "the LoRS op, exact (masked) gradient", LorsOpLinear,
           {"grad_mode": "exact", "recompute": True}),
    Method("lors_keep", _swap_in_wrappers, "the LoRS op keeping W' for backward", LorsOpLinear,
           {"grad_mode": "lors", "recompute": False}),
    Method("lors_fx", _attach_lors_fx, "LoRS through lors_fx.optimize", gradient_init=True,
           benchmark=False),
    Method("lors_fx_eager", _attach_lors_fx, "lors_fx.optimize, eager op",
           options={"compile": False}, gradient_init=True),
    Method("lors_fx_compiled", _attach_lors_fx, "lors_fx.optimize with the lors backend",
           options={"compile": True}, gradient_init=True),
)}

#: the wrapper methods (what :func:`apply_method` accepts): name -> (module class, options)
METHODS = {name: (method.wrapper, dict(method.options)) for name, method in REGISTRY.items()
           if method.wrapper is not None}
#: wrapper methods whose training and merge keep the zero pattern of W
SPARSITY_PRESERVING = tuple(name for name in METHODS if REGISTRY[name].sparsity_preserving)
#: ``lors-fx train`` / ``demo`` names -> registry names, in the order the CLI offers them
TRAINING_METHODS = {"lors": "lors_fx", "sqft": "sqft", "spp": "spp", "lora": "lora"}
#: the rows ``lors-fx bench`` accepts
BENCHMARK_METHODS = tuple(name for name, method in REGISTRY.items() if method.benchmark)


def get_method(name: str) -> Method:
    """The registered :class:`Method` called ``name``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown method {name!r}; known: {sorted(REGISTRY)}")
    return REGISTRY[name]


def attach_method(model: nn.Module, name: str, *, r: int = 16, alpha: Optional[float] = None,
                  **options) -> List[str]:
    """Attach the registered method ``name`` to ``model`` in place; returns the adapted names.

    ``r`` is the adapter rank (SPP's trainable size is set by ``rows``; ``r`` only sets its scale
    ``alpha / r``), ``alpha`` the scale numerator (default ``2 * r``, so ``s = 2``); ``options``
    go to the handler (wrapper options and target selection, or ``LorsConfig`` fields,
    ``compile``, ``init_data``...) over the method's own.
    """
    method = get_method(name)
    alpha = 2.0 * r if alpha is None else float(alpha)
    return method.attach(model, method, r=r, alpha=alpha, **{**method.options, **options})


def apply_method(model: nn.Module, method: str, r: int = 16, alpha: Optional[float] = None, *,
                 target_modules: Optional[Sequence[str]] = None, min_sparsity: float = 0.1,
                 exclude_modules: Sequence[str] = ("lm_head",), **options) -> List[str]:
    """Freeze ``model`` and swap its target sparse ``nn.Linear`` modules for ``method``'s wrapper.

    Args:
        model: modified in place.
        method: a key of :data:`METHODS`.
        r, alpha: as in :func:`attach_method`.
        target_modules: name suffixes to adapt (default: every plain ``nn.Linear`` whose weight
            has at least ``min_sparsity`` zeros), minus ``exclude_modules``.
        options: extra keyword options for the wrapper class (override :data:`METHODS`'s).

    Returns:
        The qualified names of the replaced modules. Raises ``ValueError`` if there are none.
    """
    if method not in METHODS:
        raise ValueError(f"apply_method: unknown method {method!r}; known: {sorted(METHODS)}")
    return attach_method(model, method, r=r, alpha=alpha, target_modules=target_modules,
                         min_sparsity=min_sparsity, exclude_modules=exclude_modules, **options)
