"""λ policies: where the estimator's L2 strength comes from (docs/method.md, section 6).

* :class:`FixedL2` (rule ``"set"``): a λ given by hand (``EstimatorConfig.l2``).
* :class:`BudgetL2` (rule ``"budget"``): λ = 1 / (η_eff · steps) for a known fine-tune (``finetune_lr`` and
  ``finetune_steps``), with AdamW's effective step size η_eff and its noise scale κ read from the cache.
* :class:`TrustRadiusL2` (rule ``"trust_radius"``): λ bounding a typical subset's step (``trust_radius``).

:func:`resolve_l2_policy` picks one from a config; :func:`budget_fields_from_training_args` reads a fine-tune's
budget off its ``TrainingArguments`` (for :meth:`EstimatorConfig.from_training_args`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ..config import EstimatorConfig
from .problem import LinearizedProblem
from .solvers import quadratic_step, single_threaded_blas

__all__ = [
    "L2Policy",
    "FixedL2",
    "BudgetL2",
    "TrustRadiusL2",
    "resolve_l2_policy",
    "auto_l2",
    "budget_l2",
    "budget_step_size",
    "adam_noise_scale",
    "budget_fields_from_training_args",
]

_REF_ROWS = 4096  # training rows sampled to measure the step size of the trust-radius rule


class L2Policy:
    """Where λ comes from. Subclass it, set :attr:`rule` and implement :meth:`__call__`; pass an instance as
    ``FirstOrderEstimator(cache, l2_policy=...)`` to use it."""

    rule: str = "custom"

    def __call__(self, problem: LinearizedProblem) -> float:
        """λ for this problem (read its settings from ``problem.config`` at call time)."""
        raise NotImplementedError(f"{type(self).__name__} must implement __call__(problem) -> float.")


class FixedL2(L2Policy):
    """A λ given by hand."""

    rule = "set"

    def __init__(self, value: float) -> None:
        if not (value > 0 and math.isfinite(value)):
            raise ValueError(f"FixedL2 needs a finite λ > 0, got {value!r}.")
        self.value = float(value)

    def __call__(self, problem: LinearizedProblem) -> float:
        return self.value


class BudgetL2(L2Policy):
    """λ = 1 / (η_eff · steps) from the config's ``finetune_*`` fields (computed once per setting)."""

    rule = "budget"

    def __call__(self, problem: LinearizedProblem) -> float:
        cfg = problem.config
        key = (
            "budget",
            cfg.finetune_lr,
            cfg.finetune_steps,
            cfg.finetune_optimizer,
            cfg.finetune_batch_size,
            cfg.reduction,
        )
        return problem.memo(key, lambda: budget_l2(problem))


class TrustRadiusL2(L2Policy):
    """The automatic λ of :func:`auto_l2` at the config's ``trust_radius`` (computed once per setting)."""

    rule = "trust_radius"

    def __call__(self, problem: LinearizedProblem) -> float:
        cfg = problem.config
        key = ("trust_radius", cfg.trust_radius, cfg.reduction, cfg.seed)
        return problem.memo(key, lambda: auto_l2(problem))


def resolve_l2_policy(config: EstimatorConfig) -> L2Policy:
    """The policy a config asks for: ``l2`` if set, else the budget rule when ``finetune_lr`` (and
    ``finetune_steps``) are set, else the trust-radius rule."""
    if config.l2 is not None:
        return FixedL2(config.l2)
    if config.finetune_lr is not None:
        return BudgetL2()
    return TrustRadiusL2()


