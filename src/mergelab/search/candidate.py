"""A search config, and the evaluation of one candidate: genotype -> recipe -> in-memory merge -> fitness.

A candidate is merged by the engine itself (:func:`mergelab.merge.build_plan` and the
:class:`~mergelab.execute.LocalExecutor`, with the chunking and seed ``mergelab merge`` uses) into a
state dict, never into a checkpoint, so the recipe a search writes gives, under ``mergelab merge``,
exactly the tensors that were scored. The input checkpoints are opened once per evaluator (headers;
tensors are read lazily per merge) and the evaluation model is loaded once.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Optional

import numpy as np
import yaml

from mergelab.errors import MergeLabError
from mergelab.search.fitness import FitnessSpec, parse_fitness
from mergelab.search.genome import Genome, parse_genome

CONFIG_KEYS = {"genome", "fitness", "search"}
SEARCH_KEYS = {"max_evals", "sigma0", "popsize", "seed", "random_init", "strategy"}
STRATEGIES = ("cma", "random")


class SearchConfigError(MergeLabError):
    """A search config that cannot be run (raised before any work)."""


@dataclass
class SearchConfig:
    path: Optional[Path]
    data: dict  # the config as read, model paths made absolute (what workers receive)
    genome: Genome
    fitness: FitnessSpec
    search: dict

    def fingerprint(self) -> str:
        """sha256 of what evolve's state held before it stored its config (such states still resume)."""
        blob = {"genome": self.data["genome"], "fitness": self.fitness.describe(), "search": self.search}
        return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _num_layers(ref: str) -> int:
    cfg = Path(ref) / "config.json"
    if not cfg.is_file():
        raise SearchConfigError(f"genome: '{ref}' is not a model folder with a config.json")
    data = json.loads(cfg.read_text(encoding="utf-8"))
    from mergelab.plan import LAYER_COUNT_KEYS

    for key in LAYER_COUNT_KEYS:
        if isinstance(data.get(key), int):
            return data[key]
    return 0


def _absolute(ref: str) -> str:
    p = Path(ref).expanduser()
    return str(p.resolve()) if p.exists() else ref


def read_config(source: Any) -> SearchConfig:
    """Read and check a search config (a YAML path or a mapping). Every problem — unknown keys, models
    that are not folders, empty or unknown ranges, a missing or malformed task file — is raised here,
    before any model is loaded."""
    path = None
    if isinstance(source, (str, Path)):
        path = Path(source)
        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise SearchConfigError(f"{path}: no such search config") from None
        except yaml.YAMLError as e:
            raise SearchConfigError(f"{path}: not valid YAML ({e})") from None
    else:
        data = source
    where = str(path) if path else "config"
    if not isinstance(data, dict):
        raise SearchConfigError(f"{where}: expected a mapping with genome: and fitness:")
    if "tasks" in data:
        raise SearchConfigError(f"{where}: tasks: (mergekit-evolve's lm-eval tasks) is not supported; score with "
                                "fitness: (suite: llmmix with tasks:, or task_files: [PATH.jsonl])")
    unknown = sorted(set(data) - CONFIG_KEYS)
    if unknown:
        raise SearchConfigError(f"{where}: unknown key(s) {unknown}; expected genome, fitness and optional search")
    for key in ("genome", "fitness"):
        if key not in data:
            raise SearchConfigError(f"{where}: '{key}:' is missing")
    data = json.loads(json.dumps(data))  # a private copy
    g = data["genome"]
    if isinstance(g, dict):
        if isinstance(g.get("models"), list):
            g["models"] = [_absolute(m) if isinstance(m, str) else m for m in g["models"]]
        for key in ("base_model", "tokenizer_source"):
            if isinstance(g.get(key), str):
                g[key] = _absolute(g[key])
    genome = parse_genome(g, _num_layers, f"{where}: genome")
    for ref in genome.models + ([genome.base_model] if genome.base_model else []):
        if not Path(ref).is_dir():
            raise SearchConfigError(f"{where}: genome: model '{ref}' is not a folder")
    f = data["fitness"]
    if isinstance(f, dict):
        if isinstance(f.get("model"), str):
            f["model"] = _absolute(f["model"])
        if isinstance(f.get("task_files"), list):
            f["task_files"] = [_absolute(t) if isinstance(t, str) else t for t in f["task_files"]]
        if isinstance(f.get("heads"), dict):
            f["heads"] = {k: _absolute(v) if isinstance(v, str) else v for k, v in f["heads"].items()}
    fitness = parse_fitness(f, genome.base_model or genome.models[0], f"{where}: fitness", genome.models)
    search = dict(data.get("search") or {})
    unknown = sorted(set(search) - SEARCH_KEYS)
    if unknown:
        raise SearchConfigError(f"{where}: search: unknown key(s) {unknown}; expected some of {sorted(SEARCH_KEYS)}")
    search.setdefault("max_evals", 100)
    search.setdefault("sigma0", 1 / 6)
    search.setdefault("popsize", None)
    search.setdefault("seed", 0)
    search.setdefault("random_init", False)
    search.setdefault("strategy", "cma")
    if search["strategy"] not in STRATEGIES:
        raise SearchConfigError(f"{where}: search.strategy: expected one of {', '.join(STRATEGIES)}, got "
                                f"{search['strategy']!r}")
    if search["strategy"] == "random":
        try:
            genome.sample_bounds()
        except MergeLabError as e:
            raise SearchConfigError(f"{where}: {e}") from None
    if not isinstance(search["max_evals"], int) or search["max_evals"] < 1:
        raise SearchConfigError(f"{where}: search.max_evals: expected a positive integer")
    if not isinstance(search["sigma0"], (int, float)) or not search["sigma0"] > 0:
        raise SearchConfigError(f"{where}: search.sigma0: expected a positive number")
    if search["popsize"] is not None and (not isinstance(search["popsize"], int) or search["popsize"] < 2):
        raise SearchConfigError(f"{where}: search.popsize: expected an integer >= 2")
    return SearchConfig(path, data, genome, fitness, search)


