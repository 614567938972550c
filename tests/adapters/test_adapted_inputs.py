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
from mergelab.io.peft_adapter import read_lora
from mergelab.merge import merge, merge_state_dicts

from ..conftest import run_cli
from .helpers import load_base, peft_dense, random_adapter, state_of

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


def _files(*folders):
    return {p: p.stat().st_mtime_ns for f in folders for p in f.rglob("*")}


def test_merge_forms_adapted_tensors_per_row_chunk_and_writes_nothing_else(fam, tmp_path, monkeypatch):
    """Item 1: no densified copy. While merging, each adapted tensor is formed as ``W[rows] + s B[rows] A``
    one row chunk at a time (so memory follows the chunk, not the tensor or the model), every row of
    every adapted module exactly once per adapter; the result is PEFT's densify-then-merge; nothing is
    written but the output (not beside it, not in the temporary folder, not into the base or adapters)."""
    import tempfile

    from mergelab.execute.local import LocalExecutor
    from mergelab.io.peft_adapter import LoraModule

    base, ads, _ = fam
    chunk = 256  # elements: 4-8 rows of the 32 x 32 and 32 x 64 projections
    formed = []
    real_delta = LoraModule.delta

    def spy(self, rows=None, dtype=torch.float32, device="cpu"):
        d = real_delta(self, rows, dtype, device)
        formed.append((self.weight_name, rows, tuple(d.shape)))
        return d

    monkeypatch.setattr(LoraModule, "delta", spy)
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    work = tmp_path / "work"
    work.mkdir()
    inputs_before = _files(base, *ads)
    rec = _recipe(base, [(f"{base}+{ads[0]}", 0.7), ({"adapter": str(ads[1])}, 0.5)])
    out = merge(rec, work / "out", executor=LocalExecutor(chunk_elements=chunk, whole_elements=None)).out

    expected = merge_state_dicts(state_of(base), [peft_dense(base, a) for a in ads], "task_arithmetic",
                                 weight=[0.7, 0.5])
    got = state_of(out)
    for k, v in expected.items():
        torch.testing.assert_close(got[k], v, rtol=1e-6, atol=1e-6)
    assert [p.name for p in work.iterdir()] == ["out"] and list(scratch.iterdir()) == []
    assert _files(base, *ads) == inputs_before

    shapes = {n: tuple(t.shape) for n, t in state_of(base).items()}
    adapted = [m.weight_name for a in ads for m in read_lora(a).modules.values()]
    assert len(adapted) == 12  # 2 adapters x 2 layers x (q, v, down)
    assert formed and all(rows is not None and shape[0] == rows[1] - rows[0] and shape[1] == shapes[name][1]
                          and shape[0] * shape[1] <= chunk for name, rows, shape in formed)
    for name in set(adapted):
        covered = sorted(r for n, r, _ in formed if n == name)
        assert sum(b - a for a, b in covered) == adapted.count(name) * shapes[name][0], name
        assert len(covered) > adapted.count(name)  # split: no call formed a whole tensor


def _bad_adapter(case, fam, tmp_path):
    """``(model reference, expected message)`` for one bad input of issue 16 (items 1 and 7)."""
    from safetensors.torch import load_file, save_file

    base, ads, other = fam
    bad = tmp_path / "bad"
    shutil.copytree(ads[0], bad)
    cfg_path, st = bad / "adapter_config.json", bad / "adapter_model.safetensors"
    cfg = json.loads(cfg_path.read_text())
    if case == "missing_config":
        cfg_path.unlink()
        return f"{base}+{bad}", f"is not a PEFT adapter folder: '{cfg_path}' is missing"
    if case == "bare_adapter":
        return str(ads[0]), "is a PEFT adapter folder (it has adapter_config.json), not a model"
    if case == "recorded_base":
        cfg["base_model_name_or_path"] = str(other)
        cfg_path.write_text(json.dumps(cfg))
        return f"{base}+{bad}", f"'{cfg_path}' field 'base_model_name_or_path' is '{other}'"
    if case == "target_absent":
        sd = {k.replace("layers.1.mlp.down_proj", "layers.7.mlp.down_proj"): v for k, v in load_file(str(st)).items()}
        save_file(sd, str(st))
        return f"{base}+{bad}", f"adapter '{bad}': target module 'model.layers.7.mlp.down_proj' is absent from the base"
    if case == "rank_inside_file":
        sd = load_file(str(st))
        key = "base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"
        sd[key] = sd[key][:3].contiguous()
        save_file(sd, str(st))
        return (f"{base}+{bad}", f"'{st}': rank mismatch in module 'model.layers.0.mlp.down_proj': lora_A has 3 rows "
                                 f"but lora_B has 4 columns")
    if case == "other_shapes":  # trained on a base with a wider MLP, no recorded base: caught by the shapes
        wide = _adapter_of_a_wider_base(tmp_path)
        return (f"{base}+{wide}", f"adapter '{wide}': module 'model.layers.0.mlp.down_proj' gives a delta of shape "
                                  f"(32, 96) (lora_B (32, 4) @ lora_A (4, 96)) but the base '{base}' has "
                                  f"'model.layers.0.mlp.down_proj.weight' of shape (32, 64): adapter of another base")
    shutil.rmtree(bad)
    if case == "ia3":  # another PEFT type, saved by PEFT itself
        from peft import IA3Config, get_peft_model

        get_peft_model(load_base(base), IA3Config(target_modules=["q_proj", "v_proj", "down_proj"],
                                                  feedforward_modules=["down_proj"])).save_pretrained(str(bad))
        return f"{base}+{bad}", f"'{cfg_path}': field 'peft_type' is 'IA3'; mergelab reads LoRA adapters only"
    field = {"dora": "use_dora", "lora_bias": "lora_bias"}[case]  # LoRA variants, saved by PEFT itself
    random_adapter(base, bad, seed=13, r=4, alpha=8, **{field: True})
    return f"{base}+{bad}", f"'{cfg_path}': field '{field}' is set (True)"


