"""Quantized checkpoints in and out, in compressed-tensors' ``pack-quantized`` format (what
llm-compressor writes and transformers / vLLM read).

Out: :func:`save_quantized` writes a model whose linears are :class:`~lors_fx.quantized.
QuantizedLinear` as a Hugging Face directory that plain ``AutoModelForCausalLM.from_pretrained``
loads (with ``compressed-tensors`` installed). Per layer ``weight_packed`` is our codes packed by
compressed-tensors' own ``pack_to_int32`` (it stores ``code + 2**(bits-1)``: our 4-bit codes
``[-7, 7]`` become ``[1, 15]``, 8-bit ``[-127, 127]`` become ``[1, 255]``, so the round trip is
exact), ``weight_scale`` is our scales as they are and ``weight_shape`` the ``(d_out, d_in)``; the
``quantization_config`` in ``config.json`` is built from compressed-tensors' config objects
(symmetric int, strategy ``"group"`` or ``"channel"``) and written by its ``ModelCompressor``.
Pruned weights are code 0 (compressed-tensors 0.20 has no sparse compressor), so the zero pattern
survives as it is.

In: transformers 5.x builds each quantized linear as an ``nn.Linear`` carrying compressed-tensors'
``quantization_scheme`` and ``weight_packed`` (int32) / ``weight_scale`` / ``weight_shape``, and
decompresses the whole model into dense float weights on the first forward (a pre-hook). On CPU
that dense model is what runs (no packed kernels there; vLLM's int4/int8 kernels need a GPU).
:func:`from_compressed_tensors` turns each such layer, packed or already decompressed, into a
:class:`QuantizedLinear` with the same codes and scales (checked to be lossless) and hands the model
back to plain torch (the decompress hook and transformers' quantizer are dropped: lors_fx's layers
run it now). What it refuses, each with one error and nothing changed: asymmetric grids, bits
other than 4/8, non-int types, activation quantization, and GPTQ ``g_idx`` reordering. Codes at compressed-tensors' extra negative level (``-8`` /
``-128``, which its own calibration, ``absmax / 7.5``, produces) are kept as they are (lors_fx's
grid is ``[-qmax - 1, qmax]``; its own scales never reach the lowest level). ``dequantize=True`` loads plain float linears
(no scales kept): nothing to convert; lors_fx adapts them as float weights.
"""
from __future__ import annotations

import copy
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from lors_fx._nn import replace_module
from lors_fx.adapters import lors_modules
from lors_fx.quant import QMAX, QMIN
from lors_fx.quantized import QuantizedLinear

__all__ = ["FORMAT", "save_quantized", "load_quantized", "from_compressed_tensors",
           "convert_compressed_tensors", "compressed_tensors_layers", "Conversion"]

#: compressed-tensors' format name for int codes packed into int32 words.
FORMAT = "pack-quantized"
_PACKED_NAMES = ("weight_packed", "weight_scale", "weight_shape")
_FLOAT_SCALES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _value(field_value: Any) -> Any:
    """An enum field as its plain value (compressed-tensors stores most as str already)."""
    return getattr(field_value, "value", field_value)


# ----------------------------------------------------------------------------------------- out

def save_quantized(model: nn.Module, path: str, *, tokenizer: Any = None) -> List[str]:
    """Write ``model`` (a transformers model whose quantized linears are :class:`QuantizedLinear`)
    to the directory ``path`` in compressed-tensors' ``pack-quantized`` format; returns the names
    of the quantized layers written.

    The codes on disk are exactly ours, the scales too; other tensors (embeddings, norms, linears
    left in float such as ``lm_head``) are saved as ``save_pretrained`` saves them. ``tokenizer``
    is saved beside it when given. The model is not changed.

    Raises:
        TypeError: ``model`` is not a transformers model (no ``save_pretrained`` / ``config``).
        ValueError: LoRS adapters are attached (merge them with :func:`lors_fx.merge` first: it
            re-quantizes ``W'`` onto the base's grid); compressed-tensors layers not converted;
            no :class:`QuantizedLinear` at all; a quantized layer is not an ``nn.Linear`` in the
            model's architecture (GPT-2's ``Conv1D``: compressed-tensors quantizes Linear only);
            ``path`` is a file.
    """
    from compressed_tensors.compressors import ModelCompressor

    if os.path.isfile(path):
        raise ValueError(f"save_quantized: {path!r} is a file; give a directory")
    layers = _layers_to_save(model)
    linears = _architecture_linears(model)
    _check_architecture(layers, linears)
    config = _quantization_config(layers, linears)
    state = _packed_state_dict(model, layers)
    quantizer = model.__dict__.get("hf_quantizer")
    # A model loaded quantized keeps transformers' quantizer, whose save hook would replace the
    # state dict given here with the model's own (lors_fx's two-codes-per-byte packing).
    model.hf_quantizer = None
    try:
        model.save_pretrained(path, state_dict=state)
    finally:
        if quantizer is None:
            model.__dict__.pop("hf_quantizer", None)
        else:
            model.hf_quantizer = quantizer
    ModelCompressor(quantization_config=config).update_config(path)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return list(layers)


