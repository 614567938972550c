"""Router rows for an MoE built from dense experts, as mergekit-moe 0.1.5 computes them.

For expert e with positive prompts P_e and negative prompts N_e (``mergekit/moe/router.py``):

* ``hidden`` / ``hidden_last``: the base model runs P_e in one left-padded batch (``bos_token``
  prepended as text, padded with BOS, no other special tokens), in bfloat16 as mergekit loads it. For
  every layer l the residual stream *entering* decoder layer l is taken at the last position of each
  prompt and averaged over the prompts; N_e's statistic is subtracted; the result is L2-normalised
  per layer (floor 1e-8). All of it in bfloat16, like mergekit, so the rows are mergekit's bit for bit.
* ``hidden_avg``: the same with the mean over all positions, pad positions included (mergekit does
  not mask them).
* ``cheap_embed``: the token embeddings of P_e's real tokens, summed, L2-normalised, the same row
  for every layer; minus N_e's normalised row, normalised again (float32).
* ``fitted`` (mergelab's, not mergekit's): a least-squares router per layer on the MLP inputs of the
  prompts' tokens (:func:`fitted_gates`); for prompts that mean-based rows cannot tell apart.
* ``random``: N(0, 1) rows, not normalised; ``uniform_random``: U(-1/sqrt(H), 1/sqrt(H)). Seeded by the
  config's ``seed`` (mergekit: ``--random-seed``; same stream for the same seed).

``gate_source: mlp_input`` (mergelab's, not mergekit's) takes the same statistics on the input of each
layer's MLP instead (the post-attention RMSNorm output), which is what the router multiplies at
inference; mergekit's residual stream before the layer lacks that layer's attention output and the
norm's gain, so its rows can point away from what the router sees (methods-structural §1.4).

The base model is run layer by layer (:class:`~mergelab.moe.stream.StreamedDecoder`), so memory
holds one decoder layer, not the model. The returned tensor is [L, experts, H]: row e of layer l is
the router row ``model.layers.{l}.mlp.gate.weight[e]`` (logit = <row, x>, no bias).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import List

import torch

from mergelab.errors import CheckpointError, RecipeError
from mergelab.io.checkpoint import Checkpoint
from mergelab.moe.config import Expert


def load_tokenizer(base: str):
    """The base's tokenizer, set up for gate prompts as mergekit does (left padding, pad = BOS or EOS).

    The object is only used here: the output folder gets the base's tokenizer files unchanged.
    """
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(base))
    except Exception as e:
        raise CheckpointError(f"base_model: cannot load the tokenizer of '{base}' (the gate prompts are "
                              f"tokenized with it): {e}")
    tok.padding_side = "left"
    tok.pad_token_id = tok.bos_token_id
    if tok.pad_token_id is None:
        if tok.eos_token is None:
            raise CheckpointError(f"base_model: the tokenizer of '{base}' has neither a BOS nor an EOS token "
                                  f"to pad the gate prompts with")
        tok.pad_token = tok.eos_token
    return tok


def tokenize(tok, prompts: List[str]) -> dict:
    enc = tok([(tok.bos_token or "") + p for p in prompts], return_tensors="pt", padding=True,
              add_special_tokens=False)
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def random_gates(layers: int, n: int, hidden: int, mode: str, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    if mode == "random":
        return torch.randn((layers, n, hidden), generator=g)
    bound = math.sqrt(1.0 / hidden)
    return torch.rand((layers, n, hidden), generator=g) * 2 * bound - bound


def _normalise(v: torch.Tensor) -> torch.Tensor:
    return v / v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embed_gates(base: str, tok, experts: List[Expert], layers: int, vocab: int) -> torch.Tensor:
    ckpt = Checkpoint.open(str(base), "base_model")
    name = "model.embed_tokens.weight"
    if name not in ckpt.tensors:
        found = [n for n in ckpt.tensors if n.endswith("embed_tokens.weight")]
        if not found:
            raise CheckpointError(f"base_model: '{base}' has no token embedding ('{name}') for gate_mode cheap_embed")
        name = found[0]
    embed = ckpt.read(name).float()

    def stat(prompts: List[str], where: str) -> torch.Tensor:
        enc = tokenize(tok, prompts)
        ids = enc["input_ids"]
        if int(ids.max()) >= min(vocab, embed.shape[0]):
            raise RecipeError(f"{where}: the tokenizer gives token id {int(ids.max())}, outside the base's "
                              f"vocabulary of {min(vocab, embed.shape[0])}")
        h = embed[ids]  # equals one_hot(ids) @ embed exactly
        summed = (h * enc["attention_mask"].unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
        return _normalise(summed).repeat(layers, 1)

    rows = []
    for e in experts:
        v = stat(e.positive_prompts, f"{e.where}.positive_prompts")
        if e.negative_prompts:
            v = v - stat(e.negative_prompts, f"{e.where}.negative_prompts")
        rows.append(_normalise(v))
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def hidden_gates(base: str, tok, experts: List[Expert], average: bool, source: str = "residual",
                 log=lambda m: None) -> torch.Tensor:
    from mergelab.moe.stream import StreamedDecoder

    model = StreamedDecoder(Path(base), torch.bfloat16, "base_model")
    captured: List[torch.Tensor] = []

    def take(idx: int, h: torch.Tensor) -> None:
        captured.append(h if average else h[:, -1, :])

    if source == "mlp_input":
        model.mlp_input = take
    else:
        model.layer_input = take

    def stat(prompts: List[str]) -> torch.Tensor:
        captured.clear()
        model.forward(**tokenize(tok, prompts))
        states = torch.stack(captured)  # [L, B, (T,) H]
        captured.clear()
        if average:
            states = states.sum(dim=2) / states.shape[2]
        return states.sum(dim=1) / states.shape[1]

    rows = []
    for i, e in enumerate(experts):
        log(f"gate prompts of {e.where} ({len(e.positive_prompts)} positive, {len(e.negative_prompts)} negative)")
        v = stat(e.positive_prompts)
        if e.negative_prompts:
            v -= stat(e.negative_prompts)
        v /= v.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
        rows.append(v)
    return torch.stack(rows, dim=0).permute(1, 0, 2)


def fitted_gates(base: str, tok, experts: List[Expert], ridge: float = 1e-3, log=lambda m: None) -> torch.Tensor:
    """mergelab's ``fitted`` gates: per layer, the least-squares linear router from the MLP inputs of
    the prompts' real tokens to their expert's one-hot label, W = (X^T X + lambda I)^-1 X^T Y with
    lambda = ``ridge`` times the mean of diag(X^T X). X holds every real token (BOS and padding
    excluded) of every expert's positive prompts, on the input the router multiplies at inference (the
    post-attention RMSNorm output), base model in float32. Rows of W^T are the router rows."""
    from mergelab.moe.stream import StreamedDecoder

    model = StreamedDecoder(Path(base), torch.float32, "base_model")
    captured: List[torch.Tensor] = []
    model.mlp_input = lambda idx, h: captured.append(h)
    feats, labels = [], []
    for i, e in enumerate(experts):
        log(f"router prompts of {e.where} ({len(e.positive_prompts)} positive)")
        enc = tokenize(tok, e.positive_prompts)
        captured.clear()
        model.forward(**enc)
        real = enc["attention_mask"].bool().clone()
        first = real.int().argmax(dim=1)  # the prepended BOS of each prompt: the same for every expert
        real[torch.arange(real.shape[0]), first] = False
        feats.append(torch.stack([h[real] for h in captured]))  # [L, N_i, H]
        labels.append(torch.full((feats[-1].shape[1],), i))
    X = torch.cat(feats, dim=1).double()
    Y = torch.nn.functional.one_hot(torch.cat(labels), len(experts)).double()
    rows = []
    for l in range(X.shape[0]):
        gram = X[l].T @ X[l]
        lam = ridge * float(gram.diagonal().mean())
        W = torch.linalg.solve(gram + lam * torch.eye(gram.shape[0], dtype=gram.dtype), X[l].T @ Y)
        rows.append(W.T.float())
    return torch.stack(rows)


def degenerate_layers(gates: torch.Tensor, threshold: float = 5.0) -> List[int]:
    """Layers whose router rows are nearly linearly dependent (condition number above ``threshold``,
    mergekit's warning): prompts too alike to tell the experts apart."""
    return [l for l in range(gates.shape[0]) if float(torch.linalg.cond(gates[l].float())) > threshold]
