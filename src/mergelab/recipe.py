"""Recipes: mergekit-compatible YAML (a superset), validated before any tensor is read.

A recipe names a ``merge_method``, a ``base_model``, the ``models`` (each with ``parameters``), the
global ``parameters``, ``dtype``/``out_dtype`` and ``tokenizer_source``, exactly as mergekit's
``models:`` configs do. mergelab adds ``seed`` (per-tensor random streams), ``post`` (post-steps such
as LiNeS applied to the merged task vector), ``vocab_policy`` (what to do when embedding shapes
differ: ``error``, the default, or ``common_submatrix``, mergekit's old silent crop, made explicit),
``missing_tokens`` (with ``tokenizer_source``: the row a model gets for a token it lacks, ``base`` or
``mean``; :mod:`mergelab.vocab`) and ``output: {format: peft, combine, rank}`` (a merge of LoRA adapters that stays an adapter:
:mod:`mergelab.adapters`). A model may be a PEFT LoRA adapter on a base, ``BASE+ADAPTER`` as in
mergekit or ``{adapter: PATH}`` on ``base_model`` (:mod:`mergelab.io.adapted`).

Parameter values are resolved per tensor as mergekit does (:func:`resolve_setting`):

* a scalar, read as the parameter's type as mergekit reads it (``"1e-5"`` is a number, ``"false"`` a
  boolean: :func:`lax_value`);
* a list of numbers, a *gradient*, interpolated linearly at ``t = layer / (num_layers - 1)``
  (``t = 0`` for tensors outside the layers); a list of non-numbers is indexed at ``int(t*(n-1))``;
* a list of ``{filter, value}`` conditionals: the first whose ``filter`` is missing, ``"*"`` or a
  substring of the tensor name wins, and its value is resolved in turn.

Parameters are looked up level by level, highest precedence first, as mergekit 0.1.5 does
(``parameter_resolver.py``): a per-model parameter in the source's ``parameters`` (``slices:``) or the
model's (``models:``), then the slice's ``parameters``, then the top-level ``parameters``, then the
method's default; a global parameter in the slice's ``parameters``, then the top-level ones. A level
whose setting resolves to nothing for a tensor (a filter list with no matching entry) passes the
lookup on to the next level. Filters of per-model parameters match the input tensor's name (its
layer number in the source model), filters of global parameters the output tensor's name. A global
parameter set on a model or source is never read by mergekit; mergelab ignores it too, with a
warning (an error under ``--strict``).

As in mergekit, a parameter the method does not use is ignored when some other registered method
defines it (a ``density`` left on a ``linear`` merge), with one warning line per name
(:func:`unused_parameter_messages`; an error under ``--strict``); a name no method defines is an
error with the closest name.
"""

from __future__ import annotations

import difflib
import functools
from pathlib import Path
from typing import Any, Dict, List, Literal, Optional, Sequence, Tuple, Union

import yaml
from pydantic import (BaseModel, ConfigDict, Field, PrivateAttr, StrictBool, StrictFloat, StrictInt, StrictStr,
                      TypeAdapter, ValidationError, field_validator)

from mergelab.errors import MergeLabError, RecipeError
from mergelab.methods.registry import (MergeMethod, Param, all_parameter_names, get_method, get_post_step,
                                       methods_defining)

Scalar = Union[StrictBool, StrictInt, StrictFloat, StrictStr]


class Conditional(BaseModel):
    """``{filter: substring, value: setting}``: applies where ``filter`` is in the tensor name."""

    model_config = ConfigDict(extra="forbid")
    filter: Optional[str] = None
    value: "Setting"


Setting = Union[Scalar, List[Scalar], List[Conditional], Conditional]
Conditional.model_rebuild()


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    @field_validator("parameters", mode="before", check_fields=False)
    @classmethod
    def _empty_parameters(cls, value: Any) -> Any:
        # ``parameters:`` with nothing under it is YAML null; mergekit reads it as no parameters
        return {} if value is None else value


