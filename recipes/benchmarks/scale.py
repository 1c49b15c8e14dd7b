"""End-to-end estimation speed (setup and automatic λ included), float16/bfloat16 storage error, forward selection.

    python recipes/benchmarks/scale.py --output scale.json [--quick]

Every end-to-end figure is timed from a loaded cache to all estimates: a fresh estimator, its statistics, the
automatic λ and the estimates, in one wall-clock window (best of a few repeats; all repeats recorded with the load
average). The cache has the geometry of ``estimate_speed.py`` (N = 20,000 training rows, n = 50 candidate sources,
500 target rows).

``--curves`` adds the scaling curves: N in {10^4, 10^5, 10^6} training rows (n = 100 sources, d = 2048), n in {10, 100,
1000} sources (N = 10^5, d = 2048; n counts the target's own training split, so n - 1 are candidates) and d in
{128, 512, 2048, 8192} (N = 10^5, n = 100). Each point is a synthetic
cache written to disk by one child process and measured by another, fresh one, as a user's run meets it: load the
cache (its checks included), a fresh estimator's statistics and automatic λ, and 1,000 subset estimates (best of 3), at
one thread; the child's peak resident memory (VmHWM, its own address space only), against the features' own size
(N x d float32), and the cache's size on disk. The N = 10^6, d = 2048 point gives ``peak_rss_gb_N1e6_d2048``. The
log-log slope of every cost between neighbouring points says how it grows (1: linear).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
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


CURVE_POINTS = {
    "N": [(10_000, 100, 2048), (100_000, 100, 2048), (1_000_000, 100, 2048)],
    "n": [(100_000, 10, 2048), (100_000, 100, 2048), (100_000, 1000, 2048)],
    "d": [(100_000, 100, 128), (100_000, 100, 512), (100_000, 100, 2048), (100_000, 100, 8192)],
}
QUICK_POINTS = {
    "N": [(2_000, 10, 64), (8_000, 10, 64)],
    "n": [(8_000, 4, 64), (8_000, 10, 64)],
    "d": [(8_000, 10, 32), (8_000, 10, 64)],
}
_CURVE_SUBSETS = 1000
_ESTIMATE_REPEATS = 3


def curve_cache(rows: int, sources: int, dim: int, seed: int):
    """A synthetic cache of about ``rows`` training rows over ``sources`` sources (the target's own training split
    is one of them), 500 target rows, float32 throughout (written in place: no float64 copy of the features)."""
    per = max(1, rows // sources)
    k = (sources - 1) // 3
    return make_synthetic_cache(
        k, k, sources - 1 - 2 * k, dim=dim, examples_per_source=per, target_train_examples=per,
        target_examples=500, num_strong_directions=min(64, dim // 2), representation_dim=None, seed=seed,
    )  # fmt: skip


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return -1


def build_point(rows: int, sources: int, dim: int, seed: int, path: str) -> dict:
    """Child process 1: build the cache and save it (what collection would have written)."""
    t0 = time.perf_counter()
    cache = curve_cache(rows, sources, dim, seed)
    t1 = time.perf_counter()
    cache.save(path)
    disk = sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path))
    return {"build_seconds": t1 - t0, "save_seconds": time.perf_counter() - t1, "disk_bytes": disk,
            "num_examples": cache.num_examples, "features_bytes": cache.features.numel() * 4,
            "build_peak_rss_gb": _status_kb("VmHWM") / 2**20}  # fmt: skip


def measure_point(path: str, seed: int) -> dict:
    """Child process 2 (fresh): load the cache, a fresh estimator's setup with the automatic λ, 1,000 estimates."""
    from hf_subset_select import GradientCache

    limit_threads(1, blas=True)
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    cache = GradientCache.load(path)
    t1 = time.perf_counter()
    load_kb = _status_kb("VmHWM")
    est = make_estimator(cache, num_threads=1)
    est.resolved_l2()
    est.problem.fast_statistics()
    t2 = time.perf_counter()
    n = len(est.problem.order) - (1 if cache.target_source else 0)
    m = torch.rand(_CURVE_SUBSETS, n, generator=torch.Generator().manual_seed(seed)) < 0.5
    runs = []
    for _ in range(_ESTIMATE_REPEATS):  # best of a few: the estimates do not depend on N, a load burst does
        start = time.perf_counter()
        losses = est.estimate(m)
        runs.append(time.perf_counter() - start)
    peak_kb = _status_kb("VmHWM")
    assert bool(torch.isfinite(losses).all())
    feats = cache.features.numel() * 4
    return {"load_seconds": t1 - t0, "setup_seconds": t2 - t1, "estimate_seconds": min(runs),
            "estimate_repeats_seconds": runs, "subsets_per_s_after_setup": _CURVE_SUBSETS / min(runs),
            "interpreter_rss_gb": base_kb / 2**20,
            "peak_rss_after_load_gb": load_kb / 2**20, "peak_rss_gb": peak_kb / 2**20, "features_gb": feats / 2**30,
            "peak_over_features": peak_kb * 1024 / feats, "l2": float(est.resolved_l2()), "candidate_sources": n}  # fmt: skip


