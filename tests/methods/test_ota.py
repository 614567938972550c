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
