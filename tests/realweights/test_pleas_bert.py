"""PLeaS for BERT on the fine-tuned MiniLM experts: the FFN width (one intermediate_size for every layer).

At width 2 the merged FFN holds both models' units side by side, so the least squares are exact: the
intermediate layer gives A's and the permuted B's pre-activations (on held-out texts), and on the calibration tokens
the merged FFN equals the average of both FFNs on the same input (the output layer has more inputs than
the test has tokens, so exact there). A permuted copy of A merged at width 1 gives A back, also with its
attention output layer refitted. The output loads with AutoModel.from_pretrained; widths outside [n, 2n]
or per layer, and more attention heads, are refused."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from tests.align.conftest import run_cli
from tests.realweights.conftest import _task_rows


def _texts(task: str, start: int, count: int):
    return _task_rows(task)[0][start:start + count]


@pytest.fixture(scope="module")
def calib(tmp_path_factory):
    """About 500 tokens: more than the 384 + 1 inputs of the intermediate layer (its least squares are
    exact on any input), fewer than the output layer's (exact on the calibration tokens)."""
    d = tmp_path_factory.mktemp("pleas-bert")
    texts = _texts("sentiment", 0, 60) + _texts("language", 0, 60)
    (d / "calib.txt").write_text("\n".join(t.replace("\n", " ") for t in texts) + "\n")
    return d / "calib.txt"


def near(got, want) -> bool:
    """Equal up to 1e-4 of the largest value: the least squares are exact, but the ridge (1e-8) acts on the
    directions the two experts' nearly equal streams hardly span (both were fine-tuned from one base)."""
    err = float((got - want).abs().max())
    assert err < 1e-4 * float(want.abs().max()), err
    return True


def _ffn(state, p, z, act):
    h = act(z @ state[p + "intermediate.dense.weight"].double().T + state[p + "intermediate.dense.bias"].double())
    return h @ state[p + "output.dense.weight"].double().T + state[p + "output.dense.bias"].double()


def test_width_two_is_both_ffns_exactly(real_family, calib, tmp_path):
    from transformers import AutoModel
    from transformers.activations import ACT2FN

    from mergelab.align.api import load_model, module_inputs
    from mergelab.align.pleas import write_folder
    from mergelab.align.pleas_bert import pleas_bert
    from mergelab.align.spec import apply_permutations, bert_spec

    a_dir, b_dir = real_family.experts[0], real_family.experts[1]
    r = pleas_bert(a_dir, b_dir, calib, width=2.0)
    assert r.width == 3072 and r.merged_units == 0 and r.config["intermediate_size"] == 3072 and 385 < r.tokens < 1537
    sa, sb = real_family.state(a_dir), real_family.state(b_dir)
    spec = bert_spec(json.loads((a_dir / "config.json").read_text()), {k: tuple(v.shape) for k, v in sa.items()})
    sbp = apply_permutations(sb, spec, r.perms)
    p = "encoder.layer.0."
    W1 = r.state[p + "intermediate.dense.weight"]
    act = ACT2FN["gelu"]

    def stream(texts):  # the merged stream's estimate (i_A + i_B)/2 entering the FFN, per token
        k = ["encoder.layer.0.intermediate.dense"]
        ia = module_inputs(load_model(a_dir, "A"), texts, a_dir, k)[k[0]]
        ib = module_inputs(load_model(b_dir, "B"), texts, a_dir, k)[k[0]]
        return (ia + ib[:, r.perms["res"]]) / 2

    # held-out texts: the intermediate layer gives A's and the permuted B's pre-activations side by side
    z = stream(_texts("syllables", 0, 30))
    pre = lambda st, k: z @ st[k + ".weight"].double().T + st[k + ".bias"].double()  # noqa: E731
    k = p + "intermediate.dense"
    want = torch.cat([pre(sa, k), pre(sbp, k)], 1)
    assert near(pre(r.state, k), want)
    # the calibration tokens: the merged FFN on the merged stream = the mean of both FFNs on it
    z = stream(calib.read_text().splitlines())
    want = (_ffn(sa, p, z, act) + _ffn(sbp, p, z, act)) / 2
    got = _ffn(r.state, p, z, act)
    assert near(got, want)
    # attention, embeddings and norms: the average of A and the permuted B
    k = p + "attention.self.value.weight"
    assert torch.allclose(r.state[k], (sa[k] + sbp[k]) / 2)
    write_folder(r, a_dir, tmp_path / "merged", overwrite=False)
    model = AutoModel.from_pretrained(str(tmp_path / "merged"))
    assert model.config.intermediate_size == 3072
    assert torch.equal(model.state_dict()[p + "intermediate.dense.weight"], W1)


