"""Solvers of the per-subset regularized logistic regression, and the linear algebra they run on.

Every solver takes a :class:`~.problem.LinearizedProblem`, a membership matrix (B, n) and λ, and returns the
change Δz of the target outputs (B, T) and, when asked, the fitted steps ŵ_S (B, d):

* :class:`FastSolver` (``"fast"``): the logistic loss expanded to second order at w = 0, from the per-source
  sufficient statistics: a subset costs an n-term sum of r×r matrices and one Cholesky solve, independent of
  how many examples it holds; the directions beyond the r principal ones are modelled as isotropic.
* :class:`ExactSolver` (``"exact"``): batched Newton-CG on all examples of each subset in float64,
  preconditioned by the fast path's quadratic model, until ||∇J(ŵ)|| <= tol · ||∇J(0)|| for every subset.

:data:`SOLVERS` maps the names ``EstimatorConfig.solver`` accepts to the classes; :func:`get_solver` resolves one.
"""

from __future__ import annotations

import contextlib
import ctypes
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .problem import LinearizedProblem

__all__ = ["Solver", "FastSolver", "ExactSolver", "SOLVERS", "get_solver", "quadratic_step"]

# (Δz or post(Δz), ŵ or None, diagnostics)
SolveResult = tuple[torch.Tensor, torch.Tensor | None, dict[str, Any]]
_EXACT_CHUNK = 64  # subsets per Newton-CG batch: its (B, N) and (B, d) iterates stay small


