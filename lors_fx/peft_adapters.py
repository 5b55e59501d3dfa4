"""PEFT LoRA layers as LoRS adapters: convert in place, merge with the mask, convert back.

A PEFT model (``peft.get_peft_model``, ``PeftModel.from_pretrained``, or transformers'
``model.add_adapter``) wraps each adapted linear in a LoRA layer holding ``base_layer``,
``lora_A[name]``, ``lora_B[name]``, ``scaling[name]`` and ``lora_dropout[name]``, and computes
``base(x) + s * lora_B(lora_A(dropout(x)))``: a dense update that a merge writes into every pruned
position. :func:`convert_peft_layers` (what :func:`lors_fx.optimize` does with a PEFT model) turns
each LoRA layer on a sparse base into the masked LoRS form **in place, reusing PEFT's own
parameters**: the layer gets an instance ``forward`` (a :class:`PeftSite`) that calls the LoRS op
with ``lora_A[name].weight`` / ``lora_B[name].weight``. Nothing else changes: module names,
``state_dict`` keys, the optimizer's parameters and ``save_pretrained`` see PEFT's tensors, which
now train under the mask. The layer's ``get_delta_weight`` is masked too, so PEFT's own
``merge_and_unload`` on a converted model keeps the zero pattern (but only :func:`merge_peft`
also guarantees that no kept weight rounds to 0).

peft itself is never imported: layers are recognised by their attributes, so this works with
every PEFT version that keeps that layout (tested against PEFT 0.21).
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Tuple

import torch
from torch import Tensor, nn

from lors_fx._nn import is_conv1d, is_linear_like, matches_any, oriented_weight, replace_module
from lors_fx.adapters import (SITE_ATTRIBUTE, adapter_forward, enable_semi_structured,
                              lors_modules, refuse_twice)
from lors_fx.config import LorsConfig
from lors_fx.ops import build_merged_weight
from lors_fx.sparsity import sparsity_of
from lors_fx.state import LorsState, clear_state, set_state, state_of

__all__ = ["PeftSite", "is_peft_lora_layer", "peft_lora_layers", "has_peft_layers",
           "is_peft_held", "convert_peft_layers", "merge_peft", "plain_name", "PEFT_PREFIX"]

#: What a PeftModel puts before the base model's module names.
PEFT_PREFIX = "base_model.model."


def is_peft_lora_layer(module: nn.Module) -> bool:
    """A PEFT LoRA layer: ``base_layer`` plus ``lora_A``/``lora_B`` ModuleDicts and ``scaling``."""
    return (isinstance(getattr(module, "base_layer", None), nn.Module)
            and isinstance(getattr(module, "lora_A", None), nn.ModuleDict)
            and isinstance(getattr(module, "lora_B", None), nn.ModuleDict)
            and isinstance(getattr(module, "scaling", None), dict))


def peft_lora_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{fqn: layer}`` of every PEFT LoRA layer in ``model``."""
    return {name: m for name, m in model.named_modules() if is_peft_lora_layer(m)}


def has_peft_layers(model: nn.Module) -> bool:
    """True when ``model`` holds PEFT LoRA layers (converted or not)."""
    return any(is_peft_lora_layer(m) for m in model.modules())


def is_peft_held(model: nn.Module) -> bool:
    """True when ``model``'s LoRS adapters are converted PEFT layers."""
    return any(isinstance(a, PeftSite) for a in lors_modules(model).values())


def plain_name(fqn: str) -> str:
    """A module name as in the base model: ``base_model.model.`` (a PeftModel's) removed, so
    files written from a PEFT model and from the plain model use the same names."""
    return fqn[len(PEFT_PREFIX):] if fqn.startswith(PEFT_PREFIX) else fqn


