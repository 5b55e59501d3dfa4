"""Quantize pruned linears on calibration data: round to nearest, GPTQ with the mask fixed, and
SparseGPT's joint prune-and-quantize, all on :mod:`lors_fx.quant`'s sparsity-aware grid.

One column sweep (:func:`obs_sweep`, Frantar & Alistarh 2023, Algorithm 1; Frantar et al. 2022,
GPTQ) serves three uses. Columns are visited left to right; column ``j`` is replaced by its target
value ``q`` (0 where pruned; with a grid, ``dq(round(w))`` at kept positions, 0 at pruned ones)
and the error ``(w - q) / [H^-1]_jj`` is spread over the later columns through the upper
Cholesky factor of ``H^-1`` (``H = 2 X^T X / n`` plus ``percdamp`` of its mean diagonal), so the
later columns compensate for it. Lazy batch updates: the error reaches columns beyond the current
block of ``blocksize`` columns once per block.

- SparseGPT (no grid): the mask is chosen as the sweep goes (per block, or per group of M inputs
  for N:M); see :mod:`lors_fx.workflows.prune`.
- SparseGPT joint (SparseGPT with a grid): the same mask selection, and each column's kept weights
  are quantized before the error is spread (the paper's joint sparsify-and-quantize).
- GPTQ with the mask fixed (a grid, a given mask): pruned positions are forced to 0 and kept ones
  quantized; the codes' zero pattern is the mask.

Scales (``absmax / qmax`` as :func:`lors_fx.quant.compute_scales`, in the weight's dtype): with
groups, GPTQ's dynamic groups: a group's scales are computed when the sweep reaches its first
column, from the current (error-updated) weights of the group at the positions not pruned. Blocks
are widened or narrowed to whole groups (and whole N:M groups) so a group never straddles a block
and its weights are current. For N:M joint the mask of the group's later M-wide chunks is not
chosen yet: those weights count as kept. Per channel (``group_size=None``, or a group of the
whole row): one scale per row, computed before the sweep from the whole row minus the known mask
(joint mode: the whole row, as in SparseGPT's code).

Kept weights never get code 0 (:func:`lors_fx.quant.round_to_codes`), so the zero pattern of the
codes is the mask; every layer is checked (:func:`lors_fx.quantized.check_codes_match_mask`)
before it replaces the linear.
"""
from __future__ import annotations

import math
import re
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lors_fx._nn import is_linear_like, matches_any, oriented_weight, replace_module
from lors_fx.quant import QuantSpec, resolve_group_size
from lors_fx.quantized import QuantizedLinear, quantize_linear
from lors_fx.sparsity import SparsityRow, sparsity_report
from lors_fx.workflows.column_grid import ColumnGrid
from lors_fx.workflows.calibration import (InputStats, blockwise_statistics, calibration_batches,
                                           collect_input_stats, find_blocks, run_model)

__all__ = ["QUANT_METHODS", "target_linears", "calibrate_each", "run_on_targets",
           "inverse_hessian_factor",
           "ColumnGrid", "obs_sweep", "gptq_linear", "sparsegpt_quantized_linear",
           "quantize_calibrated_linear", "check_quantization", "quantize_pruned_model"]

QUANT_METHODS = ("gptq", "rtn")


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return matches_any(name, patterns)


