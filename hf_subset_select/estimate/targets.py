"""Several targets against one training cache: estimates as a subsets × targets table, one solve for all.

The fitted step ŵ_S of a subset depends on the training rows only (λ too: the λ rules read no target row), so the
target rows of every target are stacked into one target set, each subset is solved once, and the per-row losses are
split by target. :class:`MultiTargetEstimator` does that; :meth:`MultiTargetEstimator.for_target` gives an
estimator view of one target that the selectors take (:func:`~hf_subset_select.select.targets.select_for_targets`).

Each target cache is checked against the training cache first (θ*, projection, geometry, output function: a
:class:`~hf_subset_select.collect.compat.TargetCacheMismatchError` names the target and the field).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..collect.cache import SPLIT_TARGET, GradientCache
from ..collect.compat import TargetCacheMismatchError
from ..config import EstimatorConfig
from .estimator import Estimate, FirstOrderEstimator
from .problem import _check_target_cache

__all__ = ["MultiTargetEstimator", "TargetView"]


def _load(target: GradientCache | str | os.PathLike) -> GradientCache:
    return target if isinstance(target, GradientCache) else GradientCache.load(target)


class MultiTargetEstimator:
    """Estimate every subset for several targets at once.

    Args:
        cache: the training cache (its own target rows are not used unless it is also passed among ``targets``).
        targets: ``{target name: target cache or its directory}``; each cache's target rows (split 1) are that
            target's rows, e.g. caches from ``GradientCollector(target_dataset=..., train_cache=...)``.
        config: the :class:`~hf_subset_select.EstimatorConfig` shared by all targets.

    Example::

        multi = MultiTargetEstimator(GradientCache.load("grad_cache"), {"math": "tc_math", "code": "tc_code"})
        multi.estimate([["web"], ["web", "books"]])     # tensor (2 subsets, 2 targets)
        multi.per_source_loss()                          # {"math": {source: L̂}, "code": {...}}
    """

    def __init__(
        self,
        cache: GradientCache,
        targets: Mapping[str, GradientCache | str | os.PathLike],
        config: EstimatorConfig | None = None,
    ) -> None:
        if not isinstance(targets, Mapping) or not targets:
            raise ValueError(
                "MultiTargetEstimator needs targets={name: target cache (or its directory)}, at least one."
            )
        self.names: list[str] = [str(n) for n in targets]
        self.targets: dict[str, GradientCache] = {}
        for name, target in targets.items():
            loaded = _load(target)
            try:
                _check_target_cache(cache, loaded)
            except TargetCacheMismatchError as exc:
                raise TargetCacheMismatchError(f"Target {name!r}: {exc}", field=exc.field) from None
            if not bool(loaded.target_mask.any()):
                raise ValueError(
                    f"Target {name!r} has no target rows (split=1); collect it with "
                    "GradientCollector(target_dataset=..., train_cache=...)."
                )
            self.targets[str(name)] = loaded
        stacked, self.columns = self._stack(cache)
        self.estimator = FirstOrderEstimator(cache, config, target=stacked)

    def _stack(self, cache: GradientCache) -> tuple[GradientCache, dict[str, torch.Tensor]]:
        """One target cache holding every target's rows (source = target name) and each target's columns."""
        feats, outs, columns = [], [], {}
        start = 0
        for name in self.names:
            t = self.targets[name]
            mask = t.target_mask
            feats.append(t.features[mask])
            outs.append(t.outputs[mask])
            n = int(mask.sum())
            columns[name] = torch.arange(start, start + n)
            start += n
        source_index = torch.cat(
            [torch.full((len(columns[n]),), i, dtype=torch.int64) for i, n in enumerate(self.names)]
        )
        manifest = {k: v for k, v in cache.manifest.items() if k not in ("fingerprint", "files", "counts")}
        stacked = GradientCache(
            torch.cat(feats),
            torch.cat(outs),
            torch.arange(start, dtype=torch.int64),
            source_index,
            torch.full((start,), SPLIT_TARGET, dtype=torch.int8),
            self.names,
            manifest=manifest,
            preconditioner=cache.preconditioner,
        )
        return stacked, columns

    # ------------------------------------------------------------------ views
    @property
    def cache(self) -> GradientCache:
        """The training cache."""
        return self.estimator.cache

    @property
    def sources(self) -> list[str]:
        """The candidate sources (shared by every target)."""
        return self.estimator.sources

    def for_target(self, name: str) -> TargetView:
        """An estimator of target ``name`` alone (what the selectors take), sharing this estimator's solves."""
        if name not in self.columns:
            raise ValueError(f"Unknown target {name!r}; the targets are {self.names}.")
        return TargetView(self, name)

    def base_loss(self) -> dict[str, float]:
        """Every target's loss at θ* ("no change")."""
        f = self.estimator.problem.target_outputs
        return {n: float(F.softplus(-f[idx]).mean()) for n, idx in self.columns.items()}

    # ------------------------------------------------------------------ estimates
    def estimate_rows(self, subsets: Any, *, solver: str | None = None) -> Estimate:
        """The stacked estimate (every target's rows) of each subset; the last one is kept for the views."""
        m = self.estimator.membership(subsets)
        key = (tuple(m.shape), m.numpy().tobytes(), solver, self.estimator.step_scale, self.estimator.l2)
        if getattr(self, "_last_key", None) != key:
            self._last = self.estimator.estimate(subsets, details=True, solver=solver)
            self._last_key = key
        return self._last

    def estimate(self, subsets: Any, *, solver: str | None = None) -> torch.Tensor:
        """Estimated loss of each subset on each target, float64 of shape (num_subsets, num_targets)."""
        rows = self.estimate_rows(subsets, solver=solver).per_example
        return torch.stack([rows[:, self.columns[n]].mean(1) for n in self.names], 1)

    def per_source_loss(self, sources: Sequence[str] | None = None) -> dict[str, dict[str, float]]:
        """``{target: {source: L̂ after fine-tuning on the source alone (plus the forced source)}}``."""
        names = list(self.sources if sources is None else sources)
        table = self.estimate([[s] for s in names])
        return {t: {s: float(table[i, j]) for i, s in enumerate(names)} for j, t in enumerate(self.names)}

    def __repr__(self) -> str:
        return (
            f"MultiTargetEstimator(targets={self.names}, sources={len(self.sources)}, d={self.estimator.dim})"
        )


