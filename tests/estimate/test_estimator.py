"""FirstOrderEstimator: the composed estimate, its detailed result, its config, injected solvers and λ policies."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.estimator import AUTO_REDUCE_DIM, Estimate
from hf_subset_select.estimate.solvers import FastSolver, Solver


def test_details_per_example_and_per_source():
    cache = make_synthetic_cache(dim=16, seed=6)
    est = FirstOrderEstimator(cache)
    out = est.estimate([["aligned_0"], ["opposed_0"]], details=True)
    assert out.per_example.shape == (2, est.num_target)
    assert torch.allclose(out.per_example.mean(1), out.loss)
    assert torch.allclose(out.per_target_source["target_eval"], out.loss)
    assert out.weights.shape == (2, 16)
    assert out.subsets == [["aligned_0"], ["opposed_0"]]
    per = est.per_source_loss()
    assert set(per) == set(est.sources)
    assert per["aligned_0"] < est.base_loss < per["opposed_0"]


def test_config_validation_and_settings_only_through_the_config():
    with pytest.raises(ValueError, match="solver"):
        EstimatorConfig(solver="newton")
    with pytest.raises(ValueError, match="reduction"):
        EstimatorConfig(reduction="max")
    cfg = EstimatorConfig(l2=0.3)
    est = FirstOrderEstimator(make_synthetic_cache(dim=8, seed=14), dataclasses.replace(cfg, solver="exact"))
    assert est.config.l2 == 0.3 and est.config.solver == "exact"
    assert "FirstOrderEstimator(" in repr(est)
    # field overrides as keyword arguments are gone: the config is the one place for settings
    with pytest.raises(TypeError):
        FirstOrderEstimator(make_synthetic_cache(dim=8, seed=14), l2=0.3)
    with pytest.raises(TypeError, match="Solver instance.*EstimatorConfig\\(solver="):
        FirstOrderEstimator(make_synthetic_cache(dim=8, seed=14), cfg, solver="exact")
    with pytest.raises(TypeError, match="EstimatorConfig"):
        FirstOrderEstimator(make_synthetic_cache(dim=8, seed=14), {"l2": 0.3})
    assert AUTO_REDUCE_DIM == 256 and isinstance(est.estimate([["aligned_0"]], details=True), Estimate)


class _CountingFast(Solver):
    """The fast solver with a larger step, counting its calls."""

    name = "counting"

    def __init__(self):
        self.calls = 0

    def solve(self, problem, m, l2, *, want_w):
        self.calls += 1
        dz, w, _ = FastSolver().solve(problem, m, l2, want_w=want_w)
        return 2.0 * dz, (None if w is None else 2.0 * w), {"solver": self.name, "calls": self.calls}


def test_an_injected_solver_is_used():
    cache = make_synthetic_cache(dim=8, seed=19)
    config = EstimatorConfig(l2=0.4, chunk_size=2)
    plain = FirstOrderEstimator(cache, config)
    solver = _CountingFast()
    est = FirstOrderEstimator(cache, config, solver=solver)
    subsets = [["aligned_0"], ["opposed_0"], ["aligned_1", "orthogonal_0"]]
    # twice the step: the same loss as the plain estimator at step scale 2
    plain.step_scale = 2.0
    assert torch.allclose(est.estimate(subsets), plain.estimate(subsets))
    assert solver.calls == 2  # two chunks of at most 2 subsets
    assert est.last_solve_info == {"solver": "counting", "calls": 2}
    assert torch.allclose(est.fitted_steps(subsets[:1]), plain.fitted_steps(subsets[:1]))
    assert "solver='counting'" in repr(est)
    # a registered name for one call still wins over the injected solver
    before = solver.calls
    est.estimate(subsets, solver="fast")
    assert solver.calls == before
