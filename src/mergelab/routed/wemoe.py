"""WEMoE: Weight-Ensembling Mixture of Experts (Tang et al., ICML 2024, "Merging Multi-Task Models via
Weight-Ensembling Mixture of Experts"; FusionBench's ``WeightEnsemblingMoE``, read for facts only).

1. Every tensor outside the MLP blocks is the task-arithmetic merge ``theta_0 + lambda sum_k tau_k``
   (``init_lambda`` 0.3), through mergelab's registry (``task_arithmetic``).
2. In each transformer layer ``l`` the MLP becomes a weight-ensembling MoE: its base is the
   **pretrained** MLP ``theta_0^{l,mlp}``, its experts the MLP task vectors ``tau_k^{l,mlp}``, and
   ``theta^l(x) = theta_0^{l,mlp} + sum_k w^l_k(x) tau_k^{l,mlp}`` (no softmax: the gate's raw outputs).
3. Router ``r^l`` on the hidden states entering the MLP: ``router_hidden_layers`` 2 (default):
   Linear(d, d) + ReLU -> Linear(d, K); 1: Linear(d, K); 0: a constant K-vector. Weights ~ N(0, 0.01^2),
   hidden bias 0, **output bias 0.3** (so the untrained model is the task-arithmetic model).
   ``w^l(x)`` is the mean over the input's real tokens of ``r^l(h)``; ``batch_reduce`` averages it over
   the batch too (one merged MLP per batch).
4. Only the routers are trained, by minimising the sum over tasks of the entropy of each task head's
   predictions on unlabelled inputs (:func:`mergelab.tune.adamerging.entropy_objective`, AdaMerging's
   objective): on the test inputs as the paper does (test-time adaptation, reported as such) or on
   validation inputs. Reference: Adam lr 1e-4, batch 16, 1000 steps.

The per-input MLP is never formed: ``f_{theta(x)}(h) = f_{theta_0}(h) + sum_k w_k f_{tau_k}(h)`` for the
linear maps (:mod:`mergelab.routed.layers`). Supported layouts: BERT (``intermediate.dense``,
``output.dense``) and Llama-style (``mlp.gate_proj/up_proj/down_proj``); another is an error.

Storage: ``merged.safetensors`` (one model: merged attention etc. plus the pretrained MLPs),
``experts.safetensors`` (``{task}/{tensor}``: the MLP task vectors), ``routers.safetensors``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.routed import store
from mergelab.routed.common import RoutedModel, build_module, check_inputs, masked_mean, merge_shared
from mergelab.routed.layers import Mixture, RoutedLinear, attach

# (path of the layer list, module whose input the router reads, the MLP's linear maps under a layer)
LAYOUTS = (
    ("encoder.layer", "intermediate", ("intermediate.dense", "output.dense")),
    ("layers", "mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
    ("model.layers", "mlp", ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")),
)


@dataclass
class WEMoEConfig:
    init_lambda: float = 0.3
    router_hidden_layers: int = 2
    batch_reduce: bool = False
    steps: int = 1000
    lr: float = 1e-4
    seed: int = 0

    def check(self) -> None:
        if self.router_hidden_layers not in (0, 1, 2):
            raise MergeLabError(f"wemoe: router_hidden_layers must be 0, 1 or 2, got {self.router_hidden_layers!r}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise MergeLabError(f"wemoe: steps must be an integer >= 0, got {self.steps!r}")
        if not float(self.lr) > 0:
            raise MergeLabError(f"wemoe: lr must be > 0, got {self.lr!r}")


class Gate(nn.Module):
    """The WEMoE router of one layer (see the module docstring)."""

    def __init__(self, d: int, k: int, hidden_layers: int = 2, init_lambda: float = 0.3):
        super().__init__()
        self.hidden_layers = hidden_layers
        if hidden_layers == 0:
            self.const = nn.Parameter(torch.full((k,), float(init_lambda)))
            return
        layers: List[nn.Module] = []
        if hidden_layers == 2:
            layers += [nn.Linear(d, d), nn.ReLU()]
        layers.append(nn.Linear(d, k))
        self.net = nn.Sequential(*layers)
        for m in self.net:
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, std=0.01)
                nn.init.zeros_(m.bias)
        nn.init.constant_(self.net[-1].bias, float(init_lambda))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        if self.hidden_layers == 0:
            return self.const.expand(*h.shape[:-1], -1)
        return self.net(h)


def find_layout(module: nn.Module) -> tuple:
    for path, router_in, linears in LAYOUTS:
        try:
            layers = module.get_submodule(path)
        except AttributeError:
            continue
        if isinstance(layers, nn.ModuleList) and len(layers) and all(
                _has(layers[0], n) for n in (router_in,) + linears):
            return path, router_in, linears, len(layers)
    raise MergeLabError(f"wemoe: no known MLP layout in {type(module).__name__} (supported: BERT "
                        "intermediate/output, Llama-style mlp.gate_proj/up_proj/down_proj)")


def _has(m: nn.Module, name: str) -> bool:
    try:
        m.get_submodule(name)
        return True
    except AttributeError:
        return False


def mlp_keys(module: nn.Module) -> List[str]:
    path, _, linears, n = find_layout(module)
    return [f"{path}.{i}.{lin}.{p}" for i in range(n) for lin in linears for p in ("weight", "bias")
            if getattr(module.get_submodule(f"{path}.{i}.{lin}"), p, None) is not None]


class WEMoEModel(RoutedModel):
    """A WEMoE-upscaled model (``forward(**batch)``; the task is not needed)."""

    method = "wemoe"

    def __init__(self, folder, manifest, config, heads, merged: Mapping[str, torch.Tensor],
                 experts: Sequence[Mapping[str, torch.Tensor]], routers: Optional[Mapping[str, torch.Tensor]] = None):
        module = build_module(config, manifest.get("model_class", "AutoModel"), merged)
        super().__init__(folder, manifest, config, module, heads)
        s = manifest["settings"]
        self.batch_reduce = bool(s.get("batch_reduce", False))
        path, router_in, linears, n = find_layout(module)
        d = config.hidden_size
        k = len(self.tasks)
        self.gates = nn.ModuleList([Gate(d, k, int(s["router_hidden_layers"]), float(s["init_lambda"]))
                                    for _ in range(n)])
        if routers is not None:
            try:
                self.gates.load_state_dict(dict(routers))
            except RuntimeError as e:
                raise MergeLabError(f"wemoe: the stored routers do not match the settings ({e})") from None
        self.mask: Optional[torch.Tensor] = None
        self.last_routing: Dict[int, torch.Tensor] = {}
        self.mixtures = []
        for i in range(n):
            mix = Mixture(k)
            self.mixtures.append(mix)
            keys = [f"{path}.{i}.{lin}.{p}" for lin in linears for p in ("weight", "bias")]
            attach(module, {key: [e[key] for e in experts] for key in keys if key in experts[0]}, mix)
            module.get_submodule(f"{path}.{i}.{router_in}").register_forward_pre_hook(self._hook(i))
        module.register_forward_hook(self._after_forward)
        self._phase: Optional[str] = None  # generation: "prompt" (routes computed and kept), then "decode"
        self._kept: Dict[int, torch.Tensor] = {}
        self.fixed = {}

    def _hook(self, i: int) -> Callable:
        def hook(mod, args):
            if self._phase == "decode":
                self.mixtures[i].w = self._kept[i]
                return
            h = args[0]
            w = masked_mean(self.gates[i](h), self.mask if self.mask is not None and self.mask.shape == h.shape[:2]
                            else None)
            if self.batch_reduce:
                w = w.mean(0, keepdim=True).expand(h.shape[0], -1)
            if self._phase == "prompt":
                self._kept[i] = w
            self.mixtures[i].w = w
            self.last_routing[i] = w.detach()
        return hook

    @classmethod
    def from_folder(cls, folder, manifest, config, heads) -> "WEMoEModel":
        folder = Path(folder)
        merged = store.load_tensors(folder / "merged.safetensors")
        flat = store.load_tensors(folder / "experts.safetensors")
        experts: List[Dict[str, torch.Tensor]] = [dict() for _ in manifest["tasks"]]
        index = {t: i for i, t in enumerate(manifest["tasks"])}
        for name, v in flat.items():
            t, _, key = name.partition("/")
            if t not in index:
                raise MergeLabError(f"{folder}/experts.safetensors: '{name}' names no task of the model")
            experts[index[t]][key] = v
        return cls(folder, manifest, config, heads, merged, experts, store.load_tensors(folder / "routers.safetensors"))

    def forward(self, task=None, **batch):
        self.mask = batch.get("attention_mask")
        try:
            return self.module(**batch)
        finally:
            self.mask = None
            for m in self.mixtures:
                m.w = None

    def _after_forward(self, mod, args, out):
        if self._phase == "prompt":
            self._phase = "decode"

    def begin_generation(self, task, input_ids, attention_mask) -> None:
        """Each layer routes on the prompt's tokens (the first forward of ``generate``, the mean over the
        mask's real tokens); the decoding steps reuse those routes."""
        self.mask, self._phase, self._kept = attention_mask, "prompt", {}

    def end_generation(self) -> None:
        self.mask, self._phase = None, None
        for m in self.mixtures:
            m.w = None

    def routing(self, **batch) -> List[torch.Tensor]:
        """The per-layer routing weights ``w^l`` [B, K] the model uses on ``batch``."""
        with torch.no_grad():
            self.forward(**batch)
        return [self.last_routing[i] for i in range(len(self.mixtures))]


