"""``python -m mergelab.llmmix.tasks``: list the built-in tasks, or write them as JSONL.

    python -m mergelab.llmmix.tasks list
    python -m mergelab.llmmix.tasks write OUT [--tasks a,b] [--seed 0] [--train 2000] [--validation 200] [--test 200]

``write`` puts one ``<task>.jsonl`` per task in ``OUT`` (the format :func:`load_jsonl_task` reads) and
a ``tasks.json`` with each task's category, metric, held-out flag, sizes, seed and fingerprint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mergelab.errors import MergeLabError


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m mergelab.llmmix.tasks", description=__doc__.split("\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("list", help="print the task table (markdown)")
    w = sub.add_parser("write", help="write tasks as JSONL plus tasks.json")
    w.add_argument("out", type=Path)
    w.add_argument("--tasks", default="", help="comma-separated names (default: all)")
    w.add_argument("--seed", type=int, default=0)
    for split, n in (("train", 2000), ("validation", 200), ("test", 200)):
        w.add_argument(f"--{split}", type=int, default=n)
    args = ap.parse_args(argv)
    try:
        from mergelab.llmmix.tasks import build_task, task_names, write_task_jsonl
        from mergelab.llmmix.tasks.base import markdown_table

        if args.cmd == "list":
            sys.stdout.write(markdown_table())
            return 0
        names = [n.strip() for n in args.tasks.split(",") if n.strip()] or task_names()
        sizes = {"train": args.train, "validation": args.validation, "test": args.test}
        tasks = [build_task(n, seed=args.seed, sizes=sizes) for n in names]  # all built before anything is written
        manifest = {}
        for t in tasks:
            write_task_jsonl(t, args.out / f"{t.name}.jsonl")
            manifest[t.name] = {"file": f"{t.name}.jsonl", "category": t.category, "metric": t.metric,
                                "held_out": t.held_out, "max_new_tokens": t.max_new_tokens, "seed": args.seed,
                                "sizes": sizes, "fingerprint": t.fingerprint(), "description": t.description,
                                "source": t.source}
        (args.out / "tasks.json").write_text(json.dumps(manifest, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"wrote {len(tasks)} task(s) to {args.out}")
        return 0
    except MergeLabError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
