"""The method registry: what every merge method needs, takes and means.

A method is a small pure function ``merge(inputs: TensorInputs) -> Tensor`` that knows nothing about
files, devices or progress. It is registered with a :class:`MergeMethod` that says how it uses the
base model, how many models it takes, its parameters (type, default, range, one-line meaning), whether
the engine may split a tensor into row chunks for it, and the statistics it needs before merging:

* ``prepare_tensor(source)``: per-tensor statistics (a top-k threshold, a norm) computed from a
  re-iterable stream of row chunks of that tensor, so huge tensors never need to be whole in memory.
* ``prepare_model(scope)``: whole-model statistics (TIES' global trim threshold, a global sign
  majority) computed from a stream over every tensor the method merges.

The registry is what ``mergelab methods`` prints and what the recipe validator checks.
"""

from __future__ import annotations

import math
import difflib
import enum
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterator, Optional, Sequence, Tuple

import numpy as np
import torch

from mergelab.errors import RecipeError
from mergelab.methods.randomness import stream_seed, stream_words


class _Required:
    def __repr__(self) -> str:
        return "REQUIRED"


REQUIRED: Any = _Required()


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its type, default, allowed values and meaning.

    ``low``/``high`` bound numbers (inclusive unless ``low_open``/``high_open``); ``choices`` lists the
    allowed strings. ``per_layer=False`` forbids gradients and filters (the value must be one scalar
    for the whole model, e.g. a density used for a whole-model trim).
    """

    name: str
    kind: type
    meaning: str
    default: Any = REQUIRED
    low: Optional[float] = None
    high: Optional[float] = None
    low_open: bool = False
    high_open: bool = False
    choices: Optional[tuple] = None
    per_layer: bool = True

    @property
    def required(self) -> bool:
        return self.default is REQUIRED

    def allowed(self) -> str:
        """Human-readable description of the allowed values."""
        if self.choices is not None:
            return "one of " + ", ".join(repr(c) for c in self.choices)
        if self.kind is bool:
            return "true or false"
        kind = {float: "a number", int: "an integer", str: "a string"}.get(self.kind, self.kind.__name__)
        if self.low is None and self.high is None:
            return kind
        lo = "" if self.low is None else f"{'>' if self.low_open else '>='} {self.low:g}"
        hi = "" if self.high is None else f"{'<' if self.high_open else '<='} {self.high:g}"
        return f"{kind} " + " and ".join(x for x in (lo, hi) if x)

    def check(self, value: Any, where: str) -> Any:
        """Return ``value`` coerced to this parameter's type, or raise :class:`RecipeError`."""
        bad = RecipeError(f"{where}: parameter '{self.name}' = {value!r} is invalid; expected {self.allowed()}")
        if self.kind is bool:
            if not isinstance(value, bool):
                raise bad
            return value
        if self.kind is str:
            if not isinstance(value, str) or (self.choices is not None and value not in self.choices):
                raise bad
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise bad
        if self.kind is int:
            if not math.isfinite(value) or float(value) != int(value):
                raise bad
            value = int(value)
        else:
            value = float(value)
        if value != value:  # NaN
            raise bad
        if self.low is not None and (value < self.low or (self.low_open and value == self.low)):
            raise bad
        if self.high is not None and (value > self.high or (self.high_open and value == self.high)):
            raise bad
        return value


class BaseUse(str, enum.Enum):
    """How a method uses ``base_model``."""

    REQUIRED = "required"  # task-vector methods: base passed separately, deltas taken against it
    OPTIONAL = "optional"  # works on deltas when a base is given, on raw weights otherwise
    INPUT = "input"  # no special role: the base is one more weighted input when listed in models
    IGNORED = "ignored"  # the base, if any, is not used by the math


# Chunk size of element-wise methods without per-tensor statistics (``MergeMethod.stream_elements``):
# 512K float32 entries (2 MB) per input, so a task-arithmetic chunk's inputs and temporaries stay in a
# laptop's L2/L3 caches between its passes. Measured on a 160M-parameter merge: 25% less merge time
# than whole tensors (up to 16 MB per input); 256K or 1M chunks lie in between.
STREAM_ELEMENTS = 1 << 19
RANDOM_BLOCK = 1 << 20  # random words drawn per block by the tensor code


def keep_limit(keep_prob: float) -> int:
    """The uint32 word below which an entry is kept with probability ``keep_prob`` (exactly
    ``floor(keep_prob * 2**32) / 2**32``); ``2**32``, above every word, for ``keep_prob >= 1``."""
    return 1 << 32 if keep_prob >= 1 else max(0, math.floor(keep_prob * 2.0 ** 32))


