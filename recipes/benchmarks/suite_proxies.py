"""Would an estimated exact-match proxy rank the real dev exact match where the estimated loss does not? Dev only,
from the caches and real dev fine-tunes of ``suite_regime.py``; nothing is fine-tuned.

The estimate gives every target row's loss after a subset's fine-tune, ℓ_j = log(1 + exp(−f_j)) with f_j the
row's output (for a causal LM the answer's sequence log-odds). Besides their mean (the estimated loss, the default
objective), two per-row summaries stand closer to exact match: the share of rows with f_j > 0 (ℓ_j < log 2,
``hard``: the row's answer more likely than not) and the mean of sigmoid(f_j) = exp(−ℓ_j) (``soft``). For each task
and fine-tune budget of a ``suite_regime.py`` result, this computes the three from the run's own cache at that
budget's λ and ranks them against the real dev exact match of the run's subsets (Spearman), with a check that the
estimated losses are the run's own (``reproduces_regime``: the same cache).

    python recipes/benchmarks/suite_proxies.py --regime docs/results/suite_regime.json --output /tmp/proxies.json
"""

from __future__ import annotations

import json
import math
import os
import sys
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.estimation import estimator_for_training_args  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402
from suite_runs import FinetuneSpec  # noqa: E402

PROXIES = ("loss", "hard", "soft")


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(__doc__, seed=False, threads=1)
    parser.add_argument(
        "--regime", required=True, help="a suite_regime.py result (its caches must still exist)"
    )
    parser.add_argument(
        "--cache",
        action="append",
        default=[],
        metavar="TASK=DIR",
        help="the cache of TASK (default: the path recorded in the result)",
    )
    return parser.parse_args(argv)


def proxies(per_example: Any) -> dict[str, list[float]]:
    """Per subset, higher is better: minus the estimated loss, the share of rows with f > 0, the mean sigmoid(f)."""
    import torch

    return {
        "loss": (-per_example.mean(1)).tolist(),
        "hard": (per_example < math.log(2)).double().mean(1).tolist(),
        "soft": torch.exp(-per_example).mean(1).tolist(),
    }


def analyse(entry: dict[str, Any], cache_dir: str) -> dict[str, Any]:
    """Each budget of one task: the proxies' Spearman with the real dev metric, over all subsets and the single
    sources (target only included)."""
    from hf_subset_select import GradientCache

    cache = GradientCache.load(cache_dir)
    subsets = entry["subsets"]
    singles = [k for k, s in enumerate(subsets) if len(s) <= 1]
    out: dict[str, Any] = {}
    for name, spec in entry["specs"].items():
        est = estimator_for_training_args(
            cache, FinetuneSpec(spec["steps"], spec["lr"], spec["batch_size"]).training_arguments()
        )
        per_example = est.estimate(subsets, details=True).per_example
        values, metric = proxies(per_example), spec["real_dev_metric"]
        diff = max(abs(a - b) for a, b in zip(per_example.mean(1).tolist(), spec["estimates"]))
        out[name] = {
            "spearman_vs_dev_metric": {p: spearman(v, metric) for p, v in values.items()},
            "single_sources_spearman_vs_dev_metric": {
                p: spearman([v[k] for k in singles], [metric[k] for k in singles]) for p, v in values.items()
            },
            "values": values,
            "reproduces_regime": diff <= 1e-9,
            "estimates_max_abs_diff": diff,
        }
    return out


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads(args.threads, blas=True)
    with open(args.regime) as f:
        regime = json.load(f)
    if regime.get("benchmark") != "suite_regime":
        raise ValueError(f"{args.regime} is not a suite_regime.py result")
    given: dict[str, str] = {}
    for item in args.cache:
        if "=" not in item:
            raise ValueError(
                f"--cache {item!r}: write TASK=DIR, e.g. lexcat_gemma=/tmp/suite-lexcat/grad_cache"
            )
        task, path = item.split("=", 1)
        given[task] = path
    tasks = {
        name: analyse(entry, given.get(name, entry["cache"]["path"]))
        for name, entry in regime["tasks"].items()
    }
    for name, specs in tasks.items():
        for spec, figures in specs.items():
            rho = {p: round(v, 2) for p, v in figures["spearman_vs_dev_metric"].items()}
            print(
                f"{name} {spec}: Spearman vs real dev metric {rho}, same cache {figures['reproduces_regime']}"
            )
    write_results(args.output, {"benchmark": "suite_proxies", "regime": args.regime, "tasks": tasks})


if __name__ == "__main__":
    main()
