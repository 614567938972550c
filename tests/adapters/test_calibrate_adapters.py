"""Calibration of a LoRA expert given as ``BASE+ADAPTER`` (issue 16: RegMean/Fisher on LoRA experts).

Oracle: PEFT's own ``merge_and_unload`` of the same trained adapter, saved as a plain model folder and
calibrated the usual way; the statistics of ``BASE+ADAPTER`` must match it tensor for tensor.
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.calibrate.collect import calibrate
from mergelab.calibrate.data import CalibrationSet
from mergelab.errors import CheckpointError
from tests.adapters.helpers import load_base

TEXTS = ["Q: 2 + 3\nA: 5", "Q: reverse abc\nA: cba", "Q: 7 * 6\nA: 42", "Q: upper hi\nA: HI", "Q: 9 - 4\nA: 5"]


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _peft_folder(base, adapter, out):
    from peft import PeftModel
    from transformers import AutoTokenizer

    PeftModel.from_pretrained(load_base(base), str(adapter)).merge_and_unload().save_pretrained(str(out))
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(str(out))
    return out


@pytest.mark.parametrize("name", ["arith", "strops"])  # strops: rsLoRA, rank_pattern, alpha_pattern
def test_base_plus_adapter_statistics_equal_those_of_peft_merged_model(trained, tmp_path, name):
    data = CalibrationSet(TEXTS, source={"test": name})
    ref = f"{trained.base}+{trained.adapters[name]}"
    rep = calibrate(ref, data, tmp_path / "adapted", ["gram", "fisher"], fisher_mode="empirical", max_length=32)
    dense = _peft_folder(trained.base, trained.adapters[name], tmp_path / "dense")
    oracle = calibrate(dense, data, tmp_path / "oracle", ["gram", "fisher"], fisher_mode="empirical", max_length=32)
    base_rep = calibrate(trained.base, data, tmp_path / "base", ["fisher"], fisher_mode="empirical", max_length=32)
    for stat in ("gram", "fisher"):
        got, want = load_file(str(rep.files[stat])), load_file(str(oracle.files[stat]))
        assert set(got) == set(want) and got
        for k in want:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=f"{stat} {k}")
    # the adapter is really applied: the Fisher of an adapted matrix differs from the base's
    fb, fa = load_file(str(base_rep.files["fisher"])), load_file(str(rep.files["fisher"]))
    adapted = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.allclose(fb[adapted], fa[adapted], rtol=1e-3)
    summary = json.loads((tmp_path / "adapted" / "calibration.json").read_text())
    assert summary["model"] == ref


def test_calibrate_cli_takes_base_plus_adapter_and_refuses_a_bare_adapter(trained, tmp_path):
    from mergelab.calibrate.cli import app

    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in TEXTS))
    ref = f"{trained.base}+{trained.adapters['arith']}"
    res = CliRunner().invoke(app, [ref, "-o", str(tmp_path / "o"), "--data", str(data), "-q"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    assert (tmp_path / "o" / "gram.safetensors").is_file()
    res = CliRunner().invoke(app, [str(trained.adapters["arith"]), "-o", str(tmp_path / "bare"), "--data", str(data)])
    assert res.exit_code != 0 and isinstance(res.exception, CheckpointError)
    assert "BASE+" in str(res.exception) and not (tmp_path / "bare").exists()
