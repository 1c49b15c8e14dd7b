"""Step 3: fine-tune on the target task plus the selected sources, with TRL's SFTTrainer, from θ* (``--meta_init``,
recommended) or from the base model.

The selection (``selection.json`` from ``recipes/select.py``) is applied in one of four ways (``--apply``):

* ``dataset`` (default): ``selection.apply(train)`` drops unselected sources before training;
* ``filter``: ``SubsetSelectingDataCollator(mode="filter")`` drops them batch by batch;
* ``weight``: every example is kept and its loss is scaled by its source's weight
  (``SubsetSelectingDataCollator(mode="weight")`` + ``WeightedLossSFTTrainer``);
* ``sample``: examples are drawn with probability proportional to their source's weight.

Without ``--selection`` it trains on all sources (the baseline). At the end it reports the target metric
(greedy-answer exact match, computed by the ``evaluate`` module shipped in the package, loaded by local path)
and the target evaluation loss, and writes them to ``<output_dir>/target_metrics.json``.

Examples::

    python recipes/sft_target.py --config recipes/configs/sft_target.yaml --selection out/selection.json \\
        --meta_init out/meta_init_run/meta_init
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sft_target.py \\
        --config recipes/configs/sft_target.yaml --selection out/selection.json --apply weight
"""

from __future__ import annotations

import os
import sys

# Python puts this folder first on sys.path, where recipes/select.py would shadow the standard library's
# `select` module (used by subprocess): move the folder to the end, where it still finds recipe_utils.
_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE] + [_HERE]

from dataclasses import dataclass, field  # noqa: E402
from typing import Any  # noqa: E402

from recipe_utils import (  # noqa: E402
    DataArguments,
    ToyModelArguments,
    base_collator,
    load_sources,
    load_tokenizer_and_model,
    parse,
    target_answer_accuracy,
    target_eval_name,
    write_json,
)


@dataclass
class TargetArguments:
    """How the selection is used in the target fine-tune."""

    selection: str | None = field(
        default=None,
        metadata={
            "help": "selection.json written by recipes/select.py. None: train on all sources (baseline)."
        },
    )
    apply: str = field(
        default="dataset",
        metadata={"help": "'dataset' (selection.apply), 'filter' / 'weight' (the collator) or 'sample'."},
    )
    source_weighting: str = field(
        default="per_example",
        metadata={
            "help": "For 'weight'/'sample': 'per_example' (each example of source k weighs w_k) or 'mixture' "
            "(w_k is source k's share)."
        },
    )
    meta_init: str | None = field(
        default=None,
        metadata={
            "help": "Start from θ* (the meta_init/ folder written by sft_meta_init.py) instead of the base model "
            "with a fresh adapter. Recommended: the estimates that made the selection stand for a fine-tune "
            "from θ*, and on the benchmark suite this start scored higher on three of four tasks."
        },
    )
    metrics_file: str | None = field(
        default=None,
        metadata={"help": "Where to write the metrics (default <output_dir>/target_metrics.json)."},
    )

    def __post_init__(self) -> None:
        if self.apply not in ("dataset", "filter", "weight", "sample"):
            raise ValueError(f"--apply {self.apply!r}: choose dataset, filter, weight or sample.")
        if self.source_weighting not in ("per_example", "mixture"):
            raise ValueError(f"--source_weighting {self.source_weighting!r}: choose per_example or mixture.")


def _selection(path: str | None) -> Any:
    if path is None:
        return None
    from hf_subset_select import SourceSelection

    return SourceSelection.load(path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from accelerate.logging import get_logger
    from trl import ModelConfig, SFTConfig

    from hf_subset_select import SubsetSelectingDataCollator, WeightedLossSFTTrainer
    from hf_subset_select.data.sources import source_counts

    if argv is not None:
        sys.argv[1:] = argv
    target_args, data_args, model_args, toy_args, sft_args = parse(
        [TargetArguments, DataArguments, ModelConfig, ToyModelArguments, SFTConfig], __doc__
    )
    logger = get_logger("sft_target")
    train, target_eval, target = load_sources(data_args)
    selection = _selection(target_args.selection)
    if selection is not None:
        selection.sampling_weights(train)  # refuses a training mix with sources the selection did not score
    if selection is not None and target_args.apply == "dataset":
        train = selection.apply(train)
    tokenizer, model = load_tokenizer_and_model(model_args, toy_args, meta_init=target_args.meta_init)

    collator = base_collator(tokenizer)
    sampling = None
    if selection is not None and target_args.apply in ("filter", "weight"):
        collator = SubsetSelectingDataCollator(
            collator,
            selection,
            mode=target_args.apply,
            always_keep=[target, target_eval_name(target)],
            source_weighting=target_args.source_weighting,
            source_counts=source_counts(train),
            # a batch drawn only from dropped sources passes with weight 0 (an exact no-op for the loss) instead
            # of stopping the run; WeightedLossSFTTrainer understands the weights
            on_empty="zero_weight",
            warn=False,  # the user picked batch-level filtering explicitly
        )
    elif selection is not None and target_args.apply == "sample":
        sampling = selection
    trainer = WeightedLossSFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train,
        eval_dataset=target_eval,
        processing_class=tokenizer,
        data_collator=collator,
        sampling_selection=sampling,
        sampling_source_weighting=target_args.source_weighting,
    )
    logger.info(
        f"Target fine-tune on {source_counts(train)} (apply={target_args.apply})", main_process_only=True
    )
    trainer.train()
    metrics: dict[str, Any] = {
        "target_source": target,
        "selection": target_args.selection,
        "apply": target_args.apply if selection is not None else "all_sources",
        "start": target_args.meta_init or "base_model",
        "train_sources": source_counts(train),
        "global_step": trainer.state.global_step,
    }
    metrics.update(trainer.evaluate(metric_key_prefix="target"))
    metrics.update(target_answer_accuracy(trainer.model, tokenizer, trainer.eval_dataset))
    if trainer.is_world_process_zero():
        path = target_args.metrics_file or os.path.join(sft_args.output_dir, "target_metrics.json")
        write_json(path, metrics)
        print(f"target metrics ({path}): " + ", ".join(f"{k}={v}" for k, v in metrics.items()))
    return metrics


if __name__ == "__main__":
    main()
