"""Gradient-collection throughput against training throughput, a paper-style reference, and projector costs.

For tiny GPT-2 and Llama configs, with LoRA and with full fine-tuning, at batch 16 and sequence length 64,
measured side by side in one process (same threads, same data):

* ``train``: ``transformers.Trainer`` training throughput (examples/s over timed steps after warm-up);
* ``collect``: :class:`~hf_subset_select.GradientCollector` (vmap per-example gradients + the default
  projection, shards written to disk), examples/s of the gradient pass;
* ``reference``: a reference-style collector as the paper's public code does it: one ``autograd.grad`` call
  per example and a dense p x d projection matrix held in memory.

Then the projector alone at p = 10M trainable parameters: peak extra memory (RSS, in a fresh process per
kind) at d = 256, and sparse-map throughput at d = 8192.

    python recipes/benchmarks/collect_throughput.py --output collect_throughput.json
    python recipes/benchmarks/collect_throughput.py --quick --output /tmp/quick.json   # about a minute

Training and collection runs alternate, ``--repeats`` times, and each throughput is the best of its runs: on a
shared machine (``load_average`` records how busy it was) other processes only ever slow a run down, so the
best run is the closest to the uncontended figure; every run is kept in the JSON.
Bars (issue 3): LoRA ratio >= 0.8, full ratio >= 0.6, projector extra memory < 1024 MB.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from harness.cli import benchmark_parser, limit_threads  # noqa: E402
from harness.results import load_average, write_results  # noqa: E402

BATCH = 16
SEQ = 64


def _model(kind: str, lora: bool, hidden: int, layers: int):
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm

    model = make_tiny_causal_lm(kind, hidden=hidden, layers=layers, heads=4, max_positions=SEQ + 8, seed=0)
    if lora:
        model = add_lora(model, r=8, alpha=16)
        with torch.no_grad():  # θ*-like: non-zero LoRA B, so every LoRA gradient is non-trivial
            for n, p in model.named_parameters():
                if "lora_B" in n:
                    p.normal_(0, 0.05)
    return model


def _data(n: int, vocab: int, seed: int = 0):
    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    g = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(n):
        ids = torch.randint(4, vocab, (SEQ,), generator=g).tolist()
        rows.append({"input_ids": ids, "labels": ids})
    half = n // 2
    train = tag_sources({"a": Dataset.from_list(rows[:half]), "b": Dataset.from_list(rows[half:])})
    target = tag_target_eval(Dataset.from_list(rows[:BATCH]), name="t")
    return train, target


def _train_rate(model, train, steps: int, warmup: int, batch: int = BATCH) -> float:
    """Trainer examples/s over ``steps`` timed optimizer steps after ``warmup`` untimed ones."""
    from transformers import Trainer, TrainerCallback, TrainingArguments, default_data_collator

    stamps: list[float] = []

    class Clock(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    data = train.remove_columns(["source", "example_id"])
    with tempfile.TemporaryDirectory() as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_train_batch_size=batch,
            max_steps=warmup + steps,
            learning_rate=1e-4,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            logging_strategy="no",
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(model=model, args=args, train_dataset=data, data_collator=default_data_collator)
        trainer.add_callback(Clock())
        trainer.train()
    elapsed = stamps[-1] - stamps[warmup - 1]
    return steps * batch / elapsed


def _collect_rate(
    model, train, target, proj_dim: int, batch: int = BATCH, seq: int = SEQ
) -> tuple[float, dict]:
    """GradientCollector examples/s of one collection of ``train`` + ``target`` (shards in a temporary folder)."""
    from hf_subset_select import CollectConfig, GradientCollector

    tmp = tempfile.mkdtemp(prefix="collect-bench-")
    try:
        config = CollectConfig(proj_dim=proj_dim, batch_size=batch, max_length=seq, shard_size=4096)
        collector = GradientCollector(config, train, target)
        collector.collect(model, output_dir=tmp, disable_tqdm=True)
        stats = dict(collector.stats)
        stats["projection"] = collector.cache.manifest["projection"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return stats["examples_per_s"], stats


def _reference_rate(model, train, proj_dim: int, limit: int) -> float:
    """Paper-style: per-example autograd.grad and a dense p x d projection matrix in memory."""
    from hf_subset_select.collect.outputs import token_log_odds_output

    params = [p for p in model.parameters() if p.requires_grad]
    p_total = sum(p.numel() for p in params)
    dense = torch.randn(p_total, proj_dim, generator=torch.Generator().manual_seed(0)) / proj_dim**0.5
    model.eval()
    rows = [train[i] for i in range(min(limit, len(train)))]
    t0 = time.perf_counter()
    out = []
    for row in rows:
        ids = torch.tensor([row["input_ids"]])
        f = token_log_odds_output(model(input_ids=ids).logits, torch.tensor([row["labels"]]))[0]
        grads = torch.autograd.grad(f, params)
        out.append(torch.cat([g.reshape(-1) for g in grads]) @ dense)
    elapsed = time.perf_counter() - t0
    model.train()
    return len(rows) / elapsed


_MEM_CHILD = r"""
import json, sys, time, torch
torch.set_num_threads(int(sys.argv[4]))
from hf_subset_select.collect.projection import make_projector
kind, p, d = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
batch = int(sys.argv[5])
proj = make_projector(kind, d, 0, {"w": (p,)})
grads = {"w": torch.randn(batch, p)}
out = torch.zeros(batch, d)
def status_kb(field):  # VmHWM (peak resident) is per address space; ru_maxrss would include the parent's peak
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith(field + ":"):
                return int(line.split()[1])
