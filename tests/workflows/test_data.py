"""lors_fx.workflows.data: document splits never overlap, block shapes, local/embedded loading, Alpaca."""
from __future__ import annotations

import json

import pytest
import torch

from lors_fx.workflows import data
from lors_fx.workflows.data import (ByteTokenizer, build_instruction_splits, build_lm_splits,
                          calibration_sample, format_alpaca, load_instructions, load_texts,
                          split_documents)

TOK = ByteTokenizer()


def _docs(n=20, seed=0):
    """Distinct documents: document i uses only the letter chr(ord('a') + i % 26) and digits."""
    g = torch.Generator().manual_seed(seed)
    return [chr(97 + i % 26) * int(torch.randint(30, 120, (1,), generator=g)) + f" {i}"
            for i in range(n)]


def test_split_by_document_never_overlaps():
    docs = _docs(20)
    splits = build_lm_splits(docs, TOK, block_size=16, eval_fraction=0.25, seed=3)
    assert set(splits.train_documents).isdisjoint(splits.eval_documents)
    assert sorted(splits.train_documents + splits.eval_documents) == list(range(20))
    assert len(splits.eval_documents) == 5
    train_sources = set(splits.train.doc_index.unique().tolist()) - {-1}
    eval_sources = set(splits.eval.doc_index.unique().tolist()) - {-1}
    assert eval_sources and train_sources.isdisjoint(eval_sources)
    assert eval_sources <= set(splits.eval_documents)
    # provenance is real: every eval token is a byte of the document it is attributed to
    for block, sources in zip(splits.eval.input_ids, splits.eval.doc_index):
        for token, doc in zip(block.tolist(), sources.tolist()):
            if doc == -1:
                assert token == TOK.eos_token_id
            else:
                assert token in set(docs[doc].encode())


def test_blocks_shapes_labels_and_determinism():
    docs = _docs(12)
    a = build_lm_splits(docs, TOK, block_size=32, eval_fraction=0.2, seed=7)
    b = build_lm_splits(docs, TOK, block_size=32, eval_fraction=0.2, seed=7)
    c = build_lm_splits(docs, TOK, block_size=32, eval_fraction=0.2, seed=8)
    assert a.train.input_ids.shape[1] == 32 and a.train.input_ids.dtype == torch.long
    assert a.train.labels.shape == a.train.input_ids.shape == a.train.doc_index.shape
    assert torch.equal(a.train.labels, a.train.input_ids)
    assert torch.equal(a.train.input_ids, b.train.input_ids) and a.eval_documents == b.eval_documents
    assert a.eval_documents != c.eval_documents
    train_tokens = sum(len(docs[i].encode()) + 1 for i in a.train_documents)
    assert len(a.train) == train_tokens // 32  # only the tail that does not fill a block is dropped
    batches = list(a.train.batches(3))
    assert sum(len(x["input_ids"]) for x in batches) == len(a.train)
    assert set(batches[0]) == {"input_ids", "labels"}


def test_calibration_sample_is_seeded_and_from_train():
    splits = build_lm_splits(_docs(30), TOK, block_size=16, seed=0)
    one = calibration_sample(splits.train, 5, seed=1)
    assert one.shape == (5, 16)
    assert torch.equal(one, calibration_sample(splits.train, 5, seed=1))
    rows = {tuple(r) for r in splits.train.input_ids.tolist()}
    assert all(tuple(r) in rows for r in one.tolist())
    assert len({tuple(r) for r in one.tolist()}) == 5
    with pytest.raises(ValueError, match="n: asked for"):
        calibration_sample(splits.train, len(splits.train) + 1)


def test_bad_arguments_name_the_argument():
    with pytest.raises(ValueError, match="block_size"):
        build_lm_splits(_docs(4), TOK, block_size=1)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(1, 0.5)
    with pytest.raises(ValueError, match="eval_fraction"):
        split_documents(10, 1.0)
    with pytest.raises(FileNotFoundError, match="source"):
        load_texts("/nonexistent/file.jsonl")


