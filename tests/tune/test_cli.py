"""``mergelab tune regmean-pp`` on Hugging Face folders (BERT classifiers, GPT-2 with file-name prefixes)."""

import json

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from mergelab.calibrate.data import file_texts, tokenize_batches
from mergelab.tune.cli import app
from mergelab.tune.functional import ModelPool
from mergelab.tune.regmean_pp import regmean_plusplus
from tests.calibrate import tiny

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.mark.parametrize("family", ["bert", "gpt2"])
def test_regmean_pp_cli_writes_a_loadable_model_equal_to_the_api(tmp_path, family):
    make = tiny.bert_classifier if family == "bert" else tiny.gpt2_lm
    models = [tmp_path / f"m{k}" for k in range(2)]
    for k, m in enumerate(models):
        make(m, seed=20 + k)
    data = [tiny.write_jsonl(tmp_path / f"d{k}.jsonl", [{"text": t} for t in tiny.texts(6, 10 * k)]) for k in range(2)]
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["regmean-pp", *map(str, models), "-o", str(out), "--data", str(data[0]),
                                   "--data", str(data[1]), "--alpha", "0.5", "--batch-size", "3"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    info = json.loads((out / "mergelab-tune.json").read_text())
    assert info["method"] == "regmean_plusplus"
    from transformers import AutoModel

    AutoModel.from_pretrained(str(out))  # loads
    merged = load_file(str(out / "model.safetensors"))
    # the same merge through the Python API, on in-memory state dicts
    from mergelab.calibrate.model import load_model
    from transformers import AutoTokenizer

    arch = load_model(models[0])
    tok = AutoTokenizer.from_pretrained(str(models[0]))
    batches = [list(tokenize_batches(tok, file_texts(d, n=256), 3, 128)) for d in data]
    states = [load_model(m).module.state_dict() for m in models]
    api = regmean_plusplus(arch.module, ModelPool(states), batches, alpha=0.5).state
    key = next(k for k in merged if k.endswith("0.attn.c_attn.weight" if family == "gpt2" else
                                                 "layer.1.output.dense.weight"))
    api_key = key if key in api else "transformer." + key
    torch.testing.assert_close(merged[key], api[api_key], atol=1e-5, rtol=1e-4)


def test_regmean_pp_cli_refuses_bad_input(tmp_path):
    res = CliRunner().invoke(app, ["regmean-pp", str(tmp_path / "a"), "-o", str(tmp_path / "o")])
    assert res.exit_code != 0 and "at least 2 models" in str(res.exception)


def test_tune_commands_are_mounted_in_the_mergelab_cli(capsys):
    from tests.conftest import run_cli

    code, out, _ = run_cli(["tune", "--help"], capsys)
    assert code == 0 and "regmean-pp" in out and "scale" in out and "bench" in out
