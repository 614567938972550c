"""Weight matching and activation matching: the permutation of model B that best matches model A.

* :func:`weight_matching` is Git Re-Basin's coordinate descent (Ainsworth et al., arXiv 2209.04836,
  Algorithm 1): for each permutation group in a seeded random order, with every other group's
  permutation applied to B, maximise ``sum <W_A, pi(W_B)>_F`` over that group alone; each step is one
  linear assignment problem (``scipy.optimize.linear_sum_assignment``), so the objective never
  decreases; stop after a sweep without gain.
* :func:`activation_matching` runs both models on the same inputs and, per group, maximises the
  uncentred cross-correlation ``sum_x a_A(x) a_B(x)^T`` of the group's units (Git Re-Basin's
  ``E[a b^T]``); groups are independent, so one assignment each.

Attention groups (``kind="heads"``) are solved as whole heads: for each pair of heads the best
within-head assignment of value dims (one LAP each), plus the query/key score of the pair with dims
in place; then one LAP over heads on those scores.
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from scipy.optimize import linear_sum_assignment

from mergelab.align.spec import Axis, Perm, PermutationSpec, head_sigma, identity, permute_tensor
from mergelab.errors import MergeLabError


def _unit_rows(p: Perm, a: Axis, x: torch.Tensor) -> torch.Tensor:
    """``x`` (permuted axis first) as one row per canonical unit."""
    if a.role == "vo_o":
        return x.reshape(p.n_heads, p.group, p.head_dim, -1).transpose(1, 2).reshape(p.size, -1)
    return x.reshape(p.size, -1)


def _head_rows(p: Perm, a: Axis, x: torch.Tensor) -> torch.Tensor:
    """``x`` (query/key axis first) as ``[head, dim, features]`` with dims in place."""
    if a.role == "qk_q":
        return x.reshape(p.n_heads, p.group, p.head_dim, -1).transpose(1, 2).reshape(p.n_heads, p.head_dim, -1)
    return x.reshape(p.n_heads, p.head_dim, -1)


class Similarity:
    """Accumulated similarity of A's units (rows) to B's units (columns) for one group."""

    def __init__(self, p: Perm):
        self.p = p
        self.units = torch.zeros(p.size, p.size, dtype=torch.float64)
        self.heads = torch.zeros(p.n_heads, p.n_heads, dtype=torch.float64) if p.kind == "heads" else None

    def add(self, a: Axis, xa: torch.Tensor, xb: torch.Tensor) -> None:
        """Add one tensor's (or activation's) contribution; the permuted axis is axis 0 of both."""
        xa, xb = xa.double(), xb.double()
        if a.role in ("qk_q", "qk_k"):
            self.heads += torch.einsum("atf,btf->ab", _head_rows(self.p, a, xa), _head_rows(self.p, a, xb))
        else:
            self.units += _unit_rows(self.p, a, xa) @ _unit_rows(self.p, a, xb).T

    def solve(self) -> Tuple[torch.Tensor, float]:
        """The best permutation of B's units for A's and its objective value."""
        S = self.units.numpy()
        if self.p.kind != "heads":
            _, col = linear_sum_assignment(S, maximize=True)
            return torch.as_tensor(col, dtype=torch.long), float(S[np.arange(len(col)), col].sum())
        H, d = self.p.n_heads, self.p.head_dim
        blocks = S.reshape(H, d, H, d).transpose(0, 2, 1, 3)  # [a, b, t, u]
        within = np.zeros((H, H, d), dtype=np.int64)
        score = self.heads.numpy().copy()
        for i in range(H):
            for j in range(H):
                _, c = linear_sum_assignment(blocks[i, j], maximize=True)
                within[i, j] = c
                score[i, j] += blocks[i, j][np.arange(d), c].sum()
        _, sigma = linear_sum_assignment(score, maximize=True)
        pi = np.concatenate([sigma[i] * d + within[i, sigma[i]] for i in range(H)])
        return torch.as_tensor(pi, dtype=torch.long), float(score[np.arange(H), sigma].sum())

    def value(self, pi: torch.Tensor) -> float:
        """The objective of a given permutation."""
        v = float(self.units[torch.arange(self.p.size), pi].sum())
        if self.heads is not None:
            v += float(self.heads[torch.arange(self.p.n_heads), head_sigma(self.p, pi)].sum())
        return v


def weight_matching(spec: PermutationSpec, state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    max_iter: int = 100, seed: int = 0,
                    init: Optional[Mapping[str, torch.Tensor]] = None) -> Dict[str, torch.Tensor]:
    """Git Re-Basin weight matching: permutations of B (``aligned B = B[pi]``) maximising
    ``sum_keys <W_A, pi(W_B)>``. A group is only changed when that raises the objective by more than a
    relative 1e-12, so the descent is monotone and ends after a sweep without gain."""
    perms = {k: v.clone() for k, v in (init or identity(spec)).items()}
    names = list(spec.perms)
    cache_a = {k: v.double() for k, v in state_a.items() if k in spec.axes}
    cache_b = {k: v.double() for k, v in state_b.items() if k in spec.axes}
    members = {n: spec.members(n) for n in names}
    for it in range(max_iter):
        progress = False
        gen = torch.Generator().manual_seed(seed * 1_000_003 + it)
        for idx in torch.randperm(len(names), generator=gen).tolist():
            name = names[idx]
            sim = Similarity(spec.perms[name])
            for key, ax, a in members[name]:
                wb = permute_tensor(cache_b[key], spec.axes[key], spec, perms, skip=name)
                sim.add(a, cache_a[key].movedim(ax, 0), wb.movedim(ax, 0))
            new, new_value = sim.solve()
            old_value = sim.value(perms[name])
            if new_value > old_value + 1e-12 * max(1.0, abs(old_value)):
                perms[name] = new
                progress = True
        if not progress:
            break
    return perms


Features = Mapping[str, Sequence[Tuple[Axis, torch.Tensor]]]


def activation_matching(spec: PermutationSpec, feats_a: Features, feats_b: Features) -> Dict[str, torch.Tensor]:
    """One assignment per group from activations: ``feats_X[group]`` lists ``(Axis, [N, width])``
    activations of the same inputs, in the same order for A and B (feature axis last). Maximises the
    summed uncentred cross-correlation ``sum_n a_A[n] a_B[n]^T``."""
    perms = {}
    for name, p in spec.perms.items():
        fa, fb = list(feats_a.get(name, ())), list(feats_b.get(name, ()))
        if not fa or len(fa) != len(fb):
            raise MergeLabError(f"activation matching: no activations were recorded for permutation group '{name}'")
        sim = Similarity(p)
        for (a, xa), (_, xb) in zip(fa, fb):
            sim.add(a, xa.reshape(-1, xa.shape[-1]).T, xb.reshape(-1, xb.shape[-1]).T)
        perms[name], _ = sim.solve()
    return perms


def weight_distance(state_a: Mapping[str, torch.Tensor], state_b: Mapping[str, torch.Tensor],
                    keys: Optional[List[str]] = None) -> float:
    """``sum ||W_A - W_B||^2`` over ``keys`` (default: every floating tensor)."""
    keys = keys or [k for k, v in state_a.items() if v.is_floating_point()]
    return float(sum(((state_a[k].double() - state_b[k].double()) ** 2).sum() for k in keys))