@dataclass
class TensorInputs:
    """Everything a method sees for one output tensor, or one row chunk of it.

    Tensors are float32 on the compute device (for a method with ``raw_inputs``, on a CPU, inputs
    stored in bfloat16 stay bfloat16: see :meth:`as_float32`). ``base`` is ``None`` when the method
    has no base.
    ``rows`` is the ``[start, stop)`` range of dimension 0 this chunk covers (the whole tensor when it
    is not chunked); ``shape`` is the full tensor's shape.
    """

    name: str
    shape: tuple
    base: Optional[torch.Tensor]
    models: list
    params: dict
    model_params: list
    seed: int = 0
    chunk: int = 0
    rows: tuple = (0, 0)
    layer: Optional[int] = None
    num_layers: Optional[int] = None
    tensor_stats: Any = None
    model_stats: Any = None
    aux: dict = field(default_factory=dict)
    # The dtype the output is written in, where a method may return its result already cast to it
    # (rounded to nearest even, as Tensor.to does; CPU merges without post-steps), else None: float32.
    out_dtype: Optional[torch.dtype] = None

    def model_param(self, name: str) -> list:
        """The per-model parameter ``name`` as a list, one value per model."""
        return [p[name] for p in self.model_params]

    def as_float32(self) -> "TensorInputs":
        """These inputs with every tensor in float32 (itself if they are): for the tensor code of a
        method with ``raw_inputs``, which may be given bfloat16 tensors as they are stored."""
        tensors = ([self.base] if self.base is not None else []) + list(self.models)
        if all(t.dtype == torch.float32 for t in tensors):
            return self
        f32 = lambda t: t if t.dtype == torch.float32 else t.to(torch.float32)  # noqa: E731
        return replace(self, base=None if self.base is None else f32(self.base), models=[f32(m) for m in self.models])

    def stream_key(self, model_index: int, purpose: str) -> int:
        """The key of model ``model_index``'s random stream for ``purpose`` in this chunk (see
        :mod:`mergelab.methods.randomness`)."""
        return stream_seed(self.seed, self.name, self.chunk, model_index, purpose)

    def random_bits(self, model_index: int, purpose: str = "") -> Iterator[Tuple[int, np.ndarray]]:
        """Independent uniform 32-bit integers, one per entry of this chunk (in flat order), as
        ``(offset, block)`` pairs of at most ``RANDOM_BLOCK`` values, so that no full-size integer
        buffer is ever held: words ``0 .. numel - 1`` of the stream keyed by (seed, tensor name,
        chunk, model, purpose), the same numbers on every device and thread, and the numbers the
        fused CPU kernels draw for themselves."""
        n = math.prod(self.models[model_index].shape)
        key = self.stream_key(model_index, purpose)
        for start in range(0, n, RANDOM_BLOCK):
            yield start, stream_words(key, start, min(RANDOM_BLOCK, n - start))

    def _fill(self, model_index: int, purpose: str, block_fn) -> torch.Tensor:
        like = self.models[model_index]
        out = np.empty(math.prod(like.shape), dtype=np.float32)
        for start, bits in self.random_bits(model_index, purpose):
            block_fn(bits, out[start:start + bits.size])
        return torch.from_numpy(out).reshape(like.shape).to(device=like.device, dtype=like.dtype)

    def rand(self, model_index: int, purpose: str = "") -> torch.Tensor:
        """Uniform numbers on the grid ``{j / 2**24}`` of [0, 1), shaped like this chunk (float32,
        on the models' device); the top 24 bits of :meth:`random_bits`."""

        def block(bits, out):
            np.multiply(bits >> np.uint32(8), np.float32(2.0 ** -24), out=out, casting="unsafe")

        return self._fill(model_index, purpose, block)

    def keep_mask(self, model_index: int, keep_prob: float, purpose: str = "") -> torch.Tensor:
        """A float32 mask shaped like this chunk: each entry is 1 with probability ``keep_prob``
        (exactly ``floor(keep_prob * 2**32) / 2**32``), independently, else 0 (Bernoulli draws for
        DARE-style dropping). ``keep_prob >= 1`` keeps everything."""
        like = self.models[model_index]
        if keep_prob >= 1:
            return torch.ones_like(like)
        threshold = np.uint32(keep_limit(keep_prob))

        def block(bits, out):
            np.less(bits, threshold, out=out, casting="unsafe")

        return self._fill(model_index, purpose, block)


class _ChunkStream:
    """What :class:`TensorSource` and :class:`ModelScope` share: a re-iterable stream ``_chunks``."""

    def chunks(self) -> Iterator[TensorInputs]:
        return self._chunks()

    def as_float32(self):
        """The same stream with every chunk's tensors in float32 (see :meth:`TensorInputs.as_float32`)."""
        inner = self._chunks
        return replace(self, _chunks=lambda: (c.as_float32() for c in inner()))


