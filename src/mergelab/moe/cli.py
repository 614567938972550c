"""``mergelab moe CONFIG.yaml -o OUT``: parse, call :func:`mergelab.moe.build_moe`, print."""

from __future__ import annotations

import sys
from pathlib import Path

import typer
from rich.console import Console
from rich.markup import escape

from mergelab.errors import MergeLabError

SINGLE_COMMAND = True
app = typer.Typer(add_completion=False, pretty_exceptions_enable=False)
_out = Console()
_err = Console(stderr=True)


@app.command()
def moe(
    config: Path = typer.Argument(..., help="mergekit-moe YAML: base_model, experts (source_model, positive_prompts, "
                                  "negative_prompts), gate_mode, dtype, experts_per_token, shared_experts."),
    out: Path = typer.Option(None, "-o", "--out", help="Output folder (written as OUT.partial, renamed when done)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard file, in bytes."),
    no_routing_report: bool = typer.Option(False, "--no-routing-report", help="Skip running each expert's prompts "
                                           "through the built MoE (moe_routing.json)."),
    allow_all_same: bool = typer.Option(False, "--i-understand-this-is-not-useful-without-training",
                                        help="Allow every expert to be the same model."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress lines or summary."),
) -> None:
    """Build a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts (mergekit-moe's YAML)."""
    from mergelab.cli import _human, _print_warning
    from mergelab.moe import build_moe

    if out is None:
        raise MergeLabError("an output folder is required: -o OUT")
    log = (lambda m: None) if quiet else (lambda m: _err.print(escape(m), highlight=False, soft_wrap=True))
    result = build_moe(config, out, overwrite=overwrite, shard_size=shard_size, allow_all_same=allow_all_same,
                       routing=not no_routing_report, log=log)
    for w in result.warnings:
        _print_warning(w)
    if quiet:
        return
    _out.print(f"wrote {result.arch} to {result.out} in {result.seconds:.1f} s, peak memory "
               f"{_human(result.peak_rss_bytes)}", highlight=False)
    if result.routing:
        for e in result.routing["experts"]:
            _out.print(f"  expert {e['expert']}: {e['share_top1_tokens']:.0%} of its prompts' tokens routed to it "
                       f"(last token {e['share_top1_last_token']:.0%}, prompts by majority "
                       f"{e['share_prompts_majority']:.0%}; "
                       f"chance {result.routing['chance']:.0%})", highlight=False, soft_wrap=True)
