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


def _pipeline(tmp_path, processes, apply, from_theta_star=False):
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
    start = ["--meta_init", str(out / "meta" / "meta_init")] if from_theta_star else []
    _run(
        [
            "sft_target.py", *TARGET_ARGS, "--selection", str(selection_path), "--apply", apply,
            "--output_dir", str(target_dir), *start,
        ],
        tmp_path,
        processes,
    )  # fmt: skip
    metrics = json.loads((target_dir / "target_metrics.json").read_text())
    assert metrics["apply"] == apply and metrics["global_step"] == 4
    assert metrics["start"] == (start[1] if start else "base_model")
    assert 0.0 <= metrics["target_accuracy"] <= 1.0 and metrics["target_num_examples"] == 6
    assert metrics["target_loss"] > 0
    if apply == "dataset":
        assert set(metrics["train_sources"]) == set(selection.keep_sources())
    return cache, selection, metrics


@pytest.mark.slow
def test_pipeline_one_process(tmp_path):
    _pipeline(tmp_path, processes=1, apply="weight", from_theta_star=True)
    _assert_target_starts_from_theta_star(tmp_path / "run1" / "meta" / "meta_init")


def _assert_target_starts_from_theta_star(meta_init):
    """``--meta_init`` loads θ* (the saved adapter), not a fresh adapter, before the target fine-tune."""
    import torch
    from safetensors.torch import load_file
    from trl import ModelConfig

    sys.path.insert(0, RECIPES)
    try:
        from recipe_utils import ToyModelArguments, load_tokenizer_and_model
    finally:
        sys.path.remove(RECIPES)
    args = ModelConfig(use_peft=True, lora_r=8, lora_alpha=16, lora_dropout=0.0)
    saved = load_file(str(meta_init / "adapter_model.safetensors"))
    _, fresh = load_tokenizer_and_model(args, ToyModelArguments())
    _, model = load_tokenizer_and_model(args, ToyModelArguments(), meta_init=str(meta_init))
    lora_b = {n: p for n, p in model.named_parameters() if "lora_B" in n}
    assert lora_b and all(p.requires_grad for p in lora_b.values())
    assert all(float(p.detach().abs().sum()) == 0 for n, p in fresh.named_parameters() if "lora_B" in n)
    saved_b = {n.split("model.", 1)[-1]: v for n, v in saved.items() if "lora_B" in n}
    assert len(saved_b) == len(lora_b) and any(float(v.abs().sum()) > 0 for v in saved_b.values())
    for name, value in saved_b.items():
        match = [p for n, p in lora_b.items() if n.replace(".default", "").endswith(name)]
        assert len(match) == 1 and torch.equal(match[0].detach(), value)


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


# FSDP2: tests/collect/test_sharded.py (the collector runs sharded and its cache equals the unsharded one).


# ------------------------------------------------------------------------------------------------------------
# the benchmark harness (recipes/benchmarks/harness): the pieces every benchmark shares, without a model run
# ------------------------------------------------------------------------------------------------------------
BENCHMARKS = os.path.join(RECIPES, "benchmarks")
BENCHMARK_SCRIPTS = [
    "fidelity.py", "fidelity_pretrained.py", "suite.py", "roles.py", "estimate_speed.py",
    "collect_throughput.py", "weighted_loss_overhead.py", "granularity.py", "reliability.py",
    "suite_diagnose.py", "suite_verify.py", "suite_regime.py", "suite_proxies.py", "collect_real_models.py", "solver_reference.py",
]  # fmt: skip

