"""Float64 oracles and comparison helpers for the real-checkpoint tests.

Every function here is written from the formulas of ``../shared/reference`` (mergekit 0.1.5's
semantics, peer-mergekit.md 2.2-2.3, and methods-data-free.md for the papers' methods), never with
mergelab's code. Inputs are float32 checkpoints promoted to float64; task vectors are the float32
differences ``theta_i - theta_0`` (mergekit forms them in the merge dtype, float32 here, and they rank
by those values), and everything after that is float64.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch

EPS32 = 2.0 ** -24  # unit roundoff of float32


def task_vector(theta: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``theta - base`` rounded to float32 as mergekit forms it, then float64."""
    return (theta.float() - base.float()).double()


def topk_mask(mag: torch.Tensor, k: int, with_threshold: bool = False):
    """Exactly ``k`` largest magnitudes, lower flat index first among equal magnitudes (issue 14's
    exact-count rule): everything above the k-th largest value, then the first ``k - #above`` (by flat
    index) of the entries equal to it. With ``with_threshold`` returns ``(mask, k-th largest value)``."""
    flat = mag.flatten()
    n = flat.numel()
    if k >= n or k <= 0:
        mask = torch.full_like(mag, k >= n, dtype=torch.bool)
        return (mask, None) if with_threshold else mask
    thr = torch.kthvalue(flat, n - k + 1).values
    mask = flat > thr
    tied = torch.nonzero(flat == thr).flatten()
    mask[tied[: k - int(mask.sum())]] = True
    mask = mask.view(mag.shape)
    return (mask, float(thr)) if with_threshold else mask


def kth_largest(mag: torch.Tensor, k: int) -> float:
    flat = mag.flatten()
    return float(torch.kthvalue(flat, flat.numel() - k + 1).values)


def sign_elect(deltas: torch.Tensor, flip: Optional[torch.Tensor] = None) -> torch.Tensor:
    """mergekit's ``sum`` election: per position the sign of the summed deltas, +1 where it is 0; a
    model agrees where its delta has that sign (zeros never agree). ``flip`` reverses the elected sign
    at the given positions (the other outcome of an election whose sum is zero within rounding)."""
    s = torch.sign(deltas.sum(0))
    s[s == 0] = 1
    if flip is not None:
        s = torch.where(flip, -s, s)
    return torch.sign(deltas) == s


def near_zero_sum(deltas: torch.Tensor, rel: float = 16 * EPS32) -> torch.Tensor:
    """Positions whose summed deltas are zero to within float32 rounding of the sum, where a float32
    pipeline may elect either sign."""
    return deltas.sum(0).abs() <= rel * deltas.abs().sum(0)


def gta(base: torch.Tensor, taus, weights, masks=None, consensus=False, normalize=False, lam=1.0,
        alternative=False):
    """mergekit's generalized task arithmetic (peer-mergekit.md 2.2 steps 3-7) on given masks.

    With ``alternative`` returns ``(result, alt)``, ``alt`` being the result with the opposite sign
    elected where the election's sum is zero within float32 rounding (``alt == result`` elsewhere)."""
    deltas = torch.stack([w * (t if m is None else t * m) for w, t, m in
                          zip(weights, taus, masks or [None] * len(taus))])
    wv = torch.tensor(weights, dtype=torch.float64).view(-1, *[1] * base.ndim)

    def run(flip):
        if consensus:
            agree = sign_elect(deltas, flip)
            mixed = (deltas * agree).sum(0)
            divisor = (wv * agree).sum(0)
            divisor[divisor == 0] = 1
        else:
            mixed = deltas.sum(0)
            divisor = wv.sum()
            if abs(float(divisor)) < 1e-8:
                divisor = torch.tensor(1.0, dtype=torch.float64)
        if normalize:
            mixed = mixed / divisor
        return base + lam * mixed

    ref = run(None)
    if not alternative:
        return ref
    if not consensus:
        return ref, ref
    flip = near_zero_sum(deltas)
    return ref, (run(flip) if bool(flip.any()) else ref)


def breadcrumbs_cuts(n: int, density: float, gamma: float):
    """mergekit 0.1.5 magnitude_outliers counts as descending ranks ``[lo, hi)`` kept: the
    ``int(gamma n)`` largest dropped (fewer when both do not fit), the next ``int(density n)`` kept."""
    n_top, target = int(gamma * n), int(density * n)
    n_bot = n - target - n_top
    if n_bot < 0:
        n_top += n_bot
    return n_top, n_top + target


