"""Collection under FSDP2 against the unsharded single-process collection (issue 16, item 5).

For each configuration (model, LoRA or full fine-tuning) the same θ* is collected once on one process without
sharding and once by 2 CPU processes over gloo with every decoder layer and the root ``fully_shard``-ed; the key
``fsdp_cache_max_rel_diff`` is the largest ``max|a - b| / max|b|`` over the features, outputs and representations
of all configurations (bar: 1e-5). Seconds and peak RSS per rank are recorded too (CPU, so RSS is what memory
there is to measure; it is dominated by the Python / torch runtime at these sizes).

    PYTHONPATH=$PWD python recipes/benchmarks/fsdp_collect.py --output docs/results/fsdp_collect.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time

CONFIGS = [
    {"name": "llama_lora", "kind": "llama", "mode": "lora", "hidden": 64, "layers": 2},
    {"name": "llama_full", "kind": "llama", "mode": "full", "hidden": 64, "layers": 2},
    {"name": "gpt2_lora", "kind": "gpt2", "mode": "lora", "hidden": 64, "layers": 2},
]
ROWS = {"add": 24, "sub": 17, "target": 7}  # uneven shards: the ranks run different numbers of real batches


def build(cfg: dict):
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora

    model = make_tiny_causal_lm(cfg["kind"], hidden=cfg["hidden"], layers=cfg["layers"], heads=4)
    if cfg["mode"] == "lora":
        model = perturb_lora(add_lora(model))
    return model.eval()


def collect(model, out: str):
    from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import make_tokenizer, toy_text_dataset

    train = tag_sources(
        {"add": toy_text_dataset("add", ROWS["add"], 1), "sub": toy_text_dataset("sub", ROWS["sub"], 2)},
        target="add",
    )
    target = tag_target_eval(toy_text_dataset("add", ROWS["target"], 3), "add_eval")
    config = CollectConfig(proj_dim=256, shard_size=8, batch_size=4)
    collector = GradientCollector(config, train_dataset=train, target_dataset=target)
    t0 = time.perf_counter()
    collector.collect(model, make_tokenizer(), output_dir=out, disable_tqdm=True)
    return time.perf_counter() - t0


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: KiB


def worker(root: str) -> None:
    """One rank of the FSDP2 run (started by torchrun)."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stats = {}
    for cfg in CONFIGS:
        model = build(cfg)
        base = model.get_base_model() if cfg["mode"] == "lora" else model
        layers = base.transformer.h if cfg["kind"] == "gpt2" else base.model.layers
        for layer in layers:
            fully_shard(layer)
        fully_shard(model)
        local = sum(p.to_local().numel() for p in model.parameters())
        seconds = collect(model, os.path.join(root, cfg["name"]))
        stats[cfg["name"]] = {"seconds": seconds, "local_param_numel": local}
    stats["peak_rss_mb"] = _peak_rss_mb()
    with open(os.path.join(root, f"rank{rank}.json"), "w", encoding="utf-8") as handle:
        json.dump(stats, handle)
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", required=True)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args.worker)
    import torch

    from hf_subset_select import GradientCache

    torch.set_num_threads(1)
    root = tempfile.mkdtemp(prefix="fsdp_collect_")
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    t0 = time.perf_counter()
    proc = subprocess.run([*cmd, __file__, "--output", args.output, "--worker", os.path.join(root, "fsdp")],
                          env=env, capture_output=True, text=True, timeout=1200)  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"The FSDP2 run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    fsdp_wall = time.perf_counter() - t0
    ranks = [json.load(open(os.path.join(root, "fsdp", f"rank{r}.json"))) for r in (0, 1)]
    results, worst = [], 0.0
    for cfg in CONFIGS:
        model = build(cfg)
        full_numel = sum(p.numel() for p in model.parameters())
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        seconds = collect(model, os.path.join(root, "ref_" + cfg["name"]))
        ref = GradientCache.load(os.path.join(root, "ref_" + cfg["name"]))
        got = GradientCache.load(os.path.join(root, "fsdp", cfg["name"]))
        diffs = {
            key: float((getattr(got, key) - getattr(ref, key)).abs().max() / getattr(ref, key).abs().max())
            for key in ("features", "outputs", "representations")
        }
        worst = max(worst, *diffs.values())
        results.append({
            **cfg,
            "rows": ref.num_examples,
            "param_numel": full_numel,
            "trainable_numel": trainable,
            "local_param_numel_per_rank": [r[cfg["name"]]["local_param_numel"] for r in ranks],
            "max_rel_diff": diffs,
            "same_theta_fingerprint": got.manifest["theta_fingerprint"] == ref.manifest["theta_fingerprint"],
            "grad_method": got.manifest["grad_method"],
            "seconds_unsharded_1proc": round(seconds, 3),
            "seconds_fsdp2_per_rank": [round(r[cfg["name"]]["seconds"], 3) for r in ranks],
        })  # fmt: skip
    out = {
        "fsdp_cache_max_rel_diff": worst,
        "bar": 1e-5,
        "passes": worst <= 1e-5,
        "setup": "2 CPU processes, gloo, torch " + torch.__version__ + "; fully_shard on every decoder layer and root",
        "configurations": results,
        "peak_rss_mb_per_rank_fsdp2": [round(r["peak_rss_mb"], 1) for r in ranks],
        "peak_rss_mb_unsharded_1proc": round(_peak_rss_mb(), 1),
        "fsdp2_wall_seconds_incl_startup": round(fsdp_wall, 2),
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w", encoding="utf-8") as handle:
        json.dump(out, handle, indent=2)
    print(json.dumps({"fsdp_cache_max_rel_diff": worst, "passes": out["passes"]}))


if __name__ == "__main__":
    main()