def _layers_to_save(model: nn.Module) -> Dict[str, QuantizedLinear]:
    if not (hasattr(model, "save_pretrained") and hasattr(model, "config")):
        raise TypeError(f"save_quantized: expected a transformers model (save_pretrained and "
                        f"config), got {type(model).__name__}")
    adapters = lors_modules(model)
    if adapters:
        raise ValueError(f"save_quantized: the model carries LoRS adapters (e.g. "
                         f"{next(iter(adapters))}); call lors_fx.merge(model) first: it "
                         f"re-quantizes W' onto each base's grid (same scales, zero pattern "
                         f"kept) and leaves QuantizedLinear layers to save")
    remaining = compressed_tensors_layers(model)
    if remaining:
        raise ValueError(f"save_quantized: {len(remaining)} layer(s) are still compressed-tensors "
                         f"modules (e.g. {next(iter(remaining))}); convert them with "
                         f"from_compressed_tensors(model) first")
    layers = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    if not layers:
        raise ValueError("save_quantized: the model has no QuantizedLinear layer; quantize it "
                         "with lors_fx.quantized.quantize_model first")
    return layers


def _architecture_linears(model: nn.Module) -> Dict[str, Tuple[int, int]]:
    """``{name: (d_out, d_in)}`` of every ``nn.Linear`` of the model's architecture, from a build
    on the meta device (what ``from_pretrained`` will build, before our layers replaced some)."""
    with torch.device("meta"):
        skeleton = type(model)(copy.deepcopy(model.config))
    return {name: (m.out_features, m.in_features) for name, m in skeleton.named_modules()
            if isinstance(m, nn.Linear)}


def _check_architecture(layers: Dict[str, QuantizedLinear],
                        linears: Dict[str, Tuple[int, int]]) -> None:
    for name, layer in layers.items():
        if name not in linears:
            raise ValueError(f"save_quantized: {name} is not an nn.Linear in "
                             f"the model's architecture (GPT-2's Conv1D?); compressed-tensors "
                             f"quantizes nn.Linear only, so transformers would not load it")
        if linears[name] != (layer.out_features, layer.in_features):
            raise ValueError(f"save_quantized: {name} is {layer.out_features}x"
                             f"{layer.in_features} but the architecture says "
                             f"{linears[name][0]}x{linears[name][1]}")


def _grid(layer: QuantizedLinear) -> Tuple[int, int]:
    """``(bits, group_size)``, group 0 = one scale per row (compressed-tensors' "channel")."""
    return layer.bits, 0 if layer.group_size == layer.in_features else layer.group_size


def _quantization_config(layers: Dict[str, QuantizedLinear], linears: Dict[str, Tuple[int, int]]):
    """compressed-tensors' ``QuantizationConfig``: one scheme per grid. With one grid the targets
    are ``["Linear"]`` and every other linear is ignored (llm-compressor's usual form);
    otherwise each scheme names its layers."""
    from compressed_tensors.compressors.pack_quantized import PackedQuantizationCompressor
    from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig,
                                                 QuantizationScheme, QuantizationStatus)

    grids: Dict[Tuple[int, int], List[str]] = {}
    for name, layer in layers.items():
        grids.setdefault(_grid(layer), []).append(name)
    single = len(grids) == 1
    groups = {}
    for index, ((bits, group), names) in enumerate(sorted(grids.items())):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True,
                                strategy="group" if group else "channel",
                                group_size=group or None)
        groups[f"group_{index}"] = scheme = QuantizationScheme(
            targets=["Linear"] if single else names, weights=args, format=FORMAT)
        names_on_disk = PackedQuantizationCompressor.compression_param_names(scheme)
        if tuple(names_on_disk) != _PACKED_NAMES:  # the tensors we write must be its layout
            raise RuntimeError(f"save_quantized: this compressed-tensors stores {names_on_disk} "
                               f"for {FORMAT}, lors_fx writes {_PACKED_NAMES}")
    ignore = sorted(set(linears) - set(layers)) if single else []
    return QuantizationConfig(config_groups=groups, format=FORMAT, ignore=ignore,
                              quantization_status=QuantizationStatus.COMPRESSED)


