"""First-order estimates of the target loss after fine-tuning on a subset of sources.

For a subset S of sources, fine-tuning from θ* is replaced by an L2-regularized logistic regression
on the linearized outputs z_i(w) = f_i + g_iᵀw of the subset's training rows (docs/method.md, section 2):

    ŵ_S = argmin_w  c_S Σ_{i ∈ D_S} log(1 + exp(-z_i(w))) + (λ/2) ||w||²

with c_S = 1/|D_S| (``reduction="mean"``, a fixed number of steps) or 1/N_train (``"sum"``, a fixed
number of epochs). The estimated target loss is L̂(S) = mean_j log(1 + exp(-(f_j + s · g_jᵀŵ_S)))
over the target rows, with a step scale s (1 unless calibrated).

:class:`FirstOrderEstimator` composes three parts: the problem (:mod:`.problem`), a solver (:mod:`.solvers`,
``"fast"`` or ``"exact"``) and a λ policy (:mod:`.regularization`), each injectable.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..collect.cache import GradientCache
from ..config import EstimatorConfig
from . import regularization
from .problem import AUTO_REDUCE_DIM, LinearizedProblem
from .regularization import L2Policy, resolve_l2_policy
from .solvers import Solver, get_solver

__all__ = ["FirstOrderEstimator", "Estimate", "AUTO_REDUCE_DIM"]


@dataclass
class Estimate:
    """Detailed result of :meth:`FirstOrderEstimator.estimate` with ``details=True``.

    Attributes:
        loss: estimated target loss per subset, shape (B,).
        per_example: estimated loss of every target row per subset, shape (B, T).
        per_target_source: mean estimated loss over the target rows of each target source name.
        weights: fitted steps ŵ_S in the cache's d-dim space, shape (B, d).
        subsets: the subsets as lists of candidate source names (the forced target source excluded).
    """

    loss: torch.Tensor
    per_example: torch.Tensor
    per_target_source: dict[str, torch.Tensor]
    weights: torch.Tensor
    subsets: list[list[str]]


class FirstOrderEstimator:
    """Estimate the target loss after fine-tuning on many subsets of sources at once, on a CPU.

    Args:
        cache: a :class:`~hf_subset_select.GradientCache` with training rows and a target split.
        config: an :class:`~hf_subset_select.EstimatorConfig` (default: all defaults); use
            ``dataclasses.replace(config, field=value)`` for a variant.
        target: evaluate on the target rows of this other cache instead (a :class:`GradientCache` or its
            directory), e.g. one collected with ``GradientCollector(target_dataset=..., train_cache=...)``: the
            same θ*, projection, geometry and output function are required (refused with
            :class:`~hf_subset_select.collect.compat.TargetCacheMismatchError` naming the field otherwise).
        solver: a :class:`~hf_subset_select.estimate.solvers.Solver` to use instead of ``config.solver``.
        l2_policy: an :class:`~hf_subset_select.estimate.regularization.L2Policy` to use instead of the
            config's λ rule (then leave ``config.l2`` unset).

    The candidate sources are :attr:`sources`: every training source of the cache except the target's
    own training source when ``include_target_train`` is on (then it is in every subset).
    :func:`~hf_subset_select.estimate.calibrate` fits λ and the step scale to a few real fine-tunes;
    :func:`~hf_subset_select.estimate.forward_check` evaluates the fitted steps on the real model.

    Example::

        est = FirstOrderEstimator(GradientCache.load("grad_cache"))
        est.estimate([["cot_gsm"], ["cot_gsm", "noisy_web"]])   # tensor([L̂_1, L̂_2])
    """

    def __init__(
        self,
        cache: GradientCache,
        config: EstimatorConfig | None = None,
        *,
        target: GradientCache | str | os.PathLike | None = None,
        solver: Solver | None = None,
        l2_policy: L2Policy | None = None,
    ) -> None:
        config = EstimatorConfig() if config is None else config
        if not isinstance(config, EstimatorConfig):
            raise TypeError(
                f"config must be an EstimatorConfig, got {type(config).__name__}; build one with "
                "EstimatorConfig(...) (or dataclasses.replace(config, ...) for a variant)."
            )
        if solver is not None and not isinstance(solver, Solver):
            raise TypeError(
                f"solver must be a Solver instance, got {solver!r}; to pick a built-in solver by name set "
                "EstimatorConfig(solver='fast' | 'exact')."
            )
        if l2_policy is not None and not isinstance(l2_policy, L2Policy):
            raise TypeError(
                f"l2_policy must be an L2Policy instance, got {l2_policy!r}; for a fixed λ set EstimatorConfig(l2=...)."
            )
        if l2_policy is not None and config.l2 is not None:
            raise ValueError(
                f"Both config.l2={config.l2!r} and an l2_policy were given; set only one of them (the config's l2 "
                "is a fixed λ)."
            )
        if target is not None and not isinstance(target, GradientCache):
            target = GradientCache.load(target)
        self.config = config
        self.cache = cache
        self.target_cache: GradientCache = cache if target is None else target
        self.problem = LinearizedProblem(cache, config, target=target)
        self.solver = solver
        self.l2_policy = l2_policy
        self.l2: float | None = config.l2  # set by hand or by calibrate(); wins over the λ policy
        self.step_scale: float = float(config.step_scale)
        self.last_solve_info: dict[str, Any] = {}
        self.calibration: dict[str, Any] | None = None

    # ------------------------------------------------------------------ the problem
    @property
    def sources(self) -> list[str]:
        """The candidate sources (the forced target source excluded)."""
        return self.problem.sources

    @property
    def target_source(self) -> str | None:
        """The cache's target source name."""
        return self.problem.target_source

    @property
    def forced_source(self) -> str | None:
        """The target's training source when it is in every subset, else None."""
        return self.problem.forced_source

    @property
    def dim(self) -> int:
        """The cache's gradient dimension d."""
        return self.problem.dim

    @property
    def num_target(self) -> int:
        """Number of target rows."""
        return self.problem.num_target

    @property
    def reduce_dim(self) -> int:
        """Directions the fast path keeps exactly (= d when there is no reduction)."""
        return self.problem.reduce_dim

    @property
    def base_loss(self) -> float:
        """Target loss at θ* ("no change"): mean_j log(1 + exp(-f_j))."""
        return self.problem.base_loss

    def membership(self, subsets: Any) -> torch.Tensor:
        """Turn subsets (lists of source names, or a boolean matrix over :attr:`sources`) into the
        internal float64 membership matrix (B, n) whose last column is the forced target source."""
        return self.problem.membership(subsets)

    # ------------------------------------------------------------------ λ
    def _policy(self) -> L2Policy:
        return self.l2_policy if self.l2_policy is not None else resolve_l2_policy(self.config)

    def resolved_l2(self) -> float:
        """λ in use: the configured or calibrated value, else the λ policy's (by default the budget rule's when
        ``finetune_lr`` and ``finetune_steps`` are set, else the trust-radius rule's)."""
        if self.l2 is not None:
            return float(self.l2)
        return float(self._policy()(self.problem))

    @property
    def l2_rule(self) -> str:
        """Where :meth:`resolved_l2` comes from: 'calibrated', 'set' (configured), 'budget', 'trust_radius' or an
        injected policy's rule."""
        if self.l2 is not None:
            if self.calibration is not None and self.l2 == self.calibration.get("l2"):
                return "calibrated"
            return "set"
        return self._policy().rule

    def budget_step_size(
        self, lr: float | None = None, optimizer: str | None = None, batch_size: int | None = None
    ) -> float:
        """η_eff of the budget rule; see :func:`~hf_subset_select.estimate.regularization.budget_step_size`."""
        return regularization.budget_step_size(self.problem, lr, optimizer, batch_size)

    def adam_noise_scale(self, batch_size: int) -> float:
        """κ of the budget rule; see :func:`~hf_subset_select.estimate.regularization.adam_noise_scale`."""
        return regularization.adam_noise_scale(self.problem, batch_size)

    def budget_l2(
        self,
        lr: float | None = None,
        steps: int | None = None,
        optimizer: str | None = None,
        batch_size: int | None = None,
    ) -> float:
        """λ = 1 / (η_eff · steps); see :func:`~hf_subset_select.estimate.regularization.budget_l2`."""
        return regularization.budget_l2(self.problem, lr, steps, optimizer, batch_size)

    def auto_l2(self, trust_radius: float | None = None) -> float:
        """The trust-radius λ; see :func:`~hf_subset_select.estimate.regularization.auto_l2`."""
        return regularization.auto_l2(self.problem, trust_radius)

    # ------------------------------------------------------------------ estimates
    def solve(
        self,
        m: torch.Tensor,
        *,
        want_w: bool,
        solver: str | None = None,
        l2: float | None = None,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fit every subset of the membership matrix ``m`` (from :meth:`membership`).

        Args:
            want_w: also return the fitted steps ŵ (B, d).
            solver: a registered solver name for this call (default: the injected solver, else ``config.solver``).
            l2: λ for this call (default: :meth:`resolved_l2`).
            post: applied to each chunk's output changes Δz (B, T) before they are stacked.

        Returns:
            (post(Δz) stacked, ŵ or None).
        """
        if solver is not None:
            chosen = get_solver(solver)
        else:
            chosen = self.solver if self.solver is not None else get_solver(self.config.solver)
        l2 = self.resolved_l2() if l2 is None else float(l2)
        out, w, info = chosen.run(self.problem, m, l2, want_w=want_w, post=post)
        if info:
            self.last_solve_info = info
        return out, w

    def target_losses(self, dz: torch.Tensor, step_scale: float | None = None) -> torch.Tensor:
        """Per-target-row estimated loss for output changes Δz (B, T), at :attr:`step_scale` unless given."""
        return self.problem.target_losses(dz, self.step_scale if step_scale is None else step_scale)

    def estimate(self, subsets: Any, *, details: bool = False, solver: str | None = None) -> Any:
        """Estimated target loss after fine-tuning on each subset.

        Args:
            subsets: a list of subsets (each a list of source names from :attr:`sources`), or a boolean
                matrix of shape (num_subsets, len(sources)).
            details: also return per-example and per-target-source losses and the fitted steps.
            solver: override the solver ('fast' or 'exact') for this call.

        Returns:
            A float64 tensor of shape (num_subsets,), or an :class:`Estimate` when ``details=True``.
        """
        m = self.membership(subsets)
        if not details:
            loss, _ = self.solve(
                m,
                want_w=False,
                solver=solver,
                post=lambda dz: self.target_losses(dz).mean(1, dtype=torch.float64),
            )
            return loss
        per_example, w = self.solve(m, want_w=True, solver=solver, post=self.target_losses)
        per_example = per_example.to(torch.float64)
        loss = per_example.mean(1)
        groups = {name: per_example[:, idx].mean(1) for name, idx in self.problem.target_groups.items()}
        return Estimate(loss, per_example, groups, w, self.problem.names(m))

    def estimate_intervals(
        self,
        subsets: Any,
        *,
        level: float = 0.95,
        samples: int = 1000,
        seed: int = 0,
        solver: str | None = None,
    ) -> Any:
        """Estimated target loss of each subset with a confidence interval over the target rows (they are a sample
        of the target task; bootstrap, percentile-t: :func:`~hf_subset_select.estimate.uncertainty.subset_intervals`).

        Returns:
            An :class:`~hf_subset_select.estimate.uncertainty.Intervals`: ``point`` (= :meth:`estimate`),
            ``lower`` and ``upper``, each of shape (num_subsets,).
        """
        from .uncertainty import subset_intervals

        rows = self.estimate(subsets, details=True, solver=solver).per_example
        return subset_intervals(rows, level=level, samples=samples, seed=seed)

    def fitted_steps(self, subsets: Any, *, solver: str | None = None) -> torch.Tensor:
        """ŵ_S (times the step scale) for each subset, shape (B, d): the parameter change is P·ŵ_S."""
        _, w = self.solve(self.membership(subsets), want_w=True, solver=solver)
        return self.step_scale * w

    def per_source_loss(self, sources: Sequence[str] | None = None) -> dict[str, float]:
        """Estimated target loss after fine-tuning on each source alone (plus the forced target source)."""
        names = list(self.sources if sources is None else sources)
        if not names:
            return {}
        losses = self.estimate([[s] for s in names])
        return {s: float(v) for s, v in zip(names, losses)}

    def __repr__(self) -> str:
        solver = self.solver.name if self.solver is not None else self.config.solver
        return (
            f"FirstOrderEstimator(sources={len(self.sources)}, forced={self.forced_source!r}, d={self.dim}, "
            f"reduce_dim={self.reduce_dim}, solver={solver!r}, l2={self.l2!r}, "
            f"step_scale={self.step_scale:g}, target_rows={self.num_target})"
        )
