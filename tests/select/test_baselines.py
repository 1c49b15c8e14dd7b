"""Baselines: gradient similarity, representation similarity, random; on a cache and through select_sources."""

from __future__ import annotations

import pytest

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, SelectConfig, select_sources
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.select.baselines import (
    gradient_similarity_selection,
    random_selection,
    representation_similarity_selection,
)

ALIGNED = ["aligned_0", "aligned_1"]


@pytest.fixture(scope="module")
def small_cache():
    return make_synthetic_cache(2, 2, 2, dim=16, examples_per_source=32, seed=0)


def test_gradient_similarity_signs_and_default_rule(small_cache):
    sel = gradient_similarity_selection(small_cache)
    assert sel.method == "gradient_similarity"
    assert all(sel.scores[f"aligned_{i}"] > 0.2 for i in range(2))
    assert all(sel.scores[f"opposed_{i}"] < -0.2 for i in range(2))
    assert abs(sel.scores["orthogonal_0"]) < 0.2
    assert {"aligned_0", "aligned_1"} <= set(sel.selected)
    assert not {"opposed_0", "opposed_1"} & set(sel.selected)
    assert "target_train" not in sel.sources and sel.target_source == "target_train"
    assert sel.manifest["cache_fingerprint"] == small_cache.fingerprint()


def test_gradient_similarity_matches_direct_computation(small_cache):
    import torch

    sel = gradient_similarity_selection(small_cache, include_target_train=False)
    assert "target_train" in sel.sources
    g = small_cache.features.double()
    unit = g / g.norm(dim=1, keepdim=True)
    rows = small_cache.train_mask & (small_cache.source_index == small_cache.source_id("opposed_1"))
    direct = (unit[rows] @ unit[small_cache.target_mask].T).mean()
    assert sel.scores["opposed_1"] == pytest.approx(float(direct), rel=1e-9)
    thr = gradient_similarity_selection(small_cache, threshold=0.0)
    assert sorted(thr.selected) == sorted(s for s, v in thr.scores.items() if v > 0.0)
    assert torch.isfinite(torch.tensor(list(thr.weights.values()))).all()


def test_representation_similarity(small_cache):
    est = FirstOrderEstimator(small_cache, EstimatorConfig())
    sel = representation_similarity_selection(est, top_k=2)
    assert sorted(sel.selected) == ["aligned_0", "aligned_1"]
    assert sel.sources == est.sources


def test_representation_similarity_needs_representations():
    bare = make_synthetic_cache(dim=8, representation_dim=None, seed=1)
    with pytest.raises(ValueError, match="no representations.*representations=True"):
        representation_similarity_selection(bare)


def test_random_selection(small_cache):
    a = random_selection(small_cache, k=3, seed=5)
    b = random_selection(small_cache, k=3, seed=5)
    c = random_selection(small_cache, k=3, seed=6)
    assert a.selected == b.selected and len(a.selected) == 3
    assert a.scores != c.scores
    assert len(random_selection(small_cache, ratio=0.5).selected) == 3
    with pytest.raises(ValueError, match="k must lie"):
        random_selection(small_cache, k=0)


def test_baselines_need_a_target_split(small_cache):
    with pytest.raises(ValueError, match="no target split"):
        gradient_similarity_selection(small_cache.take(small_cache.train_mask))
    with pytest.raises(TypeError, match="GradientCache or a FirstOrderEstimator"):
        random_selection("not a cache")


@pytest.mark.parametrize("make", [gradient_similarity_selection, representation_similarity_selection])
def test_baselines_pick_aligned_too(cache, make):
    sel = make(cache, top_k=2)
    assert sorted(sel.selected) == ALIGNED
    assert not sel.lower_is_better


@pytest.mark.parametrize(
    ("method", "make", "kwargs"),
    [
        ("gradient_similarity", gradient_similarity_selection, {}),
        ("representation_similarity", representation_similarity_selection, {"threshold": 0.1}),
        ("random", random_selection, {"seed": 4}),
    ],
)
def test_functions_equal_select_sources(est, method, make, kwargs):
    via_function = make(est, **kwargs)
    config = SelectConfig(method=method, **kwargs)  # random: keeps round(0.5 x candidates) by default, too
    via_registry = select_sources(est, config=config)
    assert via_registry.selected == via_function.selected
    assert via_registry.scores == via_function.scores
    assert via_registry.weights == via_function.weights


def test_random_default_keeps_subset_ratio_of_the_candidates(est):
    sel = select_sources(est, method="random", config=SelectConfig(subset_ratio=0.34, seed=2))
    assert len(sel.selected) == 2 and sel.info == {"seed": 2, "k": 2}
