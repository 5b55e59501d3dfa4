"""lors_fx.workflows.checks: tokenizer against embedding, window against positions, the linears
optimize leaves dense (tiny Llamas, CPU, seconds)."""
from __future__ import annotations

import pytest
import torch

from lors_fx import LorsConfig, optimize
from lors_fx.workflows.checks import (check_token_ids, check_tokenizer_fits, clamp_max_length,
                                      context_length, dense_linears_skipped, embedding_rows,
                                      tokenizer_size)
from lors_fx.workflows.data import ByteTokenizer
from lors_fx.workflows.prune import magnitude_prune_


def _llama(vocab=257, positions=64):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=vocab,
                                        max_position_embeddings=positions))


def test_a_tokenizer_larger_than_the_embedding_is_refused():
    tokenizer = ByteTokenizer()  # 257 ids
    assert tokenizer_size(tokenizer) == 257 and embedding_rows(_llama(300)) == 300
    check_tokenizer_fits(tokenizer, _llama(257))
    check_tokenizer_fits(tokenizer, _llama(300))  # a padded embedding is fine
    with pytest.raises(ValueError, match=r"tokenizer: it has 257 tokens but the model's embedding "
                                         r"has 100 rows.*--tokenizer PATH"):
        check_tokenizer_fits(tokenizer, _llama(100))


def test_token_ids_outside_the_embedding_are_named():
    model = _llama(100)
    check_token_ids(torch.tensor([0, 99]), model)
    with pytest.raises(ValueError, match="token id 150 is outside the model's embedding of 100"):
        check_token_ids(torch.tensor([3, 150, 7]), model)


def test_max_length_is_cut_to_the_positions_with_a_note():
    model = _llama(positions=64)
    assert context_length(model) == 64
    assert clamp_max_length(model, 64) == (64, None)
    length, note = clamp_max_length(model, 1024)
    assert length == 64
    assert note == ("--max-length 1024 exceeds the model's 64 positions "
                    "(max_position_embeddings); using 64")
    assert clamp_max_length(torch.nn.Linear(2, 2), 10**6) == (10**6, None)  # nothing to say


def test_dense_linears_skipped_by_optimize_are_listed():
    model = _llama()
    for name, module in model.named_modules():  # prune layer 0 only: layer 1 stays dense
        if ".layers.0." in name and isinstance(module, torch.nn.Linear):
            magnitude_prune_(module, 0.5)
    skipped = dense_linears_skipped(model)
    assert sorted(skipped) == sorted(n for n, m in model.named_modules()
                                     if ".layers.1." in n and isinstance(m, torch.nn.Linear))
    assert all(value == 0.0 for value in skipped.values()) and "lm_head" not in skipped
    excluded = dense_linears_skipped(model, LorsConfig(exclude_modules=("lm_head", "up_proj")))
    assert sorted(excluded) == sorted(n for n in skipped if not n.endswith("up_proj"))
    assert dense_linears_skipped(model, LorsConfig(target_modules=["q_proj"])) == {}
    optimize(model, LorsConfig(r=2), compile=False)  # the same list after optimize
    assert sorted(dense_linears_skipped(model)) == sorted(skipped)
