"""A new target against an existing training cache: only the target rows are computed, with the training cache's
θ*, projection, geometry and output function (checked, refused otherwise), and the estimates equal a full
recollection's."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import (
    CollectConfig,
    FirstOrderEstimator,
    GradientCache,
    GradientCollector,
    SelectConfig,
    select_sources,
    tag_sources,
    tag_target_eval,
)
from hf_subset_select.collect.compat import TargetCacheMismatchError
from hf_subset_select.demo.toy import (
    add_lora,
    make_tiny_causal_lm,
    make_tokenizer,
    perturb_lora,
    toy_text_dataset,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def _theta_star(seed: int = 0):
    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=seed)), seed=seed + 1)


def _pool():
    return tag_sources(
        {
            "add": toy_text_dataset("add", 12, seed=1),
            "sub": toy_text_dataset("sub", 10, seed=2),
            "rev": toy_text_dataset("rev", 8, seed=3),
        },
        target="add",
    )


def _config(**kw):
    base = {"proj_dim": 64, "proj_type": "rademacher", "batch_size": 4, "shard_size": 8}
    base.update(kw)
    return CollectConfig(**base)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """θ*, the tokenizer, a training cache (with the first target) and a second target's dataset."""
    root = tmp_path_factory.mktemp("target_only")
    model, tok = _theta_star(), make_tokenizer()
    first = tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")
    GradientCollector(_config(), _pool(), first, tok).collect(model, output_dir=root / "train")
    second = tag_target_eval(toy_text_dataset("sub", 7, seed=98), name="sub_eval")
    return {"root": root, "model": model, "tok": tok, "second": second}


def test_target_only_equals_a_full_recollection(collected):
    root, model, tok, second = (collected[k] for k in ("root", "model", "tok", "second"))
    collector = GradientCollector(target_dataset=second, tokenizer=tok, train_cache=root / "train")
    target = collector.collect(model, output_dir=root / "second")
    assert collector.stats["computed"] == 7  # the target's rows only, not the pool's 30
    assert target.num_examples == 7 and not bool(target.train_mask.any())
    assert target.manifest["train_cache"]["fingerprint"] == GradientCache.load(root / "train").fingerprint()
    assert GradientCache.load(root / "second").num_examples == 7

    full = GradientCollector(_config(), _pool(), second, tok).collect(model, output_dir=root / "full_second")
    rows = full.target_mask
    assert torch.equal(full.example_ids[rows], target.example_ids)
    torch.testing.assert_close(full.features[rows], target.features, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(full.outputs[rows], target.outputs, rtol=1e-5, atol=1e-6)

    train = GradientCache.load(root / "train")
    config = SelectConfig(num_subsets=64)
    new = select_sources(FirstOrderEstimator(train, target=root / "second"), config=config)
    ref = select_sources(FirstOrderEstimator(full), config=config)
    assert new.selected == ref.selected
    for s in ref.sources:
        assert new.scores[s] == pytest.approx(ref.scores[s], rel=1e-6, abs=1e-9)
    assert new.manifest["target_cache_fingerprint"] == target.fingerprint()
    # the baselines read the separate target's rows too
    grad_new = select_sources(FirstOrderEstimator(train, target=target), method="gradient_similarity")
    grad_ref = select_sources(FirstOrderEstimator(full), method="gradient_similarity")
    assert grad_new.scores == pytest.approx(grad_ref.scores, rel=1e-6)


@pytest.mark.parametrize(
    "change, field",
    [
        ({"seed": 5}, "projection.seed"),
        ({"proj_dim": 32}, "projection.dim"),
        ({"proj_type": "gaussian"}, "projection.kind"),
        ({"output_fn": "token_log_odds"}, "output_fn"),
        ({"prob_clamp": 1e-3}, "prob_clamp"),
        ({"max_length": 64}, "max_length"),
    ],
)
def test_a_differing_setting_is_refused_naming_the_field(collected, change, field):
    root, model, tok, second = (collected[k] for k in ("root", "model", "tok", "second"))
    collector = GradientCollector(
        _config(**change), target_dataset=second, tokenizer=tok, train_cache=root / "train"
    )
    with pytest.raises(TargetCacheMismatchError, match=f"in '{field}'.*Fix:") as info:
        collector.collect(model, output_dir=root / f"refused_{field}")
    assert info.value.field == field
    assert not (root / f"refused_{field}").exists()  # refused before anything is computed or written


def test_another_theta_or_geometry_is_refused(collected):
    root, tok, second = collected["root"], collected["tok"], collected["second"]
    other = _theta_star(seed=7)  # same architecture, other parameters
    with pytest.raises(TargetCacheMismatchError, match="'theta_fingerprint'.*same θ\\*") as info:
        GradientCollector(target_dataset=second, tokenizer=tok, train_cache=root / "train").collect(
            other, output_dir=root / "other_theta"
        )
    assert info.value.field == "theta_fingerprint"
    model = collected["model"]
    scale = {n: torch.full_like(p, 0.5) for n, p in model.named_parameters() if p.requires_grad}
    with pytest.raises(TargetCacheMismatchError, match="'precondition.kind'") as info:
        GradientCollector(
            _config(precondition="auto"), target_dataset=second, tokenizer=tok, train_cache=root / "train"
        ).collect(model, output_dir=root / "other_geometry", preconditioner=scale)
    assert info.value.field == "precondition.kind"


def test_mixing_train_dataset_and_train_cache_is_refused(collected):
    with pytest.raises(ValueError, match="either train_dataset=.*or train_cache="):
        GradientCollector(
            target_dataset=collected["second"], train_dataset=_pool(), train_cache=collected["root"] / "train"
        )


def test_the_estimator_refuses_an_incompatible_target_cache(collected):
    root = collected["root"]
    train = GradientCache.load(root / "train")
    target = train.take(train.target_mask)
    FirstOrderEstimator(train, target=target)  # its own target rows: compatible
    for key, value, field in (
        ("theta_fingerprint", "0" * 64, "theta_fingerprint"),
        ("output_fn", "token_log_odds", "output_fn"),
        ("projection", {**train.manifest["projection"], "seed": 9}, "projection.seed"),
    ):
        bad = target.replace(manifest={**target.manifest, key: value})
        with pytest.raises(TargetCacheMismatchError, match=f"'{field}'") as info:
            FirstOrderEstimator(train, target=bad)
        assert info.value.field == field
