"""hf-subset-select: choose auxiliary data sources for a target task from cached projected gradients.

The public names below are re-exported lazily (importing the package does not import torch or
transformers until a name is used), in the style of transformers' own lazy module.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    # config.py
    "MetaInitConfig": "config",
    "CollectConfig": "config",
    "EstimatorConfig": "config",
    "SelectConfig": "config",
    # sources.py
    "tag_sources": "data.sources",
    "tag_target_eval": "data.sources",
    "source_counts": "data.sources",
    "SOURCE_COLUMN": "data.sources",
    "EXAMPLE_ID_COLUMN": "data.sources",
    "BOOKKEEPING_COLUMNS": "data.sources",
    # guard.py
    "BookkeepingColumnsError": "data.trainers",
    "SubsetSelectTrainerMixin": "data.trainers",
    "SubsetSelectTrainer": "data.trainers",
    "SubsetSelectSFTTrainer": "data.trainers",
    "check_bookkeeping": "data.trainers",
    # meta_init.py
    "MetaInitCallback": "collect.meta_init",
    "load_meta_init": "collect.meta_init",
    "MetaInitManifestError": "collect.meta_init",
    # outputs.py / projection.py / per_example.py / cache.py / collector.py
    "token_log_odds_output": "collect.outputs",
    "sequence_log_odds_output": "collect.outputs",
    "classification_margin_output": "collect.outputs",
    "make_projector": "collect.projection",
    "GradientCache": "collect.cache",
    "GradientCacheError": "collect.cache",
    "GradientCollector": "collect.collector",
    "adam_preconditioner": "collect.precondition",
    "adam_step_scalars": "collect.precondition",
    "PreconditionerError": "collect.precondition",
    # estimate/estimator.py / select/registry.py / select/selection.py / select/baselines.py
    "FirstOrderEstimator": "estimate.estimator",
    "calibrate": "estimate.validation",
    "forward_check": "estimate.validation",
    "select_sources": "select.registry",
    "SourceSelection": "select.selection",
    "gradient_similarity_selection": "select.baselines",
    "representation_similarity_selection": "select.baselines",
    "random_selection": "select.baselines",
    "make_synthetic_cache": "demo.synthetic",
    # train/collator.py / weighted_loss.py / sampler.py
    "SubsetSelectingDataCollator": "train.collator",
    "WeightedLossTrainerMixin": "train.weighted_loss",
    "WeightedLossTrainer": "train.weighted_loss",
    "WeightedLossSFTTrainer": "train.weighted_loss",
    "SourceWeightedSampler": "train.sampler",
    "example_weights": "train.weighted_loss",
    "EXAMPLE_WEIGHT_KEY": "train.weighted_loss",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str) -> Any:
    module_name = _EXPORTS.get(name)
    if module_name is None:
        raise AttributeError(f"module 'hf_subset_select' has no attribute {name!r}")
    module = importlib.import_module(f".{module_name}", __name__)
    value = getattr(module, name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)


if TYPE_CHECKING:  # pragma: no cover - static re-exports for type checkers and IDEs
    from .select.baselines import (
        gradient_similarity_selection,
        random_selection,
        representation_similarity_selection,
    )
    from .collect.cache import GradientCache, GradientCacheError
    from .train.collator import SubsetSelectingDataCollator
    from .train.sampler import SourceWeightedSampler
    from .train.weighted_loss import (
        EXAMPLE_WEIGHT_KEY,
        WeightedLossSFTTrainer,
        WeightedLossTrainer,
        WeightedLossTrainerMixin,
        example_weights,
    )
    from .collect.collector import GradientCollector
    from .config import CollectConfig, EstimatorConfig, MetaInitConfig, SelectConfig
    from .estimate.estimator import FirstOrderEstimator
    from .estimate.validation import calibrate, forward_check
    from .data.trainers import (
        BookkeepingColumnsError,
        SubsetSelectSFTTrainer,
        SubsetSelectTrainer,
        SubsetSelectTrainerMixin,
        check_bookkeeping,
    )
    from .collect.meta_init import MetaInitCallback, MetaInitManifestError, load_meta_init
    from .collect.outputs import classification_margin_output, sequence_log_odds_output, token_log_odds_output
    from .collect.precondition import PreconditionerError, adam_preconditioner, adam_step_scalars
    from .collect.projection import make_projector
    from .select.registry import select_sources
    from .select.selection import SourceSelection
    from .data.sources import (
        BOOKKEEPING_COLUMNS,
        EXAMPLE_ID_COLUMN,
        SOURCE_COLUMN,
        source_counts,
        tag_sources,
        tag_target_eval,
    )
    from .demo.synthetic import make_synthetic_cache