def target_linears(model: nn.Module, targets=None,
                   exclude: Sequence[str] = ("lm_head",)) -> Dict[str, nn.Module]:
    """``{name: module}`` of the linears to prune or quantize: all (``targets=None``), those whose
    name ends with one of ``targets``, or those fully matching ``targets`` as a regex; minus
    ``exclude``.

    Raises ``ValueError`` when a target shares its weight with an embedding (tied ``lm_head``),
    since pruning it would prune the embeddings too, or when ``targets`` matches nothing.
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


def calibrate_each(model: nn.Module, modules: Dict[str, nn.Module], batches: List[dict],
                   bar: Callable, apply: Callable[[str, nn.Module, InputStats], None],
                   hessian: bool) -> None:
    """Collect input statistics and call ``apply(name, module, stats)`` on every target: block by
    block for an HF decoder (a block's inputs come from the blocks before it as ``apply`` left
    them), with whole-model hooks for other models and targets outside the blocks."""
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
            apply(name, outside[name], stats[name])
    if in_blocks:
        for block_stats in blockwise_statistics(model, blocks, in_blocks, batches, hessian,
                                                lambda items: bar(items, "block")):
            for name, (module, stats) in block_stats.items():
                apply(name, module, stats)


def run_on_targets(model: nn.Module, modules: Dict[str, nn.Module], batches: Optional[List[dict]],
                   bar: Callable, apply: Callable[[str, nn.Module, Optional[InputStats]], None],
                   hessian: bool) -> None:
    """``apply(name, module, stats)`` every target: through :func:`calibrate_each` on ``batches``
    (in eval mode, the training flag restored after), or in turn with ``stats=None`` when
    ``batches`` is None."""
    if batches is None:
        for name in bar(list(modules), "linear"):
            apply(name, modules[name], None)
        return
    was_training = model.training
    model.eval()
    try:
        calibrate_each(model, modules, batches, bar, apply, hessian)
    finally:
        model.train(was_training)


@torch.no_grad()
def inverse_hessian_factor(stats: InputStats, percdamp: float) -> Tensor:
    """Upper Cholesky factor of ``(2 X^T X / n + damp I)^-1`` (fp32), the damping grown tenfold
    up to five times until ``H`` is numerically positive definite; raises ``RuntimeError`` if
    it never is."""
    H = stats.xtx * (2.0 / max(1, stats.count))
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0  # an input never seen: no information, keep H invertible
    damp = percdamp * torch.mean(torch.diag(H))
    eye = torch.eye(H.shape[0], dtype=H.dtype, device=H.device)
    for attempt in range(6):
        chol, info = torch.linalg.cholesky_ex(H + damp * (10 ** attempt) * eye)
        if int(info) == 0:
            return torch.linalg.cholesky(torch.cholesky_inverse(chol), upper=True)
    raise RuntimeError("calibration: the Hessian X^T X is not positive definite even with 1e5x "
                       "damping; use more calibration data")


def _aligned_blocksize(blocksize: int, unit: int) -> int:
    """The largest multiple of ``unit`` not above ``blocksize`` (at least ``unit``)."""
    return max(unit, blocksize // unit * unit)


def _select_block_mask(W1: Tensor, diag1: Tensor, mask1: Tensor, sparsity: float, rows: int,
                       i1: int, i2: int) -> None:
    """SparseGPT's adaptive unstructured mask of columns ``[i1, i2)``: the lowest
    ``w^2 / [H^-1]_jj^2`` of the block, its share of the layer's ``floor(s * rows * cols)``."""
    k = math.floor(sparsity * rows * i2 + 1e-6) - math.floor(sparsity * rows * i1 + 1e-6)
    if k:
        score = (W1.pow(2) / diag1.pow(2).unsqueeze(0)).flatten()
        mask1.view(-1)[torch.topk(score, k, largest=False).indices] = True


def _sweep_block(W: Tensor, Hinv: Tensor, i1: int, i2: int, mask1: Tensor, nm,
                 grid: Optional[ColumnGrid]) -> Tuple[Tensor, Tensor]:
    """Columns ``[i1, i2)``: returns their targets ``Q1`` and scaled errors ``Err1``; ``mask1``
    (True = pruned) gets the N:M choices when ``nm`` is given."""
    W1 = W[:, i1:i2].clone()
    Q1, Err1 = torch.zeros_like(W1), torch.zeros_like(W1)
    Hinv1 = Hinv[i1:i2, i1:i2]
    diag1 = torch.diag(Hinv1)
    for i in range(i2 - i1):
        if nm is not None and i % nm[1] == 0:
            score = W1[:, i:i + nm[1]].pow(2) / diag1[i:i + nm[1]].pow(2).unsqueeze(0)
            lowest = torch.topk(score, nm[1] - nm[0], dim=1, largest=False).indices
            mask1.scatter_(1, i + lowest, True)
        w = W1[:, i]
        if grid is None:
            q = w.masked_fill(mask1[:, i], 0.0)
        else:
            if grid.starts_group(i1 + i):  # GPTQ's dynamic groups, from the current weights
                grid.set_scales(i1 + i, W1[:, i:i + grid.group], ~mask1[:, i:i + grid.group])
            q = grid.round_column(i1 + i, w, ~mask1[:, i])
        Q1[:, i] = q
        err = (w - q) / diag1[i]
        W1[:, i:] -= err.unsqueeze(1) @ Hinv1[i, i:].unsqueeze(0)
        Err1[:, i] = err
    return Q1, Err1


