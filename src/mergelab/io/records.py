"""Line-oriented data files users hand to mergelab (task data, calibration texts, prompts)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator, Tuple, Type

from mergelab.errors import MergeLabError


def iter_jsonl(path: Path, error: Type[MergeLabError] = MergeLabError) -> Iterator[Tuple[int, dict]]:
    """``(line number, object)`` for each non-blank line of a JSONL file.

    A line that is not valid JSON, or not a JSON object, raises ``error`` naming the file and line.
    """
    with Path(path).open(encoding="utf-8") as fh:
        for i, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{path}:{i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise error(f"{path}:{i}: expected a JSON object per line, got {type(row).__name__}")
            yield i, row
