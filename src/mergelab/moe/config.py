"""mergekit-moe's YAML, read and checked before any tensor is touched; the output architecture chosen.

The keys and their meaning are mergekit-moe 0.1.5's (``mergekit/moe/config.py``): ``base_model``,
``experts`` (``source_model``, ``positive_prompts``, ``negative_prompts``, ``noise_scale``,
``residual_scale``), ``gate_mode``, ``dtype``, ``experts_per_token``, ``shared_experts`` and
``architecture``. mergelab adds ``seed`` (for ``random``/``uniform_random`` gates and ``noise_scale``)
and ``gate_source`` for the ``hidden*`` modes: ``residual`` (default, mergekit: the residual stream
entering each decoder layer) or ``mlp_input`` (the post-attention-norm input of each layer's MLP, what
the router sees at inference; see :mod:`mergelab.moe.gates`).

Every problem is a :class:`~mergelab.errors.RecipeError` (or :class:`~mergelab.errors.CheckpointError`
for a model) naming the field at fault, raised before the output folder is created, so nothing is
written. Output architecture, as mergekit selects it (``select_output_arch``), restricted to the
architectures transformers ships:

* ``Mixtral`` (``MixtralForCausalLM``): every input ``llama`` or ``mistral``, no shared expert;
* ``Qwen MoE`` (``Qwen2MoeForCausalLM``): every input ``llama``, ``mistral`` or ``qwen2``, exactly one
  shared expert (with prompts unless the gates are random);
* ``Qwen3 MoE`` (``Qwen3MoeForCausalLM``): every input ``qwen3``, no shared expert.

``architecture`` is matched as a case-insensitive prefix of those names (``qwen`` matches both Qwen
ones, then the inputs decide); Mixtral wins when it fits, as in mergekit. mergekit's DeepSeek MoE
output needs remote code and is refused.
"""

from __future__ import annotations

import difflib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional

import yaml

from mergelab.errors import CheckpointError, RecipeError

GATE_MODES = ("hidden", "hidden_last", "hidden_avg", "cheap_embed", "random", "uniform_random", "fitted")
RANDOM_MODES = ("random", "uniform_random")
TOP_KEYS = ("base_model", "experts", "gate_mode", "dtype", "experts_per_token", "shared_experts",
            "architecture", "seed", "gate_source")
GATE_SOURCES = ("residual", "mlp_input")
EXPERT_KEYS = ("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale")
DTYPES = {"float32": "float32", "fp32": "float32", "float": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16",
          "float16": "float16", "fp16": "float16", "half": "float16"}


@dataclass(frozen=True)
class OutputArch:
    name: str              # mergekit's name for it
    architecture: str      # transformers class
    model_type: str
    input_types: tuple     # model_type every input must have
    shared: tuple          # allowed number of shared experts


MIXTRAL = OutputArch("Mixtral", "MixtralForCausalLM", "mixtral", ("llama", "mistral"), (0,))
QWEN2_MOE = OutputArch("Qwen MoE", "Qwen2MoeForCausalLM", "qwen2_moe", ("llama", "mistral", "qwen2"), (1,))
QWEN3_MOE = OutputArch("Qwen3 MoE", "Qwen3MoeForCausalLM", "qwen3_moe", ("qwen3",), (0,))
ARCHS = (MIXTRAL, QWEN2_MOE, QWEN3_MOE)


@dataclass
class Expert:
    source_model: str
    positive_prompts: List[str] = field(default_factory=list)
    negative_prompts: List[str] = field(default_factory=list)
    noise_scale: Optional[float] = None
    residual_scale: Optional[float] = None
    where: str = "experts[0]"   # the field path, for messages


@dataclass
class MoEConfig:
    base_model: str
    experts: List[Expert]
    gate_mode: str = "hidden"
    dtype: Optional[str] = None
    experts_per_token: int = 2
    shared_experts: List[Expert] = field(default_factory=list)
    architecture: Optional[str] = None
    seed: int = 0
    gate_source: str = "residual"
    source: str = ""          # the YAML text, written next to the output
    path: Optional[Path] = None


def _unknown(key: str, allowed, where: str) -> RecipeError:
    close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
    hint = f"; did you mean '{close[0]}'?" if close else f"; expected one of {', '.join(allowed)}"
    return RecipeError(f"unknown key '{key}' in {where}{hint}")


def _model_ref(value, where: str, folder: Optional[Path]) -> str:
    if isinstance(value, dict) and set(value) <= {"model", "path"}:  # mergekit's ModelReference as a mapping
        value = value.get("model", value.get("path"))
        if isinstance(value, dict):
            value = value.get("path")
    if not isinstance(value, str) or not value.strip():
        raise RecipeError(f"{where}: expected the path of a local model folder, got {value!r}")
    if "+" in value and not Path(value).exists():
        raise RecipeError(f"{where}: '{value}' is a model+LoRA reference, which mergelab moe does not read; "
                          f"merge the adapter into the model first")
    return value


