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
process. DeepSpeed ZeRO-2/3 is in :mod:`lors_fx.deepspeed_engine`.
"""
from __future__ import annotations

import contextlib
import warnings
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from .config import LorsConfig

__all__ = ["full_tensor", "is_sharded", "decoder_blocks", "shard_model", "attach_sharded", "broadcast_adapters",
           "sharded_audit", "new_nonzeros"]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (an FSDP2 shard) is all-gathered, a collective every rank
    of its mesh must join; a plain tensor is returned as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def _class_names(module: nn.Module) -> set:
    return {cls.__name__ for cls in type(module).__mro__}


def decoder_blocks(model: nn.Module) -> List[Tuple[str, nn.Module]]:
    """The repeated blocks to shard (and compile) one by one, as ``(fqn, module)``.

    Hugging Face models name them in ``_no_split_modules`` (``LlamaDecoderLayer``...); otherwise
    the children of the largest ``nn.ModuleList`` whose children share one class. Raises
    ``ValueError`` when there is none.
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        blocks = [(n, m) for n, m in model.named_modules() if n and _class_names(m) & names]
        # keep the outermost: a block class never nests inside another block here
        blocks = [(n, m) for n, m in blocks
                  if not any(n.startswith(other + ".") for other, _ in blocks)]
        if blocks:
            return blocks
    best: Optional[Tuple[str, nn.ModuleList]] = None
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) > 0 and \
                len({type(child) for child in module}) == 1:
            size = sum(p.numel() for p in module.parameters())
            if best is None or size > sum(p.numel() for p in best[1].parameters()):
                best = (name, module)
    if best is None:
        raise ValueError(f"decoder_blocks: {type(model).__name__} has no repeated blocks "
                         f"(no _no_split_modules and no nn.ModuleList of one class)")
    prefix = f"{best[0]}." if best[0] else ""
    return [(f"{prefix}{i}", child) for i, child in enumerate(best[1])]


def _require_process_group() -> None:
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("lors_fx.distributed: no process group; launch with torchrun and call "
                           "torch.distributed.init_process_group() first ('gloo' on CPU, "
                           "'nccl' on GPU)")


def mesh_group(mesh):
    """The process group over every rank of ``mesh``: its group for a 1-D mesh; for a 2-D HSDP
    mesh (replicate x shard) that spans the world, ``None`` (the default group)."""
    if mesh is None or mesh.ndim == 1:
        return None if mesh is None else mesh.get_group()
    if mesh.size() != dist.get_world_size():
        raise NotImplementedError(f"lors_fx.distributed: a {mesh.ndim}-D mesh of {mesh.size()} "
                                  f"ranks in a world of {dist.get_world_size()}: only data "
                                  f"parallel meshes (FSDP, or HSDP over the whole world)")
    return None


def comm_device(group) -> torch.device:
    """Where a collective's tensors must live: the current CUDA device for nccl, else the CPU."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def first_rank(group) -> int:
    """Global rank of ``group``'s first rank (0 for the default group)."""
    return 0 if group is None else dist.get_global_rank(group, 0)


def _adapter_params(model: nn.Module) -> List[nn.Parameter]:
    from .adapters import lors_modules

    return [getattr(m, part) for m in lors_modules(model).values() for part in ("lora_A", "lora_B")]


@torch.no_grad()
def broadcast_adapters(model: nn.Module, group=None) -> int:
    """Copy rank 0's ``lora_A``/``lora_B`` to every rank of ``group`` (default: the world).

    For unsharded adapters (plain tensors): call it before sharding, so all ranks hold the same
    init. Returns the number of tensors broadcast. A collective: every rank must call it.
    """
    _require_process_group()
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
    from .adapters import lors_modules
    from .backend import STATE_ATTR
    from .compiled_model import compile_model, decompile_model

    _require_process_group()
    if not isinstance(model, nn.Module):
        raise TypeError(f"shard_model: model must be an nn.Module, got {type(model).__name__}")
    if is_sharded(model):
        raise ValueError("shard_model: the model is already sharded (fully_shard was applied); "
                         "call lors_fx.optimize(model, config) on it to add adapters")
    blocks = decoder_blocks(model)
    outside = [n for n in lors_modules(model)
               if not any(n == b or n.startswith(b + ".") for b, _ in blocks)]
    if outside:
        raise ValueError(f"shard_model: adapted modules outside the decoder blocks {outside[:4]}: "
                         f"they would be gathered with the root for the whole step")
    state = model.__dict__.get(STATE_ATTR)
    recompile = state is not None and state.original_forward is not None
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
    from . import _torch_private as private
    from .adapters import LorsLinear, find_targets

    _require_process_group()
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
    model._lors_requires_grad = {n: p.requires_grad for n, p in model.named_parameters()}
    options = dict(grad_mode=config.grad_mode, recompute=config.recompute,
                   chunk_bytes=config.chunk_bytes, lora_dropout=config.lora_dropout)
    for _, module in targets:
        module.__class__ = LorsLinear  # in place: FSDP2 keeps a reference to this object
        module._init_adapter(module, config.r, config.scaling, **options)
    for name, param in model.named_parameters():
        param.requires_grad_(name.endswith(".lora_A") or name.endswith(".lora_B"))
    mesh = targets[0][1].weight.device_mesh
    broadcast_adapters(model, group=mesh_group(mesh))
    # Adapters stay gathered from forward to the end of backward (they are r*(d_in+d_out) per
    # module): their backward then needs no re-gather, so FSDP2's warning about outputs that are
    # views (an in-place op on one would skip a pre-backward re-gather) does not apply to them.
    warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \((FSDPLorsLinear(, )?)+\) "
                            r"returned a view tensor")
    for modules in groups.values():
        base = {p for m in modules for n, p in m.named_parameters(recurse=False)
                if n not in ("lora_A", "lora_B")}
        fully_shard(modules, mesh=mesh, ignored_params=base, reshard_after_forward=False)
    model.lors_config = config
    return [name for name, _ in targets]


def new_nonzeros(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 scaling: float) -> int:
    """Positions outside ``W != 0`` where the weight the op multiplies by,
    ``W' = W + s*(B@A)*M``, is nonzero (full tensors; the op's own construction). 0 = sparse."""
    from .ops import _compute_dtype_params, _effective_weight

    lora_A, lora_B = _compute_dtype_params(weight, lora_A, lora_B)
    w_eff = _effective_weight(weight, lora_A, lora_B, scaling, True)
    return int(((w_eff != 0) & (weight == 0)).sum())


@contextlib.contextmanager
def _gather_dtensors(module: nn.Module) -> Iterator[Tuple[torch.Tensor, ...]]:
    yield tuple(full_tensor(t) for t in (module.true_weight(), module.lora_A, module.lora_B))


@torch.no_grad()
def sharded_audit(model: nn.Module, gather: Optional[Callable] = None) -> Dict[str, int]:
    """Check every adapted module of a sharded model, gathering one module at a time.

    ``gather(module)``: a context manager yielding the module's full ``(weight, lora_A, lora_B)``
    (default: FSDP2 DTensors all-gathered; :func:`lors_fx.deepspeed_engine.sharded_audit_deepspeed`
    passes ZeRO-3's). Returns ``{"checked": modules, "violations": positions}`` on every rank (a
    collective): a violation is a nonzero of ``W'`` where the frozen base is zero
    (:func:`new_nonzeros`). Raises if a base weight is trainable.
    """
    from .adapters import lors_modules

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
