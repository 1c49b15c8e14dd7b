"""Pseudo-sources: cluster the training examples of an untagged or coarsely tagged pool by their projected
gradients, so that the estimator and the selectors run on the clusters (docs/method.md, section 8c).

* :func:`spherical_kmeans`: seeded spherical k-means (cosine) in torch, k-means++ start.
* :func:`cluster_sources`: a new :class:`~hf_subset_select.GradientCache` whose clustered training rows carry
  the cluster names (``cluster_00`` = the largest) and the mapping ``example_id -> cluster``; tag the dataset
  with :func:`~hf_subset_select.data.sources.tag_clusters` so a selection on the clusters applies to it.
* :func:`select_clusters`: cluster, estimate and select on the clusters, returned as a per-example
  :class:`~hf_subset_select.SourceSelection` of the original cache (each row gets its cluster's decision and
  weight), so it applies to the untouched dataset like a per-example selection; ``info["clusters"]`` holds the
  cluster sizes, scores, decisions and which sources each cluster draws from.
* :func:`adjusted_rand_index`: agreement of two labelings (1 = identical up to names, about 0 = chance).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any

import torch

from ..collect.cache import GradientCache

__all__ = ["spherical_kmeans", "cluster_sources", "select_clusters", "adjusted_rand_index"]


def spherical_kmeans(
    x: torch.Tensor, k: int, *, seed: int = 0, iters: int = 100
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cluster the rows of ``x`` (N, d) by direction: returns (labels (N,) int64, unit centroids (k, d)).

    k-means++ start on the cosine distance 1 − cos, then Lloyd steps (assign to the most similar centroid,
    centroid = normalized mean) until no label changes or ``iters``; an emptied cluster restarts at the row
    farthest from its centroid. Deterministic for a ``seed``.
    """
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"x must be a non-empty (N, d) matrix, got shape {tuple(x.shape)}.")
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must lie in [1, {n}] (the number of rows to cluster), got {k}.")
    unit = x.to(torch.float64)
    unit = unit / unit.norm(dim=1, keepdim=True).clamp_min(1e-30)
    gen = torch.Generator().manual_seed(seed)
    centers = [int(torch.randint(n, (1,), generator=gen))]
    dist = 1.0 - unit @ unit[centers[0]]
    for _ in range(1, k):
        p = dist.clamp_min(0.0)
        pick = int(torch.multinomial(p, 1, generator=gen)) if float(p.sum()) > 0 else int(torch.argmax(dist))
        centers.append(pick)
        dist = torch.minimum(dist, 1.0 - unit @ unit[pick])
    cent = unit[centers].clone()
    labels = torch.full((n,), -1, dtype=torch.int64)
    for _ in range(iters):
        sim = unit @ cent.T
        new = sim.argmax(1)
        if bool((new == labels).all()):
            break
        labels = new
        sums = torch.zeros_like(cent).index_add_(0, labels, unit)
        counts = torch.bincount(labels, minlength=k)
        for j in (
            torch.nonzero(counts == 0).flatten().tolist()
        ):  # an emptied cluster: restart at the worst fit
            fit = sim.gather(1, labels[:, None]).squeeze(1)
            fit[counts[labels] <= 1] = float("inf")  # never empty another cluster
            worst = int(torch.argmin(fit))
            counts[labels[worst]] -= 1
            sums[labels[worst]] -= unit[worst]
            sums[j], labels[worst], counts[j] = unit[worst], j, 1
        cent = sums / sums.norm(dim=1, keepdim=True).clamp_min(1e-30)
    return labels, cent.to(x.dtype if x.is_floating_point() else torch.float64)


