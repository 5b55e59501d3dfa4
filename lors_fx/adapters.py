"""Sparse LoRA adapters on a model's pruned linears: attach, merge, detach (files: serialization).

:func:`attach_adapters` swaps each target ``nn.Linear`` (or GPT-2's ``Conv1D``) for a
:class:`LorsLinear` (:class:`LorsConv1D`) under the same attribute name. The new module reuses the
original ``weight``/``bias`` Parameter objects, so module names and the keys ``<fqn>.weight`` /
``<fqn>.bias`` do not change, and adds ``<fqn>.lora_A`` (r x d_in) and ``<fqn>.lora_B``
(d_out x r), PEFT's shapes. Every other parameter of the model is frozen (PEFT's ``bias="none"``).

The forward computes ``y = x @ (W + s*(B@A)*M).T + bias`` with ``M = W != 0`` through the custom
op :func:`lors_fx.ops.sparse_lora_linear`, or, with ``emit_reference=True`` (set by the compiler),
through the naive plain-torch form that the graph passes recognise and rewrite into that op.
"""
from __future__ import annotations

import math
import warnings
from typing import Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lors_fx._collectives import is_sharded
from lors_fx._nn import is_conv1d, replace_module
from lors_fx.config import LorsConfig
from lors_fx.ops import (build_merged_weight, reference_sparse_lora_linear, sparse_lora_delta,
                         sparse_lora_linear)
from lors_fx.semi_structured import semi_structured_lora_linear, semi_structured_status
from lors_fx.sparsity import sparsity_of
from lors_fx.targets import find_targets
from lors_fx.state import LorsState, clear_state, set_state, state_of

__all__ = [
    "LorsLinear", "LorsConv1D", "reference_sparse_lora_dropout_form", "find_targets",
    "attach_adapters", "lors_modules", "adapter_forward", "SITE_ATTRIBUTE", "refuse_twice", "enable_semi_structured", "is_optimized", "merge_adapters", "detach_adapters",
    "adapter_dtype_for", "non_finite_adapters", "refuse_non_finite_adapters",
]

_HALF_DTYPES = (torch.float16, torch.bfloat16)


def adapter_dtype_for(weight_dtype: torch.dtype, adapter_dtype: str = "float32") -> torch.dtype:
    """The adapters' dtype on a base of ``weight_dtype`` (:attr:`LorsConfig.adapter_dtype`):
    ``"float32"`` = float32 on a float16/bfloat16 base, else the weight's; ``"weight"`` = the
    weight's."""
    if adapter_dtype == "float32" and weight_dtype in _HALF_DTYPES:
        return torch.float32
    return weight_dtype


def reference_sparse_lora_dropout_form(x: Tensor, weight: Tensor, lora_A: Tensor, lora_B: Tensor,
                                       bias: Optional[Tensor], scaling: float,
                                       dropout: nn.Module) -> Tensor:
    """The naive plain-torch form with adapter dropout (what the compiler sees and rewrites).

    ``y = F.linear(x, W, bias) + F.linear(dropout(x), (s * (B @ A)) * (W != 0))``: the base sees
    ``x``, the masked adapter sees ``dropout(x)``. Its autograd gradient is the ``"exact"`` one.
    """
    delta = (scaling * (lora_B @ lora_A)) * (weight != 0)
    return F.linear(x, weight, bias) + F.linear(dropout(x), delta)


def adapter_forward(adapter, x: Tensor) -> Tensor:
    """``x @ (W + s*(B@A)*M).T + bias`` for one adapted layer: a :class:`LorsLinear` /
    :class:`LorsConv1D`, or the view of a converted PEFT layer (:mod:`lors_fx.peft_adapters`);
    ``adapter`` gives ``true_weight()``, ``bias``, ``lora_A``, ``lora_B``, ``scaling``,
    ``lora_dropout``, ``training`` and the op settings. The adapter input is dropped out in
    training."""
    weight, bias, s = adapter.true_weight(), adapter.bias, adapter.scaling
    dropout = adapter.training and isinstance(adapter.lora_dropout, nn.Dropout)
    if getattr(adapter, "semi_structured", False) and not dropout \
            and not torch.compiler.is_compiling():  # getattr: modules pickled before the flag
        return semi_structured_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias, s)
    # The naive form exists only for the compiler's passes to rewrite: outside a dynamo trace
    # (eval, generate, a deep copy) it would save W', so the op runs instead.
    if adapter.emit_reference and torch.compiler.is_compiling():
        if dropout:
            return reference_sparse_lora_dropout_form(x, weight, adapter.lora_A, adapter.lora_B,
                                                      bias, s, adapter.lora_dropout)
        return reference_sparse_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias, s)
    options = dict(scaling=s, grad_mode=adapter.grad_mode, recompute=adapter.recompute,
                   chunk_bytes=adapter.chunk_bytes)
    if dropout:
        return F.linear(x, weight, bias) + sparse_lora_delta(
            adapter.lora_dropout(x), weight, adapter.lora_A, adapter.lora_B, **options)
    return sparse_lora_linear(x, weight, adapter.lora_A, adapter.lora_B, bias=bias, **options)


