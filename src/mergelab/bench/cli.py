"""``mergelab bench``: prepare a suite's experts and references, then run merge methods on them."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.errors import MergeLabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prepare experts and run the merge-quality benchmark suite.")

DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]


def _split(value: Optional[str]) -> Optional[list]:
    return None if value is None else [x for x in (v.strip() for v in value.split(",")) if x]


@app.command()
def prepare(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name, suite folder or suite YAML."),
    task: List[str] = typer.Option([], "--task", help="Add a task: NAME=PATH to a CSV/JSONL of (text, label)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Only these tasks (comma-separated)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default $MERGELAB_BENCH_CACHE "
                                          "or ~/.cache/mergelab/bench)."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model: minilm-l6 (PyPI package) or a local folder."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over each task's training split."),
    lr: float = typer.Option(2e-4, "--lr", help="Encoder learning rate (AdamW)."),
    head_lr: float = typer.Option(2e-3, "--head-lr", help="Head learning rate."),
    batch_size: int = typer.Option(32, "--batch-size"),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per example (longer texts are cut)."),
    seed: int = typer.Option(0, "--seed"),
    multitask: bool = typer.Option(True, "--multitask/--no-multitask", help="Also train the multi-task model."),
    multitask_epochs: Optional[float] = typer.Option(None, "--multitask-epochs", help="Passes over each task's "
                                                     "data for the multi-task model (default: --epochs)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Retrain units prepared with other settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Fine-tune one expert per task, linear probes on the frozen base, and a multi-task model (resumable)."""
    from mergelab.bench.cache import BenchCache
    from mergelab.bench.prepare import prepare as run_prepare
    from mergelab.bench.training import TrainConfig
    from mergelab.evaluate.tasks import load_suite

    s = load_suite(suite, task)
    cfg = TrainConfig(epochs=epochs, lr=lr, head_lr=head_lr, batch_size=batch_size, max_length=max_length, seed=seed)
    bench_cache = BenchCache(s, cache)
    result = run_prepare(s, bench_cache, cfg, base, _split(tasks), multitask, rebuild, progress, typer.echo,
                         multitask_epochs)
    typer.echo(f"prepared {s.name} in {result.cache_dir} ({result.seconds:.0f} s; trained "
               f"{len(result.trained)} unit(s), {len(result.skipped)} already there)")


@app.command()
def run(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name, suite folder or suite YAML."),
    methods: List[str] = typer.Option(DEFAULT_METHODS, "--methods", "-m",
                                      help="Methods (repeat or comma-separate); 'all' = every registered method."),
    out: Path = typer.Option(Path("bench-out/textmix"), "--out", help="Folder for report.json, report.md, PNGs."),
    task: List[str] = typer.Option([], "--task", help="Add a task: NAME=PATH to a CSV/JSONL of (text, label)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Merge only these tasks (comma-separated)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out tasks (comma-separated; "
                                           "default: the suite's; '' for none)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `bench prepare`."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model the experts were trained from."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Also search coefficients on validation data."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods (DARE)."),
    grid: List[str] = typer.Option([], "--grid", help="Coefficient values to search, e.g. "
                                   "--grid lambda=0.3,0.5 --grid density=0.2 (replaces the built-in values)."),
    save_models: bool = typer.Option(False, "--save-models", help="Also write each merged encoder to "
                                     "OUT/models/<method>-<variant>/ (about 90 MB each for MiniLM)."),
) -> None:
    """Merge the prepared experts with each method, evaluate every task, write the report and charts."""
    from mergelab.bench.cache import BenchCache
    from mergelab.bench.run import resolve_methods, run_bench
    from mergelab.evaluate.tasks import load_suite

    s = load_suite(suite, task)
    grids = {}
    for item in grid:
        key, sep, values = item.partition("=")
        try:
            grids[key.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise MergeLabError(f"--grid {item}: expected NAME=NUMBER,NUMBER,...") from None
        if not sep or not key.strip() or not grids[key.strip()]:
            raise MergeLabError(f"--grid {item}: expected NAME=NUMBER,NUMBER,...")
    names = resolve_methods(methods)
    if not names:
        raise MergeLabError("--methods: no method named")
    report = run_bench(s, BenchCache(s, cache), names, out, base, _split(tasks), _split(held_out), tune, seed,
                       command="mergelab bench run " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if
                       sys.argv[1:3] == ["bench", "run"] else "", log=typer.echo, save_models=save_models,
                       grids=grids)
    typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and charts ({report['seconds']:.0f} s)")