def state_digest(state: Dict[str, Any]) -> str:
    """sha256 over the tensors of ``state`` in name order: name, dtype, shape and raw bytes."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(f"{name}|{str(t.dtype).replace('torch.', '')}|{list(t.shape)}\n".encode())
        h.update(t.reshape(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


class CandidateEvaluator:
    """Merges genotypes in memory and scores them (one per worker; ``threads`` torch threads)."""

    def __init__(self, data: dict, threads: int = 1):
        import torch

        if threads:
            torch.set_num_threads(threads)
        self.config = read_config(data)
        self.genome = self.config.genome
        from mergelab.io.adapted import open_model
        from mergelab.search.fitness import make_scorer

        refs = dict.fromkeys(self.genome.models + ([self.genome.base_model] if self.genome.base_model else []))
        self.checkpoints = {ref: open_model(ref) for ref in refs}
        self.scorer = make_scorer(self.config.fitness)

    def merge(self, x) -> tuple:
        """``(recipe dict, merged state dict)`` of genotype ``x``."""
        from mergelab.execute.local import LocalExecutor
        from mergelab.io.memory import StateDictSink
        from mergelab.merge import build_plan
        from mergelab.recipe import load_recipe

        recipe = self.genome.decode(x)
        r = load_recipe(recipe)
        checkpoints = {ref: self.checkpoints[ref] for ref in r.model_refs()}
        plan = build_plan(r, checkpoints)
        sink = StateDictSink({j.name: j.shape for j in plan.jobs}, {j.name: j.out_dtype for j in plan.jobs})
        LocalExecutor(seed=r.seed, read_ahead=False).run(plan, sink)
        return recipe, sink.state

    def evaluate(self, x) -> dict:
        """``{"fitness", "tasks", "digest", "seconds"}`` (or ``"error"`` with fitness -inf)."""
        t0 = time.perf_counter()
        x = np.asarray(x, dtype=float)
        try:
            _, state = self.merge(x)
            out = self.scorer.score(state)
            out["digest"] = state_digest(state)
        except MergeLabError as e:
            out = {"fitness": float("-inf"), "tasks": {}, "error": str(e)}
        out["merge_and_score_seconds"] = round(time.perf_counter() - t0, 4)
        return out
