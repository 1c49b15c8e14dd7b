"""Many targets, one training cache: the cost of a new target, its scores, and the coverage of the intervals.

* cost: a tiny LoRA GPT-2 from a config (θ*), a pool of 4 sources and a new target 1/40 and 1/80 of the pool's size
  (the headline figures are the 1/80 run; a new target has fixed costs, fsyncs and the self-check, that a
  tiny model's cheap rows do not hide at 1/40). A new
  target collected against the existing training cache (``GradientCollector(target_dataset=..., train_cache=...)``:
  only its rows) is timed against a full recollection of the pool with the new target, the same pool on the same
  machine in the same run (``--repeats`` each, alternating; medians compared).
* scores: the selection for the new target from the training cache + the target-only cache against the selection
  from the full recollection (same subsets, same λ): kept sources identical, scores equal to float tolerance, and the
  target rows' features compared.
* coverage: on a synthetic cache with a known answer (every one of the 2^5 subsets estimated on 4000 target rows: the
  population), each trial samples the subsets and the target rows, computes the nominal 95% intervals
  (hf_subset_select.estimate.uncertainty) and checks them against the population values; the plain percentile
  bootstrap is measured beside the studentized one the library uses.

The machine is shared and noisy: the JSON records cpu_count, threads and the load average at the start.

Usage: python recipes/benchmarks/many_targets.py --output docs/results/many_targets.json [--quick]
"""

from __future__ import annotations

import itertools
import os
import statistics
import sys
import tempfile
import time
from typing import Any

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402

K = 5  # candidate sources of the coverage check


# --------------------------------------------------------------------------- cost and scores
def _pool(rows_per_source: int, seed: int) -> Any:
    from hf_subset_select import tag_sources
    from hf_subset_select.demo.toy import toy_text_dataset

    tasks = {"add": "add", "sub": "sub", "rev": "rev", "add_more": "add"}
    return tag_sources(
        {
            name: toy_text_dataset(task, rows_per_source, seed=seed + i)
            for i, (name, task) in enumerate(tasks.items())
        },
        target="add",
    )


def cost_and_scores(rows_per_source: int, target_rows: int, repeats: int, seed: int) -> dict[str, Any]:
    from hf_subset_select import (
        CollectConfig,
        FirstOrderEstimator,
        GradientCache,
        GradientCollector,
        SelectConfig,
        select_sources,
        tag_target_eval,
    )
    from hf_subset_select.demo.toy import (
        add_lora,
        make_tiny_causal_lm,
        make_tokenizer,
        perturb_lora,
        toy_text_dataset,
    )

    model = perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=seed)), seed=seed + 1)
    tok = make_tokenizer()
    pool = _pool(rows_per_source, seed + 10)
    first = tag_target_eval(toy_text_dataset("add", target_rows, seed=seed + 90), name="add_eval")
    new = tag_target_eval(toy_text_dataset("sub", target_rows, seed=seed + 91), name="sub_eval")
    config = CollectConfig(proj_dim=256, proj_type="rademacher", batch_size=16, shard_size=256)
    with tempfile.TemporaryDirectory() as tmp:
        GradientCollector(config, pool, first, tok).collect(
            model, output_dir=os.path.join(tmp, "train"), disable_tqdm=True
        )
        new_s, full_s = [], []
        for r in range(repeats):  # alternate, so that a change of the machine's load hits both
            t0 = time.perf_counter()
            GradientCollector(
                target_dataset=new, tokenizer=tok, train_cache=os.path.join(tmp, "train")
            ).collect(model, output_dir=os.path.join(tmp, f"new{r}"), disable_tqdm=True)
            new_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            GradientCollector(config, pool, new, tok).collect(
                model, output_dir=os.path.join(tmp, f"full{r}"), disable_tqdm=True
            )
            full_s.append(time.perf_counter() - t0)
        train = GradientCache.load(os.path.join(tmp, "train"))
        target = GradientCache.load(os.path.join(tmp, "new0"))
        full = GradientCache.load(os.path.join(tmp, "full0"))
        rows = full.target_mask
        feature_diff = float((full.features[rows] - target.features).abs().max())
        output_diff = float((full.outputs[rows] - target.outputs).abs().max())
        train_rows_equal = bool(torch.equal(full.features[full.train_mask], train.features[train.train_mask]))
        comparisons = {}
        for method in ("random_ensemble", "linear", "forward"):
            sel_config = SelectConfig(method=method, num_subsets=500, interval_level=0.95)
            a = select_sources(FirstOrderEstimator(train, target=target), config=sel_config)
            b = select_sources(FirstOrderEstimator(full), config=sel_config)
            diff = max(abs(a.scores[s] - b.scores[s]) for s in a.sources)
            rel = max(abs(a.scores[s] - b.scores[s]) / max(abs(b.scores[s]), 1e-12) for s in a.sources)
            comparisons[method] = {
                "selected_target_only": a.selected,
                "selected_full_recollection": b.selected,
                "selected_equal": a.selected == b.selected,
                "max_abs_score_difference": diff,
                "max_rel_score_difference": rel,
            }
    new_med, full_med = statistics.median(new_s), statistics.median(full_s)
    pool_rows = 4 * rows_per_source
    return {
        "new_target_seconds": new_med,
        "full_recollect_seconds": full_med,
        "speedup": full_med / new_med,
        "new_target_seconds_all": new_s,
        "full_recollect_seconds_all": full_s,
        "scores_equal": all(
            c["selected_equal"] and c["max_rel_score_difference"] <= 1e-6 for c in comparisons.values()
        ),
        "score_comparison": comparisons,
        "target_features_max_abs_difference": feature_diff,
        "target_outputs_max_abs_difference": output_diff,
        "train_rows_bitwise_equal": train_rows_equal,
        "settings_cost": {
            "model": "tiny GPT-2 from a config (hidden 32, 2 layers) with LoRA, θ* perturbed",
            "pool_rows": pool_rows,
            "target_rows": target_rows,
            "pool_to_target_ratio": pool_rows / target_rows,
            "collect_config": config.result_dict(),
            "repeats": repeats,
            "timed": "GradientCollector(...).collect() wall clock, the target-only one including loading the "
            "training cache; medians",
        },
    }


