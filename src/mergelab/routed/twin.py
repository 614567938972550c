"""Twin-Merging (Lu et al., NeurIPS 2024, "Twin-Merging: Dynamic Integration of Modular Expertise in
Model Merging"; reference code LZY-the-boys/Twin-Merging, read for facts only).

1. **Shared knowledge** ``theta_s = merge(theta_0, {theta_k})`` with any registered mergelab method
   (default task arithmetic, lambda 0.3: the reference's generative setting; 0.29 discriminative).
2. **Exclusive knowledge** ``delta_k = theta_k - theta_s`` per tensor; every 2-D tensor is compressed
   by truncated SVD (:func:`mergelab.compress.lowrank.truncated_svd`) to rank ``r`` (``rank``, or
   ``int(density * min(m, n))``: the reference's discriminative default keeps 10%), 1-D tensors stay
   dense, tensors with no exclusive part (all experts equal to the shared value) are not stored.
3. **Router**: the reference's ``SimpleMLP`` -- Linear(d, H) -> BatchNorm -> LeakyReLU -> Dropout(0.5)
   -> Linear(H, H) -> BatchNorm -> LeakyReLU -> Dropout(0.5) -> Linear(H, K) -- on the mean over real
   tokens of the **shared** model's last hidden state, trained with cross-entropy on the task id of
   labelled-by-task inputs (mergelab: the validation splits; Adam lr 5e-4, the best epoch by accuracy
   on a held-back fifth of those inputs, ties broken by the lower held-back cross-entropy: once the
   accuracy saturates, the first epoch to reach it is an under-trained router whose softmax mixes in
   the other tasks' exclusive parts).
4. **Inference** for input ``x``: ``w = softmax(router(x))``, ``theta_x = theta_s + sum_k w_k delta_hat_k``.
   mergelab never forms ``theta_x``: the routed modules add ``w_k f_{delta_k}(x)`` in the forward pass
   (:mod:`mergelab.routed.layers`), which is the same function and lets a batch of inputs with
   different routes run in one forward.

Storage: ``shared.safetensors`` (one model), ``exclusive.safetensors`` (``{task}/{tensor}.U|S|Vh`` or
``{task}/{tensor}`` dense), ``router.safetensors``. Size: ``K * sum r (m + n + 1)`` plus the dense
1-D deltas and the router, beyond one model.
"""

from __future__ import annotations

import copy
import hashlib
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch import nn

from mergelab.errors import MergeLabError
from mergelab.routed import store
from mergelab.routed.common import RoutedModel, build_module, check_inputs, masked_mean, merge_shared, tied_names
from mergelab.routed.layers import Mixture, attach


@dataclass
class TwinConfig:
    """Settings (defaults: the reference's discriminative configuration where it has one)."""

    shared_method: str = "task_arithmetic"
    shared_params: dict = field(default_factory=lambda: {"lambda": 0.3})
    rank: Optional[int] = None  # fixed rank per 2-D tensor (reference generative: 8)
    density: float = 0.1  # else rank = max(1, int(density * min(m, n))) (reference: 1 - mask_rate 0.9)
    router_hidden: int = 1024
    router_epochs: int = 50
    router_lr: float = 5e-4
    router_batch: int = 1024
    dropout: float = 0.5
    seed: int = 0

    def check(self) -> None:
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise MergeLabError(f"twin: rank must be an integer >= 1, got {self.rank!r}")
        if not 0 < float(self.density) <= 1:
            raise MergeLabError(f"twin: density must be in (0, 1], got {self.density!r}")
        for name in ("router_hidden", "router_epochs", "router_batch"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise MergeLabError(f"twin: {name} must be an integer >= 1, got {v!r}")


class SimpleMLP(nn.Module):
    """The reference router (see the module docstring)."""

    def __init__(self, d: int, hidden: int, k: int, dropout: float = 0.5):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, hidden), nn.BatchNorm1d(hidden), nn.LeakyReLU(),
                                 nn.Dropout(dropout), nn.Linear(hidden, k))

    def forward(self, x):
        return self.net(x)


def rank_for(shape, cfg: TwinConfig) -> int:
    return cfg.rank if cfg.rank is not None else max(1, int(cfg.density * min(shape)))


def shared_model(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 tasks: Sequence[str], cfg: TwinConfig) -> Dict[str, torch.Tensor]:
    """``theta_s``: the float tensors of ``base`` merged with ``cfg.shared_method`` (float32)."""
    cfg.check()
    keys = check_inputs(base, experts, tasks)
    return _merge_float({k: base[k].float() for k in keys}, [{k: e[k].float() for k in keys} for e in experts], cfg)


