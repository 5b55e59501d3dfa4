"""Save and load adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys read like PEFT's (``base_model.model.<module>.lora_A.weight``), so the files can be inspected
with the usual tools. Only safetensors is read: pickle files are refused (they can run code).
"""
from __future__ import annotations

import json
import math
import os
from typing import List, Tuple

import torch
from torch import nn

from lors_fx._collectives import full_tensor
from lors_fx._version import __version__
from lors_fx.adapters import lors_modules
from lors_fx.config import LorsConfig
from lors_fx.state import state_of

__all__ = ["ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME", "save_adapters", "load_adapters",
           "load_adapter_config"]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_KEY_PREFIX = "base_model.model."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def save_adapters(model: nn.Module, path: str) -> List[str]:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` (PEFT layout).

    Returns the list of adapted module names written (also the JSON's ``target_modules``).
    On a model sharded with FSDP2 (:func:`lors_fx.distributed.shard_model`) every rank must call
    it: the adapter shards are all-gathered (only the adapters, never the base) and rank 0 of the
    default process group writes the files; the other ranks write nothing.
    """
    from safetensors.torch import save_file

    modules = lors_modules(model)
    if not modules:
        raise ValueError("save_adapters: model has no LoRS adapters")
    state = state_of(model)
    if state is None:
        raise ValueError("save_adapters: model has adapters but no lors_fx state (were they "
                         "attached by lors_fx.optimize?)")
    config = state.config
    tensors, gathered = {}, False
    for name, module in modules.items():
        for part in ("lora_A", "lora_B"):
            param = getattr(module, part)
            if hasattr(param, "ds_id") and param.numel() == 0:
                raise ValueError(f"save_adapters: {name}.{part} is a ZeRO-3 partition (not "
                                 f"gathered); use lors_fx.distributed.deepspeed."
                                 f"save_adapters_deepspeed(engine, path)")
            gathered = gathered or hasattr(param, "full_tensor")
            tensors[f"{_KEY_PREFIX}{name}.{part}.weight"] = full_tensor(param).detach().to("cpu").contiguous()
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    if distributed and torch.distributed.get_rank() != 0:
        if gathered:  # every rank is here: return once rank 0 has written the files
            torch.distributed.barrier()
        return list(modules)
    meta = config.to_dict()
    meta.update(peft_type="LORS", target_modules=list(modules), lors_fx_version=__version__,
                scaling=config.scaling)
    os.makedirs(path, exist_ok=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if distributed and gathered:
        torch.distributed.barrier()
    return list(modules)


def _resolve_files(path: str) -> Tuple[str, str]:
    if str(path).lower().endswith(_PICKLE_SUFFIXES):
        raise ValueError(f"load_adapters: refusing to load {path!r}: pickle files can run code; "
                         f"only {ADAPTER_WEIGHTS_NAME} (safetensors) is supported")
    if os.path.isdir(path):
        weights = os.path.join(path, ADAPTER_WEIGHTS_NAME)
        if not os.path.isfile(weights):
            pickles = [f for f in os.listdir(path) if f.lower().endswith(_PICKLE_SUFFIXES)]
            hint = f" (found pickle file(s) {pickles}, which are refused)" if pickles else ""
            raise FileNotFoundError(f"load_adapters: no {ADAPTER_WEIGHTS_NAME} in {path!r}{hint}")
    elif os.path.isfile(path) and path.endswith(".safetensors"):
        weights, path = path, os.path.dirname(path) or "."
    else:
        raise FileNotFoundError(f"load_adapters: {path!r} is neither a directory nor a "
                                f".safetensors file")
    config_path = os.path.join(path, ADAPTER_CONFIG_NAME)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"load_adapters: no {ADAPTER_CONFIG_NAME} beside {weights!r}")
    return weights, config_path


def load_adapter_config(path: str) -> LorsConfig:
    """The :class:`LorsConfig` saved by :func:`save_adapters` (``target_modules`` = the exact
    adapted names), to rebuild the same adapters on a fresh model before :func:`load_adapters`."""
    _, config_path = _resolve_files(path)
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    for key in ("peft_type", "lors_fx_version", "scaling"):
        saved.pop(key, None)
    return LorsConfig.from_dict(saved)


@torch.no_grad()
def load_adapters(model: nn.Module, path: str) -> List[str]:
    """Load adapters saved by :func:`save_adapters` into an optimized ``model``, bit for bit.

    ``path``: the directory (or its ``.safetensors`` file). The model must carry adapters on the
    same modules with the same ``r`` and ``scaling``; every key and shape is checked before
    anything is copied, so a failed load changes nothing. Pickle files are refused.
    Returns the names of the modules loaded.
    """
    from safetensors.torch import load_file

    weights_path, config_path = _resolve_files(path)
    modules = lors_modules(model)
    if not modules:
        raise ValueError("load_adapters: model has no LoRS adapters; call optimize(model, config) "
                         "with the saved adapter_config.json's settings first")
    with open(config_path, encoding="utf-8") as handle:
        saved = json.load(handle)
    if saved.get("peft_type") != "LORS":
        raise ValueError(f"load_adapters: {config_path} has peft_type={saved.get('peft_type')!r}, "
                         f"expected 'LORS'")
    saved_targets = set(saved.get("target_modules") or [])
    if saved_targets != set(modules):
        raise ValueError(f"load_adapters: target modules differ: only in file "
                         f"{sorted(saved_targets - set(modules))}, only in model "
                         f"{sorted(set(modules) - saved_targets)}")
    for name, module in modules.items():
        if saved.get("r") != module.r:
            raise ValueError(f"load_adapters: r={saved.get('r')} in file but {module.r} on {name}")
        if not math.isclose(float(saved.get("scaling", float("nan"))), module.scaling,
                             rel_tol=1e-9):
            raise ValueError(f"load_adapters: scaling={saved.get('scaling')} in file but "
                             f"{module.scaling} on {name}")
    tensors = load_file(weights_path)
    expected = {f"{_KEY_PREFIX}{name}.{part}.weight": getattr(module, part)
                for name, module in modules.items() for part in ("lora_A", "lora_B")}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise ValueError(f"load_adapters: keys differ: missing {missing[:4]}, unexpected "
                         f"{unexpected[:4]} ({len(missing)} missing, {len(unexpected)} unexpected)")
    for key, param in expected.items():
        if tuple(tensors[key].shape) != tuple(param.shape):
            raise ValueError(f"load_adapters: {key} has shape {tuple(tensors[key].shape)} in the "
                             f"file but {tuple(param.shape)} in the model")
        if not tensors[key].dtype.is_floating_point:
            raise TypeError(f"load_adapters: {key} is {tensors[key].dtype}, expected a float")
    for key, param in expected.items():
        param.copy_(tensors[key])
    return list(modules)