# ---------------------------------------------------------------------- budget rule
def budget_step_size(
    problem: LinearizedProblem,
    lr: float | None = None,
    optimizer: str | None = None,
    batch_size: int | None = None,
) -> float:
    """η_eff: the plain gradient-descent step size, in the cache's feature geometry, that stands for a fine-tune
    at learning rate ``lr`` with ``optimizer`` ('adamw' or 'sgd') and ``batch_size`` examples per step
    (defaults: the config's ``finetune_*`` fields). docs/method.md, section 6, has the derivation.

    * SGD on raw gradients: η_eff = η.
    * AdamW moves coordinate c by about η μ_c / D'_c, D'_c the fine-tune's own root second moment. In a cache
      collected in Adam geometry the features already carry the meta-training denominators D_c, so
      η_eff = η / κ; on raw gradients η_eff = η / (D̄ κ), with D̄ and Σ_c D_c, Σ_c v̂_c read by the collector from
      the meta-training optimizer (``precondition.adam_scalars``, :func:`~hf_subset_select.collect.precondition.adam_step_scalars`).
      κ is :func:`adam_noise_scale`.
    """
    cfg = problem.config
    lr = cfg.finetune_lr if lr is None else float(lr)
    optimizer = optimizer or cfg.finetune_optimizer
    batch_size = cfg.finetune_batch_size if batch_size is None else int(batch_size)
    if lr is None or not lr > 0:
        raise ValueError("budget_step_size() needs a positive learning rate (EstimatorConfig.finetune_lr).")
    kind = problem.cache.precondition_info(with_sha256=False).get("kind", "none")
    if optimizer == "sgd":
        if kind != "none":
            raise ValueError(
                f"The cache was collected in a preconditioned geometry (precondition kind {kind!r}), which models "
                "AdamW, but finetune_optimizer='sgd'. Collect with CollectConfig(precondition='none') for an SGD "
                "fine-tune, or set finetune_optimizer='adamw'."
            )
        return lr
    if optimizer != "adamw":
        raise ValueError(f"optimizer={optimizer!r} is not valid; choose 'adamw' or 'sgd'.")
    if batch_size is None or batch_size <= 0:
        raise ValueError(
            "The budget λ rule for an AdamW fine-tune needs its batch size (examples per optimizer step, all "
            "processes and accumulation steps together): set EstimatorConfig.finetune_batch_size, or build the "
            "config with EstimatorConfig.from_training_args(args)."
        )
    _, scalars = _adam_scalars(problem)
    kappa = adam_noise_scale(problem, batch_size)
    if kind == "none":
        return lr / (scalars["denominator"] * kappa)
    return lr / kappa


def _adam_scalars(problem: LinearizedProblem) -> tuple[str, dict[str, float]]:
    """The cache's geometry kind and the meta-training AdamW's step scalars, or a ValueError naming the fix."""
    info = problem.cache.precondition_info(with_sha256=False)
    scalars = info.get("adam_scalars") or {}
    needed = ("denominator", "sum_denominator", "sum_second_moment")
    if all(isinstance(scalars.get(k), (int, float)) and scalars[k] > 0 for k in needed):
        return str(info.get("kind", "none")), {k: float(scalars[k]) for k in needed}
    reason = info.get("adam_scalars_error")
    raise ValueError(
        "The budget λ rule for an AdamW fine-tune needs the meta-training AdamW's step size, which the collector "
        "records (precondition.adam_scalars in the cache manifest) only when it sees that optimizer"
        + (f"; here it could not read it: {reason}" if reason else "")
        + ". Re-collect as a Trainer callback or with collect(..., optimizer=trainer.optimizer), with "
        "CollectConfig(overwrite=True) (an existing collection is otherwise reused as it is); or set "
        "EstimatorConfig.l2 yourself; or leave finetune_lr/finetune_steps unset for the trust-radius λ, and "
        "calibrate() it on a few real fine-tunes."
    )


def adam_noise_scale(problem: LinearizedProblem, batch_size: int) -> float:
    """κ of :func:`budget_step_size`: the typical fine-tune's root minibatch second moment at θ* over the
    meta-training optimizer's (1 when they agree; > 1 when a subset's mean gradient or a smaller batch makes
    AdamW's own denominators larger).

    κ² = E‖ḡ‖² / Σ_c D_c (Adam geometry) or E‖ḡ‖² / Σ_c v̂_c (raw): how much larger the fine-tune's minibatch
    gradients ḡ at θ* (signal plus minibatch noise, from the cache) are than what the meta-training optimizer
    saw, as the median over the 64 reference subsets (computed once per batch size).
    """
    key = int(batch_size)
    if key <= 0:
        raise ValueError(f"batch_size must be a positive number of examples per step, got {batch_size!r}.")
    return problem.memo(("adam_noise_scale", key), lambda: _noise_scale(problem, key))


