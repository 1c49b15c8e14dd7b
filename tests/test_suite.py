"""The real-task selection suite's code path end to end on the tiny GPT-2 cipher task (toy data, offline)."""

from __future__ import annotations

import json
import os
import sys
from argparse import Namespace
from pathlib import Path
from typing import Any

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "recipes", "benchmarks")
if BENCH not in sys.path:
    sys.path.insert(0, BENCH)

KEEP = ("same_task", "lookup", "conflict", "half_conflict", "noise")  # fewer sources: fewer fine-tunes
SETTINGS = {"seeds": 2, "steps": 2, "lr": 1e-3, "batch_size": 4, "meta_epochs": 1, "max_length": 16}


def toy_task() -> Any:
    """The multi-token cipher task with its evaluation rows split into ``dev`` and ``test``, scored by exact match."""
    from harness.tasks import TaskData
    from tasks.cipher import CipherTask, make_multi_token_tasks
    from tasks.wordnet_suite import GenerationTask

    from hf_subset_select import tag_target_eval

    class ToyCipher(CipherTask):
        name = "toy"
        metric = "exact_match"
        model_path = Path("tiny-gpt2")  # a Path, as the model packages return
        score = GenerationTask.score

        def build(self, seed: int) -> TaskData:
            built = make_multi_token_tasks(seed, self.per_source, self.target_train, 2 * self.target_eval)
            rows = built["target_eval"].remove_columns(["source", "example_id"])
            half = len(rows) // 2
            dev = tag_target_eval(rows.select(range(half)), "target_dev")
            test = tag_target_eval(rows.select(range(half, len(rows))), "target_test")
            roles = {s: r for s, r in built["roles"].items() if s in KEEP}
            train = built["train"].filter(lambda r: r["source"] in {"target", *KEEP})
            return TaskData(train=train, dev=dev, test=test, roles=roles)

    return ToyCipher("multi_token", per_source=8, target_train=8, target_eval=8)


@pytest.fixture
def tiny_lm(tmp_path: Any) -> Any:
    """A tiny GPT-2 causal LM and its tokenizer saved as one checkpoint directory (stands in for Gemma)."""
    from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer

    tok = make_tokenizer()
    make_tiny_causal_lm("gpt2", vocab_size=len(tok)).save_pretrained(tmp_path / "lm")
    tok.save_pretrained(tmp_path / "lm")
    return tmp_path / "lm"


