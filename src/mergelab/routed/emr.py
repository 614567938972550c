"""EMR-Merging: Elect, Mask & Rescale (Huang et al., NeurIPS 2024, arXiv 2405.17461). No data, no tuning.

With task vectors ``tau_k = theta_k - theta_0`` (elementwise, per tensor):

* **Elect**: ``eps = sgn(sum_k tau_k)`` with the reference code's convention ``eps = -1`` where the sum is
  exactly 0; ``tau_uni = eps * max_k |tau_k * 1[tau_k * eps > 0]|`` (the largest magnitude among the
  tasks that agree with the elected sign; 0 where none agrees).
* **Mask**: ``M_k = 1[tau_k * eps > 0]``.
* **Rescale**: ``lambda_k = sum|tau_k| / sum|M_k * tau_uni|``. ``rescale_reduction="element_sum"`` sums
  over all elements (the paper's formula); ``"tensor_mean"`` (default: what the official code and
  FusionBench compute, and what reproduces the published numbers) sums **per-tensor means** over
  tensors instead. A task whose masked unified vector is all zero gets ``lambda_k = 1`` (its delta is
  zero whatever the scale).
* **Per-task model**: ``theta_k_hat = theta_0 + lambda_k * M_k * tau_uni``, rebuilt from a pristine
  float32 ``theta_0`` each time the task changes (no in-place add/subtract drift). The task id must
  be known at inference.

Storage: ``base.safetensors`` (theta_0), ``unified.safetensors`` (tau_uni, float32, only tensors where
it is not all zero), ``masks/{task}.safetensors`` (one bit per element), rescalers in ``routed.json``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from mergelab.errors import MergeLabError
from mergelab.routed import store
from mergelab.routed.common import RoutedModel, build_module, check_inputs

REDUCTIONS = ("tensor_mean", "element_sum")


@dataclass
class EMRResult:
    unified: Dict[str, torch.Tensor]  # tau_uni per tensor (all routed tensors)
    masks: List[Dict[str, torch.Tensor]]  # per task, bool per tensor
    rescalers: List[float]
    keys: List[str]
    info: dict = field(default_factory=dict)


def elect(taus: Sequence[torch.Tensor]) -> tuple:
    """``(tau_uni, [M_k])`` of one tensor from the task vectors ``taus`` (see the module docstring)."""
    stack = torch.stack([t.float() for t in taus])
    sign = torch.where(stack.sum(0) > 0, 1.0, -1.0)
    agree = stack * sign > 0
    tau_uni = sign * torch.where(agree, stack.abs(), torch.zeros_like(stack)).amax(0)
    return tau_uni, [agree[k] for k in range(len(taus))]


def emr_merge(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
              tasks: Sequence[str], rescale_reduction: str = "tensor_mean") -> EMRResult:
    """Elect, mask and rescale the experts' task vectors over ``base`` (state dicts of one architecture)."""
    if rescale_reduction not in REDUCTIONS:
        raise MergeLabError(f"rescale_reduction must be one of {', '.join(REDUCTIONS)}, got '{rescale_reduction}'")
    keys = check_inputs(base, experts, tasks)
    unified, masks = {}, [dict() for _ in experts]
    num = [0.0] * len(experts)
    den = [0.0] * len(experts)
    for key in keys:
        b = base[key].float()
        taus = [e[key].float() - b for e in experts]
        tau_uni, m = elect(taus)
        unified[key] = tau_uni
        for k, tau in enumerate(taus):
            masks[k][key] = m[k]
            masked = (tau_uni * m[k]).abs()
            if rescale_reduction == "tensor_mean":
                num[k] += float(tau.abs().double().mean())
                den[k] += float(masked.double().mean())
            else:
                num[k] += float(tau.abs().double().sum())
                den[k] += float(masked.double().sum())
    rescalers = [n / d if d > 0 else 1.0 for n, d in zip(num, den)]
    return EMRResult(unified, masks, rescalers, keys, {"rescale_reduction": rescale_reduction})


def task_delta(unified: Mapping[str, torch.Tensor], mask: Mapping[str, torch.Tensor], rescaler: float) -> dict:
    """``lambda_k * M_k * tau_uni`` over the tensors of ``unified``."""
    return {k: rescaler * (u * mask[k]) for k, u in unified.items()}


