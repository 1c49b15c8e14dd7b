"""Are the demo sources' ground-truth roles real? Single-source fine-tunes and the demo's final comparison.

At ``scale="full"`` of :func:`hf_subset_select.demo.tasks.make_demo_tasks`:

1. ``roles``: :func:`~hf_subset_select.demo.roles.measure_roles`: the target alone and target + one source,
   from the same stand-in base with the same budget, under ``--seeds`` seeds (data order); paired deltas of
   the target loss and token accuracy against the pooled seed-to-seed noise, and
   :func:`~hf_subset_select.demo.roles.check_roles`'s verdict.
2. ``roles_new_base`` (unless ``--quick``): the same with a different base model per seed (init and
   pretraining vary too), the noise of re-running everything with another seed.
3. ``final_from_base``: the fine-tunes the demo compares, from the base: target alone, target + all sources,
   target + the helpful ones, target + all but the harmful ones, target + a random subset of as many
   sources as there are helpful ones (a new draw per seed).
4. ``final_from_meta_init``: the same, starting from θ* = the base after multitask SFT on the target and
   all sources (the meta initialization the method linearizes around).

    python recipes/benchmarks/roles.py --output roles.json
    python recipes/benchmarks/roles.py --quick --output /tmp/roles_quick.json   # test scale, 2 seeds

Every figure is measured, nothing is assumed; ``seconds`` are wall-clock per fine-tune on this machine
(``load_average`` says how busy it was).
"""

from __future__ import annotations

import os
import random
import sys
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402
from harness.stats import summarize_runs  # noqa: E402

SUMMARY_KEYS = ("loss", "token_accuracy", "exact_match", "seconds", "steps", "num_examples")


def _final(tasks, seeds, start_model, log) -> dict:
    """The demo's comparison, each condition under every seed, all from ``start_model()``."""
    helpful = tasks.sources_with_role("helpful")
    harmful = set(tasks.sources_with_role("harmful"))
    conditions = {
        "target_alone": lambda seed: [],
        "target+all": lambda seed: tasks.sources,
        "target+helpful": lambda seed: helpful,
        "target+all_but_harmful": lambda seed: [s for s in tasks.sources if s not in harmful],
        "target+random": lambda seed: sorted(
            random.Random(f"random-subset-{seed}").sample(tasks.sources, len(helpful))
        ),
    }
    out = {}
    for name, pick in conditions.items():
        runs, subsets = [], []
        for seed in seeds:
            subset = list(pick(seed))
            result = tasks.finetune(start_model(), subset, seed=seed).to_dict()
            log(
                f"  {name:24s} seed {seed}: loss {result['loss']:.3f} acc {result['token_accuracy']:.3f} "
                f"em {result['exact_match']:.3f} ({result['seconds']:.1f}s) {subset if name == 'target+random' else ''}"
            )
            runs.append(result)
            subsets.append(subset)
        out[name] = {"sources": subsets, **summarize_runs(runs, SUMMARY_KEYS)}
    return out


def main(argv: list[str] | None = None) -> int:
    parser = benchmark_parser(
        __doc__,
        seeds=3,
        seeds_help="seeds per configuration (>= 2); --quick uses 2",
        seed=False,
        threads=1,
        threads_help="torch threads (1 is fastest for these tiny models)",
    )
    parser.add_argument("--kind", default="gpt2", choices=["gpt2", "llama"])
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the noise is the spread between seeds).")

    import datasets
    import transformers

    from hf_subset_select.demo.roles import check_roles, measure_roles
    from hf_subset_select.demo.tasks import make_demo_tasks

    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    limit_threads(args.threads)
    scale = "test" if args.quick else "full"
    seeds = list(range(2 if args.quick else args.seeds))

    def log(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    def progress(srcs, seed, r) -> None:
        log(
            f"  {'+'.join(srcs) or 'target alone':14s} seed {seed}: loss {r.loss:.3f} acc {r.token_accuracy:.3f} "
            f"({r.seconds:.1f}s)"
        )

    started = time.time()
    results: dict = {
        "benchmark": "roles",
        "machine": {"load_average_start": load_average()},
        "scale": scale,
        "kind": args.kind,
        "seeds": seeds,
    }
    tasks = make_demo_tasks(scale, seed=0)
    results["tasks"] = {
        "roles": tasks.roles,
        "descriptions": tasks.descriptions,
        "sizes": tasks.info["sizes"],
        "target_letters": tasks.info["target_letters"],
        "model": tasks.model_kwargs,
        "training": tasks.training,
        "pretrain": tasks.pretrain,
    }
    t0 = time.perf_counter()
    tasks.make_model(0, kind=args.kind)
    results["base_pretrain_seconds"] = time.perf_counter() - t0

    log("[1] single-source fine-tunes from one base")
    roles = measure_roles(tasks, seeds=seeds, kind=args.kind, progress=progress)
    roles["violations"] = check_roles(roles)
    results["roles"] = roles

    if not args.quick:
        log("[2] single-source fine-tunes, a new base model per seed")
        new_base = measure_roles(tasks, seeds=seeds, base_seed=None, kind=args.kind, progress=progress)
        new_base["violations"] = check_roles(new_base)
        results["roles_new_base"] = new_base

    log("[3] the demo's final fine-tunes, from the base")
    results["final_from_base"] = _final(tasks, seeds, lambda: tasks.make_model(0, kind=args.kind), log)

    log("[4] meta-initialization: multitask SFT on target + all sources, then the final fine-tunes from it")
    meta = tasks.make_model(0, kind=args.kind)
    meta_result = tasks.finetune(meta, tasks.sources, seed=0)
    results["meta_init"] = meta_result.to_dict()
    import copy

    results["final_from_meta_init"] = _final(tasks, seeds, lambda: copy.deepcopy(meta), log)

    results["machine"]["load_average_end"] = load_average()
    results["total_seconds"] = time.time() - started
    write_results(args.output, results, sort_keys=False)

    # A short readable summary.
    r = results["roles"]
    log(f"noise (pooled sd of the target loss): {r['noise']['loss_pooled_sd']:.3f}")
    for name, info in r["sources"].items():
        log(
            f"  {name:13s} {info['role']:10s} Δloss {info['mean_delta_loss']:+.3f}  "
            f"Δacc {info['mean_delta_token_accuracy']:+.3f}"
        )
    log(f"violations: {r['violations'] or 'none'}")
    for key in ("final_from_base", "final_from_meta_init"):
        log(key)
        for name, info in results[key].items():
            log(
                f"  {name:24s} loss {info['loss']['mean']:.3f}±{info['loss']['sd']:.3f}  "
                f"acc {info['token_accuracy']['mean']:.3f}  em {info['exact_match']['mean']:.3f}  "
                f"{info['seconds']['mean']:.1f}s"
            )
    log(f"wrote {args.output} in {results['total_seconds']:.0f}s")
    return 0 if not r["violations"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
