"""gram: streamed float64 sums of squares and dot products equal the direct whole-tensor sums."""

import torch

from mergelab.methods.gram import all_pairs, cosine, gram, gram_matrix
from mergelab.methods.registry import TensorInputs, TensorSource


def rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


XS = [rand(11, 5, seed=s) for s in (1, 2, 3)]


def source(xs, chunks):
    """A TensorSource streaming ``xs`` (as models) in ``chunks`` row chunks."""
    rows = xs[0].shape[0]
    edges = [round(i * rows / chunks) for i in range(chunks + 1)]

    def stream():
        for i in range(chunks):
            r = (edges[i], edges[i + 1])
            yield TensorInputs(name="t", shape=tuple(xs[0].shape), base=None, models=[x[r[0]:r[1]] for x in xs],
                               params={}, model_params=[{} for _ in xs], rows=r, chunk=i)

    return TensorSource("t", tuple(xs[0].shape), {}, [{} for _ in xs], len(xs), chunks, stream)


def test_all_pairs():
    assert all_pairs(1) == []
    assert all_pairs(3) == [(0, 1), (0, 2), (1, 2)]


def test_streamed_sums_equal_whole_tensor_float64_sums():
    d = [x.double() for x in XS]
    for chunks in (1, 4):
        g = gram(source(XS, chunks), lambda c: list(c.models), all_pairs(3))
        for i in range(3):
            assert abs(float(g.sq[i]) - float((d[i] ** 2).sum())) < 1e-12 * float((d[i] ** 2).sum())
        for i, j in all_pairs(3):
            assert abs(float(g.dot[(i, j)]) - float((d[i] * d[j]).sum())) < 1e-11
        gm = gram_matrix(source(XS, chunks), lambda c: list(c.models))
        stacked = torch.stack([x.reshape(-1) for x in d])
        torch.testing.assert_close(gm, stacked @ stacked.T, rtol=1e-12, atol=1e-12)


def test_per_column_sums():
    g = gram(source(XS, 3), lambda c: list(c.models), [(0, 2)], per_column=True)
    torch.testing.assert_close(g.sq[1], (XS[1].double() ** 2).sum(dim=0))
    torch.testing.assert_close(g.dot[(0, 2)], (XS[0].double() * XS[2].double()).sum(dim=0))


def test_cosine_clamps_and_floors_the_norm_product():
    a = XS[0]
    g = gram(source([a, -2 * a, torch.zeros_like(a)], 2), lambda c: list(c.models), all_pairs(3))
    assert cosine(g, (0, 1), 1e-6) == -1.0
    assert cosine(g, (0, 2), 1e-6) == 0.0  # zero vector: the floor keeps the quotient finite
    a64, b64 = XS[0].double().reshape(-1), XS[1].double().reshape(-1)
    g = gram(source(XS[:2], 3), lambda c: list(c.models), [(0, 1)])
    expected = float(a64 @ b64 / (a64.norm() * b64.norm()))
    assert abs(cosine(g, (0, 1), 1e-6) - expected) < 1e-12
