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
(mean normalised accuracy rises with size), an instruction-tuned base merges better (``SIZE-instruct``
against ``SIZE``, both given; :mod:`mergelab.llmmix.instruct`), more experts help held-out
generalisation (mean held-out accuracy at the largest ``k`` above that at the smallest, per size), and
the methods' differences shrink with scale (the spread, max - min over methods of normalised accuracy
averaged over ``k``, falls with size). Sizes are taken in the order given, smallest first; the
instruction-tuned variants enter only their own finding. A difference smaller than
:data:`MIN_EFFECT` (two points) counts as no difference: with 200 test examples per task one
example is half a point, and the merges' rows share their experts, so smaller gaps are noise here.

The expert order is drawn once over every task prepared for any of the sizes, so a size with fewer
experts prepared (an instruction-tuned variant with the first four, say) merges the same subsets at
the ``k`` it has.
"""

from __future__ import annotations

import json
import random
from functools import partial
from pathlib import Path
from typing import Callable, Optional, Sequence

from mergelab.errors import MergeLabError


def expert_order(tasks: Sequence[str], seed: int = 0) -> list:
    """The tasks in one fixed order drawn with ``seed`` (sorted first, so the order does not depend on
    how they were listed); the first ``k`` are the experts merged at ``k``."""
    order = sorted(tasks)
    random.Random(seed).shuffle(order)
    return order


MIN_EFFECT = 0.02


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def _pick(rows: Sequence[dict], method: str) -> Optional[dict]:
    """The method's tuned row, else its default row (methods without a grid), else None."""
    ok = {r.get("variant"): r for r in rows if r.get("method") == method and r.get("status") == "ok"}
    return ok.get("tuned") or ok.get("default")


def _reusable(run_dir: Path, subset, methods, held_out, seed, grids, identity: Callable[[list], tuple]) -> Optional[dict]:
    """The complete report in ``run_dir`` when it measured this ``(size, k)`` exactly as asked: same tasks,
    methods, seed, grids and held-out tasks, the same task data and the same experts (``identity(held)``
    gives the current ``(suite_fingerprint, experts_fingerprint)``; a report older than the experts'
    fingerprint is checked on its task data only); otherwise None (it is rerun)."""
    path = Path(run_dir) / "report.json"
    if not path.is_file():
        return None
    rep = json.loads(path.read_text(encoding="utf-8"))
    same = (rep.get("complete") and rep.get("tuned") and rep.get("merge_tasks") == list(subset)
            and rep.get("methods") == list(methods) and rep.get("seed") == seed
            and (held_out is None or rep.get("held_out") == list(held_out))
            and rep.get("grids") == json.loads(json.dumps(grids or {})))
    if not same:
        return None
    suite, experts = identity(rep.get("held_out") or [])
    # reports written before experts were fingerprinted (2026-12-04) are checked on their task data only
    return rep if rep.get("suite_fingerprint") == suite and rep.get("experts_fingerprint", experts) == experts else None


def _identity(folder: Path, subset, examples, held: list) -> tuple:
    """``(suite_fingerprint, experts_fingerprint)`` of a run merging ``subset`` from ``folder`` today."""
    from mergelab.llmmix.run import experts_fingerprint, suite_fingerprint
    from mergelab.llmmix.tasks import build_task

    tasks, held_tasks = ([build_task(n, sizes=examples) for n in names] for names in (subset, held))
    return suite_fingerprint(tasks, held_tasks), experts_fingerprint(folder, subset)


