"""Scale-out: FSDP2 (:mod:`lors_fx.distributed.fsdp`, its names re-exported here) and DeepSpeed
ZeRO-2/3 (:mod:`lors_fx.distributed.deepspeed`, imported on demand: deepspeed is optional)."""
from lors_fx._collectives import comm_device, first_rank, full_tensor, is_sharded, mesh_group
from lors_fx.compiler.blocks import decoder_blocks
from lors_fx.distributed.fsdp import (attach_sharded, broadcast_adapters, new_nonzeros, shard_model,
                                      sharded_audit)

__all__ = ["full_tensor", "is_sharded", "decoder_blocks", "shard_model", "attach_sharded",
           "broadcast_adapters", "sharded_audit", "new_nonzeros", "mesh_group", "comm_device",
           "first_rank"]
