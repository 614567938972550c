"""DARE: drop task-vector entries at random and rescale the rest, then merge.

Yu et al., "Language Models are Super Mario: Absorbing Abilities from Homologous Models as a Free
Lunch", ICML 2024 (arXiv:2311.03099; reference code yule-BUAA/MergeLM ``mask_weights_utils.py``).
Each entry of each task vector is kept with probability ``density`` (= 1 - drop rate p).

``semantics: mergekit`` (default) is mergekit 0.1.5: the kept entries are rescaled so that each task
vector keeps its L1 norm over the whole tensor (when ``rescale``), ``dare_ties`` elects signs with
ties going to ``+1`` and sums the agreeing entries (``normalize: true`` divides by the agreeing
weights); it has no trim after the drop, so ``trim_density`` is an error there.

``semantics: paper`` is MergeLM's DARE (spec: ``tau~ = tau * (1 - m) / (1 - p)``, ``p`` = 1 - density):
``rescale: true`` divides each kept entry by ``density`` (unbiased: E[tau~] = tau), ``rescale: false``
drops only (the paper's "DropOnly"). ``dare_ties`` is then DARE per model followed by the *whole*
TIES procedure of the reference (MergeLM ``ties_merging`` after ``mask_input_with_mask_rate``):
trim every DARE'd task vector over the whole model (every entry ``>=`` the ``(floor(K*N) + 1)``-th
largest magnitude kept, ``K = trim_density``, default 0.2 as MergeLM's mask rate 0.8), weight, elect
the sign by mass (a zero sum takes the sign of the total elected mass over the whole model, itself
possibly 0), and take the disjoint *mean* (divided by the count of agreeing entries; ``normalize``
defaults to true there, and an explicit ``normalize: false`` is the reference's "dis-sum").
This path runs the tensor code (the fused kernels do not trim after a drop).

Randomness: each (seed, tensor, row chunk, model) has its own stream, drawn on the CPU, so the masks
do not depend on the order tensors are processed in, on threads, or on the device.
"""

from __future__ import annotations

from typing import Optional

import numpy as np
import torch

from mergelab.errors import RecipeError
from mergelab.methods import fused
from mergelab.methods.common import DENSITY, INT8_MASK, LAMBDA, SEMANTICS, WEIGHT, normalize, rescale_flag
from mergelab.methods.parallel import map_models
from mergelab.methods.registry import (BaseUse, MergeMethod, ModelScope, Param, TensorInputs, TensorSource,
                                      keep_limit, register)
from mergelab.methods.consensus import TrimStats, consensus_merge, global_tie_sign
from mergelab.methods.inputs import finish
from mergelab.methods.rescale import l1_factor, l1_rescale_factors
from mergelab.methods.select import flat_offset, keep_count, top_cuts, zero_outside
from mergelab.methods.transforms import TaskVectors, linear_combine

# TIES' K after DARE with semantics: paper: MergeLM's ties_merging default param_value_mask_rate 0.8.
PAPER_TRIM_DENSITY = 0.2

TRIM_DENSITY = Param(
    "trim_density", float,
    "semantics: paper only: TIES' K, the fraction of each DARE'd task vector kept by the whole-model "
    f"magnitude trim before the sign election (unset: {PAPER_TRIM_DENSITY}, MergeLM's mask rate 0.8; 1 keeps "
    "all). An error with semantics: mergekit, whose dare_ties has no trim.",
    default=None, low=0.0, high=1.0, per_layer=False,
)

DARE_TIES_NORMALIZE = Param(
    "normalize", bool,
    "Divide the agreeing entries' sum: by the agreeing models' summed weights (semantics: mergekit) or by "
    "the count of agreeing entries (semantics: paper, TIES' disjoint mean; false there is the reference's "
    "'dis-sum'). Unset: false with semantics: mergekit (mergekit's default), true with semantics: paper.",
    default=None,
)


def normalize_of(params: dict) -> bool:
    """``normalize`` as resolved: an unset value (None) means mergekit's false, or the paper's disjoint mean."""
    v = params["normalize"]
    return (params["semantics"] == "paper") if v is None else bool(v)


