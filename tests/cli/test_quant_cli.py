"""The command line on quantized bases: ``prune --bits`` writes a compressed-tensors checkpoint
that plain transformers loads; ``train`` on it is quantization-aware; ``merge`` writes the sparse
quantized model that computes what was trained; ``train --prune --bits`` and ``eval --bits``."""
from __future__ import annotations

import json

import pytest
import torch

from lors_fx import cli
from lors_fx.quantized import QuantizedLinear, quantized_modules
from lors_fx.workflows.embedded import load_model
from tests.cli.test_guards import _byte_llama
from tests.workflows.test_evaluate import byte_tokenizer


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """``dense`` (a float byte-level Llama with its tokenizer) and a corpus."""
    root = tmp_path_factory.mktemp("quant_cli")
    _byte_llama().save_pretrained(root / "dense")
    byte_tokenizer().save_pretrained(root / "dense")
    (root / "corpus.txt").write_text(
        "\n\n".join(f"Document {i} says hello to the world, again and again." for i in range(30)))
    return root


def _main(argv, capfd):
    code = cli.main([str(a) for a in argv])
    out, err = capfd.readouterr()
    return code, out, err


def _ids(n=24):
    return torch.arange(n).remainder(250).unsqueeze(0)


@pytest.fixture(scope="module")
def quantized(folder):
    """``prune dense --method sparsegpt --bits 4`` (SparseGPT's joint mode) into ``q4``."""
    code = cli.main(["prune", str(folder / "dense"), "--method", "sparsegpt", "--sparsity", "0.5",
                     "--bits", "4", "--group-size", "16", "--data", str(folder / "corpus.txt"),
                     "--samples", "8", "--block-size", "16", "--out", str(folder / "q4"),
                     "--no-progress", "--json"])
    assert code == 0
    return folder / "q4"


def test_prune_bits_writes_a_checkpoint_plain_transformers_loads(quantized):
    from transformers import AutoModelForCausalLM

    config = json.loads((quantized / "config.json").read_text())
    assert config["quantization_config"]["format"] == "pack-quantized"
    plain = AutoModelForCausalLM.from_pretrained(str(quantized))
    ours, _ = load_model(str(quantized), progress=False)
    layers = quantized_modules(ours)
    assert layers and all(isinstance(m, QuantizedLinear) and m.bits == 4 and m.group_size == 16
                          for m in layers.values())
    for layer in layers.values():
        assert abs(float((layer.codes == 0).float().mean()) - 0.5) < 1e-6
    with torch.no_grad():
        torch.testing.assert_close(plain(_ids()).logits, ours(_ids()).logits, rtol=1e-6,
                                   atol=1e-6)


def test_train_on_a_quantized_base_is_quant_aware_and_merges_to_what_was_trained(
        folder, quantized, capfd):
    out, merged = folder / "trained", folder / "merged"
    code, _, err = _main(["train", quantized, "--out", out, "--steps", "2", "--data",
                          folder / "corpus.txt", "--block-size", "16", "--batch-size", "2",
                          "--init", "zeros", "--no-progress"], capfd)
    assert code == 0, err[-2000:]
    saved = json.loads((out / "adapters" / "adapter_config.json").read_text())
    assert json.dumps(saved).count("quant_aware") and '"quant_aware": true' in json.dumps(saved)
    code, _, err = _main(["merge", quantized, out / "adapters", "--out", merged, "--no-progress"],
                         capfd)
    assert code == 0, err[-2000:]
    ppl = {}
    for name, argv in (("trained", [quantized, "--adapters", out / "adapters"]),
                       ("merged", [merged])):
        code, _, err = _main(["eval", *argv, "--data", folder / "corpus.txt", "--max-length", "32",
                              "--json", folder / f"{name}.json", "--no-progress"], capfd)
        assert code == 0, err[-2000:]
        ppl[name] = json.loads((folder / f"{name}.json").read_text())["perplexity"]["perplexity"]
    assert ppl["merged"] == pytest.approx(ppl["trained"], rel=1e-6)
    base, _ = load_model(str(quantized), progress=False)
    after, _ = load_model(str(merged), progress=False)
    for name, layer in quantized_modules(base).items():
        assert torch.equal(quantized_modules(after)[name].codes != 0, layer.codes != 0)


def test_train_prune_and_bits_saves_the_quantized_base(folder, capfd):
    out = folder / "pruned_here"
    code, _, err = _main(["train", folder / "dense", "--out", out, "--prune", "wanda", "--bits",
                          "8", "--group-size", "0", "--quant-method", "rtn", "--steps", "1",
                          "--data", folder / "corpus.txt", "--block-size", "16", "--batch-size",
                          "2", "--init", "zeros", "--no-progress"], capfd)
    assert code == 0, err[-2000:]
    base, _ = load_model(str(out / "base"), progress=False)
    layers = quantized_modules(base)
    assert layers and all(m.bits == 8 and m.weight_scale.shape[1] == 1 for m in layers.values())


def test_eval_bits_quantizes_before_it_measures(folder, capfd):
    code, _, err = _main(["eval", folder / "dense", "--bits", "4", "--group-size", "16",
                          "--quant-method", "rtn", "--data", folder / "corpus.txt",
                          "--max-length", "32", "--json", folder / "e.json", "--no-progress"],
                         capfd)
    assert code == 0, err[-2000:]
    assert json.loads((folder / "e.json").read_text())["perplexity"]["perplexity"] > 1


def test_a_group_size_that_does_not_divide_is_one_line_and_writes_nothing(folder, capfd):
    code, out, err = _main(["prune", folder / "dense", "--method", "magnitude", "--bits", "4",
                            "--group-size", "48", "--quant-method", "rtn", "--out",
                            folder / "never", "--no-progress"], capfd)
    assert code != 0 and "does not divide" in err
    assert not (folder / "never").exists()
