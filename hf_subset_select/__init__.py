"""hf-subset-select: choose auxiliary data sources for a target task from cached projected gradients.

The pipeline, one subpackage per step:

* :mod:`hf_subset_select.data`: tag every source's rows (``tag_sources``), keep the bookkeeping columns through
  the Trainer (``SubsetSelectTrainer`` / ``SubsetSelectSFTTrainer``);
* :mod:`hf_subset_select.collect`: the meta initialization θ* (``MetaInitCallback``) and the gradient cache
  (``GradientCollector`` -> ``GradientCache``);
* :mod:`hf_subset_select.estimate`: the first-order estimate of any subset's fine-tuning loss
  (``FirstOrderEstimator``), checked against real models (``calibrate``, ``forward_check``);
* :mod:`hf_subset_select.select`: sources scored and kept (``select_sources`` -> ``SourceSelection``);
* :mod:`hf_subset_select.train`: the target fine-tune filters or weights sources
  (``SubsetSelectingDataCollator``, ``WeightedLossTrainer`` / ``WeightedLossSFTTrainer``).

The names below are the public API, re-exported lazily (importing the package does not import torch or
transformers until a name is used). Everything else lives in the subpackages.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> module that defines it, in pipeline order
_EXPORTS: dict[str, str] = {
    # settings
    "MetaInitConfig": "config",
    "CollectConfig": "config",
    "EstimatorConfig": "config",
    "SelectConfig": "config",
    # 0. data
    "tag_sources": "data.sources",
    "tag_target_eval": "data.sources",
    "SubsetSelectTrainerMixin": "data.trainers",
    "SubsetSelectTrainer": "data.trainers",
    "SubsetSelectSFTTrainer": "data.trainers",
    "BookkeepingColumnsError": "data.trainers",
    # 1-2. θ* and the gradient cache
    "MetaInitCallback": "collect.meta_init",
    "load_meta_init": "collect.meta_init",
    "GradientCollector": "collect.collector",
    "GradientCache": "collect.cache",
    "GradientCacheError": "collect.cache",
    # 3. estimate
    "FirstOrderEstimator": "estimate.estimator",
    "calibrate": "estimate.validation",
    "forward_check": "estimate.validation",
    # 4. select
    "select_sources": "select.registry",
    "SourceSelection": "select.selection",
    "verify_selection": "select.verify",
    # 5. the target fine-tune
    "SubsetSelectingDataCollator": "train.collator",
    "WeightedLossTrainer": "train.weighted_loss",
    "WeightedLossSFTTrainer": "train.weighted_loss",
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
    from .collect.cache import GradientCache, GradientCacheError
    from .collect.collector import GradientCollector
    from .collect.meta_init import MetaInitCallback, load_meta_init
    from .config import CollectConfig, EstimatorConfig, MetaInitConfig, SelectConfig
    from .data.sources import tag_sources, tag_target_eval
    from .data.trainers import (
        BookkeepingColumnsError,
        SubsetSelectSFTTrainer,
        SubsetSelectTrainer,
        SubsetSelectTrainerMixin,
    )
    from .estimate.estimator import FirstOrderEstimator
    from .estimate.validation import calibrate, forward_check
    from .select.registry import select_sources
    from .select.selection import SourceSelection
    from .select.verify import verify_selection
    from .train.collator import SubsetSelectingDataCollator
    from .train.weighted_loss import WeightedLossSFTTrainer, WeightedLossTrainer
