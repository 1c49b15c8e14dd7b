"""Subset estimates per second: fast path, exact solver and per-subset scikit-learn, side by side.

A synthetic cache with N = 20,000 training rows from n = 50 candidate sources (plus the target's own
training source, always included) and 500 target rows, at d = 128 and again at d = 2048. At d = 2048
the fast path keeps the leading principal curvature directions (reduce_dim) and models the rest as
isotropic; the JSON reports what that costs against the exact solver and against the fast path without
the reduction.

    python recipes/benchmarks/estimate_speed.py --output estimate_speed.json

Throughputs are the best of a few repeats (the machine is shared; ``load_average`` records how busy it
was). The sklearn reference fits ``LogisticRegression`` (lbfgs, L2, no intercept) on the subset's rows
once per subset, which is how the reference implementation of the method estimates a subset; it cannot
express the per-example offsets f_i, so it solves the offset-free problem of the same size.
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

import numpy as np
import torch

from hf_subset_select.demo.synthetic import make_synthetic_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser  # noqa: E402
from harness.estimation import make_estimator  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402


def _best_rate(fn, count: int, repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        rates.append(count / (time.perf_counter() - t0))
    return max(rates), [round(r, 1) for r in rates]


def _fidelity(estimate: torch.Tensor, reference: torch.Tensor, base: float) -> dict[str, float]:
    rel = ((estimate - reference).abs() / reference).mean()
    return {
        "spearman": spearman(estimate.tolist(), reference.tolist()),
        "mean_relative_error": float(rel),
        "max_relative_error": float(((estimate - reference).abs() / reference).max()),
        # how much the subsets differ: the error is small only if it is small against this
        "reference_spread_relative": float((reference - base).abs().mean() / base),
    }


def _sklearn_rate(est: Any, m: torch.Tensor, l2: float) -> tuple[float, int]:
    from sklearn.linear_model import LogisticRegression

    g = est.problem.features.numpy().astype(np.float64)
    src = est.problem.row_source.numpy()
    forced = len(est.problem.order) - 1 if est.forced_source is not None else None
    t0 = time.perf_counter()
    iters = 0
    for row in m.numpy():
        ids = list(np.nonzero(row)[0]) + ([forced] if forced is not None else [])
        x = g[np.isin(src, ids)]
        flip = np.arange(len(x)) % 2 == 1  # two classes: (-g, 0) has the loss of (g, 1)
        clf = LogisticRegression(C=1.0 / (l2 * len(x)), fit_intercept=False, tol=1e-6, max_iter=1000)
        clf.fit(np.where(flip[:, None], -x, x), np.where(flip, 0, 1))
        iters += int(np.max(clf.n_iter_))
    return m.shape[0] / (time.perf_counter() - t0), iters // max(1, m.shape[0])


def run_dim(
    dim: int,
    *,
    num_fast: int,
    num_exact: int,
    num_sklearn: int,
    reduce_dims: list[int | None],
    full_reference: int,
    repeats: int,
    seed: int,
) -> dict:
    t0 = time.perf_counter()
    cache = make_synthetic_cache(
        16,
        17,
        17,
        dim=dim,
        examples_per_source=392,
        target_train_examples=400,
        target_examples=500,
        num_strong_directions=dim // 2,  # a power-law spectrum over d/2 directions (harder for the reduction)
        spectrum_decay=1.0,
        seed=seed,
    )
    out: dict = {
        "dim": dim,
        "num_train_rows": int(cache.train_mask.sum()),
        "num_target_rows": int(cache.target_mask.sum()),
        "num_sources": len(cache.train_sources) - 1,
        "cache_build_seconds": round(time.perf_counter() - t0, 2),
    }
    gen = torch.Generator().manual_seed(seed)
    m = torch.rand(num_fast, 50, generator=gen) < 0.5
    m_exact = m[:num_exact]

    # exact solver (reference for fidelity); λ from the default rule of the default fast path
    default = make_estimator(cache)
    t0 = time.perf_counter()
    l2 = default.resolved_l2()
    out["auto_l2"] = l2
    out["auto_l2_seconds"] = round(time.perf_counter() - t0, 2)
    out["fast_setup_seconds"] = None
    exact = make_estimator(cache, solver="exact", l2=l2)
    exact.estimate(m_exact[:2])  # warm-up (float64 copy of the features)
    t0 = time.perf_counter()
    exact_losses = exact.estimate(m_exact)
    out["exact_subsets_per_s"] = m_exact.shape[0] / (time.perf_counter() - t0)
    out["exact_solve_info"] = exact.last_solve_info
    out["num_exact_subsets"] = int(m_exact.shape[0])
    base = default.base_loss

    variants = {}
    for r in reduce_dims:
        est = make_estimator(cache, reduce_dim=r, l2=l2)
        t0 = time.perf_counter()
        est.problem.statistics()
        est.problem.fast_statistics()
        setup = time.perf_counter() - t0
        est.estimate(m[:128])
        best, rates = _best_rate(lambda est=est: est.estimate(m), m.shape[0], repeats)
        fast_losses = est.estimate(m_exact)
        variants[str(est.reduce_dim)] = {
            "reduce_dim": est.reduce_dim,
            "setup_seconds": round(setup, 2),
            "subsets_per_s": best,
            "subsets_per_s_repeats": rates,
            "vs_exact": _fidelity(fast_losses, exact_losses, base),
        }
    out["fast_variants"] = variants
    default_key = str(default.reduce_dim)
    out["default_reduce_dim"] = default.reduce_dim
    out["fast_subsets_per_s"] = variants[default_key]["subsets_per_s"]
    out["fast_setup_seconds"] = variants[default_key]["setup_seconds"]
    out["fast_vs_exact"] = variants[default_key]["vs_exact"]

    # one thread vs the default thread pool (the machine may be shared)
    one = make_estimator(cache, l2=l2, num_threads=1)
    one.estimate(m[:128])
    out["fast_subsets_per_s_one_thread"] = _best_rate(lambda: one.estimate(m), m.shape[0], repeats)[0]

    if full_reference and default.reduce_dim < dim:
        # the fast path without the reduction, on a few subsets, to isolate the reduction's cost
        full = make_estimator(cache, reduce_dim=dim, l2=l2, chunk_size=4)
        t0 = time.perf_counter()
        full_losses = full.estimate(m_exact[:full_reference])
        out["full_fast_seconds_per_subset_incl_setup"] = (time.perf_counter() - t0) / full_reference
        red = make_estimator(cache, l2=l2).estimate(m_exact[:full_reference])
        out["reduction_cost"] = {
            "num_subsets": full_reference,
            "reduced_vs_full_fast": _fidelity(red, full_losses, base),
            "full_fast_vs_exact": _fidelity(full_losses, exact_losses[:full_reference], base),
            "reduced_fast_vs_exact": _fidelity(red, exact_losses[:full_reference], base),
        }
        del full

    sk_rate, sk_iters = _sklearn_rate(default, m[:num_sklearn], l2)
    out["sklearn_subsets_per_s"] = sk_rate
    out["sklearn_mean_lbfgs_iterations"] = sk_iters
    out["num_sklearn_subsets"] = num_sklearn
    out["fast_vs_sklearn_ratio"] = out["fast_subsets_per_s"] / sk_rate
    out["exact_vs_sklearn_ratio"] = out["exact_subsets_per_s"] / sk_rate
    return out


def main() -> None:
    args = benchmark_parser(__doc__, seed_help="seed of the synthetic cache and the subsets").parse_args()
    q = args.quick
    result: dict = {
        "benchmark": "estimate_speed",
        "torch_threads": torch.get_num_threads(),
        "load_average_start": load_average(),
        "note": "2 CPU cores shared with other jobs; figures are best-of-repeats wall-clock throughputs.",
    }
    t0 = time.perf_counter()
    d128 = run_dim(
        128,
        num_fast=2048 if q else 8192,
        num_exact=32 if q else 128,
        num_sklearn=8 if q else 32,
        reduce_dims=[None, 64],
        full_reference=0,
        repeats=2 if q else 5,
        seed=args.seed,
    )
    result.update(
        {
            k: d128[k]
            for k in (
                "fast_subsets_per_s",
                "exact_subsets_per_s",
                "sklearn_subsets_per_s",
                "fast_vs_sklearn_ratio",
            )
        }
    )
    result["d128"] = d128
    result["d2048"] = run_dim(
        2048,
        num_fast=1024 if q else 4096,
        num_exact=16 if q else 32,
        num_sklearn=2 if q else 6,
        reduce_dims=[None, 128, 512],
        full_reference=4 if q else 12,
        repeats=2 if q else 3,
        seed=args.seed,
    )
    d = result["d2048"]
    result["bars"] = {
        "fast_ge_10000_per_s_d128": result["fast_subsets_per_s"] >= 10_000,
        "fast_ge_100x_sklearn_d128": result["fast_vs_sklearn_ratio"] >= 100,
        "fast_ge_100_per_s_d2048": d["fast_subsets_per_s"] >= 100,
    }
    result["load_average_end"] = load_average()
    result["total_seconds"] = round(time.perf_counter() - t0, 1)
    write_results(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if k not in ("d128", "d2048")}, indent=2))
    print(
        "d2048:",
        json.dumps(
            {
                k: d[k]
                for k in (
                    "fast_subsets_per_s",
                    "exact_subsets_per_s",
                    "sklearn_subsets_per_s",
                    "fast_vs_sklearn_ratio",
                    "fast_vs_exact",
                )
            },
            indent=2,
        ),
    )


if __name__ == "__main__":
    main()
