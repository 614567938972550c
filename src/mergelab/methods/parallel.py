"""Per-model work on parallel CPU threads, for the steps torch does not spread over cores itself.

numpy's partition and random generation run on one core each (and release the GIL); a merge of
several models then leaves the other cores idle unless the models are done side by side.
"""

from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, List, Optional, Sequence, TypeVar

T = TypeVar("T")

_POOL: Optional[ThreadPoolExecutor] = None


def map_models(fn: Callable[[int], T], indices: Sequence[int], device: str = "cpu") -> List[T]:
    """``[fn(i) for i in indices]``, run on up to ``os.cpu_count()`` threads when ``device`` is the CPU.

    ``fn`` must not depend on the order it is called in (each call uses only model ``i``'s data and
    its own random stream), so the result is the same as the sequential one.
    """
    workers = min(len(indices), os.cpu_count() or 1)
    if not str(device).startswith("cpu") or workers < 2:
        return [fn(i) for i in indices]
    global _POOL
    if _POOL is None:
        _POOL = ThreadPoolExecutor(os.cpu_count() or 1, thread_name_prefix="mergelab-models")
    return list(_POOL.map(fn, indices))
