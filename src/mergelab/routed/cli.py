"""``mergelab routed``: routed / per-task models (EMR-Merging, Twin-Merging, WEMoE) and their benchmark."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mergelab.bench.cli import split_names
from mergelab.errors import CheckpointError, MergeLabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Routed / per-task models: EMR-Merging, Twin-Merging, WEMoE.")


@app.command()
def bench(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name (textmix, llmmix), suite folder or YAML."),
    methods: str = typer.Option("emr,twin,wemoe,wemoe_tta", "--methods", "-m",
                                help="Comma-separated: emr, twin, wemoe, wemoe_tta (test-time adaptation)."),
    out: Path = typer.Option(Path("bench-out/routed"), "--out", help="Report and models/<method>/ folders."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `mergelab bench prepare`."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model the experts were trained from (not llmmix: "
                                                          "its prepare.json names the base)."),
    size: str = typer.Option("3m", "--size", help="llmmix: the base size whose experts are used (experts-SIZE)."),
    eval_limit: Optional[int] = typer.Option(100, "--eval-limit",
                                             help="llmmix: first N test examples per task (0: all)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Merge only these tasks (comma-separated)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out tasks (default: the suite's)."),
    references: bool = typer.Option(True, "--references/--no-references", help="Also report the reference rows."),
    emr_reduction: str = typer.Option("tensor_mean", "--emr-reduction", help="tensor_mean (code) or element_sum (paper)."),
    twin_density: float = typer.Option(0.1, "--twin-density", help="Rank kept per matrix, as a fraction of full rank."),
    twin_rank: Optional[int] = typer.Option(None, "--twin-rank", help="Fixed rank per matrix (instead of --twin-density)."),
    twin_ranks: Optional[str] = typer.Option(None, "--twin-ranks",
                                             help="A rank sweep: one Twin row per rank (comma-separated, e.g. "
                                                  "12,32,64), with twin_ranks.md and twin_ranks.png."),
    twin_method: str = typer.Option("task_arithmetic", "--twin-method",
                                    help="Registered merge method of the shared model (Twin-Merging's theta_s)."),
    twin_lambda: float = typer.Option(0.3, "--twin-lambda",
                                      help="lambda of the shared model's method (if the method takes one)."),
    wemoe_steps: int = typer.Option(200, "--wemoe-steps"),
    wemoe_lr: float = typer.Option(1e-3, "--wemoe-lr"),
    wemoe_examples: int = typer.Option(64, "--wemoe-examples", help="Unlabelled inputs per task."),
    wemoe_batch: int = typer.Option(16, "--wemoe-batch", help="Inputs per task in each router step (reference 16)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Build, save, reload and evaluate the routed methods on a prepared suite (rows as `bench run`'s)."""
    from mergelab.bench.cache import BenchCache
    from mergelab.evaluate.tasks import load_suite
    from mergelab.routed.bench import METHODS, RoutedSettings, run_routed_bench

    names = split_names(methods) or []
    bad = [m for m in names if m not in METHODS]
    if bad or not names:
        raise MergeLabError(f"--methods: unknown routed method(s) {bad}; known: {', '.join(METHODS)}" if bad
                            else f"--methods is empty; known: {', '.join(METHODS)}")
    if emr_reduction not in ("tensor_mean", "element_sum"):
        raise MergeLabError(f"--emr-reduction must be tensor_mean or element_sum, got '{emr_reduction}'")
    if not 0 < twin_density <= 1:
        raise MergeLabError(f"--twin-density must be in (0, 1], got {twin_density}")
    if twin_rank is not None and twin_rank < 1:
        raise MergeLabError(f"--twin-rank must be >= 1, got {twin_rank}")
    ranks = []
    for r in split_names(twin_ranks) or []:
        try:
            ranks.append(int(r))
        except ValueError:
            raise MergeLabError(f"--twin-ranks: '{r}' is not an integer") from None
    if any(r < 1 for r in ranks) or len(set(ranks)) != len(ranks):
        raise MergeLabError(f"--twin-ranks must be distinct integers >= 1, got {twin_ranks}")
    if ranks and twin_rank is not None:
        raise MergeLabError("--twin-rank and --twin-ranks: give one of them")
    if "twin" in names:
        from mergelab.methods.registry import get_method

        get_method(twin_method)  # an unknown name: an error naming it (with the closest), before any work
    if wemoe_steps < 0 or wemoe_examples < 1 or wemoe_batch < 1 or not wemoe_lr > 0:
        raise MergeLabError("--wemoe-steps must be >= 0, --wemoe-examples and --wemoe-batch >= 1 and --wemoe-lr > 0")
    settings = RoutedSettings(emr_reduction=emr_reduction, twin_density=twin_density, twin_rank=twin_rank,
                              twin_ranks=tuple(ranks), twin_method=twin_method, twin_lambda=twin_lambda, wemoe_steps=wemoe_steps,
                              wemoe_lr=wemoe_lr, wemoe_examples=wemoe_examples, wemoe_batch=wemoe_batch, threads=threads)
    if suite == "llmmix":
        from mergelab.routed.bench import run_routed_llmmix

        if held_out:
            raise MergeLabError("--held-out: the llmmix routed bench scores merged tasks only")
        if eval_limit is not None and eval_limit < 0:
            raise MergeLabError(f"--eval-limit must be >= 0, got {eval_limit}")
        report = run_routed_llmmix(names, out, size, cache, split_names(tasks), eval_limit or None, seed, settings,
                                   references, log=typer.echo)
        typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'} ({report['seconds']:.0f} s)")
        return
    s = load_suite(suite)
    report = run_routed_bench(s, BenchCache(s, cache), names, out, base, split_names(tasks), split_names(held_out), seed,
                              settings, references, log=typer.echo)
    typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'} ({report['seconds']:.0f} s)")


