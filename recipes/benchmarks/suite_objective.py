"""Which output should the estimate model on a generation task scored by exact match? The default (``sequence_log_odds``,
whose logistic loss is the token cross entropy) against ``sequence_margin`` (the smallest gold-token logit margin,
positive exactly on a teacher-forced exact match), both collected from the same meta-training run.

For one causal-LM suite task (``lexcat_gemma`` or ``antonym_gemma``; the suite's settings and data seed, so θ* is the
suite's) this:

1. meta-trains θ* once with two ``GradientCollector`` s, one per output (``train`` + ``dev`` rows only);
2. fine-tunes from θ* the suite's fidelity subsets, target only, every source alone and all sources (seed 0) and
   scores them on ``dev``: exact match, the loss of each output;
3. per output, from its own cache: the budget-λ estimates of those subsets against the real dev exact match (what
   the user scores) and against the real dev loss of that output (the fidelity of what it estimates), the default
   selection (``select_sources``) and gradient similarity with as many sources;
4. fine-tunes those selections and target only on the suite's seeds, scored on ``test`` (the only use of ``test``;
   it happens after every choice above is written down), with paired bootstrap intervals.

Everything a method sees comes from ``train`` and ``dev``. ``tasks.<task>.reproduces_suite`` says whether the default
output's figures equal those of ``docs/results/suite.json`` for the same subset.

    python recipes/benchmarks/suite_objective.py --task lexcat_gemma --output docs/results/suite_objective.json
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.estimation import estimator_for_training_args, gradient_similarity  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import mean_relative_error, mean_std, spearman  # noqa: E402
from harness.tasks import random_subsets  # noqa: E402
from harness.training import meta_train, meta_training_arguments  # noqa: E402
from suite_runs import Finetuner, FinetuneSpec, paired  # noqa: E402

OUTPUTS = {
    "sequence_log_odds": "loss",
    "sequence_margin": "margin_loss",
}  # output -> its real loss in Finetuner.run
SUITE_JSON = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "results", "suite.json")


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument(
        "--tasks", default="lexcat_gemma,antonym_gemma", help="comma-separated causal-LM tasks"
    )
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--gemma-path", default=None)
    parser.add_argument("--fidelity-subsets", type=int, default=8)
    parser.add_argument("--suite-json", default=SUITE_JSON, help="the suite's results, to check reproduction")
    return parser.parse_args(argv)


def collect_outputs(
    task: Any, data: Any, settings: dict[str, Any], seed: int, work: str
) -> tuple[Any, dict, float]:
    """θ* and one cache per output of :data:`OUTPUTS`, from one meta-training run."""
    from datasets import Dataset
    from suite import meta_lr

    from hf_subset_select import CollectConfig, GradientCollector

    collectors = {
        name: GradientCollector(
            CollectConfig(
                max_length=settings["max_length"],
                output_fn=name,
                output_dir=os.path.join(work, f"grad_cache_{name}"),
            ),
            train_dataset=data.train,
            target_dataset=data.dev,
            tokenizer=task.tokenizer,
        )
        for name in OUTPUTS
    }
    targs = meta_training_arguments(
        work,
        epochs=settings["meta_epochs"],
        batch_size=settings["batch_size"],
        lr=meta_lr(settings),
        seed=seed,
        logging_steps=50,
    )
    model, seconds = meta_train(
        task.make_model(seed),
        targs,
        data.train,
        task.collate,
        list(collectors.values()),
        train_dataset=Dataset.from_list(task.rows(data.train)),
    )
    return model, {k: c.cache for k, c in collectors.items()}, seconds


def dev_subsets(candidates: list[str], count: int) -> list[tuple[str, ...]]:
    """The suite's fidelity subsets, then target only, every source alone and all sources."""
    subsets = list(random_subsets(candidates, count, f"suite-fidelity-{len(candidates)}"))
    for extra in [(), *[(c,) for c in candidates], tuple(candidates)]:
        if extra not in subsets:
            subsets.append(extra)
    return subsets


def analyse_output(
    cache: Any, spec: FinetuneSpec, subsets: list, real: list[dict], loss_key: str, base: float
) -> dict:
    """One output's estimates against the real dev figures, and its selections (nothing here reads ``test``)."""
    from hf_subset_select import select_sources

    est = estimator_for_training_args(cache, spec.training_arguments())
    estimates = [float(x) for x in est.estimate([list(s) for s in subsets])]
    em = [r["metric"] for r in real]
    own = [r[loss_key] for r in real]
    singles = [k for k, s in enumerate(subsets) if len(s) <= 1]
    sel = select_sources(est)
    k = max(1, len(sel.selected))
    return {
        "budget_l2": est.resolved_l2(),
        "estimates": estimates,
        "spearman_estimate_vs_dev_exact_match": spearman([-e for e in estimates], em),
        "single_source_spearman_estimate_vs_dev_exact_match": spearman(
            [-estimates[j] for j in singles], [em[j] for j in singles]
        ),
        "budget_spearman": spearman(estimates, own),
        "budget_mean_relative_error": mean_relative_error(estimates, own),
        "no_change_mean_relative_error": mean_relative_error([base] * len(own), own),
        "base_dev_loss": base,
        "ours": sorted(sel.selected),
        "scores": {n: float(v) for n, v in sel.scores.items()},
        "gradient_similarity": sorted(gradient_similarity(cache, k).selected),
    }