# Runs each script as ``__main__`` with ``--help`` in ONE fresh interpreter (not one per script: each start
# imports torch and transformers again, ~3 s apiece) and prints {script: {"code", "stdout", "error"}} as JSON.
_HELP_DRIVER = """
import contextlib, io, json, runpy, sys, traceback
out = {}
for path in sys.argv[1:]:
    buf, code, error = io.StringIO(), None, ""
    sys.argv = [path, "--help"]
    try:
        with contextlib.redirect_stdout(buf):
            runpy.run_path(path, run_name="__main__")
    except SystemExit as exc:
        code = exc.code or 0
    except BaseException:
        error = traceback.format_exc()[-3000:]
    out[path] = {"code": code, "stdout": buf.getvalue(), "error": error}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def benchmark_help():
    """Each benchmark's ``--help`` result, keyed by script name."""
    paths = [os.path.join(BENCHMARKS, s) for s in BENCHMARK_SCRIPTS]
    proc = subprocess.run(
        [sys.executable, "-c", _HELP_DRIVER, *paths], env=_env(), capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    return {os.path.basename(k): v for k, v in results.items()}


@pytest.fixture
def harness(monkeypatch):
    """The harness package, imported the way the benchmark scripts import it."""
    import importlib

    monkeypatch.syspath_prepend(BENCHMARKS)
    return {
        name: importlib.import_module(f"harness.{name}")
        for name in ("cli", "results", "stats", "estimation", "training", "tasks", "fidelity")
    }


@pytest.mark.parametrize("script", BENCHMARK_SCRIPTS)
def test_benchmark_help_has_common_flags(script, benchmark_help):
    """Every benchmark runs as a script, and takes the harness's --output and --quick."""
    result = benchmark_help[script]
    assert result["error"] == "" and result["code"] == 0, result["error"]
    assert "--output" in result["stdout"] and "--quick" in result["stdout"]


def test_suite_diagnose_summary_locates_the_error(monkeypatch):
    """The diagnosis summary separates "the estimate ranks the loss it estimates" from "that loss ranks the metric":
    here the estimate orders the single sources' real losses exactly while the losses order the metric backwards."""
    import importlib

    monkeypatch.syspath_prepend(BENCHMARKS)
    diagnose = importlib.import_module("suite_diagnose")
    subsets = [[], ["a"], ["b"], ["c"], ["a", "b"]]
    real = [1.2, 0.7, 0.8, 0.9, 0.75]  # every fine-tune but the last two ends above θ*'s loss (0.78)
    metric = [0.5, 0.3, 0.4, 0.6, 0.45]  # ... and the lower the loss of a single source, the lower its metric
    estimates = [0.6, 0.4, 0.45, 0.5, 0.42]
    geometry = {
        "budget_estimates": estimates,
        "output_change_correlation_with_real": [0.1, 0.2, 0.3, 0.4, 0.5],
        "mean_output_change_ratio_to_real": [0.5, None, 0.4, 0.3, 0.2],
    }
    result = {
        "base_dev_loss": 0.78,
        "subsets": [{"subset": s, "real": r, "real_exact_match": m} for s, r, m in zip(subsets, real, metric)],
        "geometry": {"none": geometry},
    }
    out = diagnose.summarize(result)
    assert out["fraction_real_above_base"] == 3 / 5
    g = out["geometry"]["none"]
    assert g["single_source_spearman_estimate_vs_real_loss"] == pytest.approx(1.0)
    assert out["single_source_spearman_real_loss_vs_metric"] == pytest.approx(-0.8)
    assert g["median_output_change_correlation"] == 0.3 and g["median_mean_output_change_ratio"] == 0.4


def test_granularity_benchmark_quick(tmp_path):
    """The synthetic granularity benchmark runs at its smoke scale and writes every method's figures."""
    out = tmp_path / "granularity.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "granularity.py"), "--quick", "--output", str(out)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    easy = data["by_noise"]["1"]
    assert easy["per_example"]["planted_recall"] == 1.0 and easy["per_example"]["kept_clean_fraction"] >= 0.9
    assert easy["per_source"]["planted_recall"] == 0.0  # a source-level selection keeps the planted rows
    assert {f"clusters_{k}" for k in (2, 4, 8, 16)} <= set(easy)


def _mixed_fixture(harness, seed):
    """A tiny tagged task (no WordNet needed): target + two helpful sources + a harmful one, through the mixin."""
    import importlib

    from datasets import Dataset

    from hf_subset_select import tag_sources, tag_target_eval

    wordnet = importlib.import_module("tasks.wordnet")

    def rows(prefix, n, k=3):
        return Dataset.from_list(
            [{"text": f"{prefix} {i}", "input_ids": [i, i + 1], "label": i % k} for i in range(n)]
        )

    class Base(harness["tasks"].Task):
        def build(self, seed):
            sources = {"target": rows("t", 6), "a": rows("a", 20), "b": rows("b", 10), "c": rows("c", 10)}
            return harness["tasks"].TaskData(
                train=tag_sources(sources, target="target"),
                dev=tag_target_eval(rows("d", 6), "target_dev"),
                test=tag_target_eval(rows("e", 6), "target_test"),
                roles={"a": "helpful", "b": "helpful", "c": "harmful"},
                info={"label_derangement": {0: 1, 1: 2, 2: 0}},
            )

        make_model = collate = score = None

    class Mixed(wordnet.MixedSourcesMixin, Base):
        pass

    return wordnet, Base().build(seed), Mixed().build(seed)


def test_mixed_task_plants_conflicts_in_helpful_sources_only(harness):
    """The _mixed variant: deterministic by seed, only the labels of the helpful sources' train rows change (by the
    derangement), the stated fraction of each, and the planted ids live in ``info`` only."""
    wordnet, base, mixed = _mixed_fixture(harness, 0)
    _, _, again = _mixed_fixture(harness, 0)
    _, _, other = _mixed_fixture(harness, 1)
    assert wordnet.MIXED_FRACTION == 0.3
    assert list(mixed.train) == list(again.train) and mixed.info["planted"] == again.info["planted"]
    assert other.info["planted"] != mixed.info["planted"]  # another seed, other rows
    assert mixed.train.column_names == base.train.column_names  # no planted flag in the data
    assert list(mixed.dev) == list(base.dev) and list(mixed.test) == list(base.test)
    changed = {}
    for x, y in zip(base.train, mixed.train):
        assert {k: v for k, v in x.items() if k != "label"} == {k: v for k, v in y.items() if k != "label"}
        if x["label"] != y["label"]:
            assert y["label"] == base.info["label_derangement"][x["label"]]
            changed.setdefault(x["source"], set()).add(y["example_id"])
    assert {s: len(v) for s, v in changed.items()} == {"a": 6, "b": 3}  # round(0.3 * 20), round(0.3 * 10)
    assert {s: set(v) for s, v in mixed.info["planted"].items()} == changed
    assert mixed.roles == {"a": "mixed", "b": "mixed", "c": "harmful"}


def test_granularity_suite_planted_stats(harness):
    """planted_recall / clean_kept of a per-example and of a whole-source selection on the planted fixture."""
    import importlib

    _, _, mixed = _mixed_fixture(harness, 0)
    suite = importlib.import_module("granularity_suite")
    planted = mixed.info["planted"]
    bad = {i for ids in planted.values() for i in ids}
    rows = list(mixed.train)
    clean_a = [r["example_id"] for r in rows if r["source"] == "a" and r["example_id"] not in bad]
    out = suite.planted_stats({"sources": [], "examples": clean_a}, planted, mixed.train)
    assert out["planted_recall"] == 1.0 and out["clean_kept"] == len(clean_a) / (len(clean_a) + 7)
    whole = suite.planted_stats({"sources": ["a", "b"], "examples": None}, planted, mixed.train)
    assert whole["planted_recall"] == 0.0 and whole["clean_kept"] == 1.0


def test_harness_cli_flags(harness):
    cli = harness["cli"]
    parser = cli.benchmark_parser("Title line.\n\nMore.", seeds=3, threads=2)
    args = parser.parse_args(["--output", "x.json", "--quick", "--seeds", "5"])
    assert (args.output, args.quick, args.seeds, args.seed, args.threads) == ("x.json", True, 5, 0, 2)
    assert parser.description == "Title line."
    bare = cli.benchmark_parser(None, seed=False).parse_args(["--output", "y.json"])
    assert not bare.quick and not hasattr(bare, "seeds") and not hasattr(bare, "seed")
    with pytest.raises(SystemExit):
        parser.parse_args([])  # --output is required
    assert cli.parse_list(" 1e-4, 5e-4,,", float) == [1e-4, 5e-4]


def test_harness_results_record_environment(harness, tmp_path):
    path = tmp_path / "sub" / "result.json"
    written = harness["results"].write_results(str(path), {"benchmark": "x", "figure": 0.5})
    saved = json.loads(path.read_text())
    assert saved == written and saved["figure"] == 0.5
    env = saved["environment"]
    assert env["git"]["commit"] and len(env["git"]["commit"]) == 40  # the repository's checked-out commit
    assert env["versions"]["torch"] and env["versions"]["transformers"]
    assert env["date"].endswith("Z") and env["cpu_count"] >= 1 and env["python"].count(".") == 2
    assert not (tmp_path / "sub" / "result.json.tmp").exists()
    assert harness["results"].brief({"a": 1, "b": [1], "c": {"d": 2}, "e": "s"}, skip=("e",)) == {"a": 1}


def test_harness_fidelity_metrics(harness):
    stats = harness["stats"]
    truth, est = [1.0, 2.0, 4.0], [1.1, 1.8, 4.4]
    m = stats.fidelity_metrics(est, truth, base=2.0, other=[3.0, 2.0, 1.0])
    assert m["spearman"] == pytest.approx(1.0) and m["spearman_other"] == pytest.approx(-1.0)
    assert m["mean_relative_error"] == pytest.approx(0.1)
    assert m["no_change_mean_relative_error"] == pytest.approx((1.0 + 0.0 + 0.5) / 3)
    effects = stats.membership_effects([(), ("a",), ("b",), ("a", "b")], [1.0, 0.5, 1.25, 0.75], ["a", "b"])
    assert effects == pytest.approx({"a": -0.5, "b": 0.25})


def test_harness_paired_statistics(harness):
    stats = harness["stats"]
    assert stats.mean_std([1.0, 2.0, 3.0]) == pytest.approx((2.0, 1.0))
    assert stats.mean_std([4.0]) == (4.0, 0.0)
    better = stats.paired_bootstrap([0.8, 0.85, 0.9, 0.82], [0.7, 0.74, 0.81, 0.7], resamples=2000)
    assert better["mean_difference"] == pytest.approx(0.105)
    assert 0 < better["low"] <= better["mean_difference"] <= better["high"]
    same = stats.paired_bootstrap([0.1, 0.3, 0.2, 0.4], [0.3, 0.1, 0.4, 0.2], resamples=2000, seed=1)
    assert same["low"] < 0 < same["high"]  # no difference: the interval straddles 0
    assert stats.paired_bootstrap([1.0, 2.0], [0.0, 1.0]) == stats.paired_bootstrap([1.0, 2.0], [0.0, 1.0])
    with pytest.raises(ValueError):
        stats.paired_bootstrap([1.0], [1.0, 2.0])
    summary = stats.summarize_runs([{"loss": 1.0}, {"loss": 3.0}], ["loss"])
    assert summary["loss"] == {"mean": 2.0, "sd": pytest.approx(2**0.5), "per_seed": [1.0, 3.0]}


def test_harness_subsets_and_rows(harness):
    tasks = harness["tasks"]
    subsets = tasks.random_subsets(["a", "b", "c", "d"], 6, "stream")
    assert len(set(subsets)) == 6 and subsets == tasks.random_subsets(["a", "b", "c", "d"], 6, "stream")
    assert all(list(s) == sorted(s) for s in subsets)  # candidate order kept
    rows = [{"source": s, "i": i} for i, s in enumerate(["target", "a", "b", "target", "c"])]
    assert [r["i"] for r in tasks.subset_rows(rows, ("c", "a"))] == [0, 1, 3, 4]
    data = tasks.TaskData(train=None, dev=None, roles={"b": "helpful", "a": "harmful"})
    assert data.candidates == ["b", "a"] and data.test is None and data.target == "target"


def test_harness_train_steps_data_order_from_seed(harness):
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(2))

        def forward(self, x, labels):
            return type("Out", (), {"loss": ((x @ self.w - labels) ** 2).mean()})()

    def collate(rows):
        return {"x": torch.tensor([r["x"] for r in rows]), "labels": torch.tensor([r["y"] for r in rows])}

    rows = [{"x": [float(i), 1.0], "y": float(i % 3)} for i in range(10)]

    def run(seed, optim="adamw"):
        model = Tiny()
        harness["training"].train_steps(
            model, model.parameters(), rows, collate, steps=5, lr=0.1, batch_size=3, seed=seed, optim=optim
        )
        assert not model.training
        return model.w.detach().clone()

    assert torch.equal(run(0), run(0)) and not torch.equal(run(0), run(1))
    assert not torch.equal(run(0), run(0, optim="sgd"))


