"""Tiny hand-made checkpoints whose statistics are worked out by hand in the tests."""

import pytest
import torch

from mergelab.synthetic import write_checkpoint

CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "num_hidden_layers": 2}

# Base weights and the three task vectors (tau = model - base), all exact in float32.
BASE = {
    "model.embed_tokens.weight": [[1.0, 0.0], [0.0, 1.0]],
    "model.layers.0.mlp.weight": [1.0, 2.0, 0.0, 4.0],
    "model.layers.1.mlp.weight": [1.0, 1.0, 1.0, 1.0],
    "model.norm.weight": [1.0, 1.0],
}
TAU = {
    "A": {
        "model.embed_tokens.weight": [[1.0, 0.0], [0.0, 0.0]],
        "model.layers.0.mlp.weight": [1.0, -1.0, 0.0, 2.0],
        "model.layers.1.mlp.weight": [1.0, 1.0, 1.0, 1.0],
        "model.norm.weight": [0.0, 0.0625],
    },
    "B": {
        "model.embed_tokens.weight": [[-1.0, 0.0], [0.0, 0.0]],
        "model.layers.0.mlp.weight": [2.0, 1.0, 0.0, -0.5],
        "model.layers.1.mlp.weight": [2.0, 2.0, 2.0, 2.0],
        "model.norm.weight": [0.0, 0.0],
    },
    "C": {
        "model.embed_tokens.weight": [[0.0, 1.0], [0.0, 0.0]],
        "model.layers.0.mlp.weight": [0.0, 3.0, 0.0, 0.0],
        "model.layers.1.mlp.weight": [0.0, 0.0, 0.0, 0.0],
        "model.norm.weight": [0.5, 0.0],
    },
}
STEP = "model.layers.0.step"  # an int64 tensor: never measured


def write_model(folder, tau=None, scale=1.0, extra=None, drop=(), dtype=torch.float32):
    tensors = {}
    for name, b in BASE.items():
        if name in drop:
            continue
        t = torch.tensor(b, dtype=torch.float32)
        if tau is not None:
            t = t + scale * torch.tensor(tau[name], dtype=torch.float32)
        tensors[name] = t.to(dtype)
    tensors[STEP] = torch.tensor([5], dtype=torch.int64)
    tensors.update(extra or {})
    write_checkpoint(folder, tensors, CONFIG)
    return folder


@pytest.fixture
def hand_models(tmp_path):
    """(base, [A, B, C]) folders of the hand-made family."""
    base = write_model(tmp_path / "base")
    return str(base), [str(write_model(tmp_path / n, TAU[n])) for n in ("A", "B", "C")]
