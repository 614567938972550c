"""The searches' textmix fitness on really fine-tuned MiniLM experts: each task scored with its own
expert's head on the merged encoder, as `mergelab bench run` scores it (its Evaluator is the oracle);
`evolve` and `m2n2` end to end; bad textmix fitness settings fail before any work."""

import json
from pathlib import Path

import pytest
import torch
import yaml

from tests.conftest import run_cli

pytest.importorskip("cma")

PROBE_EXAMPLES = 192  # train examples a head is fitted on (speed)


@pytest.fixture(scope="module")
def textmix(real_family, tmp_path_factory):
    """Bench-layout experts: each real expert's encoder (``bert.*``) with a head for its task fitted on its
    own features (``classifier.*``), in a folder named after the task, and the base with the same names."""
    from mergelab.bench.cache import save_classifier, save_prefixed_base
    from mergelab.evaluate.model import fit_probe, load_config, load_tokenizer, pooled_features, read_state
    from mergelab.evaluate.model import build_encoder
    from mergelab.evaluate.tasks import load_suite

    root = tmp_path_factory.mktemp("textmix-search")
    suite = load_suite("textmix")
    config, tokenizer = load_config(real_family.base), load_tokenizer(real_family.base)
    experts = []
    for folder in real_family.experts:
        name = folder.name.replace("expert_", "")
        task = suite.task(name)
        enc = {k: v.float() for k, v in read_state(folder).items()}
        train = task.split("train")[:PROBE_EXAMPLES]
        feats = pooled_features(build_encoder(config, enc), tokenizer, [e.text for e in train])
        head = fit_probe(feats, [e.label for e in train], task.num_labels)
        out = root / name
        out.mkdir()
        save_classifier(out, config, tokenizer, enc, head, task.labels)
        experts.append(out)
    base = save_prefixed_base(root / "base", str(real_family.base))
    return root, base, experts, suite


def _config(textmix, **fitness):
    root, base, experts, _ = textmix
    return {"genome": {"models": [str(e) for e in experts], "merge_method": "task_arithmetic",
                       "base_model": str(base), "parameters": ["weight"], "ranges": {"weight": [0.0, 1.0]}},
            "fitness": {"suite": "textmix", **fitness},
            "search": {"max_evals": 4, "popsize": 2, "seed": 1}}


def test_scores_equal_the_bench_evaluator(textmix):
    from mergelab.evaluate.harness import Evaluator
    from mergelab.evaluate.model import build_encoder, read_state, split_state
    from mergelab.evaluate.metrics import accuracy
    from mergelab.search.candidate import CandidateEvaluator

    root, base, experts, suite = textmix
    names = [e.name for e in experts]
    ev = CandidateEvaluator(_config(textmix, split="test"))
    assert ev.config.fitness.tasks == [suite.task(n) for n in names]  # default: the folders' names
    _, state = ev.merge([0.6, 0.3, 0.5])
    assert not any(k.startswith("classifier.") for k in state)  # heads are never merged
    got = ev.scorer.score(state)
    heads = {n: split_state(read_state(e))[1] for n, e in zip(names, experts)}
    encoder = build_encoder(ev.scorer.config, split_state(state)[0])
    bits = Evaluator(suite, ev.scorer.config, ev.scorer.tokenizer).correct(encoder, heads, names, "test")
    want = {n: accuracy(b) for n, b in bits.items()}
    assert got["tasks"] == pytest.approx(want, abs=1e-12)
    assert got["fitness"] == pytest.approx(sum(want.values()) / 3, abs=1e-12)

    # limit: the first N examples of each split; weights: the weighted mean
    ev = CandidateEvaluator(_config(textmix, split="test", limit=20, weights={names[0]: 3}))
    got = ev.scorer.score(state)
    capped = {n: b[:20].count("1") / 20 for n, b in bits.items()}  # bits: "1"/"0" per example
    assert got["tasks"] == pytest.approx(capped, abs=1e-12)
    assert got["fitness"] == pytest.approx((3 * capped[names[0]] + capped[names[1]] + capped[names[2]]) / 5)
    per_example = ev.scorer.example_scores(state)
    assert per_example.tolist() == [float(c) for n in names for c in bits[n][:20]]


def test_one_resident_encoder(textmix):
    """Candidates are loaded into one kept BertModel, which then equals a freshly built one exactly."""
    from mergelab.errors import MergeLabError
    from mergelab.evaluate.model import build_encoder, split_state
    from mergelab.search.candidate import CandidateEvaluator

    ev = CandidateEvaluator(_config(textmix, limit=16))
    _, first = ev.merge([0.6, 0.3, 0.5])
    _, second = ev.merge([0.1, 0.9, 0.2])
    want = ev.scorer.score(first)
    model = ev.scorer.encoder

    def same_as_fresh(state) -> bool:
        fresh = build_encoder(ev.scorer.config, split_state(state)[0]).state_dict()
        kept = model.state_dict()
        return kept.keys() == fresh.keys() and all(torch.equal(kept[k], fresh[k]) for k in kept)

    assert same_as_fresh(first)
    ev.scorer.score(second)  # another candidate, loaded into the same module
    assert ev.scorer.encoder is model and same_as_fresh(second) and not same_as_fresh(first)
    assert ev.scorer.score(first) == want and ev.scorer.encoder is model and same_as_fresh(first)
    wrong = dict(first)
    name = next(k for k in wrong if k.endswith("attention.self.query.weight"))
    wrong[name] = wrong[name][:, :-1]
    with pytest.raises(MergeLabError, match="do not fit the encoder.*query.weight"):
        ev.scorer.score(wrong)


