"""Command-line flags shared by every benchmark, and the thread limits they apply."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any


def benchmark_parser(
    doc: str | None,
    *,
    seeds: int | None = None,
    seeds_help: str = "seeds per configuration",
    seed: bool = True,
    seed_help: str = "data seed",
    threads: int | None = None,
    threads_help: str = "torch threads",
    raw_description: bool = False,
) -> argparse.ArgumentParser:
    """A parser with ``--output`` and ``--quick`` and, when asked for, ``--seeds``, ``--seed`` and ``--threads``.

    ``doc`` is the script's docstring: its first line is the description, or all of it with ``raw_description``.
    """
    text = doc or ""
    if raw_description:
        parser = argparse.ArgumentParser(
            description=text, formatter_class=argparse.RawDescriptionHelpFormatter
        )
    else:
        parser = argparse.ArgumentParser(description=text.splitlines()[0] if text else None)
    parser.add_argument("--output", required=True, help="JSON file for the results")
    parser.add_argument("--quick", action="store_true", help="smaller everything (smoke run)")
    if seeds is not None:
        parser.add_argument("--seeds", type=int, default=seeds, help=seeds_help)
    if seed:
        parser.add_argument("--seed", type=int, default=0, help=seed_help)
    if threads is not None:
        parser.add_argument("--threads", type=int, default=threads, help=threads_help)
    return parser


def parse_list(text: str, cast: Callable[[str], Any] = str) -> list[Any]:
    """``"a, b,,c"`` -> ``[cast("a"), cast("b"), cast("c")]`` (empty items dropped)."""
    return [cast(x.strip()) for x in text.split(",") if x.strip()]


def limit_threads(threads: int, *, blas: bool = False) -> None:
    """Set torch's intra-op threads; with ``blas`` also cap the BLAS pools (SciPy's OpenBLAS starts one thread per
    core, which on a shared machine made the estimator's small SPD solves hundreds of times slower)."""
    import torch

    torch.set_num_threads(threads)
    if blas:
        from threadpoolctl import threadpool_limits

        threadpool_limits(limits=threads, user_api="blas")
