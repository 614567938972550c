"""OTA + Fast Fisher Grafting: against a test oracle from pmahdavi/ota-merge's math, hand cases, invariants."""

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

import mergelab
from mergelab.errors import RecipeError
from mergelab.methods.ota import Compression, compress
from tests.methods.papers_support import merge_model, merge_one, rand


# ----------------------------------------------------------------------------- test oracle
# Written from the math of ``OTAMergeTask`` (ota.py): per model weight (v^p * scaling [/ (mean + eps)] + eps)
# times the FFG mask [v * tau^2 >= thr] (or [v >= thr] without a base); base + sum W tau / sum W; where a
# threshold is active and sum W <= 1.1 n eps, fall back to the base (or the models' mean). float64 numpy,
# except the FFG score, computed in float32 as the reference does (so entries at the threshold agree).
def ota_oracle(base, models, vs, eps=1e-26, power=0.5, thresholds=None, fallback=True, normalise="none",
               scaling=None):
    scores = [v * (m - base) ** 2 if base is not None else v for v, m in zip(vs, models)]
    scores = [s.numpy().astype(np.float64) for s in scores]
    ms = [m.numpy().astype(np.float64) for m in models]
    vs = [v.numpy().astype(np.float64) for v in vs]
    b = None if base is None else base.numpy().astype(np.float64)
    n = len(ms)
    weights = []
    for i in range(n):
        p = vs[i] ** power * (1.0 if scaling is None else scaling[i])
        if normalise == "global":
            p = p / (p.mean() + eps)
        w = p + eps
        if thresholds is not None and thresholds[i] is not None:
            w = w * (scores[i] >= thresholds[i])
        weights.append(w)
    w = np.stack(weights)
    den = w.sum(0)
    with np.errstate(invalid="ignore", divide="ignore"):
        if b is not None:
            out = b + (w * (np.stack(ms) - b)).sum(0) / den
        else:
            out = (w * np.stack(ms)).sum(0) / den
    if thresholds is not None and any(t is not None for t in thresholds):
        masked = den <= n * eps * 1.1
        fb = b if (fallback and b is not None) else np.stack(ms).mean(0)
        out = np.where(masked, fb, out)
    return out


BASE = rand(6, 5, seed=1)
MODELS = [BASE + 0.1 * rand(6, 5, seed=s) for s in (2, 3, 4)]
VS = [1e-20 * rand(6, 5, seed=s).abs() for s in (5, 6, 7)]


def ota(models=MODELS, vs=VS, base=BASE, **params):
    params.setdefault("second_moments", "unused")
    return merge_one("ota", base, models, aux={"second_moments": vs}, **params)


@pytest.mark.parametrize("chunk_rows", [None, 4])
def test_matches_reference_oracle(chunk_rows):
    out = ota(chunk_rows=chunk_rows)
    np.testing.assert_allclose(out.numpy(), ota_oracle(BASE, MODELS, VS), rtol=1e-5, atol=1e-6)
    out = ota(chunk_rows=chunk_rows, power=1.0, normalise="global", scaling_factor=[1.0, 2.0, 0.5], epsilon=1e-30)
    expect = ota_oracle(BASE, MODELS, VS, eps=1e-30, power=1.0, normalise="global", scaling=[1.0, 2.0, 0.5])
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-5, atol=1e-6)


def test_equal_second_moments_give_task_arithmetic_mean():
    out = ota(vs=[VS[0]] * 3)
    torch.testing.assert_close(out, BASE + torch.stack([m - BASE for m in MODELS]).mean(0))


def test_scaling_every_second_moment_by_one_constant_changes_nothing():
    torch.testing.assert_close(ota(vs=[1e6 * v for v in VS]), ota())


def test_a_much_sharper_model_dominates():
    out = ota(models=MODELS[:2], vs=[VS[0] * 1e12, VS[1]])
    torch.testing.assert_close(out, MODELS[0], rtol=0, atol=1e-5)


