"""``mergelab align``: load two checkpoints, check they can be aligned, match, permute, write.

The aligned model is the same function as MODEL (its hidden units are only reordered), and its
weights are as close to REFERENCE's as the matching finds, so any merge method can then combine it
with REFERENCE.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional

import torch

from mergelab.align.matching import activation_matching, weight_distance, weight_matching
from mergelab.align.spec import PermutationSpec, apply_permutations, infer_spec, spec_from_mapping
from mergelab.errors import CheckpointError, MergeLabError, OutputError

TORCH_SUFFIXES = (".pt", ".pth", ".bin")


@dataclass
class Loaded:
    """A checkpoint in memory: its tensors, ``config.json`` (or None), where it came from."""

    path: Path
    state: Dict[str, torch.Tensor]
    config: Optional[dict]
    is_file: bool

    @property
    def shapes(self) -> Dict[str, tuple]:
        return {k: tuple(v.shape) for k, v in self.state.items()}


def load_model(ref, label: str) -> Loaded:
    """A HF folder, a ``.safetensors`` file, or a plain PyTorch state dict (``.pt``/``.pth``/``.bin``)."""
    path = Path(os.path.expanduser(str(ref)))
    if path.is_file() and path.suffix in TORCH_SUFFIXES:
        try:
            state = torch.load(str(path), map_location="cpu", weights_only=True)
        except Exception as e:
            raise CheckpointError(f"{label} '{path}' cannot be loaded as a PyTorch state dict (weights_only): {e}")
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
            raise CheckpointError(f"{label} '{path}' does not hold a flat state dict of tensors")
        return Loaded(path, dict(state), None, True)
    from mergelab.io.checkpoint import Checkpoint

    ck = Checkpoint.open(str(path), label=f"{label} '{path}'")
    state = {name: ck.read(name) for name in ck.tensors}
    return Loaded(path, state, ck.config(), path.is_file())


def check_compatible(ref: Loaded, model: Loaded, roles=("REFERENCE", "MODEL"), command: str = "align") -> None:
    """Same architecture, depth and shapes, else an error naming the files and the first tensor at fault.
    ``roles`` name the two models in the message and ``command`` what needs them aligned (``align``,
    ``PLeaS``)."""
    r, m = roles
    rc, mc = ref.config or {}, model.config or {}
    if rc.get("model_type") != mc.get("model_type"):
        raise MergeLabError(f"{r} '{ref.path}' is a '{rc.get('model_type')}' model but {m} '{model.path}' is "
                            f"a '{mc.get('model_type')}' model: {command} needs one architecture")
    if "num_hidden_layers" in rc and rc.get("num_hidden_layers") != mc.get("num_hidden_layers"):
        raise MergeLabError(f"{r} '{ref.path}' has {rc['num_hidden_layers']} layers but {m} '{model.path}' has "
                            f"{mc.get('num_hidden_layers')}: {command} pairs units of the same layers, it has no "
                            f"policy to pair layers of models of different depth")
    only_ref = [k for k in ref.state if k not in model.state]
    only_model = [k for k in model.state if k not in ref.state]
    if only_ref or only_model:
        k, where, other = (only_ref[0], ref, model) if only_ref else (only_model[0], model, ref)
        n = len(only_ref) + len(only_model)
        raise MergeLabError(f"tensor '{k}' is in '{where.path}' but not in '{other.path}' ({n} tensors differ: a "
                            f"different depth or architecture); {command} needs the same tensors in both models")
    for k, v in ref.state.items():
        w = model.state[k]
        if tuple(v.shape) != tuple(w.shape):
            hint = " (for models of different widths see PLeaS)" if command == "align" else ""
            raise MergeLabError(f"tensor '{k}' has shape {tuple(w.shape)} in {m} '{model.path}' but "
                                f"{tuple(v.shape)} in {r} '{ref.path}': {command} needs the same widths{hint}")


def load_spec(spec_file: Optional[Path], model: Loaded, residual: bool) -> PermutationSpec:
    if spec_file is None:
        spec = infer_spec(model.config, model.shapes, residual=residual)
    else:
        import yaml

        try:
            data = yaml.safe_load(Path(spec_file).read_text())
        except (OSError, yaml.YAMLError) as e:
            raise MergeLabError(f"cannot read the permutation spec '{spec_file}': {e}")
        spec = spec_from_mapping(data, model.shapes, where=f"spec '{spec_file}'")
    spec.check(model.shapes, where=f"'{model.path}'")
    return spec


# --------------------------------------------------------------------------- calibration
def read_texts(path: Path) -> List[str]:
    """Calibration texts: one per line (``.txt``) or the ``text`` field of each JSON line (``.jsonl``)."""
    try:
        lines = [x for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]
    except (OSError, UnicodeDecodeError) as e:
        raise MergeLabError(f"cannot read calibration file '{path}': {e}")
    if str(path).endswith(".jsonl"):
        try:
            lines = [json.loads(x)["text"] for x in lines]
        except (ValueError, KeyError, TypeError) as e:
            raise MergeLabError(f"calibration file '{path}': each line must be a JSON object with a 'text' field ({e})")
    if not lines:
        raise MergeLabError(f"calibration file '{path}' holds no text")
    return lines


def read_inputs(path: Path) -> torch.Tensor:
    """Calibration inputs of a non-HF model: one tensor ``[N, ...]`` in ``.pt``, ``.npy`` or ``.safetensors``."""
    p = Path(path)
    try:
        if p.suffix == ".npy":
            import numpy as np

            return torch.as_tensor(np.load(p)).float()
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            tensors = list(load_file(str(p)).values())
            if len(tensors) != 1:
                raise MergeLabError(f"calibration file '{p}' must hold exactly one tensor, holds {len(tensors)}")
            return tensors[0].float()
        x = torch.load(str(p), map_location="cpu", weights_only=True)
    except MergeLabError:
        raise
    except Exception as e:
        raise MergeLabError(f"cannot read calibration inputs '{p}': {e}")
    if not isinstance(x, torch.Tensor):
        raise MergeLabError(f"calibration file '{p}' must hold one tensor of inputs [N, ...]")
    return x.float()


def hf_model(loaded: Loaded):
    """The transformers model of a loaded HF folder, float32, in eval mode: the class its config's
    ``architectures`` names when that class holds every tensor of the checkpoint, else ``AutoModel``."""
    import transformers

    arch = ((loaded.config or {}).get("architectures") or [None])[0]
    cls = getattr(transformers, arch, None) if arch else None
    cls = cls or transformers.AutoModel
    model = cls.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    own = set(model.state_dict())
    if not set(loaded.state) <= own | {k for k in loaded.state if k.endswith("position_ids")}:
        model = transformers.AutoModel.from_pretrained(str(loaded.path), dtype=torch.float32).eval()
    return model


ACTIVATIONS = {"relu": torch.nn.ReLU, "gelu": torch.nn.GELU, "tanh": torch.nn.Tanh, "sigmoid": torch.nn.Sigmoid}


def chain_module(state: Dict[str, torch.Tensor], activation: str) -> torch.nn.Module:
    """An MLP (linear layers, optional LayerNorms, ``activation`` between layers) holding ``state``."""
    if activation not in ACTIVATIONS:
        raise MergeLabError(f"--activation must be one of {', '.join(ACTIVATIONS)}, got '{activation}'")
    layers = []
    mods: List[str] = []
    for k in state:
        m = k.rpartition(".")[0]
        if m not in mods:
            mods.append(m)
    order = []
    for i, m in enumerate(mods):
        w = state.get(f"{m}.weight")
        if w is None or w.ndim not in (1, 2):
            raise MergeLabError(f"activation matching without a model class handles MLPs only (linear layers and "
                                f"LayerNorms); tensor '{m}.weight' does not fit: use --method weight or the Python API")
        mod = torch.nn.Linear(w.shape[1], w.shape[0], bias=f"{m}.bias" in state) if w.ndim == 2 else \
            torch.nn.LayerNorm(w.shape[0], elementwise_affine=True, bias=f"{m}.bias" in state)
        order.append((m, mod))
    last_linear = max(i for i, (_, mod) in enumerate(order) if isinstance(mod, torch.nn.Linear))

    class Chain(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.act = ACTIVATIONS[activation]()

        def forward(self, x):
            for i, (_, mod) in enumerate(order):
                x = mod(x)
                nxt = order[i + 1][1] if i + 1 < len(order) else None
                if i < last_linear and not isinstance(nxt, torch.nn.LayerNorm):
                    x = self.act(x)
            return x

    chain = Chain()
    with torch.no_grad():
        for m, mod in order:
            for leaf, p in mod.named_parameters():
                p.copy_(state[f"{m}.{leaf}"].float())
    chain.named_layers = dict(order)  # the state-dict names the hooks look for
    return chain


def collect_activations(loaded: Loaded, spec: PermutationSpec, calibration: Path, tokenizer_dir: Path,
                        batch_size: int = 8, max_length: int = 128, activation: str = "relu"):
    from mergelab.align.features import record

    if loaded.config is None:
        from mergelab.align.resnet import ResNet, layout_blocks

        x = read_inputs(calibration)
        if layout_blocks(loaded.shapes) is not None:  # mergelab's ResNet: its class knows strides and padding
            model = ResNet.from_state(loaded.state)
            c = model.in_channels
            if x.ndim == 2 and x.shape[1] == c * model.side ** 2:
                x = x.reshape(len(x), c, model.side, model.side)
            if x.ndim != 4 or x.shape[1] != c:
                raise MergeLabError(f"calibration inputs '{calibration}' have shape {tuple(x.shape)}; the ResNet "
                                    f"'{loaded.path}' takes images [N, {c}, H, W]")
        else:
            model = chain_module(loaded.state, activation)
        return record(model, spec, [x[i:i + 256] for i in range(0, len(x), 256)], lambda m, b: (m(b), None)[1])
    from transformers import AutoTokenizer

    texts = read_texts(calibration)
    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = hf_model(loaded)

    def call(m, batch):
        enc = tok(batch, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        m(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"])
        return enc["attention_mask"]

    return record(model, spec, [texts[i:i + batch_size] for i in range(0, len(texts), batch_size)], call)


def module_inputs(loaded: Loaded, texts: List[str], tokenizer_dir: Path, modules: List[str], batch_size: int = 16,
                  max_length: int = 128) -> Dict[str, torch.Tensor]:
    """The input of each named module (a module name, or the end of one after a dot) on every non-padding
    token of ``texts``, tokenised with ``tokenizer_dir``'s tokenizer: ``{name: [tokens, width]}``, float64."""
    import inspect

    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = hf_model(loaded)
    accepted = set(inspect.signature(model.forward).parameters)
    found = {}
    for want in modules:
        hits = [m for n, m in model.named_modules() if n == want or n.endswith("." + want)]
        if len(hits) != 1:
            raise MergeLabError(f"'{loaded.path}': {len(hits)} modules named '{want}' (expected one)")
        found[want] = hits[0]
    store: Dict[str, List[torch.Tensor]] = {n: [] for n in modules}
    current: Dict[str, torch.Tensor] = {}
    handles = [m.register_forward_pre_hook(lambda mod, args, n=n: current.__setitem__(n, args[0].detach()))
               for n, m in found.items()]
    try:
        with torch.no_grad():
            for s in range(0, len(texts), batch_size):
                enc = tok(texts[s:s + batch_size], padding=True, truncation=True, max_length=max_length,
                          return_tensors="pt")
                model(**{k: v for k, v in enc.items() if k in accepted})
                keep = enc["attention_mask"].bool()
                for n in modules:
                    store[n].append(current[n][keep].double())
    finally:
        for h in handles:
            h.remove()
    return {n: torch.cat(v) for n, v in store.items()}


