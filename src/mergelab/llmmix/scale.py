"""``mergelab bench scale --suite llmmix``: "What Matters for Model Merging at Scale?" (Yadav et al., 2024)
in miniature.

For each base size and each number of experts ``k``, the first ``k`` experts of one fixed, seeded order
of the prepared tasks (so the sets are nested: the 2 experts are among the 4, the 4 among the 6, ...)
are merged with each method by the llmmix protocol itself (:func:`mergelab.llmmix.run.run_llmmix`:
coefficients chosen on the validation splits of the merged tasks only, test reported once), one full
report per ``(size, k)`` in ``OUT/SIZE/kK/``. Each method contributes its tuned row (its default row
when it has no grid, e.g. the simple average). The study records per ``(size, k, method)`` the mean
normalised held-in accuracy (merged / expert, per merged task) and the mean held-out accuracy, and
writes ``scale.json``, ``scale.md`` (table and findings) and ``scale.png``.

The paper's findings checked against the numbers (:func:`findings`): a larger base merges better
(mean normalised accuracy rises with size), more experts help held-out generalisation (mean held-out
accuracy at the largest ``k`` above that at the smallest, per size), and the methods' differences shrink
with scale (the spread, max - min over methods of normalised accuracy averaged over ``k``, falls with
size). Sizes are taken in the order given, smallest first.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.errors import MergeLabError


def expert_order(tasks: Sequence[str], seed: int = 0) -> list:
    """The tasks in one fixed order drawn with ``seed`` (sorted first, so the order does not depend on
    how they were listed); the first ``k`` are the experts merged at ``k``."""
    order = sorted(tasks)
    random.Random(seed).shuffle(order)
    return order


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pick(rows: Sequence[dict], method: str) -> Optional[dict]:
    """The method's tuned row, else its default row (methods without a grid), else None."""
    ok = {r.get("variant"): r for r in rows if r.get("method") == method and r.get("status") == "ok"}
    return ok.get("tuned") or ok.get("default")


def _reusable(run_dir: Path, subset, methods, held_out, seed, grids) -> Optional[dict]:
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    rep = json.loads(path.read_text(encoding="utf-8"))
    same = (rep.get("complete") and rep.get("tuned") and rep.get("merge_tasks") == list(subset)
            and rep.get("methods") == list(methods) and rep.get("seed") == seed
            and (held_out is None or rep.get("held_out") == list(held_out))
            and rep.get("grids") == json.loads(json.dumps(grids or {})))
    return rep if same else None


