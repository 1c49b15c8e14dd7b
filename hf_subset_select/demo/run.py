"""``hf-subset-select demo``: the whole pipeline on built-in toy sources, offline, on a CPU.

1. Toy sources with measured roles (:mod:`hf_subset_select.demo.tasks`): a target skill, sources that help
   it, sources that are irrelevant, sources that hurt.
2. Multitask SFT with the real ``Trainer``, :class:`~hf_subset_select.MetaInitCallback` and
   :class:`~hf_subset_select.GradientCollector`: θ* and the gradient cache.
3. :class:`~hf_subset_select.FirstOrderEstimator` + :func:`~hf_subset_select.select_sources`.
4. Checks against real training: a few subsets really fine-tuned from θ* (estimated vs true loss on the
   target's dev split, the split the method sees), and the target fine-tune from the base model on (a) all
   sources, (b) the selection, (c) a random subset of the same size, scored on the held-out test split that
   no step of the method saw.
5. ``report.md`` and PNG plots in the output directory.
"""

from __future__ import annotations

import copy
import os
import random
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigMixin

__all__ = ["DemoConfig", "run_demo", "target_logistic_loss"]

# per scale: random subsets for the selection ensemble, optimizer steps of the short fine-tunes from θ* that
# check the estimate, projection dimension of the gradient cache
# and the size of the toy tasks. 'test' (the test suite) keeps the demo's tasks and model, which is what the
# selection quality depends on, and saves time on the subset ensemble only.
_SCALE = {
    "full": {"num_subsets": 2000, "check_steps": 40, "proj_dim": 2048, "tasks": "full"},
    "test": {"num_subsets": 500, "check_steps": 40, "proj_dim": 2048, "tasks": "full"},
}


