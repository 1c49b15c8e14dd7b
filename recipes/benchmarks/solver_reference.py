"""The fast path against the paper's estimator: the same offset logistic problem, solved three ways, across λ.

For a subset S of sources the estimator fits (docs/method.md, section 2; ``reduction="mean"``)

    ŵ_S = argmin_w  (1/|D_S|) Σ_{i ∈ D_S} log(1 + exp(-(f_i + g_iᵀw))) + (λ/2) ||w||²

on the training rows of S (plus the target's own training source, which every subset includes), and scores
L̂(S) = mean_t log(1 + exp(-(f_t + g_tᵀŵ_S))) on the target rows. This script solves that problem per subset

* with SciPy's L-BFGS-B (analytic gradient, gtol 1e-10 on the raw gradient, written here from the cache's rows,
  not from the library's problem object): the paper's way of estimating a subset, one logistic regression each;
* with our exact solver (``solver="exact"``: batched Newton-CG on all rows, float64);
* with our fast path (``solver="fast"``, the default: a second-order model from per-source statistics, with the
  directions beyond the 256 principal ones modelled as isotropic),

first checking exact against L-BFGS, then measuring the fast path against exact, at the automatic λ, the budget λ of
the suite's target fine-tune (real caches) and multiples of the automatic λ. Caches: the suite's MiniLM tasks
``wordnet_nouns`` and ``wordnet_verbs`` (θ* meta-trained and the cache collected as ``suite.py`` does, saved under
``--cache-dir`` and reused) and one synthetic cache.

    python recipes/benchmarks/solver_reference.py --output docs/results/solver_reference.json   # ~1 h on 2 cores
    python recipes/benchmarks/solver_reference.py --output /tmp/r.json --quick                  # synthetic, seconds

Times are seconds per subset, best of ``--repeats`` runs of the same subsets, all three solvers measured in turn in
one process with ``--threads`` torch and BLAS threads (the machine may be shared; ``load_average`` says how busy).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
import warnings
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.estimation import estimator_for_training_args, make_estimator, with_l2  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402

REAL_TASKS = ("wordnet_nouns", "wordnet_verbs")
MULTIPLES = (0.01, 0.1, 1.0, 10.0, 100.0)


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(
        __doc__, threads=1, seed_help="seed of the meta-training, the caches and the subsets"
    )
    parser.add_argument(
        "--tasks", default=",".join(REAL_TASKS), help="real caches, from " + ", ".join(REAL_TASKS)
    )
    parser.add_argument(
        "--subsets", type=int, default=48, help="subsets per cache (singletons and the full set in)"
    )
    parser.add_argument("--synthetic-subsets", type=int, default=32, help="subsets of the synthetic cache")
    parser.add_argument("--multiples", default=",".join(str(m) for m in MULTIPLES), help="× the automatic λ")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs per solver (best kept)")
    parser.add_argument(
        "--cache-dir", default="/tmp/solver_reference_caches", help="collected caches, reused"
    )
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    return parser.parse_args(argv)


# ---------------------------------------------------------------------- caches
def synthetic_cache(quick: bool, seed: int) -> Any:
    """``estimate_speed.py``'s d = 128 cache (16 aligned, 17 opposed, 17 orthogonal sources of 392 rows, 400 rows of
    the target's own source, 500 target rows, a power-law scatter over d/2 directions): the one whose fast-vs-exact
    error that benchmark reports at the default λ. ``quick``: 8 sources of 64 rows at d = 64."""
    from hf_subset_select.demo.synthetic import make_synthetic_cache

    dim = 64 if quick else 128
    return make_synthetic_cache(
        4 if quick else 16,
        2 if quick else 17,
        2 if quick else 17,
        dim=dim,
        examples_per_source=64 if quick else 392,
        target_train_examples=64 if quick else 400,
        target_examples=128 if quick else 500,
        num_strong_directions=dim // 2,
        spectrum_decay=1.0,
        seed=seed,
    )


def real_cache(name: str, args: Any) -> tuple[Any, float, dict[str, Any]]:
    """The suite's cache of task ``name`` (collected once into ``--cache-dir``, then loaded), the budget λ of the
    suite's target fine-tune on it, and how it was obtained."""
    from hf_subset_select import GradientCache

    path = os.path.join(args.cache_dir, f"{name}-seed{args.seed}")
    info: dict[str, Any] = {"path": path}
    _, settings = _suite_task(name, args, build=False)
    if os.path.exists(os.path.join(path, "manifest.json")):
        cache = GradientCache.load(path)
        info["collected_now"] = False
    else:
        import suite

        task, settings = _suite_task(name, args, build=True)
        data = task.build(args.seed)
        _, cache, seconds, _ = suite.collect(task, data, settings, args.seed)
        cache.save(path)
        info.update(collected_now=True, meta_train_and_collect_seconds=seconds)
    from suite_runs import FinetuneSpec

    spec = FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    budget = estimator_for_training_args(cache, spec.training_arguments()).resolved_l2()
    info["budget_finetune"] = {
        "steps": spec.steps,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "optimizer": "adamw",
    }
    return cache, float(budget), info


