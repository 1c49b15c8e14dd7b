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
    "tag_sources": "sources",
    "tag_target_eval": "sources",
    "source_counts": "sources",
    "SOURCE_COLUMN": "sources",
    "EXAMPLE_ID_COLUMN": "sources",
    "BOOKKEEPING_COLUMNS": "sources",
    # guard.py
    "BookkeepingColumnsError": "guard",
    "SubsetSelectTrainerMixin": "guard",
    "SubsetSelectTrainer": "guard",
    "SubsetSelectSFTTrainer": "guard",
    "check_bookkeeping": "guard",
    # meta_init.py
    "MetaInitCallback": "meta_init",
    "load_meta_init": "meta_init",
    "MetaInitManifestError": "meta_init",
    # outputs.py / projection.py / per_example.py / cache.py / collector.py
    "token_log_odds_output": "outputs",
    "sequence_log_odds_output": "outputs",
    "classification_margin_output": "outputs",
    "make_projector": "projection",
    "GradientCache": "cache",
    "GradientCacheError": "cache",
    "GradientCollector": "collector",
    "adam_preconditioner": "precondition",
    "adam_step_scalars": "precondition",
    "PreconditionerError": "precondition",
    # estimate.py / select.py / baselines.py
    "FirstOrderEstimator": "estimate",
    "select_sources": "select",
    "SourceSelection": "select",
    "gradient_similarity_selection": "baselines",
    "representation_similarity_selection": "baselines",
    "random_selection": "baselines",
    "make_synthetic_cache": "synthetic",
    # collator.py
    "SubsetSelectingDataCollator": "collator",
    "WeightedLossTrainerMixin": "collator",
    "WeightedLossTrainer": "collator",
    "WeightedLossSFTTrainer": "collator",
    "SourceWeightedSampler": "collator",
    "example_weights": "collator",
    "EXAMPLE_WEIGHT_KEY": "collator",
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
    from .baselines import (
        gradient_similarity_selection,
        random_selection,
        representation_similarity_selection,
    )
    from .cache import GradientCache, GradientCacheError
    from .collator import (
        EXAMPLE_WEIGHT_KEY,
        SourceWeightedSampler,
        SubsetSelectingDataCollator,
        WeightedLossSFTTrainer,
        WeightedLossTrainer,
        WeightedLossTrainerMixin,
        example_weights,
    )
    from .collector import GradientCollector
    from .config import CollectConfig, EstimatorConfig, MetaInitConfig, SelectConfig
    from .estimate import FirstOrderEstimator
    from .guard import (
        BookkeepingColumnsError,
        SubsetSelectSFTTrainer,
        SubsetSelectTrainer,
        SubsetSelectTrainerMixin,
        check_bookkeeping,
    )
    from .meta_init import MetaInitCallback, MetaInitManifestError, load_meta_init
    from .outputs import classification_margin_output, sequence_log_odds_output, token_log_odds_output
    from .precondition import PreconditionerError, adam_preconditioner, adam_step_scalars
    from .projection import make_projector
    from .select import SourceSelection, select_sources
    from .sources import (
        BOOKKEEPING_COLUMNS,
        EXAMPLE_ID_COLUMN,
        SOURCE_COLUMN,
        source_counts,
        tag_sources,
        tag_target_eval,
    )
    from .synthetic import make_synthetic_cache
