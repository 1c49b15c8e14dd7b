"""Fixtures shared by the select tests: a synthetic cache with aligned (helpful), opposed (harmful) and
orthogonal sources, and its estimator."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def cache():
    from hf_subset_select.demo.synthetic import make_synthetic_cache

    return make_synthetic_cache(2, 2, 2, dim=24, examples_per_source=48, seed=0)


@pytest.fixture(scope="module")
def est(cache):
    from hf_subset_select import EstimatorConfig, FirstOrderEstimator

    return FirstOrderEstimator(cache, EstimatorConfig())
