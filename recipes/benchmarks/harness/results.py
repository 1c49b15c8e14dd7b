"""Writing a benchmark's JSON results with the environment they were measured in."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from typing import Any

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages, rounded (empty where the platform has none)."""
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:  # pragma: no cover
        return []


def git_commit(root: str = REPO_ROOT) -> dict[str, Any]:
    """The checked-out commit of ``root`` and whether the working tree had changes (None outside git)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=root, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return {"commit": None, "dirty": None}
    return {"commit": head, "dirty": bool(dirty)}


STARTED_AT = (
    git_commit()
)  # read when the benchmark starts, so edits made while it runs are not credited to it


def library_versions() -> dict[str, str | None]:
    """Versions of the libraries the figures depend on (None for one that is not installed)."""
    from importlib import metadata

    out: dict[str, str | None] = {}
    for name in ("torch", "transformers", "peft", "trl", "datasets", "scipy", "numpy"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def environment() -> dict[str, Any]:
    """Machine, Python and library versions, date (UTC), the git commit checked out when the run started, torch
    threads and load average."""
    import torch

    return {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "platform": platform.platform(),
        "machine": platform.machine(),
        "processor": platform.processor(),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "versions": library_versions(),
        "git": STARTED_AT,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def write_results(path: str, result: dict[str, Any], *, sort_keys: bool = True) -> dict[str, Any]:
    """Write ``result`` plus an ``environment`` entry as JSON to ``path`` (atomically; folders created).

    Returns the written dictionary.
    """
    from hf_subset_select.io_utils import atomic_write_text

    payload = {**result, "environment": environment()}
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write_text(path, json.dumps(payload, indent=2, sort_keys=sort_keys) + "\n")
    return payload


def brief(result: dict[str, Any], skip: tuple[str, ...] = ()) -> dict[str, Any]:
    """The scalar entries of ``result`` (nested dicts and lists dropped) minus ``skip``: what a run prints."""
    return {k: v for k, v in result.items() if k not in skip and not isinstance(v, (dict, list))}
