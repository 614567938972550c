"""``mergelab demo``: a complete merge on a bundled default, explained.

It writes a small Llama-shaped base model and three "fine-tuned" experts (synthetic task vectors,
see :mod:`mergelab.synthetic`), merges them with a recipe, loads the merged folder with
``transformers.AutoModelForCausalLM``, runs it, and prints how closely the merged model's next-token
predictions follow each expert compared with the untouched base: the number a person wants from a
merge is "does it keep what each expert learned".
"""

from __future__ import annotations

from pathlib import Path

import torch
import yaml


def _predictions(path: Path, tokens: torch.Tensor) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.eval()
    with torch.no_grad():
        return model(input_ids=tokens).logits.argmax(-1)


def run_demo(workdir: Path, method: str, console) -> dict:
    from mergelab.merge import merge
    from mergelab.synthetic import make_llama_family

    workdir = Path(workdir)
    console.print(f"[bold]1.[/bold] writing a base model and 3 experts (Llama-shaped, synthetic) to {workdir}/")
    paths = make_llama_family(workdir / "models", experts=3, hidden=128, layers=4, intermediate=256, vocab=512,
                              delta_scale=0.15, seed=7)
    recipe = {
        "merge_method": method,
        "base_model": str(paths[0]),
        "models": [{"model": str(p), "parameters": {"weight": 1.0, "density": 0.5}} for p in paths[1:]],
        "parameters": {"lambda": 1.0} if method != "linear" else {},
        "dtype": "float32",
    }
    if method in ("linear", "task_arithmetic"):
        for m in recipe["models"]:
            m["parameters"].pop("density")
    if method == "task_arithmetic":
        recipe["parameters"]["lambda"] = 1 / 3
    recipe_path = workdir / "recipe.yaml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = workdir / f"merged-{method}"
    console.print(f"[bold]2.[/bold] merging with {method} (recipe: {recipe_path})")
    result = merge(recipe_path, out, overwrite=True)
    console.print(f"   done in {result.seconds:.2f} s, peak memory {result.peak_rss_bytes / 1e6:.0f} MB -> {out}/")
    console.print("[bold]3.[/bold] loading every model with transformers and predicting the next token")
    tokens = torch.randint(0, 512, (8, 32), generator=torch.Generator().manual_seed(0))
    preds = {p.name: _predictions(p, tokens) for p in paths}
    merged = _predictions(out, tokens)
    from rich.table import Table

    table = Table(title="share of next-token predictions that agree with each expert")
    table.add_column("expert")
    table.add_column("base model", justify="right")
    table.add_column(f"merged ({method})", justify="right")
    scores = {}
    for p in paths[1:]:
        base_agree = (preds["base"] == preds[p.name]).float().mean().item()
        merged_agree = (merged == preds[p.name]).float().mean().item()
        scores[p.name] = {"base": base_agree, "merged": merged_agree}
        table.add_row(p.name, f"{base_agree:.1%}", f"{merged_agree:.1%}")
    console.print(table)
    gain = sum(s["merged"] - s["base"] for s in scores.values()) / len(scores)
    console.print(
        f"On average the merged model agrees with an expert {gain:+.1%} more often than the base does: "
        f"it carries part of each expert's behaviour in one set of weights."
    )
    return scores
