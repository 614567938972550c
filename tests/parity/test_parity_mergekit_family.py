"""Method-level parity with mergekit 0.1.5 for breadcrumbs, DELLA, the SLERP family, Karcher, Model Stock,
SCE, NearSwap and Arcee Fusion.

Set ``MERGEKIT_PYTHON`` to a python that has mergekit 0.1.5 installed (its own venv). Every case's
inputs are written with safetensors, one subprocess runs mergekit's own merge functions on them
(``mergekit.merge_methods.api.merge_tensors``, float32), and each mergelab method, called through
``TensorInputs``, must give the same tensor to within one float32 ulp. Chunkable methods are also run
in row chunks and must agree to float32 rounding (their whole-tensor sums then accumulate in float64).

DELLA draws random masks. mergekit draws them with ``torch.bernoulli(p)`` from the global RNG; the
subprocess replaces ``torch.bernoulli`` by ``u < p`` with ``u`` the uniform numbers mergelab draws for
the same tensor, so both sides use the same masks and everything else (ranks, probabilities, L1
rescale, sign election) is compared exactly.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

import pytest
import torch

from tests.methods.mergekit_family_util import inputs, run, ulp_diff
from tests.parity.mergekit_runner import NEEDS_MERGEKIT, merge_tensors

pytestmark = NEEDS_MERGEKIT


def _g(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _tensors() -> dict:
    """Small float32 inputs: a base and models a small step away, in several shapes."""
    t = {}
    for n, (key, shape) in enumerate({"m": (16, 24), "v": (40,), "c": (4, 5, 6), "tiny": (7,)}.items()):
        base = torch.randn(*shape, generator=_g(1000 + n))
        t[f"{key}.base"] = base
        for i in range(4):
            t[f"{key}.{i}"] = base + 0.1 * torch.randn(*shape, generator=_g(100 + i + 10 * len(key)))
        t[f"{key}.raw"] = torch.randn(*shape, generator=_g(7 + len(key)))  # unrelated to base
    t["m.twice"] = 2 * t["m.base"]  # colinear with the base
    t["m.neg"] = t["m.base"] - (t["m.0"] - t["m.base"])  # task vector opposite to m.0's
    t["m.zero"] = torch.zeros(16, 24)
    shared = torch.randn(16, 24, generator=_g(60))  # positively correlated task vectors (Model Stock)
    t["m.corr0"] = t["m.base"] + 0.1 * (shared + torch.randn(16, 24, generator=_g(61)))
    t["m.corr1"] = t["m.base"] + 0.1 * (shared + torch.randn(16, 24, generator=_g(62)))
    t["m.big"] = t["m.base"] + torch.randn(16, 24, generator=_g(55))  # task vectors of scale 1 (SCE)
    t["m.big2"] = t["m.base"] + torch.randn(16, 24, generator=_g(56))
    t["m.big3"] = t["m.base"] + torch.randn(16, 24, generator=_g(57))
    return t


@dataclass
class Case:
    id: str
    method: str
    base: Optional[str]  # tensor key, or None
    models: List[str]
    params: dict = field(default_factory=dict)  # mergelab global parameters
    model_params: object = None  # mergelab per-model parameters (dict broadcast, or list)
    mk_params: dict = field(default_factory=dict)  # mergekit parameters
    chunks: int = 0  # also run in this many row chunks (chunkable methods)
    della: bool = False  # feed mergelab's uniforms to mergekit's bernoulli


def _cases() -> List[Case]:
    c: List[Case] = []

    def gta(id, method, key, models, w, density=None, extra=None, params=None, chunks=3, della=False):
        mp = []
        mk = {"weight": list(w)}
        for i in range(len(models)):
            row = {"weight": w[i]}
            if density is not None:
                row["density"] = density[i]
            for k, v in (extra or {}).items():
                row[k] = v[i]
            mp.append(row)
        if density is not None:
            mk["density"] = list(density)
        for k, v in (extra or {}).items():
            mk[k] = list(v)
        mk.update({k: v for k, v in (params or {}).items() if k != "semantics"})
        c.append(Case(id, method, f"{key}.base", [f"{key}.{i}" for i in models], dict(params or {}), mp, mk,
                      chunks, della))

    # breadcrumbs / breadcrumbs_ties
    gta("bc-basic", "breadcrumbs", "m", [0, 1], [1.0, 0.6], [0.5, 0.5], {"gamma": [0.1, 0.1]})
    gta("bc-defaults-gamma", "breadcrumbs", "m", [0, 1, 2], [1.0, 1.0, 1.0], [0.9, 0.9, 0.9],
        {"gamma": [0.01, 0.01, 0.01]}, {"lambda": 0.7, "normalize": True})
    gta("bc-tiny-ntop0", "breadcrumbs", "tiny", [0, 1], [1.0, 1.0], [0.5, 0.6], {"gamma": [0.01, 0.01]}, chunks=2)
    gta("bc-overlap", "breadcrumbs", "v", [0, 1], [0.5, 0.5], [0.3, 0.5], {"gamma": [0.5, 0.7]})
    gta("bc-rescale", "breadcrumbs", "m", [0, 1], [1.0, 0.3], [0.4, 0.2], {"gamma": [0.05, 0.2]},
        {"rescale": True})
    gta("bc-3d", "breadcrumbs", "c", [0, 1, 2], [1.0, 0.5, 0.25], [0.6, 0.3, 1.0], {"gamma": [0.1, 0.0, 0.3]})
    gta("bc-density1", "breadcrumbs", "m", [0], [1.0], [1.0], {"gamma": [0.2]})
    gta("bct-basic", "breadcrumbs_ties", "m", [0, 1, 2], [1.0, 1.0, 1.0], [0.7, 0.7, 0.7], {"gamma": [0.05] * 3})
    gta("bct-norm-rescale", "breadcrumbs_ties", "m", [0, 1, 2], [0.5, 1.0, 2.0], [0.5, 0.8, 0.3],
        {"gamma": [0.1, 0.0, 0.05]}, {"normalize": True, "rescale": True, "lambda": 1.5})
    gta("bct-1d", "breadcrumbs_ties", "v", [0, 1], [1.0, 1.0], [0.4, 0.6], {"gamma": [0.05, 0.05]})

    # della / della_linear (masks shared through the bernoulli patch; whole tensors only)
    gta("della-basic", "della", "m", [0, 1, 2], [1.0, 1.0, 1.0], [0.6, 0.5, 0.4], {"epsilon": [0.1, 0.2, 0.3]},
        chunks=0, della=True)
    gta("della-1d", "della", "v", [0, 1], [1.0, 0.5], [0.5, 0.5], {"epsilon": [0.2, 0.4]}, chunks=0, della=True)
    gta("della-3d-lambda", "della", "c", [0, 1], [1.0, 2.0], [0.7, 0.5], {"epsilon": [0.15, 0.15]},
        {"lambda": 1.1}, chunks=0, della=True)
    gta("della-norescale", "della", "m", [0, 1], [1.0, 1.0], [0.5, 0.3], {"epsilon": [0.1, 0.1]},
        {"rescale": False, "normalize": False}, chunks=0, della=True)
    gta("della-dense", "della", "m", [0, 1], [1.0, 0.5], [1.0, 1.0], {"epsilon": [0.15, 0.15]}, chunks=3)
    gta("della-mixed", "della", "m", [0, 1], [1.0, 0.5], [1.0, 0.5], {"epsilon": [0.15, 0.15]}, chunks=0,
        della=True)
    gta("dellal-basic", "della_linear", "m", [0, 1, 2], [0.5, 0.7, 0.2], [0.5, 0.5, 0.5],
        {"epsilon": [0.15, 0.15, 0.15]}, chunks=0, della=True)
    gta("dellal-norm", "della_linear", "v", [0, 1], [1.0, 3.0], [0.4, 0.6], {"epsilon": [0.1, 0.2]},
        {"normalize": True}, chunks=0, della=True)

    # slerp: base is v0, the model v1
    for key, t in (("m", 0.3), ("m", 0.0), ("m", 1.0), ("v", 0.7), ("c", 0.5)):
        c.append(Case(f"slerp-{key}-{t}", "slerp", f"{key}.base", [f"{key}.raw"], {"t": t}, None, {"t": t}, 3))
    c.append(Case("slerp-close", "slerp", "m.base", ["m.0"], {"t": 0.4}, None, {"t": 0.4}, 3))
    c.append(Case("slerp-colinear", "slerp", "m.base", ["m.twice"], {"t": 0.4}, None, {"t": 0.4}, 3))

    # nuslerp
    def nu(id, base, models, w, flatten=True, row_wise=False):
        params = {"nuslerp_flatten": flatten, "nuslerp_row_wise": row_wise}
        c.append(Case(id, "nuslerp", base, models, params, [{"weight": x} for x in w], dict(params, weight=list(w)), 3))

    nu("nu-base", "m.base", ["m.0", "m.1"], [1.0, 2.0])
    nu("nu-nobase", None, ["m.raw", "m.base"], [0.3, 0.7])
    nu("nu-rows", "m.base", ["m.0", "m.1"], [1.0, 1.0], flatten=False)
    nu("nu-cols", "m.base", ["m.0", "m.1"], [2.0, 1.0], flatten=False, row_wise=True)
    nu("nu-cols-3d", None, ["c.raw", "c.0"], [1.0, 1.0], flatten=False, row_wise=True)
    nu("nu-1d-rows", "v.base", ["v.0", "v.1"], [1.0, 3.0], flatten=False)
    nu("nu-zero-total", "m.base", ["m.0", "m.1"], [1.0, -1.0])

    # multislerp
    def ms(id, base, models, w, **params):
        c.append(Case(id, "multislerp", base, models, dict(params), [{"weight": x} for x in w],
                      dict(params, weight=list(w))))

    ms("ms-nobase", None, ["m.0", "m.1", "m.raw"], [1.0, 2.0, 3.0])
    ms("ms-base", "m.base", ["m.0", "m.1", "m.2"], [1.0, 1.0, 1.0])
    ms("ms-unnormalized", "v.base", ["v.0", "v.1"], [0.3, 0.3], normalize_weights=False)
    ms("ms-one", "m.base", ["m.0"], [1.0])
    ms("ms-antipodal", "m.base", ["m.0", "m.neg"], [1.0, 1.0])

    # karcher (no base role in mergekit: inputs only)
    def ka(id, models, **params):
        c.append(Case(id, "karcher", None, models, dict(params, semantics="mergekit"), None, dict(params)))
        c.append(Case(id + "-paper", "karcher", None, models, dict(params, semantics="paper"), None, dict(params)))
        c.append(Case(id + "-default", "karcher", None, models, dict(params), None, dict(params)))

    ka("ka-3", ["m.0", "m.1", "m.raw"])
    ka("ka-2", ["v.raw", "v.base"])
    ka("ka-iter", ["c.0", "c.raw", "c.base"], max_iter=2, tol=1e-3)
    ka("ka-zero", ["m.0", "m.zero", "m.raw"])

    # model_stock
    def mst(id, base, models, semantics="mergekit", **params):
        ours = dict(params) if semantics is None else dict(params, semantics=semantics)
        c.append(Case(id, "model_stock", base, models, ours, None, dict(params), 3))

    mst("mst-2", "m.base", ["m.0", "m.1"])
    mst("mst-corr", "m.base", ["m.corr0", "m.corr1"])
    mst("mst-corr-paper", "m.base", ["m.corr0", "m.corr1"], semantics="paper")  # 0 < t < 1: no clamp
    mst("mst-3", "m.base", ["m.0", "m.1", "m.2"])
    mst("mst-filter", "m.base", ["m.0", "m.1", "m.2"], filter_wise=True)
    mst("mst-filter-1d", "v.base", ["v.0", "v.1"], filter_wise=True)
    mst("mst-3d", "c.base", ["c.0", "c.1"])
    mst("mst-negative", "m.base", ["m.0", "m.neg", "m.1"])  # c < 0: mergekit's t is negative
    mst("mst-negative-paper", "m.base", ["m.0", "m.neg", "m.1"], semantics="paper")  # the paper's t: no clamp
    mst("mst-negative-default", "m.base", ["m.0", "m.neg", "m.1"], semantics=None)

    # sce
    def sce(id, models, topk, semantics="mergekit", key="m"):
        c.append(Case(id, "sce", f"{key}.base", models, {"select_topk": topk, "semantics": semantics}, None,
                      {"select_topk": topk}, 3))

    sce("sce-all", ["m.0", "m.1", "m.2"], 1.0)
    sce("sce-half", ["m.0", "m.1", "m.2"], 0.5)
    sce("sce-tenth", ["m.0", "m.1"], 0.1)
    sce("sce-none", ["m.0", "m.1"], 0.0)
    sce("sce-3d", ["c.0", "c.1", "c.2"], 0.3, key="c")
    sce("sce-big", ["m.big", "m.big2", "m.big3"], 0.5)
    sce("sce-big-paper-all", ["m.big", "m.big2", "m.big3"], 1.0, semantics="paper")  # same as mergekit at 1.0

    # nearswap, arcee_fusion
    for t in (0.0, 0.05, 1.0):
        c.append(Case(f"nearswap-{t}", "nearswap", "m.base", ["m.0"], {"t": t}, None, {"t": t}, 3))
    for key in ("m", "v", "c"):
        c.append(Case(f"fusion-{key}", "arcee_fusion", f"{key}.base", [f"{key}.0"]))
    c.append(Case("fusion-raw", "arcee_fusion", "m.base", ["m.raw"]))
    return c


CASES = _cases()


def _ours(case: Case, t: dict, chunks: int = 1) -> torch.Tensor:
    base = None if case.base is None else t[case.base]
    return run(case.method, base, [t[k] for k in case.models], case.params, case.model_params,
               chunks=chunks, name=case.id, seed=1234)


def _uniforms(case: Case, t: dict) -> List[torch.Tensor]:
    """The uniform numbers mergelab's DELLA draws for each pruning model of ``case`` (whole tensor)."""
    from mergelab.methods.della import _PURPOSE

    base = t[case.base]
    models = [t[k] for k in case.models]
    x = inputs(case.method, base, models, case.params, case.model_params, name=case.id, seed=1234)
    return [x.rand(i, _PURPOSE) for i, p in enumerate(x.model_params) if 0 < p["density"] < 1]


