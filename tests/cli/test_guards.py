"""The guards of the text commands (eval, prune, train): a model saved without a tokenizer, a
tokenizer larger than the vocabulary, text shorter than a block, a window longer than the
model's positions, linears left dense. Each is one clear line (exit 1) or a note on stderr."""
from __future__ import annotations

import json

import pytest
import torch

from lors_fx import cli
from lors_fx.workflows.prune import magnitude_prune_
from tests.workflows.test_evaluate import byte_tokenizer

POSITIONS = 64


def _byte_llama(vocab=257):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=2, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=vocab,
                                        max_position_embeddings=POSITIONS,
                                        eos_token_id=min(256, vocab - 1),
                                        bos_token_id=min(256, vocab - 1),
                                        pad_token_id=min(256, vocab - 1)))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Directories: ``dense`` and ``pruned`` (with the byte tokenizer), ``no_tokenizer`` (the
    pruned weights alone), ``small_vocab`` (100 embedding rows, 257-token tokenizer); a corpus."""
    folder = tmp_path_factory.mktemp("guards")
    tokenizer = byte_tokenizer()
    model = _byte_llama()
    model.save_pretrained(folder / "dense")
    tokenizer.save_pretrained(folder / "dense")
    magnitude_prune_(model, 0.5)
    for name in ("pruned", "no_tokenizer"):
        model.save_pretrained(folder / name)
    tokenizer.save_pretrained(folder / "pruned")
    _byte_llama(vocab=100).save_pretrained(folder / "small_vocab")
    tokenizer.save_pretrained(folder / "small_vocab")
    (folder / "corpus.txt").write_text(
        "\n\n".join(f"Document {i} says hello to the world, again and again." for i in range(30)))
    return folder


def _main(argv, capfd):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def test_a_model_without_tokenizer_says_how_to_give_one(saved, capfd):
    corpus = saved / "corpus.txt"
    code, out, err = _main(["eval", saved / "no_tokenizer", "--data", corpus, "--max-length", 32,
                            "--no-progress"], capfd)
    assert code == 1 and out == ""
    assert err.count("\n") == 1 and "has no tokenizer" in err and "--tokenizer PATH" in err
    code, out, err = _main(["prune", saved / "no_tokenizer", "--method", "wanda", "--data",
                            corpus, "--block-size", 16, "--samples", 2, "--no-progress"], capfd)
    assert code == 1 and "wanda calibration needs one" in err and "--tokenizer PATH" in err
    code, out, err = _main(["eval", saved / "no_tokenizer", "--tokenizer", saved / "pruned",
                            "--data", corpus, "--max-length", 32, "--no-progress"], capfd)
    assert code == 0, err
    assert "perplexity" in out


def test_a_tokenizer_larger_than_the_vocabulary_is_one_clear_error(saved, capfd):
    code, out, err = _main(["eval", saved / "small_vocab", "--data", saved / "corpus.txt",
                            "--max-length", 32, "--no-progress"], capfd)
    assert code == 1 and err.count("\n") == 1
    assert "IndexError" not in err
    assert "tokenizer: it has 257 tokens but the model's embedding has 100 rows" in err


def test_text_shorter_than_a_block_gives_both_numbers(saved, capfd):
    corpus = saved / "corpus.txt"
    code, _, err = _main(["prune", saved / "pruned", "--method", "wanda", "--data", corpus,
                          "--block-size", 4096, "--no-progress"], capfd)
    assert code == 1 and err.count("\n") == 1
    assert "the training text is" in err and "shorter than one block of 4096 tokens" in err
    # the same text through `lors-fx train` (it used to fail in the gradient init)
    code, _, err = _main(["train", saved / "pruned", "--out", saved / "train_out", "--data",
                          corpus, "--block-size", 4096, "--steps", 1, "--no-progress"], capfd)
    assert code == 1 and "shorter than one block of 4096 tokens" in err
    assert "batches is empty" not in err


def test_eval_max_length_is_cut_to_the_positions_with_a_note(saved, capfd, tmp_path):
    out_json = tmp_path / "eval.json"
    code, out, err = _main(["eval", saved / "pruned", "--data", saved / "corpus.txt",
                            "--max-length", 512, "--stride", 400, "--no-progress", "--json",
                            out_json], capfd)
    assert code == 0, err
    assert (f"note: --max-length 512 exceeds the model's {POSITIONS} positions "
            f"(max_position_embeddings); using {POSITIONS}") in err
    assert f"--stride 400 exceeds the window; using {POSITIONS}" in err
    perplexity = json.loads(out_json.read_text())["perplexity"]
    assert perplexity["max_length"] == POSITIONS and perplexity["stride"] == POSITIONS


def test_prune_lists_the_linears_left_dense(saved, capfd):
    code, out, err = _main(["prune", saved / "dense", "--method", "magnitude", "--targets",
                            "q_proj", "k_proj", "--no-progress"], capfd)
    assert code == 0, err
    note = next(line for line in err.splitlines() if "get no LoRS adapters" in line)
    assert note.startswith("lors-fx prune: note: 10 linear(s) are dense (sparsity < 0.25)")
    assert "model.layers.1.mlp.down_proj" in note and "model.layers.0.self_attn.v_proj" in note
    assert "q_proj" not in note and "k_proj" not in note and "lm_head" not in note