class PeftSite:
    """The LoRS view of one converted PEFT LoRA layer; it is also the layer's ``forward``.

    It reads PEFT's parameters through the layer (``lora_A`` is ``layer.lora_A[adapter].weight``,
    ``scaling`` is ``layer.scaling[adapter]``, ...), so the attributes every lors_fx path uses on a
    :class:`lors_fx.LorsLinear` work here too; ``grad_mode``, ``recompute``, ``chunk_bytes`` and
    ``emit_reference`` are its own.
    """

    def __init__(self, layer: nn.Module, adapter: str, config: LorsConfig):
        self.layer, self.adapter = layer, adapter
        self.grad_mode, self.recompute = config.grad_mode, config.recompute
        self.chunk_bytes, self.emit_reference = config.chunk_bytes, False
        self.semi_structured = False

    lora_A = property(lambda self: self.layer.lora_A[self.adapter].weight)
    lora_B = property(lambda self: self.layer.lora_B[self.adapter].weight)
    lora_dropout = property(lambda self: self.layer.lora_dropout[self.adapter])
    scaling = property(lambda self: float(self.layer.scaling[self.adapter]))
    r = property(lambda self: int(self.layer.r[self.adapter]))
    weight = property(lambda self: self.layer.base_layer.weight)
    bias = property(lambda self: self.layer.base_layer.bias)
    training = property(lambda self: self.layer.training)
    d_out = property(lambda self: self.true_weight().shape[0])
    d_in = property(lambda self: self.true_weight().shape[1])

    def true_weight(self) -> Tensor:
        """The base weight as ``(d_out, d_in)`` (a transposed view for GPT-2's Conv1D)."""
        return oriented_weight(self.layer.base_layer)

    def register_forward_hook(self, hook):
        """Hook the PEFT layer (its output is the adapted linear's)."""
        return self.layer.register_forward_hook(hook)

    def __call__(self, x: Tensor, *args, **kwargs) -> Tensor:
        layer = self.layer
        if layer.disable_adapters or layer.merged:
            return layer.base_layer(x, *args, **kwargs)
        if kwargs.get("adapter_names") is not None or list(layer.active_adapters) != [self.adapter]:
            raise RuntimeError(
                f"lors_fx: the PEFT layer's active adapter changed to {layer.active_adapters} "
                f"(or adapter_names was passed) after optimize converted adapter "
                f"{self.adapter!r} to the masked form; call lors_fx.remove_adapters(model) "
                f"before switching adapters, then optimize again")
        return adapter_forward(self, x)

    def masked_delta(self, adapter: str) -> Tensor:
        """PEFT's ``get_delta_weight`` times the mask (PEFT's merge uses it)."""
        delta = type(self.layer).get_delta_weight(self.layer, adapter)
        if adapter != self.adapter:
            return delta
        return delta * (self.layer.base_layer.weight != 0).to(delta.dtype)

    def install(self) -> None:
        """Make the layer run (and PEFT merge) the masked form."""
        self.layer.__dict__.update({"forward": self, "get_delta_weight": self.masked_delta,
                                    SITE_ATTRIBUTE: self})

    def uninstall(self) -> None:
        """Give the layer PEFT's own forward and merge back."""
        for key in ("forward", "get_delta_weight", SITE_ATTRIBUTE):
            self.layer.__dict__.pop(key, None)

    def __repr__(self) -> str:
        return (f"PeftSite(adapter={self.adapter!r}, r={self.r}, scaling={self.scaling:g}, "
                f"grad_mode={self.grad_mode})")


def _active_adapter(fqn: str, layer: nn.Module) -> str:
    """The one active adapter of a PEFT layer that LoRS can take over; raises otherwise."""
    active = list(getattr(layer, "active_adapters", None) or [])
    if len(active) != 1:
        raise ValueError(f"optimize: PEFT layer {fqn} has {len(active)} active adapters "
                         f"{active}; LoRS converts exactly one (peft_model.set_adapter(name))")
    name = active[0]
    if name not in layer.lora_A:
        raise ValueError(f"optimize: PEFT layer {fqn}: active adapter {name!r} has no lora_A")
    if getattr(layer, "use_dora", {}).get(name):
        raise ValueError(f"optimize: PEFT layer {fqn} uses DoRA (adapter {name!r}): its "
                         f"magnitude vector rescales whole rows, which the masked form does "
                         f"not model; use plain LoRA (use_dora=False)")
    if getattr(layer, "lora_bias", {}).get(name):
        raise ValueError(f"optimize: PEFT layer {fqn} has lora_bias=True (adapter {name!r}); "
                         f"LoRS adapters carry no bias")
    if getattr(layer, "merged", False):
        raise ValueError(f"optimize: PEFT layer {fqn} is merged (peft_model.merge_adapter()); "
                         f"unmerge it first (peft_model.unmerge_adapter())")
    if layer.base_layer.weight.dtype not in (torch.float32, torch.float64, torch.bfloat16,
                                             torch.float16):
        raise TypeError(f"optimize: PEFT layer {fqn} has a {layer.base_layer.weight.dtype} base "
                        f"weight (quantized?); LoRS needs a float weight")
    return name