def test_bench_evaluator_keeps_one_encoder_with_the_same_logits(textmix):
    """`bench run`'s Evaluator (and the tuned bench, which scores through it) loads every encoder into one
    kept BertModel; the logits equal those of a freshly built model (the code before) bit for bit, in
    any order of states."""
    from mergelab.evaluate.harness import Evaluator, gold
    from mergelab.evaluate.metrics import correct_bits
    from mergelab.evaluate.model import build_encoder, head_logits, pooled_features, read_state, split_state
    from mergelab.search.candidate import CandidateEvaluator

    root, base, experts, suite = textmix
    names = [e.name for e in experts]
    cand = CandidateEvaluator(_config(textmix))
    config, tokenizer = cand.scorer.config, cand.scorer.tokenizer
    heads = {n: split_state(read_state(e))[1] for n, e in zip(names, experts)}
    encoders = [split_state(read_state(e))[0] for e in experts] + [split_state(cand.merge([0.6, 0.3, 0.5])[1])[0]]
    ev = Evaluator(suite, config, tokenizer)
    model = None
    for i in (0, 3, 1, 2, 0):
        enc = ev.encoder(encoders[i])
        assert model is None or enc is model
        model = enc
        fresh = build_encoder(config, encoders[i])
        want = {}
        for n in names:
            task = suite.task(n)
            want[n] = head_logits(pooled_features(fresh, tokenizer, [e.text for e in task.split("validation")]),
                                  heads[n])
            assert torch.equal(head_logits(ev.features(enc, task, "validation"), heads[n]), want[n]), (i, n)
        bits = ev.evaluate(encoders[i], heads, names, split="validation")["correct"]
        assert ev.encoder(encoders[i]) is model
        assert bits == {n: correct_bits(want[n].argmax(-1), gold(suite.task(n), "validation")) for n in names}


def test_evolve_and_m2n2_on_textmix(textmix, tmp_path):
    from mergelab.evaluate.model import read_state
    from mergelab.search.fitness import make_scorer, parse_fitness

    root, base, experts, _ = textmix
    cfg = _config(textmix, limit=24)
    cfg["search"]["strategy"] = "random"
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["evolve", path, "-o", tmp_path / "evolve", "--quiet"])
    assert code == 0
    hist = json.loads((tmp_path / "evolve" / "history.json").read_text())
    assert hist["fitness"]["suite"] == "textmix" and hist["fitness"]["limit"] == 24
    assert len(hist["evaluations"]) == 4 and all(0 < e["fitness"] < 1 for e in hist["evaluations"])
    # mergelab merge of the best recipe gives an encoder folder that scores the recorded fitness
    code, _, _ = run_cli(["merge", tmp_path / "evolve" / "best_recipe.yaml", "-o", tmp_path / "merged", "--quiet"])
    assert code == 0
    merged = read_state(tmp_path / "merged")
    assert not any(k.startswith("classifier.") for k in merged)
    scorer = make_scorer(parse_fitness(cfg["fitness"], str(base), models=[str(e) for e in experts]))
    assert scorer.score(merged)["fitness"] == hist["best"]["fitness"]

    cfg["search"] = {"steps": 2, "seed": 0, "save_best_at": [3]}
    path.write_text(yaml.safe_dump(cfg))
    code, _, _ = run_cli(["m2n2", path, "-o", tmp_path / "m2n2", "--quiet"])
    assert code == 0
    hist = json.loads((tmp_path / "m2n2" / "history.json").read_text())
    assert len(hist["evaluations"]) == 5 and hist["best_at"]["3"]["member"] in (0, 1, 2)
    seeds = [e["fitness"] for e in hist["evaluations"][:3]]
    assert hist["best_at"]["3"]["mean_score"] == max(seeds)
    for folder in ("best", "best-at-3"):  # encoder folders (no heads) that score what the history says
        state = read_state(tmp_path / "m2n2" / folder)
        assert not any(k.startswith("classifier.") for k in state)
    best = read_state(tmp_path / "m2n2" / "best")
    assert scorer.score(best)["fitness"] == pytest.approx(hist["best"]["mean_score"], abs=1e-12)
    # search.best_by task_mean's ranking is evolve's fitness: each task's accuracy, then their mean
    assert hist["best"]["task_mean"] == pytest.approx(scorer.score(best)["fitness"], abs=1e-12)
    assert [e["task_mean"] for e in hist["evaluations"][:3]] == pytest.approx(seeds, abs=1e-12)  # 24 per task


def test_bad_textmix_fitness(textmix, tmp_path):
    from mergelab.errors import MergeLabError
    from mergelab.search.candidate import read_config

    root, base, experts, _ = textmix

    def error(**fitness) -> str:
        with pytest.raises(MergeLabError) as e:
            read_config(_config(textmix, **fitness))
        return " ".join(str(e.value).split())

    assert "suite: textmix is scored by accuracy" in error(metric="loss")
    assert "has no task 'nope'" in error(tasks=["sentiment", "nope"])
    assert "no genome model folder is named 'pos'" in error(tasks=["sentiment", "pos"])
    assert "has no classifier.weight" in error(heads={"sentiment": str(base)})
    assert "task_files" in error(task_files=["x.jsonl"])
    wrong = tmp_path / "wrong"  # a head with another task's class count
    wrong.mkdir()
    for f in experts[1].iterdir():
        (wrong / f.name).write_bytes(f.read_bytes())
    n_lang = len(json.loads((experts[1] / "config.json").read_text())["id2label"])
    msg = error(heads={"sentiment": str(wrong)})
    assert f"has {n_lang} classes; task 'sentiment' has" in msg
