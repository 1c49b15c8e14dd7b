"""Baseline source selections, in the same result type, for comparisons in benchmarks.

* gradient similarity (in the spirit of LESS): mean cosine between a source's training gradients and the
  target's gradients;
* representation similarity: mean cosine between a source's last-hidden-state representations and the
  target's;
* random: a seeded random subset.

Each takes a :class:`~hf_subset_select.GradientCache` (or an estimator, whose cache and candidate
sources are used) and returns a :class:`~hf_subset_select.SourceSelection`.
"""

from __future__ import annotations

from typing import Any

import torch

from ..collect.cache import GradientCache
from .selectors import SourceSelection, cache_manifest, scores_to_weights

__all__ = ["gradient_similarity_selection", "representation_similarity_selection", "random_selection"]


def _candidates(obj: Any, include_target_train: bool) -> tuple[GradientCache, list[str], str | None]:
    """(cache, candidate sources, target's own training source)."""
    if isinstance(obj, GradientCache):
        cache = obj
        forced = cache.target_source if include_target_train else None
        names = [s for s in cache.train_sources if s != forced]
    elif hasattr(obj, "cache") and hasattr(obj, "sources"):
        cache, names = obj.cache, list(obj.sources)
    else:
        raise TypeError(f"Expected a GradientCache or a FirstOrderEstimator, got {type(obj).__name__}.")
    if not bool(cache.target_mask.any()):
        raise ValueError(
            "The cache has no target split (no rows with split=1); collect it with "
            "GradientCollector(..., target_dataset=<target evaluation split>)."
        )
    if not names:
        raise ValueError("The cache has no candidate training sources.")
    return cache, names, cache.target_source


def _mean_cosine_scores(values: torch.Tensor, cache: GradientCache, names: list[str]) -> torch.Tensor:
    """Per source: mean over its training rows i and the target rows j of cos(v_i, v_j)."""
    v = values.to(torch.float64)
    unit = v / v.norm(dim=1, keepdim=True).clamp_min(1e-30)
    target_mean = unit[cache.target_mask].mean(0)
    cos = unit @ target_mean  # mean_j cos(v_i, v_j) for every row i
    out = torch.empty(len(names), dtype=torch.float64)
    for k, name in enumerate(names):
        rows = cache.train_mask & (cache.source_index == cache.source_id(name))
        out[k] = cos[rows].mean()
    return out


def _select_by_similarity(
    method: str,
    cache: GradientCache,
    names: list[str],
    target_source: str | None,
    scores: torch.Tensor,
    top_k: int | None,
    threshold: float | None,
    temperature: float,
    info: dict[str, Any],
) -> SourceSelection:
    if top_k is not None:
        if not 0 < top_k <= len(names):
            raise ValueError(f"top_k must lie in [1, {len(names)}], got {top_k}.")
        order = torch.argsort(-scores, stable=True)[:top_k].tolist()
        chosen = {names[i] for i in order}
    elif threshold is not None:
        chosen = {n for n, v in zip(names, scores.tolist()) if v > threshold}
    else:  # above the mean similarity of the candidates
        mean = float(scores.mean())
        chosen = {n for n, v in zip(names, scores.tolist()) if v > mean}
    selected = [n for n in names if n in chosen]
    score_dict = {n: float(v) for n, v in zip(names, scores.tolist())}
    return SourceSelection(
        method=method,
        sources=names,
        scores=score_dict,
        selected=selected,
        weights=scores_to_weights(score_dict, selected, lower_is_better=False, temperature=temperature),
        target_source=target_source,
        lower_is_better=False,
        info=info,
        manifest=cache_manifest(cache),
    )


def gradient_similarity_selection(
    cache: Any,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    include_target_train: bool = True,
) -> SourceSelection:
    """Score each source by the mean cosine similarity of its gradients to the target's gradients.

    Keeps the ``top_k`` most similar sources, or those above ``threshold``, or (default) those above
    the candidates' mean similarity. Scores: higher is better.
    """
    cache, names, target_source = _candidates(cache, include_target_train)
    scores = _mean_cosine_scores(cache.features, cache, names)
    return _select_by_similarity(
        "gradient_similarity", cache, names, target_source, scores, top_k, threshold, temperature, {}
    )


def representation_similarity_selection(
    cache: Any,
    *,
    top_k: int | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    include_target_train: bool = True,
) -> SourceSelection:
    """Score each source by the mean cosine similarity of its representations (mean last hidden
    states, ``cache.representations``) to the target's. Same keep rules as the gradient baseline."""
    cache, names, target_source = _candidates(cache, include_target_train)
    if cache.representations is None:
        raise ValueError(
            "The cache has no representations, which representation similarity needs. Re-collect it with "
            "CollectConfig(representations=True), or use "
            "gradient_similarity_selection instead."
        )
    scores = _mean_cosine_scores(cache.representations, cache, names)
    return _select_by_similarity(
        "representation_similarity", cache, names, target_source, scores, top_k, threshold, temperature, {}
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
    cache, names, target_source = _candidates(cache, include_target_train)
    if k is None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"ratio must lie in (0, 1], got {ratio}.")
        k = max(1, round(ratio * len(names)))
    if not 0 < k <= len(names):
        raise ValueError(f"k must lie in [1, {len(names)}], got {k}.")
    gen = torch.Generator().manual_seed(seed)
    draws = torch.rand(len(names), generator=gen, dtype=torch.float64)
    return _select_by_similarity(
        "random", cache, names, target_source, draws, k, None, 1.0, {"seed": seed, "k": k}
    )
