"""Our selectors, which score sources by first-order estimates of the target loss (lower is better):

* ``random_ensemble``: a source's score is the mean estimated loss of the random subsets that hold it;
* ``linear``: its coefficient in a least-squares fit L̂ ≈ β0 + Σ β_k m_k over the random subsets;
* ``forward``: greedy forward selection on L̂; its score is L̂ right after it was added.

See ``docs/method.md`` for the definitions.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from typing import Any

import torch

from ..config import SelectConfig
from ..estimate.uncertainty import effect_intervals, subset_intervals
from .base import Selector, SelectorScores
from .registry import register_selector

INTERVAL_METHOD = "two-way bootstrap over the sampled subsets and the target rows (percentile-t)"

__all__ = ["RandomEnsembleSelector", "LinearSelector", "ForwardSelector"]


class FirstOrderSelector(Selector):
    """Base of the selectors that read the estimator's estimates: they record its λ and solver in the result."""

    lower_is_better = True

    def manifest(self, estimator: Any, config: SelectConfig) -> dict[str, Any]:
        manifest = super().manifest(estimator, config)
        manifest["estimator_config"] = estimator.config.to_dict()
        return manifest

    @staticmethod
    def estimator_info(estimator: Any) -> dict[str, Any]:
        """The estimator settings an estimate depends on: λ and its rule, the step scale, the solver, L̂(∅)."""
        return {
            "l2": estimator.resolved_l2(),
            "l2_rule": estimator.l2_rule,
            "step_scale": estimator.step_scale,
            "solver": estimator.config.solver,
            "base_loss": estimator.base_loss,
        }