# --------------------------------------------------------------------------- writing
def write_checkpoint(loaded: Loaded, state: Dict[str, torch.Tensor], out: Path, overwrite: bool, extra: dict,
                     config: Optional[dict] = None, record_name: str = "alignment.json") -> None:
    """Write ``state`` in ``loaded``'s format; a HF folder also gets ``config`` (default: a copy of
    ``loaded``'s ``config.json``), its tokenizer files and ``extra`` as ``record_name``."""
    from safetensors.torch import save_file

    out = Path(out)
    if loaded.is_file:
        if out.exists() and not overwrite:
            raise OutputError(f"output '{out}' already exists; pass --overwrite to replace it")
        if out.resolve() == loaded.path.resolve():
            raise OutputError(f"output '{out}' is the input MODEL; choose another path")
        tmp = out.with_name(out.name + ".partial")
        try:
            out.parent.mkdir(parents=True, exist_ok=True)
            if out.suffix == ".safetensors":
                save_file({k: v.contiguous() for k, v in state.items()}, str(tmp))
            else:
                torch.save(state, str(tmp))
            os.replace(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise OutputError(f"cannot write '{out}': {e}")
        return
    from mergelab.io.output import copy_donor_files, prepare_output, publish

    partial, _ = prepare_output(out, [loaded.path], overwrite, False)
    try:
        save_file({k: v.contiguous() for k, v in state.items()}, str(partial / "model.safetensors"),
                  metadata={"format": "pt"})
        if config is not None:
            (partial / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        elif (loaded.path / "config.json").is_file():
            shutil.copy2(loaded.path / "config.json", partial / "config.json")
        copy_donor_files(loaded.path, partial)
        (partial / record_name).write_text(json.dumps(extra, indent=2) + "\n")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    publish(partial, out, overwrite)


@dataclass
class AlignResult:
    out: Optional[Path]
    perms: Dict[str, torch.Tensor]
    spec: PermutationSpec
    distance_before: float
    distance_after: float
    seconds: float


def align(reference, model, out: Optional[Path], method: str = "weight", calibration: Optional[Path] = None,
          spec_file: Optional[Path] = None, residual: bool = True, overwrite: bool = False, max_iter: int = 100,
          seed: int = 0, activation: str = "relu", write: bool = True) -> AlignResult:
    """Permute MODEL's hidden units to match REFERENCE (``method`` ``weight`` or ``activation``) and write
    the aligned MODEL to ``out`` in MODEL's format."""
    t0 = time.time()
    if method not in ("weight", "activation"):
        raise MergeLabError(f"--method must be 'weight' or 'activation', got '{method}'")
    if method == "activation" and calibration is None:
        raise MergeLabError("--method activation needs calibration inputs: --calibration FILE (texts for HF "
                            "models, a tensor file for plain MLPs)")
    if out is not None and Path(out).exists() and not overwrite:
        raise OutputError(f"output '{out}' already exists; pass --overwrite to replace it")
    ref = load_model(reference, "REFERENCE")
    mod = load_model(model, "MODEL")
    check_compatible(ref, mod)
    spec = load_spec(spec_file, mod, residual)
    if method == "weight":
        perms = weight_matching(spec, ref.state, mod.state, max_iter=max_iter, seed=seed)
    else:
        tok_dir = ref.path if not ref.is_file else None
        fa = collect_activations(ref, spec, calibration, tok_dir, activation=activation)
        fb = collect_activations(mod, spec, calibration, tok_dir, activation=activation)
        perms = activation_matching(spec, fa, fb)
    aligned = apply_permutations(mod.state, spec, perms)
    keys = list(spec.axes)
    before = weight_distance(ref.state, mod.state, keys)
    after = weight_distance(ref.state, aligned, keys)
    if write and out is not None:
        extra = {"reference": str(Path(reference).resolve()), "model": str(Path(model).resolve()), "method": method,
                 "spec": spec.kind, "distance_before": before, "distance_after": after,
                 "permutations": {k: v.tolist() for k, v in perms.items()}}
        write_checkpoint(mod, aligned, Path(out), overwrite, extra)
    return AlignResult(Path(out) if out else None, perms, spec, before, after, time.time() - t0)
