"""The bench cache: experts, probes and the multi-task model prepared for one suite.

Layout under ``ROOT/<suite>-<suite fingerprint>/`` (ROOT: ``--cache``, else ``$MERGELAB_BENCH_CACHE``,
else ``~/.cache/mergelab/bench``)::

    prepare.json                 settings of the last prepare (train config, base model, tasks)
    experts/<task>/              a Hugging Face BertForSequenceClassification folder (config.json with
                                 id2label, model.safetensors, tokenizer files) + expert.json
    pretrained/heads.safetensors linear probes on the frozen base, keys '<task>.weight' / '<task>.bias'
    pretrained/pretrained.json
    multitask/                   a Hugging Face BertModel folder (the shared encoder) + heads.safetensors
                                 + multitask.json
    lora-<R>/prepare.json        settings of the last ``bench prepare --lora-rank R``
    lora-<R>/<task>/             a PEFT LoRA adapter folder of rank R on the base encoder
                                 (adapter_config.json, adapter_model.safetensors; tensor names those of the
                                 base's BertModel) + head.safetensors (the task's head, trained fully with
                                 the adapter: 'weight', 'bias') + expert.json

Every unit is written to ``<name>.partial`` and renamed when complete, so an interrupted prepare
resumes at the first missing unit. Each unit's JSON records the hash of the settings that made it;
a unit made with other settings is an error unless the caller asks to rebuild it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from mergelab.errors import MergeLabError
from mergelab.evaluate.model import ENCODER_PREFIX, HEAD_PREFIX, read_state, split_state
from mergelab.evaluate.tasks import Suite
from mergelab.io.adapted import adapted_state


class CacheError(MergeLabError):
    """The bench cache lacks a prepared unit or holds one made with other settings."""


def default_root() -> Path:
    env = os.environ.get("MERGELAB_BENCH_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mergelab" / "bench"


def settings_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def heads_to_tensors(heads: dict) -> dict:
    out = {}
    for task, h in heads.items():
        out[f"{task}.weight"] = h["weight"].contiguous().float()
        out[f"{task}.bias"] = h["bias"].contiguous().float()
    return out


def tensors_to_heads(tensors: dict) -> dict:
    heads: dict = {}
    for key, value in tensors.items():
        task, _, part = key.rpartition(".")
        heads.setdefault(task, {})[part] = value
    return heads


class BenchCache:
    """Paths and loaders for one suite's prepared models."""

    def __init__(self, suite: Suite, root: Optional[Path] = None):
        self.suite = suite
        self.root = Path(root) if root is not None else default_root()
        self.dir = self.root / f"{suite.name}-{suite.fingerprint()}"

    # -- paths
    def expert_dir(self, task: str) -> Path:
        return self.dir / "experts" / task

    def lora_dir(self, rank: int) -> Path:
        return self.dir / f"lora-{int(rank)}"

    def lora_expert_dir(self, task: str, rank: int) -> Path:
        return self.lora_dir(rank) / task

    @property
    def pretrained_dir(self) -> Path:
        return self.dir / "pretrained"

    @property
    def multitask_dir(self) -> Path:
        return self.dir / "multitask"

    # -- unit bookkeeping
    @staticmethod
    def info_path(unit_dir: Path) -> Path:
        names = {"pretrained": "pretrained.json", "multitask": "multitask.json"}
        return unit_dir / names.get(unit_dir.name, "expert.json")

    def done(self, unit_dir: Path, settings_id: str, rebuild: bool = False) -> bool:
        """Whether ``unit_dir`` is complete and was made with ``settings_id``.

        A unit made with other settings raises :class:`CacheError`, or is deleted when ``rebuild``.
        """
        info_path = self.info_path(unit_dir)
        if not info_path.is_file():
            return False
        info = json.loads(info_path.read_text(encoding="utf-8"))
        if info.get("settings_id") == settings_id:
            return True
        if rebuild:
            shutil.rmtree(unit_dir)
            return False
        raise CacheError(f"{unit_dir} was prepared with other settings ({info.get('settings_id')} != {settings_id}); "
                         "pass --rebuild to retrain it or --cache to use another folder")

    @staticmethod
    def begin(unit_dir: Path) -> Path:
        """A fresh ``<unit>.partial`` folder to write a unit into."""
        tmp = unit_dir.with_name(unit_dir.name + ".partial")
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
        return tmp

    @staticmethod
    def commit(tmp: Path, unit_dir: Path) -> None:
        if unit_dir.exists():
            shutil.rmtree(unit_dir)
        tmp.replace(unit_dir)

    # -- loaders
    def info(self, unit_dir: Path) -> dict:
        path = self.info_path(unit_dir)
        if not path.is_file():
            raise CacheError(f"{unit_dir} is not prepared (no {path.name}); run `mergelab bench prepare "
                             f"--suite {self.suite.source or self.suite.name}` first (cache {self.root})")
        return json.loads(path.read_text(encoding="utf-8"))

    def expert(self, task: str) -> tuple:
        """``(encoder_state, head, info)`` of ``task``'s expert."""
        d = self.expert_dir(task)
        info = self.info(d)
        encoder, head = split_state(read_state(d))
        return encoder, head, info

    def lora_expert(self, task: str, rank: int, base_path: Path) -> tuple:
        """``(encoder_state, head, info)`` of ``task``'s LoRA expert of rank ``rank``: the encoder is the
        base's (``base_path``) with ``s * B A`` added to each adapted matrix, read with mergelab's own
        adapter reading (:func:`mergelab.io.adapted.open_model` on ``BASE+ADAPTER``)."""
        d = self.lora_expert_dir(task, rank)
        info = self.info(d)
        return adapted_state(base_path, d), load_file(str(d / "head.safetensors")), info

    def pretrained_heads(self) -> tuple:
        d = self.pretrained_dir
        info = self.info(d)
        return tensors_to_heads(load_file(str(d / "heads.safetensors"))), info

    def multitask(self) -> tuple:
        d = self.multitask_dir
        info = self.info(d)
        encoder, _ = split_state(read_state(d))
        return encoder, tensors_to_heads(load_file(str(d / "heads.safetensors"))), info


