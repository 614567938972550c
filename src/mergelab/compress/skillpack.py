"""SkillPacks: a task vector ``MODEL - BASE`` stored compressed, module by module, and read back lazily.

Schemes (``PackSettings.scheme``):

* ``graft`` - GraftLLM's module-aware compression (Du et al., "Knowledge Fusion of LLMs via Modular
  SkillPacks", arXiv 2505.18502, ICLR 2026; code duguodong7/GraftLLM, read for facts only):
  attention deltas as a truncated SVD whose rank keeps a fraction ``attn_energy`` of sum(sigma^2) (the
  paper's rule; ``attn_rank`` instead fixes a fraction of min(out, in) as the code does), MLP deltas as
  a truncated SVD of fixed rank fraction (the code's 1400 of 4096). In both the singular-vector columns
  are split into bands by index (largest sigma first) and each band is stored at its own precision:
  the code's defaults 20/180/800 columns at int8/int4/int2 for attention (of 1000) and 20/180/1200 for
  the MLP (of 1400), kept here as fractions of the rank. Embedding and LM-head deltas are magnitude
  pruned (the paper's Prune_alpha) to ``embed_density`` of their entries. Everything else (norms,
  biases) is stored dense in float32.
* ``lowrank`` - the plain baseline: the same truncated SVD at one float16 band, fixed rank.
* ``bitdelta`` - BitDelta (arXiv 2402.10193): attention and MLP matrices as signs times one scale
  (:mod:`mergelab.compress.bitdelta`); embeddings and the rest as in ``graft`` (``embed_density``).

Differences from the paper's code, on purpose and documented: the singular vectors are quantised
round-to-nearest on GPTQ's grid without calibration data (the code runs GPTQ on C4 activations), and,
in the spirit of the code's sequential order (V first, then U absorbing V's error), each band's U is
refit by least squares to the band's exact part ``U_b S_b Vh_b`` given the quantised Vh before U is
quantised itself.

Pack format (a folder, see docs/methods.md "SkillPacks"): ``skillpack.json`` (format, version,
scheme, settings, the fingerprints of base and model, the model's config, and per tensor its kind,
shape, dtype, rank, bands, bytes and relative Frobenius error) and ``skillpack.safetensors`` holding,
for tensor ``N``:

* kind ``svd``: ``N::S`` (float32, k), and per band i ``N::U.i``/``N::Vh.i``; a 16-bit band holds
  float16 ``U[:, band]`` and ``Vh[band]``, a b-bit band packed codes (uint8, :func:`quant.pack_bits`) with
  ``N::U.i.scale``/``N::Vh.i.scale`` (float16, one per row of ``U[:, band]`` / ``Vh[band]``);
* kind ``sign``: ``N::bits`` (uint8 packed signs) and ``N::scale`` (float32, 1);
* kind ``sparse``: ``N::idx`` (int32 flat row-major indices) and ``N::val`` (float16 values);
* kind ``dense``: ``N::delta`` (float32);
* kind ``zero``: nothing (the delta is exactly zero).

The model's config and tokenizer files are copied into the pack, so a rebuilt model is complete.
Reading (:class:`PackCheckpoint`) forms ``BASE + delta_hat`` one tensor at a time.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
from safetensors.torch import load_file, save_file

from mergelab.compress import bitdelta
from mergelab.compress.inputs import open_pair
from mergelab.compress.lowrank import relative_error, truncated_svd
from mergelab.compress.quant import FLOAT_BITS, check_bits, dequantize_rows, pack_bits, quantize_rows, unpack_bits
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.io.checkpoint import Checkpoint, TensorInfo, _header_digest, owned_tensor
from mergelab.io.output import DONOR_FILES

FORMAT = "mergelab-skillpack"
VERSION = 1
PACK_JSON = "skillpack.json"
PACK_TENSORS = "skillpack.safetensors"
SCHEMES = ("graft", "lowrank", "bitdelta")

# GraftLLM's run.sh bands as fractions of the kept rank: attention 20/180/800 of 1000, MLP 20/180/1200 of 1400.
ATTN_BANDS = ((8, 0.02), (4, 0.18), (2, 0.80))
MLP_BANDS = ((8, 20 / 1400), (4, 180 / 1400), (2, 1200 / 1400))
# The code's fixed ranks for Llama-3.1-8B (d = 4096) as fractions of min(out, in).
CODE_ATTN_RANK = 1000 / 4096
CODE_MLP_RANK = 1400 / 4096

_EMBED = re.compile(r"(^|\.)(embed_tokens|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                    r"embed_positions|embed_in|embeddings)(\.|$)")
_HEAD = re.compile(r"(^|\.)(lm_head|embed_out|output_layer)(\.|$)")
_ATTN = re.compile(r"(self_attn|attention|attn)")
_MLP = re.compile(r"(mlp|feed_forward|ffn|intermediate|\.output\.dense)")


def classify(name: str, shape: tuple) -> str:
    """The module kind of tensor ``name``: ``embedding``, ``head``, ``attention``, ``mlp`` (2-D weights
    by name) or ``other`` (norms, biases, anything else)."""
    if len(shape) != 2:
        return "other"
    if _HEAD.search(name):
        return "head"
    if _EMBED.search(name):
        return "embedding"
    if not name.endswith("weight"):
        return "other"
    if _ATTN.search(name):
        return "attention"
    if _MLP.search(name):
        return "mlp"
    return "other"


@dataclass
class PackSettings:
    """How ``mergelab compress`` stores each module kind (see the module docstring)."""

    scheme: str = "graft"
    attn_energy: Optional[float] = None  # paper: smallest rank keeping this fraction of sum(sigma^2); 0.9 by default
    attn_rank: Optional[float] = None  # or: a fixed fraction of min(out, in) (the code: 1000/4096)
    mlp_rank: float = CODE_MLP_RANK  # fraction of min(out, in)
    attn_bands: Tuple[Tuple[int, float], ...] = ATTN_BANDS
    mlp_bands: Tuple[Tuple[int, float], ...] = MLP_BANDS
    embed_density: float = 0.1  # fraction of embedding / head delta entries kept (magnitude)
    rank: Optional[float] = None  # lowrank: fraction of min(out, in) for attention and MLP alike
    rank_abs: Optional[int] = None  # lowrank: an absolute rank instead

    def __post_init__(self) -> None:
        if self.attn_energy is None and self.attn_rank is None:
            self.attn_energy = 0.9

    def validate(self) -> None:
        if self.scheme not in SCHEMES:
            raise MergeLabError(f"--scheme must be one of {', '.join(SCHEMES)}, got '{self.scheme}'")
        if not 0.0 < self.embed_density <= 1.0:
            raise MergeLabError(f"--embed-density must be in (0, 1], got {self.embed_density}")
        if self.scheme == "graft":
            if (self.attn_energy is None) == (self.attn_rank is None):
                raise MergeLabError("graft: give exactly one of --attn-energy (in (0, 1]) and --attn-rank "
                                    "(a fraction of min(out, in) in (0, 1])")
            if self.attn_energy is not None and not 0.0 < self.attn_energy <= 1.0:
                raise MergeLabError(f"--attn-energy must be in (0, 1], got {self.attn_energy}")
            for label, frac in (("--attn-rank", self.attn_rank), ("--mlp-rank", self.mlp_rank)):
                if frac is not None and not 0.0 < frac <= 1.0:
                    raise MergeLabError(f"{label} must be a fraction of min(out, in) in (0, 1], got {frac}")
            for label, bands in (("--attn-bands", self.attn_bands), ("--mlp-bands", self.mlp_bands)):
                if not bands:
                    raise MergeLabError(f"{label}: at least one band BITS:FRACTION is required")
                for bits, frac in bands:
                    check_bits(bits)
                    if not frac > 0:
                        raise MergeLabError(f"{label}: band fractions must be > 0, got {frac}")
        if self.scheme == "lowrank":
            if (self.rank is None) == (self.rank_abs is None):
                raise MergeLabError("lowrank: give exactly one of --rank (an integer >= 1) and --rank-fraction")
            if self.rank is not None and not 0.0 < self.rank <= 1.0:
                raise MergeLabError(f"--rank-fraction must be in (0, 1], got {self.rank}")
            if self.rank_abs is not None and self.rank_abs < 1:
                raise MergeLabError(f"--rank must be an integer >= 1, got {self.rank_abs}")


def parse_bands(text: str, what: str) -> Tuple[Tuple[int, float], ...]:
    """``"8:0.02,4:0.18,2:0.8"`` -> ((8, 0.02), (4, 0.18), (2, 0.8)); a clear error naming ``what``."""
    out = []
    for part in text.split(","):
        try:
            bits, frac = part.split(":")
            out.append((int(bits), float(frac)))
        except ValueError:
            raise MergeLabError(f"{what}: expected comma-separated BITS:FRACTION pairs such as 8:0.02,4:0.18,2:0.8, "
                                f"got '{text}'") from None
    return tuple(out)


def band_counts(rank: int, bands: Sequence[Tuple[int, float]]) -> List[Tuple[int, int, int]]:
    """Column ranges ``(bits, start, stop)`` of ``rank`` singular vectors split by the bands' fractions
    (normalised to sum 1; rounded so the counts add up to ``rank``, the last band takes the remainder;
    empty bands are dropped)."""
    total = sum(f for _, f in bands)
    out, start = [], 0
    for i, (bits, frac) in enumerate(bands):
        stop = rank if i == len(bands) - 1 else min(rank, start + int(round(rank * frac / total)))
        if stop > start:
            out.append((bits, start, stop))
        start = stop
    return out


# --------------------------------------------------------------------------- encoding one tensor
def _encode_svd(name: str, delta: torch.Tensor, rank: Optional[int], energy: Optional[float],
                bands: Sequence[Tuple[int, float]], device: str, store: Dict[str, torch.Tensor]) -> dict:
    f = truncated_svd(delta, rank=rank, energy=energy, device=device)
    k = f.rank
    entry = {"kind": "svd", "rank": k, "full_rank": f.full_rank, "bands": []}
    store[f"{name}::S"] = f.S.cpu().to(torch.float32)
    for i, (bits, start, stop) in enumerate(band_counts(k, bands)):
        U, S, Vh = f.U[:, start:stop], f.S[start:stop], f.Vh[start:stop]
        if bits == FLOAT_BITS:
            store[f"{name}::U.{i}"] = U.cpu().to(torch.float16)
            store[f"{name}::Vh.{i}"] = Vh.cpu().to(torch.float16)
        else:
            qv, sv = quantize_rows(Vh, bits)
            vhat = dequantize_rows(qv, sv, bits)
            # U absorbs V's rounding: least-squares U' S with (U' S) vhat ~= U S Vh (the band's exact part).
            target = (U * S) @ Vh
            us = torch.linalg.lstsq(vhat.T.cpu().double(), target.T.cpu().double()).solution.T.to(torch.float32)
            U2 = (us / torch.where(S == 0, torch.ones_like(S), S).cpu()).to(U.device)
            qu, su = quantize_rows(U2, bits)
            store[f"{name}::U.{i}"] = pack_bits(qu, bits).cpu()
            store[f"{name}::U.{i}.scale"] = su.cpu()
            store[f"{name}::Vh.{i}"] = pack_bits(qv, bits).cpu()
            store[f"{name}::Vh.{i}.scale"] = sv.cpu()
        entry["bands"].append({"bits": bits, "start": start, "stop": stop})
    return entry


def _decode_svd(name: str, entry: dict, shape: tuple, get: Callable[[str], torch.Tensor],
                rows: Optional[tuple] = None) -> torch.Tensor:
    out_dim, in_dim = shape
    r0, r1 = rows if rows is not None else (0, out_dim)
    S = get(f"{name}::S").to(torch.float32)
    result = torch.zeros(r1 - r0, in_dim, dtype=torch.float32)
    for i, band in enumerate(entry["bands"]):
        bits, start, stop = band["bits"], band["start"], band["stop"]
        k = stop - start
        if bits == FLOAT_BITS:
            U = get(f"{name}::U.{i}").to(torch.float32)
            Vh = get(f"{name}::Vh.{i}").to(torch.float32)
        else:
            U = dequantize_rows(unpack_bits(get(f"{name}::U.{i}"), bits, out_dim * k).view(out_dim, k),
                                get(f"{name}::U.{i}.scale"), bits)
            Vh = dequantize_rows(unpack_bits(get(f"{name}::Vh.{i}"), bits, k * in_dim).view(k, in_dim),
                                 get(f"{name}::Vh.{i}.scale"), bits)
        result += (U[r0:r1] * S[start:stop]) @ Vh
    return result


def _encode_sparse(name: str, delta: torch.Tensor, density: float, store: Dict[str, torch.Tensor]) -> dict:
    flat = delta.reshape(-1)
    k = max(1, int(math.ceil(density * flat.numel())))
    # Largest |delta| first; ties broken by lower flat index (stable sort), so the selection is deterministic.
    order = torch.sort(flat.abs(), descending=True, stable=True).indices[:k]
    idx = torch.sort(order).values
    store[f"{name}::idx"] = idx.to(torch.int32).cpu()
    store[f"{name}::val"] = flat[idx].to(torch.float16).cpu()
    return {"kind": "sparse", "density": density, "kept": k}


def _decode(name: str, entry: dict, shape: tuple, get: Callable[[str], torch.Tensor],
            rows: Optional[tuple] = None) -> torch.Tensor:
    kind = entry["kind"]
    if kind == "svd":
        return _decode_svd(name, entry, shape, get, rows)
    if kind == "zero":
        full = torch.zeros(shape, dtype=torch.float32)
    elif kind == "dense":
        full = get(f"{name}::delta").to(torch.float32)
    elif kind == "sign":
        full = bitdelta.decode(get(f"{name}::bits"), float(get(f"{name}::scale")[0]), shape)
    elif kind == "sparse":
        full = torch.zeros(math.prod(shape), dtype=torch.float32)
        full[get(f"{name}::idx").to(torch.int64)] = get(f"{name}::val").to(torch.float32)
        full = full.view(shape)
    else:
        raise CheckpointError(f"SkillPack tensor '{name}' has unknown kind '{kind}'")
    return full[rows[0]:rows[1]] if rows is not None and full.dim() > 0 else full


def _nbytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors)


# --------------------------------------------------------------------------- compress
@dataclass
class PackResult:
    out: Path
    bytes: int  # bytes of the stored tensors (skillpack.safetensors' data, headers excluded)
    file_bytes: int
    dense_bytes: int  # the task vector at the model's dtype
    tensors: Dict[str, dict] = field(default_factory=dict)


def _matrix_plan(kind: str, shape: tuple, s: PackSettings) -> Tuple[Optional[int], Optional[float], tuple]:
    """(rank, energy, bands) for an attention / MLP matrix under ``s``."""
    full = min(shape)
    if s.scheme == "lowrank":
        k = s.rank_abs if s.rank_abs is not None else max(1, int(round(s.rank * full)))
        return min(k, full), None, ((FLOAT_BITS, 1.0),)
    if kind == "attention":
        if s.attn_energy is not None:
            return None, s.attn_energy, s.attn_bands
        return max(1, int(round(s.attn_rank * full))), None, s.attn_bands
    return max(1, int(round(s.mlp_rank * full))), None, s.mlp_bands


def compress(base: str, model: str, out: str, settings: PackSettings = PackSettings(), *, device: str = "cpu",
             overwrite: bool = False, log: Optional[Callable[[str], None]] = None) -> PackResult:
    """Write the SkillPack of ``model - base`` to the folder ``out`` (see the module docstring).

    One tensor at a time: each delta is formed in float32, compressed on ``device`` and only its
    compressed pieces are kept until the pack is written (memory: the largest tensor plus the pack).
    The pack is written to ``out.partial`` and renamed; an existing ``out`` is refused unless
    ``overwrite``.
    """
    settings.validate()
    out_path = Path(out)
    b, m = open_pair(base, model, out_path, overwrite)
    store: Dict[str, torch.Tensor] = {}
    entries: Dict[str, dict] = {}
    dense_bytes = 0
    for name, info in m.tensors.items():
        shape = tuple(info.shape)
        entry = {"shape": list(shape), "dtype": str(info.dtype).replace("torch.", "")}
        if not info.is_float:
            if not torch.equal(b.read(name), m.read(name)):
                raise MergeLabError(f"tensor '{name}' ({info.dtype}) differs between base '{base}' and model "
                                    f"'{model}': only floating-point tensors can be stored as deltas")
            entries[name] = {**entry, "kind": "zero", "module": "other", "bytes": 0, "rel_error": 0.0}
            continue
        dense_bytes += info.nbytes
        delta = m.read(name, dtype=torch.float32) - b.read(name, dtype=torch.float32)
        kind = classify(name, shape)
        before = set(store)
        if not bool(delta.any()):
            e = {"kind": "zero"}
        elif kind in ("attention", "mlp") and settings.scheme == "bitdelta":
            bits, alpha = bitdelta.encode(delta)
            store[f"{name}::bits"] = bits
            store[f"{name}::scale"] = torch.tensor([alpha], dtype=torch.float32)
            e = {"kind": "sign", "scale": alpha}
        elif kind in ("attention", "mlp"):
            rank, energy, bands = _matrix_plan(kind, shape, settings)
            e = _encode_svd(name, delta, rank, energy, bands, device, store)
        elif kind in ("embedding", "head") and settings.embed_density < 1.0:
            e = _encode_sparse(name, delta, settings.embed_density, store)
        else:
            store[f"{name}::delta"] = delta.contiguous()
            e = {"kind": "dense"}
        added = [store[k] for k in set(store) - before]
        e.update(entry, module=kind, bytes=_nbytes(added))
        approx = _decode(name, e, shape, lambda k: store[k])
        e["rel_error"] = relative_error(delta, approx)
        entries[name] = e
        if log:
            log(f"{name}: {kind} -> {e['kind']}" + (f" rank {e['rank']}/{e['full_rank']}" if e["kind"] == "svd" else "")
                + f", {e['bytes']} bytes, relative error {e['rel_error']:.4f}")
        del delta, approx
    partial = out_path.with_name(out_path.name + ".partial")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    try:
        save_file(store, str(partial / PACK_TENSORS), metadata={"format": FORMAT, "version": str(VERSION)})
        for fname in ("config.json",) + DONOR_FILES:
            src = m.path / fname
            if src.is_file():
                shutil.copy2(src, partial / fname)
        by_module: Dict[str, int] = {}
        for e in entries.values():
            by_module[e["module"]] = by_module.get(e["module"], 0) + e["bytes"]
        manifest = {
            "format": FORMAT, "version": VERSION, "scheme": settings.scheme,
            "settings": {k: (list(map(list, v)) if isinstance(v, tuple) else v) for k, v in asdict(settings).items()},
            "base": b.fingerprint(), "base_probe": base_probe(b), "model": m.fingerprint(), "config": m.config(),
            "bytes": {"stored": _nbytes(store.values()), "dense_task_vector": dense_bytes, "by_module": by_module},
            "tensors": entries,
        }
        (partial / PACK_JSON).write_text(json.dumps(manifest, indent=1))
        if out_path.exists():
            shutil.rmtree(out_path)
        os.replace(partial, out_path)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return PackResult(out_path, _nbytes(store.values()), (out_path / PACK_TENSORS).stat().st_size, dense_bytes,
                      entries)


def base_probe(ck) -> str:
    """sha256 of every tensor's first row (names in sorted order): tells a pack's base from another
    checkpoint of the same architecture without reading the whole model."""
    import hashlib

    h = hashlib.sha256()
    for name in sorted(ck.tensors):
        info = ck.tensors[name]
        t = ck.read(name, rows=(0, 1) if info.shape and info.shape[0] > 0 else None)
        h.update(name.encode())
        h.update(t.contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


# --------------------------------------------------------------------------- reading
class PackCheckpoint:
    """``BASE + decoded SkillPack``, seen through :class:`~mergelab.io.checkpoint.Checkpoint`'s reading
    interface (``tensors``, ``info``, ``read``, ``config``, ``fingerprint``), so any merge method of
    the registry can take packs as models without a rebuilt copy on disk. Each read decodes one
    tensor (or the rows asked for, for SVD-stored ones) and adds it to the base's tensor."""

    format = "skillpack"

    def __init__(self, pack: str, base: Checkpoint, label: Optional[str] = None):
        self.path = Path(os.path.expanduser(pack))
        self.label = label or str(pack)
        self.base = base
        manifest_file = self.path / PACK_JSON
        if not manifest_file.is_file():
            raise CheckpointError(f"'{pack}' is not a SkillPack: no {PACK_JSON} (make one with `mergelab compress`)")
        try:
            self.manifest = json.loads(manifest_file.read_text())
        except (json.JSONDecodeError, OSError) as e:
            raise CheckpointError(f"'{manifest_file}' cannot be read as JSON: {e}") from None
        if self.manifest.get("format") != FORMAT or self.manifest.get("version") != VERSION:
            raise CheckpointError(f"'{manifest_file}': format {self.manifest.get('format')!r} version "
                                  f"{self.manifest.get('version')!r}, expected {FORMAT!r} version {VERSION}")
        self.file = self.path / PACK_TENSORS
        if not self.file.is_file():
            raise CheckpointError(f"SkillPack '{pack}' lacks its tensors file '{self.file}'")
        recorded = self.manifest.get("base_probe")
        if recorded != base_probe(base):
            raise CheckpointError(f"SkillPack '{pack}' was made against base '{self.manifest.get('base', {}).get('path')}'"
                                  f", whose weights differ from those of '{base.path}' (first rows of the tensors): "
                                  f"graft a pack on the base it was made against")
        entries = self.manifest["tensors"]
        missing = sorted(set(base.tensors) - set(entries)) + sorted(set(entries) - set(base.tensors))
        if missing:
            raise CheckpointError(f"SkillPack '{pack}' and base '{base.path}' disagree on tensor '{missing[0]}'")
        self.tensors: Dict[str, TensorInfo] = {}
        for name, e in entries.items():
            info = base.tensors[name]
            dtype = getattr(torch, e["dtype"])
            if tuple(e["shape"]) != tuple(info.shape):
                raise CheckpointError(f"SkillPack '{pack}': tensor '{name}' has shape {tuple(e['shape'])}, the base "
                                      f"{tuple(info.shape)}")
            self.tensors[name] = TensorInfo(name, dtype, tuple(info.shape), self.file)
        self._store: Optional[Dict[str, torch.Tensor]] = None

    def _get(self, key: str) -> torch.Tensor:
        if self._store is None:  # the pack is small: loaded once, on first use
            try:
                self._store = load_file(str(self.file))
            except Exception as e:
                raise CheckpointError(f"'{self.file}' is not a valid safetensors file: {e}") from None
        try:
            return self._store[key]
        except KeyError:
            raise CheckpointError(f"SkillPack '{self.path}' lacks tensor '{key}' (truncated or corrupt pack?)") from None

    def info(self, name: str) -> TensorInfo:
        try:
            return self.tensors[name]
        except KeyError:
            raise CheckpointError(f"tensor '{name}' is missing from SkillPack '{self.label}' ({self.path})")

    def delta(self, name: str, rows: Optional[tuple] = None) -> torch.Tensor:
        """The decoded float32 delta of ``name`` (rows ``[start, stop)`` if given)."""
        info = self.info(name)
        return _decode(name, self.manifest["tensors"][name], info.shape, self._get, rows)

    def read(self, name: str, rows: Optional[tuple] = None, dtype: Optional[torch.dtype] = None,
             device: str = "cpu") -> torch.Tensor:
        info = self.info(name)
        entry = self.manifest["tensors"][name]
        if not info.is_float or entry["kind"] == "zero":
            t = self.base.read(name, rows, None, "cpu").to(info.dtype)
        else:
            t = (self.base.read(name, rows, torch.float32, "cpu") + self.delta(name, rows)).to(info.dtype)
        return owned_tensor(t, dtype, device)

    def config(self) -> Optional[dict]:
        return self.manifest.get("config")

    def fingerprint(self) -> dict:
        return {"path": str(self.path.resolve()), "format": self.format,
                "files": [{"name": f.name, "bytes": f.stat().st_size, "header_sha256": _header_digest(f)}
                          for f in (self.file,)],
                "base": self.base.fingerprint(), "tensors": len(self.tensors)}


def is_pack(path) -> bool:
    return (Path(os.path.expanduser(str(path))) / PACK_JSON).is_file()