def _packed_state_dict(model: nn.Module, layers: Dict[str, QuantizedLinear]) -> Dict[str, Tensor]:
    """The model's state dict with each quantized layer in the ``pack-quantized`` layout."""
    from compressed_tensors.compressors.pack_quantized import pack_to_int32

    state = model.state_dict()
    for name, layer in layers.items():
        state[f"{name}.weight_packed"] = pack_to_int32(layer.codes, layer.bits)
        state[f"{name}.weight_shape"] = torch.tensor([layer.out_features, layer.in_features])
    return state


# ------------------------------------------------------------------------------------------ in

def compressed_tensors_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """``{name: module}`` of every module compressed-tensors quantized (it carries a
    ``quantization_scheme`` with weights or activations); imports nothing."""
    found = {}
    for name, module in model.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None and any(getattr(scheme, part, None) is not None for part in
                                      ("weights", "input_activations", "output_activations")):
            found[name] = module
    return found


@dataclass
class Conversion:
    """What :func:`convert_compressed_tensors` changed, so :meth:`restore` can undo it."""

    model: nn.Module
    replaced: Dict[str, nn.Module] = field(default_factory=dict)
    hook: Optional[Any] = None
    quantizer: Optional[Any] = None

    @property
    def names(self) -> List[str]:
        """The converted modules' names."""
        return list(self.replaced)

    def restore(self) -> None:
        """Put the compressed-tensors modules, the decompress hook and the quantizer back."""
        for name, module in self.replaced.items():
            replace_module(self.model, name, module)
        if self.hook is not None:
            self.model.ct_decompress_hook = self.model.register_forward_pre_hook(self.hook)
        if self.quantizer is not None:
            self.model.hf_quantizer = self.quantizer
        self.replaced, self.hook, self.quantizer = {}, None, None


def convert_compressed_tensors(model: nn.Module) -> Conversion:
    """Convert, in place, every linear compressed-tensors quantized into a :class:`QuantizedLinear`
    with identical codes and scales; returns the :class:`Conversion` (``.names``, ``.restore()``).
    Every layer is converted and checked before any is replaced: an error changes nothing."""
    layers = compressed_tensors_layers(model)
    if not layers:
        return Conversion(model)
    new = {name: _to_quantized_linear(name, module) for name, module in layers.items()}
    conversion = Conversion(model)
    for name, layer in new.items():
        conversion.replaced[name] = replace_module(model, name, layer)
    handle = model.__dict__.get("ct_decompress_hook")
    if handle is not None:  # it would decompress modules that are ours now
        conversion.hook = model._forward_pre_hooks.get(handle.id)
        handle.remove()
        del model.ct_decompress_hook
    quantizer = model.__dict__.get("hf_quantizer")
    if type(quantizer).__name__ == "CompressedTensorsHfQuantizer":
        # compressed-tensors runs nothing now; left in place it makes the model "quantized"
        # for transformers, whose Trainer refuses to train that without PEFT adapters.
        conversion.quantizer, model.hf_quantizer = quantizer, None
    return conversion


def from_compressed_tensors(model: nn.Module) -> List[str]:
    """Convert, in place, every linear that transformers + compressed-tensors loaded from a
    quantized checkpoint (packed, or already decompressed by a forward) into a
    :class:`QuantizedLinear` with identical codes and scales; returns the converted names (empty
    when there is none). Lossless: packed codes are unpacked as they are; decompressed weights are
    re-coded and must dequantize back to the very same values.

    Raises (before anything changes) ``ValueError`` for an asymmetric grid (zero point), bits
    other than 4 or 8, a non-int type (float8, fp4), activation (or KV cache) quantization, a
    block / tensor-group strategy, GPTQ's ``g_idx`` reordering, codes outside the grid ([-8, 7] /
    [-128, 127]), or decompressed weights that are not on their grid; ``TypeError``
    for a quantized module that is not an ``nn.Linear``.
    """
    return convert_compressed_tensors(model).names


def load_quantized(path: str, **from_pretrained_kwargs) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)`` followed by
    :func:`from_compressed_tensors`: a compressed-tensors checkpoint (written by
    :func:`save_quantized` or llm-compressor) with :class:`QuantizedLinear` layers. Raises
    ``ValueError`` when no quantized linear was loaded (a float checkpoint, or
    ``dequantize=True``) and the errors of :func:`from_compressed_tensors`."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, **from_pretrained_kwargs)
    if not from_compressed_tensors(model):
        raise ValueError(f"load_quantized: {path} loaded without any compressed-tensors "
                         f"quantized linear (a float checkpoint, or dequantize=True); use "
                         f"from_pretrained for it, or quantize it with quantize_model")
    return model


