"""Checks of an estimator against the real thing: real fine-tuning results and the real model.

* :func:`calibrate` fits λ and the step scale to a few real fine-tuning results (docs/method.md, section 6).
* :func:`forward_check` evaluates the target for real at θ* + P·ŵ_S (docs/method.md, section 7).

Model and collection code is imported only when :func:`forward_check` runs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from .estimator import FirstOrderEstimator

__all__ = ["calibrate", "forward_check"]


def _grid(values: Sequence[float] | None, default: list[float], name: str) -> list[float]:
    grid = default if values is None else [float(x) for x in values]
    if not grid or any(not (x > 0 and math.isfinite(x)) for x in grid):
        raise ValueError(f"{name} must hold finite positive values.")
    return grid


def calibrate(
    estimator: FirstOrderEstimator,
    real_results: Mapping[Any, float] | Sequence[tuple[Any, float]],
    *,
    l2_grid: Sequence[float] | None = None,
    step_scales: Sequence[float] | None = None,
    fit_step_scale: bool = True,
    solver: str | None = None,
    tolerance: float = 0.05,
) -> dict[str, Any]:
    """Choose λ (and the step scale) that best reproduce a few real fine-tuning results.

    The error of a candidate (λ, s) is the mean squared log ratio (log L̂ - log L)² over the given
    subsets (a symmetric relative error). Among the candidates whose error is within ``tolerance``
    (relative) of the smallest, the one closest to the current setting (distance in log λ and log s) is
    taken: with a handful of results, this keeps the calibration from chasing noise.

    Args:
        estimator: the estimator to calibrate; it keeps the chosen ``l2`` and ``step_scale`` and reports them in
            its ``calibration`` attribute.
        real_results: {subset: true target loss} (a subset is a tuple/frozenset of source names),
            or a list of (subset, loss) pairs. Use subsets you will not evaluate the estimator on.
        l2_grid: λ values to try (default: the current λ times 10^k, k = -3 ... 3 in steps of 1/4).
        step_scales: step scales to try (default 10^k, k = -1.5 ... 1.5 in 61 steps; 1 included).
        fit_step_scale: fit the step scale too (else only λ, with step scale 1).
        solver: 'fast' or 'exact' (default: the estimator's solver).
        tolerance: relative slack of the tie rule above (0: the plain minimum).

    Returns:
        A dict with the chosen ``l2`` and ``step_scale`` and the mean relative error on the given
        subsets before and after.
    """
    pairs = list(real_results.items()) if isinstance(real_results, Mapping) else list(real_results)
    if not pairs:
        raise ValueError("calibrate() needs at least one (subset, true loss) pair from a real fine-tune.")
    subsets = [[s] if isinstance(s, str) else list(s) for s, _ in pairs]
    truth = torch.tensor([float(v) for _, v in pairs], dtype=torch.float64)
    if not bool(torch.isfinite(truth).all()) or bool((truth <= 0).any()):
        raise ValueError(
            "calibrate() needs finite, positive true losses; a NaN/inf or <= 0 loss usually means the "
            "real fine-tune diverged. Drop that run or lower its learning rate."
        )
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
    m = estimator.membership(subsets)
    before_l2, before_scale = estimator.resolved_l2(), estimator.step_scale
    grid = _grid(l2_grid, [before_l2 * 10 ** (k / 4) for k in range(-12, 13)], "l2_grid")
    if fit_step_scale:
        scales = _grid(step_scales, sorted({1.0, *[10 ** (k / 20) for k in range(-30, 31)]}), "step_scales")
    else:
        scales = [1.0]
    log_truth = truth.log()

    def errors(dz: torch.Tensor, s: float) -> tuple[float, float]:
        est = estimator.target_losses(dz, s).mean(1, dtype=torch.float64)
        return float(((est.log() - log_truth) ** 2).mean()), float(((est - truth).abs() / truth).mean())

    dz_before, _ = estimator.solve(m, want_w=False, solver=solver, l2=before_l2)
    _, rel_before = errors(dz_before, before_scale)
    table = []  # (log error, relative error, λ, s)
    for l2 in grid:
        dz, _ = estimator.solve(m, want_w=False, solver=solver, l2=l2)
        table.extend((*errors(dz, sc), l2, sc) for sc in scales)
    best_err = min(row[0] for row in table)
    near = [row for row in table if row[0] <= best_err * (1.0 + tolerance) + 1e-15]

    def distance(row: tuple[float, float, float, float]) -> float:
        return math.log(row[2] / before_l2) ** 2 + math.log(row[3] / before_scale) ** 2

    chosen = min(near, key=lambda row: (distance(row), row[0]))
    estimator.l2, estimator.step_scale = chosen[2], chosen[3]
    estimator.calibration = {
        "l2": chosen[2],
        "step_scale": chosen[3],
        "num_results": len(pairs),
        "mean_relative_error_before": rel_before,
        "mean_relative_error_after": chosen[1],
        "mean_squared_log_error_after": chosen[0],
        "l2_before": before_l2,
        "step_scale_before": before_scale,
        "solver": solver or _solver_name(estimator),
    }
    return dict(estimator.calibration)


def _solver_name(estimator: FirstOrderEstimator) -> str:
    return estimator.solver.name if estimator.solver is not None else estimator.config.solver


def forward_check(
    estimator: FirstOrderEstimator,
    model: Any,
    subsets: Any,
    target_dataset: Any,
    *,
    tokenizer: Any = None,
    max_length: int | None = None,
    batch_size: int = 32,
    solver: str | None = None,
    output_fn: Any = None,
) -> torch.Tensor:
    """Slower, more faithful estimate: evaluate the target for real at θ* + P·ŵ_S.

    ``model`` must hold θ* (e.g. :func:`~hf_subset_select.load_meta_init` with trainable parameters) and
    ``target_dataset`` the target evaluation examples the cache was collected on. For each subset the fitted
    step ŵ_S (times the step scale) is lifted to parameter space with the cache's own projection, added to
    the trainable parameters, the outputs f_j are recomputed by a forward pass, and the target loss
    mean_j log(1 + exp(-f_j)) is returned (shape (B,)). The parameters are restored afterwards.
    """
    from ..collect.outputs import resolve_output_fn
    from ..collect.per_example import collate_examples, trainable_parameters
    from ..data.encode import encode_example

    cache = estimator.cache
    named = trainable_parameters(model)
    projector = _model_projector(estimator, named)
    collect_cfg = cache.manifest.get("collect_config", {})
    max_length = int(max_length or collect_cfg.get("max_length") or 512)
    name = output_fn if output_fn is not None else cache.manifest.get("output_fn", "auto")
    if isinstance(name, str) and name.startswith("custom:"):
        raise ValueError(
            f"The cache was collected with a custom output function ({name}); pass the same callable as "
            "forward_check(..., output_fn=fn)."
        )
    spec = resolve_output_fn(model, name, prob_clamp=float(cache.manifest.get("prob_clamp", 1e-6)))
    if spec.kind == "seq2seq":
        raise ValueError(
            "forward_check supports causal language models and sequence classifiers, not seq2seq."
        )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
    encoded = [
        encode_example(
            dict(target_dataset[i]), tokenizer, max_length, classification=spec.kind == "classification"
        )
        for i in range(len(target_dataset))
    ]
    pad = getattr(tokenizer, "pad_token_id", None) or 0
    steps = estimator.fitted_steps(subsets, solver=solver)
    params = dict(named)
    scale = cache.preconditioner  # features were Pᵀ(s ⊙ ∇f), so the step in parameters is s ⊙ (P w)
    if scale is not None and set(scale) != set(params):
        raise ValueError(
            "The cache's preconditioner does not cover this model's trainable parameters; load the same θ* "
            "(load_meta_init(path, is_trainable=True)) the cache was collected from."
        )
    original = {n: p.detach().clone() for n, p in named}
    was_training = model.training
    model.eval()
    losses = []
    try:
        for w in steps:
            delta = projector.lift(w.to(torch.float32))
            if scale is not None:
                delta = {n: d * scale[n] for n, d in delta.items()}
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n] + delta[n].to(p.dtype).to(p.device))
                outs = []
                for start in range(0, len(encoded), batch_size):
                    batch = collate_examples(encoded[start : start + batch_size], spec.kind, pad)
                    device = next(iter(params.values())).device
                    batch = {k: v.to(device) for k, v in batch.items()}
                    fwd = {k: v for k, v in batch.items() if k != "labels"}
                    outs.append(spec(model(**fwd), batch).detach().double().cpu())
            f = torch.cat(outs)
            losses.append(float(F.softplus(-f).mean()))
    finally:
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(original[n])
        model.train(was_training)
    return torch.tensor(losses, dtype=torch.float64)


def _model_projector(estimator: FirstOrderEstimator, named: list[tuple[str, Any]]) -> Any:
    """The cache's projection rebuilt for the model's trainable parameters, checked against the cache."""
    from ..collect.projection import make_projector

    proj = estimator.cache.manifest.get("projection")
    if not isinstance(proj, dict) or "kind" not in proj:
        raise ValueError(
            "The cache has no projection in its manifest, so ŵ cannot be mapped back to parameters; the "
            "forward check needs a cache written by the GradientCollector."
        )
    projector = make_projector(
        proj["kind"],
        int(proj["dim"]),
        int(proj["seed"]),
        [(n, tuple(p.shape)) for n, p in named],
        nnz=int(proj.get("nnz") or 4),
    )
    if projector.dim != estimator.dim or (
        proj.get("num_params") is not None and int(proj["num_params"]) != projector.num_params
    ):
        raise ValueError(
            f"Dimension mismatch: the model's trainable parameters ({projector.num_params}) and projection "
            f"(d={projector.dim}) do not match the cache (num_params={proj.get('num_params')}, d={estimator.dim}). "
            "Load the same θ* (load_meta_init(path, is_trainable=True)) the cache was collected from."
        )
    return projector