class TargetView:
    """One target of a :class:`MultiTargetEstimator`, usable wherever a :class:`FirstOrderEstimator` is read by the
    selectors (``estimate``, ``sources``, ``base_loss``, λ, ...); estimates come from the shared stacked solve."""

    def __init__(self, parent: MultiTargetEstimator, name: str) -> None:
        self._parent = parent
        self.target_name = name
        self.target_cache = parent.targets[name]
        self._columns = parent.columns[name]

    def __getattr__(self, attr: str) -> Any:  # λ, step scale, config, cache, sources, forced source, ...
        return getattr(self._parent.estimator, attr)

    @property
    def base_loss(self) -> float:
        return self._parent.base_loss()[self.target_name]

    @property
    def num_target(self) -> int:
        return int(self._columns.numel())

    def estimate(self, subsets: Any, *, details: bool = False, solver: str | None = None) -> Any:
        """As :meth:`FirstOrderEstimator.estimate`, on this target's rows."""
        full = self._parent.estimate_rows(subsets, solver=solver)
        rows = full.per_example[:, self._columns]
        loss = rows.mean(1)
        if not details:
            return loss
        return Estimate(loss, rows, {self.target_name: loss}, full.weights, full.subsets)

    def estimate_intervals(self, subsets: Any, **kwargs: Any) -> Any:
        """As :meth:`FirstOrderEstimator.estimate_intervals`, on this target's rows."""
        from .uncertainty import subset_intervals

        solver = kwargs.pop("solver", None)
        return subset_intervals(self.estimate(subsets, details=True, solver=solver).per_example, **kwargs)

    def per_source_loss(self, sources: Sequence[str] | None = None) -> dict[str, float]:
        return self._parent.per_source_loss(sources)[self.target_name]

    def __repr__(self) -> str:
        return f"TargetView({self.target_name!r} of {self._parent!r})"
