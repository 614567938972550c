"""PEFT LoRA adapter folders: reading (validated) and writing (atomic). The one home of the format.

A PEFT LoRA folder holds ``adapter_config.json`` (a serialised ``peft.LoraConfig``) and
``adapter_model.safetensors`` (or the legacy ``adapter_model.bin``, loaded with ``weights_only``).
Factor keys are ``base_model.model.<M>.lora_A.weight`` (r x in) and ``...lora_B.weight`` (out x r) for a
linear module ``M`` (embeddings: ``<M>.lora_embedding_A`` (r x V) / ``lora_embedding_B`` (d x r), no
``.weight``). The adapted weight is (Hu et al., LoRA, arXiv 2106.09685; PEFT ``tuners/lora/layer.py``)::

    W' = W + s * B @ A        (transposed for embeddings and fan_in_fan_out modules)
    s  = alpha_M / r_M        (rsLoRA, arXiv 2312.03732: alpha_M / sqrt(r_M))

``r_M`` / ``alpha_M`` come from ``rank_pattern`` / ``alpha_pattern`` as PEFT resolves them: the first
key (in the file's order) with ``re.match(rf"(.*\\.)?({key})$", M)`` wins, else ``r`` / ``lora_alpha``.
The rank stored in the file must equal ``r_M``.

Refused (:class:`~mergelab.errors.CheckpointError`, naming the file and the field): a ``peft_type``
other than ``LORA``; ``use_dora`` (DoRA's update is not additive); ``lora_bias``; ``layer_replication``,
aLoRA, ``target_parameters``, ``trainable_token_indices`` and the other LoRA variants; adapters whose
initialisation changed the base (``init_lora_weights`` pissa/olora/corda/loftq, unless converted);
factor ranks that disagree with each other or with the config; keys that are neither factors nor
saved full tensors.

``modules_to_save`` (and ``bias: all / lora_only``) are **taken**: their saved tensors
(``base_model.model.<M>.weight``, any ``.base_layer`` segment dropped) replace the base's tensors
whole, as PEFT does when it loads them; they are in :attr:`LoraAdapter.full`. Merges that stay
adapters refuse them (they cannot be written as factors).

API::

    read_lora(folder) -> LoraAdapter          # .modules: {M: LoraModule(A, B, scale, ...)}, .full, .config
    write_lora(folder, {M: (A, B)}, alphas={M: alpha}, base_model=..., full={"lm_head.weight": W})  # atomic
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, Mapping, Optional, Tuple, Union

import torch

from mergelab.errors import CheckpointError, OutputError

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."

# Config fields of LoRA variants mergelab does not implement: refused when set (truthy).
_VARIANT_FIELDS = (
    "use_dora", "lora_bias", "layer_replication", "alora_invocation_tokens", "target_parameters",
    "trainable_token_indices", "kasa_config", "use_qalora", "use_bdlora", "arrow_config", "velora_config",
    "monteclora_config", "megatron_config",
)
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq")
_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_A|lora_B)\.weight$")
_EMBED_FACTOR = re.compile(r"^(?P<module>.+)\.(?P<kind>lora_embedding_A|lora_embedding_B)$")


@dataclass
class LoraModule:
    """One adapted module: ``delta = scale * B @ A`` (transposed when ``transposed``)."""

    name: str  # module path in the Hugging Face model, e.g. "model.layers.0.self_attn.q_proj"
    A: torch.Tensor  # (r, in)
    B: torch.Tensor  # (out, r)
    rank: int
    alpha: float
    scale: float
    transposed: bool = False  # embedding (lora_embedding_*) or fan_in_fan_out: delta is (B @ A).T
    embedding: bool = False  # stored as lora_embedding_A / lora_embedding_B

    @property
    def weight_name(self) -> str:
        return f"{self.name}.weight"

    @property
    def delta_shape(self) -> tuple:
        """Shape of the base weight this module adapts."""
        out, inn = self.B.shape[0], self.A.shape[1]
        return (inn, out) if self.transposed else (out, inn)

    def delta(self, rows: Optional[tuple] = None, dtype: torch.dtype = torch.float32,
              device: str = "cpu") -> torch.Tensor:
        """``scale * B @ A`` in the base weight's orientation (rows ``[start, stop)`` only if given),
        formed in float32 (or ``dtype`` if wider) on ``device``."""
        work = torch.float64 if dtype == torch.float64 else torch.float32
        A = self.A.to(device=device, dtype=work)
        B = self.B.to(device=device, dtype=work)
        if self.transposed:  # delta = (B @ A).T = A.T @ B.T; rows of it are columns of A
            At = A.t()
            if rows is not None:
                At = At[rows[0]:rows[1]]
            return (At @ B.t()) * self.scale
        if rows is not None:
            B = B[rows[0]:rows[1]]
        return (B @ A) * self.scale


@dataclass
class LoraAdapter:
    """A validated PEFT LoRA adapter. ``modules`` maps module path -> :class:`LoraModule`; ``full`` maps
    base tensor name -> a saved tensor that replaces it (``modules_to_save``, ``bias``)."""

    folder: Path
    config: dict
    modules: Dict[str, LoraModule]
    full: Dict[str, torch.Tensor] = field(default_factory=dict)
    weights_file: Optional[Path] = None

    @property
    def base_model(self) -> Optional[str]:
        return self.config.get("base_model_name_or_path")

    def by_weight(self) -> Dict[str, LoraModule]:
        """The modules keyed by the base tensor they adapt (``M.weight``)."""
        return {m.weight_name: m for m in self.modules.values()}

    def fingerprint(self) -> dict:
        files = [self.folder / CONFIG_NAME] + ([self.weights_file] if self.weights_file else [])
        return {
            "adapter": str(self.folder.resolve()),
            "files": [{"name": f.name, "bytes": f.stat().st_size,
                       "sha256": hashlib.sha256(f.read_bytes()).hexdigest()} for f in files],
        }


# --------------------------------------------------------------------------- reading
def is_adapter_folder(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a folder holding ``adapter_config.json``."""
    p = Path(os.path.expanduser(str(path)))
    return p.is_dir() and (p / CONFIG_NAME).is_file()


