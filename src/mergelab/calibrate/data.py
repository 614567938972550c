"""Calibration inputs: unlabelled (or labelled) texts from a benchmark task's split or a local file.

Statistics must be computed on data the evaluation does not score: :func:`task_texts` refuses the
``test`` split unless the caller declares the run *test-time adaptation* (``test_time=True``), and
every statistics file records the split it came from.

A :class:`CalibrationSet` is a list of texts (and optional labels) plus a description of where they
came from; :func:`tokenize_batches` turns it into padded batches. Examples are taken in a seeded
random order, so "the first ``n`` examples" of a split is a reproducible random sample.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, List, Optional, Sequence

import torch

from mergelab.errors import MergeLabError
from mergelab.io.records import iter_jsonl

HELD_OUT_SPLIT = "test"


@dataclass
class CalibrationSet:
    """Texts to run through a model, with optional integer labels and a provenance record.

    ``source`` is a JSON-serialisable description (suite, task, split, file, seed, count) written
    into the metadata of every statistics file computed from this set.
    """

    texts: List[str]
    labels: Optional[List[int]] = None
    source: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.texts:
            raise MergeLabError(f"calibration data {self.source or ''} has no examples")
        if self.labels is not None and len(self.labels) != len(self.texts):
            raise MergeLabError("calibration data: texts and labels differ in length")

    def __len__(self) -> int:
        return len(self.texts)


def _sample(n_total: int, n: Optional[int], seed: int) -> List[int]:
    order = list(range(n_total))
    random.Random(seed).shuffle(order)
    return order if n is None or n <= 0 else order[:n]


def check_split(split: str, test_time: bool, what: str = "calibration") -> None:
    """Refuse the held-out test split unless the run is declared test-time adaptation."""
    if split == HELD_OUT_SPLIT and not test_time:
        raise MergeLabError(
            f"{what} on the '{HELD_OUT_SPLIT}' split would leak the data the benchmark scores; use 'train' or "
            f"'validation', or declare test-time adaptation explicitly (--test-time / test_time=True), which is "
            f"then recorded next to every number"
        )


def task_texts(task, split: str = "train", n: Optional[int] = None, seed: int = 0,
               test_time: bool = False, suite: str = "") -> CalibrationSet:
    """``n`` examples (all when ``n`` is None or <= 0) of ``split`` of a :class:`~mergelab.evaluate.tasks.Task`.

    Labels are kept (the empirical Fisher uses them); unlabelled statistics ignore them.
    """
    check_split(split, test_time)
    examples = task.split(split)
    idx = _sample(len(examples), n, seed)
    return CalibrationSet(
        [examples[i].text for i in idx], [examples[i].label for i in idx],
        {"kind": "task", "suite": suite, "task": task.name, "split": split, "n": len(idx), "seed": seed,
         "test_time": bool(test_time), "task_fingerprint": task.fingerprint()},
    )


def suite_task_texts(suite: str, task: str, split: str = "train", n: Optional[int] = None, seed: int = 0,
                     test_time: bool = False) -> CalibrationSet:
    """Like :func:`task_texts` for task ``task`` of the suite ``suite`` (name, folder or YAML)."""
    from mergelab.evaluate.tasks import load_suite

    s = load_suite(suite)
    return task_texts(s.task(task), split, n, seed, test_time, suite=s.name)


def file_texts(path, text_field: str = "text", label_field: Optional[str] = None, n: Optional[int] = None,
               seed: int = 0) -> CalibrationSet:
    """Texts from a local file: ``.jsonl`` (one object per line, text under ``text_field``) or plain text
    (one example per non-empty line). ``label_field`` (JSONL only) reads integer labels too.
    """
    path = Path(path)
    if not path.is_file():
        raise MergeLabError(f"calibration file '{path}' does not exist")
    texts: List[str] = []
    labels: List[int] = []
    if path.suffix.lower() in (".jsonl", ".ndjson"):
        for i, row in iter_jsonl(path):
            if text_field not in row:
                raise MergeLabError(f"{path}:{i}: expected a JSON object with the text field '{text_field}'")
            texts.append(str(row[text_field]))
            if label_field is not None:
                if label_field not in row or isinstance(row[label_field], bool) \
                        or not isinstance(row[label_field], int):
                    raise MergeLabError(f"{path}:{i}: expected an integer label under '{label_field}'")
                labels.append(int(row[label_field]))
    else:
        if label_field is not None:
            raise MergeLabError(f"{path}: labels (--label-field) need a .jsonl file")
        texts = [ln.rstrip("\n") for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]
    if not texts:
        raise MergeLabError(f"calibration file '{path}' has no examples")
    idx = _sample(len(texts), n, seed)
    return CalibrationSet([texts[i] for i in idx], [labels[i] for i in idx] if label_field else None,
                          {"kind": "file", "path": str(path), "n": len(idx), "seed": seed,
                           "text_field": text_field})


@dataclass
class Batch:
    """A padded batch: ``input_ids``/``attention_mask`` ``[B, T]`` and optional ``labels`` ``[B]``."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, i: int) -> "Batch":
        """Example ``i`` alone as a batch of one, its padding positions removed (left or right padding)."""
        keep = self.attention_mask[i].bool()
        return Batch(self.input_ids[i:i + 1, keep], self.attention_mask[i:i + 1, keep],
                     None if self.labels is None else self.labels[i:i + 1])


def tokenize_batches(tokenizer, data: CalibrationSet, batch_size: int, max_length: int) -> Iterator[Batch]:
    """Padded batches of ``data`` in its order (texts truncated to ``max_length`` tokens)."""
    if batch_size < 1:
        raise MergeLabError(f"batch size must be >= 1, got {batch_size}")
    if getattr(tokenizer, "pad_token", None) is None and getattr(tokenizer, "eos_token", None) is not None:
        tokenizer.pad_token = tokenizer.eos_token
    for i in range(0, len(data), batch_size):
        texts = data.texts[i:i + batch_size]
        enc = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        labels = None if data.labels is None else torch.tensor(data.labels[i:i + batch_size])
        yield Batch(enc["input_ids"], enc["attention_mask"], labels)


def tensor_batches(input_ids: Sequence, batch_size: int, pad_id: int = 0) -> Iterator[Batch]:
    """Batches from pre-tokenised id lists (right-padded with ``pad_id``): for tests and custom data."""
    for i in range(0, len(input_ids), batch_size):
        rows = [list(r) for r in input_ids[i:i + batch_size]]
        t = max(len(r) for r in rows)
        ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), t), dtype=torch.long)
        for j, r in enumerate(rows):
            ids[j, :len(r)] = torch.tensor(r, dtype=torch.long)
            mask[j, :len(r)] = 1
        yield Batch(ids, mask)
