"""lors_fx.workflows.evaluate: strided perplexity against hand computations, local lm-eval tasks."""
import importlib.util
import json
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from lors_fx.workflows.evaluate import (PAPER_TASKS, strided_perplexity, text_perplexity,
                              write_local_tasks, zero_shot)

DATA = Path(__file__).resolve().parents[1] / "data"
HAS_LM_EVAL = importlib.util.find_spec("lm_eval") is not None


def byte_tokenizer():
    """A byte-level fast tokenizer (256 byte tokens + <eos>=256), built offline."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["<eos>"] = 256
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>",
                                   bos_token="<eos>")


class Bigram(nn.Module):
    """logits[t] = table[token t]: each prediction depends on the previous token only."""

    def __init__(self, vocab=7, seed=0):
        super().__init__()
        self.table = nn.Parameter(torch.randn(vocab, vocab,
                                              generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return self.table[input_ids]


class ByPosition(nn.Module):
    """logits[j] = table[j]: each prediction depends only on the position inside the window."""

    def __init__(self, vocab=7, length=16, seed=1):
        super().__init__()
        self.table = nn.Parameter(torch.randn(length, vocab,
                                              generator=torch.Generator().manual_seed(seed)))

    def forward(self, input_ids):
        return self.table[: input_ids.shape[1]].expand(input_ids.shape[0], -1, -1)


def _log_softmax(row, token):
    row = [float(v) for v in row.detach()]
    top = max(row)
    return row[token] - (top + math.log(sum(math.exp(v - top) for v in row)))


def _hf_protocol(model, ids, max_length, stride):
    """The Hugging Face perplexity guide's loop, written out with -100 labels and the shift."""
    nll, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + max_length, len(ids))
        trg_len = end - prev_end
        window = ids[begin:end]
        labels = list(window)
        for j in range(len(labels) - trg_len):
            labels[j] = -100
        logits = model(torch.tensor([window]))[0].detach()
        for j in range(1, len(window)):  # position j-1 predicts label j
            if labels[j] != -100:
                nll -= _log_softmax(logits[j - 1], labels[j])
                count += 1
        prev_end = end
        if end == len(ids):
            break
    return math.exp(nll / count), count


IDS = [3, 1, 4, 1, 5, 2, 6, 5, 3, 5, 0, 2, 6, 4, 3, 3, 2, 1, 0, 6, 2, 6, 4, 3, 3]  # 25 tokens


def test_bigram_perplexity_is_exact_for_any_overlapping_stride():
    model = Bigram()
    nll = -sum(_log_softmax(model.table[a], b) for a, b in zip(IDS, IDS[1:]))
    expected = math.exp(nll / (len(IDS) - 1))
    for max_length, stride in ((8, 4), (8, 1), (30, 10), (5, 3)):
        result = strided_perplexity(model, IDS, max_length=max_length, stride=stride)
        assert result.tokens == len(IDS) - 1
        assert result.perplexity == pytest.approx(expected, rel=1e-6)
    # disjoint windows: the first token of each window has no context and is not scored
    disjoint = strided_perplexity(model, IDS, max_length=8, stride=8)
    starts = {8, 16, 24}
    nll = -sum(_log_softmax(model.table[IDS[i - 1]], IDS[i]) for i in range(1, 25)
               if i not in starts)
    assert disjoint.tokens == 24 - 3 and disjoint.windows == 3  # [24, 25) scores nothing
    assert disjoint.perplexity == pytest.approx(math.exp(nll / 21), rel=1e-6)


@pytest.mark.parametrize("max_length,stride", [(8, 4), (8, 8), (6, 1), (16, 5), (10, 7)])
def test_position_model_matches_the_hf_protocol(max_length, stride):
    model = ByPosition(length=16)
    expected, count = _hf_protocol(model, IDS, max_length, stride)
    for batch_size in (1, 3):
        result = strided_perplexity(model, IDS, max_length=max_length, stride=stride,
                                    batch_size=batch_size)
        assert result.tokens == count
        assert result.perplexity == pytest.approx(expected, rel=1e-6)


def test_only_new_targets_count_hand_case():
    """max_length 4, stride 2 on 6 tokens: windows [0,4) scores 1..3, [2,6) scores 4..5."""
    model = ByPosition(length=4)
    ids = [0, 1, 2, 3, 4, 5]
    t = model.table
    nll = -(_log_softmax(t[0], 1) + _log_softmax(t[1], 2) + _log_softmax(t[2], 3)
            + _log_softmax(t[1], 4) + _log_softmax(t[2], 5))
    result = strided_perplexity(model, ids, max_length=4, stride=2)
    assert (result.tokens, result.windows) == (5, 2)
    assert result.nll == pytest.approx(nll, rel=1e-6)


def test_text_perplexity_joins_documents_and_truncates():
    from lors_fx.workflows.data import ByteTokenizer

    model = Bigram(vocab=257)
    full = text_perplexity(model, ByteTokenizer(), ["ab", "cd"], max_length=4, stride=2)
    assert full.tokens == len("ab\n\ncd") - 1
    cut = text_perplexity(model, ByteTokenizer(), ["ab", "cd"], max_length=4, stride=2,
                          max_tokens=3)
    assert cut.tokens == 2


@pytest.mark.parametrize("kwargs,match", [({"max_length": 1}, "max_length"),
                                          ({"max_length": 4, "stride": 5}, "stride"),
                                          ({"max_length": 4, "stride": 0}, "stride")])
def test_bad_windows_are_rejected(kwargs, match):
    with pytest.raises(ValueError, match=match):
        strided_perplexity(Bigram(), IDS, **kwargs)


