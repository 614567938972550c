"""Benchmark rows for the optimisation-based merges (RegMean++, AdaMerging, Expert Merging, FW-Merging).

``mergelab bench run`` evaluates registry methods (one tensor at a time, which covers RegMean and
Fisher merging with their calibration statistics). The methods here drive a functional model in
memory, so they do not fit that loop; :func:`run_tuned_bench` uses the bench's own pieces instead
-- :class:`mergelab.bench.run.BenchRunner` (the prepared base, experts and heads; the references) and
its :class:`~mergelab.evaluate.harness.Evaluator` -- and writes a report in the same format
(``report.json``, ``report.md``, charts), so its rows sit beside ``bench run``'s.

Data use is recorded in every row (``data``): calibration and coefficient learning read the
**train** or **validation** splits; the test split only when a method is run as test-time adaptation
(``adamerging_tta``), and the row then says so in its name and in ``data.test_time``.
"""

from __future__ import annotations

import copy
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

import torch

from mergelab.calibrate.data import task_texts, tokenize_batches
from mergelab.errors import MergeLabError

METHODS = ("regmean_plusplus", "adamerging_task", "adamerging_layer", "adamerging_tta", "expert_merging",
           "expert_merging_pp", "fw_hard")
DISPLAY = {"regmean_plusplus": "RegMean++", "adamerging_task": "AdaMerging (task-wise)",
           "adamerging_layer": "AdaMerging (layer-wise)",
           "adamerging_tta": "AdaMerging (layer-wise, test-time adaptation)",
           "expert_merging": "Expert Merging", "expert_merging_pp": "Expert Merging++", "fw_hard": "FW-Merging (hard)"}


@dataclass
class TunedSettings:
    """Budgets of the runner (CPU-sized; where they differ from the references, the docs say so)."""

    regmean_examples: int = 256  # per task, train split (FusionBench / RegMean++: 256)
    regmean_alphas: tuple = (0.1, 0.5, 0.9)  # chosen on validation, as bench run does for RegMean
    ada_examples: int = 64  # unlabelled examples per task
    ada_split: str = "validation"
    ada_steps: int = 100  # reference: 500
    ada_lr: float = 5e-3  # reference: 1e-3 over 500 steps; Adam moves ~lr per step, so lr x steps is matched
    ada_batch: int = 16
    expert_examples: int = 5  # per task (reference default 5)
    expert_epochs: int = 10  # reference: 1 (with 5 InternVL tasks); ours: 10 passes over 8 x 5 samples
    fw_examples: int = 32  # labelled proxy examples per task, train split (FusionBench: 100)
    fw_iterations: int = 10
    fw_step_size: float = 0.1
    fw_scaling: float = 0.3
    batch_size: int = 16
    threads: Optional[int] = None


class _Timer:
    def __init__(self):
        from mergelab.bench.run import PeakMemory

        self.mem = PeakMemory()

    def __enter__(self):
        self.mem.__enter__()
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc):
        self.seconds = time.perf_counter() - self.t0
        self.mem.__exit__(*exc)


def frozen_keys(base: Dict[str, torch.Tensor], experts: Sequence[Dict[str, torch.Tensor]]) -> List[str]:
    """Tensors equal to the base in every expert (e.g. word embeddings the bench froze): nothing to merge."""
    return [k for k, v in base.items() if all(torch.equal(e[k], v) for e in experts)]


