"""calibrate -> recipe -> streaming merge: RegMean and Fisher read their statistics through the engine."""

import pytest
import torch
import yaml
from safetensors.torch import load_file

import mergelab
from mergelab.calibrate import calibrate, file_texts, load_statistic
from mergelab.errors import CheckpointError
from tests.calibrate import tiny
from tests.conftest import run_cli


@pytest.fixture(scope="module")
def calibrated(tmp_path_factory):
    root = tmp_path_factory.mktemp("merge")
    data = []
    for k in range(2):
        tiny.bert_classifier(root / f"m{k}", seed=10 + k)
        data.append(tiny.write_jsonl(root / f"d{k}.jsonl", [{"text": t} for t in tiny.texts(9, offset=20 * k)]))
    for k in range(2):
        calibrate(root / f"m{k}", file_texts(data[k]), root / f"c{k}", ["gram", "fisher"], batch_size=4)
    return root


def recipe(path, root, method, stat, params=None, models=(0, 1)):
    data = {"merge_method": method, "parameters": params or {},
            "models": [{"model": str(root / f"m{k}"),
                        "parameters": {"statistics": str(root / f"c{k}" / f"{stat}.safetensors")}} for k in models]}
    path.write_text(yaml.safe_dump(data))
    return path


def test_regmean_recipe_equals_the_closed_form_on_the_stored_grams(calibrated, tmp_path):
    out = tmp_path / "out"
    mergelab.merge(recipe(tmp_path / "r.yml", calibrated, "regmean", "gram", {"alpha": 0.5}), out)
    merged = load_file(str(out / "model.safetensors"))
    ms = [load_file(str(calibrated / f"m{k}" / "model.safetensors")) for k in range(2)]
    gs = [load_statistic(calibrated / f"c{k}" / "gram.safetensors")[0] for k in range(2)]
    name = "bert.encoder.layer.1.output.dense.weight"
    shrunk = []
    for g in gs:
        s = g[name].double() * 0.5
        s.diagonal().copy_(g[name].double().diagonal())
        shrunk.append(s)
    expected = torch.linalg.solve(shrunk[0] + shrunk[1],
                                  shrunk[0] @ ms[0][name].double().T + shrunk[1] @ ms[1][name].double().T).T
    torch.testing.assert_close(merged[name].double(), expected, atol=1e-5, rtol=1e-5)
    bias = "bert.encoder.layer.1.output.dense.bias"
    torch.testing.assert_close(merged[bias], (ms[0][bias] + ms[1][bias]) / 2)
    norm = "bert.embeddings.LayerNorm.weight"
    torch.testing.assert_close(merged[norm], (ms[0][norm] + ms[1][norm]) / 2)


def test_identical_models_give_themselves_back_through_the_engine(calibrated, tmp_path):
    for method, stat in (("regmean", "gram"), ("fisher", "fisher")):
        out = tmp_path / method
        data = {"merge_method": method,
                "models": [{"model": str(calibrated / "m0"),
                            "parameters": {"statistics": str(calibrated / f"c{k}" / f"{stat}.safetensors")}}
                           for k in range(2)]}
        (tmp_path / f"{method}.yml").write_text(yaml.safe_dump(data))
        mergelab.merge(tmp_path / f"{method}.yml", out)
        merged = load_file(str(out / "model.safetensors"))
        original = load_file(str(calibrated / "m0" / "model.safetensors"))
        for k, v in original.items():
            torch.testing.assert_close(merged[k], v, atol=2e-5, rtol=1e-4, msg=f"{method}: {k}")


def test_fisher_recipe_equals_the_weighted_average_of_stored_fishers(calibrated, tmp_path, capsys):
    path = recipe(tmp_path / "f.yml", calibrated, "fisher", "fisher", {"normalize": False, "eps_mode": "add_all"})
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    merged = load_file(str(tmp_path / "out" / "model.safetensors"))
    ms = [load_file(str(calibrated / f"m{k}" / "model.safetensors")) for k in range(2)]
    fs = [load_statistic(calibrated / f"c{k}" / "fisher.safetensors")[0] for k in range(2)]
    name = "bert.encoder.layer.0.attention.self.query.weight"
    f0, f1 = fs[0][name].double() + 1e-6, fs[1][name].double() + 1e-6
    expected = (f0 * ms[0][name] + f1 * ms[1][name]) / (f0 + f1)
    torch.testing.assert_close(merged[name].double(), expected, atol=1e-6, rtol=1e-5)


def test_wrong_statistics_file_is_explained(calibrated, tmp_path, capsys):
    path = recipe(tmp_path / "bad.yml", calibrated, "fisher", "gram")
    code, _, err = run_cli(["merge", path, "-o", tmp_path / "o", "-q"], capsys)
    assert code == 2 and "gram.safetensors" in err
    data = {"merge_method": "regmean", "models": [{"model": str(calibrated / "m0")}, {"model": str(calibrated / "m1")}]}
    (tmp_path / "missing.yml").write_text(yaml.safe_dump(data))
    code, _, err = run_cli(["merge", tmp_path / "missing.yml", "-o", tmp_path / "o2", "-q"], capsys)
    assert code == 2 and "statistics" in err
    with pytest.raises(CheckpointError):
        mergelab.merge(recipe(tmp_path / "nofile.yml", calibrated, "regmean", "nothing"), tmp_path / "o3")