def _merge_float(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 cfg: TwinConfig) -> Dict[str, torch.Tensor]:
    shared = merge_shared(base, experts, cfg.shared_method, cfg.shared_params, cfg.seed)
    return {k: v.float() for k, v in shared.items()}


def shared_and_exclusive(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                         tasks: Sequence[str], cfg: TwinConfig,
                         shared: Optional[Mapping[str, torch.Tensor]] = None) -> tuple:
    """``(theta_s, exclusive, info)``; ``exclusive[k][key]`` is a dense 1-D delta or ``(U, S, Vh)``.
    ``shared``: ``theta_s`` already merged by :func:`shared_model` with the same settings (not merged again)."""
    from mergelab.compress.lowrank import truncated_svd

    cfg.check()
    keys = check_inputs(base, experts, tasks)
    ex = [{k: e[k].float() for k in keys} for e in experts]
    if shared is None:  # from the float copies made here, not a second set of them
        shared = _merge_float({k: base[k].float() for k in keys}, ex, cfg)
    elif sorted(shared) != sorted(keys):
        raise MergeLabError("twin: the given shared model does not hold the base's float tensors")
    exclusive: List[Dict[str, object]] = [dict() for _ in experts]
    err = {}
    for key in keys:
        s = shared[key].float()
        deltas = [e[key] - s for e in ex]
        if all(not bool(d.ne(0).any()) for d in deltas):
            continue
        for k, d in enumerate(deltas):
            if d.dim() == 2:
                f = truncated_svd(d, rank=rank_for(d.shape, cfg))
                exclusive[k][key] = (f.U, f.S, f.Vh)
                norm = float(d.double().norm())
                if norm > 0:
                    err.setdefault(key, []).append(float(((f.U * f.S) @ f.Vh - d).double().norm()) / norm)
            else:
                exclusive[k][key] = d.clone()
    info = {"shared_method": cfg.shared_method, "shared_params": dict(cfg.shared_params),
            "mean_relative_error": sum(sum(v) for v in err.values()) / max(1, sum(len(v) for v in err.values()))}
    return {k: v.float() for k, v in shared.items()}, exclusive, info


def exclusive_tensors(tasks: Sequence[str], exclusive: Sequence[Mapping[str, object]]) -> Dict[str, torch.Tensor]:
    out = {}
    for t, ex in zip(tasks, exclusive):
        for key, d in ex.items():
            if torch.is_tensor(d):
                out[f"{t}/{key}"] = d
            else:
                U, S, Vh = d
                out[f"{t}/{key}.U"], out[f"{t}/{key}.S"], out[f"{t}/{key}.Vh"] = U, S, Vh
    return out


def read_exclusive(tasks: Sequence[str], flat: Mapping[str, torch.Tensor]) -> List[Dict[str, object]]:
    out: List[Dict[str, object]] = [dict() for _ in tasks]
    index = {t: i for i, t in enumerate(tasks)}
    for name, v in flat.items():
        t, _, key = name.partition("/")
        if t not in index:
            raise MergeLabError(f"exclusive tensor '{name}' names no task of the model")
        for part in (".U", ".S", ".Vh"):
            if key.endswith(part):
                k = key[: -len(part)]
                slot = out[index[t]].setdefault(k, [None, None, None])
                slot[(".U", ".S", ".Vh").index(part)] = v
                break
        else:
            out[index[t]][key] = v
    for ex in out:
        for k, v in ex.items():
            if isinstance(v, list):
                if any(x is None for x in v):
                    raise MergeLabError(f"exclusive factors of '{k}' are incomplete")
                ex[k] = tuple(v)
    return out


