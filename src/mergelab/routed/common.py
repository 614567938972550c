"""What every routed method shares: input checks, the module skeleton, the loaded-model interface."""

from __future__ import annotations

from pathlib import Path
from typing import Dict, List, Mapping, Optional, Sequence

import torch
from torch.func import functional_call

from mergelab.errors import CheckpointError, MergeLabError

MODEL_CLASSES = ("AutoModel", "AutoModelForCausalLM", "AutoModelForSequenceClassification")


def check_inputs(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]],
                 tasks: Sequence[str]) -> List[str]:
    """The float tensors of ``base``; every expert must hold each with the same shape (else a clear error).

    Returns the keys to route (float tensors of the base, in its order). Integer buffers
    (``position_ids``) are not routed: they come from the base.
    """
    if len(experts) < 1:
        raise MergeLabError("a routed model needs at least one expert")
    if len(tasks) != len(experts):
        raise MergeLabError(f"one task name per expert is needed (got {len(tasks)} names, {len(experts)} experts)")
    if len(set(tasks)) != len(tasks):
        raise MergeLabError(f"task names must be distinct, got {list(tasks)}")
    for t in tasks:
        if not t or "/" in t or t.startswith("."):
            raise MergeLabError(f"task name {t!r} cannot name a file; use letters, digits, '_' or '-'")
    keys = [k for k, v in base.items() if torch.is_tensor(v) and v.is_floating_point()]
    if not keys:
        raise CheckpointError("the base model has no floating-point tensors")
    for name, e in zip(tasks, experts):
        for k in keys:
            if k not in e:
                raise CheckpointError(f"expert '{name}' lacks tensor '{k}' of the base model")
            if tuple(e[k].shape) != tuple(base[k].shape):
                raise CheckpointError(f"expert '{name}': tensor '{k}' has shape {tuple(e[k].shape)}, the base's is "
                                      f"{tuple(base[k].shape)} (experts must share the base's architecture)")
        extra = [k for k, v in e.items() if k not in base and torch.is_tensor(v) and v.is_floating_point()]
        if extra:
            raise CheckpointError(f"expert '{name}' has tensor '{extra[0]}' that the base model lacks "
                                  f"({len(extra)} such; experts must share the base's architecture)")
    return keys


def build_module(config, model_class: str = "AutoModel", state: Optional[Mapping[str, torch.Tensor]] = None):
    """An eval-mode module of ``config`` (``model_class`` from :data:`MODEL_CLASSES`), ``state`` loaded."""
    import transformers

    if model_class not in MODEL_CLASSES:
        raise MergeLabError(f"model_class must be one of {', '.join(MODEL_CLASSES)}, got '{model_class}'")
    cls = getattr(transformers, model_class)
    kwargs = {"add_pooling_layer": True} if getattr(config, "model_type", "") == "bert" and model_class == "AutoModel" \
        else {}
    try:
        module = cls.from_config(config, **kwargs)
    except TypeError:
        module = cls.from_config(config)
    module = module.float().eval()
    if state is not None:
        missing, unexpected = module.load_state_dict(dict(state), strict=False)
        tied = set(tied_names(module).values())
        missing = [k for k in missing if not k.endswith("position_ids") and k not in tied]
        unexpected = [k for k in unexpected if not k.endswith("position_ids")]
        if missing or unexpected:
            raise CheckpointError(f"the tensors do not match the config's {type(module).__name__}: missing "
                                  f"{missing[:3]}, unexpected {unexpected[:3]}")
    for p in module.parameters():
        p.requires_grad_(False)
    return module


def tied_names(module) -> Dict[str, str]:
    """``{name: name of the first tensor it shares storage with}`` for the module's tied parameters (a tied
    ``lm_head.weight`` -> ``model.embed_tokens.weight``); tied checkpoints store only the first."""
    first: Dict[int, str] = {}
    out = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        if id(p) in first:
            out[first[id(p)]] = name
        else:
            first[id(p)] = name
    return out


def load_config(folder: Path):
    from transformers import AutoConfig

    if not (Path(folder) / "config.json").is_file():
        raise CheckpointError(f"routed model '{folder}': missing config.json")
    try:
        return AutoConfig.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{folder}/config.json: cannot read it ({e})") from None


def masked_mean(h: torch.Tensor, mask: Optional[torch.Tensor]) -> torch.Tensor:
    """Mean over tokens of ``h`` [B, T, H], counting only the real tokens of ``mask`` [B, T] when given."""
    if mask is None:
        return h.mean(1)
    m = mask.to(h.dtype).unsqueeze(-1)
    return (h * m).sum(1) / m.sum(1).clamp_min(1.0)