@pytest.fixture
def one_thread() -> Any:
    """One torch thread for the test (restored afterwards)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.usefixtures("one_thread")
def test_suite_end_to_end(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    import suite
    import suite_runs

    import hf_subset_select

    task = toy_task()
    seen: dict[str, set] = {"collector": set(), "methods": set()}

    class SpyCollector(hf_subset_select.GradientCollector):
        def __init__(self, config: Any, *, train_dataset: Any, target_dataset: Any, **kwargs: Any) -> None:
            seen["collector"] |= set(train_dataset["example_id"]) | set(target_dataset["example_id"])
            super().__init__(config, train_dataset=train_dataset, target_dataset=target_dataset, **kwargs)

    monkeypatch.setattr(hf_subset_select, "GradientCollector", SpyCollector)
    real_select = suite_runs.select_methods

    def spy_select(cache: Any, spec: Any, draws: int) -> Any:
        seen["methods"] |= {int(i) for i in cache.example_ids}
        return real_select(cache, spec, draws)

    monkeypatch.setattr(suite, "select_methods", spy_select)
    out = tmp_path / "suite.json"
    args = Namespace(
        output=str(out),
        seed=0,
        random_draws=3,
        fidelity_subsets=8,
        ablation_seeds=2,
        oracle_tasks="toy",
        quick=True,
    )
    suite.run_suite({"toy": (task, SETTINGS)}, args, causal={"toy"})
    result = json.loads(out.read_text())

    entry = result["tasks"]["toy"]
    test_ids = set(task.build(0).test["example_id"])
    assert seen["collector"] and seen["methods"]
    assert not test_ids & seen["collector"] and not test_ids & seen["methods"]
    assert entry["split_check"]["test_rows_in_cache"] == 0
    assert os.path.exists(os.path.join(entry["cache"]["path"], "manifest.json"))  # kept for suite_posthoc.py
    import suite_posthoc

    later = suite_posthoc.analyse("toy", entry["cache"]["path"], str(out))
    assert set(later["variants"]) == set(suite_runs.VARIANTS)
    # the fidelity figures recomputed from the kept cache and the run's real dev losses are the run's own
    assert later["reproduces_suite"]["selection"] and later["reproduces_suite"]["variants"]
    assert later["reproduces_suite"]["budget_estimates_max_abs_diff"] == 0.0
    for name, figures in later["fidelity"]["calibrated"].items():
        assert figures["estimates"] == pytest.approx(entry["fidelity"]["calibrated"][name]["estimates"])
    for variant, sources in later["variants"].items():  # the same selections as the run made
        assert sorted(sources) == sorted(entry["methods"][f"variant/{variant}"]["sources"])
    single = later["single_source"]
    assert set(single["measured_metric_change"]) == set(entry["ablations"]) and single["num_sources"] == len(
        KEEP
    )
    for name in (
        "ours",
        "ours_weighted",
        "ours@base",
        "target_only",
        "all_sources",
        "all_sources@base",
        "random",
    ):
        m = entry["methods"][name]
        assert {"test_metric_mean", "test_metric_std", "sources"} <= set(m)
        assert sorted(m["per_seed"]) == ["0", "1"]  # paired seeds: the same for every method
    for name in (
        "gradient_similarity",
        "gradient_similarity_own",
        "representation_similarity",
        "representation_similarity_own",
        "oracle",
        "random/2",
    ):
        assert name in entry["methods"]
    from hf_subset_select import GradientCache
    from hf_subset_select.select.baselines import (
        gradient_similarity_selection,
        representation_similarity_selection,
    )

    # both similarities at their own keep rule (above the mean cosine), not at ours' k
    cache = GradientCache.load(entry["cache"]["path"])
    own = gradient_similarity_selection(cache)
    assert entry["methods"]["gradient_similarity_own"]["sources"] == list(own.selected)
    own = representation_similarity_selection(cache)
    assert entry["methods"]["representation_similarity_own"]["sources"] == list(own.selected)
    own_rule = ("gradient_similarity_own", "representation_similarity_own")
    at_k = ("gradient_similarity", "representation_similarity")
    for key, sims in (("best_similarity", at_k + own_rule), ("best_similarity_own_rule", own_rule)):
        best = max(sims, key=lambda n: entry["methods"][n]["test_metric_mean"])
        assert entry["ours_vs"][key]["method"] in sims
        assert (
            entry["methods"][entry["ours_vs"][key]["method"]]["test_metric_mean"]
            == (entry["methods"][best]["test_metric_mean"])
        )
    for baseline in ("all_sources", "target_only", "random", "best_similarity", "best_similarity_own_rule"):
        diff = entry["ours_vs"][baseline]
        assert {"diff_mean", "ci_low", "ci_high"} <= set(diff) and diff["seeds"] == [0, 1]
        assert diff["ci_low"] <= diff["diff_mean"] <= diff["ci_high"]
    ours, other = entry["methods"]["ours"]["per_seed"], entry["methods"]["all_sources"]["per_seed"]
    expected = sum(ours[s] - other[s] for s in ours) / len(ours)
    assert entry["ours_vs"]["all_sources"]["diff_mean"] == pytest.approx(expected)
    assert {"budget_spearman", "budget_mean_relative_error", "no_change_mean_relative_error"} <= set(
        entry["fidelity"]
    )
    fid = entry["fidelity"]
    assert len(fid["subsets"]) >= 8
    assert set(fid["calibrated"]) == {"default", "lambda_only"}
    for figures in fid["calibrated"].values():  # leave one out: one calibration and one estimate per subset
        assert len(figures["estimates"]) == len(figures["folds"]) == len(fid["subsets"])
        assert {"spearman", "mean_relative_error", "spearman_metric"} <= set(figures)
    assert fid["calibrated_spearman"] == fid["calibrated"]["default"]["spearman"]
    assert len(fid["real_dev_metric"]) == len(fid["subsets"])
    assert {"gain_fraction", "speedup", "speedup_cpu"} <= set(entry["oracle"])
    cpu = entry["seconds"]["ours_end_to_end_cpu"]
    assert cpu > 0 and entry["oracle"]["speedup_cpu"] == pytest.approx(entry["oracle"]["cpu_seconds"] / cpu)
    assert entry["model"] == "tiny-gpt2" and result["complete"]
    assert set(entry["ablations"]) == set(task.build(0).roles)
    summary = result["summary"]
    for key in (
        "num_tasks",
        "num_causal_lm_tasks",
        "beats_all_sources",
        "beats_target_only",
        "beats_random",
        "beats_best_similarity",
        "significant_wins_vs_best_similarity",
        "significant_wins_vs_similarity_own_rule",
        "oracle_gain_fraction_min",
        "end_to_end_speedup_min",
        "end_to_end_speedup_cpu_min",
        "budget_spearman_min",
        "calibrated_spearman_min",
        "frozen_commit",
    ):
        assert key in summary
    assert summary["calibrated_spearman_min"] == fid["calibrated_spearman"]
    assert summary["num_tasks"] == 1 and summary["num_causal_lm_tasks"] == 1
    assert result["environment"]["git"]["commit"] == summary["frozen_commit"]
    for variant in suite_runs.VARIANTS:  # our other selectors, reported beside the default
        assert entry["methods"][f"variant/{variant}"]["test_metric_mean"] is not None
        assert f"variant/{variant}" in entry["ours_vs"]

    # tasks run in separate processes merge into one file, the summary over all of them
    other = json.loads(out.read_text())
    other["tasks"] = {"toy2": {**entry, "causal_lm": False}}
    (tmp_path / "other.json").write_text(json.dumps(other))
    merged = suite.merge([str(out), str(tmp_path / "other.json")], str(tmp_path / "merged.json"))
    assert set(merged["tasks"]) == {"toy", "toy2"} and merged["tasks"]["toy"]["run"]["file"] == "suite.json"
    assert merged["summary"]["num_tasks"] == 2 and merged["summary"]["num_causal_lm_tasks"] == 1
    assert merged["summary"]["frozen_commit"] == summary["frozen_commit"]
    assert (
        merged["summary"]["beats_all_sources"]["ties"]
        + merged["summary"]["beats_all_sources"]["wins"]
        + (merged["summary"]["beats_all_sources"]["losses"])
        == 2
    )
    with pytest.raises(ValueError, match="more than one"):
        suite.merge([str(out), str(out)], str(tmp_path / "twice.json"))
    # a merged file merges again (a rerun task beside the others): its tasks keep the run they were measured in
    other["tasks"] = {"toy3": {**entry, "causal_lm": False}}
    other["summary"]["frozen_commit"] = "rerun-commit"
    (tmp_path / "rerun.json").write_text(json.dumps(other))
    again = suite.merge(
        [str(tmp_path / "merged.json"), str(tmp_path / "rerun.json")], str(tmp_path / "again.json")
    )
    assert again["tasks"]["toy"]["run"] == merged["tasks"]["toy"]["run"]
    assert (
        again["tasks"]["toy3"]["run"]["commit"] == "rerun-commit"
        and again["summary"]["frozen_commit"] is None
    )
    assert (
        again["summary"]["commits"]["toy2"] == summary["frozen_commit"] and again["summary"]["num_tasks"] == 3
    )

    from suite_report import report  # the markdown tables docs/benchmarks.md shows

    text = report(merged)
    ours_row = next(line for line in text.splitlines() if line.startswith("| ours |"))
    assert ours_row.count("±") == 2  # one cell per task
    assert "| toy2 |" in text and "ours vs best_similarity" in text


def test_paired_needs_matching_seeds() -> None:
    from suite_runs import paired

    with pytest.raises(ValueError, match="different seeds"):
        paired({0: 1.0, 1: 0.5}, {0: 1.0, 2: 0.5})


@pytest.mark.skipif(not os.path.exists("/usr/share/wordnet/data.noun"), reason="needs Debian's wordnet-base")
@pytest.mark.usefixtures("one_thread")
def test_generation_tasks_take_any_causal_lm(tmp_path: Any, tiny_lm: Any) -> None:
    """--gemma-path: the causal-LM task classes run on a tiny offline model (splits, rows, fine-tune, scores)."""
    import suite
    from harness.training import train_steps

    args = suite.parse_args(["--output", str(tmp_path / "x.json"), "--quick", "--gemma-path", str(tiny_lm)])
    for name in ("lexcat_gemma", "antonym_gemma"):
        task, settings = suite.make_task(name, args)
        data = task.build(0)
        prompts = {
            s: set(d["prompt"]) for s, d in (("train", data.train), ("dev", data.dev), ("test", data.test))
        }
        assert not prompts["test"] & (prompts["train"] | prompts["dev"])
        assert 6 <= len(data.candidates) <= 12 and len(data.test) > 0
        model = task.make_model(0)
        rows = task.rows(data.train)
        train_steps(model, [p for p in model.parameters() if p.requires_grad], rows, task.collate,
                    steps=1, lr=1e-3, batch_size=settings["batch_size"], seed=0)  # fmt: skip
        scored = task.score(model, task.rows(data.test))
        assert 0.0 <= scored["exact_match"] <= 1.0 and scored["completion_loss"] > 0 and scored["loss"] > 0


def test_posthoc_variants_share_the_fine_tunes_of_the_same_subset() -> None:
    """A variant selected after the run takes the seeds of the plain method that fine-tuned the same subset (never
    of weight mode or another start), or is listed as not run."""
    import suite

    entry = {
        "methods": {
            "ours": {"sources": ["a", "b"], "per_seed": {"0": 0.5, "1": 0.6}},
            "target_only": {"sources": [], "per_seed": {"0": 0.4, "1": 0.7}},
            "ours_weighted": {"sources": ["a", "b"], "weights": {"a": 1.0}, "per_seed": {"0": 0.1, "1": 0.1}},
            "ours@base": {"sources": ["c"], "start": "base", "per_seed": {"0": 0.2, "1": 0.2}},
        },
        "ours_vs": {},
    }
    suite.fill_variants(entry, {"confident": ["b", "a"], "careful": [], "other": ["c"]})
    assert entry["methods"]["variant/confident"]["same_subset_as"] == "ours"
    assert entry["methods"]["variant/careful"]["per_seed"] == {"0": 0.4, "1": 0.7}
    assert entry["ours_vs"]["variant/careful"]["diff_mean"] == pytest.approx(0.0)
    assert entry["variants_not_run"] == {
        "variant/other": ["c"]
    }  # only ours@base trained ["c"]: another start


def test_finetuner_trains_on_explicit_example_ids() -> None:
    """Finetuner.run(examples=...): target rows + the named rows; an id set made of whole sources is the same run
    (memo) as those sources, and source-level keys are unchanged."""
    from suite_runs import Finetuner, FinetuneSpec

    trained: list[list[int]] = []

    class FakeTask:
        metric = "accuracy"

        def finetune(self, model: Any, params: Any, rows: Any, **kw: Any) -> None:
            trained.append([r["example_id"] for r in rows])

        def score(self, model: Any, rows: Any) -> dict[str, float]:
            return {"accuracy": float(len(trained[-1])), "loss": 0.0}

    tuner = Finetuner.__new__(Finetuner)
    tuner.task, tuner.spec, tuner.theta_star, tuner.model = FakeTask(), FinetuneSpec(1, 1e-3, 2), {}, None
    tuner.params, tuner.fresh, tuner.memo, tuner.seconds, tuner.count, tuner.splits_scored = (
        {},
        {},
        {},
        0.0,
        0,
        [],
    )
    tuner._eval = {"test": [], "dev": []}
    names = ["a"] * 4 + ["b"] * 4 + ["target"] * 2
    tuner.train_rows = [{"source": s, "example_id": i} for i, s in enumerate(names)]

    assert tuner.canonical((), [4, 5, 6, 7]) == (("b",), None)
    assert tuner.canonical(("a",), [5, 1]) == (("a",), frozenset({5}))
    assert tuner.run((), 0, examples=[5, 1])["metric"] == 4.0  # target 8, 9 + rows 1, 5
    assert trained[-1] == [1, 5, 8, 9]
    whole = tuner.run((), 0, examples=[4, 5, 6, 7])
    assert trained[-1] == [4, 5, 6, 7, 8, 9] and tuner.count == 2
    assert tuner.run(("b",), 0) == whole and tuner.count == 2  # the same fine-tune, memoized
    assert ("theta_star", ("b",), None, 0, "test") in tuner.memo  # the source-level key, as before
    assert tuner.run((), 0, examples=[]) == tuner.run((), 0) and tuner.count == 3  # nothing kept: target only


def test_granularity_units_from_one_cache() -> None:
    """granularity_suite.select_units: per-source, per-example, LESS cosine with as many rows, and clusters whose
    sizes and compositions add up, all from one synthetic cache."""
    import torch
    from granularity_suite import select_units
    from suite_runs import FinetuneSpec

    from hf_subset_select.demo.synthetic import make_synthetic_cache

    cache = make_synthetic_cache(2, 1, 1, dim=16, examples_per_source=30, seed=1)
    # the meta-training AdamW's step scalars, which a real collection records (the budget λ rule needs them)
    g, resid = (
        cache.features.double()[cache.train_mask],
        torch.sigmoid(-cache.outputs.double()[cache.train_mask]),
    )
    energy = float(((resid[:, None] * g) ** 2).sum(1).mean())
    scalars = {"denominator": 0.02, "sum_denominator": 3.0, "sum_second_moment": energy}
    cache.manifest["precondition"] = {"kind": "none", "adam_scalars": scalars}
    methods, seconds = select_units(cache, FinetuneSpec(20, 1e-3, 4), [3])
    n = methods.pop("_num_candidate_rows")["value"]
    assert n == 120 and set(seconds) == {"per_source", "per_example", "less_cosine", "clusters_3"}
    assert methods["target_only"]["rows_kept"] == 0
    assert methods["per_source"]["rows_kept"] == 30 * len(methods["per_source"]["sources"])
    assert 0 < methods["per_example"]["rows_kept"] == methods["less_cosine"]["rows_kept"] < n
    kept = methods["per_example"]["kept_per_source"]
    assert kept["aligned_0"] > kept["opposed_0"]
    c = methods["clusters_3"]
    assert sum(c["cluster_sizes"].values()) == n
    assert {k: sum(v.values()) for k, v in c["cluster_composition"].items()} == c["cluster_sizes"]
    assert c["rows_kept"] == sum(c["cluster_sizes"][k] for k in c["selected_clusters"])


@pytest.mark.skipif(not os.path.exists("/usr/share/wordnet/data.noun"), reason="needs Debian's wordnet-base")
@pytest.mark.usefixtures("one_thread")
def test_objective_comparison_runs_on_a_tiny_causal_lm(tmp_path: Any, tiny_lm: Any) -> None:
    """suite_objective.py: both outputs collected from one run, dev-only analysis, then the test fine-tunes."""
    import suite_objective

    from hf_subset_select import GradientCache

    out = tmp_path / "objective.json"
    suite_objective.main(
        ["--output", str(out), "--quick", "--tasks", "lexcat_gemma", "--gemma-path", str(tiny_lm),
         "--fidelity-subsets", "3", "--threads", "1", "--suite-json", str(tmp_path / "absent.json")]
    )  # fmt: skip
    entry = json.loads(out.read_text())["tasks"]["lexcat_gemma"]
    assert entry["split_check"]["test_rows_in_cache"] == 0
    n_dev = len(entry["dev"]["subsets"])
    assert entry["split_check"]["splits_scored"]["dev"] == n_dev >= 3 + 1 + 7
    for name in suite_objective.OUTPUTS:
        cache = GradientCache.load(entry["cache_dirs"][name])
        assert cache.manifest["output_fn"] == name
        o = entry["outputs"][name]
        assert len(o["estimates"]) == n_dev and -1.0 <= o["budget_spearman"] <= 1.0
    # the two outputs differ on the same rows (the margin is not the log-odds)
    a, b = (entry["dev"]["loss"][n] for n in suite_objective.OUTPUTS)
    assert a != b
    assert set(entry["test"]) >= {"target_only", "ours/sequence_margin", "ours/sequence_log_odds"}
    assert entry["margin_ours_vs"]["target_only"]["seeds"] == [0, 1] and entry["reproduces_suite"] is None


@pytest.mark.skipif(not os.path.exists("/usr/share/wordnet/data.noun"), reason="needs Debian's wordnet-base")
@pytest.mark.usefixtures("one_thread")
def test_regime_comparison_scores_each_budget_on_dev_only(tmp_path: Any, tiny_lm: Any) -> None:
    """suite_regime.py: one θ* and cache, each fine-tune budget's own real dev losses and budget-λ estimates."""
    import suite_regime
    from harness.stats import mean_relative_error

    out = tmp_path / "regime.json"
    suite_regime.main(
        ["--output", str(out), "--quick", "--task", "lexcat_gemma", "--gemma-path", str(tiny_lm),
         "--fidelity-subsets", "3", "--threads", "1", "--specs", "suite,3x5e-3"]
    )  # fmt: skip
    entry = json.loads(out.read_text())["tasks"]["lexcat_gemma"]
    assert entry["split_check"] == {"splits_scored": {"dev": entry["split_check"]["splits_scored"]["dev"], "test": 0},
                                    "test_rows_in_cache": 0}  # fmt: skip
    suite, short = entry["specs"]["suite"], entry["specs"]["3x5e-3"]
    assert (suite["steps"], suite["lr"]) == (entry["settings"]["steps"], entry["settings"]["lr"])
    assert (short["steps"], short["lr"]) == (3, 5e-3)
    n = len(entry["subsets"])
    assert n >= 3 + 1 + 7 and [] in entry["subsets"]
    for spec in (suite, short):
        assert len(spec["real_dev_loss"]) == len(spec["estimates"]) == n
        # the figures are those of this budget's own real losses and estimates
        assert spec["all_subsets"]["budget_mean_relative_error"] == pytest.approx(
            mean_relative_error(spec["estimates"], spec["real_dev_loss"])
        )
        assert spec["target_only_dev"]["loss"] == spec["real_dev_loss"][entry["subsets"].index([])]
        assert len(spec["fidelity"]["estimated_dev_loss"]) == 3
    # another budget is another fine-tune and another λ
    assert suite["budget_l2"] != short["budget_l2"] and suite["real_dev_loss"] != short["real_dev_loss"]
    with pytest.raises(ValueError, match="STEPSxLR"):
        suite_regime.parse_spec("ten-steps", entry["settings"])
    # the exact-match proxies from the same run's cache: the loss proxy is the run's own estimate-vs-metric ranking
    import suite_proxies

    proxies_out = tmp_path / "proxies.json"
    suite_proxies.main(["--regime", str(out), "--output", str(proxies_out)])
    proxy = json.loads(proxies_out.read_text())["tasks"]["lexcat_gemma"]
    assert set(proxy) == {"suite", "3x5e-3"}
    for name, figures in proxy.items():
        assert figures["reproduces_regime"]
        assert figures["spearman_vs_dev_metric"]["loss"] == pytest.approx(
            entry["specs"][name]["all_subsets"]["spearman_estimate_vs_dev_metric"], nan_ok=True
        )  # nan when the tiny model's dev metric is the same for every subset
        assert all(0.0 <= v <= 1.0 for v in figures["values"]["hard"] + figures["values"]["soft"])
    with pytest.raises(ValueError, match="TASK=DIR"):
        suite_proxies.main(["--regime", str(out), "--output", str(proxies_out), "--cache", "nowhere"])