def _noise_scale(problem: LinearizedProblem, batch_size: int) -> float:
    kind, scalars = _adam_scalars(problem)
    reference = scalars["sum_second_moment" if kind == "none" else "sum_denominator"]
    # per-source sums of the per-example loss gradients resid_i g_i are the fast path's statistics (kept
    # directions plus the orthogonal tail, so their squared norms add up); squared norms row by row
    st = problem.statistics()
    resid = torch.sigmoid(-problem.outputs)  # |dℓ/dz| at θ*
    norms = problem.row_sq_norms()
    second = torch.zeros(len(problem.order), dtype=torch.float64).index_add_(
        0, problem.row_source, resid * resid * norms
    )
    m = problem.reference_membership()
    count = m @ problem.counts
    mean_sq = ((m @ st.grad) / count[:, None]).pow(2).sum(1)
    if st.tail_grad is not None:
        mean_sq = mean_sq + ((m @ st.tail_grad) / count[:, None]).pow(2).sum(1)
    minibatch = mean_sq + ((m @ second) / count - mean_sq).clamp_min(0.0) / batch_size
    return math.sqrt(max(float(minibatch.median()) / reference, 1e-30))


def budget_l2(
    problem: LinearizedProblem,
    lr: float | None = None,
    steps: int | None = None,
    optimizer: str | None = None,
    batch_size: int | None = None,
) -> float:
    """λ of the budget rule: 1 / (η_eff · steps) (documented in docs/method.md, section 6).

    Gradient descent for t = η_eff · steps on the quadratic model and the ridge with λ = 1/t shrink each
    curvature direction h by nearly the same factor (1 - exp(-h t) against h t / (1 + h t)), so the ridge
    stands for that fine-tuning budget. Defaults: the config's ``finetune_*`` fields; with ``reduction="sum"``,
    ``steps`` counts a fine-tune over all training rows for the same number of epochs. η_eff comes from
    :func:`budget_step_size`.
    """
    steps = problem.config.finetune_steps if steps is None else int(steps)
    if steps is None or steps <= 0:
        raise ValueError("budget_l2() needs a positive number of steps (EstimatorConfig.finetune_steps).")
    return 1.0 / (budget_step_size(problem, lr, optimizer, batch_size) * steps)


# ---------------------------------------------------------------------- trust-radius rule
def auto_l2(problem: LinearizedProblem, trust_radius: float | None = None) -> float:
    """The automatic λ (documented in docs/method.md).

    Under the fast path's quadratic model, take 64 random reference subsets (each source in with
    probability 1/2) and measure the RMS change g_iᵀŵ_S of the outputs of each subset's own training
    rows (4,096 sampled rows); ρ(λ) is the median over the subsets. λ is the larger of

    * λ_trust: ρ(λ) = ``trust_radius`` (the step stays where the expansion around θ* holds), and
    * λ_half: ρ(λ) = ρ(0) / 2 (the ridge halves the unregularized Newton step, so λ is on the
      scale of the curvature along the step and the exact solution stays finite and close),

    each found by bisection in log λ.
    """
    cfg = problem.config
    delta = cfg.trust_radius if trust_radius is None else float(trust_radius)
    st = problem.statistics()
    m = problem.reference_membership()
    gen = torch.Generator().manual_seed(cfg.seed + 1)
    rows = torch.randperm(problem.features.shape[0], generator=gen)[:_REF_ROWS]
    g_rows = problem.features[rows].to(torch.float64)
    in_subset = m[:, problem.row_source[rows]] > 0  # (R, rows)
    # the rows' coordinates in the kept directions and against each source's tail gradient, so that a
    # step's output changes cost O(r) per row instead of O(d)
    rows_r = g_rows if st.basis is None else g_rows @ st.basis
    rows_tail = None if st.tail_grad is None else st.tail_grad @ g_rows.T  # (n, rows)
    total_curv = float(st.gram[:, :: st.rank + 1].sum())
    if st.tail_trace is not None:
        total_curv += float(st.tail_trace.sum())
    scale0 = max(total_curv / float(problem.counts.sum()) / problem.dim, 1e-30)

    def rms(l2: float) -> float:
        try:
            w_r, coef, mm = quadratic_step(problem, m, l2)
        except FloatingPointError:  # numerically singular at this λ: an unbounded step
            return math.inf
        dz = w_r.to(torch.float64) @ rows_r.T
        if coef is not None:
            dz = dz + coef.to(torch.float64)[:, None] * (mm.to(torch.float64) @ rows_tail)
        sq = (dz * dz * in_subset).sum(1) / in_subset.sum(1).clamp_min(1)
        return float(torch.median(sq.sqrt()))

    lo0, hi0 = math.log(scale0 * 1e-9), math.log(scale0 * 1e9)
    with single_threaded_blas():
        return _bisect_l2(rms, lo0, hi0, delta)


