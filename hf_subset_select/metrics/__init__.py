"""``evaluate`` metric modules shipped with the package, loaded by local path (works offline).

Each metric lives in ``metrics/<name>/<name>.py``; :func:`metric_path` returns the directory to pass to
``evaluate.load``, and :func:`load_metric` does both.
"""

from __future__ import annotations

import os
from typing import Any

__all__ = ["available_metrics", "metric_path", "load_metric"]

_HERE = os.path.dirname(os.path.abspath(__file__))


def available_metrics() -> list[str]:
    """Names of the metric modules shipped with the package."""
    return sorted(
        name for name in os.listdir(_HERE) if os.path.isfile(os.path.join(_HERE, name, f"{name}.py"))
    )


def metric_path(name: str) -> str:
    """Local path of the shipped metric ``name``, for ``evaluate.load(metric_path(name))``."""
    path = os.path.join(_HERE, name)
    if not os.path.isfile(os.path.join(path, f"{name}.py")):
        raise ValueError(f"No shipped metric {name!r}; available: {available_metrics()}.")
    return path


def load_metric(name: str = "target_accuracy", **kwargs: Any) -> Any:
    """``evaluate.load`` of a shipped metric by local path (no hub access needed)."""
    import evaluate

    return evaluate.load(metric_path(name), **kwargs)
