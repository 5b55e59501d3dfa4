"""Gradient-based adapter init (LoRS): lora_A = top-r right singular vectors of the weight gradient.

For each adapted module the averaged dense weight gradient ``G = sum_b (n_b / N) * g_b.T @ x_b``
(``g_b`` the gradient of batch ``b``'s loss with respect to the module's output, ``x_b`` its input,
``n_b`` its example count, ``N`` the total) is accumulated from hooks; the base weights never
require grad. Then ``U, S, V = svd_lowrank(G)`` (``G * M`` with ``mask_gradient``),
``lora_A = row_norm * V[:, :r].T`` and ``lora_B = 0``, so the model's output at step 0 is unchanged.

Row norm: the singular vectors have unit norm, but PEFT's Kaiming-uniform ``lora_A`` (``a=sqrt(5)``,
bound ``1/sqrt(d_in)``) has rows of expected norm ``1/sqrt(3)``. Learning rates are tuned for that
scale (the adapter's effective step grows with ``|A|``), so by default the rows are scaled to
``1/sqrt(3)``: the direction is the gradient's, the scale PEFT's (docs/results.md compares the
scales).

Streaming: a dense ``d_out x d_in`` float32 accumulator per layer is the memory cost, so layers are
processed in groups whose accumulators fit in ``max_gradient_bytes`` and the batches are run again
for every group. With a budget larger than all layers together (the default for small models) that
is one pass; with a small budget it is one pass per layer: less memory, more compute (a forward and
backward per group). The batches are kept in a list (at most ``samples`` examples) to be re-run.

The model runs in eval mode during the init (no dropout: the init is deterministic given the data
and the RNG of ``svd_lowrank``); its training flag is restored afterwards.

Sharded (FSDP2, adapters are DTensors): every rank runs its own batches; the per-layer ``G`` is
summed on the first rank of the adapters' mesh (weighted by the examples of all ranks), which runs
the SVD; each new ``lora_A`` is scattered with its parameter's placements. So ``G`` is the average
over every rank's examples, as one process would compute it on all of them.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, Iterable, List, Optional

import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from lors_fx._collectives import comm_device, first_rank, full_tensor, mesh_group
from lors_fx.adapters import lors_modules
from lors_fx.config import LorsConfig
from lors_fx.state import state_of

__all__ = ["gradient_init", "DEFAULT_GRADIENT_BYTES", "PEFT_ROW_NORM"]

#: Default bound on the dense gradient accumulators alive at once (float32).
DEFAULT_GRADIENT_BYTES = 256 * 2**20
#: Expected row norm of PEFT's Kaiming-uniform lora_A (uniform(-1/sqrt(d), 1/sqrt(d)) rows).
PEFT_ROW_NORM = 1 / math.sqrt(3)
_OVERSAMPLING = 10


def _batch_size(batch) -> int:
    if isinstance(batch, Tensor):
        return batch.shape[0] if batch.dim() else 1
    values = batch.values() if isinstance(batch, dict) else batch
    for value in values:
        if isinstance(value, Tensor) and value.dim():
            return value.shape[0]
    raise TypeError(f"gradient_init: cannot tell the batch size of a {type(batch).__name__} "
                    "(expected a tensor, a dict of tensors or a tuple of tensors)")


def _head(batch, n: int):
    """The first ``n`` examples of ``batch`` (tensors sliced along dim 0)."""
    cut = lambda v: v[:n] if isinstance(v, Tensor) and v.dim() else v
    if isinstance(batch, Tensor):
        return batch[:n]
    if isinstance(batch, dict):
        return {k: cut(v) for k, v in batch.items()}
    return type(batch)(cut(v) for v in batch)


def _collect(batches: Iterable, samples: int) -> List[tuple]:
    """``[(batch, n_examples)]`` until ``samples`` examples (the last batch trimmed)."""
    kept, total = [], 0
    for batch in batches:
        n = min(_batch_size(batch), samples - total)
        if n <= 0:
            break
        kept.append((_head(batch, n), n))
        total += n
        if total >= samples:
            break
    return kept


def _loss(model: nn.Module, batch, loss_fn: Optional[Callable]) -> Tensor:
    if loss_fn is not None:
        return loss_fn(model, batch)
    if not isinstance(batch, dict):
        raise TypeError(f"gradient_init: batches of {type(batch).__name__} need "
                        "loss_fn(model, batch) -> scalar loss")
    output = model(**batch)
    loss = getattr(output, "loss", None)
    if loss is None and isinstance(output, dict):
        loss = output.get("loss")
    if loss is None:
        raise ValueError("gradient_init: model(**batch) returned no loss; include labels in the "
                         "batch or pass loss_fn(model, batch)")
    return loss


def _groups(modules: Dict[str, nn.Module], budget: int) -> List[List[str]]:
    groups, current, used = [], [], 0
    for name, module in modules.items():
        size = module.d_out * module.d_in * 4
        if current and used + size > budget:
            groups.append(current)
            current, used = [], 0
        current.append(name)
        used += size
    return groups + ([current] if current else [])


def _accumulate(model, modules, names, kept, loss_fn, total, bar) -> Dict[str, Tensor]:
    """Run every batch once; return ``{name: G}`` (float32) for the modules in ``names``."""
    grads = {n: torch.zeros(modules[n].d_out, modules[n].d_in, device=modules[n].weight.device)
             for n in names}
    for batch, n in kept:
        captured = []  # (name, x, probe) per call: a module may run more than once per forward

        def make_hook(name):
            def hook(module, args, output):
                # y + 0 keeps the graph, and d loss / d probe = d loss / d y exactly.
                probe = torch.zeros_like(output, requires_grad=True)
                captured.append((name, args[0].detach(), probe))
                return output + probe
            return hook

        handles = [modules[name].register_forward_hook(make_hook(name)) for name in names]
        try:
            with torch.enable_grad():
                loss = _loss(model, batch, loss_fn)
                if not isinstance(loss, Tensor) or loss.numel() != 1:
                    raise ValueError("gradient_init: the loss must be a scalar tensor")
                probes = [probe for _, _, probe in captured]
                g_out = torch.autograd.grad(loss, probes, allow_unused=True) if probes else []
        finally:
            for handle in handles:
                handle.remove()
        for (name, x, _), g in zip(captured, g_out):
            if g is None:
                continue
            d_in, d_out = x.shape[-1], g.shape[-1]
            grads[name].addmm_(g.reshape(-1, d_out).t().float(), x.reshape(-1, d_in).float(),
                               alpha=n / total)
        del captured
        bar.update(1)
    return grads


def _sharded_process_group(modules: Dict[str, nn.Module]):
    """``(mesh, process group)`` of FSDP2-sharded adapters (DTensors), else None (one
    process)."""
    lora_A = next(iter(modules.values())).lora_A
    mesh = getattr(lora_A, "device_mesh", None)
    return (mesh, mesh_group(mesh)) if mesh is not None else None


@torch.no_grad()
def _top_right_vectors(module: nn.Module, grad: Tensor, mask_gradient: bool, row_norm: float):
    """``(energy share of the top r, new lora_A or None when the gradient carries no signal)``."""
    if mask_gradient:
        grad.mul_(full_tensor(module.true_weight()) != 0)
    energy = float(grad.pow(2).sum())
    if energy == 0.0 or not torch.isfinite(grad).all():
        return 0.0, None
    r = module.r
    q = min(r + _OVERSAMPLING, *grad.shape)
    _, S, V = torch.svd_lowrank(grad, q=q, niter=4)
    lora_A = V[:, :r].t().mul(row_norm).to(module.lora_A.dtype)
    return min(1.0, float(S[:r].pow(2).sum()) / energy), lora_A


def gradient_init(model: nn.Module, batches: Iterable, *, loss_fn: Optional[Callable] = None,
                  config: Optional[LorsConfig] = None, samples: Optional[int] = None,
                  mask_gradient: Optional[bool] = None, progress: bool = True,
                  max_gradient_bytes: int = DEFAULT_GRADIENT_BYTES,
                  row_norm: float = PEFT_ROW_NORM) -> Dict[str, float]:
    """Set every adapter to lora_A = top-r right singular vectors of its averaged weight
    gradient, lora_B = 0 (the model's output is unchanged).

    Args:
        model: a model with LoRS adapters (:func:`lors_fx.optimize` / ``attach_adapters``).
        batches: iterable of batches: dicts of tensors with labels (HF style, the loss is
            ``model(**batch).loss``) or anything ``loss_fn`` accepts. Each batch's loss must be a
            mean over its examples. Read once; up to ``samples`` examples are kept and re-run.
        loss_fn: ``loss_fn(model, batch) -> scalar`` (required for non-dict batches).
        config: default the model's; gives the defaults of the next two.
        samples: examples to average over (``config.init_samples``).
        mask_gradient: multiply G by ``M = W != 0`` before the SVD (``init_mask_gradient``).
        progress: show a tqdm progress bar.
        max_gradient_bytes: bound on the float32 accumulators alive at once (layers in groups).
        row_norm: norm of each lora_A row (default ``1/sqrt(3)``, PEFT's scale; module docstring).

    Returns ``{module name: share of G's energy (squared Frobenius norm) in the top r}``; 0.0
    for a layer that got no gradient (its lora_A is left as it was).
    """
    modules = lors_modules(model)
    if not modules:
        raise ValueError("gradient_init: model has no LoRS adapters; call optimize/attach first")
    samples, mask_gradient = _settings(model, config, samples, mask_gradient, row_norm)
    kept = _kept_batches(batches, samples)
    sharded = _sharded_process_group(modules)
    group = None if sharded is None else sharded[1]
    total = _total_examples(kept, sharded, group)
    lead = sharded is None or torch.distributed.get_rank(group) == 0
    groups = _groups(modules, max_gradient_bytes)
    was_training = model.training
    shares: Dict[str, float] = {}
    new_A: Dict[str, Optional[Tensor]] = {}
    model.eval()
    bar = tqdm(total=len(groups) * len(kept), desc="gradient init", disable=not progress,
               leave=False)
    try:
        for names in groups:
            grads = _accumulate(model, modules, names, kept, loss_fn, total, bar)
            for name in names:
                found = _reduce_and_decompose(modules[name], grads.pop(name), sharded, group,
                                              lead, mask_gradient, row_norm)
                if found is not None:
                    shares[name], new_A[name] = found
    finally:
        bar.close()
        model.train(was_training)
    if sharded is not None:
        _share_from_lead(modules, shares, new_A, group)
    with torch.no_grad():  # only now, so that a failure above leaves the adapters untouched
        for name, module in modules.items():
            if new_A[name] is not None:
                module.lora_A.copy_(new_A[name])
            module.lora_B.zero_()
    return shares


def _reduce_and_decompose(module: nn.Module, grad: Tensor, sharded, group, lead: bool,
                          mask_gradient: bool, row_norm: float):
    """Sum a sharded ``G`` on the first rank; there (or in one process) take its top right
    singular vectors: ``(energy share, new lora_A or None)``; None on the other ranks."""
    if sharded is not None:
        torch.distributed.reduce(grad, dst=first_rank(group), group=group)
        if mask_gradient and not lead:
            full_tensor(module.true_weight())  # the collective the lead runs
    return _top_right_vectors(module, grad, mask_gradient, row_norm) if lead else None


def _settings(model: nn.Module, config: Optional[LorsConfig], samples, mask_gradient,
              row_norm) -> tuple:
    """``(samples, mask_gradient)`` from the arguments or the config, validated."""
    if config is None and state_of(model) is not None:
        config = state_of(model).config
    config = LorsConfig() if config is None else config
    samples = config.init_samples if samples is None else samples
    mask_gradient = bool(config.init_mask_gradient) if mask_gradient is None else mask_gradient
    if not (isinstance(row_norm, (int, float)) and math.isfinite(row_norm) and row_norm > 0):
        raise ValueError(f"gradient_init: row_norm must be a finite number > 0, got {row_norm!r}")
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"gradient_init: samples must be a positive int, got {samples!r}")
    return samples, mask_gradient


def _kept_batches(batches, samples: int) -> List[tuple]:
    if batches is None:
        raise ValueError("gradient_init: batches is None; pass an iterable of batches")
    if isinstance(batches, (Tensor, dict)):
        batches = [batches]
    kept = _collect(batches, samples)
    if not kept:
        raise ValueError("gradient_init: batches is empty; pass an iterable of batches (dicts "
                         "with labels, or anything loss_fn(model, batch) accepts)")
    return kept


def _total_examples(kept: List[tuple], sharded, group) -> float:
    """Examples the average runs over: every rank's when the adapters are sharded."""
    total = sum(n for _, n in kept)
    if sharded is not None:
        count = torch.tensor([float(total)], device=comm_device(group))
        torch.distributed.all_reduce(count, group=group)
        total = count.item()
    return total


def _share_from_lead(modules: Dict[str, nn.Module], shares: Dict[str, float],
                     new_A: Dict[str, Optional[Tensor]], group) -> None:
    """Sharded adapters: the first rank computed every new lora_A; scatter each as a DTensor
    with its parameter's placements, and give every rank the same energy shares."""
    from torch.distributed.tensor import distribute_tensor

    lead = torch.distributed.get_rank(group) == 0
    box = [(shares, {n: a is not None for n, a in new_A.items()}) if lead else None]
    torch.distributed.broadcast_object_list(box, src=first_rank(group), group=group)
    shares.update(box[0][0])
    for name, module in modules.items():
        lora_A = module.lora_A
        if not box[0][1][name]:
            new_A[name] = None  # no signal: keep the init, on every rank
            continue
        local = new_A.get(name)
        if local is None:  # placeholder: distribute_tensor sends the first rank's values
            local = torch.empty(lora_A.shape, dtype=lora_A.dtype, device=lora_A.device)
        new_A[name] = distribute_tensor(local, lora_A.device_mesh, lora_A.placements,
                                        src_data_rank=0)
