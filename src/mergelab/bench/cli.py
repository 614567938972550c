"""``mergelab bench``: prepare a suite's experts and references, then run merge methods on them."""

from __future__ import annotations

import shlex
import sys
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.errors import MergeLabError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Prepare experts and run the merge-quality benchmark suite.")

DEFAULT_METHODS = ["linear", "task_arithmetic", "ties", "dare_ties", "dare_linear"]


def split_names(value: Optional[str]) -> Optional[list]:
    """A comma-separated option as a list of its non-empty items (None when not given)."""
    return None if value is None else [x for x in (v.strip() for v in value.split(",")) if x]


@app.command()
def prepare(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name, suite folder or suite YAML."),
    task: List[str] = typer.Option([], "--task", help="Add a task: NAME=PATH to a CSV/JSONL of (text, label)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Only these tasks (comma-separated)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default $MERGELAB_BENCH_CACHE "
                                          "or ~/.cache/mergelab/bench; llmmix: $MERGELAB_CACHE/llmmix or "
                                          "~/.cache/mergelab/llmmix)."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model: minilm-l6 (PyPI package) or a local folder "
                             "(llmmix: default CACHE/base-SIZE/final)."),
    epochs: float = typer.Option(3.0, "--epochs", help="Passes over each task's training split."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Learning rate (AdamW; default 2e-4, with --lora-rank "
                                       "1e-3; llmmix 1e-3, llmmix 1m 2e-3)."),
    head_lr: float = typer.Option(2e-3, "--head-lr", help="Head learning rate."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Default 32 (llmmix 16)."),
    max_length: int = typer.Option(64, "--max-length", help="Tokens per example (longer texts are cut)."),
    seed: int = typer.Option(0, "--seed"),
    multitask: Optional[bool] = typer.Option(None, "--multitask/--no-multitask", help="Also train the multi-task "
                                             "model (default: yes; textmix --lora-rank: no, the full one is the "
                                             "reference)."),
    multitask_epochs: Optional[float] = typer.Option(None, "--multitask-epochs", help="Passes over each task's "
                                                     "data for the multi-task model (default: --epochs)."),
    rebuild: bool = typer.Option(False, "--rebuild", help="Retrain units prepared with other settings."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
    size: str = typer.Option("3m", "--size", help="llmmix: base size (base from `bench pretrain`, or --base DIR)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="llmmix: optimizer steps per expert (default 600; "
                                        "1m: 1000)."),
    multitask_steps: Optional[int] = typer.Option(None, "--multitask-steps", help="llmmix: steps of the "
                                                  "multi-task model (default: --steps x number of tasks)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="llmmix: validation examples per task "
                                             "scored (default: all)."),
    device: str = typer.Option("cpu", "--device", help="llmmix: cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (1 is often fastest "
                                          "on a busy machine)."),
    examples: Optional[str] = typer.Option(None, "--examples", help="llmmix: split sizes, train=N,validation=N,"
                                           "test=N (default: the tasks' own)."),
    jobs: int = typer.Option(1, "--jobs", help="llmmix: models trained at once, one process and one thread each "
                             "(2 on a free 2-core machine is about twice as fast as 1)."),
    replay_batch: Optional[int] = typer.Option(None, "--replay-batch", help="llmmix: blocks of the base's "
                                               "pretraining text added to each step's loss, so experts keep the "
                                               "base's language model (default 8; 0: no replay)."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Train PEFT LoRA adapters of this rank instead of full "
                                  "fine-tunes (textmix: CACHE/SUITE-FP/lora-R/TASK, the head trained fully beside "
                                  "the adapter, no multi-task model; llmmix: CACHE/experts-SIZE-loraR; 0: full "
                                  "fine-tunes)."),
) -> None:
    """Fine-tune one expert per task, linear probes on the frozen base, and a multi-task model (resumable).

    With --suite llmmix: full fine-tunes of the pretrained Llama base per merged task and a multi-task
    model (--epochs, --head-lr, --max-length and --task do not apply)."""
    if lora_rank < 0:
        raise MergeLabError(f"--lora-rank {lora_rank}: expected a positive rank (0: full fine-tunes)")
    if suite != "llmmix" and (jobs != 1 or replay_batch is not None):
        raise MergeLabError("--jobs and --replay-batch apply to --suite llmmix only")
    if suite != "llmmix" and lora_rank and multitask:
        raise MergeLabError("--multitask: textmix LoRA experts get no multi-task model (the full fine-tune's "
                            "multi-task model is the reference); drop --multitask")
    multitask = (not (suite != "llmmix" and lora_rank)) if multitask is None else multitask
    if suite == "llmmix":
        _prepare_llmmix(size, cache, None if base == "minilm-l6" else Path(base), split_names(tasks), steps,
                        multitask_steps, lr, 16 if batch_size is None else batch_size, seed,
                        eval_limit, device, threads, multitask, rebuild, progress,
                        bad=[f for f, given in (("--epochs", epochs != 3.0), ("--head-lr", head_lr != 2e-3),
                                                ("--max-length", max_length != 64), ("--task", bool(task)),
                                                ("--multitask-epochs", multitask_epochs is not None)) if given],
                        examples=examples, jobs=jobs, replay_batch=replay_batch,
                        lora_rank=lora_rank)
        return
    from mergelab.bench.cache import BenchCache
    from mergelab.bench.prepare import prepare as run_prepare
    from mergelab.bench.training import TrainConfig
    from mergelab.evaluate.tasks import load_suite

    s = load_suite(suite, task)
    cfg = TrainConfig(epochs=epochs, lr=(1e-3 if lora_rank else 2e-4) if lr is None else lr, head_lr=head_lr,
                      batch_size=32 if batch_size is None else batch_size, max_length=max_length, seed=seed,
                      threads=threads)
    bench_cache = BenchCache(s, cache)
    result = run_prepare(s, bench_cache, cfg, base, split_names(tasks), multitask, rebuild, progress, typer.echo,
                         multitask_epochs, lora_rank=lora_rank)
    typer.echo(f"prepared {s.name} in {result.cache_dir} ({result.seconds:.0f} s; trained "
               f"{len(result.trained)} unit(s), {len(result.skipped)} already there)")


def _sizes(examples: Optional[str]) -> Optional[dict]:
    """``--examples train=N,validation=N,test=N`` as a dict (None when not given)."""
    if not examples:
        return None
    try:
        sizes = {k.strip(): int(v) for k, _, v in (p.partition("=") for p in examples.split(","))}
    except ValueError:
        raise MergeLabError(f"--examples {examples}: expected train=N,validation=N,test=N") from None
    if set(sizes) != {"train", "validation", "test"}:
        raise MergeLabError(f"--examples {examples}: expected train=N,validation=N,test=N")
    return sizes


def _prepare_llmmix(size, cache, base_dir, tasks, steps, multitask_steps, lr, batch_size, seed, eval_limit, device,
                    threads, multitask, rebuild, progress, bad, examples, jobs=1, replay_batch=None,
                    lora_rank=0) -> None:
    from mergelab.llmmix.finetune import FinetuneConfig, recipe_for_size
    from mergelab.llmmix.prepare import prepare as run_prepare

    if bad:
        raise MergeLabError(f"--suite llmmix: {', '.join(bad)} do(es) not apply to the llmmix suite")
    sizes = _sizes(examples)
    recipe = recipe_for_size(size)
    steps = recipe["steps"] if steps is None else steps
    lr = recipe["lr"] if lr is None else lr
    cfg = FinetuneConfig(steps=steps, batch_size=batch_size, lr=lr, seed=seed, eval_limit=eval_limit, device=device,
                         threads=threads, lora_rank=lora_rank,
                         **({} if replay_batch is None else {"replay_batch": replay_batch}))
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:3] == ["bench", "prepare"] \
        else f"mergelab bench prepare --suite llmmix --size {size} --steps {steps}"
    r = run_prepare(size, cache, cfg, tasks, multitask, multitask_steps, base_dir, sizes=sizes, rebuild=rebuild,
                    command=command, log=typer.echo, progress=progress, jobs=jobs)
    typer.echo(f"prepared llmmix {size} in {r.folder} ({r.seconds:.0f} s; trained {len(r.trained)} model(s), "
               f"{len(r.skipped)} already there)")


def _grids(grid: List[str]) -> dict:
    """``--grid NAME=V,V`` options as ``{NAME: (V, ...)}``."""
    grids = {}
    for item in grid:
        key, sep, values = item.partition("=")
        try:
            grids[key.strip()] = tuple(float(v) for v in values.split(",") if v.strip())
        except ValueError:
            raise MergeLabError(f"--grid {item}: expected NAME=NUMBER,NUMBER,...") from None
        if not sep or not key.strip() or not grids[key.strip()]:
            raise MergeLabError(f"--grid {item}: expected NAME=NUMBER,NUMBER,...")
    return grids


@app.command()
def run(
    suite: str = typer.Option("textmix", "--suite", help="Built-in suite name, suite folder or suite YAML."),
    methods: List[str] = typer.Option(DEFAULT_METHODS, "--methods", "-m",
                                      help="Methods (repeat or comma-separate); 'all' = every registered method."),
    out: Path = typer.Option(Path("bench-out/textmix"), "--out", help="Folder for report.json, report.md, PNGs."),
    task: List[str] = typer.Option([], "--task", help="Add a task: NAME=PATH to a CSV/JSONL of (text, label)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Merge only these tasks (comma-separated)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out tasks (comma-separated; "
                                           "default: the suite's; '' for none)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `bench prepare`."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model the experts were trained from."),
    tune: bool = typer.Option(True, "--tune/--no-tune", help="Also search coefficients on validation data."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods (DARE)."),
    grid: List[str] = typer.Option([], "--grid", help="Coefficient values to search, e.g. "
                                   "--grid lambda=0.3,0.5 --grid density=0.2 (replaces the built-in values)."),
    save_models: bool = typer.Option(False, "--save-models", help="Also write each merged encoder to "
                                     "OUT/models/<method>-<variant>/ (about 90 MB each for MiniLM)."),
    size: str = typer.Option("3m", "--size", help="llmmix: base size whose experts are merged."),
    examples: Optional[str] = typer.Option(None, "--examples", help="llmmix: split sizes as given to `bench prepare`."),
    device: str = typer.Option("cpu", "--device", help="llmmix: cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    lora_rank: int = typer.Option(0, "--lora-rank", help="Merge the LoRA experts of this rank (from `bench "
                                  "prepare --lora-rank R`)."),
    adapter_merges: bool = typer.Option(False, "--adapter-merges", help="With --lora-rank: also merge "
                                        "the adapters as adapters (cat, svd with task arithmetic and TIES, KnOTS-TIES)."),
    eval_limit: Optional[int] = typer.Option(None, "--eval-limit", help="llmmix: score only the first N examples "
                                             "of every validation and test split (default: all)."),
) -> None:
    """Merge the prepared experts with each method, evaluate every task, write the report and charts."""
    from mergelab.bench.cache import BenchCache
    from mergelab.bench.run import resolve_methods, run_bench
    from mergelab.evaluate.tasks import load_suite

    grids = _grids(grid)
    names = resolve_methods(methods)
    if not names:
        raise MergeLabError("--methods: no method named")
    command = "mergelab bench run " + " ".join(shlex.quote(a) for a in sys.argv[3:]) if \
        sys.argv[1:3] == ["bench", "run"] else ""
    if eval_limit is not None and suite != "llmmix":
        raise MergeLabError(f"--eval-limit applies to --suite llmmix; --suite {suite} scores whole splits")
    if suite == "llmmix":
        from mergelab.llmmix.run import run_llmmix

        if task:
            raise MergeLabError("--suite llmmix: --task does not apply (llmmix tasks are built in)")
        report = run_llmmix(names, out, size, cache, None if base == "minilm-l6" else Path(base), split_names(tasks),
                            split_names(held_out), _sizes(examples), tune=tune, seed=seed, grids=grids, command=command,
                            log=typer.echo, device=device, threads=threads, save_models=save_models,
                            lora_rank=lora_rank, adapter_merges=adapter_merges, eval_limit=eval_limit)
        typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and charts ({report['seconds']:.0f} s)")
        return
    if threads:
        import torch

        torch.set_num_threads(threads)
    s = load_suite(suite, task)
    report = run_bench(s, BenchCache(s, cache), names, out, base, split_names(tasks), split_names(held_out), tune, seed,
                       command=command, log=typer.echo, save_models=save_models, grids=grids, lora_rank=lora_rank,
                       adapter_merges=adapter_merges)
    typer.echo(f"wrote {out / 'report.json'}, {out / 'report.md'} and charts ({report['seconds']:.0f} s)")


@app.command("base")
def base_folder(
    out: Path = typer.Option(..., "--out", "-o", help="Folder to write the base into."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model: minilm-l6 (PyPI package) or a local folder."),
) -> None:
    """Write the textmix base encoder with the experts' tensor names (bert.*), for recipes and search
    genomes that merge the experts (base_model: OUT)."""
    from mergelab.bench.cache import save_prefixed_base

    typer.echo(f"wrote {save_prefixed_base(out, base)}")


@app.command()
def scale(
    suite: str = typer.Option("llmmix", "--suite", help="Suite (only llmmix has a scale study here)."),
    sizes: str = typer.Option("3m,20m", "--sizes", help="Base sizes, smallest first (comma-separated)."),
    experts: str = typer.Option("2,4,6,8", "--experts", help="Numbers of experts merged (comma-separated)."),
    methods: str = typer.Option("linear,task_arithmetic,ties,dare_ties,tsv", "--methods", "-m",
                                help="Methods (comma-separated; linear or average = simple average, tsv = TSV-M)."),
    out: Path = typer.Option(Path("bench-out/llmmix-scale"), "--out", help="Folder for scale.json/.md/.png "
                             "and one report per size and k."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Held-out tasks (default: the suite's)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `bench prepare`."),
    order_seed: int = typer.Option(0, "--order-seed", help="Seed of the expert order (the first k are merged)."),
    seed: int = typer.Option(0, "--seed", help="Seed for random methods (DARE)."),
    grid: List[str] = typer.Option([], "--grid", help="Coefficient values to search (as for `bench run`)."),
    examples: Optional[str] = typer.Option(None, "--examples", help="Split sizes as given to `bench prepare`."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    resume: bool = typer.Option(False, "--resume", help="Reuse OUT/SIZE/kK reports already complete with the "
                                "same experts, methods, held-out tasks, seed and grids."),
) -> None:
    """What Matters for Model Merging at Scale, in miniature: merge 2..8 experts per base size, tuned on
    validation; normalised held-in and held-out accuracy as a table, one PNG and the paper's findings checked."""
    from mergelab.bench.run import resolve_methods
    from mergelab.llmmix.scale import run_scale

    if suite != "llmmix":
        raise MergeLabError(f"--suite {suite}: the scale study runs on llmmix only (textmix: `mergelab tune scale`)")
    try:
        ks = [int(k) for k in split_names(experts)]
    except ValueError:
        raise MergeLabError(f"--experts {experts}: expected comma-separated integers") from None
    names = resolve_methods(["linear" if m == "average" else m for m in split_names(methods)])  # the paper's name
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) \
        if sys.argv[1:3] == ["bench", "scale"] else ""
    study = run_scale(split_names(sizes), ks, names, out, cache, split_names(held_out), _sizes(examples), order_seed, seed,
                      _grids(grid), command=command, log=typer.echo, device=device, threads=threads, resume=resume)
    typer.echo(f"wrote {out / 'scale.json'}, {out / 'scale.md'} and {out / 'scale.png'}")
    for f in study["findings"]:
        typer.echo(f"{f['finding']}: {f['verdict']} ({f['text']})")


@app.command()
def pretrain(
    size: str = typer.Option("3m", "--size", help="llmmix base size: 1m, 3m, 20m (or tiny, for tests)."),
    steps: int = typer.Option(2400, "--steps", help="Optimizer steps in all (a resumed run continues to this)."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default $MERGELAB_CACHE/llmmix "
                                         "or ~/.cache/mergelab/llmmix)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder (default CACHE/base-SIZE)."),
    batch_size: int = typer.Option(16, "--batch-size", help="Blocks per step."),
    seq_len: int = typer.Option(256, "--seq-len", help="Tokens per block (+1 for the shifted target)."),
    lr: float = typer.Option(2e-3, "--lr", help="Peak learning rate (AdamW, warm-up then cosine to 10%)."),
    warmup: Optional[int] = typer.Option(None, "--warmup", help="Warm-up steps (default min(200, steps/10))."),
    seed: int = typer.Option(0, "--seed"),
    corpus_mb: float = typer.Option(20.0, "--corpus-mb", help="Corpus size in MB of UTF-8 text."),
    sources: Optional[str] = typer.Option(None, "--sources", help="Corpus sources (comma-separated; default all)."),
    vocab_size: int = typer.Option(8192, "--vocab-size", help="Byte-level BPE vocabulary (special tokens included)."),
    checkpoint_every: int = typer.Option(200, "--checkpoint-every", help="Steps between checkpoints."),
    eval_every: int = typer.Option(200, "--eval-every", help="Steps between held-out evaluations."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads (default: torch's)."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run folder's checkpoint and start over."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Pretrain an llmmix Llama base from scratch on the offline corpus (seeded, resumable)."""
    from mergelab.llmmix.corpus import DEFAULT_SOURCES
    from mergelab.llmmix.pretrain import PretrainConfig
    from mergelab.llmmix.pretrain import pretrain as run_pretrain

    cfg = PretrainConfig(size=size, steps=steps, batch_size=batch_size, seq_len=seq_len, lr=lr, warmup=warmup,
                         seed=seed, corpus_bytes=int(corpus_mb * 1e6),
                         corpus_sources=tuple(split_names(sources) or DEFAULT_SOURCES), vocab_size=vocab_size,
                         checkpoint_every=max(1, checkpoint_every), eval_every=max(1, eval_every), device=device,
                         threads=threads)
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:3] == ["bench", "pretrain"] \
        else "mergelab bench pretrain --size " + size
    result = run_pretrain(cfg, cache, out, command=command, log=typer.echo, progress=progress, fresh=fresh)
    typer.echo(f"{result.run_dir}: step {result.step}/{steps}; "
               + (f"model in {result.final_dir}" if result.final_dir else "not finished (run again to resume)"))


@app.command()
def instruct(
    suite: str = typer.Option("llmmix", "--suite", help="Suite (only llmmix has causal-LM bases)."),
    size: str = typer.Option("3m", "--size", help="Size of the pretrained base to instruction-tune."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root (default $MERGELAB_CACHE/llmmix "
                                         "or ~/.cache/mergelab/llmmix)."),
    base: Optional[Path] = typer.Option(None, "--base", help="Pretrained base folder (default CACHE/base-SIZE/final)."),
    steps: Optional[int] = typer.Option(None, "--steps", help="Optimizer steps (default 800)."),
    lr: Optional[float] = typer.Option(None, "--lr", help="Peak learning rate (default 1e-3)."),
    examples: Optional[str] = typer.Option(None, "--examples", help="Split sizes of each mix task, "
                                           "train=N,validation=N,test=N (default 2000/200/200)."),
    eval_limit: Optional[int] = typer.Option(100, "--eval-limit", help="Validation examples per task scored at the end."),
    replay_batch: Optional[int] = typer.Option(None, "--replay-batch", help="Blocks of the base's pretraining text "
                                               "replayed per step (default 8; 0: none)."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
    threads: Optional[int] = typer.Option(None, "--threads", help="torch CPU threads."),
    fresh: bool = typer.Option(False, "--fresh", help="Delete the run's checkpoint and start over."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Make the instruction-tuned variant SIZE-instruct of an llmmix base (the pretrained base trained on an
    instruction mix of other tasks, with replay); then `bench prepare --size SIZE-instruct` trains experts on it."""
    from mergelab.llmmix.instruct import default_config, instruct_base

    if suite != "llmmix":
        raise MergeLabError(f"--suite {suite}: only llmmix has an instruction-tuned base")
    cfg = default_config(steps=steps, lr=lr, eval_limit=eval_limit, replay_batch=replay_batch, device=device,
                         threads=threads)
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:3] == ["bench", "instruct"] \
        else f"mergelab bench instruct --size {size}"
    result = instruct_base(size, cache, cfg, base, sizes=_sizes(examples), command=command, log=typer.echo,
                           progress=progress, fresh=fresh)
    acc = result.record.get("validation_accuracy", {})
    typer.echo(f"{result.final_dir}: instruction-tuned base ({result.step} steps); validation accuracy "
               + ", ".join(f"{k} {v:.1%}" for k, v in acc.items()))


@app.command()
def compress(
    suite: str = typer.Option("llmmix", "--suite", help="llmmix (its causal-LM experts, exact match) or textmix "
                              "(the fully fine-tuned MiniLM experts of `bench prepare`, each with its own head)."),
    size: str = typer.Option("3m", "--size", help="llmmix base size whose experts are compressed."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Cache root used by `bench prepare`."),
    base: Optional[Path] = typer.Option(None, "--base", help="Base model folder (default: the cache's; textmix: "
                                        "minilm-l6)."),
    experts_dir: Optional[Path] = typer.Option(None, "--experts-dir", help="llmmix: folder of TASK/final expert "
                                               "folders (default: CACHE/experts-SIZE)."),
    tasks: Optional[str] = typer.Option(None, "--tasks", help="Experts to compress (comma-separated; default: "
                                        "llmmix every TASK/final found, textmix the suite's merged tasks)."),
    limit: int = typer.Option(50, "--limit", help="llmmix: test examples per task (textmix scores the whole "
                              "test split)."),
    embed_density: float = typer.Option(1.0, "--embed-density", help="Embedding delta density in every pack."),
    levels: Optional[str] = typer.Option(None, "--levels", help="GraftLLM pack sizes to run (comma-separated "
                                         "labels of mergelab.compress.bench.LEVELS; default: all)."),
    out: Path = typer.Option(Path("bench-out/compress"), "--out", help="Folder for compress.json/.md/.png."),
    device: str = typer.Option("cpu", "--device", help="cpu, cuda or cuda:N."),
) -> None:
    """Size against accuracy: GraftLLM SkillPacks at several sizes, plain low-rank at the same bytes, BitDelta."""
    from mergelab.compress.bench import LEVELS, bench_compress, bench_compress_textmix
    from mergelab.llmmix.pretrain import base_folder, default_root

    chosen = LEVELS
    if levels:
        known = {lv[0]: lv for lv in LEVELS}
        bad = [x for x in split_names(levels) if x not in known]
        if bad:
            raise MergeLabError(f"--levels: unknown level {bad[0]!r}; known: {', '.join(known)}")
        chosen = tuple(known[x] for x in split_names(levels))
    command = "mergelab " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:3] == ["bench", "compress"] \
        else ""
    if suite != "llmmix":
        from mergelab.bench.cache import BenchCache
        from mergelab.evaluate.tasks import load_suite

        s = load_suite(suite)
        if experts_dir is not None:
            raise MergeLabError(f"--experts-dir applies to --suite llmmix; --suite {suite} reads the experts of "
                                f"`mergelab bench prepare --suite {suite}` from --cache")
        bc = BenchCache(s, cache)
        names = split_names(tasks) or list(s.merge_task_names)
        for n in names:
            s.task(n)  # an unknown task is an error naming the suite's tasks
            if not bc.info_path(bc.expert_dir(n)).is_file():
                raise MergeLabError(f"no prepared expert '{n}' in {bc.expert_dir(n)}: run `mergelab bench prepare "
                                    f"--suite {suite} --tasks {n}` first")
        bench_compress_textmix(s, bc, names, out, base=str(base) if base else s.base_model,
                               embed_density=embed_density, levels=chosen, device=device, command=command,
                               log=typer.echo)
        typer.echo(f"wrote {out / 'compress.json'}, {out / 'compress.md'} and {out / 'compress.png'}")
        return
    root = Path(cache) if cache else default_root()
    folder = Path(experts_dir) if experts_dir else root / f"experts-{size}"
    base_dir = Path(base) if base else base_folder(size, root)
    names = split_names(tasks) or sorted(p.parent.name for p in folder.glob("*/final") if p.is_dir())
    experts = {n: folder / n / "final" for n in names}
    missing = [str(p) for p in experts.values() if not p.is_dir()]
    if missing or not experts:
        raise MergeLabError(f"no expert folder {missing[0] if missing else str(folder / '*' / 'final')}: run "
                            f"`mergelab bench prepare --suite llmmix --size {size}` first")
    bench_compress(base_dir, experts, out, limit=limit, embed_density=embed_density, device=device,
                   command=command, log=typer.echo, levels=chosen)
    typer.echo(f"wrote {out / 'compress.json'}, {out / 'compress.md'} and {out / 'compress.png'}")
