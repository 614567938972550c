"""Output of ``mergelab inspect``: rich tables, a JSON file, and a PNG figure.

The figure has three panels: the whole-model cosine-similarity heatmap of the task vectors (red:
aligned, blue: opposed, white: orthogonal), the per-layer sign-conflict rate (with the share of
coordinates where two or more models are non-zero, the TIES-trimmed rate when a density was given,
and the "high" threshold as a dotted line), and the per-layer task-vector norm of every model.
"""

from __future__ import annotations

import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

from rich import box
from rich.console import Console
from rich.table import Table

from mergelab.inspect.diagnostics import EMBEDDINGS, HIGH_CONFLICT, Diagnostics, GroupStats

_MAX_NORM_COLUMNS = 4
_MIN_TEXT = 12  # a label column is never narrower than this (or its longest label)
_MAX_LABEL = 10  # longer model labels are shown as #1, #2, ... in column headers (the model table lists both)


def _f(x: Optional[float], fmt: str = "{:.3g}") -> str:
    return "-" if x is None else fmt.format(x)


def _p(x: Optional[float]) -> str:
    if x is None:
        return "-"
    return f"{100 * x:.1f}%"


def _short(group: str) -> str:
    return "emb" if group == EMBEDDINGS else group


def _mean(xs) -> Optional[float]:
    xs = [x for x in xs if x is not None]
    return sum(xs) / len(xs) if xs else None


def model_keys(labels: List[str]) -> List[str]:
    """Column headers for the models: their labels when short, else ``#1``, ``#2``, ..."""
    return list(labels) if all(len(lab) <= _MAX_LABEL for lab in labels) else [f"#{i + 1}" for i in range(len(labels))]


@dataclass
class Column:
    """One column of a report table. ``number`` columns are never wrapped or cut; ``drop`` ranks the
    columns left out first when the table is wider than the console (0: always kept)."""

    header: str
    cells: List[str]
    number: bool = True
    drop: int = 0
    justify: str = "right"


@dataclass
class FittedTable:
    table: Table
    dropped: List[str] = field(default_factory=list)


def _build(title: str, columns: List[Column], styles: List[Optional[str]], sections: List[bool], **kw) -> Table:
    t = Table(title=title, **kw)
    for c in columns:
        if c.number:
            t.add_column(c.header, justify=c.justify, no_wrap=True)
        else:
            t.add_column(c.header, justify=c.justify, overflow="fold")
    for i, style in enumerate(styles):
        t.add_row(*[c.cells[i] for c in columns], style=style, end_section=sections[i])
    return t


def _intact(table: Table, columns: List[Column], width: int) -> bool:
    """Whether ``table`` rendered ``width`` columns wide shows every number whole (none wrapped or cut)."""
    console = Console(width=width, file=io.StringIO(), color_system=None, legacy_windows=False)
    with console.capture() as cap:
        console.print(table)
    text = cap.get()
    if "…" in text:
        return False
    need = Counter(cell for c in columns if c.number for cell in c.cells if cell)
    # text (labels) may wrap, but not into slivers: at least the first _MIN_TEXT characters on one line
    need.update(cell[:_MIN_TEXT] for c in columns if not c.number for cell in [c.header, *c.cells] if cell)
    return all(text.count(cell) >= n for cell, n in need.items())


def fit_table(title: str, columns: List[Column], width: int, styles: Optional[List[Optional[str]]] = None,
              sections: Optional[List[bool]] = None, **kw) -> FittedTable:
    """A table of ``columns`` that fits ``width`` without cutting or wrapping a number: columns are
    left out, highest ``drop`` rank first, until it fits; :attr:`FittedTable.dropped` names them."""
    n = len(columns[0].cells) if columns else 0
    styles = styles or [None] * n
    sections = sections or [False] * n
    kept = list(columns)
    dropped: List[str] = []
    order = sorted((c for c in columns if c.drop), key=lambda c: -c.drop)
    while True:
        table = _build(title, kept, styles, sections, **kw)
        if _intact(table, kept, width) or not order:
            return FittedTable(table, dropped)
        gone = order.pop(0)
        kept.remove(gone)
        dropped.append(gone.header)


