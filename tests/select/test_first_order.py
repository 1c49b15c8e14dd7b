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
    ens = select_sources(est, config=SelectConfig(num_subsets=200))
    assert set(ALIGNED) <= set(ens.selected)
    assert torch.isfinite(torch.tensor(list(ens.scores.values()))).all()


def test_forward_top_k_follows_the_greedy_path(est):
    sel = select_sources(est, method="forward", config=SelectConfig(top_k=3))
    assert set(sel.selected) == set(sel.info["path"][:3])
    assert sel.info["path_losses"] == [sel.scores[s] for s in sel.info["path"]]