def _suite_task(name: str, args: Any, *, build: bool) -> tuple[Any, dict[str, Any]]:
    """``suite.make_task`` at the suite's full settings (or just its settings, without loading the model)."""
    import suite

    if not build:
        return None, dict(suite.CLASSIFIER)
    return suite.make_task(name, SimpleNamespace(quick=False, wordnet_dir=args.wordnet_dir))


# ---------------------------------------------------------------------- the reference
def reference_rows(cache: Any, subset: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(g, f) in float64 of the training rows of ``subset`` plus the target's training source (the estimator's
    ``include_target_train`` default), read straight off the cache."""
    names = set(subset)
    if cache.target_source is not None and cache.target_source in cache.train_sources:
        names.add(cache.target_source)
    ids = torch.tensor([cache.source_id(s) for s in sorted(names)])
    rows = cache.train_mask & torch.isin(cache.source_index, ids)
    return cache.features[rows].double().numpy(), cache.outputs[rows].double().numpy()


def lbfgs_fit(
    g: np.ndarray, f: np.ndarray, lam: float, *, matched: bool = False
) -> tuple[np.ndarray, dict[str, Any]]:
    """argmin_w mean_i log(1 + exp(-(f_i + g_iᵀw))) + λ/2 |w|² by L-BFGS-B from w = 0, analytic gradient.

    Tight (the accuracy reference): max_k |∂_k J| <= 1e-10 ||∇J(0)||, no stop on the objective's progress.
    ``matched`` (the timing reference): the exact solver's stopping rule ||∇J|| <= 1e-8 ||∇J(0)|| made sufficient
    for L-BFGS-B's max-norm test (max_k |∂_k J| <= 1e-8 ||∇J(0)|| / √d)."""
    from scipy.optimize import minimize
    from scipy.special import expit

    def fun(w: np.ndarray) -> tuple[float, np.ndarray]:
        z = f + g @ w
        loss = float(np.logaddexp(0.0, -z).mean() + 0.5 * lam * (w @ w))
        return loss, -(g.T @ expit(-z)) / len(z) + lam * w

    grad0 = float(np.linalg.norm(fun(np.zeros(g.shape[1]))[1]))
    res = minimize(
        fun,
        np.zeros(g.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={
            "gtol": (1e-8 / math.sqrt(g.shape[1]) if matched else 1e-10) * grad0,
            "ftol": 0.0,
            "maxiter": 50_000,
            "maxcor": 20,
        },
    )
    rel = float(np.linalg.norm(fun(res.x)[1])) / max(grad0, 1e-300)
    return res.x, {"iterations": int(res.nit), "relative_grad_norm": rel, "success": bool(res.success)}


def target_loss(cache: Any, w: np.ndarray) -> float:
    """mean_t log(1 + exp(-(f_t + g_tᵀw))) over the cache's target rows."""
    t = cache.target_mask
    z = cache.outputs[t].double().numpy() + cache.features[t].double().numpy() @ w
    return float(np.logaddexp(0.0, -z).mean())


def choose_subsets(sources: list[str], count: int, seed: int) -> list[list[str]]:
    """Singletons (every source, or ``count // 4`` random ones when there are more), the full set, then distinct
    random subsets (each source in with probability 1/2) up to ``count`` (fewer when there are not that many)."""
    n = len(sources)
    rng = np.random.default_rng(seed)
    singles = (
        sources if n <= count // 4 else [sources[i] for i in sorted(rng.choice(n, count // 4, replace=False))]
    )
    picked = [[s] for s in singles] + [list(sources)]
    seen = {tuple(s) for s in picked}
    for _ in range(50 * count):
        if len(picked) >= min(count, 2**n - 1):
            break
        pick = tuple(s for s, keep in zip(sources, rng.random(n) < 0.5) if keep)
        if pick and pick not in seen:
            seen.add(pick)
            picked.append(list(pick))
    return picked


# ---------------------------------------------------------------------- one cache, one λ
def _best_seconds(fn: Any, repeats: int) -> tuple[tuple[float, float], Any]:
    """((best wall-clock seconds, best CPU seconds of this process), fn's result) over ``repeats`` calls. With one
    thread the CPU time is what the call costs whatever else the machine runs; the wall clock adds the waits."""
    wall, cpu, out = math.inf, math.inf, None
    for _ in range(repeats):
        t0, c0 = time.perf_counter(), time.process_time()
        out = fn()
        wall, cpu = min(wall, time.perf_counter() - t0), min(cpu, time.process_time() - c0)
    return (wall, cpu), out


def _versus(estimate: np.ndarray, reference: np.ndarray, base: float) -> dict[str, float]:
    rel = np.abs(estimate - reference) / reference
    spread = float(np.abs(reference - base).mean() / base)
    return {
        "spearman": spearman(estimate.tolist(), reference.tolist()),
        "mean_relative_error": float(rel.mean()),
        "max_relative_error": float(rel.max()),
        "reference_spread_relative": spread,  # mean |L̂ - base| / base of the reference: how far the estimates move
        "error_over_spread": float(rel.mean() / spread) if spread > 0 else None,
    }


def run_lambda(
    estimators: dict[str, Any],
    cache: Any,
    subsets: list[list[str]],
    lam: float,
    repeats: int,
    lbfgs_repeats: int,
) -> dict[str, Any]:
    """Fast, exact and L-BFGS on ``subsets`` at λ = ``lam``: estimates, their agreement and seconds per subset
    (``estimators``: the cache's fast, exact and, where given, unreduced fast estimators, set to ``lam`` here)."""
    b = len(subsets)
    for est in estimators.values():
        with_l2(est, lam)
    fast, exact = estimators["fast"], estimators["exact"]
    base = fast.base_loss
    out: dict[str, Any] = {"l2": lam, "num_subsets": b}

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        t_exact, est_exact = _best_seconds(lambda: exact.estimate(subsets), repeats)
    out["exact_solve_info"] = dict(exact.last_solve_info)
    out["exact_warnings"] = sorted({str(w.message) for w in caught})
    est_exact = est_exact.numpy()

    est_fast = None
    try:
        t_fast, est_fast = _best_seconds(lambda: fast.estimate(subsets), repeats)
        est_fast = est_fast.numpy()
        out["fast_vs_exact"] = _versus(est_fast, est_exact, base)
    except FloatingPointError as err:  # the quadratic model is not positive definite at this λ
        t_fast = (math.nan, math.nan)
        out["fast_vs_exact"] = None
        out["fast_error"] = str(err)
    if "fast_unreduced" in estimators:  # the quadratic model alone: no reduction of the directions
        try:
            full = estimators["fast_unreduced"].estimate(subsets).numpy()
            out["fast_unreduced_vs_exact"] = _versus(full, est_exact, base)
            out["fast_vs_fast_unreduced"] = None if est_fast is None else _versus(est_fast, full, base)
        except FloatingPointError as err:
            out["fast_unreduced_vs_exact"] = None
            out["fast_unreduced_error"] = str(err)

    rows = [reference_rows(cache, s) for s in subsets]

    def lbfgs_all() -> list[tuple[np.ndarray, dict[str, Any]]]:
        return [lbfgs_fit(g, f, lam) for g, f in rows]

    lbfgs_fit(*rows[0], lam)  # warm-up (SciPy's first call imports and allocates)
    t_lbfgs, fits = _best_seconds(lbfgs_all, lbfgs_repeats)
    t_matched, matched = _best_seconds(
        lambda: [lbfgs_fit(g, f, lam, matched=True) for g, f in rows], lbfgs_repeats
    )
    est_matched = np.array([target_loss(cache, w) for w, _ in matched])
    est_lbfgs = np.array([target_loss(cache, w) for w, _ in fits])
    rel = np.abs(est_exact - est_lbfgs) / est_lbfgs
    w_exact = exact.fitted_steps(subsets).numpy()
    w_rel = [
        float(np.linalg.norm(we - wl) / max(np.linalg.norm(wl), 1e-300)) for we, (wl, _) in zip(w_exact, fits)
    ]
    out["exact_vs_lbfgs"] = {
        "max_relative_diff": float(rel.max()),
        "mean_relative_diff": float(rel.mean()),
        "max_step_relative_diff": max(w_rel),
        "spearman": spearman(est_exact.tolist(), est_lbfgs.tolist()),
        "lbfgs_max_iterations": max(i["iterations"] for _, i in fits),
        "lbfgs_mean_iterations": float(np.mean([i["iterations"] for _, i in fits])),
        "lbfgs_max_relative_grad_norm": max(i["relative_grad_norm"] for _, i in fits),
        "lbfgs_all_success": all(i["success"] for _, i in fits),
        "matched_tol_max_relative_diff": float((np.abs(est_exact - est_matched) / est_lbfgs).max()),
        "matched_tol_mean_iterations": float(np.mean([i["iterations"] for _, i in matched])),
    }
    out["fast_vs_lbfgs"] = None if est_fast is None else _versus(est_fast, est_lbfgs, base)
    times = {"fast": t_fast, "exact": t_exact, "lbfgs": t_matched, "lbfgs_tight": t_lbfgs}
    out["seconds_per_subset"] = {k: t[0] / b for k, t in times.items()}  # wall clock
    out["cpu_seconds_per_subset"] = {k: t[1] / b for k, t in times.items()}
    out["estimates"] = {
        "fast": None if est_fast is None else est_fast.tolist(),
        "exact": est_exact.tolist(),
        "lbfgs": est_lbfgs.tolist(),
    }
    return out


def run_cache(
    cache: Any,
    lambdas: dict[str, float],
    count: int,
    args: Any,
    extra: dict[str, Any] | None = None,
    *,
    lbfgs_repeats: int = 1,
) -> dict[str, Any]:
    """Every λ of ``lambdas`` on one cache's subsets (the fast path's λ-free setup timed once, not per subset)."""
    fast = make_estimator(cache, num_threads=1)
    t0 = time.perf_counter()
    fast.problem.fast_statistics()
    setup = time.perf_counter() - t0
    estimators = {"fast": fast, "exact": make_estimator(cache, solver="exact")}
    if fast.reduce_dim < cache.dim:
        estimators["fast_unreduced"] = make_estimator(
            cache, reduce_dim=cache.dim, chunk_size=4, num_threads=1
        )
    subsets = choose_subsets(list(fast.sources), count, args.seed)
    for est in estimators.values():  # warm-up: statistics, the float64 copy of the features
        with_l2(est, next(iter(lambdas.values())))
        est.estimate(subsets[:1])
    entry: dict[str, Any] = {
        **(extra or {}),
        "dim": cache.dim,
        "num_train_rows": int(cache.train_mask.sum()),
        "num_target_rows": int(cache.target_mask.sum()),
        "candidate_sources": list(fast.sources),
        "forced_source": fast.forced_source,
        "reduce_dim": fast.reduce_dim,
        "base_loss": fast.base_loss,
        "fast_setup_seconds": setup,
        "subsets": subsets,
        "lambdas": lambdas,
        "by_lambda": {},
    }
    for label, lam in lambdas.items():
        t0 = time.perf_counter()
        entry["by_lambda"][label] = r = run_lambda(
            estimators, cache, subsets, lam, args.repeats, lbfgs_repeats
        )
        fv = r["fast_vs_exact"] or {}
        print(
            f"  {label:>7} λ={lam:.3g}: exact-vs-lbfgs max {r['exact_vs_lbfgs']['max_relative_diff']:.1e}, "
            f"fast-vs-exact ρ={fv.get('spearman')}, mean rel {fv.get('mean_relative_error')}, "
            f"CPU s/subset {r['cpu_seconds_per_subset']} ({time.perf_counter() - t0:.0f} s)",
            flush=True,
        )
    return entry


def lambda_grid(cache: Any, multiples: list[float], budget: float | None) -> dict[str, float]:
    """``{"auto": λ_auto, "budget": λ_budget, "x0.01": 0.01 λ_auto, ...}`` (x1 is the automatic λ itself)."""
    auto = make_estimator(cache).resolved_l2()
    out = {"auto": auto}
    if budget is not None:
        out["budget"] = budget
    for k in multiples:
        if k != 1.0:
            out[f"x{k:g}"] = k * auto
    return out


# ---------------------------------------------------------------------- headline
def headline(caches: dict[str, Any]) -> dict[str, Any]:
    """The summary keys over caches and λ (``*_real``: the real caches only, or the synthetic cache where there is
    none, see ``headline_caches``). Speedups: the slower solver's total CPU seconds over the faster one's, summed
    over every subset, λ and cache of the headline (``*_wall``: the same from the wall clock)."""
    real = [c for c in caches.values() if c.get("kind") == "real"] or list(caches.values())
    runs = [r for c in real for r in c["by_lambda"].values()]
    every = [r for c in caches.values() for r in c["by_lambda"].values()]
    fve = [r["fast_vs_exact"] for r in runs if r["fast_vs_exact"] is not None]

    def total(key: str, solver: str) -> float:
        return sum(r[key][solver] * r["num_subsets"] for r in runs)

    out: dict[str, Any] = {
        "fast_vs_exact_spearman_min_real": min(v["spearman"] for v in fve) if fve else None,
        "fast_vs_exact_mean_rel_error_max_real": max(v["mean_relative_error"] for v in fve) if fve else None,
        "fast_vs_exact_error_over_spread_max_real": max(
            (v["error_over_spread"] for v in fve if v["error_over_spread"] is not None), default=None
        ),
        "fast_failed_real": sum(r["fast_vs_exact"] is None for r in runs),
        "exact_vs_lbfgs_max_rel_diff": max(r["exact_vs_lbfgs"]["max_relative_diff"] for r in every),
        "headline_caches": sorted(k for k, c in caches.items() if c in real),
    }
    for suffix, key in (("", "cpu_seconds_per_subset"), ("_wall", "seconds_per_subset")):
        for ref in ("lbfgs", "lbfgs_tight"):
            lbfgs, exact, fast = total(key, ref), total(key, "exact"), total(key, "fast")
            tag = suffix + ("_tight_tol" if ref == "lbfgs_tight" else "")
            out[f"exact_vs_lbfgs_speedup{tag}"] = lbfgs / exact
            out[f"fast_vs_lbfgs_speedup{tag}"] = lbfgs / fast if math.isfinite(fast) else None
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads(args.threads, blas=True)
    multiples = [0.1, 10.0] if args.quick else parse_list(args.multiples, float)
    count = 12 if args.quick else args.subsets
    if args.quick:
        args.repeats = min(args.repeats, 2)
    lbfgs_repeats = 1
    t_start = time.perf_counter()
    result: dict[str, Any] = {
        "benchmark": "solver_reference",
        "quick": args.quick,
        "settings": vars(args),
        "multiples_of_auto_l2": multiples,
        "load_average_start": load_average(),
        "caches": {},
    }
    tasks = [] if args.quick else parse_list(args.tasks)
    for name in tasks:
        print(f"{name}:", flush=True)
        cache, budget, info = real_cache(name, args)
        lambdas = lambda_grid(cache, multiples, budget)
        extra = {"kind": "real", **info}
        result["caches"][name] = run_cache(cache, lambdas, count, args, extra, lbfgs_repeats=lbfgs_repeats)
        result.update(headline(result["caches"]), complete=False)
        write_results(args.output, result)  # after each cache, so a late failure keeps the earlier ones
    print("synthetic:", flush=True)
    cache = synthetic_cache(args.quick, args.seed)
    result["caches"]["synthetic"] = run_cache(
        cache,
        lambda_grid(cache, multiples, None),
        args.synthetic_subsets if not args.quick else count,
        args,
        {"kind": "synthetic"},
    )
    result.update(headline(result["caches"]))
    result["lambdas"] = {k: c["lambdas"] for k, c in result["caches"].items()}
    result["load_average_end"] = load_average()
    result["total_seconds"] = time.perf_counter() - t_start
    result["complete"] = True
    payload = write_results(args.output, result)
    print(json.dumps({k: v for k, v in payload.items() if not isinstance(v, (dict, list))}, indent=2))


if __name__ == "__main__":
    main()
