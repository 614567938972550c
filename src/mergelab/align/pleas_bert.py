"""PLeaS for BERT encoders: every layer's FFN at a chosen intermediate width.

PLeaS (Nasery et al., CVPR 2025, arXiv 2407.02447; :mod:`mergelab.align.pleas`) applied to the one
width of a BERT that a checkpoint can change: ``intermediate_size``. transformers' ``BertConfig`` has a
single ``intermediate_size``, so the width is **global** (the same for every layer); a per-layer
mapping is refused. The residual stream (``hidden_size``) and the attention heads keep their sizes:

1. **Matching.** Activation matching on calibration texts permutes B's residual stream, whole
   attention heads and FFN units to match A (``mergelab align --method activation``).
2. **Everything but the FFNs** (embeddings, attention, LayerNorms, pooler, a classifier) is the
   average of A and the permuted B: matching + averaging, since those widths are fixed.
3. **Each FFN** has ``width`` units in blocks ``[merged | A-only | B-only]``: the ``2n - width`` unit
   pairs whose post-activation features correlate most are merged. The FFN of the merged model reads
   one residual stream; its estimate on the calibration tokens is ``z = (i_A + i_B)/2``, the merged
   features of the two models' FFN inputs. Both models' FFNs are evaluated on ``z``. The intermediate
   dense layer is the least-squares map from ``z`` to ``[(pre_A + pre_B)/2 | pre_A | pre_B]`` (the
   pre-activation features of the blocks). The output dense layer is the least-squares map from
   ``[(h_A + h_B)/2 | h_A | h_B]`` (post-activation) to ``(o_A + o_B)/2``, the average of both FFNs'
   outputs. A-only units never read B-only ones (the paper's mask). At ``width = 2n`` the merged FFN is
   therefore exactly the average of both FFNs on any input (``[W_A; W_B]`` and ``[W2_A, W2_B]/2``);
   at ``width = n`` the intermediate layer is the average of the matched weights and the output layer
   is refitted to the averaged outputs.

The output is a HF folder (``model.safetensors``, A's ``config.json`` with ``intermediate_size`` set to
the width, A's tokenizer files, ``pleas.json``) that ``AutoModel.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch

from mergelab.align.pleas import (AttentionNames, TransformerPleasResult, UnitSplit, lstsq_blocks,
                                  match_and_average, refit_attention, resolve_width)
from mergelab.align.spec import bert_spec
from mergelab.errors import MergeLabError


def pleas_bert(path_a, path_b, calibration: Path, width=1.0, ridge: float = 1e-8, batch_size: int = 16,
               max_length: int = 128, attention_width=None) -> TransformerPleasResult:
    """PLeaS merge of two BERT checkpoints (module docstring) on the texts of ``calibration`` (``.txt``, one
    a line, or ``.jsonl`` with ``text``), tokenised with A's tokenizer. ``width``: a multiple of
    ``intermediate_size`` in [1.0, 2.0] or a unit count in [n, 2n], the same for every layer.
    ``attention_width``: None keeps attention matched and averaged; 1.0 (or ``num_attention_heads``)
    refits ``attention.output.dense`` by least squares (:func:`mergelab.align.pleas.refit_attention`) at
    the same heads; more heads are refused, since ``BertConfig`` ties the head size to
    ``hidden_size / num_attention_heads``."""
    from transformers.activations import ACT2FN

    from mergelab.align.api import check_compatible, load_model, module_inputs, read_texts

    a, b = load_model(path_a, "model A"), load_model(path_b, "model B")
    check_compatible(a, b, ("model A", "model B"), "PLeaS")
    cfg = a.config or {}
    if cfg.get("model_type") != "bert":
        raise MergeLabError(f"PLeaS for transformers handles BERT so far; '{a.path}' is a "
                            f"'{cfg.get('model_type')}' model")
    if isinstance(width, Mapping) and "budget" in width:
        raise MergeLabError("width: a budget chooses a width per layer (PLeaS's QP), but BertConfig has a single "
                            "intermediate_size for every layer, so per-layer widths cannot be written; give one width")
    if isinstance(width, Mapping):
        raise MergeLabError("width for BERT must be one number: BertConfig has a single intermediate_size for every "
                            "layer, so PLeaS gives every layer's FFN the same width")
    spec = bert_spec(cfg, a.shapes)
    pre = next(k for k in a.state if k.endswith("embeddings.word_embeddings.weight"))[:-len("embeddings.word_embeddings.weight")]
    layers, n = cfg["num_hidden_layers"], cfg["intermediate_size"]
    w = resolve_width(width, "mlp", "encoder.layer.*.intermediate.dense (intermediate_size)", n)
    if attention_width is not None:
        nh = cfg["num_attention_heads"]
        if isinstance(attention_width, Mapping) or resolve_width(
                attention_width, "attn", "encoder.layer.*.attention (num_attention_heads)", nh) != nh:
            raise MergeLabError(f"attention_width for BERT must be 1.0 ({nh} heads): BertConfig ties the head size to "
                                f"hidden_size / num_attention_heads, so the number of heads cannot change; got "
                                f"{attention_width!r}")
    m = 2 * n - w
    if cfg.get("hidden_act") not in ACT2FN:
        raise MergeLabError(f"'{a.path}': unknown hidden_act {cfg.get('hidden_act')!r}")
    act = ACT2FN[cfg["hidden_act"]]
    texts = read_texts(Path(calibration))

    # 1. matching (residual stream, whole heads, FFN units)
    # 2. everything averaged; the FFNs are replaced below
    perms, sb, out = match_and_average(a, b, spec, calibration, batch_size, max_length)
    # 3. the FFNs by least squares on the merged stream's estimate
    names = [f"encoder.layer.{i}.intermediate.dense" for i in range(layers)]
    ins_a = list(module_inputs(a, texts, a.path, names, batch_size, max_length).values())
    ins_b = list(module_inputs(b, texts, a.path, names, batch_size, max_length).values())
    res = perms["res"]
    tokens = 0
    for i in range(layers):
        p = f"{pre}encoder.layer.{i}."
        z = (ins_a[i] + ins_b[i][:, res]) / 2
        tokens = len(z)
        W1 = {s: st[p + "intermediate.dense.weight"].double() for s, st in (("a", a.state), ("b", sb))}
        b1 = {s: st[p + "intermediate.dense.bias"].double() for s, st in (("a", a.state), ("b", sb))}
        W2 = {s: st[p + "output.dense.weight"].double() for s, st in (("a", a.state), ("b", sb))}
        b2 = {s: st[p + "output.dense.bias"].double() for s, st in (("a", a.state), ("b", sb))}
        pre_ = {s: z @ W1[s].T + b1[s] for s in "ab"}
        h = {s: act(pre_[s]) for s in "ab"}
        o = {s: h[s] @ W2[s].T + b2[s] for s in "ab"}
        split = UnitSplit.by_similarity(h["a"], h["b"], m)
        T, lab = split.features, split.labels()
        zero_in = torch.zeros(z.shape[1], dtype=torch.long)
        Wi, bi = lstsq_blocks(z, T(pre_["a"], pre_["b"]), zero_in, lab, ridge)
        Wo, bo = lstsq_blocks(T(h["a"], h["b"]), (o["a"] + o["b"]) / 2, lab, torch.zeros(z.shape[1], dtype=torch.long),
                               ridge)
        for k, v in (("intermediate.dense.weight", Wi), ("intermediate.dense.bias", bi), ("output.dense.weight", Wo),
                     ("output.dense.bias", bo)):
            out[p + k] = v.to(a.state[p + k].dtype).contiguous()
    if attention_width is not None:  # the same heads; only attention.output.dense changes
        units = [AttentionNames(f"attn.{i}", f"encoder.layer.{i}.attention.output.dense",
                                *(f"{pre}encoder.layer.{i}.attention.{k}" for k in
                                  ("self.query", "self.key", "self.value", "output.dense")))
                 for i in range(layers)]
        refit_attention(a, b, sb, spec, perms, out, texts, cfg["num_attention_heads"], ridge, units, batch_size,
                        max_length)
    config = copy.deepcopy(cfg)
    config["intermediate_size"] = w
    return TransformerPleasResult(out, config, w, m, perms, tokens)
