"""``mergelab evaluate``: score one checkpoint.

* With ``--suite``: the checkpoint's encoder on every task of the suite. Merged (non-held-out) tasks
  use a head per task: the checkpoint's own ``heads.safetensors`` if it has one (a multi-task model),
  else the heads of the suite's prepared experts (``--heads experts``, from ``mergelab bench prepare``),
  the pretrained probes (``--heads pretrained``) or a given ``heads.safetensors``. Held-out tasks are
  scored with a linear probe refitted on the checkpoint's encoder.
* With ``--text`` and/or ``--qa``: a causal LM's perplexity on a local text file and exact-match
  accuracy on a local JSONL of prompts and answers, optionally against ``--baseline``.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import List, Optional

import typer

from mergelab.errors import MergeLabError

SINGLE_COMMAND = True
app = typer.Typer(add_completion=False, help=__doc__.split("\n")[0])


def _heads_for(model: Path, heads: str, cache, tasks) -> tuple:
    """``(task -> head, description, expert correctness or None, why it is None)`` for ``tasks``."""
    from safetensors.torch import load_file

    from mergelab.bench.cache import tensors_to_heads

    own = model / "heads.safetensors"
    if heads == "auto":
        heads = "own" if own.is_file() else "experts"
    if heads == "own":
        if not own.is_file():
            raise MergeLabError(f"{model} has no heads.safetensors; use --heads experts|pretrained|PATH")
        found, source = tensors_to_heads(load_file(str(own))), str(own)
    elif heads == "experts":
        found = {t: cache.expert(t)[1] for t in tasks}
        source = f"experts in {cache.dir}"
    elif heads == "pretrained":
        found, source = cache.pretrained_heads()[0], f"pretrained probes in {cache.dir}"
    else:
        path = Path(heads)
        path = path / "heads.safetensors" if path.is_dir() else path
        if not path.is_file():
            raise MergeLabError(f"--heads {heads}: expected auto, own, experts, pretrained, or a heads.safetensors file")
        found, source = tensors_to_heads(load_file(str(path))), str(path)
    missing = [t for t in tasks if t not in found]
    if missing:
        raise MergeLabError(f"heads from {source} lack task(s) {missing}")
    expert_bits, why = {}, []
    for t in tasks:
        try:
            expert_bits[t] = cache.info(cache.expert_dir(t))["tasks"][t]["test_correct"]
        except MergeLabError:
            why.append(f"no prepared expert for '{t}' ({cache.info_path(cache.expert_dir(t))} is missing)")
        except (KeyError, TypeError):
            why.append(f"the expert of '{t}' records no test predictions ({cache.info_path(cache.expert_dir(t))})")
    if why:
        return {t: found[t] for t in tasks}, source, None, "; ".join(why)
    return {t: found[t] for t in tasks}, source, expert_bits, ""


@app.command()
def evaluate(
    model: Path = typer.Argument(..., help="A local Hugging Face checkpoint folder."),
    suite: Optional[str] = typer.Option(None, "--suite", help="Built-in suite name, suite folder or suite YAML."),
    task: List[str] = typer.Option([], "--task", help="Add a task: NAME=PATH to a CSV/JSONL of (text, label)."),
    heads: str = typer.Option("auto", "--heads", help="auto | own | experts | pretrained | PATH to heads.safetensors."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Bench cache root (default $MERGELAB_BENCH_CACHE "
                                          "or ~/.cache/mergelab/bench)."),
    base: str = typer.Option("minilm-l6", "--base", help="Base model: minilm-l6 or a local folder (for the config)."),
    held_out: Optional[str] = typer.Option(None, "--held-out", help="Comma-separated held-out tasks "
                                           "(default: the suite's)."),
    split: str = typer.Option("test", "--split", help="Split to score the headed tasks on: test or validation."),
    text: Optional[Path] = typer.Option(None, "--text", help="Causal LM: text file for perplexity."),
    qa: Optional[Path] = typer.Option(None, "--qa", help="Causal LM: JSONL of {prompt, answer} for exact match."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Causal LM: base checkpoint to compare with."),
    max_length: int = typer.Option(512, "--max-length", help="Causal LM: tokens per perplexity window."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", help="Causal LM: generation budget per prompt."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the results as JSON here."),
) -> None:
    """Evaluate MODEL on a suite (encoder + per-task heads), or a causal LM on local text and prompts."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    if suite is None and text is None and qa is None:
        raise MergeLabError("nothing to evaluate: give --suite for a classification suite, or --text/--qa for a causal LM")
    if suite is not None and (text is not None or qa is not None):
        raise MergeLabError("--suite and --text/--qa evaluate different kinds of model; run them separately")
    if not model.is_dir():
        raise MergeLabError(f"{model}: not a folder; expected a local Hugging Face checkpoint")
    if text is not None or qa is not None:
        from mergelab.evaluate.lm import lm_guard

        result = lm_guard(model, text, qa, baseline, max_length, max_new_tokens)
        if "perplexity" in result:
            p = result["perplexity"]
            console.print(f"perplexity {p['perplexity']:.3f} over {p['tokens']} tokens"
                          + (f" (ratio to baseline {result['ppl_ratio']:.3f})" if "ppl_ratio" in result else ""))
        if "exact_match" in result:
            e = result["exact_match"]
            console.print(f"exact match {e['exact_match']:.3f} on {e['n']} prompts")
        if result.get("collapsed"):
            console.print("[bold red]collapsed:[/bold red] non-finite loss or perplexity ratio above 2")
    else:
        from mergelab.bench.cache import BenchCache
        from mergelab.evaluate.harness import Evaluator
        from mergelab.evaluate.metrics import summarise
        from mergelab.evaluate.model import base_model_path, load_config, load_tokenizer, read_state, split_state
        from mergelab.evaluate.tasks import load_suite

        if split not in ("test", "validation"):
            raise MergeLabError(f"--split {split}: expected test or validation")
        s = load_suite(suite, task)
        ho = s.held_out if held_out is None else [h for h in held_out.split(",") if h]
        s = s.subset(s.task_names, ho)
        tasks = s.merge_task_names
        bench_cache = BenchCache(s, cache)
        head_map, head_source, expert_bits, no_reference = _heads_for(model, heads, bench_cache, tasks)
        config_dir = model if (model / "config.json").is_file() else base_model_path(base)
        config, tokenizer = load_config(config_dir), load_tokenizer(config_dir)
        encoder_state, _ = split_state(read_state(model))
        ev = Evaluator(s, config, tokenizer)
        start = time.perf_counter()
        enc = ev.encoder(encoder_state)
        correct = ev.correct(enc, head_map, tasks, split)
        held = ev.held_out(enc, s.held_out) if s.held_out and split == "test" else {}
        seconds = time.perf_counter() - start
        metrics = summarise(correct, tasks, expert_bits if split == "test" and expert_bits else {}, held or None)
        missing = []  # why the columns that compare with the experts are empty
        if split != "test":
            missing.append("normalised accuracy and negative flips compare with the experts' test predictions: "
                           f"not computed for --split {split}")
        elif expert_bits is None:
            missing.append("normalised accuracy and negative flips need each expert's test predictions from "
                           f"`mergelab bench prepare` (cache {bench_cache.dir}): {no_reference}")
        if s.held_out and split != "test":
            missing.append(f"held-out task(s) {', '.join(s.held_out)} are scored on the test split only: "
                           f"not computed for --split {split}")
        result = {"model": str(model), "suite": s.name, "suite_fingerprint": s.fingerprint(), "split": split,
                  "heads": head_source, "seconds": round(seconds, 2), "metrics": metrics, "correct": correct,
                  "missing": missing}
        table = Table(title=f"{model} on {s.name} ({split})")
        for col in ("task", "accuracy", "normalised", "neg. flips"):
            table.add_column(col)
        pct = lambda x: "–" if x is None else f"{100 * x:.1f}"  # noqa: E731
        for t in tasks:
            table.add_row(t, pct(metrics["accuracy"][t]), pct(metrics["normalised_accuracy"].get(t)),
                          pct(metrics["negative_flip_rate"].get(t)))
        for t, a in held.items():
            table.add_row(f"{t} (held out, probe)", pct(a), "n/a", "n/a")
        table.add_row("mean", pct(metrics["mean_accuracy"]), pct(metrics["mean_normalised_accuracy"]),
                      pct(metrics["mean_negative_flip_rate"]))
        console.print(table)
        for why in missing:
            console.print(f"missing: {why}", soft_wrap=True, highlight=False)
        console.print(f"heads: {head_source}; evaluated in {seconds:.1f} s")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = out.with_name(out.name + ".partial")
        tmp.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
        tmp.replace(out)
