"""Plain-text tables and PNG plots for selections, estimates and the demo report.

Plots need matplotlib (``pip install "hf-subset-select[plot]"``); without it the functions that draw return
``None`` and log why, and everything else still works.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from accelerate.logging import get_logger

from .io_utils import atomic_write_text

__all__ = [
    "format_table",
    "markdown_table",
    "plot_source_scores",
    "plot_estimate_vs_true",
    "write_markdown",
    "format_interval",
]

logger = get_logger(__name__)

ROLE_COLOURS = {"helpful": "#2b8a3e", "irrelevant": "#868e96", "harmful": "#c92a2a", "target": "#1864ab"}


def _fmt(value: Any, digits: int = 4) -> str:
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        return f"{value:.{digits}f}"
    return str(value)


def format_interval(bounds: Sequence[float] | None, digits: int = 4) -> str:
    """``[lower, upper]`` as text ("-" when there is none)."""
    if not bounds:
        return "-"
    return f"[{_fmt(float(bounds[0]), digits)}, {_fmt(float(bounds[1]), digits)}]"


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A fixed-width text table (for ``__repr__`` and terminal output)."""
    cells = [[str(h) for h in headers]] + [[_fmt(v, digits) for v in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], digits: int = 4) -> str:
    """A GitHub-flavoured markdown table."""
    out = ["| " + " | ".join(str(h) for h in headers) + " |", "|" + "---|" * len(headers)]
    out += ["| " + " | ".join(_fmt(v, digits) for v in row) + " |" for row in rows]
    return "\n".join(out)


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        logger.warning(
            'matplotlib is not installed: no plots. pip install "hf-subset-select[plot]" for them.'
        )
        return None
    return plt


def plot_source_scores(
    scores: Mapping[str, float],
    path: str | os.PathLike,
    *,
    roles: Mapping[str, str] | None = None,
    selected: Sequence[str] | None = None,
    title: str = "Per-source scores (lower estimated target loss = better)",
    ylabel: str = "score",
    intervals: Mapping[str, Sequence[float]] | None = None,
) -> str | None:
    """Bar chart of per-source scores, coloured by ground-truth role when given; kept sources marked; with
    ``intervals`` (``{source: [lower, upper]}``, e.g. ``selection.info["intervals"]["scores"]``) as error bars."""
    plt = _pyplot()
    if plt is None:
        return None
    names = list(scores)
    values = [scores[n] for n in names]
    colours = [ROLE_COLOURS.get((roles or {}).get(n, ""), "#495057") for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names) + 2), 3.6))
    bars = ax.bar(range(len(names)), values, color=colours)
    bounds: list[float] = []
    if intervals:
        lo = [values[i] - intervals[n][0] if n in intervals else 0.0 for i, n in enumerate(names)]
        hi = [intervals[n][1] - values[i] if n in intervals else 0.0 for i, n in enumerate(names)]
        ax.errorbar(range(len(names)), values, yerr=[lo, hi], fmt="none", ecolor="black", capsize=3, lw=1)
        bounds = [b for n in names if n in intervals for b in intervals[n] if not math.isnan(b)]
    for bar, name in zip(bars, names):
        if selected is not None and name in selected:
            bar.set_edgecolor("black")
            bar.set_linewidth(2.0)
    finite = [v for v in values if not math.isnan(v)] + bounds
    if finite:  # scores differ by little against their size: zoom on their range instead of starting at 0
        lo, hi = min(finite), max(finite)
        pad = 0.15 * (hi - lo or abs(hi) or 1.0)
        ax.set_ylim(lo - pad, hi + pad)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    if roles:
        from matplotlib.patches import Patch

        seen = [r for r in ROLE_COLOURS if r in set(roles.values())]
        handles = [Patch(color=ROLE_COLOURS[r], label=r) for r in seen]
        if selected is not None:
            handles.append(Patch(facecolor="white", edgecolor="black", linewidth=2.0, label="kept"))
        ax.legend(
            handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0
        )
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_estimate_vs_true(
    estimated: Sequence[float],
    true: Sequence[float],
    path: str | os.PathLike,
    *,
    labels: Sequence[str] | None = None,
    title: str = "Estimated vs true target loss",
) -> str | None:
    """Scatter of estimated against true losses with the diagonal."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(4.4, 4.2))
    ax.scatter(true, estimated, s=28, color="#1864ab", zorder=3)
    lo = min(min(estimated), min(true))
    hi = max(max(estimated), max(true))
    pad = 0.05 * (hi - lo or 1.0)
    ax.plot([lo - pad, hi + pad], [lo - pad, hi + pad], color="#868e96", linestyle="--", label="y = x")
    for i, label in enumerate(labels or []):
        ax.annotate(label, (true[i], estimated[i]), fontsize=7, xytext=(3, 3), textcoords="offset points")
    ax.set_xlabel("true target loss (real fine-tune)")
    ax.set_ylabel("estimated target loss")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_markdown(path: str | os.PathLike, title: str, sections: Sequence[tuple[str, str]]) -> str:
    """Write ``# title`` followed by ``## heading`` + body for each section (atomically)."""
    parts = [f"# {title}", ""]
    for heading, body in sections:
        parts += [f"## {heading}", "", body.rstrip(), ""]
    atomic_write_text(path, "\n".join(parts))
    return os.fspath(path)
