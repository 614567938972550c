"""Classification tasks and suites: what a task is, where its data lives, how it is split.

A *task* is a set of ``(text, label)`` examples with fixed ``train`` / ``validation`` / ``test``
splits and an ordered list of label names. A *suite* is a named list of tasks plus the names of the
tasks held out of merges by default (they measure generalisation and forgetting).

Suites come from three places, all resolved by :func:`load_suite`:

* a built-in suite shipped in ``mergelab/data/suites/<name>/`` (``suite.json`` + one JSONL per task,
  written once by :mod:`mergelab.evaluate.suite_build` with provenance and licence);
* a folder with the same layout;
* a YAML or JSON file describing a user suite, one line per task::

      name: my-suite
      extends: textmix              # optional: start from every task of a built-in suite
      held_out: [reviews]           # optional: replaces the held-out list of the parent
      tasks:
        reviews: data/reviews.csv   # a CSV or JSONL of (text, label); that is the whole task
        intents: {path: data/intents.jsonl, text: utterance, label: intent, seed: 3}

A user task file needs a text column and a label column (``text`` and ``label`` unless named). If it
has a ``split`` column (values ``train``, ``validation``, ``test``) those splits are used as given;
otherwise the rows are split once, stratified by label, from ``seed`` (80% / 10% / 10% by default),
so the same file and seed always give the same splits.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Iterable, Optional, Sequence

from mergelab.errors import MergeLabError
from mergelab.io.records import iter_jsonl

SPLITS = ("train", "validation", "test")


class SuiteError(MergeLabError):
    """A suite or task definition, or a task data file, cannot be used."""


@dataclass(frozen=True)
class Example:
    """One labelled example; ``label`` is an index into the task's ``labels``."""

    text: str
    label: int


@dataclass
class Task:
    """A text classification task with fixed splits.

    ``labels`` is the ordered list of class names (index = class id). ``splits`` maps each of
    ``train``, ``validation``, ``test`` to its examples. ``provenance`` and ``licence`` say where the
    data came from and under which terms; ``meta`` holds anything else the suite file recorded.
    """

    name: str
    labels: list
    splits: dict
    description: str = ""
    provenance: str = ""
    licence: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def num_labels(self) -> int:
        return len(self.labels)

    def split(self, name: str) -> list:
        """The examples of split ``name`` (one of :data:`SPLITS`)."""
        if name not in SPLITS:
            raise SuiteError(f"task '{self.name}': unknown split '{name}'; expected one of {', '.join(SPLITS)}")
        return self.splits[name]

    def fingerprint(self) -> str:
        """A short hash of labels and every split's texts and labels: changes when the data changes."""
        h = hashlib.sha256(json.dumps(self.labels).encode())
        for s in SPLITS:
            for ex in self.splits[s]:
                h.update(f"{s}\x1f{ex.text}\x1f{ex.label}\n".encode())
        return h.hexdigest()[:16]


@dataclass
class Suite:
    """A named, ordered list of tasks; ``held_out`` names the tasks kept out of merges by default."""

    name: str
    tasks: list
    held_out: list = field(default_factory=list)
    base_model: str = "minilm-l6"
    source: str = ""
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        names = [t.name for t in self.tasks]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise SuiteError(f"suite '{self.name}': task names must be unique; repeated: {', '.join(dup)}")
        unknown = [h for h in self.held_out if h not in names]
        if unknown:
            raise SuiteError(f"suite '{self.name}': held_out names unknown task(s) {unknown}; tasks are {names}")

    @property
    def task_names(self) -> list:
        return [t.name for t in self.tasks]

    @property
    def merge_task_names(self) -> list:
        """Tasks whose experts are merged by default (every task not held out)."""
        return [t.name for t in self.tasks if t.name not in self.held_out]

    def task(self, name: str) -> Task:
        for t in self.tasks:
            if t.name == name:
                return t
        raise SuiteError(f"suite '{self.name}' has no task '{name}'; tasks are {self.task_names}")

    def subset(self, names: Sequence[str], held_out: Optional[Sequence[str]] = None) -> "Suite":
        """A suite with only ``names`` (in that order); ``held_out`` defaults to the kept held-out tasks."""
        tasks = [self.task(n) for n in names]
        ho = [h for h in self.held_out if h in names] if held_out is None else list(held_out)
        return Suite(self.name, tasks, ho, self.base_model, self.source, dict(self.meta))

    def fingerprint(self) -> str:
        h = hashlib.sha256()
        for t in self.tasks:
            h.update(f"{t.name}:{t.fingerprint()}\n".encode())
        return h.hexdigest()[:16]


