"""The TRL SFT recipes end to end on the tiny offline default, with one process and with two (gloo)."""

from __future__ import annotations

import json
import os
import runpy
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECIPES = os.path.join(ROOT, "recipes")
CPU_2PROC = os.path.join(RECIPES, "accelerate", "cpu_2proc.yaml")

# small but complete: 4 toy sources, LoRA, one epoch, a projected cache, a real selection, a target fine-tune
META_ARGS = [
    "--config", os.path.join(RECIPES, "configs", "sft_meta_init.yaml"),
    "--toy_examples_per_source", "8",
    "--toy_eval_examples", "6",
    "--num_train_epochs", "1",
    "--per_device_train_batch_size", "4",
    "--collect_proj_dim", "64",
    "--collect_batch_size", "8",
    "--logging_steps", "50",
    "--disable_tqdm", "true",
]  # fmt: skip
# an explicit λ keeps the test independent of the automatic rule (tested with the estimator) and fast
SELECT_ARGS = [
    "--config", os.path.join(RECIPES, "configs", "select.yaml"), "--num_subsets", "64", "--estimator_l2", "1.0",
]  # fmt: skip
TARGET_ARGS = [
    "--config", os.path.join(RECIPES, "configs", "sft_target.yaml"),
    "--toy_examples_per_source", "8",
    "--toy_eval_examples", "6",
    "--max_steps", "4",
    "--per_device_train_batch_size", "4",
    "--logging_steps", "50",
    "--disable_tqdm", "true",
]  # fmt: skip


def _env():
    env = dict(os.environ)
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        CUDA_VISIBLE_DEVICES="",
        OMP_NUM_THREADS="1",
        WANDB_DISABLED="true",
        PYTHONPATH=ROOT + os.pathsep + env.get("PYTHONPATH", ""),
    )
    return env


