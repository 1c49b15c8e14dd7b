"""Fuzzed selection files: a real saved selection, mutated by hypothesis (keys dropped, values replaced by null /
"x" / -1 / huge numbers / nested junk / other types), either loads or raises SelectionFileError, never another
exception; each wrong key is named."""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hf_subset_select import SelectConfig, SourceSelection, select_sources
from hf_subset_select.select.selection import SelectionFileError


@pytest.fixture(scope="module")
def saved(est, tmp_path_factory):
    path = tmp_path_factory.mktemp("sel") / "selection.json"
    select_sources(est, method="linear", config=SelectConfig(num_subsets=50, top_k=2)).save(path)
    return path, json.loads(path.read_text())


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("method", None, "method"),
        ("sources", "x", "sources"),
        ("sources", ["a", "a"], "sources"),
        ("scores", {"a": "x"}, "scores.a"),
        ("weights", {"a": -1}, "weights.a"),
        ("selected", [["nested"]], r"selected\[0\]"),
        ("lower_is_better", "yes", "lower_is_better"),
        ("info", {"effects": []}, "info.effects"),
        ("manifest", {"cache_fingerprint": 5}, "manifest.cache_fingerprint"),
        ("target_source", 3, "target_source"),
        ("format_version", True, "format version"),
    ],
)
def test_each_wrong_key_is_named(saved, tmp_path, key, value, named):
    _, data = saved
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**data, key: value}))
    with pytest.raises(SelectionFileError, match=named):
        SourceSelection.load(path)


def test_disagreeing_lists_and_missing_file_are_selection_file_errors(saved, tmp_path):
    _, data = saved
    path = tmp_path / "s.json"
    path.write_text(json.dumps({**data, "selected": ["not_a_source"]}))
    with pytest.raises(SelectionFileError, match="disagree.*select_sources"):
        SourceSelection.load(path)
    with pytest.raises(SelectionFileError) as info:
        SourceSelection.load(tmp_path / "missing.json")
    assert isinstance(info.value, FileNotFoundError)


@settings(max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_selection_files_load_or_raise_selection_file_error(
    saved, mutate_json, data, tmp_path_factory
):
    path, original = saved
    edited = path.parent / "edited.json"
    edited.write_text(json.dumps(mutate_json(data, original)))
    try:
        sel = SourceSelection.load(edited)
    except SelectionFileError:
        event("refused")
        return
    event("loaded")
    repr(sel)  # a selection that loads also prints
    assert all(math.isfinite(w) and w >= 0 for w in sel.weights.values())


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cut=st.integers(0, 4000), junk=st.binary(max_size=40))
def test_truncated_or_garbled_selection_text_raises_selection_file_error(saved, cut, junk):
    path, original = saved
    text = json.dumps(original).encode()
    garbled = text[: cut % len(text)] + junk
    assume(not _parses_to(garbled, original))  # the junk happened to complete the file
    edited = path.parent / "garbled.json"
    edited.write_bytes(garbled)
    with pytest.raises(SelectionFileError):
        SourceSelection.load(edited)


def _parses_to(raw: bytes, doc: object) -> bool:
    try:
        return json.loads(raw) == doc
    except ValueError:
        return False
