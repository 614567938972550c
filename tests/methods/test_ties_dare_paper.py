"""TIES and DARE under ``semantics: paper``: settings a semantics cannot honour are errors, DARE's
rescale/drop-only modes, dare_ties = DARE followed by the whole of TIES, and TIES' zero-sum rule
(the sign of the total elected mass over the whole model, which can itself be 0).

The oracle is written here from the spec's formulas (methods-data-free.md sections 2 and 3), in
float64, over the whole model (every tensor flattened), never with the code under test.
"""

import math

import numpy as np
import pytest
import torch
import yaml

import mergelab
from mergelab.errors import RecipeError
from tests.conftest import run_cli
from tests.methods.helpers import run


# ------------------------------------------------------------------------------------------ the oracle
def paper_ties_oracle(base: dict, models: list, k_frac: float, weights=None, lam: float = 1.0,
                      normalize: bool = True, zero_rule: str = "global") -> dict:
    """TIES of the reference over the whole model: trim (keep every entry >= the (floor(K*N)+1)-th
    largest |tau|; K >= 1 keeps all), gamma = sign(sum_t w_t tau^_t), zero coordinates set to
    sign(sum_j gamma_j) (``zero_rule="global"``; "plus" sets them to +1, mergekit's rule, to show the
    test data reaches the case), disjoint mean over the count of strictly agreeing entries (no
    division when not ``normalize``: dis-sum), theta_0 + lambda * tau_m."""
    names = sorted(base)
    b = np.concatenate([base[n].double().numpy().ravel() for n in names])
    taus = [np.concatenate([m[n].double().numpy().ravel() for n in names]) - b for m in models]
    weights = weights or [1.0] * len(models)
    n_all = b.size
    trimmed = []
    for tau in taus:
        if k_frac >= 1:
            trimmed.append(tau.copy())
            continue
        k = math.floor(k_frac * n_all) + 1
        thr = np.sort(np.abs(tau))[::-1][k - 1]
        trimmed.append(np.where(np.abs(tau) >= thr, tau, 0.0))
    weighted = [w * t for w, t in zip(weights, trimmed)]
    gamma = np.sign(np.sum(weighted, axis=0))
    fill = np.sign(gamma.sum()) if zero_rule == "global" else 1.0
    gamma[gamma == 0] = fill
    agree = [((gamma > 0) & (t > 0)) | ((gamma < 0) & (t < 0)) for t in weighted]
    num = np.sum([a * t for a, t in zip(agree, weighted)], axis=0)
    den = np.maximum(1, np.sum(agree, axis=0)) if normalize else 1.0
    out = b + lam * num / den
    result, at = {}, 0
    for n in names:
        size = base[n].numel()
        result[n] = out[at:at + size].reshape(tuple(base[n].shape))
        at += size
    return result


def _close(got: dict, want: dict, atol=1e-6):
    for n in want:
        assert torch.allclose(got[n].double(), torch.from_numpy(want[n]), atol=atol, rtol=0), n


# ---------------------------------------------------------------- data whose elected sum is exactly 0
def zero_sum_family(balanced: bool):
    """Two models over two tensors, base 0. After the trim at K = 0.6 (7 of 10 entries per model),
    coordinates a[0,0], a[0,1] and a[1,2] hold exactly opposite entries (elected sum 0). Tensor ``a``
    elects + twice; tensor ``b`` elects - four times (``balanced``: + once and - three times), so the
    whole model's elected mass is -2 (0 when ``balanced``), while tensor ``a`` alone says +."""
    a1 = [[3.0, -2.0, 4.0], [1.5, 0.25, 6.0]]
    a2 = [[-3.0, 2.0, 1.0], [2.5, -0.125, -6.0]]
    b1 = [5.0 if balanced else -5.0, 1.0, -7.0, -1.25]
    b2 = [1.25 if balanced else -1.25, -3.0, -2.0, -4.0]
    base = {"a": torch.zeros(2, 3), "b": torch.zeros(4)}
    models = [{"a": torch.tensor(a1), "b": torch.tensor(b1)}, {"a": torch.tensor(a2), "b": torch.tensor(b2)}]
    return base, models