def _bisect_l2(rms: Callable[[float], float], lo0: float, hi0: float, delta: float) -> float:
    """max(λ_trust, λ_half) of :func:`auto_l2`: roots of ρ(λ) = level in log λ between exp(lo0) and exp(hi0),
    to within :data:`_LOG_L2_TOL` of log λ.

    ρ is decreasing and smooth in log λ, so a safeguarded secant step on log ρ (Illinois) brackets each root in
    a few evaluations where plain bisection over the 41-unit bracket takes 12; every evaluation is remembered
    and narrows the starting bracket of the second level.
    """
    seen: dict[float, float] = {}

    def at(x: float) -> float:
        if x not in seen:
            seen[x] = rms(math.exp(x))
        return seen[x]

    rho0 = at(lo0)

    def solve(level: float) -> float:
        if rho0 <= level:
            return math.exp(lo0)
        if at(hi0) >= level:
            return math.exp(hi0)
        # the tightest bracket among the points seen so far: ρ(lo) > level >= ρ(hi)
        lo = max(x for x, v in seen.items() if v > level)
        hi = min(x for x, v in seen.items() if v <= level)
        return math.exp(_log_root(at, lo, hi, level, rho0))

    return max(solve(delta), solve(0.5 * rho0))


_LOG_L2_TOL = 0.005  # half-width of the final bracket in log λ (λ to within 0.5 %)


def _log_root(at: Callable[[float], float], lo: float, hi: float, level: float, rho0: float) -> float:
    """x in [lo, hi] with ρ(x) = level for a decreasing ρ (ρ(lo) > level >= ρ(hi)), stopped at a bracket of
    width 2 · :data:`_LOG_L2_TOL`; returns its midpoint (what bisection returns, in fewer evaluations).

    Secant steps on u = -log(ρ0/ρ - 1), which a ridge with one curvature scale h makes exactly log h - log λ
    (ρ = ρ0 h / (h + λ)): nearly a straight line of slope -1 in log λ, so the first step (from the high end,
    slope -1) already lands near the root. Each step is pushed by the tolerance past its estimate, towards the
    end of the bracket that has not moved, so that the bracket closes from both sides; a step that leaves the
    bracket, or two in a row that do not halve it, is replaced by bisection.
    """
    ridge = math.isfinite(rho0) and rho0 > level > 0

    def u(v: float) -> float:
        if not math.isfinite(v):
            return math.inf
        if ridge:
            return -math.log(max(rho0 / max(v, 1e-300) - 1.0, 1e-300))
        return math.log(max(v, 1e-300))

    target = u(level)

    def y(x: float) -> float:
        return u(at(x)) - target

    usable = lambda v: math.isfinite(v) and abs(v) < 600  # noqa: E731 - not saturated at ρ0 or 0
    last: list[tuple[float, float]] = [(x, v) for x, v in ((hi, y(hi)), (lo, y(lo))) if usable(v)][:1]
    side, stall = 0, 0
    while hi - lo > 2 * _LOG_L2_TOL:
        width = hi - lo
        if len(last) == 2 and last[0][1] != last[1][1]:
            (x0, y0), (x1, y1) = last
            x = x1 - y1 * (x1 - x0) / (y1 - y0)
        elif last:
            x = last[-1][0] + last[-1][1]  # slope -1
        else:
            x = math.nan
        x -= side * _LOG_L2_TOL
        if stall >= 2 or not lo < x < hi:
            x, stall = 0.5 * (lo + hi), 0
        x = min(max(x, lo + 0.5 * _LOG_L2_TOL), hi - 0.5 * _LOG_L2_TOL)
        y_x = y(x)
        if usable(y_x):
            last = (last + [(x, y_x)])[-2:]
        if y_x > 0:  # the root is above x
            lo, side = x, -1
        else:
            hi, side = x, 1
        stall = stall + 1 if hi - lo > 0.5 * width else 0
    return 0.5 * (lo + hi)