# ----------------------------------------------------------------------------------------------
# Reading task files


def _read_rows(path: Path) -> list:
    """Rows of a CSV (header line required) or JSONL file as dicts; errors name the file and line."""
    if not path.is_file():
        raise SuiteError(f"task file {path} does not exist")
    suffix = "".join(path.suffixes[-1:]).lower()
    rows = []
    if suffix in (".jsonl", ".ndjson"):
        rows.extend(iter_jsonl(path, SuiteError))
    elif suffix in (".csv", ".tsv"):
        with path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            if reader.fieldnames is None:
                raise SuiteError(f"{path}: empty file; expected a header line naming the columns")
            for i, row in enumerate(reader, 2):
                rows.append((i, row))
    else:
        raise SuiteError(f"task file {path}: unsupported extension '{suffix}'; expected .csv, .tsv or .jsonl")
    if not rows:
        raise SuiteError(f"task file {path} has no examples")
    return rows


def stratified_split(items: Sequence, labels: Sequence[int], seed: int, fractions=(0.8, 0.1, 0.1),
                     caps: Optional[Sequence[Optional[int]]] = None) -> dict:
    """Split ``items`` into train/validation/test, stratified by label, reproducibly from ``seed``.

    Within each label the items are shuffled with ``random.Random(seed)`` and cut by ``fractions``
    (validation and test get at least one item of a label that has three or more). ``caps`` (per
    split, ``None`` = no cap) then trims each split to at most that many items, keeping the label
    proportions. The output lists are shuffled with the same seed, so they do not depend on the
    order of ``items`` within a label beyond the seed.
    """
    if abs(sum(fractions) - 1.0) > 1e-9 or any(f < 0 for f in fractions):
        raise SuiteError(f"split fractions {fractions} must be non-negative and sum to 1")
    rng = random.Random(seed)
    by_label: dict = {}
    for it, lab in zip(items, labels):
        by_label.setdefault(lab, []).append(it)
    out = {s: [] for s in SPLITS}
    for lab in sorted(by_label):
        group = by_label[lab]
        rng.shuffle(group)
        n = len(group)
        n_val = int(n * fractions[1] + 0.5)
        n_test = int(n * fractions[2] + 0.5)
        if n >= 3:
            n_val, n_test = max(n_val, 1 if fractions[1] > 0 else 0), max(n_test, 1 if fractions[2] > 0 else 0)
        n_train = n - n_val - n_test
        out["train"].append(group[:n_train])
        out["validation"].append(group[n_train:n_train + n_val])
        out["test"].append(group[n_train + n_val:])
    result = {}
    for i, s in enumerate(SPLITS):
        groups = out[s]
        cap = caps[i] if caps else None
        total = sum(len(g) for g in groups)
        if cap is not None and total > cap:
            # keep proportions: largest-remainder apportionment of the cap across labels
            quotas = [len(g) * cap / total for g in groups]
            keep = [int(q) for q in quotas]
            order = sorted(range(len(groups)), key=lambda j: quotas[j] - keep[j], reverse=True)
            for j in order[: cap - sum(keep)]:
                keep[j] += 1
            groups = [g[:k] for g, k in zip(groups, keep)]
        merged = [x for g in groups for x in g]
        rng.shuffle(merged)
        result[s] = merged
    return result