ZERO_SUM_CASES = [
    # balanced, expected a (the zero-sum coordinates a[0,0], a[0,1], a[1,2] take the global sign)
    (False, [[-3.0, -2.0, 4.0], [2.0, 0.0, -6.0]], [-5.0, -3.0, -4.5, -4.0]),
    (True, [[0.0, 0.0, 4.0], [2.0, 0.0, 0.0]], [5.0, -3.0, -4.5, -4.0]),
]


@pytest.mark.parametrize("balanced, want_a, want_b", ZERO_SUM_CASES)
def test_oracle_reaches_the_zero_sum_case_and_differs_from_plus_one(balanced, want_a, want_b):
    base, models = zero_sum_family(balanced)
    paper = paper_ties_oracle(base, models, 0.6)
    plus = paper_ties_oracle(base, models, 0.6, zero_rule="plus")
    assert paper["a"].tolist() == want_a and paper["b"].tolist() == want_b  # worked out by hand
    assert plus["a"].tolist() == [[3.0, 2.0, 4.0], [2.0, 0.0, 6.0]]  # +1 on ties: another result


@pytest.mark.filterwarnings("ignore:dare_ties. density is 1")
@pytest.mark.parametrize("method", ["ties", "dare_ties"])
@pytest.mark.parametrize("balanced, want_a, want_b", ZERO_SUM_CASES)
@pytest.mark.parametrize("chunk_elements", [None, 3])
def test_paper_zero_sum_takes_the_whole_model_elected_mass(method, balanced, want_a, want_b, chunk_elements):
    base, models = zero_sum_family(balanced)
    # dare_ties with density 1: DARE drops nothing, so this is TIES at trim_density with its own code.
    params = {"density": 0.6} if method == "ties" else {"density": 1.0, "trim_density": 0.6}
    got = mergelab.merge_state_dicts(base, models, method, weight=1.0, semantics="paper",
                                     chunk_elements=chunk_elements, **params)
    assert got["a"].tolist() == want_a and got["b"].tolist() == want_b
    # odd symmetry (spec test c): negating every task vector negates the merge, zero sums included
    neg = mergelab.merge_state_dicts(base, [{k: -v for k, v in m.items()} for m in models], method, weight=1.0,
                                     semantics="paper", chunk_elements=chunk_elements, **params)
    assert all(torch.equal(neg[k], -got[k]) for k in got)


# ------------------------------------------------------------------ dare_ties paper: the whole of TIES
def _random_family(seed=0, n=3):
    g = torch.Generator().manual_seed(seed)
    base = {"x.weight": torch.randn(12, 9, generator=g), "y.bias": torch.randn(7, generator=g),
            "z.weight": torch.randn(5, 4, generator=g)}
    models = [{k: v + 0.1 * torch.randn(v.shape, generator=g) for k, v in base.items()} for _ in range(n)]
    return base, models


@pytest.mark.parametrize("chunk_elements", [None, 18])
def test_dare_ties_paper_is_dare_then_the_whole_of_ties(chunk_elements):
    base, models = _random_family()
    w = [1.0, 0.5, 2.0]
    with pytest.warns(UserWarning, match="TIES \\(trim, elect, disjoint mean\\) without DARE's drop"):
        got = mergelab.merge_state_dicts(base, models, "dare_ties", weight=w, density=1.0, semantics="paper",
                                         trim_density=0.3, chunk_elements=chunk_elements, lambda_=0.8)
    _close(got, paper_ties_oracle(base, models, 0.3, w, lam=0.8))
    # defaults under paper: trim_density 0.2 (MergeLM's mask rate 0.8) and the disjoint mean
    with pytest.warns(UserWarning):
        got = mergelab.merge_state_dicts(base, models, "dare_ties", weight=w, density=1.0, semantics="paper",
                                         chunk_elements=chunk_elements)
    _close(got, paper_ties_oracle(base, models, 0.2, w))
    # an explicit normalize: false is the reference's dis-sum; trim_density 1 keeps everything
    with pytest.warns(UserWarning):
        got = mergelab.merge_state_dicts(base, models, "dare_ties", weight=w, density=1.0, semantics="paper",
                                         normalize=False, trim_density=1.0, chunk_elements=chunk_elements)
    _close(got, paper_ties_oracle(base, models, 1.0, w, normalize=False))


