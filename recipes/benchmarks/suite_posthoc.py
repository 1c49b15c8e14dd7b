"""Analyses of finished suite tasks from their gradient caches, without new fine-tunes: the selections of our
variants (``suite_runs.VARIANTS``, for tasks that ran before a variant existed; feed them to ``suite.py --merge
--posthoc-variants``), the estimated single-source effects against the measured single-source ablations, and the
fidelity figures of the run's real ``dev`` fine-tunes recomputed from the cache, calibration on held-out subsets
included (``suite_runs.fidelity_figures``; for runs made before the suite reported it).

Each task is given as ``NAME CACHE_DIR RESULT_JSON`` (the cache ``suite.py`` collected for it, path in
``tasks.<task>.cache.path``, and the results file with its ablations). Run it with the code of the commit that
wrote the caches: a newer release may refuse an older cache. ``CACHE_DIR`` ``rebuild`` meta-trains θ* and collects
the cache again, with the task's settings and data seed from the results file (minutes; the run is deterministic at
one thread, and ``reproduces_suite`` says whether the rebuilt cache gives the run's budget estimates and selection).

    python recipes/benchmarks/suite_posthoc.py --output posthoc.json \\
        --task wordnet_verbs /tmp/suite-wordnet_verbs-XXXX/grad_cache /tmp/suite_verbs.json
    python recipes/benchmarks/suite_posthoc.py --threads 1 --output posthoc.json \\
        --task lexcat_gemma rebuild docs/results/suite.json
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.estimation import estimator_for_training_args  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402
from suite_runs import VARIANTS, FinetuneSpec, fidelity_figures  # noqa: E402


def rebuild_cache(task: str, entry: dict[str, Any]) -> tuple[Any, float]:
    """θ* and the cache of a finished task collected again (its run's data seed, paths and settings) and the
    seconds it took; θ* itself is dropped."""
    import argparse

    from suite import collect, make_task, meta_lr

    run = entry.get("run", {}).get("settings") or {}
    ns = argparse.Namespace(
        quick=bool(run.get("quick", False)),
        wordnet_dir=run.get("wordnet_dir", "/usr/share/wordnet"),
        gemma_path=run.get("gemma_path"),
    )
    t, settings = make_task(task, ns)

    def value(s: dict[str, Any], key: str) -> Any:
        return meta_lr(s) if key == "meta_lr" else s[key]

    for key in ("steps", "lr", "meta_lr", "batch_size", "meta_epochs", "max_length"):
        ours, ran = value(settings, key), value(entry["settings"], key)
        if ours != ran:
            raise ValueError(
                f"{task}: this code's {key}={ours} differs from the run's {ran}; rebuild "
                "with the code of the run's commit (tasks.<task>.run.commit)"
            )
    seed = int(run.get("seed", 0))
    model, cache, seconds, _ = collect(t, t.build(seed), settings, seed)
    del model
    return cache, seconds


def analyse(task: str, cache_dir: str, result_path: str) -> dict[str, Any]:
    """The variants' selections, the single-source comparison and the fidelity figures of one task."""
    from hf_subset_select import GradientCache, SelectConfig, select_sources

    with open(result_path) as f:
        entry = json.load(f)["tasks"][task]
    s = entry["settings"]  # the target fine-tune the task ran: the estimate's budget λ comes from it
    spec = FinetuneSpec(s["steps"], s["lr"], s["batch_size"])
    rebuilt_seconds = None
    if cache_dir == "rebuild":
        cache, rebuilt_seconds = rebuild_cache(task, entry)
    else:
        cache = GradientCache.load(cache_dir)
    est = estimator_for_training_args(cache, spec.training_arguments())
    ours = list(select_sources(est).selected)
    same_selection = sorted(ours) == sorted(entry["methods"]["ours"]["sources"])
    if not same_selection and cache_dir != "rebuild":
        raise ValueError(f"{cache_dir} is not the cache of {task} in {result_path}: ours differs ({ours})")
    fe = entry["fidelity"]
    fid = fidelity_figures(
        cache, spec, fe["subsets"], fe["real_dev_loss"], fe["base_dev_loss"], fe.get("real_dev_metric")
    )
    estimate_diff = max(abs(a - b) for a, b in zip(fid["estimated_dev_loss"], fe["estimated_dev_loss"]))
    variants = {v: list(select_sources(est, config=SelectConfig(**f)).selected) for v, f in VARIANTS.items()}
    names = list(est.sources)
    base = float(est.estimate([[]])[0])
    estimated = [float(x) - base for x in est.estimate([[n] for n in names])]
    measured = [entry["ablations"][n]["diff_mean"] for n in names]
    return {
        "reproduces_suite": {
            "selection": same_selection,
            "variants": all(
                sorted(src) == sorted(entry["methods"].get(f"variant/{v}", {}).get("sources", [None]))
                for v, src in variants.items()
            ),
            "budget_estimates": estimate_diff < 1e-6,
            "budget_estimates_max_abs_diff": estimate_diff,
        },
        "cache_rebuilt_seconds": rebuilt_seconds,
        "fidelity": {k: v for k, v in fid.items() if k not in ("subsets", "real_dev_loss", "base_dev_loss")},
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
    parser = benchmark_parser(__doc__, seed=False, threads=1)
    parser.add_argument(
        "--task", nargs=3, action="append", required=True, metavar=("NAME", "CACHE", "RESULT")
    )
    args = parser.parse_args(argv)
    limit_threads(args.threads, blas=True)
    tasks = {name: analyse(name, cache, result) for name, cache, result in args.task}
    write_results(args.output, {"benchmark": "suite_posthoc", "tasks": tasks})
    for name, t in tasks.items():
        fid = t["fidelity"]
        print(
            name,
            t["reproduces_suite"],
            t["variants"],
            "single-source Spearman",
            round(t["single_source"]["spearman_estimated_gain_vs_measured"], 3),
            "budget / calibrated Spearman",
            round(fid["budget_spearman"], 3),
            round(fid["calibrated_spearman"], 3),
        )


if __name__ == "__main__":
    main()
