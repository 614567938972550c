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
* ``suite: textmix`` with ``tasks: [names]`` (default: the genome's model folders' names, as in the
  bench cache's ``experts/<task>/``): encoders scored as ``mergelab bench run`` scores them. The
  merged ``bert.*`` encoder is loaded into one resident BertModel and every task is scored with its
  **own expert's classification head** (``heads: {task: expert folder}``; default the genome model
  folder named like the task); a task's score is its accuracy on the split (the first ``limit``
  examples when given; the splits are shuffled), the fitness the (weighted) mean over tasks.
  ``metric`` must be ``accuracy``.

A merged state dict is scored by loading it into one resident model (no checkpoint written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from mergelab.errors import MergeLabError

FITNESS_KEYS = {"suite", "tasks", "task_files", "metric", "split", "limit", "model", "weights", "examples",
                "task_seed", "batch_size", "heads"}
SUITES = ("llmmix", "textmix")
LLMMIX_ONLY = ("task_files", "examples", "task_seed")


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
    suite: str = "llmmix"
    heads: Dict[str, str] = field(default_factory=dict)  # textmix: task -> folder holding its head

    def describe(self) -> dict:
        out = {"tasks": [t.name for t in self.tasks],
               "task_fingerprints": {t.name: t.fingerprint() for t in self.tasks},
               "metric": self.metric, "split": self.split, "limit": self.limit, "model": self.model,
               "weights": self.weights}
        if self.suite == "textmix":
            out.update(suite="textmix", heads=self.heads)
        return out

    def example_counts(self) -> List[int]:
        """How many examples each task contributes to the per-example scores (``example_scores``, in
        task order): its split's first ``limit``."""
        return [len(t.split(self.split)[: self.limit]) for t in self.tasks]

    def task_mean(self, scores: Sequence[float], counts: Optional[Sequence[int]] = None) -> float:
        """The weighted mean over tasks of each task's mean per-example score (``weights``, default 1):
        for ``metric: accuracy`` the fitness ``score`` gives (each task's accuracy), where the plain mean of
        ``scores`` weighs each task by its number of examples. ``counts``: :meth:`example_counts`."""
        counts = list(self.example_counts() if counts is None else counts)
        if sum(counts) != len(scores):
            raise MergeLabError(f"fitness: {len(scores)} per-example scores for tasks of {counts} examples")
        total = norm = 0.0
        start = 0
        for t, n in zip(self.tasks, counts):
            w = self.weights.get(t.name, 1.0)
            total += w * (float(sum(scores[start:start + n])) / max(n, 1))
            norm += w
            start += n
        return total / (norm or 1.0)


def parse_fitness(data: Any, default_model: str, where: str = "fitness", models: Sequence[str] = ()) -> FitnessSpec:
    """Read and check ``fitness:``, building the tasks (a missing or malformed task file is an error
    naming the file and line). ``models`` are the genome's models (textmix's default tasks and heads)."""
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
        raise FitnessError(f"{where}.suite: unknown suite {suite!r}; expected one of {', '.join(SUITES)}")
    if suite == "textmix":
        return _parse_textmix(data, default_model, where, models, metric, split, limit)
    if "heads" in data:
        raise FitnessError(f"{where}.heads: only for suite: textmix (classification heads per task)")
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


def _parse_textmix(data: dict, default_model: str, where: str, models: Sequence[str], metric: str, split: str,
                   limit: Optional[int]) -> FitnessSpec:
    """``suite: textmix``: the tasks, each task's head folder and the encoder's config folder, checked."""
    import json

    from mergelab.evaluate.tasks import load_suite

    wrong = [k for k in LLMMIX_ONLY if k in data]
    if wrong:
        raise FitnessError(f"{where}: {wrong} are for llmmix / JSONL tasks, not suite: textmix")
    if metric != "accuracy":
        raise FitnessError(f"{where}.metric: suite: textmix is scored by accuracy with each expert's head; "
                           f"got {metric!r}")
    suite = load_suite("textmix")
    names = data.get("tasks")
    if names is None:
        names = [Path(m).name for m in models]
        if not names or any(n not in suite.task_names for n in names):
            raise FitnessError(f"{where}.tasks: give the textmix tasks to score (the genome's model folders "
                               f"{names} are not all named after tasks {suite.task_names})")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        raise FitnessError(f"{where}.tasks: expected a non-empty list of textmix task names")
    if len(set(names)) != len(names):
        raise FitnessError(f"{where}.tasks: a task is named twice in {names}")
    tasks = []
    for n in names:
        try:
            tasks.append(suite.task(n))
        except MergeLabError as e:
            raise FitnessError(f"{where}.tasks: {e}") from None
    by_name = {Path(m).name: str(m) for m in models}
    given = data.get("heads") or {}
    if not isinstance(given, dict):
        raise FitnessError(f"{where}.heads: expected task name -> folder of that task's expert")
    extra = sorted(set(given) - set(names))
    if extra:
        raise FitnessError(f"{where}.heads: {extra} are not among the tasks {names}")
    heads = {}
    for t in tasks:
        folder = given.get(t.name) or by_name.get(t.name)
        if folder is None:
            raise FitnessError(f"{where}.heads: no head for task '{t.name}': no genome model folder is named "
                               f"'{t.name}'; give heads: {{{t.name}: EXPERT_FOLDER}}")
        folder = Path(folder)
        shape = _head_shape(folder)
        if shape is None:
            raise FitnessError(f"{where}.heads: '{folder}' (task '{t.name}') has no classifier.weight "
                               "(expected a BertForSequenceClassification folder, as bench prepare writes)")
        if shape[0] != t.num_labels:
            raise FitnessError(f"{where}.heads: the head in '{folder}' has {shape[0]} classes; task '{t.name}' "
                               f"has {t.num_labels}")
        heads[t.name] = str(folder)
    weights = data.get("weights") or {}
    if not isinstance(weights, dict) or any(k not in names for k in weights) or \
            any(not isinstance(v, (int, float)) or isinstance(v, bool) or v < 0 for v in weights.values()):
        raise FitnessError(f"{where}.weights: expected task name -> non-negative number, tasks: {names}")
    model = data.get("model") or default_model
    cfg = Path(model) / "config.json"
    if not cfg.is_file() or json.loads(cfg.read_text(encoding="utf-8")).get("model_type") != "bert":
        raise FitnessError(f"{where}.model: '{model}' is not a BERT model folder (its config.json and tokenizer "
                           "evaluate the merged encoder)")
    return FitnessSpec(tasks, metric, split, limit, str(model), {k: float(v) for k, v in weights.items()},
                       int(data.get("batch_size", 128)), "textmix", heads)


def _head_shape(folder: Path) -> Optional[tuple]:
    """Shape of ``classifier.weight`` in a model folder's safetensors, or None."""
    from mergelab.io.adapted import open_model

    try:
        ckpt = open_model(str(folder))
    except MergeLabError:
        return None
    if "classifier.weight" not in ckpt.tensors:
        return None
    return tuple(ckpt.info("classifier.weight").shape)


def scorer_class(spec: FitnessSpec) -> type:
    """The scorer class of ``spec``: :class:`EncoderScorer` for textmix, else :class:`Scorer`."""
    return EncoderScorer if spec.suite == "textmix" else Scorer


def make_scorer(spec: FitnessSpec):
    """The scorer of ``spec`` (:func:`scorer_class`), its evaluation model loaded."""
    return scorer_class(spec)(spec)


class EncoderScorer:
    """Scores merged BERT encoders on textmix tasks, each with its own expert's head (as ``bench run``)."""

    def __init__(self, spec: FitnessSpec):
        from mergelab.evaluate.model import ResidentEncoder, load_config, load_tokenizer, read_state, split_state

        self.spec = spec
        self.config = load_config(spec.model)
        self.tokenizer = load_tokenizer(spec.model)
        self.heads = {t: split_state(read_state(folder))[1] for t, folder in spec.heads.items()}
        self.resident = ResidentEncoder(self.config)
        self.encoder = None

    @staticmethod
    def keep(name: str) -> bool:
        """Whether a checkpoint tensor belongs to the merged encoder (heads are per task, never merged)."""
        return not name.startswith("classifier.")

    def load(self, state: dict) -> None:
        """Load the merged encoder of ``state`` into the one resident BertModel
        (:class:`~mergelab.evaluate.model.ResidentEncoder`: no model is built per candidate)."""
        from mergelab.evaluate.model import split_state

        try:
            self.encoder = self.resident.load(split_state(state)[0])
        except MergeLabError as e:
            raise MergeLabError(f"the merged weights do not fit the encoder of '{self.spec.model}': {e}") from None

    def _bits(self, task) -> list:
        from mergelab.evaluate.model import predict

        examples = task.split(self.spec.split)[: self.spec.limit]
        pred = predict(self.encoder, self.tokenizer, [e.text for e in examples], self.heads[task.name],
                       self.spec.batch_size)
        return [float(int(p) == e.label) for p, e in zip(pred.tolist(), examples)]

    def example_scores(self, state: dict):
        """1/0 per example over all tasks, in task order (M2N2's per-example scores)."""
        import numpy as np

        self.load(state)
        return np.array([b for t in self.spec.tasks for b in self._bits(t)], dtype=float)

    def score(self, state: dict) -> dict:
        """``{"fitness": weighted mean accuracy, "tasks": {name: accuracy}}`` of the merged ``state``."""
        self.load(state)
        per = {}
        for t in self.spec.tasks:
            bits = self._bits(t)
            per[t.name] = sum(bits) / max(len(bits), 1)
        w = {n: self.spec.weights.get(n, 1.0) for n in per}
        fit = sum(w[n] * v for n, v in per.items()) / (sum(w.values()) or 1.0)
        return {"fitness": fit, "tasks": per}

    def save(self, state: dict, folder: Path) -> None:
        """Write the encoder of ``state`` as a BertModel folder (``mergelab evaluate`` reads it)."""
        from mergelab.bench.cache import save_encoder
        from mergelab.evaluate.model import split_state

        Path(folder).mkdir(parents=True, exist_ok=True)
        save_encoder(Path(folder), self.config, self.tokenizer, split_state(state)[0])


class Scorer:
    """Holds one resident model and scores merged state dicts on the fitness tasks."""

    def __init__(self, spec: FitnessSpec):
        from mergelab.llmmix.generate import load_causal_lm

        self.spec = spec
        self.model, self.tokenizer = load_causal_lm(spec.model)

    @staticmethod
    def keep(name: str) -> bool:
        """Every tensor of the checkpoints is part of the evaluated model."""
        return True

    def save(self, state: dict, folder: Path) -> None:
        """Write ``state`` as a Hugging Face folder of the evaluation model's architecture."""
        self.load(state)
        self.model.save_pretrained(Path(folder))
        self.tokenizer.save_pretrained(Path(folder))

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
