"""Finer units than sources on the real-task suite: per-example and per-cluster selection vs per-source selection vs
LESS-style per-example cosine, with paired fine-tune seeds and bootstrap intervals.

Per task (``suite.py``'s ``make_task`` / ``collect``: θ* and ONE gradient cache of ``train`` + ``dev`` rows; ``test``
only scores the final fine-tunes), every method from that cache:

* ``per_source``: ``select_sources`` at its default (the suite's ``ours``), estimator with the budget λ of the target
  fine-tune (``EstimatorConfig.from_training_args``);
* ``per_example``: ``select_examples(estimator, "first_order")`` at its documented default keep rule (score < 0);
* ``less_cosine``: ``select_examples(cache, "gradient_similarity")`` keeping as many rows as ``per_example``;
* ``clusters_<k>``: ``cluster_sources`` over the pooled candidates (spherical k-means on the projected gradients),
  then ``select_sources`` at its default on the cluster cache (same budget λ);
* ``target_only``: the reference.

Final fine-tunes from θ* on the same seeds for every method (the suite's ``CLASSIFIER`` settings), scored on
``test``; each finer unit minus ``per_source`` and minus ``less_cosine`` with a paired bootstrap 95% interval.

On the ``_mixed`` variants (``tasks/wordnet.py``: 30% of each helpful source's rows relabelled with conflicting
labels) every method also gets ``planted``: ``planted_recall`` (share of the planted rows its training set leaves
out) and ``clean_kept`` (share of the clean rows of the planted sources it keeps), from the task's bookkeeping
``info["planted"]``, which no method sees.

    OMP_NUM_THREADS=1 python recipes/benchmarks/granularity_suite.py --output /tmp/g.json --quick
    OMP_NUM_THREADS=1 python recipes/benchmarks/granularity_suite.py --output /tmp/g_nouns.json --tasks wordnet_nouns
    OMP_NUM_THREADS=1 python recipes/benchmarks/granularity_suite.py --output /tmp/g_mixed.json \
        --tasks wordnet_nouns_mixed --ks ""   # harm planted inside the helpful sources; no clusters
    python recipes/benchmarks/granularity_suite.py --merge /tmp/g_nouns.json /tmp/g_verbs.json \\
        --output docs/results/granularity.json    # adds tasks.<task>, keeps the synthetic keys
"""

from __future__ import annotations

import json
import os
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.results import STARTED_AT, load_average, write_results  # noqa: E402

FINER = ("per_example",)  # plus clusters_<k>
BASES = ("per_source", "less_cosine")


def parse_args(argv: list[str] | None = None) -> Any:
    """The command line."""
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--tasks", default="wordnet_nouns,wordnet_verbs", help="comma-separated MiniLM tasks")
    parser.add_argument("--ks", default="4,8,16", help="numbers of clusters (comma-separated)")
    parser.add_argument("--seeds", type=int, default=None, help="fine-tune seeds (default: the suite's, 5)")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--gemma-path", default=None, help="unused (suite.make_task's argument)")
    parser.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="run nothing: add these results' tasks to --output (an existing granularity.json, other keys kept)",
    )
    return parser.parse_args(argv)


def kept_ids(selection: Any) -> list[int]:
    """The example ids a per-example selection keeps (weight > 0)."""
    t = selection.examples
    return [int(i) for i, w in zip(t.example_ids, t.weights) if w > 0]


