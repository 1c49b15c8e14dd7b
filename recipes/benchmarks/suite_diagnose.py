"""Why does the budget-λ estimate fail on a suite task? Separates the error of the first-order estimate into its parts.

For one suite task (default ``lexcat_gemma``) this meta-trains θ* once and collects two caches from the same run,
raw gradients (the default) and Adam geometry (``CollectConfig(precondition="auto")``), both on ``train`` + ``dev``.
It then fine-tunes a set of subsets from θ* for real (the suite's fidelity subsets, target only, every source alone
and all sources) and records, per subset, on ``dev``:

* ``real``: the fine-tuned model's loss (the truth);
* ``linear_at_real_step``: mean_j ℓ(f_j + ∇f_jᵀΔθ) at the real step Δθ, with ∇f_jᵀΔθ from a central finite
  difference of the model's outputs — how much of the error is the linearization itself;
* ``projected_linear_at_real_step``: the same with g_jᵀ Pᵀ Δθ from the raw cache (the JL projection's share);
* for each cache and each λ rule (budget λ; a λ grid): the estimate, the fitted step lifted to parameters (its cosine
  with Δθ and its norm over ‖Δθ‖), and the forward check (the real loss at θ* + that step).

``test`` is never read. The figures answer: is the first-order model of the loss right at the real step (then the
step is what is wrong), does any λ recover the ranking of the real losses, and does the Adam geometry point the step
where AdamW really goes.

    python recipes/benchmarks/suite_diagnose.py --output docs/results/suite_diagnose_lexcat_gemma.json
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import write_results  # noqa: E402
from harness.stats import spearman  # noqa: E402
from harness.tasks import random_subsets  # noqa: E402
from harness.training import meta_train, meta_training_arguments, restore  # noqa: E402
from suite_runs import Finetuner, FinetuneSpec  # noqa: E402

L2_FACTORS = [10 ** (k / 2) for k in range(-4, 9)]  # λ grid: budget λ times 10^-2 ... 10^4


def parse_args(argv: list[str] | None = None) -> Any:
    parser = benchmark_parser(__doc__, threads=2)
    parser.add_argument("--task", default="lexcat_gemma")
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--gemma-path", default=None)
    parser.add_argument("--fidelity-subsets", type=int, default=8)
    parser.add_argument("--fd-eps", type=float, default=0.05, help="relative step of the finite difference")
    parser.add_argument("--work-dir", default=None, help="where the caches go (default: a new temp dir)")
    parser.add_argument(
        "--summarize",
        default=None,
        metavar="JSON",
        help="run nothing: add the summary figures (``summary``) to a finished run's results and write --output",
    )
    return parser.parse_args(argv)


def collect_both(
    task: Any, data: Any, settings: dict[str, Any], seed: int, work: str
) -> tuple[Any, dict, float]:
    """θ* and two caches (``none``: raw gradients, ``auto``: Adam geometry) from one meta-training run."""
    from datasets import Dataset
    from suite import meta_lr

    from hf_subset_select import CollectConfig, GradientCollector

    collectors = {
        kind: GradientCollector(
            CollectConfig(
                max_length=settings["max_length"],
                precondition=kind,
                output_dir=os.path.join(work, f"grad_cache_{kind}"),
            ),
            train_dataset=data.train,
            target_dataset=data.dev,
            tokenizer=task.tokenizer,
        )
        for kind in ("none", "auto")
    }
    targs = meta_training_arguments(
        work,
        epochs=settings["meta_epochs"],
        batch_size=settings["batch_size"],
        lr=meta_lr(settings),
        seed=seed,
        logging_steps=50,
    )
    trained_on = Dataset.from_list(task.rows(data.train))
    model, seconds = meta_train(
        task.make_model(seed),
        targs,
        data.train,
        task.collate,
        list(collectors.values()),
        train_dataset=trained_on,
    )
    return model, {k: c.cache for k, c in collectors.items()}, seconds


def outputs_at(task: Any, model: Any, rows: list[dict[str, Any]]) -> torch.Tensor:
    """The collector's outputs f_j of ``rows`` at the model's current parameters."""
    return task.score(model, rows)["f"]


def directional(
    task: Any, model: Any, params: dict, theta: dict, delta: dict, rows: list, eps: float
) -> torch.Tensor:
    """∇f_jᵀ Δθ for every row by a central difference with step ``eps`` · Δθ (parameters restored to ``theta``)."""
    shifted = []
    for sign in (1.0, -1.0):
        restore(params, {n: theta[n] + sign * eps * delta[n] for n in params})
        shifted.append(outputs_at(task, model, rows))
    restore(params, theta)
    return (shifted[0] - shifted[1]) / (2 * eps)


def lifted_step(est: Any, cache: Any, names_shapes: list, subsets: list) -> list[dict[str, torch.Tensor]]:
    """The estimator's fitted steps of ``subsets`` in parameter space (scaled back in Adam geometry)."""
    from hf_subset_select.collect.projection import make_projector

    proj = cache.manifest["projection"]
    projector = make_projector(
        proj["kind"], int(proj["dim"]), int(proj["seed"]), names_shapes, nnz=int(proj.get("nnz") or 4)
    )
    scale = cache.preconditioner
    out = []
    for w in est.fitted_steps([list(s) for s in subsets]):
        d = projector.lift(w.to(torch.float32))
        if scale is not None:
            d = {n: v * scale[n] for n, v in d.items()}
        out.append(d)
    return out


