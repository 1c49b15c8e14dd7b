"""Per-example scores from the same cache, and per-example selections (docs/method.md, section 8b).

* :func:`example_effects`: the first-order effect of each training example on the estimated target loss: the
  derivative dL̂/dω_i of the estimate with respect to the example's weight ω_i in the fit of a subset (default:
  all candidate sources), at the estimator's λ. Negative: up-weighting the example lowers the estimated target
  loss; dropping it changes L̂ by about −score.
* :func:`example_cosines`: the LESS-style baseline, the mean cosine of the example's gradient to the target's.
* :func:`select_examples`: either score turned into a :class:`~hf_subset_select.SourceSelection` with an
  :class:`~hf_subset_select.select.selection.ExampleTable`, which ``apply``, the collator, the weighted loss and
  weighted sampling use like a source selection (keyed by ``example_id``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from ..collect.cache import GradientCache
from .baselines import CacheCandidates, _require_target, row_target_cosines
from .selection import ExampleTable, SourceSelection, cache_manifest

__all__ = ["ExampleScores", "example_effects", "example_cosines", "select_examples", "EXAMPLE_METHODS"]

EXAMPLE_METHODS = ("first_order", "gradient_similarity")
_DIRECT_DIM = 2048  # up to this d the Hessian is formed and factored; above it, conjugate gradients


@dataclass
class ExampleScores:
    """One score per candidate training row of a cache (rows of the target's own source excluded).

    Attributes:
        example_ids: int64 ids (N,), in cache order.
        sources: each row's source name.
        scores: float64 scores (N,).
        lower_is_better: direction of the scores.
        method: "first_order" or "gradient_similarity".
        info: details (λ, the subset fitted, ...).
    """

    example_ids: torch.Tensor
    sources: list[str]
    scores: torch.Tensor
    lower_is_better: bool
    method: str
    info: dict[str, Any] = field(default_factory=dict)


def _candidate_rows(cache: GradientCache, names: Sequence[str]) -> torch.Tensor:
    """Indices of the cache's training rows from the sources ``names``."""
    ids = torch.tensor([cache.source_id(n) for n in names], dtype=torch.int64)
    return torch.nonzero(cache.train_mask & torch.isin(cache.source_index, ids)).flatten()


def _scores_for(cache: GradientCache, rows: torch.Tensor, values: torch.Tensor, **kw: Any) -> ExampleScores:
    return ExampleScores(
        example_ids=cache.example_ids[rows].clone(),
        sources=[cache.sources[int(i)] for i in cache.source_index[rows].tolist()],
        scores=values.to(torch.float64),
        **kw,
    )


def _solve_spd(g: torch.Tensor, curv: torch.Tensor, c: float, l2: float, rhs: torch.Tensor) -> torch.Tensor:
    """v = H⁻¹ rhs for H = c Σ_i curv_i g_i g_iᵀ + λI (g: (N, d) float64): Cholesky up to d = 2048, else CG."""
    d = g.shape[1]
    if d <= _DIRECT_DIM:
        h = (g * (c * curv)[:, None]).T @ g
        h.diagonal().add_(l2)
        return torch.cholesky_solve(rhs[:, None], torch.linalg.cholesky(h)).squeeze(1)
    x, r = torch.zeros_like(rhs), rhs.clone()
    p, rr = r.clone(), r @ r
    for _ in range(500):  # H ⪰ λI: well conditioned at the budget's λ
        hp = c * (g.T @ (curv * (g @ p))) + l2 * p
        alpha = rr / (p @ hp)
        x, r = x + alpha * p, r - alpha * hp
        rr_new = r @ r
        if float(rr_new.sqrt()) <= 1e-10 * float(rhs.norm()):
            break
        p, rr = r + (rr_new / rr) * p, rr_new
    return x


def example_effects(estimator: Any, subset: Sequence[str] | None = None) -> ExampleScores:
    """First-order effect of each candidate training example on the estimated target loss (lower is better).

    With example weights ω in the fit of ``subset`` (default: every candidate source; the forced target source is
    always in), J(w) = c Σ_i ω_i ℓ(f_i + g_iᵀw) + (λ/2)‖w‖² and L̂ = mean_j ℓ(f_j + s g_jᵀŵ). The score of row i
    is dL̂/dω_i at ω = 1 on the subset's rows (0 elsewhere), at the estimator's λ and fitted step ŵ:

        score_i = c · (σ(−z_i) g_iᵀv + vᵀm̄),   v = H⁻¹ ∇L̂,  H = c Σ_{k∈S} σ'(z_k) g_k g_kᵀ + λI,

    with z = f + gᵀŵ, ∇L̂ = −s mean_j σ(−z_j) g_j and m̄ = mean_{k∈S} ℓ'(z_k) g_k for ``reduction="mean"``
    (c = 1/Σω moves with ω) or 0 for ``"sum"``. Rows outside the subset get the effect of adding them.

    Args:
        estimator: a :class:`~hf_subset_select.FirstOrderEstimator`.
        subset: candidate source names whose rows make the fitted subset (default: all candidates).
    """
    problem = estimator.problem
    names = list(estimator.sources if subset is None else subset)
    m = estimator.membership([names])
    l2 = estimator.resolved_l2()
    _, w = estimator.solve(m, want_w=True, l2=l2)
    w = w[0].to(torch.float64)
    g, f = problem.features64(), problem.outputs
    in_s = m[0, problem.row_source] > 0  # (N,) the subset's rows among the estimator's training rows
    c = float(problem.scale(m)[0])
    s = float(estimator.step_scale)
    z = f + g @ w
    zt = problem.target_outputs + s * (problem.target_features @ w)
    grad_target = -s * (torch.sigmoid(-zt) @ problem.target_features) / zt.shape[0]
    curv = torch.sigmoid(z[in_s]) * torch.sigmoid(-z[in_s])
    v = _solve_spd(g[in_s], curv, c, l2, grad_target)
    resid = torch.sigmoid(-z)
    offset = 0.0
    if problem.config.reduction == "mean":
        m_bar = -(resid[in_s] @ g[in_s]) / int(in_s.sum())
        offset = float(v @ m_bar)
    effect = c * (resid * (g @ v) + offset)
    # the estimator's training rows -> the cache's candidate rows (the forced target source left out)
    train_rows = torch.nonzero(problem.cache.train_mask).flatten()
    cand = problem.row_source < len(problem.sources)
    info = {"l2": l2, "l2_rule": estimator.l2_rule, "subset": names, "reduction": problem.config.reduction}
    return _scores_for(
        problem.cache, train_rows[cand], effect[cand], lower_is_better=True, method="first_order", info=info
    )


def example_cosines(cache: Any, *, include_target_train: bool = True) -> ExampleScores:
    """LESS-style baseline per candidate example: the mean cosine of its gradient to the target rows' gradients
    (higher is better). ``cache`` is a :class:`~hf_subset_select.GradientCache` or an estimator."""
    candidates = CacheCandidates.of(cache, include_target_train)
    c = candidates.cache
    _require_target(c)
    rows = _candidate_rows(c, candidates.sources)
    cos = row_target_cosines(c.features, c)[rows]
    return _scores_for(c, rows, cos, lower_is_better=False, method="gradient_similarity", info={})


def _keep_mask(scored: ExampleScores, fraction: float | None, threshold: float | None) -> torch.Tensor:
    """The keep rule: the best ``fraction`` of rows, else the rows better than ``threshold``, else the default
    (first-order: score < 0, lowers the estimate; cosine: above the mean)."""
    key = scored.scores if scored.lower_is_better else -scored.scores
    key = torch.nan_to_num(key, nan=float("inf"))
    n = key.numel()
    if fraction is not None:
        if not 0.0 < fraction <= 1.0:
            raise ValueError(f"fraction must lie in (0, 1] (the share of examples to keep), got {fraction}.")
        keep = torch.zeros(n, dtype=torch.bool)
        keep[torch.argsort(key, stable=True)[: max(1, round(fraction * n))]] = True
        return keep
    if threshold is not None:
        return key < (threshold if scored.lower_is_better else -threshold)
    if scored.method == "first_order":
        return key < 0
    return key < -float(scored.scores.mean())


def _weights(scored: ExampleScores, keep: torch.Tensor, temperature: float) -> torch.Tensor:
    """The source rule per row: standardized scores (better is higher), softmax over the kept rows with
    ``temperature``, mean 1 there; dropped rows 0."""
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    out = torch.zeros_like(scored.scores)
    values, finite = scored.scores, torch.isfinite(scored.scores)
    if not bool(keep.any()):
        return out
    if int(finite.sum()) < 2 or float(values[finite].std()) == 0.0:
        out[keep] = 1.0
        return out
    zs = torch.nan_to_num((values - values[finite].mean()) / values[finite].std(), nan=0.0)
    zs = -zs if scored.lower_is_better else zs
    out[keep] = torch.softmax(zs[keep] / temperature, 0) * int(keep.sum())
    return out


def select_examples(
    estimator: Any,
    method: str = "first_order",
    *,
    fraction: float | None = None,
    threshold: float | None = None,
    temperature: float = 1.0,
    subset: Sequence[str] | None = None,
) -> SourceSelection:
    """Score every candidate example and keep the best: a :class:`~hf_subset_select.SourceSelection` with an example
    table, applied like a source selection (``apply``, the collator, the weighted loss, weighted sampling).

    Args:
        estimator: a :class:`~hf_subset_select.FirstOrderEstimator` (``"gradient_similarity"`` also takes a cache).
        method: ``"first_order"`` (:func:`example_effects`) or ``"gradient_similarity"`` (:func:`example_cosines`).
        fraction: keep this share of the candidate examples (the best scores); else
        threshold: keep the scores better than it; else the default: first-order scores < 0, cosines above the mean.
        temperature: of the softmax that weights the kept examples (mean 1 over them).
        subset: for ``"first_order"``, the sources whose fit the effects are taken in (default: all candidates).

    The source-level fields summarize the table: a source's score is its rows' mean, it is selected (weight 1) when
    it keeps some rows; that weight is what rows the table does not name (the cache did not hold them) get.
    """
    if method not in EXAMPLE_METHODS:
        raise ValueError(f"method={method!r} is not valid; choose one of {list(EXAMPLE_METHODS)}.")
    if method == "first_order":
        if isinstance(estimator, GradientCache):
            raise TypeError(
                "method='first_order' needs a FirstOrderEstimator (its λ is the fine-tune's budget): pass "
                "FirstOrderEstimator(cache, EstimatorConfig.from_training_args(...))."
            )
        scored = example_effects(estimator, subset)
    else:
        scored = example_cosines(estimator)
    candidates = CacheCandidates.of(estimator)
    keep = _keep_mask(scored, fraction, threshold)
    weights = _weights(scored, keep, temperature)
    names = list(candidates.sources)
    per_source = {n: [] for n in names}
    for src, value, kept in zip(scored.sources, scored.scores.tolist(), keep.tolist()):
        per_source[src].append((value, kept))
    source_scores = {
        n: (sum(v for v, _ in rows) / len(rows) if rows else float("nan")) for n, rows in per_source.items()
    }
    selected = [n for n in names if any(k for _, k in per_source[n])]
    info = {
        **scored.info,
        "granularity": "example",
        "fraction": fraction,
        "threshold": threshold,
        "temperature": temperature,
        "num_examples": int(keep.numel()),
        "kept_examples": int(keep.sum()),
        "kept_per_source": {n: sum(k for _, k in per_source[n]) for n in names},
    }
    manifest = cache_manifest(candidates.cache)
    manifest["select_config"] = {"method": method, "fraction": fraction, "threshold": threshold}
    return SourceSelection(
        method=f"example_{method}",
        sources=names,
        scores=source_scores,
        selected=selected,
        weights={n: (1.0 if n in selected else 0.0) for n in names},
        target_source=candidates.target_source,
        lower_is_better=scored.lower_is_better,
        info=info,
        manifest=manifest,
        examples=ExampleTable(
            example_ids=scored.example_ids.tolist(),
            sources=scored.sources,
            scores=scored.scores.tolist(),
            weights=weights.tolist(),
        ),
    )
