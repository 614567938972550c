"""``mergelab moe``: a Mixtral / Qwen2-MoE / Qwen3-MoE model from dense experts (mergekit-moe's "clown car").

Every input's MLP becomes one routed expert of every layer; attention, norms, embeddings, LM head and
tokenizer come from ``base_model``; the routers come from :mod:`mergelab.moe.gates`. Everything is
checked before the output folder is created (bad input writes nothing); tensors are then streamed
from the inputs into shards of ``OUT.partial`` (one expert's MLP in memory at a time), the routing
of each expert's own prompts through the finished MoE is measured (``moe_routing.json``), and the
folder is renamed to ``OUT``.

Output layout: the one the installed transformers' modeling code declares (transformers 5:
``mlp.experts.gate_up_proj`` [E, 2I, H] with the gate in rows [0, I) and up in [I, 2I), and
``mlp.experts.down_proj`` [E, H, I]), so the folder loads without conversion. mergekit-moe 0.1.5
writes Mixtral and Qwen3-MoE that way but Qwen2-MoE per expert (``mlp.experts.{e}.gate_proj.weight``,
converted by transformers on load); the tensors are the same numbers.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch

from mergelab.errors import CheckpointError, RecipeError
from mergelab.io.checkpoint import Checkpoint
from mergelab.io.output import (copy_donor_files, prepare_output, publish, versions, write_manifest)
from mergelab.io.writer import ShardWriter, layout_shards, parse_size
from mergelab.moe import gates as gate_fns
from mergelab.moe.config import MIXTRAL, QWEN2_MOE, QWEN3_MOE, RANDOM_MODES, MoEConfig, OutputArch, load, \
    model_config, select_arch

MLP_PARTS = ("gate_proj", "up_proj", "down_proj")
ROUTING_FILE = "moe_routing.json"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def pack_per_expert(tensors: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """``tensors`` with mergekit-moe's per-expert MLP layout (``...mlp.experts.{e}.{gate,up,down}_proj.weight``,
    its Qwen2-MoE output) packed into the layout this module writes, as transformers 5 packs it on load
    (``experts.gate_up_proj`` [E, 2I, H] gate rows first, ``experts.down_proj`` [E, H, I]); other tensors
    unchanged. Lets a mergekit-moe output be compared tensor by tensor with ``build_moe``'s."""
    def expert_index(key: str) -> str:
        return key.split(".mlp.experts.", 1)[1].split(".", 1)[0] if ".mlp.experts." in key else ""

    per = {k for k in tensors if expert_index(k).isdigit()}
    out = {k: v for k, v in tensors.items() if k not in per}
    for pre in sorted({k.split(".mlp.experts.")[0] for k in per}):
        e = f"{pre}.mlp.experts"
        n = len({expert_index(k) for k in per if k.startswith(e + ".")})
        out[f"{e}.gate_up_proj"] = torch.stack([torch.cat([tensors[f"{e}.{i}.gate_proj.weight"],
                                                           tensors[f"{e}.{i}.up_proj.weight"]]) for i in range(n)])
        out[f"{e}.down_proj"] = torch.stack([tensors[f"{e}.{i}.down_proj.weight"] for i in range(n)])
    return out


@dataclass
class MoEResult:
    out: Path
    arch: str
    seconds: float
    peak_rss_bytes: int
    routing: Optional[dict]
    warnings: List[str]


def _peak_rss() -> int:
    from mergelab.merge import peak_rss_bytes

    return peak_rss_bytes()


def _out_dtype(cfg: MoEConfig, base_cfg: dict) -> torch.dtype:
    name = cfg.dtype or base_cfg.get("torch_dtype") or base_cfg.get("dtype") or "float32"
    if name not in _TORCH_DTYPES:
        raise RecipeError(f"dtype: the base's dtype '{name}' is not float32, bfloat16 or float16; set dtype")
    return _TORCH_DTYPES[name]