def run_task(name: str, args: Any) -> dict[str, Any]:
    from suite import make_task

    t0 = time.perf_counter()
    task, settings = make_task(name, args)
    data = task.build(args.seed)
    work = tempfile.mkdtemp(prefix=f"objective-{name}-")
    model, caches, meta_seconds = collect_outputs(task, data, settings, args.seed, work)
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    at_theta = task.score(model, task.rows(data.dev))
    del model
    spec = FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    tuner = Finetuner(task, data, theta, spec)
    subsets = dev_subsets(list(data.candidates), args.fidelity_subsets)
    real = [tuner.run(s, 0, split="dev") for s in subsets]
    for s, r in zip(subsets, real):
        print(
            f"  dev {s}: exact match {r['metric']:.3f} loss {r['loss']:.3f} margin {r['margin_loss']:.3f}",
            flush=True,
        )
    em = [r["metric"] for r in real]
    outputs = {
        out: analyse_output(caches[out], spec, subsets, real, key, float(at_theta[key]))
        for out, key in OUTPUTS.items()
    }
    for out, o in outputs.items():
        print(
            f"{name} {out}: vs dev EM {o['spearman_estimate_vs_dev_exact_match']:.3f}, budget "
            f"{o['budget_spearman']:.3f}, ours {o['ours']}, similarity {o['gradient_similarity']}",
            flush=True,
        )
    # the only use of test: every selection above is fixed
    methods = {"target_only": []}
    for out, o in outputs.items():
        methods[f"ours/{out}"] = o["ours"]
        methods[f"gradient_similarity/{out}"] = o["gradient_similarity"]
    seeds = list(range(settings["seeds"]))
    final = {}
    for method, sources in methods.items():
        per_seed = {s: tuner.run(sources, s)["metric"] for s in seeds}
        mean, std = mean_std(list(per_seed.values()))
        final[method] = {
            "sources": sources,
            "per_seed": per_seed,
            "test_metric_mean": mean,
            "test_metric_std": std,
        }
        print(f"  test {method} {sources}: {mean:.3f} ± {std:.3f}", flush=True)
    ours = final["ours/sequence_margin"]["per_seed"]
    versus = {m: paired(ours, f["per_seed"]) for m, f in final.items() if m != "ours/sequence_margin"}
    entry = {
        "settings": {**settings, "seeds": seeds},
        "dev": {
            "subsets": [list(s) for s in subsets],
            "exact_match": em,
            "loss": {out: [r[key] for r in real] for out, key in OUTPUTS.items()},
            "spearman_loss_vs_exact_match": {
                out: spearman([-r[key] for r in real], em) for out, key in OUTPUTS.items()
            },
        },
        "outputs": outputs,
        "test": final,
        "margin_ours_vs": versus,
        "split_check": {
            "splits_scored": {s: tuner.splits_scored.count(s) for s in ("dev", "test")},
            "test_rows_in_cache": sum(
                len(set(data.test["example_id"]) & {int(i) for i in c.example_ids}) for c in caches.values()
            ),
        },
        "seconds": {"meta_train_and_collect": meta_seconds, "total": time.perf_counter() - t0},
        "cache_dirs": {out: os.path.join(work, f"grad_cache_{out}") for out in OUTPUTS},
    }
    entry["reproduces_suite"] = reproduces_suite(args.suite_json, name, final["ours/sequence_log_odds"])
    return entry


def reproduces_suite(path: str, task: str, ours_default: dict[str, Any]) -> bool | None:
    """Whether the default output's selection and test figures equal the suite's ``ours`` (None: not comparable)."""
    if not os.path.exists(path):
        return None
    with open(path) as f:
        suite = json.load(f)["tasks"].get(task)
    if suite is None:
        return None
    m = suite["methods"]["ours"]
    same_seeds = {int(s): v for s, v in m["per_seed"].items()}
    return sorted(m["sources"]) == ours_default["sources"] and all(
        abs(same_seeds.get(s, float("nan")) - v) < 1e-9 for s, v in ours_default["per_seed"].items()
    )


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads(args.threads, blas=True)
    tasks = {name: run_task(name, args) for name in parse_list(args.tasks)}
    write_results(args.output, {"benchmark": "suite_objective", "quick": args.quick, "tasks": tasks})


if __name__ == "__main__":
    main()