def _sorted_layers(model: nn.Module, config: LorsConfig):
    """``(convert, left)``: ``[(fqn, layer, adapter)]`` on sparse linear bases, and
    ``[(fqn, why)]`` of the PEFT layers left as PEFT LoRA."""
    convert, left = [], []
    for fqn, layer in peft_lora_layers(model).items():
        if matches_any(plain_name(fqn), config.exclude_modules):
            left.append((fqn, "excluded"))
        elif not is_linear_like(layer.base_layer):
            left.append((fqn, f"a {type(layer.base_layer).__name__} base"))
        else:
            adapter = _active_adapter(fqn, layer)
            if layer.base_layer.weight.device.type == "meta":
                raise ValueError("optimize: model is on the meta device; materialize it first")
            sparsity = sparsity_of(oriented_weight(layer.base_layer).detach())
            if sparsity < config.min_sparsity:
                left.append((fqn, f"dense base, sparsity {sparsity:.2f}"))
            else:
                convert.append((fqn, layer, adapter))
    return convert, left


def convert_peft_layers(model: nn.Module, config: LorsConfig) -> List[str]:
    """Turn every PEFT LoRA layer on a sparse base into the masked LoRS form, in place.

    PEFT's ``lora_A``/``lora_B`` parameters are reused (and made trainable); nothing else is
    frozen or unfrozen. PEFT chose the layers, so ``config.target_modules`` must be None; ``r``,
    ``lora_alpha``, ``lora_dropout`` and the adapter dtype are PEFT's, while ``grad_mode``,
    ``recompute``, ``chunk_bytes``, ``min_sparsity`` and ``exclude_modules`` apply. PEFT layers
    left as they are (dense bases, non-linear bases, excluded) are named in a warning. Refused
    before anything changes: DoRA, ``lora_bias``, several active adapters, merged layers, non-float
    bases, no PEFT layer on a sparse base. Returns the converted layers' names.
    """
    refuse_twice(model)
    if config.target_modules is not None:
        raise ValueError(f"optimize: target_modules={config.target_modules!r} with a PEFT model: "
                         f"PEFT's LoraConfig chose the adapted layers; leave target_modules=None")
    convert, left = _sorted_layers(model, config)
    if not convert:
        raise ValueError(f"optimize: no PEFT LoRA layer sits on a sparse base (sparsity >= "
                         f"{config.min_sparsity}); seen: "
                         f"{', '.join(f'{n} ({why})' for n, why in left[:6]) or 'none'}")
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for fqn, layer, adapter in convert:
        site = PeftSite(layer, adapter, config)
        site.install()
        for param in (site.lora_A, site.lora_B):
            param.requires_grad_(True)
    set_state(model, LorsState(config=config, requires_grad=flags))
    enable_semi_structured(lors_modules(model), config)
    if left:
        warnings.warn(f"lors_fx.optimize: {len(left)} PEFT LoRA layer(s) stay plain PEFT LoRA "
                      f"(dense update): {', '.join(f'{n} ({why})' for n, why in left[:8])}"
                      f"{' ...' if len(left) > 8 else ''}", UserWarning, stacklevel=3)
    return [fqn for fqn, _, _ in convert]


