"""DARE: drop task-vector entries at random and rescale the rest, then merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024 (arXiv:2311.03099; reference code yule-BUAA/MergeLM ``mask_weights_utils.py``).
Each entry of each task vector is kept with probability ``density`` (= 1 - drop rate p).

``semantics: mergekit`` (default) is mergekit 0.1.5: the kept entries are rescaled so that each task
vector keeps its L1 norm over the whole tensor (when ``rescale``), ``dare_ties`` elects signs with
ties going to ``+1`` and divides by the agreeing weights when ``normalize``. ``semantics: paper``
rescales each kept entry by ``1/density`` (unbiased: E[tau~] = tau), and ``dare_ties`` then follows the
TIES reference (zero sums take the model's majority sign, the mean divides by the agreeing count).

Randomness: each (seed, tensor, row chunk, model) has its own stream, drawn on the CPU, so the masks
do not depend on the order tensors are processed in, on threads, or on the device.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mergelab.methods import fused
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.parallel import map_models
from mergelab.methods.registry import (BaseUse, MergeMethod, ModelScope, TensorInputs, TensorSource, keep_limit,
                                      register)
from mergelab.methods.consensus import TrimStats, consensus_merge, global_tie_sign
from mergelab.methods.inputs import finish
from mergelab.methods.rescale import l1_factor, l1_rescale_factors
from mergelab.methods.transforms import TaskVectors, linear_combine


def keep_masks(x: TensorInputs) -> torch.Tensor:
    """Bernoulli(density) keep masks ``[n, *chunk]``; a density of 1 or more keeps everything."""
    return torch.stack([x.keep_mask(i, d, "dare") for i, d in enumerate(x.model_param("density"))])


def dropped_deltas(x: TensorInputs, l1_scale: Optional[list] = None, weighted: bool = False,
                   inline_l1: bool = False) -> torch.Tensor:
    """The chunk's task vectors ``[n, *chunk]`` after DARE's drop and rescale (per ``semantics``),
    multiplied by the models' weights if ``weighted``.

    Value for value ``weigh()(drop(keep_masks(x), ...)(TaskVectors.from_models(...)))``, computed in
    one buffer (full-size temporaries cost more than the arithmetic on CPUs).
    ``inline_l1`` computes mergekit's L1 rescale factors from this chunk, which must be the whole
    tensor, exactly as :func:`~mergelab.methods.rescale.l1_rescale_factors` would in a separate pass
    (the random masks are then drawn once instead of twice).
    """
    base = x.base
    dens = x.model_param("density")
    paper = x.params["semantics"] == "paper"
    deltas = torch.empty((len(x.models),) + tuple(base.shape), dtype=base.dtype, device=base.device)
    # Per-model factors as float32 tensors, exactly as the transforms apply them.
    prob = torch.tensor([min(1.0, d) if d > 0 else 1.0 for d in dens], dtype=base.dtype, device=base.device)
    scale = None if l1_scale is None else torch.tensor([float(v) for v in l1_scale], dtype=base.dtype,
                                                        device=base.device)
    weights = torch.tensor(x.model_param("weight"), dtype=base.dtype, device=base.device)
    n = len(x.models)
    # The random masks are the expensive part on a CPU; draw them for all models side by side.
    dropping = [i for i in range(n) if dens[i] < 1]
    masks = dict(zip(dropping, map_models(lambda i: x.keep_mask(i, dens[i], "dare"), dropping, base.device.type)))
    if inline_l1:
        for i, m in enumerate(x.models):
            torch.sub(m, base, out=deltas[i])
        before = deltas.abs().reshape(n, -1).sum(1).double().tolist()
        for i in dropping:
            deltas[i].mul_(masks.pop(i))
        after = deltas.abs().reshape(n, -1).sum(1).double().tolist()
        factors = [l1_factor(b, a) for b, a in zip(before, after)]
        scale = torch.tensor(factors, dtype=base.dtype, device=base.device)
    for i, m in enumerate(x.models):
        if inline_l1:
            d = deltas[i]
        else:
            d = torch.sub(m, base, out=deltas[i])
            if i in masks:
                d.mul_(masks.pop(i))
        if paper:
            # A density of 0 drops everything; nothing is left to rescale.
            d.div_(prob[i])
        elif scale is not None:
            d.mul_(scale[i])
        if weighted:
            d.mul_(weights[i])
    return deltas


def dropped(x: TensorInputs, l1_scale: Optional[list] = None) -> TaskVectors:
    """The chunk's task vectors after DARE's drop and rescale (per ``semantics``)."""
    deltas = dropped_deltas(x, l1_scale)
    return TaskVectors(deltas, torch.tensor(x.model_param("weight"), dtype=deltas.dtype, device=deltas.device))


def _prepare_tensor(src: TensorSource) -> Optional[TrimStats]:
    """mergekit's L1 rescale factors of a chunked tensor (from the fused CPU kernels where they run)."""
    if src.params["semantics"] == "paper" or not src.params["rescale"]:
        return None
    if all(p["density"] >= 1 for p in src.model_params):
        return None
    if src.num_chunks == 1:
        return None  # the merge computes the factors from the same (only) chunk: see _inline_l1
    if fused.kernels() is not None:
        sums = np.zeros((src.num_models, 2))
        for c in src.chunks():
            part = _fused_l1_sums(c) if fused.usable(c.base, *c.models) else None
            if part is None:
                break
            sums += part
        else:
            return TrimStats([], [l1_factor(b, a) for b, a in sums.tolist()])
    return TrimStats([], l1_rescale_factors(src.as_float32(), lambda c: dropped(c).deltas))