def _child(mode: str, *args: str) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--output", os.devnull, "--child", mode, *args]
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"child {mode} {args} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def run_point(rows: int, sources: int, dim: int, seed: int, workdir: str) -> dict:
    path = os.path.join(workdir, f"cache_N{rows}_n{sources}_d{dim}")
    try:
        built = _child("build", str(rows), str(sources), str(dim), str(seed), path)
        measured = _child("measure", path, str(seed))
    finally:
        shutil.rmtree(path, ignore_errors=True)
    return {"N": rows, "n": sources, "d": dim, **built, **measured, "load_average": load_average()}


def slopes(points: list[dict], axis: str, keys: tuple[str, ...]) -> dict:
    """Log-log slope of each cost between neighbouring points of a curve (1: linear, 2: quadratic)."""
    out: dict = {}
    for key in keys:
        out[key] = [
            math.log(b[key] / a[key]) / math.log(b[axis] / a[axis])
            for a, b in zip(points, points[1:])
            if a[key] > 0 and b[key] > 0
        ]
    return out


def curves(quick: bool, seed: int, workdir: str | None = None) -> dict:
    """Every curve point (shared points measured once) and the slopes along each axis."""
    grid = QUICK_POINTS if quick else CURVE_POINTS
    workdir = workdir or tempfile.mkdtemp(prefix="hfss_scale_")
    done: dict[tuple[int, int, int], dict] = {}
    out: dict = {"points": {}, "slopes": {}}
    keys = ("setup_seconds", "estimate_seconds", "load_seconds", "peak_rss_gb", "disk_bytes")
    for axis, points in grid.items():
        for point in points:
            if point not in done:
                done[point] = run_point(*point, seed, workdir)
                print("curve", point, {k: round(done[point][k], 3) for k in keys}, flush=True)
        measured = [done[p] for p in points]
        out["points"][axis] = measured
        out["slopes"][axis] = slopes(measured, axis, keys)
    return out


