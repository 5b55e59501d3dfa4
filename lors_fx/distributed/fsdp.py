"""LoRS under FSDP2 (``torch.distributed.fsdp.fully_shard``): shard, attach, compile, save.

Two orders work; both end with every decoder block and the root sharded and the adapters sharded
with them. In order A (``compile=True``) each block's forward is compiled with the lors backend;
order B runs the eager op (see :func:`attach_sharded`)::

    # A: adapters first, then shard (gradient init runs here, on the unsharded model)
    lors_fx.optimize(model, config, init_data=...)     # the same on every rank
    lors_fx.distributed.shard_model(model)            # fully_shard per block + root

    # B: shard first (your own fully_shard calls, or shard_model), then adapters
    lors_fx.distributed.shard_model(model)
    lors_fx.optimize(model, config, compile=False)    # attaches in place, shards the adapters

The op reads ``M = W != 0`` from the weight FSDP2 has just all-gathered, so no mask buffer is
stored, replicated or sharded. Adapters are broadcast from rank 0 when they are sharded, so every
rank starts from the same init. :func:`lors_fx.save_adapters` gathers only the adapter shards
(every rank calls it; rank 0 writes). ``lors-fx merge`` then works from those files in one
process. DeepSpeed ZeRO-2/3 is in :mod:`lors_fx.distributed.deepspeed`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from lors_fx._collectives import (comm_device, first_rank, full_tensor, is_sharded, mesh_group,
                                  require_process_group)
from lors_fx.adapters import LorsLinear, find_targets, freeze_all_but_adapters, lors_modules
from lors_fx.compiler import _torch_private as private
from lors_fx.compiler import compile_model, compile_state_of, decompile_model, is_compiled
from lors_fx.compiler.blocks import decoder_blocks, inside
from lors_fx.config import LorsConfig
from lors_fx.ops import masked_update_nonzeros
from lors_fx.state import LorsState, set_state

__all__ = ["full_tensor", "is_sharded", "decoder_blocks", "shard_model", "attach_sharded", "broadcast_adapters",
           "sharded_audit", "new_nonzeros"]


def _adapter_params(model: nn.Module) -> List[nn.Parameter]:
    return [getattr(m, part) for m in lors_modules(model).values() for part in ("lora_A", "lora_B")]


@torch.no_grad()
def broadcast_adapters(model: nn.Module, group=None) -> int:
    """Copy rank 0's ``lora_A``/``lora_B`` to every rank of ``group`` (default: the world).

    For unsharded adapters (plain tensors): call it before sharding, so all ranks hold the same
    init. Returns the number of tensors broadcast. A collective: every rank must call it.
    """
    require_process_group()
    params = _adapter_params(model)
    if any(hasattr(p, "full_tensor") for p in params):
        raise ValueError("broadcast_adapters: the adapters are already sharded (DTensor); "
                         "broadcast before fully_shard")
    src, device = first_rank(group), comm_device(group)
    for param in params:
        if param.device == device:
            dist.broadcast(param.data, src=src, group=group)
        else:
            buffer = param.data.to(device)
            dist.broadcast(buffer, src=src, group=group)
            param.data.copy_(buffer)
    return len(params)


def shard_model(model: nn.Module, *, mesh=None, reshard_after_forward: bool = True,
                mp_policy=None) -> nn.Module:
    """``fully_shard`` every decoder block, then the root; returns ``model`` (now an FSDPModule).

    If the model already has LoRS adapters they are broadcast from rank 0 first and sharded with
    their block; if it was compiled by :func:`lors_fx.optimize`, it is recompiled per block
    (FSDP2's hooks run between compiled blocks, outside the graphs). ``mesh``,
    ``reshard_after_forward`` and ``mp_policy`` go to every ``fully_shard`` call; the root keeps
    its parameters (embeddings, final norm, lm_head) gathered after forward, as usual.
    Needs an initialized process group; raises on a model that is already sharded.
    """
    from torch.distributed.fsdp import fully_shard

    require_process_group()
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_model: model must be an nn.Module, got {type(model).__name__}")
    if is_sharded(model):
        raise ValueError("shard_model: the model is already sharded (fully_shard was applied); "
                         "call lors_fx.optimize(model, config) on it to add adapters")
    blocks = decoder_blocks(model)
    outside = [n for n in lors_modules(model)
               if not any(inside(n, b) for b, _ in blocks)]
    if outside:
        raise ValueError(f"shard_model: adapted modules outside the decoder blocks {outside[:4]}: "
                         f"they would be gathered with the root for the whole step")
    recompile = is_compiled(model)
    state = compile_state_of(model)
    if recompile:
        decompile_model(model)
    if lors_modules(model):
        broadcast_adapters(model, group=mesh_group(mesh))
    options = dict(mesh=mesh, mp_policy=mp_policy) if mp_policy is not None else dict(mesh=mesh)
    for _, block in blocks:
        fully_shard(block, reshard_after_forward=reshard_after_forward, **options)
    fully_shard(model, reshard_after_forward=False, **options)
    if recompile:
        compile_model(model, state.config)
    return model


def _fsdp_owner(model: nn.Module, fqn: str) -> Tuple[str, nn.Module]:
    """The closest module on the path to ``fqn`` that fully_shard was applied to."""
    from torch.distributed.fsdp import FSDPModule

    parts = fqn.split(".")
    for end in range(len(parts) - 1, -1, -1):
        name = ".".join(parts[:end])
        module = model.get_submodule(name)
        if isinstance(module, FSDPModule):
            return name, module
    raise ValueError(f"{fqn} is not inside a fully_shard-ed module")


def attach_sharded(model: nn.Module, config: LorsConfig) -> List[str]:
    """:func:`lors_fx.attach_adapters` for a model that FSDP2 already sharded (order B).

    FSDP2 all-gathers each weight into the module object it found at ``fully_shard`` time, so the
    target ``nn.Linear`` modules are turned into :class:`LorsLinear` in place (same object, same
    hooks) instead of being replaced. The new ``lora_A``/``lora_B`` are broadcast from rank 0,
    then sharded with one extra ``fully_shard`` group per block (``ignored_params`` = the weights
    the block's group already manages). Must run before the sharded model's first forward.
    Returns the adapted module names.

    Those extra groups hook every adapted module, which splits a compiled block at each of them;
    so in this order the adapters run the eager op (it saves only ``x`` all the same), and
    :func:`lors_fx.optimize` says so when asked to compile. Order A compiles each block.
    """
    from torch.distributed.fsdp import FSDPModule, fully_shard

    require_process_group()
    if private.fsdp_lazy_initialized(model):
        raise RuntimeError("optimize: the sharded model has already run a forward; FSDP2 fixed "
                           "its parameter groups then. Attach adapters before the first step")
    targets = find_targets(model, config)
    for name, module in targets:
        if isinstance(module, FSDPModule) or type(module) is not nn.Linear:
            raise NotImplementedError(
                f"optimize on a sharded model: {name} is a {type(module).__name__}; only plain "
                f"nn.Linear inside sharded blocks can be adapted after fully_shard (shard whole "
                f"decoder blocks, or call optimize before sharding)")
    groups: Dict[str, List[nn.Module]] = {}
    owners: Dict[str, nn.Module] = {}
    for name, module in targets:
        owner_name, owner = _fsdp_owner(model, name)
        groups.setdefault(owner_name, []).append(module)
        owners[owner_name] = owner
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    options = dict(grad_mode=config.grad_mode, recompute=config.recompute,
                   chunk_bytes=config.chunk_bytes, lora_dropout=config.lora_dropout,
                   adapter_dtype=config.adapter_dtype)
    for _, module in targets:
        module.__class__ = LorsLinear  # in place: FSDP2 keeps a reference to this object
        module._init_adapter(module, config.r, config.scaling, **options)
    freeze_all_but_adapters(model)
    mesh = targets[0][1].weight.device_mesh
    broadcast_adapters(model, group=mesh_group(mesh))
    # Adapters stay gathered from forward to the end of backward (they are r*(d_in+d_out) per
    # module), so their backward needs no re-gather.
    for modules in groups.values():
        base = {p for m in modules for n, p in m.named_parameters(recurse=False)
                if n not in ("lora_A", "lora_B")}
        fully_shard(modules, mesh=mesh, ignored_params=base, reshard_after_forward=False)
    set_state(model, LorsState(config=config, requires_grad=flags))
    return [name for name, _ in targets]


def new_nonzeros(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> int:
    """Positions outside ``W != 0`` where the weight the op multiplies by,
    ``W' = W + s*(B@A)*M``, is nonzero (full tensors; the op's own construction). 0 = sparse."""
    return masked_update_nonzeros(weight, lora_A, lora_B, scaling)


@contextlib.contextmanager
def _gather_dtensors(module: nn.Module) -> Iterator[Tuple[torch.Tensor, ...]]:
    yield tuple(full_tensor(t) for t in (module.true_weight(), module.lora_A, module.lora_B))


@torch.no_grad()
def sharded_audit(model: nn.Module, gather: Optional[Callable] = None) -> Dict[str, int]:
    """Check every adapted module of a sharded model, gathering one module at a time.

    ``gather(module)``: a context manager yielding the module's full ``(weight, lora_A, lora_B)``
    (default: FSDP2 DTensors all-gathered; :func:`lors_fx.distributed.deepspeed.sharded_audit_deepspeed`
    passes ZeRO-3's). Returns ``{"checked": modules, "violations": positions}`` on every rank (a
    collective): a violation is a nonzero of ``W'`` where the frozen base is zero
    (:func:`new_nonzeros`). Raises if a base weight is trainable.
    """
    gather = _gather_dtensors if gather is None else gather
    checked = violations = 0
    for name, module in sorted(lors_modules(model).items()):
        if module.weight.requires_grad:
            raise RuntimeError(f"sharded_audit: {name}.weight is trainable; LoRS trains only "
                               f"the adapters")
        with gather(module) as (weight, lora_A, lora_B):
            violations += new_nonzeros(weight, lora_A, lora_B, module.scaling)
        checked += 1
    return {"checked": checked, "violations": violations}
