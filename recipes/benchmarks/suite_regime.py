"""Does the estimate hold when the target fine-tune does not overfit? The suite's fidelity under other fine-tune
budgets, from one θ* and one cache.

The first-order estimate models a small step from θ*. On the Gemma tasks the first frozen suite's target fine-tune
(40 AdamW steps at lr 1e-3, batch 4, on 32 target rows) ended most runs with a *higher* dev loss than θ*'s, a regime no
first-order estimate can follow (``suite_diagnose.py``). This script asks whether that regime, not the estimator, is
what fails: for one suite task (the suite's settings and data seed, so θ* and the cache are the suite's) it
meta-trains and collects once, then for each fine-tune budget in ``--specs`` (``STEPSxLR``, or ``suite``, the
suite's own):

1. fine-tunes from θ* (seed 0) the suite's fidelity subsets, target only, every source alone and all sources, and
   scores them on ``dev`` (loss and the task's metric);
2. compares the budget-λ estimates *of that budget* with the real dev losses: the suite's fidelity figures on the
   fidelity subsets (``suite_runs.fidelity_figures``, calibration on held-out subsets included), the same over all
   subsets, the single sources' ranking, the share of fine-tunes that end above θ*'s dev loss;
3. records the default selection at that budget and its dev metric (seed 0) beside target only's.

``test`` is never read: this chooses nothing that is scored; it says which regime the estimate stands for.

    python recipes/benchmarks/suite_regime.py --task lexcat_gemma --threads 1 --output /tmp/regime_lexcat.json
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
from harness.estimation import estimator_for_training_args  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import mean_relative_error, spearman  # noqa: E402
from suite_objective import dev_subsets  # noqa: E402
from suite_runs import Finetuner, FinetuneSpec, fidelity_figures  # noqa: E402

# the first frozen suite's Gemma budget, then the same total AdamW step length two ways (fewer steps; a smaller lr,
# the suite's Gemma budget since); docs/results/suite_regime.json labels the first "suite" (commit b0474c7)
DEFAULT_SPECS = "40x1e-3,10x1e-3,40x2.5e-4"


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--task", default="lexcat_gemma")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--gemma-path", default=None)
    parser.add_argument("--fidelity-subsets", type=int, default=8)
    parser.add_argument(
        "--specs",
        default=DEFAULT_SPECS,
        help="comma-separated fine-tune budgets STEPSxLR (batch size: the suite's); 'suite' is the suite's own",
    )
    return parser.parse_args(argv)


def parse_spec(text: str, settings: dict[str, Any]) -> FinetuneSpec:
    """``suite`` or ``STEPSxLR`` (e.g. ``10x1e-3``) as a :class:`FinetuneSpec` with the suite's batch size."""
    if text == "suite":
        return FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    try:
        steps, lr = text.split("x")
        spec = FinetuneSpec(int(steps), float(lr), settings["batch_size"])
    except ValueError:
        raise ValueError(f"fine-tune budget {text!r}: write STEPSxLR, e.g. 10x1e-3, or 'suite'") from None
    if spec.steps < 1 or spec.lr <= 0:
        raise ValueError(f"fine-tune budget {text!r}: steps must be >= 1 and lr > 0")
    return spec


