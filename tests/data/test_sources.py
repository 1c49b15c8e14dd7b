"""Tagging sources: stable ids and the error cases."""

from __future__ import annotations

import pytest
from datasets import Dataset

from hf_subset_select import tag_sources, tag_target_eval
from hf_subset_select.data.sources import (
    EXAMPLE_ID_COLUMN,
    SOURCE_COLUMN,
    make_example_ids,
    source_counts,
    target_of,
)
from hf_subset_select.demo.toy import toy_text_dataset


def _pairs(ds):
    return {(e[EXAMPLE_ID_COLUMN], e[SOURCE_COLUMN], e["prompt"]) for e in ds}


def test_ids_are_unique_deterministic_and_survive_transforms():
    srcs = {"add": toy_text_dataset("add", 30, seed=1), "rev": toy_text_dataset("rev", 20, seed=2)}
    a = tag_sources(srcs, target="add")
    b = tag_sources(srcs, target="add")
    assert a[EXAMPLE_ID_COLUMN] == b[EXAMPLE_ID_COLUMN]
    assert len(set(a[EXAMPLE_ID_COLUMN])) == len(a) == 50
    assert source_counts(a) == {"add": 30, "rev": 20}
    assert target_of(a) == "add"
    reference = _pairs(a)
    shuffled = a.shuffle(seed=3)
    assert shuffled[EXAMPLE_ID_COLUMN] != a[EXAMPLE_ID_COLUMN]  # order changed ...
    assert _pairs(shuffled) == reference  # ... but every id still belongs to its example
    filtered = shuffled.filter(lambda e: e[SOURCE_COLUMN] == "rev")
    assert _pairs(filtered) <= reference and len(filtered) == 20
    mapped = filtered.map(lambda e: {"prompt": e["prompt"].upper()})
    assert mapped[EXAMPLE_ID_COLUMN] == filtered[EXAMPLE_ID_COLUMN]
    assert target_of(mapped) == "add"  # the target's name travels with the dataset too
    assert a.select([5, 1])[EXAMPLE_ID_COLUMN] == [a[5][EXAMPLE_ID_COLUMN], a[1][EXAMPLE_ID_COLUMN]]


def test_ids_depend_on_source_row_and_split():
    x = make_example_ids("math", "train", 100)
    assert len(set(x.tolist())) == 100 and (x >= 0).all()
    assert not set(x.tolist()) & set(make_example_ids("code", "train", 100).tolist())
    assert not set(x.tolist()) & set(make_example_ids("math", "target_eval", 100).tolist())
    assert make_example_ids("math", "train", 10).tolist() == x[:10].tolist()  # prefix-stable


def test_target_eval_ids_never_collide_with_training_ids():
    train = tag_sources({"add": toy_text_dataset("add", 10)}, target="add")
    ev = tag_target_eval(toy_text_dataset("add", 10), name="add")
    assert not set(train[EXAMPLE_ID_COLUMN]) & set(ev[EXAMPLE_ID_COLUMN])
    assert set(ev[SOURCE_COLUMN]) == {"add"}


def test_formats_text_messages_input_ids_and_labels():
    for fmt in ("text", "messages", "prompt_completion"):
        ds = tag_sources({"a": toy_text_dataset("add", 3, fmt=fmt), "b": toy_text_dataset("sub", 3, fmt=fmt)})
        assert len(ds) == 6
    tok = tag_sources({"a": Dataset.from_dict({"input_ids": [[1, 2], [3]]})})
    assert tok[SOURCE_COLUMN] == ["a", "a"]
    cls = tag_sources({"a": Dataset.from_dict({"text": ["x y"], "label": [1]})})
    assert cls["label"] == [1]


@pytest.mark.parametrize(
    "sources, kwargs, message",
    [
        ({"a": Dataset.from_dict({"text": []})}, {}, "is empty"),
        ({"a": Dataset.from_dict({"foo": ["x"]})}, {}, "none of the columns"),
        ({"a": Dataset.from_dict({"prompt": ["x"]})}, {}, "no 'completion' column"),
        (
            {"a": Dataset.from_dict({"text": ["x"], "label": [0]}), "b": Dataset.from_dict({"text": ["y"]})},
            {},
            "no 'label'",
        ),
        (
            {"a": Dataset.from_dict({"text": ["x"]}), "A": Dataset.from_dict({"text": ["y"]})},
            {},
            "Duplicate source",
        ),
        ({"a": Dataset.from_dict({"text": ["x"]})}, {"target": "b"}, "not one of the sources"),
        ({}, {}, "non-empty dict"),
        ({"a": Dataset.from_dict({"text": ["x"], "source": ["s"]})}, {}, "bookkeeping"),
        (
            {"a": Dataset.from_dict({"text": ["x"]}), "b": Dataset.from_dict({"messages": [[]]})},
            {},
            "different columns",
        ),
        ({"a": ["not", "a", "dataset"]}, {}, "must be a datasets.Dataset"),
    ],
)
def test_bad_sources_raise_clear_errors(sources, kwargs, message):
    with pytest.raises((ValueError, TypeError), match=message):
        tag_sources(sources, **kwargs)


def test_example_id_collision_is_refused():
    a = tag_sources({"a": toy_text_dataset("add", 4)})
    from datasets import concatenate_datasets

    from hf_subset_select.data.sources import _check_unique_ids

    with pytest.raises(ValueError, match="example_id collision"):
        _check_unique_ids(concatenate_datasets([a, a])[EXAMPLE_ID_COLUMN])
    with pytest.raises(ValueError, match="bookkeeping"):
        tag_sources({"again": a})  # re-tagging an already tagged dataset


def test_source_counts_needs_tagged_dataset():
    with pytest.raises(ValueError, match="tag_sources"):
        source_counts(toy_text_dataset("add", 3))