def test_oracle_gain_fraction_is_undefined_when_the_oracle_gains_nothing() -> None:
    """Two losses against target only must not read as a fraction of a gain."""
    import suite

    assert suite.gain_fraction(0.03, 0.04) == pytest.approx(0.75)
    assert suite.gain_fraction(-0.01, 0.04) == pytest.approx(-0.25)
    assert suite.gain_fraction(-0.03, -0.06) is None and suite.gain_fraction(0.02, 0.0) is None
    entry = {
        "ours_vs": {b: {"diff_mean": 0.0, "ci_low": 0.0, "ci_high": 0.0} for b in suite.BASELINES},
        "methods": {"ours": {"test_metric_mean": 0.5}},
        "fidelity": {"budget_spearman": 0.5},
        "start_point": {"ours": "theta_star", "all_sources": "base"},
        "oracle": {"test_gain": -0.06, "ours_test_gain": -0.03, "gain_fraction": 0.5, "speedup": 20.0},
    }
    summary = suite.summarize({"t": entry}, 0, {"commit": "c", "dirty": False})
    assert entry["oracle"]["gain_fraction"] is None and summary["oracle_gain_fraction_min"] is None
    assert summary["oracle_tasks"] == 1 and summary["oracle_tasks_without_test_gain"] == 1


