"""Rank, world size and barriers for a collection that may run under ``torch.distributed`` or accelerate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["DistState", "dist_state", "same_on_every_rank"]


@dataclass
class DistState:
    """This process's rank, the world size and a barrier that waits for every process."""

    rank: int
    world: int
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_state() -> DistState:
    """torch.distributed's rank and barrier when it is initialized, else accelerate's (which sets its state up)."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()  # also what accelerate's logger needs
    if dist.is_available() and dist.is_initialized():
        return DistState(dist.get_rank(), dist.get_world_size(), dist.barrier)
    return DistState(state.process_index, state.num_processes, state.wait_for_everyone)


def same_on_every_rank(value: Any, dist: DistState) -> bool:
    """True when every process passed an equal ``value`` (always True on one process)."""
    import torch.distributed as tdist

    if dist.world <= 1 or not (tdist.is_available() and tdist.is_initialized()):
        return True
    values: list[Any] = [None] * dist.world
    tdist.all_gather_object(values, value)
    return len(set(values)) == 1
