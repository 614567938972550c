"""MC-SMoE, ``mergelab moe-compress`` (Li et al., ICLR 2024), on a Mixtral built by ``mergelab moe``
from *trained* experts: the llmmix suite's tiny Llama base pretrained here and three experts
fine-tuned on different llmmix tasks (``tests.llmmix.tiny_lm.trained_family``), with fitted routers.

Oracles, worked out here and not with the code under test:

* two experts identical up to a permutation of their hidden neurons, routed top-1 between them,
  merged into one expert: the MoE's logits do not change (any routing gave the same function), and
  without the alignment they do;
* on 3 experts -> 2: the usage frequencies and router-logit similarities recounted through the
  transformers model's router outputs, the paper's grouping rule applied to them, the kept router
  rows, and each merged expert equal to ``w_dom * dominant + w_m * (member with permuted neurons)``
  with ``w`` the recounted frequencies (the permutation recovered from the rows);
* the alignment recovers a random neuron permutation; the low-rank part's error is the discarded
  singular values'.

The 3 -> 2 checks also run on a small MoE *trained here*: the same experts built top-2, then trained as one
model on the three tasks' training examples (routers, experts, attention; ``llmmix.finetune``), so its
routers and experts are no longer the ones ``mergelab moe`` wrote.
"""

from __future__ import annotations

import json
import shutil

import pytest
import torch
import yaml
from safetensors.torch import save_file

from tests.conftest import run_cli
from tests.moe.test_moe import tensors, write

pytest.importorskip("faker", reason="the llmmix corpus needs Faker (mergelab's 'llm' extra)")

TASKS = ("arithmetic", "string_ops", "code_output")
SIZES = {"train": 2, "validation": 4, "test": 0}


@pytest.fixture(scope="module")
def moe3(trained_llamas, tmp_path_factory):
    """A top-1 Mixtral with fitted routers from the session's trained experts (arithmetic, string_ops) and
    the pretrained base's MLP as a third expert (routed code_output prompts)."""
    from mergelab.llmmix.tasks import build_task

    root = tmp_path_factory.mktemp("mcsmoe")
    base, experts = trained_llamas
    prompts = [[e.prompt for e in build_task(name, seed=0, sizes=SIZES).split("validation")] for name in TASKS]
    cfg = {"base_model": str(base), "gate_mode": "fitted", "dtype": "float32", "experts_per_token": 1,
           "experts": [{"source_model": str(p), "positive_prompts": ps}
                       for p, ps in zip(list(experts) + [base], prompts)]}
    code, _, err = run_cli(["moe", write(root / "moe.yml", cfg), "-o", root / "moe", "-q", "--no-routing-report"])
    assert code == 0, err
    cal = root / "calibration.txt"
    cal.write_text("\n".join(p.replace("\n", " ") for ps in prompts for p in ps) + "\n")
    return {"root": root, "moe": root / "moe", "base": base, "cal": cal,
            "texts": [line for line in cal.read_text().splitlines() if line.strip()]}


@pytest.fixture(scope="module")
def moe3_trained(moe3, tmp_path_factory):
    """A small MoE trained here: the experts of ``moe3`` built top-2 (with top-1 the router's weight is always
    1 after renormalising, so it would get no gradient), then trained as one model for a few AdamW steps on
    the three tasks' training examples."""
    from mergelab.llmmix.finetune import FinetuneConfig, finetune
    from mergelab.llmmix.tasks import build_task

    root = tmp_path_factory.mktemp("mcsmoe_trained")
    cfg = yaml.safe_load((moe3["moe"] / "mergekit_moe_config.yml").read_text())
    cfg["experts_per_token"] = 2
    code, _, err = run_cli(["moe", write(root / "moe.yml", cfg), "-o", root / "moe", "-q", "--no-routing-report"])
    assert code == 0, err
    tasks = [build_task(name, seed=0, sizes={"train": 8, "validation": 1, "test": 0}) for name in TASKS]
    threads = torch.get_num_threads()
    try:
        run = finetune(root / "moe", tasks, root / "train", FinetuneConfig(
            steps=6, batch_size=8, lr=3e-3, warmup=0, replay_batch=0, eval_limit=1, threads=1),
            log=lambda m: None, progress=False)
    finally:
        torch.set_num_threads(threads)
    return {**moe3, "moe": run.final_dir, "built": root / "moe"}


def compress(src, out, k, cal, *extra):
    code, stdout, err = run_cli(["moe-compress", src, "-o", out, "--experts", str(k), "--calibration", cal, "-q",
                                 *extra])
    assert code == 0, err
    return json.loads((out / "mcsmoe.json").read_text())


