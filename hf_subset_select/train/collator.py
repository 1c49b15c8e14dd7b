"""Apply a source selection during the target fine-tune: a collator that filters or weights examples by source,
trainers that turn per-example weights into a weighted loss, and a sampler that reweights by sampling.

Three ways to use a :class:`~hf_subset_select.SourceSelection` (best first):

1. **Dataset level** -- ``selection.apply(train_dataset)`` before building the trainer. Batches keep their size,
   dropped examples are never loaded. This is the right tool for keep/drop decisions.
2. **Weighted loss** -- ``SubsetSelectingDataCollator(base, selection, mode="weight")`` with
   :class:`WeightedLossTrainer` / :class:`WeightedLossSFTTrainer`: every example is kept and its loss is scaled
   by its source's weight.
3. **Weighted sampling** -- ``WeightedLossSFTTrainer(..., sampling_selection=selection)``: examples are drawn with
   probabilities proportional to their weights (with replacement); the loss stays unweighted.

``mode="filter"`` of the collator drops examples of unselected sources from each batch. Batches then shrink
(their size varies from batch to batch), which is why a warning recommends option 1. A batch whose examples
all come from unselected sources raises an error by default (``on_empty="error"``) rather than reaching the
model empty; with ``on_empty="zero_weight"`` it goes through unchanged with all example weights 0, which the
weighted-loss trainers turn into an exact no-op for the loss.

The weighted loss is the weighted mean over supervised tokens,
``sum_i w_i * sum_t loss_it / sum_i w_i * n_i`` (``n_i`` = supervised tokens of example ``i``), summed over
every micro-batch of a gradient-accumulation step (and every process): all-ones weights give exactly the
ordinary token-mean loss, a weight of 0 removes an example exactly as if it were not in the batch, and the
scale of the weights does not matter, only their ratios.
"""

from __future__ import annotations

import math
import os
import warnings
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from trl import SFTTrainer

from ..data.trainers import (
    FIX_COLUMNS,
    FIX_MERGED,
    BookkeepingColumnsError,
    SubsetSelectTrainerMixin,
    strip_bookkeeping,
)
from ..data.sources import BOOKKEEPING_COLUMNS, SOURCE_COLUMN

__all__ = [
    "EXAMPLE_WEIGHT_KEY",
    "SubsetSelectingDataCollator",
    "WeightedLossTrainerMixin",
    "WeightedLossTrainer",
    "WeightedLossSFTTrainer",
    "SourceWeightedSampler",
    "source_weight_table",
    "example_weights",
]

EXAMPLE_WEIGHT_KEY = "example_weight"
_MODES = ("filter", "weight")
_UNKNOWN = ("keep", "drop", "error")
_ON_EMPTY = ("error", "zero_weight")
_SOURCE_WEIGHTING = ("per_example", "mixture")
_IGNORE_INDEX = -100


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
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
        from ..select.selectors import SourceSelection

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
            "source_counts=hf_subset_select.source_counts(train_dataset)."
        )
    missing = [k for k, v in table.items() if v > 0 and source_counts.get(k, 0) <= 0]
    if missing:
        raise ValueError(
            f"source_counts has no examples for the weighted source(s) {missing}; pass the counts of the dataset "
            "you train on (hf_subset_select.source_counts(train_dataset))."
        )
    total_n = sum(int(source_counts.get(k, 0)) for k in table)
    total_w = sum(table.values())
    return {k: (v / int(source_counts[k])) * (total_n / total_w) if v > 0 else 0.0 for k, v in table.items()}


class _SourcePolicy:
    """Maps a source name to a per-example weight, applying the unknown-source policy (warns once per source)."""

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
        _check_choice("unknown_sources", unknown_sources, _UNKNOWN)
        self._warn_unknown = unknown_sources == "keep"
        _check_choice("source_weighting", source_weighting, _SOURCE_WEIGHTING)
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

    def weight(self, source: Any) -> float:
        """Per-example weight of an example from ``source`` (``nan`` means: drop it as unknown)."""
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
      ``[batch_size]`` with each example's weight; use :class:`WeightedLossTrainer` or
      :class:`WeightedLossSFTTrainer` to turn it into a weighted loss.

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
            ``hf_subset_select.source_counts(train_dataset)``.
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
        _check_choice("mode", mode, _MODES)
        _check_choice("on_empty", on_empty, _ON_EMPTY)
        if not isinstance(weight_key, str) or not weight_key or weight_key in BOOKKEEPING_COLUMNS:
            raise ValueError(f"weight_key must be a non-empty name other than {BOOKKEEPING_COLUMNS}.")
        self.base_collator = base_collator
        self.mode = mode
        self.weight_key = weight_key
        self.on_empty = on_empty
        self._policy = _SourcePolicy(selection, unknown_sources, source_weighting, source_counts, always_keep)
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

    def example_weight(self, source: str) -> float:
        """Weight that an example of ``source`` gets (0 if dropped)."""
        w = self._policy.weight(source)
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
        weights = [self._policy.weight(s) for s in sources]
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


