"""Bench reports: ``report.json`` (everything, including per-example correctness), ``report.md``
(the leaderboard table and the coefficient searches) and PNG charts beside them.

Every file is written to ``<name>.partial`` first and renamed, so a reader never sees half a file.
"""

from __future__ import annotations

import json
from pathlib import Path


def _pct(x) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _params(row: dict) -> str:
    p = row.get("params") or {}
    return ", ".join(f"{k}={v}" for k, v in p.items() if k != "weight") or ("–" if row["kind"] == "merge" else "")


def markdown(report: dict) -> str:
    """The leaderboard (accuracies in %), the sizes of merges that stay adapters (``bench run
    --adapter-merges``) and, per tuned method, every value tried on validation."""
    tasks, held = report["merge_tasks"], report["held_out"]
    head = ["model", "coefficients", "mean acc", "norm. acc", "neg. flips", "held-out acc"] + tasks + \
        [f"{h} (held out)" for h in held] + ["merge s", "merge peak MiB"]
    ppl = any("perplexity" in r for r in report["rows"])  # causal-LM suites: the collapse guard
    if ppl:
        head += ["held-out text ppl", "ppl / base"]
    lines = [f"Suite `{report['suite']}` ({report['suite_fingerprint']}); merged tasks: {', '.join(tasks)}; "
             f"held out: {', '.join(held) or 'none'}. Accuracy, normalised accuracy (merged / expert) and "
             "negative-flip rate (expert right, model wrong) on the test splits"
             + (f" (the first {report['eval_limit']} examples of each)" if report.get("eval_limit") else "")
             + ", in %.", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    if any("perplexity" in r for r in report["rows"]):
        lines[0] += (f" Perplexity on a held-out general text ({report.get('perplexity_text', {}).get('source', '?')}); "
                     f"**collapsed**: more than {report.get('collapse_ratio', 2):g}x the base's.")
    if not report.get("complete", True):
        done = sorted({r["method"] for r in report["rows"] if r.get("method")})
        lines[:0] = [f"**Incomplete run** (so far: {', '.join(done)}; requested: {', '.join(report['methods'])}).", ""]
    for row in report["rows"]:
        if row.get("status") != "ok":
            continue
        m = row["metrics"]
        cells = [row["name"], _params(row), _pct(m["mean_accuracy"]), _pct(m["mean_normalised_accuracy"]),
                 _pct(m["mean_negative_flip_rate"]), _pct(m.get("mean_held_out_accuracy"))]
        cells += [_pct(m["accuracy"][t]) for t in tasks]
        cells += [_pct((m.get("held_out_accuracy") or {}).get(h)) for h in held]
        cells += [f"{row['merge_seconds']:.2f}" if "merge_seconds" in row else "–",
                  f"{row['merge_peak_mib']:.0f}" if "merge_peak_mib" in row else "–"]
        if ppl:
            ratio = row.get("perplexity_ratio")
            cells += [f"{row['perplexity']:.2f}" if "perplexity" in row else "–",
                      "–" if ratio is None else f"{ratio:.2f}" + (" **collapsed**" if row.get("collapsed") else "")]
        lines.append("| " + " | ".join(cells) + " |")
    skipped = [r for r in report["rows"] if r.get("status") != "ok"]
    if skipped:
        lines += ["", "Not run:", ""]
        lines += [f"- {r['name']}: {r['status']}: {r.get('reason', '')}" for r in skipped]
    noted = [r for r in report["rows"] if r.get("status") == "ok" and r.get("note")]
    if noted:
        lines += ["", "Notes:", ""]
        lines += [f"- {r['name']}: {r['note']}" for r in noted]
    adapters = [r for r in report["rows"] if r.get("status") == "ok" and "adapter_bytes" in r]
    if adapters:
        lines += ["", "Adapter merges (merge seconds and peak MiB of `mergelab merge` alone; adapter bytes of "
                  "`adapter_model.safetensors`; max trunc. error: the largest per-module relative Frobenius error "
                  "of the truncation, from the merged adapter's `mergelab.json`):", "",
                  "| model | coefficients | mean acc | norm. acc | merge s | peak MiB | adapter bytes (rank) | "
                  "max trunc. error |", "|---|---|---:|---:|---:|---:|---:|---:|"]
        for r in adapters:
            err = r.get("max_relative_truncation_error")
            err = "–" if err is None else "0 (exact)" if err == 0 else f"{err:.3f}"
            lines.append(f"| {r['name']} | {_params(r)} | {_pct(r['metrics']['mean_accuracy'])} | "
                         f"{_pct(r['metrics']['mean_normalised_accuracy'])} | {r['merge_seconds']:.2f} | "
                         f"{r['merge_peak_mib']:.0f} | {r['adapter_bytes']:,} ({r['adapter_rank']}) | {err} |")
    searched = [r for r in report["rows"] if r.get("search")]
    if searched:
        lines += ["", "Coefficients tried (mean validation accuracy, %; the chosen one in bold):", ""]
        for r in searched:
            chosen = r["params"]
            tried = []
            for s in r["search"]:
                text = ", ".join(f"{k}={v}" for k, v in s["params"].items() if k != "weight")
                text = f"{text}: {_pct(s['validation_mean_accuracy'])}"
                tried.append(f"**{text}**" if s["params"] == chosen else text)
            lines.append(f"- {r['method']}: " + "; ".join(tried))
    return "\n".join(lines) + "\n"


def write_report(report: dict, out: Path) -> list:
    """Write ``report.json``, ``report.md`` and the charts into ``out``; returns the paths written."""
    from mergelab.evaluate.plots import write_charts

    out.mkdir(parents=True, exist_ok=True)
    paths = [out / "report.json", out / "report.md"]
    _atomic_write(paths[0], json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    _atomic_write(paths[1], markdown(report))
    paths += write_charts(report, out)
    return paths