def test_text_shorter_than_a_block_says_so_with_the_numbers():
    docs = ["short one", "short two", "three", "four"]  # 9 + 9 + 5 + 4 bytes, EOS after each
    with pytest.raises(ValueError, match=r"block_size: the training text is \d+ tokens \(3 "
                                         r"document\(s\), EOS included\), shorter than one block "
                                         r"of 64 tokens; give more text or a smaller block size"):
        build_lm_splits(docs, TOK, block_size=64, eval_fraction=0.25)
    records = [{"instruction": "Q?", "output": "A."}] * 4
    with pytest.raises(ValueError, match="the training text is .* shorter than one block of 512"):
        build_instruction_splits(records, TOK, block_size=512, eval_fraction=0.25)
    splits = build_lm_splits(docs, TOK, block_size=8, eval_fraction=0.25)  # eval may be empty
    assert len(splits.train) > 0


def test_local_txt_and_jsonl(tmp_path):
    txt = tmp_path / "corpus.txt"
    txt.write_text("first doc line one\nline two\n\n\nsecond doc\n\nthird\n", encoding="utf-8")
    assert load_texts(str(txt)) == ["first doc line one\nline two", "second doc", "third"]
    lines = tmp_path / "lines.txt"
    lines.write_text("a b\nc d\n\ne f", encoding="utf-8")
    assert load_texts(str(lines)) == ["a b\nc d", "e f"]
    flat = tmp_path / "flat.txt"
    flat.write_text("one\ntwo\nthree\n", encoding="utf-8")
    assert load_texts(str(flat)) == ["one", "two", "three"]

    jsonl = tmp_path / "texts.jsonl"
    jsonl.write_text("\n".join(json.dumps({"text": t}) for t in ["x y", "z"]), encoding="utf-8")
    assert load_texts(str(jsonl)) == ["x y", "z"]
    with pytest.raises(KeyError, match="text_field"):
        load_texts(str(jsonl), text_field="body")

    records = [{"instruction": "Add 2 and 2.", "input": "", "output": "4"},
               {"instruction": "Translate", "input": "chat", "output": "cat"}]
    rec = tmp_path / "alpaca.json"
    rec.write_text(json.dumps(records), encoding="utf-8")
    assert load_instructions(str(rec)) == records
    texts = load_texts(str(rec))
    assert texts[0].endswith("### Response:\n4") and "### Input:\nchat" in texts[1]


def test_alpaca_format():
    no_input = format_alpaca({"instruction": "Say hi.", "output": "hi"})
    assert no_input == data.ALPACA_PROMPT_NO_INPUT.format(instruction="Say hi.")
    assert "### Input" not in no_input and no_input.endswith("### Response:\n")
    full = format_alpaca({"instruction": "Sum", "input": "1 2", "output": "3"}, with_output=True)
    assert "### Instruction:\nSum\n\n### Input:\n1 2\n\n### Response:\n3" in full
    with pytest.raises(KeyError, match="instruction"):
        format_alpaca({"output": "x"})


def test_instruction_blocks_take_loss_on_responses_only():
    records = [{"instruction": f"Q{i}?", "input": "", "output": f"answer {i}"} for i in range(10)]
    splits = build_instruction_splits(records, TOK, block_size=64, eval_fraction=0.2, seed=0)
    assert set(splits.train_documents).isdisjoint(splits.eval_documents)
    labels, ids = splits.train.labels, splits.train.input_ids
    kept = labels != -100
    assert torch.equal(labels[kept], ids[kept])
    text = TOK.decode(labels[kept].tolist())
    assert "answer" in text and "### Instruction" not in text and "Q1?" not in text
    assert 0 < kept.float().mean() < 0.5


def test_embedded_text_and_qa_pairs_load():
    docs = load_texts("embedded")
    assert len(docs) == 300 and sum(len(d.split()) for d in docs) > 50_000
    assert docs[0].startswith("Hundreds of people have been forced to vacate their homes")
    wiki = load_texts("enwiki")
    assert len(wiki) == 106 and not any(p.upper().startswith("#REDIRECT") for p in wiki)
    pairs = load_instructions("embedded")
    assert len(pairs) > 1000
    assert all(p["instruction"] and p["output"] for p in pairs)
    assert {"instruction": "What is AI?", "input": "",
            "output": "Artificial Intelligence is the branch of engineering and science devoted "
                      "to constructing machines that think."} in pairs


def test_hub_name_without_datasets_is_a_clear_error(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_datasets(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("No module named 'datasets'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_datasets)
    with pytest.raises(RuntimeError, match="pip install datasets"):
        load_texts("wikitext-2")
