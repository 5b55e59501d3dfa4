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
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from lors_fx._nn import is_linear_like, matches_any, oriented_weight
from lors_fx.sparsity import SparsityRow, sparsity_report
from lors_fx.workflows.calibration import (InputStats, blockwise_statistics, calibration_batches,
                                           collect_input_stats, find_blocks, run_model)

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


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return matches_any(name, patterns)


def target_linears(model: nn.Module, targets=None,
                   exclude: Sequence[str] = ("lm_head",)) -> Dict[str, nn.Module]:
    """``{name: module}`` of the linears to prune: all (``targets=None``), those whose name ends
    with one of ``targets``, or those fully matching ``targets`` as a regex; minus ``exclude``.

    Raises ``ValueError`` when a target shares its weight with an embedding (tied ``lm_head``),
    since pruning it would prune the embeddings too.
    """
    exclude = [exclude] if isinstance(exclude, str) else list(exclude or ())
    embedding_weights = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    chosen = {}
    for name, module in model.named_modules():
        if not is_linear_like(module) or not name or _matches(name, exclude):
            continue
        if targets is not None and not _matches(name, targets):
            continue
        if id(module.weight) in embedding_weights:
            raise ValueError(f"targets: {name} shares its weight with an embedding (tied "
                             f"embeddings); pruning it would prune the embeddings: exclude it")
        chosen[name] = module
    if targets is not None and not chosen:
        raise ValueError(f"targets: {targets!r} matched no linear module of the model")
    return chosen


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
def _sparsegpt(weight: Tensor, stats: InputStats, sparsity: float, nm, blocksize: int,
               percdamp: float) -> Tuple[Tensor, Tensor]:
    """SparseGPT on one ``(d_out, d_in)`` weight: returns ``(new fp32 values, pruned mask)``."""
    W = weight.float().clone()
    rows, cols = W.shape
    if nm is not None:
        if cols % nm[1]:
            raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs the input dim to be a multiple of "
                             f"{nm[1]}, got a weight of shape {(rows, cols)}")
        blocksize = max(nm[1], blocksize // nm[1] * nm[1])
    H = stats.xtx * (2.0 / max(1, stats.count))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # an input never seen: no information, keep H invertible
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(cols, dtype=H.dtype, device=H.device)
    for attempt in range(6):  # grow the damping until H is numerically positive definite
        chol, info = torch.linalg.cholesky_ex(H + damp * (10 ** attempt) * eye)
        if int(info) == 0:
            break
    else:
        raise RuntimeError("sparsegpt: the calibration Hessian is not positive definite even "
                           "with 1e5x damping; use more calibration data")
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    pruned = torch.zeros_like(W, dtype=torch.bool)
    prune_n = None if nm is None else nm[1] - nm[0]
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        W1 = W[:, i1:i2].clone()
        Q1 = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        Hinv1 = Hinv[i1:i2, i1:i2]
        diag1 = torch.diag(Hinv1)
        mask1 = torch.zeros_like(W1, dtype=torch.bool)
        if nm is None:
            # exact layer count: this block takes its share of floor(s * rows * cols)
            k = (math.floor(sparsity * rows * i2 + 1e-6) - math.floor(sparsity * rows * i1 + 1e-6))
            if k:
                score = (W1.pow(2) / diag1.pow(2).unsqueeze(0)).flatten()
                mask1.view(-1)[torch.topk(score, k, largest=False).indices] = True
        for i in range(i2 - i1):
            w = W1[:, i]
            d = diag1[i]
            if prune_n is not None and i % nm[1] == 0:
                score = W1[:, i:i + nm[1]].pow(2) / diag1[i:i + nm[1]].pow(2).unsqueeze(0)
                lowest = torch.topk(score, prune_n, dim=1, largest=False).indices
                mask1.scatter_(1, i + lowest, True)
            q = w.masked_fill(mask1[:, i], 0.0)
            Q1[:, i] = q
            err = (w - q) / d
            W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
            Err1[:, i] = err
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, pruned


@torch.no_grad()
def _prune_one(module: nn.Module, method: str, sparsity: float, nm, stats: Optional[InputStats],
               blocksize: int, percdamp: float) -> None:
    weight = _weight_view(module)
    if method == "magnitude":
        scores = weight.abs().float()
    elif stats is None or stats.count == 0:
        raise RuntimeError(f"calibration: no input reached a target linear during calibration "
                           f"({method} needs activations)")
    elif method == "wanda":
        scores = weight.abs().float() * stats.sumsq.sqrt().unsqueeze(0)
    else:
        values, pruned = _sparsegpt(weight, stats, sparsity, nm, blocksize, percdamp)
        _write_pruned(weight, values, pruned)
        return
    weight.masked_fill_(prune_mask(scores, sparsity, nm), 0.0)


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


def _prune_calibrated(model: nn.Module, modules: Dict[str, nn.Module], batches: List[dict],
                      bar: Callable, prune: Callable[[nn.Module, InputStats], None],
                      hessian: bool) -> None:
    """Collect input statistics and ``prune(module, stats)`` every target: block by block for
    an HF decoder, with whole-model hooks for other models and targets outside the blocks."""
    # blocks run in sequence only by the convention of HF decoders: others use whole-model hooks
    blocks = find_blocks(model) if hasattr(model, "config") else None
    by_module = {id(m): n for n, m in modules.items()}
    in_blocks = ({} if blocks is None else
                 {by_module[id(m)]: m for m in blocks.modules() if id(m) in by_module})
    outside = {n: m for n, m in modules.items() if n not in in_blocks}
    if outside:
        device = next(model.parameters()).device
        stats = collect_input_stats(outside, hessian,
                                    lambda: [run_model(model, b, device) for b in batches])
        for name in bar(outside, "linear"):
            prune(outside[name], stats[name])
    if in_blocks:
        for block_stats in blockwise_statistics(model, blocks, in_blocks, batches, hessian,
                                                lambda items: bar(items, "block")):
            for module, stats in block_stats.values():
                prune(module, stats)


@torch.no_grad()
def prune_model(model: nn.Module, method: str = "wanda", sparsity: Optional[float] = None,
                pattern: Optional[str] = None, calibration: Optional[Iterable] = None, *,
                targets=None, exclude: Sequence[str] = ("lm_head",), progress: bool = True,
                blocksize: int = 128, percdamp: float = 0.01) -> List[SparsityRow]:
    """Prune the target linears of ``model`` in place and return their sparsity rows.

    Args:
        model: a decoder model (HF ``*ForCausalLM`` or any module; see the module docstring).
        method: ``"magnitude"``, ``"wanda"`` or ``"sparsegpt"``.
        sparsity: fraction of zeros (default 0.5; implied by ``pattern`` when given).
        pattern: None/``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``) along the input dim.
        calibration: for Wanda/SparseGPT, an iterable of ``input_ids`` tensors (1-D or 2-D) or
            dicts with ``input_ids`` (e.g. ``lors_fx.workflows.data`` batches), or a 2-D tensor
            of blocks.
        targets: None (every linear), name suffixes, or one regex matched against full names.
        exclude: name suffixes never pruned (``lm_head``: tied to the embeddings).
        progress: show a tqdm bar per block.
        blocksize, percdamp: SparseGPT's column block width and Hessian damping.

    Returns:
        :class:`lors_fx.sparsity.SparsityRow` for each pruned module.
    """
    from tqdm.auto import tqdm

    nm, sparsity, modules = _check_arguments(model, method, pattern, sparsity, targets, exclude,
                                             blocksize, percdamp)
    label = f"{method} {f'{nm[0]}:{nm[1]}' if nm else f'{sparsity:g}'}"

    def bar(items, unit):
        return tqdm(items, desc=label, disable=not progress, unit=unit)

    def prune(module, stats):
        _prune_one(module, method, sparsity, nm, stats, blocksize, percdamp)

    if method == "magnitude":
        for module in bar(modules.values(), "linear"):
            prune(module, None)
        return [row for row in sparsity_report(model) if row.name in modules]
    batches = calibration_batches(calibration)
    if not batches:
        raise ValueError(f"calibration: {method} needs calibration inputs (input_ids tensors)")
    was_training = model.training
    model.eval()
    try:
        _prune_calibrated(model, modules, batches, bar, prune, hessian=method == "sparsegpt")
    finally:
        model.train(was_training)
    return [row for row in sparsity_report(model) if row.name in modules]
