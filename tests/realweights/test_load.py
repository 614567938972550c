"""Every merged output of the real-checkpoint tests loads with transformers and runs a forward pass."""

from __future__ import annotations

import pytest
import torch

from .test_deterministic import RECIPES, _recipe

CASES = dict(RECIPES, arcee_fusion=lambda f: _recipe("arcee_fusion", f, 1))
WORDS = ["wonderful", "terrible", "banana", "the cat sat on the mat"]


@pytest.mark.parametrize("case", list(CASES))
def test_output_loads_and_runs(real_family, merged, case):
    from safetensors.torch import load_file
    from transformers import AutoModel, AutoTokenizer

    folder = merged(case, CASES[case](real_family))
    model, info = AutoModel.from_pretrained(str(folder), output_loading_info=True)
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    tensors = load_file(str(folder / "model.safetensors"))
    params = dict(model.named_parameters())
    assert all(torch.equal(params[k], v) for k, v in tensors.items() if k in params)
    tok = AutoTokenizer.from_pretrained(str(folder))
    enc = tok(WORDS, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model.eval()(**enc).last_hidden_state
    assert hidden.shape == (len(WORDS), enc["input_ids"].shape[1], 384)
    assert bool(torch.isfinite(hidden).all())
