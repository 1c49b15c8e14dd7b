"""Our selectors (random_ensemble, linear, forward) through select_sources: the right sources win, weights,
threshold, bad input."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, SelectConfig, select_sources
from hf_subset_select.demo.synthetic import make_synthetic_cache

ALIGNED = ["aligned_0", "aligned_1"]
OPPOSED = ["opposed_0", "opposed_1"]


@pytest.mark.parametrize("method", ["random_ensemble", "linear", "forward"])
def test_aligned_sources_win_with_every_method(est, method):
    top = select_sources(est, method=method, config=SelectConfig(num_subsets=300, top_k=2))
    assert sorted(top.selected) == ALIGNED
    default = select_sources(est, method=method, config=SelectConfig(num_subsets=300))
    assert default.method == method
    assert not set(default.selected) & set(OPPOSED)
    if method == "forward":  # the best prefix of the greedy path: helpful sources only
        assert default.selected and set(default.selected) <= set(ALIGNED)
        assert set(default.info["path"][:2]) == set(ALIGNED)
    else:
        assert set(ALIGNED) <= set(default.selected)
        # helpful sources lower the estimated loss, harmful ones raise it
        assert all(default.info["effects"][s] < 0 for s in ALIGNED)
        assert all(default.info["effects"][s] > 0 for s in OPPOSED)
    # ranking: aligned best, opposed worst
    assert set(default.ranking[:2]) == set(ALIGNED) and set(default.ranking[-2:]) == set(OPPOSED)


def test_method_comes_from_the_config_unless_given(est):
    cfg = SelectConfig(method="linear", num_subsets=100)
    assert select_sources(est, config=cfg).method == "linear"
    assert select_sources(est, method="random_ensemble", config=cfg).method == "random_ensemble"
    sel = select_sources(est, method="random_ensemble", config=cfg)
    assert sel.manifest["select_config"]["method"] == "random_ensemble"
    assert sel.manifest["estimator_config"] == est.config.to_dict()


def test_weights_and_threshold(est):
    sel = select_sources(est, config=SelectConfig(num_subsets=300, temperature=0.5))
    kept = [sel.weights[s] for s in sel.selected]
    assert sum(kept) / len(kept) == pytest.approx(1.0)
    assert all(sel.weights[s] == 0.0 for s in sel.dropped)
    # a better (lower) score gets a larger weight
    best, worst_kept = sel.ranking[0], [s for s in sel.ranking if s in sel.selected][-1]
    assert sel.weights[best] >= sel.weights[worst_kept]
    cut = sorted(sel.scores.values())[3]
    thr = select_sources(est, config=SelectConfig(num_subsets=300, threshold=cut))
    assert sorted(thr.selected) == sorted(s for s, v in thr.scores.items() if v < cut)


def test_bad_selection_input(est):
    with pytest.raises(ValueError, match="top_k"):
        select_sources(est, config=SelectConfig(top_k=len(est.sources) + 1, num_subsets=50))
    with pytest.raises(ValueError, match="raise num_subsets"):
        select_sources(est, config=SelectConfig(num_subsets=1))
    with pytest.raises(ValueError, match="method"):
        select_sources(est, method="backward")
    with pytest.raises(ValueError, match="method"):
        SelectConfig(method="backward")
    cfg = SelectConfig(num_subsets=100, seed=3)
    a = select_sources(est, config=cfg)
    b = select_sources(est, config=cfg)
    assert a.scores == b.scores  # seeded


def test_no_target_source_cache_forward_starts_empty():
    cache = make_synthetic_cache(2, 2, 0, dim=16, target_train_examples=0, seed=2)
    est = FirstOrderEstimator(cache, EstimatorConfig())
    sel = select_sources(est, method="forward")
    assert sel.target_source is None
    assert sel.selected and set(sel.selected) <= set(ALIGNED)
    careful = select_sources(est, method="forward", config=SelectConfig(confidence=1.64))
    assert (
        careful.info["path"][0] == sel.info["path"][0]
    )  # the first step: the best estimate, nothing to test
    assert careful.selected and set(careful.selected) <= set(ALIGNED)
    ens = select_sources(est, config=SelectConfig(num_subsets=200))
    assert set(ALIGNED) <= set(ens.selected)
    assert torch.isfinite(torch.tensor(list(ens.scores.values()))).all()


def test_forward_top_k_follows_the_greedy_path(est):
    sel = select_sources(est, method="forward", config=SelectConfig(top_k=3))
    assert set(sel.selected) == set(sel.info["path"][:3])
    assert sel.info["path_losses"] == [sel.scores[s] for s in sel.info["path"]]


class RowEstimator:
    """A stand-in estimator whose per-row target losses are additive in the sources: source ``s`` changes row
    ``i``'s loss by ``effects[s][i]`` (base loss 1 per row, the target forced into every subset)."""

    forced_source = "target"

    def __init__(self, effects: dict[str, list[float]]) -> None:
        self.sources = list(effects)
        self.effects = torch.tensor([effects[s] for s in self.sources], dtype=torch.float64)

    def estimate(self, subsets, details=False):
        if not isinstance(subsets, torch.Tensor):
            subsets = torch.tensor([[s in sub for s in self.sources] for sub in subsets])
        rows = 1.0 + subsets.to(torch.float64) @ self.effects
        if not details:
            return rows.mean(1)
        return type("Estimate", (), {"loss": rows.mean(1), "per_example": rows})()

    # what FirstOrderSelector.estimator_info reads
    resolved_l2 = staticmethod(lambda: 1.0)
    l2_rule, step_scale, base_loss = "fixed", 1.0, 1.0
    config = type("Config", (), {"solver": "exact"})()


