"""``mergelab evolve``, ``map`` and ``m2n2``: the merge-search commands (see :mod:`mergelab.search`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

RAY_HELP = ("Evaluate on Ray: 'auto' joins the cluster running here, HOST:PORT or ray://HOST:PORT a remote one. "
            "Without it, --workers N > 1 starts a local Ray with N CPUs.")


def _log(line: str) -> None:
    from mergelab.cli import err_console

    err_console.print(escape(line), highlight=False, soft_wrap=True)


def evolve(
    config: Path = typer.Argument(..., help="Search config: genome: (mergekit-evolve's format), fitness:, search:."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for best_recipe.yaml, history.json/.png, state.pkl."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Candidates evaluated at once (Ray actors)."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    threads: int = typer.Option(1, "--threads", help="torch threads per evaluator (fixed, so results do not depend "
                                "on the number of workers)."),
    max_evals: Optional[int] = typer.Option(None, "--max-evals", help="Evaluation budget (overrides search.max_evals)."),
    strategy: Optional[str] = typer.Option(None, "--strategy", help="cma (CMA-ES, default) or random (uniform "
                                           "random search over the genome's ranges; overrides search.strategy)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the search whose state is in OUT."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """Evolve merge coefficients with CMA-ES (mergekit-evolve's genome), or random search, merging every
    candidate in memory."""
    from mergelab.cli import out_console
    from mergelab.search.evolve import evolve as run

    hist = run(config, out, workers=workers, ray_address=ray, threads=threads, resume=resume, overwrite=overwrite,
               max_evals=max_evals, log=(lambda s: None) if quiet else _log, strategy=strategy)
    best = hist["best"]
    if not quiet:
        if best is None:
            out_console.print(f"no candidate could be merged and scored; see {out}/history.json")
        else:
            out_console.print(f"best fitness {best['fitness']:.4f} after {len(hist['evaluations'])} evaluations "
                              f"(evaluation {best['eval']}); recipe: {out}/best_recipe.yaml", highlight=False)


def map_front(
    config: Path = typer.Argument(..., help="Search config whose genome has one gene (weight) per model."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for samples.json, front.json/.png, recipe-K.yaml."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Candidates evaluated at once (Ray actors)."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    threads: int = typer.Option(1, "--threads", help="torch threads per evaluator."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """MAP: quadratic surrogates per task, their Pareto front (NSGA-II), recipes for chosen trade-offs."""
    from mergelab.cli import out_console
    from mergelab.search.map import run_map

    res = run_map(config, out, workers=workers, ray_address=ray, threads=threads, overwrite=overwrite,
                  log=(lambda s: None) if quiet else _log)
    if not quiet:
        e = res["surrogate_error_at_chosen"]
        out_console.print(f"front of {len(res['front']['points'])} points from {res['sample_points']} sampled merges; "
                          f"{len(res['chosen'])} chosen recipes in {out} (surrogate |error| mean {e['mean_abs']:.4g}, "
                          f"max {e['max_abs']:.4g})", highlight=False)


def m2n2(
    config: Path = typer.Argument(..., help="Search config: genome.models are the starting archive; fitness:; "
                                  "search: steps, batch_size (children per round), alpha, seed, ..."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for history.json/.png, state.pkl and best/."),
    workers: Optional[int] = typer.Option(None, "--workers", "-w", help="Children evaluated at once (Ray actors; "
                                          "useful up to search.batch_size)."),
    ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP),
    threads: int = typer.Option(1, "--threads", help="torch threads per evaluator (fixed, so results do not depend "
                                "on the number of workers)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Children to make (overrides search.steps; with "
                                        "--resume, a larger number continues a finished run)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run whose state is in OUT."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a non-empty OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines."),
) -> None:
    """M2N2: an archive evolved by SLERP crossover at a split point, fitness sharing and attraction."""
    from mergelab.cli import out_console
    from mergelab.search.m2n2 import run_m2n2

    hist = run_m2n2(config, out, workers=workers, ray_address=ray, threads=threads, steps=steps, resume=resume,
                    overwrite=overwrite, log=(lambda s: None) if quiet else _log)
    if not quiet:
        b = hist["best"]
        out_console.print(f"best archive member (by {b['by']}): pooled mean score {b['mean_score']:.4f}, mean over "
                          f"tasks {b['task_mean']:.4f}; model in {out}/best", highlight=False)


COMMANDS = (("evolve", evolve), ("map", map_front), ("m2n2", m2n2))


def register(app: typer.Typer) -> None:
    """Mount the commands on the top-level ``mergelab`` app."""
    for name, fn in COMMANDS:
        app.command(name=name)(fn)
