"""The fused CPU kernels give the tensor code's results: the same bits for TIES and for DARE-TIES
without the L1 rescale, the same order statistics, and DARE's L1-rescaled merge within the rounding
of its norms (summed in float64 by the kernels, float32 by the tensor code)."""

import math

import numpy as np
import pytest
import torch

import mergelab
from mergelab.methods import fused
from mergelab.methods import registry
from mergelab.methods.randomness import stream_words
from mergelab.methods.registry import TensorSource, get_method
from mergelab.methods.select import kth_largest_abs, stream_of
from mergelab.methods.ties import TrimStats, ties_merge
from tests.methods.helpers import inputs_for

pytestmark = pytest.mark.skipif(fused.kernels() is None, reason="numba is not installed")


@pytest.fixture
def reference(monkeypatch):
    """Run the tensor code instead of the kernels inside ``with reference():``."""
    import contextlib

    @contextlib.contextmanager
    def off():
        with monkeypatch.context() as m:
            m.setattr(fused, "_kernels", None)
            m.setattr(fused, "_unavailable", True)
            assert fused.kernels() is None
            yield

    return off


def bf16_family(shape, n=3, seed=0, scale=0.01):
    """A base and ``n`` fine-tunes rounded to bfloat16 (many exactly tied magnitudes, like real checkpoints)."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g).to(torch.bfloat16).float()
    models = [(base + torch.randn(shape, generator=g) * scale).to(torch.bfloat16).float() for _ in range(n)]
    return base, models


def test_kth_largest_abs_deltas_matches_the_sort_and_the_streamed_radix_select():
    base, models = bf16_family((97, 211))
    models[1][:10] = base[:10]  # some zero task-vector entries
    numel = base.numel()
    ks = [numel // 2, 1, 5, None]
    models.append(models[0].clone())
    got = fused.kth_largest_abs_deltas(lambda: [(base, models)], ks, numel)
    for i, k in enumerate(ks):
        if k is None:
            assert got[i] is None
            continue
        oracle = (models[i] - base).abs().reshape(-1).sort(descending=True).values[k - 1].item()
        assert got[i] == oracle
    deltas = torch.stack([m - base for m in models[:3]])
    assert got[:3] == kth_largest_abs(stream_of([deltas]), ks[:3])
    # A stream of row chunks gives the same values as the whole tensor.
    chunks = [(base[a:a + 20], [m[a:a + 20] for m in models]) for a in range(0, 97, 20)]
    assert fused.kth_largest_abs_deltas(lambda: iter(chunks), ks, numel) == got
    # Out-of-range ranks: nothing reaches k <= 0, everything reaches k >= numel.
    assert fused.kth_largest_abs_deltas(lambda: [(base, models)], [0, numel, numel + 3, -1], numel) == \
        [math.inf, 0.0, 0.0, math.inf]


@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("tie_sign", [1.0, -1.0])
def test_ties_kernel_is_bit_identical_to_the_tensor_pipeline(reference, semantics, normalize, tie_sign):
    base, models = bf16_family((64, 300), n=4, seed=1)
    models[2][3:7] = base[3:7]
    # Thresholds of every kind: a median, none (keep all), inf (keep nothing) and a tied value.
    thresholds = [float((models[0] - base).abs().median()), 0.0, math.inf,
                  float((models[3] - base).abs().reshape(-1)[5])]
    x = inputs_for("ties", base, models, weight=[0.5, -0.3, 0.2, 1.7], density=0.5, semantics=semantics,
                   normalize=normalize, **{"lambda": 0.8})
    stats = TrimStats(thresholds, [1.25, 0.9, 1.0, 1.1], tie_sign)
    x.tensor_stats = stats
    x.model_stats = stats
    got = ties_merge(x)
    with reference():
        want = ties_merge(x)
    assert torch.equal(got, want)
    nonzero = want != 0  # the sign of an exact zero is not promised
    assert torch.equal(got.view(torch.int32)[nonzero], want.view(torch.int32)[nonzero])


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_whole_merges_agree_with_the_tensor_code(reference, method):
    base, models = bf16_family((128, 515), seed=2)
    params = dict(weight=[0.5, 0.3, 0.2], density=[0.5, 0.3, 0.9], normalize=True)
    got = get_method(method).merge(inputs_for(method, base, models, seed=7, **params))
    with reference():
        want = get_method(method).merge(inputs_for(method, base, models, seed=7, **params))
    if method == "ties":
        assert torch.equal(got, want)
    else:  # L1 norms summed in float64 here, float32 there: rescale factors differ in the last bits,
        # which can move the rounding of base + delta by one unit in the last place
        ulp = float(torch.finfo(torch.float32).eps * (base.abs().max() + 1))
        torch.testing.assert_close(got - base, want - base, rtol=1e-5, atol=ulp)
        assert (got - want).abs().max() <= ulp


@pytest.mark.parametrize("method", ["dare_ties", "dare_linear"])
@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("semantics,rescale", [("paper", True), ("mergekit", False)])
def test_dare_without_l1_rescale_is_bit_identical(reference, method, normalize, semantics, rescale):
    base, models = bf16_family((40, 333), seed=3)
    params = dict(weight=[0.5, -0.3, 0.2], density=[0.5, 0.25, 1.0], semantics=semantics, rescale=rescale,
                  normalize=normalize, **{"lambda": 0.7})
    x = inputs_for(method, base, models, seed=11, **params)
    got = get_method(method).merge(x)
    with reference():
        want = get_method(method).merge(inputs_for(method, base, models, seed=11, **params))
    assert torch.equal(got, want)
    assert not torch.equal(got, base)


def test_dare_linear_weights_summing_to_zero_divide_by_one(reference):
    base, models = bf16_family((20, 50), seed=5)
    params = dict(weight=[0.5, -0.5, 0.0], density=0.5, semantics="paper", normalize=True)
    got = get_method("dare_linear").merge(inputs_for("dare_linear", base, models, seed=1, **params))
    with reference():
        want = get_method("dare_linear").merge(inputs_for("dare_linear", base, models, seed=1, **params))
    assert torch.equal(got, want) and not torch.equal(got, base)


def test_chunked_dare_rescale_factors_match_the_tensor_code(reference):
    base, models = bf16_family((90, 70), seed=4)
    params = dict(weight=[1.0, 1.0, 1.0], density=[0.4, 0.6, 0.5])
    whole = inputs_for("dare_ties", base, models, seed=5, **params)
    chunks = []
    for c, a in enumerate(range(0, 90, 30)):
        x = inputs_for("dare_ties", base[a:a + 30], [m[a:a + 30] for m in models], seed=5, **params)
        x.name, x.shape, x.chunk, x.rows, x.tensor_stats = whole.name, (90, 70), c, (a, a + 30), None
        chunks.append(x)
    src = TensorSource(whole.name, (90, 70), whole.params, whole.model_params, 3, 3, lambda: iter(chunks))
    prepare = get_method("dare_ties").prepare_tensor
    got = prepare(src).l1_scale
    with reference():
        want = prepare(src).l1_scale
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert all(f > 1.2 for f in got)  # dropping about half the entries roughly doubles what is kept


def test_kernel_masks_are_the_keep_masks(monkeypatch):
    """The kernels draw their words themselves: the L1 norm of the kept entries they sum is that of
    the tensor code's keep masks (odd sizes, so ranges split the 64-bit outputs)."""
    monkeypatch.setattr(fused, "_RANGE", 1001)
    base, models = bf16_family((33, 135), seed=6)
    dens = [0.3, 0.5, 1.0]
    x = inputs_for("dare_ties", base, models, seed=9, weight=1.0, density=dens)
    keys = [x.stream_key(i, "dare") for i in range(3)]
    sums = fused.masked_l1_sums(base, models, keys, [registry.keep_limit(d) for d in dens])
    for i, d in enumerate(dens):
        tau = (models[i] - base).abs().double()
        mask = x.keep_mask(i, d, "dare").double()
        assert 0 < mask.mean() <= 1
        np.testing.assert_allclose(sums[i], [tau.sum().item(), (tau * mask).sum().item()], rtol=1e-12)


