"""Process-group helpers that every layer may need (a sharded model can reach core code):
whole tensors from DTensor shards, whether FSDP2 sharded a model, and where collectives run."""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["full_tensor", "is_sharded", "require_process_group", "mesh_group", "comm_device",
           "first_rank"]


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """``tensor`` whole: a DTensor (an FSDP2 shard) is all-gathered, a collective every rank
    of its mesh must join; a plain tensor is returned as it is."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def is_sharded(model: nn.Module) -> bool:
    """True when ``fully_shard`` was applied to ``model`` or any of its submodules."""
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def require_process_group() -> None:
    """Raise with what to do when no ``torch.distributed`` process group is initialized."""
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