def layer_table(diag: Diagnostics, width: int = 10_000) -> FittedTable:
    """Per group (layer): norms, zero share (mean over models), mean cosine, conflict rates."""
    labels = diag.labels
    keys = model_keys(labels)
    trimmed = diag.settings.get("density") is not None
    rows: List[GroupStats] = list(diag.groups)
    groups = rows + [GroupStats("all", None, diag.overall)]
    stats = [g.stats for g in groups]
    columns = [Column("layer", [_short(g.name) for g in groups]), Column("params", [f"{s.numel:,}" for s in stats], drop=2)]
    norms_range = Column("‖τ‖ min / max", [f"{_f(min(s.norms))} / {_f(max(s.norms))}" for s in stats], drop=3)
    per_model = [Column(f"‖τ‖ {key}", [_f(s.norms[i]) for s in stats], drop=20) for i, key in enumerate(keys)]
    columns += [norms_range] if len(labels) > _MAX_NORM_COLUMNS else per_model
    columns += [Column("zero", [_p(_mean(s.zero_share)) for s in stats], drop=5),
                Column("near-0", [_p(_mean(s.near_zero_share)) for s in stats], drop=6),
                Column("cos", [_f(s.mean_cosine, "{:+.3f}") for s in stats]),
                Column("conflict", [_p(s.conflict_rate) for s in stats]),
                Column("overlap", [_p(s.overlap_rate) for s in stats], drop=7)]
    if trimmed:
        columns.append(Column(f"conflict d={diag.settings['density']:g}", [_p(s.trimmed_conflict_rate) for s in stats],
                              drop=4))
    styles = ["bold" if g.name == "all" else None for g in groups]
    sections = [g is rows[-1] for g in groups] if rows else None
    kw = dict(box=box.SIMPLE_HEAD,
              caption="zero, near-0: mean share over the models | cos: mean pairwise cosine | conflict: share "
                      "of coordinates where one model's entry is > 0 and another's < 0 (zeros abstain) | "
                      "overlap: share where two or more models are non-zero")
    fitted = fit_table("task vectors per layer", columns, width, styles, sections, **kw)
    if per_model and any(c.header in fitted.dropped for c in per_model):
        # per-model norms do not fit: their range instead (one column), then the usual order
        columns = [c for c in columns if c not in per_model]
        columns.insert(2, norms_range)
        fitted = fit_table("task vectors per layer", columns, width, styles, sections, **kw)
        fitted.dropped.insert(0, "per-model ‖τ‖ (shown as min / max)")
    return fitted


def model_table(diag: Diagnostics, width: int = 10_000) -> FittedTable:
    """Per model, whole-model numbers."""
    o = diag.overall
    labels = diag.labels
    keys = model_keys(labels)
    columns = [Column("model", list(labels), number=False, justify="left")]
    if keys != list(labels):
        columns.insert(0, Column("#", keys))
    columns += [Column("‖τ‖", [_f(x) for x in o.norms]),
                Column("‖τ‖/‖base‖", [_f(x) for x in o.relative_norms], drop=3),
                Column("zero", [_p(x) for x in o.zero_share], drop=1),
                Column(f"near-0 (rtol {diag.settings['rtol']:g})", [_p(x) for x in o.near_zero_share], drop=2)]
    return fit_table(f"task vectors vs base {diag.base['label']} (whole model)", columns, width)


def cosine_table(diag: Diagnostics, width: int = 10_000) -> FittedTable:
    """The pairwise cosine-similarity matrix of the task vectors (whole model)."""
    keys = model_keys(diag.labels)
    columns = [Column("", keys, justify="left")]
    for j, key in enumerate(keys):
        columns.append(Column(key, [_f(row[j], "{:+.3f}") for row in diag.overall.cosine], drop=1 + j))
    return fit_table("task-vector cosine (whole model)", columns, width)


def _print_fitted(console: Console, fitted: FittedTable, what: str) -> None:
    console.print(fitted.table)
    if fitted.dropped:
        console.print(f"note: {what}: left out to fit {console.width} columns: {', '.join(fitted.dropped)} "
                      f"(a wider terminal, or --json, shows every number)", highlight=False, markup=False)


def print_report(diag: Diagnostics, console: Console) -> None:
    """Tables, the overall conflict numbers, skipped tensors, and the interpretation.

    No number is ever cut or wrapped: a table wider than the console leaves out columns (and says which).
    """
    width = console.width
    _print_fitted(console, layer_table(diag, width), "per-layer table")
    _print_fitted(console, model_table(diag, width), "model table")
    o = diag.overall
    if o.k >= 2:
        _print_fitted(console, cosine_table(diag, width), "cosine table")
        line = (f"sign conflict: {_p(o.conflict_rate)} of coordinates ({o.conflicts:,} of {o.numel:,}); "
                f"{_p(o.overlap_rate)} have two or more non-zero entries, {_p(o.conflict_in_overlap)} of those "
                f"conflict; coin-flip signs would give {_p(o.chance_conflict_rate)}")
        if o.trimmed_conflict_rate is not None:
            line += f"; after a TIES trim at density {diag.settings['density']:g}: {_p(o.trimmed_conflict_rate)}"
        console.print(line, highlight=False)
    if diag.skipped:
        console.print(f"skipped {len(diag.skipped)} tensor(s) (listed in --json):", highlight=False)
        for s in diag.skipped[:5]:
            console.print(f"  {s['tensor']}: {s['reason']}", highlight=False, markup=False)
        if len(diag.skipped) > 5:
            console.print(f"  ... {len(diag.skipped) - 5} more", highlight=False)
    if diag.interpretation:
        console.print("[bold]reading[/bold]")
        for line in diag.interpretation:
            console.print(f"  - {line}", highlight=False, markup=False)


def to_json(diag: Diagnostics) -> str:
    """Every number of the diagnostics as JSON (the ``--json`` format)."""
    return json.dumps(diag.to_dict(), indent=2, allow_nan=False)


