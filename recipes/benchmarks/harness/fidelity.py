"""The fidelity protocol: real fine-tunes of random subsets from θ* against the estimates of their target loss.

Shared by ``fidelity.py`` (tiny GPT-2) and ``fidelity_pretrained.py`` (MiniLM-L6 + LoRA): the truth runs (with a
:class:`~harness.training.TruthCache`), the estimates under several λ rules (trust-radius default, budget rule,
calibrated on held-apart subsets, in-sample bound) with their metrics, and the forward check.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from .estimation import budget_metrics, calibrate, forward_check, with_l2
from .stats import fidelity_metrics, spearman
from .training import Stopwatch, TruthCache

Subset = tuple[str, ...]
Truth = dict[tuple, dict[Subset, dict[str, Any]]]


def real_finetunes(
    keys: Sequence[tuple],
    subsets: Sequence[Subset],
    run_subset: Callable[[tuple, Subset, Stopwatch], dict[str, Any]],
    cache: TruthCache | None = None,
) -> tuple[Truth, Stopwatch, bool]:
    """``{key: {subset: run_subset(key, subset, watch)}}`` for every key (e.g. (lr, budget)) and subset.

    With a ``cache`` holding results for the same manifest they are reused instead (no run); fresh results are
    saved to it. Returns the results, the stopwatch of the fine-tunes and whether they were reused.
    """
    loaded = cache.load() if cache is not None else None
    if loaded is not None:
        print(f"reusing the real fine-tunes from {cache.path}", flush=True)
        return loaded[0], loaded[1], True
    watch = Stopwatch()
    truth: Truth = {}
    t_start = time.perf_counter()
    for key in keys:
        truth[key] = {subset: run_subset(key, subset, watch) for subset in subsets}
        print(f"fine-tunes done: {key} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    if cache is not None:
        cache.save(truth, watch)
    return truth, watch, False


def calibration_grid(auto_l2: float, solver: str) -> list[float] | None:
    """λ candidates of a calibration: the exact solver is slow at tiny λ, so it gets a coarser grid (10^0.5 steps
    over 10^-2 ... 10^3 times the automatic λ); the fast path the estimator's default grid (None)."""
    return [auto_l2 * 10 ** (k / 2) for k in range(-4, 7)] if solver == "exact" else None


def estimate_figures(
    est: Any,
    *,
    auto_l2: float,
    default: list[float],
    evals: Sequence[Subset],
    truth: list[float],
    calib_truth: dict[Subset, float],
    base: float,
    other: list[float],
    other_name: str,
    budget: dict[str, Any],
    solver: str,
    in_sample: bool = True,
) -> dict[str, Any]:
    """Metrics of the default (``default``: estimates at the automatic λ), budget-rule, calibrated (λ and step scale;
    also λ alone, ``calibrated_lambda_only_*``) and in-sample estimates of ``evals`` against ``truth`` (``other``: a
    second true series, named ``other_name``).

    ``budget``: the real fine-tunes' ``lr``, ``steps``, ``optimizer`` and ``batch_size``. The in-sample bound fits λ
    and the step scale on the evaluated subsets themselves (not a fair figure: it shows how much of the error they can
    remove at all). The estimator ends calibrated on ``calib_truth``.
    """
    grid = calibration_grid(auto_l2, solver)
    oracle_est = None
    if in_sample:
        with_l2(est, auto_l2)
        calibrate(est, dict(zip(evals, truth)), l2_grid=grid, tolerance=0.0)
        oracle_est = est.estimate([list(s) for s in evals]).tolist()
        with_l2(est, auto_l2)
    budget_keys = budget_metrics(est, evals, truth, base, other, **budget)
    with_l2(est, auto_l2)
    report_l2 = calibrate(est, calib_truth, l2_grid=grid, fit_step_scale=False)  # λ alone, step scale 1
    m_l2 = fidelity_metrics(est.estimate([list(s) for s in evals]).tolist(), truth, base, other)
    with_l2(est, auto_l2)
    report = calibrate(est, calib_truth, l2_grid=grid)
    calibrated = est.estimate([list(s) for s in evals]).tolist()
    m_default = fidelity_metrics(default, truth, base, other)
    m_cal = fidelity_metrics(calibrated, truth, base, other)
    return {
        **budget_keys,
        "spearman": m_default["spearman"],
        "mean_relative_error": m_default["mean_relative_error"],
        f"spearman_{other_name}": m_default["spearman_other"],
        "calibrated_spearman": m_cal["spearman"],
        "calibrated_mean_relative_error": m_cal["mean_relative_error"],
        f"calibrated_spearman_{other_name}": m_cal["spearman_other"],
        "calibrated_lambda_only_spearman": m_l2["spearman"],
        "calibrated_lambda_only_mean_relative_error": m_l2["mean_relative_error"],
        "calibrated_lambda_only_l2": report_l2["l2"],
        "no_change_mean_relative_error": m_default["no_change_mean_relative_error"],
        "error_ratio_vs_no_change": m_cal["mean_relative_error"] / m_default["no_change_mean_relative_error"],
        "in_sample_calibrated_spearman": None if oracle_est is None else spearman(oracle_est, truth),
        "in_sample_calibrated_mean_relative_error": None
        if oracle_est is None
        else fidelity_metrics(oracle_est, truth, base, other)["mean_relative_error"],
        "calibration_report": report,
        "auto_l2": auto_l2,
        "calibrated_l2": report["l2"],
        "calibrated_step_scale": report["step_scale"],
        "reduce_dim": est.reduce_dim,
        "estimates_default": default,
        "estimates_calibrated": calibrated,
    }


