"""Expert Merging and Expert Merging++: layer-wise coefficients that align the merge with each expert.

"Expert Merging: Model Merging with Unsupervised Expert Alignment and Importance-Guided Layer Chunking"
(arXiv:2509.25712). Reference code: Littleor/ExpertMerging (``global_utils/expert_merging_base.py``,
``global_utils/merging_utils.py::scale_tensor_by_coeffs``, ``InternVL/parametric_task_vector_model.py``,
``InternVL/model_merging.py`` for the CLI defaults).

Parametrisation: for expert ``k`` and tensor ``p`` a vector of ``C_p`` raw coefficients ``c``; the
weight is ``w = sigmoid(c)``, initialised at ``w_0 = 0.1``; ``theta_p = theta_0,p + sum_k
chunkscale(tau_{k,p}, w_{k,p})`` (flatten, ``torch.chunk`` into ``C_p`` pieces, scale each).
``C_p = 1`` is "layer-wise"; ``C_p <= 0`` freezes the tensor at ``w_0``; tensors matching ``exclude``
(default, as the reference: norms, biases, embeddings, ``lm_head``; case-insensitive here so that
BERT's ``LayerNorm`` is caught) keep the base value.

Loss on a calibration sample ``x`` of expert ``k`` (unlabelled; the target is the expert itself)::

    L = alpha_k [ T^2 KL(softmax(z_k / T) || softmax(z / T)) + lambda_h mean_{l in S} MSE(h^l, h^l_k) ] + gamma R
    R = sum_{k,p,chunks} |w - w_0| / (number of coefficients / K)

``z``/``h`` are the merged model's logits / hidden states, ``z_k``/``h_k`` expert ``k``'s (computed once
and cached: teachers are never held together in memory). The reference writes the logit term as a soft
cross-entropy; KL differs by the teacher's entropy, a constant, so the gradients are identical and the
loss is 0 when the merge equals the expert. The hidden term is off unless ``hidden_layers`` is given.
Optimiser as the reference: AdamW (lr 0.5), cosine warm restarts (T_0 50, T_mult 2, eta_min 0.1 lr)
stepped per optimiser step, gradient clipping at norm 1, gradient accumulation 8, batch 1, samples
balanced round-robin over experts (round ``j`` holds sample ``j`` of every expert; ``shuffle`` draws
the experts' order within each round anew every epoch, from ``seed``, the reference's optional
within-round shuffle). Defaults: T = 1, gamma = 5, lambda_h = 1, 1 epoch, no shuffle.

**Expert Merging++** (importance-guided chunking). The reference repository holds only the mechanism
(a per-tensor chunk count); the allocation rule below is our reading of the paper, marked as such:
after a layer-wise run, importance ``I_p = mean_k w_{k,p} ||tau_{k,p}||_F / sqrt(n_p)``, normalised to
sum 1; ``C_p = max(1, round(B I_p))`` for a chunk budget ``B`` (default 4 per trainable tensor); then
retrain from ``w_0``.
"""

from __future__ import annotations

import math
import re
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch

from mergelab.errors import MergeLabError
from mergelab.tune.functional import CoefficientSpace, ModelPool, leaf_params, merge_keys, token_mask
from mergelab.tune.result import TuneResult

DEFAULT_EXCLUDE = r"(?i)(lm_head|norm|embed|bias)"


@dataclass
class ExpertMergingConfig:
    """Settings; defaults are the reference InternVL CLI's (see the module docstring)."""

    init: float = 0.1
    lr: float = 0.5
    weight_decay: float = 0.0
    temperature: float = 1.0
    gamma: float = 5.0
    hidden_weight: float = 1.0
    hidden_layers: Optional[Sequence[int]] = None
    task_weights: Optional[Sequence[float]] = None
    epochs: int = 1
    grad_accumulation: int = 8
    clip_norm: float = 1.0
    t0: int = 50
    t_mult: int = 2
    exclude: str = DEFAULT_EXCLUDE
    chunks: Dict[str, int] = field(default_factory=dict)  # regex -> C_p (Expert Merging++ or by hand)
    storage: str = "memory"
    shuffle: bool = False  # shuffle the experts' order within each round (see sample_order)
    seed: int = 0  # seeds that shuffle