# --------------------------------------------------------------------------- coverage
def _population(seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    from hf_subset_select import FirstOrderEstimator
    from hf_subset_select.demo.synthetic import make_synthetic_cache

    cache = make_synthetic_cache(2, 2, 1, dim=16, examples_per_source=64, target_examples=4000, seed=seed)
    allm = torch.tensor(list(itertools.product([0, 1], repeat=K)), dtype=torch.float64)
    return allm, FirstOrderEstimator(cache).estimate(allm, details=True).per_example.to(torch.float64)


def _truth(allm: torch.Tensor, rows: torch.Tensor, statistic: str) -> torch.Tensor:
    loss = rows.mean(1)
    if statistic == "linear":
        x = torch.cat([torch.ones(allm.shape[0], 1, dtype=torch.float64), allm], 1)
        return torch.linalg.lstsq(x, loss[:, None]).solution[1:, 0]
    with_mean = allm.T @ loss / allm.sum(0)
    return with_mean if statistic == "score" else with_mean - (1 - allm).T @ loss / (1 - allm).sum(0)


def coverage(trials: int, settings: list[tuple[int, int]], samples: int, seed: int) -> dict[str, Any]:
    from hf_subset_select.estimate.uncertainty import (
        bootstrap_counts,
        effect_intervals,
        percentile_interval,
        subset_intervals,
    )

    allm, rows = _population(seed)
    out: dict[str, Any] = {}
    for num_subsets, num_rows in settings:
        key = f"subsets{num_subsets}_rows{num_rows}"
        res: dict[str, Any] = {}
        for statistic in ("effect", "score", "linear"):
            truth = _truth(allm, rows, statistic)
            hit = total = 0
            for trial in range(trials):
                gen = torch.Generator().manual_seed(10_000 * seed + trial)
                m = (torch.rand(num_subsets, K, generator=gen) < 0.5).to(torch.float64)
                index = (m * 2 ** torch.arange(K - 1, -1, -1, dtype=torch.float64)).sum(1).long()
                sample = rows[index][:, torch.randint(0, rows.shape[1], (num_rows,), generator=gen)]
                iv = effect_intervals(m, sample, statistic=statistic, samples=samples, seed=trial)
                hit += int(((iv.lower <= truth) & (truth <= iv.upper)).sum())
                total += K
            res[statistic] = {"coverage": hit / total, "intervals": total}
        truth = rows.mean(1)
        hit = naive_hit = total = 0
        for trial in range(trials):
            gen = torch.Generator().manual_seed(20_000 * seed + trial)
            sample = rows[:, torch.randint(0, rows.shape[1], (num_rows,), generator=gen)]
            iv = subset_intervals(sample, samples=samples, seed=trial)
            w = bootstrap_counts(num_rows, samples, torch.Generator().manual_seed(trial)) / num_rows
            naive = percentile_interval(sample.mean(1), w @ sample.T, 0.95)
            hit += int(((iv.lower <= truth) & (truth <= iv.upper)).sum())
            naive_hit += int(((naive.lower <= truth) & (truth <= naive.upper)).sum())
            total += truth.numel()
        res["subset_estimate"] = {"coverage": hit / total, "intervals": total}
        res["subset_estimate_naive_percentile"] = {"coverage": naive_hit / total, "intervals": total}
        out[key] = res
    return out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = benchmark_parser(__doc__, threads=1)
    parser.add_argument("--trials", type=int, default=400, help="coverage trials per setting (>= 200)")
    parser.add_argument("--repeats", type=int, default=3, help="timed collections of each kind")
    args = parser.parse_args(argv)
    limit_threads(args.threads)
    start_load = load_average()
    quick = args.quick
    sizes = [40] if quick else [200, 400]  # rows per source: pools 40x and 80x the target's 20 rows
    by_pool = [
        cost_and_scores(
            rows_per_source=n,
            target_rows=4 if quick else 20,
            repeats=1 if quick else args.repeats,
            seed=args.seed,
        )
        for n in sizes
    ]
    cost = dict(by_pool[-1])
    cost["by_pool_size"] = [
        {k: c[k] for k in ("new_target_seconds", "full_recollect_seconds", "speedup", "scores_equal")}
        | {"pool_to_target_ratio": c["settings_cost"]["pool_to_target_ratio"]}
        for c in by_pool
    ]
    trials = 20 if quick else args.trials
    settings = [(64, 50), (32, 20), (2000, 100)] if not quick else [(32, 20)]
    cov = coverage(trials, settings, samples=200 if quick else 1000, seed=args.seed + 3)
    main_key = f"subsets{settings[0][0]}_rows{settings[0][1]}"
    library = [
        v["coverage"] for res in cov.values() for k, v in res.items() if not k.endswith("naive_percentile")
    ]
    result = {
        **cost,
        "ci_coverage": cov[main_key]["effect"]["coverage"],
        "ci_trials": trials,
        "ci_coverage_min_over_settings_and_statistics": min(library),
        "ci_coverage_max_over_settings_and_statistics": max(library),
        "ci_coverage_detail": cov,
        "settings": {
            "ci_level": 0.95,
            "ci_main_setting": main_key,
            "ci_population": "synthetic cache (2 aligned, 2 opposed, 1 orthogonal source + the target's own), all "
            "32 subsets estimated on 4000 target rows; truth = the statistic under the subset distribution "
            "(each source in with probability 1/2) on those rows",
            "ci_method": "two-way bootstrap over the sampled subsets and the target rows, percentile-t (linear: "
            "percentile)",
            "ci_projection_seeds": "not part of this check (one projection)",
            "load_average_at_start": start_load,
            "cpu_count": os.cpu_count(),
            "threads": args.threads,
            "quick": quick,
        },
        "bars": {
            "speedup_at_least_20x": cost["speedup"] >= 20,
            "scores_equal": cost["scores_equal"],
            "ci_coverage_in_0.90_0.99": 0.90 <= cov[main_key]["effect"]["coverage"] <= 0.99,
            "every_ci_coverage_in_0.90_0.99": all(0.90 <= c <= 0.99 for c in library),
            "ci_trials_at_least_200": trials >= 200,
        },
    }
    write_results(args.output, result)
    print(
        {
            k: result[k]
            for k in (
                "new_target_seconds",
                "full_recollect_seconds",
                "speedup",
                "scores_equal",
                "ci_coverage",
                "ci_trials",
            )
        }
    )
    print(result["bars"])
    return result


if __name__ == "__main__":
    main()
