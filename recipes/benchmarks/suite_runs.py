"""The suite's per-task pieces on the harness: seeded target fine-tunes (memoized), the methods' subsets from one
gradient cache, single-source ablations, budget-λ fidelity and the greedy oracle, and the paired comparisons.

Split discipline: the collector and every method get ``train`` and ``dev`` only; :class:`Finetuner` alone holds the
``test`` rows and scores them only for runs asked to (``split="test"``, the final fine-tunes and the ablations).
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from harness.estimation import (
    budget_metrics,
    estimator_for_training_args,
    gradient_similarity,
    random_baseline,
    representation_similarity,
)
from harness.fidelity import held_out_calibration
from harness.stats import fidelity_metrics, mean_std, paired_bootstrap
from harness.tasks import Task, TaskData, random_subsets, subset_rows
from harness.training import restore

Subset = tuple[str, ...]
# calibrations of the held-out fidelity figures (``calibrate`` keyword arguments): the default fits λ and the step
# scale, as docs/method.md section 6 gives it to a user; ``lambda_only`` keeps the step scale at 1 (one parameter:
# λ and the step scale nearly trade off against each other on a handful of subsets)
CALIBRATIONS: dict[str, dict[str, Any]] = {"default": {}, "lambda_only": {"fit_step_scale": False}}
# our other selectors and keep rules (SelectConfig fields), fine-tuned and reported beside the default (memoized:
# free when a variant keeps the same sources as a method already run)
VARIANTS = {
    "forward": {"method": "forward"},
    "linear": {"method": "linear"},
    "confident": {"method": "random_ensemble", "confidence": 1.64},
    "forward_confident": {"method": "forward", "confidence": 1.64},
}


@dataclass
class FinetuneSpec:
    """The target fine-tune: ``steps`` AdamW steps of ``batch_size`` at constant ``lr`` (its budget λ too)."""

    steps: int
    lr: float
    batch_size: int

    def training_arguments(self) -> Any:
        """``TrainingArguments`` describing this fine-tune (for ``EstimatorConfig.from_training_args``)."""
        from transformers import TrainingArguments

        return TrainingArguments(
            output_dir=tempfile.mkdtemp(prefix="suite-target-"),
            max_steps=self.steps,
            per_device_train_batch_size=self.batch_size,
            learning_rate=self.lr,
            lr_scheduler_type="constant",
            weight_decay=0.0,
            report_to=[],
            use_cpu=True,
        )


class Finetuner:
    """Seeded fine-tunes of one task from θ* or from the base model with a fresh adapter, memoized by
    (start, subset, weights, seed, split); one model instance whose trainable parameters are restored per run."""

    def __init__(
        self, task: Task, data: TaskData, theta_star: dict[str, torch.Tensor], spec: FinetuneSpec
    ) -> None:
        self.task, self.spec, self.theta_star = task, spec, theta_star
        self.train_rows = task.rows(data.train)
        self._eval = {"dev": task.rows(data.dev), "test": task.rows(data.test)}
        self.model = task.make_model(1000)
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.fresh: dict[int, dict[str, torch.Tensor]] = {}
        self.memo: dict[tuple, dict[str, float]] = {}
        self.seconds, self.count = 0.0, 0
        self.splits_scored: list[str] = []

    def canonical(
        self, subset: Sequence[str], examples: Sequence[int] | None
    ) -> tuple[Subset, frozenset[int] | None]:
        """``(sources, None)`` when ``subset`` plus the rows of ``examples`` are whole sources, else ``(subset, ids)``
        with the ids of rows outside ``subset`` (the memo key of a per-example run)."""
        subset = tuple(sorted(subset))
        if examples is None:
            return subset, None
        ids = {int(i) for i in examples}
        by_source: dict[str, set[int]] = {}
        for r in self.train_rows:
            if r["source"] != "target" and r["source"] not in subset:
                by_source.setdefault(r["source"], set()).add(int(r["example_id"]))
        kept = {s: rows & ids for s, rows in by_source.items()}
        if all(not k or k == by_source[s] for s, k in kept.items()):
            return tuple(sorted({*subset, *(s for s, k in kept.items() if k)})), None
        return subset, frozenset(i for k in kept.values() for i in k)

    def start_values(self, start: str, seed: int) -> dict[str, torch.Tensor]:
        """θ* (``theta_star``) or the fresh adapter and head of ``seed`` on the base model (``base``)."""
        if start == "theta_star":
            return self.theta_star
        if seed not in self.fresh:
            model = self.task.make_model(1000 + seed)
            self.fresh[seed] = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        return self.fresh[seed]

    def training_rows(
        self,
        subset: Subset,
        weights: dict[str, float] | None,
        seed: int,
        examples: frozenset[int] | None = None,
    ) -> list[dict[str, Any]]:
        """The target's rows plus ``subset``'s (plus the rows whose ``example_id`` is in ``examples``: a per-example or
        per-cluster selection); with ``weights`` as many rows drawn with the per-example sampling weights of their
        sources (target 1), with replacement (the selection's weight mode)."""
        if examples is None:
            rows = subset_rows(self.train_rows, subset)
        else:
            keep = {"target", *subset}
            rows = [r for r in self.train_rows if r["source"] in keep or int(r["example_id"]) in examples]
        if weights is None:
            return rows
        w = torch.tensor([1.0 if r["source"] == "target" else weights.get(r["source"], 0.0) for r in rows])
        gen = torch.Generator().manual_seed(10_000 + seed)
        return [rows[i] for i in torch.multinomial(w, len(rows), replacement=True, generator=gen).tolist()]

    def run(
        self,
        subset: Sequence[str],
        seed: int,
        *,
        start: str = "theta_star",
        weights: dict[str, float] | None = None,
        split: str = "test",
        examples: Sequence[int] | None = None,
    ) -> dict[str, float]:
        """``{"metric", "loss", "seconds", "cpu_seconds"}`` of the fine-tune on target + ``subset`` scored on
        ``split``.

        ``examples``: also train on the candidate rows with these ``example_id`` s (a per-example or per-cluster
        selection). A set of ids that is exactly the union of whole sources is run (and memoized) as that subset, so
        a finer selection that keeps whole sources shares the source-level fine-tunes.
        """
        subset, kept = self.canonical(subset, examples)
        wkey = None if weights is None else tuple(sorted((s, round(weights.get(s, 0.0), 6)) for s in subset))
        key: tuple = (start, subset, wkey, seed, split)
        if kept is not None:
            key = (*key, kept)
        if key not in self.memo:
            t0, c0 = time.perf_counter(), time.process_time()
            restore(self.params, self.start_values(start, seed))
            rows = self.training_rows(subset, weights, seed, kept)
            s = self.spec
            self.task.finetune(
                self.model,
                self.params.values(),
                rows,
                steps=s.steps,
                lr=s.lr,
                batch_size=s.batch_size,
                seed=seed,
            )
            scored = self.task.score(self.model, self._eval[split])
            self.splits_scored.append(split)
            seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
            self.seconds, self.count = self.seconds + seconds, self.count + 1
            metric = getattr(self.task, "metric", "accuracy")
            self.memo[key] = {
                "metric": float(scored[metric]),
                "loss": float(scored["loss"]),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
                **{k: float(v) for k, v in scored.items() if k.endswith("_loss") and k != "loss"},
            }
        return self.memo[key]


def select_methods(
    cache: Any, spec: FinetuneSpec, random_draws: int
) -> tuple[dict[str, dict[str, Any]], float]:
    """Every method's subset from the one cache: ``{name: {"sources", "weights", "start"}}`` and ours' seconds.

    Ours as the docs tell a user: ``FirstOrderEstimator`` with the budget λ of the target fine-tune
    (``EstimatorConfig.from_training_args``) and ``select_sources`` at its default method, in filter mode and in
    weight mode; the baselines keep as many sources (k, at least 1), and both similarities also keep the sources
    above their mean cosine (``gradient_similarity_own``, ``representation_similarity_own``).
    """
    from hf_subset_select import SelectConfig, select_sources

    t0 = time.perf_counter()
    est = estimator_for_training_args(cache, spec.training_arguments())
    sel = select_sources(est)
    ours_seconds = time.perf_counter() - t0
    k = max(1, len(sel.selected))
    candidates = list(est.sources)
    methods: dict[str, dict[str, Any]] = {
        "ours": {"sources": list(sel.selected), "scores": sel.scores, "l2": est.resolved_l2()},
        "ours_weighted": {"sources": list(sel.selected), "weights": dict(sel.weights)},
        "ours@base": {"sources": list(sel.selected), "start": "base"},
        "target_only": {"sources": []},
        "all_sources": {"sources": candidates},
        "all_sources@base": {"sources": candidates, "start": "base"},
        "gradient_similarity": {"sources": list(gradient_similarity(cache, k).selected)},
        # the same baseline at its own keep rule (sources above the candidates' mean cosine), as a user of
        # LESS-style selection would run it without knowing ours' k
        "gradient_similarity_own": {"sources": list(gradient_similarity(cache, None).selected)},
        "representation_similarity": {"sources": list(representation_similarity(cache, k).selected)},
        "representation_similarity_own": {"sources": list(representation_similarity(cache, None).selected)},
    }
    for draw in range(random_draws):
        methods[f"random/{draw}"] = {"sources": list(random_baseline(cache, k, draw).selected)}
    for (
        variant,
        fields,
    ) in VARIANTS.items():  # our other selectors and keep rules, reported beside the default
        picked = select_sources(est, config=SelectConfig(**fields))
        methods[f"variant/{variant}"] = {"sources": list(picked.selected)}
    return methods, ours_seconds


def run_methods(
    tuner: Finetuner, methods: dict[str, dict[str, Any]], seeds: Sequence[int], random_draws: int
) -> dict[str, dict[str, Any]]:
    """Each method's test metric and loss per seed (same seeds for all), mean ± std; ``random`` is the per-seed mean
    over the draws."""
    out: dict[str, dict[str, Any]] = {}
    for name, m in methods.items():
        runs = {
            seed: tuner.run(m["sources"], seed, start=m.get("start", "theta_star"), weights=m.get("weights"))
            for seed in seeds
        }
        out[name] = {**m, "per_seed": {s: r["metric"] for s, r in runs.items()}}
        out[name]["loss_per_seed"] = {s: r["loss"] for s, r in runs.items()}
        print(f"  {name}: {[round(r['metric'], 4) for r in runs.values()]}", flush=True)
    draws = [out[f"random/{d}"] for d in range(random_draws)]
    out["random"] = {
        "sources": [d["sources"] for d in draws],
        "per_seed": {s: sum(d["per_seed"][s] for d in draws) / len(draws) for s in seeds},
        "loss_per_seed": {s: sum(d["loss_per_seed"][s] for d in draws) / len(draws) for s in seeds},
    }
    for m in out.values():
        m["test_metric_mean"], m["test_metric_std"] = mean_std(list(m["per_seed"].values()))
        m["test_loss_mean"], m["test_loss_std"] = mean_std(list(m["loss_per_seed"].values()))
    return out


def paired(ours: dict[Any, float], other: dict[Any, float]) -> dict[str, Any]:
    """Paired bootstrap of ours minus ``other`` over their common seeds (the seed sets must match)."""
    if set(ours) != set(other):
        raise ValueError(f"paired comparison over different seeds: {sorted(ours)} vs {sorted(other)}")
    seeds = sorted(ours)
    b = paired_bootstrap([ours[s] for s in seeds], [other[s] for s in seeds])
    return {"diff_mean": b["mean_difference"], "ci_low": b["low"], "ci_high": b["high"], "seeds": seeds}


SIMILARITIES = {
    "best_similarity": (
        "gradient_similarity",
        "gradient_similarity_own",
        "representation_similarity",
        "representation_similarity_own",
    ),
    "best_similarity_own_rule": ("gradient_similarity_own", "representation_similarity_own"),
}


def compare(methods: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """``ours`` against every other method. ``best_similarity``: the similarity baseline with the highest test mean,
    over both similarities at ours' k and at their own keep rule (the k variants are handed ours' decision of how
    many sources to keep); ``best_similarity_own_rule``: the better of the two that decide that on their own, as a
    user of similarity selection without the plugin would run them."""
    against = [n for n in methods if n != "ours" and not n.startswith("random/")]
    out = {n: paired(methods["ours"]["per_seed"], methods[n]["per_seed"]) for n in against}
    for key, sims in SIMILARITIES.items():
        best = max(sims, key=lambda n: methods[n]["test_metric_mean"])
        out[key] = {**out[best], "method": best}
    return out


def ablations(tuner: Finetuner, candidates: Sequence[str], seeds: Sequence[int]) -> dict[str, dict[str, Any]]:
    """Single-source roles measured on ``test``: target + source minus target alone, per seed, from θ*."""
    alone = {s: tuner.run((), s)["metric"] for s in seeds}
    out = {}
    for source in candidates:
        with_it = {s: tuner.run((source,), s)["metric"] for s in seeds}
        diff = paired(with_it, alone)
        role = "helpful" if diff["ci_low"] > 0 else "harmful" if diff["ci_high"] < 0 else "neutral"
        out[source] = {**diff, "measured_role": role, "per_seed": with_it}
        print(f"  ablation {source}: {diff['diff_mean']:+.4f} ({role})", flush=True)
    return out


def fidelity(
    tuner: Finetuner, cache: Any, candidates: Sequence[str], count: int, base: float
) -> dict[str, Any]:
    """Estimated vs real ``dev`` loss of ``count`` random subsets fine-tuned from θ* (seed 0) at the budget λ, no
    calibration: Spearman, mean relative error and the "no change" error (``base``: the dev loss at θ*); then the
    same after calibration on held-out subsets (:func:`fidelity_figures`)."""
    subsets = random_subsets(candidates, count, f"suite-fidelity-{len(candidates)}")
    real = [tuner.run(s, 0, split="dev") for s in subsets]
    truth, metric = [r["loss"] for r in real], [r["metric"] for r in real]
    return {**fidelity_figures(cache, tuner.spec, subsets, truth, base, metric), "real_dev_metric": metric}


def fidelity_figures(
    cache: Any,
    spec: FinetuneSpec,
    subsets: Sequence[Sequence[str]],
    truth: Sequence[float],
    base: float,
    metric: Sequence[float] | None = None,
) -> dict[str, Any]:
    """The fidelity figures of real ``dev`` losses ``truth`` of ``subsets`` (fine-tuned with ``spec`` from θ*):
    the budget-λ estimates with no calibration, then calibrated on held-out subsets (leave one out:
    ``harness.fidelity.held_out_calibration``, each of ``CALIBRATIONS``; ``calibrated_*``: the default). Also used
    on a finished run's real losses (``suite_posthoc.py``)."""
    from hf_subset_select import EstimatorConfig, FirstOrderEstimator

    subsets = [tuple(x) for x in subsets]
    other = list(truth) if metric is None else list(metric)
    est = FirstOrderEstimator(cache, EstimatorConfig())
    m = budget_metrics(
        est,
        subsets,
        truth,
        base,
        other,
        lr=spec.lr,
        steps=spec.steps,
        optimizer="adamw",
        batch_size=spec.batch_size,
    )
    no_change = fidelity_metrics(m["estimates_budget"], truth, base, other)["no_change_mean_relative_error"]
    held_out = {
        name: held_out_calibration(est, subsets, truth, base, other, m["budget_l2"], **kwargs)
        for name, kwargs in CALIBRATIONS.items()
    }
    if metric is None:
        for figures in held_out.values():
            figures.pop("spearman_metric")
    cal = held_out["default"]
    return {
        "budget_spearman": m["budget_spearman"],
        "budget_mean_relative_error": m["budget_mean_relative_error"],
        "no_change_mean_relative_error": no_change,
        "budget_l2": m["budget_l2"],
        "calibrated_spearman": cal["spearman"],
        "calibrated_mean_relative_error": cal["mean_relative_error"],
        "calibrated": held_out,
        "subsets": [list(x) for x in subsets],
        "real_dev_loss": list(truth),
        "estimated_dev_loss": m["estimates_budget"],
        "base_dev_loss": base,
    }


def oracle(tuner: Finetuner, candidates: Sequence[str], seed: int = 0) -> dict[str, Any]:
    """Greedy forward selection with real fine-tunes (from θ*) scored on ``dev`` loss: add the source that lowers it
    most, stop when none does. Returns the subset, its path, and the number, seconds and CPU seconds (this
    process's, ``time.process_time``: less moved by other processes on a shared machine) of its distinct fine-tunes."""
    seconds: dict[Subset, float] = {}
    cpu_seconds: dict[Subset, float] = {}

    def dev_loss(subset: Sequence[str]) -> float:
        r = tuner.run(subset, seed, split="dev")
        seconds[tuple(sorted(subset))] = r["seconds"]
        cpu_seconds[tuple(sorted(subset))] = r["cpu_seconds"]
        return r["loss"]

    chosen: list[str] = []
    best, path = dev_loss(()), []
    while len(chosen) < len(candidates):
        trials = {c: dev_loss((*chosen, c)) for c in candidates if c not in chosen}
        pick = min(trials, key=trials.__getitem__)
        if trials[pick] >= best:
            break
        chosen.append(pick)
        best = trials[pick]
        path.append({"added": pick, "dev_loss": best})
        print(f"  oracle: + {pick} (dev loss {best:.4f})", flush=True)
    return {
        "sources": chosen,
        "path": path,
        "finetunes": len(seconds),
        "seconds": sum(seconds.values()),
        "cpu_seconds": sum(cpu_seconds.values()),
    }