def write_json(diag: Diagnostics, path: Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(to_json(diag))


def write_plot(diag: Diagnostics, path: Path) -> None:
    """PNG: cosine heatmap | per-layer conflict rate over per-layer norms."""
    # An Agg canvas on a bare Figure: no pyplot global state, no GUI backend, whatever the process uses.
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    labels = diag.labels
    k = len(labels)
    fig = Figure(figsize=(14, 6.5), dpi=110)
    FigureCanvasAgg(fig)
    gs = fig.add_gridspec(2, 2, width_ratios=[1, 1.5], hspace=0.45, wspace=0.35)

    # ---- heatmap
    ax = fig.add_subplot(gs[:, 0])
    cos = np.array([[np.nan if c is None else c for c in row] for row in diag.overall.cosine], dtype=float)
    im = ax.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(k), labels=labels, rotation=35, ha="right")
    ax.set_yticks(range(k), labels=labels)
    for i in range(k):
        for j in range(k):
            v = cos[i, j]
            txt = "n/a" if math.isnan(v) else ("0.00" if abs(v) < 0.005 else f"{v:+.2f}")
            ax.text(j, i, txt, ha="center", va="center", fontsize=10 if k <= 6 else 7,
                    color="white" if not math.isnan(cos[i, j]) and abs(cos[i, j]) > 0.6 else "black")
    ax.set_title("cosine similarity of task vectors\n(whole model)")
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04)

    # ---- per-layer curves: layers at their index, embeddings before and other after, set apart by a gap
    groups = diag.groups
    layers = [g.layer for g in groups if g.layer is not None]
    lo, hi = (min(layers), max(layers)) if layers else (0, 0)
    gap = max(1.0, (hi - lo) / 12)
    x = np.array([g.layer if g.layer is not None else (lo - gap if g.name == EMBEDDINGS else hi + gap)
                  for g in groups], dtype=float)
    step = max(1, math.ceil(len(layers) / 16))
    shown = layers[::step]
    if layers and layers[-1] - shown[-1] > step / 2:
        shown.append(layers[-1])
    ticks = [(xi, _short(g.name)) for xi, g in zip(x, groups) if g.layer is None or g.layer in shown]

    def nan(v):
        return np.nan if v is None else v

    # Layers are joined by lines; embeddings/other are single markers (not comparable neighbours).
    is_layer = np.array([g.layer is not None for g in groups], dtype=bool)

    def curve(ax, ys, style, **kw):
        ys = np.array(ys, dtype=float)
        line = ax.plot(x[is_layer], ys[is_layer], style, **kw)[0]
        if (~is_layer).any():
            kw.pop("label", None)
            ax.plot(x[~is_layer], ys[~is_layer], style[0], color=line.get_color(),
                    alpha=kw.get("alpha", 1.0), markersize=kw.get("markersize", 6))

    legend = dict(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    ax1 = fig.add_subplot(gs[0, 1])
    if k >= 2:
        curve(ax1, [100 * nan(g.stats.conflict_rate) for g in groups], "o-", color="tab:red", label="sign conflict")
        curve(ax1, [100 * nan(g.stats.overlap_rate) for g in groups], "s--", color="tab:gray", alpha=0.7,
              label="≥2 models non-zero")
        if diag.settings.get("density") is not None:
            curve(ax1, [100 * nan(g.stats.trimmed_conflict_rate) for g in groups], "^-", color="tab:purple",
                  label=f"conflict after\nTIES trim (d={diag.settings['density']:g})")
        ax1.axhline(100 * HIGH_CONFLICT, color="tab:red", linestyle=":", linewidth=1,
                    label=f"high ({100 * HIGH_CONFLICT:.0f}%)")
        ax1.legend(**legend)
    else:
        ax1.text(0.5, 0.5, "sign conflict needs two or more models", ha="center", va="center",
                 transform=ax1.transAxes)
    ax1.set_ylim(0, 100)
    ax1.set_ylabel("% of coordinates")
    ax1.set_title("sign-conflict rate per layer")
    ax1.set_xticks([t for t, _ in ticks], labels=[n for _, n in ticks])
    ax1.grid(alpha=0.3)

    ax2 = fig.add_subplot(gs[1, 1], sharex=ax1)
    positive = [n for g in groups for n in g.stats.norms if n > 0]
    log = bool(positive) and max(positive) / min(positive) > 20
    for i, lab in enumerate(labels):
        # on a log scale a zero norm (model untouched there) has no place: leave a hole
        ys = [np.nan if log and g.stats.norms[i] == 0 else g.stats.norms[i] for g in groups]
        curve(ax2, ys, "o-", markersize=3, label=lab)
    if log:
        ax2.set_yscale("log")
    ax2.set_ylabel("‖τ‖ (L2)")
    ax2.set_xlabel("layer")
    ax2.set_title("task-vector norm per layer")
    ax2.legend(**legend)
    ax2.grid(alpha=0.3)
    ax2.tick_params(labelbottom=True)

    fig.suptitle(f"mergelab inspect: {k} model(s), base {diag.base['label']}", fontsize=12)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", bbox_inches="tight")