def test_ffg_thresholds_and_fallback_by_hand():
    base = torch.zeros(2)
    m1, m2 = torch.tensor([1.0, 2.0]), torch.tensor([3.0, 4.0])
    v1, v2 = torch.tensor([4.0, 1.0]), torch.tensor([1.0, 1e-8])
    # saliency v * tau^2: model 1 [4, 4], model 2 [9, 1.6e-7].
    # threshold 2: model 2 loses entry 1; entry 0 = (2*1 + 1*3) / 3 (weights sqrt(v)); entry 1 = model 1.
    out = ota(base=base, models=[m1, m2], vs=[v1, v2], precond_threshold=2.0)
    torch.testing.assert_close(out, torch.tensor([5 / 3, 2.0]))
    # threshold 5: model 1 masked everywhere; entry 1 masked in both -> base (or the models' mean).
    out = ota(base=base, models=[m1, m2], vs=[v1, v2], precond_threshold=5.0)
    torch.testing.assert_close(out, torch.tensor([3.0, 0.0]))
    out = ota(base=base, models=[m1, m2], vs=[v1, v2], precond_threshold=5.0, fallback_to_base=False)
    torch.testing.assert_close(out, torch.tensor([3.0, 3.0]))


def test_without_a_base_the_weighted_average_of_weights_and_v_threshold():
    out = ota(base=None)
    np.testing.assert_allclose(out.numpy(), ota_oracle(None, MODELS, VS), rtol=1e-5, atol=1e-6)
    thr = float(VS[0].median())
    out = ota(base=None, precond_threshold=[thr, 0.0, 0.0])
    np.testing.assert_allclose(out.numpy(), ota_oracle(None, MODELS, VS, thresholds=[thr, None, None]),
                               rtol=1e-5, atol=1e-6)


def two_tensors(seed=0):
    tensors = {}
    for j, shape in enumerate([(6, 5), (9,)]):
        b = rand(*shape, seed=seed + j)
        tensors[f"t{j}"] = {"base": b, "models": [b + 0.1 * rand(*shape, seed=seed + 10 * j + i) for i in range(2)],
                            "aux": {"second_moments": [rand(*shape, seed=seed + 50 + 10 * j + i).abs()
                                                       for i in range(2)]}}
    return tensors


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_ffg_density_is_an_exact_whole_model_quantile(chunk_rows):
    tensors = two_tensors()
    out = merge_model("ota", tensors, chunk_rows=chunk_rows, second_moments="x", ffg_density=[0.3, 0.5])
    thresholds = []
    for i, d in enumerate([0.3, 0.5]):
        s = np.concatenate([(t["aux"]["second_moments"][i] * (t["models"][i] - t["base"]) ** 2).numpy().ravel()
                            for t in tensors.values()])
        k = int(np.floor(d * s.size))
        thresholds.append(float(np.sort(s)[::-1][k - 1]))
        assert int((s >= thresholds[-1]).sum()) == k  # kept fraction = density (no ties in random data)
    for t in tensors.values():
        expect = ota_oracle(t["base"], t["models"], t["aux"]["second_moments"], thresholds=thresholds)
        name = [k for k, v in tensors.items() if v is t][0]
        np.testing.assert_allclose(out[name].numpy(), expect, rtol=1e-5, atol=1e-6)


