"""Text corpora and instruction sets as fixed-length token blocks, split by document.

Sources (:func:`load_texts`, :func:`load_instructions`):

- ``"embedded"`` (alias ``"lee"``): gensim's ``lee_background.cor`` (300 news documents, one per
  line), read by path from the installed wheel (``pip install --no-deps gensim``; never imported);
  ``"enwiki"``: the same wheel's shortened Wikipedia dump (206 pages, wiki markup).
  For instructions, ``"embedded"`` (alias ``"chatterbot"``): chatterbot-corpus' English Q/A pairs
  (``pip install --no-deps chatterbot-corpus``).
- a local ``.txt`` (documents separated by blank lines; one per line when it has none),
  ``.json`` (a list of records) or ``.jsonl`` file; records give ``text`` (or ``text_field``) or
  ``instruction``/``input``/``output`` (turned into an Alpaca prompt).
- any other name: a hub dataset through ``datasets.load_dataset`` (``"wikitext-2"`` and
  ``"alpaca"`` are shorthands); ``datasets`` is imported only then.

Splits are made by document before tokenising (seeded), so no eval token ever comes from a train
document; each split's documents are joined with EOS and cut into ``block_size`` blocks (the tail
that does not fill a block is dropped).
"""
from __future__ import annotations

import bz2
import importlib.util
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import torch
import yaml
from torch import Tensor

from lors_fx.workflows.hub_data import group_wikitext, load_hub_dataset

__all__ = [
    "ALPACA_PROMPT", "ALPACA_PROMPT_NO_INPUT", "format_alpaca", "embedded_text_path",
    "load_texts", "load_instructions", "ByteTokenizer", "TextBlocks", "Splits", "split_documents",
    "build_lm_splits", "build_instruction_splits", "calibration_sample", "perplexity",
]

ALPACA_PROMPT = ("Below is an instruction that describes a task, paired with an input that provides "
                 "further context. Write a response that appropriately completes the request.\n\n"
                 "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_PROMPT_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                          "appropriately completes the request.\n\n"
                          "### Instruction:\n{instruction}\n\n### Response:\n")
_EMBEDDED_TEXT = {"embedded": "lee_background.cor", "lee": "lee_background.cor",
                  "enwiki": "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"}


def format_alpaca(record: dict, with_output: bool = False) -> str:
    """The Alpaca prompt of ``{"instruction", "input"?, "output"?}`` (plus the output if asked)."""
    if "instruction" not in record:
        raise KeyError(f"record: an instruction record needs an 'instruction' field, got "
                       f"{sorted(record)}")
    template = ALPACA_PROMPT if record.get("input") else ALPACA_PROMPT_NO_INPUT
    prompt = template.format(instruction=record["instruction"], input=record.get("input", ""))
    return prompt + record.get("output", "") if with_output else prompt


def _package_folder(name: str, pip: str) -> Path:
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"data: the embedded data needs the {name} wheel: run `{pip}`")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_text_path(name: str = "embedded") -> Path:
    """Path of an embedded corpus inside the gensim wheel (``"embedded"``/``"lee"``/``"enwiki"``)."""
    if name not in _EMBEDDED_TEXT:
        raise ValueError(f"name: expected one of {sorted(_EMBEDDED_TEXT)}, got {name!r}")
    folder = _package_folder("gensim", "pip install --no-deps gensim")
    return folder / "test" / "test_data" / _EMBEDDED_TEXT[name]


def _enwiki_pages(path: Path) -> List[str]:
    with bz2.open(path, "rt", encoding="utf-8") as handle:
        xml = handle.read()
    pages = re.findall(r"<text[^>]*>(.*?)</text>", xml, flags=re.S)
    pages = [re.sub(r"&lt;.*?&gt;|&amp;\w+;|&quot;", " ", p).strip() for p in pages]
    return [p for p in pages if p and not p.upper().startswith("#REDIRECT")]


def _read_records(path: Path) -> List[dict]:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(line) for line in text.splitlines() if line.strip()]
    data = json.loads(text)
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        data = next((v for v in data.values() if isinstance(v, list)), None)
    if not isinstance(data, list):
        raise ValueError(f"data: {path} must hold a list of records")
    return data