def trim_density_of(params: dict) -> float:
    v = params.get("trim_density")
    return PAPER_TRIM_DENSITY if v is None else float(v)


def keep_masks(x: TensorInputs) -> torch.Tensor:
    """Bernoulli(density) keep masks ``[n, *chunk]``; a density of 1 or more keeps everything."""
    return torch.stack([x.keep_mask(i, d, "dare") for i, d in enumerate(x.model_param("density"))])


def dropped_deltas(x: TensorInputs, l1_scale: Optional[list] = None, weighted: bool = False,
                   inline_l1: bool = False) -> torch.Tensor:
    """The chunk's task vectors ``[n, *chunk]`` after DARE's drop and rescale (per ``semantics`` and
    ``rescale``), multiplied by the models' weights if ``weighted``.

    Value for value ``weigh()(drop(keep_masks(x), ...)(TaskVectors.from_models(...)))``, computed in
    one buffer (full-size temporaries cost more than the arithmetic on CPUs).
    ``inline_l1`` computes mergekit's L1 rescale factors from this chunk, which must be the whole
    tensor, exactly as :func:`~mergelab.methods.rescale.l1_rescale_factors` would in a separate pass
    (the random masks are then drawn once instead of twice).
    """
    base = x.base
    dens = x.model_param("density")
    paper = x.params["semantics"] == "paper"
    rescale = x.params["rescale"]
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
            if rescale:  # else the paper's drop-only mode; a density of 0 drops everything: nothing to rescale
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
    """:func:`dare_ties_merge` with ``semantics: mergekit`` (with the sign election's ``tie`` sign) or
    :func:`dare_linear_merge` (``tie`` None) with the fused CPU kernels (see :mod:`mergelab.methods.fused`),
    or None. The kernels have no trim after the drop: ``dare_ties`` with ``semantics: paper`` never
    comes here."""
    n = len(x.models)
    dens = x.model_param("density")
    paper = x.params["semantics"] == "paper"
    keys, limits = _stream_keys(x)
    kept = None
    factors = [1.0] * n
    divisors = [1.0] * n
    if paper:
        if x.params["rescale"]:
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
    if paper:
        raise RuntimeError("internal: dare_ties with semantics: paper trims after the drop; the kernels cannot")
    return fused.consensus_merge(x.base, x.models, thresholds=[0.0] * n, factors=factors, divisors=divisors,
                                 weights=weights, tie_sign=tie, normalize=normalize_of(x.params),
                                 count_divisor=False, lam=x.params["lambda"], keys=keys, keep_below=limits,
                                 kept=kept, out_dtype=x.out_dtype)


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
    if x.params["semantics"] == "paper":
        return _dare_ties_paper(x)
    if fused.usable(x.base, *x.models):
        merged = _fused_dare(x, 1.0)
        if merged is not None:
            return merged
    x = x.as_float32()
    deltas = dropped_deltas(x, _scale(x), weighted=True, inline_l1=_inline_l1(x))
    weights = torch.tensor(x.model_param("weight"), dtype=deltas.dtype, device=deltas.device)
    merged = consensus_merge(deltas, weights, 1.0, normalize_of(x.params), "weight")
    return finish(x, merged)


def _dare_ties_paper(x: TensorInputs) -> torch.Tensor:
    """DARE, then the whole of TIES as the reference (see the module docstring), in the tensor code:
    drop and rescale, trim at the whole-model cuts of :func:`_prepare_model_ties`, weigh, elect with
    the whole-model zero-sum sign, disjoint mean over the agreeing count, lambda."""
    stats: TrimStats = x.model_stats
    x = x.as_float32()
    deltas = dropped_deltas(x)
    offset = flat_offset(x.rows, x.shape)
    weights = torch.tensor(x.model_param("weight"), dtype=deltas.dtype, device=deltas.device)
    for i, cut in enumerate(stats.cuts):
        if cut is not None:
            zero_outside(deltas[i], cut, offset)
    for i in range(deltas.shape[0]):
        deltas[i].mul_(weights[i])
    return finish(x, consensus_merge(deltas, weights, stats.tie_sign, normalize_of(x.params), "count"))


