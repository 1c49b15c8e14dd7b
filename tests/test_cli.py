"""The hf-subset-select command on a tiny cache: every subcommand, every --help, one-line errors."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from hf_subset_select.cli import COMMANDS, main
from hf_subset_select.demo.synthetic import make_synthetic_cache


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache")
    make_synthetic_cache(dim=16, examples_per_source=24, target_examples=24, seed=3).save(path)
    return str(path)


def test_console_script_lists_every_command():
    out = subprocess.run(
        [sys.executable, "-m", "hf_subset_select.cli", "--help"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("demo", "collect", "estimate", "select", "report"):
        assert name in out


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_help_works(command, capsys):
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    assert f"hf-subset-select {command}" in capsys.readouterr().out


def test_select_estimate_report_round_trip(cache_dir, tmp_path, capsys):
    sel = tmp_path / "selection.json"
    assert (
        main(["select", "--cache", cache_dir, "--output", str(sel), "--num_subsets", "300", "--top_k", "2"])
        == 0
    )
    saved = json.loads(sel.read_text())
    assert sorted(saved["selected"]) == ["aligned_0", "aligned_1"]

    est = tmp_path / "est.json"
    assert (
        main(
            [
                "estimate",
                "--cache",
                cache_dir,
                "--subsets",
                "aligned_0,aligned_1",
                "opposed_0",
                "--output",
                str(est),
            ]
        )
        == 0
    )
    losses = {tuple(e["subset"]): e["loss"] for e in json.loads(est.read_text())["estimates"]}
    assert losses[("aligned_0", "aligned_1")] < losses[("opposed_0",)]

    roles = tmp_path / "roles.json"
    roles.write_text(json.dumps({"aligned_0": "helpful", "opposed_0": "harmful"}))
    out_dir = tmp_path / "report"
    assert (
        main(
            [
                "report",
                "--cache",
                cache_dir,
                "--selection",
                str(sel),
                "--output_dir",
                str(out_dir),
                "--roles",
                str(roles),
            ]
        )
        == 0
    )
    text = (out_dir / "report.md").read_text()
    assert "| aligned_0 |" in text and "helpful" in text
    assert (out_dir / "source_scores.png").read_bytes()[:4] == b"\x89PNG"


def test_config_file_and_flag_override(cache_dir, tmp_path):
    cfg = tmp_path / "select.yaml"
    cfg.write_text(
        f"cache: {cache_dir}\nmethod: linear\nnum_subsets: 200\ntop_k: 1\noutput: {tmp_path / 'a.json'}\n"
    )
    assert main(["select", "--config", str(cfg), "--top_k", "3"]) == 0
    saved = json.loads((tmp_path / "a.json").read_text())
    assert saved["method"] == "linear" and len(saved["selected"]) == 3


def _error(capsys, argv):
    code = main(argv)
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]  # progress bars aside
    assert code == 2 and len(lines) == 1, lines
    return lines[0]


def test_bad_input_is_one_line_and_exit_2(cache_dir, tmp_path, capsys):
    assert "No gradient cache" in _error(capsys, ["select", "--cache", str(tmp_path / "missing")])
    assert "--cache is required" in _error(capsys, ["estimate"])
    assert "Unknown source" in _error(capsys, ["estimate", "--cache", cache_dir, "--subsets", "nope"])
    assert "unknown command" in _error(capsys, ["bogus"])
    assert "--config" in _error(capsys, ["select", "--config", str(tmp_path / "none.yaml")])
    # a selection made from another cache is refused by `report`
    other = tmp_path / "other_cache"
    make_synthetic_cache(dim=16, examples_per_source=24, target_examples=24, seed=4).save(other)
    sel = tmp_path / "sel.json"
    assert main(["select", "--cache", str(other), "--output", str(sel), "--num_subsets", "50"]) == 0
    capsys.readouterr()
    err = _error(
        capsys, ["report", "--cache", cache_dir, "--selection", str(sel), "--output_dir", str(tmp_path / "r")]
    )
    assert "cache" in err.lower()


def test_collect_from_a_meta_init_dir_and_files(tmp_path, tokenizer, capsys):
    from hf_subset_select import GradientCache
    from hf_subset_select.collect.meta_init import save_meta_init
    from hf_subset_select.demo.toy import make_tiny_causal_lm, toy_text_dataset

    theta = tmp_path / "meta_init"
    save_meta_init(make_tiny_causal_lm("gpt2", hidden=16, layers=1), str(theta), sources={"add": 6, "rev": 5})
    tokenizer.save_pretrained(theta)
    files = {}
    for name, task, n in (("add", "add", 6), ("rev", "rev", 5), ("eval", "add", 4)):
        files[name] = tmp_path / f"{name}.jsonl"
        toy_text_dataset(task, n, seed=len(name)).to_json(str(files[name]))
    out = tmp_path / "cache"
    argv = [
        "collect",
        "--meta_init",
        str(theta),
        "--train_files",
        f"add={files['add']}",
        f"rev={files['rev']}",
        "--target_eval_file",
        str(files["eval"]),
        "--target_source",
        "add",
        "--proj_dim",
        "64",
        "--proj_type",
        "sparse",
        "--batch_size",
        "4",
        "--output_dir",
        str(out),
    ]
    assert main(argv) == 0, capsys.readouterr().err
    cache = GradientCache.load(out)
    assert cache.dim == 64 and cache.target_source == "add"
    assert cache.counts()["add"]["train"] == 6 and cache.counts()["rev"]["train"] == 5
    assert int(cache.target_mask.sum()) == 4
    # a second run with another projection seed into the same directory is refused in one line
    err = _error(capsys, argv + ["--seed", "1"])
    assert "overwrite" in err.lower() or "differ" in err.lower()
    assert "--train_files" in _error(capsys, ["collect", "--meta_init", str(theta)])


def test_estimate_with_the_budget_rule(cache_dir, tmp_path, capsys):
    out = tmp_path / "budget.json"
    argv = ["estimate", "--cache", cache_dir, "--subsets", "aligned_0", "--output", str(out)]
    budget = ["--estimator_finetune_lr", "0.01", "--estimator_finetune_steps", "10"]
    assert main([*argv, *budget, "--estimator_finetune_optimizer", "sgd"]) == 0
    saved = json.loads(out.read_text())
    assert saved["l2_rule"] == "budget" and saved["l2"] == pytest.approx(10.0)
    assert "(budget rule)" in capsys.readouterr().out
    # AdamW needs the meta-training optimizer's step size, which a synthetic cache does not have
    err = _error(capsys, [*argv, *budget, "--estimator_finetune_batch_size", "8"])
    assert "adam_scalars" in err


def test_select_per_example_and_per_cluster(cache_dir, tmp_path, capsys):
    """--unit example / --unit cluster write per-example selections of the same cache; the report shows the rows
    kept per source and, for clusters, each cluster's size, score and decision."""
    from hf_subset_select.collect.cache import GradientCache
    from hf_subset_select.select.selection import SourceSelection

    cache = GradientCache.load(cache_dir)
    ex = tmp_path / "examples.json"
    assert main(["select", "--cache", cache_dir, "--unit", "example", "--output", str(ex)]) == 0
    sel = SourceSelection.load(str(ex), cache=cache)
    assert sel.method == "example_first_order" and sel.examples is not None
    kept = sel.info["kept_per_source"]
    assert kept["aligned_0"] > kept["opposed_0"] and kept["aligned_1"] > kept["opposed_1"]
    half = tmp_path / "half.json"
    args = ["select", "--cache", cache_dir, "--unit", "example", "--method", "gradient_similarity"]
    assert main([*args, "--fraction", "0.5", "--output", str(half)]) == 0
    cos = SourceSelection.load(str(half), cache=cache)
    assert cos.method == "example_gradient_similarity"
    assert len(cos.examples.kept_ids) == len(cos.examples.example_ids) // 2

    cl = tmp_path / "clusters.json"
    argv = ["select", "--cache", cache_dir, "--unit", "cluster", "--clusters", "4", "--num_subsets", "300"]
    assert main([*argv, "--output", str(cl)]) == 0
    sel = SourceSelection.load(str(cl), cache=cache)
    info = sel.info["clusters"]
    assert info["k"] == 4 and sum(info["sizes"].values()) == len(sel.examples.example_ids)
    assert set(info["selected"]) <= set(info["sizes"])
    out_dir = tmp_path / "report"
    capsys.readouterr()
    assert main(["report", "--cache", cache_dir, "--selection", str(cl), "--output_dir", str(out_dir)]) == 0
    text = (out_dir / "report.md").read_text()
    assert "## Clusters" in text and "## Per example" in text
    for name, size in info["sizes"].items():
        decision = "kept" if name in info["selected"] else "dropped"
        assert f"| {name} | {size} | {info['scores'][name]:.4f} | {decision} |" in text

    # bad units and counts: one line, exit code 2
    with pytest.raises(SystemExit) as info_exit:  # argparse's own choice check
        main(["select", "--cache", cache_dir, "--unit", "row", "--output", str(cl)])
    assert info_exit.value.code == 2
    assert main(["select", "--cache", cache_dir, "--unit", "cluster", "--clusters", "0"]) == 2
    assert main(["select", "--cache", cache_dir, "--unit", "example", "--method", "forward"]) == 2
    err = capsys.readouterr().err
    assert "--clusters must be >= 1" in err and "works on sources only" in err
