"""Keep the bookkeeping columns (``source``, ``example_id``) alive through Trainer and SFTTrainer.

Two things remove them by default:

* ``Trainer`` drops dataset columns that ``model.forward`` does not accept (``remove_unused_columns=True``);
  TRL's ``SFTTrainer`` keeps only ``input_ids``, ``labels`` and ``seq_lengths``.
* TRL's packing and padding-free collation merge several examples into one row, after which no
  per-example source exists.

The fix offered here is a mixin, :class:`SubsetSelectTrainerMixin`, with ready classes
:class:`SubsetSelectTrainer` and :class:`SubsetSelectSFTTrainer`: they keep the two columns through column
removal, hand them to a bookkeeping-aware collator (such as
:class:`~hf_subset_select.SubsetSelectingDataCollator`) or strip them before any other collator, and never
pass them to ``model.forward``. Where examples are merged, :func:`check_bookkeeping` raises
:class:`BookkeepingColumnsError` with the fix.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from transformers import Trainer
from trl import SFTTrainer

from .sources import BOOKKEEPING_COLUMNS, BookkeepingColumnsError

__all__ = [
    "BookkeepingColumnsError",
    "check_bookkeeping",
    "strip_bookkeeping",
    "SubsetSelectTrainerMixin",
    "SubsetSelectTrainer",
    "SubsetSelectSFTTrainer",
]

FIX_COLUMNS = (
    "use hf_subset_select.SubsetSelectTrainer / SubsetSelectSFTTrainer (or add SubsetSelectTrainerMixin to your "
    "trainer class), or set remove_unused_columns=False in your TrainingArguments/SFTConfig and wrap your data "
    "collator in hf_subset_select.SubsetSelectingDataCollator, which strips the columns before the model sees them"
)
FIX_MERGED = (
    "set packing=False and padding_free=False in your SFTConfig: merged rows have no single source, so per-source "
    "filtering, weighting and per-example gradients are undefined for them"
)


def _merges_examples(args: Any) -> list[str]:
    return [name for name in ("packing", "padding_free") if bool(getattr(args, name, False))]


def check_bookkeeping(
    args: Any = None,
    dataset: Any = None,
    *,
    columns: Sequence[str] = BOOKKEEPING_COLUMNS,
    purpose: str = "source selection",
) -> None:
    """Raise :class:`BookkeepingColumnsError` (with the fix) if ``args`` merge examples or ``dataset`` lost ``columns``.

    Args:
        args: ``TrainingArguments`` / ``SFTConfig`` (or None); ``packing`` and ``padding_free`` are refused.
        dataset: a dataset (or anything with ``column_names``) whose columns are checked, or None.
        columns: the columns that must be present.
        purpose: what needs them, for the message.
    """
    merged = _merges_examples(args)
    if merged:
        raise BookkeepingColumnsError(
            f"{' and '.join(merged)} is on, so examples are merged and {purpose} cannot tell sources apart: {FIX_MERGED}."
        )
    if dataset is None:
        return
    names = getattr(dataset, "column_names", None)
    if names is None:
        return  # e.g. a torch Dataset: checked per batch by the collator instead
    if isinstance(names, Mapping):  # DatasetDict
        names = sorted({c for cols in names.values() for c in cols})
    missing = [c for c in columns if c not in names]
    if missing:
        raise BookkeepingColumnsError(
            f"The dataset has no {missing} column(s) (it has {list(names)}), which {purpose} needs. Either the "
            "dataset was not tagged (use hf_subset_select.tag_sources) or the trainer removed the columns: "
            f"{FIX_COLUMNS}."
        )


def strip_bookkeeping(features: Any) -> Any:
    """Remove the bookkeeping keys from a list of feature dicts or from one batch dict (returns a new object)."""
    if isinstance(features, Mapping):
        return {k: v for k, v in features.items() if k not in BOOKKEEPING_COLUMNS}
    return [{k: v for k, v in f.items() if k not in BOOKKEEPING_COLUMNS} for f in features]


class _StripBookkeepingCollator:
    """Wraps a collator that does not know the bookkeeping columns: strips them first."""

    handles_bookkeeping = True

    def __init__(self, base: Callable[[list[dict[str, Any]]], Any]) -> None:
        self.base = base

    def __call__(self, features: list[dict[str, Any]]) -> Any:
        return self.base(strip_bookkeeping(features))

    def __getattr__(self, name: str) -> Any:  # behave like the wrapped collator (e.g. TRL reads attributes)
        return getattr(self.base, name)


def _bind(callback: Any, trainer: Any) -> None:
    bind = getattr(callback, "bind_trainer", None)
    if callable(bind) and not isinstance(callback, type):
        bind(trainer)


class SubsetSelectTrainerMixin:
    """Mix into a ``Trainer`` subclass (first in the bases) to keep ``source`` / ``example_id`` for the plugin.

    * the columns survive ``remove_unused_columns=True``;
    * a collator with ``handles_bookkeeping = True`` (e.g. ``SubsetSelectingDataCollator``) receives them;
      any other collator gets them stripped;
    * they are removed from the inputs before ``model.forward`` (training and evaluation);
    * packing / padding-free are refused with :class:`BookkeepingColumnsError`;
    * callbacks with a ``bind_trainer(trainer)`` method (e.g. :class:`~hf_subset_select.GradientCollector`) receive
      the trainer, so that they can read its processed datasets, data collator and processing code.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        training_args = kwargs.get("args", args[1] if len(args) > 1 else None)
        check_bookkeeping(training_args, purpose="SubsetSelectTrainerMixin")
        super().__init__(*args, **kwargs)
        collator = getattr(self, "data_collator", None)
        if collator is not None and not getattr(collator, "handles_bookkeeping", False):
            self.data_collator = _StripBookkeepingCollator(collator)
        for callback in self.callback_handler.callbacks:
            _bind(callback, self)

    def add_callback(self, callback: Any) -> None:
        super().add_callback(callback)  # type: ignore[misc]
        _bind(self.callback_handler.callbacks[-1], self)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        columns = list(self._signature_columns)  # type: ignore[has-type]
        self._signature_columns = columns + [c for c in BOOKKEEPING_COLUMNS if c not in columns]

    def compute_loss(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().compute_loss(model, strip_bookkeeping(inputs), *args, **kwargs)  # type: ignore[misc]

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        return super().prediction_step(model, strip_bookkeeping(inputs), *args, **kwargs)  # type: ignore[misc]


class SubsetSelectTrainer(SubsetSelectTrainerMixin, Trainer):
    """``transformers.Trainer`` that keeps the bookkeeping columns (see :class:`SubsetSelectTrainerMixin`)."""


class SubsetSelectSFTTrainer(SubsetSelectTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` that keeps the bookkeeping columns (see :class:`SubsetSelectTrainerMixin`)."""
