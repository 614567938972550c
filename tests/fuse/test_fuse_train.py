"""Fusion training and FuseChat's merge on really trained tiny Llamas with two different tokenizers."""

from __future__ import annotations

import shutil

import pytest

pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra)")

from mergelab.fuse.train import FuseError, FuseSettings, FusionObjective, chat_merge, fuse_train  # noqa: E402
from mergelab.llmmix.finetune import FinetuneConfig, finetune  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

SIZES = {"train": 24, "validation": 2, "test": 2}
QUIET = dict(log=lambda m: None)


@pytest.fixture(scope="module")
def other_family(tmp_path_factory):
    """A tiny base and a string_ops expert whose tokenizer (360 tokens) differs from trained_llamas' (300)."""
    from tests.llmmix.tiny_lm import trained_family

    base, experts, _ = trained_family(tmp_path_factory.mktemp("other_tok"), ("string_ops",), SIZES,
                                      pretrain_steps=20, corpus_bytes=80_000, vocab_size=360, finetune_steps=12)
    return base, experts[0]


@pytest.fixture(scope="module")
def tasks():
    from mergelab.llmmix.tasks import build_task

    return [build_task("string_ops", seed=0, sizes=SIZES)]


def cfg(**kw):
    return FinetuneConfig(**{**dict(steps=3, batch_size=4, lr=3e-3, replay_batch=0, threads=1, eval_limit=1,
                                    checkpoint_every=100), **kw})


def weights(folder):
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def test_lambda_one_is_plain_finetuning(trained_llamas, other_family, tasks, tmp_path):
    base, _ = trained_llamas
    plain = finetune(base, tasks, tmp_path / "plain", cfg(), progress=False, **QUIET).final_dir
    fused = fuse_train(base, [other_family[1]], tasks, tmp_path / "fused", cfg(), FuseSettings(lam=1.0),
                       **QUIET).final_dir
    a, b = weights(plain), weights(fused)
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_same_tokenizer_keeps_the_source_distribution(trained_llamas, tasks):
    """Identical tokenizers: a diagonal alignment, the source's top-k softmax unchanged, no one-hot."""
    import torch

    from mergelab.llmmix.generate import load_causal_lm
    from mergelab.llmmix.tasks import encode_for_training

    base, experts = trained_llamas
    obj = FusionObjective(base, [experts[1]], FuseSettings(top_k=5, include_target=False))
    model, tok = load_causal_lm(base)
    examples = tasks[0].split("train")[:3]
    feats = [encode_for_training(tok, e, None) for e in examples]
    obj.bind(model, tok, examples, feats)
    obj._prepare([0, 2])
    src, _ = load_causal_lm(experts[1])
    for i in (0, 2):
        pos, ids, probs = obj._memo[i]
        expect_pos = [t for t, lab in enumerate(feats[i]["labels"]) if lab != -100]
        assert pos.tolist() == expect_pos
        with torch.no_grad():
            logits = src(input_ids=torch.tensor([feats[i]["input_ids"]])).logits[0]
        for r, t in enumerate(expect_pos):
            v, k = logits[t - 1].topk(5)
            assert ids[r].tolist() == k.tolist()
            assert torch.allclose(probs[r], torch.softmax(v, -1), atol=1e-6)


def test_fusion_of_two_tokenizers_trains(trained_llamas, other_family, tasks, tmp_path):
    import json

    base, experts = trained_llamas
    settings = FuseSettings(lam=0.5, fusion="avg_ce")
    r = fuse_train(base, [experts[1], other_family[1]], tasks, tmp_path / "run", cfg(), settings, **QUIET)
    rec = json.loads((tmp_path / "run" / "fuse.json").read_text())
    frac = rec["fusion"]["aligned_fraction"]
    assert frac[str(experts[1])] == 1.0  # same tokenizer
    assert 0.2 <= frac[str(other_family[1])] < 1.0  # another BPE of the same text: partly aligned
    assert sum(rec["fusion"]["candidate_weight_share"].values()) == pytest.approx(1.0, abs=1e-3)
    log = [json.loads(x) for x in (tmp_path / "run" / "loss.jsonl").read_text().splitlines()]
    assert len(log) == 3 and all(x["loss"] == pytest.approx(0.5 * x["clm_loss"] + 0.5 * x["fuse_loss"], abs=2e-6)
                                 for x in log)
    before, after = weights(base), weights(r.final_dir)
    assert any(not before[k].equal(after[k]) for k in before)


