"""The repeated blocks of a model (decoder layers): what ``compile_model(scope="blocks")``
compiles one by one and what :func:`lors_fx.distributed.shard_model` shards one by one."""
from __future__ import annotations

from typing import List, Optional, Tuple

from torch import nn

__all__ = ["decoder_blocks", "inside"]


def inside(name: str, block: str) -> bool:
    """True when the module ``name`` is the block ``block`` or inside it."""
    return name == block or name.startswith(block + ".")


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
                  if not any(n != other and inside(n, other) for other, _ in blocks)]
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


