"""Synthetic gradient caches with a known answer, for tests and benchmarks.

Every source's gradients share a mean direction: along the target's direction ``u`` ("aligned",
fine-tuning on it lowers the target loss), against it ("opposed", raises it), or orthogonal to it
("orthogonal", no first-order effect). Around that mean, gradients scatter with a decaying spectrum
(a few strong directions and an isotropic floor), which is roughly what projected LLM gradients look
like. Outputs ``f`` are log-odds around 1 (the meta-initialization already fits the data somewhat).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ..collect.cache import SPLIT_TARGET, SPLIT_TRAIN, GradientCache

__all__ = ["make_synthetic_cache", "plant_harmful_examples", "ROLES"]

ROLES = ("aligned", "opposed", "orthogonal")
_BLOCK_ENTRIES = 8 << 20  # rows of a large source are drawn in blocks of about 64 MiB of float64


def make_synthetic_cache(
    num_aligned: int = 2,
    num_opposed: int = 2,
    num_orthogonal: int = 2,
    *,
    dim: int = 32,
    examples_per_source: int | Sequence[int] = 64,
    target_examples: int = 64,
    target_train_examples: int = 32,
    strength: float = 1.0,
    noise: float = 1.0,
    num_strong_directions: int = 16,
    spectrum_decay: float = 1.0,
    shared: float = 0.0,
    representation_dim: int | None = 16,
    output_mean: float = 1.0,
    output_std: float = 0.5,
    seed: int = 0,
) -> GradientCache:
    """Build a :class:`~hf_subset_select.GradientCache` with aligned, opposed and orthogonal sources.

    Args:
        num_aligned / num_opposed / num_orthogonal: how many sources of each role. They are named
            ``aligned_0``, ``opposed_0``, ``orthogonal_0``, ... in that order.
        dim: gradient dimension d.
        examples_per_source: training rows per source (one int, or one per source in name order).
        target_examples: rows of the target evaluation split (source ``target_eval``).
        target_train_examples: rows of the target's own training source ``target_train`` (0: none, and
            the cache has no ``target_source``).
        strength: length of a source's mean gradient along (or against, or orthogonal to) the target.
        noise: RMS length of the per-example scatter around the source mean.
        num_strong_directions: the scatter has this many strong directions, with variances decaying as
            ``k ** -spectrum_decay``, on top of an isotropic floor holding 20% of the scatter's energy.
        shared: a component along one common direction added to every row (train and target), like the
            "be more confident about everything" direction of real gradients.
        representation_dim: width of the synthetic representations (None: the cache has none).
        output_mean / output_std: distribution of the outputs f (log-odds).
        seed: everything is drawn from this seed.

    Returns:
        The cache; ``cache.manifest["roles"]`` maps each source to its role.
    """
    names, roles, sizes = _plan_sources(
        (num_aligned, num_opposed, num_orthogonal),
        examples_per_source,
        target_train_examples,
        target_examples,
        dim,
    )
    gen = torch.Generator().manual_seed(seed)
    # orthonormal directions: u (target), c (shared), then the scatter's strong directions, then
    # per-source orthogonal directions drawn in the complement of u
    k = max(1, min(num_strong_directions, dim - 2))
    basis, _ = torch.linalg.qr(torch.randn(dim, k + 2, generator=gen, dtype=torch.float64))
    u, common, strong = basis[:, 0], basis[:, 1], basis[:, 2:].T  # strong: (k, dim)
    spectrum = torch.arange(1, k + 1, dtype=torch.float64) ** (-spectrum_decay)
    spectrum = spectrum / spectrum.sum()

    def scatter(n: int) -> torch.Tensor:
        z_strong = torch.randn(n, k, generator=gen, dtype=torch.float64) * torch.sqrt(0.8 * spectrum)
        z_iso = torch.randn(n, dim, generator=gen, dtype=torch.float64) * (0.2 / dim) ** 0.5
        return noise * (z_strong @ strong + z_iso)

    outputs, source_index, split, reps = [], [], [], []
    all_sizes = sizes + [target_examples]
    # float32 rows written in place: a million rows at d = 2048 never exist in float64 at once
    features = torch.empty(sum(all_sizes), dim, dtype=torch.float32)
    block = max(1, _BLOCK_ENTRIES // dim)
    start = 0
    rep_dim = representation_dim or 0
    if rep_dim:
        rep_target = torch.randn(rep_dim, generator=gen, dtype=torch.float64)
        rep_target = rep_target / rep_target.norm()
    all_names = names + ["target_eval"]
    for idx, name in enumerate(all_names):
        is_target = name == "target_eval"
        n = target_examples if is_target else sizes[idx]
        role = "aligned" if is_target else roles[name]
        mean = strength * _direction(role, u, gen) + shared * common
        # one block, the same random stream as a single draw, unless the source is large
        for s in range(0, n, block):
            b = min(block, n - s)
            features[start + s : start + s + b] = mean + scatter(b)
        start += n
        outputs.append(output_mean + output_std * torch.randn(n, generator=gen, dtype=torch.float64))
        source_index.append(torch.full((n,), idx, dtype=torch.int64))
        split.append(torch.full((n,), SPLIT_TARGET if is_target else SPLIT_TRAIN, dtype=torch.int8))
        if rep_dim:
            rep_mean = _direction(role, rep_target, gen)
            rep = rep_mean + 0.3 * torch.randn(n, rep_dim, generator=gen, dtype=torch.float64)
            reps.append(rep.float())
    n_total = features.shape[0]
    return GradientCache(
        features,
        torch.cat(outputs),
        torch.arange(n_total, dtype=torch.int64),
        torch.cat(source_index),
        torch.cat(split),
        all_names,
        target_source="target_train" if target_train_examples > 0 else None,
        manifest={
            "synthetic": True,
            "roles": roles,
            "seed": seed,
            "projection": {"kind": "synthetic", "dim": dim, "seed": seed},
        },
        representations=torch.cat(reps) if rep_dim else None,
    )


def _plan_sources(
    counts: tuple[int, int, int],
    examples_per_source: int | Sequence[int],
    target_train_examples: int,
    target_examples: int,
    dim: int,
) -> tuple[list[str], dict[str, str], list[int]]:
    """Source names (aligned, opposed, orthogonal, then ``target_train``), their roles and sizes; checks the input."""
    for name, value in zip(("num_aligned", "num_opposed", "num_orthogonal"), counts):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}.")
    if dim < 3:
        raise ValueError(f"dim must be >= 3 (target, shared and orthogonal directions), got {dim}.")
    names = [f"{role}_{i}" for role, count in zip(ROLES, counts) for i in range(count)]
    roles = {n: n.rsplit("_", 1)[0] for n in names}
    if isinstance(examples_per_source, int):
        sizes = [examples_per_source] * len(names)
    else:
        sizes = [int(s) for s in examples_per_source]
        if len(sizes) != len(names):
            raise ValueError(f"examples_per_source has {len(sizes)} entries for {len(names)} sources.")
    if target_train_examples > 0:
        names.append("target_train")
        roles["target_train"] = "aligned"
        sizes.append(target_train_examples)
    if not names:
        raise ValueError("The synthetic cache needs at least one training source.")
    if target_examples <= 0:
        raise ValueError("target_examples must be > 0.")
    return names, roles, sizes


def _direction(role: str, anchor: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """A unit vector along ``anchor`` (aligned), against it (opposed) or a random one orthogonal to it."""
    if role == "aligned":
        return anchor
    if role == "opposed":
        return -anchor
    v = torch.randn(anchor.shape[0], generator=gen, dtype=torch.float64)
    v = v - (v @ anchor) * anchor
    return v / v.norm()


def plant_harmful_examples(
    cache: GradientCache, sources: Sequence[str], fraction: float = 0.1, *, seed: int = 0
) -> tuple[GradientCache, torch.Tensor]:
    """Turn a ``fraction`` of the training rows of ``sources`` harmful: reflect their gradient along the target's
    mean gradient direction û (g -> g - 2(gᵀû)û), so their component along the target flips sign and the rest
    of the row (its scatter, its output) is unchanged.

    Returns:
        (the new cache, the planted rows' example ids).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"fraction must lie in (0, 1), got {fraction}.")
    gen = torch.Generator().manual_seed(seed)
    u = cache.features[cache.target_mask].to(torch.float64).mean(0)
    u = u / u.norm().clamp_min(1e-30)
    features = cache.features.to(torch.float64).clone()
    planted = []
    for name in sources:
        rows = torch.nonzero(cache.train_mask & (cache.source_index == cache.source_id(name))).flatten()
        pick = rows[torch.randperm(rows.numel(), generator=gen)[: max(1, round(fraction * rows.numel()))]]
        features[pick] -= 2.0 * (features[pick] @ u)[:, None] * u
        planted.append(pick)
    picked = torch.sort(torch.cat(planted)).values
    manifest = {
        **cache.manifest,
        "planted_harmful": {"sources": list(sources), "fraction": fraction, "seed": seed},
    }
    out = cache.replace(features=features, manifest=manifest, preconditioner=None)
    return out, cache.example_ids[picked].clone()
