"""PLeaS for Llama-layout decoders: every layer's SwiGLU MLP at a chosen intermediate width.

PLeaS (Nasery et al., CVPR 2025, arXiv 2407.02447; :mod:`mergelab.align.pleas`) for two decoders of
the same shapes and tokenizer trained from different initialisations (Llama, Mistral, Qwen2/3: the
``model.layers.L.self_attn/mlp`` layout :func:`mergelab.align.spec.llama_spec` permutes). As for BERT
(:mod:`mergelab.align.pleas_bert`) the one width a checkpoint can change is ``intermediate_size``, a
single number in ``LlamaConfig``, so the width is **global**; a per-layer mapping is refused.

1. **Matching.** Activation matching on calibration texts permutes B's residual stream (embeddings,
   every RMSNorm, the ``lm_head`` input), whole KV heads with their query-head groups (rotary dims
   never move inside a head) and MLP units (``mergelab align --method activation``).
2. **Everything but the MLPs** (embeddings, attention, norms, ``lm_head``) is the average of A and the
   permuted B: matching + averaging, the paper's treatment of layers whose width it does not change.
3. **Each MLP** ``down(silu(gate(z)) * up(z))`` has ``width`` units in blocks ``[merged | A-only |
   B-only]``: the ``2n - width`` unit pairs whose hidden features ``h = silu(gate z) * up z`` correlate
   most are merged. On the calibration tokens the merged model's MLP input is estimated by
   ``z = (i_A + i_B)/2`` (both models' post-attention-norm outputs) and both MLPs are evaluated on ``z``.
   ``gate`` and ``up`` are each the least-squares map from ``z`` to the blocks' features
   ``[(g_A + g_B)/2 | g_A | g_B]`` (and the same for ``up``); ``down`` is the least-squares map from
   ``[(h_A + h_B)/2 | h_A | h_B]`` to ``(o_A + o_B)/2``, the average of both MLPs' outputs, with A-only
   and B-only units kept apart (the paper's mask). At ``width = 2n`` the merged MLP is therefore
   exactly the mean of both MLPs on any input (``gate = [G_A; G_B]``, ``up = [U_A; U_B]``,
   ``down = [D_A, D_B]/2``), given more calibration tokens than ``2n``; at ``width = n`` gate and up
   are the averages of the matched weights and ``down`` is refitted.

The output is a HF folder (``model.safetensors``, A's ``config.json`` with ``intermediate_size`` set to
the width, A's tokenizer files, ``pleas.json``) that ``AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Mapping

import torch

from mergelab.align.pleas import (AttentionNames, TransformerPleasResult, UnitSplit, lstsq_blocks,
                                  match_and_average, refit_attention, resolve_width)
from mergelab.align.spec import LLAMA_TYPES, llama_spec
from mergelab.errors import MergeLabError


def same_tokenizer(a, b) -> None:
    """Embedding rows are averaged by index, so both models must read the same vocabulary."""
    from transformers import AutoTokenizer

    try:
        va = AutoTokenizer.from_pretrained(str(a.path)).get_vocab()
        vb = AutoTokenizer.from_pretrained(str(b.path)).get_vocab()
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for a missing tokenizer
        raise MergeLabError(f"PLeaS for decoders needs both models' tokenizers ('{a.path}', '{b.path}'): {e}")
    if va != vb:
        diff = sorted(set(va.items()) ^ set(vb.items()))[:3]
        raise MergeLabError(f"'{a.path}' and '{b.path}' have different tokenizers (e.g. {diff}); PLeaS averages "
                            f"embedding rows by index and needs one vocabulary (align the vocabularies first: "
                            f"tokenizer_source in a merge recipe, or mergelab transplant-tokenizer)")


def pleas_llama(path_a, path_b, calibration: Path, width=1.0, ridge: float = 1e-8, batch_size: int = 16,
                max_length: int = 128, attention_width=None) -> TransformerPleasResult:
    """PLeaS merge of two Llama-layout checkpoints (module docstring) on the texts of ``calibration``
    (``.txt``, one a line, or ``.jsonl`` with ``text``), tokenised with A's tokenizer. ``width``: a
    multiple of ``intermediate_size`` in [1.0, 2.0] or a unit count in [n, 2n], the same for every layer.
    ``attention_width``: None keeps attention matched and averaged; a multiple of ``num_key_value_heads``
    in [1.0, 2.0] (or a KV-head count) refits it (:func:`refit_attention`)."""
    from transformers.activations import ACT2FN

    from mergelab.align.api import check_compatible, load_model, module_inputs, read_texts

    a, b = load_model(path_a, "model A"), load_model(path_b, "model B")
    check_compatible(a, b, ("model A", "model B"), "PLeaS")
    cfg = a.config or {}
    if cfg.get("model_type") not in LLAMA_TYPES:
        raise MergeLabError(f"PLeaS for decoders handles the Llama layout ({', '.join(LLAMA_TYPES)}); '{a.path}' "
                            f"is a '{cfg.get('model_type')}' model")
    if isinstance(width, Mapping) and "budget" in width:
        raise MergeLabError("width: a budget chooses a width per layer (PLeaS's QP), but LlamaConfig has a single "
                            "intermediate_size for every layer, so per-layer widths cannot be written; give one width")
    if isinstance(width, Mapping):
        raise MergeLabError("width for a Llama-layout model must be one number: its config has a single "
                            "intermediate_size for every layer, so PLeaS gives every layer's MLP the same width")
    layers, n = cfg["num_hidden_layers"], cfg["intermediate_size"]
    w = resolve_width(width, "mlp", "model.layers.*.mlp (intermediate_size)", n)
    n_kv = cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    if isinstance(attention_width, Mapping):
        raise MergeLabError("attention_width must be one number: LlamaConfig has one num_key_value_heads for every layer")
    heads = (resolve_width(attention_width, "attn", "model.layers.*.self_attn (num_key_value_heads)", n_kv)
             if attention_width is not None else None)
    group = cfg["num_attention_heads"] // n_kv
    if heads is not None and cfg["hidden_size"] % (heads * group):
        ok = [k for k in range(n_kv, 2 * n_kv + 1) if cfg["hidden_size"] % (k * group) == 0]
        raise MergeLabError(f"attention_width {attention_width!r} gives {heads} KV heads = {heads * group} attention "
                            f"heads, and transformers' LlamaConfig requires hidden_size ({cfg['hidden_size']}) to be a "
                            f"multiple of num_attention_heads; KV-head counts it allows here: {ok}")
    m = 2 * n - w
    if cfg.get("hidden_act", "silu") not in ACT2FN:
        raise MergeLabError(f"'{a.path}': unknown hidden_act {cfg.get('hidden_act')!r}")
    act = ACT2FN[cfg.get("hidden_act", "silu")]
    same_tokenizer(a, b)
    spec = llama_spec(cfg, a.shapes)
    pre = next(k for k in a.state if k.endswith("embed_tokens.weight"))[:-len("embed_tokens.weight")]
    texts = read_texts(Path(calibration))

    # 1. matching (residual stream, whole KV heads with their query groups, MLP units)
    # 2. everything averaged; the MLPs are replaced below
    perms, sb, out = match_and_average(a, b, spec, calibration, batch_size, max_length)
    # 3. the MLPs by least squares on the merged stream's estimate
    names = [f"layers.{i}.mlp" for i in range(layers)]
    ins_a = module_inputs(a, texts, a.path, names, batch_size, max_length)
    ins_b = module_inputs(b, texts, a.path, names, batch_size, max_length)
    res = perms["res"]
    tokens = 0
    for i in range(layers):
        p = f"{pre}layers.{i}.mlp."
        z = (ins_a[names[i]] + ins_b[names[i]][:, res]) / 2
        tokens = len(z)

        def lin(st, k):
            y = z @ st[p + k + ".weight"].double().T
            return y + st[p + k + ".bias"].double() if p + k + ".bias" in st else y

        g = {s: lin(st, "gate_proj") for s, st in (("a", a.state), ("b", sb))}
        u = {s: lin(st, "up_proj") for s, st in (("a", a.state), ("b", sb))}
        h = {s: act(g[s]) * u[s] for s in "ab"}
        o = {s: h[s] @ st[p + "down_proj.weight"].double().T + (st[p + "down_proj.bias"].double()
                                                               if p + "down_proj.bias" in st else 0)
             for s, st in (("a", a.state), ("b", sb))}
        split = UnitSplit.by_similarity(h["a"], h["b"], m)
        T, lab = split.features, split.labels()
        stream = torch.zeros(z.shape[1], dtype=torch.long)
        fitted = {"gate_proj": lstsq_blocks(z, T(g["a"], g["b"]), stream, lab, ridge,
                                            bias=p + "gate_proj.bias" in a.state),
                  "up_proj": lstsq_blocks(z, T(u["a"], u["b"]), stream, lab, ridge, bias=p + "up_proj.bias" in a.state),
                  "down_proj": lstsq_blocks(T(h["a"], h["b"]), (o["a"] + o["b"]) / 2, lab, stream, ridge,
                                            bias=p + "down_proj.bias" in a.state)}
        for k, (W, bias) in fitted.items():
            out[p + k + ".weight"] = W.to(a.state[p + k + ".weight"].dtype).contiguous()
            if p + k + ".bias" in a.state:
                out[p + k + ".bias"] = bias.to(a.state[p + k + ".bias"].dtype).contiguous()
    config = copy.deepcopy(cfg)
    config["intermediate_size"] = w
    if heads is not None:
        units = [AttentionNames(f"attn.{i}", f"layers.{i}.self_attn.o_proj",
                                *(f"{pre}layers.{i}.self_attn.{k}" for k in ("q_proj", "k_proj", "v_proj", "o_proj")))
                 for i in range(layers)]
        refit_attention(a, b, sb, spec, perms, out, texts, heads, ridge, units, batch_size, max_length)
        d = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
        group = cfg["num_attention_heads"] // (cfg.get("num_key_value_heads") or cfg["num_attention_heads"])
        config.update(num_key_value_heads=heads, num_attention_heads=heads * group, head_dim=d)
    return TransformerPleasResult(out, config, w, m, perms, tokens)