@dataclass
class TensorSource(_ChunkStream):
    """A re-iterable stream of the row chunks of one tensor, for ``prepare_tensor``.

    ``chunks()`` may be called several times (multi-pass statistics). Each call yields
    :class:`TensorInputs` without statistics. ``numel`` and ``shape`` describe the whole tensor.
    """

    name: str
    shape: tuple
    params: dict
    model_params: list
    num_models: int
    num_chunks: int
    _chunks: Callable[[], Iterator[TensorInputs]]

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


@dataclass
class ModelScope(_ChunkStream):
    """A re-iterable stream over every chunk of every tensor a method merges, for ``prepare_model``.

    ``params`` are the method's global parameters; per-model parameters that must hold for the whole
    model (``per_layer=False``) are in ``model_params``.
    """

    params: dict
    model_params: list
    num_models: int
    _chunks: Callable[[], Iterator[TensorInputs]]


@dataclass(frozen=True)
class MergeMethod:
    """A registered merge method. See the module docstring for the contract.

    ``aux_inputs`` names per-model string parameters whose value is a path to a checkpoint holding
    tensors named like the model's (e.g. Adam second moments for OTA). The engine reads the tensor of
    the same name from it and passes the list (one per model, float32) as ``inputs.aux[param]``.
    ``validate(params, model_params)`` gets the resolved parameters of one tensor and raises
    :class:`RecipeError` for combinations the per-parameter checks cannot see. ``report(inputs)``, if
    given, says what the method did to a tensor (e.g. the rank TSV-M kept); the engine stores it in the
    manifest under ``reports``. ``whole_elements``, if set, lowers the engine's size up to which a
    chunkable tensor is computed whole: for methods whose streamed path (``prepare_tensor`` plus one
    pass per chunk) is cheaper than their whole-tensor one, e.g. Karcher's iterations on the Gram matrix.
    ``propagates_nonfinite`` says every input entry reaches the output through arithmetic that keeps
    NaN and inf (a weighted sum: ``0 * nan`` is ``nan``), so the engine checks the output for NaN/inf
    instead of every input, and names the input only when the output fails. ``warm_up(num_models)``,
    if given, is called when a CPU merge starts, to begin one-off preparation in the background
    (loading compiled kernels) while the first tensors are read. ``stream_elements``, for an
    element-wise method without per-tensor statistics (chunking cannot change its result), makes the
    engine stream every matrix in chunks of about that many elements, small enough for the CPU caches
    (see :func:`mergelab.plan.chunking`). ``raw_inputs`` says the method's CPU kernels take inputs
    stored in bfloat16 as they are (widening them exactly, as the float32 conversion would): the
    engine then skips that conversion on a CPU, and the method's other paths call
    :meth:`TensorInputs.as_float32` (or :meth:`TensorSource.as_float32`) first; such a method is
    also told the output dtype (:attr:`TensorInputs.out_dtype`) and may return its result in it.
    """

    name: str
    summary: str
    reference: str
    merge: Callable[[TensorInputs], torch.Tensor]
    base: BaseUse
    params: tuple = ()
    model_params: tuple = ()
    min_models: int = 1
    max_models: Optional[int] = None
    chunkable: bool = False
    prepare_tensor: Optional[Callable[[TensorSource], Any]] = None
    prepare_model: Optional[Callable[[ModelScope], Any]] = None
    validate: Optional[Callable[[dict, list], None]] = None
    aux_inputs: tuple = ()
    report: Optional[Callable[[TensorInputs], dict]] = None
    notes: str = ""
    family: str = ""
    whole_elements: Optional[int] = None
    propagates_nonfinite: bool = False
    warm_up: Optional[Callable[[int], None]] = None
    raw_inputs: bool = False
    stream_elements: Optional[int] = None
    # Parameter names of the method's reference that mergelab does not implement: a recipe that sets
    # one is refused, never ignored as another method's parameter would be (see mergelab.recipe).
    unsupported: tuple = ()

    def param(self, name: str) -> Optional[Param]:
        for p in self.params:
            if p.name == name:
                return p
        return None

    def model_param(self, name: str) -> Optional[Param]:
        for p in self.model_params:
            if p.name == name:
                return p
        return None


