"""``mergelab tune``: optimisation-based merges that run in memory (RegMean++, AdaMerging, Expert
Merging, FW-Merging) on the benchmark suite, on Hugging Face folders, and the pool-scaling experiment."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.bench.cli import split_names
from mergelab.errors import MergeLabError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Optimisation-based merges in memory (RegMean++, AdaMerging, Expert Merging, FW-Merging).")


@app.command()
def bench(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name, suite folder or suite YAML."),
    methods: str = typer.Option(",".join(["regmean_plusplus", "adamerging_task", "adamerging_layer",
                                          "expert_merging", "expert_merging_pp", "fw_hard"]), "--methods", "-m",
                                help="Comma-separated; also adamerging_tta (test-time adaptation, reported as such)."),
    out: Path = typer.Option(Path("bench-out/tuned"), "--out", help="Folder for report.json, report.md, PNGs."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `mergelab bench prepare`."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model the experts were trained from."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Merge only these tasks (comma-separated)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out tasks (default: the suite's)."),
    references: bool = typer.Option(True, "--references/--no-references", help="Also report the reference rows."),
    ada_steps: int = typer.Option(100, "--ada-steps"),
    ada_lr: float = typer.Option(5e-3, "--ada-lr"),
    ada_examples: int = typer.Option(64, "--ada-examples", help="Unlabelled validation examples per task."),
    expert_epochs: int = typer.Option(10, "--expert-epochs"),
    fw_iterations: int = typer.Option(10, "--fw-iterations"),
    fw_examples: int = typer.Option(32, "--fw-examples", help="Labelled train examples per task (proxy set)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch threads."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """Run the tuned methods on a prepared suite; rows in the format of `mergelab bench run`."""
    from mergelab.bench.cache import BenchCache
    from mergelab.evaluate.tasks import load_suite
    from mergelab.tune.bench import TunedSettings, run_tuned_bench

    s = load_suite(suite)
    settings = TunedSettings(ada_steps=ada_steps, ada_lr=ada_lr, ada_examples=ada_examples,
                             expert_epochs=expert_epochs, fw_iterations=fw_iterations, fw_examples=fw_examples,
                             threads=threads)
    report = run_tuned_bench(s, BenchCache(s, cache), split_names(methods) or [], out, base, split_names(tasks),
                             split_names(held_out), seed, settings, references, log=typer.echo)
    typer.echo(f"wrote {out / 'report.json'} and {out / 'report.md'} ({report['seconds']:.0f} s)")


@app.command("regmean-pp")
def regmean_pp(
    models: List[Path] = typer.Argument(..., help="Candidate Hugging Face folders (same architecture)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output Hugging Face folder."),
    data: List[Path] = typer.Option([], "--data", help="Calibration file per model (.jsonl / text), in order."),
    text_field: str = typer.Option("text", "--text-field"),
    alpha: float = typer.Option(0.95, "--alpha", help="Off-diagonal Gram scale (CLIP reference 0.95, LLMs 0.1)."),
    examples: int = typer.Option(256, "-n", "--examples", help="Calibration examples per model."),
    batch_size: int = typer.Option(16, "--batch-size"),
    max_length: int = typer.Option(128, "--max-length"),
    tail: str = typer.Option("regmean", "--tail", help="regmean, average or base: layers after the blocks."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (for --tail base / --keep-base)."),
    keep_base: str = typer.Option("", "--keep-base", help="Regex of tensors kept at the base value (LLMs: embed_tokens|lm_head)."),
    seed: int = typer.Option(0, "--seed"),
) -> None:
    """RegMean++ of MODELS, each calibrated on its own --data file; writes a loadable folder."""
    from mergelab.calibrate.collect import _tokenizer
    from mergelab.calibrate.data import file_texts, tokenize_batches
    from mergelab.calibrate.model import load_model
    from mergelab.tune.functional import ModelPool
    from mergelab.tune.regmean_pp import regmean_plusplus

    if len(models) < 2 or len(data) != len(models):
        raise MergeLabError(f"give at least 2 models and one --data file per model (got {len(models)} models, "
                            f"{len(data)} --data)")
    if out.exists():
        raise MergeLabError(f"output folder '{out}' exists; remove it first")
    arch = load_model(models[0])
    tok = _tokenizer(models[0])
    batches = [list(tokenize_batches(tok, file_texts(d, text_field, n=examples, seed=seed), batch_size, max_length))
               for d in data]
    rename = {k: v for k, v in arch.names.items() if k != v}
    pool = ModelPool([str(m) for m in models], rename=rename)
    base_state = None
    if base is not None:
        bpool = ModelPool([str(base)], rename=rename)
        base_state = bpool.load(0, [k for k, v in arch.module.state_dict().items() if v.is_floating_point()
                                    and (rename.get(k, k) in bpool._checkpoint(0).tensors)])
    res = regmean_plusplus(arch.module, pool, batches, alpha=alpha, base=base_state, tail=tail, keep_base=keep_base)
    arch.module.load_state_dict(res.state, strict=False)
    arch.module.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    (out / "mergelab-tune.json").write_text(json.dumps({"method": "regmean_plusplus", "models": [str(m) for m in models],
                                                         "data": [str(d) for d in data], **res.info,
                                                         "seconds": round(res.seconds, 2)}, indent=2, default=str))
    typer.echo(f"wrote {out} ({res.seconds:.1f} s)")


@app.command()
def scale(
    cache: Path = typer.Option(..., "--cache", help="Cache root used by `mergelab bench prepare`."),
    out: Path = typer.Option(Path("bench-out/pool-scaling"), "--out"),
    suite: str = typer.Option("textmix", "--suite"),
    sizes: str = typer.Option("4,6,8,10,12", "--sizes"),
    methods: str = typer.Option("fw,ada", "--methods"),
    plot: Optional[Path] = typer.Option(None, "--plot", help="PNG path (default OUT/pool-scaling.png)."),
) -> None:
    """FW-Merging and AdaMerging as irrelevant models join the pool: accuracy and memory per pool size."""
    from mergelab.tune.scale import main

    args = ["--cache", str(cache), "--out", str(out), "--suite", suite, "--sizes", sizes, "--methods", methods]
    main(args + (["--plot", str(plot)] if plot else []))