class ModelEntry(_Strict):
    model: str
    parameters: Dict[str, Setting] = Field(default_factory=dict)


class SliceSource(_Strict):
    model: str
    layer_range: Tuple[int, int]
    parameters: Dict[str, Setting] = Field(default_factory=dict)


class OutputSlice(_Strict):
    sources: List[SliceSource]
    base_model: Optional[str] = None
    parameters: Dict[str, Setting] = Field(default_factory=dict)
    residual_weight: Optional[float] = None


class PostStepEntry(_Strict):
    name: str
    parameters: Dict[str, Setting] = Field(default_factory=dict)


class OutputSpec(_Strict):
    """``output:`` (mergelab): what the merge writes. ``format: hf`` (default) is a Hugging Face model
    folder; ``format: peft`` a PEFT LoRA adapter, the inputs being LoRA adapters on ``base_model``
    combined by ``combine`` (``cat``, ``svd`` or ``knots``; see :mod:`mergelab.adapters`), truncated to
    ``rank`` (``svd``, ``knots``)."""

    format: Literal["hf", "peft"] = "hf"
    combine: Optional[Literal["cat", "svd", "knots"]] = None
    rank: Optional[int] = None


DTYPES = ("float32", "float16", "bfloat16", "float64")
_DTYPE_ALIASES = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16", "half": "float16",
                  "float": "float32", "fp64": "float64"}


class Recipe(_Strict):
    """A merge recipe. See the module docstring; field names follow mergekit."""

    merge_method: str
    base_model: Optional[str] = None
    models: Optional[List[ModelEntry]] = None
    slices: Optional[List[OutputSlice]] = None
    modules: Optional[Dict[str, Any]] = None
    parameters: Dict[str, Setting] = Field(default_factory=dict)
    dtype: Optional[str] = None
    out_dtype: Optional[str] = None
    tokenizer_source: Optional[str] = None
    tokenizer: Optional[Dict[str, Any]] = None
    chat_template: Optional[str] = None
    # mergelab extensions
    seed: int = 0
    post: List[PostStepEntry] = Field(default_factory=list)
    vocab_policy: Literal["error", "common_submatrix"] = "error"
    # With tokenizer_source: the row a model gets for a token it lacks (mergelab.vocab.embed); None = base
    missing_tokens: Optional[Literal["base", "mean"]] = None
    name: Optional[str] = None
    output: Optional[OutputSpec] = None
    # tokenizer: {pad_to_multiple_of: N, tokens: {...}}, kept apart once the block is read as tokenizer_source
    _pad_to_multiple_of: Optional[int] = PrivateAttr(default=None)
    _tokens: Optional[Dict[str, dict]] = PrivateAttr(default=None)

    @property
    def tokens(self) -> Optional[Dict[str, dict]]:
        """The ``tokenizer: {tokens: ...}`` block, checked: ``{token: {"source": ..., "force": bool}}`` with a
        source ``{"kind": "model", "model": REF}``, ``{"kind": "model_token", "model": REF, "token": str}``,
        ``{"kind": "model_token", "model": REF, "token_id": int}`` or ``{"kind": "zero"}``."""
        return self._tokens

    @property
    def pad_to_multiple_of(self) -> Optional[int]:
        """The output vocabulary's row count is rounded up to a multiple of this (``tokenizer:`` block)."""
        return self._pad_to_multiple_of

    def model_refs(self) -> List[str]:
        """Every model path the recipe names, base first, without duplicates."""
        refs: List[str] = []
        if self.base_model:
            refs.append(self.base_model)
        for m in self.models or []:
            refs.append(m.model)
        for s in self.slices or []:
            refs.extend(src.model for src in s.sources)
            if s.base_model:
                refs.append(s.base_model)
        return list(dict.fromkeys(refs))