def _stream_keys(x: TensorInputs) -> tuple:
    """Per model, the key of the random stream whose words draw DARE's mask (the words
    :meth:`TensorInputs.keep_mask` compares) and the keep limit; a model kept whole gets a limit
    above every word."""
    dens = x.model_param("density")
    return [x.stream_key(i, "dare") for i in range(len(dens))], [keep_limit(d) for d in dens]


def _fused_l1_sums(x: TensorInputs) -> Optional[np.ndarray]:
    return fused.masked_l1_sums(x.base, x.models, *_stream_keys(x))


def _fused_dare(x: TensorInputs, tie: Optional[float]) -> Optional[torch.Tensor]:
    """:func:`dare_ties_merge` (with the sign election's ``tie`` sign) or :func:`dare_linear_merge`
    (``tie`` None) with the fused CPU kernels (see :mod:`mergelab.methods.fused`), or None."""
    n = len(x.models)
    dens = x.model_param("density")
    paper = x.params["semantics"] == "paper"
    keys, limits = _stream_keys(x)
    kept = None
    factors = [1.0] * n
    divisors = [1.0] * n
    if paper:
        divisors = [min(1.0, d) if d > 0 else 1.0 for d in dens]
    elif _inline_l1(x):
        # The L1 pass stores its keep flags (1 byte an entry: a whole tensor is at most a few million)
        # so the merge reads them instead of drawing the words again.
        kept = np.empty((n, x.base.numel()), np.uint8)
        sums = fused.masked_l1_sums(x.base, x.models, keys, limits, kept)
        if sums is None:
            return None
        factors = [l1_factor(b, a) for b, a in sums.tolist()]
    elif _scale(x) is not None:
        factors = list(_scale(x))
    weights = x.model_param("weight")
    if tie is None:
        divide_by = 1.0
        if x.params["normalize"]:
            total = torch.tensor(weights, dtype=torch.float32).sum().item()  # as linear_combine sums them
            divide_by = 1.0 if abs(total) < 1e-8 else total
        return fused.weighted_sum_merge(x.base, x.models, factors=factors, divisors=divisors, weights=weights,
                                        divide_by=divide_by, lam=x.params["lambda"], keys=keys, keep_below=limits,
                                        kept=kept, out_dtype=x.out_dtype)
    return fused.consensus_merge(x.base, x.models, thresholds=[0.0] * n, factors=factors, divisors=divisors,
                                 weights=weights, tie_sign=tie, normalize=x.params["normalize"],
                                 count_divisor=paper, lam=x.params["lambda"], keys=keys, keep_below=limits, kept=kept,
                                 out_dtype=x.out_dtype)