def test_bad_input_writes_nothing(trained_llamas, other_family, tasks, tmp_path):
    base, experts = trained_llamas
    out = tmp_path / "out"
    with pytest.raises(FuseError, match="lambda 1.5"):
        fuse_train(base, [experts[1]], tasks, out, cfg(), FuseSettings(lam=1.5), **QUIET)
    no_tok = tmp_path / "no_tok"
    shutil.copytree(other_family[1], no_tok)
    for f in no_tok.glob("tokenizer*"):
        f.unlink()
    with pytest.raises(FuseError, match=f"source {no_tok}: no tokenizer"):
        fuse_train(base, [no_tok], tasks, out, cfg(), FuseSettings(), **QUIET)
    alien = tmp_path / "alien"
    shutil.copytree(other_family[1], alien)
    from tests.fuse.test_align import word_tokenizer

    word_tokenizer({"<s>": 0, "</s>": 1, "<pad>": 2, "[UNK]": 3, "zzz": 4}).save_pretrained(str(alien))
    with pytest.raises(FuseError, match="cannot be aligned"):
        fuse_train(base, [alien], tasks, out, cfg(), FuseSettings(), **QUIET)
    assert not out.exists()


def test_cli_bad_lambda_is_a_clear_error(trained_llamas, tmp_path, capsys):
    base, experts = trained_llamas
    out = tmp_path / "out"
    code, _, err = run_cli(["fuse", "train", base, "--source", experts[1], "-o", out, "--tasks", "string_ops",
                            "--lambda", "-0.1"], capsys)
    assert code != 0 and "--lambda -0.1" in err and "Traceback" not in err and not out.exists()


def test_fusechat_varm_merge_matches_the_formula(trained_llamas, tmp_path):
    """VaRM: per tensor, w_t = mean((theta_t - theta_0)^2) / sum_j ..., theta = sum_t w_t theta_t."""
    import torch

    base, experts = trained_llamas
    chat_merge(base, experts, tmp_path / "varm", method="varm")
    b, ts, got = weights(base), [weights(e) for e in experts], weights(tmp_path / "varm")
    for k in b:
        u = [((t[k].double() - b[k].double()) ** 2).mean().item() for t in ts]
        w = [x / sum(u) for x in u] if all(x > 0 for x in u) else [1 / len(u)] * len(u)
        expect = sum(wi * t[k].double() for wi, t in zip(w, ts))
        assert torch.allclose(got[k].double(), expect, atol=1e-6), k
    # SCE (FuseChat 2.0) as mergekit 0.1.5 computes it with select_topk 1 (no selection), written out here:
    # weights from the task vectors' energy (uniform when it sums below 1e-6), the sign elected by their sum
    # (+1 on a tie), entries of the other sign erased, the weighted mean of the rest added to the pivot.
    for semantics in ("mergekit", "paper"):
        chat_merge(base, experts, tmp_path / f"sce-{semantics}", method="sce",
                   parameters={"semantics": semantics})
        got = weights(tmp_path / f"sce-{semantics}")
        assert got.keys() == b.keys()
        for k in b:
            tau = torch.stack([t[k].double() - b[k].double() for t in ts])
            energy = torch.stack([(x.float() ** 2).mean() for x in tau]).double()
            uniform = energy.sum() == 0 if semantics == "paper" else energy.sum().abs() < 1e-6
            w = torch.full_like(energy, 1 / len(ts)) if uniform else energy / energy.sum()
            elected = torch.where(tau.sum(0) >= 0, 1.0, -1.0).double()
            keep = (tau.sign() == elected).double() * w.reshape(-1, *([1] * (tau.dim() - 1)))
            div = keep.sum(0)
            div = torch.where(div == 0, 1.0, div) if semantics == "paper" else div.clamp(min=1e-6)
            expect = b[k].double() + (tau * keep).sum(0) / div
            assert torch.allclose(got[k].double(), expect, atol=1e-6), (semantics, k)
        assert any(not got[k].equal(weights(tmp_path / "varm")[k]) for k in b)
    with pytest.raises(FuseError, match="varm or sce"):
        chat_merge(base, experts, tmp_path / "ties", method="ties")
