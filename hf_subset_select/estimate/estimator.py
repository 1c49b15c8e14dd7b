"""First-order estimates of the target loss after fine-tuning on a subset of sources.

For a subset S of sources, fine-tuning from θ* is replaced by an L2-regularized logistic regression
on the linearized outputs z_i(w) = f_i + g_iᵀw of the subset's training rows (DESIGN.md section 1):

    ŵ_S = argmin_w  c_S Σ_{i ∈ D_S} log(1 + exp(-z_i(w))) + (λ/2) ||w||²

with c_S = 1/|D_S| (``reduction="mean"``, a fixed number of steps) or 1/N_train (``"sum"``, a fixed
number of epochs). The estimated target loss is L̂(S) = mean_j log(1 + exp(-(f_j + s · g_jᵀŵ_S)))
over the target rows, with a step scale s (1 unless calibrated).

Two solvers share this API:

* ``"exact"``: batched Newton-CG over many subsets at once in float64, preconditioned by the
  fast path's quadratic model, until ||∇J(ŵ)|| <= tol · ||∇J(0)|| for every subset.
* ``"fast"``: the logistic loss expanded to second order at w = 0, which turns each source into
  sufficient statistics (a Gram matrix Σ σ'(f_i) g_i g_iᵀ and a gradient sum -Σ σ(-f_i) g_i). A
  subset then costs an n-term sum of r×r matrices and one Cholesky solve, independent of how many
  examples it holds. For large d the statistics live in the r leading principal directions of the
  (per-source averaged) curvature, and the remaining directions are modelled as isotropic with the
  subset's own mean leftover curvature, which keeps the full-d inner products between target and
  training gradients. docs/method.md has the derivation and the measured error.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from ..collect.cache import GradientCache
from ..config import EstimatorConfig

__all__ = ["FirstOrderEstimator", "Estimate", "AUTO_REDUCE_DIM"]

# Fast path: with d above this, keep this many principal directions (see docs/method.md).
AUTO_REDUCE_DIM = 256
_REF_SUBSETS = 64  # reference subsets of the automatic λ rule
_REF_ROWS = 4096  # training rows sampled to measure the step size of the automatic λ rule
_EXACT_CHUNK = 64


@dataclass
class Estimate:
    """Detailed result of :meth:`FirstOrderEstimator.estimate` with ``details=True``.

    Attributes:
        loss: estimated target loss per subset, shape (B,).
        per_example: estimated loss of every target row per subset, shape (B, T).
        per_target_source: mean estimated loss over the target rows of each target source name.
        weights: fitted steps ŵ_S in the cache's d-dim space, shape (B, d).
        subsets: the subsets as lists of candidate source names (the forced target source excluded).
    """

    loss: torch.Tensor
    per_example: torch.Tensor
    per_target_source: dict[str, torch.Tensor]
    weights: torch.Tensor
    subsets: list[list[str]]


@dataclass
class _Stats:
    """Per-source sufficient statistics of the second-order model, in a basis of r directions."""

    basis: torch.Tensor | None  # (d, r) orthonormal, None = identity (r = d)
    gram: torch.Tensor  # (n, r*r) Σ_i σ'(f_i) (Uᵀg_i)(Uᵀg_i)ᵀ per source, flattened
    grad: torch.Tensor  # (n, r) -Σ_i σ(-f_i) Uᵀg_i per source
    tail_trace: torch.Tensor | None  # (n,) Σ_i σ'(f_i) ||(I - UUᵀ) g_i||²
    tail_grad: torch.Tensor | None  # (n, d) (I - UUᵀ) grad_k
    tail_target: torch.Tensor | None  # (n, T) G_T (I - UUᵀ) grad_k
    target_r: torch.Tensor  # (T, r) G_T U
    tail_dims: int  # d - r


class FirstOrderEstimator:
    """Estimate the target loss after fine-tuning on many subsets of sources at once, on a CPU.

    Args:
        cache: a :class:`~hf_subset_select.GradientCache` with training rows and a target split.
        config: an :class:`~hf_subset_select.EstimatorConfig`; keyword arguments override its fields.
        target: evaluate on the target rows of this other cache instead (same projection and d).

    The candidate sources are :attr:`sources`: every training source of the cache except the target's
    own training source when ``include_target_train`` is on (then it is in every subset).

    Example::

        est = FirstOrderEstimator(GradientCache.load("grad_cache"))
        est.estimate([["cot_gsm"], ["cot_gsm", "noisy_web"]])   # tensor([L̂_1, L̂_2])
    """

    def __init__(
        self,
        cache: GradientCache,
        config: EstimatorConfig | None = None,
        *,
        target: GradientCache | None = None,
        **kwargs: Any,
    ) -> None:
        if not isinstance(cache, GradientCache):
            raise TypeError(
                f"FirstOrderEstimator needs a GradientCache, got {type(cache).__name__}; "
                "load one with GradientCache.load(path)."
            )
        if config is None:
            config = EstimatorConfig(**kwargs)
        elif kwargs:
            config = EstimatorConfig(**{**config.to_dict(), **kwargs})
        self.config = config
        self.cache = cache
        cache.validate()  # NaN / inf / inconsistent arrays -> GradientCacheError naming the fix
        target_cache = cache if target is None else target
        if target is not None:
            target.validate()
            if target.dim != cache.dim:
                raise ValueError(
                    f"Dimension mismatch: the training cache has d={cache.dim} but the target cache has "
                    f"d={target.dim}. Collect both with the same CollectConfig (proj_dim, proj_type, seed)."
                )
            p_train, p_target = cache.manifest.get("projection"), target.manifest.get("projection")
            if p_train is not None and p_target is not None and p_train != p_target:
                raise ValueError(
                    f"The two caches used different projections ({p_train} vs {p_target}); their "
                    "gradients are not comparable. Re-collect the target with the training cache's "
                    "CollectConfig."
                )
            geometry = [
                {
                    k: v
                    for k, v in (c.manifest.get("precondition") or {"kind": "none"}).items()
                    if k in ("kind", "sha256")
                }
                for c in (cache, target)
            ]
            if geometry[0] != geometry[1]:
                raise ValueError(
                    f"The two caches scaled their gradients differently (precondition {geometry[0]} vs "
                    f"{geometry[1]}); their features are not comparable. Collect the target at the same θ* with "
                    "the same CollectConfig.precondition and optimizer state as the training cache."
                )
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
        self._order = self.sources + ([forced] if forced is not None else [])
        if not self._order:
            raise ValueError("The cache has no training sources.")
        local = {cache.source_id(name): j for j, name in enumerate(self._order)}
        lut = torch.full((len(cache.sources),), -1, dtype=torch.int64)
        for gid, j in local.items():
            lut[gid] = j
        self._row_source = lut[cache.source_index[train_idx]]
        self._features = cache.features[train_idx]  # float32 (N, d)
        self._outputs = cache.outputs[train_idx].to(torch.float64)
        self._target_features = target_cache.features[tmask].to(torch.float64)
        self._target_outputs = target_cache.outputs[tmask].to(torch.float64)
        tsrc = target_cache.source_index[tmask]
        self._target_groups = {
            target_cache.sources[int(g)]: torch.nonzero(tsrc == g).flatten()
            for g in torch.unique(tsrc).tolist()
        }
        self._counts = torch.bincount(self._row_source, minlength=len(self._order)).to(torch.float64)
        self._stats: _Stats | None = None
        self._features64: torch.Tensor | None = None
        self._auto_l2: tuple[tuple[Any, ...], float] | None = None
        self._kappa: dict[int, float] = {}
        self.l2: float | None = config.l2
        self.step_scale: float = float(config.step_scale)
        self.last_solve_info: dict[str, Any] = {}
        self.calibration: dict[str, Any] | None = None

    # ------------------------------------------------------------------ properties
    @property
    def dim(self) -> int:
        """The cache's gradient dimension d."""
        return int(self._features.shape[1])

    @property
    def num_target(self) -> int:
        return int(self._target_outputs.shape[0])

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
        return float(F.softplus(-self._target_outputs).mean())

    def resolved_l2(self) -> float:
        """λ in use: the configured or calibrated value, else the budget rule's (when ``finetune_lr`` and
        ``finetune_steps`` are set), else the trust-radius rule's."""
        if self.l2 is not None:
            return float(self.l2)
        cfg = self.config
        key = (
            (
                cfg.finetune_lr,
                cfg.finetune_steps,
                cfg.finetune_optimizer,
                cfg.finetune_batch_size,
                cfg.reduction,
            )
            if cfg.finetune_lr is not None
            else (cfg.trust_radius, cfg.reduction, cfg.seed)
        )
        if self._auto_l2 is None or self._auto_l2[0] != key:  # recomputed if the config was changed in place
            self._auto_l2 = (key, self.budget_l2() if cfg.finetune_lr is not None else self.auto_l2())
        return self._auto_l2[1]

    @property
    def l2_rule(self) -> str:
        """Where :meth:`resolved_l2` comes from: 'calibrated', 'set' (configured), 'budget' or 'trust_radius'."""
        if self.l2 is not None:
            if self.calibration is not None and self.l2 == self.calibration.get("l2"):
                return "calibrated"
            return "set"
        return "budget" if self.config.finetune_lr is not None else "trust_radius"

    def budget_step_size(
        self, lr: float | None = None, optimizer: str | None = None, batch_size: int | None = None
    ) -> float:
        """η_eff: the plain gradient-descent step size, in the cache's feature geometry, that stands for a fine-tune
        at learning rate ``lr`` with ``optimizer`` ('adamw' or 'sgd') and ``batch_size`` examples per step
        (defaults: the config's ``finetune_*`` fields). docs/method.md, section 6, has the derivation.

        * SGD on raw gradients: η_eff = η.
        * AdamW moves coordinate c by about η μ_c / D'_c, D'_c the fine-tune's own root second moment. In a cache
          collected in Adam geometry the features already carry the meta-training denominators D_c, so
          η_eff = η / κ; on raw gradients η_eff = η / (D̄ κ), with D̄ and Σ_c D_c, Σ_c v̂_c read by the collector from
          the meta-training optimizer (``precondition.adam_scalars``, :func:`~hf_subset_select.adam_step_scalars`).
          κ² = E‖ḡ‖² / Σ_c D_c (Adam geometry) or E‖ḡ‖² / Σ_c v̂_c (raw): how much larger the fine-tune's minibatch
          gradients ḡ at θ* (signal plus minibatch noise, from the cache) are than what the meta-training
          optimizer saw, as the median over the automatic rule's 64 reference subsets.
        """
        cfg = self.config
        lr = cfg.finetune_lr if lr is None else float(lr)
        optimizer = optimizer or cfg.finetune_optimizer
        batch_size = cfg.finetune_batch_size if batch_size is None else int(batch_size)
        if lr is None or not lr > 0:
            raise ValueError(
                "budget_step_size() needs a positive learning rate (EstimatorConfig.finetune_lr)."
            )
        kind = self.cache.precondition_info(with_sha256=False).get("kind", "none")
        if optimizer == "sgd":
            if kind != "none":
                raise ValueError(
                    f"The cache was collected in a preconditioned geometry (precondition kind {kind!r}), which models "
                    "AdamW, but finetune_optimizer='sgd'. Collect with CollectConfig(precondition='none') for an SGD "
                    "fine-tune, or set finetune_optimizer='adamw'."
                )
            return lr
        if optimizer != "adamw":
            raise ValueError(f"optimizer={optimizer!r} is not valid; choose 'adamw' or 'sgd'.")
        if batch_size is None or batch_size <= 0:
            raise ValueError(
                "The budget λ rule for an AdamW fine-tune needs its batch size (examples per optimizer step, all "
                "processes and accumulation steps together): set EstimatorConfig.finetune_batch_size, or build the "
                "config with EstimatorConfig.from_training_args(args)."
            )
        _, scalars = self._adam_scalars()
        kappa = self.adam_noise_scale(batch_size)
        if kind == "none":
            return lr / (scalars["denominator"] * kappa)
        return lr / kappa

    def _adam_scalars(self) -> tuple[str, dict[str, float]]:
        """The cache's geometry kind and the meta-training AdamW's step scalars, or a ValueError naming the fix."""
        info = self.cache.precondition_info(with_sha256=False)
        scalars = info.get("adam_scalars") or {}
        needed = ("denominator", "sum_denominator", "sum_second_moment")
        if all(isinstance(scalars.get(k), (int, float)) and scalars[k] > 0 for k in needed):
            return str(info.get("kind", "none")), {k: float(scalars[k]) for k in needed}
        reason = info.get("adam_scalars_error")
        raise ValueError(
            "The budget λ rule for an AdamW fine-tune needs the meta-training AdamW's step size, which the collector "
            "records (precondition.adam_scalars in the cache manifest) only when it sees that optimizer"
            + (f"; here it could not read it: {reason}" if reason else "")
            + ". Re-collect as a Trainer callback or with collect(..., optimizer=trainer.optimizer), with "
            "CollectConfig(overwrite=True) (an existing collection is otherwise reused as it is); or set "
            "EstimatorConfig.l2 yourself; or leave finetune_lr/finetune_steps unset for the trust-radius λ, and "
            "calibrate() it on a few real fine-tunes."
        )

    def adam_noise_scale(self, batch_size: int) -> float:
        """κ of :meth:`budget_step_size`: the typical fine-tune's root minibatch second moment at θ* over the
        meta-training optimizer's (1 when they agree; > 1 when a subset's mean gradient or a smaller batch makes
        AdamW's own denominators larger)."""
        key = int(batch_size)
        if key <= 0:
            raise ValueError(
                f"batch_size must be a positive number of examples per step, got {batch_size!r}."
            )
        cached = self._kappa.get(key)
        if cached is not None:
            return cached
        kind, scalars = self._adam_scalars()
        reference = scalars["sum_second_moment" if kind == "none" else "sum_denominator"]
        # per-source sums of the per-example loss gradients resid_i g_i are the fast path's statistics (kept
        # directions plus the orthogonal tail, so their squared norms add up); squared norms row by row
        st = self._prepare()
        resid = torch.sigmoid(-self._outputs)  # |dℓ/dz| at θ*
        norms = self._features.pow(2).sum(1).to(torch.float64)
        second = torch.zeros(len(self._order), dtype=torch.float64).index_add_(
            0, self._row_source, resid * resid * norms
        )
        m = self._reference_membership()
        count = m @ self._counts
        mean_sq = ((m @ st.grad) / count[:, None]).pow(2).sum(1)
        if st.tail_grad is not None:
            mean_sq = mean_sq + ((m @ st.tail_grad) / count[:, None]).pow(2).sum(1)
        minibatch = mean_sq + ((m @ second) / count - mean_sq).clamp_min(0.0) / key
        kappa = math.sqrt(max(float(minibatch.median()) / reference, 1e-30))
        self._kappa[key] = kappa
        return kappa

    def budget_l2(
        self,
        lr: float | None = None,
        steps: int | None = None,
        optimizer: str | None = None,
        batch_size: int | None = None,
    ) -> float:
        """λ of the budget rule: 1 / (η_eff · steps) (documented in docs/method.md, section 6).

        Gradient descent for t = η_eff · steps on the quadratic model and the ridge with λ = 1/t shrink each
        curvature direction h by nearly the same factor (1 - exp(-h t) against h t / (1 + h t)), so the ridge
        stands for that fine-tuning budget. Defaults: the config's ``finetune_*`` fields; with ``reduction="sum"``,
        ``steps`` counts a fine-tune over all training rows for the same number of epochs. η_eff comes from
        :meth:`budget_step_size`.
        """
        steps = self.config.finetune_steps if steps is None else int(steps)
        if steps is None or steps <= 0:
            raise ValueError("budget_l2() needs a positive number of steps (EstimatorConfig.finetune_steps).")
        return 1.0 / (self.budget_step_size(lr, optimizer, batch_size) * steps)

    # ------------------------------------------------------------------ subsets
    def membership(self, subsets: Any) -> torch.Tensor:
        """Turn subsets (lists of source names, or a boolean matrix over :attr:`sources`) into the
        internal float64 membership matrix (B, n) whose last column is the forced target source."""
        n_cand = len(self.sources)
        if isinstance(subsets, (torch.Tensor, np.ndarray)):
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
        else:
            if isinstance(subsets, str) or (
                isinstance(subsets, Sequence) and len(subsets) > 0 and isinstance(subsets[0], str)
            ):
                raise TypeError(
                    "estimate() takes a list of subsets, each a list of source names: wrap a single "
                    f"subset as [{list(subsets) if not isinstance(subsets, str) else [subsets]}]."
                )
            subsets = list(subsets)
            index = {s: j for j, s in enumerate(self.sources)}
            m = torch.zeros(len(subsets), n_cand, dtype=torch.float64)
            for b, subset in enumerate(subsets):
                if isinstance(subset, str):
                    subset = [subset]
                for name in subset:
                    if name == self.forced_source:
                        continue
                    j = index.get(name)
                    if j is None:
                        raise ValueError(
                            f"Unknown source {name!r} in subset {b}; the candidate sources are "
                            f"{self.sources}. Check the spelling, or re-collect the cache with that source."
                        )
                    m[b, j] = 1.0
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

    def _names(self, m: torch.Tensor) -> list[list[str]]:
        return [
            [self.sources[j] for j in torch.nonzero(row[: len(self.sources)]).flatten().tolist()] for row in m
        ]

    def _scale(self, m: torch.Tensor) -> torch.Tensor:
        if self.config.reduction == "mean":
            return 1.0 / (m @ self._counts)
        return torch.full((m.shape[0],), 1.0 / float(self._counts.sum()), dtype=torch.float64)

    # ------------------------------------------------------------------ statistics
    def _prepare(self) -> _Stats:
        if self._stats is not None:
            return self._stats
        g = self._features.to(torch.float64)
        f = self._outputs
        curv = torch.sigmoid(f) * torch.sigmoid(-f)  # σ'(f)
        resid = torch.sigmoid(-f)  # -dℓ/dz at w = 0
        n_src = len(self._order)
        d, r = self.dim, self.reduce_dim
        grad_full = torch.zeros(n_src, d, dtype=torch.float64).index_add_(
            0, self._row_source, -resid[:, None] * g
        )
        basis = None
        if r < d:
            # principal directions of the per-source averaged curvature (every source counts equally)
            w = curv / self._counts[self._row_source] / n_src
            x = (self._features * w.sqrt().to(torch.float32)[:, None]).contiguous()
            if x.shape[0] >= d:
                hbar = (x.T @ x).to(torch.float64)
                evals, evecs = torch.linalg.eigh(hbar)
                basis = evecs[:, torch.argsort(evals, descending=True)[:r]].contiguous()
            else:  # fewer rows than dimensions: eigenvectors of XᵀX from the N×N dual X Xᵀ
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
                basis = torch.linalg.qr(basis).Q.contiguous()
            gr = g @ basis
        else:
            gr = g
        # Gram matrices are stored in the fast path's precision (they are the bulk of the memory: n r²)
        stat_dtype = torch.float32 if self.config.fast_dtype == "float32" else torch.float64
        gram = torch.zeros(n_src, r * r, dtype=stat_dtype)
        for j in range(n_src):
            rows = self._row_source == j
            xj = (gr[rows] * curv[rows].sqrt()[:, None]).to(stat_dtype)
            gram[j] = (xj.T @ xj).reshape(-1)
        if basis is not None:
            grad_r = grad_full @ basis
            tail_grad = grad_full - grad_r @ basis.T
            leftover = (g * g).sum(1) - (gr * gr).sum(1)
            tail_trace = torch.zeros(n_src, dtype=torch.float64).index_add_(
                0, self._row_source, curv * leftover
            )
            stats = _Stats(
                basis=basis,
                gram=gram,
                grad=grad_r,
                tail_trace=tail_trace.clamp_min(0.0),
                tail_grad=tail_grad,
                tail_target=tail_grad @ self._target_features.T,
                target_r=self._target_features @ basis,
                tail_dims=d - r,
            )
        else:
            stats = _Stats(
                basis=None,
                gram=gram,
                grad=grad_full,
                tail_trace=None,
                tail_grad=None,
                tail_target=None,
                target_r=self._target_features,
                tail_dims=0,
            )
        self._stats = stats
        return stats

    def _fast_stats(self) -> tuple[Any, ...]:
        """The statistics in the fast path's precision (cached)."""
        dtype = torch.float32 if self.config.fast_dtype == "float32" else torch.float64
        cached = getattr(self, "_fast_cache", None)
        if cached is not None and cached[0] == dtype:
            return cached[1]
        st = self._prepare()
        conv = tuple(
            None if t is None else t.to(dtype).contiguous()
            for t in (st.gram, st.grad, st.target_r, st.tail_trace, st.tail_target, st.tail_grad, st.basis)
        )
        self._fast_cache = (dtype, conv)
        return conv

    def _fast_solve(
        self, m: torch.Tensor, l2: float
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Second-order model: the step in the kept directions (B, r), the tail coefficient (B,) or None
        (the tail step is coef · (I - UUᵀ) Σ_k m_k grad_k), and the membership in the stats' precision."""
        st = self._prepare()
        gram, grad, _, tail_trace, _, _, _ = self._fast_stats()
        dtype = gram.dtype
        r = int(round(math.sqrt(gram.shape[1])))
        scale = self._scale(m).to(dtype)
        m = m.to(dtype)
        k = (m @ gram).view(-1, r, r)
        k.mul_(scale[:, None, None])
        k.diagonal(dim1=1, dim2=2).add_(l2)
        b = (m @ grad).mul_(scale[:, None])
        w_r, failed = _spd_solve(k, b.neg_())
        if failed and dtype != torch.float64:
            # redo the few matrices that are not positive definite in float32 in float64
            idx = torch.tensor(failed)
            m64, s64 = m[idx].to(torch.float64), scale[idx].to(torch.float64)
            k64 = (m[idx] @ gram).to(torch.float64).view(-1, r, r) * s64[:, None, None]
            k64.diagonal(dim1=1, dim2=2).add_(l2)
            w64, failed = _spd_solve(k64, -(m64 @ st.grad) * s64[:, None])
            w_r[idx] = w64.to(dtype)
        if failed:
            raise FloatingPointError(
                f"The fast path's curvature matrix is not positive definite for {len(failed)} subset(s); "
                "λ is too small for the numerical range of the cache. Use a larger l2 or solver='exact'."
            )
        coef = None
        if st.basis is not None:
            h_tail = (m @ tail_trace) * scale / max(st.tail_dims, 1)
            coef = -scale / (l2 + h_tail)
        return w_r, coef, m

    def _fast(
        self, m: torch.Tensor, l2: float, want_w: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Second-order model: (Δz on the target rows (B, T), ŵ in d dims (B, d) float64 or None)."""
        _, _, target_r, _, tail_target, tail_grad, basis = self._fast_stats()
        w_r, coef, m = self._fast_solve(m, l2)
        dz = w_r @ target_r.T
        w = None
        if coef is not None:
            dz = dz + coef[:, None] * (m @ tail_target)
            if want_w:
                w = w_r @ basis.T + coef[:, None] * (m @ tail_grad)
        elif want_w:
            w = w_r
        return dz, (None if w is None else w.to(torch.float64))

    def _precond(self, m: torch.Tensor, l2: float):
        """Apply the inverse of the fast path's quadratic model (B, d) -> (B, d); used by the exact solver."""
        st = self._prepare()
        r = int(round(math.sqrt(st.gram.shape[1])))
        scale = self._scale(m)
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

    def _exact(self, m: torch.Tensor, l2: float) -> torch.Tensor:
        """Batched Newton-CG on all examples of each subset; returns ŵ (B, d) in float64."""
        if self._features64 is None:
            self._features64 = self._features.to(torch.float64)
        g, f = self._features64, self._outputs
        cfg = self.config
        omega = m[:, self._row_source] * self._scale(m)[:, None]  # (B, N) example weights
        precond = self._precond(m, l2)

        def objective(z: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
            return (omega * F.softplus(-z)).sum(1) + 0.5 * l2 * (w * w).sum(1)

        b0 = -(omega * torch.sigmoid(-f)) @ g  # ∇J(0)
        g0 = b0.norm(dim=1).clamp_min(1e-300)
        w = torch.zeros_like(b0)
        z = f.expand(m.shape[0], -1).clone()
        # warm start from the fast path's step where it lowers the objective
        try:
            _, w_fast = self._fast(m, l2, want_w=True)
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
            step, n_cg = _pcg(hvp, -grad, precond, forcing, max_iter=max(50, 2 * self.reduce_dim))
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
        self.last_solve_info = {
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
        return w

    # ------------------------------------------------------------------ estimates
    def _delta_z(
        self, m: torch.Tensor, l2: float, solver: str, want_w: bool
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if solver == "fast":
            return self._fast(m, l2, want_w=want_w)
        w = self._exact(m, l2)
        return w @ self._target_features.T, w

    def _run(
        self,
        m: torch.Tensor,
        *,
        want_w: bool,
        solver: str | None = None,
        l2: float | None = None,
        post: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Solve all subsets in chunks; returns (post(Δz) stacked, ŵ or None)."""
        solver = solver or self.config.solver
        if solver not in ("fast", "exact"):
            raise ValueError(f"solver={solver!r} is not valid; choose 'fast' or 'exact'.")
        l2 = self.resolved_l2() if l2 is None else float(l2)

        def work(piece: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
            dz, w = self._delta_z(piece, l2, solver, want_w)
            return (dz if post is None else post(dz)), w

        if solver == "exact":
            parts = [work(m[s : s + _EXACT_CHUNK]) for s in range(0, m.shape[0], _EXACT_CHUNK)]
        else:
            self._fast_stats()
            chunk = self.config.chunk_size
            pieces = [m[s : s + chunk] for s in range(0, m.shape[0], chunk)]
            threads = max(1, min(self.config.num_threads or torch.get_num_threads(), len(pieces)))
            if threads == 1:
                parts = [work(piece) for piece in pieces]
            else:
                previous = torch.get_num_threads()
                torch.set_num_threads(1)
                try:
                    with _single_threaded_blas(), ThreadPoolExecutor(threads) as pool:
                        parts = list(pool.map(work, pieces))
                finally:
                    torch.set_num_threads(previous)
        out = torch.cat([p[0] for p in parts])
        return out, (torch.cat([p[1] for p in parts]) if want_w else None)

    def _losses(self, dz: torch.Tensor, step_scale: float | None = None) -> torch.Tensor:
        s = self.step_scale if step_scale is None else step_scale
        return F.softplus(-(self._target_outputs.to(dz.dtype) + s * dz))

    def estimate(self, subsets: Any, *, details: bool = False, solver: str | None = None) -> Any:
        """Estimated target loss after fine-tuning on each subset.

        Args:
            subsets: a list of subsets (each a list of source names from :attr:`sources`), or a boolean
                matrix of shape (num_subsets, len(sources)).
            details: also return per-example and per-target-source losses and the fitted steps.
            solver: override the configured solver ('fast' or 'exact') for this call.

        Returns:
            A float64 tensor of shape (num_subsets,), or an :class:`Estimate` when ``details=True``.
        """
        m = self.membership(subsets)
        if not details:
            loss, _ = self._run(
                m, want_w=False, solver=solver, post=lambda dz: self._losses(dz).mean(1, dtype=torch.float64)
            )
            return loss
        per_example, w = self._run(m, want_w=True, solver=solver, post=self._losses)
        per_example = per_example.to(torch.float64)
        loss = per_example.mean(1)
        groups = {name: per_example[:, idx].mean(1) for name, idx in self._target_groups.items()}
        return Estimate(loss, per_example, groups, w, self._names(m))

    def fitted_steps(self, subsets: Any, *, solver: str | None = None) -> torch.Tensor:
        """ŵ_S (times the step scale) for each subset, shape (B, d): the parameter change is P·ŵ_S."""
        _, w = self._run(self.membership(subsets), want_w=True, solver=solver)
        return self.step_scale * w

    def per_source_loss(self, sources: Sequence[str] | None = None) -> dict[str, float]:
        """Estimated target loss after fine-tuning on each source alone (plus the forced target source)."""
        names = list(self.sources if sources is None else sources)
        if not names:
            return {}
        losses = self.estimate([[s] for s in names])
        return {s: float(v) for s, v in zip(names, losses)}

    # ------------------------------------------------------------------ λ
    def _reference_membership(self) -> torch.Tensor:
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

    def auto_l2(self, trust_radius: float | None = None) -> float:
        """The automatic λ (documented in docs/method.md).

        Under the fast path's quadratic model, take 64 random reference subsets (each source in with
        probability 1/2) and measure the RMS change g_iᵀŵ_S of the outputs of each subset's own training
        rows (4,096 sampled rows); ρ(λ) is the median over the subsets. λ is the larger of

        * λ_trust: ρ(λ) = ``trust_radius`` (the step stays where the expansion around θ* holds), and
        * λ_half: ρ(λ) = ρ(0) / 2 (the ridge halves the unregularized Newton step, so λ is on the
          scale of the curvature along the step and the exact solution stays finite and close),

        each found by bisection in log λ.
        """
        delta = self.config.trust_radius if trust_radius is None else float(trust_radius)
        st = self._prepare()
        m = self._reference_membership()
        gen = torch.Generator().manual_seed(self.config.seed + 1)
        n_rows = self._features.shape[0]
        rows = torch.randperm(n_rows, generator=gen)[:_REF_ROWS]
        g_rows = self._features[rows].to(torch.float64)
        in_subset = m[:, self._row_source[rows]] > 0  # (R, rows)
        # the rows' coordinates in the kept directions and against each source's tail gradient, so that a
        # step's output changes cost O(r) per row instead of O(d)
        rows_r = g_rows if st.basis is None else g_rows @ st.basis
        rows_tail = None if st.tail_grad is None else st.tail_grad @ g_rows.T  # (n, rows)
        r = int(round(math.sqrt(st.gram.shape[1])))
        total_curv = float(st.gram[:, :: r + 1].sum())
        if st.tail_trace is not None:
            total_curv += float(st.tail_trace.sum())
        scale0 = max(total_curv / float(self._counts.sum()) / self.dim, 1e-30)

        def rms(l2: float) -> float:
            try:
                w_r, coef, mm = self._fast_solve(m, l2)
            except FloatingPointError:  # numerically singular at this λ: an unbounded step
                return math.inf
            dz = w_r.to(torch.float64) @ rows_r.T
            if coef is not None:
                dz = dz + coef.to(torch.float64)[:, None] * (mm.to(torch.float64) @ rows_tail)
            sq = (dz * dz * in_subset).sum(1) / in_subset.sum(1).clamp_min(1)
            return float(torch.median(sq.sqrt()))

        lo0, hi0 = math.log(scale0 * 1e-9), math.log(scale0 * 1e9)
        with _single_threaded_blas():
            return self._bisect_l2(rms, lo0, hi0, delta)

    @staticmethod
    def _bisect_l2(rms: Callable[[float], float], lo0: float, hi0: float, delta: float) -> float:
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

    def calibrate(
        self,
        real_results: Mapping[Any, float] | Sequence[tuple[Any, float]],
        *,
        l2_grid: Sequence[float] | None = None,
        step_scales: Sequence[float] | None = None,
        fit_step_scale: bool = True,
        solver: str | None = None,
        tolerance: float = 0.05,
    ) -> dict[str, Any]:
        """Choose λ (and the step scale) that best reproduce a few real fine-tuning results.

        The error of a candidate (λ, s) is the mean squared log ratio (log L̂ - log L)² over the given
        subsets (a symmetric relative error). Among the candidates whose error is within ``tolerance``
        (relative) of the smallest, the one closest to the current setting (distance in log λ and log s) is
        taken: with a handful of results, this keeps the calibration from chasing noise.

        Args:
            real_results: {subset: true target loss} (a subset is a tuple/frozenset of source names),
                or a list of (subset, loss) pairs. Use subsets you will not evaluate the estimator on.
            l2_grid: λ values to try (default: the current λ times 10^k, k = -3 ... 3 in steps of 1/4).
            step_scales: step scales to try (default 10^k, k = -1.5 ... 1.5 in 61 steps; 1 included).
            fit_step_scale: fit the step scale too (else only λ, with step scale 1).
            solver: 'fast' or 'exact' (default: the configured solver).
            tolerance: relative slack of the tie rule above (0: the plain minimum).

        Returns:
            A dict with the chosen ``l2`` and ``step_scale`` and the mean relative error on the given
            subsets before and after. The estimator keeps the chosen values.
        """
        pairs = list(real_results.items()) if isinstance(real_results, Mapping) else list(real_results)
        if not pairs:
            raise ValueError("calibrate() needs at least one (subset, true loss) pair from a real fine-tune.")
        subsets = [[s] if isinstance(s, str) else list(s) for s, _ in pairs]
        truth = torch.tensor([float(v) for _, v in pairs], dtype=torch.float64)
        if not bool(torch.isfinite(truth).all()) or bool((truth <= 0).any()):
            raise ValueError(
                "calibrate() needs finite, positive true losses; a NaN/inf or <= 0 loss usually means the "
                "real fine-tune diverged. Drop that run or lower its learning rate."
            )
        if tolerance < 0:
            raise ValueError(f"tolerance must be >= 0, got {tolerance}.")
        m = self.membership(subsets)
        before_l2, before_scale = self.resolved_l2(), self.step_scale
        grid = (
            [before_l2 * 10 ** (k / 4) for k in range(-12, 13)]
            if l2_grid is None
            else [float(x) for x in l2_grid]
        )
        if not grid or any(not (x > 0 and math.isfinite(x)) for x in grid):
            raise ValueError("l2_grid must hold finite positive values.")
        if not fit_step_scale:
            scales = [1.0]
        elif step_scales is None:
            scales = sorted({1.0, *[10 ** (k / 20) for k in range(-30, 31)]})
        else:
            scales = [float(x) for x in step_scales]
            if not scales or any(not (x > 0 and math.isfinite(x)) for x in scales):
                raise ValueError("step_scales must hold finite positive values.")
        log_truth = truth.log()

        def errors(dz: torch.Tensor, s: float) -> tuple[float, float]:
            est = self._losses(dz, s).mean(1, dtype=torch.float64)
            return float(((est.log() - log_truth) ** 2).mean()), float(((est - truth).abs() / truth).mean())

        dz_before, _ = self._run(m, want_w=False, solver=solver, l2=before_l2)
        _, rel_before = errors(dz_before, before_scale)
        table = []  # (log error, relative error, λ, s)
        for l2 in grid:
            dz, _ = self._run(m, want_w=False, solver=solver, l2=l2)
            table.extend((*errors(dz, sc), l2, sc) for sc in scales)
        best_err = min(row[0] for row in table)
        near = [row for row in table if row[0] <= best_err * (1.0 + tolerance) + 1e-15]

        def distance(row: tuple[float, float, float, float]) -> float:
            return math.log(row[2] / before_l2) ** 2 + math.log(row[3] / before_scale) ** 2

        chosen = min(near, key=lambda row: (distance(row), row[0]))
        self.l2, self.step_scale = chosen[2], chosen[3]
        self.calibration = {
            "l2": chosen[2],
            "step_scale": chosen[3],
            "num_results": len(pairs),
            "mean_relative_error_before": rel_before,
            "mean_relative_error_after": chosen[1],
            "mean_squared_log_error_after": chosen[0],
            "l2_before": before_l2,
            "step_scale_before": before_scale,
            "solver": solver or self.config.solver,
        }
        return dict(self.calibration)

    # ------------------------------------------------------------------ forward check
    def forward_check(
        self,
        model: Any,
        subsets: Any,
        target_dataset: Any,
        *,
        tokenizer: Any = None,
        max_length: int | None = None,
        batch_size: int = 32,
        solver: str | None = None,
        output_fn: Any = None,
    ) -> torch.Tensor:
        """Slower, more faithful estimate: evaluate the target for real at θ* + P·ŵ_S.

        ``model`` must hold θ* (e.g. :func:`~hf_subset_select.load_meta_init` with trainable parameters) and
        ``target_dataset`` the target evaluation examples the cache was collected on. For each subset the fitted
        step ŵ_S (times the step scale) is lifted to parameter space with the cache's own projection, added to
        the trainable parameters, the outputs f_j are recomputed by a forward pass, and the target loss
        mean_j log(1 + exp(-f_j)) is returned (shape (B,)). The parameters are restored afterwards.
        """
        from ..data.encode import encode_example
        from ..collect.outputs import resolve_output_fn
        from ..collect.per_example import collate_examples, trainable_parameters
        from ..collect.projection import make_projector

        proj = self.cache.manifest.get("projection")
        if not isinstance(proj, dict) or "kind" not in proj:
            raise ValueError(
                "The cache has no projection in its manifest, so ŵ cannot be mapped back to parameters; the "
                "forward check needs a cache written by the GradientCollector."
            )
        named = trainable_parameters(model)
        projector = make_projector(
            proj["kind"],
            int(proj["dim"]),
            int(proj["seed"]),
            [(n, tuple(p.shape)) for n, p in named],
            nnz=int(proj.get("nnz") or 4),
        )
        if projector.dim != self.dim or (
            proj.get("num_params") is not None and int(proj["num_params"]) != projector.num_params
        ):
            raise ValueError(
                f"Dimension mismatch: the model's trainable parameters ({projector.num_params}) and projection "
                f"(d={projector.dim}) do not match the cache (num_params={proj.get('num_params')}, d={self.dim}). "
                "Load the same θ* (load_meta_init(path, is_trainable=True)) the cache was collected from."
            )
        collect_cfg = self.cache.manifest.get("collect_config", {})
        max_length = int(max_length or collect_cfg.get("max_length") or 512)
        name = output_fn if output_fn is not None else self.cache.manifest.get("output_fn", "auto")
        if isinstance(name, str) and name.startswith("custom:"):
            raise ValueError(
                f"The cache was collected with a custom output function ({name}); pass the same callable as "
                "forward_check(..., output_fn=fn)."
            )
        spec = resolve_output_fn(model, name, prob_clamp=float(self.cache.manifest.get("prob_clamp", 1e-6)))
        if spec.kind == "seq2seq":
            raise ValueError(
                "forward_check supports causal language models and sequence classifiers, not seq2seq."
            )
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        encoded = [
            encode_example(
                dict(target_dataset[i]), tokenizer, max_length, classification=spec.kind == "classification"
            )
            for i in range(len(target_dataset))
        ]
        pad = getattr(tokenizer, "pad_token_id", None) or 0
        steps = self.fitted_steps(subsets, solver=solver)
        params = dict(named)
        scale = self.cache.preconditioner  # features were Pᵀ(s ⊙ ∇f), so the step in parameters is s ⊙ (P w)
        if scale is not None and set(scale) != set(params):
            raise ValueError(
                "The cache's preconditioner does not cover this model's trainable parameters; load the same θ* "
                "(load_meta_init(path, is_trainable=True)) the cache was collected from."
            )
        original = {n: p.detach().clone() for n, p in named}
        was_training = model.training
        model.eval()
        losses = []
        try:
            for w in steps:
                delta = projector.lift(w.to(torch.float32))
                if scale is not None:
                    delta = {n: d * scale[n] for n, d in delta.items()}
                with torch.no_grad():
                    for n, p in params.items():
                        p.copy_(original[n] + delta[n].to(p.dtype).to(p.device))
                    outs = []
                    for start in range(0, len(encoded), batch_size):
                        batch = collate_examples(encoded[start : start + batch_size], spec.kind, pad)
                        device = next(iter(params.values())).device
                        batch = {k: v.to(device) for k, v in batch.items()}
                        fwd = {k: v for k, v in batch.items() if k != "labels"}
                        outs.append(spec(model(**fwd), batch).detach().double().cpu())
                f = torch.cat(outs)
                losses.append(float(F.softplus(-f).mean()))
        finally:
            with torch.no_grad():
                for n, p in params.items():
                    p.copy_(original[n])
            model.train(was_training)
        return torch.tensor(losses, dtype=torch.float64)

    def __repr__(self) -> str:
        return (
            f"FirstOrderEstimator(sources={len(self.sources)}, forced={self.forced_source!r}, d={self.dim}, "
            f"reduce_dim={self.reduce_dim}, solver={self.config.solver!r}, l2={self.l2!r}, "
            f"step_scale={self.step_scale:g}, target_rows={self.num_target})"
        )


def _spd_solve(k: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
    """Solve k[i] x[i] = b[i] for a batch of symmetric positive definite matrices (k is overwritten);
    returns the solutions and the indices whose matrix was not positive definite.

    LAPACK ?posv called per matrix (from SciPy when installed) is several times faster than torch's
    batched Cholesky for r around 100 on a CPU (measured in recipes/benchmarks/estimate_speed.py).
    """
    if _POSV is not None:
        kn, bn = k.numpy(), b.numpy()
        out = np.empty_like(bn)
        posv = _POSV[0] if kn.dtype == np.float32 else _POSV[1]
        failed = []
        for i in range(kn.shape[0]):
            # a C-contiguous symmetric matrix is its own Fortran-ordered transpose: no copy
            _, x, info = posv(kn[i].T, bn[i], lower=0, overwrite_a=1, overwrite_b=0)
            if info != 0:
                failed.append(i)
            out[i] = x
        result = torch.from_numpy(out)
    else:
        chol, info = torch.linalg.cholesky_ex(k)
        y = torch.linalg.solve_triangular(chol, b.unsqueeze(-1), upper=False)
        result = torch.linalg.solve_triangular(chol.transpose(1, 2), y, upper=True).squeeze(-1)
        failed = torch.nonzero(info != 0).flatten().tolist()
    return result, failed


def _single_threaded_blas() -> Any:
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