def test_held_out_calibration_recovers_a_known_lambda_and_never_sees_the_estimated_subset() -> None:
    """Real losses made by the estimator itself at another λ and step scale: calibrating on the other subsets finds
    them, so the held-out estimates match; and a wild loss for one subset moves the others' estimates, not its own."""
    from harness.estimation import with_l2
    from harness.fidelity import held_out_calibration

    from hf_subset_select import EstimatorConfig, FirstOrderEstimator
    from hf_subset_select.demo.synthetic import make_synthetic_cache

    cache = make_synthetic_cache(seed=3)
    est = FirstOrderEstimator(cache, EstimatorConfig())
    names = list(est.sources)
    subsets = [tuple(names[i : i + k]) for k in (1, 2, 3) for i in range(0, len(names) - k + 1, 2)][:9]
    start = est.resolved_l2()
    with_l2(est, start * 10.0, 1.0)
    truth = est.estimate([list(s) for s in subsets]).tolist()
    with_l2(est, start)
    out = held_out_calibration(
        est, subsets, truth, base=max(truth) * 1.5, other=truth, start_l2=start, fit_step_scale=False
    )
    assert out["mean_relative_error"] < 1e-3 and out["spearman"] == pytest.approx(1.0)
    assert all(f["l2"] == pytest.approx(start * 10.0) for f in out["folds"])
    assert (est.l2, est.step_scale) == (start, 1.0)  # restored

    wild = list(truth)
    wild[0] = truth[0] * 50.0
    out_wild = held_out_calibration(
        est, subsets, wild, base=max(truth) * 1.5, other=truth, start_l2=start, fit_step_scale=False
    )
    assert out_wild["estimates"][0] == pytest.approx(out["estimates"][0], rel=1e-6)
    assert out_wild["mean_relative_error"] > out["mean_relative_error"]
    with pytest.raises(ValueError, match="at least 3 subsets"):
        held_out_calibration(est, subsets[:2], truth[:2], base=1.0, other=truth[:2], start_l2=start)


