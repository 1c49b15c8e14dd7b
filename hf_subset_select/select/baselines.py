"""Baseline selectors, for comparisons in benchmarks (scores: higher is better):

* ``gradient_similarity`` (in the spirit of LESS): mean cosine between a source's training gradients and the
  target's gradients;
* ``representation_similarity``: mean cosine between a source's last-hidden-state representations and the
  target's;
* ``random``: seeded random draws.

They read only the estimator's cache, candidate sources and target rows. Without ``top_k`` or ``threshold``
the similarity baselines keep the sources above the candidates' mean similarity, and ``random`` keeps
round(subset_ratio · number of candidates) of them (at least 1).

The functions :func:`gradient_similarity_selection`, :func:`representation_similarity_selection` and
:func:`random_selection` run them on a :class:`~hf_subset_select.GradientCache` directly (no estimator).
"""

from __future__ import annotations

from abc import abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from ..collect.cache import GradientCache
from ..config import SelectConfig
from .base import Selector, SelectorScores, best_first
from .registry import get_selector, register_selector
from .selection import SourceSelection

__all__ = [
    "GradientSimilaritySelector",
    "RepresentationSimilaritySelector",
    "RandomSelector",
    "gradient_similarity_selection",
    "representation_similarity_selection",
    "random_selection",
]


def _require_target(cache: GradientCache) -> None:
    if not bool(cache.target_mask.any()):
        raise ValueError(
            "The cache has no target split (no rows with split=1); collect it with "
            "GradientCollector(..., target_dataset=<target evaluation split>)."
        )


def _unit(values: torch.Tensor) -> torch.Tensor:
    v = values.to(torch.float64)
    return v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)


def row_target_cosines(
    values: torch.Tensor,
    cache: GradientCache,
    target_values: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per cache row i: the mean over the target rows j of cos(v_i, v_j), float64 of shape (N,).

    ``target_values``: the target rows' vectors from a separate target cache (default: ``cache``'s target rows)."""
    unit = _unit(values)
    target = unit[cache.target_mask] if target_values is None else _unit(target_values)
    return unit @ target.mean(0)


def _mean_cosine_scores(
    values: torch.Tensor, cache: GradientCache, names: list[str], target_values: torch.Tensor | None = None
) -> torch.Tensor:
    """Per source: mean over its training rows i and the target rows j of cos(v_i, v_j)."""
    cos = row_target_cosines(values, cache, target_values)
    out = torch.empty(len(names), dtype=torch.float64)
    for k, name in enumerate(names):
        rows = cache.train_mask & (cache.source_index == cache.source_id(name))
        out[k] = cos[rows].mean()
    return out


class _SimilaritySelector(Selector):
    """Scores sources by the mean cosine of :meth:`vectors` between their training rows and the target rows."""

    lower_is_better = False

    @abstractmethod
    def vectors(self, cache: GradientCache) -> torch.Tensor:
        """One vector per cache row."""

    def score(self, estimator: Any, names: list[str], config: SelectConfig) -> SelectorScores:
        cache = estimator.cache
        target = getattr(estimator, "target_cache", cache)  # a separate target cache (train_cache=...)
        _require_target(target)
        target_values = None if target is cache else self.vectors(target)[target.target_mask]
        scores = _mean_cosine_scores(self.vectors(cache), cache, names, target_values)
        mean = float(scores.mean())
        return SelectorScores(
            scores=scores, default_keep=[n for n, v in zip(names, scores.tolist()) if v > mean]
        )


@register_selector("gradient_similarity")
class GradientSimilaritySelector(_SimilaritySelector):
    """Score = mean cosine similarity of the source's (projected) gradients to the target's gradients."""

    def vectors(self, cache: GradientCache) -> torch.Tensor:
        return cache.features


@register_selector("representation_similarity")
class RepresentationSimilaritySelector(_SimilaritySelector):
    """Score = mean cosine similarity of the source's representations (mean last hidden states,
    ``cache.representations``) to the target's."""

    def vectors(self, cache: GradientCache) -> torch.Tensor:
        if cache.representations is None:
            raise ValueError(
                "The cache has no representations, which representation similarity needs. Re-collect it with "
                "CollectConfig(representations=True), or use method='gradient_similarity' instead."
            )
        return cache.representations


