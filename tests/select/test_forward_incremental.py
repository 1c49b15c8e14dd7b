"""Greedy forward selection's incremental sums (base statistics once per step, each candidate added) give the
same estimates and the same path as solving every candidate subset from its membership matrix."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, SelectConfig
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.solvers import FastSolver
from hf_subset_select.select.first_order import ForwardSelector


class _PlainFast(FastSolver):
    """The fast solver with an overridden solve(): forward selection falls back to whole membership matrices."""

    def solve(self, problem, m, l2, *, want_w):
        return super().solve(problem, m, l2, want_w=want_w)


@pytest.mark.parametrize(
    "settings",
    [
        {"reduce_dim": 12},
        {"reduce_dim": None, "reduction": "sum"},
        {"reduce_dim": 12, "include_target_train": False, "num_threads": 2, "chunk_size": 3},
    ],
)
def test_solve_extensions_equals_solve_on_the_membership_matrix(settings):
    cache = make_synthetic_cache(3, 3, 3, dim=40, examples_per_source=30, seed=6)
    est = FirstOrderEstimator(cache, EstimatorConfig(l2=0.03, **settings))
    p = est.problem
    n = len(p.order)
    base = torch.zeros(n, dtype=torch.float64)
    base[[0, 4]] = 1.0
    if p.forced_source is not None:
        base[-1] = 1.0
    cand = torch.tensor([1, 2, 5, 7])
    m = base.expand(4, -1).clone()
    m[torch.arange(4), cand] = 1.0
    fast = FastSolver()
    got = fast.solve_extensions(p, base, cand, 0.03)
    want, _, _ = fast.solve(p, m, 0.03, want_w=False)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(got[0], got[1], rtol=1e-3)  # the candidates differ


@pytest.mark.parametrize("confidence", [None, 1.0])
def test_forward_path_is_the_same_with_and_without_the_incremental_sums(confidence):
    cache = make_synthetic_cache(4, 4, 4, dim=48, examples_per_source=40, seed=8)
    cfg = EstimatorConfig(reduce_dim=16, num_threads=2, chunk_size=5)
    fast = FirstOrderEstimator(cache, cfg)
    plain = FirstOrderEstimator(cache, cfg, solver=_PlainFast())
    sel = SelectConfig(method="forward", confidence=confidence)
    a = ForwardSelector().score(fast, fast.sources, sel)
    b = ForwardSelector().score(plain, plain.sources, sel)
    assert a.order == b.order and a.default_keep == b.default_keep
    assert torch.allclose(a.scores, b.scores, rtol=1e-5)
    assert a.info["path_losses"] == pytest.approx(b.info["path_losses"], rel=1e-5)
