"""Permutation specs: which axes of which tensors share one hidden-unit permutation.

A :class:`PermutationSpec` follows Git Re-Basin's ``axes_to_perm`` (Ainsworth et al., ICLR 2023,
arXiv 2209.04836): every tensor lists, per axis, the permutation acting on it or ``None``. A
permutation is stored as an index vector ``pi`` over its *canonical units*: position ``i`` of the
aligned model takes unit ``pi[i]`` of the original (``aligned = original[pi]``).

Axes see their permutation through a *role*:

* ``plain``: the axis is the canonical units (MLP hidden units, conv channels, the residual stream);
* ``expand`` (``repeat=k``): each unit covers ``k`` consecutive indices (conv channels flattened into
  a linear layer's input, ``c*k + s``);
* attention (``kind="heads"``, ``n_kv`` heads of ``head_dim`` dims, ``group`` query heads per KV head):
  the canonical units are the value dims ``kv_head*head_dim + t``. ``pi`` must move whole heads
  (``pi[k*d:(k+1)*d]`` all lie in one head ``sigma[k]``) and may permute dims within a head. Roles
  ``vo_v`` (value output), ``vo_o`` (output-projection input: every query head of a group carries its
  KV head's permutation), ``qk_k`` and ``qk_q`` (query/key outputs: whole heads only, the dims inside a
  head never move, so rotary pairs ``(t, t + d/2)`` and their frequencies stay together under RoPE).

Applying the permutations of a valid spec leaves the network's function unchanged: the residual
stream ``res`` is shared by every embedding column, norm gain and bias, block input and block output
(norm statistics are invariant to a permutation of the features), ``mlp.L`` by the intermediate units
of block ``L``, ``attn.L`` by the heads of block ``L`` (Verma & Elbayad, arXiv 2403.00986).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict, List, Mapping, Optional, Tuple

import torch

from mergelab.errors import MergeLabError

ROLES = ("plain", "expand", "vo_v", "vo_o", "qk_q", "qk_k")


@dataclass(frozen=True)
class Axis:
    """One tensor axis acted on by permutation ``perm`` through ``role`` (see the module docstring)."""

    perm: str
    role: str = "plain"
    repeat: int = 1


@dataclass(frozen=True)
class Perm:
    """A permutation group: ``size`` canonical units; ``kind`` ``plain`` or ``heads``."""

    name: str
    size: int
    kind: str = "plain"
    head_dim: int = 1
    group: int = 1

    @property
    def n_heads(self) -> int:
        return self.size // self.head_dim


@dataclass
class PermutationSpec:
    """``perms``: the groups; ``axes``: tensor name -> per-axis :class:`Axis` or ``None``."""

    perms: Dict[str, Perm]
    axes: Dict[str, Tuple[Optional[Axis], ...]]
    kind: str = "custom"
    notes: List[str] = field(default_factory=list)

    def members(self, name: str) -> List[Tuple[str, int, Axis]]:
        """``(tensor, axis index, Axis)`` for every axis permuted by ``name``."""
        return [(k, i, a) for k, axes in self.axes.items() for i, a in enumerate(axes) if a is not None and a.perm == name]

    def check(self, shapes: Mapping[str, tuple], where: str = "the model") -> None:
        """Every tensor of the spec exists with the rank and axis lengths the spec implies."""
        for key, axes in self.axes.items():
            if key not in shapes:
                raise MergeLabError(f"the permutation spec names tensor '{key}', which {where} does not have")
            shape = shapes[key]
            if len(shape) != len(axes):
                raise MergeLabError(f"the permutation spec gives {len(axes)} axes for tensor '{key}', but in "
                                    f"{where} it has shape {tuple(shape)}")
            for i, a in enumerate(axes):
                if a is None:
                    continue
                if a.perm not in self.perms:
                    raise MergeLabError(f"tensor '{key}' axis {i} names permutation '{a.perm}', which the spec "
                                        f"does not define")
                want = axis_length(self.perms[a.perm], a)
                if shape[i] != want:
                    raise MergeLabError(f"tensor '{key}' axis {i} has length {shape[i]} in {where}, but permutation "
                                        f"'{a.perm}' ({a.role}) needs {want}")


def axis_length(p: Perm, a: Axis) -> int:
    if a.role == "plain" or a.role == "vo_v" or a.role == "qk_k":
        return p.size
    if a.role == "expand":
        return p.size * a.repeat
    if a.role in ("vo_o", "qk_q"):
        return p.size * p.group
    raise MergeLabError(f"unknown permutation role '{a.role}' (expected one of {', '.join(ROLES)})")


def head_sigma(p: Perm, pi: torch.Tensor) -> torch.Tensor:
    """The head permutation ``sigma`` of a heads-kind ``pi`` (the head each aligned head comes from)."""
    return pi.view(p.n_heads, p.head_dim)[:, 0] // p.head_dim


def index_vector(p: Perm, a: Axis, pi: torch.Tensor) -> torch.Tensor:
    """The gather index along one axis: aligned position -> original index."""
    d, g = p.head_dim, p.group
    if a.role in ("plain", "vo_v"):
        return pi
    if a.role == "expand":
        return (pi[:, None] * a.repeat + torch.arange(a.repeat)).reshape(-1)
    P = pi.view(p.n_heads, d)
    t = torch.arange(d)
    r = torch.arange(g)
    if a.role == "vo_o":
        head, within = P // d, P % d
        return ((head[:, None, :] * g + r[None, :, None]) * d + within[:, None, :]).reshape(-1)
    sigma = P[:, 0] // d
    if a.role == "qk_k":
        return (sigma[:, None] * d + t[None, :]).reshape(-1)
    if a.role == "qk_q":
        return ((sigma[:, None, None] * g + r[None, :, None]) * d + t[None, None, :]).reshape(-1)
    raise MergeLabError(f"unknown permutation role '{a.role}'")


def permute_tensor(w: torch.Tensor, axes: Tuple[Optional[Axis], ...], spec: PermutationSpec,
                   perms: Mapping[str, torch.Tensor], skip: Optional[str] = None) -> torch.Tensor:
    """``w`` with every axis's permutation applied (except those of permutation ``skip``)."""
    for i, a in enumerate(axes):
        if a is None or a.perm == skip or a.perm not in perms:
            continue
        w = w.index_select(i, index_vector(spec.perms[a.perm], a, perms[a.perm]))
    return w