class _LorsMixin:
    """Adapter state and forward shared by :class:`LorsLinear` and :class:`LorsConv1D`."""

    def _init_adapter(self, base: nn.Module, r: int, scaling: float, grad_mode: str,
                      recompute: bool, chunk_bytes: Optional[int], lora_dropout: float,
                      adapter_dtype: str = "float32") -> None:
        # Reuse the base's Parameter objects: module names and state_dict keys stay as they were.
        self.weight, self.bias = base.weight, base.bias
        weight = base.weight
        d_out, d_in = self.d_out, self.d_in
        self.r = r
        self.scaling = float(scaling)
        self.grad_mode = grad_mode
        self.recompute = recompute
        self.chunk_bytes = chunk_bytes
        self.emit_reference = self.semi_structured = False
        self.lora_dropout = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        factory = dict(dtype=adapter_dtype_for(weight.dtype, adapter_dtype), device=weight.device)
        self.lora_A = nn.Parameter(torch.empty(r, d_in, **factory))
        self.lora_B = nn.Parameter(torch.zeros(d_out, r, **factory))
        self.reset_adapter()
        self.train(base.training)

    def reset_adapter(self) -> None:
        """PEFT's default init: lora_A Kaiming-uniform (``a=sqrt(5)``), lora_B zeros."""
        with torch.no_grad():
            nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
            self.lora_B.zero_()

    def reset_parameters(self) -> None:
        """Reset the adapter only: re-drawing the pruned base weight would densify it."""
        self.reset_adapter()

    def forward(self, x: Tensor) -> Tensor:
        """``x @ (W + s*(B@A)*M).T + bias`` (adapter input dropped out in training)."""
        return self._adapted(x)

    def extra_repr(self) -> str:
        return self._adapter_repr()

    def true_weight(self) -> Tensor:
        """The weight as ``(d_out, d_in)`` (a transposed view for Conv1D)."""
        raise NotImplementedError

    def _adapted(self, x: Tensor) -> Tensor:
        return adapter_forward(self, x)

    def _adapter_repr(self) -> str:
        weight = self.true_weight()
        sparsity = "meta" if weight.device.type == "meta" else f"{sparsity_of(weight):.3f}"
        return (f"in_features={self.d_in}, out_features={self.d_out}, r={self.r}, "
                f"scaling={self.scaling:g}, grad_mode={self.grad_mode}, sparsity={sparsity}")


class LorsLinear(_LorsMixin, nn.Linear):
    """An ``nn.Linear`` with a sparsity-preserving adapter; reuses the original weight and bias.

    Attributes: ``r``, ``scaling``, ``grad_mode``, ``recompute``, ``chunk_bytes``,
    ``lora_dropout`` (``nn.Dropout`` or ``nn.Identity``), ``emit_reference`` (forward the naive
    plain-torch form for the compiler instead of calling the custom op).
    """

    def __init__(self, base: nn.Linear, r: int, scaling: float, *, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None,
                 lora_dropout: float = 0.0, adapter_dtype: str = "float32"):
        nn.Module.__init__(self)  # not nn.Linear.__init__: it would allocate a new weight
        self.in_features, self.out_features = base.in_features, base.out_features
        self._init_adapter(base, r, scaling, grad_mode, recompute, chunk_bytes, lora_dropout,
                           adapter_dtype)

    d_in = property(lambda self: self.in_features)
    d_out = property(lambda self: self.out_features)

    def true_weight(self) -> Tensor:
        return self.weight



