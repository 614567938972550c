"""``mergelab bench run``: merge the prepared experts with each method, evaluate, report.

For each requested method this:

1. runs it once with its **default** coefficients (the registry defaults; a required per-model
   ``weight`` is 1 for every expert);
2. searches a small grid of coefficients (``lambda``, ``density``, ...; see :data:`GRIDS`) and keeps
   the setting with the best mean accuracy on the **validation** splits of the merged tasks (ties go
   to the earlier grid point); every value tried and its validation score go into the report;
3. for both settings, merges the encoders (float32, ``mergelab.merge_state_dicts``), timing the
   merge and sampling its peak resident memory, and evaluates on the **test** splits: each merged
   task with its own expert's head, each held-out task with a probe refitted on the merged encoder.

The references come from ``bench prepare``: linear probes on the frozen base ("pretrained"), the
experts on their own tasks ("individual"), and the multi-task model ("multi-task training").

With ``lora_rank`` R the experts merged are the LoRA experts of ``bench prepare --lora-rank R`` (each
read as the base plus ``s * B A``, with its own head), "individual" are those experts and a further
reference row gives the full fine-tunes; ``adapter_merges`` adds the rows of
:mod:`mergelab.bench.adapter_merges` (merges that stay adapters) after the dense ones.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import psutil

from mergelab.bench.cache import BenchCache, float_state
from mergelab.errors import MergeLabError
from mergelab.evaluate.harness import Evaluator
from mergelab.evaluate.metrics import summarise
from mergelab.evaluate.model import (ENCODER_PREFIX, MAX_LENGTH, base_model_path, load_config, load_tokenizer,
                                     read_state, split_state)
from mergelab.evaluate.tasks import Suite

# Grids searched on validation data, by parameter name. ``lambda`` depends on whether the method sums
# task vectors (task arithmetic: small lambda) or averages them (normalize=true: lambda around 1).
# The grids are small on purpose: `bench run --methods all` should finish in about an hour on a
# 2-core laptop; widen any of them with --grid.
LAMBDA_SUM = (0.3, 0.5, 1.0)
LAMBDA_MEAN = (1.0, 1.5, 2.0)
GRIDS = {
    "density": (0.2, 0.5),
    "alpha": (0.5, 0.9),
    "ratio": (0.1, 0.2),
    "select_topk": (0.1, 0.3, 1.0),
}
# Values for required method-level parameters that have no default.
REQUIRED_FILL = {"t": 0.5}
# Data-informed methods: the statistic each needs from `mergelab calibrate`, computed per expert on
# CALIBRATION_EXAMPLES examples of its task's train split (FusionBench's RegMean/Fisher default: 256).
STATISTIC_FOR = {"regmean": "gram", "fisher": "fisher"}
CALIBRATION_EXAMPLES = 256
FISHER_MODE = "empirical"  # one backward pass per example with its true label (exact costs one per class)
MAX_GRID = 24
# Methods the bench cannot meaningfully run on separately fine-tuned experts, and why.
NOT_APPLICABLE = {"mwa": "weights checkpoints of one training run by their loss or step; the experts are separate runs"}
# Methods run with their default coefficients only, and why.
UNTUNED = {"doge_ta": "each merge runs a 400-step optimisation; default coefficients only"}

DISPLAY = {"linear": "simple average", "task_arithmetic": "task arithmetic", "ties": "TIES",
           "dare_ties": "DARE-TIES", "dare_linear": "DARE (linear)"}


class PeakMemory:
    """Peak resident memory of this process above its level at start, sampled every ``interval`` s."""

    def __init__(self, interval: float = 0.005):
        self.interval = interval
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self):
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._watch, daemon=True)
        self._thread.start()
        return self

    def _watch(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            self._stop.wait(self.interval)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def mib(self) -> float:
        return (self.peak - self.start) / 2**20


def merge_fn():
    """The core's in-memory merge (looked up at call time)."""
    import mergelab

    return mergelab.merge_state_dicts


@dataclass
class MethodPlan:
    """What to run for one method: its default setting and its validation grid (or why not)."""

    method: str
    default: Optional[dict] = None
    grid: list = field(default_factory=list)
    reason: str = ""
    statistic: Optional[str] = None


