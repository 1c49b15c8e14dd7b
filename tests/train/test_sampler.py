"""SourceWeightedSampler: reproducible weighted draws."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select.train.sampler import SourceWeightedSampler
from hf_subset_select.train.weighted_loss import example_weights


def test_sampler_draws_by_weight_reproducibly(sources):
    w = example_weights(sources, {"add": 2.0, "sub": 1.0, "rev": 0.0})
    sampler = SourceWeightedSampler(w, num_samples=4000, seed=3)
    draws = list(sampler)
    again = list(
        SourceWeightedSampler(w, num_samples=4000, seed=3)
    )  # same seed -> same draws (all ranks agree)
    assert draws == again
    assert draws != list(sampler)  # next epoch draws anew
    counts = torch.bincount(torch.tensor(draws), minlength=len(w)).double()
    rev_rows = [i for i, s in enumerate(sources["source"]) if s == "rev"]
    assert all(counts[i] == 0 for i in rev_rows)
    expected = w / w.sum() * len(draws)
    assert torch.allclose(counts, expected, rtol=0.15, atol=30)
    assert len(SourceWeightedSampler(w)) == int((w > 0).sum())


@pytest.mark.parametrize("weights", [[], [0.0, 0.0], [1.0, -1.0], [float("nan")]])
def test_sampler_refuses_bad_weights(weights):
    with pytest.raises(ValueError, match="weights must"):
        SourceWeightedSampler(weights)