def breadcrumbs_mask(tau: torch.Tensor, density: float, gamma: float):
    """``(mask, tied)``: the entries of descending rank in ``[lo, hi)`` (lower flat index first among
    equal magnitudes), and the positions whose magnitude equals a cut's boundary value."""
    if density >= 1:
        return torch.ones_like(tau, dtype=torch.bool), torch.zeros_like(tau, dtype=torch.bool)
    mag = tau.abs()
    lo, hi = breadcrumbs_cuts(tau.numel(), density, gamma)
    keep_hi, v_hi = topk_mask(mag, hi, with_threshold=True)
    keep_lo, v_lo = topk_mask(mag, lo, with_threshold=True)
    tied = torch.zeros_like(tau, dtype=torch.bool)
    for v in (v_lo, v_hi):
        if v is not None:
            tied |= mag == v  # entries at a cut's boundary value (where only the tie rule decides)
    return keep_hi & ~keep_lo, tied


def slerp(t: float, v0: torch.Tensor, v1: torch.Tensor, dot_threshold: float = 0.9995, margin: float = 0.0):
    """mergekit ``slerp`` on whole flattened tensors (lerp when the normalised dot exceeds 0.9995).
    Returns ``(result, alt)``: ``alt`` is the other branch's result when the dot lies within ``margin``
    of the threshold (where a float32 dot product may fall on either side), else ``result``."""
    a, b = v0.flatten(), v1.flatten()
    na, nb = a.norm(), b.norm()
    ua = a / na if na > 1e-8 else a
    ub = b / nb if nb > 1e-8 else b
    dot = float((ua * ub).sum())
    lerp = (1 - t) * v0 + t * v1
    if abs(dot) >= 1:
        return lerp, lerp
    theta = math.acos(dot)
    s = math.sin(theta)
    sph = math.sin((1 - t) * theta) / s * v0 + math.sin(t * theta) / s * v1
    ref, other = (lerp, sph) if abs(dot) > dot_threshold else (sph, lerp)
    return ref, (other if abs(abs(dot) - dot_threshold) <= margin else ref)