def sample_order(sizes: Sequence[int], epoch: int, shuffle: bool = False, seed: int = 0) -> List[tuple]:
    """One epoch's ``(expert, sample)`` pairs, balanced round-robin over experts.

    Round ``j`` holds sample ``j`` of every expert that has one, experts in order; with ``shuffle`` their
    order within each round is drawn from a generator seeded by ``(seed, epoch)``.
    """
    import random

    rng = random.Random(f"expert_merging:{seed}:{epoch}") if shuffle else None
    order = []
    for j in range(max(sizes, default=0)):
        experts = [k for k, n in enumerate(sizes) if j < n]
        if rng is not None:
            rng.shuffle(experts)
        order.extend((k, j) for k in experts)
    return order


@dataclass
class _Target:
    task: int
    batch: object
    logits: torch.Tensor
    hidden: List[torch.Tensor]
    mask: Optional[torch.Tensor]


@torch.no_grad()
def expert_targets(task_model, pool: ModelPool, keys: Sequence[str], data: Sequence[Sequence],
                   layers: Sequence[int]) -> List[List[_Target]]:
    """Each expert's logits and hidden states on its own calibration batches (one expert in memory at a time)."""
    out = []
    for k, batches in enumerate(data):
        theta = pool.load(k, keys)
        targets = []
        for b in batches:
            if layers:
                z, hs = task_model.rows_and_hidden(theta, b, k, layers)
            else:
                z, hs = task_model.rows(theta, b, k), []
            targets.append(_Target(k, b, z.detach(), [h.detach() for h in hs], token_mask(b)))
        out.append(targets)
        del theta
    return out


