"""Fidelity of the first-order estimate against real fine-tuning from θ*, on toy multi-source tasks.

1. Meta-train a tiny GPT-2 (all parameters trainable) on every source with ``transformers.Trainer``, with
   :class:`~hf_subset_select.MetaInitCallback` (θ*) and :class:`~hf_subset_select.GradientCollector`
   (identity projection: the full per-example gradients) as callbacks.
2. Project the collected gradients to d = 64, 256, 1024, 2048 with the collector's own projector
   (``make_projector``; projecting is linear, so this equals collecting at that d) and keep d = p.
3. For random subsets (each source in with probability 1/2; the target's own training split always in),
   really fine-tune from θ* with two budgets: ``short`` (a fixed number of AdamW steps) and ``epoch`` (one
   pass over the subset), several seeds (data order), no dropout. The truth is the target loss computed from
   the fine-tuned model's per-example log-odds exactly as the estimate defines it (mean log(1 + exp(-f_j))),
   averaged over seeds; the token-level cross entropy is reported too.
4. Estimate the same subsets with the trust-radius λ, with the budget λ rule (the fine-tunes' learning rate,
   steps, batch size and optimizer; no real result used: ``budget_*`` keys), and with λ and the step scale
   calibrated on subsets held apart from the evaluated ones. The short budget is matched with ``reduction="mean"`` (a
   fixed number of steps), the epoch budget with ``reduction="sum"`` (bigger subsets take more steps).

    python recipes/benchmarks/fidelity.py --output fidelity.json                    # ~3-5 min on 2 busy cores
    python recipes/benchmarks/fidelity.py --task multi_token --output fidelity_multi.json
    python recipes/benchmarks/fidelity.py --output /tmp/smoke.json --quick                # smoke run

``--truth-cache truth.json`` keeps the real fine-tunes and reuses them in a later run with the same settings, data
and θ* (the manifest is checked).

Tasks (``--task``, ``tasks.cipher.CipherTask``): a letter cipher σ is the target ("mul x y =" -> σ(x)); its own training split shows only
six of the ten letters. Helpful sources carry σ (same task on other inputs, a lookup table under another
prompt); harmful ones the target's prompt with another rule (σ of the second letter, a conflicting cipher,
half-conflicting); others are digit tasks or noise. ``single_token`` (default) has one supervised token
per example (pre-tokenized, no EOS), so log(1 + exp(-f)) is exactly that token's cross entropy and the
fine-tuning objective is the estimator's; ``multi_token`` answers with two letters plus EOS. There
``--output-fn sequence_log_odds`` (default, the library's "auto") makes log(1 + exp(-f)) the example's mean
token cross entropy again, while ``token_log_odds`` (the paper's mean log-odds over the
tokens) is a different function of the tokens than the fine-tuning objective. Subsets differ in target loss far more than seeds do; the
JSON records both (``truth_noise_std``, ``truth_spread_std``).

``--precondition none`` (default, as in the library) collects raw gradients; ``auto`` collects them in Adam's
geometry (scaled by the meta-training AdamW's preconditioner, docs/method.md). ``linearized_optimizer`` is a diagnostic: the same AdamW
run (optimizer, batches, budget) on the linearized model f_i + ∇f_iᵀΔθ with the full gradients. Its error is
what the model's curvature alone costs (no first-order estimate can do better than it); the estimator's error
beyond it comes from modelling the optimizer by one regularized solve.
"""

from __future__ import annotations

import copy
import json
import math
import os
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
from harness.stats import fidelity_metrics, spearman  # noqa: E402
from harness.tasks import TaskData, random_subsets, subset_rows  # noqa: E402
from harness.training import Stopwatch, TruthCache, meta_train, meta_training_arguments  # noqa: E402
from tasks.cipher import CipherTask, encode_for_training  # noqa: E402

