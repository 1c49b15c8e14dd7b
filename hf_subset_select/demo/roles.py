"""Proof of the demo sources' roles: fine-tunes of the base on the target alone and on the target plus one source.

:func:`measure_roles` runs them (several seeds; the seed-to-seed spread is the noise) and :func:`check_roles`
states the criteria: helpful sources lower the target loss and harmful ones raise it, each by far more than the
seed noise, while irrelevant ones move it by no more than a few times the noise.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Mapping, Sequence
from typing import Any

from .tasks import DemoTasks

__all__ = ["measure_roles", "check_roles"]


def _sample_var(values: Sequence[float]) -> float:
    return statistics.variance(values) if len(values) > 1 else 0.0


def measure_roles(
    tasks: DemoTasks,
    *,
    seeds: Sequence[int] = (0, 1, 2),
    source_seeds: Sequence[int] | None = None,
    sources: Sequence[str] | None = None,
    base_seed: int | None = 0,
    kind: str = "gpt2",
    progress: Any = None,
    **overrides: Any,
) -> dict[str, Any]:
    """Single-source fine-tunes: the target alone and target + one source, each under several seeds.

    Every run starts from the same base model (``tasks.make_model(base_seed)``) with the same budget; a
    run's seed sets its data order. With ``base_seed=None`` each seed also gets its own base model, so the
    noise includes the model's initialization and pretraining. ``source_seeds`` (default: ``seeds``) are
    the seeds of the target + source runs; deltas are paired by seed.

    The noise is the spread of the target loss between seeds of one configuration: ``loss_pooled_sd``
    pools the seed-to-seed variance over every configuration run with two or more seeds (target alone
    and target + each source); the target-alone spread is reported too.

    Returns a JSON-serializable dict: ``target_alone`` (metrics per seed), ``noise``, and per source its
    ``role``, runs, paired deltas and mean deltas.
    """
    seeds = list(seeds)
    source_seeds = list(seeds if source_seeds is None else source_seeds)
    if not set(source_seeds) <= set(seeds):
        raise ValueError("source_seeds must be a subset of seeds (deltas are paired with target-alone runs).")
    names = list(tasks.sources if sources is None else sources)

    def run(srcs: Sequence[str], seed: int) -> dict[str, float]:
        model = tasks.make_model(seed if base_seed is None else base_seed, kind=kind)
        result = tasks.finetune(model, srcs, seed=seed, **overrides)
        if progress is not None:
            progress(srcs, seed, result)
        return result.to_dict()

    alone = {seed: run([], seed) for seed in seeds}
    losses = [alone[s]["loss"] for s in seeds]
    accs = [alone[s]["token_accuracy"] for s in seeds]
    variances = [_sample_var(losses)] if len(seeds) > 1 else []
    report: dict[str, Any] = {
        "scale": tasks.scale,
        "seeds": seeds,
        "source_seeds": source_seeds,
        "base_seed": base_seed,
        "training": {**tasks.training, **overrides},
        "target_alone": {str(s): alone[s] for s in seeds},
        "sources": {},
    }
    for name in names:
        runs = {seed: run([name], seed) for seed in source_seeds}
        if len(source_seeds) > 1:
            variances.append(_sample_var([r["loss"] for r in runs.values()]))
        d_loss = [runs[s]["loss"] - alone[s]["loss"] for s in source_seeds]
        d_acc = [runs[s]["token_accuracy"] - alone[s]["token_accuracy"] for s in source_seeds]
        report["sources"][name] = {
            "role": tasks.roles[name],
            "runs": {str(s): runs[s] for s in source_seeds},
            "delta_loss": d_loss,
            "delta_token_accuracy": d_acc,
            "mean_delta_loss": statistics.fmean(d_loss),
            "mean_delta_token_accuracy": statistics.fmean(d_acc),
        }
    report["noise"] = {
        "loss_pooled_sd": math.sqrt(statistics.fmean(variances)) if variances else 0.0,
        "configurations_pooled": len(variances),
        "target_alone_loss_sd": math.sqrt(_sample_var(losses)),
        "target_alone_loss_range": max(losses) - min(losses),
        "target_alone_token_accuracy_range": max(accs) - min(accs),
    }
    return report


def check_roles(
    report: Mapping[str, Any],
    *,
    min_effect: float = 0.3,
    effect_noise_multiple: float = 4.0,
    irrelevant_noise_multiple: float = 3.0,
    irrelevant_accuracy: float = 0.03,
) -> list[str]:
    """The role criteria on a :func:`measure_roles` report; returns the violations (empty when all hold).

    With ``noise`` = the pooled seed-to-seed standard deviation of the target loss:

    * helpful: every paired delta of the target loss is below ``-max(min_effect, effect_noise_multiple * noise)``;
    * harmful: every paired delta is above ``+max(min_effect, effect_noise_multiple * noise)``;
    * irrelevant: the mean delta is within ``±irrelevant_noise_multiple * noise`` and the token accuracy
      moves by at most ``irrelevant_accuracy``.
    """
    noise = float(report["noise"]["loss_pooled_sd"])
    if report["noise"].get("configurations_pooled", 0) == 0:
        raise ValueError("The report has no seed-to-seed noise; run measure_roles with two or more seeds.")
    bar = max(min_effect, effect_noise_multiple * noise)
    irrelevant_bar = irrelevant_noise_multiple * noise
    problems: list[str] = []
    for name, info in report["sources"].items():
        deltas = [float(d) for d in info["delta_loss"]]
        role = info["role"]
        if role == "helpful" and not all(d < -bar for d in deltas):
            problems.append(f"{name} (helpful): loss deltas {deltas} not all below -{bar:.3f}")
        elif role == "harmful" and not all(d > bar for d in deltas):
            problems.append(f"{name} (harmful): loss deltas {deltas} not all above +{bar:.3f}")
        elif role == "irrelevant":
            if abs(info["mean_delta_loss"]) > irrelevant_bar:
                problems.append(
                    f"{name} (irrelevant): mean loss delta {info['mean_delta_loss']:+.3f} exceeds "
                    f"±{irrelevant_bar:.3f}"
                )
            if abs(info["mean_delta_token_accuracy"]) > irrelevant_accuracy:
                problems.append(
                    f"{name} (irrelevant): token accuracy moved by {info['mean_delta_token_accuracy']:+.3f}"
                )
    return problems