def _record_text(record: dict, text_field: str) -> str:
    if text_field in record:
        return str(record[text_field])
    if "instruction" in record:
        return format_alpaca(record, with_output=True)
    raise KeyError(f"text_field: record has neither {text_field!r} nor 'instruction' "
                   f"(fields: {sorted(record)})")


def load_texts(source: str = "embedded", *, split: str = "train", text_field: str = "text",
               max_documents: Optional[int] = None, progress: bool = True) -> List[str]:
    """Documents (strings) from an embedded corpus, a local file or a hub dataset (see module doc).

    ``split`` and ``progress`` (``datasets``' bars) are used only for hub datasets;
    ``max_documents`` keeps the first N documents.
    """
    source = str(source)
    path = Path(source).expanduser()
    if source in _EMBEDDED_TEXT:
        file = embedded_text_path(source)
        docs = (_enwiki_pages(file) if source == "enwiki"
                else file.read_text(encoding="utf-8").splitlines())
    elif path.suffix in (".txt", ".cor", ".text") and path.is_file():
        text = path.read_text(encoding="utf-8")
        parts = re.split(r"\n\s*\n", text) if re.search(r"\n\s*\n", text) else text.splitlines()
        docs = parts
    elif path.suffix in (".json", ".jsonl") and path.is_file():
        docs = [_record_text(r, text_field) for r in _read_records(path)]
    elif path.suffix in (".txt", ".json", ".jsonl", ".cor", ".text"):
        raise FileNotFoundError(f"source: no such file {source!r}")
    else:
        dataset = load_hub_dataset(source, split, progress)
        column = text_field if text_field in dataset.column_names else None
        if column is None and "instruction" in dataset.column_names:
            docs = [format_alpaca(dict(r), with_output=True) for r in dataset]
        elif column is None:
            raise KeyError(f"text_field: {source!r} has no {text_field!r} column "
                           f"(columns: {dataset.column_names})")
        elif source.lower().startswith("wikitext"):
            docs = group_wikitext(dataset[column])
        else:
            docs = list(dataset[column])
    docs = [d.strip() for d in docs if d and d.strip()]
    if not docs:
        raise ValueError(f"source: {source!r} holds no text")
    return docs[:max_documents] if max_documents else docs


def _chatterbot_pairs() -> List[dict]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the C parser: 10x faster
    folder = _package_folder("chatterbot_corpus", "pip install --no-deps chatterbot-corpus")
    records = []
    for file in sorted((folder / "data" / "english").glob("*.yml")):
        data = yaml.load(file.read_text(encoding="utf-8"), Loader=loader) or {}
        for conversation in data.get("conversations") or []:
            turns = [str(t).strip() for t in conversation if t is not None]
            for question, answer in zip(turns, turns[1:]):
                if question and answer:
                    records.append({"instruction": question, "input": "", "output": answer})
    return records


def load_instructions(source: str = "embedded", *, split: str = "train",
                      max_records: Optional[int] = None, progress: bool = True) -> List[dict]:
    """``[{"instruction", "input", "output"}]`` from chatterbot-corpus (``"embedded"``/
    ``"chatterbot"``), a local .json/.jsonl file, or a hub dataset (``"alpaca"``; ``progress``:
    ``datasets``' bars)."""
    path = Path(str(source)).expanduser()
    if source in ("embedded", "chatterbot"):
        records = _chatterbot_pairs()
    elif path.suffix in (".json", ".jsonl"):
        if not path.is_file():
            raise FileNotFoundError(f"source: no such file {source!r}")
        records = _read_records(path)
    else:
        records = [dict(r) for r in load_hub_dataset(str(source), split, progress)]
    out = []
    for i, record in enumerate(records):
        if "instruction" not in record or "output" not in record:
            raise KeyError(f"source: record {i} of {source!r} needs 'instruction' and 'output' "
                           f"(fields: {sorted(record)})")
        out.append({"instruction": str(record["instruction"]),
                    "input": str(record.get("input") or ""), "output": str(record["output"])})
    return out[:max_records] if max_records else out


