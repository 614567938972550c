"""mergelab's adapter merges against PEFT 0.21.2's ``add_weighted_adapter`` (issue 16 item 3), on LoRA
adapters PEFT trained on the tiny llmmix Llama (conftest ``trained``).

Where PEFT is right (``cat``; ``svd``) the adapters agree within float32 rounding. Where it is not,
the dense merge (PEFT's own ``merge_and_unload`` of each adapter, then task arithmetic) is the
oracle: mergelab equals it, PEFT does not:

* ``linear``, ``ties``, ``dare_linear``, ``dare_ties`` and ``magnitude_prune`` combine the A's and the
  B's separately, so B'A' carries cross terms B_i A_j (huggingface/peft#3004, open);
* the merged adapter inherits ``use_rslora`` from the first input while its scaling is meant to be 1,
  so it comes out sqrt(new rank) too large (huggingface/peft#3449, not in 0.21.2).
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from mergelab.merge import merge, merge_state_dicts

from .helpers import load_base, peft_dense, state_of

peft = pytest.importorskip("peft")


def peft_combined(base, adapters, weights, ctype, out: Path, **kw):
    """PEFT's add_weighted_adapter over ``adapters``: (its merged model's state, its saved adapter folder)."""
    from peft import PeftModel

    names = [f"a{i}" for i in range(len(adapters))]
    pm = PeftModel.from_pretrained(load_base(base), str(adapters[0]), adapter_name=names[0])
    for n, a in zip(names[1:], adapters[1:]):
        pm.load_adapter(str(a), adapter_name=n)
    pm.add_weighted_adapter(names, weights, "m", combination_type=ctype, **kw)
    pm.save_pretrained(str(out), selected_adapters=["m"])
    pm.set_adapter("m")
    merged = {k: v.detach().clone() for k, v in pm.merge_and_unload(adapter_names=["m"]).state_dict().items()}
    return merged, out / "m"


def dense_oracle(base, adapters, weights):
    """Each adapter densified by PEFT, then task arithmetic (lambda 1)."""
    return merge_state_dicts(state_of(base), [peft_dense(base, a) for a in adapters], "task_arithmetic",
                             weight=list(weights))


def ours(base, adapters, weights, out, combine, rank=None):
    output = {"format": "peft", "combine": combine, **({"rank": rank} if rank else {})}
    rec = {"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "float32", "output": output,
           "models": [{"model": f"{base}+{a}", "parameters": {"weight": w}} for a, w in zip(adapters, weights)]}
    return merge(rec, out).out


def test_cat_same_weights_as_peft(trained, tmp_path):
    ads, w = [trained.adapters["arith"], trained.adapters["code"]], [0.7, -0.5]
    _, theirs = peft_combined(trained.base, ads, w, "cat", tmp_path / "peft")
    mine = ours(trained.base, ads, w, tmp_path / "ours", "cat")
    a, b = state_of(theirs), state_of(mine)
    assert set(a) == set(b) and len(a) == 8  # 2 layers x (q, v) x (A, B)
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=1e-6, atol=1e-7)


def test_svd_same_adapter_as_peft(trained, tmp_path):
    ads, w = [trained.adapters["arith"], trained.adapters["code"]], [1.0, 0.5]
    _, theirs = peft_combined(trained.base, ads, w, "svd", tmp_path / "peft", svd_rank=3)
    mine = ours(trained.base, ads, w, tmp_path / "ours", "svd", rank=3)
    a, b = state_of(theirs), state_of(mine)
    assert set(a) == set(b)
    for k in [k for k in a if k.endswith("lora_A.weight")]:
        kb = k.replace("lora_A", "lora_B")
        pa, pb = a[kb].double() @ a[k].double(), b[kb].double() @ b[k].double()
        torch.testing.assert_close(pb, pa, rtol=0, atol=1e-5 * float(pa.abs().max()))
        sign = torch.sign((a[k] * b[k]).sum(1))  # singular vectors are defined up to sign
        torch.testing.assert_close(b[k] * sign[:, None], a[k], rtol=0, atol=1e-4)


def _rel(x, y):
    return float((x.double() - y.double()).norm() / y.double().norm())


def _deltas(state, base_state, names):
    return {k: state[k].double() - base_state[k].double() for k in names}


ATTN = [f"model.layers.{i}.self_attn.{p}.weight" for i in range(2) for p in ("q_proj", "v_proj")]


# PEFT's element-wise combination types at density 1 (nothing pruned or dropped, DARE's rescale 1): in delta
# space linear, dare_linear and magnitude_prune are then task arithmetic, ties and dare_ties TIES with sign
# election (equal weights: PEFT's mean of the agreeing entries is mergekit's normalised TIES). The oracle is that
# merge of PEFT's own densified deltas; mergelab merges the adapters with cat, or with svd at full rank.
ELEMENTWISE = [("linear", {}, "task_arithmetic", {}),
               ("dare_linear", {"density": 1.0}, "task_arithmetic", {}),
               ("magnitude_prune", {"density": 1.0}, "task_arithmetic", {}),
               ("ties", {"density": 1.0}, "ties", {"density": 1.0}),
               ("dare_ties", {"density": 1.0}, "ties", {"density": 1.0})]


@pytest.mark.filterwarnings("ignore:The density 1.0 is greater")
@pytest.mark.parametrize("ctype,peft_kw,method,params", ELEMENTWISE, ids=[c[0] for c in ELEMENTWISE])
def test_peft_elementwise_types_have_cross_terms_mergelab_does_not(trained, tmp_path, ctype, peft_kw, method,
                                                                    params):
    """huggingface/peft#3004: these types combine the A's and the B's separately, so B'A' carries B_i A_j."""
    from peft import PeftModel

    ads, w = [trained.adapters["arith"], trained.adapters["code"]], [1.0, 1.0]
    peft_state, _ = peft_combined(trained.base, ads, w, ctype, tmp_path / "peft", **peft_kw)
    b = state_of(trained.base)
    dense = merge_state_dicts(b, [peft_dense(trained.base, a) for a in ads], method, weight=w, **params)
    output = {"format": "peft", "combine": "cat"} if method == "task_arithmetic" else \
        {"format": "peft", "combine": "svd", "rank": 32}  # 32 = min(out, in) of q and v: no truncation
    rec = {"merge_method": method, "base_model": str(trained.base), "dtype": "float32", "output": output,
           "parameters": params,
           "models": [{"model": f"{trained.base}+{a}", "parameters": {"weight": x}} for a, x in zip(ads, w)]}
    mine = merge(rec, tmp_path / "ours").out
    our_state = PeftModel.from_pretrained(load_base(trained.base), str(mine)).merge_and_unload().state_dict()
    want = _deltas(dense, b, ATTN)
    for k in ATTN:
        assert _rel(our_state[k] - b[k], want[k]) < 1e-5, k
        assert _rel(peft_state[k] - b[k], want[k]) > 0.05, k  # PEFT's result is not the merge of the deltas


def test_peft_inherits_rslora_scaling_mergelab_does_not(trained, tmp_path):
    """huggingface/peft#3449: a merge whose first input is rsLoRA comes out sqrt(new rank) too large."""
    ads, w = [trained.adapters["strops"], trained.adapters["arith"]], [1.0, 1.0]
    peft_state, folder = peft_combined(trained.base, ads, w, "cat", tmp_path / "peft")
    import json

    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert cfg["use_rslora"] is True and cfg["r"] == cfg["lora_alpha"] == 12
    dense = dense_oracle(trained.base, ads, w)
    b = state_of(trained.base)
    mine = ours(trained.base, ads, w, tmp_path / "ours", "cat")
    from peft import PeftModel

    our_state = PeftModel.from_pretrained(load_base(trained.base), str(mine)).merge_and_unload().state_dict()
    for k in ATTN:
        want = dense[k].double() - b[k].double()
        assert _rel(our_state[k] - b[k], want) < 1e-5
        theirs = peft_state[k].double() - b[k].double()
        assert _rel(theirs, math.sqrt(12) * want) < 1e-5  # exactly sqrt(12) times the right delta
