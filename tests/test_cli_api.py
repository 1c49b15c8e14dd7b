"""The CLI covers the API: target-only collection, a separate target, several targets, intervals, the baselines,
calibrate from a file of real losses and forward-check, run through the entry point in-process."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_subset_select import FirstOrderEstimator, GradientCache
from hf_subset_select.cli import main
from hf_subset_select.demo.synthetic import make_synthetic_cache

ROOT = Path(__file__).resolve().parents[1]


def _error(capsys, argv):
    capsys.readouterr()  # progress bars of earlier calls
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("hf-subset-select")]
    assert code == 2 and len(lines) == 1, lines  # one error line (progress bars aside)
    return lines[0]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    make_synthetic_cache(dim=16, examples_per_source=24, target_examples=24, seed=3).save(path)
    return str(path)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A meta-init directory, data files and a training cache collected by `collect`."""
    from hf_subset_select.collect.meta_init import save_meta_init
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer, toy_text_dataset

    root = tmp_path_factory.mktemp("cli_api")
    theta = root / "meta_init"
    torch.manual_seed(0)
    save_meta_init(make_tiny_causal_lm("gpt2", hidden=16, layers=1), str(theta), sources={"add": 6, "rev": 5})
    make_tokenizer().save_pretrained(theta)
    files = {}
    for name, task, n in (
        ("add", "add", 6),
        ("rev", "rev", 5),
        ("sub", "sub", 5),
        ("eval", "add", 4),
        ("new", "sub", 5),
    ):
        files[name] = root / f"{name}.jsonl"
        toy_text_dataset(task, n, seed=len(name) + n).to_json(str(files[name]))
    common = ["--meta_init", str(theta), "--proj_dim", "32", "--proj_type", "sparse", "--batch_size", "4"]
    train = [f"{n}={files[n]}" for n in ("add", "rev", "sub")]
    argv = ["collect", *common, "--train_files", *train, "--target_eval_file", str(files["eval"])]
    assert main([*argv, "--target_source", "add", "--output_dir", str(root / "train")]) == 0
    return {"root": root, "theta": theta, "files": files, "common": common, "train_files": train}


