"""Routed and per-task models: one model's worth of shared weights plus a little per-task state.

* EMR-Merging (:mod:`mergelab.routed.emr`): a unified task vector, per-task bit masks and rescalers;
  the task id picks the weights.
* Twin-Merging (:mod:`mergelab.routed.twin`): a shared merge plus each task's exclusive knowledge at
  low rank, mixed per input by a router trained on validation inputs.
* WEMoE (:mod:`mergelab.routed.wemoe`): MLP blocks upscaled to weight-ensembling mixtures whose
  routers are trained by entropy minimisation on unlabelled inputs.

Each is saved as a folder (:mod:`mergelab.routed.store`) that :func:`load` turns back into a
:class:`~mergelab.routed.common.RoutedModel`; ``mergelab routed bench`` runs them on a bench suite.
"""

from __future__ import annotations

from pathlib import Path

from mergelab.errors import CheckpointError

METHODS = ("emr", "twin", "wemoe")


def load(path):
    """The routed model saved in folder ``path`` (written by this package), ready for inference."""
    from mergelab.routed import store
    from mergelab.routed.common import load_config

    folder = Path(path)
    manifest = store.read_manifest(folder)
    method = manifest.get("method")
    if method not in METHODS:
        raise CheckpointError(f"{folder}/{store.MANIFEST}: unknown method {method!r}; known: {', '.join(METHODS)}")
    if not isinstance(manifest.get("tasks"), list) or not manifest["tasks"]:
        raise CheckpointError(f"{folder}/{store.MANIFEST}: 'tasks' must be a non-empty list")
    config = load_config(folder)
    heads = store.load_heads(folder / "heads.safetensors") if manifest.get("heads") else None
    if method == "emr":
        from mergelab.routed.emr import EMRModel as cls
    elif method == "twin":
        from mergelab.routed.twin import TwinModel as cls
    else:
        from mergelab.routed.wemoe import WEMoEModel as cls
    return cls.from_folder(folder, manifest, config, heads)
