"""Leaderboard rows for merges that stay adapters, on a suite's LoRA experts (``--lora-rank R``).

One home for every suite (``textmix`` and ``llmmix``). The runner supplies three things:
``adapter_base`` (the base folder the adapters were trained on), ``adapter_paths()`` (the merged
tasks' PEFT adapter folders, in ``merge_tasks`` order) and ``adapter_state(folder)`` (the state dict
:meth:`evaluate_merged` takes, from a merged adapter folder read on the base), besides the
:class:`~mergelab.bench.run.BenchRunner` interface (``evaluate_merged``, ``_row``).

Each row runs the public path a user runs: a recipe whose models are ``{adapter: PATH}`` on the base
and whose ``output`` is ``{format: peft, combine: cat | svd | knots}`` goes through
:func:`mergelab.merge`, which writes a PEFT adapter (:mod:`mergelab.adapters`); the merged adapter is
then read back on the base (``BASE+ADAPTER``) and scored with the suite's protocol, next to the dense
merge of the same adapters with the same method. The coefficients are those the dense method chose
on validation (its tuned row) when the report has one, else the method's defaults, so the two rows
differ only in where the merge happens. Recorded per row: merge seconds, peak MiB, the adapter's bytes
and rank, and the largest relative Frobenius error of the truncation (``mergelab.json``).
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Optional, Sequence

from mergelab.bench.run import DISPLAY, PeakMemory, _public

# (combine, method): cat is exact for task arithmetic; svd and knots truncate to the expert rank x this
ADAPTER_MERGES = (("cat", "task_arithmetic"), ("svd", "task_arithmetic"), ("svd", "ties"), ("knots", "ties"))


def adapter_recipe(base_dir: Path, adapters: Sequence[Path], method: str, params: dict, combine: str,
                   rank: Optional[int]) -> dict:
    """The recipe of one adapter merge: ``params`` as the bench's method plans give them (per-model
    parameters as lists or scalars, the rest global)."""
    from mergelab.methods.registry import get_method

    per_model = {p.name for p in get_method(method).model_params}
    models = []
    for i, path in enumerate(adapters):
        mp = {k: (v[i] if isinstance(v, (list, tuple)) else v) for k, v in params.items() if k in per_model}
        models.append({"model": {"adapter": str(path)}, "parameters": mp or {"weight": 1.0}})
    output = {"format": "peft", "combine": combine}
    if combine != "cat":
        output["rank"] = int(rank)
    return {"merge_method": method, "base_model": str(base_dir), "models": models,
            "parameters": {k: v for k, v in params.items() if k not in per_model}, "output": output}


def _chosen_params(rows: Sequence[dict], method: str) -> tuple:
    """The params of the dense tuned row of ``method`` (else its default row), and which row."""
    label = DISPLAY.get(method, method)
    for suffix in ("tuned", "default"):
        for row in rows:
            if row.get("name") == f"{label} ({suffix})" and row.get("status") == "ok" and "params" in row:
                return dict(row["params"]), row["name"]
    return None, None


def adapter_merge_rows(runner, rows: Sequence[dict], workdir: Path, lora_rank: int,
                       combos: Sequence[tuple] = ADAPTER_MERGES, rank_factor: int = 2) -> list:
    """Rows for ``combos`` on ``runner``'s LoRA experts (see the module doc); ``svd`` and ``knots`` keep
    ``rank_factor x lora_rank``."""
    from mergelab import merge
    from mergelab.bench.run import plan_method

    adapters = list(runner.adapter_paths())
    out_rows = []
    for combine, method in combos:
        params, source = _chosen_params(rows, method)
        if params is None:
            params, source = dict(plan_method(method, len(adapters)).default), "defaults"
        rank = None if combine == "cat" else rank_factor * lora_rank
        label = f"{DISPLAY.get(method, method)} (adapter, {combine}" + (f" r={rank})" if rank else ")")
        out = Path(workdir) / f"{combine}-{method}"
        shutil.rmtree(out, ignore_errors=True)
        recipe = adapter_recipe(runner.adapter_base, adapters, method, params, combine, rank)
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            merge(recipe, out)
            seconds = time.perf_counter() - t0
        record = json.loads((out / "mergelab.json").read_text(encoding="utf-8"))
        errors = [m.get("relative_error", 0.0) for m in record["modules"].values()]
        ev = runner.evaluate_merged(runner.adapter_state(out))
        out_rows.append(runner._row(
            label, "merge", ev["correct"], ev.get("held_out"), method=method, combine=combine, params=_public(params),
            params_from=source, merge_seconds=round(seconds, 3), merge_peak_mib=round(mem.mib, 1),
            adapter_bytes=(out / "adapter_model.safetensors").stat().st_size,
            adapter_rank=rank if rank else lora_rank * len(adapters),
            max_relative_truncation_error=max(errors) if errors else 0.0, eval_seconds=ev["seconds"],
            **ev.get("row_extra", {})))
    return out_rows


def append_adapter_merges(runner, report: dict, out: Path, lora_rank: int, start: float, log) -> None:
    """Add the adapter-merge rows to a finished ``report`` of LoRA experts and write it, complete."""
    from mergelab.evaluate.report import write_report

    log("merges that stay adapters: " + ", ".join(f"{c} ({m})" for c, m in ADAPTER_MERGES))
    report["rows"].extend(adapter_merge_rows(runner, report["rows"], Path(out) / "adapters", lora_rank))
    report["seconds"] = round(time.perf_counter() - start, 1)
    report["complete"] = True
    write_report(report, Path(out))
