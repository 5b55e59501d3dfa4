"""lors_fx.testing.tiny_models: every built-in tiny architecture builds small, runs, and prunes exactly."""
import pytest
import torch
from torch import nn

from lors_fx.testing import tiny_models
from lors_fx.testing.tiny_models import (TINY_MODELS, build_model, build_tiny, canonical_name,
                                         linear_weights, prune_, random_batch)
from lors_fx.workflows.prune import magnitude_prune_


def _hidden_and_layers(model):
    config = model.config
    hidden = getattr(config, "hidden_size", None) or config.n_embd
    layers = getattr(config, "num_hidden_layers", None) or config.n_layer
    return hidden, layers


@pytest.mark.parametrize("name", sorted(TINY_MODELS))
def test_each_builder_builds_small_and_runs_a_forward(name):
    model = build_tiny(name)
    hidden, layers = _hidden_and_layers(model)
    assert hidden <= 128 and layers == 2
    assert model.config.use_cache is False
    batch = random_batch(2, 8, vocab_size=model.config.vocab_size)
    output = model(**batch)
    assert output.logits.shape == (2, 8, model.config.vocab_size)
    assert torch.isfinite(output.loss)
    # every architecture has projections to prune besides lm_head
    assert len(linear_weights(model)) >= 4 * layers


def test_builds_are_seeded_and_overridable():
    first, second = build_tiny("tiny-llama", seed=3), build_tiny("llama", seed=3)
    for (name, a), (_, b) in zip(first.named_parameters(), second.named_parameters()):
        assert torch.equal(a, b), name
    deeper = build_tiny("tiny-llama", num_hidden_layers=3)
    assert deeper.config.num_hidden_layers == 3 and len(deeper.model.layers) == 3


def test_meta_build_allocates_no_weights():
    model = build_tiny("tiny-mistral", device="meta")
    assert all(p.device.type == "meta" for p in model.parameters())


def test_unknown_name_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown tiny model 'tiny-bert'.*tiny-llama"):
        canonical_name("tiny-bert")


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-gpt2"])
def test_prune_unstructured_and_2_4_are_exact_and_skip_lm_head(name):
    model = build_tiny(name)
    head_before = model.lm_head.weight.detach().clone()
    prune_(model, sparsity=0.5)
    for fqn, weight in linear_weights(model):
        zeros_per_row = (weight == 0).sum(dim=1)
        assert torch.all(zeros_per_row == weight.shape[1] // 2), fqn
    assert torch.equal(model.lm_head.weight, head_before)

    model = build_tiny(name)
    prune_(model, pattern="2:4")
    for fqn, weight in linear_weights(model):
        groups = weight.reshape(weight.shape[0], -1, 4)
        assert torch.all((groups == 0).sum(-1) == 2), fqn


def test_prune_is_the_library_pruner_in_every_spelling():
    """``"50%"`` (the test helpers' spelling), ``sparsity=0.5`` and ``"2:4"`` prune exactly as
    :func:`lors_fx.workflows.prune.magnitude_prune_` does, and report the counts."""
    for pattern, kwargs in (("50%", dict(sparsity=0.5)), ("2:4", dict(pattern="2:4"))):
        model, reference = build_tiny("tiny-qwen2"), build_tiny("tiny-qwen2")
        result = prune_(model, pattern)
        assert result == magnitude_prune_(reference, **kwargs)
        assert set(result) == {fqn for fqn, _ in linear_weights(model)}
        assert all(value == pytest.approx(0.5) for value in result.values())
        for (fqn, weight), (_, expected) in zip(linear_weights(model), linear_weights(reference)):
            assert torch.equal(weight, expected), fqn


def test_build_model_is_the_test_helper_contract():
    model = build_model("gemma3", "2:4")
    assert model.training
    assert all(m.p == 0.0 for m in model.modules() if isinstance(m, nn.Dropout))
    assert all(float((w == 0).float().mean()) == 0.5 for _, w in linear_weights(model))
    assert set(tiny_models.MODEL_BUILDERS) == {"llama", "qwen2", "mistral", "gemma3", "gpt2"}
