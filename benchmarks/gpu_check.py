"""Check and time the `--device cuda` path against the CPU path on the same checkpoints.

    python benchmarks/gpu_check.py --root /tmp/gpu-check [--hidden 1024 --layers 8 ...] [--json out.json]

For each method it merges the same synthetic Llama checkpoints on the CPU and on the GPU, compares
every output tensor (deterministic methods must agree to rounding of the output dtype; random methods
draw their masks on the CPU, so they must agree too), and prints both wall times.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

import mergelab
from mergelab.methods.registry import get_method
from mergelab.synthetic import make_llama_family

CASES = [
    # (method, global parameters, per-model parameters: one dict for every model, or a list with one
    # per model); methods that take at most k models get the first k experts.
    ("linear", {"weight": 1.0}, {}),  # the base is one of linear's inputs: a global weight covers it
    ("task_arithmetic", {"lambda": 0.5}, {"weight": 1.0}),
    ("ties", {}, {"weight": 1.0, "density": 0.5}),
    ("ties", {"semantics": "paper"}, {"weight": 1.0, "density": 0.2}),
    ("dare_ties", {}, {"weight": 1.0, "density": 0.5}),
    ("dare_linear", {}, {"weight": 1.0, "density": 0.5}),
    ("della", {}, {"weight": 1.0, "density": 0.5}),
    ("della_linear", {}, {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs", {}, {"weight": 1.0, "density": 0.5}),
    ("breadcrumbs_ties", {}, {"weight": 1.0, "density": 0.5}),
    ("sce", {"select_topk": 0.5}, {}),
    ("slerp", {"t": 0.3}, {}),
    ("nuslerp", {}, {"weight": 1.0}),
    ("multislerp", {}, {"weight": 1.0}),
    ("karcher", {}, {}),
    ("model_stock", {}, {}),
    ("nearswap", {"t": 0.001}, {}),
    ("arcee_fusion", {}, {}),
    ("lines", {"alpha": 0.5}, {}),
    ("pcb", {}, {}),
    ("tsv", {}, {}),
    ("varm", {}, {}),
    ("widen", {}, {}),
    ("doge_ta", {}, {}),
    ("mwa", {}, [{"loss": 0.9}, {"loss": 0.8}, {"loss": 0.7}]),
]


def load(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--root", type=Path, default=Path("/tmp/gpu-check"))
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--inter", type=int, default=2816)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--methods", default="", help="Comma-separated method names to run (default: all cases).")
    args = ap.parse_args()
    wanted = {m for m in args.methods.split(",") if m}
    if args.device.startswith("cuda"):
        print("GPU:", torch.cuda.get_device_name(0), flush=True)
    t0 = time.perf_counter()
    paths = make_llama_family(args.root / "models", experts=3, hidden=args.hidden, layers=args.layers,
                              intermediate=args.inter, vocab=args.vocab, heads=16, kv_heads=8, dtype="bfloat16")
    print(f"checkpoints written in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for method, params, model_params in CASES:
        if wanted and method not in wanted:
            continue
        recipe = {"merge_method": method, "base_model": str(paths[0]), "parameters": dict(params),
                  "models": [{"model": str(p), "parameters": dict(model_params[i] if isinstance(model_params, list) else model_params)}
                             for i, p in enumerate(paths[1:])]}
        limit = get_method(method).max_models
        if limit is not None:
            recipe["models"] = recipe["models"][:limit]
        times, outs = {}, {}
        for device in dict.fromkeys(("cpu", args.device)):
            out = args.root / f"out-{method}-{len(rows)}-{device.replace(':', '')}"
            start = time.perf_counter()
            try:
                mergelab.merge(recipe, out, device=device, overwrite=True)
            except Exception as e:  # report and go on: one failing method must not hide the others
                times[device] = f"error: {e}"
                continue
            times[device] = time.perf_counter() - start
            outs[device] = out
        worst = None
        if len(outs) == 2:
            a, b = load(outs["cpu"]), load(outs[args.device])
            worst = 0.0
            for k in a:
                d = (a[k].float() - b[k].float()).abs().max().item()
                scale = a[k].float().abs().max().item() or 1.0
                worst = max(worst, d / scale)
        row = {"method": method, "params": params, "cpu_s": times.get("cpu"), "gpu_s": times.get(args.device),
               "max_rel_diff": worst}
        rows.append(row)
        print(json.dumps(row), flush=True)
        if args.json:
            args.json.write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
