"""Confidence intervals: coverage of the nominal 95% on a synthetic cache with a known answer, the selection option
that requires an interval to exclude "no effect", and the seed ensemble."""

from __future__ import annotations

import itertools

import pytest
import torch

from hf_subset_select import FirstOrderEstimator, SelectConfig, select_sources
from hf_subset_select.config import ConfigError
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.uncertainty import (
    combine_seeds,
    effect_intervals,
    percentile_interval,
    subset_intervals,
)

pytestmark = pytest.mark.usefixtures("one_thread")

K = 5  # candidate sources (the target's own training source is in every subset)


@pytest.fixture(scope="module")
def population():
    """Every subset's estimated loss on a large population of target rows: the known answer."""
    cache = make_synthetic_cache(2, 2, 1, dim=16, examples_per_source=64, target_examples=4000, seed=3)
    est = FirstOrderEstimator(cache)
    allm = torch.tensor(list(itertools.product([0, 1], repeat=K)), dtype=torch.float64)
    rows = est.estimate(allm, details=True).per_example.to(torch.float64)
    return allm, rows


def _truth_effects(allm, rows):
    """Effects under the subset distribution (each source in with probability 1/2: all 32 subsets equally likely)
    on the whole population of target rows."""
    loss = rows.mean(1)
    return allm.T @ loss / allm.sum(0) - (1 - allm).T @ loss / (1 - allm).sum(0)


def _trial(allm, rows, trial, num_subsets, num_rows):
    gen = torch.Generator().manual_seed(1000 + trial)
    m = (torch.rand(num_subsets, K, generator=gen) < 0.5).to(torch.float64)
    index = (m * 2 ** torch.arange(K - 1, -1, -1, dtype=torch.float64)).sum(1).long()
    sample = torch.randint(0, rows.shape[1], (num_rows,), generator=gen)
    return m, rows[index][:, sample]


@pytest.mark.parametrize("num_subsets, num_rows", [(32, 20), (64, 50)])
def test_effect_intervals_cover_the_truth_at_the_nominal_level(population, num_subsets, num_rows):
    allm, rows = population
    truth = _truth_effects(allm, rows)
    covered = total = 0
    for trial in range(200):
        m, sample = _trial(allm, rows, trial, num_subsets, num_rows)
        iv = effect_intervals(m, sample, statistic="effect", samples=500, seed=trial)
        covered += int(((iv.lower <= truth) & (truth <= iv.upper)).sum())
        total += K
    assert 0.90 <= covered / total <= 0.99


def test_subset_intervals_cover_the_population_loss(population):
    allm, rows = population
    truth = rows.mean(1)
    covered = total = 0
    for trial in range(200):
        gen = torch.Generator().manual_seed(trial)
        sample = rows[:, torch.randint(0, rows.shape[1], (20,), generator=gen)]
        iv = subset_intervals(sample, samples=500, seed=trial)
        covered += int(((iv.lower <= truth) & (truth <= iv.upper)).sum())
        total += truth.numel()
    assert 0.90 <= covered / total <= 0.99


def test_the_naive_percentile_interval_undercovers_with_few_rows(population):
    """Why the intervals are studentized: with 12 target rows the percentile interval of the mean covers less."""
    allm, rows = population
    truth = rows.mean(1)
    naive = studentized = 0
    for trial in range(200):
        gen = torch.Generator().manual_seed(trial)
        sample = rows[:, torch.randint(0, rows.shape[1], (12,), generator=gen)]
        iv = subset_intervals(sample, samples=500, seed=trial)
        w = torch.distributions.Multinomial(12, torch.ones(12)).sample((500,)).to(torch.float64) / 12
        plain = percentile_interval(sample.mean(1), w @ sample.T, 0.95)
        studentized += int(((iv.lower <= truth) & (truth <= iv.upper)).sum())
        naive += int(((plain.lower <= truth) & (truth <= plain.upper)).sum())
    assert naive < studentized


