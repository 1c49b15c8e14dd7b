"""The task abstraction: what a benchmark needs to know about one target task and its candidate sources.

A :class:`Task` builds :class:`TaskData` from a seed (the tagged training sources with the target's own training
split among them, and the target's ``dev`` and ``test`` splits), makes models, fine-tunes them and scores them.
Methods (estimators, baselines) may look at ``train`` and ``dev`` only; ``test`` is scored once per fine-tuned model
at the end and never seen by any method. Benchmarks that only measure estimation fidelity have no ``test``.
"""

from __future__ import annotations

import random
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .training import train_steps


@dataclass
class TaskData:
    """One task's data.

    ``train``: tagged sources (``source``/``example_id`` columns), the target's training split as source ``target``;
    ``dev``: the target split methods may use (the collector's target rows, calibration, estimates); ``test``: the
    held-out target split (None: none); ``roles``: the intended role of each auxiliary source, in source order;
    ``info``: anything else worth recording.
    """

    train: Any
    dev: Any
    test: Any = None
    roles: dict[str, str] = field(default_factory=dict)
    target: str = "target"
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def candidates(self) -> list[str]:
        """The auxiliary sources, in source order."""
        return list(self.roles)


class Task(ABC):
    """A target task with its sources, model factory, fine-tune and scorer (one subclass per task family).

    ``finetune`` defaults to :func:`~harness.training.train_steps` with :meth:`collate`; ``score`` returns at least
    ``loss`` (the target's mean log(1 + exp(-f_j)) over the per-example outputs f_j the collector uses).
    """

    name: str = "task"

    @abstractmethod
    def build(self, seed: int) -> TaskData:
        """The task's data for a data seed."""

    @abstractmethod
    def make_model(self, seed: int) -> Any:
        """A fresh model to meta-train or fine-tune (its trainable parameters initialized from ``seed``)."""

    @abstractmethod
    def collate(self, rows: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        """A training batch (with ``labels``) from encoded rows."""

    @abstractmethod
    def score(self, model: Any, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Figures of ``model`` on encoded target rows: ``loss`` and task-specific ones (``f``: the outputs)."""

    def finetune(
        self,
        model: Any,
        parameters: Any,
        rows: Sequence[dict[str, Any]],
        *,
        steps: int,
        lr: float,
        batch_size: int,
        seed: int,
        optim: str = "adamw",
    ) -> None:
        """Fine-tune ``parameters`` of ``model`` in place on ``rows`` (the seed fixes the data order)."""
        train_steps(
            model,
            parameters,
            rows,
            self.collate,
            steps=steps,
            lr=lr,
            batch_size=batch_size,
            seed=seed,
            optim=optim,
        )


def subset_rows(
    rows: Sequence[dict[str, Any]], subset: Sequence[str], target: str = "target"
) -> list[dict[str, Any]]:
    """The rows of the target's training split and of the sources in ``subset``, in their original order."""
    keep = {target, *subset}
    return [r for r in rows if r["source"] in keep]


def random_subsets(candidates: Sequence[str], count: int, name: str) -> list[tuple[str, ...]]:
    """``count`` distinct random subsets (each source in with probability 1/2), from the random stream ``name``."""
    rng = random.Random(name)
    subsets: list[tuple[str, ...]] = []
    while len(subsets) < count:
        s = tuple(c for c in candidates if rng.random() < 0.5)
        if s not in subsets:
            subsets.append(s)
    return subsets
