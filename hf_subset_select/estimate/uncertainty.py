"""Confidence intervals for subset estimates and source scores (docs/uncertainty.md).

A source score is computed from a matrix of estimated per-row losses ``L[s, t]`` (sampled subsets s × target rows
t). Two sources of noise move it: which subsets were sampled, and which target rows the target task happens to
have. Both are resampled together here (a two-way bootstrap): each replicate draws the subsets with replacement
and, independently, the target rows with replacement, and recomputes the statistic from the reweighted matrix, so
no estimate is solved again.

The interval is a studentized (percentile-t) bootstrap interval: each replicate's deviation from the point estimate
is divided by its own standard error, and the quantiles of that pivot, times the data's standard error, give the
bounds. The standard error adds the target rows' part (the spread of the per-row statistic over the rows) and the
subsets' part (the spread of the subset losses within the subsets holding / not holding a source). With few target
rows the plain percentile interval undercovers (its variance is short by the factor (T-1)/T and it ignores that the
spread is itself estimated); the pivot accounts for both. The ``linear`` coefficients use the percentile interval
(a coefficient has no cheap per-replicate standard error; its coverage is checked as well).

* :func:`subset_intervals`: the estimate L̂(S) = mean_t L[S, t] of every subset (target rows resampled; the subset
  is given, not sampled).
* :func:`effect_intervals`: the ensemble's scores (mean L̂ of the subsets holding a source), its effects (mean
  with minus mean without) or the linear fit's coefficients.
* :func:`combine_seeds`: several caches collected with different projection seeds: the point is the mean over
  seeds, the replicates resample the seeds too (a hierarchical bootstrap), so the projection's noise is counted.

The coverage of the nominal level is checked on synthetic caches with a known answer
(``tests/estimate/test_uncertainty.py``, ``recipes/benchmarks/many_targets.py``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "Intervals",
    "bootstrap_counts",
    "subset_intervals",
    "effect_intervals",
    "combine_seeds",
    "percentile_interval",
    "studentized_interval",
]


@dataclass
class Intervals:
    """Point estimates, bootstrap replicates and the percentile interval of a vector statistic.

    Attributes:
        point: the statistic on the data, shape (K,).
        replicates: the statistic on each bootstrap replicate, shape (R, K).
        lower / upper: the interval's bounds, shape (K,).
        level: the nominal coverage (e.g. 0.95).
    """

    point: torch.Tensor
    replicates: torch.Tensor
    lower: torch.Tensor
    upper: torch.Tensor
    level: float

    def as_dict(self, names: Sequence[str]) -> dict[str, list[float]]:
        """``{name: [lower, upper]}``."""
        return {n: [float(a), float(b)] for n, a, b in zip(names, self.lower.tolist(), self.upper.tolist())}

    def excludes_zero_below(self) -> torch.Tensor:
        """Whether each interval lies entirely below 0 (an improvement of the target loss), shape (K,)."""
        return self.upper < 0


def _check_level(level: float, samples: int) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"The interval level must lie in (0, 1), e.g. 0.95; got {level!r}.")
    if samples < 20:
        raise ValueError(f"Bootstrap intervals need at least 20 replicates (1000 is usual), got {samples}.")


def bootstrap_counts(n: int, samples: int, generator: torch.Generator) -> torch.Tensor:
    """How often each of ``n`` items is drawn in each of ``samples`` resamples with replacement, (samples, n)."""
    idx = torch.randint(0, n, (samples, n), generator=generator)
    return torch.zeros(samples, n, dtype=torch.float64).scatter_add_(
        1, idx, torch.ones(samples, n, dtype=torch.float64)
    )


def percentile_interval(point: torch.Tensor, replicates: torch.Tensor, level: float) -> Intervals:
    """The percentile interval of ``replicates`` (R, K) at ``level`` (replicates that are NaN are left out)."""
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    bounds = torch.nanquantile(replicates.to(torch.float64), q, dim=0)
    return Intervals(point.to(torch.float64), replicates, bounds[0], bounds[1], float(level))


def studentized_interval(
    point: torch.Tensor,
    se: torch.Tensor,
    replicates: torch.Tensor,
    replicate_se: torch.Tensor,
    level: float,
) -> Intervals:
    """The percentile-t interval: quantiles of ``(replicate - point) / replicate_se`` scaled by ``se``.

    A replicate whose standard error is 0 (a degenerate resample) is left out; where every one is, the bounds fall
    back to the percentile interval."""
    alpha = (1.0 - level) / 2.0
    q = torch.tensor([alpha, 1.0 - alpha], dtype=torch.float64)
    pivot = (replicates - point[None, :]) / replicate_se
    pivot = torch.where(replicate_se > 0, pivot, torch.full_like(pivot, float("nan")))
    t = torch.nanquantile(pivot, q, dim=0)
    lower, upper = point - t[1] * se, point - t[0] * se
    fallback = percentile_interval(point, replicates, level)
    bad = ~(torch.isfinite(lower) & torch.isfinite(upper)) | (se == 0)
    lower = torch.where(bad, fallback.lower, lower)
    upper = torch.where(bad, fallback.upper, upper)
    return Intervals(point.to(torch.float64), replicates, lower, upper, float(level))


def _weighted_mean_se(values: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard error of the mean of ``values`` (K, T) under resampling weights (R, T) that sum to 1."""
    mean = weights @ values.T  # (R, K)
    sq = weights @ (values * values).T
    var = (sq - mean * mean).clamp_min(0.0)
    return mean, (var / values.shape[1]).sqrt()


