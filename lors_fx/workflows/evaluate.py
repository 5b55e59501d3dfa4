"""Evaluation: strided perplexity on held-out text, and zero-shot accuracy through lm-eval.

Perplexity (:func:`strided_perplexity`) follows the standard WikiText-2 protocol (Hugging Face's
"Perplexity of fixed-length models"): the documents are joined into one token stream, windows of
``max_length`` tokens start every ``stride`` tokens, and in each window only the targets that no
earlier window scored count (the first window scores all of its tokens after the first). No
token is scored twice; with ``stride < max_length`` every token but the stream's first is scored
once, with more context than disjoint windows give; with ``stride == max_length`` the windows are
disjoint and the first token of each window (no context) is not scored, as in that protocol.

Zero-shot (:func:`zero_shot`) runs lm-eval's Python API on an in-memory model
(``HFLM(pretrained=model, tokenizer=tokenizer)``). The paper's seven tasks (:data:`PAPER_TASKS`)
come from the hub when it is reachable; with ``tasks_dir`` they come from local JSONL files in the
tasks' own schemas (``<task>.jsonl``): :func:`write_local_tasks` writes task YAMLs that
``include`` lm-eval's own task definitions (same prompts, choices and metrics) and swap only the
data for ``dataset_path: json`` on the local file.

``lors-fx eval`` (:mod:`lors_fx.cli.eval`) runs both on a saved model and its adapters.
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

from lors_fx.workflows.checks import check_token_ids

__all__ = ["PAPER_TASKS", "PerplexityResult", "strided_perplexity", "text_perplexity",
           "write_local_tasks", "zero_shot"]

#: the paper's zero-shot tasks, as lm-eval names them
PAPER_TASKS = ("boolq", "rte", "hellaswag", "winogrande", "arc_easy", "arc_challenge",
               "openbookqa")
#: where each task's YAML lives inside lm_eval/tasks
_LM_EVAL_YAML = {"boolq": "super_glue/boolq/default.yaml", "rte": "glue/rte/default.yaml",
                 "hellaswag": "hellaswag/hellaswag.yaml", "winogrande": "winogrande/default.yaml",
                 "arc_easy": "arc/arc_easy.yaml", "arc_challenge": "arc/arc_challenge.yaml",
                 "openbookqa": "openbookqa/openbookqa.yaml"}
_LOCAL_PREFIX = "lors_local_"


@dataclass
class PerplexityResult:
    """``perplexity = exp(nll / tokens)``; ``tokens`` scored, ``windows`` forward passes."""

    perplexity: float
    nll: float
    tokens: int
    windows: int
    max_length: int
    stride: int

    def to_dict(self) -> dict:
        """A JSON-ready dict."""
        return asdict(self)


def _windows(n: int, max_length: int, stride: int) -> List[Tuple[int, int, int]]:
    """``(begin, end, first scored position)`` per window over a stream of ``n`` tokens."""
    windows, previous_end = [], 0
    for begin in range(0, n, stride):
        end = min(begin + max_length, n)
        first = max(previous_end, begin + 1)  # position 0 of the stream has no context
        if end > first:
            windows.append((begin, end, first))
        previous_end = end
        if end == n:
            break
    return windows


@torch.no_grad()
def strided_perplexity(model: nn.Module, input_ids, *, max_length: int = 1024,
                       stride: Optional[int] = None, batch_size: int = 1,
                       progress: bool = False) -> PerplexityResult:
    """Perplexity of a causal LM on one token stream with a sliding window (module docstring).

    Args:
        model: returns ``.logits`` (or a tensor) of shape ``(B, T, V)`` for ``model(input_ids=)``.
        input_ids: a 1-D token tensor (or list), the whole held-out stream.
        max_length: window length (the model's context, e.g. 1024 or 2048).
        stride: step between window starts (default ``max_length // 2``), ``1..max_length``.
        batch_size: windows of equal length run together.
    """
    from tqdm.auto import tqdm

    ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(-1)
    stride = max_length // 2 if stride is None else stride
    if isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2:
        raise ValueError(f"max_length: must be an int >= 2, got {max_length!r}")
    if isinstance(stride, bool) or not isinstance(stride, int) or not 1 <= stride <= max_length:
        raise ValueError(f"stride: must be an int in [1, max_length={max_length}], got {stride!r}")
    if ids.numel() < 2:
        raise ValueError(f"input_ids: need at least 2 tokens, got {ids.numel()}")
    check_token_ids(ids, model)
    windows = _windows(ids.numel(), max_length, stride)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    nll, tokens = 0.0, 0
    groups: List[List[Tuple[int, int, int]]] = []
    for window in windows:  # consecutive windows of the same length share a batch
        if groups and len(groups[-1]) < batch_size and \
                groups[-1][0][1] - groups[-1][0][0] == window[1] - window[0]:
            groups[-1].append(window)
        else:
            groups.append([window])
    try:
        for group in tqdm(groups, desc="perplexity", disable=not progress, leave=False):
            batch = torch.stack([ids[b:e] for b, e, _ in group]).to(device)
            out = model(input_ids=batch)
            logits = out if isinstance(out, Tensor) else out.logits
            for row, (begin, end, first) in enumerate(group):
                # logits at window position j predict the token at stream position begin + j + 1
                pred = logits[row, first - begin - 1:end - begin - 1].float()
                target = batch[row, first - begin:end - begin]
                nll += float(torch.nn.functional.cross_entropy(pred, target, reduction="sum"))
                tokens += int(target.numel())
    finally:
        model.train(was_training)
    return PerplexityResult(math.exp(nll / tokens), nll, tokens, len(windows), max_length, stride)


def text_perplexity(model: nn.Module, tokenizer, texts: Sequence[str], *, max_length: int = 1024,
                    stride: Optional[int] = None, max_tokens: Optional[int] = None,
                    batch_size: int = 1, progress: bool = False) -> PerplexityResult:
    """:func:`strided_perplexity` on ``"\\n\\n".join(texts)`` tokenised as one stream (the
    WikiText-2 protocol), cut to its first ``max_tokens`` tokens when given."""
    text = "\n\n".join(texts)
    ids = tokenizer(text, return_tensors="pt")["input_ids"][0] if callable(tokenizer) \
        else torch.tensor(tokenizer.encode(text))
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return strided_perplexity(model, ids, max_length=max_length, stride=stride,
                              batch_size=batch_size, progress=progress)


def _lm_eval_tasks_folder() -> Path:
    try:
        import lm_eval.tasks
    except ImportError as error:
        raise ImportError("zero-shot evaluation needs lm-eval: run `pip install lm-eval`") \
            from error
    return Path(lm_eval.tasks.__file__).parent


def write_local_tasks(tasks_dir, out_dir, tasks: Sequence[str] = PAPER_TASKS) -> Dict[str, str]:
    """Write one lm-eval task YAML per task into ``out_dir``, reading ``tasks_dir/<task>.jsonl``.

    Each YAML ``include``s lm-eval's own definition of the task and replaces only its data
    (``dataset_path: json``, the file as the validation split). Returns ``{task: local task name}``
    (``lors_local_<task>``); pass ``out_dir`` to lm-eval as the include path.
    """
    folder = _lm_eval_tasks_folder()
    unknown = [t for t in tasks if t not in _LM_EVAL_YAML]
    if unknown:
        raise ValueError(f"tasks: no local definition for {unknown}; known: {list(_LM_EVAL_YAML)}")
    os.makedirs(out_dir, exist_ok=True)
    names = {}
    for task in tasks:
        data = Path(tasks_dir, f"{task}.jsonl").resolve()
        if not data.is_file():
            raise FileNotFoundError(f"tasks_dir: no {task}.jsonl in {tasks_dir!r}")
        names[task] = _LOCAL_PREFIX + task
        yaml = "\n".join([
            f"include: {json.dumps(str(folder / _LM_EVAL_YAML[task]))}",
            f"task: {names[task]}",
            "tag: []",
            "dataset_path: json",
            "dataset_name: null",
            "dataset_kwargs:",
            "  data_files:",
            f"    validation: {json.dumps(str(data))}",
            "training_split: null",
            "validation_split: validation",
            "test_split: null",
            "fewshot_split: null",
            ""])
        Path(out_dir, f"{names[task]}.yaml").write_text(yaml, encoding="utf-8")
    return names


@contextlib.contextmanager
def _lm_eval_quiet(progress: bool):
    """lm-eval's warnings about how we call it (an in-memory model, local task files, 0 shots)
    below ERROR, and with ``progress`` off its bars too (some have no switch, so stderr is
    swallowed inside the block); all restored on exit."""
    logger = logging.getLogger("lm_eval")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) if not progress else \
                contextlib.nullcontext():
            yield
    finally:
        logger.setLevel(level)


def zero_shot(model: nn.Module, tokenizer, tasks: Sequence[str] = PAPER_TASKS, *,
              tasks_dir: Optional[str] = None, limit: Optional[int] = None,
              batch_size: int = 1, progress: bool = True) -> Dict[str, Dict[str, float]]:
    """Zero-shot accuracy of an in-memory model with lm-eval; ``{task: {metric: value}}``.

    Args:
        tasks: lm-eval task names (default the paper's seven).
        tasks_dir: a folder of ``<task>.jsonl`` files in the tasks' own schemas (used instead of
            the hub; see :func:`write_local_tasks`).
        limit: at most this many examples per task.
        progress: lm-eval's progress bars.
    Metrics are lm-eval's (``acc``, ``acc_norm`` where the task defines it, and their stderr).
    """
    _lm_eval_tasks_folder()
    with _lm_eval_quiet(progress):
        output, names = _run_lm_eval(model, tokenizer, tasks, tasks_dir, limit, batch_size)
    results = {}
    for task, name in names.items():
        raw = output["results"][name]
        results[task] = {key.split(",")[0]: float(value) for key, value in raw.items()
                         if "," in key and "stderr" not in key
                         and isinstance(value, (int, float))}
    return results


def _run_lm_eval(model, tokenizer, tasks, tasks_dir, limit, batch_size):
    """lm-eval's ``simple_evaluate`` on the in-memory model: ``(output, {task: lm-eval name})``."""
    from lm_eval import evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    device = str(next(model.parameters()).device)
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)
    with tempfile.TemporaryDirectory(prefix="lors_fx_tasks_") as include:
        if tasks_dir is not None:
            names = write_local_tasks(tasks_dir, include, tasks)
            manager = TaskManager(include_path=include)
        else:
            names, manager = {t: t for t in tasks}, TaskManager()
        try:
            output = evaluator.simple_evaluate(model=lm, tasks=list(names.values()), limit=limit,
                                               task_manager=manager, log_samples=False,
                                               bootstrap_iters=0, num_fewshot=0)
        except Exception as error:
            if tasks_dir is None:
                raise RuntimeError(f"zero-shot: could not load {list(tasks)} from the hub "
                                   f"(offline?); pass tasks_dir with <task>.jsonl files "
                                   f"({type(error).__name__}: {error})") from error
            raise
    return output, names
