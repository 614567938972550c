"""LoRA experts on the bench miniature: ``bench prepare --lora-rank R`` and ``bench run --lora-rank R
--adapter-merges`` (issue 16, item 6).

Oracles: PEFT itself loads each cached adapter (``PeftModel.from_pretrained`` on the base BertModel,
``merge_and_unload``) and, with the head saved beside it, must predict exactly the test examples the
cache recorded; ``cat`` is exact, so its row must equal the dense task-arithmetic merge of the same
adapters with the same coefficients example for example.
"""

from __future__ import annotations

import json

import pytest
import torch
from typer.testing import CliRunner

from mergelab.bench.cache import BenchCache
from mergelab.bench.cli import app as bench_app
from mergelab.evaluate.tasks import load_suite

pytestmark = pytest.mark.filterwarnings("ignore")


@pytest.fixture(scope="module")
def lora_prepared(tiny_base, mini_suite, tmp_path_factory):
    cache = tmp_path_factory.mktemp("lora-cache")
    common = ["prepare", "--suite", str(mini_suite), "--cache", str(cache), "--base", str(tiny_base),
              "--epochs", "1", "--batch-size", "16", "--no-progress"]
    res = CliRunner().invoke(bench_app, common + ["--no-multitask", "--lr", "1e-3"])  # full experts + probes
    assert res.exit_code == 0, res.output + repr(res.exception)
    args = common + ["--lora-rank", "4", "--lr", "5e-3"]
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0, res.output + repr(res.exception)
    return cache, args


def test_lora_experts_are_peft_adapters_that_predict_what_the_cache_recorded(lora_prepared, tiny_base, mini_suite):
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoTokenizer, BertModel

    cache_root, args = lora_prepared
    suite = load_suite(str(mini_suite))
    cache = BenchCache(suite, cache_root)
    full_prepare = json.loads((cache.dir / "prepare.json").read_text())
    assert "lora" not in full_prepare  # the full fine-tunes' record is not rewritten by a LoRA prepare
    lora_prepare = json.loads((cache.lora_dir(4) / "prepare.json").read_text())
    assert lora_prepare["lora"]["r"] == 4 and lora_prepare["multitask_tasks"] == []
    tok = AutoTokenizer.from_pretrained(str(tiny_base))
    for name in suite.task_names:
        d = cache.lora_expert_dir(name, 4)
        info = json.loads((d / "expert.json").read_text())
        assert info["kind"] == "lora-expert" and info["train_config"]["lr"] == 5e-3
        cfg = json.loads((d / "adapter_config.json").read_text())
        assert cfg["r"] == 4 and cfg["lora_alpha"] == 8 and cfg["base_model_name_or_path"] == str(tiny_base)
        # factors on the six linears of each of the two layers, nothing else (no pooler, no saved modules)
        keys = load_file(str(d / "adapter_model.safetensors")).keys()
        assert len(keys) == 2 * 6 * 2 and all(".lora_A." in k or ".lora_B." in k for k in keys)
        assert not any("pooler" in k for k in keys)
        model = PeftModel.from_pretrained(BertModel.from_pretrained(str(tiny_base)), str(d)).merge_and_unload().eval()
        head = load_file(str(d / "head.safetensors"))
        test = suite.task(name).split("test")
        with torch.no_grad():
            enc = tok([e.text for e in test], padding=True, truncation=True, max_length=64, return_tensors="pt")
            pred = (model(**enc).pooler_output @ head["weight"].T + head["bias"]).argmax(-1)
        assert "".join("1" if p == e.label else "0" for p, e in zip(pred.tolist(), test)) == \
            info["tasks"][name]["test_correct"]
        # the adapter moved the weights (the B factors start at zero)
        base_q = BertModel.from_pretrained(str(tiny_base)).encoder.layer[0].attention.self.query.weight
        assert not torch.allclose(model.encoder.layer[0].attention.self.query.weight, base_q)
    res = CliRunner().invoke(bench_app, args)
    assert res.exit_code == 0 and "trained 0 unit(s)" in res.output