def test_harness_truth_cache_and_real_finetunes(harness, tmp_path):
    training, fidelity = harness["training"], harness["fidelity"]
    manifest = {
        "format": "t/1",
        "settings": {"seeds": 2},
        "subsets": [["a"], []],
        "base_loss": 0.5,
        "torch": "x",
    }
    calls = []

    def run_subset(key, subset, watch):
        calls.append((key, subset))
        with watch.run():
            pass
        return {"loss": 1.0 + len(subset), "runs": [{"loss": 1.0}]}

    path = str(tmp_path / "truth.json")
    keys, subsets = [(1e-4, "short"), (5e-4, "epoch")], [("a",), ()]
    cache = training.TruthCache(path, manifest, ("lr", "budget"))
    truth, watch, reused = fidelity.real_finetunes(keys, subsets, run_subset, cache)
    assert not reused and len(calls) == 4 and watch.count == 4
    assert truth[(5e-4, "epoch")][("a",)]["loss"] == 2.0
    again, watch2, reused2 = fidelity.real_finetunes(keys, subsets, run_subset, cache)
    assert reused2 and len(calls) == 4 and again == truth and watch2.count == 4
    close = training.TruthCache(path, {**manifest, "base_loss": 0.5 + 1e-8}, ("lr", "budget"))
    assert close.load() is not None  # θ* is compared through the target loss, up to 1e-6
    for changed in ({"base_loss": 0.6}, {"settings": {"seeds": 3}}, {"subsets": [["a"]]}):
        assert training.TruthCache(path, {**manifest, **changed}, ("lr", "budget")).load() is None
    assert training.TruthCache(str(tmp_path / "none.json"), manifest, ("lr", "budget")).load() is None