def plan_method(name: str, n_models: int, grids: Optional[dict] = None) -> MethodPlan:
    """Default parameters and the tuning grid of ``name`` for merging ``n_models`` experts.

    ``grids`` (parameter name -> values) replaces the built-in values of those parameters and may add
    axes for other parameters the method has; a key ``<method>.<parameter>`` applies to that method
    only and wins over a plain ``<parameter>`` key. A given value the parameter does not allow, and a
    grid of more than :data:`MAX_GRID` settings, are errors (built-in values outside a method's range
    are left out of its grid).
    """
    from mergelab.methods.registry import get_method

    m = get_method(name)
    if name in NOT_APPLICABLE:
        return MethodPlan(name, reason=NOT_APPLICABLE[name])
    if m.max_models is not None and m.max_models < n_models:
        return MethodPlan(name, reason=f"takes at most {m.max_models} model(s) besides the base; the suite merges {n_models}")
    if m.min_models > n_models:
        return MethodPlan(name, reason=f"needs at least {m.min_models} models; the suite merges {n_models}")
    statistic = STATISTIC_FOR.get(name)
    if m.aux_inputs and not (statistic and tuple(m.aux_inputs) == ("statistics",)):
        return MethodPlan(name, reason=f"needs per-model auxiliary checkpoints ({', '.join(m.aux_inputs)})")
    default: dict = {}
    for p in m.model_params:
        if p.name in m.aux_inputs:
            continue  # filled by the runner with each expert's calibration statistics
        if p.required:
            if p.name == "weight":
                default["weight"] = [1.0] * n_models
            else:
                return MethodPlan(name, reason=f"needs the per-model parameter '{p.name}', which the bench cannot supply")
    for p in m.params:
        if p.required:
            if p.name not in REQUIRED_FILL:
                return MethodPlan(name, reason=f"needs the parameter '{p.name}', which the bench cannot supply")
            default[p.name] = REQUIRED_FILL[p.name]
    axes = {}
    names = {p.name: p for p in m.params}
    names.update({p.name: p for p in m.model_params})
    if "lambda" in names:
        norm = names.get("normalize")
        axes["lambda"] = LAMBDA_MEAN if norm is not None and norm.default is True else LAMBDA_SUM
    user = {k: v for k, v in (grids or {}).items() if "." not in k}
    user.update({k.split(".", 1)[1]: v for k, v in (grids or {}).items() if k.startswith(name + ".")})
    for key, values in list(GRIDS.items()) + [(k, v) for k, v in user.items() if k not in GRIDS]:
        given = key in user
        values = user.get(key, values)
        if key not in names:
            continue
        p = names[key]
        ok = []
        for v in values:
            try:
                p.check(v, name)
                ok.append(v)
            except MergeLabError:
                if given:
                    raise MergeLabError(f"--grid {key}: {v!r} is not a valid '{key}' for method '{name}': expected "
                                        f"{p.allowed()} (a key '{name}.{key}' sets {name}'s values alone)") from None
        if ok:
            axes[key] = tuple(ok)
    for key in axes:  # the default run states its coefficients (the registry's defaults) explicitly
        if key not in default and not names[key].required and names[key].default is not None:
            default[key] = names[key].default
    if name in UNTUNED:
        return MethodPlan(name, default=default, grid=[default], reason=UNTUNED[name], statistic=statistic)
    size = math.prod(len(v) for v in axes.values())
    if size > MAX_GRID:
        sizes = " x ".join(f"{len(v)} {k}" for k, v in axes.items())
        raise MergeLabError(f"--grid: method '{name}' would search {size} settings ({sizes}), more than "
                            f"{MAX_GRID}; give fewer values, or per-method values with '{name}.<parameter>'")
    grid = []
    for combo in itertools.product(*axes.values()):
        setting = dict(default)
        setting.update(dict(zip(axes.keys(), combo)))
        grid.append(setting)
    return MethodPlan(name, default=default, grid=grid, statistic=statistic)


def check_grid_keys(grids: Optional[dict], methods: Sequence[str]) -> None:
    """Every ``--grid`` key must name a parameter of a method in the run (``<method>.<parameter>``: that
    method's), so that a misspelt key is an error rather than a search that silently never happens."""
    from mergelab.methods.registry import get_method

    def has(method: str, key: str) -> bool:
        m = get_method(method)
        return m.param(key) is not None or m.model_param(key) is not None

    for key in grids or {}:
        method, dot, param = key.partition(".")
        if dot:
            if method not in methods:
                raise MergeLabError(f"--grid {key}: method '{method}' is not in this run ({', '.join(methods)})")
            if not has(method, param):
                raise MergeLabError(f"--grid {key}: method '{method}' has no parameter '{param}'")
        elif not any(has(m, key) for m in methods):
            raise MergeLabError(f"--grid {key}: no method in this run ({', '.join(methods)}) has a parameter '{key}'")