def test_meta_training_keeps_its_own_lr_and_skipped_parts_are_listed(monkeypatch: pytest.MonkeyPatch) -> None:
    """θ* is trained at ``meta_lr`` while the target fine-tunes (and their budget λ) use ``lr``; ``--skip`` refuses a
    part it does not know before anything runs, and a task run without fidelity is named in the summary instead of
    counting as a Spearman."""
    import suite

    with pytest.raises(ValueError, match="choose from"):
        suite.parse_args(["--output", "x.json", "--skip", "oracle"])
    assert suite.parse_args(["--output", "x.json", "--skip", "ablations"]).skip == "ablations"
    assert suite.CAUSAL_LM["meta_lr"] != suite.CAUSAL_LM["lr"]

    class Stop(Exception):
        pass

    seen: dict[str, Any] = {}

    def spy(work: str, **kwargs: Any) -> Any:
        seen.update(kwargs)
        raise Stop

    monkeypatch.setattr(suite, "meta_training_arguments", spy)
    task = toy_task()
    with pytest.raises(Stop):
        suite.collect(task, task.build(0), {**SETTINGS, "lr": 2.5e-4, "meta_lr": 1e-3}, 0)
    assert seen["lr"] == 1e-3
    seen.clear()
    with pytest.raises(Stop):  # a task without meta_lr meta-trains at its fine-tune's lr, as before
        suite.collect(task, task.build(0), SETTINGS, 0)
    assert seen["lr"] == SETTINGS["lr"]

    entry = {
        "ours_vs": {b: {"diff_mean": 0.0, "ci_low": 0.0, "ci_high": 0.0} for b in suite.BASELINES},
        "methods": {"ours": {"test_metric_mean": 0.5}},
        "start_point": {"ours": "theta_star", "all_sources": "base"},
        "skipped": ["ablations", "fidelity"],
    }
    with_fidelity = {**entry, "fidelity": {"budget_spearman": 0.4}, "skipped": []}
    summary = suite.summarize({"t": entry, "u": with_fidelity}, 0, {"commit": "c", "dirty": False})
    assert summary["tasks_without_fidelity"] == ["t"] and summary["budget_spearman_min"] == 0.4


def test_posthoc_rebuild_refuses_a_run_whose_meta_training_lr_differs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A result written before ``meta_lr`` existed meta-trained at its ``lr``: rebuilding its cache with code that
    meta-trains at another rate would give another θ*, so it stops and names the setting."""
    import suite
    import suite_posthoc

    monkeypatch.setattr(suite, "make_task", lambda name, args: (None, dict(suite.CAUSAL_LM)))
    monkeypatch.setattr(suite, "collect", lambda *a: pytest.fail("collected although the settings differ"))
    older = {k: v for k, v in suite.CAUSAL_LM.items() if k != "meta_lr"}  # meta-trained at its lr, 2.5e-4
    with pytest.raises(ValueError, match="meta_lr=0.001 differs from the run's 0.00025"):
        suite_posthoc.rebuild_cache("lexcat_gemma", {"settings": older})
