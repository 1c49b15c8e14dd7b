"""Several targets against one training cache: the sources × targets table equals one estimator per target."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import FirstOrderEstimator, SelectConfig, select_sources
from hf_subset_select.collect.compat import TargetCacheMismatchError
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.targets import MultiTargetEstimator
from hf_subset_select.select.targets import MultiTargetSelection, select_for_targets

pytestmark = pytest.mark.usefixtures("one_thread")


def _targets():
    """A training cache and three target caches: its own target, and two from other seeds (other target rows)."""
    train = make_synthetic_cache(2, 2, 1, dim=16, target_examples=30, seed=5)

    def other(seed, rows):  # other target rows, recorded as collected with the training cache's projection
        cache = make_synthetic_cache(2, 2, 1, dim=16, target_examples=rows, seed=seed)
        return cache.replace(manifest={**cache.manifest, "projection": train.manifest["projection"]})

    others = {"own": train.take(train.target_mask), "t1": other(6, 25), "t2": other(7, 40)}
    return train, others


def test_the_table_equals_one_estimator_per_target(tmp_path):
    train, targets = _targets()
    multi = MultiTargetEstimator(train, targets)
    subsets = [["aligned_0"], ["aligned_0", "opposed_1"], ["orthogonal_0"]]
    table = multi.estimate(subsets)
    assert table.shape == (3, 3)
    for j, name in enumerate(multi.names):
        single = FirstOrderEstimator(train, target=targets[name])
        torch.testing.assert_close(
            table[:, j], single.estimate(subsets), rtol=1e-6, atol=1e-9
        )  # float32 fast path
        assert multi.base_loss()[name] == pytest.approx(single.base_loss)

    config = SelectConfig(num_subsets=128, interval_level=0.95, bootstrap_samples=200)
    result = select_for_targets(multi, config=config)
    assert result.targets == ["own", "t1", "t2"] and result.sources == multi.sources
    for name in multi.names:
        single = select_sources(FirstOrderEstimator(train, target=targets[name]), config=config)
        assert result[name].selected == single.selected
        assert result[name].scores == pytest.approx(single.scores, rel=1e-6)
        assert result[name].info["intervals"]["effects"] == pytest.approx(
            single.info["intervals"]["effects"], rel=1e-5, abs=1e-8
        )
    table = result.scores()
    assert set(table) == set(multi.sources) and set(table["aligned_0"]) == {"own", "t1", "t2"}
    assert result.intervals()["aligned_0"]["t1"] == result["t1"].info["intervals"]["scores"]["aligned_0"]
    assert "aligned_0" in repr(result)

    result.save(tmp_path / "multi.json")
    back = MultiTargetSelection.load(tmp_path / "multi.json")
    assert back.selected() == result.selected() and back.scores() == result.scores()
    paths = result.save_each(tmp_path / "each")
    assert sorted(paths) == ["own", "t1", "t2"]


def test_a_mismatched_target_is_refused_naming_it():
    train, targets = _targets()
    projection = train.manifest["projection"]
    bad = targets["t1"].replace(manifest={**targets["t1"].manifest, "projection": {**projection, "seed": 99}})
    with pytest.raises(TargetCacheMismatchError, match="Target 't1'.*'projection.seed'"):
        MultiTargetEstimator(train, {"own": targets["own"], "t1": bad})
    with pytest.raises(ValueError, match="at least one"):
        MultiTargetEstimator(train, {})