def forward_figures(
    est: Any, model: Any, evals: Sequence[Subset], target: Any, truth: list[float], **kwargs: Any
) -> dict[str, Any]:
    """The forward check (θ* + the fitted step of each subset, evaluated for real) against ``truth``."""
    t0 = time.perf_counter()
    fw = forward_check(est, model, [list(s) for s in evals], target, **kwargs)
    tt = torch.tensor(truth, dtype=torch.float64)
    return {
        "spearman": spearman(fw.tolist(), truth),
        "mean_relative_error": float(((fw - tt).abs() / tt).mean()),
        "seconds": time.perf_counter() - t0,
        "estimates": fw.tolist(),
    }


def pick(entry: dict[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """``{k: entry[k]}`` for ``keys`` (the headline figures copied up one level)."""
    return {k: entry[k] for k in keys}


def held_out_calibration(
    est: Any,
    subsets: Sequence[Subset],
    truth: Sequence[float],
    base: float,
    other: Sequence[float],
    start_l2: float,
    **calibrate_kwargs: Any,
) -> dict[str, Any]:
    """Fidelity after calibration on held-out subsets, with no extra fine-tune: leave one out over ``subsets``.

    For each subset, λ and the step scale are calibrated (``calibrate`` with ``calibrate_kwargs``, by default its
    grid and tie rule as a user gets them, starting from ``start_l2`` and step scale 1) on the real losses of the
    *other* subsets only, and that subset is then estimated; the pooled held-out estimates are scored against
    ``truth`` (``other``: a second true series, e.g. the task metric). The estimator's λ and step scale are
    restored afterwards.
    """
    if len(subsets) < 3:
        raise ValueError(f"held-out calibration needs at least 3 subsets, got {len(subsets)}")
    before = est.l2, est.step_scale
    held_out, folds = [], []
    for i, subset in enumerate(subsets):
        with_l2(est, start_l2)
        rest = {tuple(s): float(t) for j, (s, t) in enumerate(zip(subsets, truth)) if j != i}
        report = calibrate(est, rest, **calibrate_kwargs)
        held_out.append(float(est.estimate([list(subset)])[0]))
        folds.append({"l2": report["l2"], "step_scale": report["step_scale"]})
    with_l2(est, *before)
    m = fidelity_metrics(held_out, truth, base, other)
    return {
        "spearman": m["spearman"],
        "mean_relative_error": m["mean_relative_error"],
        "spearman_metric": m["spearman_other"],
        "error_ratio_vs_no_change": m["mean_relative_error"] / m["no_change_mean_relative_error"],
        "folds": folds,
        "estimates": held_out,
    }
