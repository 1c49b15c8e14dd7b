"""Baselines: gradient similarity, representation similarity, random."""

from __future__ import annotations

import pytest

from hf_subset_select import (
    FirstOrderEstimator,
    gradient_similarity_selection,
    random_selection,
    representation_similarity_selection,
)
from hf_subset_select.demo.synthetic import make_synthetic_cache


@pytest.fixture(scope="module")
def cache():
    return make_synthetic_cache(2, 2, 2, dim=16, examples_per_source=32, seed=0)


def test_gradient_similarity_signs_and_default_rule(cache):
    sel = gradient_similarity_selection(cache)
    assert sel.method == "gradient_similarity"
    assert all(sel.scores[f"aligned_{i}"] > 0.2 for i in range(2))
    assert all(sel.scores[f"opposed_{i}"] < -0.2 for i in range(2))
    assert abs(sel.scores["orthogonal_0"]) < 0.2
    assert {"aligned_0", "aligned_1"} <= set(sel.selected)
    assert not {"opposed_0", "opposed_1"} & set(sel.selected)
    assert "target_train" not in sel.sources and sel.target_source == "target_train"
    assert sel.manifest["cache_fingerprint"] == cache.fingerprint()


def test_gradient_similarity_matches_direct_computation(cache):
    import torch

    sel = gradient_similarity_selection(cache, include_target_train=False)
    assert "target_train" in sel.sources
    g = cache.features.double()
    unit = g / g.norm(dim=1, keepdim=True)
    rows = cache.train_mask & (cache.source_index == cache.source_id("opposed_1"))
    direct = (unit[rows] @ unit[cache.target_mask].T).mean()
    assert sel.scores["opposed_1"] == pytest.approx(float(direct), rel=1e-9)
    thr = gradient_similarity_selection(cache, threshold=0.0)
    assert sorted(thr.selected) == sorted(s for s, v in thr.scores.items() if v > 0.0)
    assert torch.isfinite(torch.tensor(list(thr.weights.values()))).all()


def test_representation_similarity(cache):
    est = FirstOrderEstimator(cache)
    sel = representation_similarity_selection(est, top_k=2)
    assert sorted(sel.selected) == ["aligned_0", "aligned_1"]
    assert sel.sources == est.sources


def test_representation_similarity_needs_representations():
    bare = make_synthetic_cache(dim=8, representation_dim=None, seed=1)
    with pytest.raises(ValueError, match="no representations.*representations=True"):
        representation_similarity_selection(bare)


def test_random_selection(cache):
    a = random_selection(cache, k=3, seed=5)
    b = random_selection(cache, k=3, seed=5)
    c = random_selection(cache, k=3, seed=6)
    assert a.selected == b.selected and len(a.selected) == 3
    assert a.scores != c.scores
    assert len(random_selection(cache, ratio=0.5).selected) == 3
    with pytest.raises(ValueError, match="k must lie"):
        random_selection(cache, k=0)


def test_baselines_need_a_target_split(cache):
    with pytest.raises(ValueError, match="no target split"):
        gradient_similarity_selection(cache.take(cache.train_mask))
    with pytest.raises(TypeError, match="GradientCache or a FirstOrderEstimator"):
        random_selection("not a cache")