def _weight_args(name: str, module: nn.Module):
    """The module's weight ``QuantizationArgs``, refused unless lors_fx's grid holds them."""
    scheme = module.quantization_scheme
    if not isinstance(module, nn.Linear):
        raise TypeError(f"{name}: compressed-tensors quantized a {type(module).__name__}; only "
                        f"nn.Linear weights convert to QuantizedLinear")
    acts = [p for p in ("input_activations", "output_activations") if getattr(scheme, p, None)]
    if acts or scheme.weights is None:
        raise ValueError(f"{name}: the checkpoint quantizes activations ({', '.join(acts)}); "
                         f"lors_fx's quantized base is weight-only (W4A16 / W8A16)")
    args = scheme.weights
    if _value(args.type) != "int":
        raise ValueError(f"{name}: weights are type {_value(args.type)!r}; lors_fx's grid is "
                         f"symmetric int (int4 / int8)")
    if args.num_bits not in QMAX:
        raise ValueError(f"{name}: {args.num_bits}-bit weights; lors_fx's grid is 4 or 8 bits")
    zero_point = getattr(module, "weight_zero_point", None)
    if not args.symmetric or (isinstance(zero_point, Tensor) and bool(zero_point.any())):
        raise ValueError(f"{name}: asymmetric weights (zero point != 0); lors_fx's grid is "
                         f"symmetric, so code 0 is exactly 0 (a pruned weight)")
    if _value(args.strategy) not in ("group", "channel", "tensor") or args.dynamic:
        raise ValueError(f"{name}: strategy {_value(args.strategy)!r} (dynamic={args.dynamic}) "
                         f"has no lors_fx form; supported: static group / channel / tensor")
    if getattr(module, "weight_g_idx", None) is not None:
        raise ValueError(f"{name}: GPTQ activation-order g_idx reorders the groups; lors_fx's "
                         f"groups are consecutive inputs")
    return args


def _scales_of(name: str, module: nn.Module, args, d_out: int, d_in: int) -> Tensor:
    """The scales as ``(d_out, d_in / group)`` (a tensor-wide scale repeated per row)."""
    scales = module.weight_scale.detach()
    if scales.dtype not in _FLOAT_SCALES:
        raise ValueError(f"{name}: {scales.dtype} scales; lors_fx keeps float scales")
    strategy = _value(args.strategy)
    if strategy == "tensor" and scales.numel() == 1:
        scales = scales.reshape(1, 1).expand(d_out, 1)
    groups = d_in // args.group_size if strategy == "group" else 1
    if tuple(scales.shape) != (d_out, groups):
        raise ValueError(f"{name}: scales {tuple(scales.shape)} do not fit a {strategy} grid "
                         f"on a {d_out}x{d_in} weight")
    return scales.contiguous().clone()


def _codes_of(name: str, module: nn.Module, args, scales: Tensor, shape) -> Tensor:
    """``int8`` codes: unpacked from ``weight_packed``, or re-coded from a float ``weight``
    (which, once decompressed, must dequantize back bit for bit)."""
    from compressed_tensors.compressors.pack_quantized import unpack_from_int32
    from compressed_tensors.quantization import QuantizationStatus
    from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

    packed = getattr(module, "weight_packed", None)
    if isinstance(packed, Tensor):
        return unpack_from_int32(packed.detach(), args.num_bits, shape)
    weight = module.weight.detach()
    if not weight.is_floating_point():  # "int-quantized": the codes themselves
        return weight.to(torch.int8)
    # an all-pruned group may have scale 0 (lors_fx writes that): its weights are 0, so code 0
    codes = quantize(weight, scales.masked_fill(scales == 0, 1), None, args, dtype=torch.int8)
    # Before compression the forward fake-quantizes the weight: these codes are what it runs.
    # Decompressed, the weight is used as it is, so it must already be on the grid.
    status = getattr(module, "quantization_status", None)
    if status is None or status >= QuantizationStatus.COMPRESSED:
        back = dequantize(codes, scales, None, args).to(weight.dtype)
        if not torch.equal(back, weight):
            raise ValueError(f"{name}: the decompressed weight is not on its grid (codes x "
                             f"scales differ from it); it cannot be converted losslessly")
    return codes


def _to_quantized_linear(name: str, module: nn.Module) -> QuantizedLinear:
    args = _weight_args(name, module)
    shape = tuple(int(v) for v in getattr(module, "weight_shape", torch.tensor(
        [module.out_features, module.in_features])).tolist())
    scales = _scales_of(name, module, args, *shape)
    codes = _codes_of(name, module, args, scales, torch.Size(shape))
    low, high = QMIN[args.num_bits], QMAX[args.num_bits]
    outside = int(((codes < low) | (codes > high)).sum())
    if outside:
        raise ValueError(f"{name}: {outside} code(s) outside the {args.num_bits}-bit grid "
                         f"[{low}, {high}]: not convertible losslessly")
    bias = None if module.bias is None else module.bias.detach().to(scales.dtype)
    layer = QuantizedLinear.from_codes(codes, scales, args.num_bits, bias, name=name)
    return layer.train(module.training)