def load_task_file(path, name: Optional[str] = None, text: str = "text", label: str = "label",
                   seed: int = 0, labels: Optional[Sequence[str]] = None, fractions=(0.8, 0.1, 0.1),
                   description: str = "", provenance: str = "", licence: str = "") -> Task:
    """Read a user task from a CSV/TSV (with a header) or JSONL file of ``(text, label)`` rows.

    ``text`` / ``label`` name the columns (keys). Labels are read as strings; their order is
    ``labels`` when given (every row's label must be one of them), otherwise sorted. A ``split``
    column, when every row has one, fixes the splits; otherwise :func:`stratified_split` with
    ``seed`` and ``fractions`` makes them. Every split must end up non-empty.
    """
    path = Path(path)
    rows = _read_rows(path)
    texts, labs, splits = [], [], []
    for line, row in rows:
        for key in (text, label):
            if key not in row or row[key] is None:
                raise SuiteError(f"{path}:{line}: missing column '{key}'; the row has {sorted(row)}")
        t = str(row[text])
        if not t.strip():
            raise SuiteError(f"{path}:{line}: empty text in column '{text}'")
        texts.append(t)
        labs.append(str(row[label]).strip())
        splits.append(row.get("split"))
    names = list(labels) if labels is not None else sorted(set(labs))
    if len(names) < 2:
        raise SuiteError(f"{path}: a classification task needs at least 2 labels, found {names}")
    index = {n: i for i, n in enumerate(names)}
    for (line, _), lab in zip(rows, labs):
        if lab not in index:
            raise SuiteError(f"{path}:{line}: label '{lab}' is not one of {names}")
    examples = [Example(t, index[lab]) for t, lab in zip(texts, labs)]
    if all(s is not None and str(s).strip() != "" for s in splits):
        bad = sorted({str(s) for s in splits} - set(SPLITS))
        if bad:
            raise SuiteError(f"{path}: column 'split' has {bad}; expected only {', '.join(SPLITS)}")
        split_map = {s: [ex for ex, sp in zip(examples, splits) if sp == s] for s in SPLITS}
    else:
        split_map = stratified_split(examples, [e.label for e in examples], seed, fractions)
    empty = [s for s in SPLITS if not split_map[s]]
    if empty:
        raise SuiteError(f"{path}: split(s) {empty} are empty; the file needs more examples (has {len(examples)})")
    return Task(name or path.stem, names, split_map, description=description,
                provenance=provenance or f"user file {path}", licence=licence,
                meta={"path": str(path), "seed": seed})


# ----------------------------------------------------------------------------------------------
# Suites


def builtin_suites_dir() -> Path:
    """The folder holding the built-in suites shipped with mergelab."""
    return Path(str(resources.files("mergelab") / "data" / "suites"))


def builtin_suite_names() -> list:
    root = builtin_suites_dir()
    if not root.is_dir():
        return []
    return sorted(p.name for p in root.iterdir() if (p / "suite.json").is_file())