def pattern_value(pattern: Mapping[str, object], module: str):
    """PEFT's ``get_pattern_key`` resolution: the value of the first key (dict order) that matches
    ``module`` as ``(.*\\.)?(key)$`` from its start, or None."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return None


def scaling(alpha: float, rank: int, rslora: bool) -> float:
    """PEFT's LoRA scaling: ``alpha / r``, or ``alpha / sqrt(r)`` with rsLoRA."""
    return alpha / math.sqrt(rank) if rslora else alpha / rank


def _read_config(folder: Path) -> dict:
    path = folder / CONFIG_NAME
    if not path.is_file():
        raise CheckpointError(f"'{folder}' is not a PEFT adapter folder: '{CONFIG_NAME}' is missing")
    try:
        cfg = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"'{path}' is not valid JSON: {e}")
    if not isinstance(cfg, dict):
        raise CheckpointError(f"'{path}' must hold a JSON object (a LoraConfig), not a {type(cfg).__name__}")
    return cfg


def _check_config(path: Path, cfg: dict) -> None:
    ptype = cfg.get("peft_type", "LORA")
    if str(ptype).upper() != "LORA":
        raise CheckpointError(f"'{path}': field 'peft_type' is '{ptype}'; mergelab reads LoRA adapters only (LORA)")
    for key in _VARIANT_FIELDS:
        if cfg.get(key):
            what = {"use_dora": "DoRA (its weight-normalised update is not W + s*B@A)",
                    "lora_bias": "a bias on lora_B"}.get(key, "a LoRA variant")
            raise CheckpointError(f"'{path}': field '{key}' is set ({cfg[key]!r}): {what} is not supported by "
                                  f"mergelab; only plain LoRA (and rsLoRA) adapters are")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise CheckpointError(f"'{path}': field 'init_lora_weights' is '{init}': such an adapter is relative to a "
                              f"modified base; save it converted (PEFT path_initial_model_for_weight_conversion)")
    for key in ("r", "lora_alpha"):
        v = cfg.get(key, 8)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise CheckpointError(f"'{path}': field '{key}' must be a positive number, got {v!r}")
    for key in ("rank_pattern", "alpha_pattern"):
        v = cfg.get(key) or {}
        if not isinstance(v, dict):
            raise CheckpointError(f"'{path}': field '{key}' must be a mapping of module pattern -> number")


