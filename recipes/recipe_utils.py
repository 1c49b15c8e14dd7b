"""Shared pieces of the TRL SFT recipes: argument dataclasses, data and model loading, target evaluation.

Not a public API; the three recipes import it from this folder (see the import note in each recipe).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from hf_subset_select.data.sources import load_dataset_file  # noqa: E402

# ------------------------------------------------------------------------------------------------------------
# arguments
# ------------------------------------------------------------------------------------------------------------


@dataclass
class DataArguments:
    """Where the sources and the target evaluation split come from (default: built-in toy tasks)."""

    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training sources as NAME=PATH (json/jsonl/csv/parquet file, or a folder written by "
            "Dataset.save_to_disk), one per source, including the target's own training split. Columns: "
            "text, messages, prompt/completion or input_ids. Empty: built-in toy sources (offline)."
        },
    )
    target_source: str | None = field(
        default=None,
        metadata={
            "help": "Name of the source that is the target's training split (default: the toy target)."
        },
    )
    target_eval_file: str | None = field(
        default=None, metadata={"help": "Target evaluation split (same formats). Required with train_files."}
    )
    max_examples_per_source: int | None = field(
        default=None, metadata={"help": "Use at most this many examples of each source (first rows)."}
    )
    toy_tasks: list[str] = field(
        default_factory=lambda: ["add", "sub", "rev", "copy"],
        metadata={"help": "Toy sources (add, sub, rev, copy, sort, count) used when train_files is empty."},
    )
    toy_target: str = field(default="add", metadata={"help": "Toy target task (must be one of toy_tasks)."})
    toy_examples_per_source: int = field(default=24, metadata={"help": "Examples per toy source."})
    toy_eval_examples: int = field(
        default=16, metadata={"help": "Examples of the toy target evaluation split."}
    )
    toy_seed: int = field(default=0, metadata={"help": "Seed of the toy data."})

    def __post_init__(self) -> None:
        if self.train_files and not self.target_eval_file:
            raise ValueError("--train_files needs --target_eval_file (the target task's evaluation split).")
        if not self.train_files and self.toy_target not in self.toy_tasks:
            raise ValueError(f"toy_target={self.toy_target!r} must be one of toy_tasks={self.toy_tasks}.")
        for spec in self.train_files:
            if "=" not in spec:
                raise ValueError(f"train_files entries are NAME=PATH, got {spec!r}.")


@dataclass
class ToyModelArguments:
    """The tiny offline model used when ``model_name_or_path`` is not given."""

    toy_model: str = field(default="llama", metadata={"help": "'llama' or 'gpt2' (tiny, random init)."})
    toy_hidden: int = field(default=32, metadata={"help": "Hidden size of the tiny model."})
    toy_layers: int = field(default=2, metadata={"help": "Layers of the tiny model."})
    toy_model_seed: int = field(default=0, metadata={"help": "Seed of the tiny model's initialization."})


def cpu_defaults(parser: Any) -> None:
    """Without a GPU: ``use_cpu=True`` (so two launched processes form a gloo group), no bf16, no checkpointing.

    With ``use_cpu=False`` on a machine without CUDA every launched process would train alone on all the data.
    A YAML ``--config`` or the command line can still override these defaults.
    """
    import torch

    if not torch.cuda.is_available():
        parser.set_defaults(use_cpu=True, bf16=False, activation_checkpointing=False)


def parse(dataclass_types: list[type], description: str) -> tuple[Any, ...]:
    """TRL's parser: flags, plus ``--config file.yaml`` whose values the flags override."""
    import argparse

    from trl import TrlParser

    class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = TrlParser(dataclass_types, description=description, formatter_class=_Formatter)
    if any("use_cpu" in getattr(t, "__dataclass_fields__", {}) for t in dataclass_types):
        cpu_defaults(parser)
    return parser.parse_args_and_config()


# ------------------------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------------------------


def load_sources(data: DataArguments) -> tuple[Any, Any, str]:
    """Return (tagged training sources, tagged target evaluation split, target source name)."""
    from hf_subset_select import tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import toy_text_dataset

    if data.train_files:
        raw = {}
        for spec in data.train_files:
            name, path = spec.split("=", 1)
            raw[name.strip()] = load_dataset_file(path.strip())
        target = data.target_source
        if target is None:
            raise ValueError("--target_source is required with --train_files (which source is the target?).")
        evaluation = load_dataset_file(data.target_eval_file)  # type: ignore[arg-type]
    else:
        raw = {
            task: toy_text_dataset(task, data.toy_examples_per_source, seed=data.toy_seed + i)
            for i, task in enumerate(data.toy_tasks)
        }
        target = data.target_source or data.toy_target
        evaluation = toy_text_dataset(data.toy_target, data.toy_eval_examples, seed=data.toy_seed + 1000)
    if data.max_examples_per_source:
        raw = {k: v.select(range(min(len(v), data.max_examples_per_source))) for k, v in raw.items()}
    train = tag_sources(raw, target=target)
    return train, tag_target_eval(evaluation, name=target_eval_name(target)), target