@torch.no_grad()
def obs_sweep(weight: Tensor, stats: InputStats, blocksize: int = 128, percdamp: float = 0.01,
              *, sparsity: float = 0.0, nm: Optional[Tuple[int, int]] = None,
              pruned: Optional[Tensor] = None,
              grid: Optional[ColumnGrid] = None) -> Tuple[Tensor, Tensor]:
    """The column sweep on one ``(d_out, d_in)`` weight (see the module docstring).

    Args:
        weight: the weight (any float dtype; the sweep runs in fp32).
        stats: its input statistics with ``xtx`` (``X^T X``).
        sparsity, nm: the mask to choose (SparseGPT) when ``pruned`` is None.
        pruned: a fixed mask (True = pruned) instead of choosing one.
        grid: quantize as the sweep goes (its ``codes`` and ``scales`` are filled).

    Returns:
        ``(new fp32 values, pruned mask)``.
    """
    W = weight.float().clone()
    rows, cols = W.shape
    Hinv = inverse_hessian_factor(stats, percdamp)
    adaptive = pruned is None
    pruned = torch.zeros_like(W, dtype=torch.bool) if adaptive else pruned.clone()
    nm = nm if adaptive else None
    if nm is not None and cols % nm[1]:
        raise ValueError(f"pattern: {nm[0]}:{nm[1]} needs the input dim to be a multiple of "
                         f"{nm[1]}, got a weight of shape {(rows, cols)}")
    unit = 1 if nm is None else nm[1]
    if grid is not None and grid.dynamic:
        unit = math.lcm(unit, grid.group)  # a group never straddles a block
    elif grid is not None:
        grid.set_scales(0, W, ~pruned)
    blocksize = _aligned_blocksize(blocksize, unit)
    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        mask1 = pruned[:, i1:i2].clone()
        if adaptive and nm is None:
            _select_block_mask(W[:, i1:i2], torch.diag(Hinv)[i1:i2], mask1, sparsity, rows,
                               i1, i2)
        Q1, Err1 = _sweep_block(W, Hinv, i1, i2, mask1, nm, grid)
        W[:, i1:i2] = Q1
        pruned[:, i1:i2] = mask1
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    return W, pruned


def _require_hessian(stats: Optional[InputStats], name: str) -> InputStats:
    if stats is None or stats.count == 0 or stats.xtx is None:
        raise RuntimeError(f"calibration: no input reached {name} during calibration (GPTQ "
                           f"needs its X^T X)")
    return stats


def _from_grid(module: nn.Module, grid: ColumnGrid, kept: Tensor, name: str) -> QuantizedLinear:
    """The :class:`QuantizedLinear` of a swept grid, its codes checked against ``kept``."""
    bias = None if module.bias is None else module.bias.detach().to(grid.dtype)
    return QuantizedLinear.from_codes(grid.codes, grid.scales, grid.bits, bias, mask=kept,
                                      name=name)


def _grid_for(weight: Tensor, spec: QuantSpec, name: str) -> ColumnGrid:
    rows, cols = weight.shape
    group = resolve_group_size(spec, cols, name)
    return ColumnGrid(spec.bits, group, rows, cols, weight.dtype, weight.device)


@torch.no_grad()
def gptq_linear(module: nn.Module, stats: InputStats, spec: QuantSpec, name: str = "layer",
                blocksize: int = 128, percdamp: float = 0.01) -> QuantizedLinear:
    """GPTQ of a pruned Linear/Conv1D with its mask ``W != 0`` fixed: pruned weights stay code 0,
    kept ones are quantized column by column with the error spread over the later columns.
    Raises ``RuntimeError`` without calibration inputs, ``ValueError`` for a group that does not
    divide ``d_in``."""
    weight = oriented_weight(module).detach()
    grid = _grid_for(weight, spec, name)
    grid.importance = _require_hessian(stats, name).sumsq
    kept = weight != 0
    obs_sweep(weight, _require_hessian(stats, name), blocksize, percdamp, pruned=~kept,
              grid=grid)
    return _from_grid(module, grid, kept, name)


@torch.no_grad()
def sparsegpt_quantized_linear(module: nn.Module, stats: InputStats, spec: QuantSpec,
                               sparsity: float, nm: Optional[Tuple[int, int]] = None,
                               name: str = "layer", blocksize: int = 128,
                               percdamp: float = 0.01) -> QuantizedLinear:
    """SparseGPT's joint mode on a dense Linear/Conv1D: the mask (``sparsity`` unstructured, or
    ``nm``) is chosen and the kept weights quantized in one sweep. The module is not changed."""
    weight = oriented_weight(module).detach()
    grid = _grid_for(weight, spec, name)
    grid.importance = _require_hessian(stats, name).sumsq
    _, pruned = obs_sweep(weight, _require_hessian(stats, name), blocksize, percdamp,
                          sparsity=sparsity, nm=nm, grid=grid)
    return _from_grid(module, grid, ~pruned, name)