@pytest.mark.parametrize("method", ["random_ensemble", "linear", "forward"])
def test_confidence_drops_gains_carried_by_few_rows(method):
    from hf_subset_select.select.registry import get_selector

    rows = 40
    few = [-4.0] + [0.01] * (rows - 1)  # a large mean gain (-0.09) from one row, slightly worse on the others
    broad = [-0.05 + 0.01 * (i % 3 - 1) for i in range(rows)]  # a smaller gain that holds on every row
    harmful = [0.05] * rows
    stub = RowEstimator({"few_rows": few, "broad": broad, "harmful": harmful})
    selector = get_selector(method)
    plain = selector.score(stub, stub.sources, SelectConfig(method=method, num_subsets=400))
    assert set(plain.default_keep) == {"few_rows", "broad"}
    careful = selector.score(
        stub, stub.sources, SelectConfig(method=method, num_subsets=400, confidence=1.64)
    )
    assert careful.default_keep == ["broad"]
    # no source passes an extreme bar: the answer is the target's own data alone
    none = selector.score(stub, stub.sources, SelectConfig(method=method, num_subsets=400, confidence=1e6))
    assert none.default_keep == [] and none.info["confidence"] == 1e6


def test_confidence_standard_errors_are_over_target_rows(est):
    sel = select_sources(est, config=SelectConfig(num_subsets=300, confidence=1.64))
    se = sel.info["effect_standard_errors"]
    assert set(se) == set(est.sources) and all(v > 0 for v in se.values())
    # kept sources are those whose effect stays below zero by 1.64 standard errors
    assert sel.selected == [s for s in est.sources if sel.info["effects"][s] + 1.64 * se[s] < 0]
    assert set(ALIGNED) <= set(sel.selected) and not set(OPPOSED) & set(sel.selected)
    fwd = select_sources(est, method="forward", config=SelectConfig(confidence=1.64))
    assert len(fwd.info["step_upper_bounds"]) == len(est.sources)
    assert fwd.selected and set(fwd.selected) <= set(ALIGNED)


def test_confidence_must_be_a_nonnegative_number():
    for bad in (-1.0, float("inf"), "high"):
        with pytest.raises(ValueError, match="confidence"):
            SelectConfig(confidence=bad)
    assert SelectConfig.from_dict(SelectConfig(confidence=1.0).to_dict()).confidence == 1.0