class TwinModel(RoutedModel):
    """Shared model + routed low-rank exclusive knowledge (``forward(**batch)``; the task is not needed)."""

    method = "twin"

    def __init__(self, folder, manifest, config, heads, shared, exclusive, router: nn.Module):
        module = build_module(config, manifest.get("model_class", "AutoModel"), shared)
        super().__init__(folder, manifest, config, module, heads)
        self.router = router.eval()
        self.mixture = Mixture(len(self.tasks))
        keys = sorted({k for ex in exclusive for k in ex})
        self.wrapped = attach(module, {k: [ex.get(k) for ex in exclusive] for k in keys}, self.mixture,
                              tied=tied_names(module))

    @classmethod
    def from_folder(cls, folder, manifest, config, heads) -> "TwinModel":
        folder = Path(folder)
        shared = store.load_tensors(folder / "shared.safetensors")
        exclusive = read_exclusive(manifest["tasks"], store.load_tensors(folder / "exclusive.safetensors"))
        router = router_from_state(store.load_tensors(folder / "router.safetensors"), manifest)
        return cls(folder, manifest, config, heads, shared, exclusive, router)

    def _hidden(self, out):
        hs = getattr(out, "hidden_states", None)
        return hs[-1] if hs else out.last_hidden_state

    def route(self, **batch) -> torch.Tensor:
        """``softmax(router(mean_tokens(shared last hidden state)))`` [B, K]."""
        ids = batch.get("input_ids")
        n = ids.shape[0] if ids is not None else next(iter(batch.values())).shape[0]
        self.mixture.w = torch.zeros(n, len(self.tasks))
        out = self.module(**batch, output_hidden_states=True)
        feats = masked_mean(self._hidden(out), batch.get("attention_mask"))
        return torch.softmax(self.router(feats), -1)

    def begin_generation(self, task, input_ids, attention_mask) -> None:
        """Routed on the prompt (left-padded: the mask marks its real tokens); the route is kept for every
        generated token."""
        batch = {"input_ids": input_ids}
        if attention_mask is not None:
            batch["attention_mask"] = attention_mask
        with torch.no_grad():
            w = self.route(**batch)
        self.mixture.w = w
        self.last_route = w

    def end_generation(self) -> None:
        self.mixture.w = None

    def forward(self, task=None, weights: Optional[torch.Tensor] = None, **batch):
        """The model at ``theta_s + sum_k w_k delta_k`` per input (``weights`` overrides the router)."""
        w = self.route(**batch) if weights is None else weights
        self.mixture.w = w
        try:
            return self.module(**batch)
        finally:
            self.mixture.w = None


def router_from_state(state: Mapping[str, torch.Tensor], manifest: dict) -> nn.Module:
    r = manifest.get("router", {})
    try:
        router = SimpleMLP(int(r["input_dim"]), int(r["hidden"]), len(manifest["tasks"]), float(r.get("dropout", 0.5)))
        router.load_state_dict(dict(state))
    except (KeyError, RuntimeError) as e:
        raise MergeLabError(f"routed model: the router does not match routed.json's 'router' entry ({e})") from None
    return router.eval()


@torch.no_grad()
def shared_features(module, batches: Sequence) -> torch.Tensor:
    """Router inputs of ``batches`` (dicts of input_ids / attention_mask) under the (unwrapped) shared ``module``."""
    feats = []
    for b in batches:
        out = module(**b, output_hidden_states=True)
        hs = out.hidden_states[-1] if getattr(out, "hidden_states", None) else out.last_hidden_state
        feats.append(masked_mean(hs, b.get("attention_mask")))
    return torch.cat(feats)


