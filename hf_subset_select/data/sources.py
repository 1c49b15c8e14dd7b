"""Tag datasets with their source name and a stable ``example_id``, and mix them into one dataset.

``example_id`` is an int64 derived from (source name, split, row index in the source as given), so it is
deterministic, and because it is stored as a column it survives ``shuffle``, ``filter``, ``map`` and
``select``. Two bookkeeping columns travel with every example: ``source`` and ``example_id``.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np

__all__ = [
    "DataInputError",
    "BookkeepingColumnsError",
    "SOURCE_COLUMN",
    "EXAMPLE_ID_COLUMN",
    "BOOKKEEPING_COLUMNS",
    "CONTENT_COLUMNS",
    "tag_sources",
    "tag_target_eval",
    "tag_clusters",
    "source_counts",
    "make_example_ids",
    "load_dataset_file",
    "parse_source_specs",
]

SOURCE_COLUMN = "source"
EXAMPLE_ID_COLUMN = "example_id"
BOOKKEEPING_COLUMNS = (SOURCE_COLUMN, EXAMPLE_ID_COLUMN)
# An example must carry at least one of these to be trainable / collectable.
CONTENT_COLUMNS = ("text", "messages", "prompt", "input_ids")
LABEL_COLUMNS = ("label", "labels")


class DataInputError(ValueError):
    """A dataset that cannot be used as given: no content column, an empty source or split, colliding example ids,
    no supervised token, mismatched columns. The message says how to fix the data."""


class BookkeepingColumnsError(DataInputError):
    """The ``source`` / ``example_id`` columns were removed, or examples were merged, where the plugin needs them."""


def make_example_ids(source: str, split: str, num_rows: int) -> np.ndarray:
    """Deterministic int64 ids (63-bit, non-negative) for rows ``0..num_rows-1`` of one source and split."""
    base = hashlib.blake2b(f"{split}\x00{source}".encode(), digest_size=8).digest()
    key = int.from_bytes(base, "little") & ((1 << 63) - 1)
    rows = np.arange(num_rows, dtype=np.uint64)
    # splitmix64-style mixing of (key + row): deterministic, platform independent, collision-checked later
    with np.errstate(over="ignore"):
        z = (np.uint64(key) + rows * np.uint64(0x9E3779B97F4A7C15)).astype(np.uint64)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return (z & np.uint64((1 << 63) - 1)).astype(np.int64)


def _check_columns(name: str, columns: list[str], require_label: bool) -> None:
    if not any(c in columns for c in CONTENT_COLUMNS):
        raise DataInputError(
            f"Source {name!r} has none of the columns {list(CONTENT_COLUMNS)} (it has {columns}). "
            "Rename its text column to 'text', its chat column to 'messages', use 'prompt'/'completion', "
            "or tokenize it into 'input_ids' first."
        )
    if "prompt" in columns and "completion" not in columns:
        raise DataInputError(f"Source {name!r} has a 'prompt' column but no 'completion' column; add one.")
    if require_label and not any(c in columns for c in LABEL_COLUMNS):
        raise DataInputError(
            f"Source {name!r} has no 'label' or 'labels' column, but the other sources do "
            "(classification data needs one per example)."
        )
    clash = [c for c in BOOKKEEPING_COLUMNS if c in columns]
    if clash:
        raise DataInputError(
            f"Source {name!r} already has bookkeeping column(s) {clash}. Remove them "
            "(dataset.remove_columns(...)) before tagging, or pass the already tagged dataset directly."
        )


def _tag_one(dataset: Any, name: str, split: str) -> Any:
    ids = make_example_ids(name, split, len(dataset))
    dataset = dataset.add_column(SOURCE_COLUMN, [name] * len(dataset))
    return dataset.add_column(EXAMPLE_ID_COLUMN, ids.tolist())


def _check_unique_ids(ids: Any) -> None:
    arr = np.asarray(ids, dtype=np.int64)
    uniq, counts = np.unique(arr, return_counts=True)
    if len(uniq) != len(arr):
        dup = int(uniq[counts > 1][0])
        raise DataInputError(
            f"example_id collision: id {dup} occurs {int(counts.max())} times. This happens when the same source "
            "is tagged twice or two tagged datasets are concatenated; tag every source once, in one call."
        )


def tag_sources(
    sources: Mapping[str, Any],
    *,
    target: str | None = None,
    split: str = "train",
) -> Any:
    """Tag each ``datasets.Dataset`` with its source name and a stable id and concatenate them.

    Args:
        sources: mapping from source name to dataset. Every dataset needs a ``text``, ``messages``,
            ``prompt``/``completion`` or ``input_ids`` column; if any has ``label(s)`` all must.
        target: name of the source that is the target task's own training split, if it is among them.
            It is recorded in the returned dataset's ``info.description`` and in every artifact downstream.
        split: split name mixed into the ids (``"train"`` here; see :func:`tag_target_eval`).

    Returns:
        One ``datasets.Dataset`` with the extra columns ``source`` (str) and ``example_id`` (int64).
    """
    from datasets import Dataset, concatenate_datasets

    if not isinstance(sources, Mapping) or not sources:
        raise DataInputError("tag_sources needs a non-empty dict {source_name: datasets.Dataset}.")
    names = list(sources)
    for name in names:
        if not isinstance(name, str) or not name.strip():
            raise DataInputError(f"Source names must be non-empty strings, got {name!r}.")
    folded = Counter(n.strip().lower() for n in names)
    dups = [n for n, c in folded.items() if c > 1]
    if dups:
        raise DataInputError(
            f"Duplicate source name(s) {dups} (names are compared case-insensitively); give every source its own name."
        )
    if target is not None and target not in sources:
        raise DataInputError(f"target={target!r} is not one of the sources {names}.")
    any_label = any(
        any(c in getattr(ds, "column_names", []) for c in LABEL_COLUMNS) for ds in sources.values()
    )
    tagged = []
    for name in names:
        ds = sources[name]
        if not isinstance(ds, Dataset):
            raise TypeError(f"Source {name!r} must be a datasets.Dataset, got {type(ds).__name__}.")
        if len(ds) == 0:
            raise DataInputError(f"Source {name!r} is empty; drop it from the dict or fill it.")
        _check_columns(name, ds.column_names, require_label=any_label)
        tagged.append(_tag_one(ds, name, split))
    columns = [set(t.column_names) for t in tagged]
    if any(c != columns[0] for c in columns):
        diff = {names[i]: sorted(c ^ columns[0]) for i, c in enumerate(columns) if c != columns[0]}
        raise DataInputError(
            f"Sources have different columns (differences from {names[0]!r}: {diff}); "
            "map them to one schema before tagging."
        )
    try:
        mixed = concatenate_datasets(tagged)
    except ValueError as exc:  # incompatible feature types (datasets' own error)
        raise DataInputError(
            f"Sources could not be concatenated ({exc}); cast them to the same features (dataset.cast(...))."
        ) from exc
    _check_unique_ids(mixed[EXAMPLE_ID_COLUMN])
    if target is not None:
        mixed.info.description = f"hf_subset_select target={target}"
    return mixed


def tag_target_eval(dataset: Any, name: str = "target") -> Any:
    """Tag the target task's evaluation split: ``source=name`` and ids that never collide with training ids."""
    from datasets import Dataset

    if not isinstance(dataset, Dataset):
        raise TypeError(
            f"The target evaluation split must be a datasets.Dataset, got {type(dataset).__name__}."
        )
    if len(dataset) == 0:
        raise DataInputError("The target evaluation split is empty; the estimate needs target examples.")
    _check_columns(name, dataset.column_names, require_label=False)
    tagged = _tag_one(dataset, name, "target_eval")
    _check_unique_ids(tagged[EXAMPLE_ID_COLUMN])
    return tagged