def _format_validation_error(err: ValidationError, source: str) -> str:
    lines = []
    for e in err.errors():
        loc = ".".join(str(p) for p in e["loc"] if not str(p).startswith(("function-", "union[")))
        if e["type"] == "extra_forbidden":
            lines.append(f"{loc}: unknown key")
        elif e["type"] == "missing":
            lines.append(f"{loc}: required key is missing")
        else:
            lines.append(f"{loc}: {e['msg']}")
    # Union members each report; keep the distinct messages, first few only.
    uniq = list(dict.fromkeys(lines))[:6]
    allowed = ", ".join(Recipe.model_fields)
    return f"recipe {source} is invalid:\n  " + "\n  ".join(uniq) + f"\n(top-level keys allowed: {allowed})"


def load_recipe(recipe: Union[str, Path, dict, Recipe]) -> Recipe:
    """Parse and structurally validate a recipe from a YAML path, a dict or a :class:`Recipe`."""
    if isinstance(recipe, Recipe):
        return recipe
    source = "(dict)"
    if isinstance(recipe, (str, Path)):
        path = Path(recipe)
        source = f"'{path}'"
        if not path.exists():
            raise RecipeError(f"recipe file '{path}' does not exist")
        try:
            data = yaml.safe_load(path.read_text())
        except yaml.YAMLError as e:
            raise RecipeError(f"recipe '{path}' is not valid YAML: {e}")
    else:
        data = recipe
    if not isinstance(data, dict):
        raise RecipeError(f"recipe {source} must be a mapping with at least 'merge_method'")
    data = _adapter_entries(data)
    try:
        parsed = Recipe.model_validate(data)
    except ValidationError as e:
        raise RecipeError(_format_validation_error(e, source))
    _check_structure(parsed)
    return parsed


def _check_structure(r: Recipe) -> None:
    given = [k for k in ("models", "slices", "modules") if getattr(r, k)]
    if len(given) != 1:
        raise RecipeError(f"recipe must have exactly one of 'models', 'slices' or 'modules' (found: {given or 'none'})")
    if r.modules:
        raise RecipeError("'modules:' (multi-module architectures) is not supported yet; use 'models:'")
    if r.tokenizer is not None:
        if r.tokenizer_source is not None:
            raise RecipeError("give either tokenizer_source: or tokenizer:, not both (as in mergekit)")
        _tokenizer_block_as_source(r)
    if r.tokenizer_source is not None:
        if r.vocab_policy != "error":
            raise RecipeError(f"vocab_policy: {r.vocab_policy} crops embeddings by index, tokenizer_source matches "
                              f"their rows by token string: give one of them")
        if r.output is not None and r.output.format == "peft":
            raise RecipeError("tokenizer_source with output: format: peft is not supported (an adapter cannot carry a "
                              "new vocabulary); remove one of them")
        if r.tokenizer_source == "":
            raise RecipeError("tokenizer_source: expected 'base', 'union' or a model path, got an empty string")
    elif r.missing_tokens is not None:
        raise RecipeError(f"missing_tokens: {r.missing_tokens} applies to merges with tokenizer_source (or "
                          f"tokenizer:) only, which match embedding rows by token; set one or remove it")
    if r.chat_template is not None:  # mergekit's values (mergelab.vocab.chat); built-in names are refused
        from mergelab.vocab.chat import check_setting

        try:
            check_setting(r.chat_template)
        except MergeLabError as e:
            raise RecipeError(str(e)) from None
    _check_output(r)
    for key in ("dtype", "out_dtype"):
        v = getattr(r, key)
        if v is not None and normalize_dtype(v) is None:
            raise RecipeError(f"{key}: '{v}' is not a float dtype; expected one of {', '.join(DTYPES)}")
    get_method(r.merge_method)
    for p in r.post:
        get_post_step(p.name)


