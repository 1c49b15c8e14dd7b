"""Analyses of finished suite tasks from their gradient caches, without new fine-tunes: the selections of our
variants (``suite_runs.VARIANTS``, for tasks that ran before a variant existed; feed them to ``suite.py --merge
--posthoc-variants``) and the estimated single-source effects against the measured single-source ablations.

Each task is given as ``NAME CACHE_DIR RESULT_JSON`` (the cache ``suite.py`` collected for it, path in
``tasks.<task>.cache.path``, and the results file with its ablations). Run it with the code of the commit that
wrote the caches: a newer release may refuse an older cache.

    python recipes/benchmarks/suite_posthoc.py --output posthoc.json \\
        --task wordnet_verbs /tmp/suite-wordnet_verbs-XXXX/grad_cache /tmp/suite_verbs.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser  # noqa: E402
from harness.estimation import estimator_for_training_args  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402
from suite_runs import VARIANTS, FinetuneSpec  # noqa: E402


def analyse(task: str, cache_dir: str, result_path: str) -> dict[str, Any]:
    """The variants' selections and the single-source comparison of one task."""
    from hf_subset_select import GradientCache, SelectConfig, select_sources

    with open(result_path) as f:
        entry = json.load(f)["tasks"][task]
    s = entry["settings"]  # the target fine-tune the task ran: the estimate's budget λ comes from it
    spec = FinetuneSpec(s["steps"], s["lr"], s["batch_size"])
    est = estimator_for_training_args(GradientCache.load(cache_dir), spec.training_arguments())
    ours = list(select_sources(est).selected)
    if sorted(ours) != sorted(entry["methods"]["ours"]["sources"]):
        raise ValueError(f"{cache_dir} is not the cache of {task} in {result_path}: ours differs ({ours})")
    variants = {v: list(select_sources(est, config=SelectConfig(**f)).selected) for v, f in VARIANTS.items()}
    names = list(est.sources)
    base = float(est.estimate([[]])[0])
    estimated = [float(x) - base for x in est.estimate([[n] for n in names])]
    measured = [entry["ablations"][n]["diff_mean"] for n in names]
    return {
        "variants": variants,
        "single_source": {
            "spearman_estimated_gain_vs_measured": spearman([-e for e in estimated], measured),
            "sign_agreement": sum((e < 0) == (m > 0) for e, m in zip(estimated, measured)),
            "num_sources": len(names),
            "estimated_loss_change": dict(zip(names, estimated)),
            "measured_metric_change": dict(zip(names, measured)),
        },
    }


def main(argv: list[str] | None = None) -> None:
    parser = benchmark_parser(__doc__, seed=False)
    parser.add_argument(
        "--task", nargs=3, action="append", required=True, metavar=("NAME", "CACHE", "RESULT")
    )
    args = parser.parse_args(argv)
    tasks = {name: analyse(name, cache, result) for name, cache, result in args.task}
    write_results(args.output, {"benchmark": "suite_posthoc", "tasks": tasks})
    for name, t in tasks.items():
        print(name, t["variants"], round(t["single_source"]["spearman_estimated_gain_vs_measured"], 3))


if __name__ == "__main__":
    main()