class _SubsetEnsembleSelector(FirstOrderSelector):
    """Estimates ``num_subsets`` random subsets (each source in with probability ``subset_ratio``) and derives
    per-source effects: mean L̂ with the source minus mean L̂ without it."""

    def score(self, estimator: Any, names: list[str], config: SelectConfig) -> SelectorScores:
        membership = _random_membership(len(names), config, need_nonempty=estimator.forced_source is None)
        estimate = estimator.estimate(membership, details=True)
        losses, rows = estimate.loss, estimate.per_example
        m = membership.to(torch.float64)
        count = m.shape[0]
        inside = m.sum(0)
        unscorable = (inside == 0) | (inside == count)
        if bool(unscorable.any()):
            bad = [names[i] for i in torch.nonzero(unscorable).flatten().tolist()]
            raise ValueError(
                f"Source(s) {bad} were in none or in all of the {count} random subsets, so they cannot be "
                "scored; raise num_subsets or move subset_ratio towards 0.5."
            )
        with_mean = (m * losses[:, None]).sum(0) / inside
        without_mean = ((1 - m) * losses[:, None]).sum(0) / (count - inside)
        effects = with_mean - without_mean
        info = self.estimator_info(estimator)
        info.update(
            num_subsets=int(count),
            subset_ratio=config.subset_ratio,
            seed=config.seed,
            mean_estimated_loss=float(losses.mean()),
            effects={s: float(v) for s, v in zip(names, effects)},
        )
        scored = self.from_ensemble(names, m, losses, with_mean, effects, info)
        if config.interval_level is not None:
            self.add_intervals(scored, names, m, rows, config)
        if config.confidence is not None:
            per_row = self.per_row_effects(m, rows.to(torch.float64))  # (sources, target rows)
            se = _standard_error(per_row)
            mean = per_row.mean(1)
            scored.default_keep = [
                n for n, e, u in zip(names, mean.tolist(), se.tolist()) if e + config.confidence * u < 0
            ]
            info.update(confidence=config.confidence, effect_standard_errors=dict(zip(names, se.tolist())))
        return scored

    #: the statistics behind the score and the effect (see :func:`~hf_subset_select.estimate.uncertainty.effect_intervals`)
    score_statistic = "score"
    effect_statistic = "effect"

    def add_intervals(
        self,
        scored: SelectorScores,
        names: list[str],
        m: torch.Tensor,
        rows: torch.Tensor,
        config: SelectConfig,
    ) -> None:
        """Confidence intervals of the scores and effects (bootstrap over the sampled subsets and the target rows);
        the significant sources are those whose effect interval lies below 0."""
        kw = {"level": config.interval_level, "samples": config.bootstrap_samples, "seed": config.seed}
        score_iv = effect_intervals(m, rows, statistic=self.score_statistic, **kw)
        effect_iv = (
            score_iv
            if self.effect_statistic == self.score_statistic
            else effect_intervals(m, rows, statistic=self.effect_statistic, **kw)
        )
        scored.significant = [n for n, ok in zip(names, effect_iv.excludes_zero_below().tolist()) if ok]
        scored.info["intervals"] = {
            "level": config.interval_level,
            "samples": config.bootstrap_samples,
            "method": INTERVAL_METHOD,
            "scores": score_iv.as_dict(names),
            "effects": effect_iv.as_dict(names),
            "significant": list(scored.significant),
        }

    @abstractmethod
    def from_ensemble(
        self,
        names: list[str],
        membership: torch.Tensor,
        losses: torch.Tensor,
        with_mean: torch.Tensor,
        effects: torch.Tensor,
        info: dict[str, Any],
    ) -> SelectorScores:
        """Turn the ensemble's statistics into scores and the default keep set."""

    @staticmethod
    def per_row_effects(membership: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each source's effect on each target row's estimated loss, (sources, rows): mean over the subsets with
        the source minus mean over those without (their row means are the ensemble's effects)."""
        inside = membership.sum(0)[:, None]
        return (membership.T @ rows) / inside - ((1 - membership).T @ rows) / (membership.shape[0] - inside)


@register_selector("random_ensemble")
class RandomEnsembleSelector(_SubsetEnsembleSelector):
    """Score = mean estimated loss of the random subsets that hold the source; by default keeps the sources whose
    effect (mean with minus mean without) is negative."""

    def from_ensemble(
        self,
        names: list[str],
        membership: torch.Tensor,
        losses: torch.Tensor,
        with_mean: torch.Tensor,
        effects: torch.Tensor,
        info: dict[str, Any],
    ) -> SelectorScores:
        keep = [n for n, e in zip(names, effects.tolist()) if e < 0]
        return SelectorScores(scores=with_mean, default_keep=keep, info=info)


@register_selector("linear")
class LinearSelector(_SubsetEnsembleSelector):
    """Score = the source's coefficient in the least-squares fit L̂ ≈ β0 + Σ β_k m_k over the random subsets; by
    default keeps the sources with a negative coefficient."""

    score_statistic = "linear"
    effect_statistic = "linear"

    def from_ensemble(
        self,
        names: list[str],
        membership: torch.Tensor,
        losses: torch.Tensor,
        with_mean: torch.Tensor,
        effects: torch.Tensor,
        info: dict[str, Any],
    ) -> SelectorScores:
        design = torch.cat([torch.ones(membership.shape[0], 1, dtype=torch.float64), membership], 1)
        coef = torch.linalg.lstsq(design, losses[:, None]).solution.flatten()
        fit = design @ coef
        ss_res = float(((losses - fit) ** 2).sum())
        ss_tot = float(((losses - losses.mean()) ** 2).sum())
        info["intercept"] = float(coef[0])
        info["r2"] = 1.0 - ss_res / ss_tot if ss_tot > 0 else 1.0
        scores = coef[1:]
        keep = [n for n, c in zip(names, scores.tolist()) if c < 0]
        return SelectorScores(scores=scores, default_keep=keep, info=info)

    @staticmethod
    def per_row_effects(membership: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Each source's coefficient in the linear fit of each target row's estimated loss, (sources, rows)."""
        design = torch.cat([torch.ones(membership.shape[0], 1, dtype=torch.float64), membership], 1)
        return torch.linalg.lstsq(design, rows).solution[1:]


@register_selector("forward")
class ForwardSelector(FirstOrderSelector):
    """Greedy forward selection on L̂ over all candidates. Score = L̂ right after the source was added; ``top_k``
    keeps the first k sources of the greedy path; by default keeps the best prefix of the path (possibly none,
    leaving the target's own data alone). With ``confidence`` z, each step adds the source whose improvement is
    largest at its lower confidence bound (mean change of the target rows' losses plus z standard errors), and
    the path is kept while that bound is an improvement."""

    def score(self, estimator: Any, names: list[str], config: SelectConfig) -> SelectorScores:
        z = config.confidence or 0.0
        chosen: list[str] = []
        path_losses: list[float] = []
        bounds: list[float] = []
        scores = torch.full((len(names),), math.nan, dtype=torch.float64)
        forced = estimator.forced_source is not None
        previous = estimator.estimate([[]], details=True).per_example[0].to(torch.float64) if forced else None
        start = float(previous.mean()) if previous is not None else math.inf
        remaining = list(names)
        previous_rows: list[tuple[torch.Tensor | None, torch.Tensor]] = []
        while remaining:
            rows = _extension_losses(estimator, chosen, remaining)
            estimate_loss = rows.mean(1)
            if (
                previous is None
            ):  # no target rows in training to compare with: the first source is the best estimate
                change = torch.full_like(estimate_loss, -math.inf, dtype=torch.float64)
            else:
                change = (rows - previous).mean(1) + z * _standard_error(rows - previous)
            j = int(torch.argmin(change if z and previous is not None else estimate_loss))
            pick = remaining.pop(j)
            chosen.append(pick)
            path_losses.append(float(estimate_loss[j]))
            bounds.append(float(change[j]))
            scores[names.index(pick)] = float(estimate_loss[j])
            previous_rows.append((previous, rows[j]))
            previous = rows[j]
        significant = None
        interval_info: dict[str, Any] = {}
        if config.interval_level is not None:
            significant = self._path_intervals(estimator, chosen, previous_rows, config, interval_info)
        if config.confidence is None:
            best = min(range(len(path_losses)), key=path_losses.__getitem__)
            prefix = 0 if start <= path_losses[best] else best + 1
        else:  # extend the path while each step improves the target rows' loss at the confidence bound
            prefix = 0
            while prefix < len(chosen) and bounds[prefix] < 0:
                prefix += 1
        info = self.estimator_info(estimator)
        info.update(path=list(chosen), path_losses=path_losses, start_loss=start)
        if config.confidence is not None:
            info.update(confidence=config.confidence, step_upper_bounds=bounds)
        if significant is not None:
            info["intervals"] = interval_info
        return SelectorScores(
            scores=scores, default_keep=chosen[:prefix], order=chosen, info=info, significant=significant
        )

    @staticmethod
    def _path_intervals(
        estimator: Any,
        chosen: list[str],
        steps: list[tuple[torch.Tensor | None, torch.Tensor]],
        config: SelectConfig,
        out: dict[str, Any],
    ) -> list[str]:
        """Intervals of the greedy path's estimates (its scores) and of each step's change of the target loss
        (target rows resampled); the significant sources are the path's prefix whose steps all improve."""
        kw = {"level": config.interval_level, "samples": config.bootstrap_samples, "seed": config.seed}
        after = torch.stack([r for _, r in steps])
        score_iv = subset_intervals(after, **kw)
        if steps[0][0] is None:  # no target-train rows: the first step has no "before"; it counts as kept
            diffs = [r - p for p, r in steps[1:]]
            change = subset_intervals(torch.stack(diffs), **kw) if diffs else None
            effects = {chosen[0]: [float("nan"), float("nan")]}
            ups = [-float("inf")] + ([] if change is None else change.upper.tolist())
            if change is not None:
                effects.update(change.as_dict(chosen[1:]))
        else:
            change = subset_intervals(torch.stack([r - p for p, r in steps]), **kw)
            effects = change.as_dict(chosen)
            ups = change.upper.tolist()
        prefix = 0
        while prefix < len(chosen) and ups[prefix] < 0:
            prefix += 1
        out.update(
            level=config.interval_level,
            samples=config.bootstrap_samples,
            method="bootstrap over the target rows (percentile-t); effects are each greedy step's change",
            scores=score_iv.as_dict(chosen),
            effects=effects,
            significant=chosen[:prefix],
        )
        return chosen[:prefix]


def _extension_losses(estimator: Any, chosen: list[str], remaining: list[str]) -> torch.Tensor:
    """Estimated per-target-row losses (B, T) of the subsets chosen + [s] for each s in ``remaining``.

    With a :class:`~hf_subset_select.FirstOrderEstimator` on the fast solver the chosen sources' statistics are
    summed once per greedy step and each candidate's added
    (:meth:`~hf_subset_select.estimate.solvers.FastSolver.solve_extensions`): a step over B candidates costs
    O(B r² + B r³/3), not O(B n r²), so a path over n sources is O(n² r³) instead of O(n³ r²).
    """
    from ..estimate.estimator import FirstOrderEstimator
    from ..estimate.solvers import FastSolver, _in_threads, get_solver

    if isinstance(estimator, FirstOrderEstimator):
        solver = estimator.solver if estimator.solver is not None else get_solver(estimator.config.solver)
        if isinstance(solver, FastSolver) and type(solver).solve is FastSolver.solve:
            problem = estimator.problem
            column = {name: j for j, name in enumerate(problem.order)}
            base = torch.zeros(len(problem.order), dtype=torch.float64)
            base[[column[s] for s in chosen]] = 1.0
            if problem.forced_source is not None:
                base[-1] = 1.0
            columns = torch.tensor([column[s] for s in remaining])
            l2 = estimator.resolved_l2()
            sums = solver.extension_sums(problem, base)  # once per greedy step, before the threads start
            step = solver.chunk_size(problem)
            pieces = [columns[s : s + step] for s in range(0, columns.numel(), step)]

            def work(cols: torch.Tensor) -> torch.Tensor:
                dz = solver.solve_extensions(problem, base, cols, l2, sums=sums)
                return estimator.target_losses(dz).to(torch.float64)

            return torch.cat(_in_threads(problem, pieces, work))
    return estimator.estimate([chosen + [s] for s in remaining], details=True).per_example.to(torch.float64)


def _standard_error(per_row: torch.Tensor) -> torch.Tensor:
    """Standard error of the mean over the last dimension (target rows); 0 with a single row."""
    n = per_row.shape[-1]
    if n < 2:
        return torch.zeros(per_row.shape[:-1], dtype=per_row.dtype)
    return per_row.std(-1, correction=1) / math.sqrt(n)


def _random_membership(n: int, config: SelectConfig, need_nonempty: bool) -> torch.Tensor:
    """``num_subsets`` x ``n`` seeded membership matrix; with ``need_nonempty`` every subset holds a source."""
    gen = torch.Generator().manual_seed(config.seed)
    m = torch.rand(config.num_subsets, n, generator=gen) < config.subset_ratio
    if need_nonempty:
        empty = torch.nonzero(~m.any(1)).flatten()
        if empty.numel():
            m[empty, torch.randint(0, n, (empty.numel(),), generator=gen)] = True
    return m
