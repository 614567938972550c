"""DOGE task arithmetic: data-free adaptive projective gradient descent in the shared subspace.

Wei et al., "Modeling Multi-Task Model Merging as Adaptive Projective Gradient Descent", ICML 2025
(arXiv:2501.01230; reference code FusionBench ``fusion_bench/method/doge_ta/doge_ta.py`` @54c9e8c
with ``config/method/doge_ta/doge_ta.yaml``; the authors' own repository was not checked).

For every 2-D weight inside the transformer blocks (the reference: CLIP encoder matrices; here a
tensor with a layer index and two dimensions), with T task vectors ``tau_i``:

1. Task-aware coefficients ``lambda_i = eta / ||tau_i||_F`` (0 for a zero task vector).
2. Shared subspace: concatenate the top ``floor(r/T)`` left singular vectors of each ``tau_i``
   (``r = min(rows, cols)``, as TSV-M does), take the SVD of the concatenation and keep its top
   ``floor(r / subspace)`` left singular vectors ``U_c``; ``P = U_c U_c^T`` (rows x rows). ``subspace`` is
   a divisor, not a count. ``P = 0`` when either floor is 0.
3. One modification ``delta`` (initially 0) shared by all tasks minimises the data-free loss
   ``L(delta) = sum_j sum_rows <tau_j[row], tau_j[row] - tau_m[row]>^2`` with
   ``tau_m = sum_i lambda_i (tau_i + delta)``, by ``steps`` optimiser steps with learning rate ``lr``;
   before each step the gradient is projected out of the shared subspace: ``g <- g - P g``.
   (With Adam, only the raw gradient is projected; the update itself is not exactly orthogonal.)
4. Sparsify and merge: ``m_i`` keeps the top ``density`` fraction of ``|tau_i|`` (original, not
   ``tau_i + delta``) over all optimised tensors of the model (TIES' reference trim, exact and
   streamed: ``floor(density N) + 1`` entries, ties kept);
   ``theta = theta_0 + sum_i lambda_i ((tau_i + delta) * m_i)``.

Every other tensor (biases, norms, embeddings, heads) keeps the base value, as in the reference.
The gradient is computed in closed form, ``dL/d delta = -2 Lambda sum_j a_j tau_j`` with
``a_j = rowsum(tau_j * (tau_j - tau_m))`` and ``Lambda = sum_i lambda_i`` (tested against autograd);
the optimiser is torch's Adam (or SGD), run per tensor with its own state exactly as the reference's
shared Adam instance does (Adam state is per parameter). Deterministic: no randomness is involved.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, Param, TensorInputs, register
from mergelab.methods.select import keep_count, kept_vs_asked, top_cuts


def optimised(x: TensorInputs) -> bool:
    """Whether DOGE optimises this tensor: a 2-D weight inside a block."""
    return x.layer is not None and len(x.shape) == 2


def task_coefficients(tau: torch.Tensor, eta: float) -> torch.Tensor:
    """``lambda_i = eta / ||tau_i||_F`` per task (0 where the norm is 0), shape ``[T]``."""
    norms = tau.reshape(tau.shape[0], -1).norm(dim=1)
    return torch.where(norms > 0, eta / torch.where(norms > 0, norms, torch.ones_like(norms)), torch.zeros_like(norms))


def shared_projector(tau: torch.Tensor, subspace: int) -> torch.Tensor:
    """Projector ``P`` (rows x rows, float32) onto the tasks' shared column subspace."""
    t, rows, cols = tau.shape
    r = min(rows, cols)
    k = r // t
    kp = r // subspace
    if k == 0 or kp == 0:
        return torch.zeros(rows, rows, dtype=torch.float32, device=tau.device)
    u_hat = torch.zeros(rows, r, dtype=torch.float64, device=tau.device)
    for i in range(t):
        u, _, _ = torch.linalg.svd(tau[i].double(), full_matrices=False)
        u_hat[:, i * k:(i + 1) * k] = u[:, :k]
    uc, _, _ = torch.linalg.svd(u_hat, full_matrices=False)
    basis = uc[:, :kp]
    return (basis @ basis.T).float()