def flat(d: dict[str, torch.Tensor], names: list[str]) -> torch.Tensor:
    return torch.cat([d[n].reshape(-1).double() for n in names])


def median(values: list[float]) -> float:
    """The middle value (the upper one of the two middle values for an even count)."""
    return sorted(values)[len(values) // 2]


def summarize(result: dict[str, Any]) -> dict[str, Any]:
    """Figures that locate the error, from a finished run: how often the real fine-tune ends above θ*'s dev loss
    (overfitting, which no first-order estimate predicts), whether the estimate ranks the real dev losses of the
    single sources (what it estimates) and whether those losses rank the metric (what the user scores), per cache."""
    rows = result["subsets"]
    base = result["base_dev_loss"]
    real = [e["real"] for e in rows]
    metric = [e["real_exact_match"] for e in rows]
    singles = [k for k, e in enumerate(rows) if len(e["subset"]) <= 1]
    out: dict[str, Any] = {
        "fraction_real_above_base": sum(r > base for r in real) / len(real),
        "spearman_real_loss_vs_metric": spearman([-r for r in real], metric),
        "single_source_spearman_real_loss_vs_metric": spearman(
            [-real[k] for k in singles], [metric[k] for k in singles]
        ),
        "geometry": {},
    }
    for kind, g in result["geometry"].items():
        est = g["budget_estimates"]
        out["geometry"][kind] = {
            "spearman_estimate_vs_real_loss": spearman(est, real),
            "spearman_estimate_vs_metric": spearman([-e for e in est], metric),
            "single_source_spearman_estimate_vs_real_loss": spearman(
                [est[k] for k in singles], [real[k] for k in singles]
            ),
            "single_source_spearman_estimate_vs_metric": spearman(
                [-est[k] for k in singles], [metric[k] for k in singles]
            ),
            "median_output_change_correlation": median(g["output_change_correlation_with_real"]),
            "median_mean_output_change_ratio": median(
                [r for r in g["mean_output_change_ratio_to_real"] if r is not None]
            ),
        }
    return out


GEOMETRY_INPUTS = (
    "spec",
    "subsets",
    "truth",
    "rows",
    "dev_rows",
    "theta",
    "names",
    "names_shapes",
    "deltas",
    "tuner",
    "data",
    "task",
)


def diagnose_geometry(cache: Any, ctx: dict[str, Any]) -> dict[str, Any]:
    """Budget estimates, a λ sweep, the lifted steps against the real ones and the forward check for one cache."""
    from hf_subset_select import EstimatorConfig, FirstOrderEstimator
    from hf_subset_select.estimate.validation import forward_check

    spec, subsets, truth, rows, dev_rows, theta = (
        ctx[k] for k in ("spec", "subsets", "truth", "rows", "dev_rows", "theta")
    )
    names, names_shapes, deltas, tuner, data, task = (
        ctx[k] for k in ("names", "names_shapes", "deltas", "tuner", "data", "task")
    )
    est = FirstOrderEstimator(cache, EstimatorConfig())
    lam = est.budget_l2(spec.lr, spec.steps, "adamw", spec.batch_size)
    sweep = []
    for factor in L2_FACTORS:
        est.l2, est.step_scale = lam * factor, 1.0
        e = est.estimate([list(s) for s in subsets]).tolist()
        sweep.append(
            {"l2_factor": factor, "l2": lam * factor, "spearman": spearman(e, truth), "estimates": e}
        )
    est.l2, est.step_scale = lam, 1.0
    estimates = est.estimate([list(s) for s in subsets]).tolist()
    steps = lifted_step(est, cache, names_shapes, subsets)
    # predicted output change of every dev row (g_jᵀ ŵ_S, rows in the order of ``dev_rows``) against the real one
    where = {int(cache.example_ids[k]): k for k in torch.nonzero(cache.target_mask).reshape(-1).tolist()}
    feats = cache.features[torch.tensor([where[int(r["example_id"])] for r in dev_rows])].double()
    predicted_dz = [(feats @ w.double()).tolist() for w in est.fitted_steps([list(s) for s in subsets])]
    dz_corr, dz_ratio = [], []
    for e, p in zip(rows, predicted_dz):
        a, b = torch.tensor(p), torch.tensor(e["real_output_change"])
        dz_corr.append(float(torch.corrcoef(torch.stack([a, b]))[0, 1]))
        dz_ratio.append(float(a.mean() / b.mean()) if abs(float(b.mean())) > 1e-12 else None)
    cos, ratio = [], []
    for s, step in zip(subsets, steps):
        a, b = flat(step, names), flat(deltas[s], names)
        cos.append(float(a @ b / (a.norm() * b.norm() + 1e-30)))
        ratio.append(float(a.norm() / (b.norm() + 1e-30)))
    fw = forward_check(est, tuner.model, [list(s) for s in subsets], data.dev, tokenizer=task.tokenizer)
    restore(tuner.params, theta)
    return {
        "budget_l2": lam,
        "budget_estimates": estimates,
        "budget_spearman": spearman(estimates, truth),
        "forward_check": fw.tolist(),
        "forward_check_spearman": spearman(fw.tolist(), truth),
        "step_cosine_with_real": cos,
        "predicted_output_change": predicted_dz,
        "output_change_correlation_with_real": dz_corr,
        "mean_output_change_ratio_to_real": dz_ratio,
        "step_norm_ratio_to_real": ratio,
        "l2_sweep": sweep,
        "best_sweep_spearman": max(x["spearman"] for x in sweep),
    }


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.summarize:
        import json

        with open(args.summarize) as f:
            result = json.load(f)
        result["summary"] = summarize(result)
        write_results(args.output, result)
        print(result["summary"])
        return
    limit_threads(args.threads, blas=True)
    from suite import make_task

    from hf_subset_select.collect.projection import make_projector

    t_start = time.perf_counter()
    task, settings = make_task(args.task, args)
    data = task.build(args.seed)
    work = args.work_dir or tempfile.mkdtemp(prefix=f"diagnose-{args.task}-")
    os.makedirs(work, exist_ok=True)
    model, caches, meta_seconds = collect_both(task, data, settings, args.seed, work)
    print(f"meta-training and two collections: {meta_seconds:.0f} s", flush=True)
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    names = list(params)
    names_shapes = [(n, tuple(p.shape)) for n, p in params.items()]
    theta = {n: p.detach().clone() for n, p in params.items()}
    dev_rows = task.rows(data.dev)
    f0 = outputs_at(task, model, dev_rows)
    base = float(F.softplus(-f0).mean())

    spec = FinetuneSpec(settings["steps"], settings["lr"], settings["batch_size"])
    tuner = Finetuner(task, data, theta, spec)
    candidates = data.candidates
    subsets = list(random_subsets(candidates, args.fidelity_subsets, f"suite-fidelity-{len(candidates)}"))
    for extra in [(), *[(c,) for c in candidates], tuple(candidates)]:
        if extra not in subsets:
            subsets.append(extra)

    raw = caches["none"]
    proj = raw.manifest["projection"]
    raw_projector = make_projector(
        proj["kind"], int(proj["dim"]), int(proj["seed"]), names_shapes, nnz=int(proj.get("nnz") or 4)
    )
    # the raw cache's dev rows in the order of ``dev_rows`` (matched by example id), checked against f at θ*
    position = {int(raw.example_ids[k]): k for k in torch.nonzero(raw.target_mask).reshape(-1).tolist()}
    order = torch.tensor([position[int(r["example_id"])] for r in dev_rows])
    g_dev = raw.features[order].double()
    cached_f_max_diff = float((raw.outputs[order].double() - f0).abs().max())
    print(f"cached dev outputs vs recomputed: max |diff| {cached_f_max_diff:.2e}", flush=True)

    rows: list[dict[str, Any]] = []
    deltas: dict[tuple, dict[str, torch.Tensor]] = {}
    for subset in subsets:
        r = tuner.run(subset, 0, split="dev")
        delta = {n: tuner.params[n].detach().clone() - theta[n] for n in names}
        restore(tuner.params, theta)
        deltas[subset] = delta
        dfd = directional(task, tuner.model, tuner.params, theta, delta, dev_rows, args.fd_eps)
        entry = {
            "subset": list(subset),
            "real": r["loss"],
            "real_exact_match": r["metric"],
            "step_norm": float(flat(delta, names).norm()),
            "linear_at_real_step": float(F.softplus(-(f0 + dfd)).mean()),
            "real_step_mean_output_change": float(dfd.mean()),
            "real_output_change": dfd.tolist(),
        }
        w_real = raw_projector.project({n: delta[n].unsqueeze(0) for n in names}).double().reshape(-1)
        entry["projected_linear_at_real_step"] = float(F.softplus(-(f0 + g_dev @ w_real)).mean())
        rows.append(entry)
        print(f"  {subset}: real {r['loss']:.4f}  linear@real {entry['linear_at_real_step']:.4f}", flush=True)

    truth = [e["real"] for e in rows]
    geometry: dict[str, Any] = {}
    scope = locals()  # what diagnose_geometry reads, by name
    ctx = {k: scope[k] for k in GEOMETRY_INPUTS}
    for kind, cache in caches.items():
        geometry[kind] = diagnose_geometry(cache, ctx)
        cos, ratio = geometry[kind]["step_cosine_with_real"], geometry[kind]["step_norm_ratio_to_real"]
        print(
            f"{kind}: budget spearman {geometry[kind]['budget_spearman']:.3f}, forward check "
            f"{geometry[kind]['forward_check_spearman']:.3f}, best over λ {geometry[kind]['best_sweep_spearman']:.3f}, "
            f"median cosine {sorted(cos)[len(cos) // 2]:.3f}, median norm ratio {sorted(ratio)[len(ratio) // 2]:.2f}",
            flush=True,
        )
    from safetensors.torch import save_file

    save_file(
        {f"{k}/{n}": deltas[s][n].contiguous() for k, s in enumerate(subsets) for n in names},
        os.path.join(work, "real_steps.safetensors"),
        metadata={"subsets": repr([list(s) for s in subsets])},
    )
    lin = [e["linear_at_real_step"] for e in rows]
    result = {
        "benchmark": "suite_diagnose",
        "task": args.task,
        "settings": {**settings, "fd_eps": args.fd_eps, "seed": args.seed},
        "base_dev_loss": base,
        "cached_dev_outputs_max_abs_diff": cached_f_max_diff,
        "subsets": rows,
        "linear_at_real_step_spearman": spearman(lin, truth),
        "linear_at_real_step_mean_relative_error": sum(abs(a - b) / b for a, b in zip(lin, truth))
        / len(truth),
        "no_change_mean_relative_error": sum(abs(base - b) / b for b in truth) / len(truth),
        "geometry": geometry,
        "cache_dirs": {k: os.path.join(work, f"grad_cache_{k}") for k in caches},
        "seconds": {"meta_train_and_collect": meta_seconds, "total": time.perf_counter() - t_start},
    }
    result["summary"] = summarize(result)
    write_results(args.output, result)
    print(result["summary"])


if __name__ == "__main__":
    main()