def _scale(x: TensorInputs) -> Optional[list]:
    return None if x.tensor_stats is None else x.tensor_stats.l1_scale


def _inline_l1(x: TensorInputs) -> bool:
    """Whether the merge must compute mergekit's L1 factors itself (a tensor in one chunk)."""
    if x.tensor_stats is not None or x.params["semantics"] == "paper" or not x.params["rescale"]:
        return False
    if all(d >= 1 for d in x.model_param("density")):
        return False
    whole = (0, x.shape[0]) if x.shape else (0, 0)
    if tuple(x.rows) not in (whole, (0, 0)):  # (0, 0): the default, a whole tensor given directly
        raise RuntimeError(f"internal: L1 rescale factors missing for row chunk {x.rows} of tensor '{x.name}'")
    return True


def dare_linear_merge(x: TensorInputs) -> torch.Tensor:
    if fused.usable(x.base, *x.models):
        merged = _fused_dare(x, None)
        if merged is not None:
            return merged
    x = x.as_float32()
    deltas = dropped_deltas(x, _scale(x), weighted=True, inline_l1=_inline_l1(x))
    weights = torch.tensor(x.model_param("weight"), dtype=deltas.dtype, device=deltas.device)
    return finish(x, linear_combine(TaskVectors(deltas, weights), normalize=x.params["normalize"]))


def dare_ties_merge(x: TensorInputs) -> torch.Tensor:
    paper = x.params["semantics"] == "paper"
    tie = x.model_stats.tie_sign if paper else 1.0
    if tie != 0 and fused.usable(x.base, *x.models):
        merged = _fused_dare(x, tie)
        if merged is not None:
            return merged
    x = x.as_float32()
    deltas = dropped_deltas(x, _scale(x), weighted=True, inline_l1=_inline_l1(x))
    weights = torch.tensor(x.model_param("weight"), dtype=deltas.dtype, device=deltas.device)
    merged = consensus_merge(deltas, weights, tie, x.params["normalize"], "count" if paper else "weight")
    return finish(x, merged)


def _warn_without_drop(result: str):
    """Validation hook: one warning when no model drops anything (``density`` 1 for every model,
    mergekit's default when the recipe does not set it), saying what the merge then is."""

    def check(params: dict, model_params: list) -> None:
        import warnings

        if model_params and all(p["density"] >= 1 for p in model_params):
            warnings.warn(f"{result}: density is 1 for every model (mergekit's default when it is not set), so DARE "
                          f"drops nothing and this is {_WITHOUT_DROP[result]}; set density below 1 (e.g. 0.5) to "
                          f"drop entries", UserWarning, stacklevel=2)

    return check


_WITHOUT_DROP = {"dare_linear": "task arithmetic", "dare_ties": "TIES without a trim (sign election only)"}

_REFERENCE = ("Yu et al. 2024, DARE (arXiv:2311.03099), yule-BUAA/MergeLM; mergekit 0.1.5 `{}`.")

register(MergeMethod(
    name="dare_linear",
    family="dare",
    summary="Randomly drop task-vector entries, rescale the kept ones, add the weighted sum to the base.",
    reference=_REFERENCE.format("dare_linear"),
    merge=dare_linear_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    validate=_warn_without_drop("dare_linear"),
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="mergekit rescales by L1-norm matching over the tensor; semantics: paper rescales by 1/density.",
))


def _prepare_model_ties(scope: ModelScope) -> Optional[TrimStats]:
    if scope.params["semantics"] != "paper":
        return None
    return TrimStats([], None, global_tie_sign(scope.as_float32(), lambda c: dropped(c).deltas))


register(MergeMethod(
    name="dare_ties",
    family="dare",
    summary="DARE's random drop and rescale, then TIES' sign election and disjoint merge.",
    reference=_REFERENCE.format("dare_ties"),
    merge=dare_ties_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, normalize(False), rescale_flag(True), INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model_ties,
    validate=_warn_without_drop("dare_ties"),
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="mergekit rescales by L1-norm matching and sums the agreeing entries (normalize: false); "
          "semantics: paper rescales by 1/density and resolves zero sums by the model's majority sign.",
))
