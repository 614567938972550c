"""Where candidates are evaluated: in this process, or on Ray actors (one evaluator each).

``workers=1`` without ``ray_address`` evaluates in this process. Otherwise Ray is used: a running
session of this process (``ray.init`` done by the caller) is joined as it is; ``ray_address`` (``auto``,
``HOST:PORT`` or ``ray://HOST:PORT``) joins a cluster; else a local Ray with ``workers`` CPUs is started.
Each actor holds one evaluator, by default a :class:`~mergelab.search.candidate.CandidateEvaluator`
(models opened, evaluation model loaded once; ``evolve`` and ``map``), or the class given as
``evaluator`` (``m2n2``'s :class:`~mergelab.search.m2n2.MemberEvaluator`): a class built as
``cls(data, threads)`` with ``evaluate(x) -> dict`` and optionally ``pack(x)``, what is sent to an actor
for ``x``. torch runs with ``threads`` threads in every evaluator, so results do not depend on how many
actors there are: candidates are handed out in order and their results come back in that order.
"""

from __future__ import annotations

import os
import socket
from typing import List, Optional, Sequence

from mergelab.errors import MergeLabError


class RayUnavailableError(MergeLabError):
    """Ray is not installed or the cluster address cannot be reached."""


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Refuse, before any work, an address whose cluster cannot be reached (for ``auto``, the
    ``RAY_ADDRESS`` it stands for when that is set)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        raise RayUnavailableError("--ray needs the 'ray' package: pip install 'mergelab[search]'") from None
    given = address
    if address == "auto":
        address = os.environ.get("RAY_ADDRESS", "")
        if not address or address == "auto":
            return  # ray.init(address="auto") itself says whether a cluster runs here (checked in connect)
        given = f"auto (RAY_ADDRESS={address})"
    rest = address.split("://", 1)[1] if "://" in address else address
    host, _, port = rest.rpartition(":")
    if not host or not port.isdigit():
        raise RayUnavailableError(f"--ray {given}: expected auto, HOST:PORT or ray://HOST:PORT")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as e:
        raise RayUnavailableError(f"--ray {given}: no Ray cluster answers at {host}:{port} ({e.strerror or e}); "
                                  "start one with `ray start --head` or check the address") from None


def connect(address: Optional[str], workers: int) -> None:
    """Make sure this process is connected to Ray (see the module doc)."""
    import ray

    if ray.is_initialized():
        return
    try:
        if address:
            ray.init(address=address, logging_level="ERROR", log_to_driver=False)
        else:
            ray.init(num_cpus=workers, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    except ConnectionError as e:
        raise RayUnavailableError(f"--ray {address}: {e}") from None
    except Exception as e:  # Ray raises plain Exception when its local node does not come up
        ray.shutdown()
        where = f"join the Ray cluster at {address}" if address else f"start a local Ray with {workers} CPUs"
        raise RayUnavailableError(f"could not {where}: {e} (see /tmp/ray/session_latest/logs/raylet.err)") from None


def _default_evaluator():
    from mergelab.search.candidate import CandidateEvaluator

    return CandidateEvaluator


class LocalPool:
    """Evaluates in this process."""

    def __init__(self, data: dict, threads: int = 1, evaluator: Optional[type] = None):
        self.evaluator = (evaluator or _default_evaluator())(data, threads)
        self.size = 1

    def map(self, xs: Sequence) -> List[dict]:
        return [self.evaluator.evaluate(x) for x in xs]

    def close(self) -> None:
        pass


class _Worker:
    def __init__(self, data: dict, threads: int, evaluator: type):
        self.evaluator = evaluator(data, threads)

    def evaluate(self, x) -> dict:
        return self.evaluator.evaluate(x)


class RayPool:
    """Evaluates on ``workers`` Ray actors."""

    def __init__(self, data: dict, workers: int, threads: int = 1, evaluator: Optional[type] = None):
        import ray
        from ray.util import ActorPool

        evaluator = evaluator or _default_evaluator()
        actor = ray.remote(num_cpus=threads)(_Worker)
        self.actors = [actor.remote(data, threads, evaluator) for _ in range(workers)]
        self.pool = ActorPool(self.actors)
        self.pack = getattr(evaluator, "pack", None) or (lambda x: [float(v) for v in x])
        self.size = workers

    def map(self, xs: Sequence) -> List[dict]:
        return list(self.pool.map(lambda a, x: a.evaluate.remote(self.pack(x)), list(xs)))

    def close(self) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)


def make_pool(data: dict, workers: Optional[int] = None, ray_address: Optional[str] = None, threads: int = 1,
              use_ray: Optional[bool] = None, evaluator: Optional[type] = None):
    """The evaluation pool for ``data`` (a checked search config's data, or what ``evaluator`` is built from)."""
    if use_ray is None:
        use_ray = bool(ray_address) or (workers or 1) > 1
    if not use_ray:
        return LocalPool(data, threads, evaluator)
    connect(ray_address, workers or 1)
    import ray

    if workers is None:
        workers = max(1, int(ray.cluster_resources().get("CPU", 1) // max(threads, 1)))
    return RayPool(data, workers, threads, evaluator)