def quantize_calibrated_linear(module: nn.Module, spec: QuantSpec, method: str,
                               stats: Optional[InputStats], name: str = "layer",
                               blocksize: int = 128, percdamp: float = 0.01) -> QuantizedLinear:
    """A pruned linear as a :class:`QuantizedLinear` on its mask: ``"rtn"`` (round to nearest;
    with ``stats``, scales searched under the inputs' sums of squares) or ``"gptq"`` (needs
    ``stats`` with ``X^T X``; its group scales are searched the same way)."""
    if method == "rtn":
        return quantize_linear(module, spec, name,
                               importance=None if stats is None or not stats.count
                               else stats.sumsq)
    if method == "gptq":
        return gptq_linear(module, stats, spec, name, blocksize, percdamp)
    raise ValueError(f"quant_method: must be one of {QUANT_METHODS}, got {method!r}")


def check_quantization(modules: Dict[str, nn.Module], bits: int, group_size: Optional[int],
                       method: str) -> QuantSpec:
    """The :class:`QuantSpec` once ``bits``, ``method`` and the group size of every module in
    ``modules`` are checked (``ValueError`` naming the first that fails; ``TypeError``: int)."""
    if method not in QUANT_METHODS:
        raise ValueError(f"quant_method: must be one of {QUANT_METHODS}, got {method!r}")
    spec = QuantSpec(bits, group_size)
    for name, module in modules.items():
        weight = oriented_weight(module)
        if not weight.is_floating_point():
            raise TypeError(f"{name}: a {weight.dtype} weight cannot be quantized")
        resolve_group_size(spec, weight.shape[1], name)
    return spec


@torch.no_grad()
def quantize_pruned_model(model: nn.Module, bits: int, group_size: Optional[int] = 128,
                          method: str = "gptq", calibration=None, *, targets=None,
                          exclude: Sequence[str] = ("lm_head",), progress: bool = True,
                          blocksize: int = 128, percdamp: float = 0.01) -> List[SparsityRow]:
    """Replace the target linears of an already-pruned model by :class:`QuantizedLinear` s on
    their masks (``W != 0``; a dense linear is quantized whole), in place.

    Args:
        bits, group_size: the grid (4 or 8 bits; inputs per scale, None = one per row).
        method: ``"gptq"`` (calibrated, block by block for HF decoders: each block's inputs come
            from the quantized blocks before it) or ``"rtn"`` (round to nearest).
        calibration: ``input_ids`` as :func:`lors_fx.workflows.prune.prune_model` takes them
            (needed by GPTQ; with RTN it sets the scales: without it they are ``absmax /
            qmax``, which forces the tiny kept weights of outlier input channels to a whole
            step and can wreck a real LLM, see :func:`lors_fx.quant.search_scales`).
        targets, exclude, progress, blocksize, percdamp: as in ``prune_model``.

    Returns:
        The :class:`lors_fx.sparsity.SparsityRow` of each quantized module.

    Raises:
        ValueError: bad ``bits``/``method``/``blocksize``/``percdamp``, a group size that does
        not divide some target's ``d_in``, or GPTQ without calibration; the model is then
        unchanged.
    """
    from tqdm.auto import tqdm

    modules = target_linears(model, targets, exclude)
    if not modules:
        raise ValueError("targets: the model has no linear module to quantize")
    spec = check_quantization(modules, bits, group_size, method)
    if not isinstance(blocksize, int) or blocksize < 1 or not percdamp >= 0:
        raise ValueError(f"blocksize, percdamp: need a positive int and a number >= 0, got "
                         f"{blocksize!r}, {percdamp!r}")
    batches = calibration_batches(calibration) if calibration is not None else []
    if method == "gptq" and not batches:
        raise ValueError("calibration: GPTQ needs calibration inputs (input_ids tensors)")
    label = f"{method} int{bits}"

    def bar(items, unit):
        return tqdm(items, desc=label, disable=not progress, unit=unit)

    def apply(name, module, stats):
        new = quantize_calibrated_linear(module, spec, method, stats, name, blocksize, percdamp)
        replace_module(model, name, new)

    run_on_targets(model, modules, batches or None, bar, apply, hessian=method == "gptq")
    return [row for row in sparsity_report(model) if row.name in modules]