def test_harness_estimation_call_sites(harness):
    import torch

    from hf_subset_select import EstimatorConfig
    from hf_subset_select.demo.synthetic import make_synthetic_cache

    est_mod = harness["estimation"]
    cache = make_synthetic_cache(2, 1, 1, dim=16, examples_per_source=24, seed=0)
    est = est_mod.make_estimator(cache, solver="fast", reduction="sum")
    assert isinstance(est.config, EstimatorConfig) and est.config.reduction == "sum"
    subsets = [tuple(s) for s in (est.sources[:1], est.sources[1:3], est.sources)]
    truth = est.estimate([list(s) for s in subsets]).tolist()
    est_mod.with_l2(est, est.resolved_l2() * 3.0, 1.5)
    before = (est.l2, est.step_scale)
    figures = est_mod.budget_metrics(
        est, subsets, truth, base=1.0, other=truth, lr=1e-2, steps=10, optimizer="sgd", batch_size=8
    )
    assert (est.l2, est.step_scale) == before  # restored
    assert figures["budget_l2"] > 0 and len(figures["estimates_budget"]) == 3
    report = est_mod.calibrate(est, dict(zip(subsets, truth)), tolerance=0.0)
    assert report["l2"] == est.l2
    assert len(est_mod.random_baseline(cache, 2, seed=0).selected) == 2
    assert len(est_mod.gradient_similarity(cache, 1).selected) == 1
    shapes = [("w", (cache.dim,))]
    projected = est_mod.caches_by_dim(cache, ["identity", "8"], shapes)
    assert projected["identity"] is cache and projected["8"].dim == 8
    assert torch.equal(projected["8"].outputs, cache.outputs)


