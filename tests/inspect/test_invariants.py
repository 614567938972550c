"""Invariants of the diagnostics on random (exactly representable) task vectors."""

import pytest
import torch

from mergelab.inspect.scan import inspect_models
from mergelab.synthetic import write_checkpoint

SHAPES = {"model.embed_tokens.weight": (6, 4), "model.layers.0.w": (5, 4), "model.layers.1.w": (7,),
          "model.layers.2.w": (3, 3), "model.norm.weight": (4,)}


def _rand(shape, g, lo, hi, denom, zero_share=0.0):
    t = torch.randint(lo, hi, shape, generator=g).to(torch.float32) / denom
    if zero_share:
        t = t * (torch.rand(shape, generator=g) >= zero_share)
    return t


@pytest.fixture
def family(tmp_path):
    """Base, three task vectors (multiples of 1/16, ~40% zeros), and a writer of base + s * tau."""
    g = torch.Generator().manual_seed(7)
    base = {n: _rand(s, g, -16, 17, 8) for n, s in SHAPES.items()}
    taus = [{n: _rand(s, g, -4, 5, 16, zero_share=0.3) for n, s in SHAPES.items()} for _ in range(3)]
    write_checkpoint(tmp_path / "base", base, {})

    def model(name, tau, scale=1.0):
        write_checkpoint(tmp_path / name, {n: base[n] + scale * tau[n] for n in base}, {})
        return str(tmp_path / name)

    return str(tmp_path / "base"), taus, model


def _all(diag):
    return [diag.overall] + [g.stats for g in diag.groups]


def test_swapping_models_permutes_everything(family):
    base, taus, model = family
    m = [model(f"m{i}", t) for i, t in enumerate(taus)]
    ref = inspect_models(base, m, density=0.4)
    perm = [2, 0, 1]
    got = inspect_models(base, [m[p] for p in perm], density=0.4)
    assert got.labels == ["m2", "m0", "m1"]
    for a, b in zip(_all(ref), _all(got)):
        for i in range(3):
            assert b.norms[i] == pytest.approx(a.norms[perm[i]], rel=1e-12)
            assert b.zeros[i] == a.zeros[perm[i]]
            for j in range(3):
                ca, cb = a.cosine[perm[i]][perm[j]], b.cosine[i][j]
                assert (ca is None and cb is None) or cb == pytest.approx(ca, abs=1e-12)
        assert (b.conflicts, b.overlap, b.trimmed_conflicts) == (a.conflicts, a.overlap, a.trimmed_conflicts)
    # the matrix is not trivially symmetric under the permutation: the check above had something to do
    c = ref.overall.cosine
    assert len({round(c[0][1], 9), round(c[0][2], 9), round(c[1][2], 9)}) == 3


def test_scaling_a_task_vector_keeps_cosine_and_conflicts(family):
    base, taus, model = family
    ref = inspect_models(base, [model("a", taus[0]), model("b", taus[1])], density=0.4)
    got = inspect_models(base, [model("a", taus[0]), model("b4", taus[1], scale=4.0)], density=0.4)
    for a, b in zip(_all(ref), _all(got)):
        assert b.norms[1] == pytest.approx(4 * a.norms[1], rel=1e-12)
        assert b.cosine[0][1] == pytest.approx(a.cosine[0][1], abs=1e-12)
        assert (b.conflicts, b.overlap, b.trimmed_conflicts, b.trimmed_overlap) == \
               (a.conflicts, a.overlap, a.trimmed_conflicts, a.trimmed_overlap)
        assert b.zeros.tolist() == a.zeros.tolist()
    assert ref.overall.conflicts > 0


def test_negating_a_task_vector_flips_the_cosine(family):
    base, taus, model = family
    ref = inspect_models(base, [model("a", taus[0]), model("b", taus[1])]).overall
    got = inspect_models(base, [model("a", taus[0]), model("neg", taus[1], scale=-1.0)]).overall
    assert got.cosine[0][1] == pytest.approx(-ref.cosine[0][1], abs=1e-12)
    assert ref.cosine[0][1] != pytest.approx(0.0, abs=1e-3)


def test_identical_models_cosine_one_conflict_zero(family):
    base, taus, model = family
    a = model("a", taus[0])
    diag = inspect_models(base, [a, model("a_copy", taus[0])])
    for s in _all(diag):
        assert s.cosine[0][1] == pytest.approx(1.0, abs=1e-12)
        assert s.conflicts == 0 and s.conflict_rate == 0
        # every non-zero coordinate is shared by both
        assert s.overlap == s.numel - s.zeros[0]
        assert s.conflict_vs_chance == 0.0
    assert diag.overall.zeros[0] > 0


def test_a_model_equal_to_the_base(family):
    base, taus, model = family
    diag = inspect_models(base, [model("a", taus[0]), base])
    s = diag.overall
    assert s.norms[1] == 0 and s.zero_share[1] == 1.0
    assert s.cosine[0][1] is None and s.cosine[1][1] is None
    assert s.conflicts == 0 and s.overlap == 0
    assert any("identical to the base" in line for line in diag.interpretation)