def _unwrap(model: nn.Module, fqn: str, module: nn.Module) -> None:
    """Replace a PEFT wrapper by the module it stands for (PEFT's ``merge_and_unload`` rule)."""
    if is_peft_lora_layer(module):
        replace_module(model, fqn, module.base_layer)
    else:  # ModulesToSaveWrapper: the trained copy of the active adapter
        active = getattr(module, "active_adapter", None)
        active = active[0] if isinstance(active, (list, tuple)) else active
        copies = module.modules_to_save
        replace_module(model, fqn, copies[active] if active in copies else module.original_module)


def _peft_wrappers(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """PEFT modules to unwrap, innermost last; raises on a kind :func:`merge_peft` cannot."""
    found = []
    for fqn, module in model.named_modules():
        if is_peft_lora_layer(module) or (hasattr(module, "modules_to_save")
                                          and hasattr(module, "original_module")):
            found.append((fqn, module))
        elif type(module).__module__.startswith("peft.tuners") and hasattr(module, "base_layer"):
            raise ValueError(f"merge: {fqn} is a PEFT {type(module).__name__}, which lors_fx does "
                             f"not merge; nothing was changed")
    return found


def _merge_sites(model: nn.Module, wrappers) -> Dict[str, "PeftSite"]:
    """``{fqn: site}`` to fold with the mask: each converted layer, and each unconverted PEFT
    layer on a sparse linear base (a temporary view; e.g. trained through the lors backend)."""
    sites = {fqn: a for fqn, a in lors_modules(model).items() if isinstance(a, PeftSite)}
    state = state_of(model)
    config = state.config if state is not None else LorsConfig()
    for fqn, layer in wrappers:
        if fqn in sites or not is_peft_lora_layer(layer) or layer.merged \
                or layer.disable_adapters or not is_linear_like(layer.base_layer):
            continue
        if sparsity_of(oriented_weight(layer.base_layer).detach()) >= config.min_sparsity:
            sites[fqn] = PeftSite(layer, _active_adapter(fqn, layer), config)
    bad = [fqn for fqn, site in sites.items()
           if not (torch.isfinite(site.lora_A).all() and torch.isfinite(site.lora_B).all())]
    if bad:
        raise FloatingPointError(f"merge: non-finite adapter values (NaN/inf) in {bad[:8]}; "
                                 f"training diverged. Nothing was changed")
    return sites


@torch.no_grad()
def merge_peft(model: nn.Module) -> nn.Module:
    """Merge a PEFT model the sparsity-preserving way and return the plain model.

    Every PEFT LoRA layer on a sparse linear base (converted by :func:`convert_peft_layers` or
    not) is folded as ``W' = W + s*(B@A)*M`` (:func:`lors_fx.ops.build_merged_weight`: the zero
    pattern bit for bit, no kept weight turned to 0); layers on dense or non-linear bases get
    PEFT's own merge; then every PEFT layer (and ``modules_to_save`` copy) is unwrapped and the
    plain model returned (``model.get_base_model()`` for a PeftModel), as PEFT's
    ``merge_and_unload`` does. Everything is checked before the model changes.
    """
    wrappers = _peft_wrappers(model)
    sites = _merge_sites(model, wrappers)
    state = state_of(model)
    flags = state.requires_grad if state is not None else {}
    for name, param in model.named_parameters():  # before unwrapping renames them
        if name in flags:
            param.requires_grad_(flags[name])
    for fqn, site in sites.items():
        merged = build_merged_weight(site.true_weight(), site.lora_A, site.lora_B, site.scaling)
        site.weight.copy_(merged.t() if is_conv1d(site.layer.base_layer) else merged)
        site.uninstall()
    for fqn, layer in wrappers:
        if fqn not in sites and is_peft_lora_layer(layer) and not layer.merged \
                and not layer.disable_adapters:
            layer.merge()  # a dense or non-linear base: PEFT's own (dense) merge is right there
    for fqn, module in reversed(wrappers):  # innermost first, so outer names stay valid
        _unwrap(model, fqn, module)
    clear_state(model)
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    clear_state(base)
    return base