def _adapter_entries(data: dict) -> dict:
    """``model: {adapter: PATH}`` (in ``models:`` or a slice's ``sources``) is ``BASE+PATH`` with BASE the
    recipe's ``base_model``: rewritten so, in a copy of ``data``, before validation."""
    def rewrite(entry: Any, where: str) -> Any:
        if not (isinstance(entry, dict) and isinstance(entry.get("model"), dict)):
            return entry
        spec = entry["model"]
        if set(spec) != {"adapter"} or not isinstance(spec["adapter"], str):
            raise RecipeError(f"{where}.model: a mapping must be {{adapter: PATH}} (a PEFT LoRA folder on base_model), "
                              f"got {spec!r}")
        base = data.get("base_model")
        if not isinstance(base, str):
            raise RecipeError(f"{where}.model: {{adapter: {spec['adapter']}}} applies the adapter to base_model, but "
                              f"the recipe has no base_model; set it or write BASE+{spec['adapter']}")
        return {**entry, "model": f"{base}+{spec['adapter']}"}

    out = dict(data)
    if isinstance(data.get("models"), list):
        out["models"] = [rewrite(e, f"models[{i}]") for i, e in enumerate(data["models"])]
    if isinstance(data.get("slices"), list):
        out["slices"] = [
            {**s, "sources": [rewrite(e, f"slices[{si}].sources[{j}]") for j, e in enumerate(s["sources"])]}
            if isinstance(s, dict) and isinstance(s.get("sources"), list) else s
            for si, s in enumerate(data["slices"])]
    return out


def _check_output(r: Recipe) -> None:
    o = r.output
    if o is None or o.format == "hf":
        if o is not None and (o.combine is not None or o.rank is not None):
            raise RecipeError("output: 'combine' and 'rank' apply to format: peft only (merges that stay adapters)")
        return
    if o.combine is None:
        raise RecipeError("output: format: peft needs combine: cat, svd or knots")
    if o.combine == "cat" and o.rank is not None:
        raise RecipeError("output: combine: cat is exact (the ranks add up) and takes no 'rank'; use svd or knots "
                          "to truncate")
    if o.combine in ("svd", "knots") and (o.rank is None or o.rank < 1):
        raise RecipeError(f"output: combine: {o.combine} needs rank: R (a positive integer), got {o.rank!r}")
    if r.slices:
        raise RecipeError("output: format: peft needs a models: recipe (one adapter per model on base_model)")
    if not r.base_model:
        raise RecipeError("output: format: peft needs base_model (the base every adapter was trained on)")
    if r.post:
        raise RecipeError("output: format: peft does not run post: steps; remove them")


def _tokenizer_block_as_source(r: Recipe) -> None:
    """``tokenizer: {source: X, pad_to_multiple_of: N, tokens: {...}}`` is mergekit's ``tokenizer_source: X``
    with the output vocabulary's rows rounded up to a multiple of N and per-token embedding sources
    (:func:`_token_rules`; applied by :mod:`mergelab.vocab`): read it as that."""
    block = r.tokenizer
    if not isinstance(block, dict) or not set(block) <= {"source", "tokens", "pad_to_multiple_of"}:
        raise RecipeError(f"tokenizer: must be a mapping with 'source' (and optionally 'tokens', "
                          f"'pad_to_multiple_of'), as in mergekit; got {block!r}")
    r._tokens = _token_rules(block.get("tokens"), r.model_refs()) if block.get("tokens") else None
    pad = block.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        raise RecipeError(f"tokenizer.pad_to_multiple_of: expected a positive integer, got {pad!r}")
    source = block.get("source", "union")  # mergekit's default source
    if not isinstance(source, str):
        raise RecipeError(f"tokenizer.source: expected 'base', 'union' or a model path, got {source!r}")
    r.tokenizer_source, r.tokenizer = source, None
    r._pad_to_multiple_of = pad