def plot_curves(curve_result: dict, path: str) -> str | None:
    """Time (top) and memory / disk (bottom) along each axis, log-log; None when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print('matplotlib is not installed: no plot (pip install -e ".[plot]")', flush=True)
        return None
    names = {"N": "training rows N", "n": "sources n", "d": "feature dimension d"}
    fig, grid = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for col, (axis, name) in enumerate(names.items()):
        pts = curve_result["points"].get(axis, [])
        if not pts:
            continue
        fixed = ", ".join(f"{k} = {pts[0][k]:,}" for k in names if k != axis)
        label = f"{name} ({fixed})"
        x = [p[axis] for p in pts]
        top, bottom = grid[0][col], grid[1][col]
        for key, name in (("load_seconds", "load + checks"), ("setup_seconds", "statistics + automatic λ"),
                          ("estimate_seconds", f"{_CURVE_SUBSETS} estimates")):  # fmt: skip
            top.plot(x, [p[key] for p in pts], marker="o", label=name)
        bottom.plot(x, [p["peak_rss_gb"] for p in pts], marker="o", label="peak resident memory")
        bottom.plot(
            x, [p["features_gb"] for p in pts], marker="s", linestyle="--", label="features (N x d float32)"
        )
        bottom.plot(
            x, [p["disk_bytes"] / 2**30 for p in pts], marker="^", linestyle=":", label="cache on disk"
        )
        for ax, ylabel in ((top, "seconds (1 thread)"), (bottom, "GiB")):
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        if col == 0:
            top.legend(fontsize=8)
            bottom.legend(fontsize=8)
    fig.suptitle("Estimation cost along N, n and d (synthetic caches, scale.py --curves)")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def finish_curves(result: dict, quick: bool, plot: str | None = None) -> None:
    """The headline memory key from the largest N point (N = 10^6, d = 2048 in a full run); the plot if asked."""
    top = result["curves"]["points"]["N"][-1]
    result["peak_rss_gb_N1e6_d2048"] = top["peak_rss_gb"]
    result["peak_rss_over_features_N1e6_d2048"] = top["peak_over_features"]
    if quick:
        result["peak_rss_note"] = f"--quick: the peak-memory keys come from N = {top['N']}, d = {top['d']}"
    if plot:
        result["plot"] = plot_curves(result["curves"], plot)


def main() -> None:
    parser = benchmark_parser(__doc__, seed_help="seed of the synthetic caches and subsets")
    parser.add_argument(
        "--reduced", action="store_true", help="d in {128, 2048}, 10^3 and 10^4 subsets, 2 repeats"
    )
    parser.add_argument(
        "--curves", action="store_true", help="also the N / n / d scaling curves (memory, disk, time)"
    )
    parser.add_argument(
        "--curves-only", action="store_true", help="only the scaling curves (skips the speed grid)"
    )
    parser.add_argument(
        "--curves-from", help="take the curves from an earlier --curves-only JSON instead of running them"
    )
    parser.add_argument(
        "--plot", help="PNG for the scaling curves' plot (with --curves, --curves-only or --curves-from)"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        mode, rest = args.child[0], args.child[1:]
        if mode == "build":
            res = build_point(int(rest[0]), int(rest[1]), int(rest[2]), int(rest[3]), rest[4])
        else:
            res = measure_point(rest[0], int(rest[1]))
        print(json.dumps(res))
        return
    if args.curves_only:
        result = {
            "benchmark": "scale",
            "quick": args.quick,
            "curves_only": True,
            "load_average_start": load_average(),
        }
        result["curves"] = curves(args.quick, args.seed)
        finish_curves(result, args.quick, args.plot)
        write_results(args.output, result)
        print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))
        return
    q = args.quick
    dims, counts, repeats = (
        ([128, 512], [1000], 1) if q else ([128, 512, 2048, 8192], [1000, 10_000, 100_000], 3)
    )
    if args.reduced and not q:
        dims, counts, repeats = [128, 2048], [1000, 10_000], 2
    result: dict = {
        "benchmark": "scale",
        "quick": q,
        "reduced": args.reduced,
        "load_average_start": load_average(),
        "table": {},
    }
    t_start = time.perf_counter()
    for d in dims:
        cache = _cache(d, q, args.seed)
        for threads in (1, 2):
            for count in counts:
                reps = 1 if count >= 100_000 or d >= 8192 else repeats
                key = f"d{d}_{threads}thread_{count}"
                result["table"][key] = best(
                    [end_to_end(cache, threads, count, args.seed) for _ in range(reps)]
                )
                print(key, round(result["table"][key]["subsets_per_s"], 1), flush=True)
        if d == (512 if q else 2048):
            result["storage_error"] = storage_error(cache, args.seed)
    head = 1000 if q else 10_000
    result["end_to_end_subsets_per_s_d128_1thread"] = result["table"][f"d128_1thread_{head}"]["subsets_per_s"]
    big = f"d{512 if q else 2048}_2thread_{head}"
    result["end_to_end_subsets_per_s_d2048_2threads"] = result["table"][big]["subsets_per_s"]
    result["setup_seconds_d2048"] = result["table"][big]["setup_seconds"]
    result["forward_selection_seconds_n1000"] = forward_seconds(
        100 if q else 1000, 32 if q else 128, args.seed
    )
    if args.curves_from:
        with open(args.curves_from, encoding="utf-8") as fh:
            earlier = json.load(fh)
        result["curves"] = earlier["curves"]
        result["curves_environment"] = {"from": args.curves_from, **earlier.get("environment", {})}
        finish_curves(result, bool(earlier.get("quick")), args.plot)
    elif args.curves:
        result["curves"] = curves(q, args.seed)
        finish_curves(result, q, args.plot)
    else:
        result["not_run"] = "the N/n/d scaling curves and peak_rss_gb_N1e6_d2048 (run with --curves)"
    result["total_seconds"] = time.perf_counter() - t_start
    assert all(math.isfinite(v["subsets_per_s"]) for v in result["table"].values())
    write_results(args.output, result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
