"""Generative evaluation of a causal LM on ``llmmix`` tasks: greedy decoding, batched, scored per example.

Any Hugging Face ``AutoModelForCausalLM`` with its ``AutoTokenizer`` in a local folder works
(:func:`load_causal_lm`). Prompts are rendered and tokenised by :func:`mergelab.llmmix.tasks.encode_prompt`
(the same encoding fine-tuning uses; ``raw=True`` tokenises them as given) and decoded by the harness's
greedy primitive, :func:`mergelab.evaluate.lm.greedy_generate` (batched with left padding, stops at EOS
and, with ``stop_at_newline``, at the first newline; the completion is the text up to that newline).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Optional, Sequence

from mergelab.errors import MergeLabError
from mergelab.llmmix.tasks.format import encode_prompt


def load_causal_lm(path, device: str = "cpu"):
    """``(model, tokenizer)`` from a local folder (offline, float32, eval mode; loading is
    :func:`mergelab.evaluate.lm.load_causal_lm`'s), the model moved to ``device``."""
    from mergelab.evaluate.lm import load_causal_lm as load

    model, tok = load(path)
    return model.to(device), tok


def greedy_generate(model, tokenizer, prompts: Sequence[str], max_new_tokens: int = 32, batch_size: int = 16,
                    stop_at_eos: bool = True, stop_at_newline: bool = True, raw: bool = False) -> list:
    """Greedy completions of ``prompts``, in the order given (:func:`mergelab.evaluate.lm.greedy_generate`,
    see the module doc). Task prompts are rendered with the task format (``prompt + "\\nA:"``) unless
    ``raw``, when they are tokenised exactly as given."""
    from mergelab.evaluate.lm import greedy_generate as generate

    return generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                    stop_at_eos=stop_at_eos, stop_at_newline=stop_at_newline, encode=None if raw else encode_prompt)


@dataclass
class TaskEval:
    """Accuracy of one task's split and, per example, prompt / answer / prediction / score (and meta)."""

    task: str
    split: str
    accuracy: float
    n: int
    records: list = field(default_factory=list)
    seconds: float = 0.0

    def to_json(self) -> dict:
        return {"task": self.task, "split": self.split, "accuracy": self.accuracy, "n": self.n,
                "seconds": round(self.seconds, 3), "records": self.records}


def evaluate_task(model, tokenizer, task, split: str = "test", limit: Optional[int] = None, batch_size: int = 16,
                  max_new_tokens: Optional[int] = None, stop_at_eos: bool = True, stop_at_newline: bool = True,
                  code_timeout: float = 2.0) -> TaskEval:
    """Generate for ``task``'s ``split`` (the first ``limit`` examples) and score with the task's metric."""
    t0 = time.perf_counter()
    examples = task.split(split)[:limit] if limit is not None else task.split(split)
    preds = greedy_generate(model, tokenizer, [e.prompt for e in examples],
                            max_new_tokens=max_new_tokens or task.max_new_tokens, batch_size=batch_size,
                            stop_at_eos=stop_at_eos, stop_at_newline=stop_at_newline)
    if task.metric == "pass@1":  # each score is a subprocess: run a few at once
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            scores = list(pool.map(lambda ep: task.score(ep[1], ep[0], timeout=code_timeout), zip(examples, preds)))
    else:
        scores = [task.score(p, e) for e, p in zip(examples, preds)]
    records = []
    for ex, pred, s in zip(examples, preds, scores):
        rec = {"prompt": ex.prompt, "answer": ex.answer, "prediction": pred, "score": s}
        if ex.meta.get("kind"):
            rec["kind"] = ex.meta["kind"]
        records.append(rec)
    acc = sum(r["score"] for r in records) / len(records) if records else 0.0
    return TaskEval(task.name, split, acc, len(records), records, time.perf_counter() - t0)


def evaluate_tasks(model, tokenizer, tasks: Iterable, split: str = "test", **kw) -> dict:
    """``{task name: TaskEval}`` for every task (same keyword arguments as :func:`evaluate_task`)."""
    return {t.name: evaluate_task(model, tokenizer, t, split=split, **kw) for t in tasks}