# --------------------------------------------------------------------------------------------------------------
# weighted sampling
# --------------------------------------------------------------------------------------------------------------


def example_weights(
    dataset: Any,
    selection: Any,
    *,
    unknown_sources: str | None = None,
    source_weighting: str = "per_example",
    always_keep: Sequence[str] = (),
) -> torch.Tensor:
    """Per-example weights (float64, one per row) of a tagged dataset under ``selection``.

    Feeds :class:`SourceWeightedSampler` (or ``torch.utils.data.WeightedRandomSampler``). With
    ``source_weighting="mixture"`` the selection's weights are the probabilities of drawing each source.
    """
    names = getattr(dataset, "column_names", None)
    if names is None or SOURCE_COLUMN not in names:
        raise BookkeepingColumnsError(
            f"Weighted sampling needs the {SOURCE_COLUMN!r} column of the training dataset (it has {names}). "
            f"Tag the data with hf_subset_select.tag_sources; if it is tagged: {FIX_COLUMNS}."
        )
    sources = [str(s) for s in dataset[SOURCE_COLUMN]]
    policy = _SourcePolicy(selection, unknown_sources, source_weighting, Counter(sources), always_keep)
    values = [policy.weight(s) for s in sources]
    out = torch.tensor([0.0 if math.isnan(v) else v for v in values], dtype=torch.float64)
    if not bool((out > 0).any()):
        raise ValueError("No example of this dataset has a positive weight under the selection.")
    return out


class SourceWeightedSampler(torch.utils.data.Sampler[int]):
    """Draws indices with probability proportional to ``weights`` (with replacement), reproducibly.

    Every epoch uses the generator seeded with ``seed + epoch``, so all processes of a distributed run draw the
    same sequence (accelerate then gives each process its share of the batches) and a resumed run draws the
    same examples. ``num_samples`` defaults to the number of examples with positive weight.
    """

    def __init__(
        self, weights: torch.Tensor | Sequence[float], num_samples: int | None = None, seed: int = 0
    ):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError("weights must be a non-empty 1-D sequence.")
        if (
            not bool(torch.isfinite(weights).all())
            or bool((weights < 0).any())
            or not bool((weights > 0).any())
        ):
            raise ValueError("weights must be finite, >= 0, and not all 0.")
        self.weights = weights
        self.num_samples = int(num_samples) if num_samples is not None else int((weights > 0).sum())
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}.")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        self.epoch += 1  # the next pass draws anew even if nobody calls set_epoch
        return iter(draws.tolist())


# --------------------------------------------------------------------------------------------------------------
# weighted loss
# --------------------------------------------------------------------------------------------------------------


def _safe_divide(numerator: torch.Tensor, denominator: Any) -> torch.Tensor:
    den = torch.as_tensor(denominator, dtype=torch.float32, device=numerator.device)
    return numerator / torch.where(den > 0, den, torch.ones_like(den))


