"""Bring your own generative task: a JSONL file of ``{"prompt": ..., "answer": ...}`` lines.

Each non-blank line is a JSON object with string fields ``prompt`` and ``answer`` (one line: no
newline, since generation stops at one), optionally ``split`` (``train``, ``validation`` or ``test``)
and ``meta`` (an object, kept with the example). Either every line has a ``split`` and those splits
are used as given, or none has one and the distinct prompts are split once from ``seed`` by
``ratios`` (train, validation, test; 0.8 / 0.1 / 0.1 by default). Lines with the same prompt always
land in the same split, so the splits' prompts are disjoint; a prompt given two splits, or two
different answers, is an error. Every error names the file and the line.

:func:`write_task_jsonl` writes any task (a built-in one too) in this format, with splits and meta,
so that ``load_jsonl_task`` gives it back unchanged.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Optional, Sequence

from mergelab.llmmix.tasks.base import CATEGORIES, METRICS, SPLITS, GenExample, GenTask, TaskError


def load_jsonl_task(path, name: Optional[str] = None, category: str = "custom", metric: str = "exact",
                    ratios: Sequence[float] = (0.8, 0.1, 0.1), seed: int = 0, held_out: bool = False,
                    max_new_tokens: int = 32) -> GenTask:
    """A :class:`GenTask` from the JSONL file at ``path`` (see the module docstring)."""
    path = Path(path)
    if metric not in METRICS:
        raise TaskError(f"{path}: unknown metric '{metric}'; expected one of {', '.join(METRICS)}")
    if category != "custom" and category not in CATEGORIES:
        raise TaskError(f"{path}: unknown category '{category}'; expected custom or one of {', '.join(CATEGORIES)}")
    if len(ratios) != 3 or any(r < 0 for r in ratios) or abs(sum(ratios) - 1.0) > 1e-6:
        raise TaskError(f"{path}: split ratios must be three non-negative numbers summing to 1, got {list(ratios)}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise TaskError(f"{path}: no such task file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise TaskError(f"{path}: cannot be read as UTF-8 text ({e})") from None
    rows = []  # (line number, example, split or None)
    for no, line in enumerate(lines, 1):
        if not line.strip():
            continue
        where = f"{path} line {no}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise TaskError(f"{where}: not valid JSON ({e.msg} at column {e.colno})") from None
        if not isinstance(obj, dict):
            raise TaskError(f"{where}: expected a JSON object with 'prompt' and 'answer', got {type(obj).__name__}")
        unknown = sorted(set(obj) - {"prompt", "answer", "split", "meta"})
        if unknown:
            raise TaskError(f"{where}: unknown field(s) {unknown}; expected prompt, answer, optional split and meta")
        for key in ("prompt", "answer"):
            if key not in obj:
                raise TaskError(f"{where}: missing '{key}'")
            if not isinstance(obj[key], str) or not obj[key].strip():
                raise TaskError(f"{where}: '{key}' must be a non-empty string, got {obj[key]!r}")
        if "\n" in obj["answer"]:
            raise TaskError(f"{where}: 'answer' must be one line (generation stops at a newline)")
        split = obj.get("split")
        if split is not None and split not in SPLITS:
            raise TaskError(f"{where}: split must be one of {', '.join(SPLITS)}, got {split!r}")
        meta = obj.get("meta", {})
        if not isinstance(meta, dict):
            raise TaskError(f"{where}: 'meta' must be a JSON object")
        rows.append((no, GenExample(obj["prompt"], obj["answer"], dict(meta)), split))
    if not rows:
        raise TaskError(f"{path}: no examples (expected one JSON object per line)")
    with_split = [no for no, _, s in rows if s is not None]
    if with_split and len(with_split) != len(rows):
        missing = next(no for no, _, s in rows if s is None)
        raise TaskError(f"{path} line {missing}: no 'split', but line {with_split[0]} has one; "
                        "give every line a split or none")
    first: dict = {}  # prompt -> (line, answer, split)
    for no, ex, split in rows:
        if ex.prompt in first:
            pno, pans, psplit = first[ex.prompt]
            if pans != ex.answer:
                raise TaskError(f"{path} line {no}: same prompt as line {pno} with a different answer")
            if psplit != split:
                raise TaskError(f"{path} line {no}: same prompt as line {pno} in split '{split}', not '{psplit}'")
        else:
            first[ex.prompt] = (no, ex.answer, split)
    splits = {s: [] for s in SPLITS}
    if with_split:
        for _, ex, split in rows:
            splits[split].append(ex)
    else:
        prompts = list(first)
        random.Random(seed).shuffle(prompts)
        n = len(prompts)
        n_train = int(round(ratios[0] * n))
        n_val = int(round(ratios[1] * n))
        assign = {}
        for i, p in enumerate(prompts):
            assign[p] = "train" if i < n_train else "validation" if i < n_train + n_val else "test"
        for _, ex, _ in rows:
            splits[assign[ex.prompt]].append(ex)
    return GenTask(name=name or path.stem, category=category, splits=splits, metric=metric, held_out=held_out,
                   description=f"user task from {path.name}", source=str(path), max_new_tokens=max_new_tokens,
                   meta={"seed": seed, "ratios": list(ratios)})


def write_task_jsonl(task: GenTask, path) -> Path:
    """Write ``task``'s examples to ``path`` as JSONL (split and meta on every line); returns the path.

    Written to a temporary file beside ``path`` and renamed, so a failure leaves nothing half-written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        for split in SPLITS:
            for ex in task.split(split):
                fh.write(json.dumps({**ex.to_json(), "split": split}, ensure_ascii=False) + "\n")
    tmp.replace(path)
    return path