def train_router(features: torch.Tensor, labels: torch.Tensor, k: int, cfg: TwinConfig,
                 log=lambda s: None) -> tuple:
    """Cross-entropy on the task id; the best epoch by accuracy on a held-back fifth, ties broken by the
    lower held-back cross-entropy (on the training inputs when there are fewer than 10 inputs). Returns
    ``(router, info)``."""
    if features.shape[0] < 2:
        raise MergeLabError("twin: the router needs at least 2 labelled inputs")
    if len(set(labels.tolist())) < 2 and k > 1:
        raise MergeLabError("twin: the router's training inputs come from one task only")
    g = torch.Generator().manual_seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    order = torch.randperm(features.shape[0], generator=g)
    n_val = features.shape[0] // 5 if features.shape[0] >= 10 else 0
    val, tr = order[:n_val], order[n_val:]
    router = SimpleMLP(features.shape[1], cfg.router_hidden, k, cfg.dropout)
    opt = torch.optim.Adam(router.parameters(), lr=cfg.router_lr)
    best, best_key, best_epoch, history, losses = None, None, 0, [], []
    rng = random.Random(cfg.seed)
    for epoch in range(cfg.router_epochs):
        router.train()
        idx = tr.tolist()
        rng.shuffle(idx)
        for i in range(0, len(idx), cfg.router_batch):
            b = idx[i:i + cfg.router_batch]
            if len(b) < 2:  # BatchNorm needs two rows
                continue
            loss = nn.functional.cross_entropy(router(features[b]), labels[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
        router.eval()
        with torch.no_grad():
            sel = val if n_val else tr
            out = router(features[sel])
            acc = float((out.argmax(-1) == labels[sel]).float().mean())
            held_loss = float(nn.functional.cross_entropy(out, labels[sel]))
        history.append(acc)
        losses.append(held_loss)
        if best_key is None or (acc, -held_loss) > best_key:
            best_key, best, best_epoch = (acc, -held_loss), copy.deepcopy(router.state_dict()), epoch
    router.load_state_dict(best)
    best_acc = best_key[0]
    log(f"twin router: best held-back task-id accuracy {best_acc:.4f} (epoch {best_epoch + 1} of {cfg.router_epochs}, "
        f"held-back cross-entropy {-best_key[1]:.4f})")
    return router.eval(), {"router_accuracy": best_acc, "router_epoch": best_epoch,
                           "router_heldback_loss": -best_key[1], "router_inputs": int(features.shape[0]),
                           "router_heldback": int(n_val), "accuracy_by_epoch": history, "loss_by_epoch": losses}


# the settings a trained router depends on (the rank / density of the exclusive parts are not among them)
ROUTER_SETTINGS = ("shared_method", "shared_params", "router_hidden", "router_epochs", "router_lr", "router_batch",
                   "dropout", "seed")


@dataclass
class TwinRouter:
    """A router trained on the features of one shared model ``theta_s`` (:func:`train_twin_router`).

    The router reads ``theta_s``'s hidden states only, so it does not depend on the rank of the exclusive
    parts: a rank sweep trains it once and passes it to :func:`build_twin` for every rank, which gives the
    same folders as training it per rank (the training is seeded)."""

    router: nn.Module
    info: dict  # train_router's info
    input_dim: int
    tasks: List[str]
    shared: Dict[str, torch.Tensor]  # theta_s (the base's float tensors, merged), reused by build_twin
    settings: dict  # ROUTER_SETTINGS of the TwinConfig it was trained with
    seconds: float = 0.0  # shared merge, features and training
    inputs: Dict[str, str] = field(default_factory=dict)  # input_fingerprints(base, experts, tasks)


def state_fingerprint(state: Mapping[str, torch.Tensor], sample: int = 4096) -> str:
    """sha256 over every tensor's name, dtype and shape, the float64 sum and sum of absolute values of all
    its elements, and ``sample`` evenly strided elements (as float64). One pass over the weights (cheap next
    to the merge); two different fine-tunes (which move nearly every weight) never collide in practice, a
    change that keeps the sums and misses the sampled elements would."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach()
        flat = t.reshape(-1)
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if flat.numel():
            x = flat.to(torch.float64)
            step = max(1, flat.numel() // sample)
            h.update(torch.stack([x.sum(), x.abs().sum()]).numpy().tobytes())
            h.update(x[::step][:sample].contiguous().numpy().tobytes())
    return h.hexdigest()


def input_fingerprints(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                       tasks: Sequence[str]) -> Dict[str, str]:
    """``{"base": fp, "expert 'task'": fp, ...}`` (:func:`state_fingerprint`): what a trained router and its
    shared merge were made from, checked by :func:`build_twin` before it reuses them."""
    fps = {"base": state_fingerprint(base)}
    for t, e in zip(tasks, experts):
        fps[f"expert '{t}'"] = state_fingerprint(e)
    return fps


def _router_settings(cfg: TwinConfig) -> dict:
    d = asdict(cfg)
    return {k: d[k] for k in ROUTER_SETTINGS}


def _check_router_batches(tasks: Sequence[str], router_batches) -> None:
    if router_batches is None or len(router_batches) != len(tasks):
        n = 0 if router_batches is None else len(router_batches)
        raise MergeLabError(f"twin: router inputs for {n} tasks, {len(tasks)} experts")
    for t, bs in zip(tasks, router_batches):  # before any work, so nothing is computed or written in vain
        if not bs or not any(int(b["input_ids"].numel()) for b in bs):
            raise MergeLabError(f"twin: no router inputs for task '{t}' (the router learns each task from its inputs)")


def _train(base, shared, tasks, config, router_batches, cfg, model_class, log) -> tuple:
    module = build_module(config, model_class, {**base, **shared})
    feats, labels = [], []
    for k, bs in enumerate(router_batches):
        f = shared_features(module, bs)
        feats.append(f)
        labels.append(torch.full((f.shape[0],), k, dtype=torch.long))
    router, rinfo = train_router(torch.cat(feats), torch.cat(labels), len(tasks), cfg, log)
    return router, rinfo, int(feats[0].shape[1])


def train_twin_router(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                      tasks: Sequence[str], config, router_batches: Sequence[Sequence], cfg: TwinConfig = TwinConfig(),
                      model_class: str = "AutoModel", log=lambda s: None) -> TwinRouter:
    """The shared merge and the router trained on its features of ``router_batches[k]`` (inputs of task
    ``k``), for :func:`build_twin`'s ``router`` (a rank sweep trains it once)."""
    import time

    t0 = time.perf_counter()
    _check_router_batches(tasks, router_batches)
    shared = shared_model(base, experts, tasks, cfg)
    router, rinfo, dim = _train(base, shared, tasks, config, router_batches, cfg, model_class, log)
    return TwinRouter(router, rinfo, dim, list(tasks), shared, _router_settings(cfg), time.perf_counter() - t0,
                      input_fingerprints(base, experts, tasks))


def build_twin(out: Path, base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
               tasks: Sequence[str], config, router_batches: Optional[Sequence[Sequence]] = None,
               cfg: TwinConfig = TwinConfig(), model_class: str = "AutoModel",
               heads: Optional[Mapping[str, dict]] = None, extra: Optional[dict] = None, log=lambda s: None,
               router: Optional[TwinRouter] = None) -> Path:
    """Shared merge, exclusive factors, router trained on ``router_batches[k]`` (inputs of task ``k``,
    labels unused); writes the folder ``out`` and returns it. ``router``: one already trained by
    :func:`train_twin_router` on the same base and experts with the same router settings (checked before
    anything is written: the tasks, the settings, and the base's and each expert's
    :func:`state_fingerprint`, so a router and shared merge made from other inputs are refused naming the
    input that differs; then ``router_batches`` is not used, and the shared merge is its ``shared``); the
    folder is the one training it here would give."""
    if router is None:
        _check_router_batches(tasks, router_batches)
    else:
        if list(router.tasks) != list(tasks):
            raise MergeLabError(f"twin: the trained router routes tasks {router.tasks}, not {list(tasks)}")
        want = _router_settings(cfg)
        diff = [k for k in ROUTER_SETTINGS if router.settings.get(k) != want[k]]
        if diff:
            raise MergeLabError(f"twin: the trained router was trained with {diff[0]}={router.settings.get(diff[0])!r}, "
                                f"the settings give {want[diff[0]]!r} (train it with the same settings)")
        if len(experts) != len(tasks):
            raise MergeLabError(f"twin: {len(experts)} experts for {len(tasks)} tasks")
        got = input_fingerprints(base, experts, tasks)
        for k, fp in got.items():
            if router.inputs.get(k) != fp:
                raise MergeLabError(f"twin: the trained router and its shared merge were not made from this {k} "
                                    f"(its weights differ from the ones the router was trained with; train the "
                                    f"router on the same base and experts)")
    if Path(out).exists():
        raise MergeLabError(f"output folder '{out}' exists; remove it or choose another")
    shared, exclusive, info = shared_and_exclusive(base, experts, tasks, cfg,
                                                   shared=router.shared if router is not None else None)
    full_shared = {**{k: v for k, v in base.items()}, **shared}
    if router is None:
        trained, rinfo, input_dim = _train(base, shared, tasks, config, router_batches, cfg, model_class, log)
    else:
        trained, rinfo, input_dim = router.router, dict(router.info), router.input_dim
    tmp = store.begin(Path(out))
    try:
        one = store.save_tensors(tmp / "shared.safetensors", {k: v for k, v in full_shared.items()})
        flat = exclusive_tensors(tasks, exclusive)
        ex_bytes = store.save_tensors(tmp / "exclusive.safetensors", flat)
        rstate = trained.state_dict()
        r_bytes = store.save_tensors(tmp / "router.safetensors", rstate)
        extra_params = sum(v.numel() for v in flat.values()) + sum(
            v.numel() for v in rstate.values() if v.is_floating_point())
        config.save_pretrained(str(tmp))
        if heads:
            store.save_heads(tmp / "heads.safetensors", heads)
        manifest = {"method": "twin", "tasks": list(tasks), "model_class": model_class,
                    "router": {"input_dim": input_dim, "hidden": cfg.router_hidden,
                               "dropout": cfg.dropout, "input": "mean over real tokens of the shared model's "
                                                                "last hidden state"},
                    "settings": asdict(cfg), **info, **rinfo, "heads": bool(heads),
                    "sizes": dict(store.sizes(one, ex_bytes + r_bytes, extra_params, len(tasks)),
                                  exclusive_bytes=ex_bytes, router_bytes=r_bytes),
                    "inference": "per input: one shared forward for the router, then one forward adding "
                                 "K low-rank products per routed module",
                    **(extra or {})}
        store.write_manifest(tmp, manifest)
    except BaseException:
        store.abort(tmp)
        raise
    return store.commit(tmp, Path(out))
