"""Step 1: multitask SFT on all sources (meta-initialization θ*), then the gradient cache at θ*.

A TRL ``SFTTrainer`` (``SubsetSelectSFTTrainer``, which keeps the ``source`` / ``example_id`` columns) trains on
the target's training split and every auxiliary source together. Two callbacks do the rest at the end of
training: :class:`~hf_subset_select.MetaInitCallback` saves θ* (adapter or weights + manifest) to
``<output_dir>/meta_init`` and :class:`~hf_subset_select.GradientCollector` records every training and target
evaluation example's output and projected gradient at θ* into ``collect_output_dir`` (fields ``collect_*`` =
:class:`~hf_subset_select.CollectConfig`). Under DDP the collection is sharded over the processes.

Examples::

    python recipes/sft_meta_init.py --config recipes/configs/sft_meta_init.yaml
    accelerate launch --config_file recipes/accelerate/multi_gpu.yaml recipes/sft_meta_init.py \\
        --config recipes/configs/sft_meta_init.yaml --model_name_or_path Qwen/Qwen2.5-0.5B \\
        --train_files target=data/target.jsonl web=data/web.jsonl cot=data/cot.jsonl \\
        --target_source target --target_eval_file data/target_eval.jsonl
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
    load_sources,
    load_tokenizer_and_model,
    parse,
    write_json,
)

from hf_subset_select.cli import prefixed_dataclass, unprefixed  # noqa: E402
from hf_subset_select.config import CollectConfig  # noqa: E402

COLLECT_PREFIX = "collect_"
CollectArguments = prefixed_dataclass(CollectConfig, COLLECT_PREFIX)


@dataclass
class MetaInitRecipeArguments:
    """Where θ* goes and whether to collect."""

    meta_init_dir: str | None = field(
        default=None, metadata={"help": "Directory for θ* (default <output_dir>/meta_init)."}
    )
    meta_init_save_steps: list[int] = field(
        default_factory=list, metadata={"help": "Also save θ* snapshots at these global steps."}
    )
    collect: bool = field(
        default=True, metadata={"help": "Collect the gradient cache at θ* after training (false: θ* only)."}
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from trl import ModelConfig, SFTConfig

    from hf_subset_select import GradientCollector, MetaInitCallback, SubsetSelectSFTTrainer
    from hf_subset_select.data.sources import source_counts

    if argv is not None:
        sys.argv[1:] = argv
    recipe, collect_args, data_args, model_args, toy_args, sft_args = parse(
        [MetaInitRecipeArguments, CollectArguments, DataArguments, ModelConfig, ToyModelArguments, SFTConfig],
        __doc__,
    )
    collect_config = unprefixed(collect_args, CollectConfig, COLLECT_PREFIX)
    train, target_eval, target = load_sources(data_args)
    tokenizer, model = load_tokenizer_and_model(model_args, toy_args)

    meta_init = MetaInitCallback(
        output_dir=recipe.meta_init_dir, train_dataset=train, save_steps=recipe.meta_init_save_steps
    )
    callbacks: list[Any] = [meta_init]  # θ* is saved before the collector's pass (callback order)
    collector = None
    if recipe.collect:
        collect_config = CollectConfig(
            **{
                **collect_config.to_dict(),
                "output_dir": collect_config.output_dir or os.path.join(sft_args.output_dir, "grad_cache"),
                "max_length": min(
                    collect_config.max_length, sft_args.max_length or collect_config.max_length
                ),
            }
        )
        collector = GradientCollector(collect_config, train_dataset=train, target_dataset=target_eval)
        callbacks.append(collector)
    trainer = SubsetSelectSFTTrainer(
        model=model,
        args=sft_args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer.train()
    summary: dict[str, Any] = {
        "sources": source_counts(train),
        "target_source": target,
        "meta_init_dir": meta_init.output_dir,
        "global_step": trainer.state.global_step,
        "train_loss": next(
            (h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h), None
        ),
    }
    if collector is not None:
        summary.update(grad_cache_dir=collector.cache_dir, collect_stats=collector.stats)
    if trainer.is_world_process_zero():
        write_json(os.path.join(sft_args.output_dir, "meta_init_summary.json"), summary)
        print(
            f"θ* in {summary['meta_init_dir']}"
            + (f", gradient cache in {collector.cache_dir}" if collector else "")
        )
    return summary


if __name__ == "__main__":
    main()
