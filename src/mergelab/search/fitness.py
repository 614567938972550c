"""Fitness of a merged model: the score a search maximises.

``fitness:`` in a search config names what to score on (validation split by default; the test split
stays for the final report):

* ``suite: llmmix`` with ``tasks: [names]``: built-in llmmix tasks (sizes from ``examples``, drawn
  from ``task_seed``), scored as ``mergelab bench run --suite llmmix`` scores them;
* ``task_files: [PATH.jsonl]``: a user's prompt/answer tasks (:func:`mergelab.llmmix.tasks.load_jsonl_task`;
  without ``split`` fields the file is split 0.8/0.1/0.1 from ``task_seed``);
* ``metric``: ``accuracy`` (greedy decoding, each task's own metric: exact match, final number or
  pass@1; the mean over examples) or ``loss`` (minus the mean token negative log-likelihood of
  the answers given their prompts: smooth, so it separates candidates that the same number of
  examples gets right);
* ``model``: the folder whose architecture and tokenizer evaluate the merged weights (default: the
  genome's base model, else its first model); ``limit``: the first N examples of each task;
  ``weights``: a weight per task (default 1), the fitness being the weighted mean over tasks.

A merged state dict is scored by loading it into one resident model (no checkpoint written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from mergelab.errors import MergeLabError

FITNESS_KEYS = {"suite", "tasks", "task_files", "metric", "split", "limit", "model", "weights", "examples",
                "task_seed", "batch_size"}
SUITES = ("llmmix",)


class FitnessError(MergeLabError):
    """A fitness definition that cannot be evaluated (raised before any candidate is merged)."""


@dataclass
class FitnessSpec:
    tasks: List[Any]  # GenTask objects
    metric: str = "accuracy"
    split: str = "validation"
    limit: Optional[int] = None
    model: Optional[str] = None
    weights: Dict[str, float] = field(default_factory=dict)
    batch_size: int = 16

    def describe(self) -> dict:
        return {"tasks": [t.name for t in self.tasks], "task_fingerprints": {t.name: t.fingerprint() for t in self.tasks},
                "metric": self.metric, "split": self.split, "limit": self.limit, "model": self.model,
                "weights": self.weights}


def parse_fitness(data: Any, default_model: str, where: str = "fitness") -> FitnessSpec:
    """Read and check ``fitness:``, building the tasks (a missing or malformed task file is an error
    naming the file and line)."""
    from mergelab.llmmix.tasks import build_task, get_spec
    from mergelab.llmmix.tasks.jsonl import load_jsonl_task

    if not isinstance(data, dict):
        raise FitnessError(f"{where}: expected a mapping (suite/tasks or task_files, metric, ...)")
    unknown = sorted(set(data) - FITNESS_KEYS)
    if unknown:
        raise FitnessError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(FITNESS_KEYS)}")
    metric = data.get("metric", "accuracy")
    if metric not in ("accuracy", "loss"):
        raise FitnessError(f"{where}.metric: expected accuracy or loss, got {metric!r}")
    split = data.get("split", "validation")
    if split not in ("train", "validation", "test"):
        raise FitnessError(f"{where}.split: expected train, validation or test, got {split!r}")
    limit = data.get("limit")
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
        raise FitnessError(f"{where}.limit: expected a positive integer")
    seed = data.get("task_seed", 0)
    tasks = []
    suite = data.get("suite")
    names = data.get("tasks") or []
    files = data.get("task_files") or []
    if suite is not None and suite not in SUITES:
        hint = " (textmix is scored by `mergelab bench run`; see docs/search.md)" if suite == "textmix" else ""
        raise FitnessError(f"{where}.suite: unknown suite {suite!r}; expected one of {', '.join(SUITES)}{hint}")
    if names and suite is None:
        raise FitnessError(f"{where}.tasks: built-in task names need suite: llmmix")
    if not isinstance(names, list) or not isinstance(files, list):
        raise FitnessError(f"{where}: tasks and task_files are lists")
    if not names and not files:
        raise FitnessError(f"{where}: give suite: llmmix with tasks: [...], or task_files: [PATH.jsonl]")
    sizes = data.get("examples")
    for n in names:
        try:
            get_spec(n)
        except MergeLabError as e:
            raise FitnessError(f"{where}.tasks: {e}") from None
        tasks.append(build_task(n, seed=seed, sizes=sizes))
    for f in files:
        try:
            tasks.append(load_jsonl_task(Path(f), seed=seed))
        except MergeLabError as e:
            raise FitnessError(f"{where}.task_files: {e}") from None
    seen = set()
    for t in tasks:
        if t.name in seen:
            raise FitnessError(f"{where}: two tasks are named '{t.name}'")
        seen.add(t.name)
        if not t.split(split):
            raise FitnessError(f"{where}: task '{t.name}' has no {split} examples" +
                               (f" ({t.source})" if t.source else ""))
    weights = data.get("weights") or {}
    if not isinstance(weights, dict) or any(k not in seen for k in weights) or \
            any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in weights.values()):
        raise FitnessError(f"{where}.weights: expected task name -> non-negative number, tasks: {sorted(seen)}")
    model = data.get("model") or default_model
    if not (Path(model) / "config.json").is_file():
        raise FitnessError(f"{where}.model: '{model}' is not a model folder with a config.json (the architecture "
                           "and tokenizer the merged weights are evaluated with)")
    return FitnessSpec(tasks, metric, split, limit, str(model), {k: float(v) for k, v in weights.items()},
                       int(data.get("batch_size", 16)))


class Scorer:
    """Holds one resident model and scores merged state dicts on the fitness tasks."""

    def __init__(self, spec: FitnessSpec):
        from mergelab.llmmix.generate import load_causal_lm

        self.spec = spec
        self.model, self.tokenizer = load_causal_lm(spec.model)

    def load(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise MergeLabError(f"the merged weights do not fit the architecture of '{self.spec.model}': missing "
                                f"{sorted(set(missing) - tied)[:3]}, unexpected {sorted(unexpected)[:3]}")

    def task_score(self, task) -> float:
        examples = task.split(self.spec.split)
        if self.spec.limit is not None:
            examples = examples[: self.spec.limit]
        if self.spec.metric == "accuracy":
            from mergelab.llmmix.generate import evaluate_task

            return evaluate_task(self.model, self.tokenizer, task, self.spec.split, limit=self.spec.limit,
                                 batch_size=self.spec.batch_size).accuracy
        total, count = self._answer_nll(examples)
        return -float(sum(total)) / max(int(sum(count)), 1)

    def _answer_nll(self, examples) -> tuple:
        """Per example, the summed negative log-likelihood of the answer tokens (EOS included) given the
        prompt, and their count: the fine-tuning loss (:func:`mergelab.llmmix.tasks.format.encode_for_training`).
        The task's ``loss`` score is minus the total over the total count (mean per answer token)."""
        import torch

        from mergelab.llmmix.tasks.format import collate_for_training, encode_for_training

        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        totals, counts = [], []
        bs = self.spec.batch_size
        with torch.no_grad():
            for i in range(0, len(examples), bs):
                batch = collate_for_training([encode_for_training(self.tokenizer, e) for e in examples[i:i + bs]], pad)
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
                labels = batch["labels"][:, 1:]
                logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
                mask = labels != -100
                picked = logp.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
                totals += (-(picked * mask).sum(dim=1)).tolist()
                counts += mask.sum(dim=1).tolist()
        return totals, counts

    def example_scores(self, state: dict):
        """Every example's score in [0, 1] over all tasks (in task order): the task metric's score for
        ``accuracy``, ``exp(-mean answer-token loss)`` for ``loss`` (M2N2's per-example scores)."""
        import numpy as np

        self.load(state)
        out = []
        for task in self.spec.tasks:
            if self.spec.metric == "accuracy":
                from mergelab.llmmix.generate import evaluate_task

                ev = evaluate_task(self.model, self.tokenizer, task, self.spec.split, limit=self.spec.limit,
                                   batch_size=self.spec.batch_size)
                out += [float(r["score"]) for r in ev.records]
            else:
                examples = task.split(self.spec.split)[: self.spec.limit]
                totals, counts = self._answer_nll(examples)
                out += [math.exp(-t / max(c, 1)) for t, c in zip(totals, counts)]
        return np.array(out, dtype=float)

    def score(self, state: dict) -> dict:
        """``{"fitness": weighted mean, "tasks": {name: score}}`` of the merged ``state``."""
        self.load(state)
        per = {t.name: self.task_score(t) for t in self.spec.tasks}
        w = {n: self.spec.weights.get(n, 1.0) for n in per}
        denom = sum(w.values()) or 1.0
        fit = sum(w[n] * v for n, v in per.items()) / denom
        if not math.isfinite(fit):
            fit = -math.inf
        return {"fitness": fit, "tasks": per}