def test_target_only_collection_separate_and_several_targets(collected, capsys):
    root, files = collected["root"], collected["files"]
    new = ["collect", "--meta_init", str(collected["theta"]), "--target_eval_file", str(files["new"])]
    new += ["--target_eval_name", "sub_eval", "--train_cache", str(root / "train")]
    assert main([*new, "--output_dir", str(root / "new")]) == 0, capsys.readouterr().err
    target = GradientCache.load(root / "new")
    assert target.num_examples == 5 and not bool(target.train_mask.any())  # the target's rows only
    # a setting given on the command line must match the training cache's
    err = _error(capsys, [*new, "--seed", "3", "--output_dir", str(root / "refused")])
    assert "'projection.seed'" in err and "Fix:" in err
    assert "either --train_files" in _error(
        capsys, [*new, "--train_files", *collected["train_files"], "--output_dir", str(root / "x")]
    )

    # the same target recollected with the pool gives the same estimates
    full = [
        "collect",
        *collected["common"],
        "--train_files",
        *collected["train_files"],
        "--target_source",
        "add",
    ]
    assert (
        main(
            [
                *full,
                "--target_eval_file",
                str(files["new"]),
                "--target_eval_name",
                "sub_eval",
                "--output_dir",
                str(root / "full_new"),
            ]
        )
        == 0
    )
    train, full_new = GradientCache.load(root / "train"), GradientCache.load(root / "full_new")
    torch.testing.assert_close(
        FirstOrderEstimator(train, target=target).estimate([["rev"], ["sub"]]),
        FirstOrderEstimator(full_new).estimate([["rev"], ["sub"]]),
        rtol=1e-6,
        atol=1e-9,
    )

    out = root / "est.json"
    argv = [
        "estimate",
        "--cache",
        str(root / "train"),
        "--target_cache",
        str(root / "new"),
        "--subsets",
        "rev",
        "sub",
    ]
    assert main([*argv, "--interval_level", "0.9", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "90% CI" in printed
    saved = json.loads(out.read_text())
    for entry in saved["estimates"]:
        lo, hi = entry["interval"]
        assert lo <= entry["loss"] <= hi

    several = ["--targets", f"add_eval={root / 'train'}", f"sub_eval={root / 'new'}"]
    assert main(["estimate", "--cache", str(root / "train"), *several, "--output", str(out)]) == 0
    table = json.loads(out.read_text())
    assert set(table["estimates"][0]["loss"]) == {"add_eval", "sub_eval"}
    sel = root / "multi.json"
    argv = ["select", "--cache", str(root / "train"), *several, "--num_subsets", "64", "--output", str(sel)]
    assert main([*argv, "--interval_level", "0.95", "--bootstrap_samples", "200"]) == 0
    assert "add_eval" in capsys.readouterr().out
    data = json.loads(sel.read_text())
    assert sorted(data["selected"]) == ["add_eval", "sub_eval"]
    report = root / "report"
    rargs = ["report", "--cache", str(root / "train"), "--selection", str(root / "multi.sub_eval.json")]
    assert main([*rargs, "--output_dir", str(report)]) == 0
    text = (report / "report.md").read_text()
    assert "score 95% CI" in text and "effect 95% CI" in text


def test_forward_check(collected, capsys):
    root, files = collected["root"], collected["files"]
    out = root / "fc.json"
    argv = ["forward-check", "--cache", str(root / "train"), "--meta_init", str(collected["theta"])]
    assert (
        main([*argv, "--target_eval_file", str(files["eval"]), "--subsets", "rev", "--output", str(out)]) == 0
    )
    assert "forward check" in capsys.readouterr().out
    (result,) = json.loads(out.read_text())["results"]
    assert result["subset"] == ["rev"] and result["forward"] > 0
    # θ* unchanged and a zero step: the real loss is the cache's loss at θ* (the check does run the model)
    assert (
        main(
            [
                *argv,
                "--target_eval_file",
                str(files["eval"]),
                "--subsets",
                "rev",
                "--estimator_step_scale",
                "0",
                "--output",
                str(out),
            ]
        )
        == 0
    )
    base = FirstOrderEstimator(GradientCache.load(root / "train")).base_loss
    assert json.loads(out.read_text())["results"][0]["forward"] == pytest.approx(base, rel=1e-4)


def test_baselines_with_the_recipes_config(cache_dir, tmp_path, capsys):
    out = tmp_path / "b"
    config = ROOT / "recipes" / "configs" / "select.yaml"
    assert (
        main(
            [
                "baselines",
                "--config",
                str(config),
                "--cache",
                cache_dir,
                "--output_dir",
                str(out),
                "--top_k",
                "2",
            ]
        )
        == 0
    )
    printed = capsys.readouterr().out
    assert "gradient_similarity" in printed and "kept by" in printed
    for method in ("gradient_similarity", "representation_similarity", "random"):
        sel = json.loads((out / f"{method}.json").read_text())
        assert sel["method"] == method and len(sel["selected"]) == 2
    assert "Unknown baseline" in _error(capsys, ["baselines", "--cache", cache_dir, "--methods", "linear"])


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_calibrate_from_a_file_of_real_losses(cache_dir, tmp_path, capsys, fmt):
    est = FirstOrderEstimator(GradientCache.load(cache_dir))
    true_l2 = est.resolved_l2() * 10.0  # "real" losses: the estimate at a 10x larger λ
    subsets = [["aligned_0"], ["opposed_0"], ["aligned_0", "orthogonal_0"], ["aligned_1", "opposed_1"]]
    est.l2 = true_l2
    real = [float(v) for v in est.estimate(subsets)]
    path = tmp_path / f"real.{fmt}"
    if fmt == "json":
        path.write_text(json.dumps({",".join(s): v for s, v in zip(subsets, real)}))
    else:
        path.write_text("subset,loss\n" + "".join(f'"{"+".join(s)}",{v}\n' for s, v in zip(subsets, real)))
    out = tmp_path / "cal.json"
    argv = ["calibrate", "--cache", cache_dir, "--real_losses", str(path), "--fit_step_scale", "false"]
    assert main([*argv, "--output", str(out)]) == 0
    assert "--estimator_l2" in capsys.readouterr().out
    result = json.loads(out.read_text())
    assert result["l2"] == pytest.approx(true_l2, rel=0.2)
    assert result["mean_relative_error_after"] < result["mean_relative_error_before"]
    assert result["config"]["estimator_l2"] == result["l2"]
    assert "--real_losses" in _error(capsys, ["calibrate", "--cache", cache_dir])
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"subset": "aligned_0"}]))
    assert "expected" in _error(capsys, ["calibrate", "--cache", cache_dir, "--real_losses", str(bad)])


def test_help_says_when_to_use_each_command(capsys):
    assert main(["--help"]) == 0
    usage = capsys.readouterr().out
    for name in ("baselines", "calibrate", "forward-check"):
        assert name in usage
    for command, phrase in (
        ("collect", "--train_cache"),
        ("select", "--require_significant"),
        ("estimate", "--targets"),
        ("baselines", "Use it"),
        ("calibrate", "Use it"),
        ("forward-check", "Use it"),
    ):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        assert phrase in capsys.readouterr().out