@pytest.fixture(scope="module")
def mergekit_results(tmp_path_factory):
    t = _tensors()
    spec_cases = []
    extra = {}
    for case in CASES:
        keys = ([case.base] if case.base else []) + case.models
        entry = {"id": case.id, "name": case.id, "method": case.method, "tensors": keys,
                 "parameters": case.mk_params, "base_index": 0 if case.base else None}
        if case.della:
            names = []
            for j, u in enumerate(_uniforms(case, t)):
                extra[f"{case.id}.u{j}"] = u.contiguous()
                names.append(f"{case.id}.u{j}")
            entry["bernoulli"] = names
        spec_cases.append(entry)
    return t, merge_tensors({**t, **extra}, spec_cases, tmp_path_factory.mktemp("mergekit_family"))


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_matches_mergekit(case, mergekit_results):
    t, out = mergekit_results
    expected = out[case.id]
    ours = _ours(case, t)
    assert ours.shape == expected.shape
    assert ulp_diff(ours, expected) <= 1, f"{case.id}: differs from mergekit by {ulp_diff(ours, expected)} ulp"


CHUNKED = [c for c in CASES if c.chunks > 1]


@pytest.mark.parametrize("case", CHUNKED, ids=[c.id for c in CHUNKED])
def test_matches_mergekit_in_row_chunks(case, mergekit_results):
    t, out = mergekit_results
    expected = out[case.id]
    ours = _ours(case, t, chunks=case.chunks)
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(ours, expected, rtol=4e-7, atol=4e-7 * scale)