def nuslerp_vec(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """mergekit ``nuslerp`` along the last dimension of ``a``/``b`` (rows): no dot threshold, lerp only
    where ``sin(theta)`` vanishes."""
    ua = a / a.norm(dim=-1, keepdim=True)
    ub = b / b.norm(dim=-1, keepdim=True)
    cos = (ua * ub).sum(-1, keepdim=True).clamp(-1, 1)
    theta = torch.acos(cos)
    s = torch.sin(theta)
    out = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / s
    lerp = (1 - t) * a + t * b
    return torch.where(s.abs() < 1e-8, lerp, out)


def multislerp(xs, weights, eps: float = 1e-8) -> torch.Tensor:
    """mergekit ``multislerp``: one tangent-space step at the weighted mean direction, scaled by the
    weighted mean norm (weights normalised to sum 1)."""
    w = torch.tensor(weights, dtype=torch.float64)
    w = w / w.sum()
    flat = [x.flatten() for x in xs]
    norms = torch.stack([f.norm() for f in flat])
    units = torch.stack([f / (n + eps) for f, n in zip(flat, norms)])
    m = (w[:, None] * units).sum(0)
    m = m / m.norm()
    tangents = units - (units @ m)[:, None] * m[None, :]
    T = (w[:, None] * tangents).sum(0)
    tn = T.norm()
    res = math.cos(tn) * m + (math.sin(tn) / tn) * T if tn > eps else m
    return (res * (w * norms).sum()).view(xs[0].shape)


def karcher(xs, max_iter: int = 10, tol: float = 1e-5):
    """mergekit ``karcher`` (uniform weights): fixed-point Riemannian mean of the unit directions,
    scaled by the mean norm. Returns ``(result, [|T| per iteration])``."""
    n = len(xs)
    alphas = [1.0 / n] * n
    flat = [x.flatten() for x in xs]
    norms = [float(f.norm()) for f in flat]
    units = [f / nm for f, nm in zip(flat, norms) if nm > tol]
    al = [a for a, nm in zip(alphas, norms) if nm > tol]
    al = [a / sum(al) for a in al]
    u = sum(a * v for a, v in zip(al, units))
    u = u / u.norm()
    history = []
    for _ in range(max_iter):
        T = torch.zeros_like(u)
        for a, v in zip(al, units):
            cos = float((u * v).sum())
            cos = min(1.0, max(-1.0, cos))
            theta = math.acos(cos)
            if theta < 1e-12:
                continue
            T += a * (theta / math.sin(theta)) * (v - cos * u)
        tn = float(T.norm())
        history.append(tn)
        if tn < tol:
            break
        u = math.cos(tn) * u + math.sin(tn) * T / tn
        u = u / u.norm()
    scale = sum(a * nm for a, nm in zip(alphas, norms))
    return (scale * u).view(xs[0].shape), history


def model_stock(base: torch.Tensor, thetas, taus) -> torch.Tensor:
    """mergekit ``model_stock`` (whole tensor): ``t = N c / (1 + (N - 1) c)``, ``c`` the mean pairwise
    cosine of the task vectors (each cosine's denominator, the product of the two norms, clamped at
    1e-6), ``t`` unclamped."""
    n = len(taus)
    flat = [t.flatten() for t in taus]
    cos = []
    for i in range(n):
        for j in range(i + 1, n):
            c = (flat[i] * flat[j]).sum() / (flat[i].norm() * flat[j].norm()).clamp(min=1e-6)
            cos.append(float(c.clamp(-1, 1)))
    c = sum(cos) / len(cos)
    denom = 1 + (n - 1) * c
    if abs(denom) < 1e-6:
        return base.clone(), c
    t = n * c / denom
    return t * torch.stack(thetas).mean(0) + (1 - t) * base, c


def nearswap(base: torch.Tensor, other: torch.Tensor, t: float) -> torch.Tensor:
    w = (t / (base - other).abs().clamp(min=1e-6)).clamp(0, 1)
    return w * other + (1 - w) * base


def arcee_importance(base: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """``|theta_1 - theta_0|`` times the KL divergence of the rows' softmaxes (last dimension)."""
    if base.ndim == 0:
        p, q = torch.ones(()), torch.ones(())
        kl = torch.zeros(())
    else:
        p = torch.softmax(other, dim=-1) + 1e-8
        q = torch.softmax(base, dim=-1) + 1e-8
        kl = (p * torch.log(p / q)).sum(-1, keepdim=True)
    return (other - base).abs() * kl


def quantile_floor(x: torch.Tensor, q: float) -> float:
    """The sorted value at index ``floor(q (n - 1))`` (mergekit's quantile read-out)."""
    flat = x.flatten()
    k = int(math.floor(q * (flat.numel() - 1)))
    return float(torch.kthvalue(flat, k + 1).values)


def sce(base: torch.Tensor, taus, select_topk: float):
    """mergekit ``sce``: shared top-variance selection, energy weights (uniform below 1e-6), ``sum``
    sign election on the unweighted task vectors, weighted mean of the agreeing entries.
    Returns ``(result, variance, k-th variance or None)``."""
    tv = torch.stack(taus)
    var = tv.var(0, unbiased=False)
    thr = None
    if select_topk < 1:
        nonzero = int((var != 0).sum())
        k = int(nonzero * select_topk)
        mask = topk_mask(var, k)
        thr = float(torch.topk(var.flatten(), k).values[-1]) if k > 0 else None
        tv = tv * mask
    agree = sign_elect(tv)
    weights = (tv ** 2).flatten(1).mean(1)
    total = float(weights.sum())
    weights = torch.full_like(weights, 1.0 / len(taus)) if abs(total) < 1e-6 else weights / total
    ew = weights.view(-1, *[1] * base.ndim) * agree
    merged = (tv * ew).sum(0) / ew.sum(0).clamp(min=1e-6)
    return base + merged, var, thr


def svd_polar(m: torch.Tensor) -> torch.Tensor:
    """Polar factor ``P Q^T`` of ``m = P S Q^T`` (nearest matrix with orthonormal columns/rows)."""
    p, _, qt = torch.linalg.svd(m, full_matrices=False)
    return p @ qt


def tsv_matrix(deltas):
    """TSV-M for one matrix (methods-data-free.md section 7): each task's top ``floor(r/T)`` singular
    triplets, concatenated, orthogonalised by polar factors, recombined. Returns ``(merged, cond)``:
    ``cond`` bounds how much a relative perturbation of the inputs (float32 rounding of the task vectors
    or of intermediate products) can be amplified in the result: the largest ``sigma_1 / gap`` at a
    task's truncation (a near-degenerate cut makes the kept subspace ill-defined) plus the condition of
    the polar factors (``1 / sigma_min`` of the concatenated singular vectors)."""
    T = len(deltas)
    m, n = deltas[0].shape
    r = min(m, n)
    k = r // T
    U = torch.zeros(m, r, dtype=torch.float64)
    S = torch.zeros(r, dtype=torch.float64)
    Vt = torch.zeros(r, n, dtype=torch.float64)
    if k == 0:
        return torch.zeros(m, n, dtype=torch.float64), 1.0
    cond = 1.0
    for i, d in enumerate(deltas):
        u, s, vt = torch.linalg.svd(d, full_matrices=False)
        U[:, i * k:(i + 1) * k] = u[:, :k]
        S[i * k:(i + 1) * k] = s[:k]
        Vt[i * k:(i + 1) * k, :] = vt[:k, :]
        if k < s.numel():
            cond = max(cond, float(s[0] / (s[k - 1] - s[k]).clamp(min=1e-300)))
    cond += 1 / float(torch.linalg.svdvals(U).min()) + 1 / float(torch.linalg.svdvals(Vt).min())
    return svd_polar(U) @ torch.diag(S) @ svd_polar(Vt), cond


def compare(name: str, out: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor,
            allowed: Optional[torch.Tensor] = None, alt: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Assert ``|out - ref| <= bound`` elementwise (or ``|out - alt| <= bound`` where an alternative
    outcome is admissible), except at ``allowed``; returns error statistics."""
    bad = violations(out, ref, bound, alt)
    if allowed is not None:
        bad &= ~allowed
    if bool(bad.any()):
        raise AssertionError(describe(name, out, ref, bound, bad))
    return {}


def violations(out, ref, bound, alt=None) -> torch.Tensor:
    assert out.shape == ref.shape, (tuple(out.shape), tuple(ref.shape))
    bad = (out - ref).abs() > bound
    if alt is not None:
        bad &= (out - alt).abs() > bound
    return bad


def describe(name, out, ref, bound, bad) -> str:
    err = (out - ref).abs()
    i = int(torch.nonzero(bad.flatten())[0])
    return (f"{name}: {int(bad.sum())} of {out.numel()} entries differ from the float64 oracle beyond the "
            f"float32 bound (max error {float(err[bad].max()):.3e}; first at flat index {i}: mergelab "
            f"{float(out.flatten()[i]):.9g}, oracle {float(ref.flatten()[i]):.9g}, bound "
            f"{float(bound.flatten()[i]):.3e})")


def pcb(taus, ratio: float, clip: float):
    """PCB-merging (methods-data-free.md section 4, the reference's ``PCB_merge``), whole model: each
    entry of ``taus[t]`` (task t's task vector, the whole model flattened) gets the merged task-vector
    value. Returns ``(merged, weight_sum, weight_error, merged_error)``: the per-entry sum of the weights
    and first-order bounds of the float32 pipeline's error on them and on the merged value."""
    n = len(taus)
    d = taus[0].numel()
    total = sum(taus)
    abs_total = sum(t.abs() for t in taus)
    clipped, weights, werr = [], [], []
    dropped = torch.ones_like(taus[0], dtype=torch.bool)
    for tau in taus:
        mag = tau.abs()
        lo = float(torch.kthvalue(mag, int(math.floor(d * clip)) + 1).values)
        hi = float(torch.kthvalue(mag, int(math.floor(d * (1 - clip)))).values)
        a = mag.clamp(lo, hi)
        clipped.append(torch.sign(tau) * a)
        s = torch.exp(n * ((a - lo) / (hi - lo)) ** 2)
        beta = s * torch.tanh(tau * total)
        q = float(torch.kthvalue(beta, int(math.floor(d * (1 - ratio))) + 1).values)
        top = float(beta.max())
        weights.append((beta.clamp(min=q) - q) / (top - q))
        # float32 error of beta: relative rounding of s and tanh, plus the rounding of sum_j tau_j
        # inside tanh's argument (16 u of sum_j |tau_j|, times |tau| s)
        eb = 16 * EPS32 * (beta.abs() + s * mag * abs_total)
        werr.append((eb + 16 * EPS32 * abs(q)) / (top - q))
        dropped &= beta < q - (eb + 16 * EPS32 * abs(q))
    wsum = sum(weights)
    merged = sum(w * c for w, c in zip(weights, clipped)) / wsum.clamp(min=1e-12)
    werr_sum = sum(werr)
    merr = sum(e * (c - merged).abs() for e, c in zip(werr, clipped)) / wsum.clamp(min=1e-12)
    merr[dropped] = 0  # every weight is certainly 0: the merged value is exactly 0
    stack = torch.stack(clipped)
    return merged, wsum, werr_sum, merr, dropped, (stack.min(0).values, stack.max(0).values)
