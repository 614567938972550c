"""In-memory checkpoints and sinks: the same interfaces as files, for ``merge_state_dicts``."""

from __future__ import annotations

from typing import Dict, Optional

import torch

from mergelab.errors import CheckpointError
from mergelab.io.checkpoint import TensorInfo, owned_tensor


class StateDictCheckpoint:
    """A state dict seen through the :class:`~mergelab.io.checkpoint.Checkpoint` reading interface."""

    def __init__(self, state: Dict[str, torch.Tensor], label: str):
        self.label = label
        self.state = state
        self.tensors = {k: TensorInfo(k, v.dtype, tuple(v.shape), None) for k, v in state.items()}

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from state dict '{self.label}'")

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        t = self.state[name].detach()
        if rows is not None and t.dim() > 0:
            t = t[rows[0]:rows[1]]
        return owned_tensor(t, dtype, device)

    def config(self) -> None:
        return None


class StateDictSink:
    """Collects merged tensors (or row chunks of them) into a state dict."""

    def __init__(self, shapes: Dict[str, tuple], dtypes: Dict[str, torch.dtype]):
        self.state: Dict[str, torch.Tensor] = {}
        self._shapes = shapes
        self._dtypes = dtypes

    def is_complete(self, name: str) -> bool:
        return False

    def write(self, name: str, tensor: torch.Tensor, row_start: int = 0) -> None:
        shape = self._shapes[name]
        if tuple(tensor.shape) == tuple(shape):
            self.state[name] = tensor
            return
        if name not in self.state:
            self.state[name] = torch.empty(shape, dtype=self._dtypes[name])
        self.state[name][row_start:row_start + tensor.shape[0]] = tensor

    def close(self) -> None:
        pass
