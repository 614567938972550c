"""The in-memory machinery shared by optimisation-based merges.

* :class:`ModelPool`: candidate checkpoints (state dicts or safetensors files/folders) read **one at a
  time**, so a procedure that streams over the pool holds one candidate in memory whatever its size.
* :class:`CoefficientSpace`: ``theta(w) = theta_0 + sum_k chunkscale(tau_k, act(c_k))`` over a set of
  tensors, with task-wise, tensor-wise ("layer-wise" in AdaMerging's sense: one coefficient per named
  parameter tensor) or chunk-wise coefficients. The merged tensors are assembled without autograd, the
  model's loss is differentiated with respect to the merged tensors only, and the coefficient gradient
  follows by the chain rule ``dL/dw_{k,p,c} = <dL/dtheta_p[c], tau_{k,p}[c]>``, streamed over the pool.
  One backward pass per step, and memory ``theta_0 + theta + grad + one task vector`` in ``stream``
  mode (``memory`` mode caches the task vectors instead of re-reading them).
* Task models (:class:`EncoderHeads`, :class:`HFTaskModel`): a shared body evaluated with
  ``torch.func.functional_call`` on the merged tensors, and what its output rows are per task (one row
  per example for classifiers, one per real next-token position for causal LMs).

Nothing here writes a checkpoint: optimisation loops only ever rebuild tensors in memory.
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import nn
from torch.func import functional_call

from mergelab.errors import CheckpointError, MergeLabError

Source = Union[Mapping[str, torch.Tensor], str, Path]


class ModelPool:
    """Candidate models, each a state dict or a local checkpoint path, read one at a time.

    ``keys`` restricts every read to those tensors (the tensors being merged). Reading from a path
    goes through :class:`mergelab.io.checkpoint.Checkpoint` (lazy, header validated), so only the
    requested tensors of one candidate are in memory at once.
    """

    def __init__(self, sources: Sequence[Source], names: Optional[Sequence[str]] = None,
                 keys: Optional[Sequence[str]] = None, rename: Optional[Mapping[str, str]] = None):
        if not sources:
            raise MergeLabError("the model pool is empty")
        self.sources = list(sources)
        self.names = list(names) if names is not None else [
            str(s) if not isinstance(s, Mapping) else f"model_{i}" for i, s in enumerate(self.sources)]
        if len(self.names) != len(self.sources):
            raise MergeLabError("model pool: one name per model is needed")
        self.keys = list(keys) if keys is not None else None
        self.rename = dict(rename or {})  # requested name -> name stored in the files (e.g. GPT-2 prefixes)
        self._ckpts: Dict[int, object] = {}
        self.reads = 0

    def __len__(self) -> int:
        return len(self.sources)

    def _checkpoint(self, i: int):
        if i not in self._ckpts:
            from mergelab.io.adapted import open_model

            self._ckpts[i] = open_model(str(self.sources[i]), label=self.names[i])
        return self._ckpts[i]

    def tensor_names(self, i: int) -> List[str]:
        src = self.sources[i]
        if isinstance(src, Mapping):
            return list(src.keys())
        stored = set(self._checkpoint(i).tensors)
        back = {v: k for k, v in self.rename.items()}
        return [back.get(n, n) for n in stored]

    def load(self, i: int, keys: Optional[Sequence[str]] = None) -> Dict[str, torch.Tensor]:
        """Candidate ``i``'s tensors ``keys`` (default: the pool's keys, else all float tensors) as float32."""
        keys = list(keys) if keys is not None else self.keys
        src = self.sources[i]
        self.reads += 1
        if isinstance(src, Mapping):
            names = keys if keys is not None else [k for k, v in src.items() if v.is_floating_point()]
            missing = [k for k in names if k not in src]
            if missing:
                raise CheckpointError(f"model '{self.names[i]}' lacks tensor '{missing[0]}'"
                                      + (f" ({len(missing) - 1} more)" if len(missing) > 1 else ""))
            return {k: src[k].detach().to(torch.float32) for k in names}
        ck = self._checkpoint(i)
        names = keys if keys is not None else [k for k, info in ck.tensors.items() if info.dtype.is_floating_point]
        stored = {k: self.rename.get(k, k) for k in names}
        missing = [k for k, v in stored.items() if v not in ck.tensors]
        if missing:
            raise CheckpointError(f"model '{self.names[i]}' ({self.sources[i]}) lacks tensor '{stored[missing[0]]}'")
        if ck.format != "safetensors":
            return {k: ck.read(v, dtype=torch.float32) for k, v in stored.items()}
        from safetensors import safe_open

        by_file: Dict[Path, List[str]] = {}
        for k, v in stored.items():
            by_file.setdefault(ck.tensors[v].file, []).append(k)
        out: Dict[str, torch.Tensor] = {}
        for file, ks in by_file.items():  # one open per shard, not per tensor
            with safe_open(str(file), framework="pt") as f:
                for k in ks:
                    out[k] = f.get_tensor(stored[k]).to(torch.float32)
        return {k: out[k] for k in names}


def merge_keys(base: Mapping[str, torch.Tensor], pool: ModelPool, exclude: str = "") -> List[str]:
    """Float tensors of ``base`` present in every candidate, minus names matching ``exclude``."""
    keys = [k for k, v in base.items() if v.is_floating_point() and not (exclude and re.search(exclude, k))]
    for i in range(len(pool)):
        have = set(pool.tensor_names(i))
        missing = [k for k in keys if k not in have]
        if missing:
            raise CheckpointError(f"model '{pool.names[i]}' lacks tensor '{missing[0]}' of the base model")
    return keys


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Mean Shannon entropy of ``softmax(logits)`` over rows (AdaMerging's objective)."""
    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1).mean()