def _token_rules(tokens: Any, refs: List[str]) -> Dict[str, dict]:
    """mergekit's ``tokenizer.tokens``: ``{token: {source: S, force: bool}}`` where S is a model of the
    recipe, ``{kind: model_token, model: M, token: T | token_id: N}`` or ``{kind: zero}``; every token is
    added to the output tokenizer when it lacks it. Normalised to ``{"source": {"kind": ...}, "force": ...}``."""
    if not isinstance(tokens, dict):
        raise RecipeError(f"tokenizer.tokens: expected a mapping of token -> {{source, force}}, got {tokens!r}")
    out: Dict[str, dict] = {}
    for tok, cfg in tokens.items():
        where = f"tokenizer.tokens[{tok!r}]"
        if not isinstance(tok, str) or not tok:
            raise RecipeError(f"tokenizer.tokens: every key must be a token string, got {tok!r}")
        if not isinstance(cfg, dict) or not set(cfg) <= {"source", "force"}:
            raise RecipeError(f"{where}: expected a mapping with 'source' (and optionally 'force'), got {cfg!r}")
        force = cfg.get("force", False)
        if not isinstance(force, bool):
            raise RecipeError(f"{where}.force: expected true or false, got {force!r}")
        src = cfg.get("source")
        if src is None:  # mergekit accepts it and then fails when the token needs a row
            raise RecipeError(f"{where}: 'source' is required (a model, {{kind: model_token, model, token or "
                              f"token_id}} or {{kind: zero}})")
        if isinstance(src, str):
            rule = {"kind": "model", "model": src}
        elif isinstance(src, dict) and src.get("kind") == "zero" and set(src) == {"kind"}:
            rule = {"kind": "zero"}
        elif isinstance(src, dict) and src.get("kind") == "model_token" and set(src) <= {"kind", "model", "token",
                                                                                         "token_id"}:
            if ("token" in src) == ("token_id" in src):
                raise RecipeError(f"{where}.source: give exactly one of 'token' and 'token_id'")
            if "token_id" in src and (isinstance(src["token_id"], bool) or not isinstance(src["token_id"], int)
                                      or src["token_id"] < 0):
                raise RecipeError(f"{where}.source.token_id: expected a non-negative integer, got {src['token_id']!r}")
            if "token" in src and not isinstance(src["token"], str):
                raise RecipeError(f"{where}.source.token: expected a token string, got {src['token']!r}")
            rule = dict(src)
        else:
            raise RecipeError(f"{where}.source: expected a model path, {{kind: model_token, model, token or "
                              f"token_id}} or {{kind: zero}}, got {src!r}")
        if "model" in rule and rule["model"] not in refs:
            raise RecipeError(f"{where}.source: '{rule['model']}' is not one of the recipe's models "
                              f"({', '.join(refs)})")
        out[tok] = {"source": rule, "force": force}
    return out


def normalize_dtype(name: Optional[str]) -> Optional[str]:
    if name is None:
        return None
    name = _DTYPE_ALIASES.get(name, name)
    return name if name in DTYPES else None


# --------------------------------------------------------------------------- parameter resolution
@functools.lru_cache(maxsize=None)
def _adapter(kind: type) -> TypeAdapter:
    return TypeAdapter(kind)


def lax_value(param: Param, value: Any) -> Any:
    """``value`` converted to ``param``'s type the way mergekit 0.1.5 reads it (pydantic's lax mode):
    a number written as a string (``"1e-5"``, which YAML 1.1 reads as a string for lack of a dot) is a
    number, ``"false"``/``"no"``/``0`` a boolean. Anything it cannot convert is returned as is, for
    :meth:`Param.check` to reject with its message."""
    if param.kind in (float, int, bool) and not (type(value) is param.kind):
        try:
            return _adapter(param.kind).validate_python(value)
        except ValidationError:
            return value
    return value


