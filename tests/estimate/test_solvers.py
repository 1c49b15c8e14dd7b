"""Solvers: exact vs scikit-learn / SciPy, fast vs its quadratic model and vs exact, the reduced fast path."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, GradientCache
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.estimate.solvers import SOLVERS, ExactSolver, FastSolver, get_solver


def _cache_from_arrays(g, f, src, split, sources, target_source=None):
    n = len(f)
    return GradientCache(
        torch.as_tensor(g, dtype=torch.float32),
        torch.as_tensor(f, dtype=torch.float32),
        torch.arange(n),
        torch.as_tensor(src),
        torch.as_tensor(split, dtype=torch.int8),
        sources,
        target_source=target_source,
    )


def _toy_arrays(seed=0, d=6, n_per=40, n_target=30, offsets=True):
    rng = np.random.default_rng(seed)
    sizes = [n_per, n_per + 7, n_per - 9]
    g = [rng.normal(size=(k, d)) + rng.normal(size=d) for k in sizes]
    g.append(rng.normal(size=(n_target, d)) + 0.5)
    g = np.concatenate(g)
    f = rng.normal(0.8, 0.7, size=len(g)) if offsets else np.zeros(len(g))
    src = np.concatenate([np.full(k, i) for i, k in enumerate(sizes + [n_target])])
    split = np.concatenate([np.zeros(sum(sizes)), np.ones(n_target)])
    return g, f, src, split, ["a", "b", "c", "tgt"]


def _solve_reference(g, f, lam):
    """Minimize mean softplus(-(f + g w)) + lam/2 |w|^2 with SciPy's L-BFGS at tight tolerance."""
    from scipy.optimize import minimize

    def fun(w):
        z = f + g @ w
        loss = np.logaddexp(0.0, -z).mean() + 0.5 * lam * w @ w
        grad = -(g * (1.0 / (1.0 + np.exp(z)))[:, None]).mean(0) + lam * w
        return loss, grad

    res = minimize(
        fun,
        np.zeros(g.shape[1]),
        jac=True,
        method="L-BFGS-B",
        options={"gtol": 1e-12, "ftol": 1e-15, "maxiter": 10000},
    )
    return res.x


def test_exact_matches_sklearn_logistic_regression():
    """Without offsets the linearized problem is plain L2 logistic regression: sklearn must agree.

    Every example has label 1; sklearn needs two classes, so half the rows are written as (-g_i, label 0),
    which has the same loss log(1 + exp(-g_iᵀw)). Our objective (1/|S|) Σ ℓ + λ/2 |w|² equals sklearn's
    C Σ ℓ + 1/2 |w|² times λ with C = 1 / (λ |S|), no intercept.
    """
    from sklearn.linear_model import LogisticRegression

    g, f, src, split, names = _toy_arrays(offsets=False)
    cache = _cache_from_arrays(g, f, src, split, names)
    lam = 0.05
    est = FirstOrderEstimator(cache, EstimatorConfig(solver="exact", l2=lam, tol=1e-10))
    subset = ["a", "c"]
    w_ours = est.fitted_steps([subset])[0].numpy()

    rows = np.isin(src, [0, 2]) & (split == 0)
    x = g[rows].astype(np.float32).astype(np.float64)
    flip = np.arange(len(x)) % 2 == 1
    x_sk = np.where(flip[:, None], -x, x)
    y_sk = np.where(flip, 0, 1)
    clf = LogisticRegression(C=1.0 / (lam * len(x)), fit_intercept=False, tol=1e-12, max_iter=10000)
    clf.fit(x_sk, y_sk)
    w_sk = clf.coef_[0]
    np.testing.assert_allclose(w_ours, w_sk, rtol=1e-4, atol=1e-6)

    gt = g[split == 1].astype(np.float32).astype(np.float64)
    loss_sk = np.logaddexp(0.0, -(gt @ w_sk)).mean()
    loss_ours = float(est.estimate([subset])[0])
    assert loss_ours == pytest.approx(loss_sk, rel=1e-6)
    assert est.last_solve_info["converged"]


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_exact_matches_scipy_with_offsets(reduction):
    """With offsets f_i (which sklearn cannot express), compare with SciPy's L-BFGS on the same objective."""
    g, f, src, split, names = _toy_arrays(seed=1)
    cache = _cache_from_arrays(g, f, src, split, names)
    lam = 0.02
    est = FirstOrderEstimator(cache, EstimatorConfig(solver="exact", l2=lam, tol=1e-10, reduction=reduction))
    g32, f32 = g.astype(np.float32).astype(np.float64), f.astype(np.float32).astype(np.float64)
    for subset, ids in ([["b"], [1]], [["a", "b", "c"], [0, 1, 2]]):
        rows = np.isin(src, ids) & (split == 0)
        lam_eff = lam if reduction == "mean" else lam * (split == 0).sum() / rows.sum()
        w_ref = _solve_reference(g32[rows], f32[rows], lam_eff)
        w_ours = est.fitted_steps([subset])[0].numpy()
        np.testing.assert_allclose(w_ours, w_ref, rtol=1e-5, atol=1e-7)
        ref_loss = np.logaddexp(0.0, -(f32[split == 1] + g32[split == 1] @ w_ref)).mean()
        assert float(est.estimate([subset])[0]) == pytest.approx(ref_loss, rel=1e-7)


