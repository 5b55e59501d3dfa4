"""The sparse MLPs and measurements shared by the compiler tests.

``adapted_mlp``: :func:`tests._toy.sparse_mlp` (32 -> 64 -> 48 -> 16, 50% pruned per row) with
LoRS adapters whose ``lora_B`` is nonzero, so ``W' != W``. ``SITE_SHAPES`` are its first two
weights' shapes: a saved tensor of such a shape (either orientation) that is not a parameter is
the dense ``W'`` the rewrite must keep out of the saved activations.
"""
from __future__ import annotations

import torch
from torch import nn

from lors_fx import attach_adapters, lors_modules
from tests._toy import sparse_mlp

SIZES = (32, 64, 48, 16)
T = 8
SITE_SHAPES = [(SIZES[1], SIZES[0]), (SIZES[2], SIZES[1])]


def adapted_mlp(config, seed=0) -> nn.Module:
    """``sparse_mlp(SIZES)`` with adapters attached and ``lora_B ~ N(0, 0.2)``."""
    model = sparse_mlp(sizes=SIZES, seed=seed)
    attach_adapters(model, config)
    torch.manual_seed(seed + 1)
    for module in lors_modules(model).values():
        nn.init.normal_(module.lora_B, std=0.2)  # nonzero, so W' != W
    return model


def loss_and_grads(model, fn, x):
    """``(loss, {name: grad}, dx)`` of ``fn(x).square().mean()``."""
    model.zero_grad(set_to_none=True)
    x = x.detach().clone().requires_grad_(True)
    loss = fn(x).square().mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, x.grad.clone()


def w_prime_sized(rows, sites):
    """Saved-tensor rows that are not parameters and have one of ``sites``' shapes."""
    shapes = [sorted(shape) for shape in sites]
    return [r for r in rows if r["kind"] != "parameter" and sorted(r["shape"]) in shapes]
