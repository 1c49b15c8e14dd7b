"""Checks against the real thing: calibration on real fine-tuning results, the forward check on the real model."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate import calibrate, forward_check


def test_calibrate_recovers_l2_and_step_scale():
    cache = make_synthetic_cache(dim=16, seed=8)
    est = FirstOrderEstimator(cache)
    lam = est.resolved_l2()
    truth_model = FirstOrderEstimator(cache, EstimatorConfig(l2=lam * 10.0, step_scale=0.5))
    calib = [
        ["aligned_0"],
        ["opposed_0"],
        ["aligned_1", "opposed_1"],
        ["orthogonal_0"],
        ["aligned_0", "orthogonal_1"],
    ]
    truth = {tuple(s): float(v) for s, v in zip(calib, truth_model.estimate(calib))}
    report = calibrate(est, truth)
    assert report["mean_relative_error_after"] < 0.1 * report["mean_relative_error_before"]
    assert report["mean_relative_error_after"] < 1e-3
    held_out = [["aligned_1"], ["opposed_1", "orthogonal_0"]]
    assert torch.allclose(est.estimate(held_out), truth_model.estimate(held_out), rtol=5e-3)
    assert est.l2 == report["l2"] and est.step_scale == report["step_scale"]
    with pytest.raises(ValueError, match="finite, positive"):
        calibrate(est, {("aligned_0",): float("nan")})
    with pytest.raises(ValueError, match="at least one"):
        calibrate(est, {})


def test_forward_check_matches_linear_estimate_for_small_steps(tmp_path, tokenizer, toy_sources):
    """θ* + P·ŵ evaluated for real agrees with the linearized estimate when the step is small."""
    from hf_subset_select import CollectConfig, GradientCollector
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm

    train, target_eval = toy_sources
    model = add_lora(make_tiny_causal_lm("gpt2", vocab_size=len(tokenizer), seed=0))
    collector = GradientCollector(
        CollectConfig(proj_dim=64, proj_type="rademacher", max_length=32, batch_size=8),
        train_dataset=train,
        target_dataset=target_eval,
        tokenizer=tokenizer,
    )
    cache = collector.collect(model, tokenizer, output_dir=tmp_path / "cache")
    est = FirstOrderEstimator(cache, EstimatorConfig(trust_radius=0.05))
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    subsets = [["sub"], ["rev"], ["sub", "rev"]]
    real = forward_check(est, model, subsets, target_eval, tokenizer=tokenizer)
    linear = est.estimate(subsets)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())  # restored
    moved = (linear - est.base_loss).abs()
    assert bool((moved > 0).all())
    assert float(((real - linear).abs() / moved).max()) < 0.2
    # the step along -ŵ moves the real loss the other way round
    est.step_scale = 0.0
    assert torch.allclose(
        forward_check(est, model, subsets[:1], target_eval, tokenizer=tokenizer),
        torch.tensor([est.base_loss], dtype=torch.float64),
        rtol=1e-4,
    )