def doge_gradient(tau: torch.Tensor, lam: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """Closed-form gradient of the DOGE data-free loss with respect to ``delta``."""
    big_lambda = lam.sum()
    merged = (lam.reshape(-1, 1, 1) * tau).sum(0) + big_lambda * delta
    a = (tau * (tau - merged)).sum(-1)  # [T, rows]
    return -2.0 * big_lambda * (a.unsqueeze(-1) * tau).sum(0)


def optimise_delta(tau: torch.Tensor, lam: torch.Tensor, projector: torch.Tensor, steps: int, lr: float,
                   optimizer: str = "adam") -> torch.Tensor:
    """Projected gradient descent on the shared modification ``delta`` (float32)."""
    delta = torch.zeros(tau.shape[1:], dtype=torch.float32, device=tau.device, requires_grad=True)
    opt = torch.optim.Adam([delta], lr=lr) if optimizer == "adam" else torch.optim.SGD([delta], lr=lr)
    for _ in range(steps):
        with torch.no_grad():
            g = doge_gradient(tau, lam, delta)
            g = g - projector @ g
        delta.grad = g
        opt.step()
    return delta.detach()


@dataclass(frozen=True)
class DogeStats:
    """Per-model magnitude thresholds of the whole-model top-K mask (every entry ``>=`` one is kept,
    as in the reference), and the selection's kept vs asked counts."""

    thresholds: list
    cuts: Optional[list] = None

    def manifest_report(self) -> Optional[dict]:
        return None if self.cuts is None else kept_vs_asked("top_k_mask", self.cuts)


def _prepare_model(scope: ModelScope) -> Optional[DogeStats]:
    density = scope.params["density"]

    def deltas():
        for c in scope.chunks():
            if optimised(c):
                yield torch.stack([m - c.base for m in c.models])

    n = scope.num_models
    cuts = top_cuts(deltas, lambda total: [keep_count(density, total, "paper")] * n, exact=False)
    return DogeStats([c.value for c in cuts], cuts)


def doge_merge(x: TensorInputs) -> torch.Tensor:
    if not optimised(x):
        return x.base.clone()
    tau = torch.stack([m - x.base for m in x.models])
    lam = task_coefficients(tau, x.params["eta"])
    projector = shared_projector(tau, x.params["subspace"])
    delta = optimise_delta(tau, lam, projector, x.params["steps"], x.params["lr"], x.params["optimizer"])
    thr = torch.tensor(x.model_stats.thresholds, dtype=tau.dtype, device=tau.device).reshape(-1, 1, 1)
    masks = (tau.abs() >= thr).to(tau.dtype)
    return x.base + (lam.reshape(-1, 1, 1) * (tau + delta) * masks).sum(0)


register(MergeMethod(
    name="doge_ta",
    family="doge",
    summary="Task arithmetic with norm-based coefficients and a shared correction learned data-free by projected "
            "gradient descent outside the tasks' shared subspace.",
    reference="Wei et al. 2025, DOGE (arXiv:2501.01230); FusionBench fusion_bench/method/doge_ta/doge_ta.py.",
    merge=doge_merge,
    base=BaseUse.REQUIRED,
    params=(
        Param("eta", float, "Numerator of the per-layer coefficients lambda_i = eta / ||tau_i|| (FusionBench "
              "`lamda`).", default=0.07, low=0.0),
        Param("subspace", int, "Divisor of the rank: the shared subspace keeps floor(r / subspace) directions.",
              default=6, low=1),
        Param("density", float, "Fraction of each task vector kept by the whole-model top-K mask (K/100).",
              default=0.3, low=0.0, high=1.0, per_layer=False),
        Param("steps", int, "Optimiser steps per tensor.", default=400, low=0),
        Param("lr", float, "Optimiser learning rate.", default=1e-4, low=0.0, low_open=True),
        Param("optimizer", str, "'adam' (reference) or 'sgd' (the projection then holds exactly for delta).",
              default="adam", choices=("adam", "sgd")),
    ),
    min_models=1,
    chunkable=False,
    prepare_model=_prepare_model,
    notes="Not in mergekit or PEFT. FusionBench optimises keys containing 'encoder' and 'weight' and not "
          "'layer_norm' (CLIP); here every 2-D tensor with a layer index. Tensors outside the blocks keep the "
          "base value. Cost: steps x T x rows x cols per tensor; set steps lower for quick runs.",
))