def cluster_sources(
    cache: GradientCache,
    k: int,
    *,
    sources: Sequence[str] | None = None,
    seed: int = 0,
    prefix: str = "cluster_",
) -> tuple[GradientCache, dict[int, str]]:
    """Replace the training sources ``sources`` of ``cache`` by ``k`` pseudo-sources clustered on their gradients.

    Args:
        cache: a :class:`~hf_subset_select.GradientCache`.
        k: number of clusters.
        sources: the training sources pooled and clustered (default: every training source except the target's
            own, which stays as it is and is still always kept).
        seed: seed of :func:`spherical_kmeans`.
        prefix: cluster names are ``prefix`` + a two-digit index, largest cluster first.

    Returns:
        (the cluster cache: target rows and the other sources untouched, ``manifest["clusters"]`` records k, seed,
        the clustered sources and the sizes; the mapping ``{example_id: cluster name}``).
    """
    pool = [s for s in cache.train_sources if s != cache.target_source] if sources is None else list(sources)
    if not pool:
        raise ValueError("No training sources to cluster; pass sources=[...] naming some of the cache's.")
    ids = torch.tensor(
        [cache.source_id(s) for s in pool], dtype=torch.int64
    )  # unknown names raise, naming them
    rows = torch.nonzero(cache.train_mask & torch.isin(cache.source_index, ids)).flatten()
    labels, _ = spherical_kmeans(cache.features[rows], k, seed=seed)
    sizes = torch.bincount(labels, minlength=k)
    order = torch.argsort(-sizes, stable=True)  # cluster_00 = the largest
    rank = torch.empty_like(order)
    rank[order] = torch.arange(k)
    labels = rank[labels]
    names = [f"{prefix}{j:02d}" for j in range(k)]
    still_used = set(torch.unique(cache.source_index[cache.target_mask]).tolist())
    kept = [s for i, s in enumerate(cache.sources) if s not in pool or i in still_used]
    clash = sorted(set(names) & set(kept))
    if clash:
        raise ValueError(
            f"Cluster names {clash} are already source names of the cache; pass another prefix=."
        )
    new_sources = kept + names
    lut = torch.tensor([new_sources.index(s) if s in kept else -1 for s in cache.sources], dtype=torch.int64)
    source_index = lut[cache.source_index]
    source_index[rows] = len(kept) + labels
    mapping = {int(i): names[int(j)] for i, j in zip(cache.example_ids[rows].tolist(), labels.tolist())}
    digest = hashlib.sha256(
        f"{cache.fingerprint()}:{k}:{seed}:{sorted(mapping.items())}".encode()
    ).hexdigest()
    manifest = {
        **{key: v for key, v in cache.manifest.items() if key not in ("counts", "sources", "num_examples")},
        "fingerprint": digest[:16],
        "clusters": {
            "k": k,
            "seed": seed,
            "clustered_sources": pool,
            "sizes": {names[j]: int(sizes[order[j]]) for j in range(k)},
            "parent_fingerprint": cache.fingerprint(),
        },
    }
    return cache.replace(source_index=source_index, sources=new_sources, manifest=manifest), mapping