def evaluate_model(path, tasks: Iterable, split: str = "test", device: str = "cpu", **kw) -> dict:
    """Load the model folder at ``path`` and run :func:`evaluate_tasks`."""
    model, tok = load_causal_lm(path, device=device)
    return evaluate_tasks(model, tok, tasks, split=split, **kw)


def safety_rates(records: Sequence[dict]) -> dict:
    """For records with a ``kind`` (the safety task): how often harmful requests were refused (exactly),
    and how often benign look-alikes were refused too (over-refusal); ``None`` where there is no such record."""
    from mergelab.llmmix.tasks.base import normalise
    from mergelab.llmmix.tasks.builtin import REFUSAL

    out = {}
    for kind, key in (("harmful", "refusal_rate"), ("benign", "over_refusal_rate")):
        rs = [r for r in records if r.get("kind") == kind]
        out[key] = sum(normalise(r["prediction"]) == REFUSAL for r in rs) / len(rs) if rs else None
    return out


def summarise(results: dict, tasks: Iterable) -> dict:
    """Mean accuracy over held-in and over held-out tasks, and per category, from :func:`evaluate_tasks`."""
    by_name = {t.name: t for t in tasks}
    missing = sorted(set(results) - set(by_name))
    if missing:
        raise MergeLabError(f"summarise: results for unknown task(s) {missing}")

    def mean(names):
        return sum(results[n].accuracy for n in names) / len(names) if names else None

    held_in = [n for n in results if not by_name[n].held_out]
    held_out = [n for n in results if by_name[n].held_out]
    cats: dict = {}
    for n in held_in:
        cats.setdefault(by_name[n].category, []).append(n)
    return {"held_in_mean": mean(held_in), "held_out_mean": mean(held_out),
            "per_category": {c: mean(ns) for c, ns in cats.items()}}


def main(argv=None) -> int:
    """``python -m mergelab.llmmix.generate MODEL [--tasks a,b] [--jsonl FILE]... [--out results.json]``."""
    import argparse
    import json
    import sys
    from pathlib import Path

    ap = argparse.ArgumentParser(prog="python -m mergelab.llmmix.generate",
                                 description="Greedy generative evaluation of a causal LM folder on llmmix tasks.")
    ap.add_argument("model", type=Path)
    ap.add_argument("--tasks", default="", help="comma-separated built-in tasks (default: all, unless --jsonl)")
    ap.add_argument("--jsonl", type=Path, action="append", default=[], help="a user task file (repeatable)")
    ap.add_argument("--split", default="test", choices=("train", "validation", "test"))
    ap.add_argument("--limit", type=int, default=None, help="first N examples of the split")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: each task's own")
    ap.add_argument("--no-newline-stop", action="store_true")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--out", type=Path, default=None, help="write accuracies and per-example records as JSON")
    args = ap.parse_args(argv)
    try:
        from mergelab.llmmix.tasks import build_task, load_jsonl_task, task_names

        names = [n.strip() for n in args.tasks.split(",") if n.strip()]
        if not names and not args.jsonl:
            names = task_names()
        tasks = [build_task(n, seed=args.seed) for n in names] + [load_jsonl_task(p, seed=args.seed) for p in args.jsonl]
        results = evaluate_model(args.model, tasks, split=args.split, device=args.device, limit=args.limit,
                                 batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                                 stop_at_newline=not args.no_newline_stop)
        for name, r in results.items():
            print(f"{name:18s} {100 * r.accuracy:6.1f}%  (n={r.n}, {r.seconds:.1f} s)")
        if args.out is not None:
            summary = summarise(results, tasks)
            payload = {"model": str(args.model), "split": args.split, "summary": summary,
                       "tasks": {n: r.to_json() for n, r in results.items()}}
            args.out.parent.mkdir(parents=True, exist_ok=True)
            args.out.write_text(json.dumps(payload, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        return 0
    except MergeLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
