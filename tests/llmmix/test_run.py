"""`mergelab bench run --suite llmmix` end to end on a tiny base: prepare two experts, merge with two
methods, and check the report against values recomputed here from its per-example records."""

import json

import pytest
from typer.testing import CliRunner

from mergelab.bench.cli import app
from mergelab.llmmix.finetune import FinetuneConfig
from mergelab.llmmix.prepare import prepare
from tests.llmmix.tiny_lm import make_tokenizer

SIZES = {"train": 32, "validation": 6, "test": 8}
EXAMPLES = "train=32,validation=6,test=8"
TASKS = ["language_id", "refusal"]  # tasks a 70k-parameter model learns in 150 steps (base: 0%)


def save_base(folder):
    """A tiny Llama with the usual small initialisation (tiny_lm's is large on purpose, for other tests)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = make_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                      initializer_range=0.02, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    root = tmp_path_factory.mktemp("llmrun")
    save_base(root / "base-tiny" / "final")
    cfg = FinetuneConfig(steps=150, batch_size=8, lr=3e-3, checkpoint_every=1000, threads=1, eval_limit=3,
                         replay_batch=0)
    prepare("tiny", root, cfg, tasks=TASKS, multitask_steps=150, sizes=SIZES, progress=False, log=lambda s: None)
    return root


def _acc(bits):
    return bits.count("1") / len(bits)


def test_run_two_methods_report(prepared, tmp_path):
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared),
                                   "--methods", "task_arithmetic,ties,regmean", "--held-out", "letter_count",
                                   "--examples", EXAMPLES, "--grid", "lambda=0.5,1.0", "--grid", "density=0.5",
                                   "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    for f in ("report.json", "report.md", "accuracy_by_task.png", "normalised_accuracy.png",
              "accuracy_vs_merge_time.png"):
        assert (out / f).is_file() and (out / f).stat().st_size > 0, f
    rep = json.loads((out / "report.json").read_text())
    assert rep["complete"] and rep["suite"] == "llmmix"
    assert rep["base_source"] == "cache" and rep["base_model"] == str(prepared / "base-tiny" / "final")
    assert rep["merge_tasks"] == TASKS and rep["held_out"] == ["letter_count"]
    rows = {r["name"]: r for r in rep["rows"]}
    assert {"pretrained", "individual", "multi-task training", "task arithmetic (default)", "task arithmetic (tuned)",
            "TIES (default)", "TIES (tuned)"} <= set(rows)
    expert = rows["individual"]["correct"]
    ratios = rows["individual"]["expert_perplexity_ratio"]
    assert set(ratios) == set(TASKS) and all(
        ratios[t] == pytest.approx(rows["individual"]["expert_perplexity"][t] / rep["base_perplexity"]) for t in TASKS)
    assert all(_acc(expert[t]) > 0 for t in TASKS), expert  # so normalised accuracy is defined and checked
    base_ppl = rep["base_perplexity"]
    assert rows["pretrained"]["perplexity"] == pytest.approx(base_ppl)
    for name, row in rows.items():
        assert row["status"] == "ok", (name, row.get("reason"))
        m = row["metrics"]
        for t in TASKS:
            bits = row["correct"][t]
            assert len(bits) == SIZES["test"]
            assert m["accuracy"][t] == pytest.approx(_acc(bits))
            if _acc(expert[t]) > 0:
                assert m["normalised_accuracy"][t] == pytest.approx(_acc(bits) / _acc(expert[t]))
            flips = sum(e == "1" and b == "0" for e, b in zip(expert[t], bits)) / len(bits)
            assert m["negative_flip_rate"][t] == pytest.approx(flips)
        if row["kind"] == "merge" or name in ("pretrained", "multi-task training"):
            # held-out accuracy is the share of exact matches in the stored predictions
            assert m["held_out_accuracy"]["letter_count"] == pytest.approx(_acc(row["correct"]["letter_count"]))
            assert len(row["predictions"]["letter_count"]) == SIZES["test"]
            assert row["perplexity"] > 0
            assert row["perplexity_ratio"] == pytest.approx(row["perplexity"] / base_ppl)
            assert row["collapsed"] == (row["perplexity"] > 2 * base_ppl)
    for name in ("task arithmetic (tuned)", "TIES (tuned)"):
        row = rows[name]
        assert [s["params"]["lambda"] for s in row["search"]] == [0.5, 1.0]
        best = max(row["search"], key=lambda s: s["validation_mean_accuracy"])["validation_mean_accuracy"]
        chosen = [s for s in row["search"] if s["params"] == row["params"]]
        assert chosen and chosen[0]["validation_mean_accuracy"] == best
        assert row["merge_seconds"] > 0 and "merge_peak_mib" in row
    # the data-informed method ran on Llama linear layers with Gram statistics from each expert's train split
    reg = rows["regmean (default)"]
    assert reg["calibration"]["statistic"] == "gram" and reg["calibration"]["split"] == "train"
    for t in TASKS:
        assert (prepared / "experts-tiny" / t / "calibration" / "gram.safetensors").is_file()
    # task arithmetic at lambda=1.0 on the default row (the registry's default) is recorded as such
    assert rows["task arithmetic (default)"]["params"]["lambda"] == 1.0
    md = (out / "report.md").read_text()
    assert "held-out text ppl" in md and "more than 2x the base" in md and "TIES (tuned)" in md and "lambda=0.5" in md


def test_run_refuses_mismatched_examples(prepared, tmp_path):
    res = CliRunner().invoke(app, ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared),
                                   "--methods", "task_arithmetic", "--held-out", "", "--examples",
                                   "train=30,validation=6,test=8", "--out", str(tmp_path / "o")])
    assert res.exit_code != 0
    assert "other task data" in str(res.exception)
    assert not (tmp_path / "o" / "report.json").exists()


def test_run_eval_limit_scores_the_first_examples_of_every_split(prepared, tmp_path):
    """--eval-limit N: every row (experts, base, merges, held-out) is scored on the first N test examples,
    the same examples as the full run's first N (greedy decoding is per example), and the report says so."""
    common = ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared), "--methods", "task_arithmetic",
              "--no-tune", "--held-out", "letter_count", "--examples", EXAMPLES, "--threads", "1"]
    res = CliRunner().invoke(app, common + ["--eval-limit", "3", "--out", str(tmp_path / "lim")])
    assert res.exit_code == 0, res.output
    full = CliRunner().invoke(app, common + ["--out", str(tmp_path / "full")])
    assert full.exit_code == 0, full.output
    rep = json.loads((tmp_path / "lim" / "report.json").read_text())
    rows_full = {r["name"]: r for r in json.loads((tmp_path / "full" / "report.json").read_text())["rows"]}
    assert rep["eval_limit"] == 3 and rep["test_sizes"] == {t: 3 for t in TASKS + ["letter_count"]}
    assert "first 3 examples" in rep["protocol"]
    rows = {r["name"]: r for r in rep["rows"] if r.get("status") == "ok"}
    assert {"pretrained", "individual", "task arithmetic (default)"} <= set(rows)
    for name, row in rows.items():
        for t, bits in row["correct"].items():
            assert bits == rows_full[name]["correct"][t][:3], (name, t)
        for t in TASKS:
            assert row["metrics"]["accuracy"][t] == pytest.approx(_acc(row["correct"][t]))
    assert "(the first 3 examples of each)" in (tmp_path / "lim" / "report.md").read_text()


