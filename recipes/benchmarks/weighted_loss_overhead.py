"""Training throughput of the selection collator and the weighted loss against plain TRL SFT.

Same tiny model, data, batch size and number of steps for each variant:

* ``plain``: ``SubsetSelectSFTTrainer`` with TRL's collator (the reference);
* ``weight``: ``WeightedLossSFTTrainer`` + ``SubsetSelectingDataCollator(mode="weight")`` (every example kept);
* ``filter``: ``SubsetSelectSFTTrainer`` + ``SubsetSelectingDataCollator(mode="filter")`` (half of the sources
  dropped, so batches are about half as large);
* ``sample``: ``WeightedLossSFTTrainer(sampling_selection=...)`` (weighted sampler, plain loss).

Reports seconds per optimizer step (median over the timed steps, after warm-up; median and best over
repeated, interleaved runs) and the ratios to ``plain``. On a shared machine trust the best-of-runs figures.

    python recipes/benchmarks/weighted_loss_overhead.py --output weighted_loss_overhead.json
    python recipes/benchmarks/weighted_loss_overhead.py --output /tmp/smoke.json --quick   # smoke run
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import write_results  # noqa: E402


def _run(variant: str, args: argparse.Namespace) -> float:
    import torch
    from transformers import TrainerCallback
    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_subset_select import (
        SubsetSelectingDataCollator,
        SubsetSelectSFTTrainer,
        WeightedLossSFTTrainer,
        tag_sources,
    )
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer, toy_text_dataset

    tasks = ["add", "sub", "rev", "copy"]
    train = tag_sources(
        {t: toy_text_dataset(t, args.examples_per_source, seed=i) for i, t in enumerate(tasks)}, target="add"
    )
    table = {"add": 1.0, "sub": 0.7, "rev": 0.0, "copy": 0.0}
    tok = make_tokenizer()
    torch.manual_seed(0)
    model = make_tiny_causal_lm("llama", hidden=args.hidden, layers=args.layers)
    times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            times.append(time.perf_counter() - self.t)

    config = SFTConfig(
        tempfile.mkdtemp(),
        report_to=[],
        use_cpu=True,
        bf16=False,
        activation_checkpointing=False,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=args.batch_size,
        save_strategy="no",
        disable_tqdm=True,
        logging_steps=10_000,
        max_length=64,
        seed=0,
    )
    base = DataCollatorForLanguageModeling(pad_token_id=tok.pad_token_id)
    kwargs = dict(model=model, args=config, train_dataset=train, processing_class=tok, callbacks=[Timer()])
    if variant == "plain":
        trainer = SubsetSelectSFTTrainer(data_collator=base, **kwargs)
    elif variant == "weight":
        trainer = WeightedLossSFTTrainer(
            data_collator=SubsetSelectingDataCollator(base, table, mode="weight"), **kwargs
        )
    elif variant == "filter":
        collator = SubsetSelectingDataCollator(base, table, mode="filter", on_empty="zero_weight", warn=False)
        trainer = WeightedLossSFTTrainer(data_collator=collator, **kwargs)
    elif variant == "sample":
        trainer = WeightedLossSFTTrainer(data_collator=base, sampling_selection=table, **kwargs)
    else:
        raise ValueError(variant)
    trainer.train()
    return statistics.median(times[args.warmup :])


def main() -> None:
    parser = benchmark_parser(
        __doc__,
        seed=False,
        threads=1,
        threads_help="torch intra-op threads (tiny model: 1 is best).",
        raw_description=True,
    )
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=16)
    parser.add_argument("--examples_per_source", type=int, default=256)
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="Runs per variant (median and best reported).")
    args = parser.parse_args()
    if args.quick:  # a smoke run: fewer steps and one run per variant
        args.steps, args.warmup, args.repeats = 10, 2, 1
    limit_threads(args.threads)

    variants = ("plain", "weight", "filter", "sample")
    runs: dict[str, list[float]] = {v: [] for v in variants}
    for _ in range(args.repeats):  # interleaved, so that load changes on a shared machine hit every variant
        for variant in variants:
            runs[variant].append(_run(variant, args))
    results: dict[str, dict[str, Any]] = {
        v: {
            "seconds_per_step": statistics.median(runs[v]),
            "best_seconds_per_step": min(runs[v]),
            "runs": runs[v],
        }
        for v in variants
    }
    ref, ref_best = results["plain"]["seconds_per_step"], results["plain"]["best_seconds_per_step"]
    for r in results.values():
        r["ratio_to_plain"] = r["seconds_per_step"] / ref
        r["best_ratio_to_plain"] = r["best_seconds_per_step"] / ref_best
    payload = {
        "benchmark": "weighted_loss_overhead",
        "settings": vars(args),
        "results": results,
    }
    write_results(args.output, payload, sort_keys=False)
    for variant, r in results.items():
        print(
            f"{variant:>7}: median {1000 * r['seconds_per_step']:.1f} ms/step ({r['ratio_to_plain']:.2f}x plain), "
            f"best {1000 * r['best_seconds_per_step']:.1f} ms/step ({r['best_ratio_to_plain']:.2f}x plain)"
        )


if __name__ == "__main__":
    main()