def _free_port():
    import socket

    with (
        socket.socket() as sock
    ):  # a free port, so that parallel runs do not meet on accelerate's default 29500
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(args, cwd, processes=1):
    script, rest = args[0], list(args[1:])
    path = os.path.join(RECIPES, script)
    if processes == 1:
        cmd = [sys.executable, path, *rest]
    else:
        cmd = [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", CPU_2PROC,
            "--main_process_port", str(_free_port()), path, *rest,
        ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(
            f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"
        )
    return proc


def _pipeline(tmp_path, processes, apply):
    from hf_subset_select import GradientCache, SourceSelection

    out = tmp_path / f"run{processes}"
    cache_dir = out / "grad_cache"
    _run(
        [
            "sft_meta_init.py",
            *META_ARGS,
            "--output_dir",
            str(out / "meta"),
            "--collect_output_dir",
            str(cache_dir),
        ],
        tmp_path,
        processes,
    )
    summary = json.loads((out / "meta" / "meta_init_summary.json").read_text())
    assert summary["sources"] == {"add": 8, "sub": 8, "rev": 8, "copy": 8}
    assert (out / "meta" / "meta_init" / "meta_init.json").exists()
    cache = GradientCache.load(str(cache_dir))
    assert cache.features.shape == (4 * 8 + 6, 64)
    assert cache.manifest["world_size"] == processes
    assert cache.target_source == "add"

    selection_path = out / "selection.json"
    proc = _run(
        ["select.py", *SELECT_ARGS, "--cache", str(cache_dir), "--output", str(selection_path)], tmp_path
    )
    assert "SourceSelection(" in proc.stdout
    selection = SourceSelection.load(str(selection_path), cache=cache)  # tied to this cache
    assert set(selection.sources) == {"sub", "rev", "copy"} and selection.target_source == "add"

    target_dir = out / "target"
    _run(
        [
            "sft_target.py", *TARGET_ARGS, "--selection", str(selection_path), "--apply", apply,
            "--output_dir", str(target_dir),
        ],
        tmp_path,
        processes,
    )  # fmt: skip
    metrics = json.loads((target_dir / "target_metrics.json").read_text())
    assert metrics["apply"] == apply and metrics["global_step"] == 4
    assert 0.0 <= metrics["target_accuracy"] <= 1.0 and metrics["target_num_examples"] == 6
    assert metrics["target_loss"] > 0
    if apply == "dataset":
        assert set(metrics["train_sources"]) == set(selection.keep_sources())
    return cache, selection, metrics


@pytest.mark.slow
def test_pipeline_one_process(tmp_path):
    _pipeline(tmp_path, processes=1, apply="weight")


@pytest.mark.slow
@pytest.mark.multiprocess
def test_pipeline_two_processes(tmp_path):
    _pipeline(tmp_path, processes=2, apply="dataset")


@pytest.mark.parametrize("script", ["sft_meta_init.py", "select.py", "sft_target.py"])
def test_help(script, capsys):
    module = runpy.run_path(os.path.join(RECIPES, script), run_name="recipe_under_test")
    with pytest.raises(SystemExit) as exit_info:
        module["main"](["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    expected = {
        "sft_meta_init.py": "--collect_proj_dim",
        "select.py": "--estimator_l2",
        "sft_target.py": "--apply",
    }
    assert text.startswith("usage") and expected[script] in text
    if script != "select.py":
        assert "--model_name_or_path" in text and "--lora_r" in text and "--train_files" in text


def test_accelerate_configs():
    """The launch configs parse; the recipe configs are exercised by the pipeline tests."""
    import yaml

    for name in ("single_gpu", "multi_gpu", "deepspeed_zero2", "fsdp", "cpu_2proc"):
        with open(os.path.join(RECIPES, "accelerate", f"{name}.yaml"), encoding="utf-8") as handle:
            config = yaml.safe_load(handle)
        assert config["distributed_type"] in ("NO", "MULTI_GPU", "DEEPSPEED", "FSDP")


def test_target_metric_module_loads_by_path():
    import evaluate

    from hf_subset_select.metrics import available_metrics, metric_path

    assert "target_accuracy" in available_metrics()
    metric = evaluate.load(metric_path("target_accuracy"))
    result = metric.compute(
        predictions=["1 2", " 3 ", "x <eos> y"], references=["1  2", "4", "x"], stop_text="<eos>"
    )
    assert result == {"accuracy": pytest.approx(2 / 3), "num_examples": 3, "num_correct": 2}
    with pytest.raises(ValueError, match="No shipped metric"):
        metric_path("nope")


# Run in fresh interpreters by torchrun: forking the test process (accelerate.debug_launcher) after torch has
# started its intra-op threads can deadlock the children.
_FSDP_WORKER = """
import os, sys
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
from hf_subset_select.collect.per_example import ShardedParametersError
from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer, toy_text_dataset

dist.init_process_group("gloo")
assert dist.get_world_size() == 2
train = tag_sources({"add": toy_text_dataset("add", 4, 1), "sub": toy_text_dataset("sub", 4, 2)}, target="add")
target = tag_target_eval(toy_text_dataset("add", 2, 3), "add_eval")
model = make_tiny_causal_lm("llama", hidden=16, layers=1)
for layer in model.model.layers:
    fully_shard(layer)
fully_shard(model)
collector = GradientCollector(CollectConfig(proj_dim=16), train_dataset=train, target_dataset=target)
try:
    collector.collect(model, make_tokenizer(), output_dir=os.path.join(os.path.dirname(sys.argv[1]), "cache"))
    message = "no error"
except ShardedParametersError as exc:
    message = f"ShardedParametersError: {exc}"
with open(f"{sys.argv[1]}.{dist.get_rank()}", "w", encoding="utf-8") as handle:
    handle.write(message)
dist.destroy_process_group()
"""


@pytest.mark.multiprocess
def test_fsdp_sharded_parameters_refused_by_collector(tmp_path):
    """What docs/distributed.md states: under FSDP2 (2 ranks, gloo) the collector refuses with a clear error."""
    worker = tmp_path / "worker.py"
    worker.write_text(_FSDP_WORKER)
    out = tmp_path / "result.txt"
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(out),
    ]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    for rank in (0, 1):  # every rank refuses, before any work
        text = (tmp_path / f"result.txt.{rank}").read_text()
        assert text.startswith("ShardedParametersError") and "DDP / ZeRO-2" in text
    assert not (tmp_path / "cache" / "cache.safetensors").exists()
