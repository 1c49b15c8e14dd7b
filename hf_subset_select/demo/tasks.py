"""Toy multi-source tasks for the demo, whose ground-truth roles are measured rather than assumed.

**Target.** A letter cipher: ``enc x y z =`` -> ``σ(x) σ(y) σ(z)`` for a fixed permutation σ of ``a``-``z``.
The target's own training split is small and only ever shows 18 of the 26 letters, while its evaluation
split covers all 26: whatever the model learns about the other 8 letters must come from other sources.

**Auxiliary sources**, each role following from a mechanism (and measured, see below):

* helpful: more evidence about σ. ``enc_extra`` is the same task on other inputs, ``enc_pairs`` applies
  σ to two-letter inputs under the same prefix, ``map`` is σ's single-letter lookup under its own prefix
  (a shared sub-step).
* harmful: the target's own prefix with answers that contradict σ. The model cannot tell those examples
  from the target's, so it learns a mixture. ``enc_conflict`` follows another permutation σ' that
  disagrees with σ on every letter; ``enc_noise`` has random letters as answers (label noise).
* irrelevant: another prefix, other tokens (digits), another rule: ``rev`` reverses four digits, ``sum``
  adds two digits mod 10, ``inc`` adds one to each of three digits.

**Base model.** :meth:`DemoTasks.make_model` returns a tiny GPT-2 (or Llama) built from a config and
briefly trained on generic copy/reverse skills (:func:`pretraining_corpus`) that involve neither σ nor the
sources' digit rules, standing in for a pretrained base: fine-tuning then only has to learn the rule, as
with a real model. (From a random initialization any extra data helps, because it teaches attention and
format, and the roles blur.)

**Fine-tuning** (:func:`finetune`, ``transformers.Trainer``): a fixed budget of optimizer steps whatever
the data size, AdamW, completion-only loss, label smoothing 0.1. The smoothing matters: without it the
loss on the 8 letters the target never shows is an unbounded extrapolation that any extra data nudges
by tenths of a nat, which would bury the irrelevant sources' near-zero effect.

**Proof of the roles** (:mod:`hf_subset_select.demo.roles`). :func:`measure_roles` fine-tunes the base on the target alone (several seeds: the
seed-to-seed spread is the noise) and on the target plus one source at a time, with the same budget and
seeds, and :func:`check_roles` states the criteria: helpful sources lower the target loss and harmful ones
raise it, each by far more than the seed noise, while irrelevant ones move it by no more than a few times
the noise. ``tests/demo/test_demo_tasks.py`` runs it at ``scale="test"``; ``recipes/benchmarks/roles.py``
writes the full-scale figures, including the fine-tunes the demo compares (target + all sources,
+ the helpful ones, + random subsets).

Everything is built in code, offline and deterministically.
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from ..data.encode import IGNORE_INDEX, encode_example
from ..data.sources import tag_sources, tag_target_eval
from .toy import TOY_VOCAB, make_tiny_causal_lm, make_tokenizer

__all__ = [
    "DEMO_VOCAB",
    "ROLES",
    "DemoTasks",
    "FinetuneResult",
    "PadCollator",
    "make_demo_tasks",
    "pretraining_corpus",
    "finetune",
    "training_arguments",
    "evaluate_target",
]

ROLES = ("helpful", "irrelevant", "harmful")
TARGET = "target"
TARGET_TEST = "target_test"  # scores the final fine-tunes only
TARGET_DEV = "target_dev"  # what the method sees (gradients, estimates)

_LETTERS = [chr(ord("a") + i) for i in range(26)]
_DIGITS = [str(i) for i in range(10)]
_EXTRA_WORDS = ["enc", "map", "sum", "inc"]
DEMO_VOCAB: list[str] = TOY_VOCAB + [w for w in _EXTRA_WORDS if w not in TOY_VOCAB]
MAX_LENGTH = 16

# source name -> (role, description); the order is the order of DemoTasks.sources
_SOURCES: dict[str, tuple[str, str]] = {
    "enc_extra": ("helpful", "the target task (cipher σ under 'enc', 3 letters) on other inputs"),
    "enc_pairs": ("helpful", "cipher σ on 2-letter inputs under the target's prefix 'enc'"),
    "map": ("helpful", "σ's single-letter lookup under its own prefix 'map'"),
    "enc_conflict": ("harmful", "the target's prefix 'enc' with a conflicting cipher σ' (σ'(x) != σ(x))"),
    "enc_noise": ("harmful", "the target's prefix 'enc' with random letters as answers (label noise)"),
    "rev": ("irrelevant", "reverse 4 digits under 'rev' (other tokens, other rule)"),
    "sum": ("irrelevant", "add 2 digits mod 10 under 'sum' (other tokens, other rule)"),
    "inc": ("irrelevant", "add 1 to each of 3 digits under 'inc' (other tokens, other rule)"),
}

# Sizes per scale (the test scale has a smaller evaluation split and sources; same model and budget).
_SCALES: dict[str, dict[str, Any]] = {
    "full": {"target_letters": 18, "target_blocks": 4, "eval_blocks": 6, "source_size": 200},
    "test": {"target_letters": 18, "target_blocks": 4, "eval_blocks": 4, "source_size": 160},
}
# Label smoothing keeps the fine-tuned model from growing unboundedly confident on the letters the target's
# split never shows (without it their loss is an extrapolation that any extra data nudges by tenths of a nat,
# which buries the irrelevant sources' true near-zero effect). The base's pretraining uses none.
_TRAINING = {"max_steps": 300, "lr": 3e-3, "batch_size": 32, "optim": "adamw_torch", "label_smoothing": 0.1}
_MODEL = {"hidden": 48, "layers": 2, "heads": 2, "max_positions": MAX_LENGTH}
_PRETRAIN = {"examples": 2000, "max_steps": 600}


@dataclass
class FinetuneResult:
    """Target metrics after a fine-tune (see :func:`evaluate_target`) and what it cost."""

    loss: float
    token_accuracy: float
    exact_match: float
    steps: int
    seconds: float
    num_examples: int

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


@dataclass
class DemoTasks:
    """A target task, its evaluation split and auxiliary sources with known roles.

    Attributes:
        train: tagged training data (``source`` / ``example_id`` columns): the target's training split
            (source :attr:`target`) followed by every auxiliary source.
        target_dev: the tagged target split the method sees (source ``"target_dev"``): the collector's target
            rows, so every estimate and selection is made on it.
        target_test: the tagged held-out target split (source ``"target_test"``): it only scores fine-tunes,
            and no input of it occurs in any other split or source.
        target: name of the target's training source.
        roles: auxiliary source -> ``"helpful"`` | ``"irrelevant"`` | ``"harmful"``.
        descriptions: auxiliary source -> what it holds.
        tokenizer: a word-level tokenizer over :data:`DEMO_VOCAB`.
        scale: ``"full"`` or ``"test"``.
        seed: the seed the data was built with.
        model_kwargs: keyword arguments for :func:`~hf_subset_select.demo.toy.make_tiny_causal_lm`.
        training: the fine-tuning regime the roles were measured with: keyword arguments for :func:`finetune`
            and :func:`training_arguments` (``max_steps``, ``lr``, ``batch_size``, ``optim``, ``label_smoothing``).
        pretrain: how the stand-in base is trained (``examples``, ``max_steps``).
        info: facts about the construction (the cipher, the letters the target's split shows, sizes).
    """

    train: Any
    target_dev: Any
    target_test: Any
    target: str
    roles: dict[str, str]
    descriptions: dict[str, str]
    tokenizer: Any
    scale: str
    seed: int
    model_kwargs: dict[str, Any]
    training: dict[str, Any]
    pretrain: dict[str, Any]
    info: dict[str, Any] = field(default_factory=dict)
    _bases: dict[tuple, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def sources(self) -> list[str]:
        """Auxiliary source names (the target excluded), in a fixed order."""
        return list(self.roles)

    def sources_with_role(self, role: str) -> list[str]:
        """Auxiliary sources whose ground-truth role is ``role``."""
        if role not in ROLES:
            raise ValueError(f"role={role!r}: choose one of {list(ROLES)}.")
        return [s for s, r in self.roles.items() if r == role]

    def subset(self, sources: Iterable[str], include_target: bool = True) -> Any:
        """The training rows of the target (unless ``include_target=False``) and of ``sources``."""
        keep = set(sources)
        unknown = sorted(keep - set(self.roles) - {self.target})
        if unknown:
            raise ValueError(f"Unknown source(s) {unknown}; known: {[self.target, *self.roles]}.")
        if include_target:
            keep.add(self.target)
        return self.train.select([i for i, s in enumerate(self.train["source"]) if s in keep])

    def make_model(self, seed: int = 0, kind: str = "gpt2", pretrained: bool = True) -> Any:
        """A tiny causal LM (eager attention, no dropout) for these tasks; a fresh copy on every call.

        With ``pretrained=True`` (the default) it is the stand-in base: a model built from a config with
        ``seed`` and trained on :func:`pretraining_corpus` (computed once per ``(seed, kind)`` and cached).
        """
        key = (seed, kind, pretrained)
        if key not in self._bases:
            model = make_tiny_causal_lm(
                kind,
                vocab_size=len(self.tokenizer),
                seed=seed,
                attn_implementation="eager",
                **self.model_kwargs,
            )
            if pretrained:
                finetune(
                    model,
                    self.tokenizer,
                    pretraining_corpus(self.pretrain["examples"], seed=seed),
                    max_steps=self.pretrain["max_steps"],
                    lr=self.training["lr"],
                    batch_size=self.training["batch_size"],
                    optim=self.training["optim"],
                    label_smoothing=0.0,
                    seed=seed,
                )
            model.eval()
            self._bases[key] = model
        return copy.deepcopy(self._bases[key])

    def finetune(
        self, model: Any, sources: Iterable[str], seed: int = 0, include_target: bool = True, **overrides: Any
    ) -> FinetuneResult:
        """Fine-tune ``model`` in place on the target + ``sources`` with this scale's defaults; evaluate on the target."""
        kwargs = {**self.training, **overrides}
        return finetune(
            model,
            self.tokenizer,
            self.subset(sources, include_target=include_target),
            self.target_test,
            seed=seed,
            **kwargs,
        )

    def training_arguments(self, output_dir: str, seed: int = 0, **overrides: Any) -> Any:
        """``TrainingArguments`` for this scale's fine-tuning regime (see :func:`training_arguments`)."""
        return training_arguments(output_dir, seed=seed, **{**self.training, **overrides})

    def evaluate(self, model: Any) -> dict[str, float]:
        """Target metrics of ``model`` on the held-out target test split (see :func:`evaluate_target`)."""
        return evaluate_target(model, self.tokenizer, self.target_test)


# ----------------------------------------------------------------------------------------------- data


def _derangement_pair(seed: int) -> tuple[dict[str, str], dict[str, str]]:
    """The cipher σ (a permutation of the letters) and a conflicting σ' with σ'(x) != σ(x) for every x."""
    rng = random.Random(f"demo-cipher-{seed}")
    sigma = rng.sample(_LETTERS, len(_LETTERS))
    while True:
        other = rng.sample(_LETTERS, len(_LETTERS))
        if all(a != b for a, b in zip(sigma, other)):
            return dict(zip(_LETTERS, sigma)), dict(zip(_LETTERS, other))


def _balanced_triples(
    alphabet: Sequence[str], blocks: int, rng: random.Random, used: set[tuple[str, ...]]
) -> list[tuple[str, ...]]:
    """``blocks * len(alphabet)`` unused triples in which every letter occurs ``blocks`` times at every position."""
    out: list[tuple[str, ...]] = []
    while len(out) < blocks * len(alphabet):
        block = list(zip(*(rng.sample(list(alphabet), len(alphabet)) for _ in range(3))))
        if any(t in used for t in block) or len(set(block)) < len(block):
            continue  # rare: draw the block again
        used.update(block)
        out.extend(block)
    return out


def _random_tuples(
    alphabet: Sequence[str], size: int, n: int, rng: random.Random, used: set[tuple[str, ...]]
) -> list[tuple[str, ...]]:
    """``n`` distinct unused random tuples of length ``size``."""
    out: list[tuple[str, ...]] = []
    while len(out) < n:
        t = tuple(rng.choice(alphabet) for _ in range(size))
        if t not in used:
            used.add(t)
            out.append(t)
    return out


def _row(prompt_words: Sequence[str], answer_words: Sequence[str]) -> dict[str, str]:
    return {"prompt": " ".join(prompt_words), "completion": " " + " ".join(answer_words)}


def _enc_rows(inputs: Iterable[Sequence[str]], table: Mapping[str, str]) -> list[dict[str, str]]:
    return [_row(["enc", *x, "="], [table[c] for c in x]) for x in inputs]


def make_demo_tasks(scale: str = "full", seed: int = 0) -> DemoTasks:
    """Build the demo's target task and its auxiliary sources (offline; deterministic for a given ``seed``).

    Args:
        scale: ``"full"`` for the demo, ``"test"`` for the test suite (smaller sources and evaluation
            split, fewer steps; the same code path and model).
        seed: seeds the cipher and every sampled input.

    Returns:
        A :class:`DemoTasks` with tagged train / target-eval datasets, the ground-truth roles, the tokenizer
        and a factory for the base model.
    """
    from datasets import Dataset

    if scale not in _SCALES:
        raise ValueError(f"scale={scale!r}: choose one of {list(_SCALES)}.")
    cfg = _SCALES[scale]
    sigma, conflict = _derangement_pair(seed)
    rng = random.Random(f"demo-data-{seed}")

    # Inputs are never shared between splits or sources (an eval triple is never trained on).
    used: set[tuple[str, ...]] = set()
    eval_x = _balanced_triples(_LETTERS, cfg["eval_blocks"], rng, used)
    seen = sorted(rng.sample(_LETTERS, cfg["target_letters"]))
    target_x = _balanced_triples(seen, cfg["target_blocks"], rng, used)
    n = cfg["source_size"]
    extra_x, conflict_x, noise_x = (_random_tuples(_LETTERS, 3, n, rng, used) for _ in range(3))
    pairs_x = _random_tuples(_LETTERS, 2, n, rng, used)
    singles = [rng.choice(_LETTERS) for _ in range(n)]
    digits4 = [[rng.choice(_DIGITS) for _ in range(4)] for _ in range(n)]
    digits3 = [[rng.choice(_DIGITS) for _ in range(3)] for _ in range(n)]
    digits2 = [[rng.choice(_DIGITS) for _ in range(2)] for _ in range(n)]

    rows = {
        TARGET: _enc_rows(target_x, sigma),
        "enc_extra": _enc_rows(extra_x, sigma),
        "enc_pairs": _enc_rows(pairs_x, sigma),
        "map": [_row(["map", c, "="], [sigma[c]]) for c in singles],
        "enc_conflict": _enc_rows(conflict_x, conflict),
        "enc_noise": [_row(["enc", *x, "="], [rng.choice(_LETTERS) for _ in x]) for x in noise_x],
        "rev": [_row(["rev", *d, "="], d[::-1]) for d in digits4],
        "sum": [_row(["sum", *d, "="], [str((int(d[0]) + int(d[1])) % 10)]) for d in digits2],
        "inc": [_row(["inc", *d, "="], [str((int(x) + 1) % 10) for x in d]) for d in digits3],
    }
    # drawn last, so that the other splits and sources do not depend on it
    dev_x = _balanced_triples(_LETTERS, cfg["eval_blocks"], rng, used)
    train = tag_sources({name: Dataset.from_list(r) for name, r in rows.items()}, target=TARGET)
    target_test = tag_target_eval(Dataset.from_list(_enc_rows(eval_x, sigma)), name=TARGET_TEST)
    target_dev = tag_target_eval(Dataset.from_list(_enc_rows(dev_x, sigma)), name=TARGET_DEV)
    return DemoTasks(
        train=train,
        target_dev=target_dev,
        target_test=target_test,
        target=TARGET,
        roles={name: role for name, (role, _) in _SOURCES.items()},
        descriptions={name: desc for name, (_, desc) in _SOURCES.items()},
        tokenizer=make_tokenizer(DEMO_VOCAB, model_max_length=MAX_LENGTH),
        scale=scale,
        seed=seed,
        model_kwargs=dict(_MODEL),
        training=dict(_TRAINING),
        pretrain=dict(_PRETRAIN),
        info={
            "cipher": sigma,
            "conflicting_cipher": conflict,
            "target_letters": seen,
            "sizes": {name: len(r) for name, r in rows.items()}
            | {TARGET_TEST: len(eval_x), TARGET_DEV: len(dev_x)},
        },
    )


def pretraining_corpus(n: int, seed: int = 0) -> Any:
    """Generic skills for the stand-in base model: copy or reverse 1-4 letters or digits ('copy' / 'rev').

    None of it involves the cipher or the digit rules of the sources. (``rev`` over digits is also an
    irrelevant source: a skill the base already has is as irrelevant to the target as it gets.)
    """
    from datasets import Dataset

    rng = random.Random(f"demo-pretrain-{seed}")
    rows = []
    for _ in range(n):
        pool = _LETTERS if rng.random() < 0.7 else _DIGITS
        xs = [rng.choice(pool) for _ in range(rng.randint(1, 4))]
        op = rng.choice(["copy", "rev"])
        rows.append(_row([op, *xs, "="], xs if op == "copy" else xs[::-1]))
    return Dataset.from_list(rows)


# --------------------------------------------------------------------------------- training and metrics


class PadCollator:
    """Right-pad ``input_ids`` (pad id), ``labels`` (-100) and build ``attention_mask``; other keys are dropped."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = int(pad_token_id)

    def __call__(self, features: list[Mapping[str, Any]]) -> dict[str, Any]:
        from ..collect.per_example import collate_examples

        return collate_examples(features, "causal_lm", pad_token_id=self.pad_token_id)


def _encode(dataset: Any, tokenizer: Any, max_length: int) -> list[dict[str, list[int]]]:
    """Tokenize prompt/completion rows (completion-only labels); every other column is dropped."""
    out = []
    for example in dataset:
        enc = encode_example(example, tokenizer, max_length)
        out.append({"input_ids": enc["input_ids"], "labels": enc["labels"]})
    return out


def evaluate_target(
    model: Any, tokenizer: Any, eval_dataset: Any, max_length: int = MAX_LENGTH, batch_size: int = 256
) -> dict[str, float]:
    """Target metrics under teacher forcing.

    ``loss``: mean cross-entropy over all supervised (completion + EOS) tokens. ``token_accuracy``: share of
    those tokens that are the argmax. ``exact_match``: share of examples whose every supervised token is the
    argmax, which is the same as greedy decoding reproducing the gold completion.
    """
    import torch

    data = _encode(eval_dataset, tokenizer, max_length)
    collate = PadCollator(tokenizer.pad_token_id)
    was_training = model.training
    model.eval()
    nll_sum = correct_sum = tokens = exact = 0.0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            batch = collate([data[i] for i in range(start, min(start + batch_size, len(data)))])
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logits = logits[:, :-1].float()
            gold = batch["labels"][:, 1:]
            mask = gold != IGNORE_INDEX
            safe = gold.clamp(min=0)
            nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), safe, reduction="none")
            correct = (logits.argmax(-1) == safe) & mask
            nll_sum += float((nll * mask).sum())
            correct_sum += float(correct.sum())
            tokens += float(mask.sum())
            exact += float((correct | ~mask).all(dim=1).sum())
    model.train(was_training)
    return {
        "loss": nll_sum / tokens,
        "token_accuracy": correct_sum / tokens,
        "exact_match": exact / len(data),
    }


def training_arguments(
    output_dir: str,
    *,
    max_steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    optim: str = "adamw_torch",
    label_smoothing: float = 0.0,
    epochs: float | None = None,
    **extra: Any,
) -> Any:
    """``TrainingArguments`` for the demo's fine-tuning regime (the one the roles were measured with).

    ``max_steps`` optimizer steps whatever the data size (or ``epochs`` passes if given, which the roles
    were *not* measured with), linear decay, no warm-up, no weight decay, CPU, no checkpoints or logging
    integrations, bookkeeping columns kept (``remove_unused_columns=False``). ``extra`` overrides any field.
    """
    from transformers import TrainingArguments

    if epochs is None and max_steps <= 0:
        raise ValueError(f"max_steps={max_steps}: give a positive number of optimizer steps (or epochs=).")
    kwargs: dict[str, Any] = {
        "output_dir": output_dir,
        "per_device_train_batch_size": batch_size,
        "max_steps": -1 if epochs is not None else max_steps,
        "num_train_epochs": epochs if epochs is not None else 1.0,
        "learning_rate": lr,
        "optim": optim,
        "lr_scheduler_type": "linear",
        "warmup_steps": 0,
        "weight_decay": 0.0,
        "label_smoothing_factor": label_smoothing,
        "seed": seed,
        "data_seed": seed,
        "report_to": "none",
        "save_strategy": "no",
        "eval_strategy": "no",
        "logging_strategy": "no",
        "disable_tqdm": True,
        "use_cpu": True,
        "dataloader_num_workers": 0,
        "remove_unused_columns": False,
    }
    kwargs.update(extra)
    return TrainingArguments(**kwargs)


def finetune(
    model: Any,
    tokenizer: Any,
    train_dataset: Any,
    eval_dataset: Any | None = None,
    *,
    max_steps: int = 300,
    lr: float = 3e-3,
    batch_size: int = 32,
    seed: int = 0,
    optim: str = "adamw_torch",
    label_smoothing: float = 0.0,
    epochs: float | None = None,
    max_length: int = MAX_LENGTH,
) -> FinetuneResult | None:
    """Fine-tune ``model`` in place with ``transformers.Trainer``; return target metrics on ``eval_dataset``.

    Rows are prompt/completion text (any format :func:`~hf_subset_select.data.encode.encode_example` takes),
    trained with completion-only loss; the bookkeeping columns are dropped first. The regime is
    :func:`training_arguments`: a budget of ``max_steps`` optimizer steps whatever the data size (or
    ``epochs`` passes), linear decay, no weight decay, data order from ``seed``. The model is left in eval
    mode. Returns ``None`` when ``eval_dataset`` is ``None``.
    """
    from transformers import PrinterCallback, Trainer

    data = _encode(train_dataset, tokenizer, max_length)
    with tempfile.TemporaryDirectory() as tmp:
        args = training_arguments(
            tmp,
            max_steps=max_steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            optim=optim,
            label_smoothing=label_smoothing,
            epochs=epochs,
        )
        trainer = Trainer(
            model=model, args=args, train_dataset=data, data_collator=PadCollator(tokenizer.pad_token_id)
        )
        trainer.remove_callback(PrinterCallback)  # no per-run metric dicts on stdout
        start = time.perf_counter()
        out = trainer.train()
        seconds = time.perf_counter() - start
    model.eval()
    if eval_dataset is None:
        return None
    metrics = evaluate_target(model, tokenizer, eval_dataset, max_length)
    return FinetuneResult(steps=int(out.global_step), seconds=seconds, num_examples=len(data), **metrics)