def test_scale_benchmark_quick(tmp_path):
    """scale.py's smoke run writes the headline keys (positive, finite) and a small float16 storage error."""
    import math

    out, png = tmp_path / "scale.json", tmp_path / "curves.png"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "scale.py"), "--quick", "--curves", "--plot", str(png),
         "--output", str(out)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    for key in ("end_to_end_subsets_per_s_d128_1thread", "end_to_end_subsets_per_s_d2048_2threads",
                "setup_seconds_d2048", "forward_selection_seconds_n1000", "peak_rss_gb_N1e6_d2048"):  # fmt: skip
        assert math.isfinite(data[key]) and data[key] > 0
    assert data["storage_error"]["float16"]["mean_relative_error"] < 1e-3
    # scaling curves: every point measured in its own processes, memory above the features, the cache on disk
    # at least the features' bytes, one slope per neighbouring pair, the caches removed afterwards
    for axis, points in data["curves"]["points"].items():
        assert [p[axis] for p in points] == sorted(p[axis] for p in points) and len(points) >= 2
        for p in points:
            assert p["peak_rss_gb"] * 2**30 > p["features_bytes"] and p["disk_bytes"] >= p["features_bytes"]
            assert p["features_bytes"] == p["num_examples"] * p["d"] * 4 and p["candidate_sources"] == p["n"] - 1
        assert all(len(v) == len(points) - 1 for v in data["curves"]["slopes"][axis].values())
    if data.get("plot"):  # None when matplotlib is missing
        assert png.stat().st_size > 10_000


def test_solver_reference_benchmark_quick(tmp_path):
    """solver_reference.py --quick (synthetic cache only, offline): exact agrees with SciPy's L-BFGS on the same offset
    problem, the fast path's figures and every solver's time per subset are written for each λ."""
    out = tmp_path / "solver_reference.json"
    proc = subprocess.run(
        [sys.executable, os.path.join(BENCHMARKS, "solver_reference.py"), "--quick", "--output", str(out)],
        env=_env(), capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["complete"] and data["headline_caches"] == ["synthetic"]
    assert data["exact_vs_lbfgs_max_rel_diff"] < 1e-5
    runs = data["caches"]["synthetic"]["by_lambda"]
    assert set(runs) == {"auto", "x0.1", "x10"}
    for run in runs.values():
        assert run["num_subsets"] >= 8 and -1 <= run["fast_vs_exact"]["spearman"] <= 1
        assert all(v > 0 for v in run["seconds_per_subset"].values())
    assert data["exact_vs_lbfgs_speedup"] > 0 and data["fast_vs_lbfgs_speedup"] > 0
