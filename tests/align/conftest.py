"""Small nets for the alignment tests: an MLP, a conv net with BatchNorm, a tiny Llama with GQA."""

from __future__ import annotations

import contextlib
import io
import subprocess
from pathlib import Path

import pytest
import torch


class ConvNet(torch.nn.Module):
    """conv-BN-ReLU, strided conv-BN-ReLU, flatten, two linear layers (8x8 single-channel inputs)."""

    def __init__(self, width: int = 6):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(1, width, 3, padding=1)
        self.bn1 = torch.nn.BatchNorm2d(width)
        self.conv2 = torch.nn.Conv2d(width, 8, 3, stride=2, padding=1)
        self.bn2 = torch.nn.BatchNorm2d(8)
        self.fc1 = torch.nn.Linear(8 * 4 * 4, 10)
        self.fc2 = torch.nn.Linear(10, 3)

    def forward(self, x):
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def mlp(seed: int, widths=(8, 16, 12, 3)) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    layers = []
    for i in range(len(widths) - 1):
        layers.append(torch.nn.Linear(widths[i], widths[i + 1]))
        if i < len(widths) - 2:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers).eval()


def convnet(seed: int) -> ConvNet:
    torch.manual_seed(seed)
    net = ConvNet()
    with torch.no_grad():  # non-trivial BatchNorm statistics and affine parameters
        for bn in (net.bn1, net.bn2):
            bn.running_mean.normal_()
            bn.running_var.uniform_(0.5, 2.0)
            bn.weight.normal_()
            bn.bias.normal_()
    return net.eval()


def tiny_llama(seed: int, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=48, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      initializer_range=0.3, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).eval()


def run_cli(*args) -> subprocess.CompletedProcess:
    """The mergelab command line, in this process (no interpreter start-up per call)."""
    from mergelab.cli import main

    out, err = io.StringIO(), io.StringIO()
    code = 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            main([str(a) for a in args])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    return subprocess.CompletedProcess(["mergelab", *map(str, args)], code, out.getvalue(), err.getvalue())


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to float32 rounding of values of this size."""
    a, b = a.detach(), b.detach()
    return torch.allclose(a, b, rtol=1e-5, atol=1e-5 * float(b.abs().max()))


@pytest.fixture
def nothing_written():
    def check(folder: Path, before: set):
        assert set(Path(folder).iterdir()) == before
    return check