class WeightedLossTrainerMixin:
    """Mix into a ``Trainer`` subclass (first in the bases) to train with per-example loss weights.

    Batches that carry ``inputs[example_weight_key]`` (a float tensor ``[batch_size]``, e.g. from
    ``SubsetSelectingDataCollator(mode="weight")``) get the loss
    ``sum_i w_i * sum_t loss_it / sum_i w_i * n_i``, where the denominator is summed over all micro-batches of the
    gradient-accumulation step and, with ``average_tokens_across_devices`` (the default), over all processes.
    All-ones weights reproduce the ordinary loss and its gradients; a weight of 0 removes an example exactly.
    Evaluation ignores the weights (the evaluation loss is the ordinary one); batches without weights take the
    trainer's ordinary path.

    Causal LMs (labels shifted by one), encoder-decoder LMs and single-label sequence classifiers are supported.
    Label smoothing and ``compute_loss_func`` are refused.

    Args (keyword-only, besides the trainer's own):
        example_weight_key: batch key of the weights (default ``"example_weight"``).
        sampling_selection: optional selection (``SourceSelection``, path, dict or list) for weighted sampling:
            the training sampler then draws examples with probability proportional to their source's weight.
        sampling_source_weighting: ``"per_example"`` or ``"mixture"`` (the selection's weights are the
            probabilities of drawing each source), see :func:`example_weights`.
        sampling_num_samples: draws per epoch (default: the number of examples with positive weight).
    """

    def __init__(
        self,
        *args: Any,
        example_weight_key: str = EXAMPLE_WEIGHT_KEY,
        sampling_selection: Any = None,
        sampling_source_weighting: str = "per_example",
        sampling_num_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        _check_choice("sampling_source_weighting", sampling_source_weighting, _SOURCE_WEIGHTING)
        self.example_weight_key = example_weight_key
        self.sampling_selection = sampling_selection
        self.sampling_source_weighting = sampling_source_weighting
        self.sampling_num_samples = sampling_num_samples
        if sampling_selection is not None:
            source_weight_table(sampling_selection)  # fail early on a bad selection
        super().__init__(*args, **kwargs)
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError(
                f"{type(self).__name__} does not support label smoothing with example weights; set "
                "label_smoothing_factor=0."
            )
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                f"{type(self).__name__} computes the loss itself; do not pass compute_loss_func (subclass and override "
                "_per_token_loss instead)."
            )

    # ---- sampling -------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.sampling_selection is None:
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        dataset = train_dataset if train_dataset is not None else self.train_dataset  # type: ignore[attr-defined]
        weights = example_weights(
            dataset, self.sampling_selection, source_weighting=self.sampling_source_weighting
        )
        args = self.args  # type: ignore[attr-defined]
        seed = args.data_seed if args.data_seed is not None else args.seed
        return SourceWeightedSampler(weights, num_samples=self.sampling_num_samples, seed=seed)

    # ---- loss -----------------------------------------------------------------------------------------------

    def _weighted_shifts_labels(self) -> bool:
        """Whether the model's loss predicts token t+1 at position t (causal LMs)."""
        cached = getattr(self, "_wl_shifts", None)
        if cached is None:
            from peft import PeftModel
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
            if isinstance(model, PeftModel):
                model = model.get_base_model()
            config = getattr(model, "config", None)
            enc_dec = bool(getattr(config, "is_encoder_decoder", False))
            causal = bool(getattr(self, "_loss_shifts_labels", False)) or (
                type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
            )
            cached = causal and not enc_dec
            self._wl_shifts = cached
        return cached

    def _loss_targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Target ids aligned with the per-token losses (shifted for causal LMs)."""
        if batch.get("shift_labels") is not None:
            return batch["shift_labels"]
        labels = batch["labels"]
        return labels[..., 1:] if self._weighted_shifts_labels() and labels.dim() > 1 else labels

    def _weighted_item_count(self, batch: Mapping[str, Any]) -> torch.Tensor:
        targets = self._loss_targets(batch)
        weights = batch[self.example_weight_key]
        valid = (targets != _IGNORE_INDEX).reshape(targets.shape[0], -1).sum(dim=1).to(torch.float32)
        return (weights.to(device=valid.device, dtype=torch.float32) * valid).sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        key = self.example_weight_key
        if not batch_samples or any(key not in b or "labels" not in b for b in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)  # type: ignore[misc]
        total = torch.stack([self._weighted_item_count(b).to(device) for b in batch_samples]).sum()
        args = self.args  # type: ignore[attr-defined]
        if args.average_tokens_across_devices and args.world_size > 1:
            total = self.accelerator.gather(total).sum()  # type: ignore[attr-defined]
        return total

    def _per_token_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Forward pass; returns (per-item loss, per-item validity mask, outputs), first dimension = batch.

        Items are the supervised positions (causal / seq2seq LM, shifted for causal LMs) or the examples
        (sequence classification). Losses are zero where the mask is False.
        """
        shifts = self._weighted_shifts_labels()
        shift_labels = inputs.pop("shift_labels", None)
        if shifts or shift_labels is not None:
            labels = inputs.pop("labels", None)
        else:
            labels = inputs.get("labels")  # encoder-decoder models build decoder inputs from the labels
        if shift_labels is not None:
            targets = shift_labels
        elif labels is None:
            raise ValueError("Weighted loss needs 'labels' in the batch; the collator produced none.")
        else:
            targets = labels[..., 1:] if shifts and labels.dim() > 1 else labels
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if targets.is_floating_point():
            raise ValueError(
                "Weighted loss supports class / token labels only (integer labels); regression and multi-label "
                "targets are not supported."
            )
        if logits.dim() == targets.dim() + 1 and logits.shape[-2] != targets.shape[-1] and shifts:
            logits = logits[..., :-1, :]
        if logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"Cannot align logits {tuple(logits.shape)} with labels {tuple(targets.shape)} for the weighted loss."
            )
        targets = targets.to(logits.device)
        per_item = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=_IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        return per_item, targets != _IGNORE_INDEX, outputs

    def _reduce_weighted(
        self,
        per_item: torch.Tensor,
        mask: torch.Tensor,
        weights: torch.Tensor,
        num_items_in_batch: Any,
    ) -> torch.Tensor:
        if weights.dim() != 1 or weights.shape[0] != per_item.shape[0]:
            raise ValueError(
                f"The example weights have shape {tuple(weights.shape)} but the batch has {per_item.shape[0]} rows; "
                "weights must be one float per example (packing / padding-free collation is not supported)."
            )
        weights = weights.to(device=per_item.device, dtype=torch.float32)
        rows = per_item.shape[0]
        per_example = per_item.reshape(rows, -1).sum(dim=1)
        numerator = (weights * per_example).sum()
        if num_items_in_batch is None:
            count = mask.reshape(rows, -1).sum(dim=1).to(torch.float32)
            return _safe_divide(numerator, (weights * count).sum())
        loss = _safe_divide(numerator, num_items_in_batch)
        if self.args.average_tokens_across_devices:  # type: ignore[attr-defined]
            # num_items_in_batch counts every process and DDP averages gradients over processes
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1  # type: ignore[attr-defined]
            loss = loss * (self.accelerator.num_processes // tp)  # type: ignore[attr-defined]
        return loss

    def _weighted_compute_loss(
        self, model: Any, inputs: dict[str, Any], weights: torch.Tensor, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        per_item, mask, outputs = self._per_token_loss(model, inputs)
        return self._reduce_weighted(per_item, mask, weights, num_items_in_batch), outputs

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs = dict(inputs)
        weights = inputs.pop(self.example_weight_key, None)
        if weights is None or not model.training:
            self.__dict__.pop("loss_is_scaled_for_ga", None)  # the trainer's own rule applies
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = strip_bookkeeping(inputs)
        loss, outputs = self._weighted_compute_loss(model, inputs, weights, num_items_in_batch)
        # Normalized by the weighted count of the whole accumulated batch -> already scaled for accumulation.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.example_weight_key}
        return super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


class WeightedLossTrainer(WeightedLossTrainerMixin, SubsetSelectTrainerMixin, Trainer):
    """``transformers.Trainer`` with per-example loss weights (:class:`WeightedLossTrainerMixin`) that keeps the
    bookkeeping columns (:class:`~hf_subset_select.SubsetSelectTrainerMixin`)."""


class WeightedLossSFTTrainer(WeightedLossTrainerMixin, SubsetSelectTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with per-example loss weights that keeps the bookkeeping columns.

    The weighted loss uses TRL's fused LM head (no full logits), honours ``loss_type="dft"`` and the MoE auxiliary
    loss, and logs the same ``entropy`` / ``mean_token_accuracy`` / ``num_tokens`` metrics as ``SFTTrainer``
    (unweighted, like TRL's).
    """

    def _weighted_shifts_labels(self) -> bool:
        return True  # TRL's fused LM head scores labels[:, 1:] (or the given shift_labels)

    def _weighted_compute_loss(
        self, model: Any, inputs: dict[str, Any], weights: torch.Tensor, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "sp_enabled", False):
            raise ValueError(
                "WeightedLossSFTTrainer does not support sequence parallelism; use SubsetSelectSFTTrainer with "
                "mode='filter' or selection.apply(dataset)."
            )
        inputs["use_cache"] = False
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)
        per_token = -outputs.log_probs  # zero where the label is ignored
        if self.args.loss_type == "dft":
            per_token = per_token * outputs.log_probs.exp().detach()
        loss = self._reduce_weighted(per_token, outputs.label_mask, weights, num_items_in_batch)
        if getattr(self, "aux_loss_enabled", False) and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_sft_metrics(inputs, outputs)
        return loss, outputs

    def _log_sft_metrics(self, inputs: Mapping[str, Any], outputs: Any) -> None:
        """The training metrics SFTTrainer logs (token entropy, top-1 accuracy, tokens seen), unweighted."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        gather = self.accelerator.gather_for_metrics
        mode = "train" if self.model.training else "eval"
        valid = gather(outputs.label_mask.sum()).sum()
        if getattr(outputs, "entropy", None) is not None:
            entropy = gather(outputs.entropy.detach().sum()).sum()
            metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        if getattr(outputs, "is_top1", None) is not None:
            correct = gather(outputs.is_top1.sum()).sum()
            metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train" and hasattr(self, "_total_train_tokens"):
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                ids = inputs["input_ids"]
                tokens = gather(torch.tensor(ids.numel(), device=ids.device)).sum().item()
            self._total_train_tokens += tokens // max(1, int(getattr(self, "_tp_size", 1)))
        if hasattr(self, "_total_train_tokens"):
            metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if getattr(self, "aux_loss_enabled", False) and getattr(outputs, "aux_loss", None) is not None:
            metrics[mode]["aux_loss"].append(gather(outputs.aux_loss).mean().item())
