"""Figures computed from benchmark results: fidelity metrics and paired statistics over seeds."""

from __future__ import annotations

import math
import random
import statistics
from collections.abc import Sequence
from typing import Any

import torch


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman rank correlation of two equally long series."""
    from scipy.stats import spearmanr

    return float(spearmanr(list(a), list(b)).statistic)


def mean_relative_error(estimate: Sequence[float], truth: Sequence[float]) -> float:
    """mean_j |estimate_j - truth_j| / truth_j."""
    e = torch.tensor(list(estimate), dtype=torch.float64)
    t = torch.tensor(list(truth), dtype=torch.float64)
    return float(((e - t).abs() / t).mean())


def fidelity_metrics(
    estimate: Sequence[float], truth: Sequence[float], base: float, other: Sequence[float]
) -> dict[str, float]:
    """How well estimated target losses match the true ones.

    ``spearman`` and ``mean_relative_error`` against ``truth``; ``spearman_other`` against a second true series
    (token cross entropy, error rate); ``no_change_mean_relative_error``: the error of predicting ``base`` (the
    loss before fine-tuning) for every subset, the bar an estimate has to beat.
    """
    return {
        "spearman": spearman(estimate, truth),
        "mean_relative_error": mean_relative_error(estimate, truth),
        "spearman_other": spearman(estimate, other),
        "no_change_mean_relative_error": mean_relative_error([base] * len(truth), truth),
    }


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    values = [float(v) for v in values]
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], *, resamples: int = 10_000, level: float = 0.95, seed: int = 0
) -> dict[str, float]:
    """Mean of the paired differences a_k - b_k (same seed k) with a percentile bootstrap interval.

    Resamples the pairs with replacement; ``low``/``high`` bound the ``level`` interval of the mean difference.
    Use it to compare two methods run on the same seeds: an interval above 0 says a beats b on these seeds.
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_bootstrap needs two equally long, non-empty series, got {len(a)} and {len(b)}."
        )
    diffs = [float(x) - float(y) for x, y in zip(a, b)]
    rng = random.Random(seed)
    n = len(diffs)
    means = sorted(sum(diffs[rng.randrange(n)] for _ in range(n)) / n for _ in range(resamples))
    tail = (1.0 - level) / 2.0
    low = means[max(0, math.floor(tail * resamples))]
    high = means[min(resamples - 1, math.ceil((1.0 - tail) * resamples) - 1)]
    return {"mean_difference": statistics.fmean(diffs), "low": low, "high": high, "level": level, "pairs": n}


def membership_effects(
    subsets: Sequence[Sequence[str]], values: Sequence[float], sources: Sequence[str]
) -> dict[str, float]:
    """Least-squares effect of each source's presence on ``values`` (intercept + one coefficient per source)."""
    x = torch.tensor([[1.0] + [float(s in sub) for s in sources] for sub in subsets], dtype=torch.float64)
    y = torch.tensor(list(values), dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(x, y).solution.flatten()
    return {s: float(c) for s, c in zip(sources, coef[1:])}


def summarize_runs(runs: Sequence[dict[str, Any]], keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Per key: mean, sample std and the per-seed values of ``runs`` (one dict per seed)."""
    out = {}
    for key in keys:
        values = [float(r[key]) for r in runs]
        mean, sd = mean_std(values)
        out[key] = {"mean": mean, "sd": sd, "per_seed": values}
    return out