class ByteTokenizer:
    """A dependency-free tokenizer for tests and toys: UTF-8 bytes are ids 0..255, EOS is 256."""

    eos_token_id = 256
    pad_token_id = 256
    vocab_size = 257

    def encode(self, text: str, add_special_tokens: bool = False) -> List[int]:
        """The UTF-8 bytes of ``text``."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        """Bytes back to text (EOS and invalid bytes dropped)."""
        return bytes(i for i in ids if 0 <= int(i) < 256).decode("utf-8", errors="ignore")


def _encode_all(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    if not texts:
        return []
    if callable(tokenizer) and hasattr(tokenizer, "batch_decode"):  # a transformers tokenizer
        return tokenizer(list(texts), add_special_tokens=False)["input_ids"]
    return [list(tokenizer.encode(t, add_special_tokens=False)) for t in texts]


def _eos_id(tokenizer) -> int:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        raise ValueError("tokenizer: has no eos_token_id (needed to separate documents)")
    return int(eos)


@dataclass
class TextBlocks:
    """Fixed-length blocks for a plain training loop.

    ``input_ids``/``labels``: ``(n, block_size)`` long (labels are -100 where no loss is taken);
    ``doc_index``: ``(n, block_size)`` int32, the document each token came from (-1 for EOS/pad).
    """

    input_ids: Tensor
    labels: Tensor
    doc_index: Tensor

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> Dict[str, Tensor]:
        return {"input_ids": self.input_ids[index], "labels": self.labels[index]}

    def batches(self, batch_size: int, *, shuffle: bool = False,
                seed: int = 0) -> Iterator[Dict[str, Tensor]]:
        """Yield ``{"input_ids", "labels"}`` batches (seeded order when ``shuffle``)."""
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: must be a positive int, got {batch_size!r}")
        order = (torch.randperm(len(self), generator=torch.Generator().manual_seed(seed))
                 if shuffle else torch.arange(len(self)))
        for start in range(0, len(self), batch_size):
            yield self[order[start:start + batch_size]]


@dataclass
class Splits:
    """Train and eval blocks plus the document indices that went to each side."""

    train: TextBlocks
    eval: TextBlocks
    train_documents: List[int]
    eval_documents: List[int]


def split_documents(n_documents: int, eval_fraction: float = 0.1,
                    seed: int = 0) -> tuple[List[int], List[int]]:
    """Seeded split of document indices into ``(train, eval)``; eval gets
    ``max(1, round(eval_fraction * n))`` documents when ``eval_fraction > 0``."""
    if not 0.0 <= eval_fraction < 1.0:
        raise ValueError(f"eval_fraction: must be in [0, 1), got {eval_fraction!r}")
    n_eval = max(1, round(eval_fraction * n_documents)) if eval_fraction > 0 else 0
    if n_documents - n_eval < 1:
        raise ValueError(f"eval_fraction: {n_documents} document(s) cannot be split into train "
                         f"and eval; give more documents")
    order = torch.randperm(n_documents, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(order[n_eval:]), sorted(order[:n_eval])


def _pack(pieces: List[tuple], block_size: int, eos: int, side: str = "") -> TextBlocks:
    """Concatenate ``(doc, ids, loss_mask)`` pieces with EOS after each; cut into blocks. With a
    ``side`` name, fewer tokens than one block is an error that gives both numbers."""
    ids, labels, docs = [], [], []
    for doc, piece_ids, loss in pieces:
        ids += list(piece_ids) + [eos]
        labels += [t if keep else -100 for t, keep in zip(piece_ids, loss)] + [eos]
        docs += [doc] * len(piece_ids) + [-1]
    n = len(ids) // block_size
    if side and n == 0:
        raise ValueError(f"block_size: the {side} text is {len(ids)} tokens ({len(pieces)} "
                         f"document(s), EOS included), shorter than one block of {block_size} "
                         f"tokens; give more text or a smaller block size (--block-size)")
    cut = n * block_size
    return TextBlocks(torch.tensor(ids[:cut], dtype=torch.long).reshape(n, block_size),
                      torch.tensor(labels[:cut], dtype=torch.long).reshape(n, block_size),
                      torch.tensor(docs[:cut], dtype=torch.int32).reshape(n, block_size))


def _check_block_size(block_size) -> None:
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 2:
        raise ValueError(f"block_size: must be an int >= 2, got {block_size!r}")


def build_lm_splits(texts: Sequence[str], tokenizer, *, block_size: int = 512,
                    eval_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Split ``texts`` by document (seeded), tokenise each side and pack it into
    ``block_size`` blocks; labels equal input_ids (the model shifts them)."""
    _check_block_size(block_size)
    eos = _eos_id(tokenizer)
    train_docs, eval_docs = split_documents(len(texts), eval_fraction, seed)

    def side(indices, name=""):
        encoded = _encode_all(tokenizer, [texts[i] for i in indices])
        return _pack([(i, e, [True] * len(e)) for i, e in zip(indices, encoded)], block_size, eos,
                     name)

    return Splits(side(train_docs, "training"), side(eval_docs), train_docs, eval_docs)


