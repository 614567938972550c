"""``mergelab align REFERENCE MODEL -o ALIGNED`` (and ``mergelab pleas``): parse, call, print."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

out_console = Console()


def align(
    reference: Path = typer.Argument(..., help="The model to match (HF folder, .safetensors, or .pt state dict)."),
    model: Path = typer.Argument(..., help="The model whose hidden units are permuted (same architecture)."),
    out: Path = typer.Option(..., "-o", "--out", help="Where the aligned MODEL goes (same format as MODEL)."),
    method: str = typer.Option("weight", "--method", help="weight (Git Re-Basin weight matching) or activation "
                               "(match activations on --calibration inputs)."),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="Activation matching inputs: a .txt "
                                               "(one text a line) or .jsonl ('text') for HF models; a tensor "
                                               "[N, in] (.pt, .npy, .safetensors) for plain MLPs."),
    spec: Optional[Path] = typer.Option(None, "--spec", help="Permutation spec (YAML/JSON: axes per tensor) for "
                                        "nets that are not a BERT, a Llama-layout decoder or a plain chain."),
    residual: bool = typer.Option(True, "--residual/--no-residual", help="Transformers: also permute the residual "
                                  "stream (embeddings, norms, every block's input and output)."),
    activation: str = typer.Option("relu", "--activation", help="Plain MLPs with --method activation: the "
                                   "nonlinearity between layers (relu, gelu, tanh, sigmoid)."),
    max_iter: int = typer.Option(100, "--max-iter", help="Weight matching: most coordinate-descent sweeps."),
    seed: int = typer.Option(0, "--seed", help="Weight matching: seed of the sweep order."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """Permute MODEL's hidden units to match REFERENCE; the result computes the same function as MODEL."""
    import torch

    from mergelab.align.api import align as run

    r = run(reference, model, out, method=method, calibration=calibration, spec_file=spec, residual=residual,
            overwrite=overwrite, max_iter=max_iter, seed=seed, activation=activation)
    moved = sum(int((v != torch.arange(len(v))).sum()) for v in r.perms.values())
    out_console.print(f"aligned {model} to {reference} ({r.spec.kind} spec, {len(r.perms)} permutation groups, "
                      f"{moved} units moved) by {method} matching into {out} in {r.seconds:.1f} s; squared "
                      f"distance to REFERENCE {r.distance_before:.6g} -> {r.distance_after:.6g}", highlight=False,
                      soft_wrap=True)


def pleas(
    recipe: Path = typer.Argument(..., help="YAML: merge_method: pleas, models (two), calibration (a tensor "
                                  "file for state dicts; texts for BERT and Llama folders), architecture (state "
                                  "dicts: mlp or resnet), parameters (width, activation, heads, inputs, ridge)."),
    out: Path = typer.Option(..., "-o", "--out", help="The merged checkpoint (model A's format, the chosen widths)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output."),
) -> None:
    """PLeaS: merge two models trained from different initialisations at a chosen width (permutations + least
    squares): MLP or ResNet state dicts, BERT or Llama-layout folders (the FFN width)."""
    from mergelab.align.pleas import run_recipe

    r = run_recipe(recipe, out, overwrite=overwrite)
    widths = ", ".join(f"{g} {w} ({r.merged_units[g]} merged)" for g, w in r.widths.items())
    out_console.print(f"PLeaS merged into {out}: widths {widths}", highlight=False, soft_wrap=True)


COMMANDS = [("align", align), ("pleas", pleas)]


def register(app: typer.Typer) -> None:
    """Mount the commands on the top-level ``mergelab`` app."""
    for name, fn in COMMANDS:
        app.command(name=name)(fn)