@app.command()
def emr(
    base: Path = typer.Argument(..., help="Base model folder (Hugging Face, safetensors)."),
    experts: List[Path] = typer.Argument(..., help="Expert folders fine-tuned from BASE (same architecture)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (must not exist)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Task names, one per expert (default: folder names)."),
    rescale_reduction: str = typer.Option("tensor_mean", "--rescale-reduction",
                                          help="tensor_mean (the reference code) or element_sum (the paper)."),
) -> None:
    """EMR-Merging of EXPERTS over BASE into a routed folder (`mergelab.routed.load(OUT)` runs it per task)."""
    from mergelab.evaluate.model import load_config, read_state
    from mergelab.routed.emr import emr_merge, save_emr

    if out.exists():
        raise MergeLabError(f"output folder '{out}' exists; remove it or choose another")
    names = split_names(tasks) or [p.name for p in experts]
    if len(names) != len(experts):
        raise MergeLabError(f"--tasks gives {len(names)} names for {len(experts)} experts")
    for p in [base, *experts]:
        if not (p / "config.json").is_file():
            raise CheckpointError(f"'{p}': expected a local Hugging Face folder with config.json")
    config = load_config(base)
    for p in experts:
        other = load_config(p)
        if getattr(other, "model_type", None) != getattr(config, "model_type", None):
            raise CheckpointError(f"expert '{p}' is a {other.model_type!r} model, the base a {config.model_type!r}")
    arch = (getattr(config, "architectures", None) or [""])[0]
    model_class = ("AutoModelForCausalLM" if arch.endswith("ForCausalLM") else
                   "AutoModelForSequenceClassification" if arch.endswith("ForSequenceClassification") else "AutoModel")
    b = read_state(base)
    res = emr_merge(b, [read_state(p) for p in experts], names, rescale_reduction)
    save_emr(out, res, b, config, names, model_class=model_class)
    typer.echo(f"wrote {out}: {len(names)} tasks, rescalers "
               + ", ".join(f"{t}={r:.3f}" for t, r in zip(names, res.rescalers)))
