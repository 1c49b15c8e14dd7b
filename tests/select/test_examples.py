"""Per-example scores and selections: planted harmful examples rank worst, the derivative is the true one, the
selection round-trips through JSON tied to its cache, and apply / collator / weighted sampling read example ids."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F

from hf_subset_select import (
    EstimatorConfig,
    FirstOrderEstimator,
    SourceSelection,
    SubsetSelectingDataCollator,
)
from hf_subset_select.demo.synthetic import make_synthetic_cache, plant_harmful_examples
from hf_subset_select.select.examples import example_cosines, example_effects, select_examples
from hf_subset_select.train.weighted_loss import example_weights

ALIGNED = ["aligned_0", "aligned_1"]


@pytest.fixture(scope="module")
def planted():
    base = make_synthetic_cache(2, 1, 1, dim=24, examples_per_source=60, seed=3)
    cache, ids = plant_harmful_examples(base, ALIGNED, 0.1, seed=0)
    return cache, ids, FirstOrderEstimator(cache, EstimatorConfig())


def _planted_and_clean(scored, cache, ids):
    is_planted = torch.isin(scored.example_ids, ids)
    clean = torch.tensor([cache.manifest["roles"][s] == "aligned" for s in scored.sources]) & ~is_planted
    return is_planted, clean


def test_planted_examples_rank_worst(planted):
    cache, ids, est = planted
    scored = example_effects(est)
    is_planted, clean = _planted_and_clean(scored, cache, ids)
    assert int(is_planted.sum()) == 12
    # every planted example raises the estimated target loss more than any clean aligned example
    assert float(scored.scores[is_planted].min()) > float(scored.scores[clean].max())
    assert bool((scored.scores[is_planted] > 0).all()) and bool((scored.scores[clean] < 0).all())
    cos = example_cosines(cache)
    assert torch.equal(cos.example_ids, scored.example_ids)
    assert float(cos.scores[is_planted].max()) < float(cos.scores[clean].min())


def _weighted_fit_loss(problem, omega, l2, reduction):
    """L̂ after Newton on the weighted problem c Σ ω_i ℓ(f_i + g_iᵀw) + (λ/2)‖w‖², from scratch."""
    g, f = problem.features64(), problem.outputs
    c = 1 / omega.sum() if reduction == "mean" else 1 / omega.numel()
    w = torch.zeros(g.shape[1], dtype=torch.float64)
    for _ in range(30):
        z = f + g @ w
        grad = -c * (omega * torch.sigmoid(-z)) @ g + l2 * w
        h = c * (g * (omega * torch.sigmoid(z) * torch.sigmoid(-z))[:, None]).T @ g
        w = w - torch.linalg.solve(h + l2 * torch.eye(g.shape[1], dtype=torch.float64), grad)
    return F.softplus(-(problem.target_outputs + problem.target_features @ w)).mean()


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_effect_is_the_derivative_of_the_estimate(reduction):
    """Against a finite difference of the exact weighted fit."""
    cache = make_synthetic_cache(1, 1, 0, dim=8, examples_per_source=12, seed=0)
    l2 = 0.05
    est = FirstOrderEstimator(cache, EstimatorConfig(solver="exact", reduction=reduction, l2=l2, tol=1e-12))
    scored = example_effects(est)
    p = est.problem
    n = p.outputs.numel()
    rows = torch.nonzero(p.row_source < len(p.sources)).flatten()
    for k in (0, 15):
        up, down = torch.ones(n, dtype=torch.float64), torch.ones(n, dtype=torch.float64)
        up[rows[k]] += 1e-5
        down[rows[k]] -= 1e-5
        fd = (
            float(_weighted_fit_loss(p, up, l2, reduction) - _weighted_fit_loss(p, down, l2, reduction))
            / 2e-5
        )
        assert float(scored.scores[k]) == pytest.approx(fd, rel=1e-4, abs=1e-9)


def test_select_examples_keep_rules(planted):
    cache, ids, est = planted
    sel = select_examples(est, fraction=0.5)
    table = sel.examples
    assert table is not None and len(table.example_ids) == 4 * 60
    kept = torch.tensor(table.weights) > 0
    assert int(kept.sum()) == 120
    assert not set(ids.tolist()) & set(table.kept_ids)
    assert float(torch.tensor(table.weights)[kept].mean()) == pytest.approx(1.0)
    assert sel.selected and "opposed_0" not in sel.selected and sel.info["granularity"] == "example"
    default = select_examples(est)  # score < 0: lowers the estimate
    assert all(s < 0 for s, w in zip(default.examples.scores, default.examples.weights) if w > 0)
    by_cos = select_examples(cache, "gradient_similarity", threshold=0.0)
    assert all(s > 0 for s, w in zip(by_cos.examples.scores, by_cos.examples.weights) if w > 0)
    assert "per example: kept" in repr(sel)
    with pytest.raises(ValueError, match="fraction"):
        select_examples(est, fraction=1.5)
    with pytest.raises(ValueError, match="method"):
        select_examples(est, "less")
    with pytest.raises(TypeError, match="FirstOrderEstimator"):
        select_examples(cache, "first_order")


def test_round_trip_and_refuses_another_cache(planted, tmp_path):
    cache, _, est = planted
    sel = select_examples(est, fraction=0.7)
    path = tmp_path / "examples.json"
    sel.save(path)
    data = json.loads(path.read_text())
    assert data["format_version"] == 2 and len(data["examples"]["example_ids"]) == 240
    assert data["manifest"]["cache_fingerprint"] == cache.fingerprint()
    back = SourceSelection.load(path, cache=cache)
    assert back == sel and back.examples.weight_of(sel.examples.example_ids[0]) == sel.examples.weights[0]
    other = make_synthetic_cache(2, 1, 1, dim=24, examples_per_source=60, seed=4)
    with pytest.raises(ValueError, match="computed from cache"):
        SourceSelection.load(path, cache=other)
    data["format_version"] = 1  # an example table in a version-1 file: edited
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="example table"):
        SourceSelection.load(path)


def _dataset(cache, sel):
    """A tagged dataset holding the cache's candidate rows and two rows of the target's own source."""
    from datasets import Dataset

    ids = list(sel.examples.example_ids)
    sources = list(sel.examples.sources)
    target_rows = torch.nonzero(cache.source_index == cache.source_id("target_train")).flatten()[:2]
    ids += cache.example_ids[target_rows].tolist()
    sources += ["target_train", "target_train"]
    return Dataset.from_dict(
        {"text": [f"row {i}" for i in range(len(ids))], "source": sources, "example_id": ids}
    )


def test_apply_collator_and_sampling_read_example_ids(planted):
    cache, planted_ids, est = planted
    sel = select_examples(est, fraction=0.5)
    ds = _dataset(cache, sel)
    want = {i for i, w in zip(sel.examples.example_ids, sel.examples.weights) if w > 0}
    target_ids = set(ds["example_id"][-2:])
    kept = sel.apply(ds)
    assert set(kept["example_id"]) == want | target_ids

    def base(features):
        return {
            "input_ids": torch.tensor([[len(f["text"])] for f in features]),
            "text": [f["text"] for f in features],
        }

    rows = [ds[i] for i in range(len(ds))]
    with pytest.warns(UserWarning, match="filter"):
        filt = SubsetSelectingDataCollator(base, sel, mode="filter")
    batch = filt(rows)
    kept_texts = {r["text"] for r in rows if r["example_id"] in want | target_ids}
    assert set(batch["text"]) == kept_texts
    weighted = SubsetSelectingDataCollator(base, sel, mode="weight")(rows)
    table = dict(zip(sel.examples.example_ids, sel.examples.weights))
    expected = [table.get(r["example_id"], 1.0) if r["source"] != "target_train" else 1.0 for r in rows]
    assert weighted["example_weight"].tolist() == pytest.approx(expected, rel=1e-6)
    assert all(
        weighted["example_weight"][i] == 0 for i, r in enumerate(rows) if r["example_id"] in planted_ids
    )
    assert example_weights(ds, sel).tolist() == pytest.approx(sel.sampling_weights(ds))
    assert sel.sampling_weights(ds) == pytest.approx(expected)
    with pytest.raises(Exception, match="example_id"):
        SubsetSelectingDataCollator(base, sel, mode="weight")(
            [{k: v for k, v in rows[0].items() if k != "example_id"}]
        )
    with pytest.raises(ValueError, match="mixture"):
        SubsetSelectingDataCollator(
            base, sel, mode="weight", source_weighting="mixture", source_counts={"a": 1}
        )


def test_large_d_solve_matches_the_direct_one():
    """Above d = 2048 the Hessian solve runs by conjugate gradients; it agrees with a dense solve."""
    from hf_subset_select.select.examples import _solve_spd

    gen = torch.Generator().manual_seed(0)
    g = torch.randn(40, 2100, generator=gen, dtype=torch.float64)
    curv = torch.rand(40, generator=gen, dtype=torch.float64)
    rhs = torch.randn(2100, generator=gen, dtype=torch.float64)
    v = _solve_spd(g, curv, 0.1, 0.5, rhs)
    # Woodbury: (λI + c Gᵀ D G)⁻¹ b = (b - c Gᵀ (D⁻¹ + c G Gᵀ / λ)⁻¹ G b / λ) / λ
    lam, c = 0.5, 0.1
    inner = torch.diag(1 / curv) + c * g @ g.T / lam
    want = (rhs - c * g.T @ torch.linalg.solve(inner, g @ rhs) / lam) / lam
    assert torch.allclose(v, want, rtol=1e-7, atol=1e-9)
