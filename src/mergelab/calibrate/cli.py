"""``mergelab calibrate``: collect per-module statistics of one model on calibration inputs."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.errors import MergeLabError

SINGLE_COMMAND = True

app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)


def _layers(value: Optional[str]) -> Optional[List[int]]:
    if value is None or value.strip() in ("", "all"):
        return None
    try:
        return [int(v) for v in value.split(",") if v.strip()]
    except ValueError:
        raise MergeLabError(f"--hidden-layers: expected comma-separated integers or 'all', got '{value}'") from None


@app.command()
def calibrate(
    model: Path = typer.Argument(..., help="Hugging Face model folder (classifier, causal LM or bare encoder), "
                                 "or BASE+ADAPTER (a PEFT LoRA folder on its base)."),
    out: Path = typer.Option(..., "-o", "--out", help="Folder for <statistic>.safetensors and calibration.json."),
    stats: str = typer.Option("gram", "--stats", help="Comma-separated: gram, fisher, activations."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Benchmark suite (name, folder or YAML) holding --task."),
    task: Optional[str] = typer.Option(None, "--task", help="Task of --suite whose split is the calibration data."),
    split: str = typer.Option("train", "--split", help="Split of --task: train or validation (test needs --test-time)."),
    data: Optional[Path] = typer.Option(None, "--data", help="Local .jsonl (field --text-field) or text file (one example per line)."),
    text_field: str = typer.Option("text", "--text-field", help="JSONL key holding the text."),
    label_field: Optional[str] = typer.Option(None, "--label-field", help="JSONL key holding integer labels (empirical Fisher)."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="Tokenizer folder (default: the model folder)."),
    examples: int = typer.Option(256, "-n", "--examples", help="Number of examples (a seeded random sample; 0 = all)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Examples per forward pass."),
    max_length: int = typer.Option(128, "--max-length", help="Truncate texts to this many tokens."),
    kind: str = typer.Option("auto", "--kind", help="auto, classifier, causal_lm or encoder."),
    gram_reduction: str = typer.Option("mean", "--gram-reduction", help="mean: X^T X / n (RegMean code); sum: X^T X (paper)."),
    include_padding: bool = typer.Option(False, "--include-padding", help="Count padding tokens in Grams (RegMean reference behaviour)."),
    fisher_mode: str = typer.Option("auto", "--fisher-mode", help="exact, sampled, empirical, batched (approximation) or auto."),
    hidden_layers: Optional[str] = typer.Option(None, "--hidden-layers", help="Activations: comma-separated hidden-state indices (0 = embeddings) or all."),
    seed: int = typer.Option(0, "--seed", help="Seed of the example sample and of sampled Fisher labels."),
    test_time: bool = typer.Option(False, "--test-time", help="Allow --split test: declares test-time adaptation."),
    quiet: bool = typer.Option(False, "-q", "--quiet", help="No progress bar."),
) -> None:
    """Run MODEL on calibration inputs and store Gram matrices, Fisher diagonals or activations."""
    from mergelab.calibrate.collect import calibrate as run
    from mergelab.calibrate.data import file_texts, suite_task_texts

    if (data is None) == (task is None):
        raise MergeLabError("give either --suite/--task (a benchmark task's split) or --data FILE")
    n = examples if examples > 0 else None
    if data is not None:
        cal = file_texts(data, text_field, label_field, n, seed)
    else:
        if suite is None:
            raise MergeLabError("--task needs --suite (a suite name, folder or YAML file)")
        cal = suite_task_texts(suite, task, split, n, seed, test_time)
    report = run(model, cal, out, [s.strip() for s in stats.split(",") if s.strip()], tokenizer_path=tokenizer,
                 kind=kind, batch_size=batch_size, max_length=max_length, gram_reduction=gram_reduction,
                 mask_padding=not include_padding, fisher_mode=fisher_mode, hidden_layers=_layers(hidden_layers),
                 seed=seed, progress=not quiet and sys.stderr.isatty())
    typer.echo(json.dumps(report.to_dict(), indent=2))