REAL_FIELDS = {
    "boolq": {"question", "passage", "idx", "label"},
    "rte": {"sentence1", "sentence2", "label", "idx"},
    "hellaswag": {"ind", "activity_label", "ctx_a", "ctx_b", "ctx", "endings", "source_id",
                  "split", "split_type", "label"},
    "winogrande": {"sentence", "option1", "option2", "answer"},
    "arc_easy": {"id", "question", "choices", "answerKey"},
    "arc_challenge": {"id", "question", "choices", "answerKey"},
    "openbookqa": {"id", "question_stem", "choices", "answerKey"},
}


@pytest.mark.parametrize("task", PAPER_TASKS)
def test_local_task_files_use_the_real_schemas(task):
    rows = [json.loads(line) for line in (DATA / f"{task}.jsonl").read_text().splitlines()]
    assert len(rows) >= 4
    for row in rows:
        assert set(row) == REAL_FIELDS[task]
        if "choices" in row:
            assert row["answerKey"] in row["choices"]["label"]
            assert len(row["choices"]["label"]) == len(row["choices"]["text"])
        if task == "winogrande":
            assert row["sentence"].count("_") == 1 and row["answer"] in ("1", "2")


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval)")
def test_write_local_tasks(tmp_path):
    names = write_local_tasks(DATA, tmp_path, ["boolq", "winogrande"])
    assert names == {"boolq": "lors_local_boolq", "winogrande": "lors_local_winogrande"}
    text = (tmp_path / "lors_local_boolq.yaml").read_text()
    assert "dataset_path: json" in text and str((DATA / "boolq.jsonl").resolve()) in text
    with pytest.raises(FileNotFoundError, match="no hellaswag.jsonl"):
        write_local_tasks(tmp_path, tmp_path / "x", ["hellaswag"])
    with pytest.raises(ValueError, match="no local definition"):
        write_local_tasks(DATA, tmp_path, ["mmlu"])


def _byte_llama():
    """A 1-layer Llama over the byte vocabulary of :func:`byte_tokenizer` (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(hidden_size=32, intermediate_size=64,
                                        num_hidden_layers=1, num_attention_heads=2,
                                        num_key_value_heads=1, vocab_size=257,
                                        eos_token_id=256, bos_token_id=256, pad_token_id=256))


def test_token_ids_beyond_the_embedding_are_a_clear_error():
    model = _byte_llama()  # 257 embedding rows
    with pytest.raises(ValueError, match="token id 300 is outside the model's embedding of 257"):
        strided_perplexity(model, [1, 2, 300, 4], max_length=4)


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval)")
def test_zero_shot_on_local_task_files_matches_hand_scoring(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = _byte_llama()
    tokenizer = byte_tokenizer()
    results = zero_shot(model, tokenizer, PAPER_TASKS, tasks_dir=str(DATA))
    assert set(results) == set(PAPER_TASKS)
    for task, metrics in results.items():
        n = len((DATA / f"{task}.jsonl").read_text().splitlines())
        assert 0.0 <= metrics["acc"] <= 1.0
        assert metrics["acc"] * n == pytest.approx(round(metrics["acc"] * n))  # k of n right
    assert "acc_norm" in results["hellaswag"] and "acc_norm" in results["arc_easy"]
    # boolq by hand: log p(" no" | prompt) vs log p(" yes" | prompt), lm-eval's prompt
    rows = [json.loads(line) for line in (DATA / "boolq.jsonl").read_text().splitlines()]
    right = 0
    with torch.no_grad():
        for row in rows:
            prompt = f"{row['passage']}\nQuestion: {row['question']}?\nAnswer:"
            scores = []
            for choice in (" no", " yes"):
                context = tokenizer(prompt)["input_ids"]
                whole = tokenizer(prompt + choice)["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), -1)
                scores.append(sum(float(logp[i - 1, whole[i]])
                                  for i in range(len(context), len(whole))))
            right += int(scores.index(max(scores)) == row["label"])
    assert results["boolq"]["acc"] == pytest.approx(right / len(rows))


@pytest.mark.skipif(not HAS_LM_EVAL, reason="lm-eval is not installed (pip install lm-eval)")
def test_cli_eval_with_adapters_and_local_tasks(tmp_path, monkeypatch, capfd):
    from lors_fx import LorsConfig, cli, optimize, save_adapters
    from lors_fx.workflows.prune import magnitude_prune_

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    model = _byte_llama()
    magnitude_prune_(model, 0.5)
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    optimize(model, LorsConfig(r=4), compile=False)
    save_adapters(model, str(tmp_path / "adapters"))
    text = tmp_path / "corpus.txt"
    text.write_text("\n\n".join(f"Document {i} says hello to the world." for i in range(20)))
    out = tmp_path / "eval.json"
    capfd.readouterr()  # what the set-up printed
    monkeypatch.chdir(tmp_path)  # outside a git checkout, where lm-eval's `git describe` fails
    code = cli.main(["eval", str(tmp_path / "base"), "--adapters", str(tmp_path / "adapters"),
                     "--data", str(text), "--max-length", "32", "--tasks", "boolq", "rte",
                     "--tasks-dir", str(DATA), "--no-progress", "--json", str(out)])
    printed = capfd.readouterr()
    assert code == 0, printed.err
    data = json.loads(out.read_text())
    assert data["perplexity"]["tokens"] > 0 and data["perplexity"]["perplexity"] > 1
    assert set(data["zero_shot"]) == {"boolq", "rte"}
    # --no-progress: no bar (ours, transformers', lm-eval's, datasets') and none of lm-eval's
    # warnings about how lors-fx calls it (an in-memory model, local task files, 0 shots) or
    # the cwd (not a git checkout)
    assert printed.err == "", printed.err
    assert "boolq" in printed.out and "perplexity" in printed.out
