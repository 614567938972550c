"""PNG charts of a bench report (matplotlib, no display needed).

* ``accuracy_by_task.png``: test accuracy per merged task, one bar group per task, one bar per model;
* ``normalised_accuracy.png``: mean normalised accuracy (merged / expert) per model, with each task's
  value as a dot;
* ``accuracy_vs_merge_time.png``: mean test accuracy against merge wall time (log scale), references
  drawn as horizontal lines;
* ``scale.png`` (:func:`write_scale_chart`): a scale study's accuracies against the number of experts.
"""

from __future__ import annotations

from pathlib import Path


def _ok(report: dict) -> list:
    return [r for r in report["rows"] if r.get("status") == "ok"]


def _save(fig, path: Path) -> Path:
    tmp = path.with_name(path.stem + ".partial.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    tmp.replace(path)
    return path


def write_charts(report: dict, out: Path) -> list:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, tasks = _ok(report), report["merge_tasks"]
    paths = []
    cmap = plt.get_cmap("tab20")

    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(tasks) + 2), 4.8))
    width = 0.8 / max(1, len(rows))
    for i, r in enumerate(rows):
        xs = [j + (i - (len(rows) - 1) / 2) * width for j in range(len(tasks))]
        ax.bar(xs, [100 * r["metrics"]["accuracy"][t] for t in tasks], width, label=r["name"], color=cmap(i % 20))
    ax.set_xticks(range(len(tasks)), tasks, rotation=20)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"{report['suite']}: accuracy by task")
    ax.legend(fontsize=7, ncol=2, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    paths.append(_save(fig, out / "accuracy_by_task.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(max(6, 0.6 * len(rows) + 2), 4.5))
    for i, r in enumerate(rows):
        m = r["metrics"]
        ax.bar(i, 100 * (m["mean_normalised_accuracy"] or 0), color=cmap(i % 20))
        vals = [v for v in m["normalised_accuracy"].values() if v is not None]
        ax.scatter([i] * len(vals), [100 * v for v in vals], color="black", s=8, zorder=3)
    ax.axhline(100, color="grey", lw=0.8, ls="--")
    ax.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=60, ha="right", fontsize=8)
    ax.set_ylabel("normalised accuracy (% of expert)")
    ax.set_title(f"{report['suite']}: normalised accuracy (bar: mean, dots: tasks)")
    paths.append(_save(fig, out / "normalised_accuracy.png"))
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4.8))
    markers = "osD^v<>PX*"
    for i, r in enumerate(rows):
        acc = 100 * r["metrics"]["mean_accuracy"]
        if "merge_seconds" in r:
            ax.scatter(max(r["merge_seconds"], 1e-3), acc, color=cmap(i % 20), s=36, marker=markers[i % len(markers)],
                       label=r["name"], zorder=3)
        else:  # references have no merge: a horizontal line at their accuracy
            ax.axhline(acc, color=cmap(i % 20), lw=1.2, ls=":", label=r["name"])
    ax.legend(fontsize=7, ncol=1 + len(rows) // 16, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_xscale("log")
    ax.set_xlabel("merge wall time (s, log scale)")
    ax.set_ylabel("mean test accuracy (%)")
    ax.set_title(f"{report['suite']}: accuracy against merge time")
    paths.append(_save(fig, out / "accuracy_vs_merge_time.png"))
    plt.close(fig)
    return paths


def write_scale_chart(study: dict, path: Path) -> Path:
    """``scale.png`` of a scale study (:mod:`mergelab.llmmix.scale`): one column of panels per base size,
    top row mean normalised held-in accuracy, bottom row mean held-out accuracy, x = number of experts,
    one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sizes, methods, ks = study["sizes"], study["methods"], study["experts"]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(2, len(sizes), figsize=(4.2 * len(sizes) + 1.5, 7), squeeze=False, sharey="row")
    for j, size in enumerate(sizes):
        for i, m in enumerate(methods):
            pts = {r["k"]: r for r in study["results"] if r["size"] == size and r["method"] == m}
            for row, key in enumerate(("mean_normalised_accuracy", "mean_held_out_accuracy")):
                xs = [k for k in ks if k in pts and pts[k][key] is not None]
                axes[row][j].plot(xs, [100 * pts[k][key] for k in xs], marker="os^Dv"[i % 5], color=cmap(i % 10),
                                  label=m)
        axes[0][j].set_title(f"base {size}")
        axes[0][j].axhline(100, color="grey", lw=0.8, ls="--")
        axes[1][j].set_xlabel("number of experts merged")
        for row in (0, 1):
            axes[row][j].set_xticks(ks)
        axes[1][j].set_ylim(-2, 102)
    axes[0][0].set_ylabel("normalised held-in accuracy (% of expert)")
    axes[1][0].set_ylabel("held-out accuracy (%)")
    axes[0][-1].legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.suptitle("llmmix: merging at scale (coefficients tuned on validation)")
    out = _save(fig, Path(path))
    plt.close(fig)
    return out
