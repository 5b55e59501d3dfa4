"""Post-training pruning: magnitude, Wanda and SparseGPT, unstructured or N:M.

Every method zeroes weights of the target ``nn.Linear`` (and GPT-2 ``Conv1D``) modules in place;
the mask is then read back from ``W != 0`` by the rest of lors_fx. N:M runs along the input dim
(the layout 2:4 kernels use): exactly N nonzeros survive in every group of M consecutive inputs.

Exact counts (``s`` = sparsity, weight ``d_out x d_in``):

- magnitude and Wanda, unstructured: every row loses exactly ``floor(s * d_in)`` weights (the
  comparison group is the output row, as in the Wanda paper).
- SparseGPT, unstructured: the mask is chosen per block of columns over all rows (the paper's
  adaptive mask selection); columns ``[a, b)`` lose ``floor(s * d_out * b) - floor(s * d_out * a)``
  weights, so the layer loses exactly ``floor(s * d_out * d_in)``; rows vary.
- N:M (all methods): exactly ``M - N`` zeros per group, so ``s = 1 - N/M``.

Scores: magnitude ``|W|``; Wanda ``|W_ij| * ||X_j||_2`` over calibration tokens; SparseGPT
``W_ij^2 / [H^-1]_jj^2`` with OBS updates of the not-yet-pruned columns (``H = 2 X^T X / n``
plus ``percdamp`` of its mean diagonal), following Frantar & Alistarh (2023), Algorithm 1.

Calibration (:mod:`lors_fx.workflows.calibration`) runs block by block for Hugging Face decoder
models (the inputs of block i are captured, its linears are pruned, and the pruned block is run to
make the inputs of block i+1), so activations of only one block are held at a time. Models without
a block list are calibrated with whole-model hooks. The ``lors-fx prune`` subcommand is
:mod:`lors_fx.cli.prune`.

With ``bits``, every pruned linear ends as a :class:`lors_fx.quantized.QuantizedLinear` whose
zero codes are exactly the mask: SparseGPT prunes and quantizes in one sweep (the paper's joint
mode), Wanda and magnitude prune and then run GPTQ with the mask fixed, or round to nearest
(``quant_method="rtn"``). The sweep and the scales live in :mod:`lors_fx.workflows.quantize`,
which also quantizes an already-pruned model (``quantize_pruned_model``).
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lors_fx._nn import is_linear_like, oriented_weight, replace_module
from lors_fx.quant import QuantSpec
from lors_fx.quantized import QuantizedLinear
from lors_fx.sparsity import SparsityRow, sparsity_report
from lors_fx.workflows.calibration import InputStats, calibration_batches, find_blocks
from lors_fx.workflows.quantize import (QUANT_METHODS, check_quantization,
                                        obs_sweep, quantize_calibrated_linear, run_on_targets,
                                        sparsegpt_quantized_linear, target_linears)

__all__ = ["PRUNE_METHODS", "parse_pattern", "prune_mask", "magnitude_prune_", "prune_model",
           "find_blocks", "target_linears"]

PRUNE_METHODS = ("magnitude", "wanda", "sparsegpt")


def parse_pattern(pattern: Optional[str]) -> Optional[Tuple[int, int]]:
    """``None``/``"unstructured"`` -> None; ``"N:M"`` (0 < N < M) -> ``(N, M)``."""
    if pattern is None or pattern == "unstructured":
        return None
    match = re.fullmatch(r"\s*(\d+)\s*:\s*(\d+)\s*", str(pattern))
    if not match or not 0 < int(match.group(1)) < int(match.group(2)):
        raise ValueError(f"pattern: expected None, 'unstructured' or 'N:M' with 0 < N < M "
                         f"(e.g. '2:4'), got {pattern!r}")
    return int(match.group(1)), int(match.group(2))


def _resolve_sparsity(sparsity: Optional[float], nm: Optional[Tuple[int, int]]) -> float:
    """The sparsity to apply: the argument, or the one an N:M pattern implies (default 0.5)."""
    if sparsity is not None and (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float))
                                 or not 0.0 <= sparsity < 1.0):
        raise ValueError(f"sparsity: must be a number in [0, 1), got {sparsity!r}")
    if nm is None:
        return 0.5 if sparsity is None else float(sparsity)
    implied = 1.0 - nm[0] / nm[1]
    if sparsity is not None and not math.isclose(sparsity, implied, abs_tol=1e-9):
        raise ValueError(f"sparsity: {sparsity} contradicts pattern {nm[0]}:{nm[1]}, which "
                         f"implies {implied:g}; pass one of them")
    return implied


def prune_mask(scores: Tensor, sparsity: float, nm: Optional[Tuple[int, int]] = None) -> Tensor:
    """Bool mask (True = prune) of the lowest ``scores`` of a ``(d_out, d_in)`` score matrix:
    ``floor(sparsity * d_in)`` per row, or ``M - N`` per group of M inputs for ``nm=(N, M)``."""
    d_out, d_in = scores.shape
    mask = torch.zeros_like(scores, dtype=torch.bool)
    if nm is not None:
        n, m = nm
        if d_in % m:
            raise ValueError(f"pattern: {n}:{m} needs the input dim to be a multiple of {m}, "
                             f"got a weight of shape {(d_out, d_in)}")
        grouped = scores.reshape(d_out, d_in // m, m)
        lowest = torch.topk(grouped, m - n, dim=-1, largest=False).indices
        return mask.reshape(d_out, d_in // m, m).scatter_(-1, lowest, True).reshape(d_out, d_in)
    k = int(math.floor(sparsity * d_in + 1e-9))
    if k:
        mask.scatter_(1, torch.topk(scores, k, dim=1, largest=False).indices, True)
    return mask


def _weight_view(module: nn.Module) -> Tensor:
    """The weight as ``(d_out, d_in)`` sharing storage (GPT-2 ``Conv1D`` stores it transposed)."""
    return oriented_weight(module).data


@torch.no_grad()
def _write_pruned(module_weight: Tensor, new_values: Tensor, pruned: Tensor) -> None:
    """Write ``new_values`` (fp32) with ``pruned`` zeroed into the weight view, keeping every kept
    weight nonzero after the cast (a rounding to 0 would silently change the mask)."""
    values = new_values.masked_fill(pruned, 0.0).to(module_weight.dtype)
    flushed = (values == 0) & ~pruned & (new_values != 0)
    if bool(flushed.any()):
        tiny = torch.finfo(module_weight.dtype).tiny
        values[flushed] = (torch.sign(new_values[flushed]) * tiny).to(module_weight.dtype)
    module_weight.copy_(values)


@torch.no_grad()
def magnitude_prune_(module_or_weight: Union[nn.Module, Tensor], sparsity: Optional[float] = None,
                     pattern: Optional[str] = None, *, exclude: Sequence[str] = ("lm_head",)):
    """Zero the smallest-|W| weights in place: ``floor(sparsity * d_in)`` per row, or N:M.

    Args:
        module_or_weight: a 2-D ``(d_out, d_in)`` tensor, one linear, or a model (every linear
            not named in ``exclude`` is pruned).
        sparsity: fraction per row (default 0.5; implied by ``pattern`` when given).
        pattern: None/``"unstructured"`` or ``"N:M"`` along the input dim.

    Returns:
        The tensor for a tensor, else ``{module name: sparsity}`` of the pruned linears.
    """
    nm = parse_pattern(pattern)
    sparsity = _resolve_sparsity(sparsity, nm)
    if isinstance(module_or_weight, Tensor):
        if module_or_weight.dim() != 2:
            raise ValueError(f"module_or_weight: expected a 2-D weight, got shape "
                             f"{tuple(module_or_weight.shape)}")
        weight = module_or_weight.data
        weight.masked_fill_(prune_mask(weight.abs().float(), sparsity, nm), 0.0)
        return module_or_weight
    if not isinstance(module_or_weight, nn.Module):
        raise TypeError(f"module_or_weight: expected an nn.Module or a 2-D tensor, got "
                        f"{type(module_or_weight).__name__}")
    modules = ({"": module_or_weight} if is_linear_like(module_or_weight)
               else target_linears(module_or_weight, None, exclude))
    result = {}
    for name, module in modules.items():
        weight = _weight_view(module)
        weight.masked_fill_(prune_mask(weight.abs().float(), sparsity, nm), 0.0)
        result[name] = float((weight == 0).float().mean())
    return result


@torch.no_grad()
def _prune_one(module: nn.Module, name: str, method: str, sparsity: float, nm,
               stats: Optional[InputStats], blocksize: int, percdamp: float,
               quant: Optional[Tuple[QuantSpec, str]]) -> Optional[QuantizedLinear]:
    """Prune ``module`` in place; with ``quant`` (grid, ``"gptq"``/``"rtn"``), return its
    quantized replacement (SparseGPT + GPTQ: the joint sweep, which leaves ``module`` as is)."""
    weight = _weight_view(module)
    if method == "magnitude":
        scores = weight.abs().float()
    elif stats is None or stats.count == 0:
        raise RuntimeError(f"calibration: no input reached a target linear during calibration "
                           f"({method} needs activations)")
    elif method == "wanda":
        scores = weight.abs().float() * stats.sumsq.sqrt().unsqueeze(0)
    elif quant is not None and quant[1] == "gptq":
        return sparsegpt_quantized_linear(module, stats, quant[0], sparsity, nm, name,
                                          blocksize, percdamp)
    else:
        values, pruned = obs_sweep(weight, stats, blocksize, percdamp, sparsity=sparsity, nm=nm)
        _write_pruned(weight, values, pruned)
        scores = None
    if scores is not None:
        weight.masked_fill_(prune_mask(scores, sparsity, nm), 0.0)
    if quant is None:
        return None
    return quantize_calibrated_linear(module, quant[0], quant[1], stats, name, blocksize,
                                      percdamp)


def _check_arguments(model: nn.Module, method: str, pattern: Optional[str],
                     sparsity: Optional[float], targets, exclude: Sequence[str], blocksize: int,
                     percdamp: float) -> Tuple[Optional[Tuple[int, int]], float,
                                               Dict[str, nn.Module]]:
    """``(nm, sparsity, {name: linear to prune})`` once every argument is checked."""
    if method not in PRUNE_METHODS:
        raise ValueError(f"method: must be one of {PRUNE_METHODS}, got {method!r}")
    nm = parse_pattern(pattern)
    sparsity = _resolve_sparsity(sparsity, nm)
    if not isinstance(blocksize, int) or blocksize < 1:
        raise ValueError(f"blocksize: must be a positive int, got {blocksize!r}")
    if not 0 <= percdamp:
        raise ValueError(f"percdamp: must be >= 0, got {percdamp!r}")
    modules = target_linears(model, targets, exclude)
    if not modules:
        raise ValueError("targets: the model has no linear module to prune")
    if nm is not None:
        for name, module in modules.items():
            if _weight_view(module).shape[1] % nm[1]:
                raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs input dims divisible by "
                                 f"{nm[1]}; {name} has {_weight_view(module).shape[1]}")
    return nm, sparsity, modules


def _check_quantization(modules: Dict[str, nn.Module], method: str, bits: Optional[int],
                        group_size: Optional[int], quant_method: str,
                        batches: List[dict]) -> Optional[Tuple[QuantSpec, str]]:
    """``(grid, quant_method)`` (None without ``bits``) once every target is checked."""
    if quant_method not in QUANT_METHODS:
        raise ValueError(f"quant_method: must be one of {QUANT_METHODS}, got {quant_method!r}")
    if bits is None:
        return None
    spec = check_quantization(modules, bits, group_size, quant_method)
    if method == "magnitude" and quant_method == "gptq" and not batches:
        raise ValueError("calibration: magnitude pruning with quant_method='gptq' needs "
                         "calibration inputs (input_ids tensors) for GPTQ; pass them or use "
                         "quant_method='rtn'")
    return spec, quant_method


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: Optional[float] = None,
                pattern: Optional[str] = None, calibration: Optional[Iterable] = None, *,
                targets=None, exclude: Sequence[str] = ("lm_head",), progress: bool = True,
                blocksize: int = 128, percdamp: float = 0.01, bits: Optional[int] = None,
                group_size: Optional[int] = 128, quant_method: str = "gptq") -> List[SparsityRow]:
    """Prune the target linears of ``model`` in place (and quantize them, with ``bits``) and
    return their sparsity rows.

    Args:
        model: a decoder model (HF ``*ForCausalLM`` or any module; see the module docstring).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: fraction of zeros (default 0.5; implied by ``pattern`` when given).
        pattern: None/``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``) along the input dim.
        calibration: for Wanda/SparseGPT (and GPTQ), an iterable of ``input_ids`` tensors (1-D or
            2-D) or dicts with ``input_ids`` (e.g. ``lors_fx.workflows.data`` batches), or a 2-D
            tensor of blocks.
        targets: None (every linear), name suffixes, or one regex matched against full names.
        exclude: name suffixes never pruned (``lm_head``: tied to the embeddings).
        progress: show a tqdm bar per block.
        blocksize, percdamp: the column block width and Hessian damping of SparseGPT and GPTQ.
        bits: 4 or 8 to replace every pruned linear by a :class:`lors_fx.quantized.QuantizedLinear`
            (scales and bias in the weight's dtype; codes 0 exactly where pruned); None: no
            quantization.
        group_size: inputs per scale (must divide every target's ``d_in``); None: one per row.
        quant_method: ``"gptq"`` (SparseGPT: the joint prune-and-quantize sweep; Wanda and
            magnitude: GPTQ with the mask fixed, on the calibration inputs) or ``"rtn"`` (round
            to nearest after pruning). See :mod:`lors_fx.workflows.quantize`.

    Returns:
        :class:`lors_fx.sparsity.SparsityRow` for each pruned module.

    Raises:
        ValueError: a bad argument (method, sparsity, pattern, bits, group size, quant_method,
        missing calibration); the model is then unchanged.
    """
    from tqdm.auto import tqdm

    nm, sparsity, modules = _check_arguments(model, method, pattern, sparsity, targets, exclude,
                                             blocksize, percdamp)
    calibrated = method != "magnitude" or (bits is not None and quant_method == "gptq")
    batches = calibration_batches(calibration) if calibrated else []
    quant = _check_quantization(modules, method, bits, group_size, quant_method, batches)
    if method != "magnitude" and not batches:
        raise ValueError(f"calibration: {method} needs calibration inputs (input_ids tensors)")
    label = f"{method} {f'{nm[0]}:{nm[1]}' if nm else f'{sparsity:g}'}"
    label += f" int{bits} {quant_method}" if quant else ""

    def bar(items, unit):
        return tqdm(items, desc=label, disable=not progress, unit=unit)

    def prune(name, module, stats):
        new = _prune_one(module, name, method, sparsity, nm, stats, blocksize, percdamp, quant)
        if new is not None:
            replace_module(model, name, new)

    run_on_targets(model, modules, batches if calibrated else None, bar, prune,
         hessian=method == "sparsegpt" or (quant is not None and quant_method == "gptq"))
    return [row for row in sparsity_report(model) if row.name in modules]
