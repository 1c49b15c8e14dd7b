"""Meta-training with gradient collection, the fine-tuning loop of the real fine-tunes, and their truth cache."""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def meta_training_arguments(
    output_dir: str,
    *,
    epochs: int,
    batch_size: int,
    lr: float,
    seed: int,
    logging_steps: int,
    remove_unused_columns: bool = False,
) -> Any:
    """``TrainingArguments`` of a meta-training run: ``epochs`` epochs of ``batch_size`` at a constant ``lr``, no weight
    decay, CPU, no checkpoints, no reporting (``remove_unused_columns=False`` keeps the bookkeeping columns)."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=logging_steps,
        seed=seed,
        disable_tqdm=True,
        remove_unused_columns=remove_unused_columns,
    )


def meta_train(
    model: Any,
    training_args: Any,
    train: Any,
    collate: Any,
    collectors: Sequence[Any],
    *,
    train_dataset: Any = None,
) -> tuple[Any, float]:
    """θ*: one ``Trainer`` run on every source with ``MetaInitCallback`` and the given ``GradientCollector`` callbacks.

    ``train`` is the tagged sources (what the callbacks read); ``train_dataset`` what the Trainer trains on (default
    ``train``). Returns the trained model (in eval mode) and the seconds the run took.
    """
    from transformers import Trainer

    from hf_subset_select import MetaInitCallback

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train if train_dataset is None else train_dataset,
        data_collator=collate,
        callbacks=[MetaInitCallback(train_dataset=train), *collectors],
    )
    t0 = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - t0
    trainer.model.eval()
    return trainer.model, seconds


def train_steps(
    model: Any,
    parameters: Iterable[torch.nn.Parameter],
    rows: Sequence[dict[str, Any]],
    collate: Callable[[list[dict[str, Any]]], dict[str, torch.Tensor]],
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    optim: str = "adamw",
) -> None:
    """``steps`` steps of a fresh AdamW (no weight decay) or SGD on ``parameters``; the seed fixes the data order.

    Batches walk through seeded permutations of ``rows`` (a new one when fewer than ``batch_size`` rows are left);
    the model is left in eval mode.
    """
    params = list(parameters)
    model.train()
    if optim == "sgd":
        opt: torch.optim.Optimizer = torch.optim.SGD(params, lr=lr)
    else:
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < batch_size:
            order += torch.randperm(len(rows), generator=gen).tolist()
        idx, order = order[:batch_size], order[batch_size:]
        loss = model(**collate([rows[i] for i in idx])).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval()


def restore(parameters: dict[str, torch.nn.Parameter], values: dict[str, torch.Tensor]) -> None:
    """Copy saved ``values`` back into the named ``parameters`` (e.g. θ* before the next fine-tune)."""
    with torch.no_grad():
        for name, p in parameters.items():
            p.copy_(values[name])


class Stopwatch:
    """Adds up the seconds and the number of timed runs (``with watch.run(): ...``)."""

    def __init__(self, seconds: float = 0.0, count: int = 0) -> None:
        self.seconds, self.count = seconds, count

    @contextmanager
    def run(self) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds += time.perf_counter() - t0
            self.count += 1


class TruthCache:
    """Real fine-tuning results saved with a manifest of what decided them, reused only when it matches.

    The results are ``{key: {subset: value}}`` where ``key`` is a tuple named by ``key_names`` (e.g. learning rate
    and budget) and ``subset`` a tuple of source names. The manifest holds the settings, the subsets, the torch
    version and ``base_loss``, the target loss at θ* (which stands for θ*: meta-training is repeated on every run).
    """

    def __init__(self, path: str | None, manifest: dict[str, Any], key_names: Sequence[str]) -> None:
        self.path, self.manifest, self.key_names = path, manifest, tuple(key_names)

    def load(self) -> tuple[dict[tuple, dict[tuple[str, ...], Any]], Stopwatch] | None:
        """The saved results and their stopwatch, or None when there are none for this manifest."""
        if not self.path or not os.path.exists(self.path):
            return None
        with open(self.path, encoding="utf-8") as handle:
            saved = json.load(handle)
        old = saved.get("manifest", {})
        same = (
            all(old.get(k) == v for k, v in self.manifest.items() if k != "base_loss")
            and abs(float(old.get("base_loss", math.inf)) - self.manifest["base_loss"]) <= 1e-6
        )
        if not same:
            print(
                f"{self.path} holds fine-tunes of other settings or another θ*; running them again",
                flush=True,
            )
            return None
        truth: dict[tuple, dict[tuple[str, ...], Any]] = {}
        for e in saved["entries"]:
            key = tuple(e[n] for n in self.key_names)
            value = {k: v for k, v in e.items() if k not in (*self.key_names, "subset")}
            truth.setdefault(key, {})[tuple(e["subset"])] = value
        return truth, Stopwatch(float(saved["finetune_seconds"]), int(saved["num_finetunes"]))

    def save(self, truth: dict[tuple, dict[tuple[str, ...], Any]], watch: Stopwatch) -> None:
        """Write the results (JSON, atomic); nothing without a path."""
        if not self.path:
            return
        from hf_subset_select.io_utils import atomic_write_json

        entries = [
            {**dict(zip(self.key_names, key)), "subset": list(subset), **value}
            for key, by_subset in truth.items()
            for subset, value in by_subset.items()
        ]
        payload = {
            "manifest": self.manifest,
            "entries": entries,
            "finetune_seconds": watch.seconds,
            "num_finetunes": watch.count,
        }
        atomic_write_json(self.path, payload)