def test_run_lora_adapter_merges_rows(lora_prepared, tiny_base, mini_suite, tmp_path):
    cache_root, _ = lora_prepared
    out = tmp_path / "out"
    res = CliRunner().invoke(bench_app, ["run", "--suite", str(mini_suite), "--cache", str(cache_root), "--base",
                                         str(tiny_base), "--out", str(out), "-m", "task_arithmetic,ties,regmean,fisher", "--no-tune",
                                         "--lora-rank", "4", "--adapter-merges"])
    assert res.exit_code == 0, res.output + repr(res.exception)
    report = json.loads((out / "report.json").read_text())
    assert report["complete"] and report["lora_rank"] == 4
    rows = {r["name"]: r for r in report["rows"]}
    suite = load_suite(str(mini_suite))
    cache = BenchCache(suite, cache_root)
    for t in suite.merge_task_names:  # "individual" are the LoRA experts, the full ones a separate row
        lora_bits = json.loads((cache.lora_expert_dir(t, 4) / "expert.json").read_text())["tasks"][t]["test_correct"]
        full_bits = json.loads((cache.expert_dir(t) / "expert.json").read_text())["tasks"][t]["test_correct"]
        assert rows["individual"]["correct"][t] == lora_bits
        assert rows["individual (full fine-tunes)"]["correct"][t] == full_bits
    cat = rows["task arithmetic (adapter, cat)"]
    dense = rows["task arithmetic (default)"]
    assert cat["params"] == dense["params"] and cat["params_from"] == "task arithmetic (default)"
    assert cat["correct"] == dense["correct"]  # cat is exact
    assert cat["adapter_rank"] == 4 * len(suite.merge_task_names) and cat["max_relative_truncation_error"] == 0.0
    for name in ("task arithmetic (adapter, svd r=8)", "TIES (adapter, svd r=8)", "TIES (adapter, knots r=8)"):
        row = rows[name]
        assert row["status"] == "ok" and row["adapter_rank"] == 8 and row["adapter_bytes"] > 0
        assert row["merge_seconds"] > 0 and 0.0 <= row["max_relative_truncation_error"] < 1.0
    assert (out / "adapters" / "cat-task_arithmetic" / "adapter_config.json").is_file()
    cat_bytes = (out / "adapters" / "cat-task_arithmetic" / "adapter_model.safetensors").stat().st_size
    assert cat["adapter_bytes"] == cat_bytes
    md = (out / "report.md").read_text()
    m = cat["metrics"]
    assert (f"| task arithmetic (adapter, cat) | lambda=1.0 | {100 * m['mean_accuracy']:.1f} | "
            f"{100 * m['mean_normalised_accuracy']:.1f} | {cat['merge_seconds']:.2f} | {cat['merge_peak_mib']:.0f} | "
            f"{cat_bytes:,} ({4 * len(suite.merge_task_names)}) | 0 (exact) |") in md
    for name in ("regmean (default)", "fisher (default)"):
        assert rows[name]["status"] == "ok", rows[name]


def test_lora_calibration_equals_that_of_the_peft_merged_classifier(lora_prepared, tiny_base, mini_suite, tmp_path):
    """The bench's statistics of a LoRA expert (its classifier built from BASE+ADAPTER and the head saved
    beside it) equal those of PEFT's merged encoder + the same head saved as a BertForSequenceClassification
    folder, calibrated on the same examples."""
    from peft import PeftModel
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification, BertModel

    from mergelab.bench.run import CALIBRATION_EXAMPLES, FISHER_MODE
    from mergelab.calibrate import task_texts
    from mergelab.calibrate.collect import calibrate
    from mergelab.evaluate.model import MAX_LENGTH

    cache_root, _ = lora_prepared
    suite = load_suite(str(mini_suite))
    cache = BenchCache(suite, cache_root)
    t = "sentiment"
    got_dir = cache.lora_expert_dir(t, 4) / "calibration"
    if not (got_dir / "fisher.safetensors").is_file():  # made by the run test; make it here when run alone
        from mergelab.bench.run import BenchRunner

        runner = BenchRunner(suite, cache, suite.merge_task_names, [], str(tiny_base), lora_rank=4, log=lambda s: None)
        runner.statistics("gram"), runner.statistics("fisher")
    d = cache.lora_expert_dir(t, 4)
    merged = PeftModel.from_pretrained(BertModel.from_pretrained(str(tiny_base)), str(d)).merge_and_unload()
    head = load_file_(d / "head.safetensors")
    cfg = BertConfig.from_pretrained(str(tiny_base), num_labels=head["weight"].shape[0])
    cfg.architectures = ["BertForSequenceClassification"]
    clf = BertForSequenceClassification(cfg)
    clf.bert.load_state_dict(merged.state_dict())
    clf.classifier.weight.data.copy_(head["weight"])
    clf.classifier.bias.data.copy_(head["bias"])
    folder = tmp_path / "dense"
    clf.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(tiny_base)).save_pretrained(str(folder))
    data = task_texts(suite.task(t), "train", CALIBRATION_EXAMPLES, 0, suite=suite.name)
    oracle = calibrate(folder, data, tmp_path / "oracle", ["gram", "fisher"], max_length=MAX_LENGTH,
                       fisher_mode=FISHER_MODE)
    for stat in ("gram", "fisher"):
        got, want = load_file_(got_dir / f"{stat}.safetensors"), load_file_(oracle.files[stat])
        # the head is never merged: the bench's statistics cover the encoder's tensors only
        assert set(got) == {k for k in want if not k.startswith("classifier.")}
        assert any(k.startswith("bert.encoder") for k in got)
        for k in got:
            torch.testing.assert_close(got[k], want[k], rtol=1e-4, atol=1e-7, msg=f"{stat} {k}")


def load_file_(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_adapter_merges_without_lora_rank_is_refused(lora_prepared, tiny_base, mini_suite, tmp_path):
    cache_root, _ = lora_prepared
    res = CliRunner().invoke(bench_app, ["run", "--suite", str(mini_suite), "--cache", str(cache_root), "--base",
                                         str(tiny_base), "--out", str(tmp_path / "o"), "-m", "linear", "--no-tune",
                                         "--adapter-merges"])
    assert res.exit_code != 0 and "--lora-rank" in str(res.exception)
    assert not (tmp_path / "o").exists()


def test_multitask_with_textmix_lora_is_an_error_before_any_work(mini_suite, tmp_path):
    cache = tmp_path / "cache"
    res = CliRunner().invoke(bench_app, ["prepare", "--suite", str(mini_suite), "--cache", str(cache),
                                         "--lora-rank", "4", "--multitask", "--no-progress"])
    assert res.exit_code != 0 and "--multitask" in str(res.exception) and "LoRA" in str(res.exception)
    assert not cache.exists() or not any(cache.rglob("*.safetensors"))