def save_emr(out: Path, result: EMRResult, base: Mapping[str, torch.Tensor], config, tasks: Sequence[str],
             model_class: str = "AutoModel", heads: Optional[Mapping[str, dict]] = None,
             extra: Optional[dict] = None) -> Path:
    """Write the EMR folder (``OUT.partial`` then renamed); returns ``out``."""
    out = Path(out)
    tmp = store.begin(out)
    try:
        base_f = {k: v.float() if v.is_floating_point() else v for k, v in base.items()}
        one = store.save_tensors(tmp / "base.safetensors", base_f)
        nonzero = {k: v for k, v in result.unified.items() if bool(v.ne(0).any())}
        extra_bytes = store.save_tensors(tmp / "unified.safetensors", nonzero)
        extra_params = sum(v.numel() for v in nonzero.values())
        (tmp / "masks").mkdir()
        mask_bytes = 0
        for t, m in zip(tasks, result.masks):
            mask_bytes += store.save_masks(tmp / "masks" / f"{t}.safetensors", {k: m[k] for k in nonzero})
        extra_bytes += mask_bytes + 8 * len(tasks)
        config.save_pretrained(str(tmp))
        if heads:
            store.save_heads(tmp / "heads.safetensors", heads)
        manifest = {"method": "emr", "tasks": list(tasks), "model_class": model_class,
                    "rescale_reduction": result.info.get("rescale_reduction"),
                    "rescalers": {t: r for t, r in zip(tasks, result.rescalers)},
                    "files": {"base": "base.safetensors", "unified": "unified.safetensors", "masks": "masks/"},
                    "heads": bool(heads),
                    "sizes": dict(store.sizes(one, extra_bytes, extra_params, len(tasks)), mask_bytes=mask_bytes),
                    "inference": "task id required; one forward per input with that task's rebuilt weights",
                    **(extra or {})}
        store.write_manifest(tmp, manifest)
    except BaseException:
        store.abort(tmp)
        raise
    return store.commit(tmp, out)


class EMRModel(RoutedModel):
    """A saved EMR folder, run per task: ``forward(task=..., **batch)``."""

    method = "emr"
    needs_task = True

    def __init__(self, folder, manifest, config, heads=None, base=None, unified=None, masks=None):
        module = build_module(config, manifest.get("model_class", "AutoModel"), base)
        super().__init__(folder, manifest, config, module, heads)
        self.base = {k: v for k, v in base.items() if v.is_floating_point()}
        self.unified = unified
        self.masks = masks
        self.rescalers = [float(manifest["rescalers"][t]) for t in self.tasks]
        self._current: Optional[tuple] = None

    @classmethod
    def from_folder(cls, folder: Path, manifest: dict, config, heads) -> "EMRModel":
        folder = Path(folder)
        base = store.load_tensors(folder / "base.safetensors")
        unified = store.load_tensors(folder / "unified.safetensors")
        masks = {}
        for t in manifest["tasks"]:
            m = store.load_masks(folder / "masks" / f"{t}.safetensors")
            missing = [k for k in unified if k not in m]
            if missing:
                raise MergeLabError(f"{folder}/masks/{t}.safetensors lacks the mask of '{missing[0]}'")
            masks[t] = m
        return cls(folder, manifest, config, heads, base, unified, masks)

    def task_params(self, task) -> Dict[str, torch.Tensor]:
        """``theta_0 + lambda_k * M_k * tau_uni`` for the routed tensors (cached for the last task)."""
        k = self._task_index(task)
        if self._current is None or self._current[0] != k:
            name = self.tasks[k]
            delta = task_delta(self.unified, self.masks[name], self.rescalers[k])
            params = {key: self.base[key] + d for key, d in delta.items()}
            self._current = (k, params)
        return self._current[1]

    def forward(self, task=None, **batch):
        return self.call(self.task_params(task), **batch)

    def begin_generation(self, task, input_ids, attention_mask) -> None:
        """Task ``task``'s weights copied into the module (``generate`` runs the module itself)."""
        state = self.module.state_dict()
        with torch.no_grad():
            for k, v in self.task_params(task).items():
                state[k].copy_(v)

    def end_generation(self) -> None:
        state = self.module.state_dict()
        with torch.no_grad():
            for k, v in self.base.items():
                if k in state:
                    state[k].copy_(v)
