"""TSV-M: task singular vectors merging (per-matrix low-rank truncation, then orthogonalisation).

Gargiulo et al., "Task Singular Vectors: Reducing Task Interference in Model Merging", CVPR 2025
(arXiv:2412.00081; reference code AntoAndGar/task_singular_vectors @a6c9718,
``src/utils/TSVM_utils.py::compute_and_sum_svd_mem_reduction``; FusionBench's ``TaskSingularVectorMerging``
is the same computation plus per-model weights applied before the SVD).

For each matrix tensor (2-D, not matched by ``exclude``), with T task vectors ``delta_i`` (each scaled
by its ``weight``) of rank ``r = min(rows, cols)`` and ``k = floor(r / T)``:

1. Thin SVD ``delta_i = U_i S_i V_i^T``; keep the top ``k`` triplets of each task and concatenate them
   into ``U^`` (rows x r), ``s^`` (r) and ``V^T`` (r x cols); when ``T`` does not divide ``r`` the last
   ``r - T k`` slots stay zero.
2. Orthogonalise by the polar factor (nearest matrix with orthonormal columns/rows):
   ``U^ = P S Q^T -> U_perp = P Q^T``, likewise ``V_perp^T``.
3. ``delta = U_perp diag(s^) V_perp^T``.

Every other tensor (biases, norms, convolutions, excluded names) gets the **mean** of the task
vectors, not the sum. Finally ``theta = theta_0 + lambda * delta`` for every tensor.

The SVDs run on the tensor's device in ``svd_dtype`` (float32 as in the reference, or float64); the
method needs the whole tensor, so it is not chunkable. The rank kept is reported per tensor by
:func:`tsv_report` (``{"rank_per_task": k, "rank": T*k, "full_rank": r}``); with more tasks than the
matrix rank, ``k = 0`` and the merged matrix is zero, as in the reference (the report says so).
"""

from __future__ import annotations

import re

import torch

from mergelab.errors import RecipeError
from mergelab.methods.common import LAMBDA
from mergelab.methods.registry import BaseUse, MergeMethod, Param, TensorInputs, register

DEFAULT_EXCLUDE = r"text_projection|(^|\.)(embed_tokens|lm_head|wte|word_embeddings)\.weight$"

_DTYPES = {"float32": torch.float32, "float64": torch.float64}


def is_matrix(x: TensorInputs) -> bool:
    """Whether TSV-M's SVD path applies to this tensor (2-D and not excluded by name)."""
    pattern = x.params["exclude"]
    return len(x.shape) == 2 and not (pattern and re.search(pattern, x.name))


def rank_per_task(shape: tuple, num_models: int) -> int:
    """``floor(min(rows, cols) / T)``: singular triplets kept from each task vector."""
    return min(shape) // num_models


def polar_factor(a: torch.Tensor) -> torch.Tensor:
    """Nearest matrix with orthonormal columns (or rows) to ``a``: ``P Q^T`` from ``a = P S Q^T``."""
    p, _, qh = torch.linalg.svd(a, full_matrices=False)
    return p @ qh


def tsv_matrix(deltas: list, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """TSV-M merge of a list of same-shaped 2-D task vectors (unscaled); returns ``dtype``."""
    t = len(deltas)
    rows, cols = deltas[0].shape
    r = min(rows, cols)
    k = r // t
    device = deltas[0].device
    u_hat = torch.zeros(rows, r, dtype=dtype, device=device)
    s_hat = torch.zeros(r, dtype=dtype, device=device)
    vh_hat = torch.zeros(r, cols, dtype=dtype, device=device)
    if k == 0:
        return torch.zeros(rows, cols, dtype=dtype, device=device)
    for i, d in enumerate(deltas):
        u, s, vh = torch.linalg.svd(d.to(dtype), full_matrices=False)
        u_hat[:, i * k:(i + 1) * k] = u[:, :k]
        s_hat[i * k:(i + 1) * k] = s[:k]
        vh_hat[i * k:(i + 1) * k, :] = vh[:k, :]
    return polar_factor(u_hat) @ torch.diag(s_hat) @ polar_factor(vh_hat)


def tsv_merge(x: TensorInputs) -> torch.Tensor:
    weights = x.model_param("weight")
    deltas = [w * (m - x.base) for w, m in zip(weights, x.models)]
    if is_matrix(x):
        merged = tsv_matrix(deltas, _DTYPES[x.params["svd_dtype"]]).to(torch.float32)
    else:
        merged = torch.stack(deltas).mean(0)
    return x.base + x.params["lambda"] * merged


def tsv_report(x: TensorInputs) -> dict:
    """What TSV-M kept for this tensor: ``{"rank_per_task", "rank", "full_rank"}`` or ``{"mean": True}``.

    Depends only on the tensor's name, shape, parameters and number of models, so it can be called
    before or after the merge, on any chunk of the tensor.
    """
    if not is_matrix(x):
        return {"mean": True}
    t = len(x.models)
    k = rank_per_task(tuple(x.shape), t)
    return {"rank_per_task": k, "rank": k * t, "full_rank": min(x.shape)}


def _validate(params: dict, model_params: list) -> None:
    try:
        re.compile(params["exclude"])
    except re.error as e:
        raise RecipeError(f"tsv: parameter 'exclude' = {params['exclude']!r} is not a valid regular expression "
                          f"({e})") from None


register(MergeMethod(
    name="tsv",
    family="tsv",
    summary="Keep each task's top singular vectors per matrix, orthogonalise them across tasks, recombine.",
    reference="Gargiulo et al. 2025, Task Singular Vectors (arXiv:2412.00081); AntoAndGar/task_singular_vectors "
              "TSVM_utils.py::compute_and_sum_svd_mem_reduction; FusionBench TaskSingularVectorMerging.",
    merge=tsv_merge,
    base=BaseUse.REQUIRED,
    params=(
        LAMBDA,
        Param("exclude", str, "Regular expression of 2-D tensor names merged by the mean instead of the SVD "
              "(reference: text_projection; token embeddings and lm_head added for LLMs).",
              default=DEFAULT_EXCLUDE),
        Param("svd_dtype", str, "Precision of the SVDs (the reference uses the task vectors' float32).",
              default="float32", choices=("float32", "float64")),
    ),
    model_params=(
        Param("weight", float, "Scale of this task vector before the SVD (FusionBench's per-model alpha list).",
              default=1.0),
    ),
    min_models=1,
    chunkable=False,
    validate=_validate,
    notes="lambda is the paper's alpha (swept over 0.1-3.0 in the paper; FusionBench default 1.0). Non-matrix "
          "tensors get lambda times the MEAN of the task vectors (task arithmetic uses the sum). "
          "Not in mergekit or PEFT.",
    report=tsv_report,
))
