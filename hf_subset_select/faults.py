"""Test-only fault injection: kill the process with SIGKILL at a labelled point of a write.

Crash-safety tests and ``recipes/benchmarks/reliability.py`` use this to stop a collection or a meta-init save at
an exact point instead of racing a timer. Nothing happens unless a kill point is armed: set the environment
variable ``HF_SUBSET_SELECT_KILL_AT`` to a label before the package is imported, or call :func:`arm` (in a
forked child). Unarmed, :func:`kill_point` is one comparison with ``None``.

Labels (``<i>`` a global shard index, ``<name>`` a file's base name, ``<k>`` a count)::

    shard_computed:<i>        collector: shard i's rows computed, nothing of it written yet
    shard_data_written:<i>    store: shard i's safetensors file in place, its JSON (the completion mark) not yet
    shard_written:<i>         collector: shard i complete (data and JSON)
    merge_loaded:<i>          store.finish: the merge has read shard i
    cache_data_written        GradientCache.save: cache.safetensors in place, manifest.json not yet
    replace:<name>            io_utils: a temporary file written and fsynced, not yet renamed to <name>
                              (e.g. replace:manifest.json, replace:cache.safetensors, replace:meta_init.json)
    manifest_written          store.finish: manifest.json in place, the shards not yet removed
    meta_init_saved           meta-init save: every file written into the temporary directory
    meta_init_moved:<k>       meta-init save: k files moved into the final directory, the manifest not yet
"""

from __future__ import annotations

import os
import signal

__all__ = ["KILL_ENV", "arm", "kill_point"]

KILL_ENV = "HF_SUBSET_SELECT_KILL_AT"

_KILL_AT: str | None = os.environ.get(KILL_ENV) or None


def arm(label: str | None) -> None:
    """Kill this process at ``label`` from now on (None disarms). For tests and benchmarks only."""
    global _KILL_AT
    _KILL_AT = label or None


def kill_point(name: str, detail: object = None) -> None:
    """SIGKILL this process if the armed label is ``name`` (or ``name:detail`` when ``detail`` is given)."""
    if _KILL_AT is None:
        return
    label = name if detail is None else f"{name}:{detail}"
    if label == _KILL_AT:
        os.kill(os.getpid(), signal.SIGKILL)