def test_stored_keep_flags_give_the_merge_that_draws_the_words(monkeypatch):
    monkeypatch.setattr(fused, "_RANGE", 1001)
    base, models = bf16_family((33, 135), seed=7)
    dens = [0.3, 1.0, 0.6]
    keys, limits = [11, 12, 13], [registry.keep_limit(d) for d in dens]
    kept = np.full((3, base.numel()), 7, np.uint8)
    sums = fused.masked_l1_sums(base, models, keys, limits, kept)
    assert np.array_equal(sums, fused.masked_l1_sums(base, models, keys, limits))
    for i in (0, 2):  # models that drop have their flags stored, as the words say
        want = stream_words(keys[i], 0, base.numel()) < limits[i]
        assert np.array_equal(kept[i], want.astype(np.uint8))
    kw = dict(thresholds=[0.0] * 3, factors=[1.5, 1.0, 2.0], divisors=[1.0] * 3, weights=[0.5, 0.3, 0.2],
              tie_sign=1, normalize=False, count_divisor=False, lam=1.0, keys=keys, keep_below=limits)
    assert torch.equal(fused.consensus_merge(base, models, kept=kept, **kw), fused.consensus_merge(base, models, **kw))


def test_kernel_block_words_are_the_stream_words():
    k = fused.kernels()
    scratch = np.empty(600, np.uint64)
    for key, start, size in [(0, 0, 1), (7, 1, 1), (2**63 - 1, 3, 1000), (12345, 1000, 999), (5, 2**33 + 1, 17)]:
        got = k.block_words(np.uint64(key), start, size, scratch)
        assert np.array_equal(got, stream_words(key, start, size))