def _validate(result: str):
    """Validation hook: settings a semantics cannot honour are errors naming both; one warning when no
    model drops anything (``density`` 1 for every model, mergekit's default when the recipe does not set
    it), saying what the merge then is."""

    def check(params: dict, model_params: list) -> None:
        import warnings

        if params.get("trim_density") is not None and params["semantics"] != "paper":
            raise RecipeError(
                f"{result}: parameter 'trim_density' = {params['trim_density']:g} cannot be honoured with semantics: "
                f"{params['semantics']} (mergekit's dare_ties has no trim after DARE's drop); remove it, or set "
                f"semantics: paper for DARE followed by the whole of TIES (trim, elect, disjoint mean)")
        if model_params and all(p["density"] >= 1 for p in model_params):
            what = _WITHOUT_DROP[result]
            if result == "dare_ties" and params["semantics"] == "paper":
                what = "TIES (trim, elect, disjoint mean) without DARE's drop"
            warnings.warn(f"{result}: density is 1 for every model (mergekit's default when it is not set), so DARE "
                          f"drops nothing and this is {what}; set density below 1 (e.g. 0.5) to drop entries",
                          UserWarning, stacklevel=2)

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
    validate=_validate("dare_linear"),
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="semantics: mergekit rescales by L1-norm matching over the tensor (rescale: false drops only); "
          "semantics: paper divides each kept entry by density (rescale: true, unbiased) or drops only "
          "(rescale: false, the paper's DropOnly).",
))


def _prepare_model_ties(scope: ModelScope) -> Optional[TrimStats]:
    """With ``semantics: paper``, TIES' whole-model trim cuts of the DARE'd task vectors (every entry
    ``>=`` the ``(floor(K*N)+1)``-th largest magnitude, as ``ties``' paper trim) and the sign of the
    total elected mass (the zero-sum rule). DARE's masks are drawn again in each pass, from the same
    per-(seed, tensor, chunk, model) streams, so the cuts are those of the merge's own masks."""
    if scope.params["semantics"] != "paper":
        return None
    scope = scope.as_float32()
    n = scope.num_models
    k = trim_density_of(scope.params)
    if k >= 1:
        cuts = [None] * n
    else:
        cuts = top_cuts(lambda: (dropped_deltas(c) for c in scope.chunks()),
                        lambda total: [keep_count(k, total, "paper")] * n, exact=False)
        # A threshold of 0 (DARE kept fewer entries than the trim asks) keeps every entry: no trim, and
        # nothing for mergelab.json to report as kept over asked (the extra entries are DARE's zeros).
        cuts = [None if c is not None and c.value <= 0 else c for c in cuts]

    def trimmed(c: TensorInputs) -> torch.Tensor:
        d = dropped_deltas(c)
        offset = flat_offset(c.rows, c.shape)
        for i, cut in enumerate(cuts):
            if cut is not None:
                zero_outside(d[i], cut, offset)
        return d

    return TrimStats(cuts, None, global_tie_sign(scope, trimmed))


register(MergeMethod(
    name="dare_ties",
    family="dare",
    summary="DARE's random drop and rescale, then TIES' sign election and disjoint merge (semantics: paper: "
            "the whole of TIES, trim included).",
    reference=_REFERENCE.format("dare_ties"),
    merge=dare_ties_merge,
    base=BaseUse.REQUIRED,
    params=(LAMBDA, DARE_TIES_NORMALIZE, rescale_flag(True), TRIM_DENSITY, INT8_MASK, SEMANTICS),
    model_params=(WEIGHT, DENSITY),
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model_ties,
    validate=_validate("dare_ties"),
    warm_up=fused.warm_up,
    raw_inputs=True,
    notes="semantics: mergekit rescales by L1-norm matching and sums the agreeing entries (normalize unset = "
          "false); it has no trim (trim_density is an error). semantics: paper is DARE (rescale: true divides by "
          "density, false drops only) followed by the whole of TIES: the whole-model trim at trim_density "
          "(default 0.2; every entry >= the (floor(K*N)+1)-th largest magnitude), the sign election with zero "
          "sums resolved by the model's majority sign, and the disjoint mean over the agreeing count "
          "(normalize unset = true; false is the reference's dis-sum).",
))
