"""AdaMerging: learn task-vector coefficients by minimising prediction entropy on unlabelled inputs.

Yang et al., "AdaMerging: Adaptive Model Merging for Multi-Task Learning", ICLR 2024 (arXiv:2310.02575).
Reference code: EnnengYang/AdaMerging (``src/main_task_wise_adamerging.py``,
``src/main_layer_wise_adamerging.py``); FusionBench's port read for the differences
(``fusion_bench/method/adamerging/*``, ``config/method/adamerging/clip.yaml``).

* task-wise:  ``theta(lambda) = theta_0 + sum_k lambda_k tau_k``
* layer-wise: ``theta_p = theta_0,p + sum_k lambda_{k,p} tau_{k,p}`` for every parameter tensor ``p``
  (a "layer" is one named tensor, as in the reference code; the base coefficient is fixed at 1).

Objective: ``sum_t E_{x ~ D_t} H(softmax(head_t(f_theta(x))))`` over the tasks that have data and a
head, one batch per task per step. Defaults follow the reference: ``lambda`` starts at 0.3 ("prior"),
Adam (lr 1e-3, betas 0.9/0.999, no weight decay), and ``lambda`` clamped to ``[0, 1]`` in the forward
pass (FusionBench defaults to no clamp: ``clamp=False``). The reference runs 500 steps on two test
batches of 16 per task; ours defaults to 500 steps of one batch of 16 per task per step, and the
caller chooses the data: the reference uses the **test** inputs (test-time adaptation); mergelab's
benchmark runner uses the validation split unless told it is test-time adaptation.

Implementation: merged tensors are rebuilt in memory each step and the model is evaluated through
``torch.func.functional_call``; the coefficient gradient is ``<dL/dtheta_p, tau_{k,p}>`` (one backward
pass), streamed over the pool, so ``storage="stream"`` keeps memory flat in the number of models.
The pool may hold more models than there are tasks (irrelevant experts simply get coefficients too).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Mapping, Optional, Sequence

import torch

from mergelab.errors import MergeLabError
from mergelab.tune.functional import CoefficientSpace, ModelPool, cycle, entropy, leaf_params, merge_keys
from mergelab.tune.result import TuneResult


@dataclass
class AdaMergingConfig:
    """Settings; defaults are the reference's (see the module docstring)."""

    granularity: str = "layer"  # "task" or "layer"
    init: float = 0.3
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    steps: int = 500
    clamp: bool = True
    exclude: str = ""  # regex of tensors kept at the base value (not merged)
    storage: str = "memory"  # or "stream": re-read task vectors from the pool each pass
    seed: int = 0


def entropy_objective(task_model, theta: Mapping[str, torch.Tensor], batches: Sequence) -> torch.Tensor:
    """``sum_t H(task_model.rows(theta, batch_t, t))`` for one batch per task (``None`` skips a task)."""
    total = None
    for t, b in enumerate(batches):
        if b is None:
            continue
        h = entropy(task_model.rows(theta, b, t))
        total = h if total is None else total + h
    if total is None:
        raise MergeLabError("AdaMerging needs unlabelled data for at least one task")
    return total


def adamerging(task_model, base: Mapping[str, torch.Tensor], pool: ModelPool, data: Sequence[Sequence],
               config: AdaMergingConfig = AdaMergingConfig(),
               progress: Optional[Callable[[int, float], None]] = None) -> TuneResult:
    """Learn AdaMerging coefficients for the models of ``pool`` on top of ``base``.

    ``data[t]`` is a list of batches of task ``t`` (labels, if any, are ignored); ``task_model.rows``
    gives task ``t``'s logits for merged tensors. Returns the merged tensors at the final coefficients.
    """
    if config.granularity not in ("task", "layer"):
        raise MergeLabError(f"AdaMerging granularity must be 'task' or 'layer', got '{config.granularity}'")
    if config.steps < 0:
        raise MergeLabError("AdaMerging steps must be >= 0")
    start = time.perf_counter()
    keys = merge_keys(base, pool, config.exclude)
    space = CoefficientSpace(base, pool, keys, "task" if config.granularity == "task" else "tensor",
                             init=config.init, activation="identity", clamp=config.clamp, storage=config.storage)
    opt = torch.optim.Adam([space.raw], lr=config.lr, betas=config.betas, weight_decay=0.0)
    nexts = [cycle(d, config.seed + t) if d else None for t, d in enumerate(data)]
    history = []
    for step in range(config.steps):
        w = space.weights()
        theta = leaf_params(space.assemble(w))
        loss = entropy_objective(task_model, theta, [n() if n else None for n in nexts])
        grads = torch.autograd.grad(loss, list(theta.values()), allow_unused=True)
        opt.zero_grad(set_to_none=True)
        space.backward(w, {k: g for k, g in zip(theta, grads) if g is not None})
        opt.step()
        history.append({"step": step, "entropy": float(loss.detach())})
        if progress:
            progress(step, float(loss.detach()))
    state = space.assemble()
    return TuneResult(state, space.describe(), history, time.perf_counter() - start,
                      {"method": f"adamerging_{config.granularity}", "coefficients": space.num_coefficients(),
                       "tensors": len(keys), "pool": list(pool.names), "pool_reads": pool.reads,
                       "config": config.__dict__})