class BenchRunner:
    """Holds the prepared models of a suite and evaluates merges of them."""

    def __init__(self, suite: Suite, cache: BenchCache, merge_tasks: Sequence[str], held_out: Sequence[str],
                 base: str = "minilm-l6", seed: int = 0, log: Callable[[str], None] = print,
                 save_dir: Optional[Path] = None, lora_rank: int = 0):
        self.suite, self.cache, self.log, self.seed, self.save_dir = suite, cache, log, seed, save_dir
        self.merge_tasks, self.held_out = list(merge_tasks), list(held_out)
        self.lora_rank = int(lora_rank)
        path = base_model_path(base)
        self.base_path = path
        self.config, self.tokenizer = load_config(path), load_tokenizer(path)
        # tensors keep their checkpoint names (``bert.`` prefix) so calibration statistics match them
        self.base = _prefixed(float_state(split_state(read_state(path))[0]))
        self.evaluator = Evaluator(suite, self.config, self.tokenizer)
        self.experts, self.heads, self.expert_info = [], {}, {}
        for t in self.merge_tasks:
            enc, head, info = cache.lora_expert(t, self.lora_rank, path) if self.lora_rank else cache.expert(t)
            self.experts.append(_prefixed(float_state(enc)))
            self.heads[t] = head
            self.expert_info[t] = info
        self.expert_correct = {t: self.expert_info[t]["tasks"][t]["test_correct"] for t in self.merge_tasks}
        self._statistics: dict = {}
        self._aux: dict = {}

    def _loaded(self, paths: Sequence[str]) -> list:
        from safetensors.torch import load_file

        key = tuple(paths)
        if key not in self._aux:
            self._aux = {key: [load_file(p) for p in paths]}  # keep one method's statistics in memory
        return self._aux[key]

    # -- calibration: one procedure; the hooks below say what differs between suites
    calibration_max_length = MAX_LENGTH  # tokens per calibration example

    def calibration_dirs(self, task: str) -> tuple:
        """``(model, calibration folder)`` of ``task``'s expert: the Hugging Face folder (a LoRA expert:
        ``BASE+ADAPTER``) ``mergelab.calibrate`` runs, and where its statistics are cached (beside the expert)."""
        if self.lora_rank:
            d = self.cache.lora_expert_dir(task, self.lora_rank)
            return f"{self.base_path}+{d}", d / "calibration"
        return self.cache.expert_dir(task), self.cache.expert_dir(task) / "calibration"

    def calibration_model(self, task: str):
        """The :class:`~mergelab.calibrate.model.CalibrationModel` of ``task``'s expert when it is not a
        Hugging Face folder (None: ``mergelab.calibrate`` loads :meth:`calibration_dirs`' model). A LoRA
        expert's head is kept beside its adapter, so its classifier (the base + ``s * B A`` under ``bert.``
        names, and the head) is built here; the statistics carry the names of the merged tensors."""
        if not self.lora_rank:
            return None
        from transformers import BertForSequenceClassification

        from mergelab.calibrate.model import wrap_module

        head = self.heads[task]
        cfg = self.config.__class__.from_dict(self.config.to_dict())
        cfg.num_labels = head["weight"].shape[0]
        module = BertForSequenceClassification(cfg)
        state = dict(self.experts[self.merge_tasks.index(task)])
        state["classifier.weight"], state["classifier.bias"] = head["weight"], head["bias"]
        missing, unexpected = module.load_state_dict(state, strict=False)
        if [k for k in missing if not k.endswith("position_ids")] or unexpected:
            raise MergeLabError(f"LoRA expert '{task}': its tensors do not fit a BertForSequenceClassification "
                                f"(missing {missing[:3]}, unexpected {unexpected[:3]})")
        return wrap_module(module, "classifier", checkpoint_names=list(self.experts[0]))

    def calibration_data(self, task: str):
        """The :class:`~mergelab.calibrate.CalibrationSet` of ``task``'s expert: a seeded sample of
        :data:`CALIBRATION_EXAMPLES` examples of the task's **train** split, with their labels."""
        from mergelab.calibrate import task_texts

        return task_texts(self.suite.task(task), "train", CALIBRATION_EXAMPLES, self.seed, suite=self.suite.name)

    def statistics(self, stat: str) -> tuple:
        """``(paths, info)``: per-expert calibration files for ``stat`` (``mergelab.calibrate`` on each
        expert over :meth:`calibration_data`, the empirical Fisher scoring the true labels), computed
        once and cached in each expert's :meth:`calibration_dirs` folder; ``info`` goes in the report."""
        if stat in self._statistics:
            return self._statistics[stat]
        from mergelab.calibrate import calibrate

        paths, seconds = [], 0.0
        for t in self.merge_tasks:
            model, folder = self.calibration_dirs(t)
            path = folder / f"{stat}.safetensors"
            if not path.is_file():
                t0 = time.perf_counter()
                calibrate(model, self.calibration_data(t), folder, [stat], max_length=self.calibration_max_length,
                          fisher_mode=FISHER_MODE, seed=self.seed, model=self.calibration_model(t))
                seconds += time.perf_counter() - t0
                self.log(f"calibrated {stat} of expert {t} in {time.perf_counter() - t0:.1f} s")
            paths.append(str(path))
        info = {"statistic": stat, "split": "train", "examples_per_task": CALIBRATION_EXAMPLES,
                "seconds_this_run": round(seconds, 1)}
        if stat == "fisher":
            info["fisher_mode"] = FISHER_MODE
        self._statistics[stat] = (paths, info)
        return self._statistics[stat]

    # -- references
    def references(self) -> list:
        rows = []
        heads, info = self.cache.pretrained_heads()
        pre = {t: info["tasks"][t]["test_correct"] for t in self.merge_tasks}
        rows.append(self._row("pretrained", "reference", pre,
                              {t: info["tasks"][t]["test_accuracy"] for t in self.held_out},
                              note="linear probe per task on the frozen base encoder"))
        if self.lora_rank:
            rows.append(self._row("individual", "reference", dict(self.expert_correct), None,
                                  note=f"each task's own LoRA expert (rank {self.lora_rank}, the adapter on the base)"))
            full = {t: self.cache.info(self.cache.expert_dir(t))["tasks"][t]["test_correct"] for t in self.merge_tasks}
            rows.append(self._row("individual (full fine-tunes)", "reference", full, None,
                                  note="each task's own fully fine-tuned expert (the suite's default experts)"))
        else:
            rows.append(self._row("individual", "reference", dict(self.expert_correct), None,
                                  note="each task's own fine-tuned expert"))
        try:
            enc, mt_heads, mt_info = self.cache.multitask()
        except MergeLabError as e:
            rows.append({"name": "multi-task training", "kind": "reference", "status": "missing", "reason": str(e)})
            return rows
        missing = [t for t in self.merge_tasks if t not in mt_info["tasks"]]
        if missing:
            rows.append({"name": "multi-task training", "kind": "reference", "status": "missing",
                         "reason": f"the multi-task model was trained without {missing}"})
            return rows
        correct = {t: mt_info["tasks"][t]["test_correct"] for t in self.merge_tasks}
        held = self.evaluator.held_out(self.evaluator.encoder(enc), self.held_out) if self.held_out else None
        rows.append(self._row("multi-task training", "reference", correct, held,
                              note=f"one encoder trained on {', '.join(mt_info['tasks'])} together"))
        return rows

    def _row(self, name, kind, correct, held, **extra) -> dict:
        row = {"name": name, "kind": kind, "status": "ok", **extra}
        row["metrics"] = summarise(correct, self.merge_tasks, self.expert_correct, held)
        row["correct"] = correct
        return row

    # -- adapter merges (mergelab.bench.adapter_merges)
    @property
    def adapter_base(self) -> Path:
        return self.base_path

    def adapter_paths(self) -> list:
        return [self.cache.lora_expert_dir(t, self.lora_rank) for t in self.merge_tasks]

    def adapter_state(self, folder: Path) -> dict:
        from mergelab.io.adapted import adapted_state

        return adapted_state(self.base_path, folder)

    # -- merges
    def merge(self, method: str, params: dict) -> tuple:
        """``(merged encoder, seconds, peak MiB)``."""
        fn = merge_fn()
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            params = dict(params)
            kwargs = {}
            if "statistics" in params:  # in memory, the core takes statistics as auxiliary state dicts
                kwargs["aux"] = {"statistics": self._loaded(params.pop("statistics"))}
            merged = fn(self.base, self.experts, method, params=params, seed=self.seed, **kwargs)
            seconds = time.perf_counter() - t0
        return _unprefixed(merged), seconds, mem.mib

    def validate(self, method: str, params: dict) -> float:
        merged, _, _ = self.merge(method, params)
        return self.evaluator.mean_accuracy(self.evaluator.encoder(merged), self.heads, self.merge_tasks, "validation")

    def evaluate_merged(self, merged: dict) -> dict:
        """Test-split evaluation of a merge: ``correct`` (task -> bits), ``held_out`` (task -> accuracy),
        ``seconds`` and optionally ``row_extra`` (more fields for the report row; a subclass's hook)."""
        return self.evaluator.evaluate(merged, self.heads, self.merge_tasks, self.held_out)

    def run_method(self, plan: MethodPlan, tune: bool = True) -> list:
        label = DISPLAY.get(plan.method, plan.method)
        if plan.default is None:
            self.log(f"{plan.method}: not applicable ({plan.reason})")
            return [{"name": label, "method": plan.method, "kind": "merge", "status": "not applicable",
                     "reason": plan.reason}]
        rows = []
        extra = {}
        if plan.statistic:
            try:
                paths, extra = self.statistics(plan.statistic)
            except MergeLabError as e:
                return [self._failed(label, plan.method, "default", e)]
            plan = MethodPlan(plan.method, dict(plan.default, statistics=paths),
                              [dict(g, statistics=paths) for g in plan.grid], plan.reason, plan.statistic)
            extra = {"calibration": extra}
        settings = [("default", plan.default, [])]
        if tune and plan.grid and plan.grid != [plan.default]:
            search = []
            try:
                for params in plan.grid:
                    t0 = time.perf_counter()
                    score = self.validate(plan.method, params)
                    search.append({"params": _public(params), "validation_mean_accuracy": score})
                    self.log(f"{plan.method} {_fmt(params)}: validation {score:.4f} ({time.perf_counter() - t0:.1f} s)")
            except MergeLabError as e:
                return [self._failed(label, plan.method, "tuned", e)]
            best = max(range(len(search)), key=lambda i: (search[i]["validation_mean_accuracy"], -i))
            settings.append(("tuned", plan.grid[best], search))
        for variant, params, search in settings:
            try:
                merged, seconds, mib = self.merge(plan.method, params)
            except MergeLabError as e:
                rows.append(self._failed(label, plan.method, variant, e))
                continue
            ev = self.evaluate_merged(merged)
            if self.save_dir is not None:
                self._save(merged, f"{plan.method}-{variant}")
            row = self._row(f"{label} ({variant})", "merge", ev["correct"], ev.get("held_out"),
                            method=plan.method, variant=variant, params=_public(params),
                            merge_seconds=round(seconds, 3), merge_peak_mib=round(mib, 1),
                            eval_seconds=ev["seconds"], **extra, **ev.get("row_extra", {}))
            if plan.reason:
                row["note"] = plan.reason
            if search:
                row["search"] = search
                row["selected_by"] = "best mean accuracy on the validation splits of the merged tasks"
            rows.append(row)
            m = row["metrics"]
            self.log(f"{row['name']} {_fmt(params)}: test mean accuracy {m['mean_accuracy']:.4f}, "
                     f"normalised {_num(m['mean_normalised_accuracy'])}, merge {seconds:.1f} s / {mib:.0f} MiB, "
                     f"evaluation {ev['seconds']:.1f} s")
        return rows

    def _save(self, encoder: dict, name: str) -> None:
        """Write a merged encoder as a Hugging Face BertModel folder (``mergelab evaluate`` reads it)."""
        from mergelab.bench.cache import BenchCache, save_encoder

        folder = Path(self.save_dir) / name
        tmp = BenchCache.begin(folder)
        save_encoder(tmp, self.config, self.tokenizer, encoder)
        BenchCache.commit(tmp, folder)

    def _failed(self, label, method, variant, error) -> dict:
        self.log(f"{method} ({variant}) failed: {error}")
        return {"name": f"{label} ({variant})", "method": method, "variant": variant, "kind": "merge",
                "status": "failed", "reason": str(error)}


