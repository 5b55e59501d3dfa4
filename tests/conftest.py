"""Fixtures shared by the whole suite.

- ``fresh_dynamo``: dynamo's caches cleared before and after a test that compiles, so its graphs,
  recompile counts and guards do not depend on which tests ran before it. Modules that compile
  use it for every test with ``pytestmark = pytest.mark.usefixtures("fresh_dynamo")``.
- ``toy_llama``: the pruned tiny Llama of the toy task (:mod:`lors_fx.testing.toy`, whose
  ``toy_batches`` make its data), built fresh for each test.
- ``gpt2``: the 1-layer pruned GPT-2 with Conv1D projections (:func:`tests._toy.tiny_gpt2`).

The suite sets ``LORS_FX_COMPILER=eager`` (unless already set): ``LorsConfig``'s default
``"auto"`` compilers then run the eager GraphModules instead of inductor.

Helpers that take arguments (``sparse_mlp(sizes=...)``, ``snapshot``...) are plain functions in
:mod:`tests._toy`; the pass tests' graph builders are in :mod:`tests.passes._graphs`.
"""
from __future__ import annotations

import os

import pytest
import torch

from lors_fx.compiler.compilers import COMPILER_ENV

from lors_fx.testing.toy import build_toy_llama
from tests._toy import tiny_gpt2


# The default LorsConfig compiles with inductor where it can; tens of inductor compiles would
# double the suite's time, so tests run the eager graph compilers unless the environment says
# otherwise (tests of the default path clear it with monkeypatch).
os.environ.setdefault(COMPILER_ENV, "eager")


@pytest.fixture
def fresh_dynamo():
    """Reset dynamo (``torch.compiler.reset``) around the test."""
    torch.compiler.reset()
    yield
    torch.compiler.reset()


@pytest.fixture
def toy_llama():
    """A tiny ``LlamaForCausalLM`` (hidden 64, 2 layers, vocab 128), 50% pruned per row, seed 0."""
    return build_toy_llama(seed=0)


@pytest.fixture
def gpt2():
    """A 1-layer GPT-2 (n_embd 32, Conv1D projections), every Conv1D 50% pruned, seed 0."""
    return tiny_gpt2()