def _load_suite_folder(folder: Path) -> Suite:
    spec_path = folder / "suite.json"
    try:
        spec = json.loads(spec_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise SuiteError(f"{folder} is not a suite folder: {spec_path} is missing") from None
    except json.JSONDecodeError as e:
        raise SuiteError(f"{spec_path}: not valid JSON ({e.msg})") from None
    tasks = []
    for entry in spec.get("tasks", []):
        for key in ("name", "file", "labels"):
            if key not in entry:
                raise SuiteError(f"{spec_path}: a task entry lacks '{key}': {entry}")
        task = load_task_file(folder / entry["file"], name=entry["name"], labels=entry["labels"],
                              description=entry.get("description", ""), provenance=entry.get("provenance", ""),
                              licence=entry.get("licence", ""))
        expected = entry.get("fingerprint")
        if expected and task.fingerprint() != expected:
            raise SuiteError(f"{folder / entry['file']}: data fingerprint {task.fingerprint()} differs from "
                             f"{expected} recorded in {spec_path}; the file was changed after the suite was built")
        task.meta.update({k: v for k, v in entry.items() if k not in ("name", "file", "labels")})
        tasks.append(task)
    if not tasks:
        raise SuiteError(f"{spec_path}: no tasks")
    return Suite(spec.get("name", folder.name), tasks, list(spec.get("held_out", [])),
                 spec.get("base_model", "minilm-l6"), str(folder), {k: v for k, v in spec.items() if k != "tasks"})


def _load_suite_yaml(path: Path) -> Suite:
    import yaml

    try:
        spec = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise SuiteError(f"{path}: not valid YAML ({e})") from None
    if not isinstance(spec, dict):
        raise SuiteError(f"{path}: expected a mapping with 'tasks' (and optionally 'name', 'extends', 'held_out')")
    unknown = set(spec) - {"name", "extends", "tasks", "held_out", "base_model"}
    if unknown:
        raise SuiteError(f"{path}: unknown key(s) {sorted(unknown)}; expected name, extends, tasks, held_out, base_model")
    tasks, held_out, base_model = [], [], spec.get("base_model", "minilm-l6")
    if spec.get("extends"):
        parent = load_suite(str(spec["extends"]))
        tasks, held_out, base_model = list(parent.tasks), list(parent.held_out), parent.base_model
    entries = spec.get("tasks") or {}
    if not isinstance(entries, dict):
        raise SuiteError(f"{path}: 'tasks' must map task names to a file path or to {{path: ..., text: ..., label: ...}}")
    for name, entry in entries.items():
        if isinstance(entry, str):
            entry = {"path": entry}
        if not isinstance(entry, dict) or "path" not in entry:
            raise SuiteError(f"{path}: task '{name}' needs a file path (tasks: {{{name}: path/to/file.csv}})")
        allowed = {"path", "text", "label", "seed", "labels", "description", "licence"}
        bad = set(entry) - allowed
        if bad:
            raise SuiteError(f"{path}: task '{name}' has unknown key(s) {sorted(bad)}; allowed: {sorted(allowed)}")
        file = Path(entry["path"])
        if not file.is_absolute():
            file = path.parent / file
        task = load_task_file(file, name=str(name), text=entry.get("text", "text"), label=entry.get("label", "label"),
                              seed=int(entry.get("seed", 0)), labels=entry.get("labels"),
                              description=entry.get("description", ""), licence=entry.get("licence", ""))
        tasks = [t for t in tasks if t.name != task.name] + [task]
    if "held_out" in spec:
        held_out = list(spec["held_out"] or [])
    if not tasks:
        raise SuiteError(f"{path}: the suite has no tasks")
    return Suite(spec.get("name", path.stem), tasks, held_out, base_model, str(path))


def load_suite(spec: str, extra_tasks: Iterable[str] = ()) -> Suite:
    """Resolve ``spec`` (built-in name, suite folder, or YAML/JSON suite file) to a :class:`Suite`.

    ``extra_tasks`` adds user tasks given as ``NAME=PATH`` (CSV/JSONL with ``text`` and ``label``
    columns): the one-line way to add a task on the command line.
    """
    p = Path(spec)
    if p.is_dir():
        suite = _load_suite_folder(p)
    elif p.is_file() and p.suffix.lower() in (".yaml", ".yml", ".json"):
        suite = _load_suite_yaml(p)
    elif spec in builtin_suite_names():
        suite = _load_suite_folder(builtin_suites_dir() / spec)
    else:
        known = ", ".join(builtin_suite_names()) or "none installed"
        raise SuiteError(f"suite '{spec}' is neither a built-in suite ({known}), a suite folder, nor a .yaml/.json file")
    for item in extra_tasks:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise SuiteError(f"--task '{item}': expected NAME=PATH to a CSV or JSONL file of (text, label)")
        task = load_task_file(path, name=name)
        suite = Suite(suite.name, [t for t in suite.tasks if t.name != name] + [task], suite.held_out,
                      suite.base_model, suite.source, suite.meta)
    return suite


def write_task_jsonl(task: Task, path: Path) -> None:
    """Write ``task`` as JSONL rows ``{"text", "label" (name), "split"}``, aside then renamed."""
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", encoding="utf-8") as fh:
        for s in SPLITS:
            for ex in task.splits[s]:
                fh.write(json.dumps({"text": ex.text, "label": task.labels[ex.label], "split": s},
                                    ensure_ascii=False) + "\n")
    tmp.replace(path)