before = status_kb("VmRSS")  # resident now; the peak below minus this bounds the projector's extra memory
t0 = time.perf_counter()
out = proj.project(grads)
first = time.perf_counter() - t0
after = status_kb("VmHWM")
second = None
if kind == "sparse":  # the dense kinds at p = 10M are measured for memory only (p*d work per call)
    t0 = time.perf_counter()
    proj.project(grads)
    second = time.perf_counter() - t0
print(json.dumps({"extra_mb": (after - before) / 1024.0, "first_call_s": first, "second_call_s": second,
                  "cached_mb": proj._cached_bytes / 2**20, "batch": batch}))
"""


def _projector_child(kind: str, p: int, d: int, threads: int, batch: int) -> dict:
    res = subprocess.run(
        [sys.executable, "-c", _MEM_CHILD, kind, str(p), str(d), str(threads), str(batch)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(res.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = benchmark_parser(
        __doc__, seed=False, threads=2, threads_help="torch intra-op threads", raw_description=True
    )
    parser.add_argument(
        "--repeats", type=int, default=None, help="Alternating train/collect repeats (best of)."
    )
    parser.add_argument("--hidden", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--proj_dim", type=int, default=2048, help="d for the collector and the reference.")
    args = parser.parse_args()

    limit_threads(args.threads)
    repeats = args.repeats or (2 if args.quick else 6)
    steps, warmup = (4, 1) if args.quick else (8, 2)
    n_examples = BATCH * (4 if args.quick else 8)
    ref_limit = 16 if args.quick else 48
    from hf_subset_select.demo.toy import TOY_VOCAB

    train, target = _data(n_examples, len(TOY_VOCAB))
    load_start = load_average()
    configs = {}
    for kind in ("gpt2", "llama"):
        for lora in (True, False):
            name = f"{kind}_{'lora' if lora else 'full'}"
            model = _model(kind, lora, args.hidden, args.layers)
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            init = {k: v.detach().clone() for k, v in model.state_dict().items()}
            train_rates, collect_rates, stats = [], [], None
            for _ in range(repeats):
                model.load_state_dict(init)
                train_rates.append(_train_rate(model, train, steps, warmup))
                model.load_state_dict(init)
                rate, stats = _collect_rate(model, train, target, args.proj_dim)
                collect_rates.append(rate)
            model.load_state_dict(init)
            ref_runs = [
                _reference_rate(model, train, args.proj_dim, ref_limit) for _ in range(1 if args.quick else 2)
            ]
            ref = max(ref_runs)
            tr, co = max(train_rates), max(collect_rates)
            configs[name] = {
                "trainable_params": trainable,
                "train_examples_per_s": round(tr, 2),
                "collect_examples_per_s": round(co, 2),
                "reference_examples_per_s": round(ref, 2),
                "collect_vs_train_ratio": round(co / tr, 3),
                "collect_vs_reference_ratio": round(co / ref, 3),
                "train_runs": [round(x, 2) for x in train_rates],
                "collect_runs": [round(x, 2) for x in collect_rates],
                "reference_runs": [round(x, 2) for x in ref_runs],
                "collector_projection": stats["projection"],
                "collector_grad_method": stats["grad_method"],
            }
            print(name, json.dumps(configs[name]), flush=True)

    # projector alone at p = 10M
    p10m = 10_000_000
    mem = {}
    for kind in ("rademacher", "gaussian", "sparse"):
        mem[kind] = _projector_child(kind, p10m, 256, args.threads, 1)
        print("projector memory", kind, mem[kind], flush=True)
    sparse = _projector_child("sparse", p10m, 8192, args.threads, BATCH)
    print("sparse d=8192", sparse, flush=True)

    lora = [c for n, c in configs.items() if n.endswith("lora")]
    full = [c for n, c in configs.items() if n.endswith("full")]
    result = {
        "collect_vs_train_ratio_lora": min(c["collect_vs_train_ratio"] for c in lora),
        "collect_vs_train_ratio_full": min(c["collect_vs_train_ratio"] for c in full),
        "collect_vs_reference_ratio": min(c["collect_vs_reference_ratio"] for c in configs.values()),
        "projector_extra_mem_mb_p10M_d256": round(max(m["extra_mb"] for m in mem.values()), 1),
        "sparse_projector_examples_per_s_p10M_d8192": round(BATCH / sparse["second_call_s"], 2),
        "sparse_projector_examples_per_s_p10M_d8192_first_call": round(BATCH / sparse["first_call_s"], 2),
        "bars": {"lora_ratio": 0.8, "full_ratio": 0.6, "projector_extra_mem_mb": 1024},
        "configs": configs,
        "projector_memory_p10M_d256": mem,
        "sparse_projector_p10M_d8192": sparse,
        "setup": {
            "batch_size": BATCH,
            "seq_len": SEQ,
            "hidden": args.hidden,
            "layers": args.layers,
            "proj_dim": args.proj_dim,
            "repeats": repeats,
            "train_timed_steps": steps,
            "collect_examples": n_examples + BATCH,
            "reference_examples": ref_limit,
            "quick": args.quick,
        },
        "machine": {
            "load_average_start": load_start,
            "load_average_end": load_average(),
            "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, 1),
        },
    }
    write_results(args.output, result, sort_keys=False)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}, indent=2))


if __name__ == "__main__":
    main()
