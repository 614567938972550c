"""Metrics of the generative tasks; each scores one completion 1.0 (right) or 0.0 (wrong).

* ``exact``: the completion equals the answer after :func:`~.base.normalise` (whitespace runs
  collapsed, ends stripped); case and punctuation count.
* ``final_number``: the final answer of a worked solution: the number after the last
  "answer is" (case-insensitive) or, without that phrase, the last number in the text; it must
  equal the reference's final number (commas as thousands separators are ignored, ``12.0`` == ``12``).
* ``pass@1``: the completion is the body of the function whose header is in the example's
  ``meta["header"]``; the program ``header + "\\n    " + completion`` runs in the sandbox of
  :mod:`.sandbox` and must pass every test in ``meta["tests"]`` (one sample, greedy: pass@1).
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Optional

from mergelab.llmmix.tasks.base import GenExample, TaskError, normalise

_NUM = r"-?\d[\d,]*(?:\.\d+)?"
_ANSWER_IS = re.compile(r"answer is[:\s]*(" + _NUM + ")", re.IGNORECASE)
_ANY_NUM = re.compile(_NUM)


def exact_match(prediction: str, answer: str) -> float:
    return 1.0 if normalise(prediction) == normalise(answer) else 0.0


def final_number(text: str) -> Optional[Decimal]:
    """The final answer of a worked solution as a number, or ``None`` when there is none."""
    hits = _ANSWER_IS.findall(text) or _ANY_NUM.findall(text)
    if not hits:
        return None
    try:
        return Decimal(hits[-1].replace(",", "").rstrip("."))
    except InvalidOperation:
        return None


def final_number_match(prediction: str, answer: str) -> float:
    ref = final_number(answer)
    if ref is None:
        raise TaskError(f"final_number metric: the reference answer {answer!r} has no number")
    got = final_number(prediction)
    return 1.0 if got is not None and got == ref else 0.0


def pass_at_1(prediction: str, example: GenExample, timeout: float = 2.0, memory_mb: int = 256) -> float:
    from mergelab.llmmix.tasks.sandbox import run_tests

    try:
        header, entry, tests = example.meta["header"], example.meta["entry"], example.meta["tests"]
    except KeyError as e:
        raise TaskError(f"pass@1 metric: example {example.prompt[:60]!r} has no meta[{e.args[0]!r}]") from None
    body = prediction.strip()
    if not body:
        return 0.0
    program = header + "\n    " + body + "\n"
    return 1.0 if run_tests(program, entry, tests, timeout=timeout, memory_mb=memory_mb).passed else 0.0


def score(metric: str, prediction: str, example: GenExample, timeout: float = 2.0, memory_mb: int = 256) -> float:
    """Score ``prediction`` for ``example`` under ``metric`` (one of :data:`~.base.METRICS`)."""
    if metric == "exact":
        return exact_match(prediction, example.answer)
    if metric == "final_number":
        return final_number_match(prediction, example.answer)
    if metric == "pass@1":
        return pass_at_1(prediction, example, timeout=timeout, memory_mb=memory_mb)
    raise TaskError(f"unknown metric '{metric}'; expected exact, final_number or pass@1")