# ---------------------------------------------------------------------- a fine-tune's budget
def _mean_learning_rate(args: Any, steps: int) -> float:
    """The learning rate of ``args`` averaged over ``steps`` steps of its schedule (warmup and decay included)."""
    from transformers.optimization import get_scheduler

    lr = float(args.learning_rate)
    kind = str(getattr(args.lr_scheduler_type, "value", args.lr_scheduler_type))
    if kind in ("reduce_lr_on_plateau", "greedy"):  # they follow metrics nobody has yet: taken as constant
        return lr
    param = torch.nn.Parameter(torch.zeros(1))
    optimizer = torch.optim.SGD([param], lr=lr)
    scheduler = get_scheduler(
        args.lr_scheduler_type,
        optimizer=optimizer,
        num_warmup_steps=args.get_warmup_steps(steps),
        num_training_steps=steps,
        scheduler_specific_kwargs=dict(args.lr_scheduler_kwargs or {}),
    )
    lambdas = getattr(scheduler, "lr_lambdas", None)
    if lambdas is not None and len(lambdas) == 1:  # transformers' schedules: lr(t) = lr * λ(t)
        return lr * sum(float(lambdas[0](t)) for t in range(steps)) / steps
    total = 0.0
    for _ in range(steps):
        total += float(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return total / steps


def budget_fields_from_training_args(
    args: Any, num_train_examples: int | None = None, **fields: Any
) -> dict[str, Any]:
    """The :class:`EstimatorConfig` fields of the budget rule read off a fine-tune's ``TrainingArguments``, with
    ``fields`` on top; :meth:`EstimatorConfig.from_training_args` documents what is read."""
    optim = str(getattr(args.optim, "value", args.optim)).lower()
    if optim.startswith("sgd"):
        optimizer = "sgd"
    elif "adam" in optim:
        optimizer = "adamw"
    else:
        raise ValueError(
            f"The budget λ rule models AdamW and SGD fine-tunes, not optim={optim!r}. Set EstimatorConfig.l2 "
            "yourself, or calibrate() the estimator on a few real fine-tunes."
        )
    # what the Trainer steps with: per device (x GPUs under DataParallel) x accumulation x processes
    batch = int(args.train_batch_size) * args.gradient_accumulation_steps * max(args.world_size, 1)
    if args.max_steps is not None and args.max_steps > 0:
        steps, reduction = int(args.max_steps), "mean"
    else:
        if num_train_examples is None or num_train_examples <= 0:
            raise ValueError(
                "These TrainingArguments run for num_train_epochs (max_steps is not set), so the number of steps "
                "depends on the data: pass num_train_examples= (the training rows of all sources, e.g. "
                "int(cache.train_mask.sum())), or set max_steps."
            )
        per_epoch = max(math.ceil(num_train_examples / batch), 1)
        steps, reduction = max(math.ceil(args.num_train_epochs * per_epoch), 1), "sum"
    lr = float(args.learning_rate)
    if not lr > 0:
        raise ValueError(
            f"The TrainingArguments have learning_rate={lr!r}; the budget rule needs a positive one."
        )
    mean_lr = _mean_learning_rate(args, steps)
    if not mean_lr > 0:
        raise ValueError(
            "The learning-rate schedule of these TrainingArguments is zero at every step; the budget rule needs "
            "a fine-tune that moves."
        )
    if "reduction" in fields and fields["reduction"] != reduction:
        raise ValueError(
            f"reduction={fields['reduction']!r} does not match how these TrainingArguments count steps: "
            + (
                "max_steps is set, so every subset gets the same steps (reduction='mean')."
                if reduction == "mean"
                else "they run epochs, so a bigger subset takes more steps (reduction='sum')."
            )
            + " Drop the reduction argument, or set finetune_lr/finetune_steps yourself."
        )
    values: dict[str, Any] = {
        "finetune_lr": mean_lr,
        "finetune_steps": steps,
        "finetune_optimizer": optimizer,
        "finetune_batch_size": batch,
        "reduction": reduction,
    }
    values.update(fields)
    return values
