"""Task-vector diagnostics as additive statistics: pure tensor arithmetic, no files.

For a base ``theta_0`` and models ``theta_1 .. theta_k`` the task vectors are ``tau_i = theta_i - theta_0``
(float32). Every statistic below is built from counts and sums that add up over chunks, tensors,
layers and the whole model, so a model is measured one chunk at a time and a group's numbers are the
sum of its tensors' (:class:`TaskVectorStats` ``+``).

What is measured, per group of coordinates (a tensor, a layer, the whole model):

* **norm** ``||tau_i||_2`` per model, and the **relative norm** ``||tau_i|| / ||theta_0||`` (how far the
  model moved, as a share of the base's own size; ``None`` when the base is all zeros).
* **zero share**: the share of coordinates where ``tau_i`` is exactly ``0`` (the model left the weight
  untouched: frozen modules, LoRA merged into a few modules, DARE-pruned deltas).
* **near-zero share**: the share where ``|tau_i| <= rtol * |theta_0|`` (elementwise, relative to the base
  weight; exact zeros count too). With the default ``rtol = 1e-3`` these are changes below a tenth
  of a percent of the weight, smaller than a bfloat16 rounding step (``2**-9`` relative), i.e.
  changes that storing the merge in bf16 would erase anyway, and that a TIES/DARE trim drops at
  no cost.
* **cosine** ``<tau_i, tau_j> / (||tau_i|| ||tau_j||)`` for every pair, from the accumulated Gram
  matrix of dot products (float64 accumulation); ``None`` when either task vector is zero there.
* **sign conflict**: a coordinate *conflicts* when at least one model's task-vector entry is strictly
  positive and another model's entry at the same coordinate is strictly negative. Exact zeros
  abstain (they neither agree nor disagree). ``conflict_rate`` is the number of conflicting
  coordinates divided by *all* coordinates of the group; ``overlap_rate`` is the share of coordinates
  where at least two models are non-zero (only those can conflict), and ``conflict_in_overlap`` the
  conflicts among them. With one model nothing can conflict and the conflict numbers are ``None``.
* **chance conflicts**: the conflicts expected if each non-zero entry's sign were an independent
  fair coin, given the observed pattern of zeros: a coordinate with ``c >= 2`` non-zero entries is
  conflict-free only if all ``c`` signs agree, so it conflicts with probability ``1 - 2**(1 - c)``.
  ``conflict_vs_chance`` (observed / expected) near 1 means the signs are as unrelated as coin flips;
  well below 1 means the models moved the weights the same way.
* **trimmed conflict** (when a ``density`` is given): the same conflict count after a TIES trim that
  keeps, per tensor and per model, the entries with ``|tau_i|`` at or above the ``max(1, int(d*n))``-th
  largest magnitude (mergekit's per-tensor trim, :func:`mergelab.methods.ties.keep_count`; entries
  tied with the threshold are kept). This is the interference TIES's sign election still has to
  resolve after trimming.

:func:`interpret` turns the numbers into a few sentences for the user; its thresholds are the module
constants below, each with its reason.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Union

import numpy as np
import torch

from mergelab.methods.select import Cut, as_cut, cut_mask

# ---------------------------------------------------------------------------------------------------
# Interpretation thresholds (see interpret()).
#
# HIGH_CONFLICT / LOW_CONFLICT are shares of *all* coordinates. Two dense task vectors with unrelated
# signs conflict on 50% of coordinates, three on 75%: a rate of 25% or more means at least a quarter
# of the weights receive opposing updates that plain averaging shrinks toward zero (the interference
# TIES-Merging's sign election targets, Yadav et al. 2023). Below 5%, cancellation touches one weight
# in twenty and sign election changes little.
HIGH_CONFLICT = 0.25
LOW_CONFLICT = 0.05
# Cosine between task vectors. Random directions in millions of dimensions have |cos| ~ 1/sqrt(n),
# i.e. 0, and task vectors of different fine-tunes of one base are close to orthogonal too (Ilharco
# et al. 2023, "Editing Models with Task Arithmetic", measure small cosines between tasks). Below 0.1
# in magnitude the vectors share almost no direction, so averaging k of them keeps only ~1/k of each
# (a sum, i.e. task arithmetic with lambda near 1, or TIES keeps them whole). At 0.5 and above they
# point the same way (an average behaves like one of them); at -0.1 and below they pull apart.
ORTHOGONAL_COSINE = 0.1
ALIGNED_COSINE = 0.5
OPPOSED_COSINE = -0.1
# One task vector three times longer than another dominates an unweighted merge: after averaging,
# its contribution is three times the other's along their own directions.
NORM_IMBALANCE = 3.0
# Fine-tunes that share their base's basin move the weights by a few percent of their norm; a task
# vector half as long as the base itself suggests a different pre-training run or the wrong base, and
# weight-space interpolation between such models usually fails (no linear mode connectivity).
FAR_FROM_BASE = 0.5
# A task vector that is 90% exact zeros touched only part of the model; one whose entries are mostly
# (50%) below the near-zero tolerance can be trimmed (TIES density / DARE) with little loss.
SPARSE_ZERO_SHARE = 0.9
MOSTLY_NEAR_ZERO = 0.5
# Observed conflicts below half of what coin-flip signs would give: the models agree on direction.
# At 90% of it or more, the signs of the shared coordinates are as unrelated as independent coin flips.
AGREEING_VS_CHANCE = 0.5
UNRELATED_VS_CHANCE = 0.9


@dataclass
class TaskVectorStats:
    """Additive sums over a set of coordinates, for ``k`` task vectors. ``a + b`` pools two sets.

    ``gram[i][j]`` is ``sum tau_i * tau_j`` (so ``gram[i][i]`` is the squared norm); ``zeros[i]`` and
    ``near_zero[i]`` count coordinates; ``conflicts``/``overlap`` count coordinates where two models
    disagree in sign / where at least two are non-zero; ``chance_conflicts`` is the expected conflict
    count under independent fair-coin signs (see the module docstring). The ``trimmed_*`` counts are
    the same after a TIES trim, ``None`` when no density was given.
    """

    k: int
    numel: int = 0
    tensors: int = 0
    base_sumsq: float = 0.0
    gram: np.ndarray = None  # type: ignore[assignment]
    zeros: np.ndarray = None  # type: ignore[assignment]
    near_zero: np.ndarray = None  # type: ignore[assignment]
    conflicts: int = 0
    overlap: int = 0
    chance_conflicts: float = 0.0
    trimmed_conflicts: Optional[int] = None
    trimmed_overlap: Optional[int] = None

    def __post_init__(self) -> None:
        if self.gram is None:
            self.gram = np.zeros((self.k, self.k), dtype=np.float64)
        if self.zeros is None:
            self.zeros = np.zeros(self.k, dtype=np.int64)
        if self.near_zero is None:
            self.near_zero = np.zeros(self.k, dtype=np.int64)

    # ----------------------------------------------------------------- pooling
    def __add__(self, other: "TaskVectorStats") -> "TaskVectorStats":
        if other.k != self.k:
            raise ValueError(f"cannot pool statistics of {self.k} and {other.k} models")

        def opt(a, b):
            return None if a is None and b is None else (a or 0) + (b or 0)

        return TaskVectorStats(
            k=self.k, numel=self.numel + other.numel, tensors=self.tensors + other.tensors,
            base_sumsq=self.base_sumsq + other.base_sumsq, gram=self.gram + other.gram,
            zeros=self.zeros + other.zeros, near_zero=self.near_zero + other.near_zero,
            conflicts=self.conflicts + other.conflicts, overlap=self.overlap + other.overlap,
            chance_conflicts=self.chance_conflicts + other.chance_conflicts,
            trimmed_conflicts=opt(self.trimmed_conflicts, other.trimmed_conflicts),
            trimmed_overlap=opt(self.trimmed_overlap, other.trimmed_overlap),
        )

    @staticmethod
    def pool(items: Sequence["TaskVectorStats"], k: int) -> "TaskVectorStats":
        out = TaskVectorStats(k)
        for s in items:
            out = out + s
        return out

    # ----------------------------------------------------------------- derived numbers
    @property
    def norms(self) -> List[float]:
        return [math.sqrt(max(float(self.gram[i, i]), 0.0)) for i in range(self.k)]

    @property
    def relative_norms(self) -> List[Optional[float]]:
        b = math.sqrt(self.base_sumsq)
        return [n / b if b > 0 else None for n in self.norms]

    @property
    def zero_share(self) -> List[Optional[float]]:
        return [int(z) / self.numel if self.numel else None for z in self.zeros]

    @property
    def near_zero_share(self) -> List[Optional[float]]:
        return [int(z) / self.numel if self.numel else None for z in self.near_zero]

    @property
    def cosine(self) -> List[List[Optional[float]]]:
        """``k x k`` cosine matrix (diagonal exactly 1); ``None`` where either task vector is zero."""
        n = self.norms
        out: List[List[Optional[float]]] = []
        for i in range(self.k):
            row: List[Optional[float]] = []
            for j in range(self.k):
                if n[i] == 0 or n[j] == 0:
                    row.append(None)
                elif i == j:
                    row.append(1.0)
                else:
                    row.append(max(-1.0, min(1.0, float(self.gram[i, j]) / (n[i] * n[j]))))
            out.append(row)
        return out

    @property
    def mean_cosine(self) -> Optional[float]:
        """Mean of the defined off-diagonal cosines (each pair once); ``None`` if there is none."""
        c = self.cosine
        vals = [c[i][j] for i in range(self.k) for j in range(i + 1, self.k) if c[i][j] is not None]
        return sum(vals) / len(vals) if vals else None

    def _rate(self, count) -> Optional[float]:
        if self.k < 2 or count is None or not self.numel:
            return None
        return count / self.numel

    @property
    def conflict_rate(self) -> Optional[float]:
        return self._rate(self.conflicts)

    @property
    def overlap_rate(self) -> Optional[float]:
        return self._rate(self.overlap)

    @property
    def conflict_in_overlap(self) -> Optional[float]:
        return self.conflicts / self.overlap if self.k >= 2 and self.overlap else None

    @property
    def chance_conflict_rate(self) -> Optional[float]:
        return self._rate(self.chance_conflicts)

    @property
    def conflict_vs_chance(self) -> Optional[float]:
        return self.conflicts / self.chance_conflicts if self.k >= 2 and self.chance_conflicts > 0 else None

    @property
    def trimmed_conflict_rate(self) -> Optional[float]:
        return self._rate(self.trimmed_conflicts)

    @property
    def trimmed_overlap_rate(self) -> Optional[float]:
        return self._rate(self.trimmed_overlap)

    def to_dict(self) -> dict:
        """Every count and derived number, JSON-ready (``None`` for undefined values)."""
        d = {
            "numel": self.numel, "tensors": self.tensors,
            "norms": self.norms, "relative_norms": self.relative_norms,
            "zero_share": self.zero_share, "near_zero_share": self.near_zero_share,
            "cosine": self.cosine, "mean_cosine": self.mean_cosine,
            "dot": self.gram.tolist(),
            "conflicts": self.conflicts, "overlap": self.overlap,
            "conflict_rate": self.conflict_rate, "overlap_rate": self.overlap_rate,
            "conflict_in_overlap": self.conflict_in_overlap,
            "chance_conflict_rate": self.chance_conflict_rate, "conflict_vs_chance": self.conflict_vs_chance,
        }
        if self.trimmed_conflicts is not None:
            d.update({"trimmed_conflicts": self.trimmed_conflicts, "trimmed_overlap": self.trimmed_overlap,
                      "trimmed_conflict_rate": self.trimmed_conflict_rate,
                      "trimmed_overlap_rate": self.trimmed_overlap_rate})
        return d


def _conflicts(deltas: torch.Tensor) -> tuple:
    """(conflicting coordinates, coordinates with >= 2 non-zero entries, expected conflicts under
    fair-coin signs) of ``deltas`` ``[k, m]``.

    A coordinate conflicts iff its largest entry is > 0 and its smallest < 0 (zeros abstain).
    """
    k = deltas.shape[0]
    conflicts = int(((deltas.amax(dim=0) > 0) & (deltas.amin(dim=0) < 0)).sum())
    per_coord = (deltas != 0).sum(dim=0)
    hist = torch.bincount(per_coord, minlength=k + 1).tolist()  # coordinates with c non-zero entries
    overlap = sum(hist[2:])
    chance = sum(n * (1.0 - 2.0 ** (1 - c)) for c, n in enumerate(hist) if c >= 2)
    return conflicts, overlap, chance


def chunk_stats(base: torch.Tensor, deltas: torch.Tensor, rtol: float = 1e-3,
                thresholds: Optional[Sequence[Union[Cut, float]]] = None, offset: int = 0) -> TaskVectorStats:
    """Statistics of one chunk: ``base`` of any shape, ``deltas`` ``[k, *base.shape]`` (float32).

    ``thresholds`` (one per model, from a TIES trim over the whole tensor: a :class:`Cut` keeps exactly
    its count, ties at the threshold by flat index; a plain number keeps every ``|tau_i| >=`` it) also
    counts the conflicts left among the kept entries; the chunk's first entry has flat index ``offset``
    in its tensor. NaN or inf in the inputs shows as a non-finite ``base_sumsq`` or squared norm
    (squares of float32 values cannot overflow float64).
    """
    k = deltas.shape[0]
    d = deltas.reshape(k, -1)
    b = base.reshape(-1)
    if d.shape[1] != b.numel():
        raise ValueError(f"deltas hold {d.shape[1]} entries per model, base {b.numel()}")
    d64 = d.to(torch.float64)
    gram = (d64 @ d64.T).cpu().numpy()
    del d64
    absd = d.abs()
    zeros = (d == 0).sum(dim=1).cpu().numpy().astype(np.int64)
    near = (absd <= rtol * b.abs()).sum(dim=1).cpu().numpy().astype(np.int64)
    conflicts, overlap, chance = _conflicts(d)
    s = TaskVectorStats(k=k, numel=b.numel(), tensors=0, base_sumsq=float(torch.dot(b.double(), b.double())),
                        gram=gram, zeros=zeros, near_zero=near, conflicts=conflicts, overlap=overlap,
                        chance_conflicts=chance)
    if thresholds is not None:
        keep = torch.stack([cut_mask(absd[i], as_cut(t), offset) for i, t in enumerate(thresholds)])
        kept = torch.where(keep, d, torch.zeros((), dtype=d.dtype, device=d.device))
        s.trimmed_conflicts, s.trimmed_overlap, _ = _conflicts(kept)
    return s


# ---------------------------------------------------------------------------------------------------
# Groups and the whole result

EMBEDDINGS = "embeddings"
OTHER = "other"
OVERALL = "overall"


@dataclass
class GroupStats:
    """One row of the per-layer table: ``name`` is ``embeddings``, the layer index as text, or ``other``."""

    name: str
    layer: Optional[int]
    stats: TaskVectorStats

    def to_dict(self) -> dict:
        return {"group": self.name, "layer": self.layer, **self.stats.to_dict()}


@dataclass
class Diagnostics:
    """Everything ``mergelab inspect`` measured: per tensor, per group (layer), and overall."""

    base: dict
    models: List[dict]
    settings: dict
    overall: TaskVectorStats
    groups: List[GroupStats]
    tensors: Dict[str, TaskVectorStats]
    tensor_groups: Dict[str, str]
    skipped: List[dict] = field(default_factory=list)
    interpretation: List[str] = field(default_factory=list)

    @property
    def labels(self) -> List[str]:
        return [m["label"] for m in self.models]

    def to_dict(self) -> dict:
        o = self.overall
        per_model = [
            {**m, "norm": o.norms[i], "relative_norm": o.relative_norms[i],
             "zero_share": o.zero_share[i], "near_zero_share": o.near_zero_share[i]}
            for i, m in enumerate(self.models)
        ]
        return {
            "schema": "mergelab.inspect/1",
            "base": self.base,
            "models": per_model,
            "settings": self.settings,
            "definitions": DEFINITIONS,
            "overall": o.to_dict(),
            "groups": [g.to_dict() for g in self.groups],
            "tensors": [{"name": n, "group": self.tensor_groups[n], **s.to_dict()} for n, s in self.tensors.items()],
            "skipped": self.skipped,
            "interpretation": self.interpretation,
        }


DEFINITIONS = {
    "task_vector": "tau_i = theta_i - theta_base, float32",
    "norm": "L2 norm of tau_i over the group's coordinates",
    "relative_norm": "||tau_i|| / ||theta_base|| over the group",
    "zero_share": "share of coordinates with tau_i exactly 0",
    "near_zero_share": "share of coordinates with |tau_i| <= rtol * |theta_base| (exact zeros included)",
    "cosine": "<tau_i, tau_j> / (||tau_i|| ||tau_j||); null where either is zero",
    "conflict_rate": "share of all coordinates where one model's tau entry is > 0 and another's < 0 "
                     "(zeros abstain)",
    "overlap_rate": "share of coordinates where at least two models' tau entries are non-zero",
    "conflict_in_overlap": "conflicts / overlapping coordinates",
    "chance_conflict_rate": "expected conflict rate if every non-zero sign were an independent fair coin: "
                            "a coordinate with c >= 2 non-zero entries conflicts with probability 1 - 2^(1-c)",
    "conflict_vs_chance": "conflicts / expected conflicts under fair-coin signs",
    "trimmed_conflict_rate": "conflict_rate after a per-tensor TIES trim keeping max(1, int(density*n)) "
                             "largest-magnitude entries per model (ties at the threshold kept)",
    "groups": "one per transformer block (mergelab.plan.layer_index); tensors outside blocks are "
              "'embeddings' (names with embed, wte, wpe, lm_head or shared.weight) or 'other'",
}


# ---------------------------------------------------------------------------------------------------
# Interpretation

def layer_ranges(layers: Sequence[int]) -> str:
    """``[0, 1, 2, 5, 7, 8]`` -> ``"0-2, 5, 7-8"``."""
    out: List[str] = []
    xs = sorted(set(layers))
    i = 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ", ".join(out)


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _names(items) -> str:
    return ", ".join(n for n, _ in items)


def _values(items, fmt) -> str:
    f = fmt.format if isinstance(fmt, str) else fmt
    return ", ".join(f(v) for _, v in items)


def interpret(overall: TaskVectorStats, groups: Sequence[GroupStats], labels: Sequence[str]) -> List[str]:
    """A few plain sentences on what the numbers mean for a merge (thresholds: module constants)."""
    lines: List[str] = []
    k = overall.k
    norms = overall.norms
    for i, lab in enumerate(labels):
        if norms[i] == 0:
            lines.append(f"{lab} is identical to the base in every compared tensor: it adds nothing to a merge.")
    far = [(labels[i], r) for i, r in enumerate(overall.relative_norms) if r is not None and r >= FAR_FROM_BASE]
    if far:
        lines.append(
            f"{_names(far)} moved far from the base (||tau|| / ||base|| = {_values(far, '{:.2f}')}): "
            f"{'it' if len(far) == 1 else 'they'} may not be fine-tuned from this base; weight-space merging "
            f"usually fails across different pre-trainings.")
    sparse, small = [], []
    for i, z in enumerate(overall.zero_share):
        if norms[i] == 0 or z is None:
            continue
        if z >= SPARSE_ZERO_SHARE:
            sparse.append((labels[i], z))
        elif overall.near_zero_share[i] >= MOSTLY_NEAR_ZERO:
            small.append((labels[i], overall.near_zero_share[i]))
    if sparse:
        lines.append(f"{_names(sparse)} left {_values(sparse, _pct)} of the weights exactly unchanged: sparse "
                     f"task vectors interfere with the others only where they are non-zero.")
    if small:
        lines.append(f"{_values(small, _pct)} of the task-vector entries of {_names(small)} are zero or below "
                     f"the near-zero tolerance: a TIES trim or DARE drop removes them at little cost.")
    live = [n for n in norms if n > 0]
    if len(live) >= 2 and max(live) / min(live) >= NORM_IMBALANCE:
        hi = labels[norms.index(max(live))]
        lo = labels[norms.index(min(live))]
        lines.append(f"{hi}'s task vector is {max(live) / min(live):.1f}x longer than {lo}'s: an unweighted "
                     f"merge is dominated by {hi}; consider per-model weights.")
    if k < 2:
        lines.append("one model: no similarity or sign conflict to measure (give two or more models).")
        return lines

    mc = overall.mean_cosine
    if mc is not None:
        if abs(mc) < ORTHOGONAL_COSINE:
            lines.append(f"mean cosine {mc:+.2f}: the task vectors are nearly orthogonal; a simple average "
                         f"keeps only about 1/{k} of each, so prefer task arithmetic (a sum, lambda near 1) "
                         f"or TIES over plain averaging.")
        elif mc >= ALIGNED_COSINE:
            lines.append(f"mean cosine {mc:+.2f}: the models moved the same way; averaging is safe and "
                         f"behaves much like any one of them.")
        elif mc <= OPPOSED_COSINE:
            lines.append(f"mean cosine {mc:+.2f}: the task vectors pull in opposite directions; a merge "
                         f"cancels part of each, expect one task to lose.")
        else:
            lines.append(f"mean cosine {mc:+.2f}: the task vectors share part of their direction; "
                         f"averaging keeps the shared part and dilutes the rest.")
        c = overall.cosine
        opposed = [(labels[i], labels[j], c[i][j]) for i in range(k) for j in range(i + 1, k)
                   if c[i][j] is not None and c[i][j] <= OPPOSED_COSINE]
        if opposed and mc > OPPOSED_COSINE:
            a, b, v = min(opposed, key=lambda t: t[2])
            lines.append(f"{a} and {b} pull apart (cosine {v:+.2f}): merging them cancels part of each.")

    rate = overall.conflict_rate
    layered = [g for g in groups if g.layer is not None and g.stats.conflict_rate is not None]
    high = [g.layer for g in layered if g.stats.conflict_rate >= HIGH_CONFLICT]
    high_other = [g.name for g in groups if g.layer is None and g.stats.conflict_rate is not None
                  and g.stats.conflict_rate >= HIGH_CONFLICT]
    if rate is not None:
        if layered and len(high) == len(layered):
            lines.append(f"high sign conflict in every layer ({_pct(rate)} of coordinates overall): "
                         f"TIES/DARE-style sign election will matter throughout.")
        elif high or high_other:
            where = [f"layer{'s' if len(high) > 1 else ''} {layer_ranges(high)}"] if high else []
            where += [f"the {n} tensors" for n in high_other]
            lines.append(f"high sign conflict in {' and '.join(where)} (>= {_pct(HIGH_CONFLICT)} of "
                         f"coordinates): TIES/DARE-style sign election will matter there.")
        elif rate >= HIGH_CONFLICT:
            lines.append(f"high sign conflict ({_pct(rate)} of coordinates): TIES/DARE-style sign "
                         f"election will matter.")
        elif rate < LOW_CONFLICT:
            lines.append(f"low sign conflict ({_pct(rate)} of coordinates): sign election changes little; "
                         f"plain averaging or task arithmetic loses little to cancellation.")
        else:
            lines.append(f"moderate sign conflict ({_pct(rate)} of coordinates, none of the layers above "
                         f"{_pct(HIGH_CONFLICT)}).")
        vs = overall.conflict_vs_chance
        if vs is not None and vs <= AGREEING_VS_CHANCE:
            lines.append(f"signs agree far more than chance ({vs:.2f}x the coin-flip conflict rate): "
                         f"the models changed shared weights in the same direction.")
        elif vs is not None and vs >= UNRELATED_VS_CHANCE and rate >= LOW_CONFLICT:
            lines.append(f"where the models overlap, their signs are as unrelated as coin flips ({vs:.2f}x "
                         f"the coin-flip conflict rate): no shared direction to preserve by averaging.")
        tr = overall.trimmed_conflict_rate
        if tr is not None:
            lines.append(f"after the TIES trim, {_pct(tr)} of coordinates still conflict "
                         f"(from {_pct(rate)}): that is what sign election has to resolve.")
    return lines