def tag_clusters(dataset: Any, mapping: Mapping[Any, str]) -> Any:
    """Set the ``source`` of every row named in ``mapping`` (``{example_id: cluster name}``, from
    :func:`~hf_subset_select.select.clusters.cluster_sources`) to its cluster, so a selection made on the
    cluster cache applies to the dataset; other rows keep their source. Keys may be ints or their strings
    (a mapping read back from JSON)."""
    columns = getattr(dataset, "column_names", None) or []
    missing = [c for c in BOOKKEEPING_COLUMNS if c not in columns]
    if missing:
        raise BookkeepingColumnsError(
            f"The dataset lacks the column(s) {missing}; tag it with hf_subset_select.tag_sources (one untagged "
            "dataset: tag_sources({'pool': dataset})) before collecting the cache and clustering it."
        )
    if not mapping:
        raise DataInputError(
            "The cluster mapping is empty; pass the mapping returned by cluster_sources(...)."
        )
    table = {int(k): str(v) for k, v in mapping.items()}
    hits = sum(int(i) in table for i in dataset[EXAMPLE_ID_COLUMN])
    if hits == 0:
        raise DataInputError(
            "No example_id of the dataset is in the cluster mapping; the mapping comes from a cache of another "
            "dataset. Cluster the cache collected on this dataset."
        )

    def relabel(batch: dict[str, list[Any]]) -> dict[str, list[Any]]:
        ids, srcs = batch[EXAMPLE_ID_COLUMN], batch[SOURCE_COLUMN]
        return {SOURCE_COLUMN: [table.get(int(i), s) for i, s in zip(ids, srcs)]}

    return dataset.map(relabel, batched=True, desc="tag clusters")