def test_rank1_compression_is_exact_for_rank1_and_keeps_row_and_column_sums():
    v = torch.rand(6, generator=torch.Generator().manual_seed(1))[:, None] * torch.rand(5)[None, :]
    c = Compression("rank1", col=v.double().sum(0), total=float(v.double().sum()))
    torch.testing.assert_close(compress(v, c), v, rtol=1e-6, atol=0)
    w = VS[0] * 1e20
    cw = compress(w, Compression("rank1", col=w.double().sum(0), total=float(w.double().sum())))
    torch.testing.assert_close(cw.sum(0), w.sum(0), rtol=1e-5, atol=0)
    torch.testing.assert_close(cw.sum(1), w.sum(1), rtol=1e-5, atol=0)
    vs = [v * 1e-20, VS[1], VS[2]]
    torch.testing.assert_close(ota(vs=vs, rank1_approx=[True, False, False]), ota(vs=vs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("chunk_rows", [None, 2])
def test_compressed_second_moments_feed_every_step(chunk_rows):
    # rank-1 (Lemma 1) and rank-2 truncated SVD + ReLU, computed independently with numpy, used for the
    # weights and for the FFG saliency (single chunk: direct SVD; chunked: Gram matrix over row chunks).
    def rank1(v):
        a = v.numpy().astype(np.float64)
        return torch.tensor(np.outer(a.sum(1), a.sum(0)) / a.sum(), dtype=torch.float32)

    def rank2(v):
        u, s, vh = np.linalg.svd(v.numpy().astype(np.float64), full_matrices=False)
        return torch.tensor(np.maximum(u[:, :2] @ np.diag(s[:2]) @ vh[:2], 0), dtype=torch.float32)

    thr = 1e-23
    out = ota(chunk_rows=chunk_rows, rank1_approx=[True, False, False], rank=[0, 2, 0],
              precond_threshold=thr)
    compressed = [rank1(VS[0]), rank2(VS[1]), VS[2]]
    expect = ota_oracle(BASE, MODELS, compressed, thresholds=[thr] * 3)
    np.testing.assert_allclose(out.numpy(), expect, rtol=1e-4, atol=1e-6)
    # Embeddings are never rank-compressed (the reference's is_embed rule).
    emb = ota(rank=2, name="model.embed_tokens.weight")
    torch.testing.assert_close(emb, ota(name="model.embed_tokens.weight"))


def test_bad_combinations_and_missing_second_moments():
    with pytest.raises(RecipeError, match="ffg_density"):
        ota(precond_threshold=1e-20, ffg_density=0.5)
    with pytest.raises(RecipeError, match="rank"):
        ota(rank1_approx=True, rank=2)
    with pytest.raises(RecipeError, match="second_moments"):
        merge_one("ota", BASE, MODELS, second_moments="x")


def test_end_to_end_from_second_moment_files(tmp_path):
    names = ["model.layers.0.mlp.weight", "model.norm.weight"]
    base = {names[0]: BASE, names[1]: BASE[0].clone()}
    models = [{names[0]: m, names[1]: m[0].clone()} for m in MODELS[:2]]
    moments = [{names[0]: v, names[1]: v[0].clone()} for v in VS[:2]]
    paths = {}
    for label, sd in [("base", base), ("m0", models[0]), ("m1", models[1])]:
        (tmp_path / label).mkdir()
        save_file(sd, str(tmp_path / label / "model.safetensors"))
        paths[label] = str(tmp_path / label)
    for i, sd in enumerate(moments):
        save_file(sd, str(tmp_path / f"v{i}.safetensors"))
    recipe = {
        "merge_method": "ota", "base_model": paths["base"],
        "models": [{"model": paths[f"m{i}"], "parameters": {"second_moments": str(tmp_path / f"v{i}.safetensors"),
                                                             "ffg_density": 0.5}} for i in range(2)],
    }
    mergelab.merge(recipe, tmp_path / "out")
    from safetensors.torch import load_file

    out = load_file(str(next((tmp_path / "out").glob("*.safetensors"))))
    thresholds = []
    for i in range(2):
        s = np.concatenate([(moments[i][k] * (models[i][k] - base[k]) ** 2).numpy().ravel() for k in names])
        thresholds.append(float(np.sort(s)[::-1][int(np.floor(0.5 * s.size)) - 1]))
    for k in names:
        expect = ota_oracle(base[k], [m[k] for m in models], [v[k] for v in moments], thresholds=thresholds)
        np.testing.assert_allclose(out[k].numpy(), expect, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- optimizer checkpoints
# second_moments given as a PyTorch optimizer checkpoint (optimizer.pt as the HF Trainer saves it), on a
# tiny Llama saved with save_pretrained: base + two fine-tuned copies, each with its own optimizer.


def _tiny_llama(seed, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
               num_key_value_heads=1, vocab_size=64, tie_word_embeddings=True)
    cfg.update(overrides)
    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(**cfg))


def _trainer_groups(model):
    # The Trainer's two groups for Llama, written out: weight decay for every matrix, none for the norms.
    named = list(model.named_parameters())
    return [{"params": [p for n, p in named if "norm" not in n], "weight_decay": 0.1},
            {"params": [p for n, p in named if "norm" in n], "weight_decay": 0.0}]


def _train(model, opt, steps=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids = torch.randint(0, 64, (2, 8), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
        opt.zero_grad()


def _exp_avg_sq(model, opt):
    return {n: opt.state[p]["exp_avg_sq"].detach().clone() for n, p in model.named_parameters() if p in opt.state}


def _read_out(path):
    from safetensors.torch import load_file

    out = {}
    for f in sorted(path.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def llama_family(tmp_path_factory):
    """base, two fine-tuned copies (each folder also holds the Trainer-style optimizer.pt), their
    exp_avg_sq as safetensors files, and a param_names optimizer per copy."""
    root = tmp_path_factory.mktemp("ota_optim")
    base = _tiny_llama(0)
    base.save_pretrained(root / "base")
    out = {"root": root, "base": root / "base", "models": [], "optim": [], "moments": [], "named_optim": []}
    for i in range(2):
        model = _tiny_llama(0)
        opt = torch.optim.AdamW(_trainer_groups(model), lr=1e-2)
        _train(model, opt, seed=10 + i)
        folder = root / f"ft{i}"
        model.save_pretrained(folder)
        torch.save(opt.state_dict(), folder / "optimizer.pt")
        save_file(_exp_avg_sq(model, opt), str(root / f"v{i}.safetensors"))
        # Same moments, optimizer built from named parameters in another order: param_names map them.
        named = torch.optim.AdamW(list(model.named_parameters())[::-1], lr=0.0)
        for n, p in model.named_parameters():
            named.state[p] = {"step": torch.tensor(2.0), "exp_avg": torch.zeros_like(p),
                              "exp_avg_sq": opt.state[p]["exp_avg_sq"].detach().clone()}
        torch.save(named.state_dict(), root / f"named{i}.pt")
        out["models"].append(folder)
        out["optim"].append(folder / "optimizer.pt")
        out["moments"].append(root / f"v{i}.safetensors")
        out["named_optim"].append(root / f"named{i}.pt")
    return out


def _ota_recipe(fam, second_moments, **params):
    return {"merge_method": "ota", "base_model": str(fam["base"]),
            "models": [{"model": str(m), "parameters": {"second_moments": str(v), **params}}
                       for m, v in zip(fam["models"], second_moments)]}


def test_optimizer_pt_gives_the_same_merge_as_exp_avg_sq_safetensors(llama_family, tmp_path):
    fam = llama_family
    assert "param_names" not in torch.load(fam["optim"][0], weights_only=True)["param_groups"][0]
    # Model 0: the optimizer file; model 1: the HF checkpoint folder holding optimizer.pt and the weights.
    mergelab.merge(_ota_recipe(fam, [fam["optim"][0], fam["models"][1]], ffg_density=0.5), tmp_path / "a")
    mergelab.merge(_ota_recipe(fam, fam["moments"], ffg_density=0.5), tmp_path / "b")
    a, b = _read_out(tmp_path / "a"), _read_out(tmp_path / "b")
    assert a.keys() == b.keys() and "model.layers.1.mlp.down_proj.weight" in a
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_optimizer_param_names_map_the_indices(llama_family, tmp_path):
    from mergelab.io.checkpoint import Checkpoint
    from mergelab.io.optimizer_state import OptimizerStateCheckpoint

    fam = llama_family
    ck = OptimizerStateCheckpoint.open(fam["named_optim"][0], "v", model=Checkpoint.open(str(fam["models"][0])))
    assert ck.naming == "param_names"
    ref = Checkpoint.open(str(fam["moments"][0]))
    assert set(ck.tensors) == set(ref.tensors)
    name = "model.layers.0.self_attn.k_proj.weight"
    torch.testing.assert_close(ck.read(name, (2, 5)), ref.read(name, (2, 5)), rtol=0, atol=0)
    mergelab.merge(_ota_recipe(fam, fam["named_optim"]), tmp_path / "a")
    mergelab.merge(_ota_recipe(fam, fam["moments"]), tmp_path / "b")
    a, b = _read_out(tmp_path / "a"), _read_out(tmp_path / "b")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_adafactor_state_gives_its_rank1_estimate(llama_family, tmp_path):
    from transformers.optimization import Adafactor

    from mergelab.io.checkpoint import Checkpoint
    from mergelab.io.optimizer_state import OptimizerStateCheckpoint

    fam = llama_family
    model = _tiny_llama(0)
    opt = Adafactor(_trainer_groups(model), scale_parameter=False, relative_step=False, lr=1e-3)
    _train(model, opt, steps=3)
    torch.save(opt.state_dict(), tmp_path / "optimizer.pt")
    ck = OptimizerStateCheckpoint.open(tmp_path / "optimizer.pt", "v", model=Checkpoint.open(str(fam["models"][0])))
    params = dict(model.named_parameters())
    name = "model.layers.0.mlp.down_proj.weight"  # (16, 32)
    st = opt.state[params[name]]
    row, col = st["exp_avg_sq_row"], st["exp_avg_sq_col"]
    expect = torch.outer(row / row.mean(), col)
    torch.testing.assert_close(ck.read(name), expect, rtol=1e-6, atol=0)
    torch.testing.assert_close(ck.read(name, (3, 7)), expect[3:7], rtol=1e-6, atol=0)
    # The estimate Adafactor divides its update by: _approx_sq_grad returns its inverse square root.
    torch.testing.assert_close(ck.read(name), Adafactor._approx_sq_grad(row, col) ** -2, rtol=1e-5, atol=0)
    # Its row and column means are Adafactor's factors (mean(row) == mean(col): both track the mean of g^2).
    torch.testing.assert_close(expect.mean(1), row, rtol=1e-5, atol=0)
    torch.testing.assert_close(expect.mean(0), col, rtol=1e-5, atol=0)
    norm = "model.layers.1.input_layernorm.weight"  # vectors keep a dense exp_avg_sq
    torch.testing.assert_close(ck.read(norm), opt.state[params[norm]]["exp_avg_sq"], rtol=0, atol=0)
    recipe = _ota_recipe(fam, [tmp_path / "optimizer.pt", fam["optim"][1]])
    mergelab.merge(recipe, tmp_path / "out")
    assert "model.layers.0.mlp.down_proj.weight" in _read_out(tmp_path / "out")


def test_optimizer_of_another_model_or_not_an_optimizer_is_refused(llama_family, tmp_path):
    from mergelab.errors import CheckpointError

    fam = llama_family
    other = _tiny_llama(1, intermediate_size=24)
    opt = torch.optim.AdamW(_trainer_groups(other), lr=1e-2)
    _train(other, opt, steps=1)
    torch.save(opt.state_dict(), tmp_path / "other.pt")
    with pytest.raises(CheckpointError, match=r"other\.pt.*mlp\.gate_proj\.weight.*\(32, 16\).*\(24, 16\)"
                                              r".*safetensors file of exp_avg_sq"):
        mergelab.merge(_ota_recipe(fam, [tmp_path / "other.pt", fam["optim"][1]]), tmp_path / "out")
    torch.save({"model.norm.weight": torch.ones(16)}, tmp_path / "flat.pt")
    with pytest.raises(CheckpointError, match=r"flat\.pt.*not an optimizer state"):
        mergelab.merge(_ota_recipe(fam, [tmp_path / "flat.pt", fam["optim"][1]]), tmp_path / "out")
    # A parameter the optimizer never stepped has no second moments: the tensor is missing.
    model = _tiny_llama(0)
    model.model.norm.weight.requires_grad_(False)
    opt = torch.optim.AdamW(_trainer_groups(model), lr=1e-2)
    _train(model, opt, steps=1)
    torch.save(opt.state_dict(), tmp_path / "frozen.pt")
    with pytest.raises(CheckpointError, match=r"model\.norm\.weight' is missing from second_moments of model 0"):
        mergelab.merge(_ota_recipe(fam, [tmp_path / "frozen.pt", fam["optim"][1]]), tmp_path / "out")


@pytest.mark.parametrize("chunk_elements", [None, 8])
def test_second_moments_are_cropped_like_their_model_under_a_vocab_policy(chunk_elements):
    # A model with a larger vocabulary: its embedding and its second moments are both cut to the
    # common sub-matrix, row for row, so the result equals merging pre-cropped inputs.
    g = torch.Generator().manual_seed(7)
    name = "model.embed_tokens.weight"
    base = {name: torch.randn(10, 4, generator=g)}
    models = [{name: torch.randn(12, 4, generator=g)}, {name: torch.randn(10, 4, generator=g)}]
    moments = [{name: torch.rand(12, 4, generator=g) + 0.1}, {name: torch.rand(10, 4, generator=g) + 0.1}]
    sizes = {} if chunk_elements is None else {"chunk_elements": chunk_elements}
    out = mergelab.merge_state_dicts(base, models, "ota", vocab_policy="common_submatrix",
                                     aux={"second_moments": moments}, **sizes)
    cropped = [{name: m[name][:10]} for m in models]
    cropped_moments = [{name: v[name][:10]} for v in moments]
    expected = mergelab.merge_state_dicts(base, cropped, "ota", aux={"second_moments": cropped_moments}, **sizes)
    assert torch.equal(out[name], expected[name])