def resolve_setting(setting: Any, tensor_name: str, t: float, param: Optional[Param] = None) -> Any:
    """Resolve a parameter setting for one tensor at depth ``t`` (mergekit's semantics).

    With ``param``, every value is first read as that parameter's type (:func:`lax_value`), as mergekit
    validates gradient endpoints before deciding whether to interpolate them.
    """
    conv = (lambda v: lax_value(param, v)) if param is not None else (lambda v: v)
    if isinstance(setting, Conditional):
        setting = [setting]
    if isinstance(setting, (bool, int, float, str)):
        return conv(setting)
    if isinstance(setting, list):
        if not setting:
            return None
        if all(isinstance(e, (bool, int, float, str)) for e in setting):
            values = [conv(e) for e in setting]
            if not all(isinstance(e, (int, float)) and not isinstance(e, bool) for e in values):
                return values[int(t * (len(values) - 1))]
            scaled = t * (len(values) - 1)
            i0 = int(scaled)
            i1 = min(len(values) - 1, i0 + 1)
            frac = scaled - i0
            return conv((1 - frac) * values[i0] + frac * values[i1])
        for cond in setting:
            if cond.filter is None or cond.filter == "*" or (tensor_name and cond.filter in tensor_name):
                return resolve_setting(cond.value, tensor_name, t, param)
        return None
    raise RecipeError(f"unexpected parameter value {setting!r}")


def _leaf_values(setting: Any) -> List[Any]:
    """Every scalar a setting can resolve to (gradient endpoints, conditional values)."""
    if isinstance(setting, Conditional):
        return _leaf_values(setting.value)
    if isinstance(setting, list):
        out: List[Any] = []
        for e in setting:
            out.extend(_leaf_values(e))
        return out
    return [setting]


def _is_scalar(setting: Any) -> bool:
    return isinstance(setting, (bool, int, float, str))


def check_setting(param: Param, setting: Any, where: str) -> None:
    """Validate every value ``setting`` can take; gradients of numbers stay within range by convexity."""
    if not param.per_layer and not _is_scalar(setting):
        raise RecipeError(f"{where}: parameter '{param.name}' must be a single value, not a gradient or filter list")
    for v in _leaf_values(setting):
        param.check(lax_value(param, v), where)


def validate_parameters(
    method: MergeMethod,
    global_settings: Dict[str, Any],
    per_model_settings: List[Tuple[str, Dict[str, Any]]],
    where: str = "parameters",
    fallbacks: Sequence[Dict[str, Any]] = (),
    required: bool = True,
) -> None:
    """Reject unknown, missing or out-of-range parameters, naming the key and what is allowed.

    ``global_settings`` is a shared level (the top-level ``parameters`` or a slice's), which may hold
    the method's global parameters and fallbacks for its per-model ones; ``fallbacks`` are the
    lower-precedence shared levels below it (for a slice, the top-level ``parameters``), consulted
    only to decide whether a required parameter is set somewhere. ``required=False`` skips the
    required checks (a level validated on its own).

    A name that ``method`` does not use but another registered method defines is skipped here (the
    caller warns about it, see :func:`unused_parameter_messages`), and so is a global parameter set
    on a model (mergekit never reads it there; :func:`misplaced_parameters`); a name no method
    defines is an error with the closest name the method has.

    ``per_model_settings`` is ``[(label, model_parameters), ...]`` for every model the method treats as
    an input (the base too, for methods that use it as an ordinary input).
    """
    global_names = {p.name for p in method.params}
    model_names = {p.name for p in method.model_params}
    allowed = ", ".join(sorted(global_names | model_names)) or "none"
    shared = [global_settings, *fallbacks]
    for key, setting in global_settings.items():
        p = method.param(key) or method.model_param(key)
        if p is None:
            _refuse_unsupported(method, key, where)
            if methods_defining(key):  # another method's parameter: ignored, see unused_parameters
                continue
            raise RecipeError(f"{where}: unknown parameter '{key}' for method '{method.name}'"
                              f"{_did_you_mean(key, global_names | model_names)}; allowed: {allowed}")
        check_setting(p, setting, where)
    for label, settings in per_model_settings:
        for key, setting in settings.items():
            if key in global_names:  # never read per model (mergekit neither): see misplaced_parameters
                continue
            p = method.model_param(key)
            if p is None:
                _refuse_unsupported(method, key, f"{_place(label)}.parameters")
                if methods_defining(key):
                    continue
                raise RecipeError(
                    f"{_place(label)}.parameters: unknown parameter '{key}' for method '{method.name}'"
                    f"{_did_you_mean(key, model_names)}; "
                    f"per-model parameters allowed: {', '.join(sorted(model_names)) or 'none'}"
                )
            check_setting(p, setting, f"{_place(label)}.parameters")
        if not required:
            continue
        for p in method.model_params:
            if p.required and p.name not in settings and not any(p.name in level for level in shared):
                raise RecipeError(
                    f"{_place(label)}: required parameter '{p.name}' of method '{method.name}' is missing "
                    f"({p.meaning} Expected {p.allowed()})"
                )
    if not required:
        return
    for p in method.params:
        if p.required and not any(p.name in level for level in shared):
            raise RecipeError(
                f"{where}: required parameter '{p.name}' of method '{method.name}' is missing; expected {p.allowed()}"
            )