def _prefixed(state: dict) -> dict:
    return {ENCODER_PREFIX + k: v for k, v in state.items()}


def _unprefixed(state: dict) -> dict:
    return {k[len(ENCODER_PREFIX):] if k.startswith(ENCODER_PREFIX) else k: v for k, v in state.items()}


def _public(params: dict) -> dict:
    """Parameters as reported: a per-model list of equal values is shown as one value; statistics
    file lists are left out (the row's ``calibration`` entry says what they are)."""
    out = {}
    for k, v in params.items():
        if k == "statistics":
            continue
        if isinstance(v, list) and v and all(x == v[0] for x in v):
            v = v[0]
        out[k] = v
    return out


def _num(x) -> str:
    return "n/a" if x is None else f"{x:.4f}"


def _fmt(params: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in _public(params).items() if k != "weight")


def resolve_methods(spec: Sequence[str]) -> list:
    """Method names from ``--methods`` values (comma lists allowed; ``all`` = every registered one)."""
    from mergelab.methods.registry import available_methods, get_method

    names = []
    for item in spec:
        for name in (x.strip() for x in item.split(",")):
            if not name:
                continue
            if name == "all":
                names.extend(available_methods())
            else:
                names.append(get_method(name).name)
    seen = set()
    return [n for n in names if not (n in seen or seen.add(n))]