def _prompts(value, where: str) -> List[str]:
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list):
        raise RecipeError(f"{where}: expected a list of strings, got {type(value).__name__}")
    for j, p in enumerate(value):
        if not isinstance(p, str):
            raise RecipeError(f"{where}[{j}]: expected a string, got {p!r}")
        if not p.strip():
            raise RecipeError(f"{where}[{j}] is an empty prompt: every prompt needs text to route on")
    return list(value)


def _float_or_none(value, where: str) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        try:
            return float(value)
        except (TypeError, ValueError):
            raise RecipeError(f"{where}: expected a number, got {value!r}")
    return float(value)


def _expert(data, where: str, folder: Optional[Path]) -> Expert:
    if not isinstance(data, dict):
        raise RecipeError(f"{where}: expected a mapping with source_model and prompts, got {data!r}")
    for k in data:
        if k not in EXPERT_KEYS:
            raise _unknown(k, EXPERT_KEYS, where)
    if "source_model" not in data:
        raise RecipeError(f"{where}.source_model is required: the model whose MLP becomes this expert")
    return Expert(
        source_model=_model_ref(data["source_model"], f"{where}.source_model", folder),
        positive_prompts=_prompts(data.get("positive_prompts"), f"{where}.positive_prompts"),
        negative_prompts=_prompts(data.get("negative_prompts"), f"{where}.negative_prompts"),
        noise_scale=_float_or_none(data.get("noise_scale"), f"{where}.noise_scale"),
        residual_scale=_float_or_none(data.get("residual_scale"), f"{where}.residual_scale"),
        where=where,
    )


def parse(data, source: str = "", path: Optional[Path] = None) -> MoEConfig:
    """A :class:`MoEConfig` from the loaded YAML ``data``; checks that need no model files."""
    label = f"'{path}'" if path else "the MoE config"
    if not isinstance(data, dict):
        raise RecipeError(f"{label}: expected a mapping with base_model and experts")
    for k in data:
        if k not in TOP_KEYS:
            raise _unknown(k, TOP_KEYS, label)
    folder = path.parent if path else None
    gate_mode = data.get("gate_mode", "hidden")
    if gate_mode not in GATE_MODES:
        raise RecipeError(f"gate_mode: '{gate_mode}' is not a gate mode; expected one of {', '.join(GATE_MODES)}")
    if data.get("base_model") in (None, ""):
        need = {"hidden": "runs the prompts through it", "hidden_last": "runs the prompts through it",
                "hidden_avg": "runs the prompts through it", "cheap_embed": "reads its token embeddings"}
        why = f"gate_mode '{gate_mode}' {need[gate_mode]}, and " if gate_mode in need else ""
        raise RecipeError(f"base_model is required: {why}the output's attention, norms, embeddings and "
                          f"tokenizer come from it")
    experts = data.get("experts")
    if not isinstance(experts, list) or not experts:
        raise RecipeError("experts: expected a non-empty list of experts (source_model, positive_prompts)")
    shared = data.get("shared_experts") or []
    if not isinstance(shared, list):
        raise RecipeError("shared_experts: expected a list of experts")
    k = data.get("experts_per_token", 2)
    if isinstance(k, bool) or not isinstance(k, int):
        raise RecipeError(f"experts_per_token: expected an integer, got {k!r}")
    dtype = data.get("dtype")
    if dtype is not None:
        if str(dtype) not in DTYPES:
            raise RecipeError(f"dtype: '{dtype}' is not a dtype; expected float32, bfloat16 or float16")
        dtype = DTYPES[str(dtype)]
    seed = data.get("seed", 0)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise RecipeError(f"seed: expected an integer, got {seed!r}")
    gate_source = data.get("gate_source", "residual")
    if gate_source not in GATE_SOURCES:
        raise RecipeError(f"gate_source: '{gate_source}' is not a gate source; expected one of "
                          f"{', '.join(GATE_SOURCES)}")
    if "gate_source" in data and not gate_mode.startswith("hidden"):
        raise RecipeError(f"gate_source: only the hidden gate modes read hidden states; gate_mode "
                          f"'{gate_mode}' cannot honour it (remove gate_source)")
    arch = data.get("architecture")
    if arch is not None and not isinstance(arch, str):
        raise RecipeError(f"architecture: expected a name such as 'mixtral' or 'qwen', got {arch!r}")
    cfg = MoEConfig(
        base_model=_model_ref(data["base_model"], "base_model", folder),
        experts=[_expert(e, f"experts[{i}]", folder) for i, e in enumerate(experts)],
        gate_mode=gate_mode, dtype=dtype, experts_per_token=k,
        shared_experts=[_expert(e, f"shared_experts[{i}]", folder) for i, e in enumerate(shared)],
        architecture=arch, seed=seed, gate_source=gate_source, source=source, path=path,
    )
    _check(cfg)
    return cfg


