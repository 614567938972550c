"""Arcee Fusion: keep only the changes that are large and where the row's output distribution shifts.

Arcee AI, "Arcee Fusion" (mergekit 0.1.5 ``arcee_fusion``, announced on arcee.ai, 2025; no paper).
With a base ``theta_0`` and one model ``theta_1``, per tensor:

1. importance = ``|theta_1 - theta_0| * KL(p || q)`` where ``p``/``q`` are the softmax of each row
   (last dimension) of ``theta_1``/``theta_0`` plus 1e-8, and the KL is summed over the row;
2. threshold = median + 1.5 * IQR of the importance (quantiles at sorted index
   ``floor(q * (n - 1))``, no interpolation);
3. the merged tensor takes ``theta_1``'s value where importance >= threshold, the base elsewhere.

mergekit estimates the quantiles of tensors above 10^6 entries from 10^6 entries drawn with
replacement by the global torch RNG, so its result there is random; mergelab computes the exact
quantiles at any size (same values as mergekit below 10^6 entries).

Chunkable: the rows along the last dimension are never split by the engine's row chunks of
dimension 0 (1-D tensors are never chunked), so each chunk's importance is exactly its part of the
whole tensor's. For a tensor split into chunks, ``prepare_tensor`` streams the importance chunk by
chunk through an exact radix select (:func:`mergelab.methods.select.kth_smallest`) and hands merge the
threshold, so only one chunk's importance is in memory at a time. The threshold is always the exact
quantile combination of the very scores merge compares with it. On the CPU the result is the whole
tensor's bit for bit (see :func:`chunk_importance`); on CUDA a row's KL can differ in its last bit
between a chunk and the whole tensor, so an entry within rounding of the threshold may be decided
differently. An unsplit tensor is computed whole, exactly as before.
"""

from typing import List, Optional

import torch
import torch.nn.functional as F

from mergelab.methods.inputs import whole_source
from mergelab.methods.registry import BaseUse, MergeMethod, TensorInputs, TensorSource, register
from mergelab.methods.select import kth_smallest


def importance_scores(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """``|model - base|`` times the row-wise KL divergence of their softmaxes (last dimension)."""
    diff = (model - base).abs()
    p = F.softmax(model, dim=-1) + 1e-8
    q = F.softmax(base, dim=-1) + 1e-8
    kl = torch.sum(p * torch.log(p / q), dim=-1, keepdim=True)
    return diff * kl


def chunk_importance(model: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """:func:`importance_scores` of a row chunk, equal entry for entry to the whole tensor's.

    Every operation in :func:`importance_scores` works row by row, and so gives each row the same
    result in a chunk as in the whole tensor, except PyTorch's CPU sum over the last dimension when
    it has a single output: a long row is then split across threads and its partial sums added in
    another order. A chunk of one row is therefore computed as two copies of itself, so that the sum
    runs row by row as it does for the whole tensor. (CUDA's reductions choose their strategy by the
    number of rows too, so there chunked and whole KLs can differ in the last bit.)
    """
    if model.dim() >= 2 and model.numel() == model.shape[-1] and model.numel() > 0:
        row_shape = (1, model.shape[-1])
        twice = importance_scores(model.reshape(row_shape).repeat(2, 1), base.reshape(row_shape).repeat(2, 1))
        return twice[:1].reshape(model.shape)
    return importance_scores(model, base)


def quantile_ranks(n: int) -> List[int]:
    """1-based ranks of q1, median and q3 among ``n`` sorted entries: ``floor(q * (n - 1)) + 1``,
    computed in integers."""
    return [(n - 1) // 4 + 1, (n - 1) // 2 + 1, (3 * (n - 1)) // 4 + 1]


def _threshold(q1: torch.Tensor, median: torch.Tensor, q3: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1) in float32, from 0-d float32 tensors."""
    return median + 1.5 * (q3 - q1)


def fusion_threshold(importance: torch.Tensor) -> torch.Tensor:
    """median + 1.5 * (q3 - q1), quantiles taken at sorted index floor(q * (n - 1)).

    The index is computed in float32 (unchanged, for parity); that equals the exact integer index of
    :func:`quantile_ranks` up to 5,592,409 entries, above the 2^22 entries up to which the engine keeps
    a chunkable tensor whole by default (1-D tensors, never chunked, can be larger).
    """
    flat = importance.reshape(-1)
    n = flat.numel()
    idx = (torch.tensor([0.25, 0.5, 0.75]) * (n - 1)).long().tolist()
    q1, median, q3 = (torch.kthvalue(flat.cpu(), i + 1).values.to(flat.device) for i in idx)
    return _threshold(q1, median, q3)


def _prepare_tensor(src: TensorSource) -> Optional[torch.Tensor]:
    """The threshold of a tensor split into row chunks (a 0-d float32 tensor), or None for a whole one.

    The importance of each chunk is computed and streamed twice through :func:`kth_smallest`, which
    finds q1, the median and q3 exactly over the whole tensor with memory independent of its size.
    """
    if src.num_chunks == 1:
        return None  # merge computes the quantiles on the whole tensor itself

    def scores():
        for c in src.chunks():
            yield chunk_importance(c.models[0], c.base)

    q1, median, q3 = (torch.tensor(v, dtype=torch.float32) for v in kth_smallest(scores, quantile_ranks(src.numel)))
    return _threshold(q1, median, q3)


def arcee_fusion_merge(x: TensorInputs) -> torch.Tensor:
    """``theta_1`` where importance >= threshold, ``theta_0`` elsewhere (as ``base + delta * mask``)."""
    base, model = x.base, x.models[0]
    if x.tensor_stats is None:
        whole_source(x)  # the quantiles need the whole tensor
        importance = importance_scores(model, base)
        threshold = fusion_threshold(importance)
    else:
        importance = chunk_importance(model, base)
        threshold = x.tensor_stats.to(importance.device)
    mask = (importance >= threshold).float()
    return base + (model - base) * mask


register(MergeMethod(
    name="arcee_fusion",
    family="arcee_fusion",
    summary="Take the other model's values only where the change is an outlier in |delta| times row KL divergence.",
    reference="Arcee AI, Arcee Fusion (arcee.ai, 2025); mergekit 0.1.5 `arcee_fusion`.",
    merge=arcee_fusion_merge,
    base=BaseUse.REQUIRED,
    min_models=1,
    max_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    notes="Exact quantiles at every size; mergekit samples 10^6 entries at random (global RNG) for larger "
          "tensors. The softmax is over raw weights along the last dimension, as in mergekit.",
))
