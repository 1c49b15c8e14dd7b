"""Selection over several projection seeds: the same pool collected with different random projections.

The projection is a third source of noise in a score (with the sampled subsets and the target rows). With caches
collected with different ``CollectConfig.seed`` values, :func:`select_over_seeds` averages each source's score and
effect over the seeds and combines their bootstrap intervals with
:func:`~hf_subset_select.estimate.uncertainty.combine_seeds` (the seeds are resampled too), then applies the keep
rule (and ``require_significant``) to the combined figures.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

import torch

from ..config import SelectConfig
from ..estimate.uncertainty import combine_seeds, effect_intervals
from .base import SelectorScores, keep_by_rule
from .first_order import INTERVAL_METHOD, _random_membership
from .registry import get_selector
from .selection import SourceSelection, scores_to_weights

__all__ = ["select_over_seeds"]


def select_over_seeds(estimators: Sequence[Any], config: SelectConfig | None = None) -> SourceSelection:
    """One selection from estimators over caches collected with different projection seeds.

    Args:
        estimators: :class:`~hf_subset_select.FirstOrderEstimator` s on caches of the same rows (same sources and
            example ids), one per projection seed.
        config: a :class:`~hf_subset_select.SelectConfig` with ``method`` "random_ensemble" or "linear" and
            ``interval_level`` set (default level 0.95).

    Returns:
        The first seed's selection with the scores, effects and intervals replaced by their combination over the
        seeds, and the kept sources and weights decided on them; ``info["seeds"]`` holds each seed's scores.
    """
    config = SelectConfig(interval_level=0.95) if config is None else config
    if config.method not in ("random_ensemble", "linear"):
        raise ValueError(f"select_over_seeds supports 'random_ensemble' and 'linear', not {config.method!r}.")
    if config.interval_level is None:
        config = replace(config, interval_level=0.95)
    if not estimators:
        raise ValueError("select_over_seeds needs at least one estimator (one per projection seed).")
    first = estimators[0]
    for est in estimators[1:]:
        same_rows = torch.equal(
            torch.sort(est.cache.example_ids).values, torch.sort(first.cache.example_ids).values
        )
        if est.sources != first.sources or not same_rows:
            raise ValueError(
                "The estimators' caches hold different sources or rows; select_over_seeds combines caches of the "
                "same pool collected with different projection seeds (CollectConfig.seed)."
            )
    selector = get_selector(config.method)
    names = list(first.sources)
    per_seed = [selector.select(est, config) for est in estimators]
    statistic = "score" if config.method == "random_ensemble" else "linear"
    effect_stat = "effect" if config.method == "random_ensemble" else "linear"
    kw = {"level": config.interval_level, "samples": config.bootstrap_samples, "seed": config.seed}
    score_ivs, effect_ivs = [], []
    for est in estimators:
        m = _random_membership(len(names), config, need_nonempty=est.forced_source is None)
        rows = est.estimate(m, details=True).per_example
        score_ivs.append(effect_intervals(m, rows, statistic=statistic, **kw))
        effect_ivs.append(effect_intervals(m, rows, statistic=effect_stat, **kw))
    score_iv, effect_iv = (
        combine_seeds(score_ivs, seed=config.seed),
        combine_seeds(effect_ivs, seed=config.seed),
    )
    significant = [n for n, ok in zip(names, effect_iv.excludes_zero_below().tolist()) if ok]
    effects = effect_iv.point
    scored = SelectorScores(
        scores=score_iv.point, default_keep=[n for n, e in zip(names, effects.tolist()) if e < 0]
    )
    selected = keep_by_rule(names, scored, selector.lower_is_better, config)
    if config.require_significant:
        selected = [n for n in selected if n in set(significant)]
    scores = {s: float(v) for s, v in zip(names, score_iv.point.tolist())}
    base = per_seed[0]
    info = dict(base.info)
    info.update(
        effects={s: float(v) for s, v in zip(names, effects.tolist())},
        intervals={
            "level": config.interval_level,
            "samples": config.bootstrap_samples,
            "method": INTERVAL_METHOD + ", combined over projection seeds (seeds resampled)",
            "scores": score_iv.as_dict(names),
            "effects": effect_iv.as_dict(names),
            "significant": significant,
        },
        seeds=[
            {"cache_fingerprint": sel.manifest.get("cache_fingerprint"), "scores": sel.scores}
            for sel in per_seed
        ],
    )
    return replace(
        base,
        scores=scores,
        selected=selected,
        weights=scores_to_weights(
            scores, selected, lower_is_better=selector.lower_is_better, temperature=config.temperature
        ),
        info=info,
    )
