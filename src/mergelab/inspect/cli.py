"""``mergelab inspect BASE MODEL...``: task-vector diagnostics before a merge.

A single-command Typer app; ``SINGLE_COMMAND`` tells the main CLI to mount it as the plain command
``mergelab inspect`` rather than a group. Bad input raises :class:`mergelab.errors.MergeLabError`,
which the main CLI prints without a traceback.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import List, Optional

import typer

SINGLE_COMMAND = True
WIDE = 400  # console width when the output is not a terminal (and COLUMNS is not set)

app = typer.Typer(
    name="inspect",
    add_completion=False,
    pretty_exceptions_enable=False,
    no_args_is_help=True,
)


@app.command(name="inspect")
def inspect_command(
    base: str = typer.Argument(..., help="Base model: a local folder (or .safetensors file) the task vectors are measured from."),
    models: List[str] = typer.Argument(..., help="Fine-tuned models of that base (same tensor names and shapes). Task vector: MODEL - BASE. Sign conflict: share of coordinates where one model's task-vector entry is > 0 and another model's is < 0 (zeros abstain)."),
    json_path: Optional[Path] = typer.Option(None, "--json", help="Write every number (per tensor, per layer, overall) as JSON to this file; '--json -' prints it instead of the tables."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Write a PNG: cosine-similarity heatmap, per-layer conflict rate and norms."),
    density: Optional[float] = typer.Option(None, "--density", min=0.0, max=1.0,
                                            help="Also count sign conflicts after a TIES trim keeping this share of each task vector per tensor (largest magnitudes, as TIES does at this density)."),
    rtol: float = typer.Option(1e-3, "--rtol", min=0.0, help="Near-zero tolerance: an entry is near zero when |tau| <= rtol * |base weight|."),
    skip_mismatched: bool = typer.Option(False, "--skip-mismatched", help="Leave out (and list) tensors missing from a model or with another shape, instead of failing."),
    chunk_elements: int = typer.Option(1 << 20, "--chunk-elements", min=1, help="Entries per model read at once (bounds memory)."),
    device: str = typer.Option("cpu", "--device", help="Compute device: cpu, cuda or cuda:N."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Print only the interpretation lines."),
) -> None:
    """Task-vector diagnostics: per-layer norms, sparsity, cosine similarity and sign conflicts.

    The task vector of MODEL is MODEL - BASE (float32). Sign conflict: the share of coordinates where
    at least one model's task-vector entry is > 0 and another model's is < 0 (exact zeros abstain).

    Near-zero: |tau| <= rtol * |base weight|. Cosine: <tau_i, tau_j> / (|tau_i| |tau_j|). Layers are
    transformer blocks; tensors outside them are grouped as "embeddings" or "other".
    """
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn

    from mergelab.inspect.report import print_report, to_json, write_json, write_plot
    from mergelab.inspect.scan import inspect_models

    if density is not None and density <= 0:
        raise typer.BadParameter("must be > 0", param_hint="--density")
    json_stdout = json_path is not None and str(json_path) == "-"
    out = Console()
    if not out.is_terminal and "COLUMNS" not in os.environ:
        out = Console(width=WIDE)  # a file or a pipe: whole tables, no wrapping at 80 columns
    show_progress = not quiet and sys.stderr.isatty()
    if show_progress:
        bar = Progress(TextColumn("inspecting"), BarColumn(), TextColumn("{task.description}"),
                       console=Console(stderr=True), transient=True)
        with bar:
            task = bar.add_task("", total=None)

            def tick(name: str, numel: int) -> None:
                bar.update(task, advance=1, description=name)

            diag = inspect_models(base, models, rtol=rtol, density=density, skip_mismatched=skip_mismatched,
                                  chunk_elements=chunk_elements, progress=tick, device=device)
    else:
        diag = inspect_models(base, models, rtol=rtol, density=density, skip_mismatched=skip_mismatched,
                              chunk_elements=chunk_elements, device=device)
    if json_stdout:
        sys.stdout.write(to_json(diag) + "\n")
    elif quiet:
        for line in diag.interpretation:
            out.print(line, highlight=False, markup=False)
    else:
        print_report(diag, out)
    if json_path is not None and not json_stdout:
        write_json(diag, json_path)
        if not quiet:
            out.print(f"wrote {json_path}", highlight=False)
    if plot is not None:
        write_plot(diag, plot)
        if not quiet and not json_stdout:
            out.print(f"wrote {plot}", highlight=False)