def select_units(cache: Any, spec: Any, ks: list[int]) -> tuple[dict[str, dict[str, Any]], dict[str, float]]:
    """Every method's training set from the one cache: ``{name: {"sources", "examples", ...}}`` and the seconds of
    each selection."""
    from harness.estimation import estimator_for_training_args

    from hf_subset_select import select_sources
    from hf_subset_select.select.clusters import cluster_sources
    from hf_subset_select.select.examples import select_examples

    seconds: dict[str, float] = {}
    targs = spec.training_arguments()
    t0 = time.perf_counter()
    est = estimator_for_training_args(cache, targs)
    sel = select_sources(est)
    seconds["per_source"] = time.perf_counter() - t0
    methods: dict[str, dict[str, Any]] = {
        "target_only": {"sources": [], "examples": None},
        "per_source": {
            "sources": list(sel.selected),
            "examples": None,
            "scores": sel.scores,
            "l2": est.resolved_l2(),
        },
    }
    t0 = time.perf_counter()
    ex = select_examples(est, "first_order")
    seconds["per_example"] = time.perf_counter() - t0
    ids = kept_ids(ex)
    n = ex.info["num_examples"]
    methods["per_example"] = {
        "sources": [],
        "examples": ids,
        "kept_per_source": ex.info["kept_per_source"],
        "l2": ex.info["l2"],
        "score_quantiles": quantiles(ex.examples.scores),
    }
    t0 = time.perf_counter()
    if ids:
        cos = select_examples(cache, "gradient_similarity", fraction=len(ids) / n)
        cos_ids = kept_ids(cos)
        per_source = cos.info["kept_per_source"]
    else:  # nothing kept: the same number (0) of rows
        cos_ids, per_source = [], {}
    seconds["less_cosine"] = time.perf_counter() - t0
    methods["less_cosine"] = {"sources": [], "examples": cos_ids, "kept_per_source": per_source}
    source_of = dict(zip(ex.examples.example_ids, ex.examples.sources))
    for k in ks:
        t0 = time.perf_counter()
        clustered, mapping = cluster_sources(cache, k, seed=0)
        est_k = estimator_for_training_args(clustered, targs)
        sel_k = select_sources(est_k)
        seconds[f"clusters_{k}"] = time.perf_counter() - t0
        chosen = set(sel_k.selected)
        composition: dict[str, dict[str, int]] = {}
        for i, c in mapping.items():
            composition.setdefault(c, {}).setdefault(source_of.get(i, "?"), 0)
            composition[c][source_of.get(i, "?")] += 1
        methods[f"clusters_{k}"] = {
            "sources": [],
            "examples": [i for i, c in mapping.items() if c in chosen],
            "selected_clusters": sorted(chosen),
            "cluster_sizes": clustered.manifest["clusters"]["sizes"],
            "cluster_scores": dict(sel_k.scores),
            "cluster_composition": {c: composition[c] for c in sorted(composition)},
        }
    for m in methods.values():
        m["rows_kept"] = (
            sum(cache_counts(cache).get(s, 0) for s in m["sources"])
            if m["examples"] is None
            else len(m["examples"])
        )
    methods["_num_candidate_rows"] = {"value": n}
    return methods, seconds


def cache_counts(cache: Any) -> dict[str, int]:
    """Training rows per source of a cache."""
    import torch

    counts = torch.bincount(cache.source_index[cache.train_mask], minlength=len(cache.sources))
    return {s: int(c) for s, c in zip(cache.sources, counts.tolist())}


def quantiles(values: list[float]) -> dict[str, float]:
    """Min, quartiles, max and the share below zero of a list of scores."""
    import torch

    v = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(v, torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0], dtype=torch.float64)).tolist()
    return {
        **dict(zip(("min", "q25", "median", "q75", "max"), q)),
        "share_negative": float((v < 0).double().mean()),
    }


def run_task(name: str, args: Any, ks: list[int], progress: Any = None) -> dict[str, Any]:
    """One task's entry: each method's rows kept, per-seed test metric, mean ± std, and the paired intervals.
    ``progress(entry)`` is called after every method with the entry so far (``complete`` False until the end), so a
    run cut short keeps the methods it finished."""
    from harness.stats import mean_std
    from suite import collect, make_task
    from suite_runs import Finetuner, FinetuneSpec

    t_start = time.perf_counter()
    task, settings = make_task(name, args)
    data = task.build(args.seed)
    model, cache, meta_seconds, _ = collect(task, data, settings, args.seed)
    theta_star = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    del model
    spec = FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    tuner = Finetuner(task, data, theta_star, spec)
    methods, select_seconds = select_units(cache, spec, ks)
    n = methods.pop("_num_candidate_rows")["value"]
    planted = data.info.get("planted")
    if planted:  # bookkeeping only: computed after every selection is made
        for m in methods.values():
            m["planted"] = planted_stats(m, planted, data.train)
    seeds = list(range(args.seeds or settings["seeds"]))
    print(f"{name}: rows kept { ({m: v['rows_kept'] for m, v in methods.items()}) } of {n}", flush=True)
    test_ids = set(data.test["example_id"])
    base = {
        "model": str(getattr(task, "model_path", None)),
        "metric": getattr(task, "metric", "accuracy"),
        "num_candidate_rows": n,
        "settings": {
            **settings,
            "seeds": seeds,
            "cluster_k": ks,
            "start": "theta_star",
            **(
                {"planted_fraction": data.info["planted_fraction"], "planted_rows": data.info["planted_rows"]}
                if planted
                else {}
            ),
        },
        "split_check": {"test_rows_in_cache": len(test_ids & {int(i) for i in cache.example_ids})},
    }
    entry: dict[str, Any] = {}
    for mname, m in methods.items():
        runs = {s: tuner.run(m["sources"], s, examples=m["examples"]) for s in seeds}
        m["per_seed"] = {s: r["metric"] for s, r in runs.items()}
        m["loss_per_seed"] = {s: r["loss"] for s, r in runs.items()}
        m["test_metric_mean"], m["test_metric_std"] = mean_std(list(m["per_seed"].values()))
        m["test_loss_mean"], m["test_loss_std"] = mean_std(list(m["loss_per_seed"].values()))
        m["finetuned_as"] = (
            "sources" if tuner.canonical(m["sources"], m["examples"])[1] is None else "examples"
        )
        print(
            f"  {mname}: {[round(v, 4) for v in m['per_seed'].values()]} ({tuner.seconds:.0f} s so far)",
            flush=True,
        )
        entry = {
            **base,
            "methods": finished(methods),
            "complete": mname == list(methods)[-1],
            "seconds": {
                "meta_train_and_collect": meta_seconds,
                "selection": select_seconds,
                "finetunes": tuner.seconds,
                "num_finetunes": tuner.count,
                "total": time.perf_counter() - t_start,
            },
        }
        entry["settings"]["cluster_k"] = [k for k in ks if f"clusters_{k}" in entry["methods"]]
        entry["split_check"]["splits_scored"] = {s: tuner.splits_scored.count(s) for s in ("dev", "test")}
        if progress is not None:
            progress(entry)
    return entry


