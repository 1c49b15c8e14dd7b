"""The demo's toy tasks: construction, and ground-truth roles proven by single-source fine-tunes."""

from __future__ import annotations

import pytest

from hf_subset_select.demo.roles import check_roles, measure_roles
from hf_subset_select.demo.tasks import DEMO_VOCAB, ROLES, evaluate_target, make_demo_tasks


@pytest.fixture(scope="module")
def tasks():
    return make_demo_tasks("test", seed=0)


def _letters(prompt: str) -> list[str]:
    return prompt.split()[1:-1]


def test_structure_roles_and_tags(tasks, tmp_path):
    assert set(tasks.roles.values()) == set(ROLES)
    for role in ROLES:
        assert 2 <= len(tasks.sources_with_role(role)) <= 3
    assert set(tasks.train.column_names) >= {"prompt", "completion", "source", "example_id"}
    counts = {}
    for s in tasks.train["source"]:
        counts[s] = counts.get(s, 0) + 1
    assert list(counts) == [tasks.target, *tasks.sources]
    assert counts == {k: v for k, v in tasks.info["sizes"].items() if k not in ("target_test", "target_dev")}
    assert set(tasks.target_test["source"]) == {"target_test"}
    assert set(tasks.target_dev["source"]) == {"target_dev"}
    assert len(tasks.target_dev) == len(tasks.target_test) == tasks.info["sizes"]["target_test"]
    assert len(set(tasks.train["example_id"]) | set(tasks.target_test["example_id"])) == len(
        tasks.train
    ) + len(tasks.target_test)
    with pytest.raises(ValueError, match="choose one of"):
        make_demo_tasks("huge")
    with pytest.raises(ValueError, match="Unknown source"):
        tasks.subset(["nope"])
    sub = tasks.subset(["map"])
    assert set(sub["source"]) == {tasks.target, "map"}
    args = tasks.training_arguments(str(tmp_path))
    assert args.max_steps == tasks.training["max_steps"] > 0 and not args.remove_unused_columns
    assert args.label_smoothing_factor == tasks.training["label_smoothing"] > 0


def test_construction_matches_the_mechanisms(tasks):
    sigma = tasks.info["cipher"]
    rows = {name: tasks.subset([name], include_target=False) for name in tasks.sources}
    target = tasks.subset([])
    # The target's split shows 18 letters; its evaluation split needs all 26.
    seen = {c for p in target["prompt"] for c in _letters(p)}
    assert seen == set(tasks.info["target_letters"]) and len(seen) == 18
    assert {c for p in tasks.target_test["prompt"] for c in _letters(p)} == set(sigma)
    assert {c for p in tasks.target_dev["prompt"] for c in _letters(p)} == set(sigma)
    # No test input is ever trained on or seen by the method (dev), and no dev input is trained on.
    trained = {p for p in tasks.train["prompt"]}
    assert not trained & set(tasks.target_test["prompt"])
    assert not trained & set(tasks.target_dev["prompt"])
    assert not set(tasks.target_dev["prompt"]) & set(tasks.target_test["prompt"])

    def answers_follow(ds, table):
        return all(
            c.split() == [table[x] for x in _letters(p)] for p, c in zip(ds["prompt"], ds["completion"])
        )

    for name in ["enc_extra", "enc_pairs"]:
        assert rows[name]["prompt"][0].startswith("enc ") and answers_follow(rows[name], sigma)
    assert rows["map"]["prompt"][0].startswith("map ") and answers_follow(rows["map"], sigma)
    conflict = rows["enc_conflict"]
    assert conflict["prompt"][0].startswith("enc ")
    assert all(
        a != sigma[x]
        for p, c in zip(conflict["prompt"], conflict["completion"])
        for x, a in zip(_letters(p), c.split())
    )
    noise = rows["enc_noise"]
    agree = sum(
        a == sigma[x]
        for p, c in zip(noise["prompt"], noise["completion"])
        for x, a in zip(_letters(p), c.split())
    )
    assert agree < 0.15 * 3 * len(noise)  # about 1/26 by chance
    for name in tasks.sources_with_role("irrelevant"):
        words = {w for t in list(rows[name]["prompt"]) + list(rows[name]["completion"]) for w in t.split()}
        assert "enc" not in words and "map" not in words and not words & set(sigma)
    # Every word is in the vocabulary (no <unk>).
    vocab = set(DEMO_VOCAB)
    for ds in [tasks.train, tasks.target_dev, tasks.target_test]:
        assert all(set((p + c).split()) <= vocab for p, c in zip(ds["prompt"], ds["completion"]))


def test_deterministic_and_seeded():
    a, b, c = (
        make_demo_tasks("test", seed=0),
        make_demo_tasks("test", seed=0),
        make_demo_tasks("test", seed=1),
    )
    assert a.train["prompt"] == b.train["prompt"] and a.train["completion"] == b.train["completion"]
    assert a.train["example_id"] == b.train["example_id"]
    assert a.info["cipher"] != c.info["cipher"]


@pytest.mark.slow
def test_roles_are_real(tasks, one_thread):
    """Target + one source vs target alone (same base, budget and seeds), against the seed-to-seed noise."""
    report = measure_roles(tasks, seeds=(0, 1), source_seeds=(0, 1))
    noise = report["noise"]["loss_pooled_sd"]
    assert report["noise"]["configurations_pooled"] == 1 + len(tasks.sources)
    assert noise > 0.0  # seeds really change the runs (data order)
    problems = check_roles(report)
    assert not problems, "\n".join(problems)
    effects = {n: i["mean_delta_loss"] for n, i in report["sources"].items()}
    helpful = [effects[n] for n in tasks.sources_with_role("helpful")]
    harmful = [effects[n] for n in tasks.sources_with_role("harmful")]
    irrelevant = [effects[n] for n in tasks.sources_with_role("irrelevant")]
    # Spelled out: far beyond the noise for helpful/harmful, within a few noise widths for irrelevant,
    # and several times smaller than any helpful or harmful effect.
    assert max(helpful) < -4 * noise and min(harmful) > 4 * noise
    assert max(abs(d) for d in irrelevant) < 3 * noise
    assert max(abs(d) for d in irrelevant) < min(map(abs, helpful + harmful)) / 4
    # The accuracy agrees with the loss.
    acc = {n: i["mean_delta_token_accuracy"] for n, i in report["sources"].items()}
    assert all(acc[n] > 0.05 for n in tasks.sources_with_role("helpful"))
    assert all(acc[n] < -0.05 for n in tasks.sources_with_role("harmful"))


@pytest.mark.slow
def test_helpful_sources_beat_all_sources(tasks, one_thread):
    """The demo's comparison: target + helpful sources beats target + all sources (harmful ones included)."""
    helpful = tasks.finetune(tasks.make_model(), tasks.sources_with_role("helpful"), seed=0)
    everything = tasks.finetune(tasks.make_model(), tasks.sources, seed=0)
    assert helpful.steps == everything.steps == tasks.training["max_steps"]
    assert helpful.loss < everything.loss - 0.3
    assert helpful.token_accuracy > everything.token_accuracy + 0.05
    assert helpful.exact_match > everything.exact_match
    # evaluate_target agrees with the metrics returned by the fine-tune
    model = tasks.make_model()
    before = evaluate_target(model, tasks.tokenizer, tasks.target_test)
    assert before["loss"] > helpful.loss