class RoutedModel:
    """A loaded routed model: one module skeleton, per-task or per-input parameters, optional heads.

    ``forward(task=None, **batch)`` returns the module's output (``pooler_output`` /
    ``last_hidden_state`` / ``logits``, as the architecture gives). ``task`` is required where the
    method needs the task id (EMR-Merging); routers (Twin-Merging, WEMoE) ignore it.
    ``logits(task, **batch)`` applies the stored head of ``task`` to ``pooler_output``.
    """

    method = "?"
    needs_task = False

    def __init__(self, folder: Optional[Path], manifest: dict, config, module, heads=None):
        self.folder, self.manifest, self.config, self.module = folder, manifest, config, module
        self.tasks: List[str] = list(manifest["tasks"])
        self.heads: Dict[str, Dict[str, torch.Tensor]] = dict(heads or {})
        tied = set(tied_names(module).values())
        # a tied tensor is given once (functional_call ties the other name to it)
        self.fixed = {k: v for k, v in module.state_dict().items() if k not in tied}

    @property
    def sizes(self) -> dict:
        return dict(self.manifest.get("sizes", {}))

    def _task_index(self, task) -> int:
        if task is None:
            raise MergeLabError(f"{self.method}: the task must be given (one of {', '.join(self.tasks)})")
        if isinstance(task, int):
            if not 0 <= task < len(self.tasks):
                raise MergeLabError(f"{self.method}: task index {task} out of range (0..{len(self.tasks) - 1})")
            return task
        if task not in self.tasks:
            raise MergeLabError(f"{self.method}: unknown task '{task}'; known: {', '.join(self.tasks)}")
        return self.tasks.index(task)

    def call(self, params: Mapping[str, torch.Tensor], **batch):
        return functional_call(self.module, {**self.fixed, **params}, (), batch)

    def forward(self, task=None, **batch):
        raise NotImplementedError

    def __call__(self, task=None, **batch):
        return self.forward(task=task, **batch)

    # ------------------------------------------------------------ generation (causal LMs)
    def begin_generation(self, task, input_ids: torch.Tensor, attention_mask: Optional[torch.Tensor]) -> None:
        """Fix the model's weights for a ``generate`` over these prompts (a subclass's hook): per task for
        EMR-Merging; routed on the prompt for Twin-Merging and WEMoE, the route kept for every generated
        token (the decoding steps see one token each, not the input the router was taught on)."""
        raise NotImplementedError

    def end_generation(self) -> None:
        pass

    def generate(self, task=None, input_ids=None, attention_mask=None, **kwargs):
        """``module.generate`` with the weights :meth:`begin_generation` fixes for these prompts."""
        self.begin_generation(task, input_ids, attention_mask)
        try:
            return self.module.generate(input_ids=input_ids, attention_mask=attention_mask, **kwargs)
        finally:
            self.end_generation()

    def causal_lm(self, task=None) -> "GenerationView":
        """An object with ``generate``, ``parameters`` and ``generation_config`` as a Hugging Face causal LM
        has them (what :func:`mergelab.llmmix.generate.evaluate_task` needs), generating for ``task``."""
        return GenerationView(self, task)

    def logits(self, task, **batch) -> torch.Tensor:
        k = self._task_index(task)
        name = self.tasks[k]
        if name not in self.heads:
            raise MergeLabError(f"{self.method}: no head stored for task '{name}'")
        h = self.heads[name]
        pooled = self.forward(task=name, **batch).pooler_output
        return pooled @ h["weight"].T + h["bias"]


def merge_shared(base: Mapping[str, torch.Tensor], experts: Sequence[Mapping[str, torch.Tensor]], method: str,
                 params: Optional[dict] = None, seed: int = 0) -> Dict[str, torch.Tensor]:
    """One static merge with a registered method (``mergelab.merge_state_dicts``); a required per-model
    ``weight`` (task arithmetic, TIES, ...) defaults to 1 for every expert, as ``bench run`` sets it."""
    import mergelab
    from mergelab.methods.registry import get_method

    params = dict(params or {})
    m = get_method(method)
    p = m.model_param("weight")
    if p is not None and p.required and "weight" not in params:
        params["weight"] = [1.0] * len(experts)
    return mergelab.merge_state_dicts(dict(base), [dict(e) for e in experts], method, params=params, seed=seed)


class GenerationView:
    """A routed causal LM seen as a Hugging Face one for greedy decoding (see :meth:`RoutedModel.causal_lm`)."""

    def __init__(self, model: RoutedModel, task=None):
        self.routed, self.task = model, task
        self.config = model.module.config

    @property
    def generation_config(self):
        return self.routed.module.generation_config

    @generation_config.setter
    def generation_config(self, value):
        self.routed.module.generation_config = value

    def parameters(self):
        return self.routed.module.parameters()

    def generate(self, input_ids=None, attention_mask=None, **kwargs):
        return self.routed.generate(self.task, input_ids=input_ids, attention_mask=attention_mask, **kwargs)
