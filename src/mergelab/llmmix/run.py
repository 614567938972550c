"""``mergelab bench run --suite llmmix``: textmix's protocol on the prepared causal-LM experts.

The harness is :class:`mergelab.bench.run.BenchRunner`'s (method plans, validation grids, default and
tuned rows, merge timing and peak memory, the report and charts of :mod:`mergelab.evaluate.report`);
this module supplies what differs for generative experts:

* the models are whole ``LlamaForCausalLM`` state dicts (no heads), merged with
  ``mergelab.merge_state_dicts`` and loaded into one model object for evaluation;
* a task's score is exact match (or pass@1) of the greedy completion (:mod:`mergelab.llmmix.generate`);
  the per-example correctness bits are the test records' scores (``1`` = score 1);
* held-out tasks (no expert, no tuning saw them) are scored with the same greedy decoding;
* every model also gets its perplexity on a held-out general text (the pretraining corpus's held-out
  split when the cache has one, else stdlib docstrings); a merge whose perplexity exceeds
  :data:`COLLAPSE_RATIO` x the base's is flagged ``collapsed``.

Coefficients are chosen on the validation splits of the merged tasks only; the test splits are
evaluated once per reported row.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.bench.run import CALIBRATION_EXAMPLES, BenchRunner, check_grid_keys, plan_method, run_methods
from mergelab.errors import MergeLabError

COLLAPSE_RATIO = 2.0
PPL_CHARS = 20_000  # characters of held-out text scored for perplexity
CALIBRATION_MAX_LENGTH = 256


def _state(folder: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise MergeLabError(f"{folder}: no *.safetensors weights (run `mergelab bench prepare --suite llmmix`)")
    out = {}
    for f in files:
        out.update({k: v.float() for k, v in load_file(str(f)).items()})
    return out


def _expert_state(final: Path, base_dir: Path) -> dict:
    """An expert's weights: its model folder's, or for a PEFT LoRA expert the base's with ``s * B A`` added
    to each adapted matrix (mergelab's own reading, :class:`mergelab.io.adapted.AdaptedCheckpoint`)."""
    from mergelab.io.peft_adapter import is_adapter_folder

    if not is_adapter_folder(final):
        return _state(final)
    from mergelab.io.adapted import adapted_state

    return adapted_state(base_dir, final)


def heldout_text(root: Path, chars: int = PPL_CHARS, base_dir: Optional[Path] = None) -> tuple:
    """``(text, source)``: the first ``chars`` characters of the held-out split of the corpus the base
    was pretrained on (its run's ``pretrain.json``), else of the base folder's ``heldout.jsonl`` (a shipped
    base has one: the same documents' start), else of a corpus in ``root``
    (``corpus-*/heldout.jsonl``), else of stdlib docstrings (seeded draw)."""
    candidates = []
    for rec in ([Path(base_dir) / "pretrain.json", Path(base_dir).parent / "pretrain.json"] if base_dir else []):
        if rec.is_file():
            corpus = json.loads(rec.read_text(encoding="utf-8")).get("corpus")
            if corpus:
                candidates.append(Path(corpus) / "heldout.jsonl")
    if base_dir:  # a shipped base carries the first held-out documents of its corpus
        candidates.append(Path(base_dir) / "heldout.jsonl")
    candidates += sorted(Path(root).glob("corpus-*/heldout.jsonl"))
    for f in candidates:
        if not f.is_file():
            continue
        from mergelab.llmmix.corpus import read_documents

        parts, n = [], 0
        for doc in read_documents(f.parent, "heldout"):
            parts.append(doc)
            n += len(doc)
            if n >= chars:
                break
        if parts:
            return "\n\n".join(parts)[:chars], str(f)
    import random

    from mergelab.llmmix.corpus import _stdlib_docs

    parts, n = [], 0
    for doc in _stdlib_docs(random.Random(12345)):
        parts.append(doc)
        n += len(doc)
        if n >= chars:
            break
    return "\n\n".join(parts)[:chars], "stdlib docstrings (seed 12345; not guaranteed unseen by pretraining)"


def _bits(records: Sequence[dict]) -> str:
    return "".join("1" if r["score"] >= 1.0 else "0" for r in records)


class LlmRunner(BenchRunner):
    """BenchRunner over causal-LM experts (see the module doc)."""

    def __init__(self, tasks: Sequence, held: Sequence, base_dir: Path, experts_dir: Path, ppl_text: tuple,
                 seed: int = 0, log: Callable[[str], None] = print, batch_size: int = 64, device: str = "cpu",
                 save_dir: Optional[Path] = None, eval_limit: Optional[int] = None):
        from mergelab.llmmix.finetune import base_fingerprint
        from mergelab.llmmix.generate import load_causal_lm

        self.log, self.seed, self.save_dir, self.device, self.batch_size = log, seed, save_dir, device, batch_size
        self.eval_limit = eval_limit  # score only the first N examples of every split (None: all)
        self.tasks, self.held = {t.name: t for t in tasks}, {t.name: t for t in held}
        self.merge_tasks, self.held_out = list(self.tasks), list(self.held)
        self.base_dir, self.experts_dir = Path(base_dir), Path(experts_dir)
        self.model, self.tokenizer = load_causal_lm(base_dir, device=device)
        self.base = _state(base_dir)
        self.ppl_text, self.ppl_source = ppl_text
        fp = base_fingerprint(base_dir)
        self.experts, self.expert_records = [], {}
        for t in tasks:
            run = self.experts_dir / t.name
            rec = json.loads((run / "finetune.json").read_text(encoding="utf-8")) if (run / "finetune.json").is_file() else None
            if rec is None or not rec.get("finished"):
                raise MergeLabError(f"{run}: no finished expert for task '{t.name}' (run `mergelab bench prepare "
                                    "--suite llmmix` with the same --tasks/--examples)")
            settings = rec.get("settings", {})
            if settings.get("base") != fp or settings.get("tasks", {}).get(t.name) != t.fingerprint():
                raise MergeLabError(f"{run}: expert trained on another base or other task data than this run's "
                                    "(same --size/--base/--examples as `bench prepare` expected)")
            self.experts.append(_expert_state(run / "final", self.base_dir))
        self._statistics, self._aux = {}, {}
        self.base_eval = self.evaluate_merged(self.base)
        self.base_ppl = self.base_eval["row_extra"]["perplexity"]
        self.expert_correct, self.expert_perplexity = {}, {}
        for t, sd in zip(tasks, self.experts):
            self._load(sd)
            ev = self._eval_split(t, "test")
            self.expert_correct[t.name] = _bits(ev.records)
            self.expert_records[t.name] = ev.records
            self.expert_perplexity[t.name] = self._perplexity()

    # -- models
    def _load(self, state: dict) -> None:
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if getattr(self.model.config, "tie_word_embeddings", False) else set()
        if unexpected or set(missing) - tied:
            raise MergeLabError(f"merged state does not fit the base architecture: missing {sorted(set(missing) - tied)[:3]}, "
                                f"unexpected {sorted(unexpected)[:3]}")

    def _eval_split(self, task, split: str):
        from mergelab.llmmix.generate import evaluate_task

        return evaluate_task(self.model, self.tokenizer, task, split, limit=self.eval_limit,
                             batch_size=self.batch_size)

    # -- calibration hooks (the procedure is BenchRunner.statistics)
    calibration_max_length = CALIBRATION_MAX_LENGTH

    def calibration_dirs(self, task: str) -> tuple:
        """A LoRA expert (``final/`` an adapter folder) is calibrated as ``BASE+ADAPTER``."""
        from mergelab.io.peft_adapter import is_adapter_folder

        run = self.experts_dir / task
        final = run / "final"
        return (f"{self.base_dir}+{final}" if is_adapter_folder(final) else final), run / "calibration"

    def calibration_model(self, task: str):
        return None

    def calibration_data(self, task: str):
        """:data:`CALIBRATION_EXAMPLES` rendered prompt + answer texts of the task's **train** split
        (a seeded sample, in split order), so the empirical Fisher scores the true next tokens."""
        import random

        from mergelab.calibrate.data import CalibrationSet
        from mergelab.llmmix.tasks.format import render_answer, render_prompt

        spec = self.tasks[task]
        train = spec.split("train")
        idx = sorted(random.Random(self.seed).sample(range(len(train)), min(len(train), CALIBRATION_EXAMPLES)))
        return CalibrationSet([render_prompt(train[i].prompt) + render_answer(train[i].answer) for i in idx],
                              source={"suite": "llmmix", "task": task, "split": "train", "examples": len(idx),
                                      "seed": self.seed, "task_fingerprint": spec.fingerprint()})

    def validate(self, method: str, params: dict) -> float:
        merged, _, _ = self.merge(method, params)
        self._load(merged)
        accs = [self._eval_split(self.tasks[t], "validation").accuracy for t in self.merge_tasks]
        return sum(accs) / len(accs)

    def _perplexity(self) -> Optional[float]:
        """The loaded model's perplexity on the held-out text (None when the runner was given no text)."""
        if not self.ppl_text:
            return None
        import torch

        from mergelab.evaluate.lm import perplexity

        with torch.no_grad():
            return perplexity(self.model, self.tokenizer, self.ppl_text)["perplexity"]

    def evaluate_merged(self, merged: dict) -> dict:
        t0 = time.perf_counter()
        self._load(merged)
        correct, preds = {}, {}
        for name, task in self.tasks.items():
            ev = self._eval_split(task, "test")
            correct[name] = _bits(ev.records)
            preds[name] = [r["prediction"] for r in ev.records]
        held = {}
        for name, task in self.held.items():
            ev = self._eval_split(task, "test")
            held[name] = ev.accuracy
            correct[name] = _bits(ev.records)
            preds[name] = [r["prediction"] for r in ev.records]
        ppl = self._perplexity()
        extra = {"perplexity": ppl, "predictions": preds}
        base = getattr(self, "base_ppl", None)
        if base is not None:
            extra["perplexity_ratio"] = ppl / base
            extra["collapsed"] = bool(ppl > COLLAPSE_RATIO * base)
        return {"correct": correct, "held_out": held or None, "seconds": round(time.perf_counter() - t0, 2),
                "row_extra": extra}

    # -- references
    def references(self) -> list:
        rows = []
        b = self.base_eval
        b["row_extra"].update(perplexity_ratio=1.0, collapsed=False)
        rows.append(self._row("pretrained", "reference", b["correct"], b["held_out"],
                              note="the base model, no fine-tuning", **b["row_extra"]))
        rows.append(self._row("individual", "reference", dict(self.expert_correct), None,
                              note="each task's own fine-tuned expert",
                              expert_perplexity=dict(self.expert_perplexity),
                              expert_perplexity_ratio={t: p / self.base_ppl for t, p in self.expert_perplexity.items()}))
        mt = self.experts_dir / "multitask" / "final"
        if not (mt / "model.safetensors").is_file():
            rows.append({"name": "multi-task training", "kind": "reference", "status": "missing",
                         "reason": f"{mt}: no multi-task model"})
            return rows
        stale = self._multitask_mismatch(mt.parent)
        if stale:
            rows.append({"name": "multi-task training", "kind": "reference", "status": "stale",
                         "reason": f"{mt}: trained on other data than this run's ({stale}); rebuild it with "
                                   "`mergelab bench prepare --suite llmmix --rebuild` and the same --size/--tasks"})
            return rows
        ev = self.evaluate_merged(_expert_state(mt, self.base_dir))
        rows.append(self._row("multi-task training", "reference", ev["correct"], ev["held_out"],
                              note="one model fine-tuned on all merged tasks together", **ev["row_extra"]))
        return rows

    def _multitask_mismatch(self, run: Path) -> str:
        """Why the multi-task model in ``run`` is not a reference for this run ('' when it is): it must
        come from this base and have seen every merged task with the same data."""
        from mergelab.llmmix.finetune import base_fingerprint

        rec_path = run / "finetune.json"
        if not rec_path.is_file():
            return f"no {rec_path.name}"
        settings = json.loads(rec_path.read_text(encoding="utf-8")).get("settings", {})
        if settings.get("base") != base_fingerprint(self.base_dir):
            return "another base"
        seen = settings.get("tasks", {})
        differ = [t.name for t in self.tasks.values() if seen.get(t.name) != t.fingerprint()]
        return "other data for " + ", ".join(differ) if differ else ""

    # -- adapter merges (mergelab.bench.adapter_merges)
    @property
    def adapter_base(self) -> Path:
        return self.base_dir

    def adapter_paths(self) -> list:
        return [self.experts_dir / t / "final" for t in self.merge_tasks]

    def adapter_state(self, folder: Path) -> dict:
        return _expert_state(folder, self.base_dir)

    def _save(self, state: dict, name: str) -> None:
        folder = Path(self.save_dir) / name
        self._load(state)
        self.model.save_pretrained(folder)
        self.tokenizer.save_pretrained(folder)


def suite_fingerprint(tasks: Sequence, held: Sequence) -> str:
    """The data a report was measured on: each merged then held-out task's fingerprint (8 hex digits)."""
    return "+".join(t.fingerprint()[:8] for t in list(tasks) + list(held))


def experts_fingerprint(folder: Path, names: Sequence[str]) -> str:
    """Which experts a report merged: a hash of each task's expert record settings in ``folder`` (base,
    task data, recipe), so a retrained expert changes it (a task without a record counts as empty settings)."""
    import hashlib

    h = hashlib.sha256()
    for n in names:
        rec = Path(folder) / n / "finetune.json"
        settings = json.loads(rec.read_text(encoding="utf-8")).get("settings", {}) if rec.is_file() else {}
        h.update(f"{n}\x1f{json.dumps(settings, sort_keys=True)}\n".encode())
    return h.hexdigest()[:16]


def prepared_tasks(prep: dict) -> list:
    """Every task ``bench prepare`` has made an expert for in this folder (``prepare.json``: the last
    run's ``tasks`` and every recorded model, the multi-task one excepted), built-in tasks in the
    registry's order, then the others; a later ``prepare --tasks a,b`` does not hide the earlier ones."""
    from mergelab.llmmix.prepare import MULTITASK
    from mergelab.llmmix.tasks import task_names

    made = list(prep.get("tasks") or ()) + [m for m in (prep.get("models") or {}) if m != MULTITASK]
    builtin = [t for t in task_names(held_out=False) if t in made]
    return builtin + [t for t in dict.fromkeys(made) if t not in builtin]


def run_llmmix(methods: Sequence[str], out: Path, size: str = "3m", root: Optional[Path] = None,
               base_dir: Optional[Path] = None, merge_tasks: Optional[Sequence[str]] = None,
               held_out: Optional[Sequence[str]] = None, sizes: Optional[dict] = None, task_seed: int = 0,
               tune: bool = True, seed: int = 0, grids: Optional[dict] = None, command: str = "",
               log: Callable[[str], None] = print, device: str = "cpu", threads: Optional[int] = None,
               save_models: bool = False, lora_rank: int = 0, adapter_merges: bool = False,
               eval_limit: Optional[int] = None) -> dict:
    """Run the llmmix protocol for ``methods`` on the experts in ``ROOT/experts-SIZE`` and write
    ``report.json``, ``report.md`` and the charts to ``out`` (rewritten after every method). With
    ``lora_rank`` the experts are the LoRA ones (``experts-SIZE-loraR``), and ``adapter_merges`` adds
    the rows of :mod:`mergelab.bench.adapter_merges` (merges that stay adapters) after the dense ones.
    ``eval_limit`` scores only the first N examples of every validation and test split (the experts'
    rows too, so normalised accuracy compares like with like); the report records it."""
    from mergelab import __version__
    from mergelab.evaluate.report import write_report
    from mergelab.llmmix.prepare import experts_folder
    from mergelab.llmmix.pretrain import base_folder, base_source, default_root
    from mergelab.llmmix.tasks import build_task, get_spec, task_names

    if threads:
        import torch

        torch.set_num_threads(threads)
    root = Path(root) if root else default_root()
    folder = experts_folder(root, size, lora_rank)
    prep = json.loads((folder / "prepare.json").read_text(encoding="utf-8")) if (folder / "prepare.json").is_file() else {}
    base_dir = Path(base_dir) if base_dir else Path(prep["base"]) if prep.get("base") else base_folder(size, root)
    names = list(merge_tasks) if merge_tasks else prepared_tasks(prep) or task_names(held_out=False)
    held_names = list(held_out) if held_out is not None else task_names(held_out=True)
    bad = [n for n in names if get_spec(n).held_out]
    if bad:
        raise MergeLabError(f"--tasks: {', '.join(bad)} held out (no expert may see a held-out task)")
    if set(names) & set(held_names):
        raise MergeLabError(f"tasks {sorted(set(names) & set(held_names))} are both merged and held out")
    if len(names) < 2:
        raise MergeLabError(f"a merge needs at least 2 tasks; got {names}")
    if adapter_merges and not lora_rank:
        raise MergeLabError("adapter merges need the LoRA experts: give --lora-rank R")
    if eval_limit is not None and eval_limit < 1:
        raise MergeLabError(f"--eval-limit must be >= 1, got {eval_limit}")
    check_grid_keys(grids, methods)
    plans = [plan_method(name, len(names), grids) for name in methods]
    start = time.perf_counter()
    tasks = [build_task(n, seed=task_seed, sizes=sizes) for n in names]
    held = [build_task(n, seed=task_seed, sizes=sizes) for n in held_names]
    text = heldout_text(root, base_dir=base_dir)
    runner = LlmRunner(tasks, held, base_dir, folder, text, seed, log, device=device,
                       save_dir=Path(out) / "models" if save_models else None, eval_limit=eval_limit)
    rows = runner.references()
    report = {
        "suite": "llmmix", "suite_fingerprint": suite_fingerprint(tasks, held),
        "experts_fingerprint": experts_fingerprint(folder, names),
        "suite_source": "mergelab.llmmix.tasks", "base_model": str(base_dir),
        "base_source": base_source(base_dir), "cache": str(folder),
        "merge_tasks": names, "held_out": held_names,
        "test_sizes": {t.name: min(len(t.split("test")), eval_limit or len(t.split("test"))) for t in tasks + held},
        "eval_limit": eval_limit,
        "methods": list(methods), "tuned": tune, "grids": grids or {}, "seed": seed, "mergelab_version": __version__,
        "command": command, "seconds": 0.0,
        "perplexity_text": {"source": runner.ppl_source, "chars": len(text[0])},
        "base_perplexity": runner.base_ppl, "collapse_ratio": COLLAPSE_RATIO,
        "protocol": ("whole causal LMs merged; coefficients chosen on the validation splits of the merged tasks "
                     "only; greedy exact-match (or pass@1) on the test splits, each reported row evaluated once; "
                     "held-out tasks seen by no expert and no tuning; a merge whose held-out-text perplexity "
                     f"exceeds {COLLAPSE_RATIO:g}x the base's is flagged collapsed"
                     + (f"; only the first {eval_limit} examples of every validation and test split scored"
                        if eval_limit else "")),
        "rows": rows, "complete": not methods,
    }
    write_report(report, Path(out))
    run_methods(runner, plans, methods, report, out, tune, start, last=not adapter_merges)
    if adapter_merges:
        from mergelab.bench.adapter_merges import append_adapter_merges

        append_adapter_merges(runner, report, out, lora_rank, start, log)
    return report