def _check(cfg: MoEConfig) -> None:
    """mergekit's ``is_bad_config`` checks (identical models are checked with the model files)."""
    n = len(cfg.experts)
    if not 1 <= cfg.experts_per_token <= n:
        raise RecipeError(f"experts_per_token: {cfg.experts_per_token} is out of range; expected 1 to the number "
                          f"of experts ({n})")
    if cfg.gate_mode == "random":
        return
    for e in cfg.experts:
        if not e.positive_prompts:
            raise RecipeError(f"{e.where}.positive_prompts is empty: gate_mode '{cfg.gate_mode}' builds each "
                              f"expert's router row from its prompts (use gate_mode: random for none)")
    first = (cfg.experts[0].positive_prompts, cfg.experts[0].negative_prompts)
    if n > 1 and all((e.positive_prompts, e.negative_prompts) == first for e in cfg.experts[1:]):
        raise RecipeError("experts[*].positive_prompts: every expert has the same positive and negative prompts, "
                          "so every router row would be the same; give each expert prompts of its own task")
    if cfg.gate_mode == "fitted":
        for e in cfg.experts:
            if e.negative_prompts:
                raise RecipeError(f"{e.where}.negative_prompts: gate_mode 'fitted' fits the router on every expert's "
                                  f"positive prompts (each is the others' negative); it cannot honour negatives")
        if cfg.shared_experts:
            raise RecipeError("shared_experts: gate_mode 'fitted' fits routed experts only; a shared expert's gate "
                              "needs gate_mode hidden, cheap_embed or random")
    if cfg.shared_experts:
        with_prompts = [bool(e.positive_prompts) for e in cfg.shared_experts]
        if any(with_prompts) and not all(with_prompts):
            raise RecipeError("shared_experts[*].positive_prompts: give prompts to every shared expert or to none")


def load(path: Path) -> MoEConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise RecipeError(f"cannot read MoE config '{path}': {e.strerror or e}")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise RecipeError(f"'{path}' is not valid YAML: {e}")
    return parse(data, text, path)


def model_config(ref: str, where: str) -> dict:
    """``config.json`` of the model at ``ref`` (field ``where`` in messages)."""
    folder = Path(ref).expanduser()
    if not folder.exists():
        raise CheckpointError(f"{where}: model path '{ref}' does not exist")
    cfg = folder / "config.json"
    if not cfg.is_file():
        raise CheckpointError(f"{where}: '{ref}' has no config.json; mergelab moe needs each model's config")
    try:
        data = json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{where}: cannot read '{cfg}': {e}")
    if not isinstance(data, dict):
        raise CheckpointError(f"{where}: '{cfg}' is not a JSON object")
    return data


def select_arch(cfg: MoEConfig, types: dict) -> OutputArch:
    """The output architecture for ``cfg``; ``types`` maps each field path to its model's ``model_type``."""
    base_type = types["base_model"]
    for where, t in types.items():
        if t != base_type:
            raise RecipeError(f"{where}.source_model is a '{t}' model but base_model is '{base_type}': every "
                              f"expert must have the base's architecture")
    candidates = list(ARCHS)
    if cfg.architecture:
        candidates = [a for a in ARCHS if a.name.lower().startswith(cfg.architecture.lower())]
        if not candidates:
            raise RecipeError(f"architecture: '{cfg.architecture}' matches no output architecture; expected a "
                              f"prefix of {', '.join(repr(a.name) for a in ARCHS)}")
    n_shared = len(cfg.shared_experts)
    fits_inputs = [a for a in candidates if base_type in a.input_types]
    if not fits_inputs:
        names = ", ".join(f"{a.name} ({'/'.join(a.input_types)})" for a in candidates)
        raise RecipeError(f"base_model: '{base_type}' models cannot become {names}")
    fits = [a for a in fits_inputs if n_shared in a.shared]
    if not fits:
        holds = "; ".join(f"{a.architecture} holds {' or '.join(map(str, a.shared))}" for a in fits_inputs)
        raise RecipeError(f"shared_experts: {n_shared} given, but the output for '{base_type}' inputs cannot hold "
                          f"that many ({holds})")
    arch = fits[0]
    if arch is QWEN2_MOE and cfg.gate_mode not in ("random",) and not cfg.shared_experts[0].positive_prompts:
        raise RecipeError("shared_experts[0].positive_prompts is empty: Qwen2MoeForCausalLM's shared expert has a "
                          "gate of its own, built from its prompts (as in mergekit-moe)")
    return arch