def target_of(dataset: Any) -> str | None:
    """The target source recorded by :func:`tag_sources`, if any."""
    desc = getattr(getattr(dataset, "info", None), "description", None) or ""
    prefix = "hf_subset_select target="
    return desc[len(prefix) :] if desc.startswith(prefix) else None


def source_counts(dataset: Any) -> dict[str, int]:
    """Number of examples per source, in order of first appearance."""
    if SOURCE_COLUMN not in getattr(dataset, "column_names", []):
        raise BookkeepingColumnsError(
            f"The dataset has no {SOURCE_COLUMN!r} column; tag it with hf_subset_select.tag_sources(...) first."
        )
    counts: dict[str, int] = {}
    for s in dataset[SOURCE_COLUMN]:
        counts[s] = counts.get(s, 0) + 1
    return counts


def load_dataset_file(path: str) -> Any:
    """Load one local dataset: a .json/.jsonl/.csv/.parquet file or a ``Dataset.save_to_disk`` folder."""
    import os

    from datasets import load_dataset, load_from_disk

    if os.path.isdir(path):
        return load_from_disk(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"No dataset file or folder at {path!r}.")
    ext = os.path.splitext(path)[1].lower().lstrip(".")
    kind = {"jsonl": "json", "json": "json", "csv": "csv", "parquet": "parquet"}.get(ext)
    if kind is None:
        raise DataInputError(
            f"Cannot read {path!r}: use .json/.jsonl/.csv/.parquet or a save_to_disk folder."
        )
    return load_dataset(kind, data_files=path, split="train")


def parse_source_specs(specs: list[str]) -> dict[str, Any]:
    """``["name=path", ...]`` -> ``{name: Dataset}`` (loaded with :func:`load_dataset_file`)."""
    out: dict[str, Any] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise DataInputError(f"Source {spec!r} is not NAME=PATH (e.g. cot_gsm=data/cot_gsm.jsonl).")
        if name.strip() in out:
            raise DataInputError(f"Source name {name.strip()!r} is given twice.")
        out[name.strip()] = load_dataset_file(path.strip())
    return out