def test_nonfinite_inputs_take_the_reference_path(reference):
    base, models = bf16_family((16, 50), seed=8)
    models[1][2, 3] = float("nan")
    models[0][4, 4] = float("inf")
    x = inputs_for("ties", base, models, weight=1.0, density=1.0)
    assert fused.consensus_merge(base, models, thresholds=[0.0] * 3, factors=[1.0] * 3, divisors=[1.0] * 3,
                                 weights=[1.0] * 3, tie_sign=1, normalize=True, count_divisor=False,
                                 lam=1.0) is None
    got = ties_merge(x)
    with reference():
        want = ties_merge(x)
    torch.testing.assert_close(got, want, equal_nan=True, rtol=0, atol=0)


def test_results_do_not_depend_on_the_number_of_threads(monkeypatch):
    base, models = bf16_family((300, 1100), seed=10)  # several parallel ranges
    params = dict(weight=[0.5, 0.3, 0.2], density=0.5)
    many = get_method("dare_ties").merge(inputs_for("dare_ties", base, models, seed=1, **params))
    monkeypatch.setattr(fused.os, "cpu_count", lambda: 1)
    from mergelab.methods import parallel

    monkeypatch.setattr(parallel.os, "cpu_count", lambda: 1)
    one = get_method("dare_ties").merge(inputs_for("dare_ties", base, models, seed=1, **params))
    assert torch.equal(many, one)


def test_state_dict_merge_end_to_end_equals_the_tensor_code(reference):
    base, models = bf16_family((64, 96), seed=12)
    sd = lambda t: {"layer.weight": t, "layer.bias": t[0].clone()}  # noqa: E731
    got = mergelab.merge_state_dicts(sd(base), [sd(m) for m in models], "ties", weight=[1.0, 0.5, 0.25],
                                     density=0.4)
    with reference():
        want = mergelab.merge_state_dicts(sd(base), [sd(m) for m in models], "ties", weight=[1.0, 0.5, 0.25],
                                          density=0.4)
    assert all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
@pytest.mark.parametrize("semantics", ["mergekit", "paper"])
def test_bfloat16_inputs_as_stored_give_the_float32_result(reference, method, semantics):
    """Methods with raw_inputs get bfloat16 tensors as stored on a CPU: the kernels widen them exactly,
    and the tensor code converts them first; either way the result is the float32 inputs' one."""
    base, models = bf16_family((48, 260), seed=13)
    params = dict(weight=[0.5, 0.3, 0.2], density=0.5, semantics=semantics)
    assert get_method(method).raw_inputs
    want = get_method(method).merge(inputs_for(method, base, models, seed=2, **params))
    raw = get_method(method).merge(inputs_for(method, base.to(torch.bfloat16),
                                              [m.to(torch.bfloat16) for m in models], seed=2, **params))
    assert raw.dtype == torch.float32 and torch.equal(raw, want)
    with reference():
        want_ref = get_method(method).merge(inputs_for(method, base, models, seed=2, **params))
        raw_ref = get_method(method).merge(inputs_for(method, base.to(torch.bfloat16),
                                                      [m.to(torch.bfloat16) for m in models], seed=2, **params))
    assert torch.equal(raw_ref, want_ref)


