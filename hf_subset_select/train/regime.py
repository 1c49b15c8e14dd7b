"""Step 5, a check on the target fine-tune: did it stay in the regime the first-order estimate models?

The estimate (step 3) stands for a fine-tune that takes a small step from θ* and lowers the target loss. A
fine-tune that ends with a *higher* loss on the target's dev rows than it started with (too high a learning rate,
too many steps over a small target, a fresh optimizer's first large steps) has left that regime: the estimate's
ranking of subsets is not about that fine-tune any more. Measured on real tasks (docs/benchmarks.md, "The fine-tune
budget the estimate stands for"), the estimate ranked subsets with Spearman 0.81 when 6% of the fine-tunes ended
above θ*'s dev loss and 0.36 when 71% did.

:class:`RegimeCheckCallback` watches the target fine-tune's evaluations: the first one (``eval_on_start=True``, at
θ*) and the last. When the last loss is above the first by more than ``tolerance`` it says so, with the fix
(``warn``, the default) or stops with an error (``error``). Its ``report`` keeps the figures either way.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from accelerate.logging import get_logger
from transformers import TrainerCallback

__all__ = ["RegimeCheckCallback", "RegimeError"]

logger = get_logger(__name__)


class RegimeError(RuntimeError):
    """The target fine-tune ended above the dev loss it started from (``RegimeCheckCallback(on_violation="error")``)."""


class RegimeCheckCallback(TrainerCallback):
    """Compares the target fine-tune's last dev loss with its first (at θ*), at the end of training.

    Args:
        metric_key: the evaluation metric to compare (``eval_loss``; with several eval datasets
            ``eval_<name>_loss``).
        tolerance: relative rise allowed before it counts (0.0: any rise; 0.05: more than 5% above the start).
        on_violation: ``"warn"`` logs a warning with the fix; ``"error"`` raises :class:`RegimeError` after
            training (the trained model and its checkpoints are kept).

    Use it with ``TrainingArguments(eval_on_start=True, eval_strategy="steps" or "epoch")`` so that the start and
    the end are both evaluated. ``report`` (after training, or from :meth:`check`) holds ``start_loss``,
    ``end_loss``, their steps, ``relative_change`` and ``in_regime``.
    """

    def __init__(
        self,
        metric_key: str = "eval_loss",
        tolerance: float = 0.0,
        on_violation: Literal["warn", "error"] = "warn",
    ) -> None:
        if not isinstance(metric_key, str) or not metric_key:
            raise ValueError(
                f"metric_key must be the name of an evaluation metric such as 'eval_loss', got {metric_key!r}."
            )
        if not (isinstance(tolerance, (int, float)) and math.isfinite(tolerance) and tolerance >= 0):
            raise ValueError(f"tolerance must be a finite number >= 0 (a relative rise), got {tolerance!r}.")
        if on_violation not in ("warn", "error"):
            raise ValueError(f"on_violation must be 'warn' or 'error', got {on_violation!r}.")
        self.metric_key, self.tolerance, self.on_violation = metric_key, float(tolerance), on_violation
        self.history: list[tuple[int, float]] = []
        self.report: dict[str, Any] | None = None

    def on_evaluate(
        self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None, **kwargs: Any
    ):
        """Records ``(global_step, metrics[metric_key])`` of every evaluation."""
        if metrics and self.metric_key in metrics:
            self.history.append((int(state.global_step), float(metrics[self.metric_key])))
        return control

    def check(self) -> dict[str, Any]:
        """The comparison of the first and the last recorded evaluation (``report``); raises when fewer than two
        evaluations were recorded or the first was not at the start."""
        if len(self.history) < 2:
            raise ValueError(
                f"RegimeCheckCallback saw {len(self.history)} evaluation(s) with {self.metric_key!r}; it needs one "
                "at the start and one later: set TrainingArguments(eval_on_start=True, eval_strategy='steps' or "
                "'epoch') and an eval_dataset, or pass metric_key= the loss your evaluation reports."
            )
        (start_step, start), (end_step, end) = self.history[0], self.history[-1]
        if start_step != 0:
            raise ValueError(
                f"The first evaluation with {self.metric_key!r} was at step {start_step}, not at the start: set "
                "TrainingArguments(eval_on_start=True) so the check compares against the loss the fine-tune "
                "started from."
            )
        change = (end - start) / abs(start) if start != 0 else math.copysign(math.inf, end - start)
        self.report = {
            "metric_key": self.metric_key,
            "start_step": start_step,
            "start_loss": start,
            "end_step": end_step,
            "end_loss": end,
            "relative_change": change,
            "tolerance": self.tolerance,
            "in_regime": change <= self.tolerance,
        }
        return self.report

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any):
        """Checks, then warns or raises when the fine-tune ended above its start."""
        try:
            report = self.check()
        except ValueError as err:
            logger.warning(f"Regime check skipped: {err}")
            return control
        if report["in_regime"]:
            return control
        message = (
            f"The target fine-tune ended with {self.metric_key}={report['end_loss']:.4g} at step "
            f"{report['end_step']}, {100 * report['relative_change']:.1f}% above the {report['start_loss']:.4g} it "
            "started from. The first-order estimates model a fine-tune that lowers the target loss from θ*, so "
            "they do not rank subsets for this one: lower learning_rate or max_steps (check again on dev), or "
            "judge the selection by real dev fine-tunes (verify_selection)."
        )
        if self.on_violation == "error":
            raise RegimeError(message)
        logger.warning(message)
        return control