def apply_permutations(state: Mapping[str, torch.Tensor], spec: PermutationSpec,
                       perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """A new state dict: every tensor of the spec permuted, the others unchanged (same objects)."""
    out = {}
    for k, v in state.items():
        out[k] = permute_tensor(v, spec.axes[k], spec, perms).contiguous() if k in spec.axes else v
    return out


def identity(spec: PermutationSpec) -> Dict[str, torch.Tensor]:
    return {n: torch.arange(p.size) for n, p in spec.perms.items()}


def random_permutations(spec: PermutationSpec, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """A random *valid* permutation per group (heads moved whole, dims permuted inside value heads only)."""
    out = {}
    for n, p in spec.perms.items():
        if p.kind == "heads":
            sigma = torch.randperm(p.n_heads, generator=generator)
            within = torch.stack([torch.randperm(p.head_dim, generator=generator) for _ in range(p.n_heads)])
            out[n] = (sigma[:, None] * p.head_dim + within).reshape(-1)
        else:
            out[n] = torch.randperm(p.size, generator=generator)
    return out


def invert(perms: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {n: torch.argsort(pi) for n, pi in perms.items()}


# --------------------------------------------------------------------------- spec builders
def _find(keys, suffix: str) -> Optional[str]:
    hits = [k for k in keys if k == suffix or k.endswith("." + suffix)]
    return hits[0][: len(hits[0]) - len(suffix)] if hits else None


def bert_spec(config: dict, shapes: Mapping[str, tuple], residual: bool = True) -> PermutationSpec:
    """BERT encoders (``BertModel`` keys, with or without a ``bert.`` prefix).

    The residual stream includes the word/position/type embedding columns and every LayerNorm; the
    pooler's input takes it (its output, the model output, stays put); a classifier on the pooler is
    untouched. Query/key dims inside a head are left in place (whole heads move).
    """
    pre = _find(shapes, "embeddings.word_embeddings.weight")
    if pre is None:
        raise MergeLabError("not a BERT checkpoint: no 'embeddings.word_embeddings.weight' tensor")
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    d = h // heads
    layers = config["num_hidden_layers"]
    _check_depth(shapes, pre + "encoder.layer.", layers)
    R = Axis("res") if residual else None
    perms: Dict[str, Perm] = {"res": Perm("res", h)} if residual else {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {}
    e = pre + "embeddings."
    for k in ("word_embeddings.weight", "position_embeddings.weight", "token_type_embeddings.weight"):
        if e + k in shapes:
            axes[e + k] = (None, R)
    axes[e + "LayerNorm.weight"] = (R,)
    axes[e + "LayerNorm.bias"] = (R,)
    for L in range(layers):
        b = f"{pre}encoder.layer.{L}."
        A, M = f"attn.{L}", f"mlp.{L}"
        perms[A] = Perm(A, h, "heads", d, 1)
        inter = shapes[b + "intermediate.dense.weight"][0]
        perms[M] = Perm(M, inter)
        for k, role in (("query", "qk_q"), ("key", "qk_k"), ("value", "vo_v")):
            axes[f"{b}attention.self.{k}.weight"] = (Axis(A, role), R)
            axes[f"{b}attention.self.{k}.bias"] = (Axis(A, role),)
        axes[b + "attention.output.dense.weight"] = (R, Axis(A, "vo_o"))
        axes[b + "attention.output.dense.bias"] = (R,)
        axes[b + "attention.output.LayerNorm.weight"] = (R,)
        axes[b + "attention.output.LayerNorm.bias"] = (R,)
        axes[b + "intermediate.dense.weight"] = (Axis(M), R)
        axes[b + "intermediate.dense.bias"] = (Axis(M),)
        axes[b + "output.dense.weight"] = (R, Axis(M))
        axes[b + "output.dense.bias"] = (R,)
        axes[b + "output.LayerNorm.weight"] = (R,)
        axes[b + "output.LayerNorm.bias"] = (R,)
    if pre + "pooler.dense.weight" in shapes:
        axes[pre + "pooler.dense.weight"] = (None, R)
    _check_known(shapes, axes, "bert", ("position_ids", "pooler.dense.bias", "classifier.weight", "classifier.bias"))
    axes = {k: v for k, v in axes.items() if k in shapes and any(a is not None for a in v)}
    return PermutationSpec(perms, axes, "bert")


def llama_spec(config: dict, shapes: Mapping[str, tuple], residual: bool = True) -> PermutationSpec:
    """Llama-layout decoders (Llama, Mistral, Qwen2: ``model.layers.L.self_attn/mlp``, RMSNorm).

    KV heads move as whole heads and carry their group of query heads; query/key dims inside a head never
    move (RoPE pairs dim ``t`` with ``t + d/2`` at a fixed frequency, so only the identity commutes with
    it); value/output dims may move inside a head. ``residual=False`` keeps the residual stream in place.
    """
    pre = _find(shapes, "embed_tokens.weight")
    if pre is None:
        raise MergeLabError("not a Llama-layout checkpoint: no 'embed_tokens.weight' tensor")
    h = config["hidden_size"]
    heads = config["num_attention_heads"]
    kv = config.get("num_key_value_heads") or heads
    d = config.get("head_dim") or h // heads
    layers = config["num_hidden_layers"]
    g = heads // kv
    _check_depth(shapes, pre + "layers.", layers)
    R = Axis("res") if residual else None
    perms: Dict[str, Perm] = {"res": Perm("res", h)} if residual else {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {pre + "embed_tokens.weight": (None, R), pre + "norm.weight": (R,)}
    for L in range(layers):
        b = f"{pre}layers.{L}."
        A, M = f"attn.{L}", f"mlp.{L}"
        perms[A] = Perm(A, kv * d, "heads", d, g)
        perms[M] = Perm(M, shapes[b + "mlp.gate_proj.weight"][0])
        for k, role in (("q_proj", "qk_q"), ("k_proj", "qk_k"), ("v_proj", "vo_v")):
            axes[f"{b}self_attn.{k}.weight"] = (Axis(A, role), R)
            axes[f"{b}self_attn.{k}.bias"] = (Axis(A, role),)
        axes[b + "self_attn.o_proj.weight"] = (R, Axis(A, "vo_o"))
        axes[b + "self_attn.o_proj.bias"] = (R,)
        axes[b + "input_layernorm.weight"] = (R,)
        axes[b + "post_attention_layernorm.weight"] = (R,)
        axes[b + "mlp.gate_proj.weight"] = (Axis(M), R)
        axes[b + "mlp.up_proj.weight"] = (Axis(M), R)
        axes[b + "mlp.down_proj.weight"] = (R, Axis(M))
        axes[b + "mlp.gate_proj.bias"] = (Axis(M),)
        axes[b + "mlp.up_proj.bias"] = (Axis(M),)
        axes[b + "mlp.down_proj.bias"] = (R,)
    for k in shapes:
        if k.endswith("lm_head.weight"):
            axes[k] = (None, R)
    _check_known(shapes, axes, "llama", ("rotary_emb.inv_freq", "self_attn.q_norm.weight", "self_attn.k_norm.weight"))
    axes = {k: v for k, v in axes.items() if k in shapes and any(a is not None for a in v)}
    return PermutationSpec(perms, axes, "llama")


def _check_known(shapes, axes, kind: str, untouched: tuple) -> None:
    """Every tensor is either placed by the spec or known not to see a permuted axis (a head on the
    pooler, per-head q/k norms, buffers); anything else (an MLM head, say) could break the function."""
    for k in shapes:
        if k not in axes and not k.endswith(untouched):
            raise MergeLabError(f"align does not know where tensor '{k}' of this {kind} model sits (it may read the "
                                f"permuted residual stream); give a permutation spec with --spec")


def _check_depth(shapes, prefix: str, layers: int) -> None:
    found = {int(k[len(prefix):].split(".")[0]) for k in shapes if k.startswith(prefix)}
    if not found or max(found) + 1 != layers:
        raise MergeLabError(f"config.json says num_hidden_layers={layers} but the weights hold "
                            f"{max(found) + 1 if found else 0} blocks ('{prefix}N.')")


LLAMA_TYPES = ("llama", "mistral", "qwen2", "qwen3")
NORM_SUFFIXES = ("weight", "bias", "running_mean", "running_var")


def chain_spec(shapes: Mapping[str, tuple]) -> PermutationSpec:
    """A feed-forward chain (MLP or plain conv net) from a state dict's order, as PyTorch lists it.

    Layers are the modules with a 2-D (linear) or 4-D (conv) ``weight``; a module with only 1-D
    tensors after a layer (BatchNorm/LayerNorm: weight, bias, running stats) takes that layer's
    output permutation. Layer ``i``'s output and layer ``i+1``'s input share ``P{i}``; a conv followed
    by a linear layer whose input is ``channels * k`` uses the ``expand`` role (flattened ``C x H x W``).
    The chain's input and output axes stay fixed. Residual connections cannot be inferred: give a spec.
    """
    modules: List[Tuple[str, Dict[str, tuple]]] = []
    for k, s in shapes.items():
        mod, _, leaf = k.rpartition(".")
        if not modules or modules[-1][0] != mod:
            modules.append((mod, {}))
        modules[-1][1][leaf] = tuple(s)
    layers = [(m, t) for m, t in modules if len(t.get("weight", ())) in (2, 4)]
    if len(layers) < 2:
        raise MergeLabError("cannot infer a permutation spec: fewer than two linear/conv layers (give --spec)")
    perms: Dict[str, Perm] = {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {}
    current: Optional[Axis] = None
    li = 0
    for m, t in modules:
        p = (m + ".") if m else ""
        w = t.get("weight")
        if w is not None and len(w) in (2, 4):
            out_axis: Optional[Axis] = None
            if li < len(layers) - 1:
                name = f"P{li}"
                perms[name] = Perm(name, w[0])
                out_axis = Axis(name)
            in_axis = None
            if current is not None:
                size = perms[current.perm].size
                if w[1] == size:
                    in_axis = current
                elif len(w) == 2 and w[1] % size == 0:
                    in_axis = Axis(current.perm, "expand", w[1] // size)
                else:
                    raise MergeLabError(f"cannot infer a permutation spec: layer '{m}' takes {w[1]} inputs but the "
                                        f"previous layer gives {size} (a residual or reshaping net: give --spec)")
            axes[p + "weight"] = (out_axis, in_axis) + (None,) * (len(w) - 2)
            if "bias" in t:
                axes[p + "bias"] = (out_axis,)
            current = out_axis
            li += 1
        elif current is not None:
            for leaf, s in t.items():
                if leaf in NORM_SUFFIXES and len(s) == 1 and s[0] == perms[current.perm].size:
                    axes[p + leaf] = (current,)
                elif len(s) == 0:
                    continue
                else:
                    raise MergeLabError(f"cannot infer a permutation spec: tensor '{p + leaf}' of shape {s} is "
                                        f"not a linear/conv layer or a norm of the previous layer (give --spec)")
    return PermutationSpec(perms, {k: v for k, v in axes.items() if any(a is not None for a in v)}, "chain")


def spec_from_mapping(data: Mapping, shapes: Mapping[str, tuple], where: str = "spec") -> PermutationSpec:
    """A spec from a JSON/YAML mapping ``{"axes": {tensor: [perm | null | {perm, role, repeat}, ...]},
    "heads": {perm: {head_dim, group}}}``; group sizes come from the tensors' shapes."""
    if not isinstance(data, Mapping) or not isinstance(data.get("axes"), Mapping):
        raise MergeLabError(f"{where}: expected a mapping with an 'axes' mapping (tensor -> list of permutation "
                            f"names or null per axis)")
    heads = data.get("heads") or {}
    axes: Dict[str, Tuple[Optional[Axis], ...]] = {}
    sizes: Dict[str, int] = {}
    for key, lst in data["axes"].items():
        if key not in shapes:
            raise MergeLabError(f"{where}: tensor '{key}' is not in the model")
        if not isinstance(lst, list) or len(lst) != len(shapes[key]):
            raise MergeLabError(f"{where}: tensor '{key}' needs a list of {len(shapes[key])} entries (shape "
                                f"{tuple(shapes[key])}), got {lst!r}")
        row = []
        for i, entry in enumerate(lst):
            if entry is None:
                row.append(None)
                continue
            if isinstance(entry, str):
                a = Axis(entry)
            elif isinstance(entry, Mapping) and "perm" in entry:
                a = Axis(str(entry["perm"]), str(entry.get("role", "plain")), int(entry.get("repeat", 1)))
            else:
                raise MergeLabError(f"{where}: tensor '{key}' axis {i}: expected a permutation name, null or "
                                    f"{{perm, role, repeat}}, got {entry!r}")
            if a.role not in ROLES:
                raise MergeLabError(f"{where}: tensor '{key}' axis {i}: unknown role '{a.role}' (one of "
                                    f"{', '.join(ROLES)})")
            n = shapes[key][i]
            hd = heads.get(a.perm, {})
            n = n // a.repeat if a.role == "expand" else n // int(hd.get("group", 1)) if a.role in ("vo_o", "qk_q") else n
            if sizes.setdefault(a.perm, n) != n:
                raise MergeLabError(f"{where}: permutation '{a.perm}' has {sizes[a.perm]} units on one axis but "
                                    f"{n} on tensor '{key}' axis {i}")
            row.append(a)
        axes[key] = tuple(row)
    perms = {}
    for n, s in sizes.items():
        hd = heads.get(n)
        perms[n] = Perm(n, s, "heads", int(hd["head_dim"]), int(hd.get("group", 1))) if hd else Perm(n, s)
    spec = PermutationSpec(perms, axes, "custom")
    spec.check(shapes)
    return spec


def infer_spec(config: Optional[dict], shapes: Mapping[str, tuple], residual: bool = True) -> PermutationSpec:
    """The spec for a checkpoint: BERT or Llama layout from ``config.json``; for a state dict, the residual spec
    of :class:`mergelab.align.resnet.ResNet`'s layout when its tensor names are exactly that, else a
    feed-forward chain."""
    mt = (config or {}).get("model_type")
    if mt == "bert":
        return bert_spec(config, shapes, residual)
    if mt in LLAMA_TYPES:
        return llama_spec(config, shapes, residual)
    if mt is not None:
        raise MergeLabError(f"align does not know the '{mt}' architecture (known: bert, {', '.join(LLAMA_TYPES)}, "
                            f"and plain MLP/conv chains without config.json); give a permutation spec with --spec")
    from mergelab.align.resnet import layout_blocks, spec_mapping

    blocks = layout_blocks(shapes)
    if blocks is not None:  # its widths may chain (6 -> 5 -> 6), but a chain would break the skip connections
        return spec_from_mapping(spec_mapping(blocks), shapes, where="ResNet spec")
    return chain_spec(shapes)