def analyse_spec(
    tuner: Finetuner, cache: Any, subsets: list[tuple[str, ...]], count: int, at_theta: float
) -> dict[str, Any]:
    """Real dev fine-tunes of ``subsets`` at ``tuner.spec`` and that budget's estimates against them."""
    from hf_subset_select import select_sources

    spec = tuner.spec
    real = [tuner.run(s, 0, split="dev") for s in subsets]
    loss, metric = [r["loss"] for r in real], [r["metric"] for r in real]
    est = estimator_for_training_args(cache, spec.training_arguments())
    estimates = [float(x) for x in est.estimate([list(s) for s in subsets])]
    singles = [k for k, s in enumerate(subsets) if len(s) <= 1]
    fid = fidelity_figures(cache, spec, subsets[:count], loss[:count], at_theta, metric[:count])
    sel = sorted(select_sources(est).selected)
    ours_dev = tuner.run(sel, 0, split="dev")
    target = real[subsets.index(())]
    return {
        "steps": spec.steps,
        "lr": spec.lr,
        "batch_size": spec.batch_size,
        "budget_l2": est.resolved_l2(),
        "real_dev_loss": loss,
        "real_dev_metric": metric,
        "estimates": estimates,
        "fidelity": {k: v for k, v in fid.items() if k not in ("subsets", "real_dev_loss", "base_dev_loss")},
        "all_subsets": {
            "budget_spearman": spearman(estimates, loss),
            "budget_mean_relative_error": mean_relative_error(estimates, loss),
            "no_change_mean_relative_error": mean_relative_error([at_theta] * len(loss), loss),
            "spearman_estimate_vs_dev_metric": spearman([-e for e in estimates], metric),
            "spearman_real_loss_vs_dev_metric": spearman([-x for x in loss], metric),
        },
        "single_sources": {
            "spearman_estimate_vs_real_dev_loss": spearman(
                [estimates[j] for j in singles], [loss[j] for j in singles]
            ),
            "spearman_estimate_vs_dev_metric": spearman(
                [-estimates[j] for j in singles], [metric[j] for j in singles]
            ),
        },
        "share_above_theta_star": sum(x > at_theta for x in loss) / len(loss),
        "target_only_dev": {"loss": target["loss"], "metric": target["metric"]},
        "ours": {"sources": sel, "dev_loss": ours_dev["loss"], "dev_metric": ours_dev["metric"]},
        "seconds": sum(r["seconds"] for r in real) + ours_dev["seconds"],
    }


def run_task(name: str, args: Any) -> dict[str, Any]:
    from suite import collect, make_task

    t0 = time.perf_counter()
    task, settings = make_task(name, args)
    specs = [parse_spec(s, settings) for s in parse_list(args.specs)]
    data = task.build(args.seed)
    model, cache, meta_seconds, cache_dir = collect(task, data, settings, args.seed)
    theta = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    at_theta = task.score(model, task.rows(data.dev))
    metric = getattr(task, "metric", "accuracy")
    del model
    subsets = dev_subsets(list(data.candidates), args.fidelity_subsets)
    out: dict[str, Any] = {}
    scored: dict[str, int] = {"dev": 0, "test": 0}
    for text, spec in zip(parse_list(args.specs), specs):
        tuner = Finetuner(task, data, theta, spec)
        out[text] = analyse_spec(tuner, cache, subsets, args.fidelity_subsets, float(at_theta["loss"]))
        for split in scored:
            scored[split] += tuner.splits_scored.count(split)
        a, f = out[text]["all_subsets"], out[text]["fidelity"]
        print(
            f"{name} {text}: budget Spearman {f['budget_spearman']:.2f} (fidelity subsets) {a['budget_spearman']:.2f}"
            f" (all), error {a['budget_mean_relative_error']:.3f} vs no change "
            f"{a['no_change_mean_relative_error']:.3f}, above θ* {out[text]['share_above_theta_star']:.2f}, "
            f"ours {out[text]['ours']['sources']} dev {out[text]['ours']['dev_metric']:.3f} vs target only "
            f"{out[text]['target_only_dev']['metric']:.3f}",
            flush=True,
        )
        del tuner
    return {
        "settings": settings,
        "theta_star_dev": {"loss": float(at_theta["loss"]), "metric": float(at_theta[metric])},
        "subsets": [list(s) for s in subsets],
        "specs": out,
        "split_check": {
            "splits_scored": scored,
            "test_rows_in_cache": len(set(data.test["example_id"]) & {int(i) for i in cache.example_ids}),
        },
        "seconds": {"meta_train_and_collect": meta_seconds, "total": time.perf_counter() - t0},
        "cache": {"path": cache_dir, "dim": cache.dim},
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    limit_threads(args.threads, blas=True)
    task = run_task(args.task, args)
    write_results(
        args.output,
        {"benchmark": "suite_regime", "quick": args.quick, "seed": args.seed, "tasks": {args.task: task}},
    )


if __name__ == "__main__":
    main()