def _load_weights(folder: Path) -> Tuple[Path, Dict[str, torch.Tensor]]:
    st, binf = folder / WEIGHTS_NAME, folder / LEGACY_WEIGHTS_NAME
    if st.is_file():
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return st, load_file(str(st))
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointError(f"'{st}' is not a valid safetensors file (truncated or corrupt?): {e}")
    if binf.is_file():
        try:
            state = torch.load(str(binf), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"cannot load '{binf}' with weights_only=True (corrupt or unsafe pickle?): {e}")
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"'{binf}' does not hold a flat state dict of tensors")
        return binf, state
    raise CheckpointError(f"no adapter weights in '{folder}': expected '{WEIGHTS_NAME}' or '{LEGACY_WEIGHTS_NAME}'")


def read_lora(folder: Union[str, Path]) -> LoraAdapter:
    """Read and validate the PEFT LoRA adapter in ``folder`` (see the module docstring)."""
    folder = Path(os.path.expanduser(str(folder)))
    if not folder.is_dir():
        raise CheckpointError(f"adapter folder '{folder}' does not exist")
    cfg_path = folder / CONFIG_NAME
    cfg = _read_config(folder)
    _check_config(cfg_path, cfg)
    wfile, state = _load_weights(folder)
    r0, a0 = cfg.get("r", 8), cfg.get("lora_alpha", 8)
    rslora = bool(cfg.get("use_rslora", False))
    rank_pattern, alpha_pattern = cfg.get("rank_pattern") or {}, cfg.get("alpha_pattern") or {}
    fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
    takes_full = bool(cfg.get("modules_to_save")) or cfg.get("bias", "none") not in ("none", None)
    factors: Dict[str, Dict[str, torch.Tensor]] = {}
    embed: set = set()
    full: Dict[str, torch.Tensor] = {}
    for key, t in state.items():
        if not key.startswith(PREFIX):
            raise CheckpointError(f"'{wfile}': key '{key}' does not start with '{PREFIX}' (not a PEFT LoRA file)")
        name = key[len(PREFIX):]
        m = _FACTOR.match(name) or _EMBED_FACTOR.match(name)
        if m:
            module = m.group("module").replace(".base_layer", "")
            kind = m.group("kind")
            if kind.startswith("lora_embedding"):
                embed.add(module)
            factors.setdefault(module, {})[kind[-1]] = t
            continue
        if name.endswith("lora_B.bias"):
            raise CheckpointError(f"'{wfile}': key '{key}' is a lora_B bias; field 'lora_bias' adapters are not "
                                  f"supported")
        if "lora_magnitude_vector" in name:
            raise CheckpointError(f"'{wfile}': key '{key}' is a DoRA magnitude (field 'use_dora'); not supported")
        tname = name.replace(".base_layer.", ".").replace(".modules_to_save.default.", ".")
        if takes_full or tname.endswith(("embed_tokens.weight", "lm_head.weight")):
            full[tname] = t
            continue
        raise CheckpointError(f"'{wfile}': key '{key}' is neither a LoRA factor nor a saved module (config "
                              f"'{cfg_path.name}' has no 'modules_to_save' or 'bias'); not a plain LoRA adapter")
    modules: Dict[str, LoraModule] = {}
    targets = cfg.get("target_modules")
    for module, ab in sorted(factors.items()):
        if not _targeted(targets, module):
            raise CheckpointError(f"'{wfile}': module '{module}' has LoRA factors but is not among the targets of "
                                  f"'{cfg_path.name}' field 'target_modules' ({targets!r})")
        if set(ab) != {"A", "B"}:
            missing = ({"A", "B"} - set(ab)).pop()
            raise CheckpointError(f"'{wfile}': module '{module}' has no lora_{missing} factor")
        A, B = ab["A"], ab["B"]
        if A.dim() != 2 or B.dim() != 2:
            raise CheckpointError(f"'{wfile}': module '{module}' has factors of shapes {tuple(A.shape)} and "
                                  f"{tuple(B.shape)}; only 2-D (Linear, Embedding) LoRA factors are supported")
        if A.shape[0] != B.shape[1]:
            raise CheckpointError(f"'{wfile}': rank mismatch in module '{module}': lora_A has {A.shape[0]} rows but "
                                  f"lora_B has {B.shape[1]} columns (expected equal ranks)")
        r = pattern_value(rank_pattern, module)
        r = r0 if r is None else r
        if A.shape[0] != r:
            raise CheckpointError(f"'{wfile}': rank mismatch in module '{module}': its factors have rank "
                                  f"{A.shape[0]} but '{cfg_path.name}' gives r={r} (fields 'r' / 'rank_pattern')")
        alpha = pattern_value(alpha_pattern, module)
        alpha = a0 if alpha is None else alpha
        if not A.dtype.is_floating_point or not B.dtype.is_floating_point:
            raise CheckpointError(f"'{wfile}': factors of module '{module}' are not floating point")
        modules[module] = LoraModule(module, A, B, int(r), float(alpha), scaling(alpha, r, rslora),
                                     transposed=module in embed or fan_in_fan_out, embedding=module in embed)
    if not modules and not full:
        raise CheckpointError(f"'{wfile}' holds no LoRA factors")
    return LoraAdapter(folder, cfg, modules, full, wfile)