def test_dare_ties_paper_trims_the_dared_task_vector_with_the_merges_own_masks():
    """One model: TIES keeps the trimmed DARE'd vector as it is, so dare_ties is the top
    floor(K*N)+1 magnitudes (over the whole model) of dare_linear's output, which draws the same masks
    (same seed, tensor, chunk, model): the trim's threshold comes from the merge's own draws, also
    when every tensor is streamed in row chunks."""
    base, models = _random_family(seed=4, n=1)
    for chunk in (None, 18):
        dared = mergelab.merge_state_dicts(base, models, "dare_linear", weight=1.0, density=0.5, semantics="paper",
                                           seed=3, chunk_elements=chunk)
        got = mergelab.merge_state_dicts(base, models, "dare_ties", weight=1.0, density=0.5, semantics="paper",
                                         trim_density=0.25, seed=3, chunk_elements=chunk)
        _close(got, paper_ties_oracle(base, [dared], 0.25), atol=0)
        total = sum(v.numel() for v in base.values())
        kept = sum(int((got[k] != base[k]).sum()) for k in base)
        assert kept == math.floor(0.25 * total) + 1


# ----------------------------------------------------------------------------- DARE rescale / drop only
@pytest.mark.parametrize("kernels", [True, False])
def test_dare_paper_rescale_false_drops_only(kernels, monkeypatch):
    if not kernels:  # the tensor code (GPUs, no numba) instead of the fused CPU kernels
        from mergelab.methods import fused

        monkeypatch.setattr(fused, "_kernels", None)
        monkeypatch.setattr(fused, "_unavailable", True)
    base = torch.zeros(50_000)
    model = torch.linspace(0.5, 2.0, 50_000)
    scaled = run("dare_linear", base, [model], weight=1.0, density=0.3, semantics="paper", seed=2)
    only = run("dare_linear", base, [model], weight=1.0, density=0.3, semantics="paper", rescale=False, seed=2)
    kept = scaled != 0
    assert abs(kept.float().mean().item() - 0.3) < 0.01
    assert torch.equal(only, torch.where(kept, model, torch.zeros_like(model)))  # the paper's DropOnly
    assert torch.allclose(scaled[kept], model[kept] / 0.3, rtol=1e-6, atol=0)  # 1/keep-prob