class _Inputs:
    """The opened models and the checks across them (shapes, tensors, biases)."""

    def __init__(self, cfg: MoEConfig, allow_all_same: bool):
        self.cfg = cfg
        self.configs = {"base_model": model_config(cfg.base_model, "base_model")}
        for e in cfg.experts + cfg.shared_experts:
            self.configs[e.where] = model_config(e.source_model, f"{e.where}.source_model")
        self.arch = select_arch(cfg, {k: v.get("model_type") for k, v in self.configs.items()})
        if not allow_all_same and len(cfg.experts) > 1:
            paths = {Path(e.source_model).expanduser().resolve() for e in cfg.experts}
            if len(paths) == 1:
                raise RecipeError("experts[*].source_model: every expert is the same model, so the MoE would only "
                                  "cost more; pass --i-understand-this-is-not-useful-without-training to build "
                                  "it anyway (for training afterwards)")
        self.ckpts: Dict[str, Checkpoint] = {}
        for where, ref in [("base_model", cfg.base_model)] + [(e.where, e.source_model)
                                                              for e in cfg.experts + cfg.shared_experts]:
            try:
                self.ckpts[where] = Checkpoint.open(str(ref), where)
            except CheckpointError as e:
                raise CheckpointError(f"{where}: {e}")
        base = self.configs["base_model"]
        for key in ("hidden_size", "num_hidden_layers"):
            if not isinstance(base.get(key), int):
                raise CheckpointError(f"base_model: config.json of '{cfg.base_model}' has no integer '{key}'")
        self.layers = base["num_hidden_layers"]
        self.hidden = base["hidden_size"]
        for where, c in self.configs.items():
            for key in ("hidden_size", "num_hidden_layers", "intermediate_size", "hidden_act"):
                if c.get(key) != base.get(key):
                    raise RecipeError(f"{where}.source_model: '{key}' is {c.get(key)!r} but the base's is "
                                      f"{base.get(key)!r}; every expert must have the base's shape and activation")
        self._check_tensors()

    def _check_tensors(self) -> None:
        base = self.ckpts["base_model"]
        ref_shapes = {}
        for l in range(self.layers):
            for part in MLP_PARTS:
                name = f"model.layers.{l}.mlp.{part}.weight"
                if name not in base.tensors:
                    raise CheckpointError(f"base_model: '{self.cfg.base_model}' has no tensor '{name}' (expected a "
                                          f"dense Llama/Mistral/Qwen decoder)")
                ref_shapes[name] = base.tensors[name].shape
        for e in self.cfg.experts + self.cfg.shared_experts:
            ck = self.ckpts[e.where]
            for name, shape in ref_shapes.items():
                if name not in ck.tensors:
                    raise CheckpointError(f"{e.where}.source_model: '{e.source_model}' has no tensor '{name}'")
                if tuple(ck.tensors[name].shape) != tuple(shape):
                    raise RecipeError(f"{e.where}.source_model: tensor '{name}' is {list(ck.tensors[name].shape)} "
                                      f"but the base's is {list(shape)}; experts must have the base's shapes")
            for name in ck.tensors:
                if ".mlp." in name and name.endswith(".bias"):
                    raise CheckpointError(f"{e.where}.source_model: tensor '{name}' is an MLP bias, which "
                                          f"{self.arch.architecture} experts cannot hold")
        for name in base.tensors:
            if name.endswith(".bias") and ".mlp." in name:
                raise CheckpointError(f"base_model: tensor '{name}' is an MLP bias, which {self.arch.architecture} "
                                      f"cannot hold")
            if name.endswith(".bias") and ".self_attn." in name:
                holds = {MIXTRAL: (), QWEN2_MOE: ("q_proj", "k_proj", "v_proj"),
                         QWEN3_MOE: ("q_proj", "k_proj", "v_proj", "o_proj")}[self.arch]
                if not any(f".{p}.bias" in name for p in holds):
                    raise CheckpointError(f"base_model: tensor '{name}' is an attention bias, which "
                                          f"{self.arch.architecture} cannot hold (attention_bias); it would be lost")


