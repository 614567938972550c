"""arcee_fusion: a hand-checkable example against a numpy oracle, and structural properties."""

import numpy as np
import torch

from tests.methods.mergekit_family_util import run


def oracle(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """float64: importance = |d| * row KL(softmax(model) || softmax(base)); keep >= median + 1.5 IQR."""
    b, m = base.double().numpy(), model.double().numpy()

    def softmax(x):
        e = np.exp(x - x.max(axis=-1, keepdims=True))
        return e / e.sum(axis=-1, keepdims=True)

    p, q = softmax(m) + 1e-8, softmax(b) + 1e-8
    kl = (p * np.log(p / q)).sum(axis=-1, keepdims=True)
    imp = np.abs(m - b) * kl
    s = np.sort(imp.reshape(-1))
    n = s.size
    q1, med, q3 = (s[int(f * (n - 1))] for f in (0.25, 0.5, 0.75))
    keep = imp >= med + 1.5 * (q3 - q1)
    return torch.from_numpy(np.where(keep, m, b)), keep


def test_only_the_row_whose_distribution_moved_is_taken():
    base = torch.zeros(4, 5)
    step = torch.tensor([0.02, -0.01, 0.03, -0.02, 0.01])
    model = base + step  # every row changes a little, the same way
    model[2, 3] = 2.0  # one large change that reshapes row 2's distribution
    out = run("arcee_fusion", base, [model])
    expected, keep = oracle(base, model)
    torch.testing.assert_close(out.double(), expected)
    # Rows 0, 1, 3 shift alike (same small KL); row 2's KL is far larger, so its whole row is taken.
    taken = torch.zeros(4, 5, dtype=torch.bool)
    taken[2] = True
    assert torch.equal(torch.from_numpy(keep), taken)
    assert torch.equal(out[2], model[2]) and torch.equal(out[[0, 1, 3]], base[[0, 1, 3]])


def test_mostly_unchanged_tensor_takes_every_change():
    # With more than 3/4 of the entries unchanged the quartiles are 0, so the threshold is 0 and every
    # changed entry (importance >= 0) is taken: mergekit's rule, reproduced.
    base = torch.zeros(4, 5)
    model = base.clone()
    model[1, 2], model[3, 0] = 0.7, -0.2
    assert torch.equal(run("arcee_fusion", base, [model]), model)


def test_random_tensors_match_oracle_and_take_values_from_one_side():
    g = torch.Generator().manual_seed(4)
    for shape in [(16, 24), (50,), (3, 4, 6)]:
        base = torch.randn(*shape, generator=g)
        model = base + 0.3 * torch.randn(*shape, generator=g)
        out = run("arcee_fusion", base, [model])
        expected, keep = oracle(base, model)
        assert torch.equal((out == model) & (out != base), torch.from_numpy(keep) & (model != base))
        torch.testing.assert_close(out.double(), expected)
        assert keep.mean() < 0.5
        if len(shape) == 2:
            assert keep.sum() > 0
