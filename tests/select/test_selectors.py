"""select_sources and SourceSelection: the right sources win, JSON round trip, datasets, bad input."""

from __future__ import annotations

import json

import pytest
import torch

from hf_subset_select import FirstOrderEstimator, SelectConfig, SourceSelection, select_sources
from hf_subset_select.select.baselines import gradient_similarity_selection, representation_similarity_selection
from hf_subset_select.demo.synthetic import make_synthetic_cache

ALIGNED = ["aligned_0", "aligned_1"]
OPPOSED = ["opposed_0", "opposed_1"]


@pytest.fixture(scope="module")
def cache():
    return make_synthetic_cache(2, 2, 2, dim=24, examples_per_source=48, seed=0)


@pytest.fixture(scope="module")
def est(cache):
    return FirstOrderEstimator(cache)


@pytest.mark.parametrize("method", ["random_ensemble", "linear", "forward"])
def test_aligned_sources_win_with_every_method(est, method):
    top = select_sources(est, method=method, num_subsets=300, top_k=2)
    assert sorted(top.selected) == ALIGNED
    default = select_sources(est, method=method, num_subsets=300)
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


@pytest.mark.parametrize("make", [gradient_similarity_selection, representation_similarity_selection])
def test_baselines_pick_aligned_too(cache, make):
    sel = make(cache, top_k=2)
    assert sorted(sel.selected) == ALIGNED
    assert not sel.lower_is_better


def test_weights_and_threshold(est):
    sel = select_sources(est, num_subsets=300, temperature=0.5)
    kept = [sel.weights[s] for s in sel.selected]
    assert sum(kept) / len(kept) == pytest.approx(1.0)
    assert all(sel.weights[s] == 0.0 for s in sel.dropped)
    # a better (lower) score gets a larger weight
    best, worst_kept = sel.ranking[0], [s for s in sel.ranking if s in sel.selected][-1]
    assert sel.weights[best] >= sel.weights[worst_kept]
    cut = sorted(sel.scores.values())[3]
    thr = select_sources(est, num_subsets=300, threshold=cut)
    assert sorted(thr.selected) == sorted(s for s, v in thr.scores.items() if v < cut)


def test_repr_is_a_table(est):
    sel = select_sources(est, method="linear", num_subsets=200)
    text = repr(sel)
    assert text.splitlines()[1].split() == ["source", "score", "effect", "kept", "weight"]
    for s in est.sources + ["target_train"]:
        assert s in text


def test_save_load_round_trip(tmp_path, cache, est):
    sel = select_sources(est, method="random_ensemble", num_subsets=200)
    path = tmp_path / "selection.json"
    sel.save(path)
    back = SourceSelection.load(path, cache=cache)
    assert back == sel
    data = json.loads(path.read_text())
    assert data["manifest"]["cache_fingerprint"] == cache.fingerprint()
    assert data["manifest"]["cache_sources"] == cache.sources
    # a different cache is refused
    other = make_synthetic_cache(2, 2, 2, dim=24, examples_per_source=48, seed=1)
    with pytest.raises(ValueError, match="computed from cache"):
        SourceSelection.load(path, cache=other)
    # corrupt / foreign files are refused with a reason
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        SourceSelection.load(tmp_path / "bad.json")
    (tmp_path / "other.json").write_text(json.dumps({"format": "something"}))
    with pytest.raises(ValueError, match="not a hf_subset_select source selection"):
        SourceSelection.load(tmp_path / "other.json")
    with pytest.raises(FileNotFoundError):
        SourceSelection.load(tmp_path / "missing.json")


def test_apply_and_sampling_weights(est):
    from datasets import Dataset

    sel = select_sources(est, num_subsets=200, top_k=2)
    rows = [s for s in est.sources + ["target_train"] for _ in range(3)]
    ds = Dataset.from_dict({"text": [f"x {i}" for i in range(len(rows))], "source": rows})
    kept = sel.apply(ds)
    assert set(kept["source"]) == set(ALIGNED) | {"target_train"}
    assert len(kept) == 9
    weights = sel.sampling_weights(ds)
    assert len(weights) == len(ds)
    for s, w in zip(rows, weights):
        assert w == (1.0 if s == "target_train" else sel.weights[s])
    with pytest.raises(ValueError, match="tag_sources"):
        sel.apply(Dataset.from_dict({"text": ["a"]}))
    with pytest.raises(ValueError, match="does not know"):
        sel.apply(Dataset.from_dict({"text": ["a"], "source": ["mystery"]}))


def test_bad_selection_input(est):
    with pytest.raises(ValueError, match="top_k"):
        select_sources(est, top_k=len(est.sources) + 1, num_subsets=50)
    with pytest.raises(ValueError, match="raise num_subsets"):
        select_sources(est, num_subsets=1)
    with pytest.raises(ValueError, match="method"):
        select_sources(est, method="backward")
    cfg = SelectConfig(num_subsets=100, seed=3)
    a = select_sources(est, config=cfg)
    b = select_sources(est, config=cfg)
    assert a.scores == b.scores  # seeded


def test_no_target_source_cache_forward_starts_empty():
    cache = make_synthetic_cache(2, 2, 0, dim=16, target_train_examples=0, seed=2)
    est = FirstOrderEstimator(cache)
    sel = select_sources(est, method="forward")
    assert sel.target_source is None
    assert sel.selected and set(sel.selected) <= set(ALIGNED)
    ens = select_sources(est, num_subsets=200)
    assert set(ALIGNED) <= set(ens.selected)
    assert torch.isfinite(torch.tensor(list(ens.scores.values()))).all()
