"""Finer than sources, on synthetic caches: do per-example scores and pseudo-source clusters remove harmful
examples planted inside helpful sources, and what do they keep of the rest?

Cache (``make_synthetic_cache``): 4 aligned sources (helpful), 2 opposed (harmful), 2 orthogonal, 200 rows each,
d = 64, a shared "more confident" direction (``shared=1``), a 32-row target training source and 64 target rows.
In every aligned source 10% of the rows are planted harmful (``plant_harmful_examples``: the gradient's component
along the target's mean direction flips sign). The scatter ``noise`` (RMS length of a row's deviation from its
source's mean, the mean having length 1) sets how hard it is.

Methods, all from the one cache, at the estimator's default (trust-radius) λ:

* ``per_example``: ``select_examples(est, "first_order", fraction=budget)``, the first-order effect dL̂/dω_i;
  the budget keeps 70% of the candidate rows (= all but as many rows as are harmful by construction);
* ``per_example_default``: its default keep rule (effect < 0);
* ``cosine`` / ``cosine_default``: the LESS-style cosine per example, at the budget / above the mean;
* ``per_source``: ``select_sources(est)`` (random ensemble, default keep rule);
* ``clusters_k`` for k in 2, 4, 8, 16: ``cluster_sources(cache, k)`` pools every candidate source (as if the pool
  were untagged) and ``select_sources`` (random ensemble, default keep rule) runs on the clusters.

Figures (mean and std over ``--seeds`` caches): ``planted_recall`` (share of the planted rows dropped),
``kept_clean_fraction`` (share of the other rows of the aligned sources kept), ``kept_opposed_fraction`` (share of
the opposed sources' rows kept), ``kept_fraction`` (of all candidate rows). The bar of the issue: recall >= 0.8
with >= 0.9 of the clean rows kept (``meets_bar``).

    python recipes/benchmarks/granularity.py --output docs/results/granularity.json   # about a minute
    python recipes/benchmarks/granularity.py --output /tmp/granularity.json --quick   # 1 seed, 2 noise levels
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import mean_std  # noqa: E402

from hf_subset_select import FirstOrderEstimator, SelectConfig, select_sources  # noqa: E402
from hf_subset_select.demo.synthetic import make_synthetic_cache, plant_harmful_examples  # noqa: E402
from hf_subset_select.select.clusters import cluster_sources  # noqa: E402
from hf_subset_select.select.examples import select_examples  # noqa: E402

ALIGNED = [f"aligned_{i}" for i in range(4)]
KS = (2, 4, 8, 16)
BAR_RECALL, BAR_KEPT = 0.8, 0.9
FIGURES = ("planted_recall", "kept_clean_fraction", "kept_opposed_fraction", "kept_fraction")


def _figures(kept: dict[int, bool], planted: set[int], roles: dict[int, str]) -> dict[str, float]:
    """The four figures of one selection, from which candidate rows it keeps."""

    def share(rows: list[int]) -> float:
        return sum(kept[i] for i in rows) / len(rows) if rows else float("nan")

    clean = [i for i, r in roles.items() if r == "aligned" and i not in planted]
    return {
        "planted_recall": 1.0 - share(sorted(planted)),
        "kept_clean_fraction": share(clean),
        "kept_opposed_fraction": share([i for i, r in roles.items() if r == "opposed"]),
        "kept_fraction": share(list(roles)),
    }


def _run_one(noise: float, seed: int, num_subsets: int) -> dict[str, dict[str, Any]]:
    base = make_synthetic_cache(4, 2, 2, dim=64, examples_per_source=200, noise=noise, shared=1.0, seed=seed)
    cache, planted_ids = plant_harmful_examples(base, ALIGNED, 0.1, seed=seed)
    planted = set(planted_ids.tolist())
    est = FirstOrderEstimator(cache)
    rows = cache.train_mask & (cache.source_index != cache.source_id("target_train"))
    ids = cache.example_ids[rows].tolist()
    roles = {
        i: cache.manifest["roles"][cache.sources[s]] for i, s in zip(ids, cache.source_index[rows].tolist())
    }
    budget = 1.0 - (len(planted) + sum(r == "opposed" for r in roles.values())) / len(roles)
    out: dict[str, dict[str, Any]] = {}
    for name, method, fraction in (
        ("per_example", "first_order", budget),
        ("per_example_default", "first_order", None),
        ("cosine", "gradient_similarity", budget),
        ("cosine_default", "gradient_similarity", None),
    ):
        sel = select_examples(est, method, fraction=fraction)
        table = dict(zip(sel.examples.example_ids, sel.examples.weights))
        out[name] = _figures({i: table[i] > 0 for i in ids}, planted, roles)
    config = SelectConfig(num_subsets=num_subsets, seed=seed)
    by_source = set(select_sources(est, config=config).selected)
    row_source = dict(zip(ids, [cache.sources[s] for s in cache.source_index[rows].tolist()]))
    out["per_source"] = _figures({i: row_source[i] in by_source for i in ids}, planted, roles)
    for k in KS:
        clustered, mapping = cluster_sources(cache, k, seed=seed)
        kept = set(select_sources(FirstOrderEstimator(clustered), config=config).selected)
        out[f"clusters_{k}"] = _figures({i: mapping[i] in kept for i in ids}, planted, roles)
        out[f"clusters_{k}"]["planted_purity"] = _purity(mapping, planted)
    out["per_example"]["budget_keep_fraction"] = budget
    return out


def _purity(mapping: dict[int, str], planted: set[int]) -> float:
    """Share of the planted rows that sit in a cluster whose majority is planted (1: clusters isolate them)."""
    members: dict[str, list[int]] = {}
    for i, c in mapping.items():
        members.setdefault(c, []).append(i)
    majority = {c for c, rows in members.items() if 2 * sum(i in planted for i in rows) > len(rows)}
    return sum(mapping[i] in majority for i in planted) / max(1, len(planted))


def _summarize(runs: list[dict[str, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for method in runs[0]:
        entry: dict[str, Any] = {}
        for key in runs[0][method]:
            mean, std = mean_std([run[method][key] for run in runs])
            entry[key], entry[f"{key}_std"] = mean, std
        entry["meets_bar"] = (
            entry["planted_recall"] >= BAR_RECALL and entry["kept_clean_fraction"] >= BAR_KEPT
        )
        out[method] = entry
    return out


def main() -> None:
    parser = benchmark_parser(__doc__, seeds=3, seed=False, threads=1)
    parser.add_argument("--noise", default="1,2,4,8,16", help="scatter levels (comma-separated)")
    args = parser.parse_args()
    limit_threads(args.threads)
    noises = [1.0, 4.0] if args.quick else parse_list(args.noise, float)
    seeds = 1 if args.quick else args.seeds
    num_subsets = 300 if args.quick else 2000
    start = time.time()
    by_noise = {}
    for noise in noises:
        runs = [_run_one(noise, seed, num_subsets) for seed in range(seeds)]
        by_noise[f"{noise:g}"] = _summarize(runs)
        row = by_noise[f"{noise:g}"]
        print(
            f"noise {noise:g}: "
            + ", ".join(
                f"{m} {row[m]['planted_recall']:.2f}/{row[m]['kept_clean_fraction']:.2f}" for m in row
            ),
            flush=True,
        )
    headline = {
        noise: {
            m: {k: row[m][k] for k in ("planted_recall", "kept_clean_fraction", "meets_bar")} for m in row
        }
        for noise, row in by_noise.items()
    }
    write_results(
        args.output,
        {
            "benchmark": "granularity",
            "setting": {
                "sources": {"aligned": 4, "opposed": 2, "orthogonal": 2},
                "examples_per_source": 200,
                "planted_fraction_of_aligned": 0.1,
                "dim": 64,
                "shared": 1.0,
                "noise": noises,
                "seeds": seeds,
                "num_subsets": num_subsets,
                "cluster_k": list(KS),
                "bar": {"planted_recall": BAR_RECALL, "kept_clean_fraction": BAR_KEPT},
            },
            "planted_recall": headline,
            "by_noise": by_noise,
            "seconds": time.time() - start,
        },
    )


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