def _place(label: str) -> str:
    """Where a model's parameters are set: ``models[LABEL]``, or a slice source's own label."""
    return label if label.startswith("slices[") else f"models[{label}]"


def _refuse_unsupported(method: MergeMethod, key: str, where: str) -> None:
    if key in method.unsupported:
        raise RecipeError(f"{where}: parameter '{key}' of method '{method.name}'s reference is not implemented "
                          f"in mergelab (see `mergelab methods {method.name}`); remove it")


def _did_you_mean(key: str, names) -> str:
    """A hint naming the closest of ``names`` (the method's own), else the closest parameter of any
    registered method (which this method would ignore, but the typo is still worth naming)."""
    close = difflib.get_close_matches(key, sorted(names), n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    close = difflib.get_close_matches(key, all_parameter_names(), n=1, cutoff=0.6)
    return f" (did you mean '{close[0]}', a parameter of other methods?)" if close else ""


def unused_parameters(recipe: Recipe, method: MergeMethod) -> Dict[str, List[str]]:
    """Parameters the recipe sets that ``method`` does not use but some registered method defines.

    mergekit ignores a parameter its method does not read, and published configs carry such leftovers
    (``density`` on a ``linear`` merge after trying TIES, ``weight`` on ``slerp``'s models), so
    mergelab ignores them too, with a warning (an error under ``--strict``). Returns
    ``{name: [where it is set, ...]}`` in the recipe's order. Names no method defines are not here:
    :func:`validate_parameters` rejects them as typos.
    """
    found: Dict[str, List[str]] = {}

    def scan(settings: Dict[str, Any], where: str) -> None:
        for key in settings:
            if method.param(key) is None and method.model_param(key) is None and key not in method.unsupported \
                    and methods_defining(key):
                found.setdefault(key, []).append(where)

    scan(recipe.parameters, "parameters")
    for m in recipe.models or []:
        scan(m.parameters, f"models[{m.model}]")
    for si, sl in enumerate(recipe.slices or []):
        scan(sl.parameters, f"slices[{si}].parameters")
        for src in sl.sources:
            scan(src.parameters, f"slices[{si}].sources[{src.model}]")
    return found


def misplaced_parameters(recipe: Recipe, method: MergeMethod) -> Dict[str, List[str]]:
    """Global parameters of ``method`` set on a model (``models[].parameters``) or a slice source.

    mergekit reads a global ("shared") parameter only from a slice's ``parameters`` and the top-level
    ``parameters``, so such a value is never used (``t`` under a slerp model's parameters); mergelab
    ignores it too, with a warning. Returns ``{name: [where it is set, ...]}``.
    """
    found: Dict[str, List[str]] = {}

    def scan(settings: Dict[str, Any], where: str) -> None:
        for key in settings:
            if method.param(key) is not None:
                found.setdefault(key, []).append(where)

    for m in recipe.models or []:
        scan(m.parameters, f"models[{m.model}]")
    for si, sl in enumerate(recipe.slices or []):
        for src in sl.sources:
            scan(src.parameters, f"slices[{si}].sources[{src.model}]")
    return found


def _places(places: List[str]) -> str:
    return ", ".join(places[:3]) + (f" and {len(places) - 3} more" if len(places) > 3 else "")


def unused_parameter_messages(recipe: Recipe, method: MergeMethod, strict: bool = False) -> List[str]:
    """One warning line per parameter of :func:`unused_parameters` and of :func:`misplaced_parameters`;
    with ``strict``, a :class:`RecipeError` listing them instead."""
    items = []
    for key, places in unused_parameters(recipe, method).items():
        users = methods_defining(key)
        used_by = ", ".join(users[:4]) + (f" and {len(users) - 4} more" if len(users) > 4 else "")
        items.append((f"parameter '{key}' (set in {_places(places)}) is not used by method '{method.name}'",
                      f"(it is a parameter of {used_by})"))
    for key, places in misplaced_parameters(recipe, method).items():
        items.append((f"parameter '{key}' (set in {_places(places)}) is a global parameter of method "
                      f"'{method.name}', which is read only from the top-level or a slice's 'parameters', not "
                      f"per model,", "(mergekit ignores it there too; move it to 'parameters' to use it)"))
    if not items:
        return []
    if strict:
        raise RecipeError("; ".join(f"{what} {whose}" for what, whose in items)
                          + ". --strict refuses parameters the method does not use: remove them, or run "
                            "without --strict to ignore them with a warning, as mergekit ignores them")
    return [f"{what} and is ignored {whose}" for what, whose in items]


def resolve_parameters(
    method: MergeMethod,
    global_settings: Union[Dict[str, Any], Sequence[Dict[str, Any]]],
    per_model_settings: List[Dict[str, Any]],
    tensor_name: str,
    t: float,
    model_tensor_names: Optional[Sequence[str]] = None,
) -> Tuple[dict, List[dict]]:
    """Resolved global and per-model parameter values for one tensor (mergekit's precedence).

    ``global_settings`` is the top-level ``parameters`` or a chain of shared levels, highest
    precedence first (a slice's ``parameters``, then the top-level ones). A global parameter is looked
    up along that chain; a per-model one in the model's own settings, then along the chain. The first
    level whose setting resolves to a value for this tensor wins. Global filters match ``tensor_name``;
    the ``i``-th model's filters match ``model_tensor_names[i]`` (its input tensor) when given.
    """
    chain = [global_settings] if isinstance(global_settings, dict) else list(global_settings)

    def value(p: Param, levels: Sequence[Dict[str, Any]], name: str) -> Any:
        for level in levels:
            if p.name in level:
                v = resolve_setting(level[p.name], name, t, p)
                if v is not None:
                    return p.check(v, f"parameter '{p.name}' for tensor '{name}'")
        if p.required:
            raise RecipeError(f"required parameter '{p.name}' resolves to nothing for tensor '{name}'")
        return p.default

    names = list(model_tensor_names) if model_tensor_names is not None else [tensor_name] * len(per_model_settings)
    params = {p.name: value(p, chain, tensor_name) for p in method.params}
    model_params = [{p.name: value(p, [s, *chain], n) for p in method.model_params}
                    for s, n in zip(per_model_settings, names)]
    if method.validate is not None:
        method.validate(params, model_params)
    return params, model_params


def dump_recipe(recipe: Recipe) -> dict:
    """The recipe as plain data (for the manifest and the model card)."""
    return recipe.model_dump(mode="json", exclude_defaults=False)