class LorsConv1D(_LorsMixin, nn.Module):
    """GPT-2's ``Conv1D`` (weight stored d_in x d_out, ``y = x @ W + b``) with a sparse adapter.

    Keeps the original weight Parameter in its stored layout (state_dict shapes unchanged) and
    hands ``weight.t()`` to the op, so the mask runs along the true input dim.
    ``base_class`` remembers the original class, used by :func:`merge`.
    """

    def __init__(self, base: nn.Module, r: int, scaling: float, *, grad_mode: str = "lors",
                 recompute: bool = True, chunk_bytes: Optional[int] = None,
                 lora_dropout: float = 0.0, adapter_dtype: str = "float32"):
        super().__init__()
        self.base_class = type(base)
        self.nx, self.nf = base.weight.shape
        self._init_adapter(base, r, scaling, grad_mode, recompute, chunk_bytes, lora_dropout,
                           adapter_dtype)

    d_in = property(lambda self: self.nx)
    d_out = property(lambda self: self.nf)

    def true_weight(self) -> Tensor:
        return self.weight.t()



_LORS_TYPES = (LorsLinear, LorsConv1D)
#: ``module.__dict__`` key of a converted PEFT layer's LoRS view (:mod:`lors_fx.peft_adapters`).
SITE_ATTRIBUTE = "_lors_peft_site"


def lors_modules(model: nn.Module) -> Dict[str, nn.Module]:
    """``{fqn: adapter}`` of every adapted layer in ``model``: each :class:`LorsLinear` /
    :class:`LorsConv1D`, and the LoRS view of each converted PEFT LoRA layer (under the PEFT
    layer's name; it has the same attributes: ``lora_A``, ``lora_B``, ``scaling``, ``r``, ...)."""
    found = {}
    for name, module in model.named_modules():
        if isinstance(module, _LORS_TYPES):
            found[name] = module
        elif SITE_ATTRIBUTE in module.__dict__:
            found[name] = module.__dict__[SITE_ATTRIBUTE]
    return found


def is_optimized(model: nn.Module) -> bool:
    """True when ``model`` carries LoRS adapters."""
    return bool(lors_modules(model))


def attach_adapters(model: nn.Module, config: LorsConfig) -> List[str]:
    """Replace each target of ``config`` with a LoRS module; freeze everything but the adapters.

    Validates everything (:func:`find_targets`) before changing the model. Records ``config`` and
    the previous ``requires_grad`` flags in the model's :class:`lors_fx.state.LorsState` and returns
    the adapted module names.
    """
    refuse_twice(model)
    targets = find_targets(model, config)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    options = dict(grad_mode=config.grad_mode, recompute=config.recompute,
                   chunk_bytes=config.chunk_bytes, lora_dropout=config.lora_dropout,
                   adapter_dtype=config.adapter_dtype)
    for name, module in targets:
        cls = LorsConv1D if is_conv1d(module) else LorsLinear
        replace_module(model, name, cls(module, config.r, config.scaling, **options))
    freeze_all_but_adapters(model)
    set_state(model, LorsState(config=config, requires_grad=flags))
    enable_semi_structured(lors_modules(model), config)
    return [name for name, _ in targets]


def enable_semi_structured(adapters: Dict[str, nn.Module], config: LorsConfig) -> List[str]:
    """With ``config.semi_structured``, turn the 2:4 forward on for each adapter whose base the
    kernels take (:func:`lors_fx.semi_structured.semi_structured_status`); the others are named
    in one warning with the reason. Returns the names turned on."""
    if not config.semi_structured:
        return []
    on, refused = [], {}
    for name, adapter in adapters.items():
        ok, reason = semi_structured_status(adapter.true_weight().detach())
        adapter.semi_structured = ok
        if ok:
            on.append(name)
        else:
            refused.setdefault(reason, []).append(name)
    for reason, names in refused.items():
        warnings.warn(f"lors_fx: semi_structured: {len(names)} layer(s) run the dense op "
                      f"({', '.join(names[:4])}{' ...' if len(names) > 4 else ''}): {reason}",
                      UserWarning, stacklevel=3)
    return on


def refuse_twice(model: nn.Module) -> None:
    """Raise when ``model`` already carries LoRS adapters (optimize called twice)."""
    present = lors_modules(model)
    if present:
        raise RuntimeError(f"optimize called twice: the model already has LoRS adapters (e.g. "
                           f"{next(iter(present))}); merge(model) or start from a fresh model")


def freeze_all_but_adapters(model: nn.Module) -> None:
    """Only the adapters' ``lora_A``/``lora_B`` train (PEFT's ``bias="none"``)."""
    trainable = {id(getattr(m, part)) for m in lors_modules(model).values()
                 for part in ("lora_A", "lora_B")}
    for param in model.parameters():
        param.requires_grad_(id(param) in trainable)


