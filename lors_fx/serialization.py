"""Save and load adapters in PEFT's layout: ``adapter_model.safetensors`` + ``adapter_config.json``.

Keys read like PEFT's (``base_model.model.<module>.lora_A.weight``, with ``<module>`` the name in
the base model, also when the adapters are converted PEFT layers), so the files can be inspected
with the usual tools. Only safetensors is read: pickle files are refused (they can run code).

PEFT and these files: ``adapter_config.json`` says ``peft_type`` = :data:`LORS_PEFT_TYPE`, a
string that PEFT does not know, so ``PeftModel.from_pretrained`` refuses the directory with a
``KeyError`` whose text says to use ``lors_fx.restore_adapters`` (as LoRA, PEFT would apply the
update densely). The other way round works: :func:`load_adapter_config` and :func:`load_adapters`
read a directory PEFT wrote for a LoRA adapter (``peft_type`` ``"LORA"``: ``save_pretrained``, an
HF Trainer checkpoint), so :func:`lors_fx.restore_adapters` rebuilds it as LoRS adapters.

Adapters only make sense on the zero pattern they were trained on, so :func:`save_adapters` also
records a fingerprint of each adapted base weight's mask (:func:`mask_fingerprint`: a hash of the
packed ``W != 0`` bits per module, and one digest for the model) and :func:`load_adapters` refuses a
base whose pattern differs (another pruning of the same model). The fingerprint lives in the
safetensors header's metadata (key ``lors_mask_fingerprint``), not in ``adapter_config.json``: older
lors_fx reads that JSON into a :class:`LorsConfig`, which rejects unknown keys, and every reader
ignores the header metadata, so files with a fingerprint still load everywhere. Files without one
(written before it existed) load with a warning. Key ``lors_quant_grid``: quantized sites' grids.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import warnings
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn

from lors_fx._collectives import full_tensor
from lors_fx._version import __version__
from lors_fx.adapters import lors_modules
from lors_fx.config import LorsConfig
from lors_fx.peft_adapters import PeftSite, plain_name
from lors_fx.state import state_of

__all__ = ["ADAPTER_WEIGHTS_NAME", "ADAPTER_CONFIG_NAME", "FINGERPRINT_KEY", "LORS_PEFT_TYPE",
           "save_adapters",
           "load_adapters", "load_adapter_config", "mask_fingerprint", "read_mask_fingerprint"]

ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
_KEY_PREFIX = "base_model.model."
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: safetensors metadata key of the mask fingerprint (a JSON string)
FINGERPRINT_KEY = "lors_mask_fingerprint"
_FINGERPRINT_ALGORITHM = "sha256-packbits-rows-v1"
GRID_KEY = "lors_quant_grid"  # safetensors metadata: each quantized site's grid
_BIT_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)  # numpy.packbits order: first element = high bit
#: ``peft_type`` written to ``adapter_config.json``: PEFT shows it in the error it raises.
LORS_PEFT_TYPE = ("LORS: lors_fx sparsity-preserving adapters, which PEFT cannot apply (B@A must "
                  "be masked by the base's zero pattern); load them with "
                  "lors_fx.restore_adapters(model, path)")
_LORS_TYPES = ("LORS", LORS_PEFT_TYPE)  # "LORS": what earlier versions wrote
#: PEFT LoraConfig fields whose non-default values LoRS adapters cannot represent.
_PEFT_UNSUPPORTED = {"use_dora": False, "lora_bias": False, "rank_pattern": {},
                     "alpha_pattern": {}, "modules_to_save": None}


def _module_digest(weight: torch.Tensor) -> str:
    """sha256 (first 16 bytes, hex) of ``weight``'s shape and its ``!= 0`` bits packed 8 to a byte
    along each row (rows padded to whole bytes), as stored (Conv1D: ``(d_in, d_out)``)."""
    mask = full_tensor(weight.detach() != 0)  # DTensor shard: one module's mask is gathered
    mask = mask.reshape(mask.shape[0] if mask.dim() > 1 else 1, -1).to(torch.uint8)
    mask = torch.nn.functional.pad(mask, (0, (-mask.shape[1]) % 8))
    bits = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    packed = (mask.reshape(mask.shape[0], -1, 8) * bits).sum(-1, dtype=torch.uint8)
    digest = hashlib.sha256(repr(tuple(weight.shape)).encode())
    digest.update(packed.cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def mask_fingerprint(model: nn.Module) -> Optional[dict]:
    """Fingerprint of the zero pattern under ``model``'s adapters: ``{"algorithm", "modules":
    {name: hex}, "digest": hex}`` (``digest`` covers every module's name and hash), or ``None``
    when a base weight is a ZeRO-3 partition (not gathered here). On an FSDP2-sharded model it is
    a collective (each module's mask is all-gathered in turn): every rank must call it."""
    modules = lors_modules(model)
    if any(hasattr(m.weight, "ds_id") and m.weight.numel() == 0 for m in modules.values()):
        return None
    hashes = {plain_name(name): _module_digest(module.weight) for name, module in modules.items()}
    whole = hashlib.sha256("".join(f"{n}={h}\n" for n, h in sorted(hashes.items())).encode())
    return {"algorithm": _FINGERPRINT_ALGORITHM, "modules": hashes, "digest": whole.hexdigest()}


def read_mask_fingerprint(path: str) -> Optional[dict]:
    """The fingerprint saved with the adapters at ``path`` (directory or ``.safetensors`` file),
    or ``None`` for files written before fingerprints existed."""
    weights, _ = _resolve_files(path)
    return _parse_fingerprint(_read_weights(weights, "read_mask_fingerprint")[1], weights)


def _parse_fingerprint(metadata: Dict[str, str], weights: str) -> Optional[dict]:
    if FINGERPRINT_KEY not in metadata:
        return None
    try:
        fingerprint = json.loads(metadata[FINGERPRINT_KEY])
    except ValueError as error:
        raise ValueError(f"{weights}: the {FINGERPRINT_KEY} metadata is not valid JSON "
                         f"({error})") from error
    if not isinstance(fingerprint, dict) or not isinstance(fingerprint.get("modules"), dict):
        raise ValueError(f"{weights}: the {FINGERPRINT_KEY} metadata has no 'modules' mapping")
    return fingerprint


def save_adapters(model: nn.Module, path: str) -> List[str]:
    """Write ``path/adapter_model.safetensors`` and ``path/adapter_config.json`` (PEFT layout).

    Returns the list of adapted module names written (also the JSON's ``target_modules``).
    The header metadata also holds the base's :func:`mask_fingerprint`, which
    :func:`load_adapters` checks. On a model sharded with FSDP2
    (:func:`lors_fx.distributed.shard_model`) every rank must call it: the adapter shards are
    all-gathered (of the base, only each module's ``W != 0`` mask, one module at a time, for the
    fingerprint) and rank 0 of the default process group writes the files; the other ranks write
    nothing. Under ZeRO-3 (base weights partitioned) no fingerprint is written.
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
            key = f"{_KEY_PREFIX}{plain_name(name)}.{part}.weight"
            tensors[key] = full_tensor(param).detach().to("cpu").contiguous()
    fingerprint = mask_fingerprint(model)  # a collective on a sharded model, like the gather
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    names = [plain_name(name) for name in modules]
    if distributed and torch.distributed.get_rank() != 0:
        if gathered:  # every rank is here: return once rank 0 has written the files
            torch.distributed.barrier()
        return names
    meta = _config_of(config, modules)
    meta.update(peft_type=LORS_PEFT_TYPE, target_modules=names, lors_fx_version=__version__)
    os.makedirs(path, exist_ok=True)
    metadata = {"format": "pt"}
    if fingerprint is not None:
        metadata[FINGERPRINT_KEY] = json.dumps(fingerprint, sort_keys=True)
    if any(hasattr(m, "weight_scale") for m in modules.values()):  # quantized bases: their grids
        metadata[GRID_KEY] = json.dumps(_quant_grids(modules), sort_keys=True)
    save_file(tensors, os.path.join(path, ADAPTER_WEIGHTS_NAME), metadata=metadata)
    with open(os.path.join(path, ADAPTER_CONFIG_NAME), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=2, sort_keys=True)
        handle.write("\n")
    if distributed and gathered:
        torch.distributed.barrier()
    return names


def _config_of(config: LorsConfig, modules: Dict[str, nn.Module]) -> dict:
    """The config to save: the state's; for converted PEFT layers ``r``, ``lora_alpha`` and
    dropout are PEFT's (one value for all layers, or an error)."""
    meta = config.to_dict()
    first = next(iter(modules.values()))
    if isinstance(first, PeftSite):
        values = {(m.r, m.scaling, float(getattr(m.lora_dropout, "p", 0.0)))
                  for m in modules.values()}
        if len(values) > 1:
            raise ValueError(f"save_adapters: the PEFT layers differ in (r, scaling, dropout): "
                             f"{sorted(values)}; one adapter_config.json holds one setting "
                             f"(peft_model.save_pretrained keeps PEFT's rank_pattern)")
        r, scaling, dropout = values.pop()
        meta.update(r=r, lora_alpha=scaling * r, use_rslora=False, lora_dropout=dropout,
                    convert_peft=None)
    meta["scaling"] = LorsConfig.from_dict({k: v for k, v in meta.items()
                                            if k != "scaling"}).scaling
    return meta


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


def _read_json(path: str, who: str) -> dict:
    """``path``'s JSON object; a file that is not one is an error that names it."""
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        raise ValueError(f"{who}: {path} is not valid JSON ({error})") from error
    if not isinstance(data, dict):
        raise ValueError(f"{who}: {path} holds a JSON {type(data).__name__}, expected an object")
    return data


def _read_weights(path: str, who: str) -> Tuple[Dict[str, torch.Tensor], Dict[str, str]]:
    """Every tensor and the header metadata of the safetensors file ``path`` (errors name it)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="pt") as handle:
            return ({key: handle.get_tensor(key) for key in handle.keys()},
                    handle.metadata() or {})
    except Exception as error:  # SafetensorError (truncated, garbage), OSError
        raise ValueError(f"{who}: {path} is not a readable safetensors file (truncated or not "
                         f"safetensors?): {type(error).__name__}: {error}") from error


def load_adapter_config(path: str) -> LorsConfig:
    """The :class:`LorsConfig` saved by :func:`save_adapters` (``target_modules`` = the exact
    adapted names), to rebuild the same adapters on a fresh model before :func:`load_adapters`.
    A PEFT LoRA directory (``peft_type`` ``"LORA"``) gives the config of the same adapters as LoRS
    adapters: PEFT's ``r``, ``lora_alpha``, ``use_rslora`` and ``lora_dropout``, and the modules
    its weight file holds; PEFT options LoRS cannot represent (DoRA, ``lora_bias``,
    ``rank_pattern``, ``alpha_pattern``, ``modules_to_save``) are refused."""
    weights, config_path = _resolve_files(path)
    saved = _read_json(config_path, "load_adapter_config")
    if saved.get("peft_type") == "LORA":
        return _config_from_peft(saved, weights, config_path)
    for key in ("peft_type", "lors_fx_version", "scaling"):
        saved.pop(key, None)
    try:
        return LorsConfig.from_dict(saved)
    except (TypeError, ValueError) as error:  # the same kind of error, with the file's name
        kind = TypeError if isinstance(error, TypeError) else ValueError
        raise kind(f"load_adapter_config: {config_path}: {error}") from error


def _peft_module_names(keys, weights: str) -> List[str]:
    """The module names of a PEFT LoRA weight file's keys; other keys are an error."""
    names = set()
    for key in keys:
        for part in (".lora_A.weight", ".lora_B.weight"):
            if key.startswith(_KEY_PREFIX) and key.endswith(part):
                names.add(key[len(_KEY_PREFIX):-len(part)])
                break
        else:
            raise ValueError(f"load_adapter_config: {weights} holds {key!r}, which is not a "
                             f"LoRA lora_A/lora_B weight (embedding adapters, modules_to_save "
                             f"copies and biases are not LoRS adapters)")
    return sorted(names)


def _config_from_peft(saved: dict, weights: str, config_path: str) -> LorsConfig:
    """A :class:`LorsConfig` for the LoRA adapters PEFT saved in ``saved`` / ``weights``."""
    for key, default in _PEFT_UNSUPPORTED.items():
        if saved.get(key) not in (default, None, False, {}, []):
            raise ValueError(f"load_adapter_config: {config_path} sets {key}={saved[key]!r}; "
                             f"LoRS adapters cannot represent that PEFT option")
    from safetensors import safe_open

    try:
        with safe_open(weights, framework="pt") as handle:
            keys = list(handle.keys())
    except Exception as error:  # SafetensorError (truncated, garbage), OSError
        raise ValueError(f"load_adapter_config: {weights} is not a readable safetensors file: "
                         f"{type(error).__name__}: {error}") from error
    fields = dict(r=saved.get("r"), lora_alpha=saved.get("lora_alpha"),
                  use_rslora=bool(saved.get("use_rslora", False)),
                  lora_dropout=float(saved.get("lora_dropout") or 0.0),
                  target_modules=_peft_module_names(keys, weights), exclude_modules=[])
    try:
        return LorsConfig(**fields)
    except (TypeError, ValueError) as error:
        raise ValueError(f"load_adapter_config: {config_path}: {error}") from error


def _check_targets(saved_targets: set, modules: Dict[str, nn.Module]) -> None:
    names = {plain_name(name) for name in modules}
    if saved_targets != names:
        raise ValueError(f"load_adapters: target modules differ: only in file "
                         f"{sorted(saved_targets - names)}, only in model "
                         f"{sorted(names - saved_targets)}")


def _check_config(saved: dict, modules: Dict[str, nn.Module], config_path: str,
                  weights_path: str) -> None:
    """The saved ``adapter_config.json`` describes the adapters on ``modules``."""
    if saved.get("peft_type") == "LORA":  # PEFT's own file: the keys name the modules
        saved["scaling"] = _config_from_peft(saved, weights_path, config_path).scaling
    elif saved.get("peft_type") not in _LORS_TYPES:
        raise ValueError(f"load_adapters: {config_path} has peft_type={saved.get('peft_type')!r}, "
                         f"expected a lors_fx or a PEFT LoRA adapter")
    else:
        _check_targets(set(saved.get("target_modules") or []), modules)
    for name, module in modules.items():
        if saved.get("r") != module.r:
            raise ValueError(f"load_adapters: r={saved.get('r')} in file but {module.r} on {name}")
        if not math.isclose(float(saved.get("scaling", float("nan"))), module.scaling,
                             rel_tol=1e-9):
            raise ValueError(f"load_adapters: scaling={saved.get('scaling')} in file but "
                             f"{module.scaling} on {name}")


def _check_fingerprint(model: nn.Module, saved: Optional[dict], weights_path: str) -> None:
    """Refuse a base whose zero pattern differs from the saved fingerprint's (first module
    named); without a saved fingerprint (older files) only warn."""
    if saved is None or saved.get("algorithm") != _FINGERPRINT_ALGORITHM:
        why = ("has no mask fingerprint (a PEFT adapter, written by an older lors_fx, or under "
               "ZeRO-3)"
               if saved is None else f"has a mask fingerprint of unknown kind "
               f"{saved.get('algorithm')!r}")
        warnings.warn(f"load_adapters: {weights_path} {why}; the base's zero pattern is not "
                      f"checked against the one the adapters were trained on", UserWarning,
                      stacklevel=4)  # past load_adapters and its no_grad wrapper
        return
    current = mask_fingerprint(model)
    if current is None:  # ZeRO-3 partitions: nothing to compare here
        return
    differ = [n for n, h in current["modules"].items() if saved["modules"].get(n) != h]
    if differ:
        raise ValueError(f"load_adapters: the base's zero pattern differs from the one the "
                         f"adapters in {weights_path} were trained on, first at {differ[0]} "
                         f"({len(differ)} of {len(current['modules'])} adapted modules differ): "
                         f"this is another pruning of the model; use the exact pruned base the "
                         f"adapters were trained on (lors-fx train --prune saves it in OUT/base)")


def _quant_grids(modules: Dict[str, nn.Module]) -> Dict[str, dict]:
    """Each quantized site's bits, group size, quant_aware and a sha256 of its scales."""
    return {plain_name(name): dict(bits=m.bits, group_size=m.group_size, quant_aware=bool(
        m.quant_aware), scales=hashlib.sha256(full_tensor(m.weight_scale).detach().float().cpu()
                                              .contiguous().numpy().tobytes()).hexdigest()[:16])
            for name, m in modules.items() if hasattr(m, "weight_scale")}


def _check_grids(current: Dict[str, dict], metadata: Dict[str, str], weights_path: str) -> None:
    """Refuse adapters trained ``quant_aware`` on another grid than the base's; warn for others."""
    saved, strip = json.loads(metadata.get(GRID_KEY, "{}")), lambda g: dict(g, quant_aware=None)
    differ = [name for name, grid in saved.items() if strip(grid) != strip(current.get(name, {}))]
    if differ:
        what = (f"load_adapters: {differ[0]} ({len(differ)} in all) is not on the grid of "
                f"{weights_path} ({saved[differ[0]]}; here {current.get(differ[0], 'float')})")
        if any(saved[name].get("quant_aware") for name in differ):
            raise ValueError(f"{what}; they were trained quant_aware, so their values only make "
                             f"sense on that grid: use that base (nothing was loaded)")
        warnings.warn(f"{what}; loading anyway", UserWarning, stacklevel=4)


@torch.no_grad()
def load_adapters(model: nn.Module, path: str) -> List[str]:
    """Load adapters saved by :func:`save_adapters` into an optimized ``model``, bit for bit.

    ``path``: the directory (or its ``.safetensors`` file). The model must carry adapters on the
    same modules with the same ``r`` and ``scaling``, on a base with the zero pattern the
    adapters were trained on (the saved :func:`mask_fingerprint`; files without one load with a
    warning); every key, shape and mask is checked before anything is copied, so a failed load
    changes nothing. Unreadable files (truncated, not JSON) are errors that name the file.
    Pickle files are refused. A directory PEFT wrote for a LoRA adapter loads too (no
    fingerprint there: the pattern is not checked). Returns the names of the modules loaded.
    On quantized bases, adapters trained ``quant_aware`` on another grid are refused (others warn).
    """
    weights_path, config_path = _resolve_files(path)
    modules = lors_modules(model)
    if not modules:
        raise ValueError("load_adapters: model has no LoRS adapters; call optimize(model, config) "
                         "with the saved adapter_config.json's settings first")
    _check_config(_read_json(config_path, "load_adapters"), modules, config_path, weights_path)
    tensors, metadata = _read_weights(weights_path, "load_adapters")
    expected = {f"{_KEY_PREFIX}{plain_name(name)}.{part}.weight": getattr(module, part)
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
    _check_fingerprint(model, _parse_fingerprint(metadata, weights_path), weights_path)
    _check_grids(_quant_grids(modules), metadata, weights_path)
    for key, param in expected.items():
        param.copy_(tensors[key])
    return list(modules)
