"""The linearized problem behind every estimate: the cached rows, the candidate sources and their statistics.

:class:`LinearizedProblem` validates the cache (and a separate target cache), fixes the candidate sources and the
forced target source, turns subsets into membership matrices, and computes the per-source sufficient
statistics that the solvers and the λ rules share. It holds no λ and solves nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..collect.cache import GradientCache
from ..config import EstimatorConfig

__all__ = ["LinearizedProblem", "SourceStatistics", "AUTO_REDUCE_DIM"]

# Fast path: with d above this, keep this many principal directions (see docs/method.md).
AUTO_REDUCE_DIM = 256
# From this feature dimension on (and when r <= d / 4) the principal basis comes from randomized subspace iteration
# instead of XᵀX and its eigendecomposition (O(N d k) per pass instead of O(N d²) + O(d³)).
RANDOMIZED_BASIS_MIN_DIM = 4096
_POWER_ITERATIONS = 2
_REF_SUBSETS = 64  # reference subsets of the λ rules
_CHUNK_BYTES = 64 << 20  # rows per block of the statistics pass: about 64 MiB of float64


@dataclass
class SourceStatistics:
    """Per-source sufficient statistics of the second-order model, in a basis of r directions."""

    basis: torch.Tensor | None  # (d, r) orthonormal, None = identity (r = d)
    gram: torch.Tensor  # (n, r*r) Σ_i σ'(f_i) (Uᵀg_i)(Uᵀg_i)ᵀ per source, flattened
    grad: torch.Tensor  # (n, r) -Σ_i σ(-f_i) Uᵀg_i per source
    tail_trace: torch.Tensor | None  # (n,) Σ_i σ'(f_i) ||(I - UUᵀ) g_i||²
    tail_grad: torch.Tensor | None  # (n, d) (I - UUᵀ) grad_k
    tail_target: torch.Tensor | None  # (n, T) G_T (I - UUᵀ) grad_k
    target_r: torch.Tensor  # (T, r) G_T U
    tail_dims: int  # d - r

    @property
    def rank(self) -> int:
        """r, the number of directions kept exactly."""
        return int(self.grad.shape[1])


def _check_target_cache(cache: GradientCache, target: GradientCache) -> None:
    """Refuse a target cache whose features are not comparable with the training cache's: another dimension, or
    another θ*, projection, geometry or output function where both manifests record it
    (:class:`~hf_subset_select.collect.compat.TargetCacheMismatchError`, naming the field)."""
    from ..collect.compat import TargetCacheMismatchError, check_compatible, compatibility_fields

    target.validate()
    if target.dim != cache.dim:
        raise TargetCacheMismatchError(
            f"Dimension mismatch: the training cache has d={cache.dim} but the target cache has "
            f"d={target.dim}. Collect the target against the training cache: "
            "GradientCollector(target_dataset=..., train_cache=<training cache>).",
            field="dim",
        )
    geometry = [
        {
            k: v
            for k, v in (c.manifest.get("precondition") or {"kind": "none"}).items()
            if k in ("kind", "sha256")
        }
        for c in (cache, target)
    ]
    if (cache.preconditioner is None) != (target.preconditioner is None) and geometry[0] == geometry[1]:
        geometry = [
            c.precondition_info() for c in (cache, target)
        ]  # caches built by hand: compare the tensors
    if geometry[0].get("kind") != geometry[1].get("kind") or geometry[0].get("sha256") != geometry[1].get(
        "sha256"
    ):
        raise TargetCacheMismatchError(
            f"The two caches scaled their gradients differently (precondition {geometry[0]} vs "
            f"{geometry[1]}); their features are not comparable. Collect the target against the training cache "
            "(GradientCollector(target_dataset=..., train_cache=...) reuses its stored preconditioner).",
            field="precondition",
        )
    check_compatible(compatibility_fields(cache.manifest), compatibility_fields(target.manifest))


class LinearizedProblem:
    """The cached training and target rows of one estimate, arranged by candidate source.

    Use it through :class:`~hf_subset_select.FirstOrderEstimator` (``estimator.problem``); solvers and λ rules
    read it. Sources are ordered as :attr:`sources` followed by the forced target source, if any.

    Args:
        cache: a validated :class:`~hf_subset_select.GradientCache` with training rows.
        config: the estimator's config (``include_target_train``, ``reduce_dim``, ``fast_dtype``, ``reduction``).
        target: take the target rows from this other cache (same d, projection and geometry).
    """

    def __init__(
        self, cache: GradientCache, config: EstimatorConfig, *, target: GradientCache | None = None
    ) -> None:
        if not isinstance(cache, GradientCache):
            raise TypeError(
                f"FirstOrderEstimator needs a GradientCache, got {type(cache).__name__}; "
                "load one with GradientCache.load(path)."
            )
        self.cache = cache
        self.config = config
        cache.validate()  # NaN / inf / inconsistent arrays -> GradientCacheError naming the fix
        if target is not None:
            _check_target_cache(cache, target)
        target_cache = cache if target is None else target
        tmask = target_cache.target_mask
        if not bool(tmask.any()):
            raise ValueError(
                "The cache has no target split (no rows with split=1). Collect it with "
                "GradientCollector(..., target_dataset=<target evaluation split>) or pass target=<cache>."
            )
        train_idx = torch.nonzero(cache.train_mask).flatten()
        if train_idx.numel() == 0:
            raise ValueError(
                "The cache has no training rows (split=0); collect the training sources as well."
            )
        all_train = cache.train_sources
        forced = None
        if config.include_target_train and cache.target_source in all_train:
            forced = cache.target_source
        self.target_source: str | None = cache.target_source
        self.forced_source: str | None = forced
        self.sources: list[str] = [s for s in all_train if s != forced]
        self.order: list[str] = self.sources + ([forced] if forced is not None else [])
        if not self.order:
            raise ValueError("The cache has no training sources.")
        lut = torch.full((len(cache.sources),), -1, dtype=torch.int64)
        for j, name in enumerate(self.order):
            lut[cache.source_id(name)] = j
        self.row_source = lut[cache.source_index[train_idx]]  # (N,) column of each training row
        first, count = int(train_idx[0]), int(train_idx.numel())
        if int(train_idx[-1]) - first + 1 == count:  # contiguous training rows: a view, no copy of the features
            self.features = cache.features[first : first + count]  # float32 (N, d)
        else:
            self.features = cache.features[train_idx]
        self.outputs = cache.outputs[train_idx].to(torch.float64)
        self.target_features = target_cache.features[tmask].to(torch.float64)
        self.target_outputs = target_cache.outputs[tmask].to(torch.float64)
        tsrc = target_cache.source_index[tmask]
        self.target_groups = {
            target_cache.sources[int(g)]: torch.nonzero(tsrc == g).flatten()
            for g in torch.unique(tsrc).tolist()
        }
        self.counts = torch.bincount(self.row_source, minlength=len(self.order)).to(torch.float64)
        self._stats: SourceStatistics | None = None
        self._fast: tuple[torch.dtype, tuple[Any, ...]] | None = None
        self._features64: torch.Tensor | None = None
        self._memo: dict[Any, Any] = {}

    # ------------------------------------------------------------------ sizes
    @property
    def dim(self) -> int:
        """The cache's gradient dimension d."""
        return int(self.features.shape[1])

    @property
    def num_target(self) -> int:
        """Number of target rows T."""
        return int(self.target_outputs.shape[0])

    @property
    def reduce_dim(self) -> int:
        """Directions the fast path keeps exactly (= d when there is no reduction)."""
        r = self.config.reduce_dim
        if r is None:
            r = AUTO_REDUCE_DIM if self.dim > AUTO_REDUCE_DIM else self.dim
        return min(int(r), self.dim)

    @property
    def base_loss(self) -> float:
        """Target loss at θ* ("no change"): mean_j log(1 + exp(-f_j))."""
        return float(F.softplus(-self.target_outputs).mean())

    def memo(self, key: Any, compute: Callable[[], Any]) -> Any:
        """A derived quantity of this problem (e.g. a λ rule's value), computed once per ``key``."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

    # ------------------------------------------------------------------ subsets
    def membership(self, subsets: Any) -> torch.Tensor:
        """Turn subsets (lists of source names, or a boolean matrix over :attr:`sources`) into the
        internal float64 membership matrix (B, n) whose last column is the forced target source."""
        m = (
            self._matrix(subsets)
            if isinstance(subsets, (torch.Tensor, np.ndarray))
            else self._from_names(subsets)
        )
        if m.shape[0] == 0:
            raise ValueError("No subsets given; pass at least one subset.")
        if self.forced_source is not None:
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=torch.float64)], dim=1)
        empty = m.sum(1) == 0
        if bool(empty.any()):
            raise ValueError(
                f"Subset {int(torch.nonzero(empty)[0])} is empty: it has no training examples. Add at least one "
                "source to it (the cache has no target training source to always include; set "
                "CollectConfig.target_source / include_target_train=True if the target has training data)."
            )
        return m

    def _matrix(self, subsets: torch.Tensor | np.ndarray) -> torch.Tensor:
        n_cand = len(self.sources)
        m = torch.as_tensor(subsets)
        if m.ndim == 1:
            m = m.unsqueeze(0)
        if m.ndim != 2 or m.shape[1] != n_cand:
            raise ValueError(
                f"Dimension mismatch: a membership matrix needs shape (num_subsets, {n_cand}) with one "
                f"column per candidate source {self.sources}, got {tuple(m.shape)}."
            )
        m = m.to(torch.float64)
        if not bool(torch.isfinite(m).all()):
            raise ValueError("The membership matrix holds NaN/inf; use booleans or 0/1.")
        if not bool(((m == 0) | (m == 1)).all()):
            raise ValueError("The membership matrix must hold booleans or 0/1 values.")
        return m

    def _from_names(self, subsets: Any) -> torch.Tensor:
        if isinstance(subsets, str) or (
            isinstance(subsets, Sequence) and len(subsets) > 0 and isinstance(subsets[0], str)
        ):
            raise TypeError(
                "estimate() takes a list of subsets, each a list of source names: wrap a single "
                f"subset as [{list(subsets) if not isinstance(subsets, str) else [subsets]}]."
            )
        subsets = list(subsets)
        index = {s: j for j, s in enumerate(self.sources)}
        m = torch.zeros(len(subsets), len(self.sources), dtype=torch.float64)
        for b, subset in enumerate(subsets):
            for name in [subset] if isinstance(subset, str) else subset:
                if name == self.forced_source:
                    continue
                j = index.get(name)
                if j is None:
                    raise ValueError(
                        f"Unknown source {name!r} in subset {b}; the candidate sources are "
                        f"{self.sources}. Check the spelling, or re-collect the cache with that source."
                    )
                m[b, j] = 1.0
        return m

    def names(self, m: torch.Tensor) -> list[list[str]]:
        """The candidate source names of each row of a membership matrix (the forced source left out)."""
        return [
            [self.sources[j] for j in torch.nonzero(row[: len(self.sources)]).flatten().tolist()] for row in m
        ]

    def scale(self, m: torch.Tensor) -> torch.Tensor:
        """c_S of each subset: 1/|D_S| (``reduction="mean"``) or 1/N_train (``"sum"``), shape (B,)."""
        if self.config.reduction == "mean":
            return 1.0 / (m @ self.counts)
        return torch.full((m.shape[0],), 1.0 / float(self.counts.sum()), dtype=torch.float64)

    def reference_membership(self) -> torch.Tensor:
        """The λ rules' 64 random reference subsets (each source in with probability 1/2, seeded by
        ``config.seed``), as a membership matrix."""
        gen = torch.Generator().manual_seed(self.config.seed)
        n = len(self.sources)
        m = (torch.rand(_REF_SUBSETS, n, generator=gen) < 0.5).to(torch.float64)
        if self.forced_source is None and n:
            empty = m.sum(1) == 0
            pick = torch.randint(0, n, (int(empty.sum()),), generator=gen)
            m[torch.nonzero(empty).flatten(), pick] = 1.0
        if self.forced_source is not None:
            m = torch.cat([m, torch.ones(m.shape[0], 1, dtype=torch.float64)], 1)
        return m

    def target_losses(self, dz: torch.Tensor, step_scale: float) -> torch.Tensor:
        """Per-target-row loss log(1 + exp(-(f_j + s Δz_j))) for output changes Δz of shape (B, T)."""
        return F.softplus(-(self.target_outputs.to(dz.dtype) + step_scale * dz))

    # ------------------------------------------------------------------ statistics
    def features64(self) -> torch.Tensor:
        """The training features in float64 (cached; the exact solver works on them)."""
        if self._features64 is None:
            self._features64 = self.features.to(torch.float64)
        return self._features64

    def statistics(self) -> SourceStatistics:
        """Per-source sufficient statistics of the second-order model at w = 0 (computed once)."""
        if self._stats is None:
            self._stats = self._compute_statistics()
        return self._stats

    def fast_statistics(self) -> tuple[Any, ...]:
        """(gram, grad, target_r, tail_trace, tail_target, tail_grad, basis) in the fast path's precision
        (``config.fast_dtype``; cached)."""
        dtype = torch.float32 if self.config.fast_dtype == "float32" else torch.float64
        if self._fast is not None and self._fast[0] == dtype:
            return self._fast[1]
        st = self.statistics()
        conv = tuple(
            None if t is None else t.to(dtype).contiguous()
            for t in (st.gram, st.grad, st.target_r, st.tail_trace, st.tail_target, st.tail_grad, st.basis)
        )
        self._fast = (dtype, conv)
        return conv

    def _chunks(self, order: torch.Tensor | None = None) -> Any:
        """Training rows in blocks of about ``_CHUNK_BYTES`` of float64 (``order``: a row permutation to follow),
        as (row indices or slice, float64 block): the statistics never hold a float64 copy of all features."""
        n_rows, d = self.features.shape
        step = max(1, _CHUNK_BYTES // (8 * max(d, 1)))
        for s in range(0, n_rows, step):
            if order is None:
                idx: Any = slice(s, min(s + step, n_rows))
                block = self.features[idx]
            else:
                idx = order[s : s + step]
                block = self.features.index_select(0, idx)
            yield idx, block.to(torch.float64)

    def row_sq_norms(self) -> torch.Tensor:
        """||g_i||² of every training row in float64 (computed once, block by block)."""
        return self.memo(
            ("row_sq_norms",),
            lambda: torch.cat([b.pow(2).sum(1) for _, b in self._chunks()])
            if self.features.shape[0]
            else torch.zeros(0, dtype=torch.float64),
        )

    def _principal_basis(self, curv: torch.Tensor, r: int) -> torch.Tensor:
        """The r leading principal directions (d, r) of the per-source averaged curvature."""
        d, n_src = self.dim, len(self.order)
        w = curv / self.counts[self.row_source] / n_src  # every source counts equally
        sw = w.sqrt().to(torch.float32)
        if self.features.shape[0] >= d and d >= RANDOMIZED_BASIS_MIN_DIM and 4 * r <= d:
            return self._randomized_basis(sw, r)
        if self.features.shape[0] >= d:
            # XᵀX accumulated block by block in float32 (X = √w ⊙ G is never formed whole)
            step = max(1, _CHUNK_BYTES // (4 * d))
            xtx = torch.zeros(d, d, dtype=torch.float32)
            for s in range(0, self.features.shape[0], step):
                xb = self.features[s : s + step] * sw[s : s + step, None]
                xtx.addmm_(xb.T, xb)
            return _leading_eigenvectors(xtx.to(torch.float64), r)
        x = (self.features * sw[:, None]).contiguous()
        # fewer rows than dimensions: eigenvectors of XᵀX from the N×N dual X Xᵀ
        x64 = x.to(torch.float64)
        evals, evecs = torch.linalg.eigh(x64 @ x64.T)
        order = torch.argsort(evals, descending=True)[:r]
        keep = order[evals[order] > evals.max() * 1e-12]
        basis = x64.T @ evecs[:, keep] / evals[keep].sqrt()
        if basis.shape[1] < r:  # rank-deficient: pad with an orthonormal complement
            extra = torch.randn(
                d, r - basis.shape[1], dtype=torch.float64, generator=torch.Generator().manual_seed(0)
            )
            basis = torch.linalg.qr(torch.cat([basis, extra], 1)).Q
        return torch.linalg.qr(basis).Q.contiguous()

    def _randomized_basis(self, sw: torch.Tensor, r: int) -> torch.Tensor:
        """The r leading eigenvectors of XᵀX (X = √w ⊙ G) by randomized subspace iteration (Halko, Martinsson and
        Tropp 2011, algorithm 4.4), without forming the d x d matrix: each pass over the rows costs O(N d k) with
        k = r + oversampling, and there are ``_POWER_ITERATIONS`` + 2 of them, where the exact path costs O(N d²)
        for XᵀX and O(d³) for its eigenvectors. Deterministic (seed 0)."""
        d, n_rows = self.dim, self.features.shape[0]
        k = min(d, r + max(r // 2, 16))
        step = max(1, _CHUNK_BYTES // (4 * d))

        def gram_times(v: torch.Tensor) -> torch.Tensor:  # XᵀX v, block by block in float32
            out = torch.zeros(d, v.shape[1], dtype=torch.float32)
            for s in range(0, n_rows, step):
                xb = self.features[s : s + step] * sw[s : s + step, None]
                out.addmm_(xb.T, xb @ v)
            return out

        q = torch.randn(d, k, generator=torch.Generator().manual_seed(0), dtype=torch.float32)
        for _ in range(_POWER_ITERATIONS + 1):
            q = torch.linalg.qr(gram_times(q).to(torch.float64)).Q.to(torch.float32)
        q64 = q.to(torch.float64)
        small = q64.T @ gram_times(q).to(torch.float64)  # Rayleigh-Ritz on the captured subspace
        evals, evecs = torch.linalg.eigh((small + small.T) / 2)
        top = torch.argsort(evals, descending=True)[:r]
        return torch.linalg.qr(q64 @ evecs[:, top]).Q.contiguous()

    def _compute_statistics(self) -> SourceStatistics:
        f = self.outputs
        curv = torch.sigmoid(f) * torch.sigmoid(-f)  # σ'(f)
        resid = torch.sigmoid(-f)  # -dℓ/dz at w = 0
        n_src = len(self.order)
        d, r = self.dim, self.reduce_dim
        basis = self._principal_basis(curv, r) if r < d else None
        # Gram matrices are stored in the fast path's precision (they are the bulk of the memory: n r²)
        stat_dtype = torch.float32 if self.config.fast_dtype == "float32" else torch.float64
        gram = torch.zeros(n_src, r * r, dtype=stat_dtype)
        grad_full = torch.zeros(n_src, d, dtype=torch.float64)
        leftover = torch.zeros(self.features.shape[0], dtype=torch.float64) if basis is not None else None
        # one pass over the rows in source order, block by block: memory O(block · d + n r²), time O(N d r)
        order = torch.argsort(self.row_source, stable=True)
        sorted_src = self.row_source[order]
        bounds = torch.searchsorted(sorted_src, torch.arange(n_src + 1)).tolist()
        pos = 0
        for idx, g in self._chunks(order):
            rows = g.shape[0]
            src = sorted_src[pos : pos + rows]
            grad_full.index_add_(0, src, -resid[idx][:, None] * g)
            gr = g if basis is None else g @ basis
            if leftover is not None:
                leftover[idx] = (g * g).sum(1) - (gr * gr).sum(1)
            xr = gr * curv[idx].sqrt()[:, None]
            first, last = int(src[0]), int(src[-1])
            for j in range(first, last + 1):
                a, b = max(bounds[j], pos) - pos, min(bounds[j + 1], pos + rows) - pos
                if b > a:
                    xj = xr[a:b].to(stat_dtype)
                    gram[j] += (xj.T @ xj).reshape(-1)
            pos += rows
        if basis is None:
            return SourceStatistics(
                basis=None,
                gram=gram,
                grad=grad_full,
                tail_trace=None,
                tail_grad=None,
                tail_target=None,
                target_r=self.target_features,
                tail_dims=0,
            )
        grad_r = grad_full @ basis
        tail_grad = grad_full - grad_r @ basis.T
        tail_trace = torch.zeros(n_src, dtype=torch.float64).index_add_(0, self.row_source, curv * leftover)
        return SourceStatistics(
            basis=basis,
            gram=gram,
            grad=grad_r,
            tail_trace=tail_trace.clamp_min(0.0),
            tail_grad=tail_grad,
            tail_target=tail_grad @ self.target_features.T,
            target_r=self.target_features @ basis,
            tail_dims=d - r,
        )


def _leading_eigenvectors(sym: torch.Tensor, r: int) -> torch.Tensor:
    """The r eigenvectors (d, r) of the largest eigenvalues of a symmetric matrix, largest first.

    LAPACK's ?syevr computes only the wanted ones (SciPy, when installed): at d = 2048, r = 256 that is about
    3x faster than a full ``torch.linalg.eigh``; the subspace is the same (columns may differ in sign).
    """
    d = sym.shape[0]
    try:
        from scipy.linalg import eigh as scipy_eigh
    except ImportError:  # pragma: no cover - SciPy is optional
        scipy_eigh = None
    if scipy_eigh is not None and r < d:
        evals, evecs = scipy_eigh(
            sym.numpy(), subset_by_index=[d - r, d - 1], driver="evr", overwrite_a=True, check_finite=False
        )
        return torch.from_numpy(np.ascontiguousarray(evecs[:, ::-1]))
    evals, evecs = torch.linalg.eigh(sym)
    return evecs[:, torch.argsort(evals, descending=True)[:r]].contiguous()
