"""``mergelab moe-compress MOE -o OUT --experts K --calibration FILE``: MC-SMoE (:mod:`mergelab.moe.mcsmoe`)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from mergelab.errors import MergeLabError

SINGLE_COMMAND = True
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_out = Console()
_err = Console(stderr=True)


@app.command()
def moe_compress(
    moe: Path = typer.Argument(..., help="A Mixtral MoE folder (e.g. written by `mergelab moe`)."),
    out: Path = typer.Option(None, "-o", "--out", help="Output folder (written as OUT.partial, renamed when done)."),
    experts: int = typer.Option(..., "--experts", "-k", help="Experts (groups) to keep per layer, 1..E."),
    calibration: Path = typer.Option(..., "--calibration", help="Calibration texts: a .jsonl file (field "
                                     "--text-field) or a text file, one example per line."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL field holding the text."),
    samples: Optional[int] = typer.Option(256, "--samples", help="Calibration examples drawn (the paper's 256)."),
    layout: str = typer.Option("reduced", "--layout", help="reduced: K experts per layer, router rows of the "
                               "dominant experts; shared: the paper's M-SMoE, all E slots and the router kept, "
                               "members hold their group's merged expert."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Low-rank part of each merged matrix (SVD rank)."),
    sparsity: Optional[float] = typer.Option(None, "--sparsity", help="Fraction of the residual kept as the "
                                             "sparse part (largest magnitudes)."),
    no_align: bool = typer.Option(False, "--no-align", help="Merge without permutation alignment (ablation)."),
    seed: int = typer.Option(0, "--seed", help="Seed for drawing --samples examples."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines or summary."),
) -> None:
    """Merge the experts of a Mixtral MoE into K per layer (MC-SMoE, Li et al. ICLR 2024)."""
    from mergelab.calibrate.data import file_texts
    from mergelab.moe.mcsmoe import compress_moe

    if out is None:
        raise MergeLabError("an output folder is required: -o OUT")
    log = (lambda m: None) if quiet else (lambda m: _err.print(escape(m), highlight=False, soft_wrap=True))
    cal = file_texts(calibration, text_field, None, samples, seed)
    result = compress_moe(moe, out, experts, cal.texts, layout=layout, rank=rank, sparsity=sparsity,
                          align=not no_align, overwrite=overwrite, calibration_source=cal.source, log=log)
    if not quiet:
        _out.print(f"wrote {result.out}: {result.experts_in} -> {result.experts_out} experts per layer "
                   f"({result.report['layout']} layout) in {result.seconds:.1f} s", highlight=False)