def load(folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def logits(model, tok, texts):
    with torch.no_grad():
        return [model(**tok(t, return_tensors="pt")).logits for t in texts]


def routed(folder, texts):
    """Per layer: top-1 counts and router-logit columns' Gram over all tokens, recounted from the
    routers of the transformers model, one text at a time (no padding)."""
    from transformers import AutoTokenizer

    model, tok = load(folder), AutoTokenizer.from_pretrained(folder)
    L, E = model.config.num_hidden_layers, model.config.num_local_experts
    counts, grams = torch.zeros(L, E), torch.zeros(L, E, E, dtype=torch.float64)
    for l, layer in enumerate(model.model.layers):
        def hook(m, a, o, l=l):
            lg = o[0].double()
            counts[l] += torch.bincount(lg.argmax(-1), minlength=E)
            grams[l] += lg.T @ lg
        layer.mlp.gate.register_forward_hook(hook)
    logits(model, tok, texts)
    return counts, grams


def test_permuted_twin_experts_merge_into_the_same_function(moe3, tmp_path):
    """Slots 0 and 1: trained expert 0 and the same expert with its neurons permuted (routers: the
    first two fitted rows, so both are used). One group, one expert: the function is unchanged."""
    from transformers import AutoTokenizer

    src = tensors(moe3["moe"])
    cfg = json.loads((moe3["moe"] / "config.json").read_text())
    g = torch.Generator().manual_seed(0)
    twin = {}
    for name, t in src.items():
        if name.endswith("experts.gate_up_proj") or name.endswith("experts.down_proj"):
            continue
        twin[name] = t[:2].clone() if name.endswith("mlp.gate.weight") else t
    for l in range(cfg["num_hidden_layers"]):
        gu, dn = src[f"model.layers.{l}.mlp.experts.gate_up_proj"][0], src[f"model.layers.{l}.mlp.experts.down_proj"][0]
        I = dn.shape[1]
        pi = torch.randperm(I, generator=g)
        assert not torch.equal(pi, torch.arange(I))
        twin[f"model.layers.{l}.mlp.experts.gate_up_proj"] = torch.stack([gu, torch.cat([gu[:I][pi], gu[I:][pi]])])
        twin[f"model.layers.{l}.mlp.experts.down_proj"] = torch.stack([dn, dn[:, pi]])
    folder = tmp_path / "twin"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in twin.items()}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(dict(cfg, num_local_experts=2)))
    for f in moe3["moe"].glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    tok = AutoTokenizer.from_pretrained(folder)
    texts = moe3["texts"][:4]
    counts, _ = routed(folder, moe3["texts"])
    # the fitted rows split the tokens between the twins in some layer (not in every one: a layer where
    # one twin gets everything merges trivially)
    assert bool((counts > 0).all(dim=1).any()), f"the twins must share the tokens in some layer: {counts}"
    before = logits(load(folder), tok, texts)

    report = compress(folder, tmp_path / "k1", 1, moe3["cal"])
    assert all(lay["groups"] in ([[0, 1]], [[1, 0]]) for lay in report["layers"]), report["layers"]
    merged = load(tmp_path / "k1")
    assert merged.config.num_local_experts == 1 and merged.config.num_experts_per_tok == 1
    for a, b in zip(before, logits(merged, tok, texts)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    compress(folder, tmp_path / "shared", 1, moe3["cal"], "--layout", "shared")
    shared = load(tmp_path / "shared")
    assert shared.config.num_local_experts == 2
    torch.testing.assert_close(shared.model.layers[0].mlp.gate.weight, twin["model.layers.0.mlp.gate.weight"])
    for a, b in zip(before, logits(shared, tok, texts)):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)

    compress(folder, tmp_path / "unaligned", 1, moe3["cal"], "--no-align")
    off = max(float((a - b).abs().max()) for a, b in zip(before, logits(load(tmp_path / "unaligned"), tok, texts)))
    assert off > 1e-2, "without alignment the merge must change the function"


def test_the_trained_moe_is_trained(moe3_trained):
    """Its routers and experts moved away from what ``mergelab moe`` built, and it is still a top-2 Mixtral."""
    trained, built = tensors(moe3_trained["moe"]), tensors(moe3_trained["built"])
    assert trained.keys() == built.keys()
    for suffix in ("mlp.gate.weight", "mlp.experts.gate_up_proj", "mlp.experts.down_proj"):
        name = f"model.layers.0.{suffix}"
        assert not torch.allclose(trained[name], built[name], atol=1e-4), name
    assert load(moe3_trained["moe"]).config.num_experts_per_tok == 2