def _plain_module(module: nn.Module) -> nn.Module:
    """A plain Linear/Conv1D holding ``module``'s weight and bias Parameters."""
    with torch.device("meta"):  # allocate nothing: the Parameters are swapped in right after
        if isinstance(module, LorsLinear):
            plain = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
        else:
            plain = module.base_class(module.nf, module.nx)
    plain.weight = module.weight
    plain.bias = module.bias
    plain.train(module.training)
    return plain


def _restore(model: nn.Module) -> None:
    """Back to the plain model's ``requires_grad`` flags; the state is dropped."""
    state = state_of(model)
    flags = state.requires_grad if state is not None else {}
    for name, param in model.named_parameters():
        if name in flags:
            param.requires_grad_(flags[name])
    clear_state(model)


def _refuse_sharded(model: nn.Module, what: str) -> None:
    if is_sharded(model):
        raise ValueError(f"{what}: the model is sharded with FSDP2 (its weights are shards); "
                         f"save_adapters(model, dir) on every rank, then merge in one process: "
                         f"lors-fx merge BASE dir --out MERGED")
    if any(hasattr(p, "ds_id") and p.numel() == 0 for p in model.parameters()):
        raise ValueError(f"{what}: the model is partitioned by DeepSpeed ZeRO-3; "
                         f"save_adapters_deepspeed(engine, dir), then lors-fx merge in one process")


def detach_adapters(model: nn.Module) -> nn.Module:
    """Undo :func:`attach_adapters` without merging (drops the adapters) on an uncompiled model;
    :func:`lors_fx.api.remove_adapters` is the public form."""
    _refuse_sharded(model, "remove_adapters")
    for name, module in lors_modules(model).items():
        if isinstance(module, _LORS_TYPES):
            replace_module(model, name, _plain_module(module))
        else:  # a converted PEFT layer: PEFT's own forward back
            module.uninstall()
    _restore(model)
    return model


@torch.no_grad()
def non_finite_adapters(model: nn.Module) -> Dict[str, int]:
    """``{module name: count}`` of NaN/inf entries in each module's ``lora_A``/``lora_B``."""
    counts = {name: int((~torch.isfinite(m.lora_A)).sum() + (~torch.isfinite(m.lora_B)).sum())
              for name, m in lors_modules(model).items()}
    return {name: count for name, count in counts.items() if count}


def refuse_non_finite_adapters(model: nn.Module, what: str = "merge") -> None:
    """Raise ``FloatingPointError`` naming the modules whose adapters hold NaN/inf: merged, they
    would write non-finite weights (training diverged; merge an earlier checkpoint)."""
    bad = non_finite_adapters(model)
    if bad:
        listed = ", ".join(f"{name} ({count})" for name, count in list(bad.items())[:8])
        more = f", ... ({len(bad) - 8} more)" if len(bad) > 8 else ""
        raise FloatingPointError(
            f"{what}: non-finite adapter values (NaN/inf entries) in {listed}{more}; training "
            f"diverged. Nothing was changed: merge adapters from an earlier checkpoint")


@torch.no_grad()
def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold ``W' = W + s*(B@A)*M`` into each adapted weight of an uncompiled model and drop the
    adapters (:func:`lors_fx.merge` is the public form).

    Uses :func:`lors_fx.ops.build_merged_weight` (float32, cast back; the zero pattern is kept bit
    for bit and no kept weight becomes 0). The weight Parameters are updated in place and handed
    to plain ``nn.Linear`` / ``Conv1D`` modules; ``requires_grad`` flags are restored to what they
    were before :func:`attach_adapters`. Returns ``model``.
    """
    modules = lors_modules(model)
    if not modules:
        raise ValueError("merge: model has no LoRS adapters")
    if not all(isinstance(m, _LORS_TYPES) for m in modules.values()):
        raise ValueError("merge_adapters: the adapters are converted PEFT layers; use "
                         "lors_fx.merge(model), which also unwraps PEFT")
    _refuse_sharded(model, "merge")
    refuse_non_finite_adapters(model)
    for name, module in modules.items():
        merged = build_merged_weight(module.true_weight(), module.lora_A, module.lora_B,
                                     module.scaling)
        module.weight.copy_(merged.t() if isinstance(module, LorsConv1D) else merged)
        replace_module(model, name, _plain_module(module))
    _restore(model)
    return model
