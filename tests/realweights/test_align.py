"""``mergelab align`` on the fine-tuned MiniLM experts: a randomly permuted expert is the same function;
weight matching to the *base* (a different checkpoint) and activation matching to the expert on a few
texts give back the expert's own tensors bit for bit."""

from __future__ import annotations

import json
import shutil

import torch

from mergelab.align.spec import apply_permutations, bert_spec, random_permutations
from tests.align.conftest import close, run_cli

TEXTS = ["the film was a delight from start to finish", "ich habe heute keine zeit", "banana",
         "a dreadful, boring and far too long evening", "photosynthesis converts light into energy"]


def _outputs(folder, texts=TEXTS):
    from transformers import AutoTokenizer, BertModel

    tok = AutoTokenizer.from_pretrained(str(folder))
    model = BertModel.from_pretrained(str(folder), dtype=torch.float32).eval()
    enc = tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        out = model(**enc)
    return out.last_hidden_state, out.pooler_output


def test_align_minilm_expert(real_family, tmp_path):
    from safetensors.torch import save_file

    expert = real_family.experts[0]
    state = real_family.state(expert)
    config = json.loads((expert / "config.json").read_text())
    spec = bert_spec(config, {k: tuple(v.shape) for k, v in state.items()})
    assert spec.perms["attn.0"].kind == "heads" and spec.perms["attn.0"].n_heads == 12
    rp = random_permutations(spec, torch.Generator().manual_seed(11))
    permuted = tmp_path / "permuted"
    shutil.copytree(expert, permuted)
    save_file(apply_permutations(state, spec, rp), str(permuted / "model.safetensors"), metadata={"format": "pt"})

    hidden, pooled = _outputs(expert)
    hidden_p, pooled_p = _outputs(permuted)
    assert close(pooled_p, pooled)  # the model output (pooler) is untouched
    assert close(hidden_p, hidden[..., rp["res"]])  # the residual stream comes out permuted
    assert not close(hidden_p, hidden)

    calib = tmp_path / "calib.txt"
    calib.write_text("\n".join(TEXTS * 4) + "\n")
    for method, reference in (("weight", real_family.base), ("activation", expert)):
        out = tmp_path / f"aligned-{method}"
        extra = ["--calibration", calib] if method == "activation" else []
        r = run_cli("align", reference, permuted, "-o", out, "--method", method, *extra)
        assert r.returncode == 0, r.stderr
        from safetensors.torch import load_file

        aligned = load_file(str(out / "model.safetensors"))
        assert all(torch.equal(aligned[k], v) for k, v in state.items()), method
        assert (out / "tokenizer.json").is_file() or (out / "vocab.txt").is_file()