def run_bench(suite: Suite, cache: BenchCache, methods: Sequence[str], out: Path, base: str = "minilm-l6",
              merge_tasks: Optional[Sequence[str]] = None, held_out: Optional[Sequence[str]] = None,
              tune: bool = True, seed: int = 0, command: str = "", log: Callable[[str], None] = print,
              save_models: bool = False, grids: Optional[dict] = None, lora_rank: int = 0,
              adapter_merges: bool = False) -> dict:
    """Run the suite for ``methods`` and write ``report.json``, ``report.md`` and PNG charts to ``out``.

    With ``save_models`` every evaluated merge is also written to ``out/models/<method>-<variant>/``.
    With ``lora_rank`` the LoRA experts of that rank are merged, and ``adapter_merges`` adds the rows of
    merges that stay adapters (see the module doc).
    """
    from mergelab import __version__

    held = list(suite.held_out if held_out is None else held_out)
    tasks = list(merge_tasks) if merge_tasks else [t for t in suite.task_names if t not in held]
    overlap = sorted(set(tasks) & set(held))
    if overlap:
        raise MergeLabError(f"tasks {overlap} are both merged and held out")
    if len(tasks) < 2:
        raise MergeLabError(f"a merge needs at least 2 tasks; got {tasks}")
    if adapter_merges and not lora_rank:
        raise MergeLabError("adapter merges need the LoRA experts: give --lora-rank R")
    check_grid_keys(grids, methods)
    plans = [plan_method(name, len(tasks), grids) for name in methods]  # grid errors before any work
    start = time.perf_counter()
    runner = BenchRunner(suite, cache, tasks, held, base, seed, log, Path(out) / "models" if save_models else None,
                         lora_rank=lora_rank)
    rows = runner.references()
    report = {
        "suite": suite.name, "suite_fingerprint": suite.fingerprint(), "suite_source": suite.source,
        "base_model": base, "cache": str(cache.dir), "merge_tasks": tasks, "held_out": held,
        "test_sizes": {t: len(suite.task(t).split("test")) for t in tasks},
        "methods": list(methods), "tuned": tune, "grids": grids or {}, "seed": seed, "mergelab_version": __version__,
        "command": command, "seconds": 0.0,
        "protocol": ("encoders merged, each task keeps its own expert's head; coefficients chosen on the "
                     "validation splits only; metrics on the test splits; held-out tasks scored by a "
                     "linear probe refitted on the merged encoder"),
        "rows": rows, "complete": False,
    }
    if lora_rank:
        report["lora_rank"] = lora_rank
        report["lora_cache"] = str(cache.lora_dir(lora_rank))
    run_methods(runner, plans, methods, report, out, tune, start, last=not adapter_merges)
    if adapter_merges:
        from mergelab.bench.adapter_merges import append_adapter_merges

        append_adapter_merges(runner, report, out, lora_rank, start, log)
    return report


def run_methods(runner, plans: Sequence[MethodPlan], methods: Sequence[str], report: dict, out: Path, tune: bool,
                start: float, last: bool = True) -> None:
    """Run each method's ``plan`` with ``runner`` (a :class:`BenchRunner` or one of its kind), appending its
    rows to ``report["rows"]``; ``report.json``, ``report.md`` and the charts in ``out`` are rewritten after
    every method (``seconds`` since ``start``, ``complete`` once the last has run, unless ``last`` is
    False because the caller adds rows after these), so an interrupted run keeps what it measured."""
    from mergelab.evaluate.report import write_report

    for name, plan in zip(methods, plans):
        report["rows"].extend(runner.run_method(plan, tune))
        report["seconds"] = round(time.perf_counter() - start, 1)
        report["complete"] = last and name == methods[-1]
        write_report(report, Path(out))