def _output_config(arch: OutputArch, cfg: MoEConfig, base_dir: str, dtype: torch.dtype, inputs: _Inputs) -> dict:
    """The output ``config.json``: the base's config (rope, tie, norms, vocabulary kept as they are) as
    the output architecture's config class reads it, with the MoE fields set as mergekit-moe sets them."""
    import transformers
    from transformers import AutoConfig

    base = AutoConfig.from_pretrained(base_dir)
    d = base.to_dict()
    for k in ("model_type", "architectures", "transformers_version", "auto_map"):
        d.pop(k, None)
    E, k = len(cfg.experts), cfg.experts_per_token
    if arch is MIXTRAL:
        out = transformers.MixtralConfig(**d)
        out.num_local_experts = E
        out.sliding_window = None
    elif arch is QWEN2_MOE:
        out = transformers.Qwen2MoeConfig(**d)
        out.num_experts = E
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.sliding_window = None
        out.use_sliding_window = False
        out.mlp_only_layers = []
        out.shared_expert_intermediate_size = inputs.configs["base_model"]["intermediate_size"]
        out.moe_intermediate_size = inputs.configs["base_model"]["intermediate_size"]
        out.qkv_bias = True
    else:
        out = transformers.Qwen3MoeConfig(**d)
        out.num_experts = E
        out.decoder_sparse_step = 1
        out.norm_topk_prob = True
        out.mlp_only_layers = []
        out.moe_intermediate_size = inputs.configs["base_model"]["intermediate_size"]
    out.num_experts_per_tok = k
    out.architectures = [arch.architecture]
    out.dtype = str(dtype).replace("torch.", "")
    data = json.loads(out.to_json_string(use_diff=True))  # what save_pretrained writes
    data["model_type"] = arch.model_type
    return data


def _head_dim(config: dict) -> int:
    return config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]


class _Plan:
    """Every output tensor: name, dtype, shape, and how to produce it."""

    def __init__(self, inputs: _Inputs, dtype: torch.dtype, gates: torch.Tensor):
        self.inputs = inputs
        self.dtype = dtype
        self.gates = gates
        cfg, arch = inputs.cfg, inputs.arch
        base = inputs.ckpts["base_model"]
        self.entries: List[Tuple[str, torch.dtype, tuple]] = []
        self.producers: Dict[str, Callable] = {}
        base_cfg = inputs.configs["base_model"]
        if "lm_head.weight" not in base.tensors and not base_cfg.get("tie_word_embeddings", False):
            raise CheckpointError("base_model: has no 'lm_head.weight' and its config does not tie it to the "
                                  "embeddings (tie_word_embeddings)")
        for name, info in base.tensors.items():
            if ".mlp." in name or name.endswith("rotary_emb.inv_freq"):
                continue
            dt = dtype if info.is_float else info.dtype
            self._add(name, dt, info.shape, lambda n=name, d=dt: base.read(n).to(d))
        E, H = len(cfg.experts), inputs.hidden
        inter = base.tensors["model.layers.0.mlp.gate_proj.weight"].shape[0]
        for l in range(inputs.layers):
            if arch is QWEN2_MOE:
                for p, rows in (("q_proj", base_cfg["num_attention_heads"]),
                                ("k_proj", base_cfg.get("num_key_value_heads") or base_cfg["num_attention_heads"]),
                                ("v_proj", base_cfg.get("num_key_value_heads") or base_cfg["num_attention_heads"])):
                    name = f"model.layers.{l}.self_attn.{p}.bias"
                    if name not in base.tensors:  # a Llama/Mistral base: Qwen2-MoE's attention has q/k/v biases
                        n = rows * _head_dim(base_cfg)
                        self._add(name, dtype, (n,), lambda n=n: torch.zeros(n, dtype=dtype))
            pre = f"model.layers.{l}.mlp"
            self._add(f"{pre}.experts.gate_up_proj", dtype, (E, 2 * inter, H), None)
            self._add(f"{pre}.experts.down_proj", dtype, (E, H, inter), None)
            self._add(f"{pre}.gate.weight", dtype, (E, H),
                      lambda l=l: gates[l, :E].to(dtype).contiguous())
            if arch is QWEN2_MOE:
                shared = cfg.shared_experts[0]
                for part in MLP_PARTS:
                    src = f"{pre}.{part}.weight"
                    self._add(f"{pre}.shared_expert.{part}.weight", dtype,
                              inputs.ckpts[shared.where].tensors[src].shape,
                              lambda s=src, part=part: self.expert_tensor(shared, s, part == "down_proj"))
                self._add(f"{pre}.shared_expert_gate.weight", dtype, (1, H),
                          lambda l=l: gates[l, E:E + 1].to(dtype).contiguous())
        self._noise = torch.Generator().manual_seed(cfg.seed + 1)

    def _add(self, name, dtype, shape, producer) -> None:
        self.entries.append((name, dtype, tuple(shape)))
        self.producers[name] = producer

    def expert_tensor(self, expert, name: str, residual: bool) -> torch.Tensor:
        """One MLP tensor of ``expert`` with its noise and residual scale (mergekit's noise_and_scale),
        computed in the stored dtype, then cast to the output dtype."""
        t = self.inputs.ckpts[expert.where].read(name)
        if expert.noise_scale is not None:
            t = t + torch.randn(t.shape, generator=self._noise, dtype=torch.float32).to(t.dtype) * expert.noise_scale
        if residual and expert.residual_scale is not None:
            t = t * expert.residual_scale
        return t.to(self.dtype)

    def write(self, writer: ShardWriter, log: Callable) -> None:
        cfg = self.inputs.cfg
        for name, _, _ in self.entries:
            producer = self.producers[name]
            if producer is not None:
                writer.write(name, producer())
                continue
            # packed experts, one expert (rows e of dim 0) at a time
            pre = name.rsplit(".experts.", 1)[0]
            for e, expert in enumerate(cfg.experts):
                if name.endswith("gate_up_proj"):
                    t = torch.cat([self.expert_tensor(expert, f"{pre}.gate_proj.weight", False),
                                   self.expert_tensor(expert, f"{pre}.up_proj.weight", False)], dim=0)
                else:
                    t = self.expert_tensor(expert, f"{pre}.down_proj.weight", True)
                writer.write(name, t.unsqueeze(0), row_start=e)