@pytest.mark.parametrize("method", ["dare_linear", "dare_ties"])
def test_dare_paper_drop_only_through_the_engine(method):
    base, models = _random_family(seed=1, n=1)
    common = dict(weight=1.0, density=0.4, semantics="paper", seed=9)
    if method == "dare_ties":
        common["trim_density"] = 1.0
    scaled = mergelab.merge_state_dicts(base, models, method, **common)
    only = mergelab.merge_state_dicts(base, models, method, rescale=False, **common)
    for k in base:
        tau = models[0][k] - base[k]
        kept = scaled[k] != base[k]
        assert torch.equal(only[k] - base[k], torch.where(kept, tau, torch.zeros_like(tau))), k
        torch.testing.assert_close(scaled[k][kept] - base[k][kept], tau[kept] / 0.4, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------- settings a semantics cannot honour
def test_ties_paper_refuses_rescale():
    base, models = _random_family(n=2)
    with pytest.raises(RecipeError, match="'rescale'.*semantics: paper"):
        mergelab.merge_state_dicts(base, models, "ties", weight=1.0, density=0.5, semantics="paper", rescale=True)
    mergelab.merge_state_dicts(base, models, "ties", weight=1.0, density=0.5, semantics="paper", rescale=False)


def test_dare_ties_mergekit_refuses_trim_density():
    base, models = _random_family(n=2)
    with pytest.raises(RecipeError, match="'trim_density'.*semantics: mergekit"):
        mergelab.merge_state_dicts(base, models, "dare_ties", weight=1.0, density=0.5, trim_density=0.2)


def test_cli_refuses_what_the_semantics_cannot_honour(tiny_family, tmp_path, capsys):
    base, experts = tiny_family
    for method, params in (("ties", {"semantics": "paper", "rescale": True, "density": 0.5}),
                           ("dare_ties", {"trim_density": 0.3, "density": 0.5})):
        recipe = tmp_path / f"{method}.yaml"
        recipe.write_text(yaml.safe_dump({"merge_method": method, "base_model": str(base), "parameters": params,
                                          "models": [{"model": str(e), "parameters": {"weight": 1.0}}
                                                     for e in experts]}))
        out = tmp_path / f"out_{method}"
        code, _, err = run_cli(["merge", recipe, "-o", out, "-q"], capsys)
        assert code != 0 and "Traceback" not in err, err
        name = "rescale" if method == "ties" else "trim_density"
        flat = " ".join(err.split())
        assert f"'{name}'" in flat and f"semantics: {params.get('semantics', 'mergekit')}" in flat, err
        assert not out.exists() and not (tmp_path / f"out_{method}.partial").exists()


def test_dare_ties_paper_through_the_cli_equals_the_oracle(tiny_family, tmp_path, capsys):
    """A dare_ties paper recipe runs end to end; with DARE's density 1 it equals the oracle."""
    from safetensors.torch import load_file

    base, experts = tiny_family
    recipe = tmp_path / "r.yaml"
    recipe.write_text(yaml.safe_dump({
        "merge_method": "dare_ties", "base_model": str(base),
        "parameters": {"semantics": "paper", "trim_density": 0.3},
        "models": [{"model": str(e), "parameters": {"weight": 1.0, "density": 1.0}} for e in experts]}))
    code, _, err = run_cli(["merge", recipe, "-o", tmp_path / "out", "-q"], capsys)
    assert code == 0, err
    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    b = load_file(str(base / "model.safetensors"))
    ms = [load_file(str(e / "model.safetensors")) for e in experts]
    floats = [k for k in b if b[k].is_floating_point()]
    want = paper_ties_oracle({k: b[k] for k in floats}, [{k: m[k] for k in floats} for m in ms], 0.3)
    _close({k: got[k] for k in floats}, want, atol=1e-6)


def test_dare_ties_paper_trim_below_dares_density_keeps_what_dare_kept():
    """trim_density above DARE's density: the trim's threshold is 0 and keeps every entry DARE kept."""
    base, models = _random_family(seed=6, n=1)
    dared = mergelab.merge_state_dicts(base, models, "dare_linear", weight=1.0, density=0.1, semantics="paper", seed=1)
    got = mergelab.merge_state_dicts(base, models, "dare_ties", weight=1.0, density=0.1, semantics="paper",
                                     trim_density=0.5, seed=1)
    assert all(torch.equal(got[k], dared[k]) for k in base)


@pytest.mark.filterwarnings("ignore:dare_ties. density is 1")
def test_dare_ties_paper_keeps_every_tie_and_mergelab_json_records_kept_vs_asked(tmp_path):
    """Quantised deltas (weight-decayed rows): the reference's >= keeps every tie at the threshold,
    the merge equals the oracle, and mergelab.json records kept vs asked as for ties' paper trim."""
    import json

    from mergelab.synthetic import write_checkpoint
    from tests.methods.test_exact_counts import decayed_family

    base, models = decayed_family(n=2, seed=6)
    cfg = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "vocab_size": 300,
           "num_hidden_layers": 1}
    name = "model.embed_tokens.weight"
    write_checkpoint(tmp_path / "base", {name: base}, cfg)
    for i, m in enumerate(models):
        write_checkpoint(tmp_path / f"m{i}", {name: m}, cfg)
    recipe = {"merge_method": "dare_ties", "base_model": str(tmp_path / "base"),
              "parameters": {"semantics": "paper", "trim_density": 0.4},
              "models": [{"model": str(tmp_path / f"m{i}"), "parameters": {"weight": 1.0, "density": 1.0}}
                         for i in range(2)]}
    mergelab.merge(recipe, tmp_path / "out")
    report = json.loads((tmp_path / "out" / "mergelab.json").read_text())["reports"]["(whole model)"]["trim"]
    asked = math.floor(0.4 * base.numel()) + 1
    assert report["asked"] == [asked, asked]
    for i, m in enumerate(models):
        a = (m - base).abs().reshape(-1)
        t = a.sort(descending=True).values[asked - 1]
        assert report["kept"][i] == int((a >= t).sum()) > asked * 1.001
    from safetensors.torch import load_file

    got = load_file(str(tmp_path / "out" / "model.safetensors"))
    _close(got, paper_ties_oracle({name: base}, [{name: m} for m in models], 0.4), atol=1e-6)