def upscale(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], tasks: Sequence[str],
            config, cfg: WEMoEConfig = WEMoEConfig(), model_class: str = "AutoModel",
            heads: Optional[Mapping[str, dict]] = None) -> WEMoEModel:
    """The untrained WEMoE model (routers at their initial values) in memory."""
    cfg.check()
    keys = check_inputs(base, experts, tasks)
    probe = build_module(config, model_class)
    mlp = set(mlp_keys(probe))
    missing = [k for k in mlp if k not in keys]
    if missing:
        raise MergeLabError(f"wemoe: the base model lacks the MLP tensor '{missing[0]}'")
    del probe
    b = {k: base[k].float() for k in keys}
    merged = merge_shared(b, [{k: e[k].float() for k in keys} for e in experts], "task_arithmetic",
                          {"lambda": cfg.init_lambda})
    merged = {**base, **{k: (b[k] if k in mlp else v.float()) for k, v in merged.items()}}
    taus = [{k: e[k].float() - b[k] for k in mlp} for e in experts]
    manifest = {"method": "wemoe", "tasks": list(tasks), "model_class": model_class, "settings": asdict(cfg),
                "heads": bool(heads)}
    model = WEMoEModel(None, manifest, config, heads, merged, taus)
    model.merged_state, model.taus = merged, taus
    return model