@dataclass(frozen=True)
class PostStep:
    """A transform applied to the merged task vector of any task-vector method (e.g. LiNeS).

    ``apply(inputs, merged_delta) -> delta`` sees the same :class:`TensorInputs` as the method (layer
    index and layer count included) and the method's merged delta ``merged - base``. A recipe lists
    post-steps under ``post:`` in order; they need a base model. ``prepare_model(scope)`` computes
    whole-model statistics of the merged task vector: each chunk of the scope carries the merged delta
    (after the earlier post-steps) as ``aux["merged_delta"]``; the result reaches ``apply`` as
    ``inputs.model_stats``.
    """

    name: str
    summary: str
    reference: str
    apply: Callable[[TensorInputs, torch.Tensor], torch.Tensor]
    params: tuple = ()
    chunkable: bool = True
    prepare_model: Optional[Callable[[ModelScope], Any]] = None

    def param(self, name: str) -> Optional[Param]:
        for p in self.params:
            if p.name == name:
                return p
        return None


_REGISTRY: dict = {}
_POST_STEPS: dict = {}


def register_post_step(step: PostStep) -> PostStep:
    """Add a post-step to the registry (names are unique)."""
    if step.name in _POST_STEPS:
        raise ValueError(f"post-step {step.name!r} is registered twice")
    _POST_STEPS[step.name] = step
    return step


def get_post_step(name: str) -> PostStep:
    """The post-step called ``name``; unknown names raise :class:`RecipeError` with a suggestion."""
    _load_builtin_methods()
    if name not in _POST_STEPS:
        _load_all_methods()
    if name in _POST_STEPS:
        return _POST_STEPS[name]
    close = difflib.get_close_matches(name, list(_POST_STEPS), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RecipeError(f"post: unknown post-step '{name}'{hint}; known: {', '.join(sorted(_POST_STEPS)) or 'none'}")


def all_post_steps() -> Sequence[PostStep]:
    _load_all_methods()
    return [_POST_STEPS[n] for n in sorted(_POST_STEPS)]


def register(method: MergeMethod) -> MergeMethod:
    """Add ``method`` to the registry (names are unique)."""
    if method.name in _REGISTRY:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    names = [p.name for p in method.params] + [p.name for p in method.model_params]
    if len(set(names)) != len(names):
        raise ValueError(f"merge method {method.name!r} declares a parameter twice")
    _REGISTRY[method.name] = method
    return method


def _load_builtin_methods() -> None:
    import mergelab.methods  # noqa: F401  (importing the package registers every family)


def _load_all_methods() -> None:
    """Built-in methods and third-party plugins."""
    import mergelab.methods

    mergelab.methods.load_plugins()


def get_method(name: str) -> MergeMethod:
    """The method called ``name``; unknown names raise :class:`RecipeError` with a suggestion."""
    _load_builtin_methods()
    if name not in _REGISTRY:
        _load_all_methods()
    if name in _REGISTRY:
        return _REGISTRY[name]
    close = difflib.get_close_matches(name.replace("-", "_"), list(_REGISTRY), n=1, cutoff=0.5)
    hint = f" (did you mean '{close[0]}'?)" if close else ""
    raise RecipeError(
        f"merge_method: unknown method '{name}'{hint}; run `mergelab methods` to list them. "
        f"Known: {', '.join(sorted(_REGISTRY))}"
    )


def available_methods() -> list:
    """Names of every registered method, sorted."""
    _load_all_methods()
    return sorted(_REGISTRY)


def all_methods() -> Sequence[MergeMethod]:
    _load_all_methods()
    return [_REGISTRY[n] for n in sorted(_REGISTRY)]


def methods_defining(name: str) -> list:
    """Sorted names of the registered methods that define a parameter ``name`` (globally or per
    model); empty if none does. A recipe may carry such a name on a method that does not use it
    (mergekit ignores it); a name no method defines is a typo. Plugins are loaded only when no
    built-in method defines the name (see :func:`get_method`)."""
    _load_builtin_methods()
    found = _defining(name)
    if not found:
        _load_all_methods()
        found = _defining(name)
    return found


def _defining(name: str) -> list:
    return sorted(m.name for m in _REGISTRY.values()
                  if m.param(name) is not None or m.model_param(name) is not None)


def all_parameter_names() -> list:
    """Every parameter name that some registered method (plugins included) defines, sorted."""
    return sorted({p.name for m in all_methods() for p in tuple(m.params) + tuple(m.model_params)})


def describe(method: MergeMethod) -> dict:
    """A plain description of ``method`` for ``mergelab methods --json`` and the docs."""

    def row(p: Param) -> dict:
        return {
            "name": p.name,
            "default": None if p.required else p.default,
            "required": p.required,
            "allowed": p.allowed(),
            "meaning": p.meaning,
        }

    return {
        "name": method.name,
        "family": method.family,
        "summary": method.summary,
        "reference": method.reference,
        "base_model": method.base.value,
        "models": {"min": method.min_models, "max": method.max_models},
        "parameters": [row(p) for p in method.params],
        "per_model_parameters": [row(p) for p in method.model_params],
        "notes": method.notes,
    }

