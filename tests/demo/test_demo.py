"""`hf-subset-select demo` in its reduced mode: same code path, fewer estimated subsets."""

from __future__ import annotations

import json

from hf_subset_select.demo.run import DemoConfig, run_demo


def test_demo_selects_against_the_known_roles_and_writes_its_report(tmp_path):
    results = run_demo(DemoConfig(output_dir=str(tmp_path), scale="test", seed=0))
    for name in ("report.md", "source_scores.png", "estimate_vs_true.png", "selection.json", "results.json"):
        assert (tmp_path / name).is_file(), name
    assert (tmp_path / "meta_init" / "meta_init.json").is_file()
    assert (tmp_path / "grad_cache" / "manifest.json").is_file()
    assert json.loads((tmp_path / "results.json").read_text())["selection"] == results["selection"]
    report = (tmp_path / "report.md").read_text()
    assert "![per-source scores](source_scores.png)" in report and "Target fine-tune" in report

    roles, kept = results["roles"], set(results["selection"])
    harmful = {s for s, r in roles.items() if r == "harmful"}
    helpful = {s for s, r in roles.items() if r == "helpful"}
    assert not kept & harmful, f"harmful sources kept: {kept & harmful}"
    assert kept & helpful, "no helpful source kept"
    # the sources it keeps really help: the target fine-tune on them beats fine-tuning on all sources
    final = results["final"]
    assert final["(b) selection"]["loss"] < final["(a) all sources"]["loss"]
    assert final["(b) selection"]["exact_match"] > final["(a) all sources"]["exact_match"]
    # the random-ensemble scores (mean estimated loss, lower = better) put every harmful source below every
    # helpful one (with output_fn="token_log_odds" a harmful source outscored two helpful ones)
    scores = results["scores"]
    assert max(scores[s] for s in helpful) < min(scores[s] for s in harmful), scores
    # the estimate orders real fine-tunes from θ* (7 subsets: all, selection, role groups, ...) clearly
    assert results["spearman"] > 0.5