def subset_intervals(
    per_example: torch.Tensor, *, level: float = 0.95, samples: int = 1000, seed: int = 0
) -> Intervals:
    """Intervals for each subset's estimate L̂(S) = mean over the target rows of ``per_example`` (B, T): the target
    rows are resampled (they are a sample of the target task); percentile-t."""
    _check_level(level, samples)
    rows = per_example.to(torch.float64)
    t = rows.shape[1]
    gen = torch.Generator().manual_seed(seed)
    w = bootstrap_counts(t, samples, gen) / t  # (R, T)
    reps, reps_se = _weighted_mean_se(rows, w)
    ones = torch.full((1, t), 1.0 / t, dtype=torch.float64)
    point, se = _weighted_mean_se(rows, ones)
    return studentized_interval(point[0], se[0], reps, reps_se, level)


def _ensemble_statistic(
    m: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor, kind: str
) -> torch.Tensor:
    """The ensemble statistic per replicate: ``losses`` (R, B) subset losses, ``weights`` (R, B) subset counts."""
    a = weights * losses
    with_den = weights @ m
    with_mean = (a @ m) / with_den
    if kind == "score":
        return with_mean
    without_mean = (a @ (1 - m)) / (weights @ (1 - m))
    return with_mean - without_mean


def _linear_statistic(m: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Weighted least-squares coefficients of L̂ ≈ β0 + Σ β_k m_k per replicate, (R, K)."""
    x = torch.cat([torch.ones(m.shape[0], 1, dtype=torch.float64), m], 1)  # (B, K+1)
    xtwx = torch.einsum("bi,rb,bj->rij", x, weights, x)
    xtwy = torch.einsum("bi,rb,rb->ri", x, weights, losses)
    ridge = 1e-10 * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(xtwx + ridge, xtwy)[:, 1:]


def _per_row(m: torch.Tensor, rows: torch.Tensor, statistic: str) -> torch.Tensor:
    """The statistic on each target row separately, (K, T): its row mean is the statistic."""
    inside = m.sum(0)[:, None]
    with_rows = (m.T @ rows) / inside
    if statistic == "score":
        return with_rows
    return with_rows - ((1 - m).T @ rows) / (m.shape[0] - inside)


def _subset_variance(
    m: torch.Tensor, losses: torch.Tensor, weights: torch.Tensor, statistic: str
) -> torch.Tensor:
    """The subsets' part of the statistic's variance per replicate, (R, K): the within-group variance of the subset
    losses over the number of subsets, for the subsets with the source (and, for an effect, those without)."""

    def group(mask: torch.Tensor) -> torch.Tensor:
        n = weights @ mask  # (R, K)
        mean = ((weights * losses) @ mask) / n
        sq = ((weights * losses * losses) @ mask) / n
        return (sq - mean * mean).clamp_min(0.0) / n

    var = group(m)
    if statistic == "effect":
        var = var + group(1 - m)
    return var


def effect_intervals(
    membership: torch.Tensor,
    per_example: torch.Tensor,
    *,
    statistic: str = "effect",
    level: float = 0.95,
    samples: int = 1000,
    seed: int = 0,
) -> Intervals:
    """Intervals for a per-source statistic of the sampled subsets, resampling subsets and target rows.

    Args:
        membership: (B, K) 0/1 membership of the candidate sources in the sampled subsets.
        per_example: (B, T) estimated loss of every target row after fine-tuning on each subset.
        statistic: "score" (mean L̂ of the subsets holding the source: the ``random_ensemble`` score), "effect"
            (mean L̂ with minus mean L̂ without the source) or "linear" (the source's least-squares coefficient:
            the ``linear`` score).
        level, samples, seed: the nominal coverage, the number of bootstrap replicates and their seed.
    """
    _check_level(level, samples)
    if statistic not in ("score", "effect", "linear"):
        raise ValueError(f"statistic must be 'score', 'effect' or 'linear', got {statistic!r}.")
    m = membership.to(torch.float64)
    rows = per_example.to(torch.float64)
    b, t = rows.shape
    inside = m.sum(0)
    if bool(((inside == 0) | (inside == b)).any()):
        raise ValueError(
            "A source is in none or in all of the sampled subsets, so its statistic has no interval; raise "
            "num_subsets or move subset_ratio towards 0.5."
        )
    gen = torch.Generator().manual_seed(seed)
    subset_w = bootstrap_counts(b, samples, gen)  # (R, B)
    row_w = bootstrap_counts(t, samples, gen) / t  # (R, T)
    losses = row_w @ rows.T  # (R, B): every subset's loss on each replicate's target rows
    ones = torch.ones(1, b, dtype=torch.float64)
    point_losses = rows.mean(1)[None, :]
    if statistic == "linear":
        point = _linear_statistic(m, point_losses, ones)[0]
        return percentile_interval(point, _linear_statistic(m, losses, subset_w), level)
    point = _ensemble_statistic(m, point_losses, ones, statistic)[0]
    reps = _ensemble_statistic(m, losses, subset_w, statistic)
    # standard errors: the target rows' part (per-row statistic at the sampled subsets) + the subsets' part
    per_row = _per_row(m, rows, statistic)
    _, rows_se = _weighted_mean_se(per_row, row_w)
    _, point_rows_se = _weighted_mean_se(per_row, torch.full((1, t), 1.0 / t, dtype=torch.float64))
    reps_se = (rows_se**2 + _subset_variance(m, losses, subset_w, statistic)).sqrt()
    se = (point_rows_se[0] ** 2 + _subset_variance(m, point_losses, ones, statistic)[0]).sqrt()
    return studentized_interval(point, se, reps, reps_se, level)


def combine_seeds(per_seed: Sequence[Intervals], *, seed: int = 0) -> Intervals:
    """Combine the intervals of caches collected with different projection seeds (same sources, same level).

    The point is the mean over seeds. Replicate r averages replicate r of a resample (with replacement) of the
    seeds, so the spread between seeds (the projection's noise) widens the interval along with the subsets' and the
    target rows'. With one seed this returns it unchanged.
    """
    if not per_seed:
        raise ValueError("combine_seeds needs the intervals of at least one cache.")
    if len(per_seed) == 1:
        return per_seed[0]
    levels = {round(i.level, 12) for i in per_seed}
    shapes = {tuple(i.replicates.shape) for i in per_seed}
    if len(levels) > 1 or len(shapes) > 1:
        raise ValueError(
            "The per-seed intervals differ in level or replicate count; compute them with the same settings."
        )
    reps = torch.stack([i.replicates for i in per_seed])  # (S, R, K)
    s, r, _ = reps.shape
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randint(0, s, (r, s), generator=gen)  # (R, S) seeds drawn per replicate
    drawn = reps[pick, torch.arange(r)[:, None]]  # (R, S, K)
    combined = drawn.mean(1)
    point = torch.stack([i.point for i in per_seed]).mean(0)
    return percentile_interval(point, combined, per_seed[0].level)
