"""The selector interface: :class:`Selector` scores an estimator's candidate sources, and one keep rule
(:func:`keep_by_rule`: ``top_k``, else ``threshold``, else the selector's own default) turns the scores of every
selector into a :class:`~hf_subset_select.select.selection.SourceSelection`.

A new selection method is a subclass that implements :meth:`Selector.score`, registered under a name with
:func:`~hf_subset_select.select.registry.register_selector`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from ..config import SelectConfig
from .selection import SourceSelection, cache_manifest, scores_to_weights

__all__ = ["Selector", "SelectorScores", "keep_by_rule", "best_first"]


@dataclass
class SelectorScores:
    """What a selector computes for the candidate sources, before the keep rule.

    Attributes:
        scores: one float64 score per candidate, in candidate order.
        default_keep: the sources kept when ``SelectConfig`` sets neither ``top_k`` nor ``threshold``.
        order: candidates from best to worst, which ``top_k`` keeps a prefix of. None: sorted by score.
        info: method details stored in ``SourceSelection.info``.
        significant: the sources whose effect interval excludes "no effect" on the helpful side (computed when
            ``SelectConfig.interval_level`` is set); ``require_significant`` keeps only these. None: no intervals.
    """

    scores: torch.Tensor
    default_keep: list[str]
    order: list[str] | None = None
    info: dict[str, Any] = field(default_factory=dict)
    significant: list[str] | None = None


def best_first(names: list[str], scores: torch.Tensor, lower_is_better: bool) -> list[str]:
    """Candidates sorted from best to worst score (NaN last, ties in candidate order)."""
    key = scores.to(torch.float64) if lower_is_better else -scores.to(torch.float64)
    key = torch.nan_to_num(key, nan=math.inf)
    return [names[i] for i in torch.argsort(key, stable=True).tolist()]


def keep_by_rule(
    names: list[str], scored: SelectorScores, lower_is_better: bool, config: SelectConfig
) -> list[str]:
    """The keep rule of every selector, returning the kept sources in candidate order.

    ``config.top_k``: the first ``top_k`` sources of ``scored.order`` (the best scores unless the selector gives
    its own order); else ``config.threshold``: the sources whose score is better than it (below it when lower is
    better, above it otherwise); else the selector's ``scored.default_keep``.
    """
    if config.top_k is not None:
        if config.top_k > len(names):
            raise ValueError(
                f"top_k={config.top_k} exceeds the number of candidate sources ({len(names)}); use a top_k in "
                f"[1, {len(names)}]."
            )
        order = (
            scored.order if scored.order is not None else best_first(names, scored.scores, lower_is_better)
        )
        chosen = set(order[: config.top_k])
    elif config.threshold is not None:
        threshold = config.threshold
        values = scored.scores.tolist()
        if lower_is_better:
            chosen = {n for n, v in zip(names, values) if v < threshold}
        else:
            chosen = {n for n, v in zip(names, values) if v > threshold}
    else:
        chosen = set(scored.default_keep)
    return [n for n in names if n in chosen]


class Selector(ABC):
    """Scores the candidate sources of an estimator and keeps the helpful ones.

    Subclasses set ``lower_is_better`` (the direction of their scores) and implement :meth:`score`; the keep
    rule, the sampling weights and the result are shared (:meth:`select`). ``name`` is set by
    :func:`~hf_subset_select.select.registry.register_selector`.
    """

    name: ClassVar[str] = ""
    lower_is_better: ClassVar[bool] = True

    @abstractmethod
    def score(self, estimator: Any, names: list[str], config: SelectConfig) -> SelectorScores:
        """Score the candidates ``names`` (``estimator.sources``) under ``config``."""

    def manifest(self, estimator: Any, config: SelectConfig) -> dict[str, Any]:
        """What ties the selection to its inputs: the cache's fingerprint and sources and the select config."""
        manifest = cache_manifest(estimator.cache)
        target = getattr(estimator, "target_cache", estimator.cache)
        if target is not estimator.cache:  # a separate target cache: the selection depends on it too
            manifest["target_cache_fingerprint"] = target.fingerprint()
        manifest["select_config"] = {**config.to_dict(), "method": self.name}
        return manifest

    def select(self, estimator: Any, config: SelectConfig) -> SourceSelection:
        """Score ``estimator.sources``, keep them by ``config`` (top_k / threshold / default) and weight the kept.

        Args:
            estimator: a :class:`~hf_subset_select.FirstOrderEstimator` (baselines read only its ``cache``,
                ``sources`` and ``target_source``).
            config: the :class:`~hf_subset_select.SelectConfig`; its ``method`` is not read (the selector is
                the method).
        """
        names = list(estimator.sources)
        if not names:
            raise ValueError(
                "The estimator has no candidate sources to select from; the cache needs training sources "
                "besides the target's own."
            )
        scored = self.score(estimator, names, config)
        selected = keep_by_rule(names, scored, self.lower_is_better, config)
        if config.require_significant:
            if scored.significant is None:
                raise ValueError(
                    f"require_significant needs confidence intervals, which method {self.name!r} does not give; use "
                    "'random_ensemble', 'linear' or 'forward' (with interval_level), or drop require_significant."
                )
            significant = set(scored.significant)
            selected = [n for n in selected if n in significant]
        score_dict = {s: float(v) for s, v in zip(names, scored.scores.tolist())}
        return SourceSelection(
            method=self.name,
            sources=names,
            scores=score_dict,
            selected=selected,
            weights=scores_to_weights(
                score_dict, selected, lower_is_better=self.lower_is_better, temperature=config.temperature
            ),
            target_source=estimator.target_source,
            lower_is_better=self.lower_is_better,
            info=scored.info,
            manifest=self.manifest(estimator, config),
        )
