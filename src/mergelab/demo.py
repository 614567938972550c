"""``mergelab demo``: merge language-model experts that have real skills, and measure what each merge keeps.

1. **Base**: the ``llmmix`` base of ``size`` (``3m``) shipped inside the package, so that every machine
   starts from the same weights (``base_dir`` / ``--base`` picks another; a size that does not ship
   falls back to the cache's, :func:`mergelab.llmmix.pretrain.find_base`).
2. **Experts**: one short full fine-tune of the base per demo task (``bench prepare --suite llmmix``'s
   machinery, :func:`mergelab.llmmix.prepare.prepare`, without the multi-task model), kept in the demo
   cache (``--cache``, else ``$MERGELAB_CACHE/demo``, else ``~/.cache/mergelab/demo``), so a second run
   skips the training.
3. **Merges**: one mergekit-style recipe per method (task arithmetic, TIES, TSV-M) written to
   ``WORKDIR/recipes/`` and run by :func:`mergelab.merge.merge`, the function behind
   ``mergelab merge RECIPE -o OUT``; each merged folder is then loaded with
   ``transformers.AutoModelForCausalLM``.
4. **Measure**: greedy exact-match accuracy of the base, every expert and every merge on the first
   ``test_examples`` *test* examples of each task (never seen in fine-tuning;
   :mod:`mergelab.llmmix.generate`), printed as a table with a few answers side by side, and written
   to ``WORKDIR/demo.json``.

The merge coefficients are fixed (no tuning): ``bench run --suite llmmix`` is where coefficients are
chosen on validation data and every method is compared. The older demo that merges synthetic experts
and reports cosines is :mod:`mergelab.demo_synthetic` (``mergelab demo --synthetic``).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

from mergelab.errors import MergeLabError

# (method, label, global parameters, per-model parameters). TIES and TSV-M: the registry defaults (TIES's
# density, which mergekit requires, at 0.5, the common choice in its examples). Task arithmetic: lambda
# 0.7; on 40 validation examples per task of the default experts (from the first 3m base) 0.5 and 0.7
# tie (mean 42.5%) and 1.0 gets 23.5% (it adds both task vectors in full; docs/llmmix.md).
METHODS = (
    ("task_arithmetic", "task arithmetic", {"lambda": 0.7}, {"weight": 1.0}),
    ("ties", "TIES", {"lambda": 1.0}, {"weight": 1.0, "density": 0.5}),
    ("tsv", "TSV-M", {"lambda": 1.0}, {}),
)


@dataclass(frozen=True)
class DemoConfig:
    """What the demo trains, merges and measures (the defaults take a few minutes on 2 CPU cores)."""

    tasks: tuple = ("language_id", "refusal")
    size: str = "3m"
    steps: int = 100
    lr: float = 1e-3
    batch_size: int = 16
    train_examples: int = 2000
    test_examples: int = 40
    eval_limit: int = 16  # validation examples scored after each fine-tune (recorded in prepare.json)
    methods: tuple = tuple(m[0] for m in METHODS)
    seed: int = 0
    threads: Optional[int] = None  # torch CPU threads (None: torch's default)
    # no replay: 100 steps at 1e-3 keep the base's language model, and on an empty cache replay would first
    # rebuild the pretraining corpus (about a minute)
    replay_batch: int = 0
    answers: int = 3  # test examples shown side by side

    def sizes(self) -> dict:
        return {"train": self.train_examples, "validation": max(self.eval_limit, 1), "test": self.test_examples}


@dataclass
class DemoResult:
    base: Path
    base_source: str
    experts: dict  # task -> expert folder
    merges: dict  # method -> merged folder
    accuracy: dict  # model label -> {task: test accuracy}
    answers: list  # [{"task", "prompt", "answer", "predictions": {label: prediction}}]
    seconds: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        d = asdict(self)
        d.update(base=str(self.base), experts={k: str(v) for k, v in self.experts.items()},
                 merges={k: str(v) for k, v in self.merges.items()})
        return d


def default_cache() -> Path:
    env = os.environ.get("MERGELAB_CACHE")
    return (Path(env) if env else Path.home() / ".cache" / "mergelab") / "demo"


def _method(name: str) -> tuple:
    for m in METHODS:
        if m[0] == name:
            return m
    raise MergeLabError(f"demo: unknown method {name!r} (choose from {', '.join(m[0] for m in METHODS)})")


def write_recipe(method: str, base: Path, experts: list, path: Path) -> Path:
    """The recipe a user would write to merge ``experts`` onto ``base`` with ``method`` (float32)."""
    import yaml

    name, _, params, model_params = _method(method)
    recipe = {"merge_method": name, "base_model": str(base), "parameters": dict(params),
              "models": [{"model": str(e), **({"parameters": dict(model_params)} if model_params else {})}
                         for e in experts],
              "dtype": "float32"}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False), encoding="utf-8")
    return path


def run_demo(workdir: Path = Path("mergelab-demo"), cache: Optional[Path] = None, cfg: DemoConfig = DemoConfig(),
             base_dir: Optional[Path] = None, console=None, progress: bool = True) -> DemoResult:
    """Fine-tune (or reuse) the experts, merge them with each method, measure everything; see the module doc.

    ``base_dir`` replaces the shipped base (tests use a tiny one)."""
    import torch
    from rich.console import Console
    from rich.markup import escape

    from mergelab.llmmix.finetune import FinetuneConfig
    from mergelab.llmmix.generate import evaluate_task, load_causal_lm
    from mergelab.llmmix.prepare import prepare
    from mergelab.llmmix.pretrain import base_source, find_base, shipped_base
    from mergelab.llmmix.tasks import build_task, get_spec
    from mergelab.merge import merge

    console = console or Console()
    t_start = time.perf_counter()
    workdir, cache = Path(workdir), Path(cache) if cache else default_cache()
    if len(cfg.tasks) < 2:
        raise MergeLabError(f"demo: a merge needs at least 2 tasks, got {list(cfg.tasks)}")
    held = [n for n in cfg.tasks if get_spec(n).held_out]
    if held:
        raise MergeLabError(f"demo: {', '.join(held)} held out (no expert may be trained on a held-out task)")
    for m in cfg.methods:
        _method(m)
    _quiet_transformers()
    saved_threads = torch.get_num_threads()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)

    def log(msg: str) -> None:
        console.print(msg, markup=False, highlight=False)

    try:
        if base_dir is not None:
            base, source = Path(base_dir), base_source(Path(base_dir))
        elif shipped_base(cfg.size) is not None:
            base, source = shipped_base(cfg.size), "shipped"
        else:
            base, source = find_base(cfg.size)
        where = {"shipped": "shipped inside mergelab", "cache": "from the llmmix cache"}.get(source, "given")
        console.print(f"[bold]1. base[/bold]  {escape(str(base))}  ({where})")

        # 2. experts
        console.print(f"[bold]2. experts[/bold]  one full fine-tune per task, {cfg.steps} steps of "
                      f"{cfg.batch_size} examples, cached in {escape(str(cache))}")
        t0 = time.perf_counter()
        ft = FinetuneConfig(steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=cfg.seed,
                            eval_limit=cfg.eval_limit, checkpoint_every=max(cfg.steps, 1), threads=cfg.threads,
                            replay_batch=cfg.replay_batch)
        prep = prepare(cfg.size, cache, ft, tasks=list(cfg.tasks), multitask=False, base_dir=base,
                       sizes=cfg.sizes(), task_seed=cfg.seed, rebuild=True, command="mergelab demo",
                       log=log, progress=progress)
        experts = {t: prep.folder / t / "final" for t in cfg.tasks}
        t_experts = time.perf_counter() - t0

        # 3. merges, through recipes
        t0 = time.perf_counter()
        merges = {}
        for m in cfg.methods:
            recipe = write_recipe(m, base, [experts[t] for t in cfg.tasks], workdir / "recipes" / f"{m}.yaml")
            out = workdir / f"merged-{m}"
            res = merge(recipe, out, overwrite=True)
            console.print(f"[bold]3. merge[/bold]  mergelab merge {escape(str(recipe))} -o {escape(str(out))}   "
                          f"({_method(m)[1]}, "
                          f"{res.seconds:.1f} s)")
            merges[m] = out
        t_merge = time.perf_counter() - t0

        # 4. measure every model on the test examples of every task
        t0 = time.perf_counter()
        tasks = [build_task(n, seed=cfg.seed, sizes=cfg.sizes()) for n in cfg.tasks]
        models = [("base", base)] + [(f"expert: {t}", experts[t]) for t in cfg.tasks] + \
                 [(_method(m)[1], merges[m]) for m in cfg.methods]
        accuracy, records = {}, {}
        for label, folder in models:
            model, tok = load_causal_lm(folder)  # AutoModelForCausalLM / AutoTokenizer
            evals = {t.name: evaluate_task(model, tok, t, "test", limit=cfg.test_examples, batch_size=64)
                     for t in tasks}
            accuracy[label] = {n: e.accuracy for n, e in evals.items()}
            records[label] = {n: e.records for n, e in evals.items()}
            del model
        t_eval = time.perf_counter() - t0
        answers = _pick_answers(tasks, records, cfg.answers)
        console.print(f"[bold]4. measure[/bold]  every model loaded with transformers, greedy answers to "
                      f"{cfg.test_examples} test examples per task (unseen in training)")
        console.print(accuracy_table(accuracy, list(cfg.tasks)))
        console.print(answers_table(answers, [label for label, _ in models]))
        seconds = {"experts": round(t_experts, 1), "merges": round(t_merge, 1), "evaluation": round(t_eval, 1),
                   "total": round(time.perf_counter() - t_start, 1)}
        result = DemoResult(base, source, experts, merges, accuracy, answers, seconds)
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "demo.json").write_text(json.dumps({"config": asdict(cfg), **result.to_json()}, indent=2,
                                                      ensure_ascii=False) + "\n", encoding="utf-8")
        console.print(_summary(accuracy, list(cfg.tasks), [_method(m)[1] for m in cfg.methods]), markup=False)
        console.print(f"done in {seconds['total']:.0f} s (experts {seconds['experts']:.0f} s"
                      f"{', reused from the cache' if not prep.trained else ''}, merges {seconds['merges']:.0f} s, "
                      f"evaluation {seconds['evaluation']:.0f} s); results in {escape(str(workdir / 'demo.json'))}. "
                      "Tuned coefficients and every method: mergelab bench run --suite llmmix (docs/llmmix.md).")
        return result
    finally:
        torch.set_num_threads(saved_threads)


def _quiet_transformers() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _pick_answers(tasks, records: dict, per_run: int) -> list:
    """``per_run`` test examples, taken round-robin over the tasks (first examples of each)."""
    out = []
    labels = list(records)
    for i in range(per_run):
        t = tasks[i % len(tasks)]
        k = i // len(tasks)
        recs = records[labels[0]][t.name]
        if k >= len(recs):
            continue
        out.append({"task": t.name, "prompt": recs[k]["prompt"], "answer": recs[k]["answer"],
                    "predictions": {lab: records[lab][t.name][k]["prediction"] for lab in labels},
                    "scores": {lab: records[lab][t.name][k]["score"] for lab in labels}})
    return out


def accuracy_table(accuracy: dict, tasks: list):
    from rich.table import Table

    table = Table(title="test accuracy (greedy, exact match)")
    table.add_column("model")
    for t in tasks:
        table.add_column(t, justify="right")
    table.add_column("mean", justify="right")
    for label, acc in accuracy.items():
        cells = []
        for t in tasks:
            cell = f"{100 * acc[t]:.0f}%"
            cells.append(f"[bold]{cell}[/bold]" if label == f"expert: {t}" else cell)
        table.add_row(label, *cells, f"{100 * sum(acc[t] for t in tasks) / len(tasks):.0f}%",
                      end_section=label == "base" or label == f"expert: {tasks[-1]}")
    return table


def answers_table(answers: list, labels: list):
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="a few answers side by side (✓ right, ✗ wrong)")
    table.add_column("model")
    for a in answers:
        table.add_column(escape(f"{a['task']}: {a['prompt']}"), overflow="fold")
    table.add_row("[italic]expected[/italic]", *[escape(a["answer"]) for a in answers], end_section=True)
    for lab in labels:
        table.add_row(lab, *[("✓ " if a["scores"][lab] >= 1 else "✗ ") + escape(a["predictions"][lab] or "''")
                             for a in answers])
    return table


def _summary(accuracy: dict, tasks: list, merge_labels: list) -> str:
    """One sentence per merge: the share of the experts' own accuracy it keeps, on average over the tasks."""
    expert = {t: accuracy[f"expert: {t}"][t] for t in tasks}
    base = {t: accuracy["base"][t] for t in tasks}
    lines = [f"Each expert: {sum(expert.values()) / len(tasks):.0%} on its own task on average "
             f"(the base: {sum(base.values()) / len(tasks):.0%})."]
    for lab in merge_labels:
        kept = [accuracy[lab][t] / expert[t] for t in tasks if expert[t] > 0]
        if kept:
            lines.append(f"{lab}: one model, {sum(accuracy[lab][t] for t in tasks) / len(tasks):.0%} on the "
                         f"{len(tasks)} tasks, {sum(kept) / len(kept):.0%} of the experts' accuracy.")
    return "\n".join(lines)