def test_fast_path_is_the_exact_minimizer_of_the_quadratic_model():
    g, f, src, split, names = _toy_arrays(seed=2)
    cache = _cache_from_arrays(g, f, src, split, names)
    lam = 0.1
    est = FirstOrderEstimator(cache, EstimatorConfig(l2=lam, fast_dtype="float64"))
    g64, f64 = g.astype(np.float32).astype(np.float64), f.astype(np.float32).astype(np.float64)
    rows = np.isin(src, [0, 2]) & (split == 0)
    s = 1 / (1 + np.exp(-f64[rows]))
    h = (g64[rows] * (s * (1 - s))[:, None]).T @ g64[rows] / rows.sum()
    b = -(g64[rows] * (1 - s)[:, None]).mean(0)
    w = -np.linalg.solve(h + lam * np.eye(g.shape[1]), b)
    np.testing.assert_allclose(est.fitted_steps([["a", "c"]])[0].numpy(), w, rtol=1e-9, atol=1e-12)
    # float32 fast path agrees to float32 precision
    est32 = FirstOrderEstimator(cache, EstimatorConfig(l2=lam))
    np.testing.assert_allclose(est32.fitted_steps([["a", "c"]])[0].numpy(), w, rtol=1e-4, atol=1e-6)


def test_fast_matches_exact_when_steps_are_small():
    """The fast path is a second-order expansion at w = 0: its error vanishes as the step shrinks."""
    cache = make_synthetic_cache(dim=24, examples_per_source=48, seed=3)
    probe = FirstOrderEstimator(cache)
    subsets = [[s] for s in probe.sources] + [probe.sources[:3], probe.sources[2:], probe.sources]
    errors = []
    for radius in (0.8, 0.2, 0.05):
        fast = FirstOrderEstimator(cache, EstimatorConfig(trust_radius=radius, fast_dtype="float64"))
        exact = FirstOrderEstimator(cache, EstimatorConfig(solver="exact", l2=fast.resolved_l2()))
        lf, le = fast.estimate(subsets), exact.estimate(subsets)
        errors.append(float(((lf - le).abs() / le).max()))
    assert errors[2] < 2e-3
    assert errors[0] > errors[1] > errors[2]
    # at the smallest step the ranking of subsets is the same
    assert torch.equal(torch.argsort(lf), torch.argsort(le))


def test_reduction_keeps_ranking_and_off_switch():
    cache = make_synthetic_cache(3, 3, 3, dim=64, num_strong_directions=12, examples_per_source=40, seed=4)
    full = FirstOrderEstimator(cache, EstimatorConfig(fast_dtype="float64"))
    assert full.reduce_dim == 64  # d <= 256: no reduction by default
    lam = full.resolved_l2()
    reduced = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=16, l2=lam, fast_dtype="float64"))
    off = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=1000, l2=lam, fast_dtype="float64"))
    m = torch.rand(60, len(full.sources), generator=torch.Generator().manual_seed(0)) < 0.5
    m[:, 0] |= ~m.any(1)
    lf, lr, lo = full.estimate(m), reduced.estimate(m), off.estimate(m)
    assert torch.allclose(lf, lo)
    from scipy.stats import spearmanr

    assert spearmanr(lf.numpy(), lr.numpy()).statistic > 0.95
    assert float(((lf - lr).abs() / lf).mean()) < 0.02


def test_reduction_with_fewer_rows_than_dimensions():
    """d > N: the principal directions come from the N×N dual; with r near the rank nothing is lost."""
    cache = make_synthetic_cache(2, 2, 2, dim=96, examples_per_source=6, target_train_examples=6, seed=15)
    assert int(cache.train_mask.sum()) < cache.dim
    full = FirstOrderEstimator(cache, EstimatorConfig(reduce_dim=96, fast_dtype="float64"))
    lam = full.resolved_l2()
    reduced = FirstOrderEstimator(
        cache, EstimatorConfig(reduce_dim=44, l2=lam, fast_dtype="float64")
    )  # rank 42
    basis = reduced.problem.statistics().basis
    assert torch.allclose(basis.T @ basis, torch.eye(44, dtype=torch.float64), atol=1e-8)
    subsets = [[s] for s in full.sources] + [full.sources]
    assert torch.allclose(reduced.estimate(subsets), full.estimate(subsets), rtol=1e-6)


def test_registry_matches_the_config_choices_and_per_call_override():
    assert set(SOLVERS) == {"fast", "exact"}
    assert isinstance(get_solver("fast"), FastSolver) and isinstance(get_solver("exact"), ExactSolver)
    with pytest.raises(ValueError, match="solver='newton' is not valid.*exact"):
        get_solver("newton")
    est = FirstOrderEstimator(make_synthetic_cache(dim=8, seed=16), EstimatorConfig(l2=0.3))
    subsets = [["aligned_0"], ["opposed_0", "orthogonal_1"]]
    assert est.last_solve_info == {}  # the fast path reports nothing
    exact = est.estimate(subsets, solver="exact")
    assert est.last_solve_info["solver"] == "exact" and est.last_solve_info["converged"]
    reference = FirstOrderEstimator(
        make_synthetic_cache(dim=8, seed=16), EstimatorConfig(l2=0.3, solver="exact")
    )
    assert torch.equal(exact, reference.estimate(subsets))


def test_fast_solver_threads_give_the_same_numbers():
    cache = make_synthetic_cache(dim=16, seed=17)
    m = torch.rand(40, 6, generator=torch.Generator().manual_seed(1)) < 0.5
    one = FirstOrderEstimator(cache, EstimatorConfig(l2=0.2, chunk_size=8, num_threads=1)).estimate(m)
    many = FirstOrderEstimator(cache, EstimatorConfig(l2=0.2, chunk_size=8, num_threads=3)).estimate(m)
    assert torch.allclose(one, many, rtol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_batched_spd_solve_matches_torch_and_flags_indefinite_matrices(dtype):
    from concurrent.futures import ThreadPoolExecutor

    from hf_subset_select.estimate import solvers

    gen = torch.Generator().manual_seed(3)
    a = torch.randn(12, 9, 9, generator=gen, dtype=torch.float64)
    k = (a @ a.transpose(1, 2) + 0.5 * torch.eye(9, dtype=torch.float64)).to(dtype)
    k[4] = -k[4]  # not positive definite
    b = torch.randn(12, 9, generator=gen, dtype=torch.float64).to(dtype)
    expected = torch.linalg.solve(k.to(torch.float64), b.to(torch.float64).unsqueeze(-1)).squeeze(-1)
    ok = [i for i in range(12) if i != 4]
    tol = 1e-3 if dtype == torch.float32 else 1e-10

    def run(_):
        x, failed = solvers._spd_solve(k.clone(), b.clone())
        return x, failed

    with ThreadPoolExecutor(2) as pool:  # the ctypes path releases the GIL: two threads share nothing
        results = list(pool.map(run, range(4)))
    for x, failed in results:
        assert failed == [4]
        assert x.dtype == dtype
        rel = (x[ok].to(torch.float64) - expected[ok]).norm() / expected[ok].norm()
        assert rel < tol
    if solvers._POSV_C:  # the same numbers as SciPy's wrappers when the C entry points loaded
        saved, solvers._POSV_C = solvers._POSV_C, {}
        try:
            x_ref, failed_ref = solvers._spd_solve(k.clone(), b.clone())
        finally:
            solvers._POSV_C = saved
        assert failed_ref == [4]
        assert torch.allclose(results[0][0][ok], x_ref[ok], rtol=1e-5 if dtype == torch.float32 else 1e-12)
