"""``mergelab fuse``: knowledge fusion of causal LMs with different tokenizers (FuseLLM, FuseChat)."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from mergelab.bench.cli import split_names

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Knowledge fusion of causal LMs (FuseLLM / FuseChat): token alignment, MinCE/AvgCE, "
                       "training, VaRM/SCE merge.")
out_console = Console()

_LAMBDA = typer.Option(0.9, "--lambda", help="Weight of the causal-LM loss; 1 - lambda goes to the fusion loss "
                       "(FuseLLM's lambda, 0.9 in the paper; 1 = plain fine-tuning).")
_FUSION = typer.Option("min_ce", "--fusion", help="min_ce (per sequence, the source of lowest cross-entropy) or "
                       "avg_ce (weights softmax(exp(-CE))).")


def _configs(steps, batch_size, lr, replay_batch, threads, lam, fusion, loss, top_k, include_target):
    from mergelab.fuse.train import FuseSettings
    from mergelab.llmmix.finetune import FinetuneConfig

    settings = FuseSettings(lam=lam, fusion=fusion, loss=loss, top_k=top_k, include_target=include_target)
    settings.check()
    return FinetuneConfig(steps=steps, batch_size=batch_size, lr=lr, replay_batch=replay_batch, threads=threads,
                          eval_limit=50), settings


@app.command()
def train(
    target: Path = typer.Argument(..., help="The target model folder (a causal LM with its tokenizer)."),
    source: List[Path] = typer.Option(..., "--source", "-s", help="A source model folder (repeat); any tokenizer."),
    out: Path = typer.Option(..., "-o", "--out", help="Run folder (checkpoint, loss log, final/)."),
    tasks: str = typer.Option(..., "--tasks", help="llmmix tasks whose training text is used (comma-separated)."),
    steps: int = typer.Option(300, "--steps"),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    replay_batch: int = typer.Option(8, "--replay-batch", help="Blocks of the target's pretraining text per step "
                                     "(0: no replay)."),
    lam: float = _LAMBDA,
    fusion: str = _FUSION,
    loss: str = typer.Option("ce", "--loss", help="ce (the paper's) or kl."),
    top_k: int = typer.Option(10, "--top-k", help="Logits kept per step and source."),
    include_target: bool = typer.Option(True, "--include-target/--sources-only", help="The target's own starting "
                                        "distribution is a candidate too (FuseLLM's default)."),
    threads: Optional[int] = typer.Option(1, "--threads"),
    fresh: bool = typer.Option(False, "--rebuild", help="Start over instead of resuming."),
) -> None:
    """Train TARGET on the fused next-token distributions of the sources (FuseLLM; one source: FuseChat's
    pairwise fusion)."""
    from mergelab.fuse.train import fuse_train
    from mergelab.llmmix.pretrain import replay_tokens
    from mergelab.llmmix.tasks import build_task

    cfg, settings = _configs(steps, batch_size, lr, replay_batch, threads, lam, fusion, loss, top_k, include_target)
    built = [build_task(n, seed=0) for n in split_names(tasks)]
    replay = replay_tokens(target) if replay_batch else None
    r = fuse_train(target, source, built, out, cfg, settings, replay=replay, fresh=fresh,
                   command=shlex.join(["mergelab", *sys.argv[1:]]))
    out_console.print(f"fused {len(source)} source(s) into {r.final_dir} ({r.step} steps)", highlight=False)


@app.command()
def merge(
    pivot: Path = typer.Argument(..., help="The pivot: the model every fused target was trained from."),
    targets: List[Path] = typer.Argument(..., help="The fused targets (two or more)."),
    out: Path = typer.Option(..., "-o", "--out"),
    method: str = typer.Option("varm", "--method", help="varm (FuseChat 1.0) or sce (FuseChat 2.0)."),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """FuseChat's merge of fused targets (VaRM or SCE, the pivot as base)."""
    from mergelab.fuse.train import chat_merge

    chat_merge(pivot, targets, out, method=method, overwrite=overwrite)
    out_console.print(f"merged {len(targets)} fused targets with {method} into {out}", highlight=False)


@app.command()
def bench(
    target: Path = typer.Option(..., "--target", help="Target / pivot model folder (e.g. base-1m/final)."),
    source: List[Path] = typer.Option(..., "--source", "-s", help="Source model folders (two or more)."),
    out: Path = typer.Option(Path("bench-out/fuse"), "--out"),
    tasks: str = typer.Option("string_ops,list_ops", "--tasks"),
    steps: int = typer.Option(200, "--steps"),
    batch_size: int = typer.Option(16, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    replay_batch: int = typer.Option(4, "--replay-batch"),
    lam: float = _LAMBDA,
    fusion: str = _FUSION,
    test_limit: Optional[int] = typer.Option(None, "--test-limit", help="Score the first N test examples per task."),
    threads: Optional[int] = typer.Option(1, "--threads"),
) -> None:
    """Target alone, each source, CLM-only fine-tuning, FuseLLM, FuseChat pairwise fusion + VaRM / SCE merge:
    test accuracy per task (report.md, report.json, fuse.png in OUT)."""
    from mergelab.fuse.bench import markdown, run_bench
    from mergelab.llmmix.pretrain import replay_tokens

    cfg, settings = _configs(steps, batch_size, lr, replay_batch, threads, lam, fusion, "ce", 10, True)
    replay = replay_tokens(target) if replay_batch else None
    report = run_bench(out, target, source, split_names(tasks), cfg, settings, replay, test_limit=test_limit,
                       command=shlex.join(["mergelab", *sys.argv[1:]]))
    out_console.print(markdown(report), highlight=False)