@register_selector("random")
class RandomSelector(Selector):
    """Score = a seeded uniform draw per source (``config.seed``); keeps the sources with the highest draws."""

    lower_is_better = False

    def score(self, estimator: Any, names: list[str], config: SelectConfig) -> SelectorScores:
        _require_target(getattr(estimator, "target_cache", estimator.cache))
        gen = torch.Generator().manual_seed(config.seed)
        draws = torch.rand(len(names), generator=gen, dtype=torch.float64)
        k = config.top_k if config.top_k is not None else max(1, round(config.subset_ratio * len(names)))
        keep = best_first(names, draws, lower_is_better=False)[:k]
        return SelectorScores(scores=draws, default_keep=keep, info={"seed": config.seed, "k": k})


# ----------------------------------------------------------------------------------------------------------
# the baselines on a cache, without an estimator
# ----------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CacheCandidates:
    """A cache's candidate sources, in the form selectors read from an estimator.

    The candidates are the cache's training sources, less the target's own training source when
    ``include_target_train`` (which, as in the estimator, is then always kept on top of a selection).
    """

    cache: GradientCache
    sources: list[str]
    target_source: str | None

    @classmethod
    def of(cls, obj: Any, include_target_train: bool = True) -> Any:
        """``obj`` itself when it is an estimator, else the candidates of the cache ``obj``."""
        if isinstance(obj, GradientCache):
            forced = obj.target_source if include_target_train else None
            return cls(obj, [s for s in obj.train_sources if s != forced], obj.target_source)
        if hasattr(obj, "cache") and hasattr(obj, "sources"):
            return obj
        raise TypeError(f"Expected a GradientCache or a FirstOrderEstimator, got {type(obj).__name__}.")


def gradient_similarity_selection(
    cache: Any,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    include_target_train: bool = True,
) -> SourceSelection:
    """Score each source by the mean cosine similarity of its gradients to the target's gradients.

    ``cache`` is a :class:`~hf_subset_select.GradientCache` or an estimator. Keeps the ``top_k`` most similar
    sources, or those above ``threshold``, or (default) those above the candidates' mean similarity. The same as
    ``select_sources(estimator, method="gradient_similarity", ...)``.
    """
    config = SelectConfig(
        method="gradient_similarity", top_k=top_k, threshold=threshold, temperature=temperature
    )
    return get_selector("gradient_similarity").select(CacheCandidates.of(cache, include_target_train), config)


def representation_similarity_selection(
    cache: Any,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    include_target_train: bool = True,
) -> SourceSelection:
    """Score each source by the mean cosine similarity of its representations (mean last hidden states,
    ``cache.representations``) to the target's. Same keep rules as the gradient baseline."""
    config = SelectConfig(
        method="representation_similarity", top_k=top_k, threshold=threshold, temperature=temperature
    )
    return get_selector("representation_similarity").select(
        CacheCandidates.of(cache, include_target_train), config
    )


def random_selection(
    cache: Any,
    *,
    k: int | None = None,
    ratio: float = 0.5,
    seed: int = 0,
    include_target_train: bool = True,
) -> SourceSelection:
    """Keep ``k`` random sources (default: round(ratio · number of candidates), at least 1), seeded.

    Scores are the random draws (higher is better), so the kept sources are the k highest.
    """
    candidates = CacheCandidates.of(cache, include_target_train)
    n = len(candidates.sources)
    if k is None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
        k = max(1, round(ratio * n))
    if not 0 < k <= n:
        raise ValueError(f"k must lie in [1, {n}], got {k}.")
    return get_selector("random").select(candidates, SelectConfig(method="random", top_k=k, seed=seed))
