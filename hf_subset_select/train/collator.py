"""A data collator that filters or weights examples by their source, and the per-source weight table it reads from
a selection.

Three ways to use a :class:`~hf_subset_select.SourceSelection` in the target fine-tune (best first); a
per-example selection (one with an example table) works the same way, reading each example's ``example_id`` too:

1. **Dataset level** -- ``selection.apply(train_dataset)`` before building the trainer. Batches keep their size,
   dropped examples are never loaded. This is the right tool for keep/drop decisions.
2. **Weighted loss** -- ``SubsetSelectingDataCollator(base, selection, mode="weight")`` with
   :class:`~hf_subset_select.WeightedLossTrainer` / :class:`~hf_subset_select.WeightedLossSFTTrainer`
   (:mod:`.weighted_loss`): every example is kept and its loss is scaled by its source's weight.
3. **Weighted sampling** -- ``WeightedLossSFTTrainer(..., sampling_selection=selection)`` (:mod:`.sampler`):
   examples are drawn with probabilities proportional to their weights (with replacement); the loss stays
   unweighted.

``mode="filter"`` of the collator drops examples of unselected sources from each batch. Batches then shrink
(their size varies from batch to batch), which is why a warning recommends option 1. A batch whose examples
all come from unselected sources raises an error by default (``on_empty="error"``) rather than reaching the
model empty; with ``on_empty="zero_weight"`` it goes through unchanged with all example weights 0, which the
weighted-loss trainers turn into an exact no-op for the loss.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from ..data.sources import BOOKKEEPING_COLUMNS, EXAMPLE_ID_COLUMN, SOURCE_COLUMN
from ..data.trainers import FIX_COLUMNS, FIX_MERGED, BookkeepingColumnsError, strip_bookkeeping

__all__ = [
    "EXAMPLE_WEIGHT_KEY",
    "SubsetSelectingDataCollator",
    "SourceWeightPolicy",
    "source_weight_table",
    "check_choice",
    "SOURCE_WEIGHTING",
]

#: batch key of the per-example weight tensor the collator adds and the weighted-loss trainers read
EXAMPLE_WEIGHT_KEY = "example_weight"
SOURCE_WEIGHTING = ("per_example", "mixture")
_MODES = ("filter", "weight")
_UNKNOWN = ("keep", "drop", "error")
_ON_EMPTY = ("error", "zero_weight")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise a ValueError naming the valid values when ``value`` is not one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name}={value!r} is not valid; choose one of {list(choices)}.")


# --------------------------------------------------------------------------------------------------------------
# selection -> per-source weights
# --------------------------------------------------------------------------------------------------------------


def source_weight_table(selection: Any) -> dict[str, float]:
    """Per-source weights from a ``SourceSelection``, a path to one, a dict ``{source: weight}`` or a list of names.

    A list of names gives weight 1 to each listed source. A ``SourceSelection`` gives its ``.weights``; sources in
    ``.selected`` that have no weight get 1 (and a selected source never ends with weight 0); candidates it scored
    but did not select get 0; its ``target_source`` gets 1. Sources it does not name at all are "unknown" and
    handled by the caller's ``unknown_sources`` policy.
    """
    if isinstance(selection, (str, os.PathLike)):
        from ..select.selection import SourceSelection

        selection = SourceSelection.load(selection)
    if isinstance(selection, Mapping):
        table = {str(k): float(v) for k, v in selection.items()}
    elif isinstance(selection, Sequence) and not isinstance(selection, (str, bytes)):
        table = {str(k): 1.0 for k in selection}
    elif hasattr(selection, "weights") or hasattr(selection, "selected"):
        weights = dict(getattr(selection, "weights", None) or {})
        selected = list(getattr(selection, "selected", None) or [])
        # every candidate the selection considered is known (weight 0 unless selected)
        known = [
            *(getattr(selection, "sources", None) or []),
            *dict(getattr(selection, "scores", None) or {}),
        ]
        table = {str(k): 0.0 for k in known}
        table.update({str(k): float(v) for k, v in weights.items()})
        if selected:
            for name in selected:
                if table.get(name, 0.0) <= 0.0:
                    table[name] = 1.0
            # With an explicit keep list, sources outside it are dropped whatever their weight says.
            for name in list(table):
                if name not in selected:
                    table[name] = 0.0
        target = getattr(selection, "target_source", None)
        if target is not None and table.get(str(target), 0.0) <= 0.0:
            table[str(target)] = 1.0  # the target's own training source is always kept, with weight 1
    else:
        raise TypeError(
            "selection must be a SourceSelection, a path to a saved selection JSON, a dict {source: weight} or a "
            f"list of selected source names; got {type(selection).__name__}."
        )
    bad = {k: v for k, v in table.items() if not math.isfinite(v) or v < 0}
    if bad:
        raise ValueError(f"Source weights must be finite and >= 0; got {bad}. Fix the selection's weights.")
    if not table:
        raise ValueError("The selection names no sources; pass a selection with at least one source.")
    if all(v == 0.0 for v in table.values()):
        raise ValueError(
            f"Every source in the selection has weight 0 ({sorted(table)}); nothing would be trained on. "
            "Check the selection (e.g. its threshold or top_k)."
        )
    return table


def _mixture_factors(table: Mapping[str, float], source_counts: Mapping[str, int] | None) -> dict[str, float]:
    """Turn source shares into per-example weights: ``share_k / n_k``, scaled so the mean example weight is 1."""
    if source_counts is None:
        raise ValueError(
            "source_weighting='mixture' needs the number of examples per source: pass "
            "source_counts=hf_subset_select.data.sources.source_counts(train_dataset)."
        )
    missing = [k for k, v in table.items() if v > 0 and source_counts.get(k, 0) <= 0]
    if missing:
        raise ValueError(
            f"source_counts has no examples for the weighted source(s) {missing}; pass the counts of the dataset "
            "you train on (hf_subset_select.data.sources.source_counts(train_dataset))."
        )
    total_n = sum(int(source_counts.get(k, 0)) for k in table)
    total_w = sum(table.values())
    return {k: (v / int(source_counts[k])) * (total_n / total_w) if v > 0 else 0.0 for k, v in table.items()}


class SourceWeightPolicy:
    """Maps a source name (and, for a per-example selection, an ``example_id``) to a per-example weight, applying
    the unknown-source policy (warns once per source)."""

    def __init__(
        self,
        selection: Any,
        unknown_sources: str | None,
        source_weighting: str,
        source_counts: Mapping[str, int] | None,
        always_keep: Sequence[str],
    ) -> None:
        is_name_list = isinstance(selection, Sequence) and not isinstance(selection, (str, bytes))
        # A plain list means "exactly these sources": everything else is dropped, silently. Otherwise unknown
        # sources (e.g. a target evaluation split tagged under its own name) are kept, with a warning.
        if unknown_sources is None:
            unknown_sources = "drop" if is_name_list else "keep"
        check_choice("unknown_sources", unknown_sources, _UNKNOWN)
        self._warn_unknown = unknown_sources == "keep"
        check_choice("source_weighting", source_weighting, SOURCE_WEIGHTING)
        if isinstance(selection, (str, os.PathLike)):
            from ..select.selection import SourceSelection

            selection = SourceSelection.load(selection)
        #: the per-example table of a per-example selection (rows it names get their own weight), else None
        self.examples = getattr(selection, "examples", None)
        if self.examples is not None and source_weighting == "mixture":
            raise ValueError(
                "source_weighting='mixture' sets source shares, but this selection weights single examples; use "
                "source_weighting='per_example' with it."
            )
        target = getattr(selection, "target_source", None)
        self._example_exempt = {str(s) for s in always_keep} | (
            {str(target)} if target is not None else set()
        )
        table = source_weight_table(selection)
        for name in always_keep:
            if table.get(name, 0.0) <= 0.0:
                table[name] = 1.0
        self.source_weights = dict(table)
        self.factors = (
            _mixture_factors(table, source_counts) if source_weighting == "mixture" else dict(table)
        )
        self.unknown_sources = unknown_sources
        self._warned: set[str] = set()

    @property
    def needs_example_ids(self) -> bool:
        """Whether weights depend on ``example_id`` (a per-example selection)."""
        return self.examples is not None

    def weight(self, source: Any, example_id: Any = None) -> float:
        """Per-example weight of an example from ``source`` (``nan`` means: drop it as unknown); a per-example
        selection decides for the ids it names (not for ``always_keep`` sources or the target's own)."""
        if self.examples is not None and example_id is not None and str(source) not in self._example_exempt:
            own = self.examples.weight_of(int(example_id))
            if own is not None:
                return own
        factor = self.factors.get(str(source))
        if factor is not None:
            return factor
        if self.unknown_sources == "error":
            raise KeyError(
                f"Source {source!r} is not in the selection (known: {sorted(self.factors)}). Use the selection "
                "made for this dataset, or pass unknown_sources='keep' (weight 1) / 'drop'."
            )
        if self._warn_unknown and source not in self._warned:
            self._warned.add(source)
            warnings.warn(
                f"Source {source!r} is not in the selection (known: {sorted(self.factors)}); its examples are kept "
                "with weight 1 (unknown_sources='keep'). This is expected for a target evaluation split tagged under "
                "its own name; pass unknown_sources='drop' or 'error' otherwise.",
                UserWarning,
                stacklevel=4,
            )
        return 1.0 if self.unknown_sources == "keep" else math.nan


# --------------------------------------------------------------------------------------------------------------
# the collator
# --------------------------------------------------------------------------------------------------------------


def _batch_size_of(batch: Mapping[str, Any]) -> int | None:
    for key in ("input_ids", "labels", "inputs_embeds", "pixel_values"):
        value = batch.get(key)
        if isinstance(value, torch.Tensor) and value.dim() > 0:
            return int(value.shape[0])
    return None


class SubsetSelectingDataCollator:
    """Wrap any data collator so that it filters or weights examples by their ``source`` column.

    The wrapper removes the bookkeeping columns (``source``, ``example_id``) from every example before the base
    collator sees them, then

    * ``mode="filter"``: passes on only examples of selected sources (weight > 0). Batches shrink; prefer
      ``selection.apply(dataset)`` for plain keep/drop (a warning says so once). An all-dropped batch raises
      (``on_empty="error"``) or is passed with zero weights (``on_empty="zero_weight"``, needs a weighted-loss
      trainer, and then every batch carries the weight tensor);
    * ``mode="weight"``: keeps every example and adds a float tensor ``batch[weight_key]`` of shape
      ``[batch_size]`` with each example's weight; use :class:`~hf_subset_select.WeightedLossTrainer` or
      :class:`~hf_subset_select.WeightedLossSFTTrainer` to turn it into a weighted loss.

    The ``source`` column must reach the collator: with ``Trainer``/``SFTTrainer`` use the ``SubsetSelect*`` or
    ``WeightedLoss*`` trainers (they keep it through ``remove_unused_columns``), and keep packing/padding-free off.

    Args:
        base_collator: any callable taking a list of feature dicts (``DataCollatorWithPadding``,
            ``DataCollatorForSeq2Seq``, ``DataCollatorForLanguageModeling`` of transformers or TRL, ...).
        selection: a ``SourceSelection``, a path to its JSON, a dict ``{source: weight}`` or a list of source names.
        mode: ``"filter"`` or ``"weight"``.
        weight_key: name of the weight tensor in the batch.
        unknown_sources: what to do with a source the selection does not name: ``"keep"`` (weight 1, warns once per
            source; e.g. the target evaluation split), ``"drop"`` or ``"error"``. Default: ``"drop"`` (silently)
            when ``selection`` is a list of names, else ``"keep"``.
        on_empty: filter mode, all examples of a batch dropped: ``"error"`` or ``"zero_weight"``.
        source_weighting: ``"per_example"`` (each example of source k gets weight ``w_k``) or ``"mixture"``
            (``w_k`` is source k's share of the loss: each example gets ``w_k / n_k``, scaled to mean 1; needs
            ``source_counts``).
        source_counts: examples per source of the training set (for ``"mixture"``), e.g.
            ``hf_subset_select.data.sources.source_counts(train_dataset)``.
        always_keep: sources kept with weight 1 whatever the selection says (e.g. the target's own train split).
        warn: emit the filter-mode advice warning.
    """

    #: tells :class:`~hf_subset_select.SubsetSelectTrainerMixin` to hand over the bookkeeping columns.
    handles_bookkeeping = True

    def __init__(
        self,
        base_collator: Callable[[list[dict[str, Any]]], Any],
        selection: Any,
        mode: str = "filter",
        *,
        weight_key: str = EXAMPLE_WEIGHT_KEY,
        unknown_sources: str | None = None,
        on_empty: str = "error",
        source_weighting: str = "per_example",
        source_counts: Mapping[str, int] | None = None,
        always_keep: Sequence[str] = (),
        warn: bool = True,
    ) -> None:
        if not callable(base_collator):
            raise TypeError(f"base_collator must be callable, got {type(base_collator).__name__}.")
        check_choice("mode", mode, _MODES)
        check_choice("on_empty", on_empty, _ON_EMPTY)
        if not isinstance(weight_key, str) or not weight_key or weight_key in BOOKKEEPING_COLUMNS:
            raise ValueError(f"weight_key must be a non-empty name other than {BOOKKEEPING_COLUMNS}.")
        self.base_collator = base_collator
        self.mode = mode
        self.weight_key = weight_key
        self.on_empty = on_empty
        self._policy = SourceWeightPolicy(
            selection, unknown_sources, source_weighting, source_counts, always_keep
        )
        #: examples seen and passed on, per source (in this process / DataLoader worker)
        self.seen: Counter[str] = Counter()
        self.kept: Counter[str] = Counter()
        if mode == "filter" and warn:
            warnings.warn(
                "SubsetSelectingDataCollator(mode='filter') drops examples of unselected sources from each batch, "
                "so batches shrink and their size varies. Filtering the dataset once with selection.apply(dataset) "
                "is usually better (constant batch size, dropped examples never loaded); use mode='weight' to keep "
                "every example with a weighted loss.",
                UserWarning,
                stacklevel=2,
            )

    @property
    def source_weights(self) -> dict[str, float]:
        """The per-source weights in use (after ``always_keep``), before ``source_weighting``."""
        return dict(self._policy.source_weights)

    @property
    def emits_weights(self) -> bool:
        """Whether batches carry the weight tensor."""
        return self.mode == "weight" or self.on_empty == "zero_weight"

    def example_weight(self, source: str, example_id: int | None = None) -> float:
        """Weight that an example of ``source`` (with ``example_id``, for a per-example selection) gets (0 if
        dropped)."""
        w = self._policy.weight(source, example_id)
        return 0.0 if math.isnan(w) else w

    def __getattr__(self, name: str) -> Any:
        # Behave like the wrapped collator for attribute reads (TRL and users read e.g. pad_token_id).
        if name.startswith("_") or name in ("base_collator",):
            raise AttributeError(name)
        return getattr(self.base_collator, name)

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        features = list(features)
        if not features:
            raise ValueError("SubsetSelectingDataCollator received an empty list of examples.")
        sources = []
        for feature in features:
            if not isinstance(feature, Mapping):
                raise TypeError(
                    f"Examples must be dicts with a {SOURCE_COLUMN!r} key; got {type(feature).__name__}."
                )
            if SOURCE_COLUMN not in feature:
                raise BookkeepingColumnsError(
                    f"An example reached SubsetSelectingDataCollator without a {SOURCE_COLUMN!r} column (it has "
                    f"{sorted(feature)}). Tag the data with hf_subset_select.tag_sources; if it is tagged, the "
                    f"trainer removed the column: {FIX_COLUMNS}. If packing merged examples: {FIX_MERGED}."
                )
            sources.append(str(feature[SOURCE_COLUMN]))
        ids: list[Any] = [None] * len(features)
        if self._policy.needs_example_ids:
            if any(EXAMPLE_ID_COLUMN not in f for f in features):
                raise BookkeepingColumnsError(
                    f"A per-example selection needs the {EXAMPLE_ID_COLUMN!r} column of every example, and one "
                    f"reached SubsetSelectingDataCollator without it: {FIX_COLUMNS}."
                )
            ids = [f[EXAMPLE_ID_COLUMN] for f in features]
        weights = [self._policy.weight(s, i) for s, i in zip(sources, ids)]
        self.seen.update(sources)
        stripped = strip_bookkeeping(features)

        if self.mode == "filter":
            keep = [i for i, w in enumerate(weights) if not math.isnan(w) and w > 0]
            if not keep:
                if self.on_empty == "error":
                    raise ValueError(
                        f"All {len(features)} examples of this batch come from unselected sources "
                        f"({dict(Counter(sources))}), so mode='filter' would produce an empty batch. Filter the "
                        "dataset instead (selection.apply(dataset)), use mode='weight' with a WeightedLoss* trainer, "
                        "or pass on_empty='zero_weight' (with a WeightedLoss* trainer)."
                    )
                batch = self._collate(stripped)
                batch[self.weight_key] = torch.zeros(len(features), dtype=torch.float32)
                return batch
            batch = self._collate([stripped[i] for i in keep])
            self.kept.update(sources[i] for i in keep)
            if self.on_empty == "zero_weight":
                batch[self.weight_key] = torch.ones(len(keep), dtype=torch.float32)
            return batch

        # weight mode: every example stays, unknown sources dropped only under unknown_sources="drop"
        keep = [i for i, w in enumerate(weights) if not math.isnan(w)]
        if not keep:
            raise ValueError(
                f"All examples of this batch come from sources unknown to the selection ({sorted(set(sources))}) "
                "and unknown_sources='drop'; pass unknown_sources='keep' or a selection that names them."
            )
        batch = self._collate([stripped[i] for i in keep])
        self.kept.update(sources[i] for i in keep)
        size = _batch_size_of(batch)
        if size is not None and size != len(keep):
            raise BookkeepingColumnsError(
                f"The base collator turned {len(keep)} examples into {size} rows, so per-example weights cannot be "
                f"attached (padding-free or packing collation merges examples): {FIX_MERGED}, or use "
                "mode='filter' / selection.apply(dataset)."
            )
        batch[self.weight_key] = torch.tensor([weights[i] for i in keep], dtype=torch.float32)
        return batch

    def _collate(self, features: list[dict[str, Any]]) -> Any:
        batch = self.base_collator(features)
        if not isinstance(batch, (dict, Mapping)):
            raise TypeError(
                f"The base collator returned a {type(batch).__name__}; SubsetSelectingDataCollator needs a dict-like "
                "batch to add the weight tensor to."
            )
        if not isinstance(
            batch, dict
        ):  # BatchEncoding / BatchFeature are dict subclasses; anything else: copy
            batch = dict(batch)
        return batch

    def __repr__(self) -> str:
        return (
            f"SubsetSelectingDataCollator(mode={self.mode!r}, base={type(self.base_collator).__name__}, "
            f"sources={self._policy.source_weights})"
        )
