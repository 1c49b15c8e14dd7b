"""Rows exactly as a bound Trainer trains on them: its processed datasets, its processing code, its collator.

When a :class:`~hf_subset_select.GradientCollector` is a callback of a ``SubsetSelectTrainer`` /
``SubsetSelectSFTTrainer`` (the trainer hands itself over through ``bind_trainer``), the training rows are the
trainer's own processed ``train_dataset`` (which keeps ``source`` and ``example_id``), and raw target rows are
processed by the trainer's own code: TRL's ``SFTTrainer._prepare_dataset`` (chat template, special tokens, EOS,
completion / assistant masks, truncation), without packing or a formatting function. Rows that already have
``input_ids`` are used as they are. Every model input the trainer produces is kept (``input_ids``, ``labels``,
``token_type_ids``, the class ``label``). A plain ``Trainer`` has no processing code: its raw rows are encoded by
:func:`~hf_subset_select.data.encode.encode_row` with the collector's ``tokenizer=``, else the trainer's
``processing_class``, else the tokenizer of its data collator (the quickstart passes no ``processing_class``).
"""

from __future__ import annotations

from typing import Any

import torch

from ..data.encode import encode_row
from ..data.sources import BOOKKEEPING_COLUMNS
from ..data.trainers import _StripBookkeepingCollator, strip_bookkeeping
from .rows import RowSource

__all__ = ["TrainerRows", "trainer_tokenizer"]

_NO_LIMIT = 1 << 62


def trainer_tokenizer(trainer: Any) -> Any:
    """The trainer's tokenizer (a processor's inner tokenizer), or None."""
    processing = getattr(trainer, "processing_class", None)
    return getattr(processing, "tokenizer", processing)


def _columns(dataset: Any) -> list[str]:
    names = getattr(dataset, "column_names", None)
    if names is not None:
        return list(names)
    return list(dataset[0]) if len(dataset) else []


def _plain_collator(collator: Any) -> Any:
    """The collator under the plugin's wrappers (bookkeeping stripping, source filtering / weighting)."""
    while True:
        if isinstance(collator, _StripBookkeepingCollator):
            collator = collator.base
        elif "base_collator" in getattr(collator, "__dict__", {}):
            collator = collator.__dict__["base_collator"]
        else:
            return collator


class TrainerRows(RowSource):
    """The rows of a bound Trainer (see the module docstring).

    Args:
        trainer: the Trainer the collector is a callback of.
        train_dataset: the collector's training rows, used (processed by the trainer's code) only when the trainer's
            ``train_dataset`` lacks the bookkeeping columns.
        target_dataset: the collector's target rows.
        max_length: ``CollectConfig.max_length`` (rows longer than that are cut, which the self-check reports).
        kind: the model kind.
        tokenizer: encodes raw rows the trainer has no processing code for (default: its ``processing_class``).
    """

    reference = "the trainer's rows"

    def __init__(
        self,
        trainer: Any,
        train_dataset: Any,
        target_dataset: Any,
        max_length: int,
        kind: str,
        tokenizer: Any = None,
    ) -> None:
        self.trainer = trainer
        self.tokenizer = tokenizer if tokenizer is not None else trainer_tokenizer(trainer)
        collator = getattr(trainer, "data_collator", None)
        if self.tokenizer is None and collator is not None:  # e.g. DataCollatorWithPadding(tok)
            self.tokenizer = getattr(_plain_collator(collator), "tokenizer", None)
        own = getattr(trainer, "train_dataset", None)
        if own is None or any(c not in _columns(own) for c in BOOKKEEPING_COLUMNS):
            own = self._prepare(train_dataset, "collector_train")
        super().__init__(own, self._prepare(target_dataset, "collector_target"), max_length, kind)

    def _prepare(self, dataset: Any, name: str) -> Any:
        """``dataset`` processed by the trainer's own code (TRL's ``_prepare_dataset``) unless already tokenized."""
        prepare = getattr(self.trainer, "_prepare_dataset", None)
        if "input_ids" in _columns(dataset) or not callable(prepare) or not hasattr(dataset, "map"):
            return dataset
        return prepare(
            dataset,
            getattr(self.trainer, "processing_class", None),
            self.trainer.args,
            packing=False,
            formatting_func=None,
            dataset_name=name,
        )

    def _row(self, split: int, row: int, max_length: int) -> dict[str, Any]:
        return encode_row(dict(self.dataset(split)[int(row)]), self.tokenizer, max_length, self.kind)

    def encode(self, split: int, row: int) -> dict[str, Any]:
        return self._row(split, row, self.max_length)

    def as_trained(self, split: int, rows: list[int]) -> tuple[list[dict[str, Any]], dict[str, torch.Tensor]]:
        seen = [self._row(split, r, _NO_LIMIT) for r in rows]
        features = [dict(self.dataset(split)[int(r)]) for r in rows]
        if "input_ids" not in features[0]:  # raw rows a plain Trainer cannot process: its collator gets ours
            features = seen
        elif getattr(self.trainer.args, "remove_unused_columns", True):
            self.trainer._set_signature_columns_if_needed()
            keep = set(self.trainer._signature_columns)
            features = [{k: v for k, v in f.items() if k in keep} for f in features]
        batch = _plain_collator(self.trainer.data_collator)(strip_bookkeeping(features))
        return seen, dict(batch)
