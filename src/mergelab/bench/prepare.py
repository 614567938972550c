"""``mergelab bench prepare``: fine-tune the experts and train the two reference points.

For a suite this makes, once and resumably (see :mod:`mergelab.bench.cache` for the layout):

* ``pretrained``: a linear probe per task on the frozen base encoder (the "pretrained" reference and
  the baseline for held-out tasks);
* one expert per task: encoder + head fine-tuned from the base on that task alone;
* ``multitask``: one encoder with a head per task, trained on every task of the default merge set
  together (the "multi-task training" reference), with the experts' settings except the number of
  passes over each task's data (``multitask_epochs``, by default the experts' ``epochs``).

With ``lora_rank`` R (``--lora-rank R``) the experts are PEFT LoRA adapters of rank R instead
(:func:`mergelab.bench.training.train_lora`: the encoder frozen, LoRA on every attention and MLP linear,
the head trained fully and kept beside the adapter), cached in ``lora-R/<task>/``; the probes are
prepared as usual if missing, and no multi-task model is trained (the reference stays the full one).

Each unit records its validation and test accuracy and which test examples it got right.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.bench.cache import (BenchCache, float_state, save_classifier, save_encoder, save_heads,
                                  save_lora_expert, settings_hash, write_json)
from mergelab.bench.training import LORA_TARGETS, TrainConfig, lora_config, steps_for, train, train_lora
from mergelab.evaluate.harness import Evaluator, gold
from mergelab.evaluate.metrics import accuracy, correct_bits
from mergelab.evaluate.model import (base_model_path, fit_probe, head_logits, load_config, load_tokenizer,
                                     read_state, split_state)
from mergelab.evaluate.tasks import Suite
from mergelab.io.adapted import adapted_state


@dataclass
class PrepareResult:
    cache_dir: Path
    seconds: float
    trained: list = field(default_factory=list)
    skipped: list = field(default_factory=list)


def _base_id(path: Path) -> dict:
    st = (path / "config.json").read_text(encoding="utf-8")
    weights = [p for p in sorted(path.glob("*.safetensors"))] or [p for p in sorted(path.glob("*.bin"))]
    return {"config": settings_hash({"c": st}), "weights": [(p.name, p.stat().st_size) for p in weights]}


class Preparer:
    """Trains and caches the units of one suite; see the module doc."""

    def __init__(self, suite: Suite, cache: BenchCache, cfg: TrainConfig, base: str = "minilm-l6",
                 rebuild: bool = False, log: Callable[[str], None] = print,
                 multitask_epochs: Optional[float] = None, lora_rank: int = 0):
        self.suite, self.cache, self.cfg, self.rebuild, self.log = suite, cache, cfg, rebuild, log
        self.lora_rank = int(lora_rank)
        self.mt_cfg = cfg if multitask_epochs is None else replace(cfg, epochs=multitask_epochs)
        self.base_path = base_model_path(base)
        self.config = load_config(self.base_path)
        self.tokenizer = load_tokenizer(self.base_path)
        self.base_encoder = float_state(split_state(read_state(self.base_path))[0])
        self.evaluator = Evaluator(suite, self.config, self.tokenizer)
        self.base = base
        self._base_id = _base_id(self.base_path)

    # -- settings identity of each unit
    def _settings(self, kind: str, tasks: Sequence[str]) -> str:
        s = {"kind": kind, "base": self._base_id, "tasks": {t: self.suite.task(t).fingerprint() for t in tasks}}
        if kind != "pretrained":
            s["train"] = self._cfg(kind).to_dict() | {"threads": None}
        if kind == "lora-expert":
            c = lora_config(self.lora_rank)
            s["lora"] = {"r": c.r, "lora_alpha": c.lora_alpha, "target_modules": LORA_TARGETS}
        return settings_hash(s)

    def _cfg(self, kind: str) -> TrainConfig:
        return self.mt_cfg if kind == "multitask" else self.cfg

    def _task_data(self, name: str) -> tuple:
        t = self.suite.task(name)
        tr = t.split("train")
        return [e.text for e in tr], [e.label for e in tr], t.num_labels

    def plan(self, tasks: Sequence[str], multitask_tasks: Sequence[str]) -> list:
        """``[(kind, tasks, unit dir, settings id, steps)]`` for every unit not yet prepared."""
        units = [("pretrained", list(self.suite.task_names), self.cache.pretrained_dir, 0)]
        for t in tasks:
            steps = steps_for(len(self.suite.task(t).split("train")), self.cfg)
            if self.lora_rank:
                units.append(("lora-expert", [t], self.cache.lora_expert_dir(t, self.lora_rank), steps))
            else:
                units.append(("expert", [t], self.cache.expert_dir(t), steps))
        if multitask_tasks:
            steps = sum(steps_for(len(self.suite.task(t).split("train")), self.mt_cfg) for t in multitask_tasks)
            units.append(("multitask", list(multitask_tasks), self.cache.multitask_dir, steps))
        todo = []
        for kind, ts, d, steps in units:
            sid = self._settings(kind, ts)
            if not self.cache.done(d, sid, self.rebuild):
                todo.append((kind, ts, d, sid, steps))
        return todo

    def _eval_unit(self, encoder_state: dict, heads: dict, tasks: Sequence[str]) -> dict:
        enc = self.evaluator.encoder(encoder_state)
        val = self.evaluator.correct(enc, heads, tasks, "validation")
        test = self.evaluator.correct(enc, heads, tasks, "test")
        return {t: {"validation_accuracy": accuracy(val[t]), "test_accuracy": accuracy(test[t]),
                    "test_correct": test[t]} for t in tasks}

    def run_pretrained(self, tasks, unit_dir, sid) -> None:
        start = time.perf_counter()
        enc = self.evaluator.encoder(self.base_encoder)
        heads, results = {}, {}
        for name in tasks:
            task = self.suite.task(name)
            head = fit_probe(self.evaluator.features(enc, task, "train"), [e.label for e in task.split("train")],
                             task.num_labels)
            heads[name] = head
            bits = {}
            for split in ("validation", "test"):
                pred = head_logits(self.evaluator.features(enc, task, split), head).argmax(-1)
                bits[split] = correct_bits(pred, gold(task, split))
            results[name] = {"validation_accuracy": accuracy(bits["validation"]),
                             "test_accuracy": accuracy(bits["test"]), "test_correct": bits["test"]}
        tmp = self.cache.begin(unit_dir)
        save_heads(tmp / "heads.safetensors", heads)
        write_json(tmp / "pretrained.json", {"settings_id": sid, "kind": "pretrained", "base": str(self.base),
                                             "probe": "logistic regression on the pooled [CLS] output, C=1",
                                             "seconds": round(time.perf_counter() - start, 2), "tasks": results})
        self.cache.commit(tmp, unit_dir)

    def run_lora(self, tasks, unit_dir, sid, progress) -> dict:
        (name,) = tasks
        model, (head,), info = train_lora(self.config, self.base_encoder, self.tokenizer, [self._task_data(name)],
                                          self.cfg, self.lora_rank, progress=progress)
        tmp = self.cache.begin(unit_dir)
        save_lora_expert(tmp, model, head, self.base_path)
        # scored as the bench will read it: the base with the saved adapter applied by mergelab
        results = self._eval_unit(adapted_state(self.base_path, tmp), {name: head}, [name])
        c = lora_config(self.lora_rank)
        write_json(tmp / "expert.json", {
            "settings_id": sid, "kind": "lora-expert", "base": str(self.base), "task": name,
            "train_config": self.cfg.to_dict(), "lora": {"r": c.r, "lora_alpha": c.lora_alpha,
                                                         "target_modules": LORA_TARGETS},
            "adapter_bytes": (tmp / "adapter_model.safetensors").stat().st_size, "train": info, "tasks": results})
        self.cache.commit(tmp, unit_dir)
        return info

    def run_trained(self, kind, tasks, unit_dir, sid, progress) -> dict:
        if kind == "lora-expert":
            return self.run_lora(tasks, unit_dir, sid, progress)
        data = [self._task_data(t) for t in tasks]
        cfg = self._cfg(kind)
        state, heads, info = train(self.config, self.base_encoder, self.tokenizer, data, cfg, progress)
        head_map = dict(zip(tasks, heads))
        results = self._eval_unit(state, head_map, tasks)
        tmp = self.cache.begin(unit_dir)
        meta = {"settings_id": sid, "kind": kind, "base": str(self.base), "train_config": cfg.to_dict(),
                "train": info, "tasks": results}
        if kind == "expert":
            (name,) = tasks
            save_classifier(tmp, self.config, self.tokenizer, state, head_map[name], self.suite.task(name).labels)
            meta["task"] = name
            write_json(tmp / "expert.json", meta)
        else:
            save_encoder(tmp, self.config, self.tokenizer, state)
            save_heads(tmp / "heads.safetensors", head_map)
            write_json(tmp / "multitask.json", meta)
        self.cache.commit(tmp, unit_dir)
        return info


def prepare(suite: Suite, cache: BenchCache, cfg: TrainConfig, base: str = "minilm-l6",
            tasks: Optional[Sequence[str]] = None, multitask: bool = True, rebuild: bool = False,
            show_progress: bool = True, log: Callable[[str], None] = print,
            multitask_epochs: Optional[float] = None, lora_rank: int = 0) -> PrepareResult:
    """Prepare every missing unit for ``suite`` in ``cache``; returns what was trained and skipped.
    With ``lora_rank`` the experts are LoRA adapters in ``lora-R/`` and no multi-task model is trained."""
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    start = time.perf_counter()
    prep = Preparer(suite, cache, cfg, base, rebuild, log, multitask_epochs, lora_rank)
    tasks = list(tasks) if tasks is not None else suite.task_names
    mt_tasks = [t for t in suite.merge_task_names if t in tasks] if multitask and not lora_rank else []
    record_dir = cache.lora_dir(lora_rank) if lora_rank else cache.dir
    record_dir.mkdir(parents=True, exist_ok=True)
    lora = {"lora": {"r": lora_rank, "target_modules": LORA_TARGETS}} if lora_rank else {}
    write_json(record_dir / "prepare.json", lora | {"suite": suite.name, "suite_fingerprint": suite.fingerprint(),
                                           "suite_source": suite.source, "base": str(base),
                                           "base_path": str(prep.base_path), "train_config": cfg.to_dict(),
                                           "multitask_epochs": prep.mt_cfg.epochs,
                                           "tasks": tasks, "multitask_tasks": mt_tasks,
                                           "held_out": suite.held_out})
    todo = prep.plan(tasks, mt_tasks)
    ekind = "lora-expert" if lora_rank else "expert"
    all_units = ["pretrained"] + [f"{ekind}:{t}" for t in tasks] + (["multitask"] if mt_tasks else [])
    trained_names = [k if k not in ("expert", "lora-expert") else f"{k}:{ts[0]}" for k, ts, *_ in todo]
    result = PrepareResult(cache.dir, 0.0, trained=trained_names,
                           skipped=[u for u in all_units if u not in trained_names])
    if result.skipped:
        log(f"already prepared: {', '.join(result.skipped)}")
    total = sum(u[4] for u in todo)
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TimeElapsedColumn(), TimeRemainingColumn(), disable=not show_progress) as bar:
        job = bar.add_task("prepare", total=total)
        for kind, ts, unit_dir, sid, _ in todo:
            label = kind if kind not in ("expert", "lora-expert") else f"{kind} {ts[0]}"
            bar.update(job, description=label)
            t0 = time.perf_counter()
            if kind == "pretrained":
                prep.run_pretrained(ts, unit_dir, sid)
            else:
                prep.run_trained(kind, ts, unit_dir, sid, lambda n: bar.advance(job, n))
            summary = json.loads(cache.info_path(unit_dir).read_text())["tasks"]
            accs = ", ".join(f"{t} {v['test_accuracy']:.3f}" for t, v in summary.items())
            bar.console.print(f"{label}: {time.perf_counter() - t0:.0f} s; test accuracy {accs}")
    result.seconds = round(time.perf_counter() - start, 2)
    info = json.loads((record_dir / "prepare.json").read_text())
    info["last_run"] = {"seconds": result.seconds, "trained": result.trained, "skipped": result.skipped}
    write_json(record_dir / "prepare.json", info)
    return result