def findings(results: Sequence[dict], sizes: Sequence[str], ks: Sequence[int], methods: Sequence[str]) -> list:
    """One ``{"finding", "verdict", "numbers", "text"}`` per finding of the paper, computed from ``results``
    (verdict: ``reproduced``, ``not reproduced`` or ``not enough sizes`` / ``not enough data``)."""
    def vals(key, **match):
        return [r[key] for r in results if all(r[k] == v for k, v in match.items()) and r[key] is not None]

    out = []
    norm = {s: _mean(vals("mean_normalised_accuracy", size=s)) for s in sizes}
    if len(sizes) < 2:
        verdict, text = "not enough sizes", f"only one base size ({sizes[0]})"
    elif any(v is None for v in norm.values()):
        verdict, text = "not enough data", "a size has no normalised accuracy"
    else:
        up = all(norm[a] < norm[b] for a, b in zip(sizes, sizes[1:]))
        verdict = "reproduced" if up else "not reproduced"
        text = "mean normalised held-in accuracy by size: " + ", ".join(f"{s} {100 * norm[s]:.1f}%" for s in sizes)
    out.append({"finding": "larger base merges better", "verdict": verdict, "numbers": norm, "text": text})

    held = {s: {k: _mean(vals("mean_held_out_accuracy", size=s, k=k)) for k in ks} for s in sizes}
    lo, hi = min(ks), max(ks)
    if len(ks) < 2 or any(held[s][lo] is None or held[s][hi] is None for s in sizes):
        verdict, text = "not enough data", "needs two or more expert counts and held-out tasks"
    else:
        better = [held[s][hi] > held[s][lo] for s in sizes]
        verdict = "reproduced" if all(better) else "partly reproduced" if any(better) else "not reproduced"
        text = "mean held-out accuracy " + "; ".join(
            f"{s}: k={lo} {100 * held[s][lo]:.1f}% -> k={hi} {100 * held[s][hi]:.1f}%" for s in sizes)
    out.append({"finding": "more experts help held-out generalisation", "verdict": verdict,
                "numbers": {s: {str(k): v for k, v in d.items()} for s, d in held.items()}, "text": text})

    spread = {}
    for s in sizes:
        per = [_mean(vals("mean_normalised_accuracy", size=s, method=m)) for m in methods]
        per = [p for p in per if p is not None]
        spread[s] = max(per) - min(per) if len(per) >= 2 else None
    if len(sizes) < 2:
        verdict, text = "not enough sizes", f"only one base size ({sizes[0]})"
    elif any(v is None for v in spread.values()):
        verdict, text = "not enough data", "needs two or more methods with results at every size"
    else:
        down = all(spread[a] > spread[b] for a, b in zip(sizes, sizes[1:]))
        verdict = "reproduced" if down else "not reproduced"
        text = ("spread (max - min over methods) of mean normalised held-in accuracy by size: "
                + ", ".join(f"{s} {100 * spread[s]:.1f} points" for s in sizes))
    out.append({"finding": "methods' differences shrink with scale", "verdict": verdict, "numbers": spread,
                "text": text})
    return out


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def write_markdown(study: dict, path: Path) -> None:
    lines = ["# llmmix scale study (What Matters for Model Merging at Scale, in miniature)", "",
             f"Command: `{study.get('command') or '(python API)'}`", "",
             f"Expert order (seed {study['order_seed']}; the first k are merged): "
             + "; ".join(f"{s}: {', '.join(o)}" for s, o in study["order"].items()), "",
             f"Held-out tasks: {', '.join(study['held_out']) or 'none'}. Coefficients tuned on the validation "
             "splits of the merged tasks; normalised = merged / expert test accuracy, mean over merged tasks.", "",
             "| size | k | method | variant | params | normalised held-in (%) | held-out (%) | collapsed |",
             "|---|---|---|---|---|---|---|---|"]
    for r in study["results"]:
        params = ", ".join(f"{k}={v}" for k, v in sorted((r.get("params") or {}).items()) if k != "weight")
        lines.append(f"| {r['size']} | {r['k']} | {r['method']} | {r['variant']} | {params} | "
                     f"{_pct(r['mean_normalised_accuracy'])} | {_pct(r['mean_held_out_accuracy'])} | "
                     f"{'yes' if r.get('collapsed') else 'no'} |")
    lines += ["", "## Findings of the paper, checked on these numbers", ""]
    for f in study["findings"]:
        lines.append(f"- **{f['finding']}**: {f['verdict']} ({f['text']}).")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def run_scale(sizes: Sequence[str], experts: Sequence[int], methods: Sequence[str], out: Path,
              root: Optional[Path] = None, held_out: Optional[Sequence[str]] = None,
              examples: Optional[dict] = None, order_seed: int = 0, seed: int = 0, grids: Optional[dict] = None,
              command: str = "", log: Callable[[str], None] = print, device: str = "cpu",
              threads: Optional[int] = None, resume: bool = False) -> dict:
    """Run the study (see the module doc); ``scale.json`` is rewritten after every ``(size, k)``. With
    ``resume``, a ``(size, k)`` whose report is complete and was made with the same experts, methods,
    held-out tasks, seed and grids is read back instead of rerun."""
    from mergelab.evaluate.plots import write_scale_chart
    from mergelab.llmmix.pretrain import default_root
    from mergelab.llmmix.run import run_llmmix

    root = Path(root) if root else default_root()
    out = Path(out)
    ks = sorted(set(int(k) for k in experts))
    if not sizes or not ks or not methods:
        raise MergeLabError("bench scale: --sizes, --experts and --methods must each name at least one value")
    if ks[0] < 2:
        raise MergeLabError(f"--experts {','.join(map(str, ks))}: a merge needs at least 2 experts")
    order = {}
    for size in sizes:
        prep = root / f"experts-{size}" / "prepare.json"
        if not prep.is_file():
            raise MergeLabError(f"{prep}: no prepared experts of size {size} (run `mergelab bench prepare "
                                f"--suite llmmix --size {size}`)")
        tasks = json.loads(prep.read_text(encoding="utf-8")).get("tasks") or []
        if len(tasks) < ks[-1]:
            raise MergeLabError(f"{prep}: {len(tasks)} experts prepared for size {size}, --experts asks for {ks[-1]}")
        order[size] = expert_order(tasks, order_seed)
    study = {"suite": "llmmix", "sizes": list(sizes), "experts": ks, "methods": list(methods), "order_seed": order_seed,
             "order": order, "held_out": [], "command": command, "results": [], "findings": [], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for k in ks:
            subset = order[size][:k]
            run_dir = out / size / f"k{k}"
            log(f"scale: size {size}, k={k}: {', '.join(subset)}")
            rep = _reusable(run_dir, subset, methods, held_out, seed, grids) if resume else None
            if rep is not None:
                log(f"scale: reusing {run_dir / 'report.json'}")
            else:
                rep = run_llmmix(methods, run_dir, size, root, merge_tasks=subset, held_out=held_out, sizes=examples,
                                 tune=True, seed=seed, grids=grids, log=log, device=device, threads=threads)
            study["held_out"] = rep["held_out"]
            for m in methods:
                row = _pick(rep["rows"], m)
                if row is None:
                    study["results"].append({"size": size, "k": k, "experts": subset, "method": m, "variant": None,
                                             "params": None, "mean_normalised_accuracy": None,
                                             "mean_held_out_accuracy": None, "mean_accuracy": None,
                                             "status": "failed", "report": str(run_dir / "report.json")})
                    continue
                mt = row["metrics"]
                study["results"].append({
                    "size": size, "k": k, "experts": subset, "method": m, "variant": row["variant"],
                    "params": row.get("params"), "mean_normalised_accuracy": mt["mean_normalised_accuracy"],
                    "mean_held_out_accuracy": mt.get("mean_held_out_accuracy"), "mean_accuracy": mt["mean_accuracy"],
                    "collapsed": row.get("collapsed"), "status": "ok", "row": row["name"],
                    "report": str(run_dir / "report.json")})
            (out / "scale.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    study["findings"] = findings(study["results"], list(sizes), ks, list(methods))
    study["complete"] = True
    (out / "scale.json").write_text(json.dumps(study, indent=1), encoding="utf-8")
    write_markdown(study, out / "scale.md")
    write_scale_chart(study, out / "scale.png")
    return study
