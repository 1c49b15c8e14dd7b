"""The linearized problem: candidate and forced sources, membership parsing, cache checks, bad input."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, GradientCacheError
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.problem import LinearizedProblem


def test_subsets_as_names_or_matrix_and_forced_target_source():
    cache = make_synthetic_cache(dim=16, seed=5)
    est = FirstOrderEstimator(cache)
    assert est.forced_source == "target_train" and "target_train" not in est.sources
    names = [["aligned_0", "opposed_1"], ["orthogonal_0"]]
    m = torch.zeros(2, len(est.sources), dtype=torch.bool)
    m[0, est.sources.index("aligned_0")] = m[0, est.sources.index("opposed_1")] = True
    m[1, est.sources.index("orthogonal_0")] = True
    assert torch.allclose(est.estimate(names), est.estimate(m))
    # naming the forced target source changes nothing; the empty subset means "target alone"
    assert torch.allclose(est.estimate([["orthogonal_0", "target_train"]]), est.estimate([["orthogonal_0"]]))
    assert est.estimate([[]]).shape == (1,)
    # switching the option off makes the target source an ordinary candidate
    free = FirstOrderEstimator(cache, EstimatorConfig(include_target_train=False, l2=est.resolved_l2()))
    assert "target_train" in free.sources and free.forced_source is None
    assert torch.allclose(
        free.estimate([["orthogonal_0", "target_train"]]), est.estimate([["orthogonal_0"]]), rtol=1e-5
    )
    assert not torch.allclose(free.estimate([["orthogonal_0"]]), est.estimate([["orthogonal_0"]]), rtol=1e-3)


def test_membership_and_statistics_of_the_problem():
    cache = make_synthetic_cache(dim=8, seed=18)
    problem = LinearizedProblem(cache, EstimatorConfig())
    m = problem.membership([["aligned_0", "opposed_1"]])
    assert m.shape == (1, len(problem.sources) + 1) and m[0, -1] == 1.0  # the forced column
    assert problem.names(m) == [["aligned_0", "opposed_1"]]
    assert problem.order[-1] == "target_train"
    assert int(problem.counts.sum()) == int(cache.train_mask.sum())
    assert torch.allclose(problem.scale(m), 1.0 / (m @ problem.counts))
    # the per-source gradient sums are the rows' -σ(-f_i) g_i added up by source
    st = problem.statistics()
    j = problem.sources.index("aligned_0")
    rows = problem.row_source == j
    expected = -(torch.sigmoid(-problem.outputs[rows])[:, None] * problem.features[rows].double()).sum(0)
    assert torch.allclose(st.grad[j], expected)
    assert st.basis is None and st.rank == 8
    assert problem.statistics() is st  # computed once
    with pytest.raises(TypeError, match="GradientCache.load"):
        LinearizedProblem("grad_cache", EstimatorConfig())


# ---------------------------------------------------------------------- bad input
def test_empty_subset_error():
    cache = make_synthetic_cache(dim=8, target_train_examples=0, seed=9)
    est = FirstOrderEstimator(cache)
    with pytest.raises(ValueError, match="empty.*Add at least one source"):
        est.estimate([["aligned_0"], []])
    with pytest.raises(ValueError, match="empty"):
        est.estimate(torch.zeros(1, len(est.sources), dtype=torch.bool))


def test_unknown_source_error():
    est = FirstOrderEstimator(make_synthetic_cache(dim=8, seed=10))
    with pytest.raises(ValueError, match="Unknown source 'nope'.*aligned_0"):
        est.estimate([["aligned_0", "nope"]])
    with pytest.raises(TypeError, match="list of subsets"):
        est.estimate(["aligned_0", "opposed_0"])


def test_no_target_split_error():
    cache = make_synthetic_cache(dim=8, seed=11)
    train_only = cache.take(cache.train_mask)
    with pytest.raises(ValueError, match="no target split.*target_dataset"):
        FirstOrderEstimator(train_only)


def test_dimension_mismatch_errors():
    cache = make_synthetic_cache(dim=8, seed=12)
    est = FirstOrderEstimator(cache)
    with pytest.raises(ValueError, match="Dimension mismatch.*one column per candidate"):
        est.estimate(torch.ones(2, len(est.sources) + 1, dtype=torch.bool))
    other = make_synthetic_cache(dim=12, seed=12)
    with pytest.raises(ValueError, match="Dimension mismatch.*train_cache="):
        FirstOrderEstimator(cache, target=other)


def test_target_cache_in_another_geometry_is_refused():
    cache = make_synthetic_cache(dim=8, seed=12)
    same = make_synthetic_cache(dim=8, seed=12)
    FirstOrderEstimator(cache, target=same)  # both raw gradients: fine
    same.manifest["precondition"] = {"kind": "adam", "sha256": "0" * 64, "step": 3}
    with pytest.raises(
        ValueError, match="scaled their gradients differently.*reuses its stored preconditioner"
    ):
        FirstOrderEstimator(cache, target=same)


def test_target_cache_with_another_projection_is_refused():
    cache = make_synthetic_cache(dim=8, seed=12)
    other = make_synthetic_cache(dim=8, seed=12)
    cache.manifest["projection"] = {"kind": "rademacher", "dim": 8, "seed": 0}
    other.manifest["projection"] = {"kind": "rademacher", "dim": 8, "seed": 1}
    with pytest.raises(
        ValueError, match="'projection.seed': training cache 0, the target cache 1.*Fix: collect with"
    ):
        FirstOrderEstimator(cache, target=other)


def test_nan_errors():
    cache = make_synthetic_cache(dim=8, seed=13)
    cache.features[3, 2] = float("nan")
    with pytest.raises(GradientCacheError, match="NaN.*Re-collect"):
        FirstOrderEstimator(cache)
    good = make_synthetic_cache(dim=8, seed=13)
    est = FirstOrderEstimator(good)
    m = torch.ones(1, len(est.sources))
    m[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        est.estimate(m)


def test_randomized_basis_captures_the_exact_principal_subspace(monkeypatch):
    """Above RANDOMIZED_BASIS_MIN_DIM the basis comes from randomized subspace iteration: it must keep the curvature
    energy of the exact top-r eigenvectors and give the same estimates (here forced on at d = 256, r = 32)."""
    from hf_subset_select.estimate import problem as problem_mod

    cache = make_synthetic_cache(3, 3, 3, dim=256, examples_per_source=300, num_strong_directions=24,
                                 spectrum_decay=0.7, seed=2)  # fmt: skip
    cfg = EstimatorConfig(reduce_dim=32, l2=1e-3)
    exact = FirstOrderEstimator(cache, cfg)
    monkeypatch.setattr(problem_mod, "RANDOMIZED_BASIS_MIN_DIM", 64)
    fast = FirstOrderEstimator(cache, cfg)
    b_exact, b_rand = exact.problem.statistics().basis, fast.problem.statistics().basis
    assert b_rand.shape == b_exact.shape == (256, 32)
    assert torch.allclose(b_rand.T @ b_rand, torch.eye(32, dtype=b_rand.dtype), atol=1e-8)
    prob = exact.problem
    f = prob.outputs
    w = torch.sigmoid(f) * torch.sigmoid(-f) / prob.counts[prob.row_source]
    x = prob.features.double() * w.sqrt()[:, None]
    energy = [float(((x @ b) ** 2).sum()) for b in (b_exact, b_rand)]
    assert energy[1] >= 0.99 * energy[0]
    # the exact eigenvectors are optimal: more energy than theirs would mean a bug in the check itself
    assert energy[1] <= energy[0] * (1 + 1e-9)
    m = torch.rand(64, len(exact.sources), generator=torch.Generator().manual_seed(0)) < 0.5
    a, b = exact.estimate(m), fast.estimate(m)
    spread = (a - exact.base_loss).abs().mean()
    assert (a - b).abs().max() < 0.01 * spread
    # below the threshold (the default for d < 4096) the exact path runs

    def refuse(*args, **kwargs):
        raise AssertionError("the randomized basis ran below its threshold")

    monkeypatch.setattr(problem_mod, "RANDOMIZED_BASIS_MIN_DIM", 4096)
    monkeypatch.setattr(problem_mod.LinearizedProblem, "_randomized_basis", refuse)
    assert FirstOrderEstimator(cache, cfg).problem.statistics().basis.shape == (256, 32)