def chunk_bounds(numel: int, chunks: int) -> List[tuple]:
    """``[start, stop)`` of the ``chunks`` pieces ``torch.chunk`` makes of a flat tensor of ``numel``.

    ``torch.chunk`` uses pieces of ``ceil(numel / chunks)`` and may return fewer pieces than asked.
    """
    if chunks < 1:
        raise ValueError("chunks must be >= 1")
    size = max(1, math.ceil(numel / chunks))
    return [(a, min(numel, a + size)) for a in range(0, numel, size)]


def chunkscale(t: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Flatten ``t``, split it into ``len(w)`` contiguous chunks (``torch.chunk``), scale chunk ``c`` by ``w[c]``."""
    if w.numel() == 1:
        return t * w.reshape(())
    flat = t.reshape(-1)
    bounds = chunk_bounds(flat.numel(), int(w.numel()))
    if len(bounds) != w.numel():
        raise ValueError(f"a tensor of {flat.numel()} elements splits into {len(bounds)} chunks, not {w.numel()}")
    scale = torch.cat([w[c].expand(b - a) for c, (a, b) in enumerate(bounds)])
    return (flat * scale).reshape(t.shape)


class CoefficientSpace:
    """Merged tensors as a function of learnable coefficients (see the module docstring).

    ``granularity``: ``task`` (one coefficient per model), ``tensor`` (per model and tensor) or
    ``chunk`` (``chunks[name]`` per model and tensor; 1 where absent, ``<= 0`` freezes the tensor at
    ``act(init)``). ``activation``: ``identity`` (AdaMerging; ``clamp`` bounds the forward value to
    ``[0, 1]``) or ``sigmoid`` (Expert Merging; ``init`` is then the initial *weight*, the raw value is
    its logit). ``exclude`` tensors keep the base value. ``storage``: ``memory`` caches the task
    vectors, ``stream`` re-reads them from the pool on every pass (memory flat in the pool size).
    """

    def __init__(self, base: Mapping[str, torch.Tensor], pool: ModelPool, keys: Sequence[str],
                 granularity: str = "tensor", init: float = 0.3, activation: str = "identity", clamp: bool = False,
                 chunks: Optional[Mapping[str, int]] = None, exclude: Sequence[str] = (), storage: str = "memory"):
        if granularity not in ("task", "tensor", "chunk"):
            raise MergeLabError(f"granularity must be task, tensor or chunk, got '{granularity}'")
        if activation not in ("identity", "sigmoid"):
            raise MergeLabError(f"activation must be identity or sigmoid, got '{activation}'")
        if storage not in ("memory", "stream"):
            raise MergeLabError(f"storage must be memory or stream, got '{storage}'")
        if activation == "sigmoid" and not 0 < init < 1:
            raise MergeLabError(f"a sigmoid coefficient's initial weight must be in (0, 1), got {init}")
        self.base = {k: base[k].detach().to(torch.float32) for k in keys}
        self.pool = pool
        self.keys = list(keys)
        self.granularity = granularity
        self.activation = activation
        self.clamp = clamp
        self.storage = storage
        self.init = init
        self.excluded = [k for k in self.keys if k in set(exclude)]
        chunks = dict(chunks or {})
        # layout: for each trainable key its chunk count and its first column in the coefficient matrix
        self.layout: Dict[str, tuple] = {}
        self.frozen: List[str] = []
        col = 0
        for k in self.keys:
            if k in self.excluded:
                continue
            n = 1 if granularity != "chunk" else int(chunks.get(k, 1))
            if n <= 0:
                self.frozen.append(k)
                continue
            n = len(chunk_bounds(self.base[k].numel(), n))
            self.layout[k] = (col if granularity != "task" else 0, n if granularity != "task" else 1)
            if granularity != "task":
                col += n
        self.columns = 1 if granularity == "task" else col
        raw0 = math.log(init / (1 - init)) if activation == "sigmoid" else init
        self.raw = nn.Parameter(torch.full((len(pool), max(1, self.columns)), float(raw0)))
        self._cache: Optional[List[Dict[str, torch.Tensor]]] = None

    # ------------------------------------------------------------------ coefficients
    def weights(self) -> torch.Tensor:
        """``act(raw)``: ``[models, columns]``, connected to :attr:`raw` for autograd."""
        if self.activation == "sigmoid":
            return torch.sigmoid(self.raw)
        return self.raw.clamp(0.0, 1.0) if self.clamp else self.raw * 1.0

    def init_weight(self) -> float:
        return self.init

    def num_coefficients(self) -> int:
        return len(self.pool) * self.columns

    def tensor_weights(self, w: torch.Tensor, k: int, key: str) -> torch.Tensor:
        col, n = self.layout[key]
        return w[k, col:col + n]

    # ------------------------------------------------------------------ task vectors
    def task_vectors(self):
        """Yield ``(k, {key: tau_k})`` over the pool (cached in ``memory`` mode)."""
        if self.storage == "memory" and self._cache is not None:
            yield from enumerate(self._cache)
            return
        cache = [] if self.storage == "memory" else None
        for k in range(len(self.pool)):
            theta = self.pool.load(k, self.keys)
            tau = {key: theta[key] - self.base[key] for key in self.keys if key not in self.excluded}
            del theta
            if cache is not None:
                cache.append(tau)
            yield k, tau
        if cache is not None:
            self._cache = cache

    @torch.no_grad()
    def assemble(self, w: Optional[torch.Tensor] = None) -> Dict[str, torch.Tensor]:
        """The merged tensors at coefficients ``w`` (default: the current ones), without autograd."""
        w = (self.weights() if w is None else w).detach()
        out = {k: v.clone() for k, v in self.base.items()}
        for k, tau in self.task_vectors():
            for key, t in tau.items():
                if key not in self.layout:  # frozen at the initial weight
                    out[key].add_(t, alpha=self.init)
                elif self.layout[key][1] == 1:
                    out[key].add_(t, alpha=float(self.tensor_weights(w, k, key)[0]))
                else:
                    out[key].add_(chunkscale(t, self.tensor_weights(w, k, key)))
        return out

    @torch.no_grad()
    def coefficient_grad(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``dL/dw`` from ``dL/dtheta`` (``grads``; missing keys count as zero), streamed over the pool."""
        out = torch.zeros(len(self.pool), max(1, self.columns), dtype=torch.float64)
        for k, tau in self.task_vectors():
            for key, (col, n) in self.layout.items():
                g = grads.get(key)
                if g is None:
                    continue
                gf, tf = g.reshape(-1).float(), tau[key].reshape(-1).float()
                for c, (a, b) in enumerate(chunk_bounds(gf.numel(), n)):
                    out[k, col + c] += float(torch.dot(gf[a:b], tf[a:b]))
        return out.to(torch.float32)

    def backward(self, w: torch.Tensor, grads: Mapping[str, torch.Tensor]) -> None:
        """Accumulate ``dL/draw`` into ``raw.grad`` through the activation (and clamp), given ``dL/dtheta``."""
        w.backward(self.coefficient_grad(grads))

    def describe(self, w: Optional[torch.Tensor] = None) -> dict:
        """Learned coefficients as plain lists: per model, per tensor (chunk values)."""
        w = (self.weights() if w is None else w).detach()
        if self.granularity == "task":
            return {self.pool.names[k]: float(w[k, 0]) for k in range(len(self.pool))}
        return {self.pool.names[k]: {key: [float(v) for v in self.tensor_weights(w, k, key)]
                                     for key in self.layout} for k in range(len(self.pool))}


def leaf_params(theta: Mapping[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Detached copies of ``theta`` that require grad (the variables the loss is differentiated in)."""
    return {k: v.detach().requires_grad_(True) for k, v in theta.items()}


# ---------------------------------------------------------------------------------------------
# Task models


def batch_kwargs(batch) -> dict:
    if isinstance(batch, Mapping):
        return dict(batch)
    return {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}


class EncoderHeads:
    """A Hugging Face encoder (``BertModel``) with one linear head ``{"weight", "bias"}`` per task.

    ``logits_t = pooler_output @ W_t^T + b_t``: the layout of :mod:`mergelab.evaluate.model` (experts
    are ``BertForSequenceClassification`` without dropout at evaluation). ``fixed`` holds the tensors
    of the module that are not merged (buffers, frozen tensors); merged tensors are passed per call.
    """

    kind = "classifier"

    def __init__(self, module: nn.Module, heads: Sequence[Mapping[str, torch.Tensor]],
                 fixed: Optional[Mapping[str, torch.Tensor]] = None):
        self.module = module.eval()
        self.heads = [{k: v.detach().float() for k, v in h.items()} for h in heads]
        self.fixed = dict(fixed) if fixed is not None else {k: v.detach() for k, v in module.state_dict().items()}

    def _call(self, params, batch, hidden: bool = False):
        return functional_call(self.module, {**self.fixed, **params}, (),
                               dict(batch_kwargs(batch), output_hidden_states=hidden))

    def rows(self, params, batch, task: int) -> torch.Tensor:
        out = self._call(params, batch)
        h = self.heads[task]
        return out.pooler_output @ h["weight"].T + h["bias"]

    def rows_and_hidden(self, params, batch, task: int, layers: Sequence[int]):
        out = self._call(params, batch, hidden=True)
        h = self.heads[task]
        return out.pooler_output @ h["weight"].T + h["bias"], [out.hidden_states[i] for i in layers]


class HFTaskModel:
    """A Hugging Face ``*ForSequenceClassification`` or ``*ForCausalLM`` module called functionally.

    ``task_params[t]`` (optional) are tensors swapped in for task ``t`` only, e.g. each expert's own
    ``classifier.*`` head. Rows: one per example (classifier) or one per real next-token position
    (causal LM).
    """

    def __init__(self, module: nn.Module, kind: str = "classifier",
                 task_params: Optional[Sequence[Mapping[str, torch.Tensor]]] = None,
                 fixed: Optional[Mapping[str, torch.Tensor]] = None):
        if kind not in ("classifier", "causal_lm"):
            raise MergeLabError(f"task model kind must be classifier or causal_lm, got '{kind}'")
        self.module = module.eval()
        self.kind = kind
        self.task_params = [dict(p) for p in task_params] if task_params else None
        self.fixed = dict(fixed) if fixed is not None else {k: v.detach() for k, v in module.state_dict().items()}

    def _call(self, params, batch, task, hidden=False):
        extra = self.task_params[task] if self.task_params else {}
        return functional_call(self.module, {**self.fixed, **extra, **params}, (),
                               dict(batch_kwargs(batch), output_hidden_states=hidden))

    def _rows(self, logits, batch):
        if self.kind == "classifier":
            return logits
        kw = batch_kwargs(batch)
        mask = kw["attention_mask"].bool()
        valid = mask[:, :-1] & mask[:, 1:]
        return logits[:, :-1][valid]

    def rows(self, params, batch, task: int) -> torch.Tensor:
        return self._rows(self._call(params, batch, task).logits, batch)

    def rows_and_hidden(self, params, batch, task: int, layers: Sequence[int]):
        out = self._call(params, batch, task, hidden=True)
        return self._rows(out.logits, batch), [out.hidden_states[i] for i in layers]


def token_mask(batch) -> Optional[torch.Tensor]:
    kw = batch_kwargs(batch)
    m = kw.get("attention_mask")
    return None if m is None else m.bool()


def cycle(batches: Sequence, seed: int) -> Callable[[], object]:
    """An endless, seeded reshuffling iterator over ``batches`` (one epoch at a time)."""
    import random

    rng = random.Random(seed)
    order: List[int] = []

    def nxt():
        if not order:
            order.extend(range(len(batches)))
            rng.shuffle(order)
        return batches[order.pop()]

    return nxt
