"""End-to-end estimation speed (setup and automatic λ included), float16/bfloat16 storage error, forward selection.

    python recipes/benchmarks/scale.py --output scale.json [--quick]

Every end-to-end figure is timed from a loaded cache to all estimates: a fresh estimator, its statistics, the
automatic λ and the estimates, in one wall-clock window (best of a few repeats; all repeats recorded with the load
average). The cache has the geometry of ``estimate_speed.py`` (N = 20,000 training rows, n = 50 candidate sources,
500 target rows). Work in progress (issue 16): the N = 10^6 memory point and the scaling curves are not yet run.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

import torch

from hf_subset_select.demo.synthetic import make_synthetic_cache

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.estimation import make_estimator  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402


def _cache(dim: int, quick: bool, seed: int, sources: int = 50, per_source: int = 392):
    k = sources // 3
    return make_synthetic_cache(
        k, k, sources - 2 * k, dim=dim, examples_per_source=per_source // (4 if quick else 1),
        target_train_examples=400, target_examples=500, num_strong_directions=dim // 2, seed=seed,
    )  # fmt: skip


def end_to_end(cache, threads: int, count: int, seed: int) -> dict:
    """Seconds of setup (statistics + λ) and of ``count`` estimates with a fresh estimator."""
    limit_threads(threads, blas=True)
    m = torch.rand(count, 50, generator=torch.Generator().manual_seed(seed)) < 0.5
    t0 = time.perf_counter()
    est = make_estimator(cache, num_threads=threads)
    est.resolved_l2()
    est.problem.fast_statistics()
    t1 = time.perf_counter()
    est.estimate(m)
    t2 = time.perf_counter()
    return {"setup_seconds": t1 - t0, "estimate_seconds": t2 - t1, "subsets_per_s": count / (t2 - t0)}


def best(runs: list[dict]) -> dict:
    top = max(runs, key=lambda r: r["subsets_per_s"])
    return {**top, "repeats": runs, "load_average": load_average()}


def storage_error(cache, seed: int) -> dict:
    """Relative error of estimates when the features are stored in float16 / bfloat16 (vs float32)."""
    m = torch.rand(256, 50, generator=torch.Generator().manual_seed(seed)) < 0.5
    est = make_estimator(cache)
    l2 = est.resolved_l2()
    ref = est.estimate(m)
    out = {}
    for name, dtype in (("float16", torch.float16), ("bfloat16", torch.bfloat16)):
        low = cache.replace(features=cache.features.to(dtype).to(torch.float32))
        est_low = make_estimator(low, l2=l2).estimate(m)
        rel = (est_low - ref).abs() / ref
        out[name] = {"mean_relative_error": float(rel.mean()), "max_relative_error": float(rel.max()),
                     "relative_spread_of_estimates": float((ref - est.base_loss).abs().mean() / est.base_loss)}  # fmt: skip
    return out


def forward_seconds(num_sources: int, dim: int, seed: int) -> float:
    from hf_subset_select import select_sources

    k = num_sources // 3
    cache = make_synthetic_cache(k, k, num_sources - 2 * k, dim=dim, examples_per_source=20,
                                 target_train_examples=400, target_examples=500, seed=seed)  # fmt: skip
    limit_threads(2, blas=True)
    t0 = time.perf_counter()
    select_sources(make_estimator(cache, num_threads=2), "forward")
    return time.perf_counter() - t0


def main() -> None:
    parser = benchmark_parser(__doc__, seed_help="seed of the synthetic caches and subsets")
    parser.add_argument("--reduced", action="store_true", help="d in {128, 2048}, 10^3 and 10^4 subsets, 2 repeats")
    args = parser.parse_args()
    q = args.quick
    dims, counts, repeats = ([128, 512], [1000], 1) if q else ([128, 512, 2048, 8192], [1000, 10_000, 100_000], 3)
    if args.reduced and not q:
        dims, counts, repeats = [128, 2048], [1000, 10_000], 2
    result: dict = {"benchmark": "scale", "quick": q, "reduced": args.reduced, "load_average_start": load_average(), "table": {}}
    t_start = time.perf_counter()
    for d in dims:
        cache = _cache(d, q, args.seed)
        for threads in (1, 2):
            for count in counts:
                reps = 1 if count >= 100_000 or d >= 8192 else repeats
                key = f"d{d}_{threads}thread_{count}"
                result["table"][key] = best([end_to_end(cache, threads, count, args.seed) for _ in range(reps)])
                print(key, round(result["table"][key]["subsets_per_s"], 1), flush=True)
        if d == (512 if q else 2048):
            result["storage_error"] = storage_error(cache, args.seed)
    head = 1000 if q else 10_000
    result["end_to_end_subsets_per_s_d128_1thread"] = result["table"][f"d128_1thread_{head}"]["subsets_per_s"]
    big = f"d{512 if q else 2048}_2thread_{head}"
    result["end_to_end_subsets_per_s_d2048_2threads"] = result["table"][big]["subsets_per_s"]
    result["setup_seconds_d2048"] = result["table"][big]["setup_seconds"]
    result["forward_selection_seconds_n1000"] = forward_seconds(100 if q else 1000, 32 if q else 128, args.seed)
    result["not_run"] = "peak_rss_gb_N1e6_d2048 and the N/n/d scaling curves (issue 16 left open)"
    result["total_seconds"] = time.perf_counter() - t_start
    assert all(math.isfinite(v["subsets_per_s"]) for v in result["table"].values())
    write_results(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
