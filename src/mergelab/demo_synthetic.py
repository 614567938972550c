"""``mergelab demo --synthetic``: merges of synthetic experts, and how much of each expert they keep.

It writes a small Llama-shaped base model and three "fine-tuned" experts (synthetic task vectors:
heavy-tailed, partly zero, independent across experts; see :mod:`mergelab.synthetic`), merges them
with several methods through recipes exactly as a user would, loads every merged folder with
``transformers.AutoModelForCausalLM`` and runs it, and prints for each method how much of each
expert's change survives in the merged weights (the cosine between the merged task vector and the
expert's, and the share of the expert's task-vector norm the merge carries in that direction).

With independent experts a plain average keeps about ``1/sqrt(3)`` of each direction and a third of
its size; TIES and DARE-TIES are built to keep more of each. Measuring merge *quality* on real tasks
is ``mergelab bench``'s job (docs/benchmarks.md); the plain ``mergelab demo`` (:mod:`mergelab.demo`)
merges experts with real skills and measures them.
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml

METHODS = (
    ("task_arithmetic", {"lambda": 1 / 3}, {"weight": 1.0}, "plain average of the experts"),
    ("ties", {}, {"weight": 1.0, "density": 0.3}, "TIES, density 0.3"),
    ("dare_ties", {}, {"weight": 1.0, "density": 0.3}, "DARE-TIES, density 0.3"),
)


def _task_vector(folder: Path, base: dict) -> torch.Tensor:
    from mergelab.io.checkpoint import Checkpoint

    ck = Checkpoint.open(str(folder))
    return torch.cat([(ck.read(n, dtype=torch.float32) - base[n]).reshape(-1) for n in sorted(base)])


def run_synthetic_demo(workdir: Path, method: str, console) -> dict:
    from rich.table import Table
    from transformers import AutoModelForCausalLM

    from mergelab.io.checkpoint import Checkpoint
    from mergelab.merge import merge
    from mergelab.synthetic import make_llama_family

    workdir = Path(workdir)
    console.print(f"[bold]1.[/bold] writing a Llama-shaped base model and 3 experts (bf16, synthetic) to {workdir}/models")
    paths = make_llama_family(workdir / "models", experts=3, hidden=256, layers=4, intermediate=688, vocab=2048,
                              heads=8, kv_heads=4, dtype="bfloat16", seed=7)
    base_ck = Checkpoint.open(str(paths[0]))
    base = {n: base_ck.read(n, dtype=torch.float32) for n in base_ck.tensors}
    experts = [_task_vector(p, base) for p in paths[1:]]
    methods = [m for m in METHODS if method in ("all", m[0])] or [(method, {}, {"weight": 1.0}, method)]
    tokens = torch.randint(0, 2048, (4, 32), generator=torch.Generator().manual_seed(0))
    table = Table(title="how much of each expert's change the merged model keeps")
    for col in ("method", "merge time", "cosine to each expert", "share of each expert's change"):
        table.add_column(col, justify="left" if col == "method" else "right")
    scores = {}
    for name, params, model_params, label in methods:
        recipe = {"merge_method": name, "base_model": str(paths[0]), "parameters": params,
                  "models": [{"model": str(p), "parameters": model_params} for p in paths[1:]],
                  "dtype": "bfloat16"}
        recipe_path = workdir / f"recipe-{name}.yaml"
        recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
        out = workdir / f"merged-{name}"
        console.print(f"[bold]2.[/bold] mergelab merge {recipe_path} -o {out}   ({label})")
        result = merge(recipe_path, out, overwrite=True)
        model = AutoModelForCausalLM.from_pretrained(str(out))
        with torch.no_grad():
            logits = model(input_ids=tokens).logits
        if not torch.isfinite(logits.float()).all():
            raise RuntimeError(f"the model merged with {name} produced non-finite logits")
        merged = _task_vector(out, base)
        cos = [float(torch.nn.functional.cosine_similarity(merged, e, dim=0)) for e in experts]
        share = [float(torch.dot(merged, e) / torch.dot(e, e)) for e in experts]
        scores[name] = {"cosine": cos, "share": share, "seconds": result.seconds}
        table.add_row(label, f"{result.seconds:.1f} s", " ".join(f"{c:.2f}" for c in cos), " ".join(f"{s:.0%}" for s in share))
    console.print("[bold]3.[/bold] every merged model loaded with transformers and ran a forward pass")
    console.print(table)
    console.print(
        "Each expert changed the base in its own direction. A cosine of 1 and a share of 100% would mean the "
        "merged model carries that expert's whole change; a plain average of 3 independent experts keeps about "
        "0.58 of the direction and 33% of the size."
    )
    if "task_arithmetic" in scores:
        avg = sum(scores["task_arithmetic"]["share"]) / 3
        for name, s in scores.items():
            if name != "task_arithmetic":
                console.print(
                    f"{name} carries {sum(s['share']) / 3:.0%} of each expert's change against {avg:.0%} for the "
                    f"average, at a cosine of {sum(s['cosine']) / 3:.2f} (it drops entries, which costs direction)."
                )
    console.print("Whether a merge is better on real tasks is what `mergelab bench` measures (docs/benchmarks.md).")
    return scores