def _adapter_of_a_wider_base(tmp_path):
    """A PEFT LoRA (r=4) made on a base like ``fam``'s but with intermediate size 96, base not recorded."""
    from mergelab.synthetic import make_llama_family

    wide = make_llama_family(tmp_path / "wide", experts=0, hidden=32, layers=2, intermediate=96, vocab=64)[0]
    ad = random_adapter(wide, tmp_path / "wide_ad", seed=14, r=4, alpha=8)
    cfg = json.loads((ad / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = None
    (ad / "adapter_config.json").write_text(json.dumps(cfg))
    return ad


BAD_CASES = ["missing_config", "bare_adapter", "recorded_base", "target_absent", "rank_inside_file", "other_shapes",
             "dora", "lora_bias", "ia3"]


@pytest.mark.filterwarnings("ignore:`lora_bias=True` was passed", "ignore:Adapter 'default'.*invalid shape")
@pytest.mark.parametrize("output", [None, {"format": "peft", "combine": "cat"}], ids=["dense", "peft"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_cli_refusals_name_file_and_field(fam, tmp_path, capsys, case, output):
    """`mergelab merge` with one good adapter and one bad input, to a model and to an adapter (the
    adapter merge): exit code 2, the message names the file and the field or tensor, no traceback,
    nothing at -o (nor a partial folder beside it)."""
    base, ads, _ = fam
    ref, expect = _bad_adapter(case, fam, tmp_path)
    rec = _recipe(base, [(f"{base}+{ads[0]}", 0.5), (ref, 1.0)])
    if output:
        rec["output"] = output
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(rec))
    code, out, err = run_cli(["merge", path, "-o", tmp_path / "o"], capsys)
    assert code == 2 and expect in " ".join(err.split()), err
    assert "Traceback" not in err + out
    assert [p.name for p in tmp_path.iterdir() if p.name == "o" or p.name.startswith("o.")] == []


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


def test_cli_rank_mismatch_inside_the_file(trained, tmp_path, capsys):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "bad"
    shutil.copytree(trained.adapters["arith"], bad)
    st = bad / "adapter_model.safetensors"
    sd = load_file(str(st))
    key = "base_model.model.model.layers.1.self_attn.v_proj.lora_A.weight"
    sd[key] = sd[key][:3].contiguous()
    save_file(sd, str(st))
    path = tmp_path / "r.yaml"
    path.write_text(yaml.safe_dump(_recipe(trained.base, [({"adapter": str(bad)}, 1.0)])))
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o"], capsys)
    text = " ".join(err.split())
    assert code == 2 and "Traceback" not in err
    assert f"'{st}': rank mismatch in module 'model.layers.1.self_attn.v_proj': lora_A has 3 rows but lora_B has 4 " \
           f"columns" in text
    assert not (tmp_path / "o").exists() and not (tmp_path / "o.partial").exists()


def test_methods_lists_adapter_combine_types(capsys):
    code, out, _ = run_cli(["methods"], capsys)
    text = " ".join(out.split())
    assert code == 0
    for combine in ("cat", "svd", "knots"):
        assert f"adapter combine {combine} (output: {{format: peft, combine: {combine}}})" in text


def test_inspect_reads_adapters_through_the_factory(fam):
    """`mergelab inspect BASE BASE+ADAPTER`: the task vector is s*B@A on the adapted tensors, 0 elsewhere."""
    from mergelab.inspect.scan import inspect_models

    base, ads, _ = fam
    diag = inspect_models(str(base), [f"{base}+{ads[0]}"])
    adapted = {m.weight_name: m for m in read_lora(ads[0]).modules.values()}
    for name, stats in diag.tensors.items():
        if name in adapted:
            m = adapted[name]
            want = float((m.scale * m.B.double() @ m.A.double()).pow(2).sum())
            assert float(stats.gram[0, 0]) == pytest.approx(want, rel=1e-4)
        else:
            assert float(stats.gram[0, 0]) == 0.0 and int(stats.zeros[0]) == stats.numel
