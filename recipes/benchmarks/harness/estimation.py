"""The one place where benchmarks build estimators, calibrate them, run forward checks and baseline selections.

Every call into these parts of the library goes through one function here, so a change of their call form is one
line to change. Estimators are only built as ``FirstOrderEstimator(cache, EstimatorConfig(...))``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .stats import fidelity_metrics


def make_estimator(cache: Any, **settings: Any) -> Any:
    """``FirstOrderEstimator(cache, EstimatorConfig(**settings))``."""
    from hf_subset_select import EstimatorConfig, FirstOrderEstimator

    return FirstOrderEstimator(cache, EstimatorConfig(**settings))


def estimator_for_training_args(cache: Any, training_args: Any) -> Any:
    """An estimator with the budget λ rule of the fine-tune that ``training_args`` describe."""
    from hf_subset_select import EstimatorConfig, FirstOrderEstimator

    return FirstOrderEstimator(cache, EstimatorConfig.from_training_args(training_args))


def calibrate(estimator: Any, real_results: Any, **kwargs: Any) -> dict[str, Any]:
    """Fit λ and the step scale to real fine-tuning results (the estimator keeps them); returns the report."""
    from hf_subset_select import calibrate as calibrate_estimator

    return calibrate_estimator(estimator, real_results, **kwargs)


def forward_check(
    estimator: Any, model: Any, subsets: Any, target_dataset: Any, **kwargs: Any
) -> torch.Tensor:
    """Target losses at θ* + the fitted step of each subset, evaluated for real (``model`` holds θ*)."""
    from hf_subset_select import forward_check as check

    return check(estimator, model, subsets, target_dataset, **kwargs)


def gradient_similarity(cache: Any, k: int | None) -> Any:
    """The gradient-similarity baseline keeping the ``k`` most similar sources (None: its own keep rule, the
    sources above the candidates' mean cosine)."""
    from hf_subset_select.select.baselines import gradient_similarity_selection

    return gradient_similarity_selection(cache, top_k=k)


def representation_similarity(cache: Any, k: int | None) -> Any:
    """The representation-similarity baseline keeping the ``k`` most similar sources (None: its own keep rule,
    the sources above the candidates' mean cosine)."""
    from hf_subset_select.select.baselines import representation_similarity_selection

    return representation_similarity_selection(cache, top_k=k)


def random_baseline(cache: Any, k: int, seed: int) -> Any:
    """``k`` random sources (seeded)."""
    from hf_subset_select.select.baselines import random_selection

    return random_selection(cache, k=k, seed=seed)


def with_l2(estimator: Any, l2: float, step_scale: float = 1.0) -> None:
    """Set the estimator's λ and step scale in place (e.g. back to the automatic λ before a calibration)."""
    estimator.l2, estimator.step_scale = l2, step_scale


def budget_metrics(
    estimator: Any,
    subsets: Sequence[tuple[str, ...]],
    truth: Sequence[float],
    base: float,
    other: Sequence[float],
    *,
    lr: float,
    steps: int,
    optimizer: str,
    batch_size: int,
) -> dict[str, Any]:
    """The ``budget_*`` figures: estimates at the budget rule's λ = 1 / (η_eff · steps) of the real fine-tunes (no real
    result used), step scale 1; the estimator's λ and step scale are restored afterwards."""
    before = estimator.l2, estimator.step_scale
    lam = estimator.budget_l2(lr, steps, optimizer, batch_size)
    with_l2(estimator, lam)
    estimates = estimator.estimate([list(s) for s in subsets]).tolist()
    with_l2(estimator, *before)
    m = fidelity_metrics(estimates, truth, base, other)
    return {
        "budget_l2": lam,
        "budget_spearman": m["spearman"],
        "budget_mean_relative_error": m["mean_relative_error"],
        "budget_error_ratio_vs_no_change": m["mean_relative_error"] / m["no_change_mean_relative_error"],
        "estimates_budget": estimates,
    }


def project_cache(cache: Any, dim: int, shapes: list[tuple[str, tuple[int, ...]]]) -> Any:
    """The identity-projection ``cache`` projected to ``dim`` with the collector's own projector.

    Projecting is linear, so this equals collecting at that ``dim``; the feature scale of a preconditioned cache is
    kept (the forward check lifts steps by it). ``shapes`` names the trainable parameters in order.
    """
    from hf_subset_select.collect.projection import make_projector

    proj = make_projector("auto", dim, 0, shapes)
    feats = torch.cat(
        [proj.project_flat(cache.features[i : i + 256]) for i in range(0, cache.num_examples, 256)]
    )
    manifest = {**cache.manifest, "projection": proj.manifest()}
    manifest.pop("fingerprint", None)
    return cache.replace(features=feats, manifest=manifest, representations=None)


def caches_by_dim(
    cache: Any, dims: Sequence[str], shapes: list[tuple[str, tuple[int, ...]]]
) -> dict[str, Any]:
    """``{d: cache at d}`` for each entry of ``dims`` (``"identity"``: ``cache`` itself, else an integer d)."""
    return {d: cache if d == "identity" else project_cache(cache, int(d), shapes) for d in dims}
