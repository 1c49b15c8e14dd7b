"""Step 5, the target fine-tune: apply a selection through the data collator (:mod:`.collator`, with the per-source
weight table), a weighted loss (:mod:`.weighted_loss`) or a weighted sampler (:mod:`.sampler`); :mod:`.regime` checks that the fine-tune stayed in the regime the estimate
models."""

from .collator import EXAMPLE_WEIGHT_KEY, SubsetSelectingDataCollator, source_weight_table
from .regime import RegimeCheckCallback, RegimeError
from .sampler import SourceWeightedSampler
from .weighted_loss import (
    WeightedLossSFTTrainer,
    WeightedLossTrainer,
    WeightedLossTrainerMixin,
    example_weights,
)

__all__ = [
    "EXAMPLE_WEIGHT_KEY",
    "SubsetSelectingDataCollator",
    "source_weight_table",
    "SourceWeightedSampler",
    "RegimeCheckCallback",
    "RegimeError",
    "WeightedLossTrainerMixin",
    "WeightedLossTrainer",
    "WeightedLossSFTTrainer",
    "example_weights",
]