def test_permuted_copy_at_width_one_is_the_model(real_family, calib, tmp_path):
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, BertModel

    from mergelab.align.spec import apply_permutations, bert_spec, random_permutations

    a_dir = real_family.experts[0]
    sa = real_family.state(a_dir)
    spec = bert_spec(json.loads((a_dir / "config.json").read_text()), {k: tuple(v.shape) for k, v in sa.items()})
    copy_dir = tmp_path / "permuted"
    shutil.copytree(a_dir, copy_dir)
    save_file(apply_permutations(sa, spec, random_permutations(spec, torch.Generator().manual_seed(5))),
              str(copy_dir / "model.safetensors"), metadata={"format": "pt"})
    recipe = tmp_path / "r.yml"
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [{"model": str(a_dir)}, {"model": str(copy_dir)}],
                                      "calibration": str(calib), "parameters": {"width": 1.0, "attention_width": 1.0}}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
    assert r.returncode == 0, r.stderr
    assert json.loads((tmp_path / "merged" / "pleas.json").read_text())["intermediate_size"] == 1536
    # attention.output.dense was refitted by least squares on the calibration tokens (more than its 385
    # inputs): A's own weights come back
    merged = real_family.state(tmp_path / "merged")
    k = next(k for k in sa if k.endswith("encoder.layer.0.attention.output.dense.weight"))
    assert near(merged[k].double(), sa[k].double())
    tok = AutoTokenizer.from_pretrained(str(tmp_path / "merged"))
    enc = tok(calib.read_text().splitlines()[::7], padding=True, return_tensors="pt")  # calibration texts
    with torch.no_grad():
        got = BertModel.from_pretrained(str(tmp_path / "merged")).eval()(**enc).pooler_output
        want = BertModel.from_pretrained(str(a_dir)).eval()(**enc).pooler_output
    assert torch.allclose(got, want, atol=1e-4), float((got - want).abs().max())


def test_width_checked_nothing_written(real_family, calib, tmp_path):
    a_dir, b_dir = real_family.experts[0], real_family.experts[1]
    before = set(tmp_path.iterdir())
    for width, needle in ((2.5, "outside the allowed range [1536, 3072]"), (1000, "outside the allowed range"),
                          ({"mlp.0": 1.5}, "single intermediate_size")):
        recipe = tmp_path.parent / f"r-{abs(hash(str(width)))}.yml"
        recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(b_dir)],
                                          "calibration": str(calib), "parameters": {"width": width}}))
        r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
        assert r.returncode == 2 and "Traceback" not in r.stderr and needle in " ".join(r.stderr.split()), r.stderr
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(b_dir)],
                                      "calibration": str(calib), "parameters": {"width": 1.5, "heads": "concat"}}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
    assert r.returncode == 2 and "do not apply to a bert model" in " ".join(r.stderr.split())
    recipe.write_text(yaml.safe_dump({"merge_method": "pleas", "models": [str(a_dir), str(b_dir)],
                                      "calibration": str(calib), "parameters": {"attention_width": 2.0}}))
    r = run_cli("pleas", recipe, "-o", tmp_path / "merged")
    assert r.returncode == 2 and "number of heads cannot change" in " ".join(r.stderr.split()), r.stderr
    assert set(tmp_path.iterdir()) == before