@pytest.mark.parametrize("which", ["moe3", "moe3_trained"])
def test_three_trained_experts_to_two(which, request, tmp_path):
    from transformers import AutoTokenizer

    moe3 = request.getfixturevalue(which)

    report = compress(moe3["moe"], tmp_path / "k2", 2, moe3["cal"])
    counts, grams = routed(moe3["moe"], moe3["texts"])
    src, out = tensors(moe3["moe"]), tensors(tmp_path / "k2")
    assert report["calibration_tokens"] == int(counts[0].sum())
    mixed = 0
    for l, lay in enumerate(report["layers"]):
        freq = counts[l] / counts[l].sum()
        assert lay["frequency"] == pytest.approx(freq.tolist(), abs=1e-6)
        norm = grams[l].diagonal().sqrt()
        sim = (grams[l] / norm[:, None] / norm[None, :] + 1) / 2
        torch.testing.assert_close(torch.tensor(lay["similarity"], dtype=torch.float64), sim, rtol=0, atol=1e-5)
        # the paper's rule: the 2 most used found groups, the other joins its most similar founder
        order = sorted(range(3), key=lambda e: (-float(freq[e]), e))
        dom, other = sorted(order[:2]), order[2]
        join = max(dom, key=lambda d: (float(sim[other, d]), -d))
        assert lay["groups"] == [[d] + ([other] if d == join else []) for d in dom]
        pre = f"model.layers.{l}.mlp"
        assert torch.equal(out[f"{pre}.gate.weight"], src[f"{pre}.gate.weight"][dom])
        gu_in, dn_in = src[f"{pre}.experts.gate_up_proj"], src[f"{pre}.experts.down_proj"]
        I = dn_in.shape[2]
        for gi, d in enumerate(dom):
            gu, dn = out[f"{pre}.experts.gate_up_proj"][gi], out[f"{pre}.experts.down_proj"][gi]
            if d != join:
                assert torch.equal(gu, gu_in[d]) and torch.equal(dn, dn_in[d])
                continue
            w_d, w_o = float(freq[d] / (freq[d] + freq[other])), float(freq[other] / (freq[d] + freq[other]))
            if w_o == 0:  # the member is never anyone's top-1: the frequency-weighted merge is the dominant
                torch.testing.assert_close(gu, gu_in[d]) and torch.testing.assert_close(dn, dn_in[d])
                continue
            mixed += 1
            rest_gu, rest_dn = (gu - w_d * gu_in[d]) / w_o, (dn - w_d * dn_in[d]) / w_o
            # neuron i of the merge holds member neuron pi(i): same gate row, up row and down column
            pi = torch.cdist(rest_gu[:I], gu_in[other][:I]).argmin(1)
            assert sorted(pi.tolist()) == list(range(I))
            torch.testing.assert_close(rest_gu, torch.cat([gu_in[other][:I][pi], gu_in[other][I:][pi]]),
                                       rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(rest_dn, dn_in[other][:, pi], rtol=1e-4, atol=1e-4)
    # the built MoE's fitted routers use all three experts; the trained one may drop one in a layer (here: one
    # layer of two keeps a two-member merge)
    assert mixed >= (2 if which == "moe3" else 0)
    model = load(tmp_path / "k2")
    assert type(model).__name__ == "MixtralForCausalLM" and model.config.num_local_experts == 2
    tok = AutoTokenizer.from_pretrained(tmp_path / "k2")
    ids = tok(moe3["texts"][0], return_tensors="pt")
    gen = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert gen.shape[1] == ids["input_ids"].shape[1] + 5


def test_low_rank_plus_sparse_option(moe3, tmp_path):
    """--rank at full rank keeps the merged experts (to float error); --rank 2 --sparsity 0.05 stores
    r(m+n) + 2 * 5% of mn numbers per matrix and changes the experts."""
    plain = compress(moe3["moe"], tmp_path / "plain", 2, moe3["cal"])
    full = compress(moe3["moe"], tmp_path / "full", 2, moe3["cal"], "--rank", "1000")
    small = compress(moe3["moe"], tmp_path / "small", 2, moe3["cal"], "--rank", "2", "--sparsity", "0.05")
    assert "compressed_fraction_of_merged_experts" not in plain
    a, b, c = tensors(tmp_path / "plain"), tensors(tmp_path / "full"), tensors(tmp_path / "small")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(c[n], a[n], atol=1e-3) for n in a if "experts" in n)
    cfg = json.loads((moe3["moe"] / "config.json").read_text())
    H, I = cfg["hidden_size"], cfg["intermediate_size"]
    # per group: gate [I, H], up [I, H], down [H, I]
    per = (2 * (I + H) + 2 * round(0.05 * I * H)) / (I * H)
    assert small["compressed_fraction_of_merged_experts"] == pytest.approx(per)
    assert full["compressed_fraction_of_merged_experts"] == pytest.approx(min(I, H) * (I + H) / (I * H))