def planted_stats(method: dict[str, Any], planted: dict[str, list[int]], train: Any) -> dict[str, Any]:
    """``planted_recall``: share of the planted rows a method's training set leaves out; ``clean_kept``: share of
    the other rows of the planted sources it keeps (a whole-source method keeps all or none of a source's rows)."""
    bad = {int(i) for ids in planted.values() for i in ids}
    clean = {
        int(i) for s, i in zip(train["source"], train["example_id"]) if s in planted and int(i) not in bad
    }
    if method["examples"] is None:
        chosen = set(method["sources"])
        kept = {int(i) for s, i in zip(train["source"], train["example_id"]) if s in chosen}
    else:
        kept = {int(i) for i in method["examples"]}
    per_source = {
        s: {
            "planted_dropped": sum(1 for i in ids if int(i) not in kept),
            "planted": len(ids),
            "clean_kept": sum(
                1
                for s2, i in zip(train["source"], train["example_id"])
                if s2 == s and int(i) not in bad and int(i) in kept
            ),
        }
        for s, ids in planted.items()
    }
    return {
        "planted_recall": len(bad - kept) / len(bad),
        "clean_kept": len(clean & kept) / len(clean),
        "planted_rows": len(bad),
        "clean_rows": len(clean),
        "per_source": per_source,
    }