def test_run_eval_limit_refused_where_it_does_not_apply(prepared, tmp_path):
    res = CliRunner().invoke(app, ["run", "--suite", "textmix", "--eval-limit", "5", "--out", str(tmp_path / "t")])
    assert res.exit_code != 0 and "--eval-limit applies to --suite llmmix" in str(res.exception)
    res = CliRunner().invoke(app, ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared),
                                   "--methods", "task_arithmetic", "--held-out", "", "--examples", EXAMPLES,
                                   "--eval-limit", "0", "--out", str(tmp_path / "z")])
    assert res.exit_code != 0 and "--eval-limit must be >= 1, got 0" in str(res.exception)
    assert not (tmp_path / "t").exists() and not (tmp_path / "z").exists()


def test_run_reports_a_stale_multitask_model_instead_of_scoring_it(prepared, tmp_path):
    """A multi-task model trained on other data for one task (a task changed since) is not a reference:
    its row says so and names the task, where it used to be scored as if it were current."""
    import shutil

    cache = tmp_path / "cache"
    shutil.copytree(prepared, cache)
    rec_path = cache / "experts-tiny" / "multitask" / "finetune.json"
    rec = json.loads(rec_path.read_text())
    rec["settings"]["tasks"]["refusal"] = "0" * 16
    rec_path.write_text(json.dumps(rec))
    for rec_file in (cache / "experts-tiny" / "multitask" / "final").glob("finetune.json"):
        rec_file.write_text(json.dumps(rec))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(cache),
                                   "--methods", "task_arithmetic", "--no-tune", "--held-out", "",
                                   "--examples", EXAMPLES, "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rows = {r["name"]: r for r in json.loads((out / "report.json").read_text())["rows"]}
    mt = rows["multi-task training"]
    assert mt["status"] == "stale" and "other data for refusal" in mt["reason"] and "correct" not in mt
    assert rows["task arithmetic (default)"]["status"] == "ok"
    assert "multi-task training: stale" in (out / "report.md").read_text()


