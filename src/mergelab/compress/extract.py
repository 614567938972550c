"""``mergelab extract BASE MODEL -o ADAPTER``: a PEFT LoRA adapter approximating the task vector.

Like mergekit's ``mergekit-extract-lora`` (mergekit 0.1.5 ``scripts/extract_lora.py``, read for facts
only): for every linear module M whose weight changed, ``delta = W_model - W_base`` (float32, from the
stored values) is truncated by SVD, ``delta ~= U_k diag(S_k) Vh_k`` (Eckart-Young), and stored with the
singular values split evenly between the factors, ``B = U_k diag(sqrt(S_k))``, ``A = diag(sqrt(S_k)) Vh_k``,
with ``lora_alpha = r`` per module (scaling 1: ``W' = W + B @ A``). The rank is ``--rank R`` for every
module (capped at min(out, in)) or, with ``--energy E``, each module's smallest rank keeping a
fraction E of sum(sigma^2) (:func:`mergelab.compress.lowrank.energy_rank`). Differences from mergekit:
tau is formed in float32 (mergekit subtracts in the stored dtype), the rank is never 0, and a
changed bias of a targeted module is written as PEFT's ``bias: lora_only`` (the fine-tuned bias,
which PEFT loads into the base layer) where mergekit writes ``lora_B.bias`` without ``lora_bias``
(PEFT then drops it).

Embeddings and the LM head are explicit (``embeddings``): ``dense`` keeps their fine-tuned weights
whole in ``modules_to_save`` (tied input/output embeddings: ``ensure_weight_tying``, so the head
follows), ``lora`` extracts them like the linear modules (``lora_embedding_A/B`` for ``nn.Embedding``),
``skip`` leaves them at the base's values. With tied embeddings and ``lora``, the head gets the same
factors transposed and ``ensure_weight_tying``: PEFT's forward is then exact, but its
``merge_and_unload`` adds the shared delta twice to the one tied weight (PEFT warns about it);
``dense`` has no such trap. Other changed tensors (norms, convolutions, anything not an
``nn.Linear``) follow ``other``: ``dense`` (``modules_to_save``) or ``skip``. What happened to every
tensor is printed and recorded with its rank and relative Frobenius error ``||delta - B A|| / ||delta||``
(of the factors as stored) in ``mergelab.json`` next to the adapter.

Module types come from the model's ``config.json``: its architecture is instantiated on the ``meta``
device (no memory, no weights) and each tensor's owning module is looked up. One module is decomposed
at a time: memory is the largest tensor plus the factors kept so far.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from mergelab.compress.lowrank import check_rank_choice, relative_error, truncated_svd
from mergelab.compress.inputs import open_pair
from mergelab.errors import CheckpointError, MergeLabError
from mergelab.io.checkpoint import Checkpoint

POLICIES = ("dense", "skip", "lora")


@dataclass
class ExtractResult:
    out: Path
    modules: Dict[str, dict] = field(default_factory=dict)  # LoRA modules: rank, full_rank, rel_error
    dense: List[str] = field(default_factory=list)  # modules_to_save
    skipped: List[str] = field(default_factory=list)  # changed tensors left at the base's values
    seconds: float = 0.0


def module_types(config: dict, where: str) -> Dict[str, str]:
    """``{module path: kind}`` (``linear``, ``embedding``, ``head`` or ``other``) of the architecture
    named by ``config`` (a Hugging Face config dict), instantiated on the meta device."""
    import transformers

    arch = (config.get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    if cls is None:
        raise CheckpointError(f"{where}: config.json names no architecture transformers knows "
                              f"(architectures: {config.get('architectures')}); extraction needs the module types")
    try:
        cfg = transformers.AutoConfig.for_model(**config)
        with torch.device("meta"):
            model = cls._from_config(cfg)
    except Exception as e:
        raise CheckpointError(f"{where}: cannot instantiate {arch} from config.json to find the module types: {e}") from None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    kinds = {}
    for name, mod in model.named_modules():
        if not name:
            continue
        if head is not None and mod is head:
            kinds[name] = "head"
        elif isinstance(mod, torch.nn.Embedding):
            kinds[name] = "embedding"
        elif type(mod) is torch.nn.Linear:
            kinds[name] = "linear"
        else:
            kinds[name] = "other"
    return kinds


def extract(base: str, model: str, out: str, *, rank: Optional[int] = None, energy: Optional[float] = None,
            embeddings: str = "dense", other: str = "dense", device: str = "cpu", overwrite: bool = False,
            log: Optional[Callable[[str], None]] = None) -> ExtractResult:
    """Write a PEFT LoRA adapter for ``model - base`` to ``out`` (see the module docstring)."""
    from mergelab.io.peft_adapter import write_lora

    started = time.perf_counter()
    check_rank_choice(rank, energy)
    if embeddings not in POLICIES:
        raise MergeLabError(f"--embeddings must be one of {', '.join(POLICIES)}, got '{embeddings}'")
    if other not in ("dense", "skip"):
        raise MergeLabError(f"--other must be dense or skip, got '{other}'")
    out_path = Path(out)
    b, m = open_pair(base, model, out_path, overwrite)
    cfg = m.config()
    if cfg is None:
        raise CheckpointError(f"model '{model}' has no config.json: extraction needs the architecture")
    kinds = module_types(cfg, f"model '{model}'")
    say = log or (lambda line: None)
    result = ExtractResult(out_path)
    factors: Dict[str, tuple] = {}
    embed_modules: List[str] = []
    dense_tensors: Dict[str, torch.Tensor] = {}
    dense_modules: List[str] = []
    bias_modules: List[str] = []
    changed: Dict[str, List[str]] = {}  # module -> its changed tensors
    for name, info in m.tensors.items():
        if not info.is_float:
            if not torch.equal(b.read(name), m.read(name)):
                raise MergeLabError(f"tensor '{name}' ({info.dtype}) differs between base and model: cannot be "
                                    f"expressed by an adapter")
            continue
        if torch.equal(b.read(name), m.read(name)):
            continue
        module, _, leaf = name.rpartition(".")
        changed.setdefault(module, []).append(leaf)
    for module, leaves in changed.items():
        kind = kinds.get(module)
        if kind is None:
            raise CheckpointError(f"tensor '{module}.{leaves[0]}' belongs to no module of the architecture "
                                  f"{cfg.get('architectures')}: cannot be expressed by an adapter")
        policy = embeddings if kind in ("embedding", "head") else ("lora" if kind == "linear" else other)
        if policy == "skip":
            result.skipped += [f"{module}.{leaf}" for leaf in leaves]
            say(f"{module}: {kind}, changed, skipped (kept at the base's values)")
            continue
        if policy == "dense":
            for leaf in _all_leaves(m, module):
                dense_tensors[f"{module}.{leaf}"] = m.read(f"{module}.{leaf}")
            dense_modules.append(module)
            result.dense.append(module)
            say(f"{module}: {kind}, kept dense (modules_to_save)")
            continue
        # LoRA: the weight's delta by SVD; a changed bias of a linear module whole (bias: lora_only)
        if "weight" in leaves:
            wname = f"{module}.weight"
            dtype = m.info(wname).dtype
            delta = m.read(wname, dtype=torch.float32) - b.read(wname, dtype=torch.float32)
            if delta.dim() != 2:
                raise CheckpointError(f"tensor '{wname}' has shape {tuple(delta.shape)}: only 2-D weights can be "
                                      f"extracted as LoRA factors")
            is_embed = kind == "embedding"
            mat = delta.T if is_embed else delta  # PEFT's embedding delta is (B @ A).T
            f = truncated_svd(mat, rank=rank, energy=energy, device=device)
            root = f.S.sqrt()
            B = (f.U * root).to(dtype).cpu()
            A = (root.unsqueeze(1) * f.Vh).to(dtype).cpu()
            approx = B.float() @ A.float()
            err = relative_error(mat.cpu(), approx)
            factors[module] = (A, B)
            if is_embed:
                embed_modules.append(module)
            result.modules[module] = {"kind": kind, "rank": f.rank, "full_rank": f.full_rank, "rel_error": err}
            say(f"{module}: {kind}, rank {f.rank}/{f.full_rank}, relative error {err:.3e}")
            del delta, mat, approx
        if "bias" in leaves:
            if kind != "linear" or "weight" not in leaves and module not in factors:
                raise MergeLabError(f"tensor '{module}.bias' changed but '{module}.weight' did not: PEFT can only "
                                    f"carry it with the module's factors; use --other dense")
            dense_tensors[f"{module}.base_layer.bias"] = m.read(f"{module}.bias")
            bias_modules.append(module)
        rest = [leaf for leaf in leaves if leaf not in ("weight", "bias")]
        if rest:
            raise CheckpointError(f"tensor '{module}.{rest[0]}' changed in a LoRA module: cannot be expressed")
    if not factors:
        raise MergeLabError(f"no linear module changed between '{base}' and '{model}': nothing to extract as LoRA"
                            + (f" (changed and kept dense: {', '.join(result.dense)})" if result.dense else ""))
    extra: dict = {"task_type": "CAUSAL_LM" if str((cfg.get("architectures") or [""])[0]).endswith("ForCausalLM")
                   else None}
    tied = bool(cfg.get("tie_word_embeddings"))
    if tied and any(kinds.get(mod) in ("embedding", "head") for mod in factors):
        extra["ensure_weight_tying"] = True  # PEFT ties the head's LoRA to the embedding's
        for emb in (mod for mod in factors if kinds.get(mod) == "embedding"):
            A, B = factors[emb]  # delta (V, d) = (B @ A).T = A.T @ B.T: the head's A = B.T, B = A.T
            for head in (mod for mod, k in kinds.items() if k == "head" and f"{mod}.weight" not in m.tensors):
                dense_tensors[f"{head}.lora_A.weight"] = B.T.contiguous()
                dense_tensors[f"{head}.lora_B.weight"] = A.T.contiguous()
    if dense_modules:
        extra["modules_to_save"] = sorted(dense_modules)
        if tied and any(kinds.get(mod) in ("embedding", "head") for mod in dense_modules):
            # PEFT then wraps the tied head too and looks for its weight in the file: the same values.
            extra["ensure_weight_tying"] = True
            embed = next(mod for mod in dense_modules if kinds.get(mod) in ("embedding", "head"))
            for head in (mod for mod, k in kinds.items() if k == "head" and f"{mod}.weight" not in m.tensors):
                dense_tensors[f"{head}.weight"] = dense_tensors[f"{embed}.weight"].clone()
    if bias_modules:
        extra["bias"] = "lora_only"
    report = {
        "command": "extract", "base": str(base), "model": str(model),
        "rank": rank, "energy": energy, "embeddings": embeddings, "other": other,
        "modules": result.modules, "modules_to_save": sorted(dense_modules), "bias_from_model": sorted(bias_modules),
        "skipped": result.skipped,
        "inputs": {"base": b.fingerprint(), "model": m.fingerprint()},
    }
    write_lora(out_path, factors, base_model=str(base), embeddings=embed_modules, overwrite=overwrite,
               extra_config=extra, extra_tensors=dense_tensors,
               extra_files={"mergelab.json": json.dumps(report, indent=1) + "\n"})
    result.seconds = time.perf_counter() - started
    return result


def _all_leaves(ck: Checkpoint, module: str) -> List[str]:
    prefix = module + "."
    return [n[len(prefix):] for n in ck.tensors if n.startswith(prefix) and "." not in n[len(prefix):]]