def test_selection_intervals_and_require_significant():
    cache = make_synthetic_cache(2, 2, 2, dim=16, target_examples=40, seed=1)
    est = FirstOrderEstimator(cache)
    for method in ("random_ensemble", "linear", "forward"):
        config = SelectConfig(method=method, num_subsets=200, interval_level=0.95, require_significant=True)
        sel = select_sources(est, config=config)
        intervals = sel.info["intervals"]
        assert set(intervals["scores"]) == set(sel.sources)
        for s in sel.selected:
            assert intervals["effects"][s][1] < 0  # the kept sources' effect intervals exclude "no effect"
        assert set(sel.selected) <= set(intervals["significant"])
        assert all(s.startswith("aligned") for s in sel.selected)
        for s, (lo, hi) in intervals["scores"].items():
            assert lo <= sel.scores[s] <= hi
    # the ensemble's intervals are effect_intervals on its own estimates
    config = SelectConfig(num_subsets=200, interval_level=0.9, bootstrap_samples=300)
    sel = select_sources(est, config=config)
    from hf_subset_select.select.first_order import _random_membership

    m = _random_membership(len(est.sources), config, need_nonempty=False)
    iv = effect_intervals(m, est.estimate(m, details=True).per_example, level=0.9, samples=300, seed=0)
    assert sel.info["intervals"]["effects"] == iv.as_dict(est.sources)
    plain = select_sources(est, config=SelectConfig(num_subsets=200))
    assert "intervals" not in plain.info


def test_require_significant_needs_a_level_and_a_method_with_intervals():
    with pytest.raises(ConfigError, match="require_significant=True needs interval_level"):
        SelectConfig(require_significant=True)
    est = FirstOrderEstimator(make_synthetic_cache(dim=8, seed=2))
    config = SelectConfig(method="gradient_similarity", interval_level=0.95, require_significant=True)
    with pytest.raises(ValueError, match="does not give; use 'random_ensemble'"):
        select_sources(est, config=config)


def test_estimate_intervals_and_the_seed_ensemble():
    cache = make_synthetic_cache(dim=16, target_examples=30, seed=4)
    est = FirstOrderEstimator(cache)
    subsets = [["aligned_0"], ["opposed_0", "aligned_1"]]
    iv = est.estimate_intervals(subsets)
    torch.testing.assert_close(iv.point, est.estimate(subsets))
    assert bool((iv.lower < iv.point).all() and (iv.point < iv.upper).all())
    # two projection seeds that disagree: the combined interval is centred between them and wider than either
    shifted = type(iv)(iv.point + 0.2, iv.replicates + 0.2, iv.lower + 0.2, iv.upper + 0.2, iv.level)
    both = combine_seeds([iv, shifted])
    torch.testing.assert_close(both.point, iv.point + 0.1)
    assert bool(((both.upper - both.lower) > (iv.upper - iv.lower)).all())
    assert combine_seeds([iv]) is iv


def test_selection_over_projection_seeds():
    from hf_subset_select.select.seeds import select_over_seeds

    # the same rows seen through three random projections of a 48-dim gradient space down to d = 24
    base = make_synthetic_cache(2, 2, 1, dim=48, target_examples=30, seed=8)
    estimators = []
    for seed in range(3):
        p = torch.randn(48, 24, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) / 24**0.5
        estimators.append(FirstOrderEstimator(base.replace(features=(base.features.double() @ p).float())))
    config = SelectConfig(
        num_subsets=128, interval_level=0.95, bootstrap_samples=300, require_significant=True
    )
    combined = select_over_seeds(estimators, config)
    singles = [select_sources(e, config=config) for e in estimators]
    for s in combined.sources:
        mean = sum(sel.scores[s] for sel in singles) / 3
        assert combined.scores[s] == pytest.approx(mean)
        lo, hi = combined.info["intervals"]["scores"][s]
        assert lo <= combined.scores[s] <= hi
    assert all(combined.info["intervals"]["effects"][s][1] < 0 for s in combined.selected)
    assert len(combined.info["seeds"]) == 3
    one = select_over_seeds(estimators[:1], config)  # one seed: the plain selection
    assert one.info["intervals"]["effects"] == singles[0].info["intervals"]["effects"]
    assert one.selected == singles[0].selected
    other = FirstOrderEstimator(
        make_synthetic_cache(2, 2, 1, dim=24, target_examples=30, examples_per_source=10)
    )
    with pytest.raises(ValueError, match="different sources or rows"):
        select_over_seeds([estimators[0], other], config)
