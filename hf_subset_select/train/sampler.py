"""Weighted sampling for the target fine-tune: draw examples with probability proportional to their source's
weight, reproducibly across processes and resumes."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch

__all__ = ["SourceWeightedSampler"]


class SourceWeightedSampler(torch.utils.data.Sampler[int]):
    """Draws indices with probability proportional to ``weights`` (with replacement), reproducibly.

    Every epoch uses the generator seeded with ``seed + epoch``, so all processes of a distributed run draw the
    same sequence (accelerate then gives each process its share of the batches) and a resumed run draws the
    same examples. ``num_samples`` defaults to the number of examples with positive weight.
    """

    def __init__(
        self, weights: torch.Tensor | Sequence[float], num_samples: int | None = None, seed: int = 0
    ):
        weights = torch.as_tensor(weights, dtype=torch.float64)
        if weights.dim() != 1 or weights.numel() == 0:
            raise ValueError("weights must be a non-empty 1-D sequence.")
        if (
            not bool(torch.isfinite(weights).all())
            or bool((weights < 0).any())
            or not bool((weights > 0).any())
        ):
            raise ValueError("weights must be finite, >= 0, and not all 0.")
        self.weights = weights
        self.num_samples = int(num_samples) if num_samples is not None else int((weights > 0).sum())
        if self.num_samples <= 0:
            raise ValueError(f"num_samples must be > 0, got {num_samples}.")
        self.seed = int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        draws = torch.multinomial(self.weights, self.num_samples, replacement=True, generator=generator)
        self.epoch += 1  # the next pass draws anew even if nobody calls set_epoch
        return iter(draws.tolist())