def routing_report(folder: Path, cfg: MoEConfig, tok, arch: OutputArch) -> dict:
    """Where each expert's own positive prompts go in the built MoE. Per expert: the share of its
    prompts' real (non-pad) tokens, over all layers, whose top-1 routed expert is itself
    (``share_top1_tokens``); the same share at each prompt's last token, the position ``hidden`` gates
    are built from (``share_top1_last_token``); and the share of its prompts whose most frequent top-1
    expert, over their tokens and layers, is itself (``share_prompts_majority``)."""
    from mergelab.moe.stream import StreamedDecoder

    model = StreamedDecoder(folder, torch.float32, "output")
    E = len(cfg.experts)
    picks: List[torch.Tensor] = []

    def take(idx: int, output) -> None:
        picks.append(output[2][:, 0].clone())  # router returns (logits, top-k weights, top-k indices)

    model.module_output["mlp.gate"] = take
    experts = []
    for i, e in enumerate(cfg.experts):
        if not e.positive_prompts:
            continue
        enc = gate_fns.tokenize(tok, e.positive_prompts)
        picks.clear()
        model.forward(**enc)
        top1 = torch.stack(picks).reshape(len(picks), *enc["input_ids"].shape)  # [L, B, T]
        real = enc["attention_mask"].bool().unsqueeze(0).expand_as(top1)
        counts = torch.bincount(top1[real], minlength=E)
        last = top1[:, :, -1]
        last_counts = torch.bincount(last.reshape(-1), minlength=E)
        majority = [int(torch.bincount(top1[:, b][real[:, b]], minlength=E).argmax()) for b in range(top1.shape[1])]
        experts.append({
            "expert": i, "source_model": e.source_model, "prompts": len(e.positive_prompts),
            "share_top1_tokens": float(counts[i]) / max(1, int(counts.sum())),
            "share_top1_last_token": float(last_counts[i]) / max(1, int(last_counts.sum())),
            "share_prompts_majority": sum(m == i for m in majority) / len(majority),
            "top1_counts_tokens": counts.tolist(),
            "per_layer_share_top1_tokens": [
                float((top1[l][real[l]] == i).float().mean()) for l in range(top1.shape[0])],
        })
    return {"experts": experts, "chance": 1.0 / E, "gate_mode": cfg.gate_mode, "architecture": arch.architecture,
            "how": "positive prompts of each expert through the built MoE (float32); top-1 routed expert per "
                   "real token and layer"}