def test_bad_input_is_a_clear_error_and_writes_nothing(moe3, tmp_path, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    cases = [
        ([moe3["moe"], "--experts", "0", "--calibration", moe3["cal"]], "--experts must be an integer from 1 to"),
        ([moe3["moe"], "--experts", "4", "--calibration", moe3["cal"]], "num_local_experts (3)"),
        ([moe3["base"], "--experts", "1", "--calibration", moe3["cal"]], "expected 'mixtral'"),
        ([tmp_path / "nope", "--experts", "1", "--calibration", moe3["cal"]], "is not a folder"),
        ([moe3["moe"], "--experts", "1", "--calibration", tmp_path / "nope.txt"], "does not exist"),
        ([moe3["moe"], "--experts", "1", "--calibration", empty], "has no examples"),
        ([moe3["moe"], "--experts", "1", "--calibration", moe3["cal"], "--layout", "x"], "--layout must be one of"),
        ([moe3["moe"], "--experts", "1", "--calibration", moe3["cal"], "--sparsity", "2"], "--sparsity must be"),
    ]
    for args, message in cases:
        out = tmp_path / "out"
        code, _, err = run_cli(["moe-compress", *args, "-o", out], capsys)
        flat = " ".join(err.split())
        assert code == 2 and message in flat and "Traceback" not in err, (args, err)
        assert not out.exists() and not (tmp_path / "out.partial").exists()


def test_alignment_grouping_and_low_rank_sparse_identities():
    from mergelab.moe.mcsmoe import align_permutation, group_experts, low_rank_sparse, permute_expert

    g = torch.Generator().manual_seed(1)
    gu, dn = torch.randn(2 * 16, 8, generator=g), torch.randn(8, 16, generator=g)
    pi = torch.randperm(16, generator=g)
    p_gu, p_dn = torch.cat([gu[:16][pi], gu[16:][pi]]), dn[:, pi]
    back = align_permutation(gu, dn, p_gu, p_dn)
    a_gu, a_dn = permute_expert(p_gu, p_dn, back)
    assert torch.equal(a_gu, gu) and torch.equal(a_dn, dn)
    # same function after permuting (SwiGLU): silu(x gate^T) * (x up^T) down^T
    x = torch.randn(5, 8, generator=g)
    f = lambda gu_, dn_: (torch.nn.functional.silu(x @ gu_[:16].T) * (x @ gu_[16:].T)) @ dn_.T  # noqa: E731
    torch.testing.assert_close(f(p_gu, p_dn), f(gu, dn))

    freq = torch.tensor([0.1, 0.4, 0.0, 0.3, 0.2])
    sim = torch.eye(5)
    sim[0, 3] = sim[3, 0] = 0.9
    sim[0, 1] = sim[1, 0] = 0.8
    sim[2, 1] = sim[1, 2] = 0.7
    sim[2, 3] = sim[3, 2] = 0.7  # tie: the lower index wins
    sim[4, 1] = sim[1, 4] = 0.6
    assert group_experts(freq, sim, 2) == [[1, 2, 4], [3, 0]]
    assert group_experts(freq, sim, 5) == [[0], [1], [2], [3], [4]]
    assert group_experts(freq, sim, 1) == [[1, 0, 2, 3, 4]]

    w = torch.randn(12, 9, generator=g, dtype=torch.float64).float()
    s = torch.linalg.svdvals(w.double())
    for r in (1, 3, 9):
        approx, stored = low_rank_sparse(w, r, None)
        assert float((w - approx).double().norm()) == pytest.approx(float(s[r:].pow(2).sum().sqrt()), abs=1e-4)
        assert stored == r * (12 + 9)
    approx, stored = low_rank_sparse(w, 2, 0.25)
    resid = (w - low_rank_sparse(w, 2, None)[0]).abs().reshape(-1)
    kept = int(((w - approx).abs().reshape(-1) < 1e-6).sum())
    assert kept == 27 and stored == 2 * 21 + 2 * 27
    assert float((w - approx).abs().max()) <= float(resid.sort(descending=True).values[26]) + 1e-6
