"""OTA merging with Fast Fisher Grafting: curvature-weighted averaging from Adam's second moments.

Mahdavi et al., "Harnessing Optimization Dynamics for Curvature-Informed Model Merging", 2025
(arXiv:2509.11167; reference code pmahdavi/ota-merge @eee703f, ``mergekit/merge_methods/ota.py``,
configs ``configs/hf_ota_ffg_*.yml``).

Each model comes with the Adam second moments ``v_t`` (``exp_avg_sq``) saved at the end of its
fine-tuning, read by the engine from the per-model parameter ``second_moments`` (a safetensors file
or folder of tensors named like the model's parameters, or a PyTorch optimizer checkpoint such as the
Hugging Face Trainer's ``optimizer.pt``, see :mod:`mergelab.io.optimizer_state`) and passed as
``inputs.aux["second_moments"]``.
Per tensor and model:

1. Optional compression of ``v_t`` (2-D tensors only), used in every later step:
   ``rank1_approx`` (Adafactor-style, the paper's Lemma 1): ``v ~ r c^T / (1^T v 1)`` with row sums
   ``r`` and column sums ``c`` (all zeros if the total is 0); or ``rank: k`` (not applied to tensors
   matched by ``rank_exclude``, the reference's embeddings): the rank-``k`` truncated SVD, clipped at 0.
2. Fast Fisher Grafting mask ``M_t``: with a base, saliency ``s = v * tau^2`` (diagonal-Fisher estimate
   of the loss increase from reverting an entry), ``M = [s >= thr_t]``; without a base ``M = [v >= thr_t]``.
   ``thr_t`` is the absolute ``precond_threshold`` (the paper's configs), or the threshold that keeps
   the top ``ffg_density`` fraction of the model's saliencies, found exactly over the *whole model*
   in a streaming pass (``prepare_model``).
3. Preconditioner ``P_t = v^power * scaling_factor`` (``normalise: global`` divides by the tensor's mean
   of ``P_t`` plus epsilon); weight ``W_t = (P_t + epsilon) * M_t``.

Merge (with a base): ``theta = theta_0 + sum_t W_t tau_t / sum_t W_t``, the elementwise
curvature-weighted mean; without a base ``theta = sum_t W_t theta_t / sum_t W_t``. When a threshold is
active, entries where every model is masked (``sum_t W_t <= 1.1 n epsilon``) take the base value
(``fallback_to_base``, true in the paper's configs) or the mean of the models.

The method streams: compression factors (column sums, or the top-``k`` right singular vectors from
the Gram matrix ``v^T v`` accumulated over row chunks in float64) and the tensor mean for
``normalise: global`` are per-tensor statistics; ``rank`` compression of a tensor split into chunks
holds a ``cols x cols`` float64 Gram matrix per model.

Not implemented from the reference: ``rescale`` (hybrid-norm rescaling of masked task vectors, which
needs spectral norms), and ``masked_task_vector_merge_method: linear | ties`` (only the default
``precond`` merge, the paper's OTA). Parameters the engine does not know are rejected by the recipe
validator, so such recipes fail loudly rather than silently differ.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, List, Optional

import torch

from mergelab.errors import RecipeError
from mergelab.methods.registry import BaseUse, MergeMethod, ModelScope, Param, TensorInputs, TensorSource, register
from mergelab.methods.select import kept_vs_asked, top_cuts

SECOND_MOMENTS = "second_moments"
DEFAULT_RANK_EXCLUDE = r"(^|\.)(embed_tokens|lm_head|wte|word_embeddings|tok_embeddings|embed_in)\.weight$"


# ---------------------------------------------------------------------------------------------
# Compression of the second moments.


@dataclass(frozen=True)
class Compression:
    """How one model's second moments of one tensor are compressed.

    ``rank1``: ``col`` holds the column sums and ``total`` the sum over the tensor (float64).
    ``rank``: ``basis`` holds the top right singular vectors ``V_k`` (cols x k, float64); the
    truncated SVD of the rows ``v`` is ``v V_k V_k^T``.
    """

    kind: str
    col: Optional[torch.Tensor] = None
    total: float = 0.0
    basis: Optional[torch.Tensor] = None


def compression_kind(name: str, shape: tuple, model_param: dict, params: dict) -> Optional[str]:
    """``"rank1"``, ``"rank"`` or ``None`` for this tensor and model (the reference's precedence)."""
    if len(shape) != 2:
        return None
    if model_param["rank1_approx"]:
        return "rank1"
    if model_param["rank"] > 0 and not re.search(params["rank_exclude"], name):
        return "rank"
    return None


class _CompressionBuilder:
    """Accumulates one tensor's compression statistics over its row chunks, for every model."""

    def __init__(self, kinds: List[Optional[str]], ranks: List[int]):
        self.kinds = kinds
        self.ranks = ranks
        self.acc: list = [None] * len(kinds)
        self.whole: list = [None] * len(kinds)
        self.chunks = 0

    def add(self, vs: List[torch.Tensor], whole_tensor: bool) -> None:
        self.chunks += 1
        for i, (kind, v) in enumerate(zip(self.kinds, vs)):
            if kind is None:
                continue
            v64 = v.double()
            if kind == "rank1":
                col, total = v64.sum(0), float(v64.sum())
                if self.acc[i] is None:
                    self.acc[i] = [col, total]
                else:
                    self.acc[i][0] += col
                    self.acc[i][1] += total
            elif whole_tensor:
                self.whole[i] = v64
            else:
                gram = v64.T @ v64
                self.acc[i] = gram if self.acc[i] is None else self.acc[i] + gram

    def finish(self) -> List[Optional[Compression]]:
        out: List[Optional[Compression]] = []
        for i, kind in enumerate(self.kinds):
            if kind is None:
                out.append(None)
            elif kind == "rank1":
                col, total = self.acc[i]
                out.append(Compression("rank1", col=col, total=total))
            else:
                k = self.ranks[i]
                if self.whole[i] is not None and self.chunks == 1:
                    _, _, vh = torch.linalg.svd(self.whole[i], full_matrices=False)
                    basis = vh[:k].T
                else:
                    evals, evecs = torch.linalg.eigh(self.acc[i])
                    basis = evecs[:, torch.argsort(evals, descending=True)[:k]]
                out.append(Compression("rank", basis=basis))
        return out


def compress(v: torch.Tensor, c: Optional[Compression]) -> torch.Tensor:
    """The compressed second moments of a row chunk ``v`` (float32)."""
    if c is None:
        return v
    if c.kind == "rank1":
        if c.total == 0:
            return torch.zeros_like(v)
        rows = v.double().sum(1, keepdim=True)
        return (rows @ (c.col.to(v.device) / c.total)[None, :]).to(v.dtype)
    b = c.basis.to(v.device)
    return torch.relu((v.double() @ b) @ b.T).to(v.dtype)


def _whole(c: TensorInputs) -> bool:
    return c.rows == (0, c.shape[0]) or c.rows == (0, 0)


def _moments(x: TensorInputs) -> list:
    v = x.aux.get(SECOND_MOMENTS)
    if v is None or len(v) != len(x.models):
        raise RecipeError(f"ota: tensor '{x.name}' has no second moments for every model; each model needs the "
                          f"per-model parameter '{SECOND_MOMENTS}' naming its exp_avg_sq tensors")
    return v


def _builder(x: TensorInputs, params: dict) -> Optional[_CompressionBuilder]:
    kinds = [compression_kind(x.name, tuple(x.shape), p, params) for p in x.model_params]
    if all(k is None for k in kinds):
        return None
    return _CompressionBuilder(kinds, [p["rank"] for p in x.model_params])


# ---------------------------------------------------------------------------------------------
# Statistics.


@dataclass(frozen=True)
class OTATensorStats:
    """Per-tensor compression factors and (``normalise: global``) mean preconditioner per model."""

    compression: list
    mean_precond: Optional[list] = None


@dataclass(frozen=True)
class OTAModelStats:
    """Whole-model FFG thresholds per model (``None``: no density mask for that model)."""

    thresholds: list
    cuts: Optional[list] = None

    def manifest_report(self) -> Optional[dict]:
        return None if self.cuts is None else kept_vs_asked("ffg_mask", self.cuts)


def _precond(v: torch.Tensor, model_param: dict, params: dict) -> torch.Tensor:
    p = torch.pow(v, params["power"])
    if model_param["scaling_factor"] != 1.0:
        p = p * model_param["scaling_factor"]
    return p


def _prepare_tensor(src: TensorSource) -> Optional[OTATensorStats]:
    first = None
    builder = None
    for c in src.chunks():
        if first is None:
            first = c
            builder = _builder(c, src.params)
            if builder is None:
                break
        builder.add(_moments(c), _whole(c) and src.num_chunks == 1)
    comp = builder.finish() if builder is not None else [None] * src.num_models
    mean = None
    if src.params["normalise"] == "global":
        sums = [0.0] * src.num_models
        for c in src.chunks():
            for i, v in enumerate(_moments(c)):
                sums[i] += float(_precond(compress(v, comp[i]), c.model_params[i], src.params).double().sum())
        mean = [s / max(src.numel, 1) for s in sums]
    if all(k is None for k in comp) and mean is None:
        return None
    return OTATensorStats(comp, mean)


def saliency(x: TensorInputs, i: int, v: torch.Tensor) -> torch.Tensor:
    """FFG saliency of model ``i``: ``v * tau^2`` with a base, ``v`` without."""
    if x.base is None:
        return v
    tau = x.models[i] - x.base
    return v * torch.pow(tau, 2)  # the reference's expression, so float32 ties at the threshold agree


def _model_compressions(scope: ModelScope) -> dict:
    """Compression factors of every tensor of the model, keyed by name (one streaming pass).

    Chunks of one tensor must arrive one after the other (the engine streams tensor by tensor), so
    only one tensor's accumulators are held at a time.
    """
    out: dict = {}
    name = None
    builder = None
    for c in scope.chunks():
        if c.name != name:
            if name is not None:
                out[name] = builder.finish() if builder is not None else None
            if c.name in out:
                raise RuntimeError(f"ota: chunks of tensor '{c.name}' are not contiguous in the model stream")
            name, builder = c.name, _builder(c, scope.params)
        if builder is not None:
            builder.add(_moments(c), _whole(c))
    if name is not None:
        out[name] = builder.finish() if builder is not None else None
    return out


def _prepare_model(scope: ModelScope) -> Optional[OTAModelStats]:
    # ffg_density is per_layer=False, so the recipe makes it one value per model for the whole model;
    # reading it from the scope avoids a pass over the model when no density is set.
    densities = [p["ffg_density"] for p in scope.model_params]
    if not densities or all(d >= 1 for d in densities):
        return None
    compressions = _model_compressions(scope)
    active = [i for i, d in enumerate(densities) if d < 1]

    def saliencies() -> Iterable[torch.Tensor]:
        for c in scope.chunks():
            comp = compressions.get(c.name) or [None] * len(c.models)
            vs = _moments(c)
            yield torch.stack([saliency(c, i, compress(vs[i], comp[i])) for i in active])

    def ks(total: int) -> list:
        return [0 if densities[i] <= 0 else max(1, math.floor(densities[i] * total)) for i in active]

    found = top_cuts(saliencies, ks, exact=False)  # the reference keeps every entry >= the threshold
    thresholds: list = [None] * len(densities)
    cuts: list = [None] * len(densities)
    for i, c in zip(active, found):
        thresholds[i] = c.value
        cuts[i] = c
    return OTAModelStats(thresholds, cuts)


# ---------------------------------------------------------------------------------------------
# The merge.


def ota_weights(x: TensorInputs) -> tuple:
    """Per-model weights ``W_t`` ``[n, *chunk]`` and whether any FFG threshold is active."""
    vs = _moments(x)
    tstats: Optional[OTATensorStats] = x.tensor_stats
    mstats: Optional[OTAModelStats] = x.model_stats
    eps = x.params["epsilon"]
    weights = []
    active = False
    for i, mp in enumerate(x.model_params):
        v = compress(vs[i], tstats.compression[i] if tstats is not None else None)
        threshold = mp["precond_threshold"] if mp["precond_threshold"] > 0 else None
        if threshold is None and mstats is not None:
            threshold = mstats.thresholds[i]
        p = _precond(v, mp, x.params)
        if x.params["normalise"] == "global":
            p = p / (tstats.mean_precond[i] + eps)
        w = p + eps
        if threshold is not None:
            active = True
            w = w * (saliency(x, i, v) >= threshold).to(w.dtype)
        weights.append(w)
    return torch.stack(weights), active


def ota_merge(x: TensorInputs) -> torch.Tensor:
    w, thresholded = ota_weights(x)
    stacked = torch.stack(x.models)
    den = w.sum(0)
    safe = torch.where(den > 0, den, torch.ones_like(den))
    if x.base is not None:
        merged = x.base + (w * (stacked - x.base)).sum(0) / safe
    else:
        merged = (w * stacked).sum(0) / safe
    if not thresholded:
        return merged
    fully_masked = den <= len(x.models) * x.params["epsilon"] * 1.1
    if x.params["fallback_to_base"] and x.base is not None:
        fallback = x.base
    else:
        fallback = stacked.mean(0)
    return torch.where(fully_masked, fallback, merged)


def _validate(params: dict, model_params: list) -> None:
    for i, p in enumerate(model_params):
        if p["precond_threshold"] > 0 and p["ffg_density"] < 1:
            raise RecipeError(f"ota: model {i + 1} sets both 'precond_threshold' and 'ffg_density'; expected one "
                              "way to choose the FFG threshold (absolute, or the whole-model density)")
        if p["rank1_approx"] and p["rank"] > 0:
            raise RecipeError(f"ota: model {i + 1} sets both 'rank1_approx' and 'rank'; expected one compression "
                              "of the second moments")
    try:
        re.compile(params["rank_exclude"])
    except re.error as e:
        raise RecipeError(f"ota: parameter 'rank_exclude' = {params['rank_exclude']!r} is not a valid regular "
                          f"expression ({e})") from None


register(MergeMethod(
    name="ota",
    family="ota",
    summary="Average task vectors elementwise, weighted by each model's Adam second moments; optional Fisher grafting.",
    reference="Mahdavi et al. 2025, OTA merging + Fast Fisher Grafting (arXiv:2509.11167); "
              "pmahdavi/ota-merge mergekit/merge_methods/ota.py.",
    merge=ota_merge,
    base=BaseUse.OPTIONAL,
    params=(
        Param("epsilon", float, "Added to every preconditioner weight (paper configs 1e-26; the code default 1e-8 "
              "swamps v^0.5 ~ 1e-10 and degenerates to a plain average).", default=1e-26, low=0.0, low_open=True),
        Param("power", float, "Preconditioner exponent: weight = v^power (0.5 ~ Adam's sqrt(v)).", default=0.5,
              low=0.0, low_open=True),
        Param("normalise", str, "'none', or 'global': divide each model's preconditioner by its mean over the "
              "tensor.", default="none", choices=("none", "global")),
        Param("fallback_to_base", bool, "Entries masked in every model take the base value (else the models' "
              "mean); paper configs: true, code default: false.", default=True),
        Param("rank_exclude", str, "Regular expression of tensor names never rank-compressed (the reference's "
              "embeddings).", default=DEFAULT_RANK_EXCLUDE),
    ),
    model_params=(
        Param(SECOND_MOMENTS, str, "Path to this model's Adam exp_avg_sq tensors (the reference's "
              "preconditioner_path): a safetensors file or folder of tensors named like the parameters, or a "
              "PyTorch optimizer checkpoint: a .pt/.bin file holding torch.save(optimizer.state_dict()) (keys "
              "'state' and 'param_groups'), or a folder with optimizer.pt and no safetensors besides the model's "
              "weights (a Hugging Face Trainer checkpoint). Its indices are named by the groups' param_names, "
              "else by the Trainer's grouping of this model's architecture (config.json), checked against every "
              "shape; Adafactor's factored exp_avg_sq_row/col give its rank-1 estimate."),
        Param("precond_threshold", float, "Absolute FFG threshold on v*tau^2 (v without a base); 0 disables "
              "(paper configs: ~1e-21 to 1e-18 per model).", default=0.0, low=0.0),
        Param("ffg_density", float, "Keep the top fraction of this model's FFG saliencies over the whole model "
              "(exact whole-model quantile); 1 disables.", default=1.0, low=0.0, high=1.0, per_layer=False),
        Param("scaling_factor", float, "Multiplies this model's preconditioner.", default=1.0, low=0.0,
              low_open=True),
        Param("rank1_approx", bool, "Compress 2-D second moments to rank 1 from row and column sums (Lemma 1).",
              default=False),
        Param("rank", int, "Compress 2-D second moments to this rank by truncated SVD, clipped at 0; 0 disables.",
              default=0, low=0),
    ),
    min_models=1,
    chunkable=True,
    prepare_tensor=_prepare_tensor,
    prepare_model=_prepare_model,
    validate=_validate,
    aux_inputs=(SECOND_MOMENTS,),
    unsupported=("rescale",),
    notes="Not in mergekit 0.1.5, FusionBench or PEFT (the reference is a mergekit fork). Defaults follow the "
          "paper's configs (epsilon 1e-26, fallback_to_base true), not the fork's code defaults. ffg_density is "
          "a whole-model quantile (the paper chose absolute thresholds from FFG density sweeps).",
))