def build_instruction_splits(records: Sequence[dict], tokenizer, *, block_size: int = 512,
                             eval_fraction: float = 0.1, seed: int = 0) -> Splits:
    """Alpaca-format ``records``, split by record, packed into blocks; the loss is taken on the
    response and its EOS only (prompt tokens have label -100)."""
    _check_block_size(block_size)
    eos = _eos_id(tokenizer)
    train_ids, eval_ids = split_documents(len(records), eval_fraction, seed)

    def side(indices, name=""):
        prompts = _encode_all(tokenizer, [format_alpaca(records[i]) for i in indices])
        outputs = _encode_all(tokenizer, [records[i]["output"] for i in indices])
        pieces = [(i, p + o, [False] * len(p) + [True] * len(o))
                  for i, p, o in zip(indices, prompts, outputs)]
        return _pack(pieces, block_size, eos, name)

    return Splits(side(train_ids, "training"), side(eval_ids), train_ids, eval_ids)


def calibration_sample(blocks: TextBlocks, n: int, *, seed: int = 0) -> Tensor:
    """``n`` distinct random blocks' ``input_ids`` (seeded), e.g. from ``splits.train``."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: must be a positive int, got {n!r}")
    if n > len(blocks):
        raise ValueError(f"n: asked for {n} calibration blocks but only {len(blocks)} exist; "
                         f"use fewer or a smaller block_size")
    pick = torch.randperm(len(blocks), generator=torch.Generator().manual_seed(seed))[:n]
    return blocks.input_ids[pick.sort().values]


@torch.no_grad()
def mean_token_loss(model: torch.nn.Module, data, *, batch_size: int = 4,
                    progress: bool = False) -> float:
    """Token-weighted mean next-token loss of a causal LM over ``data``: a :class:`TextBlocks`,
    an ``(n, T)`` input_ids tensor, or an iterable of ``{"input_ids", "labels"}`` batches
    (labels -100 are skipped). Raises ValueError when there is no target token."""
    from tqdm.auto import tqdm

    if isinstance(data, Tensor):
        data = TextBlocks(data, data.clone(), torch.zeros_like(data, dtype=torch.int32))
    batches = list(data.batches(batch_size)) if hasattr(data, "batches") else data
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    try:
        for batch in tqdm(batches, desc="eval loss", disable=not progress):
            ids, labels = batch["input_ids"].to(device), batch["labels"].to(device)
            logits = model(input_ids=ids).logits[:, :-1].float()
            target = labels[:, 1:]
            total += float(torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                reduction="sum"))
            count += int((target != -100).sum())
    finally:
        model.train(was_training)
    if count == 0:
        raise ValueError("data: no target token to evaluate")
    return total / count


def perplexity(model: torch.nn.Module, blocks, *, batch_size: int = 4,
               progress: bool = False) -> float:
    """``exp`` of :func:`mean_token_loss` over ``blocks`` (a :class:`TextBlocks` or an ``(n, T)``
    input_ids tensor)."""
    if len(blocks) == 0:
        raise ValueError("blocks: no block to evaluate")
    return math.exp(mean_token_loss(model, blocks, batch_size=batch_size, progress=progress))