BATCH_SIZE = 16
HEADLINE_KEYS = (
    "mean_relative_error", "spearman", "calibrated_mean_relative_error", "calibrated_spearman",
    "no_change_mean_relative_error", "error_ratio_vs_no_change", "spearman_token_ce", "budget_spearman",
    "budget_mean_relative_error", "budget_error_ratio_vs_no_change",
)  # fmt: skip
RESULT_KEYS = (
    *HEADLINE_KEYS[:7], "truth_noise_std", "truth_spread_std", "true_loss_spread", "seed_to_seed_spearman",
    *HEADLINE_KEYS[7:],
)  # fmt: skip
# settings that decide the real fine-tunes (the estimator settings do not)
TRUTH_SETTINGS = (
    "seed", "num_eval", "num_calib", "seeds", "noise_seeds", "short_steps", "lr", "task", "optim", "threads",
    "output_fn", "precondition", "quick",
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> Any:
    """The command line (``--quick``: 40 rows per source, 4 meta-training epochs)."""
    parser = benchmark_parser(
        __doc__,
        seeds=3,
        seeds_help="fine-tuning seeds averaged into the truth",
        seed_help="data and model seed",
        threads=1,
        threads_help="torch threads (a tiny model: 1 avoids oversubscription)",
    )
    parser.add_argument("--num-eval", type=int, default=12, help="evaluated subsets")
    parser.add_argument("--num-calib", type=int, default=8, help="calibration subsets (held apart)")
    parser.add_argument("--noise-seeds", type=int, default=3, help="seeds of the noise-floor subset")
    parser.add_argument("--short-steps", type=int, default=8)
    parser.add_argument(
        "--lr", type=float, default=None, help="fine-tuning learning rate (default 1e-3 AdamW, 0.05 SGD)"
    )
    parser.add_argument(
        "--task",
        default="single_token",
        choices=["single_token", "multi_token"],
        help="single_token: one supervised token per example (objective = the estimator's); multi_token: "
        "two-letter answers plus EOS (f is the mean log-odds over 3 tokens)",
    )
    parser.add_argument("--optim", default="adamw", choices=["adamw", "sgd"], help="fine-tuning optimizer")
    parser.add_argument("--dims", default="64,256,1024,2048,identity")
    parser.add_argument("--headline-dim", default="2048")
    parser.add_argument(
        "--output-fn",
        default="sequence_log_odds",
        choices=["token_log_odds", "sequence_log_odds"],
        help="per-example output f (CollectConfig.output_fn; sequence_log_odds is what 'auto' picks); the truth's "
        "logistic loss uses the same f. With one supervised token both are the same",
    )
    parser.add_argument(
        "--precondition",
        default="none",
        choices=["auto", "adam", "none"],
        help="CollectConfig.precondition: raw gradients (none, the library's default) or Adam geometry from the "
        "meta-training optimizer (auto/adam)",
    )
    parser.add_argument(
        "--truth-cache", default=None, help="JSON file that keeps the real fine-tuning results"
    )
    args = parser.parse_args(argv)
    if args.lr is None:
        args.lr = 0.05 if args.optim == "sgd" else 1e-3
    return args


def linearized_finetune(
    cache: Any,
    rows: list[int],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    optim: str = "adamw",
    param_order: list[str] | None = None,
) -> float:
    """The real fine-tunes' optimizer, data order and budget on the linearized model f_i + ∇f_iᵀΔθ.

    Needs the full gradients (an identity-projection cache; a preconditioned cache is divided back by its feature
    scale; ``param_order`` names the trainable parameters in order). ``rows`` are the cache rows of the subset in the
    fine-tune's row order (the same seed then draws the same batches). Returns the target logistic loss at θ* + Δθ.
    """
    grads = cache.features.double()
    scale = getattr(cache, "preconditioner", None)
    if scale:  # identity features are flattened in the trainable parameters' order
        grads = grads / torch.cat([scale[name].reshape(-1) for name in param_order]).double()
    outputs = cache.outputs.double()
    delta = torch.zeros(grads.shape[1], dtype=torch.float64)
    m, v = torch.zeros_like(delta), torch.zeros_like(delta)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    index = torch.tensor(rows)
    for t in range(1, steps + 1):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        g = grads[index[idx]]
        z = outputs[index[idx]] + g @ delta
        step_grad = (-torch.sigmoid(-z)[:, None] * g).mean(0)  # d/dΔ of mean log(1 + exp(-z))
        if optim == "sgd":
            delta -= lr * step_grad
            continue
        m.mul_(0.9).add_(step_grad, alpha=0.1)
        v.mul_(0.999).addcmul_(step_grad, step_grad, value=0.001)
        delta -= lr * (m / (1 - 0.9**t)) / ((v / (1 - 0.999**t)).sqrt() + 1e-8)
    target = cache.target_mask
    return float(F.softplus(-(outputs[target] + grads[target] @ delta)).mean())


class Run:
    """One benchmark run: the task, θ* with its caches, the subsets and the truth."""

    def __init__(self, args: Any) -> None:
        self.args = args
        self.task = CipherTask(args.task, per_source=40 if args.quick else 80, output_fn=args.output_fn)
        self.data: TaskData = self.task.build(args.seed)
        self.budgets = {"short": lambda n: args.short_steps, "epoch": lambda n: math.ceil(n / BATCH_SIZE)}

    def meta_train(self) -> None:
        """θ* from one Trainer run with ``MetaInitCallback`` and an identity-projection collector; the projected
        caches and the target loss at θ*."""
        from transformers import DataCollatorForSeq2Seq

        from hf_subset_select import CollectConfig, GradientCollector

        args, data, task, tok = self.args, self.data, self.task, self.task.tokenizer
        tokenized = data.train.map(
            lambda e: dict(encode_for_training(e, tok)), remove_columns=data.train.column_names
        )
        self.collector = GradientCollector(
            CollectConfig(
                proj_type="identity",
                max_length=16,
                batch_size=32,
                precondition=args.precondition,
                output_fn=args.output_fn,
            ),
            train_dataset=data.train,
            target_dataset=data.dev,
            tokenizer=tok,
        )
        targs = meta_training_arguments(
            tempfile.mkdtemp(prefix="fidelity-"), epochs=4 if args.quick else 12, batch_size=32, lr=3e-3,
            seed=args.seed, logging_steps=50, remove_unused_columns=True,
        )  # fmt: skip
        collate = DataCollatorForSeq2Seq(tok, padding=True, label_pad_token_id=-100)
        model = task.make_model(args.seed)
        self.model, self.meta_seconds = meta_train(
            model, targs, data.train, collate, [self.collector], train_dataset=tokenized
        )
        self.theta = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        self.cache_id = cache = self.collector.cache
        self.train_rows, self.eval_rows = task.rows(data.train), task.rows(data.dev)
        self.f_theta = dict(
            zip(
                cache.example_ids[cache.train_mask].tolist(),
                cache.outputs[cache.train_mask].double().tolist(),
            )
        )
        self.base_loss = task.score(self.model, self.eval_rows)["loss"]
        self.shapes = [(n, tuple(q.shape)) for n, q in self.model.named_parameters() if q.requires_grad]
        self.caches = caches_by_dim(cache, parse_list(args.dims), self.shapes)

    def finetune_subset(self, key: tuple, subset: tuple[str, ...], watch: Stopwatch) -> dict[str, Any]:
        """Real fine-tunes of ``subset`` from θ* with budget ``key[0]`` (``--noise-seeds`` for the noise subset)."""
        args, task = self.args, self.task
        rows = subset_rows(self.train_rows, subset)
        steps = self.budgets[key[0]](len(rows))
        n_seeds = max(args.seeds, args.noise_seeds) if subset == self.evals[0] else args.seeds
        runs = []
        for seed in range(n_seeds):
            with watch.run():
                self.ft_model.load_state_dict(self.theta)
                task.finetune(
                    self.ft_model, self.ft_model.parameters(), rows, steps=steps, lr=args.lr, batch_size=BATCH_SIZE,
                    seed=seed, optim=args.optim,
                )  # fmt: skip
            m = task.score(self.ft_model, self.eval_rows)
            run = {"logistic_loss": m["logistic_loss"], "token_ce": m["token_ce"]}
            if seed == 0:  # how far the outputs of the subset's own rows really moved (RMS, log-odds)
                f_new = task.score(self.ft_model, rows)["f"]
                f_old = torch.tensor([self.f_theta[r["example_id"]] for r in rows], dtype=torch.float64)
                run["train_output_rms_change"] = float(((f_new - f_old) ** 2).mean().sqrt())
            runs.append(run)
        avg = [r["logistic_loss"] for r in runs[: args.seeds]]
        return {
            "runs": runs,
            "loss": sum(avg) / len(avg),
            "token_ce": sum(r["token_ce"] for r in runs[: args.seeds]) / args.seeds,
            "steps": steps,
        }

    def run_truth(self) -> None:
        """Random subsets (calibration ones first) and their real fine-tunes (or the truth cache's)."""
        args = self.args
        self.subsets = random_subsets(
            self.data.candidates, args.num_calib + args.num_eval, f"fidelity-subsets-{args.seed}"
        )
        self.calib, self.evals = self.subsets[: args.num_calib], self.subsets[args.num_calib :]
        self.ft_model = copy.deepcopy(self.model)
        manifest = {
            "format": "fidelity_truth/1",
            "settings": {k: v for k, v in vars(args).items() if k in TRUTH_SETTINGS},
            "subsets": [list(s) for s in self.subsets],
            "base_loss": self.base_loss,
            "torch": torch.__version__,
        }
        cache = TruthCache(args.truth_cache, manifest, ("budget",)) if args.truth_cache else None
        truth, self.watch, self.reused = real_finetunes(
            [(b,) for b in self.budgets], self.subsets, self.finetune_subset, cache
        )
        self.truth = {key[0]: by_subset for key, by_subset in truth.items()}

    def linearized(self, budget: str) -> dict[str, Any]:
        """Diagnostic: the same optimizer, data order and budget on the LINEARIZED model (full gradients at θ*).

        Its error is the part no first-order estimate can remove (the model leaves the region where it is linear); the
        estimator's error beyond it comes from modelling the optimizer by a regularized solve.
        """
        args, evals, tb = self.args, self.evals, self.truth[budget]
        pos_of = {int(e): k for k, e in enumerate(self.cache_id.example_ids.tolist())}
        t0 = time.perf_counter()
        sim = []
        for s in evals:
            rows = subset_rows(self.train_rows, s)
            positions = [pos_of[int(r["example_id"])] for r in rows]
            sim.append(
                sum(
                    linearized_finetune(
                        self.cache_id,
                        positions,
                        steps=self.budgets[budget](len(rows)),
                        lr=args.lr,
                        batch_size=BATCH_SIZE,
                        seed=k,
                        optim=args.optim,
                        param_order=[n for n, _ in self.shapes],
                    )  # fmt: skip
                    for k in range(args.seeds)
                )
                / args.seeds
            )
        m = fidelity_metrics(
            sim, [tb[s]["loss"] for s in evals], self.base_loss, [tb[s]["token_ce"] for s in evals]
        )
        return {
            "spearman": m["spearman"],
            "mean_relative_error": m["mean_relative_error"],
            "estimates": sim,
            "seconds": time.perf_counter() - t0,
        }

    def evaluate(self, budget: str, d: str, solver: str) -> dict[str, Any]:
        """Every estimate figure of one (budget, d, solver) cell. The short budget is matched with ``reduction="mean"``
        (a fixed number of steps), the epoch budget with ``reduction="sum"`` (bigger subsets take more steps)."""
        tb, evals = self.truth[budget], self.evals
        t0 = time.perf_counter()
        est = make_estimator(self.caches[d], solver=solver, reduction="mean" if budget == "short" else "sum")
        auto_l2 = est.resolved_l2()  # includes the one-time statistics
        setup_seconds = time.perf_counter() - t0
        t1 = time.perf_counter()
        default = est.estimate([list(s) for s in evals]).tolist()
        per_subset = (time.perf_counter() - t1) / len(evals)
        # the budget λ rule's steps: per subset (short, reduction="mean"); one epoch over every training row (epoch)
        steps = self.args.short_steps if budget == "short" else math.ceil(len(self.train_rows) / BATCH_SIZE)
        res = estimate_figures(
            est,
            auto_l2=auto_l2,
            default=default,
            evals=evals,
            truth=[tb[s]["loss"] for s in evals],
            calib_truth={s: tb[s]["loss"] for s in self.calib},
            base=self.base_loss,
            other=[tb[s]["token_ce"] for s in evals],
            other_name="token_ce",
            budget={
                "lr": self.args.lr,
                "steps": steps,
                "optimizer": self.args.optim,
                "batch_size": BATCH_SIZE,
            },
            solver=solver,
        )
        return {
            **res,
            "setup_seconds": setup_seconds,
            "seconds_per_subset": per_subset,
            "dim": self.caches[d].dim,
            "estimate_seconds": time.perf_counter() - t0,
            "_estimator": est,
        }


def budget_entry(run: Run, budget: str, forward: dict[str, Any]) -> dict[str, Any]:
    """Truth statistics, the linearized diagnostic and every d (the exact solver at the headline d) of one budget;
    the forward checks of the short budget go into ``forward``."""
    args, evals, tb = run.args, run.evals, run.truth[budget]
    t = [tb[s]["loss"] for s in evals]
    seed_runs = [[tb[s]["runs"][k]["logistic_loss"] for s in evals] for k in range(args.seeds)]
    noise_runs = [r["logistic_loss"] for r in tb[evals[0]]["runs"]]
    tt = torch.tensor(t, dtype=torch.float64)
    entry: dict[str, Any] = {
        "truth_noise_std": float(torch.tensor(noise_runs).std()),
        "truth_spread_std": float(tt.std()),
        "true_loss_spread": float(tt.max() / tt.min()),
        "linearized_optimizer": run.linearized(budget),
        "seed_to_seed_spearman": spearman(seed_runs[0], seed_runs[1]) if args.seeds >= 2 else None,
        "truth": t,
        "truth_token_ce": [tb[s]["token_ce"] for s in evals],
        "steps": [tb[s]["steps"] for s in evals],
        "by_dim": {},
        "true_train_output_rms_change_median": float(
            torch.tensor([tb[s]["runs"][0]["train_output_rms_change"] for s in run.subsets]).median()
        ),
        "_seconds": 0.0,
    }
    for d in run.caches:
        res = run.evaluate(budget, d, "fast")
        est = res.pop("_estimator")
        entry["_seconds"] += res["estimate_seconds"]
        if d == args.headline_dim:
            exact = run.evaluate(budget, d, "exact")
            exact.pop("_estimator")
            entry["_seconds"] += exact["estimate_seconds"]
            res["exact"] = {k: v for k, v in exact.items() if not k.startswith("estimates")}
        entry["by_dim"][d] = res
        if d in (args.headline_dim, "identity") and budget == "short":
            # forward check: θ* + P ŵ_S (calibrated λ and step scale) evaluated for real
            run.model.load_state_dict(run.theta)
            forward[d] = forward_figures(
                est, run.model, evals, run.data.dev, t, tokenizer=run.task.tokenizer, max_length=16
            )
            run.model.load_state_dict(run.theta)
    head = entry["by_dim"].get(args.headline_dim) or next(iter(entry["by_dim"].values()))
    entry.update(pick(head, HEADLINE_KEYS))
    return entry


def result_dict(
    run: Run, by_budget: dict[str, Any], forward: dict[str, Any], estimate_seconds: float
) -> dict:
    """The JSON results (headline: the short budget at ``--headline-dim``, fast solver)."""
    args, cache, short = run.args, run.cache_id, by_budget["short"]
    head = short["by_dim"].get(args.headline_dim)
    return {
        "benchmark": "fidelity",
        "headline": f"budget=short, d={args.headline_dim}, fast solver, truth averaged over {args.seeds} seeds",
        **pick(short, RESULT_KEYS),
        "linearized_optimizer_spearman": short["linearized_optimizer"]["spearman"],
        "linearized_optimizer_mean_relative_error": short["linearized_optimizer"]["mean_relative_error"],
        "by_dim": short["by_dim"],
        "by_budget": by_budget,
        "forward_check": forward,
        "estimate_seconds_total": estimate_seconds,
        "estimate_seconds_total_includes": "for every d and budget: statistics, automatic λ, default and "
        "calibrated estimates, the calibration grid and the in-sample bound; exact solver runs at the "
        "headline d",
        "finetune_seconds_total": run.watch.seconds,
        "estimate_setup_seconds_headline": head["setup_seconds"] if head else None,
        "estimate_seconds_per_subset_headline": head["seconds_per_subset"] if head else None,
        "finetune_seconds_per_run": run.watch.seconds / max(run.watch.count, 1),
        "finetunes_reused_from_truth_cache": run.reused,
        "meta_train_seconds": run.meta_seconds,
        "collector": run.collector.stats,
        "trainable_parameters": cache.dim,
        "base_loss": run.base_loss,
        "base_loss_matches_cache": abs(
            run.base_loss - float(F.softplus(-cache.outputs[cache.target_mask].double()).mean())
        ),
        "num_train_rows": int(cache.train_mask.sum()),
        "num_target_rows": int(cache.target_mask.sum()),
        "roles": run.data.roles,
        "eval_subsets": [list(s) for s in run.evals],
        "calibration_subsets": [list(s) for s in run.calib],
        "settings": vars(args),
        "load_average": list(os.getloadavg()),
        "note": "2 CPU cores shared with other jobs.",
    }


def print_summary(result: dict[str, Any]) -> None:
    """The headline figures, then one line per budget and d, the linearized diagnostic and the forward checks."""
    skip = ("by_dim", "by_budget", "roles", "settings", "eval_subsets", "calibration_subsets", "collector")
    print(json.dumps(brief(result, skip), indent=2))
    keys = (
        "spearman", "calibrated_spearman", "mean_relative_error", "calibrated_mean_relative_error",
        "in_sample_calibrated_mean_relative_error", "budget_spearman", "budget_mean_relative_error",
    )  # fmt: skip
    for budget, entry in result["by_budget"].items():
        for d, res in entry["by_dim"].items():
            ex = {k: round(res["exact"][k], 4) for k in keys[:4]} if "exact" in res else "-"
            print(budget, d, {k: round(res[k], 4) for k in keys}, "exact:", ex)
    for budget, entry in result["by_budget"].items():
        lin = entry["linearized_optimizer"]
        print(budget, "linearized", {k: round(lin[k], 4) for k in ("spearman", "mean_relative_error")})
    for d, fw in result["forward_check"].items():
        print("forward_check", d, {k: v for k, v in fw.items() if k != "estimates"})


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    limit_threads(args.threads)
    t_start = time.perf_counter()
    run = Run(args)
    run.meta_train()
    run.run_truth()
    by_budget: dict[str, Any] = {}
    forward: dict[str, Any] = {}
    estimate_seconds = 0.0
    for budget in run.budgets:
        by_budget[budget] = budget_entry(run, budget, forward)
        estimate_seconds += by_budget[budget].pop("_seconds")
    result = result_dict(run, by_budget, forward, estimate_seconds)
    result["total_seconds"] = time.perf_counter() - t_start
    write_results(args.output, result)
    print_summary(result)


if __name__ == "__main__":
    main()