class Solver:
    """One way to fit the subsets' steps. Subclass it and implement :meth:`solve`; pass an instance as
    ``FirstOrderEstimator(cache, solver=...)`` to use it."""

    name: str = "custom"

    def chunk_size(self, problem: LinearizedProblem) -> int:
        """Subsets solved together in one :meth:`solve` call (default: ``config.chunk_size``)."""
        return problem.config.chunk_size

    def solve(self, problem: LinearizedProblem, m: torch.Tensor, l2: float, *, want_w: bool) -> SolveResult:
        """Fit the subsets of the membership matrix ``m`` (B, n) at strength ``l2``.

        Returns:
            (Δz on the target rows (B, T), ŵ in d dims (B, d) float64 or None unless ``want_w``, a dict of
            diagnostics, empty when there are none).
        """
        raise NotImplementedError(f"{type(self).__name__} must implement solve(problem, m, l2, want_w=...).")

    def run(
        self,
        problem: LinearizedProblem,
        m: torch.Tensor,
        l2: float,
        *,
        want_w: bool,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SolveResult:
        """Solve all subsets chunk by chunk; returns (post(Δz) stacked, ŵ or None, the last diagnostics)."""
        step = self.chunk_size(problem)
        return _gather(
            [self._work(problem, m[s : s + step], l2, want_w, post) for s in range(0, m.shape[0], step)]
        )

    def _work(
        self,
        problem: LinearizedProblem,
        piece: torch.Tensor,
        l2: float,
        want_w: bool,
        post: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> SolveResult:
        dz, w, info = self.solve(problem, piece, l2, want_w=want_w)
        return (dz if post is None else post(dz)), (w if want_w else None), info


def _gather(parts: list[SolveResult]) -> SolveResult:
    out = torch.cat([p[0] for p in parts])
    w = torch.cat([p[1] for p in parts]) if parts[0][1] is not None else None
    info = next((p[2] for p in reversed(parts) if p[2]), {})
    return out, w, info


# ---------------------------------------------------------------------- fast path: the quadratic model
def quadratic_step(
    problem: LinearizedProblem,
    m: torch.Tensor,
    l2: float,
    *,
    product: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Minimizer of the second-order model: the step in the kept directions (B, r), the tail coefficient (B,)
    or None (the tail step is coef · (I - UUᵀ) Σ_k m_k grad_k), and the membership in the stats' precision.

    ``product(X)`` computes ``m @ X`` for a per-source statistic X (n, ...) when the caller has a cheaper way
    than the matrix product (see :meth:`FastSolver.solve_extensions`).

    Raises FloatingPointError when a subset's model is not positive definite at this λ.
    """
    st = problem.statistics()
    gram, grad, _, tail_trace, _, _, _ = problem.fast_statistics()
    dtype = gram.dtype
    r = st.rank
    m = m.to(dtype)
    if product is None:
        product = m.__matmul__
    if problem.config.reduction == "mean":
        scale = 1.0 / product(problem.counts.to(dtype))
    else:
        scale = torch.full((m.shape[0],), 1.0 / float(problem.counts.sum()), dtype=dtype)
    k = product(gram).view(-1, r, r)
    k.mul_(scale[:, None, None])
    k.diagonal(dim1=1, dim2=2).add_(l2)
    b = product(grad).mul_(scale[:, None])
    w_r, failed = _spd_solve(k, b.neg_())
    if failed and dtype != torch.float64:
        # redo the few matrices that are not positive definite in float32 in float64
        idx = torch.tensor(failed)
        s64 = scale[idx].to(torch.float64)
        k64 = product(gram)[idx].to(torch.float64).view(-1, r, r) * s64[:, None, None]
        k64.diagonal(dim1=1, dim2=2).add_(l2)
        w64, failed = _spd_solve(k64, -(m[idx].to(torch.float64) @ st.grad) * s64[:, None])
        w_r[idx] = w64.to(dtype)
    if failed:
        raise FloatingPointError(
            f"The fast path's curvature matrix is not positive definite for {len(failed)} subset(s); "
            "λ is too small for the numerical range of the cache. Use a larger l2 or solver='exact'."
        )
    coef = None
    if st.basis is not None:
        h_tail = product(tail_trace) * scale / max(st.tail_dims, 1)
        coef = -scale / (l2 + h_tail)
    return w_r, coef, m


class FastSolver(Solver):
    """The second-order model from per-source sufficient statistics; chunks run in ``config.num_threads``
    Python threads with single-threaded kernels."""

    name = "fast"

    def solve(self, problem: LinearizedProblem, m: torch.Tensor, l2: float, *, want_w: bool) -> SolveResult:
        _, _, target_r, _, tail_target, tail_grad, basis = problem.fast_statistics()
        w_r, coef, m = quadratic_step(problem, m, l2)
        dz = w_r @ target_r.T
        w = None
        if coef is not None:
            dz = dz + coef[:, None] * (m @ tail_target)
            if want_w:
                w = w_r @ basis.T + coef[:, None] * (m @ tail_grad)
        elif want_w:
            w = w_r
        return dz, (None if w is None else w.to(torch.float64)), {}

    def extension_sums(self, problem: LinearizedProblem, base: torch.Tensor) -> dict[int, tuple[Any, Any]]:
        """``base @ X`` for each per-source statistic X of the fast path, computed once for a greedy step and
        shared by all its chunks of candidates (pass it to :meth:`solve_extensions` as ``sums``). Keyed by the
        statistic's identity; the statistic is kept with its sum so the key stays valid."""
        gram, grad, _, tail_trace, tail_target, _, _ = problem.fast_statistics()
        b = base.to(gram.dtype)  # (the row counts are summed per call: an n-vector, cheap)
        return {id(x): (x, b @ x) for x in (gram, grad, tail_trace, tail_target) if x is not None}

    def solve_extensions(
        self,
        problem: LinearizedProblem,
        base: torch.Tensor,
        candidates: torch.Tensor,
        l2: float,
        *,
        sums: dict[int, tuple[Any, Any]] | None = None,
    ) -> torch.Tensor:
        """Δz (B, T) of the subsets ``base ∪ {j}`` for each candidate column j, the same as :meth:`solve` on their
        membership matrix but in O(B r²) per subset for the sums (not O(B n r²)): the base's statistics are
        summed once and each candidate's added (greedy forward selection).

        Args:
            base: membership of the base subset over :attr:`~.problem.LinearizedProblem.order`, shape (n,).
            candidates: the columns j to add, shape (B,), none of them in ``base``.
            sums: :meth:`extension_sums` of ``base``, when several calls share one base (computed here if None).
        """
        _, _, target_r, _, tail_target, _, _ = problem.fast_statistics()
        dtype = target_r.dtype
        base = base.to(dtype)
        if sums is None:
            sums = self.extension_sums(problem, base)
        cand = candidates.to(torch.int64)
        m = base.expand(cand.numel(), -1).clone()
        m[torch.arange(cand.numel()), cand] = 1.0

        def product(x: torch.Tensor) -> torch.Tensor:
            x = x.to(dtype) if x.dtype != dtype else x
            hit = sums.get(id(x))
            total = hit[1] if hit is not None and hit[0] is x else base @ x
            return total.unsqueeze(0) + x.index_select(0, cand)

        w_r, coef, _ = quadratic_step(problem, m, l2, product=product)
        dz = w_r @ target_r.T
        if coef is not None:
            dz = dz + coef[:, None] * product(tail_target)
        return dz

    def run(
        self,
        problem: LinearizedProblem,
        m: torch.Tensor,
        l2: float,
        *,
        want_w: bool,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> SolveResult:
        problem.fast_statistics()  # computed once, before the threads start
        chunk = self.chunk_size(problem)
        pieces = [m[s : s + chunk] for s in range(0, m.shape[0], chunk)]
        return _gather(_in_threads(problem, pieces, lambda piece: self._work(problem, piece, l2, want_w, post)))


def _in_threads(problem: LinearizedProblem, pieces: list[Any], work: Callable[[Any], Any]) -> list[Any]:
    """``[work(p) for p in pieces]`` in ``config.num_threads`` Python threads with single-threaded kernels."""
    threads = max(1, min(problem.config.num_threads or torch.get_num_threads(), len(pieces)))
    if threads == 1:
        return [work(piece) for piece in pieces]
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with single_threaded_blas(), ThreadPoolExecutor(threads) as pool:
            return list(pool.map(work, pieces))
    finally:
        torch.set_num_threads(previous)


# ---------------------------------------------------------------------- exact path: batched Newton-CG
def _quadratic_preconditioner(
    problem: LinearizedProblem, m: torch.Tensor, l2: float
) -> Callable[[torch.Tensor], torch.Tensor]:
    """Apply the inverse of the fast path's quadratic model (B, d) -> (B, d)."""
    st = problem.statistics()
    r = st.rank
    scale = problem.scale(m)
    k = (m.to(st.gram.dtype) @ st.gram).to(torch.float64).view(-1, r, r) * scale[:, None, None]
    k.diagonal(dim1=1, dim2=2).add_(l2)
    chol, info = torch.linalg.cholesky_ex(k)
    if bool((info != 0).any()):  # numerically singular: a little jitter (it is only a preconditioner)
        jitter = k.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-30) * 1e-6
        k.diagonal(dim1=1, dim2=2).add_(jitter[:, None])
        chol = torch.linalg.cholesky_ex(k)[0]
    if st.basis is None:

        def apply(v: torch.Tensor) -> torch.Tensor:
            return torch.cholesky_solve(v.unsqueeze(-1), chol).squeeze(-1)

        return apply
    h_tail = (m @ st.tail_trace) * scale / max(st.tail_dims, 1)
    basis = st.basis

    def apply_reduced(v: torch.Tensor) -> torch.Tensor:
        vr = v @ basis
        inner = torch.cholesky_solve(vr.unsqueeze(-1), chol).squeeze(-1)
        return inner @ basis.T + (v - vr @ basis.T) / (l2 + h_tail)[:, None]

    return apply_reduced


class ExactSolver(Solver):
    """Batched Newton-CG on all examples of each subset in float64 (``config.max_iter``, ``config.tol``),
    warm-started from and preconditioned by the fast path's quadratic model."""

    name = "exact"

    def chunk_size(self, problem: LinearizedProblem) -> int:
        return _EXACT_CHUNK

    def solve(self, problem: LinearizedProblem, m: torch.Tensor, l2: float, *, want_w: bool) -> SolveResult:
        w, info = self.fit(problem, m, l2)
        return w @ problem.target_features.T, w, info

    def fit(
        self, problem: LinearizedProblem, m: torch.Tensor, l2: float
    ) -> tuple[torch.Tensor, dict[str, Any]]:
        """ŵ (B, d) in float64 and the solver's diagnostics (iterations, final relative gradient norm)."""
        g, f = problem.features64(), problem.outputs
        cfg = problem.config
        omega = m[:, problem.row_source] * problem.scale(m)[:, None]  # (B, N) example weights
        precond = _quadratic_preconditioner(problem, m, l2)

        def objective(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (omega * F.softplus(-z)).sum(1) + 0.5 * l2 * (w * w).sum(1)

        b0 = -(omega * torch.sigmoid(-f)) @ g  # ∇J(0)
        g0 = b0.norm(dim=1).clamp_min(1e-300)
        w = torch.zeros_like(b0)
        z = f.expand(m.shape[0], -1).clone()
        # warm start from the fast path's step where it lowers the objective
        try:
            _, w_fast, _ = FastSolver().solve(problem, m, l2, want_w=True)
        except FloatingPointError:  # the quadratic model is singular at this λ: start from 0
            w_fast = None
        if w_fast is not None:
            z_fast = f + w_fast @ g.T
            better = objective(z_fast, w_fast) < objective(z, w)
            w = torch.where(better[:, None], w_fast, w)
            z = torch.where(better[:, None], z_fast, z)
        converged = torch.zeros(m.shape[0], dtype=torch.bool)
        iters, cg_total = 0, 0
        rel = torch.ones(m.shape[0], dtype=torch.float64)
        for it in range(cfg.max_iter + 1):
            grad = -(omega * torch.sigmoid(-z)) @ g + l2 * w
            rel = grad.norm(dim=1) / g0
            converged = rel <= cfg.tol
            if bool(converged.all()) or it == cfg.max_iter:
                break
            iters = it + 1
            curv = omega * torch.sigmoid(z) * torch.sigmoid(-z)

            def hvp(v: torch.Tensor, curv: torch.Tensor = curv) -> torch.Tensor:
                return (curv * (v @ g.T)) @ g + l2 * v

            forcing = torch.clamp(torch.sqrt(rel), max=0.5) * 0.1
            step, n_cg = _pcg(hvp, -grad, precond, forcing, max_iter=max(50, 2 * problem.reduce_dim))
            cg_total += n_cg
            step = torch.where(converged[:, None], torch.zeros_like(step), step)
            gstep = step @ g.T
            j0 = objective(z, w)
            slope = (grad * step).sum(1)
            t = torch.ones(m.shape[0], dtype=torch.float64)
            for _ in range(40):
                z_new = z + t[:, None] * gstep
                w_new = w + t[:, None] * step
                ok = objective(z_new, w_new) <= j0 + 1e-4 * t * slope
                ok = ok | converged
                if bool(ok.all()):
                    break
                t = torch.where(ok, t, 0.5 * t)
            w, z = w_new, z_new
        info = {
            "solver": "exact",
            "newton_iterations": iters,
            "cg_iterations": cg_total,
            "max_relative_grad_norm": float(rel.max()),
            "tol": cfg.tol,
            "converged": bool(converged.all()),
        }
        if not bool(converged.all()):
            warnings.warn(
                f"Exact solver stopped after {cfg.max_iter} Newton iterations with relative gradient norm "
                f"{float(rel.max()):.2e} > tol={cfg.tol:g}; raise max_iter or λ.",
                RuntimeWarning,
                stacklevel=3,
            )
        return w, info


SOLVERS: dict[str, type[Solver]] = {"fast": FastSolver, "exact": ExactSolver}


def get_solver(name: str) -> Solver:
    """A new solver of the registered ``name`` ('fast' or 'exact')."""
    cls = SOLVERS.get(name)
    if cls is None:
        raise ValueError(f"solver={name!r} is not valid; choose one of {sorted(SOLVERS)}.")
    return cls()


# ---------------------------------------------------------------------- linear algebra
def _spd_solve(k: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Solve k[i] x[i] = b[i] for a batch of symmetric positive definite matrices (k is overwritten);
    returns the solutions and the indices whose matrix was not positive definite.

    LAPACK ?posv called per matrix is several times faster than torch's batched Cholesky for r around 100 on a
    CPU (measured in recipes/benchmarks/estimate_speed.py). It is called through the C entry points of SciPy's
    ``cython_lapack`` with ctypes, which releases the GIL, so the fast path's threads solve in parallel (the
    ``scipy.linalg.lapack`` wrappers hold the GIL: two threads ran slower than one); the wrappers are the
    fallback when the C entry points cannot be loaded.
    """
    raw = _POSV_C.get(k.dtype) if _POSV_C else None
    if raw is not None and k.is_contiguous() and k.dim() == 3 and k.shape[1] == k.shape[2]:
        batch, r = k.shape[0], k.shape[1]
        out = b.to(k.dtype).contiguous().clone()
        if batch == 0 or r == 0:
            return out, []
        n, one, info = ctypes.c_int(r), ctypes.c_int(1), ctypes.c_int(0)
        pn, pone, pinfo = ctypes.byref(n), ctypes.byref(one), ctypes.byref(info)
        size = k.element_size()
        k_addr, b_addr, k_step, b_step = k.data_ptr(), out.data_ptr(), r * r * size, r * size
        failed = []
        for i in range(batch):
            # a C-contiguous symmetric matrix is its own Fortran-ordered transpose: 'U' reads its lower triangle
            raw(b"U", pn, pone, k_addr + i * k_step, pn, b_addr + i * b_step, pn, pinfo)
            if info.value != 0:
                failed.append(i)
        return out, failed
    if _POSV is not None:
        kn, bn = k.numpy(), b.numpy()
        out = np.empty_like(bn)
        posv = _POSV[0] if kn.dtype == np.float32 else _POSV[1]
        failed = []
        for i in range(kn.shape[0]):
            _, x, info = posv(kn[i].T, bn[i], lower=0, overwrite_a=1, overwrite_b=0)
            if info != 0:
                failed.append(i)
            out[i] = x
        return torch.from_numpy(out), failed
    chol, info = torch.linalg.cholesky_ex(k)
    y = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False)
    result = torch.linalg.solve_triangular(chol.transpose(1, 2), y, upper=True).squeeze(-1)
    return result, torch.nonzero(info != 0).flatten().tolist()


def _load_posv_c() -> dict[torch.dtype, Any]:
    """``{float32: sposv, float64: dposv}`` as ctypes functions on the C entry points SciPy exports in
    ``scipy.linalg.cython_lapack`` (Fortran calling convention: every argument by pointer); empty when SciPy
    or its capsules are missing (then :func:`_spd_solve` uses the ``scipy.linalg.lapack`` wrappers)."""
    try:
        from scipy.linalg import cython_lapack
    except ImportError:  # pragma: no cover - SciPy is optional
        return {}
    api = ctypes.pythonapi
    get_name, get_pointer = api.PyCapsule_GetName, api.PyCapsule_GetPointer
    get_name.restype, get_name.argtypes = ctypes.c_char_p, [ctypes.py_object]
    get_pointer.restype, get_pointer.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    vp = ctypes.c_void_p
    signature = ctypes.CFUNCTYPE(None, ctypes.c_char_p, vp, vp, vp, vp, vp, vp, vp)
    out: dict[torch.dtype, Any] = {}
    try:
        capsules = cython_lapack.__pyx_capi__
        for dtype, name in ((torch.float32, "sposv"), (torch.float64, "dposv")):
            capsule = capsules[name]
            out[dtype] = signature(get_pointer(capsule, get_name(capsule)))
    except (AttributeError, KeyError, TypeError, ValueError):  # pragma: no cover - another SciPy layout
        return {}
    return out


def single_threaded_blas() -> Any:
    """Keep SciPy's OpenBLAS single-threaded while our own threads call it (threadpoolctl, if installed):
    its internal threads fight with ours and can cost 10x on a busy machine."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - optional
        return contextlib.nullcontext()
    return threadpool_limits(limits=1, user_api="blas")


def _load_posv() -> tuple[Any, Any] | None:
    try:
        from scipy.linalg import lapack
    except ImportError:  # pragma: no cover - SciPy is optional
        return None
    return lapack.sposv, lapack.dposv


_POSV = _load_posv()
_POSV_C = _load_posv_c()


def _pcg(hvp, rhs: torch.Tensor, precond, rtol: torch.Tensor, max_iter: int) -> tuple[torch.Tensor, int]:
    """Batched preconditioned conjugate gradients for (B, d) right-hand sides; per-row tolerances."""
    x = torch.zeros_like(rhs)
    r = rhs.clone()
    z = precond(r)
    p = z.clone()
    rz = (r * z).sum(1)
    r0 = r.norm(dim=1)
    active = r0 > 0
    used = 0
    for it in range(1, max_iter + 1):
        used = it
        ap = hvp(p)
        pap = (p * ap).sum(1)
        alpha = torch.where(
            active & (pap > 0), rz / torch.where(pap > 0, pap, torch.ones_like(pap)), torch.zeros_like(pap)
        )
        x = x + alpha[:, None] * p
        r = r - alpha[:, None] * ap
        active = active & (r.norm(dim=1) > rtol * r0)
        if not bool(active.any()):
            break
        z = precond(r)
        rz_new = (r * z).sum(1)
        beta = torch.where(
            active, rz_new / torch.where(rz != 0, rz, torch.ones_like(rz)), torch.zeros_like(rz)
        )
        p = z + beta[:, None] * p
        rz = rz_new
    return x, used
