"""SourceSelection: table, JSON round trip, old files, datasets, sampling weights."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from hf_subset_select import SelectConfig, SourceSelection, select_sources
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.select import scores_to_weights
from hf_subset_select.select.selection import SelectionFileError

ALIGNED = ["aligned_0", "aligned_1"]
DATA = Path(__file__).parent / "data"


def test_repr_is_a_table(est):
    sel = select_sources(est, method="linear", config=SelectConfig(num_subsets=200))
    text = repr(sel)
    assert text.splitlines()[1].split() == ["source", "score", "effect", "kept", "weight"]
    for s in est.sources + ["target_train"]:
        assert s in text


def test_save_load_round_trip(tmp_path, cache, est):
    sel = select_sources(est, method="random_ensemble", config=SelectConfig(num_subsets=200))
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


def test_baseline_selection_round_trips(tmp_path, est):
    sel = select_sources(est, method="gradient_similarity", config=SelectConfig(top_k=2))
    sel.save(tmp_path / "g.json")
    back = SourceSelection.load(tmp_path / "g.json", cache=est)
    assert back == sel and not back.lower_is_better


def test_format_v1_file_loads():
    """A format-1 selection file (linear, top_k=2, written by release 0.1.0) loads and matches its cache."""
    cache = make_synthetic_cache(2, 2, 2, dim=16, examples_per_source=32, seed=0)
    sel = SourceSelection.load(DATA / "selection_v1_linear.json", cache=cache)
    assert sel.method == "linear" and sel.lower_is_better
    assert sel.selected == ALIGNED and sel.target_source == "target_train"
    assert sel.keep_sources() == [*ALIGNED, "target_train"]
    assert sum(sel.weights[s] for s in sel.selected) == pytest.approx(2.0)
    assert set(sel.info["effects"]) == set(sel.sources)
    assert "select_config" in sel.manifest and "estimator_config" in sel.manifest


def test_apply_and_sampling_weights(est):
    from datasets import Dataset

    sel = select_sources(est, config=SelectConfig(num_subsets=200, top_k=2))
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


def test_scores_to_weights_direction_and_edge_cases():
    scores = {"a": 1.0, "b": 2.0, "c": 3.0}
    low = scores_to_weights(scores, ["a", "b"], lower_is_better=True)
    high = scores_to_weights(scores, ["a", "b"], lower_is_better=False)
    assert low["a"] > low["b"] and high["b"] > high["a"] and low["c"] == high["c"] == 0.0
    assert (low["a"] + low["b"]) / 2 == pytest.approx(1.0)
    assert scores_to_weights({"a": 1.0, "b": 1.0}, ["a"]) == {"a": 1.0, "b": 0.0}
    assert scores_to_weights({"a": math.nan, "b": 2.0}, ["a", "b"]) == {"a": 1.0, "b": 1.0}
    assert scores_to_weights(scores, []) == {"a": 0.0, "b": 0.0, "c": 0.0}
    with pytest.raises(ValueError, match="temperature"):
        scores_to_weights(scores, ["a"], temperature=0.0)


def test_a_legal_but_different_value_is_caught_by_the_content_checksum(tmp_path, est):
    sel = select_sources(est, method="linear", config=SelectConfig(num_subsets=50))
    path = tmp_path / "s.json"
    sel.save(path)
    data = json.loads(path.read_text())
    name = next(iter(data["weights"]))
    data["weights"][name] = data["weights"][name] + 0.25  # a legal weight, just not the saved one
    path.write_text(json.dumps(data))
    with pytest.raises(SelectionFileError, match="edited or damaged after it was saved.*content_sha256"):
        SourceSelection.load(path)
    del data["content_sha256"]  # a file from before checksums (or one stripped of it) still loads
    path.write_text(json.dumps(data))
    assert SourceSelection.load(path).weights[name] == data["weights"][name]
