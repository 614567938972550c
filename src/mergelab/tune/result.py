"""What every tuner returns (AdaMerging, RegMean++, Expert Merging, FW-Merging): one home for the type."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List

import torch


@dataclass
class TuneResult:
    """A learned merge: the merged tensors, the coefficients and the optimisation trace.

    ``state`` maps tensor names to merged tensors; ``coefficients`` is what the tuner learned (empty
    for closed-form merges); ``history`` holds one record per optimisation step; ``info`` says which
    method and settings produced it.
    """

    state: Dict[str, torch.Tensor]
    coefficients: dict
    history: List[dict] = field(default_factory=list)
    seconds: float = 0.0
    info: dict = field(default_factory=dict)
