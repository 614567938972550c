"""The genome of an evolutionary merge: mergekit-evolve's ``genome:`` block, decoded to mergelab recipes.

A genome names the ``models``, the ``merge_method`` (mergekit-evolve's ``linear``, ``task_arithmetic``,
``ties``, ``dare_ties``, ``slerp``, or any other registered mergelab method with the ``parameters`` that
evolve listed), ``base_model``, ``layer_granularity`` (0: one parameter set for the whole model; N: one
per block of N layers, N dividing the layer count), ``filters`` (tensor-name substrings that get their
own parameter set, the last set applying to everything else), ``smooth`` (the groups' values become a
gradient interpolated over the layers instead of one slice per group), ``normalize`` (null: true for
ties, dare_ties and linear, as mergekit-evolve) and ``allow_negative_weights``.

The genotype is a flat vector in the C order of mergekit-evolve's array ``[G, M, S, P]`` (layer groups,
models, filter sets, per-model parameters): index ``((g*M + m)*S + s)*P + p``; mergelab appends
``[G, S, Q]`` genes for evolved *global* parameters (``lambda``, ...). The start point is mergekit's:
weight (and slerp's first gene) 1/M, density 1; other parameters their registry default.

Decoding follows mergekit-evolve: ``density = clamp(|x|, 0, 1)``; ``weight`` and ``t`` are ``|x|``
unless negative weights are allowed; for slerp each group keeps the two models with the largest first
gene, the larger one as the slice's base and ``t = softmax(top two)[1]``. mergelab adds ``ranges``:
``{parameter: [low, high]}`` clips the decoded value (after the rules above) into ``[low, high]``;
a parameter other than these three without a range is ``|x|`` if the parameter must be non-negative,
else ``x``. (Akiba et al. 2024, "Evolutionary Optimization of Model Merging Recipes", arXiv 2403.13187;
mergekit's ``mergekit/evo/genome.py``.)
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from mergelab.errors import MergeLabError

MERGEKIT_PARAMS = {"linear": ("weight",), "task_arithmetic": ("weight",), "ties": ("weight", "density"),
                   "dare_ties": ("weight", "density"), "slerp": ("t",)}
NORMALIZE_BY_DEFAULT = ("ties", "dare_ties", "linear")
GENOME_KEYS = {"models", "merge_method", "base_model", "tokenizer_source", "layer_granularity", "normalize",
               "allow_negative_weights", "filters", "smooth", "parameters", "ranges", "fixed", "dtype",
               "out_dtype", "seed"}


class GenomeError(MergeLabError):
    """A genome definition that cannot be searched (raised before any model is read)."""


@dataclass
class Genome:
    models: List[str]
    merge_method: str
    base_model: Optional[str]
    num_layers: int
    layer_granularity: int = 0
    filters: List[str] = field(default_factory=list)
    smooth: bool = False
    normalize: Optional[bool] = None
    allow_negative_weights: bool = False
    model_params: Tuple[str, ...] = ()
    global_params: Tuple[str, ...] = ()
    ranges: Dict[str, Tuple[float, float]] = field(default_factory=dict)
    fixed: Dict[str, Any] = field(default_factory=dict)
    tokenizer_source: Optional[str] = None
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    seed: int = 0
    defaults: Dict[str, float] = field(default_factory=dict)
    nonnegative: Tuple[str, ...] = ()

    # ------------------------------------------------------------------ shape
    @property
    def groups(self) -> int:
        return self.num_layers // self.layer_granularity if self.layer_granularity else 1

    @property
    def sets(self) -> int:
        return len(self.filters) + 1

    @property
    def size(self) -> int:
        G, M, S = self.groups, len(self.models), self.sets
        return G * M * S * len(self.model_params) + G * S * len(self.global_params)

    def x0(self) -> np.ndarray:
        """mergekit-evolve's start point (weight and slerp's gene 1/M, density 1), then the other
        parameters' defaults (clipped into their range)."""
        G, M, S = self.groups, len(self.models), self.sets
        start = []
        for p in self.model_params:
            if p in ("weight", "t"):
                v = 1.0 / M
            elif p == "density":
                v = 1.0
            else:
                v = self.defaults[p]
            start.append(self._clip(p, v))
        glob = [self._clip(q, self.defaults[q]) for q in self.global_params]
        x = np.array(start * (G * M * S) + glob * (G * S), dtype=float)
        return x

    def gene_params(self) -> List[str]:
        """The parameter name of every gene, in genotype order."""
        G, M, S = self.groups, len(self.models), self.sets
        return list(self.model_params) * (G * M * S) + list(self.global_params) * (G * S)

    def sample_bounds(self) -> Tuple[np.ndarray, np.ndarray]:
        """``(low, high)`` per gene for random search: the parameter's ``ranges`` entry, else ``[0, 1]``
        for weight, t and density (``[-1, 1]`` for weight and t with negative weights allowed), the
        values mergekit-evolve's decoding reaches from its start point. Another parameter without a
        range is an error (random search has nothing to sample it from)."""
        lows, highs = [], []
        for p in self.gene_params():
            if p in self.ranges:
                lo, hi = self.ranges[p]
            elif p in ("weight", "t"):
                lo, hi = (-1.0 if self.allow_negative_weights else 0.0), 1.0
            elif p == "density":
                lo, hi = 0.0, 1.0
            else:
                raise GenomeError(f"genome.ranges: random search needs a range [low, high] for parameter '{p}'")
            lows.append(lo)
            highs.append(hi)
        return np.array(lows), np.array(highs)

    def _clip(self, p: str, v: float) -> float:
        lo, hi = self.ranges.get(p, (-math.inf, math.inf))
        return float(min(max(v, lo), hi))

    def value(self, p: str, x: float) -> float:
        """A gene's parameter value (see the module doc)."""
        x = float(x)
        if p == "density":
            v = min(max(abs(x), 0.0), 1.0)
        elif p in ("weight", "t"):
            v = x if self.allow_negative_weights else abs(x)
        elif p in self.nonnegative and p not in self.ranges:
            v = abs(x)
        else:
            v = x
        return self._clip(p, v)

    def split(self, x: Sequence[float]) -> Tuple[np.ndarray, np.ndarray]:
        """``(model genes [G, M, S, P], global genes [G, S, Q])``."""
        x = np.asarray(x, dtype=float)
        if x.shape != (self.size,):
            raise GenomeError(f"a genotype of this genome has {self.size} genes, got {x.shape}")
        G, M, S, P, Q = self.groups, len(self.models), self.sets, len(self.model_params), len(self.global_params)
        n = G * M * S * P
        return x[:n].reshape(G, M, S, P), x[n:].reshape(G, S, Q)

    # ------------------------------------------------------------------ decoding
    def _setting(self, values: Sequence[Any]) -> Any:
        """One value per filter set -> a scalar (no filters) or mergekit's ``{filter, value}`` list."""
        if not self.filters:
            return values[0]
        return [{"filter": f, "value": v} for f, v in zip(self.filters, values[:-1])] + [{"value": values[-1]}]

    def decode(self, x: Sequence[float]) -> dict:
        """The mergelab recipe (a plain dict, ready for YAML) of genotype ``x``."""
        mg, gg = self.split(x)
        G, M, S = self.groups, len(self.models), self.sets
        recipe: Dict[str, Any] = {"merge_method": self.merge_method}
        top: Dict[str, Any] = dict(self.fixed)
        if self.normalize is not None:
            top["normalize"] = self.normalize
        elif self.merge_method in NORMALIZE_BY_DEFAULT:
            top["normalize"] = True

        def model_value(g, m, s, p):
            return self.value(self.model_params[p], mg[g, m, s, p])

        def global_value(g, s, q):
            return self.value(self.global_params[q], gg[g, s, q])

        if self.merge_method == "slerp":
            return self._decode_slerp(mg, recipe, top)
        if self.smooth or G == 1:
            models = []
            for m, ref in enumerate(self.models):
                params = {}
                for p, name in enumerate(self.model_params):
                    per_group = [self._setting([model_value(g, m, s, p) for s in range(S)]) for g in range(G)]
                    params[name] = per_group[0] if G == 1 else self._gradient(per_group)
                models.append({"model": ref, "parameters": params})
            for q, name in enumerate(self.global_params):
                per_group = [self._setting([global_value(g, s, q) for s in range(S)]) for g in range(G)]
                top[name] = per_group[0] if G == 1 else self._gradient(per_group)
            if self.base_model and self.base_model not in self.models:
                models.append({"model": self.base_model})
            recipe["models"] = models
        else:
            lg = self.layer_granularity
            slices = []
            for g in range(G):
                sources = []
                for m, ref in enumerate(self.models):
                    params = {name: self._setting([model_value(g, m, s, p) for s in range(S)])
                              for p, name in enumerate(self.model_params)}
                    sources.append({"model": ref, "layer_range": [g * lg, (g + 1) * lg], "parameters": params})
                if self.base_model and self.base_model not in self.models:
                    sources.append({"model": self.base_model, "layer_range": [g * lg, (g + 1) * lg]})
                sl: Dict[str, Any] = {"sources": sources}
                gp = {name: self._setting([global_value(g, s, q) for s in range(S)])
                      for q, name in enumerate(self.global_params)}
                if gp:
                    sl["parameters"] = gp
                if self.base_model:
                    sl["base_model"] = self.base_model
                slices.append(sl)
            recipe["slices"] = slices
        if self.base_model:
            recipe["base_model"] = self.base_model
        return self._finish(recipe, top)

    def _gradient(self, per_group: List[Any]) -> Any:
        """Smooth mode: the groups' values as one gradient list (per filter set, if any)."""
        if not self.filters:
            return [float(v) for v in per_group]
        return [{"filter": c.get("filter"), "value": [float(pg[k]["value"]) for pg in per_group]}
                if "filter" in c else {"value": [float(pg[k]["value"]) for pg in per_group]}
                for k, c in enumerate(per_group[0])]

    def _decode_slerp(self, mg: np.ndarray, recipe: dict, top: dict) -> dict:
        G, lg = self.groups, self.layer_granularity

        def pick(g):
            genes = mg[g, :, 0, 0]
            order = sorted(range(len(genes)), key=lambda i: (-genes[i], i))[:2]
            a, b = float(genes[order[0]]), float(genes[order[1]])
            t = 1.0 / (1.0 + math.exp(a - b))  # softmax([a, b])[1]
            return self.models[order[0]], self.models[order[1]], self._clip("t", t)

        if G == 1:
            first, second, t = pick(0)
            recipe.update(base_model=first, models=[{"model": first}, {"model": second}])
            top["t"] = t
            return self._finish(recipe, top)
        slices = []
        for g in range(G):
            first, second, t = pick(g)
            rng = [g * lg, (g + 1) * lg]
            slices.append({"sources": [{"model": first, "layer_range": rng}, {"model": second, "layer_range": rng}],
                           "base_model": first, "parameters": {"t": t}})
        recipe["slices"] = slices
        return self._finish(recipe, top)

    def _finish(self, recipe: dict, top: dict) -> dict:
        if top:
            recipe["parameters"] = top
        for key in ("tokenizer_source", "dtype", "out_dtype"):
            if getattr(self, key) is not None:
                recipe[key] = getattr(self, key)
        recipe["seed"] = self.seed
        return recipe

    def describe(self, x: Sequence[float]) -> dict:
        """The decoded values by name, for the history (``model/param[group][set]``)."""
        mg, gg = self.split(x)
        out = {}
        for g in range(self.groups):
            for s in range(self.sets):
                suffix = (f"[{g}]" if self.groups > 1 else "") + (f"[{self.filters[s]}]" if s < len(self.filters)
                                                                   else ("[*]" if self.filters else ""))
                for m, ref in enumerate(self.models):
                    for p, name in enumerate(self.model_params):
                        out[f"{_short(ref)}/{name}{suffix}"] = round(self.value(name, mg[g, m, s, p]), 6)
                for q, name in enumerate(self.global_params):
                    out[f"{name}{suffix}"] = round(self.value(name, gg[g, s, q]), 6)
        return out


