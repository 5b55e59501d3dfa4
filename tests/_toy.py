"""Tiny sparse models and model-state checks shared by the tests (fast on 2 CPU cores).

The pruned toy Llama and its batches are the library's (:mod:`lors_fx.testing.toy`); pruning is
always the library's magnitude pruner (:func:`lors_fx.workflows.prune.magnitude_prune_`).
"""
from __future__ import annotations

import torch
from torch import nn

from lors_fx.state import state_of
from lors_fx.workflows.prune import magnitude_prune_


def sparse_mlp(sizes=(64, 128, 128, 32), sparsity=0.5, seed=0, dtype=torch.float32,
               bias=True) -> nn.Sequential:
    """Linear/GELU stack with every Linear pruned per row by magnitude (names "0", "2", "4"...)."""
    torch.manual_seed(seed)
    layers = []
    for i, (d_in, d_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        if i:
            layers.append(nn.GELU())
        layers.append(nn.Linear(d_in, d_out, bias=bias))
    model = nn.Sequential(*layers).to(dtype)
    magnitude_prune_(model, sparsity, exclude=())
    return model


def tiny_gpt2(seed=0, sparsity=0.5):
    """A 1-layer GPT-2 (Conv1D layers, n_embd 32) with every Conv1D pruned along its true rows
    (each output's inputs); ``lm_head`` (tied to the embeddings) is left dense."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=32,
                        use_cache=False, bos_token_id=0, eos_token_id=0)
    model = GPT2LMHeadModel(config)
    magnitude_prune_(model, sparsity)
    return model


def snapshot(model: nn.Module):
    """Everything that must stay the same after a rejected call: tensors (bits), types, flags."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = [(name, type(m)) for name, m in model.named_modules()]
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    attrs = state_of(model)
    return state, types, flags, attrs


def assert_unchanged(model: nn.Module, snap) -> None:
    state, types, flags, attrs = snap
    now = model.state_dict()
    assert list(now) == list(state)
    for key, value in state.items():
        assert now[key].dtype == value.dtype and torch.equal(now[key], value), key
    assert [(name, type(m)) for name, m in model.named_modules()] == types
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert state_of(model) is attrs


def randomize_adapters(model: nn.Module, seed=0, scale=0.5) -> None:
    """Give every adapter a nonzero lora_B so that the masked update matters."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if hasattr(module, "lora_B"):
                for p in (module.lora_A, module.lora_B):
                    p.copy_(torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale)