def select_clusters(
    cache: GradientCache,
    k: int,
    *,
    estimator_config: Any = None,
    select_config: Any = None,
    seed: int = 0,
    sources: Sequence[str] | None = None,
) -> Any:
    """Cluster the pool into ``k`` pseudo-sources (:func:`cluster_sources`), run the estimator and
    :func:`~hf_subset_select.select_sources` on them, and return the decision per example of ``cache``.

    Args:
        cache: the gradient cache of the (untagged or coarsely tagged) pool.
        k: number of clusters.
        estimator_config: :class:`~hf_subset_select.EstimatorConfig` of the estimator on the cluster cache (default:
            ``EstimatorConfig()``; use ``EstimatorConfig.from_training_args`` for the budget λ of the fine-tune).
        select_config: :class:`~hf_subset_select.SelectConfig` of the cluster-level selection (default: defaults).
        seed: seed of the clustering.
        sources: the training sources pooled (default: all but the target's own).

    Returns:
        A :class:`~hf_subset_select.SourceSelection` on ``cache`` (its fingerprint, its source names) with an example
        table: a clustered row's score is its cluster's, its weight its cluster's weight (0 for a dropped cluster),
        rescaled to average 1 over the kept rows. A source's score is its rows' mean and it counts as selected when
        it keeps some rows. ``info["clusters"]``: k, seed, ``sizes``, ``scores``, ``selected``, ``weights`` and
        ``composition`` (rows per original source) of every cluster, and the cluster-level method.
    """
    from ..config import EstimatorConfig
    from ..estimate.estimator import FirstOrderEstimator
    from .baselines import CacheCandidates
    from .registry import select_sources
    from .selection import ExampleTable, SourceSelection, cache_manifest

    clustered, mapping = cluster_sources(cache, k, sources=sources, seed=seed)
    est = FirstOrderEstimator(
        clustered, estimator_config if estimator_config is not None else EstimatorConfig()
    )
    picked = select_sources(est, config=select_config)
    ids = cache.example_ids.tolist()
    row_source = {int(i): cache.sources[int(s)] for i, s in zip(ids, cache.source_index.tolist())}
    order = [int(i) for i in ids if int(i) in mapping]
    cluster_of = [mapping[i] for i in order]
    raw = torch.tensor([float(picked.weights.get(c, 0.0)) for c in cluster_of], dtype=torch.float64)
    kept = raw > 0
    weights = torch.zeros_like(raw)
    if bool(kept.any()):
        weights[kept] = raw[kept] / raw[kept].mean()
    scores = [float(picked.scores[c]) for c in cluster_of]
    composition: dict[str, dict[str, int]] = {c: {} for c in clustered.manifest["clusters"]["sizes"]}
    for i, c in zip(order, cluster_of):
        composition[c][row_source[i]] = composition[c].get(row_source[i], 0) + 1
    candidates = CacheCandidates.of(cache)
    names = list(candidates.sources)
    per_source: dict[str, list[tuple[float, bool]]] = {n: [] for n in names}
    for i, score, keep in zip(order, scores, kept.tolist()):
        if row_source[i] in per_source:
            per_source[row_source[i]].append((score, keep))
    selected = [n for n in names if any(keep for _, keep in per_source[n])]
    info = {
        "granularity": "cluster",
        "l2": est.resolved_l2(),
        "l2_rule": est.l2_rule,
        "num_examples": len(order),
        "kept_examples": int(kept.sum()),
        "kept_per_source": {n: sum(keep for _, keep in per_source[n]) for n in names},
        "clusters": {
            "k": k,
            "seed": seed,
            "method": picked.method,
            "sizes": clustered.manifest["clusters"]["sizes"],
            "scores": dict(picked.scores),
            "selected": list(picked.selected),
            "weights": dict(picked.weights),
            "composition": composition,
            "cluster_cache_fingerprint": clustered.fingerprint(),
        },
    }
    manifest = cache_manifest(cache)
    manifest["select_config"] = {
        **picked.manifest.get("select_config", {}),
        "unit": "cluster",
        "k": k,
        "cluster_seed": seed,
    }
    if "estimator_config" in picked.manifest:
        manifest["estimator_config"] = picked.manifest["estimator_config"]
    return SourceSelection(
        method=f"clusters_{picked.method}",
        sources=names,
        scores={
            n: (sum(v for v, _ in rows) / len(rows) if rows else float("nan"))
            for n, rows in per_source.items()
        },
        selected=selected,
        weights={n: (1.0 if n in selected else 0.0) for n in names},
        target_source=candidates.target_source,
        lower_is_better=picked.lower_is_better,
        info=info,
        manifest=manifest,
        examples=ExampleTable(
            example_ids=order, sources=[row_source[i] for i in order], scores=scores, weights=weights.tolist()
        ),
    )


def adjusted_rand_index(a: Sequence[Any] | torch.Tensor, b: Sequence[Any] | torch.Tensor) -> float:
    """Adjusted Rand index of two labelings of the same items (1: the same partition; about 0: chance)."""
    la = list(a.tolist() if isinstance(a, torch.Tensor) else a)
    lb = list(b.tolist() if isinstance(b, torch.Tensor) else b)
    if len(la) != len(lb) or not la:
        raise ValueError(f"Two non-empty labelings of equal length are needed, got {len(la)} and {len(lb)}.")

    def codes(labels: list[Any]) -> torch.Tensor:
        index = {v: i for i, v in enumerate(dict.fromkeys(labels))}
        return torch.tensor([index[v] for v in labels], dtype=torch.int64)

    ia, ib = codes(la), codes(lb)
    table = torch.zeros(int(ia.max()) + 1, int(ib.max()) + 1, dtype=torch.float64)
    table.index_put_((ia, ib), torch.ones(len(la), dtype=torch.float64), accumulate=True)

    def pairs(t: torch.Tensor) -> float:
        return float((t * (t - 1) / 2).sum())

    index, rows, cols, total = (
        pairs(table),
        pairs(table.sum(1)),
        pairs(table.sum(0)),
        len(la) * (len(la) - 1) / 2,
    )
    expected = rows * cols / total if total else 0.0
    top = (rows + cols) / 2
    return 1.0 if top == expected else (index - expected) / (top - expected)