def target_eval_name(target: str) -> str:
    """Source name under which the target evaluation split is tagged."""
    return f"{target}_eval"


# ------------------------------------------------------------------------------------------------------------
# model
# ------------------------------------------------------------------------------------------------------------


def load_tokenizer_and_model(
    model_args: Any, toy: ToyModelArguments, meta_init: str | None = None
) -> tuple[Any, Any]:
    """The base model (tiny toy model unless ``model_name_or_path``), wrapped in LoRA if ``use_peft``; with
    ``meta_init``, θ* restored onto the base model instead (adapter or full weights, as it was saved)."""
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer

    name = model_args.model_name_or_path
    if not name:
        tokenizer = make_tokenizer()
        model = make_tiny_causal_lm(
            toy.toy_model, hidden=toy.toy_hidden, layers=toy.toy_layers, seed=toy.toy_model_seed
        )
    else:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(name, revision=model_args.model_revision)
        dtype = model_args.dtype
        kwargs: dict[str, Any] = {"revision": model_args.model_revision}
        if dtype not in (None, "auto"):
            kwargs["dtype"] = getattr(torch, dtype)
        elif dtype == "auto":
            kwargs["dtype"] = "auto"
        kwargs["attn_implementation"] = model_args.attn_implementation or "eager"
        model = AutoModelForCausalLM.from_pretrained(name, **kwargs)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token
    if meta_init is not None:
        from hf_subset_select import load_meta_init

        return tokenizer, load_meta_init(meta_init, base_model=model)
    if model_args.use_peft:
        from peft import get_peft_model
        from trl import get_peft_config

        model = get_peft_model(model, get_peft_config(model_args))
    return tokenizer, model


def base_collator(tokenizer: Any) -> Any:
    """TRL's SFT collator (pads input ids and labels)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=tokenizer.pad_token_id)


# ------------------------------------------------------------------------------------------------------------
# target evaluation
# ------------------------------------------------------------------------------------------------------------


def target_answer_accuracy(
    model: Any, tokenizer: Any, eval_dataset: Any, batch_size: int = 16
) -> dict[str, Any]:
    """Greedy-answer exact match on the target evaluation split, reported through the shipped ``evaluate`` metric.

    ``eval_dataset`` is tokenized (``input_ids`` and ``labels`` with -100 outside the answer, as SFTTrainer
    prepares it). Greedy decoding reproduces a reference answer exactly when every reference token is the
    model's top-1 prediction given the reference prefix, so one teacher-forced forward pass per batch decides
    it; the predicted and reference answers are decoded to text and scored by ``target_accuracy``.
    Work is split across processes; every process returns the same result.
    """
    import torch
    from accelerate import PartialState
    from accelerate.utils import gather_object

    from hf_subset_select.metrics import load_metric

    state = PartialState()
    collate = base_collator(tokenizer)
    rows = [{"input_ids": r["input_ids"], "labels": r["labels"]} for r in eval_dataset]
    device = next(model.parameters()).device
    predictions: list[str] = []
    references: list[str] = []
    was_training = model.training
    model.eval()
    with state.split_between_processes(rows) as mine, torch.no_grad():
        for start in range(0, len(mine), batch_size):
            batch = collate(mine[start : start + batch_size])
            labels = batch.pop("labels")
            logits = model(**{k: v.to(device) for k, v in batch.items()}).logits
            top1 = logits[:, :-1].argmax(-1).cpu()
            target = labels[:, 1:]
            for pred_row, gold_row in zip(top1, target):
                mask = gold_row != -100
                predictions.append(tokenizer.decode(pred_row[mask].tolist(), skip_special_tokens=False))
                references.append(tokenizer.decode(gold_row[mask].tolist(), skip_special_tokens=False))
    model.train(was_training)
    predictions = gather_object(predictions)
    references = gather_object(references)
    metric = load_metric("target_accuracy")
    result = metric.compute(predictions=predictions, references=references)
    return {f"target_{k}": v for k, v in result.items()}


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` as JSON to ``path`` atomically, creating its folder."""
    from hf_subset_select.io_utils import atomic_write_json

    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_json(path, payload)


def read_json(path: str) -> dict[str, Any]:
    """The JSON object stored at ``path``."""
    with open(path, encoding="utf-8") as handle:
        return json.load(handle)