@dataclass
class DemoConfig(ConfigMixin):
    """Settings of the demo run."""

    config_type = "demo_config"

    output_dir: str = field(default="hf_subset_select_demo", metadata={"help": "Where the demo writes."})
    scale: Literal["full", "test"] = field(
        default="full",
        metadata={
            "help": "'full' or 'test' (fewer estimated subsets, same code path).",
            "choices": list(_SCALE),
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for data, models and training."})

    def __post_init__(self) -> None:
        self._check_choices()


def target_logistic_loss(
    model: Any, tokenizer: Any, dataset: Any, *, prob_clamp: float = 1e-6, max_length: int = 64
) -> float:
    """Mean over target examples of ``log(1 + exp(-f_j))``, f the collector's output function.

    This is the quantity the first-order estimator predicts, measured on a really fine-tuned model.
    """
    import torch
    import torch.nn.functional as F

    from ..collect.outputs import resolve_output_fn
    from ..collect.per_example import collate_examples
    from ..data.encode import encode_example

    spec = resolve_output_fn(model, "auto", prob_clamp=prob_clamp)
    examples = [encode_example(ex, tokenizer, max_length) for ex in dataset]
    batch = collate_examples(examples, spec.kind, pad_token_id=tokenizer.pad_token_id or 0)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
        f = spec(out, batch)
    model.train(was_training)
    return float(F.softplus(-f.double()).mean())


def _spearman(a: list[float], b: list[float]) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(a, b).statistic)


class _Timer:
    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.marks: dict[str, float] = {}

    def mark(self, name: str) -> None:
        now = time.perf_counter()
        self.marks[name] = round(now - self.start - sum(self.marks.values()), 2)


def _say(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run_demo(config: DemoConfig) -> dict[str, Any]:
    """Run the demo and return its results (also written to ``<output_dir>/results.json``)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    import datasets
    import torch
    import transformers

    from .tasks import make_demo_tasks

    transformers.logging.set_verbosity_error()
    default_threads = torch.get_num_threads()
    datasets.disable_progress_bars()  # keep the terminal to the demo's own progress lines
    knobs = _SCALE[config.scale]
    out = os.path.abspath(config.output_dir)
    os.makedirs(out, exist_ok=True)
    timer = _Timer()
    try:
        torch.set_num_threads(1)  # tiny models train faster on one thread (measured 12 vs ~50 ms per step)
        tasks = make_demo_tasks(knobs["tasks"], seed=config.seed)
        _say(
            f"target task {tasks.target!r} ({sum(1 for s in tasks.train['source'] if s == tasks.target)} train / "
            f"{len(tasks.target_dev)} dev / {len(tasks.target_test)} held-out test examples) and "
            f"{len(tasks.roles)} auxiliary sources; building the base model"
        )
        base = tasks.make_model(seed=config.seed)
        timer.mark("data_and_base_model")
        theta, cache = _meta_init_and_collect(tasks, base, knobs, config.seed, out)
        timer.mark("meta_init_and_collection")

        torch.set_num_threads(default_threads)  # the estimator's linear algebra does use every core
        estimator, ensemble, selection, select_seconds = _estimate_and_select(
            tasks, cache, knobs, config.seed, out
        )
        timer.mark("estimate_and_select")

        torch.set_num_threads(1)
        rng = random.Random(config.seed)
        aux = list(estimator.sources)
        random_subset = sorted(rng.sample(aux, max(1, len(selection.selected))))
        checks = _estimate_checks(tasks, theta, estimator, selection, random_subset, knobs, config.seed)
        timer.mark("estimate_checks")
        final_metrics = _target_finetunes(tasks, base, aux, selection, random_subset, config.seed)
        timer.mark("target_finetunes")
    finally:
        torch.set_num_threads(default_threads)
    return _report(
        out, tasks, cache, estimator, ensemble, selection, checks, final_metrics, knobs, select_seconds, timer
    )


def _meta_init_and_collect(
    tasks: Any, base: Any, knobs: dict[str, Any], seed: int, out: str
) -> tuple[Any, Any]:
    """Step 2: θ* and the gradient cache, inside one ordinary Trainer run (multitask SFT on every source)."""
    from ..collect.collector import GradientCollector
    from ..collect.meta_init import MetaInitCallback
    from ..config import CollectConfig
    from ..data.encode import encode_example
    from ..data.trainers import SubsetSelectTrainer
    from .tasks import PadCollator

    _say("multitask SFT on target + all sources with MetaInitCallback and GradientCollector")
    tok = tasks.tokenizer
    theta = copy.deepcopy(base)
    encoded = tasks.train.map(lambda ex: encode_example(ex, tok, 16))
    collector = GradientCollector(
        CollectConfig(proj_dim=knobs["proj_dim"], seed=seed, batch_size=32, max_length=16),
        train_dataset=tasks.train,
        target_dataset=tasks.target_dev,  # the method sees dev only; test scores the final fine-tunes
        tokenizer=tok,
    )
    trainer = SubsetSelectTrainer(
        model=theta,
        args=tasks.training_arguments(out, seed=seed, disable_tqdm=False),
        train_dataset=encoded,
        data_collator=PadCollator(tok.pad_token_id),
        callbacks=[MetaInitCallback(train_dataset=tasks.train), collector],
    )
    trainer.train()
    return theta, collector.cache


def _estimate_and_select(
    tasks: Any, cache: Any, knobs: dict[str, Any], seed: int, out: str
) -> tuple[Any, Any, Any, float]:
    """Step 3: the estimator (budget λ of the check fine-tunes), ensemble scores and the forward selection."""
    from ..config import EstimatorConfig, SelectConfig
    from ..estimate.estimator import FirstOrderEstimator
    from ..select.registry import select_sources

    t0 = time.perf_counter()
    # the estimate stands for the check fine-tunes (check_steps AdamW steps from θ*): the budget λ rule reads
    # their learning rate, schedule, steps and batch size off their TrainingArguments
    estimator = FirstOrderEstimator(
        cache,
        EstimatorConfig.from_training_args(tasks.training_arguments(out, max_steps=knobs["check_steps"])),
    )
    # per-source scores from the random ensemble; the keep/drop decision from greedy forward selection
    ensemble = select_sources(
        estimator, config=SelectConfig(method="random_ensemble", num_subsets=knobs["num_subsets"], seed=seed)
    )
    selection = select_sources(estimator, config=SelectConfig(method="forward"))
    select_seconds = time.perf_counter() - t0
    selection.save(os.path.join(out, "selection.json"))
    ensemble.save(os.path.join(out, "ensemble_scores.json"))
    _say(
        f"estimated {knobs['num_subsets']} random subsets and a greedy forward path in {select_seconds:.2f}s on the CPU"
    )
    return estimator, ensemble, selection, select_seconds


def _estimate_checks(
    tasks: Any,
    theta: Any,
    estimator: Any,
    selection: Any,
    random_subset: list[str],
    knobs: dict[str, Any],
    seed: int,
) -> dict[str, dict[str, Any]]:
    """Step 4a: estimated vs true dev loss for a few subsets really fine-tuned from θ* (short budget)."""
    aux = list(estimator.sources)
    subsets = {
        "selection": list(selection.selected),
        "all sources": aux,
        "random (same size)": random_subset,
        "target only": [],
    }
    for role in ("helpful", "irrelevant", "harmful"):
        members = [s for s in aux if tasks.roles.get(s) == role]
        if members:
            subsets[f"{role} only"] = members
    estimated = estimator.estimate(list(subsets.values()))
    _say(f"checking the estimate: {len(subsets)} real fine-tunes from θ* ({knobs['check_steps']} steps each)")
    checks: dict[str, dict[str, Any]] = {}
    for (name, subset), est in zip(subsets.items(), estimated):
        model = copy.deepcopy(theta)
        tasks.finetune(model, subset, seed=seed, max_steps=knobs["check_steps"])
        true = target_logistic_loss(model, tasks.tokenizer, tasks.target_dev)
        checks[name] = {"sources": subset, "estimated": float(est), "true": true}
    return checks


def _target_finetunes(
    tasks: Any, base: Any, aux: list[str], selection: Any, random_subset: list[str], seed: int
) -> dict[str, dict[str, float]]:
    """Step 4b: the target fine-tune from the base model, scored on the held-out test split."""
    finals = {
        "(a) all sources": aux,
        "(b) selection": list(selection.selected),
        "(c) random, same size": random_subset,
    }
    _say("target fine-tunes from the base model: (a) all sources, (b) the selection, (c) a random subset")
    return {
        name: tasks.finetune(copy.deepcopy(base), subset, seed=seed).to_dict()
        for name, subset in finals.items()
    }


def _report(
    out: str,
    tasks: Any,
    cache: Any,
    estimator: Any,
    ensemble: Any,
    selection: Any,
    checks: dict[str, dict[str, Any]],
    final_metrics: dict[str, dict[str, float]],
    knobs: dict[str, Any],
    select_seconds: float,
    timer: _Timer,
) -> dict[str, Any]:
    """Step 5: tables on stdout, ``report.md`` with plots, ``results.json``; returns the results."""
    from ..io_utils import atomic_write_json
    from ..report import (
        format_table,
        markdown_table,
        plot_estimate_vs_true,
        plot_source_scores,
        write_markdown,
    )

    aux = list(estimator.sources)
    source_headers = _SOURCE_HEADERS
    source_rows = _source_rows(tasks, ensemble, selection)
    estimated = {n: c["estimated"] for n, c in checks.items()}
    true_loss = {n: c["true"] for n, c in checks.items()}
    base_loss = float(estimator.base_loss)
    check_headers = ["subset", "sources", "estimated loss", "true loss (fine-tuned from θ*)"]
    check_rows = [[n, ",".join(c["sources"]) or "-", c["estimated"], c["true"]] for n, c in checks.items()]
    spearman = _spearman(list(estimated.values()), list(true_loss.values()))
    rel = sum(abs(estimated[n] - true_loss[n]) / true_loss[n] for n in checks) / len(checks)
    nochange = sum(abs(base_loss - true_loss[n]) / true_loss[n] for n in checks) / len(checks)
    final_headers = ["target fine-tune on target +", "exact match", "token accuracy", "target test loss"]
    final_rows = [[n, m["exact_match"], m["token_accuracy"], m["loss"]] for n, m in final_metrics.items()]

    scores_png = plot_source_scores(
        {s: ensemble.scores[s] for s in ensemble.ranking},
        os.path.join(out, "source_scores.png"),
        roles=tasks.roles,
        selected=selection.selected,
        title="Per-source score: mean estimated target loss of the subsets containing it (lower = better)",
    )
    scatter_png = plot_estimate_vs_true(
        list(estimated.values()), list(true_loss.values()), os.path.join(out, "estimate_vs_true.png"),
        labels=list(checks),
    )  # fmt: skip
    summary = _summary(tasks, aux, selection, cache, knobs, select_seconds)
    sections = [
        ("Summary", summary),
        (
            "Sources",
            markdown_table(source_headers, source_rows)
            + ("\n\n![per-source scores](source_scores.png)" if scores_png else ""),
        ),
        (
            "Estimated vs true target loss",
            f"True = the same loss (mean log(1 + e^(-f)) over the target's dev examples) after really "
            f"fine-tuning θ* on target + the subset for {knobs['check_steps']} steps. Spearman {spearman:.3f}; mean "
            f"relative error {rel:.2%} (predicting no change from θ*, loss {base_loss:.4f}: {nochange:.2%}). "
            f"λ = {estimator.resolved_l2():.4g} from the budget rule (learning rate, schedule, steps and batch "
            "size of those fine-tunes; docs/method.md, section 6).\n\n"
            + markdown_table(check_headers, check_rows)
            + ("\n\n![estimated vs true](estimate_vs_true.png)" if scatter_png else ""),
        ),
        (
            "Target fine-tune",
            "From the base model, same budget per target example; metrics on the held-out test split.\n\n"
            + markdown_table(final_headers, final_rows),
        ),
        ("Time", markdown_table(["step", "seconds"], list(timer.marks.items()))),
    ]
    report = write_markdown(os.path.join(out, "report.md"), "hf-subset-select demo", sections)
    results = {
        "selection": selection.selected,
        "scores": ensemble.scores,
        "roles": tasks.roles,
        "estimated": estimated,
        "true": true_loss,
        "base_loss": base_loss,
        "spearman": spearman,
        "mean_relative_error": rel,
        "no_change_mean_relative_error": nochange,
        "l2": estimator.resolved_l2(),
        "l2_rule": estimator.l2_rule,
        "final": final_metrics,
        "final_split": "target_test",
        "seconds": timer.marks,
        "select_seconds": select_seconds,
        "misjudged": [r[0] for r in source_rows if r[-1] != "ok"],
    }
    atomic_write_json(os.path.join(out, "results.json"), results)

    _print_tables(
        format_table(source_headers, source_rows),
        format_table(check_headers, check_rows),
        f"Spearman(estimated, true) = {spearman:.3f}; mean relative error {rel:.2%} (no-change baseline "
        f"{nochange:.2%})",
        format_table(final_headers, final_rows),
        f"Report: {report}"
        + (" (with plots)" if scores_png else " (install hf-subset-select[plot] for plots)"),
    )
    return results


def _print_tables(*blocks: str) -> None:
    """The demo's closing tables and lines on stdout, separated by blank lines."""
    for block in blocks:
        print()
        print(block)


def _summary(
    tasks: Any, aux: list[str], selection: Any, cache: Any, knobs: dict[str, Any], select_seconds: float
) -> str:
    """The report's opening paragraph: what was kept, how long selection took, which splits were used."""
    kept = set(selection.selected)
    harmful_kept = [s for s in aux if tasks.roles.get(s) == "harmful" and s in kept]
    helpful_dropped = [s for s in aux if tasks.roles.get(s) == "helpful" and s not in kept]
    return (
        f"Kept {len(selection.selected)}/{len(aux)} sources ({', '.join(selection.selected) or 'none'}). "
        + (f"Harmful sources kept: {harmful_kept}. " if harmful_kept else "Every harmful source dropped. ")
        + (
            f"Helpful sources dropped: {helpful_dropped}."
            if helpful_dropped
            else "Every helpful source kept."
        )
        + f"\n\nSelection from {knobs['num_subsets']} estimated subsets took {select_seconds:.2f}s "
        f"on the CPU; the gradient cache has {cache.num_examples} rows at d = {cache.dim}. The method saw the "
        f"target's dev split ({len(tasks.target_dev)} rows) only; the target fine-tunes are scored on the "
        f"held-out test split ({len(tasks.target_test)} rows)."
    )


_SOURCE_HEADERS = [
    "source",
    "true role",
    "ensemble score (mean est. loss)",
    "forward decision",
    "weight",
    "check",
]


def _source_rows(tasks: Any, ensemble: Any, selection: Any) -> list[list[Any]]:
    """One row per source, best ensemble score first; ``check`` says whether the decision fits the true role."""
    kept = set(selection.selected)

    def verdict(source: str) -> str:
        role = tasks.roles.get(source)
        good = (role == "helpful" and source in kept) or (role == "harmful" and source not in kept)
        return "ok" if good or role == "irrelevant" else "WRONG"

    return [
        [s, tasks.roles.get(s, "?"), ensemble.scores[s], "kept" if s in kept else "dropped",
         selection.weights.get(s, 0.0), verdict(s)]
        for s in ensemble.ranking
    ]  # fmt: skip