def _targeted(targets, module: str) -> bool:
    """Whether PEFT's ``target_modules`` selects ``module``: a string is a regex matched in full, a list
    names modules exactly or by suffix (``"." + name``); None and ``"all-linear"`` are not checked."""
    if targets is None or targets == "all-linear" or targets == ["all-linear"]:
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith("." + t) for t in targets)


def recorded_base_mismatch(adapter: LoraAdapter, base: Union[str, Path]) -> Optional[str]:
    """A message if the adapter records a local ``base_model_name_or_path`` other than ``base``, else
    None. A recorded hub id (not a local path) cannot be compared and is accepted."""
    rec = adapter.base_model
    if not rec:
        return None
    rec_path = Path(os.path.expanduser(rec))
    looks_local = rec_path.is_absolute() or rec.startswith((".", "~")) or rec_path.exists()
    if not looks_local or rec_path.resolve() == Path(os.path.expanduser(str(base))).resolve():
        return None
    return (f"adapter '{adapter.folder}' was trained on another base: '{adapter.folder / CONFIG_NAME}' field "
            f"'base_model_name_or_path' is '{rec}', but the base here is '{base}'. Give that base, or fix the field "
            f"if the two are the same model")


# --------------------------------------------------------------------------- writing
def write_lora(
    folder: Union[str, Path],
    modules: Mapping[str, Tuple[torch.Tensor, torch.Tensor]],
    *,
    alphas: Optional[Mapping[str, float]] = None,
    base_model: Optional[str] = None,
    embeddings: Iterable[str] = (),
    dtype: Optional[torch.dtype] = None,
    overwrite: bool = False,
    extra_config: Optional[dict] = None,
    extra_files: Optional[Mapping[str, str]] = None,
    full: Optional[Mapping[str, torch.Tensor]] = None,
    extra_tensors: Optional[Mapping[str, torch.Tensor]] = None,
) -> Path:
    """Write a PEFT LoRA folder that ``peft.PeftModel.from_pretrained`` loads, atomically.

    ``modules`` maps a module path (``model.layers.0.self_attn.q_proj``) to its factors ``(A, B)``,
    A (r x in), B (out x r); per-module ranks may differ. ``alphas`` gives alpha per module (default:
    alpha = r, so the scaling is 1 and the delta is exactly ``B @ A``). The config gets
    ``r = lora_alpha`` = the largest rank, ``rank_pattern`` / ``alpha_pattern`` for every module whose
    rank / alpha differs, ``target_modules`` = the module paths (exact), ``use_rslora = false``.
    ``embeddings`` names modules stored as ``lora_embedding_A/B`` (delta = (B @ A).T). ``dtype`` casts
    the factors (default: as given). ``extra_files`` are written too (name -> text). ``full`` maps base
    tensor names (``lm_head.weight``) to tensors saved whole, which replace the base's when loaded: their
    modules go to ``modules_to_save`` (PEFT's way of keeping a module dense in an adapter).
    ``extra_tensors`` (low level)
    are saved under ``base_model.model.<key>`` exactly as given (e.g. a biased module's ``base_layer.bias``
    or a tied head's factors); the caller sets the matching config fields through ``extra_config``.

    Everything goes to a temporary folder next to ``folder``, renamed over it at the end: on any error
    nothing is left at ``folder``. An existing ``folder`` is refused unless ``overwrite``.
    """
    folder = Path(folder)
    if not modules and not full:
        raise OutputError(f"cannot write adapter '{folder}': no modules")
    if folder.exists() and not overwrite:
        raise OutputError(f"output '{folder}' already exists; pass --overwrite to replace it")
    embeddings = set(embeddings)
    state: Dict[str, torch.Tensor] = {}
    ranks: Dict[str, int] = {}
    alpha_of: Dict[str, float] = {}
    for name, (A, B) in modules.items():
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1] or A.shape[0] < 1:
            raise OutputError(f"cannot write adapter '{folder}': module '{name}' has factors of shapes "
                              f"{tuple(A.shape)}, {tuple(B.shape)}; expected A (r, in), B (out, r), r >= 1")
        ranks[name] = int(A.shape[0])
        alpha_of[name] = float((alphas or {}).get(name, A.shape[0]))
        a_key, b_key = (("lora_embedding_A", "lora_embedding_B") if name in embeddings
                        else ("lora_A.weight", "lora_B.weight"))
        state[f"{PREFIX}{name}.{a_key}"] = (A.to(dtype) if dtype else A).detach().cpu().contiguous()
        state[f"{PREFIX}{name}.{b_key}"] = (B.to(dtype) if dtype else B).detach().cpu().contiguous()
    saved = sorted({n.rsplit(".", 1)[0] for n in (full or {})})
    for name, t in (full or {}).items():
        if name.rsplit(".", 1)[0] in modules:
            raise OutputError(f"cannot write adapter '{folder}': '{name}' is both saved whole and given LoRA factors")
        state[f"{PREFIX}{name}"] = (t.to(dtype) if dtype else t).detach().cpu().contiguous()
    for key, t in (extra_tensors or {}).items():
        if f"{PREFIX}{key}" in state:
            raise OutputError(f"cannot write adapter '{folder}': extra tensor '{key}' collides with another tensor")
        state[f"{PREFIX}{key}"] = t.detach().cpu().contiguous()
    r = max(ranks.values(), default=1)
    alpha_default = float(r)
    if alphas is not None:  # the most common alpha among the modules of rank r, else r
        top = [alpha_of[n] for n in ranks if ranks[n] == r]
        alpha_default = max(set(top), key=top.count)
    cfg = {
        "peft_type": "LORA", "task_type": None, "base_model_name_or_path": base_model,
        "r": r, "lora_alpha": _num(alpha_default),
        "rank_pattern": {n: k for n, k in ranks.items() if k != r},
        "alpha_pattern": {n: _num(a) for n, a in alpha_of.items() if a != alpha_default},
        "target_modules": sorted(modules), "use_rslora": False, "use_dora": False, "lora_bias": False,
        "lora_dropout": 0.0, "bias": "none", "fan_in_fan_out": False, "modules_to_save": saved or None,
        "init_lora_weights": True, "inference_mode": True,
    }
    cfg.update(extra_config or {})
    parent = folder.parent if str(folder.parent) else Path(".")
    try:
        parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", suffix=".partial", dir=parent))
    except OSError as e:
        raise OutputError(f"cannot write adapter '{folder}': {e.strerror or e}")
    try:
        from safetensors.torch import save_file

        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2) + "\n")
        for fname, text in (extra_files or {}).items():
            (tmp / fname).write_text(text)
        old = None
        if folder.exists():
            old = folder.with_name(f".{folder.name}.old-{os.getpid()}")
            os.replace(folder, old)
        os.replace(tmp, folder)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError):
            raise OutputError(f"cannot write adapter '{folder}': {e.strerror or e}")
        raise
    return folder


def _num(x: float):
    return int(x) if float(x).is_integer() else float(x)
