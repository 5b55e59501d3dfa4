"""The toy task of ``lors-fx example`` and the tests: a tiny magnitude-pruned Llama and token
sequences that follow a fixed random permutation, which adapters can learn in a few steps."""
from __future__ import annotations

import torch
from torch import nn

from lors_fx.workflows.prune import magnitude_prune_

__all__ = ["build_toy_llama", "toy_batches"]


def build_toy_llama(seed: int = 0, sparsity: float = 0.5) -> nn.Module:
    """A tiny ``LlamaForCausalLM`` (hidden 64, 2 layers, vocab 128), pruned per row by magnitude."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128,
                         max_position_embeddings=128, use_cache=False)
    model = LlamaForCausalLM(config)
    magnitude_prune_(model, sparsity)
    return model


def toy_batches(n_batches: int, *, batch_size: int = 8, seq_len: int = 32, vocab_size: int = 128,
                seed: int = 0, noise: float = 0.1) -> list:
    """Batches ``{"input_ids", "labels"}`` of sequences ``t[i+1] = perm[t[i]]`` (``noise`` share of
    random tokens); ``perm`` depends only on ``vocab_size``, so train and eval share the rule."""
    perm = torch.randperm(vocab_size, generator=torch.Generator().manual_seed(1234))
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n_batches):
        ids = torch.empty(batch_size, seq_len, dtype=torch.long)
        ids[:, 0] = torch.randint(vocab_size, (batch_size,), generator=generator)
        for i in range(1, seq_len):
            ids[:, i] = perm[ids[:, i - 1]]
        flip = torch.rand(batch_size, seq_len, generator=generator) < noise
        ids[flip] = torch.randint(vocab_size, (int(flip.sum()),), generator=generator)
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches
