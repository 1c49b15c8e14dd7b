"""The fast setup (block-wise statistics, partial eigendecomposition, secant λ search) gives the results of the
straightforward computation it replaced: the same statistics, estimates and λ within the search's tolerance."""

from __future__ import annotations

import math

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate import problem as problem_mod
from hf_subset_select.estimate import regularization as reg
from hf_subset_select.estimate.problem import LinearizedProblem


def _reference_statistics(p: LinearizedProblem, basis_for_gram=None) -> dict[str, torch.Tensor]:
    """The whole-matrix computation: float64 copy of all features, full eigh, a mask per source (Gram matrices
    in ``basis_for_gram`` when given: eigenvectors are defined up to sign)."""
    g = p.features.to(torch.float64)
    f = p.outputs
    curv = torch.sigmoid(f) * torch.sigmoid(-f)
    resid = torch.sigmoid(-f)
    n_src, d, r = len(p.order), p.dim, p.reduce_dim
    grad_full = torch.zeros(n_src, d, dtype=torch.float64).index_add_(0, p.row_source, -resid[:, None] * g)
    basis = None
    if r < d:
        w = curv / p.counts[p.row_source] / n_src
        x = p.features * w.sqrt().to(torch.float32)[:, None]
        evals, evecs = torch.linalg.eigh((x.T @ x).to(torch.float64))
        basis = evecs[:, torch.argsort(evals, descending=True)[:r]]
    gr = g if basis is None else g @ (basis if basis_for_gram is None else basis_for_gram)
    gram = torch.stack(
        [
            (lambda xj: (xj.T @ xj).reshape(-1))(gr[p.row_source == j] * curv[p.row_source == j].sqrt()[:, None])
            for j in range(n_src)
        ]
    )
    out = {"grad_full": grad_full, "gram": gram, "basis": basis}
    if basis is not None:
        leftover = (g * g).sum(1) - (gr * gr).sum(1)
        out["tail_trace"] = torch.zeros(n_src, dtype=torch.float64).index_add_(0, p.row_source, curv * leftover)
    return out


def _shuffled(cache):
    """The same cache with its rows in random order (sources interleaved, target rows among them)."""
    perm = torch.randperm(cache.num_examples, generator=torch.Generator().manual_seed(3))
    return cache.replace(
        features=cache.features[perm],
        outputs=cache.outputs[perm],
        example_ids=cache.example_ids[perm],
        source_index=cache.source_index[perm],
        split=cache.split[perm],
    )


@pytest.mark.parametrize("dim,reduce_dim", [(24, None), (48, 12)])
@pytest.mark.parametrize("shuffle", [False, True])
def test_blockwise_statistics_equal_the_whole_matrix_ones(monkeypatch, dim, reduce_dim, shuffle):
    cache = make_synthetic_cache(2, 2, 2, dim=dim, examples_per_source=[40, 7, 55, 31, 12, 60], seed=4)
    if shuffle:
        cache = _shuffled(cache)
    monkeypatch.setattr(problem_mod, "_CHUNK_BYTES", 8 * dim * 13)  # 13-row blocks: sources straddle them
    cfg = EstimatorConfig(reduce_dim=reduce_dim, fast_dtype="float64", l2=0.05)
    p = LinearizedProblem(cache, cfg)
    st = p.statistics()
    ref = _reference_statistics(p, st.basis)
    assert torch.allclose(st.gram, ref["gram"], rtol=1e-9, atol=1e-12)
    if ref["basis"] is None:
        assert torch.allclose(st.grad, ref["grad_full"], rtol=1e-10, atol=1e-12)
        return
    # the same subspace (columns may differ in sign): UUᵀ agrees
    assert torch.allclose(st.basis @ st.basis.T, ref["basis"] @ ref["basis"].T, atol=1e-6)
    assert torch.allclose(st.grad @ st.basis.T + st.tail_grad, ref["grad_full"], atol=1e-10)
    assert torch.allclose(st.tail_trace, ref["tail_trace"].clamp_min(0), rtol=1e-6, atol=1e-9)


def test_estimates_do_not_depend_on_row_order_or_block_size(monkeypatch):
    cache = make_synthetic_cache(3, 3, 2, dim=64, examples_per_source=50, seed=9)
    subsets = [["aligned_0", "opposed_1"], ["orthogonal_1"], ["aligned_2", "aligned_1", "opposed_0"]]
    base = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=16, l2=0.02)).estimate(subsets)
    monkeypatch.setattr(problem_mod, "_CHUNK_BYTES", 8 * 64 * 17)
    est = FirstOrderEstimator(_shuffled(cache), EstimatorConfig(reduce_dim=16, l2=0.02))
    assert not est.problem.features.data_ptr() == cache.features.data_ptr()
    assert torch.allclose(est.estimate(subsets), base, rtol=1e-5)


def test_contiguous_training_rows_are_a_view_not_a_copy():
    cache = make_synthetic_cache(dim=16, seed=2)
    train = torch.nonzero(cache.train_mask).flatten()
    assert int(train[-1]) - int(train[0]) + 1 == train.numel()  # the synthetic cache keeps them together
    p = LinearizedProblem(cache, EstimatorConfig())
    assert p.features.data_ptr() == cache.features[int(train[0])].data_ptr()


def _reference_bisect(rms, lo0: float, hi0: float, delta: float) -> float:
    """The λ search it replaced: plain bisection in log λ down to a bracket of 0.01."""
    rho0 = rms(math.exp(lo0))

    def solve(level: float) -> float:
        lo, hi = lo0, hi0
        if rho0 <= level:
            return math.exp(lo)
        if rms(math.exp(hi)) >= level:
            return math.exp(hi)
        while hi - lo > 0.01:
            mid = 0.5 * (lo + hi)
            if rms(math.exp(mid)) > level:
                lo = mid
            else:
                hi = mid
        return math.exp(0.5 * (lo + hi))

    return max(solve(delta), solve(0.5 * rho0))


@pytest.mark.parametrize(
    "scales,delta",
    [([1.0], 0.3), ([1e-3, 1.0, 50.0], 0.2), ([1e-4] * 3 + [10.0], 0.9), ([2.0, 3.0], 5.0), ([1e-2], 1e-6)],
)
def test_secant_search_finds_the_bisection_lambda(scales, delta):
    def rms(l2: float) -> float:  # a ridge's step size with several curvature scales
        return math.sqrt(sum((h / (h + l2)) ** 2 for h in scales) / len(scales))

    calls = []
    counted = lambda l2: (calls.append(l2), rms(l2))[1]  # noqa: E731
    new = reg._bisect_l2(counted, math.log(1e-9), math.log(1e9), delta)
    old = _reference_bisect(rms, math.log(1e-9), math.log(1e9), delta)
    assert abs(math.log(new / old)) < 0.01
    assert len(calls) <= 24  # bisection takes 2 + 2 x 12


@pytest.mark.parametrize("dim,reduce_dim", [(32, None), (96, 24)])
def test_auto_lambda_and_estimates_match_the_bisection_ones(dim, reduce_dim, monkeypatch):
    cache = make_synthetic_cache(4, 4, 4, dim=dim, examples_per_source=60, seed=11)
    est = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=reduce_dim))
    new = est.resolved_l2()
    monkeypatch.setattr(reg, "_bisect_l2", _reference_bisect)
    old = reg.auto_l2(est.problem)
    assert abs(math.log(new / old)) < 0.01
    subsets = [est.sources[:3], est.sources[2:9], est.sources[5:6]]
    a = est.estimate(subsets)
    b = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=reduce_dim, l2=old)).estimate(subsets)
    # λ within 1 % moves the estimates by far less than the spread between subsets
    assert torch.allclose(a, b, rtol=2e-3)
    assert float((a - b).abs().max()) < 0.05 * float(a.max() - a.min())