def findings(results: Sequence[dict], sizes: Sequence[str], ks: Sequence[int], methods: Sequence[str]) -> list:
    """One ``{"finding", "verdict", "numbers", "text"}`` per finding of the paper, computed from ``results``
    (verdict: ``reproduced``, ``partly reproduced``, ``not reproduced``, ``no clear difference`` (every
    gap below :data:`MIN_EFFECT`) or ``not enough sizes`` / ``not enough data``)."""
    from mergelab.llmmix.model import INSTRUCT_SUFFIX, split_size

    def vals(key, **match):
        return [r[key] for r in results if all(r[k] == v for k, v in match.items()) and r[key] is not None]

    def compare(pairs):
        """Verdict for "each pair's second value is larger": gaps below MIN_EFFECT are no difference."""
        gaps = [b - a for a, b in pairs]
        if all(abs(g) < MIN_EFFECT for g in gaps):
            return "no clear difference"
        up = [g >= MIN_EFFECT for g in gaps]
        return "reproduced" if all(up) else "partly reproduced" if any(up) else "not reproduced"

    plain = [s for s in sizes if not split_size(s)[1]]
    out = []
    norm = {s: _mean(vals("mean_normalised_accuracy", size=s)) for s in sizes}
    if len(plain) < 2:
        verdict, text = "not enough sizes", f"only one base size ({', '.join(plain) or 'none'})"
    elif any(norm[s] is None for s in plain):
        verdict, text = "not enough data", "a size has no normalised accuracy"
    else:
        verdict = compare([(norm[a], norm[b]) for a, b in zip(plain, plain[1:])])
        text = "mean normalised held-in accuracy by size: " + ", ".join(f"{s} {100 * norm[s]:.1f}%" for s in plain)
    out.append({"finding": "larger base merges better", "verdict": verdict,
                "numbers": {s: norm[s] for s in plain}, "text": text})

    pairs = [(s, s + INSTRUCT_SUFFIX) for s in plain if s + INSTRUCT_SUFFIX in sizes]
    inst = {}
    for s, si in pairs:  # compare on the (k, method) cells both have
        cells = [(k, m) for k in ks for m in methods
                 if vals("mean_normalised_accuracy", size=s, k=k, method=m)
                 and vals("mean_normalised_accuracy", size=si, k=k, method=m)]
        inst[s] = {key: [_mean([vals(key, size=z, k=k, method=m)[0] for k, m in cells]) for z in (s, si)]
                   for key in ("mean_normalised_accuracy", "mean_held_out_accuracy")}
        inst[s]["cells"] = len(cells)
    if not pairs:
        verdict, text = "not enough sizes", f"no SIZE{INSTRUCT_SUFFIX} given with its SIZE"
    elif any(inst[s]["cells"] == 0 for s, _ in pairs):
        verdict, text = "not enough data", "no (k, method) with results for both bases"
    else:
        verdict = compare([tuple(inst[s]["mean_normalised_accuracy"]) for s, _ in pairs])
        text = "; ".join(
            f"{s} vs {si} over {inst[s]['cells']} (k, method) cells: normalised held-in "
            f"{100 * inst[s]['mean_normalised_accuracy'][0]:.1f}% vs {100 * inst[s]['mean_normalised_accuracy'][1]:.1f}%"
            + ("" if None in inst[s]["mean_held_out_accuracy"] else
               f", held-out {100 * inst[s]['mean_held_out_accuracy'][0]:.1f}% vs "
               f"{100 * inst[s]['mean_held_out_accuracy'][1]:.1f}%") for s, si in pairs)
    out.append({"finding": "instruction-tuned base merges better", "verdict": verdict, "numbers": inst, "text": text})

    held = {s: {k: _mean(vals("mean_held_out_accuracy", size=s, k=k)) for k in ks} for s in sizes}
    have = {s: [k for k in ks if held[s][k] is not None] for s in sizes}
    if any(len(have[s]) < 2 for s in sizes):
        verdict, text = "not enough data", "needs two or more expert counts and held-out tasks"
    else:
        verdict = compare([(held[s][have[s][0]], held[s][have[s][-1]]) for s in sizes])
        text = "mean held-out accuracy " + "; ".join(
            f"{s}: k={have[s][0]} {100 * held[s][have[s][0]]:.1f}% -> k={have[s][-1]} {100 * held[s][have[s][-1]]:.1f}%"
            for s in sizes)
    out.append({"finding": "more experts help held-out generalisation", "verdict": verdict,
                "numbers": {s: {str(k): v for k, v in d.items()} for s, d in held.items()}, "text": text})

    spread = {}
    for s in plain:
        per = [_mean(vals("mean_normalised_accuracy", size=s, method=m)) for m in methods]
        per = [p for p in per if p is not None]
        spread[s] = max(per) - min(per) if len(per) >= 2 else None
    if len(plain) < 2:
        verdict, text = "not enough sizes", f"only one base size ({', '.join(plain) or 'none'})"
    elif any(v is None for v in spread.values()):
        verdict, text = "not enough data", "needs two or more methods with results at every size"
    else:
        # shrinking spread: the larger size's spread is the "first" value of each pair
        verdict = compare([(spread[b], spread[a]) for a, b in zip(plain, plain[1:])])
        text = ("spread (max - min over methods) of mean normalised held-in accuracy by size: "
                + ", ".join(f"{s} {100 * spread[s]:.1f} points" for s in plain))
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
    from mergelab.llmmix.run import prepared_tasks, run_llmmix

    root = Path(root) if root else default_root()
    out = Path(out)
    ks = sorted(set(int(k) for k in experts))
    if not sizes or not ks or not methods:
        raise MergeLabError("bench scale: --sizes, --experts and --methods must each name at least one value")
    if ks[0] < 2:
        raise MergeLabError(f"--experts {','.join(map(str, ks))}: a merge needs at least 2 experts")
    prepared = {}
    for size in sizes:
        prep = root / f"experts-{size}" / "prepare.json"
        if not prep.is_file():
            raise MergeLabError(f"{prep}: no prepared experts of size {size} (run `mergelab bench prepare "
                                f"--suite llmmix --size {size}`)")
        rec = json.loads(prep.read_text(encoding="utf-8"))
        prepared[size] = set(prepared_tasks(rec))
    everything = expert_order(sorted(set().union(*prepared.values())), order_seed)
    order = {}
    for size in sizes:
        if len(prepared[size]) < ks[-1]:
            raise MergeLabError(f"{root / f'experts-{size}' / 'prepare.json'}: {len(prepared[size])} experts prepared "
                                f"for size {size}, --experts asks for {ks[-1]}")
        missing = [t for t in everything[:ks[-1]] if t not in prepared[size]]
        if missing:
            raise MergeLabError(f"{root / f'experts-{size}' / 'prepare.json'}: {len(prepared[size])} experts prepared "
                                f"for size {size}; --experts {ks[-1]} merges {', '.join(everything[:ks[-1]])}, and "
                                f"{', '.join(missing)} is missing (run `mergelab bench prepare --suite llmmix "
                                f"--size {size} --tasks {','.join(missing)}`)")
        order[size] = [t for t in everything if t in prepared[size]]
    study = {"suite": "llmmix", "sizes": list(sizes), "experts": ks, "methods": list(methods), "order_seed": order_seed,
             "order": order, "held_out": [], "command": command, "results": [], "findings": [], "complete": False}
    out.mkdir(parents=True, exist_ok=True)
    for size in sizes:
        for k in ks:
            subset = order[size][:k]
            run_dir = out / size / f"k{k}"
            log(f"scale: size {size}, k={k}: {', '.join(subset)}")
            identity = partial(_identity, root / f"experts-{size}", subset, examples)
            rep = _reusable(run_dir, subset, methods, held_out, seed, grids, identity) if resume else None
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
