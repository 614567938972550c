"""``mergelab extract``, ``mergelab compress`` and ``mergelab graft``: parse, call the API, print."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from mergelab.errors import MergeLabError


def _echo(line: str) -> None:
    typer.echo(line)


def _parse_value(text: str):
    import yaml

    return yaml.safe_load(text)


def extract(
    base: Path = typer.Argument(..., help="Base model folder."),
    model: Path = typer.Argument(..., help="Fine-tuned model folder (the task vector is MODEL - BASE)."),
    out: Path = typer.Option(..., "-o", "--out", help="PEFT LoRA adapter folder to write."),
    rank: Optional[int] = typer.Option(None, "--rank", help="Rank of every module (capped at min(out, in))."),
    energy: Optional[float] = typer.Option(None, "--energy", help="Or: each module's smallest rank keeping this "
                                           "fraction of sum(sigma^2), in (0, 1]."),
    embeddings: str = typer.Option("dense", "--embeddings", help="Embeddings and LM head: dense "
                                   "(modules_to_save), lora (extracted like linear modules) or skip."),
    other: str = typer.Option("dense", "--other", help="Other changed tensors (norms...): dense "
                              "(modules_to_save) or skip."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run: cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only the summary line."),
) -> None:
    """Write a PEFT LoRA adapter approximating MODEL - BASE (like mergekit-extract-lora)."""
    from mergelab.compress.extract import extract as run

    res = run(str(base), str(model), str(out), rank=rank, energy=energy, embeddings=embeddings, other=other,
              device=device, overwrite=overwrite, log=None if quiet else _echo)
    worst = max((e["rel_error"] for e in res.modules.values()), default=0.0)
    typer.echo(f"wrote adapter {res.out}: {len(res.modules)} LoRA modules (ranks "
               f"{min(e['rank'] for e in res.modules.values())}-{max(e['rank'] for e in res.modules.values())}, "
               f"largest relative error {worst:.3e}), {len(res.dense)} kept dense, {len(res.skipped)} skipped; "
               f"per-module report in {res.out / 'mergelab.json'}")


def compress(
    base: Path = typer.Argument(..., help="Base model folder (the task vector is MODEL - BASE)."),
    model: Path = typer.Argument(..., help="Fine-tuned model folder."),
    out: Path = typer.Option(..., "-o", "--out", help="SkillPack folder to write (skillpack.json + skillpack.safetensors)."),
    scheme: str = typer.Option("graft", "--scheme", help="graft (GraftLLM SkillPack), lowrank (plain SVD, float16 "
                               "factors) or bitdelta (1-bit signs + one scale per matrix)."),
    attn_energy: Optional[float] = typer.Option(None, "--attn-energy", help="graft: attention rank = smallest k "
                                                "keeping this fraction of sum(sigma^2) (the paper's rule; default 0.9)."),
    attn_rank: Optional[float] = typer.Option(None, "--attn-rank", help="graft: attention rank as a fraction of "
                                              "min(out, in) instead (the code: 1000/4096)."),
    mlp_rank: float = typer.Option(1400 / 4096, "--mlp-rank", help="graft: MLP rank as a fraction of min(out, in)."),
    attn_bands: str = typer.Option("8:0.02,4:0.18,2:0.8", "--attn-bands", help="graft: BITS:FRACTION of the "
                                   "attention rank per band, largest singular values first (16 = float16)."),
    mlp_bands: str = typer.Option("8:0.0142857,4:0.1285714,2:0.8571429", "--mlp-bands", help="graft: the MLP's bands."),
    embed_density: float = typer.Option(0.1, "--embed-density", help="Fraction of the embedding / LM-head delta "
                                        "kept by magnitude (1 = dense)."),
    rank: Optional[int] = typer.Option(None, "--rank", help="lowrank: the rank of every attention / MLP matrix."),
    rank_fraction: Optional[float] = typer.Option(None, "--rank-fraction", help="lowrank: the rank as a fraction "
                                                  "of min(out, in)."),
    device: str = typer.Option("cpu", "--device", help="Where the SVDs run: cpu, cuda or cuda:N."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="One line per tensor."),
) -> None:
    """Store the task vector MODEL - BASE as a compressed SkillPack (GraftLLM, low-rank or BitDelta)."""
    from mergelab.compress.skillpack import PackSettings, compress as run, parse_bands

    settings = PackSettings(scheme=scheme, attn_energy=attn_energy, attn_rank=attn_rank, mlp_rank=mlp_rank,
                            attn_bands=parse_bands(attn_bands, "--attn-bands"),
                            mlp_bands=parse_bands(mlp_bands, "--mlp-bands"), embed_density=embed_density,
                            rank=rank_fraction, rank_abs=rank)
    res = run(str(base), str(model), str(out), settings, device=device, overwrite=overwrite,
              log=_echo if verbose else None)
    kinds = {}
    for e in res.tensors.values():
        kinds[e["kind"]] = kinds.get(e["kind"], 0) + 1
    typer.echo(f"wrote SkillPack {res.out} ({scheme}): {res.bytes} bytes of tensors "
               f"({res.bytes / max(1, res.dense_bytes):.3f} of the dense task vector's {res.dense_bytes}); "
               + ", ".join(f"{n} {k}" for k, n in sorted(kinds.items())))


def graft(
    base: Path = typer.Argument(..., help="The base model folder the packs were made against."),
    packs: List[Path] = typer.Argument(..., help="SkillPack folders (from mergelab compress)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output model folder."),
    method: str = typer.Option("task_arithmetic", "--method", help="Any merge method of `mergelab methods`."),
    weight: Optional[List[float]] = typer.Option(None, "--weight", help="Per-pack weight, once per pack, in order."),
    setting: Optional[List[str]] = typer.Option(None, "--set", help="A global method parameter KEY=VALUE "
                                                "(e.g. lambda=0.5, density=0.3); repeatable."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="Computation/output dtype of the recipe."),
    device: str = typer.Option("cpu", "--device", help="Compute device."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
) -> None:
    """Rebuild SkillPacks on BASE and merge them with any merge method into the model folder OUT."""
    from mergelab.compress.graft import graft as run

    params = {}
    for item in setting or []:
        if "=" not in item:
            raise MergeLabError(f"--set expects KEY=VALUE, got '{item}'")
        k, v = item.split("=", 1)
        params[k.strip()] = _parse_value(v)
    res = run(str(base), [str(p) for p in packs], str(out), method=method, parameters=params,
              weights=weight or None, dtype=dtype, device=device, overwrite=overwrite)
    typer.echo(f"grafted {len(packs)} pack(s) onto {base} with {method} into {res.out} in {res.seconds:.1f} s")


COMMANDS = (("extract", extract), ("compress", compress), ("graft", graft))


def register(app: typer.Typer) -> None:
    """Mount the commands on the top-level ``mergelab`` app."""
    for name, fn in COMMANDS:
        app.command(name=name)(fn)