def test_the_engine_reads_bfloat16_as_stored_only_for_raw_input_methods(tmp_path, monkeypatch):
    from mergelab.execute import local
    from mergelab.synthetic import make_llama_family

    seen = {}
    real = local.LocalExecutor._compute

    def spy(self, plan, job, x, post_stats=None):
        seen.setdefault(plan.method.name, set()).add(x.models[0].dtype)
        return real(self, plan, job, x, post_stats)

    monkeypatch.setattr(local.LocalExecutor, "_compute", spy)
    base, *experts = make_llama_family(tmp_path / "models", experts=3, hidden=32, layers=2, intermediate=64,
                                       vocab=128, dtype="bfloat16")
    for method in ("ties", "dare_linear", "task_arithmetic"):
        recipe = {"merge_method": method, "base_model": str(base), "dtype": "bfloat16",
                  "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}
                              if method != "task_arithmetic" else {"weight": 0.5}} for e in experts]}
        mergelab.merge(recipe, tmp_path / method)
    assert seen["ties"] == seen["dare_linear"] == {torch.bfloat16} and seen["task_arithmetic"] == {torch.float32}


@pytest.mark.parametrize("method", ["ties", "dare_ties", "dare_linear"])
def test_bfloat16_output_is_the_float32_result_rounded(method):
    """Told the output dtype, the kernels write bfloat16 themselves: the float32 result rounded as
    Tensor.to rounds (large weights put entries on every exponent, ties to even included)."""
    base, models = bf16_family((64, 257), seed=21, scale=0.3)
    params = dict(weight=[0.7, 1.9, -0.4], density=0.6, **{"lambda": 1.3})
    x = inputs_for(method, base, models, seed=3, **params)
    want = get_method(method).merge(x)
    x.out_dtype = torch.bfloat16
    got = get_method(method).merge(x)
    assert want.dtype == torch.float32 and got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), want.to(torch.bfloat16).view(torch.int16))
    x.out_dtype = torch.float16  # not a kernel output: float32, the engine casts
    assert torch.equal(get_method(method).merge(x), want)


def test_the_engine_tells_raw_input_methods_the_output_dtype(tmp_path, monkeypatch):
    from mergelab.execute import local
    from mergelab.synthetic import make_llama_family

    seen = {}
    real = local.LocalExecutor._compute

    def spy(self, plan, job, x, post_stats=None):
        seen.setdefault(plan.method.name, set()).add(x.out_dtype)
        return real(self, plan, job, x, post_stats)

    monkeypatch.setattr(local.LocalExecutor, "_compute", spy)
    base, *experts = make_llama_family(tmp_path / "models", experts=2, hidden=32, layers=1, intermediate=64,
                                       vocab=128, dtype="bfloat16")
    for method, dtype in (("dare_ties", "bfloat16"), ("dare_ties", "float32"), ("task_arithmetic", "bfloat16")):
        recipe = {"merge_method": method, "base_model": str(base), "out_dtype": dtype,
                  "models": [{"model": str(e), "parameters": {"weight": 0.5, "density": 0.5}
                              if method == "dare_ties" else {"weight": 0.5}} for e in experts]}
        mergelab.merge(recipe, tmp_path / f"{method}-{dtype}")
    assert seen["dare_ties"] == {torch.bfloat16, torch.float32} and seen["task_arithmetic"] == {None}
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "dare_ties-bfloat16" / "model.safetensors"))
    b = load_file(str(tmp_path / "dare_ties-float32" / "model.safetensors"))
    merged = [n for n in a if n.endswith("proj.weight")]
    assert merged and all(a[n].dtype == torch.bfloat16 and b[n].dtype == torch.float32 for n in merged)
    for name in merged:  # the bfloat16 merge is the float32 merge rounded
        assert torch.equal(a[name], b[name].to(torch.bfloat16)), name
