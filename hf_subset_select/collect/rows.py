"""The rows a collection covers: where they come from, canonical order, the supervision check and digests.

A :class:`RowSource` holds the two splits and turns a row into model inputs; :class:`EncodedRows` is the
standalone one (tokenized rows as they are, raw rows by :func:`~hf_subset_select.data.encode.encode_row`), and
:class:`~.trainer_rows.TrainerRows` takes the rows a bound Trainer trains on. Rows are ordered by split (training,
then target) and ``example_id``; a row without a supervised token is skipped and counted per source. Each kept
row's token content is digested into the collection key, so that a directory collected from other tokens is never
reused.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..data.encode import IGNORE_INDEX, encode_row
from ..data.sources import EXAMPLE_ID_COLUMN, SOURCE_COLUMN, BookkeepingColumnsError, DataInputError
from .cache import SPLIT_TARGET, SPLIT_TRAIN
from .per_example import collate_examples

__all__ = ["RowSource", "EncodedRows", "PlannedRow", "RowPlan", "plan_rows", "column", "has_supervision"]


class RowSource:
    """The two splits of a collection and how their rows become model inputs.

    Subclasses implement :meth:`encode` (the row the cache is computed on) and :meth:`as_trained` (the rows as
    the trainer sees them and the batch its collator makes, for the self-check).
    """

    #: what the self-check names as the reference rows in its messages
    reference = "the collector's rows"

    def __init__(self, train_dataset: Any, target_dataset: Any, max_length: int, kind: str) -> None:
        self.train_dataset = train_dataset
        self.target_dataset = target_dataset
        self.max_length = int(max_length)
        self.kind = kind

    def dataset(self, split: int) -> Any:
        return self.train_dataset if split == SPLIT_TRAIN else self.target_dataset

    def encode(self, split: int, row: int) -> dict[str, Any]:
        """The model inputs of ``row`` of ``split`` that the cache is computed on."""
        raise NotImplementedError

    def as_trained(self, split: int, rows: list[int]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        """The rows as the trainer sees them (encoded dicts) and the batch its data collator makes of them."""
        raise NotImplementedError


class EncodedRows(RowSource):
    """Standalone rows: tokenized rows as they are, raw rows encoded by TRL's rules with ``tokenizer``."""

    def __init__(
        self, train_dataset: Any, target_dataset: Any, tokenizer: Any, max_length: int, kind: str, pad_id: int
    ) -> None:
        super().__init__(train_dataset, target_dataset, max_length, kind)
        self.tokenizer = tokenizer
        self.pad_id = pad_id

    def encode(self, split: int, row: int) -> dict[str, Any]:
        return encode_row(dict(self.dataset(split)[int(row)]), self.tokenizer, self.max_length, self.kind)

    def as_trained(self, split: int, rows: list[int]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        encoded = [self.encode(split, r) for r in rows]
        return encoded, collate_examples(encoded, self.kind, pad_token_id=self.pad_id)


def column(dataset: Any, name: str) -> list[Any]:
    """Values of column ``name`` (a ``datasets.Dataset`` or any indexable of dicts), with a fix if it is missing."""
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            raise BookkeepingColumnsError(
                f"The dataset has no {name!r} column (it has {dataset.column_names}). Tag it with "
                "hf_subset_select.tag_sources(...) (training sources) or tag_target_eval(...) (target evaluation)."
            )
        return list(dataset[name])
    rows = [dataset[i] for i in range(len(dataset))]
    if rows and name not in rows[0]:
        raise BookkeepingColumnsError(
            f"The examples have no {name!r} field; tag them with hf_subset_select.tag_sources(...)."
        )
    return [r[name] for r in rows]


def has_supervision(encoded: Mapping[str, Any], kind: str) -> bool:
    """Whether the encoded example has at least one token (class) that carries loss."""
    if not encoded.get("input_ids"):
        return False
    if kind == "classification":
        return True
    labels = encoded["labels"][1:] if kind == "causal_lm" else encoded["labels"]
    return any(int(t) != IGNORE_INDEX for t in labels)


def content_digest(encoded: Mapping[str, Any]) -> bytes:
    """A digest of an encoded example's tokens and labels (token types too, when the example has them)."""
    parts: list[Any] = [list(map(int, encoded["input_ids"])), encoded.get("labels", encoded.get("label"))]
    if encoded.get("token_type_ids") is not None:
        parts.append(list(map(int, encoded["token_type_ids"])))
    payload = json.dumps(parts, separators=(",", ":"))
    return hashlib.blake2b(payload.encode(), digest_size=16).digest()


@dataclass
class PlannedRow:
    """One collected row: its split, id, source (index into the plan's sources) and row in its dataset."""

    split: int
    example_id: int
    source_index: int
    row: int
    digest: bytes = b""


@dataclass
class RowPlan:
    """The kept rows in canonical order, the source names, and what was skipped."""

    sources: list[str]
    rows: list[PlannedRow]
    skipped: dict[str, int] = field(default_factory=dict)
    skipped_ids: list[int] = field(default_factory=list)

    def key_entries(self) -> list[tuple[int, int, str, bytes]]:
        """``(split, example_id, source, digest)`` per row, for :func:`~.store.collection_key`."""
        return [(r.split, r.example_id, self.sources[r.source_index], r.digest) for r in self.rows]


def plan_rows(source: RowSource, splits: tuple[int, ...] = (SPLIT_TRAIN, SPLIT_TARGET)) -> RowPlan:
    """Order the tagged rows of both splits, encode each once, drop (and count) rows without supervision.

    ``splits=(SPLIT_TARGET,)`` plans the target rows only (a target collected against an existing training cache).

    Raises:
        BookkeepingColumnsError: a split is not tagged (no ``source`` / ``example_id`` column).
        DataInputError: an ``example_id`` occurs twice in a split, a split is empty, or a split or a training
            source has no example with a supervised token (every label masked).
    """
    sources: list[str] = []
    items: list[tuple[int, int, int, int]] = []
    for split in splits:
        dataset = source.dataset(split)
        for row, (name, ex_id) in enumerate(
            zip(column(dataset, SOURCE_COLUMN), column(dataset, EXAMPLE_ID_COLUMN))
        ):
            if name not in sources:
                sources.append(str(name))
            items.append((split, int(ex_id), sources.index(name), row))
    items.sort(key=lambda t: (t[0], t[1]))
    seen = set()
    for split, ex_id, _, _ in items:
        if (split, ex_id) in seen:
            raise DataInputError(
                f"example_id {ex_id} occurs twice in the {'target' if split else 'training'} data: tag every "
                "source once, in one tag_sources call (and the target split with tag_target_eval)."
            )
        seen.add((split, ex_id))
    plan = RowPlan(sources, [])
    for split, ex_id, src, row in items:
        encoded = source.encode(split, row)
        if not has_supervision(encoded, source.kind):
            plan.skipped[sources[src]] = plan.skipped.get(sources[src], 0) + 1
            plan.skipped_ids.append(ex_id)
            continue
        plan.rows.append(PlannedRow(split, ex_id, src, row, content_digest(encoded)))
    _check_supervised(plan, items, splits)
    return plan


_MASKED_FIX = (
    "check how the labels are masked (a chat template that marks no assistant turn, a completion-only mask on "
    "rows without a completion) and that max_length does not cut every completion off"
)


def _check_supervised(
    plan: RowPlan,
    items: list[tuple[int, int, int, int]],
    splits: tuple[int, ...] = (SPLIT_TRAIN, SPLIT_TARGET),
) -> None:
    """Every split has rows, and every split and training source keeps at least one supervised row."""
    for split, what, fix in (
        (SPLIT_TRAIN, "training data", "tag_sources({...}) with non-empty sources"),
        (SPLIT_TARGET, "target evaluation split", "tag_target_eval(dataset) on a non-empty split"),
    ):
        if split not in splits:
            continue
        given = [t for t in items if t[0] == split]
        if not given:
            raise DataInputError(f"The {what} is empty; pass {fix}.")
        if not any(r.split == split for r in plan.rows):
            raise DataInputError(
                f"Every example of the {what} has all of its labels masked ({len(given)} rows, no token carries "
                f"loss), so no gradient can be collected: {_MASKED_FIX}."
            )
    kept = {r.source_index for r in plan.rows if r.split == SPLIT_TRAIN}
    empty = [
        plan.sources[s] for s in dict.fromkeys(t[2] for t in items if t[0] == SPLIT_TRAIN) if s not in kept
    ]
    if empty:
        raise DataInputError(
            f"Every example of the training source(s) {empty} has all of its labels masked, so the source cannot be "
            f"scored: {_MASKED_FIX}; or drop the source."
        )
