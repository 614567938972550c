"""What a generative task is, how its splits are drawn, and the registry of built-in tasks.

A *generative task* is a set of ``(prompt, answer)`` examples with fixed ``train`` / ``validation`` /
``test`` splits and a metric that scores a model's completion against the answer (exact match after
whitespace normalisation, the final number of a worked answer, or pass@1 of executed code; see
:mod:`mergelab.llmmix.tasks.metrics`). A built-in task is a :class:`TaskSpec`: a name, one of
MergeBench's five categories (:data:`CATEGORIES`), a *sampler* that draws one example for a split from
a :class:`random.Random`, and whether it is *held out* (no expert and no coefficient tuning sees it; it
measures the generalisation of a merge).

Splits are drawn by :func:`draw_splits`, test first, then validation, then train, each from its own
random stream seeded by ``(seed, task name, split)``; a prompt already drawn for an earlier split is
skipped, so the splits' prompts are disjoint, and changing the train size never changes the test or
validation examples. Samplers that build prompts from word lists also partition the words by a
stable hash (:func:`word_split`), so a test word is never seen in training.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from mergelab.errors import MergeLabError

SPLITS = ("train", "validation", "test")
# MergeBench's five categories (He et al., 2025, "MergeBench: A Benchmark for Merging Domain-Specialized LLMs").
CATEGORIES = ("instruction", "math", "multilingual", "code", "safety")
DEFAULT_SIZES = {"train": 2000, "validation": 200, "test": 200}
# Every built-in prompt + answer stays within this many characters (~96 tokens of a 4-8K byte-level BPE
# for English text; code and non-Latin text tokenise less densely, so the bound is conservative).
MAX_CHARS = 256
METRICS = ("exact", "final_number", "pass@1")


class TaskError(MergeLabError):
    """A generative task, its data file or its settings cannot be used."""


@dataclass
class GenExample:
    """One prompt with its reference answer (one line, no newline).

    ``meta`` holds what the metric needs beyond the answer (for code: the function header and the
    test cases) and descriptive fields (for safety: ``kind`` = ``harmful`` or ``benign``).
    """

    prompt: str
    answer: str
    meta: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = {"prompt": self.prompt, "answer": self.answer}
        if self.meta:
            d["meta"] = self.meta
        return d


@dataclass
class GenTask:
    """A generative task with its splits; ``metric`` is one of :data:`METRICS`."""

    name: str
    category: str
    splits: dict
    metric: str = "exact"
    held_out: bool = False
    description: str = ""
    source: str = ""
    max_new_tokens: int = 32
    meta: dict = field(default_factory=dict)

    def split(self, name: str) -> list:
        if name not in SPLITS:
            raise TaskError(f"task '{self.name}': unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        return self.splits[name]

    def score(self, prediction: str, example: GenExample, **kw) -> float:
        """1.0 if ``prediction`` is right for ``example`` under this task's metric, else 0.0."""
        from mergelab.llmmix.tasks.metrics import score

        return score(self.metric, prediction, example, **kw)

    def fingerprint(self) -> str:
        """A short hash of every split's prompts, answers and metadata: changes when the data changes."""
        h = hashlib.sha256(f"{self.name}\x1f{self.metric}\n".encode())
        for s in SPLITS:
            for ex in self.splits[s]:
                h.update((s + "\x1f" + json.dumps(ex.to_json(), sort_keys=True) + "\n").encode())
        return h.hexdigest()[:16]


Sampler = Callable[[random.Random, str], GenExample]


@dataclass
class TaskSpec:
    """A built-in task: how to draw it, and what it is.

    ``sampler(rng, split)`` returns one example for ``split``; it may return the same prompt again (the
    drawing skips repeats). ``source`` names the data it is built from, with licence.
    """

    name: str
    category: str
    sampler: Sampler
    description: str
    metric: str = "exact"
    held_out: bool = False
    source: str = ""
    max_new_tokens: int = 32
    requires: tuple = ()

    def build(self, seed: int = 0, sizes: Optional[dict] = None) -> GenTask:
        """Draw the task's splits from ``seed`` (same seed, sizes and package versions: same data)."""
        for mod in self.requires:
            try:
                __import__(mod)
            except ImportError as e:
                raise TaskError(
                    f"task '{self.name}' is built from the '{mod}' package, which is not installed; "
                    f"install mergelab's eval extra (pip install 'mergelab[eval]') or pip install {mod}") from e
        splits = draw_splits(self.name, self.sampler, seed, sizes)
        return GenTask(name=self.name, category=self.category, splits=splits, metric=self.metric,
                       held_out=self.held_out, description=self.description, source=self.source,
                       max_new_tokens=self.max_new_tokens, meta={"seed": seed, "sizes": _sizes(sizes)})


def _sizes(sizes: Optional[dict]) -> dict:
    out = dict(DEFAULT_SIZES)
    for k, v in (sizes or {}).items():
        if k not in SPLITS:
            raise TaskError(f"split sizes: unknown split '{k}'; expected {', '.join(SPLITS)}")
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise TaskError(f"split sizes: '{k}' must be a non-negative integer, got {v!r}")
        out[k] = v
    return out