def _short(ref: str) -> str:
    parts = [p for p in str(ref).replace("\\", "/").split("/") if p]
    return "/".join(parts[-2:]) if parts and parts[-1] in ("final", "model") else (parts[-1] if parts else ref)


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_genome(data: Any, num_layers_of, where: str = "genome") -> Genome:
    """A :class:`Genome` from the ``genome:`` mapping. ``num_layers_of(ref)`` gives a model's layer count
    (only called when ``layer_granularity`` is set). Every problem is a :class:`GenomeError`."""
    from mergelab.methods.registry import get_method

    if not isinstance(data, dict):
        raise GenomeError(f"{where}: expected a mapping with models, merge_method, ...")
    unknown = sorted(set(data) - GENOME_KEYS)
    if unknown:
        raise GenomeError(f"{where}: unknown key(s) {unknown}; expected some of {sorted(GENOME_KEYS)}")
    models = data.get("models")
    if not isinstance(models, list) or not models or not all(isinstance(m, str) and m for m in models):
        raise GenomeError(f"{where}.models: expected a non-empty list of model paths")
    if len(set(models)) != len(models):
        raise GenomeError(f"{where}.models: a model is listed twice")
    name = data.get("merge_method")
    if not isinstance(name, str):
        raise GenomeError(f"{where}.merge_method: required (linear, task_arithmetic, ties, dare_ties, slerp or "
                          "another mergelab method)")
    try:
        method = get_method(name)
    except MergeLabError as e:
        raise GenomeError(f"{where}.merge_method: {e}") from None
    base = data.get("base_model")
    if base is not None and not isinstance(base, str):
        raise GenomeError(f"{where}.base_model: expected a model path")
    if method.name == "slerp":
        if base is not None:
            raise GenomeError(f"{where}.base_model: slerp takes both of its models from models: (per layer group "
                              "the two with the largest gene, the first as the base); remove base_model")
        if len(models) < 2:
            raise GenomeError(f"{where}.models: slerp needs at least two models")
    elif method.base.value == "required" and base is None:
        raise GenomeError(f"{where}.base_model: method '{method.name}' needs a base model")
    elif method.base.value == "none" and base is not None:
        raise GenomeError(f"{where}.base_model: method '{method.name}' takes no base model")
    granularity = data.get("layer_granularity", 0) or 0
    if not isinstance(granularity, int) or isinstance(granularity, bool) or granularity < 0:
        raise GenomeError(f"{where}.layer_granularity: expected a non-negative integer, got {granularity!r}")
    filters = data.get("filters") or []
    if not isinstance(filters, list) or not all(isinstance(f, str) and f for f in filters):
        raise GenomeError(f"{where}.filters: expected a list of tensor-name substrings")
    smooth = bool(data.get("smooth", False))
    if method.name == "slerp" and (smooth or filters):
        raise GenomeError(f"{where}: smooth and filters are not supported with slerp (as in mergekit-evolve)")
    for key in ("smooth", "allow_negative_weights"):
        if not isinstance(data.get(key, False), bool):
            raise GenomeError(f"{where}.{key}: expected true or false")
    normalize = data.get("normalize")
    if normalize is not None and not isinstance(normalize, bool):
        raise GenomeError(f"{where}.normalize: expected true, false or null")
    if normalize is not None and method.param("normalize") is None:
        raise GenomeError(f"{where}.normalize: method '{method.name}' has no 'normalize' parameter")

    given = data.get("parameters")
    if given is None:
        if method.name not in MERGEKIT_PARAMS:
            raise GenomeError(f"{where}.parameters: method '{method.name}' is not one of mergekit-evolve's "
                              f"({', '.join(MERGEKIT_PARAMS)}); list the numeric parameters that evolve")
        given = list(MERGEKIT_PARAMS[method.name])
    if not isinstance(given, list) or not given or not all(isinstance(p, str) for p in given):
        raise GenomeError(f"{where}.parameters: expected a non-empty list of parameter names")
    if method.name == "slerp" and given != ["t"]:
        raise GenomeError(f"{where}.parameters: slerp evolves exactly [t]")
    model_params, global_params, defaults, nonneg = [], [], {}, []
    allowed = sorted({p.name for p in method.params} | {p.name for p in method.model_params})
    for p_name in given:
        if method.name == "slerp":
            p = method.param("t")
            model_params.append("t")
        else:
            p = method.model_param(p_name) or method.param(p_name)
            if p is None:
                raise GenomeError(f"{where}.parameters: '{p_name}' is not a parameter of method '{method.name}' "
                                  f"(its parameters: {', '.join(allowed)})")
            (model_params if method.model_param(p_name) is not None else global_params).append(p_name)
        if p.kind not in (float, int) or p.kind is bool:
            raise GenomeError(f"{where}.parameters: '{p_name}' of method '{method.name}' is not numeric; only "
                              "numbers evolve (set it under fixed:)")
        if p_name not in ("weight", "density", "t"):
            if not _number(p.default):
                if not isinstance(data.get("ranges"), dict) or p_name not in data["ranges"]:
                    raise GenomeError(f"{where}.ranges: parameter '{p_name}' has no default to start from; give "
                                      f"its range [low, high]")
            else:
                defaults[p_name] = float(p.default)
        if p.low is not None and p.low >= 0:
            nonneg.append(p_name)
    if len(set(given)) != len(given):
        raise GenomeError(f"{where}.parameters: a parameter is listed twice")

    ranges: Dict[str, Tuple[float, float]] = {}
    raw = data.get("ranges") or {}
    if not isinstance(raw, dict):
        raise GenomeError(f"{where}.ranges: expected a mapping parameter -> [low, high]")
    for p_name, rng in raw.items():
        if p_name not in given:
            if method.model_param(p_name) is None and method.param(p_name) is None:
                raise GenomeError(f"{where}.ranges: '{p_name}' is not a parameter of method '{method.name}' "
                                  f"(its parameters: {', '.join(allowed)})")
            raise GenomeError(f"{where}.ranges: '{p_name}' does not evolve; add it to parameters: "
                              f"{given + [p_name]}")
        if not (isinstance(rng, list) and len(rng) == 2 and all(_number(v) for v in rng)):
            raise GenomeError(f"{where}.ranges.{p_name}: expected [low, high] (two finite numbers), got {rng!r}")
        lo, hi = float(rng[0]), float(rng[1])
        if not lo < hi:
            raise GenomeError(f"{where}.ranges.{p_name}: the range [{rng[0]}, {rng[1]}] is empty (low must be "
                              "below high)")
        p = method.param("t") if method.name == "slerp" else (method.model_param(p_name) or method.param(p_name))
        for v in (lo, hi):
            try:
                p.check(v, f"{where}.ranges.{p_name}")
            except MergeLabError as e:
                raise GenomeError(str(e)) from None
        if p_name in ("weight", "t") and lo < 0 and not data.get("allow_negative_weights", False):
            raise GenomeError(f"{where}.ranges.{p_name}: negative values need allow_negative_weights: true")
        ranges[p_name] = (lo, hi)
        if p_name not in defaults and p_name not in ("weight", "density", "t"):
            defaults[p_name] = (lo + hi) / 2
    fixed = data.get("fixed") or {}
    if not isinstance(fixed, dict):
        raise GenomeError(f"{where}.fixed: expected a mapping of global parameters held fixed")
    for key in fixed:
        if method.param(key) is None:
            raise GenomeError(f"{where}.fixed: '{key}' is not a global parameter of method '{method.name}'")
        if key in given:
            raise GenomeError(f"{where}.fixed: '{key}' also evolves (it is in parameters:)")

    num_layers = 0
    if granularity:
        num_layers = num_layers_of(base or models[0])
        if not num_layers:
            raise GenomeError(f"{where}.layer_granularity: the layer count of '{base or models[0]}' is unknown")
        if num_layers % granularity:
            raise GenomeError(f"{where}.layer_granularity: {granularity} does not divide the {num_layers} layers "
                              f"of '{base or models[0]}'")
    seed = data.get("seed", 0)
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise GenomeError(f"{where}.seed: expected an integer")
    return Genome(models=list(models), merge_method=method.name, base_model=base, num_layers=num_layers,
                  layer_granularity=granularity, filters=list(filters), smooth=smooth, normalize=normalize,
                  allow_negative_weights=bool(data.get("allow_negative_weights", False)),
                  model_params=tuple(model_params), global_params=tuple(global_params), ranges=ranges,
                  fixed=dict(fixed), tokenizer_source=data.get("tokenizer_source"), dtype=data.get("dtype"),
                  out_dtype=data.get("out_dtype"), seed=seed, defaults=defaults, nonnegative=tuple(nonneg))