def test_heldout_text_is_the_bases_corpus_heldout_split(tmp_path):
    from mergelab.llmmix.run import heldout_text

    corpus = tmp_path / "elsewhere" / "corpus-x"
    corpus.mkdir(parents=True)
    (corpus / "heldout.jsonl").write_text("".join(json.dumps({"source": "s", "text": f"doc {i} " * 20}) + "\n"
                                                  for i in range(50)))
    (tmp_path / "root" / "corpus-other").mkdir(parents=True)
    (tmp_path / "root" / "corpus-other" / "heldout.jsonl").write_text(json.dumps({"text": "other"}) + "\n")
    (tmp_path / "root" / "base-tiny" / "final").mkdir(parents=True)
    (tmp_path / "root" / "base-tiny" / "pretrain.json").write_text(json.dumps({"corpus": str(corpus)}))
    text, source = heldout_text(tmp_path / "root", chars=300, base_dir=tmp_path / "root" / "base-tiny" / "final")
    assert source == str(corpus / "heldout.jsonl")
    assert text == ("doc 0 " * 20 + "\n\n" + "doc 1 " * 20 + "\n\n" + "doc 2 " * 20)[:300]
    # without the base's record: a corpus in the cache root
    text, source = heldout_text(tmp_path / "root", chars=300)
    assert text == "other"


def test_lora_experts_prepare_and_run(prepared, tmp_path):
    """`bench prepare --lora-rank R` trains PEFT LoRA experts into experts-SIZE-loraR; `bench run --lora-rank R`
    merges them. The expert row's scores are those of PEFT's own merged model, evaluated here."""
    from peft import PeftModel

    from mergelab.llmmix.generate import evaluate_task, load_causal_lm
    from mergelab.llmmix.tasks import build_task

    res = CliRunner().invoke(app, ["prepare", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared),
                                   "--tasks", ",".join(TASKS), "--examples", EXAMPLES, "--steps", "40",
                                   "--lr", "1e-2", "--batch-size", "8", "--lora-rank", "4", "--no-multitask",
                                   "--replay-batch", "0", "--threads", "1", "--eval-limit", "2", "--no-progress"])
    assert res.exit_code == 0, res.output
    folder = prepared / "experts-tiny-lora4"
    for t in TASKS:
        assert (folder / t / "final" / "adapter_config.json").is_file()
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["run", "--suite", "llmmix", "--size", "tiny", "--cache", str(prepared),
                                   "--lora-rank", "4", "--tasks", ",".join(TASKS), "--methods", "task_arithmetic,ties",
                                   "--no-tune", "--adapter-merges", "--held-out", "", "--examples", EXAMPLES,
                                   "--threads", "1", "--out", str(out)])
    assert res.exit_code == 0, res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["cache"] == str(folder)
    rows = {r["name"]: r for r in rep["rows"]}
    base = prepared / "base-tiny" / "final"
    for t in TASKS:
        model, tok = load_causal_lm(base)
        merged = PeftModel.from_pretrained(model, str(folder / t / "final")).merge_and_unload()
        ev = evaluate_task(merged, tok, build_task(t, seed=0, sizes=SIZES), "test")
        assert rows["individual"]["correct"][t] == "".join("1" if r["score"] >= 1 else "0" for r in ev.records)
    assert rows["multi-task training"]["status"] == "missing"
    # merges that stay adapters: cat is exact, and svd at rank 2 x 4 holds the sum of two rank-4 deltas
    # exactly, so both score as the dense task arithmetic of the same adapters with the same coefficients
    dense = rows["task arithmetic (default)"]
    for name, rank in (("task arithmetic (adapter, cat)", 8), ("task arithmetic (adapter, svd r=8)", 8)):
        row = rows[name]
        assert row["status"] == "ok" and row["params"] == dense["params"] and row["params_from"] == dense["name"]
        assert row["correct"] == dense["correct"], name
        assert row["perplexity"] == pytest.approx(dense["perplexity"], rel=1e-4)
        assert row["adapter_rank"] == rank and row["max_relative_truncation_error"] < 1e-4
        assert row["adapter_bytes"] > 0 and row["merge_seconds"] > 0
    for name in ("TIES (adapter, svd r=8)", "TIES (adapter, knots r=8)"):
        assert rows[name]["status"] == "ok" and rows[name]["params"] == rows["TIES (default)"]["params"]
        assert 0 <= rows[name]["max_relative_truncation_error"] < 1
    assert (out / "adapters" / "knots-ties" / "adapter_config.json").is_file()


def test_run_merges_every_prepared_expert_not_only_the_last_prepare_runs():
    """`bench prepare --tasks a,b` after a full prepare must not shrink what `bench run` merges by default."""
    from mergelab.llmmix.run import prepared_tasks

    prep = {"tasks": ["word_problems", "arithmetic"],
            "models": {"refusal": {}, "multitask": {}, "arithmetic": {}, "my_jsonl_task": {}, "string_ops": {}}}
    assert prepared_tasks(prep) == ["string_ops", "arithmetic", "word_problems", "refusal", "my_jsonl_task"]
    assert prepared_tasks({}) == []