def build_moe(config_path: Path, out: Path, *, overwrite: bool = False, shard_size: str = "5GB",
              allow_all_same: bool = False, routing: bool = True, log: Callable = lambda m: None) -> MoEResult:
    """Build the MoE described by the mergekit-moe YAML ``config_path`` into the folder ``out``."""
    started = time.perf_counter()
    cfg = load(Path(config_path))
    inputs = _Inputs(cfg, allow_all_same)
    arch = inputs.arch
    base_cfg = inputs.configs["base_model"]
    dtype = _out_dtype(cfg, base_cfg)
    out_config = _output_config(arch, cfg, cfg.base_model, dtype, inputs)
    has_prompts = any(e.positive_prompts for e in cfg.experts)
    tok = gate_fns.load_tokenizer(cfg.base_model) if cfg.gate_mode not in RANDOM_MODES or (routing and has_prompts) \
        else None
    need = list(cfg.experts)
    if cfg.shared_experts and (cfg.shared_experts[0].positive_prompts or cfg.gate_mode in RANDOM_MODES):
        need += cfg.shared_experts
    log(f"{arch.architecture}: {len(cfg.experts)} experts, top-{cfg.experts_per_token}, gates '{cfg.gate_mode}'")
    if cfg.gate_mode in RANDOM_MODES:
        gates = gate_fns.random_gates(inputs.layers, len(need), inputs.hidden, cfg.gate_mode, cfg.seed)
    elif cfg.gate_mode == "fitted":
        gates = gate_fns.fitted_gates(cfg.base_model, tok, need, log=log)
    elif cfg.gate_mode == "cheap_embed":
        gates = gate_fns.cheap_embed_gates(cfg.base_model, tok, need, inputs.layers, base_cfg.get("vocab_size"))
    else:
        gates = gate_fns.hidden_gates(cfg.base_model, tok, need, average=cfg.gate_mode == "hidden_avg",
                                      source=cfg.gate_source, log=log)
    warnings = []
    degenerate = gate_fns.degenerate_layers(gates)
    if degenerate and cfg.gate_mode not in RANDOM_MODES + ("fitted",):
        warnings.append(f"layers {degenerate} have nearly dependent router rows (condition number > 5): the prompts "
                        f"of different experts are too alike, some experts will be underused")
    plan = _Plan(inputs, dtype, gates)
    shards = layout_shards(plan.entries, parse_size(shard_size))
    inputs_paths = [cfg.base_model] + [e.source_model for e in cfg.experts + cfg.shared_experts]
    partial, _ = prepare_output(Path(out), inputs_paths, overwrite, resume=False)
    writer = None
    try:
        writer = ShardWriter(partial, shards, fingerprint=f"moe:{time.time_ns()}")
        plan.write(writer, log)
        writer.finish()
        writer.forget_progress()
        (partial / "config.json").write_text(json.dumps(out_config, indent=2, sort_keys=True) + "\n")
        copy_donor_files(Path(cfg.base_model), partial)
        (partial / "mergekit_moe_config.yml").write_text(cfg.source)
        report = None
        if routing and has_prompts:
            log("routing each expert's prompts through the MoE ...")
            report = routing_report(partial, cfg, tok, arch)
            (partial / ROUTING_FILE).write_text(json.dumps(report, indent=2) + "\n")
        write_manifest(partial, {
            "command": "moe", "architecture": arch.architecture, "gate_mode": cfg.gate_mode,
            "gate_source": cfg.gate_source, "experts": [e.source_model for e in cfg.experts],
            "shared_experts": [e.source_model for e in cfg.shared_experts],
            "base_model": cfg.base_model, "dtype": str(dtype).replace("torch.", ""), "seed": cfg.seed,
            "warnings": warnings, "versions": versions(), "seconds": time.perf_counter() - started,
            "peak_rss_bytes": _peak_rss(),
        })
        publish(partial, Path(out), overwrite)
    except BaseException:
        if writer is not None:
            writer.close()
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return MoEResult(Path(out), arch.architecture, time.perf_counter() - started, _peak_rss(), report, warnings)
