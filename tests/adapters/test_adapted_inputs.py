"""Adapters as merge inputs (issue 16 item 1): BASE+ADAPTER and {adapter: PATH} in recipes, applied
per tensor and per row range, equal to PEFT's merge_and_unload followed by the dense merge."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml

from mergelab.errors import CheckpointError, RecipeError
from mergelab.io.adapted import AdaptedCheckpoint, open_model, split_adapter_ref
from mergelab.merge import merge, merge_state_dicts

from ..conftest import run_cli
from .helpers import peft_dense, random_adapter, state_of

peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def fam(tmp_path_factory):
    from mergelab.synthetic import make_llama_family

    root = tmp_path_factory.mktemp("adapted")
    base, other = make_llama_family(root, experts=1, hidden=32, layers=2, intermediate=64, vocab=64)
    ads = [random_adapter(base, root / "ad1", seed=11, r=4, alpha=8),
           random_adapter(base, root / "ad+2", seed=12, r=8, alpha=16, use_rslora=True,
                          rank_pattern={"layers.0.mlp.down_proj": 2})]
    return base, ads, other


def test_read_rows_equal_peft_dense(fam):
    base, ads, _ = fam
    ck = open_model(f"{base}+{ads[1]}")
    assert isinstance(ck, AdaptedCheckpoint)
    dense = peft_dense(base, ads[1])
    name = "model.layers.0.mlp.down_proj.weight"
    torch.testing.assert_close(ck.read(name, dtype=torch.float32), dense[name], rtol=0, atol=2e-6)
    torch.testing.assert_close(ck.read(name, rows=(5, 17)), dense[name][5:17], rtol=0, atol=2e-6)
    emb = "model.embed_tokens.weight"  # not adapted: the base's bytes
    assert torch.equal(ck.read(emb), state_of(base)[emb])
    assert ck.fingerprint()["adapter"]["files"][0]["name"] == "adapter_config.json"


def test_plus_in_existing_folder_name_is_not_split(fam, tmp_path):
    base, ads, _ = fam
    assert split_adapter_ref(str(ads[1])) is None  # ".../ad+2" exists: never split
    assert split_adapter_ref(f"{base}+{ads[1]}") == (str(base), str(ads[1]))
    plus_model = tmp_path / "exp+1"
    shutil.copytree(base, plus_model)
    ck = open_model(str(plus_model))
    assert not isinstance(ck, AdaptedCheckpoint) and ck.path == plus_model


def _recipe(base, models, method="task_arithmetic", **extra):
    return {"merge_method": method, "base_model": str(base), "dtype": "float32",
            "models": [{"model": m, "parameters": {"weight": w}} for m, w in models], **extra}


def test_recipe_merge_equals_peft_densify_then_merge(fam, tmp_path):
    base, ads, _ = fam
    rec = _recipe(base, [(f"{base}+{ads[0]}", 0.7), ({"adapter": str(ads[1])}, 0.5)], method="ties",
                  parameters={"density": 0.6})
    out = merge(rec, tmp_path / "out").out
    expected = merge_state_dicts(state_of(base), [peft_dense(base, a) for a in ads], "ties",
                                 weight=[0.7, 0.5], density=0.6)
    got = state_of(out)
    assert set(got) == set(expected)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    manifest = json.loads((out / "mergelab.json").read_text())
    assert any("adapter" in fp for fp in manifest["inputs"].values())


def test_cli_refusals_name_file_and_field(fam, tmp_path, capsys):
    base, ads, other = fam
    bad = tmp_path / "bad"
    shutil.copytree(ads[0], bad)

    def run(models, expect):
        path = tmp_path / "r.yaml"
        path.write_text(yaml.safe_dump(_recipe(base, [(m, 1.0) for m in models])))
        code, _, err = run_cli(["merge", path, "-o", tmp_path / "o"], capsys)
        assert code != 0 and expect in err, err
        assert "Traceback" not in err and not (tmp_path / "o").exists()
        assert not (tmp_path / "o.partial").exists()

    (bad / "adapter_config.json").unlink()
    run([f"{base}+{bad}"], "is not a PEFT adapter folder: '" + str(bad / "adapter_config.json") + "' is missing")
    run([str(ads[0])], "is a PEFT adapter folder (it has adapter_config.json), not a model")
    shutil.rmtree(bad)
    shutil.copytree(ads[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(other)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    run([f"{base}+{bad}"], "field 'base_model_name_or_path' is '" + str(other))
    cfg["base_model_name_or_path"] = str(base)
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    from safetensors.torch import load_file, save_file

    st = bad / "adapter_model.safetensors"
    sd = load_file(str(st))
    sd = {k.replace("layers.1.mlp.down_proj", "layers.7.mlp.down_proj"): v for k, v in sd.items()}
    save_file(sd, str(st))
    run([f"{base}+{bad}"], "target module 'model.layers.7.mlp.down_proj' is absent from the base")


def test_adapter_entry_needs_base_model(fam):
    base, ads, _ = fam
    from mergelab.recipe import load_recipe

    with pytest.raises(RecipeError, match="has no base_model"):
        load_recipe({"merge_method": "linear", "models": [{"model": {"adapter": str(ads[0])}}]})
    r = load_recipe(_recipe(base, [({"adapter": str(ads[0])}, 1.0)]))
    assert r.models[0].model == f"{base}+{ads[0]}"


def test_shape_mismatch_is_refused(fam, tmp_path):
    base, ads, _ = fam
    from mergelab.synthetic import make_llama_family

    wide = make_llama_family(tmp_path, experts=0, hidden=32, layers=2, intermediate=96, vocab=64)[0]
    bad = tmp_path / "ad"
    shutil.copytree(ads[0], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (bad / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=r"module 'model.layers.0.mlp.down_proj' gives a delta of shape "
                                              r"\(32, 64\).*shape \(32, 96\): adapter of another base"):
        open_model(f"{wide}+{bad}")