def next_token_logits(model: WEMoEModel, batch: Mapping[str, torch.Tensor], t: int) -> torch.Tensor:
    """A causal LM's prediction of the answer's first token: the logits at the last position of
    left-padded prompts (every row's last real token)."""
    return model(**batch).logits[:, -1, :]


def train_routers(model: WEMoEModel, heads: Optional[Sequence[Mapping[str, torch.Tensor]]], data: Sequence[Sequence],
                  cfg: WEMoEConfig, log: Callable[[str], None] = lambda s: None,
                  logits: Optional[Callable] = None) -> List[float]:
    """Minimise ``sum_t H(head_t(model(x_t)))`` over the routers only; ``data[t]``: batches of task ``t``.
    ``logits(model, batch, t)`` replaces the head (for a causal LM: :func:`next_token_logits`, the
    entropy of the answer's first token given the unlabelled prompt). Returns the objective per step."""
    from mergelab.tune.adamerging import entropy_objective
    from mergelab.tune.functional import cycle

    if logits is None and heads is None:
        raise MergeLabError("wemoe: router training needs the task heads or a logits function")

    class Rows:  # the task-model interface of entropy_objective
        @staticmethod
        def rows(params, batch, t):
            if logits is not None:
                return logits(model, batch, t)
            h = heads[t]
            return model(**batch).pooler_output @ h["weight"].float().T + h["bias"].float()

    if len(data) != len(model.tasks):
        raise MergeLabError(f"wemoe: data for {len(data)} tasks, the model has {len(model.tasks)}")
    params = list(model.gates.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=cfg.lr)
    torch.manual_seed(cfg.seed)
    nexts = [cycle(d, cfg.seed + t) if d else None for t, d in enumerate(data)]
    history = []
    for step in range(cfg.steps):
        opt.zero_grad(set_to_none=True)
        batches = [n() if n else None for n in nexts]
        total = 0.0
        for t, b in enumerate(batches):  # the sum's gradient, one task's graph in memory at a time
            if b is None:
                continue
            loss = entropy_objective(Rows, {}, [b if u == t else None for u in range(len(batches))])
            loss.backward()
            total += float(loss.detach())
        opt.step()
        history.append(total)
        if step % 20 == 0 or step == cfg.steps - 1:
            log(f"wemoe step {step}: entropy {history[-1]:.4f}")
    for p in params:
        p.requires_grad_(False)
    return history


def save_wemoe(out: Path, model: WEMoEModel, extra: Optional[dict] = None) -> Path:
    tmp = store.begin(Path(out))
    try:
        one = store.save_tensors(tmp / "merged.safetensors", model.merged_state)
        flat = {f"{t}/{k}": v for t, tau in zip(model.tasks, model.taus) for k, v in tau.items()}
        ex_bytes = store.save_tensors(tmp / "experts.safetensors", flat)
        routers = {k: v.detach() for k, v in model.gates.state_dict().items()}
        r_bytes = store.save_tensors(tmp / "routers.safetensors", routers)
        params = sum(v.numel() for v in flat.values()) + sum(v.numel() for v in routers.values())
        model.config.save_pretrained(str(tmp))
        if model.heads:
            store.save_heads(tmp / "heads.safetensors", model.heads)
        manifest = dict(model.manifest, heads=bool(model.heads),
                        sizes=dict(store.sizes(one, ex_bytes + r_bytes, params, len(model.tasks)),
                                   expert_mlp_bytes=ex_bytes, router_bytes=r_bytes),
                        inference="per input: one forward; each MLP adds K products with the MLP task vectors "
                                  "(K+1 times the MLP's multiply-adds)", **(extra or {}))
        store.write_manifest(tmp, manifest)
    except BaseException:
        store.abort(tmp)
        raise
    return store.commit(tmp, Path(out))
