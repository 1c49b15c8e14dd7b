"""Does verifying the selection with a few real dev fine-tunes (``verify_selection``) fix what the estimate gets wrong?

Per suite task, with the suite's settings, data seed and fine-tune seeds (``suite.py``; θ* and the cache are rebuilt
the same way, so ``ours`` and ``target_only`` reproduce the suite's figures):

* ``ours``: ``select_sources`` at its default with the budget λ of the target fine-tune (the suite's ``ours``);
* ``ours_verified``: ``verify_selection(ours, evaluate)``, where ``evaluate`` fine-tunes target + the sources from θ*
  (seed 0) and returns the task's metric on ``dev`` — ``k + 1`` fine-tunes for ``k`` kept sources; ``test`` is never
  seen by it;
* ``target_only`` and ``gradient_similarity`` (top k, k = ours' size) as references.

Final fine-tunes on the paired seeds, scored on ``test``; ``ours_verified`` minus each other method with a paired
bootstrap 95% interval; the verification's dev figures and its cost (seconds and fine-tunes, counted into its end to
end time).

    python recipes/benchmarks/suite_verify.py --output docs/results/suite_verify.json
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.estimation import estimator_for_training_args, gradient_similarity  # noqa: E402
from harness.results import write_results  # noqa: E402
from suite_runs import Finetuner, FinetuneSpec, paired, run_methods  # noqa: E402

TASKS = ("lexcat_gemma", "antonym_gemma", "wordnet_nouns", "wordnet_verbs")


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--gemma-path", default=None)
    return parser.parse_args(argv)


def run_task(task: Any, settings: dict[str, Any], args: Any) -> dict[str, Any]:
    """One task's methods, their test figures and the paired comparisons of ``ours_verified``."""
    from suite import collect

    from hf_subset_select import select_sources, verify_selection

    t0 = time.perf_counter()
    data = task.build(args.seed)
    model, cache, meta_seconds, _ = collect(task, data, settings, args.seed)
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    del model
    spec = FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    tuner = Finetuner(task, data, theta, spec)
    t_sel = time.perf_counter()
    est = estimator_for_training_args(cache, spec.training_arguments())
    sel = select_sources(est)
    select_seconds = time.perf_counter() - t_sel
    before = (tuner.seconds, tuner.count)
    verified = verify_selection(sel, lambda sources: tuner.run(sources, 0, split="dev")["metric"])
    verify_seconds, verify_count = tuner.seconds - before[0], tuner.count - before[1]
    k = max(1, len(sel.selected))
    methods = {
        "ours": {"sources": list(sel.selected)},
        "ours_verified": {"sources": list(verified.selected)},
        "target_only": {"sources": []},
        "gradient_similarity": {"sources": list(gradient_similarity(cache, k).selected)},
    }
    print(f"{task.name}: { ({n: m['sources'] for n, m in methods.items()}) }", flush=True)
    seeds = list(range(settings["seeds"]))
    results = run_methods(tuner, {**methods, "random/0": {"sources": []}}, seeds, 1)
    for extra in ("random", "random/0"):
        results.pop(extra)
    return {
        "methods": results,
        "verified_vs": {
            n: paired(results["ours_verified"]["per_seed"], results[n]["per_seed"])
            for n in results
            if n != "ours_verified"
        },
        "verification": verified.info["verification"],
        "scores": sel.scores,
        "metric": getattr(task, "metric", "accuracy"),
        "settings": {**settings, "seeds": seeds},
        "split_check": {s: tuner.splits_scored.count(s) for s in ("dev", "test")},
        "seconds": {
            "meta_train_and_collect": meta_seconds,
            "ours_selection": select_seconds,
            "verification": verify_seconds,
            "verification_finetunes": verify_count,
            "ours_verified_end_to_end": meta_seconds + select_seconds + verify_seconds,
            "total": time.perf_counter() - t0,
        },
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads(args.threads, blas=True)
    from suite import make_task

    tasks: dict[str, Any] = {}
    for name in parse_list(args.tasks):
        task, settings = make_task(name, args)
        tasks[name] = run_task(task, settings, args)
        summary = {
            b: {
                "wins": sum(t["verified_vs"][b]["ci_low"] > 0 for t in tasks.values()),
                "losses": sum(t["verified_vs"][b]["ci_high"] < 0 for t in tasks.values()),
                "higher_mean": sum(t["verified_vs"][b]["diff_mean"] > 0 for t in tasks.values()),
                "tasks": len(tasks),
            }
            for b in ("ours", "target_only", "gradient_similarity")
        }
        write_results(args.output, {"benchmark": "suite_verify", "tasks": tasks, "summary": summary})
        print(
            name, {n: round(m["test_metric_mean"], 4) for n, m in tasks[name]["methods"].items()}, flush=True
        )


if __name__ == "__main__":
    main()