def save_classifier(folder: Path, config, tokenizer, encoder: dict, head: dict, labels: list) -> None:
    """Write ``encoder`` + ``head`` as a Hugging Face BertForSequenceClassification folder."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.architectures = ["BertForSequenceClassification"]
    cfg.num_labels = len(labels)
    cfg.id2label = {i: str(lab) for i, lab in enumerate(labels)}
    cfg.label2id = {str(lab): i for i, lab in enumerate(labels)}
    state = {ENCODER_PREFIX + k: v.contiguous() for k, v in encoder.items()}
    state[HEAD_PREFIX + "weight"] = head["weight"].contiguous().float()
    state[HEAD_PREFIX + "bias"] = head["bias"].contiguous().float()
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    cfg.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def save_encoder(folder: Path, config, tokenizer, encoder: dict) -> None:
    """Write ``encoder`` as a Hugging Face BertModel folder."""
    cfg = config.__class__.from_dict(config.to_dict())
    cfg.architectures = ["BertModel"]
    save_file({k: v.contiguous() for k, v in encoder.items()}, str(folder / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))


def save_prefixed_base(folder: Path, base: str = "minilm-l6") -> Path:
    """Write the base encoder with the experts' tensor names (``bert.*``) as a model folder, so a recipe
    (or a search genome) can name it as ``base_model`` beside the experts; the experts' ``classifier.*``
    heads are not in it, so a merge with it as the reference leaves them out. Written as ``.partial``
    and renamed."""
    from mergelab.evaluate.model import base_model_path, load_config, load_tokenizer

    folder = Path(folder)
    path = base_model_path(base)
    encoder = float_state(split_state(read_state(path))[0])
    tmp = BenchCache.begin(folder)
    cfg = load_config(path)
    cfg = cfg.__class__.from_dict(cfg.to_dict())
    cfg.architectures = ["BertModel"]
    save_file({ENCODER_PREFIX + k: v.contiguous() for k, v in encoder.items()}, str(tmp / "model.safetensors"),
              metadata={"format": "pt"})
    cfg.save_pretrained(str(tmp))
    load_tokenizer(path).save_pretrained(str(tmp))
    BenchCache.commit(tmp, folder)
    return folder


def save_lora_expert(folder: Path, peft_model, head: dict, base_path: Path) -> None:
    """Write a LoRA expert: the PEFT adapter folder (recording ``base_path`` as its base) and
    ``head.safetensors``."""
    for cfg in peft_model.peft_config.values():
        cfg.base_model_name_or_path = str(base_path)
    peft_model.save_pretrained(str(folder), safe_serialization=True)
    save_file({"weight": head["weight"].contiguous().float(), "bias": head["bias"].contiguous().float()},
              str(folder / "head.safetensors"))


def save_heads(path: Path, heads: dict) -> None:
    save_file(heads_to_tensors(heads), str(path))


def float_state(state: dict) -> dict:
    return {k: v.float() for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point()}