def finished(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """The methods fine-tuned so far, without their (long) id lists, each finer unit with its paired intervals
    against ``per_source`` and ``less_cosine`` (and ``per_source`` against ``less_cosine`` and ``target_only``)."""
    from suite_runs import paired

    done = {n: {k: v for k, v in m.items() if k != "examples"} for n, m in methods.items() if "per_seed" in m}
    against = {n: BASES for n in done if n == "per_example" or n.startswith("clusters_")}
    against["per_source"] = ("less_cosine", "target_only")
    for n, bases in against.items():
        if n in done:
            done[n]["vs"] = {b: paired(done[n]["per_seed"], done[b]["per_seed"]) for b in bases if b in done}
    return done


def headline(entry: dict[str, Any]) -> dict[str, Any]:
    """``per_example`` and ``clusters`` in the issue's shape: test metric mean/std and the paired intervals."""

    def short(m: dict[str, Any]) -> dict[str, Any]:
        out = {k: m[k] for k in ("test_metric_mean", "test_metric_std", "rows_kept")}
        if "planted" in m:
            out.update({k: m["planted"][k] for k in ("planted_recall", "clean_kept")})
        for b, d in m["vs"].items():
            out[f"vs_{b}"] = {k: d[k] for k in ("diff_mean", "ci_low", "ci_high")}
        return out

    methods = entry["methods"]
    clusters = {}
    for k in entry["settings"]["cluster_k"]:
        m = methods[f"clusters_{k}"]
        clusters[str(k)] = {
            **short(m),
            "selected_clusters": m["selected_clusters"],
            "cluster_sizes": m["cluster_sizes"],
            "cluster_scores": m["cluster_scores"],
        }
    finer = ["per_example", *(f"clusters_{k}" for k in entry["settings"]["cluster_k"])]
    above = [f for f in finer if methods[f]["vs"]["per_source"]["ci_low"] > 0]
    # a finer unit that keeps no candidate row is the target-only fine-tune (same runs), not a finer selection
    beats = [f for f in above if methods[f]["rows_kept"] > 0]
    empty = [f for f in above if methods[f]["rows_kept"] == 0]
    return {
        "per_example": short(methods["per_example"]),
        "clusters": clusters,
        "per_source": {
            k: methods["per_source"][k]
            for k in ("test_metric_mean", "test_metric_std", "rows_kept", "sources")
        },
        "less_cosine": {
            **{k: methods["less_cosine"][k] for k in ("test_metric_mean", "test_metric_std", "rows_kept")},
            **(
                {k: methods["less_cosine"]["planted"][k] for k in ("planted_recall", "clean_kept")}
                if "planted" in methods["less_cosine"]
                else {}
            ),
        },
        "target_only": {k: methods["target_only"][k] for k in ("test_metric_mean", "test_metric_std")},
        "finer_beats_per_source": beats,
        "empty_selection_beats_per_source": empty,
        "complete": entry.get("complete", True),
    }


def merge(paths: list[str], into: str) -> dict[str, Any]:
    """Add ``tasks.<task>`` (headline + full detail) of each result in ``paths`` to ``into``, keeping its other keys."""
    from hf_subset_select.io_utils import atomic_write_text

    with open(into, encoding="utf-8") as f:
        doc = json.load(f)
    tasks = dict(doc.get("tasks", {}))
    runs = dict(doc.get("real_task_runs", {}))
    for path in paths:
        with open(path, encoding="utf-8") as f:
            result = json.load(f)
        for name, entry in result["tasks"].items():
            tasks[name] = {**headline(entry), "detail": entry}
            runs[name] = {
                "file": os.path.basename(path),
                "environment": result["environment"],
                "load_average_at_start": result.get("load_average_at_start"),
            }
    doc["tasks"] = tasks
    doc["real_task_runs"] = runs
    doc["real_task_bar"] = {
        "finer_unit_beats_per_source_on": sorted(n for n, t in tasks.items() if t["finer_beats_per_source"]),
        "met": any(t["finer_beats_per_source"] for t in tasks.values()),
        "frozen_commits": sorted({str(r["environment"]["git"]["commit"]) for r in runs.values()}),
    }
    atomic_write_text(into, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return doc


def table(doc: dict[str, Any]) -> str:
    """The markdown table docs/benchmarks.md shows: per task and method, rows kept, test metric mean ± std and the
    paired differences (95% intervals) against per-source and LESS cosine."""

    def diff(d: dict[str, Any] | None) -> str:
        return "" if d is None else f"{d['diff_mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"

    lines = [
        "| task | method | rows kept | test accuracy | − per source | − LESS cosine |",
        "|---|---|---|---|---|---|",
    ]
    for name, t in sorted(doc["tasks"].items()):
        methods = t["detail"]["methods"]
        n = t["detail"]["num_candidate_rows"]
        for mname in (
            "target_only",
            "per_source",
            "less_cosine",
            "per_example",
            *sorted((m for m in methods if m.startswith("clusters_")), key=lambda m: int(m.split("_")[1])),
        ):
            m = methods[mname]
            vs = m.get("vs", {})
            lines.append(
                f"| {name} | {mname} | {m['rows_kept']}/{n} | {m['test_metric_mean']:.3f} ± {m['test_metric_std']:.3f}"
                f" | {diff(vs.get('per_source')) if mname != 'per_source' else ''}"
                f" | {diff(vs.get('less_cosine'))} |"
            )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.merge:
        doc = merge(args.merge, args.output)
        print(table(doc))
        print(doc["real_task_bar"])
        return
    limit_threads(args.threads, blas=True)
    ks = parse_list(args.ks, int)
    start_load = load_average()
    tasks: dict[str, Any] = {}
    for name in parse_list(args.tasks):
        from suite import MINILM_TASKS

        if name not in MINILM_TASKS:
            raise SystemExit(f"--tasks: {name!r} is not a MiniLM task; choose from {', '.join(MINILM_TASKS)}")

        def save(entry: dict[str, Any], name: str = name) -> None:
            tasks[name] = entry
            write_results(
                args.output,
                {
                    "benchmark": "granularity_suite",
                    "tasks": tasks,
                    "frozen_commit": STARTED_AT,
                    "load_average_at_start": start_load,
                    "settings": vars(args),
                    "machine_note": "shared machine (2 cores, other jobs running): seconds are indicative only",
                },
            )

        run_task(name, args, ks, save)
        h = headline(tasks[name])
        print(name, json.dumps({k: h[k] for k in ("per_example", "finer_beats_per_source")}), flush=True)


if __name__ == "__main__":
    main()