class TunedBench:
    """The suite's prepared models seen as a functional model with one head per merged task."""

    def __init__(self, suite, cache, merge_tasks: Sequence[str], held_out: Sequence[str], base: str = "minilm-l6",
                 seed: int = 0, settings: TunedSettings = TunedSettings(), log: Callable[[str], None] = print,
                 runner=None):
        from mergelab.bench.run import BenchRunner, _unprefixed
        from mergelab.evaluate.model import build_encoder

        if settings.threads:
            torch.set_num_threads(settings.threads)
        self.runner = runner or BenchRunner(suite, cache, merge_tasks, held_out, base, seed, log)
        merge_tasks = self.runner.merge_tasks
        self.suite, self.seed, self.settings, self.log = suite, seed, settings, log
        self.tasks = list(merge_tasks)
        self.base = _unprefixed(self.runner.base)
        self.experts = [_unprefixed(e) for e in self.runner.experts]
        self.heads = [self.runner.heads[t] for t in self.tasks]
        self.frozen = frozen_keys(self.base, self.experts)
        self.exclude = "^(" + "|".join(re.escape(k) for k in self.frozen) + ")$" if self.frozen else ""
        self.module = build_encoder(self.runner.config, self.base)
        self.tokenizer = self.runner.tokenizer

    @classmethod
    def from_runner(cls, runner, settings: TunedSettings = TunedSettings()) -> "TunedBench":
        """Reuse a :class:`mergelab.bench.run.BenchRunner` (``bench run``'s loaded models and evaluator):
        the hook for ``bench run`` to report these methods (``TunedBench.from_runner(runner).run(name)``)."""
        return cls(runner.suite, runner.cache, runner.merge_tasks, runner.held_out, seed=runner.seed,
                   settings=settings, log=runner.log, runner=runner)

    def task_model(self):
        from mergelab.tune.functional import EncoderHeads

        return EncoderHeads(self.module, self.heads)

    def pool(self):
        from mergelab.tune.functional import ModelPool

        return ModelPool(self.experts, names=self.tasks)

    def batches(self, split: str, n: int, batch_size: int, test_time: bool = False) -> List[list]:
        from mergelab.evaluate.model import MAX_LENGTH

        out = []
        for t in self.tasks:
            data = task_texts(self.suite.task(t), split, n, self.seed, test_time, suite=self.suite.name)
            out.append(list(tokenize_batches(self.tokenizer, data, batch_size, MAX_LENGTH)))
        return out

    def full(self, state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
        """``state`` completed with the base's tensors it does not hold (excluded / frozen ones)."""
        return {**self.base, **state}

    def row(self, name: str, method: str, state, timer: _Timer, data: dict, **extra) -> dict:
        ev = self.runner.evaluator.evaluate(self.full(state), self.runner.heads, self.tasks, self.runner.held_out)
        row = self.runner._row(name, "merge", ev["correct"], ev.get("held_out"), method=method,
                               merge_seconds=round(timer.seconds, 3), merge_peak_mib=round(timer.mem.mib, 1),
                               eval_seconds=ev["seconds"], data=data, **extra)
        m = row["metrics"]
        self.log(f"{name}: test mean accuracy {m['mean_accuracy']:.4f}, normalised "
                 f"{m['mean_normalised_accuracy']:.4f}, {timer.seconds:.1f} s / {timer.mem.mib:.0f} MiB")
        return row

    def validation_accuracy(self, state) -> float:
        ev = self.runner.evaluator
        return ev.mean_accuracy(ev.encoder(self.full(state)), self.runner.heads, self.tasks, "validation")

    # ------------------------------------------------------------------ methods
    def regmean_plusplus(self) -> List[dict]:
        from mergelab.tune.regmean_pp import regmean_plusplus

        s = self.settings
        t0 = time.perf_counter()
        data = self.batches("train", s.regmean_examples, s.batch_size)
        prep = time.perf_counter() - t0
        search, results = [], {}
        for alpha in s.regmean_alphas:
            with _Timer() as timer:
                res = regmean_plusplus(copy.deepcopy(self.module), self.pool(), data, alpha=alpha,
                                       exclude=self.exclude)
            acc = self.validation_accuracy(res.state)
            results[alpha] = (res, timer)
            search.append({"params": {"alpha": alpha}, "validation_mean_accuracy": acc})
            self.log(f"RegMean++ alpha={alpha}: validation {acc:.4f} ({timer.seconds:.1f} s)")
        best = max(range(len(search)), key=lambda i: (search[i]["validation_mean_accuracy"], -i))
        alpha = s.regmean_alphas[best]
        res, timer = results[alpha]
        data_info = {"split": "train", "examples_per_task": s.regmean_examples, "labels_used": False,
                     "test_time": False, "tokenize_seconds": round(prep, 2),
                     "statistics": "Grams recomputed on the merged model's hidden states, in memory (not stored)"}
        return [self.row(f"{DISPLAY['regmean_plusplus']} (tuned)", "regmean_plusplus", res.state, timer, data_info,
                         variant="tuned", params={"alpha": alpha}, search=search,
                         selected_by="best mean accuracy on the validation splits of the merged tasks")]

    def adamerging(self, granularity: str, test_time: bool = False) -> List[dict]:
        from mergelab.tune.adamerging import AdaMergingConfig, adamerging

        s = self.settings
        split = "test" if test_time else s.ada_split
        data = self.batches(split, s.ada_examples, s.ada_batch, test_time)
        cfg = AdaMergingConfig(granularity, lr=s.ada_lr, steps=s.ada_steps, exclude=self.exclude, seed=self.seed)
        with _Timer() as timer:
            res = adamerging(self.task_model(), self.base, self.pool(), data, cfg)
        key = "adamerging_tta" if test_time else f"adamerging_{granularity}"
        ent = [h["entropy"] for h in res.history]
        data_info = {"split": split, "examples_per_task": s.ada_examples, "labels_used": False,
                     "test_time": test_time}
        extra = {"params": {"steps": s.ada_steps, "lr": s.ada_lr, "init": cfg.init}, "variant": "learned",
                 "entropy_first_last": [ent[0], ent[-1]] if ent else None}
        if granularity == "task":
            extra["coefficients"] = res.coefficients
        return [self.row(DISPLAY[key], key, res.state, timer, data_info, **extra)]

    def expert_merging(self, plus: bool) -> List[dict]:
        from mergelab.tune.expert_merging import ExpertMergingConfig, expert_merging, expert_merging_pp

        s = self.settings
        data = self.batches("train", s.expert_examples, 1)
        cfg = ExpertMergingConfig(epochs=s.expert_epochs, seed=self.seed)
        with _Timer() as timer:
            fn = expert_merging_pp if plus else expert_merging
            res = fn(self.task_model(), self.base, self.pool(), data, cfg)
        key = "expert_merging_pp" if plus else "expert_merging"
        data_info = {"split": "train", "examples_per_task": s.expert_examples, "labels_used": False,
                     "test_time": False}
        return [self.row(DISPLAY[key], key, res.state, timer, data_info, variant="learned",
                         params={"epochs": s.expert_epochs, "gamma": cfg.gamma, "lr": cfg.lr},
                         chunks=sum(res.info["chunks"].values()))]

    def fw_hard(self) -> List[dict]:
        from mergelab.tune.fw_merging import FWConfig, fw_merging

        s = self.settings
        data = self.batches("train", s.fw_examples, s.batch_size)
        cfg = FWConfig(iterations=s.fw_iterations, step_size=s.fw_step_size, scaling_factor=s.fw_scaling,
                       exclude=self.exclude)
        with _Timer() as timer:
            res = fw_merging(self.task_model(), self.base, self.pool(), data, cfg)
        data_info = {"split": "train", "examples_per_task": s.fw_examples, "labels_used": True, "test_time": False}
        return [self.row(DISPLAY["fw_hard"], "fw_hard", res.state, timer, data_info, variant="learned",
                         params={"iterations": s.fw_iterations, "step_size": s.fw_step_size,
                                 "scaling_factor": s.fw_scaling}, selections=[h["selected"] for h in res.history],
                         coefficients=res.coefficients)]

    def run(self, method: str) -> List[dict]:
        try:
            if method == "regmean_plusplus":
                return self.regmean_plusplus()
            if method in ("adamerging_task", "adamerging_layer"):
                return self.adamerging(method.split("_")[1])
            if method == "adamerging_tta":
                return self.adamerging("layer", test_time=True)
            if method in ("expert_merging", "expert_merging_pp"):
                return self.expert_merging(method.endswith("_pp"))
            if method == "fw_hard":
                return self.fw_hard()
        except MergeLabError as e:
            self.log(f"{method} failed: {e}")
            return [{"name": DISPLAY.get(method, method), "method": method, "kind": "merge", "status": "failed",
                     "reason": str(e)}]
        raise MergeLabError(f"unknown tuned method '{method}'; known: {', '.join(METHODS)}")


def run_tuned_bench(suite, cache, methods: Sequence[str], out: Path, base: str = "minilm-l6",
                    merge_tasks: Optional[Sequence[str]] = None, held_out: Optional[Sequence[str]] = None,
                    seed: int = 0, settings: TunedSettings = TunedSettings(), references: bool = True,
                    log: Callable[[str], None] = print) -> dict:
    """Run the tuned ``methods`` on the prepared suite and write the report to ``out``."""
    from mergelab import __version__
    from mergelab.evaluate.report import write_report

    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise MergeLabError(f"unknown tuned method(s) {unknown}; known: {', '.join(METHODS)}")
    held = list(suite.held_out if held_out is None else held_out)
    tasks = list(merge_tasks) if merge_tasks else [t for t in suite.task_names if t not in held]
    start = time.perf_counter()
    bench = TunedBench(suite, cache, tasks, held, base, seed, settings, log)
    rows = bench.runner.references() if references else []
    for m in methods:
        rows.extend(bench.run(m))
    report = {
        "suite": suite.name, "suite_fingerprint": suite.fingerprint(), "suite_source": suite.source,
        "base_model": base, "cache": str(cache.dir), "merge_tasks": tasks, "held_out": held,
        "test_sizes": {t: len(suite.task(t).split("test")) for t in tasks}, "methods": list(methods),
        "seed": seed, "mergelab_version": __version__, "settings": asdict(settings),
        "frozen_tensors": bench.frozen, "seconds": round(time.perf_counter() - start, 1),
        "protocol": ("encoders merged in memory (torch.func.functional_call), each task keeps its own expert's "
                     "head; coefficients learned on train/validation data (test only for the row marked "
                     "test-time adaptation); metrics on the test splits; held-out tasks scored by a linear probe "
                     "refitted on the merged encoder"),
        "rows": rows,
    }
    write_report(report, Path(out))
    return report


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _calibration_cell(row: dict) -> str:
    """Examples, seconds and bytes of the statistics a row used (from its ``calibration``/``data`` entry)."""
    cal = row.get("calibration")
    if cal:
        n = cal.get("examples_per_task")
        parts = [f"{cal.get('statistic')}: {n}/task ({cal.get('split')})"]
        if cal.get("fisher_mode"):
            parts.append(cal["fisher_mode"])
        if cal.get("seconds_total") is not None:
            parts.append(f"{cal['seconds_total']:.0f} s")
        if cal.get("bytes_total") is not None:
            parts.append(f"{cal['bytes_total'] / 1e6:.0f} MB")
        return ", ".join(parts)
    data = row.get("data")
    if data:
        text = f"{data['examples_per_task']}/task ({data['split']}{', labels' if data.get('labels_used') else ''})"
        return text + (" **test-time adaptation**" if data.get("test_time") else "")
    return "–"


def leaderboard_markdown(report: dict) -> str:
    """One table: accuracy, data use and cost (calibration, merge / learning time, peak memory) per row."""
    tasks, held = report["merge_tasks"], report["held_out"]
    head = ["model", "coefficients", "data / calibration", "merge or learning s", "peak MiB", "mean acc",
            "norm. acc", "neg. flips", "held-out acc"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in report["rows"]:
        if row.get("status") != "ok":
            continue
        m = row["metrics"]
        params = ", ".join(f"{k}={v}" for k, v in (row.get("params") or {}).items() if k != "weight") or "–"
        cells = [row["name"], params, _calibration_cell(row),
                 f"{row['merge_seconds']:.1f}" if "merge_seconds" in row else "–",
                 f"{row['merge_peak_mib']:.0f}" if "merge_peak_mib" in row else "–",
                 _pct(m["mean_accuracy"]), _pct(m["mean_normalised_accuracy"]), _pct(m["mean_negative_flip_rate"]),
                 _pct(m.get("mean_held_out_accuracy"))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"
