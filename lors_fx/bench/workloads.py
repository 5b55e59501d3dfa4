"""The benchmark's workloads: a Llama-7B MLP or attention block (scaled), SmolLM2-135M's decoder,
or any transformers config, with random seeded weights pruned per row by magnitude."""
from __future__ import annotations

import json
from typing import List, Optional

import torch.nn.functional as F
from torch import nn

from lors_fx.workflows.prune import magnitude_prune_

__all__ = ["WORKLOADS", "build_workload", "prune_"]

WORKLOADS = ("llama_mlp", "llama_attn", "smollm2")


class _SwiGLU(nn.Module):
    def __init__(self, hidden: int, intermediate: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden, intermediate, bias=False)
        self.up_proj = nn.Linear(hidden, intermediate, bias=False)
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _Attention(nn.Module):
    def __init__(self, hidden: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = (
            nn.Linear(hidden, hidden, bias=False) for _ in range(4))

    def forward(self, x):
        b, t, h = x.shape
        q, k, v = (p(x).view(b, t, self.heads, -1).transpose(1, 2)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.o_proj(out.transpose(1, 2).reshape(b, t, h))


class _HFBody(nn.Module):
    """A transformers base model fed ``inputs_embeds``; returns the last hidden state."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(inputs_embeds=x, use_cache=False).last_hidden_state


def _hf_body(config, layers: Optional[int]) -> nn.Module:
    from transformers import AutoModel
    if layers is not None:
        config.num_hidden_layers = layers
    config.vocab_size = 32  # inputs_embeds is fed: a full vocabulary would only cost memory
    return _HFBody(AutoModel.from_config(config, attn_implementation="sdpa"))


def build_workload(name: str, scale: float = 0.25, layers: Optional[int] = None,
                   config_path: Optional[str] = None) -> tuple:
    """``(model, hidden)`` for a workload name (``WORKLOADS`` or ``"config"`` with a JSON path).

    ``llama_mlp``: Llama-7B MLP (gate/up 4096->11008, down 11008->4096) times ``scale``;
    ``llama_attn``: its attention (q, k, v, o 4096x4096, head dim 128) times ``scale``;
    ``smollm2``: SmolLM2-135M's decoder (hidden 576, intermediate 1536, 30 layers, 9/3 heads),
    ``layers`` cuts it; ``config``: any transformers config JSON (``layers`` cuts it too).
    Weights are random (seeded by the caller); call :func:`prune_` to sparsify them.
    """
    if name == "llama_mlp":
        hidden = max(16, round(4096 * scale / 16) * 16)
        return _SwiGLU(hidden, max(16, round(11008 * scale / 16) * 16)), hidden
    if name == "llama_attn":
        hidden = max(128, round(4096 * scale / 128) * 128)
        return _Attention(hidden, hidden // 128), hidden
    if name == "smollm2":
        from transformers import LlamaConfig
        config = LlamaConfig(hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                             num_attention_heads=9, num_key_value_heads=3,
                             max_position_embeddings=8192, tie_word_embeddings=True)
        return _hf_body(config, layers), 576
    if name == "config":
        from transformers import AutoConfig
        if not config_path:
            raise ValueError("build_workload: the 'config' workload needs config_path")
        with open(config_path, encoding="utf-8") as handle:
            data = json.load(handle)
        if "model_type" not in data:
            raise ValueError(f"{config_path}: a transformers config JSON needs 'model_type'")
        config = AutoConfig.for_model(**data)
        return _hf_body(config, layers), config.hidden_size
    raise ValueError(f"build_workload: unknown workload {name!r}; known: {WORKLOADS + ('config',)}")


def prune_(model: nn.Module, sparsity: float) -> List[tuple]:
    """Zero the ``sparsity`` fraction of smallest-magnitude weights of each row of every plain
    ``nn.Linear`` (the ones the baselines wrap) with the library's pruner,
    :func:`lors_fx.workflows.prune.magnitude_prune_`; returns their ``(d_out, d_in)`` shapes."""
    shapes = []
    for module in model.modules():
        if type(module) is nn.Linear:
            magnitude_prune_(module, sparsity)
            shapes.append(tuple(module.weight.shape))
    return shapes
