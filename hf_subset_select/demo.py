"""``hf-subset-select demo``: the pipeline end to end on built-in toy sources, offline, on a CPU.

This first version runs the part of the pipeline that exists: tagging toy sources and a multitask SFT with
the real ``Trainer`` and :class:`~hf_subset_select.MetaInitCallback`, which writes θ* and its manifest.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from .config import ConfigMixin

__all__ = ["DemoConfig", "run_demo"]


@dataclass
class DemoConfig(ConfigMixin):
    """Settings of the demo run."""

    config_type = "demo_config"

    output_dir: str = field(default="hf_subset_select_demo", metadata={"help": "Where the demo writes."})
    scale: str = field(default="full", metadata={"help": "'full' or 'test' (reduced sizes, same code path)."})
    seed: int = field(default=0, metadata={"help": "Seed for data, models and training."})

    def __post_init__(self) -> None:
        if self.scale not in ("full", "test"):
            raise ValueError(f"scale={self.scale!r}: choose 'full' or 'test'.")


def run_demo(config: DemoConfig) -> dict:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from .encode import encode_example
    from .guard import SubsetSelectTrainer
    from .meta_init import MetaInitCallback
    from .sources import tag_sources
    from .toy import add_lora, make_tiny_causal_lm, make_tokenizer, toy_text_dataset

    n = 64 if config.scale == "full" else 16
    tok = make_tokenizer()
    train = tag_sources(
        {task: toy_text_dataset(task, n, seed=config.seed) for task in ("add", "sub", "rev", "copy")},
        target="add",
    )
    tokenized = train.map(lambda e: encode_example(e, tok, 32), desc="Tokenizing")
    model = add_lora(make_tiny_causal_lm("gpt2", seed=config.seed))
    args = TrainingArguments(
        output_dir=config.output_dir,
        num_train_epochs=1,
        per_device_train_batch_size=16,
        learning_rate=1e-2,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        bf16=False,
        logging_steps=5,
        seed=config.seed,
    )
    trainer = SubsetSelectTrainer(
        model=model,
        args=args,
        train_dataset=tokenized,
        data_collator=DataCollatorForSeq2Seq(tok, padding=True),
        callbacks=[MetaInitCallback()],
    )
    trainer.train()
    path = os.path.join(config.output_dir, "meta_init", "meta_init.json")
    with open(path, encoding="utf-8") as handle:
        manifest = json.load(handle)
    print(
        f"θ* saved: {os.path.dirname(path)} (sources {manifest['sources']}, step {manifest['global_step']})"
    )
    return manifest
