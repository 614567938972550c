"""Recording the activations that activation matching compares, with forward hooks.

For every permutation group, the activations recorded are the *inputs* of the layers whose input axis
the group permutes (post-nonlinearity hidden units of an MLP, conv channels, the normalised residual
stream entering attention and MLP blocks, the attention output before its projection) and, for
attention groups, the query/key projections' *outputs* (compared per head with dims in place).
A layer is found by its tensor name without ``.weight``, which is the module name in PyTorch.
"""

from __future__ import annotations

from typing import Callable, Dict, Iterable, List, Optional, Tuple

import torch

from mergelab.align.spec import Axis, PermutationSpec
from mergelab.errors import MergeLabError


def _as_rows(x: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Activations as ``[samples, features]``: channels last for conv maps, padding tokens dropped."""
    if x.ndim == 4:  # [N, C, H, W]
        return x.movedim(1, -1).reshape(-1, x.shape[1])
    if x.ndim == 3 and mask is not None:
        if x.shape[0] != mask.shape[0]:  # e.g. position embeddings, shared by the batch
            x = x.expand(mask.shape[0], *x.shape[1:])
        return x[mask.bool()]
    return x.reshape(-1, x.shape[-1])


def hook_points(spec: PermutationSpec, module_names: Dict[str, torch.nn.Module]) -> List[Tuple[str, str, Axis, str]]:
    """``(group, module, Axis, "input" | "output")`` for every recordable layer of the spec."""
    modules = dict(module_names)
    points = []
    for key, axes in spec.axes.items():
        if not key.endswith(".weight") or len(axes) < 2:
            continue
        mod = key[: -len(".weight")]
        if mod not in modules:
            continue
        if isinstance(modules[mod], torch.nn.Embedding):  # weight [vocab, width]: the width is its output
            if axes[1] is not None:
                points.append((axes[1].perm, mod, axes[1], "output"))
            continue
        if axes[1] is not None:
            points.append((axes[1].perm, mod, axes[1], "input"))
        if axes[0] is not None and axes[0].role in ("qk_q", "qk_k"):
            points.append((axes[0].perm, mod, axes[0], "output"))
    return points


def record(model: torch.nn.Module, spec: PermutationSpec, batches: Iterable,
           call: Callable[[torch.nn.Module, object], Optional[torch.Tensor]]):
    """Run ``call(model, batch)`` for every batch (it returns the padding mask or None) and return
    ``{group: [(Axis, [N, width]), ...]}`` in a fixed order."""
    modules = getattr(model, "named_layers", None) or dict(model.named_modules())
    points = hook_points(spec, modules)
    missing = set(spec.perms) - {p[0] for p in points}
    if missing:
        raise MergeLabError(f"activation matching: no layer of the model reads permutation group(s) "
                            f"{', '.join(sorted(missing))} (the module names must match the tensor names)")
    store: Dict[int, List[torch.Tensor]] = {i: [] for i in range(len(points))}
    current: Dict[int, torch.Tensor] = {}
    handles = []
    for i, (_, mod, _, where) in enumerate(points):
        if where == "input":
            handles.append(modules[mod].register_forward_pre_hook(
                lambda m, args, i=i: current.__setitem__(i, args[0].detach())))
        else:
            handles.append(modules[mod].register_forward_hook(
                lambda m, args, out, i=i: current.__setitem__(i, out.detach())))
    try:
        with torch.no_grad():
            for batch in batches:
                current.clear()
                mask = call(model, batch)
                for i in range(len(points)):
                    if i not in current:
                        raise MergeLabError(f"activation matching: layer '{points[i][1]}' was not run by the "
                                            f"model's forward pass")
                    store[i].append(_as_rows(current[i].float(), mask))
    finally:
        for h in handles:
            h.remove()
    out: Dict[str, List[Tuple[Axis, torch.Tensor]]] = {}
    for i, (group, _, axis, _) in enumerate(points):
        out.setdefault(group, []).append((axis, torch.cat(store[i])))
    return out
