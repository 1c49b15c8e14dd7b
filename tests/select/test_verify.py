"""verify_selection: a few real dev fine-tunes pick how much of the estimator's ranking to keep."""

from __future__ import annotations

import math

import pytest

from hf_subset_select import SourceSelection, verify_selection


def make_selection(selected: list[str]) -> SourceSelection:
    scores = {"a": 0.50, "b": 0.52, "c": 0.55, "d": 0.70}  # ranking a, b, c, d (lower is better)
    return SourceSelection(
        method="random_ensemble",
        sources=list(scores),
        scores=scores,
        selected=selected,
        weights={s: (1.0 if s in selected else 0.0) for s in scores},
        target_source="target",
        info={"l2": 1.0},
    )


class Recorder:
    """A fake dev fine-tune: the metric of target + sources from a table, with every call recorded."""

    def __init__(self, table: dict[tuple[str, ...], float]) -> None:
        self.table, self.calls = table, []

    def __call__(self, sources: list[str]) -> float:
        self.calls.append(tuple(sources))
        return self.table[tuple(sources)]


def test_keeps_the_best_prefix_of_the_ranking_with_k_plus_one_finetunes():
    evaluate = Recorder({(): 0.50, ("a",): 0.58, ("a", "b"): 0.55, ("a", "b", "c"): 0.57})
    verified = verify_selection(make_selection(["c", "a", "b"]), evaluate)
    assert evaluate.calls == [
        (),
        ("a",),
        ("a", "b"),
        ("a", "b", "c"),
    ]  # prefixes in ranking order, not list order
    assert verified.selected == ["a"]
    assert verified.weights == {"a": 1.0, "b": 0.0, "c": 0.0, "d": 0.0}
    assert verified.method == "random_ensemble+verified"
    v = verified.info["verification"]
    assert v["chosen_size"] == 1 and v["unverified_selected"] == ["c", "a", "b"]
    assert [e["value"] for e in v["evaluated"]] == [0.50, 0.58, 0.55, 0.57]
    assert verified.info["l2"] == 1.0  # the selection's own details are kept


def test_answers_target_only_when_no_prefix_beats_it():
    evaluate = Recorder({(): 0.60, ("a",): 0.55, ("a", "b"): 0.60})
    verified = verify_selection(make_selection(["a", "b"]), evaluate)
    assert verified.selected == [] and verified.keep_sources() == ["target"]


def test_ties_and_gains_below_min_gain_keep_fewer_sources():
    evaluate = Recorder({(): 0.50, ("a",): 0.52, ("a", "b"): 0.53})
    assert verify_selection(make_selection(["a", "b"]), evaluate, min_gain=0.035).selected == []
    # each prefix is compared with the best so far: "a" gains too little, "a, b" enough over target only
    assert verify_selection(make_selection(["a", "b"]), evaluate, min_gain=0.025).selected == ["a", "b"]
    assert verify_selection(make_selection(["a", "b"]), evaluate, min_gain=0.015).selected == ["a"]
    assert verify_selection(make_selection(["a", "b"]), evaluate).selected == ["a", "b"]


def test_a_loss_is_minimized_and_an_empty_selection_is_still_checked_against_its_best_source():
    evaluate = Recorder({(): 1.2, ("a",): 0.9})
    verified = verify_selection(make_selection([]), evaluate, higher_is_better=False)
    assert evaluate.calls == [(), ("a",)] and verified.selected == ["a"]
    wider = Recorder({(): 1.0, ("a",): 0.9, ("a", "b"): 0.95, ("a", "b", "c"): 0.8})
    assert verify_selection(make_selection(["a"]), wider, higher_is_better=False, max_sources=3).selected == [
        "a",
        "b",
        "c",
    ]


def test_the_verified_selection_saves_and_loads(tmp_path):
    verified = verify_selection(
        make_selection(["a", "b"]), Recorder({(): 0.5, ("a",): 0.6, ("a", "b"): 0.55})
    )
    path = tmp_path / "selection.json"
    verified.save(path)
    loaded = SourceSelection.load(path)
    assert loaded.selected == ["a"] and loaded.info["verification"] == verified.info["verification"]


@pytest.mark.parametrize("bad", [math.nan, math.inf, None, "0.5"])
def test_a_non_finite_or_non_numeric_metric_is_refused_with_the_fix(bad):
    with pytest.raises(ValueError, match="finite dev metric"):
        verify_selection(make_selection(["a"]), lambda sources: bad if sources else 0.5)


def test_bad_arguments_are_refused():
    with pytest.raises(TypeError, match="callable"):
        verify_selection(make_selection(["a"]), 0.5)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="min_gain"):
        verify_selection(make_selection(["a"]), lambda s: 0.5, min_gain=-1)
    with pytest.raises(ValueError, match="max_sources"):
        verify_selection(make_selection(["a"]), lambda s: 0.5, max_sources=-2)