def _stream(seed: int, name: str, split: str) -> random.Random:
    digest = hashlib.sha256(f"{seed}\x1f{name}\x1f{split}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def check_example(task: str, ex: GenExample) -> None:
    if not ex.prompt.strip() or not ex.answer.strip():
        raise TaskError(f"task '{task}': empty prompt or answer in {ex.to_json()}")
    if "\n" in ex.answer:
        raise TaskError(f"task '{task}': answer must be one line (generation stops at a newline): {ex.answer!r}")


def draw_splits(name: str, sampler: Sampler, seed: int, sizes: Optional[dict] = None) -> dict:
    """Test, validation and train examples with pairwise disjoint prompts (see the module docstring)."""
    want = _sizes(sizes)
    seen: set = set()
    splits = {}
    for split in ("test", "validation", "train"):
        rng = _stream(seed, name, split)
        got: list = []
        tries, budget = 0, 50 * want[split] + 1000
        while len(got) < want[split]:
            if tries >= budget:
                raise TaskError(f"task '{name}': only {len(got)} distinct {split} prompts after {tries} draws; "
                                f"asked for {want[split]} (use a smaller size)")
            tries += 1
            ex = sampler(rng, split)
            if ex.prompt in seen:
                continue
            check_example(name, ex)
            seen.add(ex.prompt)
            got.append(ex)
        splits[split] = got
    return {s: splits[s] for s in SPLITS}


def word_split(word: str) -> str:
    """The split a word belongs to: a stable hash puts 10% in test, 10% in validation, 80% in train."""
    b = hashlib.sha256(word.encode("utf-8")).digest()[0] % 10
    return "test" if b == 0 else "validation" if b == 1 else "train"


def partition(words: Sequence[str]) -> dict:
    """``words`` (sorted, deduplicated) grouped by :func:`word_split`."""
    out = {s: [] for s in SPLITS}
    for w in sorted(set(words)):
        out[word_split(w)].append(w)
    return out


_WS = re.compile(r"\s+")


def normalise(text: str) -> str:
    """Whitespace runs collapsed to one space, ends stripped (the exact-match normal form)."""
    return _WS.sub(" ", text).strip()


# ----------------------------------------------------------------------------------------------
# registry

_REGISTRY: dict = {}


def register(spec: TaskSpec) -> TaskSpec:
    if spec.category not in CATEGORIES:
        raise TaskError(f"task '{spec.name}': category '{spec.category}' is not one of {', '.join(CATEGORIES)}")
    if spec.metric not in METRICS:
        raise TaskError(f"task '{spec.name}': metric '{spec.metric}' is not one of {', '.join(METRICS)}")
    if spec.name in _REGISTRY:
        raise TaskError(f"task '{spec.name}' is registered twice")
    _REGISTRY[spec.name] = spec
    return spec


def _load_builtins() -> None:
    from mergelab.llmmix.tasks import builtin  # noqa: F401  (registers on import)


def task_names(category: Optional[str] = None, held_out: Optional[bool] = None) -> list:
    """Registered task names in registration order, optionally of one category / held-out status."""
    _load_builtins()
    if category is not None and category not in CATEGORIES:
        raise TaskError(f"unknown category '{category}'; expected one of {', '.join(CATEGORIES)}")
    return [n for n, s in _REGISTRY.items()
            if (category is None or s.category == category) and (held_out is None or s.held_out == held_out)]


def get_spec(name: str) -> TaskSpec:
    _load_builtins()
    if name not in _REGISTRY:
        raise TaskError(f"unknown llmmix task '{name}'; known: {', '.join(_REGISTRY)}")
    return _REGISTRY[name]


def build_task(name: str, seed: int = 0, sizes: Optional[dict] = None) -> GenTask:
    """The built-in task ``name`` with splits drawn from ``seed`` (sizes default to 2000/200/200)."""
    return get_spec(name).build(seed=seed, sizes=sizes)


def markdown_table(seed: int = 0) -> str:
    """The table of built-in tasks for docs/llmmix.md: name, category, example, metric, sizes, held out.

    The example is the first test example of the task drawn from ``seed`` (for tasks whose examples
    have kinds, such as safety's harmful / benign, the first of each kind).
    """
    sizes = "/".join(str(DEFAULT_SIZES[s]) for s in SPLITS)
    rows = ["| task | category | example prompt | example answer | metric | train/val/test | held out |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for name in task_names():
        spec = get_spec(name)
        test = spec.build(seed=seed, sizes={"train": 0, "validation": 0, "test": 8}).split("test")
        shown, kinds = [], set()
        for ex in test:
            if ex.meta.get("kind", "") not in kinds:
                kinds.add(ex.meta.get("kind", ""))
                shown.append(ex)

        def cell(texts):
            return "<br>".join("`" + t.replace("\n", "⏎").replace("|", "\\|").replace("`", "'") + "`" for t in texts)

        rows.append(f"| `{name}` | {spec.category} | {cell([e.prompt for e in shown])} | "
                    f"{cell([e.answer for e in shown])} | {spec.metric} | "
                    f"{sizes} | {'**yes**' if spec.held_out else 'no'} |")
    return "\n".join(rows) + "\n"
