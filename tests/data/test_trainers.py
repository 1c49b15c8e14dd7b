"""The trainers' column handling: ``source`` / ``example_id`` survive the Trainer's column removal for collators
that ask for them, are stripped before ``forward``, and merged examples (packing, padding-free) are refused."""

from __future__ import annotations

import json
import os

import pytest
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_subset_select import (
    BookkeepingColumnsError,
    MetaInitCallback,
    SubsetSelectSFTTrainer,
    SubsetSelectTrainer,
)
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import make_tiny_causal_lm

COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=5e-2,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,
    disable_tqdm=True,
    logging_strategy="no",
)


def _tokenize(ds, tok):
    return ds.map(lambda e: encode_example(e, tok, 32))


def _manifest(path):
    with open(os.path.join(path, "meta_init.json")) as handle:
        return json.load(handle)


def test_stripped_columns_raise_the_documented_error(tmp_path, toy_sources, tokenizer):
    train, _ = toy_sources
    trainer = Trainer(  # plain Trainer: remove_unused_columns=True strips `source`
        model=make_tiny_causal_lm("gpt2"),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, **COMMON),
        train_dataset=_tokenize(train, tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[MetaInitCallback()],
    )
    with pytest.raises(BookkeepingColumnsError, match="SubsetSelectTrainer"):
        trainer.train()


def test_subset_select_trainer_keeps_columns_for_aware_collators(tmp_path, toy_sources, tokenizer):
    train, _ = toy_sources
    seen: list[str] = []
    base = DataCollatorForSeq2Seq(tokenizer, padding=True)

    class Aware:
        handles_bookkeeping = True

        def __call__(self, features):
            seen.extend(f["source"] for f in features)
            return base([{k: v for k, v in f.items() if k not in ("source", "example_id")} for f in features])

    trainer = SubsetSelectTrainer(
        model=make_tiny_causal_lm("gpt2"),
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=2, **COMMON),
        train_dataset=_tokenize(train, tokenizer),
        data_collator=Aware(),
        callbacks=[MetaInitCallback()],  # counts come from the dataloader's kept columns
    )
    trainer.train()
    assert seen and set(seen) <= {"add", "sub", "rev"}
    assert _manifest(tmp_path / "meta_init")["sources"] == {"add": 12, "sub": 10, "rev": 8}


@pytest.mark.parametrize("flag", ["packing", "padding_free"])
def test_merged_examples_raise_the_documented_error(tmp_path, toy_sources, tokenizer, flag):
    train, _ = toy_sources
    extra = {"max_length": None} if flag == "padding_free" else {}  # TRL's own rule for padding-free
    args = SFTConfig(output_dir=str(tmp_path), max_steps=1, **{flag: True}, **extra, **COMMON)
    with pytest.raises(BookkeepingColumnsError, match="packing=False"):
        SubsetSelectSFTTrainer(
            model=make_tiny_causal_lm("gpt2"), args=args, train_dataset=train, processing_class=tokenizer
        )
    trainer = SFTTrainer(
        model=make_tiny_causal_lm("gpt2"),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[MetaInitCallback()],
    )
    with pytest.raises(BookkeepingColumnsError, match="packing=False"):
        trainer.train()