def _hidden_mse(h: torch.Tensor, target: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    if mask is not None and h.dim() == 3 and tuple(h.shape[:2]) == tuple(mask.shape):
        return ((h - target) ** 2)[mask].mean()
    return ((h - target) ** 2).mean()


def alignment_loss(task_model, theta, target: _Target, config: ExpertMergingConfig, layers: Sequence[int]):
    """``T^2 KL(teacher || merged) + lambda_h mean MSE(hidden)`` for one calibration batch (mean over rows)."""
    t = config.temperature
    if layers:
        z, hs = task_model.rows_and_hidden(theta, target.batch, target.task, layers)
    else:
        z, hs = task_model.rows(theta, target.batch, target.task), []
    log_q = torch.log_softmax(z.float() / t, -1)
    log_p = torch.log_softmax(target.logits.float() / t, -1)
    kl = (log_p.exp() * (log_p - log_q)).sum(-1).mean() * t * t
    if not layers:
        return kl
    mse = sum(_hidden_mse(h, ht, target.mask) for h, ht in zip(hs, target.hidden)) / len(layers)
    return kl + config.hidden_weight * mse


def _chunk_counts(keys: Sequence[str], patterns: Mapping[str, int]) -> Dict[str, int]:
    out = {}
    for k in keys:
        for pat, n in patterns.items():
            if re.search(pat, k):
                out[k] = int(n)
                break
    return out


def _schedule(opt, config: ExpertMergingConfig):
    return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(opt, T_0=config.t0, T_mult=config.t_mult,
                                                                eta_min=0.1 * config.lr)


def expert_merging(task_model, base: Mapping[str, torch.Tensor], pool: ModelPool, data: Sequence[Sequence],
                   config: ExpertMergingConfig = ExpertMergingConfig(),
                   progress: Optional[Callable[[int, float], None]] = None, chunks: Optional[Dict[str, int]] = None,
                   targets=None) -> TuneResult:
    """Expert Merging on ``pool`` (expert ``k`` <-> ``data[k]``, its unlabelled calibration batches).

    ``chunks`` maps tensor names to ``C_p`` (overrides ``config.chunks``' regexes); ``targets`` may pass
    precomputed teacher outputs (:func:`expert_targets`).
    """
    if len(data) != len(pool):
        raise MergeLabError(f"Expert Merging aligns each expert with its own data: {len(pool)} experts but "
                            f"{len(data)} calibration sets")
    if any(len(d) == 0 for d in data):
        raise MergeLabError("Expert Merging needs at least one calibration batch per expert")
    start = time.perf_counter()
    keys = merge_keys(base, pool)
    excluded = [k for k in keys if config.exclude and re.search(config.exclude, k)]
    layers = list(config.hidden_layers or [])
    counts = dict(chunks) if chunks is not None else _chunk_counts(keys, config.chunks)
    space = CoefficientSpace(base, pool, keys, "chunk", init=config.init, activation="sigmoid", chunks=counts,
                             exclude=excluded, storage=config.storage)
    if targets is None:
        targets = expert_targets(task_model, pool, keys, data, layers)
    alphas = list(config.task_weights) if config.task_weights is not None else [1.0] * len(pool)
    opt = torch.optim.AdamW([space.raw], lr=config.lr, weight_decay=config.weight_decay)
    sched = _schedule(opt, config)
    per_model = space.num_coefficients() / len(pool)
    history = []
    step = 0
    opt.zero_grad(set_to_none=True)
    for epoch in range(config.epochs):
        order = [targets[k][j] for k, j in sample_order([len(t) for t in targets], epoch, config.shuffle, config.seed)]
        for i, target in enumerate(order):
            w = space.weights()
            theta = leaf_params(space.assemble(w))
            align = alphas[target.task] * alignment_loss(task_model, theta, target, config, layers)
            grads = torch.autograd.grad(align / config.grad_accumulation, list(theta.values()), allow_unused=True)
            space.backward(w, {k: g for k, g in zip(theta, grads) if g is not None})
            reg = (space.weights() - config.init).abs().sum() / max(per_model, 1)
            (config.gamma * reg / config.grad_accumulation).backward()
            last = i == len(order) - 1
            if (i + 1) % config.grad_accumulation == 0 or last:
                torch.nn.utils.clip_grad_norm_([space.raw], config.clip_norm)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
            history.append({"epoch": epoch, "sample": i, "expert": target.task, "alignment": float(align.detach()), "regulariser": float(reg.detach()),
                            "mean_weight": float(space.weights().detach().mean())})
            if progress:
                progress(len(history), float(align.detach()))
    state = space.assemble()
    return TuneResult(state, space.describe(), history, time.perf_counter() - start,
                      {"method": "expert_merging", "coefficients": space.num_coefficients(), "tensors": len(keys),
                       "excluded": excluded, "chunks": {k: space.layout[k][1] for k in space.layout},
                       "optimizer_steps": step, "config": {k: v for k, v in config.__dict__.items()}})


def importance_chunks(result: TuneResult, base: Mapping[str, torch.Tensor], pool: ModelPool,
                      budget: Optional[int] = None) -> Dict[str, int]:
    """Expert Merging++ allocation (our reading of the paper, see the module docstring).

    ``I_p = mean_k w_{k,p} ||tau_{k,p}||_F / sqrt(n_p)`` from a layer-wise run, normalised to sum 1;
    ``C_p = max(1, round(B I_p))`` with ``B = budget`` (default 4 x the number of trainable tensors).
    """
    coeffs = result.coefficients
    keys = sorted({key for per in coeffs.values() for key in per})
    if not keys:
        return {}
    score = {k: 0.0 for k in keys}
    for i, name in enumerate(pool.names):
        theta = pool.load(i, keys)
        for k in keys:
            w = sum(coeffs[name][k]) / len(coeffs[name][k])
            tau = theta[k] - base[k].float()
            score[k] += w * float(tau.norm()) / math.sqrt(tau.numel()) / len(pool)
        del theta
    total = sum(score.values())
    budget = 4 * len(keys) if budget is None else budget
    if total == 0:
        return {k: 1 for k in keys}
    return {k: max(1, round(budget * score[k] / total)) for k in keys}


def expert_merging_pp(task_model, base, pool: ModelPool, data, config: ExpertMergingConfig = ExpertMergingConfig(),
                      budget: Optional[int] = None, progress=None) -> TuneResult:
    """Expert Merging++: a layer-wise run, importance-guided chunk counts, then a chunked run from ``w_0``."""
    keys = merge_keys(base, pool)
    layers = list(config.hidden_layers or [])
    targets = expert_targets(task_model, pool, keys, data, layers)
    first = expert_merging(task_model, base, pool, data, config, progress, chunks={}, targets=targets)
    counts = importance_chunks(first, base, pool, budget)
    second = expert_merging(task_model, base, pool, data, config, progress, chunks=counts, targets=targets)
    second.info.update({"method": "expert_merging_pp", "first_pass_seconds": round(first.seconds, 3),
                        "budget": budget if budget is not None else 4 * len(counts)})
    second.seconds += first.seconds
    return second
