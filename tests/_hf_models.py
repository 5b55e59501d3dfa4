"""Tiny HF causal LMs built from configs (no hub), magnitude-pruned for the end-to-end tests.

Every model: hidden <= 128, 2 layers, a small vocab, ``use_cache=False``, fp32, eager attention
(``sdpa`` would also work; eager keeps the graphs small and deterministic on CPU). Pruning zeroes,
per output row, the smallest-magnitude weights of every ``nn.Linear`` and GPT-2 ``Conv1D`` except
``lm_head``: ``"50%"`` unstructured or ``"2:4"`` (2 zeros in every group of 4 inputs).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence

import torch
from torch import nn

__all__ = ["MODEL_BUILDERS", "build_model", "prune_", "linear_weights", "random_batch",
           "VOCAB"]

VOCAB = 128


def _llama():
    from transformers import LlamaConfig, LlamaForCausalLM

    return LlamaForCausalLM(LlamaConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
        attn_implementation="eager"))


def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    return Qwen2ForCausalLM(Qwen2Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
        attn_implementation="eager"))


def _mistral():
    from transformers import MistralConfig, MistralForCausalLM

    return MistralForCausalLM(MistralConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=VOCAB, max_position_embeddings=64, use_cache=False,
        sliding_window=None, attn_implementation="eager"))


def _gemma3():
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    return Gemma3ForCausalLM(Gemma3TextConfig(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, vocab_size=VOCAB, max_position_embeddings=64,
        sliding_window=16, use_cache=False, attn_implementation="eager"))


def _gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    return GPT2LMHeadModel(GPT2Config(
        n_embd=64, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=64, use_cache=False,
        bos_token_id=0, eos_token_id=0,
        attn_implementation="eager"))


#: name -> builder of an unpruned tiny model.
MODEL_BUILDERS: Dict[str, Callable[[], nn.Module]] = {
    "llama": _llama, "qwen2": _qwen2, "mistral": _mistral, "gemma3": _gemma3, "gpt2": _gpt2,
}


def linear_weights(model: nn.Module, exclude: Sequence[str] = ("lm_head",)):
    """``[(name, weight as a (d_out, d_in) view)]`` of every Linear/Conv1D not in ``exclude``."""
    found = []
    for name, module in model.named_modules():
        if any(name.endswith(e) for e in exclude):
            continue
        if isinstance(module, nn.Linear):
            found.append((name, module.weight))
        elif type(module).__name__ == "Conv1D":  # GPT-2 stores (d_in, d_out)
            found.append((name, module.weight.t()))
    return found


@torch.no_grad()
def prune_(model: nn.Module, pattern: str = "50%",
           exclude: Sequence[str] = ("lm_head",)) -> Dict[str, float]:
    """Magnitude-prune every Linear/Conv1D except ``exclude`` in place, per output row.

    ``pattern``: ``"<p>%"`` (``"50%"``: unstructured, the smallest p% of each row) or ``"N:M"``
    (keep the N largest of each group of M consecutive inputs: ``"2:4"``).
    Returns ``{name: sparsity}``.
    """
    result = {}
    for name, weight in linear_weights(model, exclude):
        d_out, d_in = weight.shape
        if pattern.endswith("%"):
            k = int(d_in * float(pattern[:-1]) / 100)
            smallest = weight.abs().argsort(dim=1)[:, :k]
            weight.scatter_(1, smallest, 0.0)
        else:
            keep, group = (int(v) for v in pattern.split(":"))
            if d_in % group:
                raise ValueError(f"prune_: {name} has d_in={d_in}, not a multiple of {group}")
            groups = weight.reshape(d_out, d_in // group, group)  # a view: writes reach weight
            smallest = groups.abs().argsort(dim=-1)[..., :group - keep]
            groups.scatter_(-1, smallest, 0.0)
        result[name] = float((weight == 0).float().mean())
    return result


def build_model(name: str, pattern: str = "50%", seed: int = 0) -> nn.Module:
    """A tiny pruned ``name`` model (see :data:`MODEL_BUILDERS`), fp32, train mode, no dropout."""
    torch.manual_seed(seed)
    model = MODEL_BUILDERS[name]()
    prune_(model, pattern)
    for module in model.modules():  # dropout would make compiled and eager runs differ
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return model.train()


def random_batch(batch: int = 2, seq: int = 16, seed: int = 0) -> Dict[str, torch.Tensor]:
    """``{"input_ids", "labels"}`` of random tokens."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(VOCAB, (batch, seq), generator=generator)
    return {"input_ids": ids, "labels": ids.clone()}
