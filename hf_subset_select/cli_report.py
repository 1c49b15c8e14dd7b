"""The ``report`` subcommand: report.md, per-source (or per-cluster / per-example) tables and a score plot for a
selection, checked against the cache it came from."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .cli import CacheArguments, CLIError, _load_cache, parse_dataclasses

__all__ = ["ReportArguments", "cmd_report"]


@dataclass
class ReportArguments:
    """Inputs and output of the report."""

    selection: str = field(default="selection.json", metadata={"help": "Selection JSON (from `select`)."})
    output_dir: str = field(default="report", metadata={"help": "Where report.md and the plots go."})
    roles: str | None = field(
        default=None,
        metadata={"help": "Optional JSON {source: role} (helpful/irrelevant/harmful) to colour bars."},
    )


def cmd_report(argv: Sequence[str]) -> None:
    """Write report.md and a per-source score plot for a selection (checked against its cache)."""
    import json

    from .report import format_interval, markdown_table, plot_source_scores, write_markdown
    from .select.selection import SourceSelection

    cache_args, rep = parse_dataclasses(
        [CacheArguments, ReportArguments], argv, "hf-subset-select report", cmd_report.__doc__
    )
    cache = _load_cache(cache_args.cache)
    if not os.path.isfile(rep.selection):
        raise CLIError(f"No selection file at {rep.selection!r}; run `hf-subset-select select` first.")
    selection = SourceSelection.load(rep.selection, cache=cache)
    roles = None
    if rep.roles:
        with open(rep.roles, encoding="utf-8") as handle:
            roles = json.load(handle)
    os.makedirs(rep.output_dir, exist_ok=True)
    intervals = selection.info.get("intervals") or {}
    plot = plot_source_scores(
        {s: selection.scores[s] for s in selection.ranking},
        os.path.join(rep.output_dir, "source_scores.png"),
        roles=roles,
        selected=selection.selected,
        intervals=intervals.get("scores"),
    )
    effects = selection.info.get("effects") or {}
    rows = [
        [s, selection.scores[s]]
        + ([format_interval(intervals["scores"].get(s))] if intervals else [])
        + ([effects.get(s, float("nan"))] if effects else [])
        + ([format_interval(intervals["effects"].get(s))] if intervals else [])
        + [
            "kept" if s in selection.selected else "dropped",
            selection.weights.get(s, 0.0),
        ]
        + ([roles.get(s, "?")] if roles else [])
        for s in selection.ranking
    ]
    level = f"{100 * float(intervals['level']):g}% CI" if intervals else ""
    headers = (
        ["source", "score"]
        + ([f"score {level}"] if intervals else [])
        + (["effect"] if effects else [])
        + ([f"effect {level}"] if intervals else [])
        + ["decision", "weight"]
        + (["role"] if roles else [])
    )
    note = (
        f"\n\nIntervals: {intervals.get('method', 'bootstrap')}, {intervals.get('samples')} replicates; a source whose "
        "effect interval lies below 0 improves the target loss beyond what the sampled subsets and target rows "
        f"explain ({', '.join(intervals.get('significant', [])) or 'none'})."
        if intervals
        else ""
    )
    sections = [
        (
            "Selection",
            f"method `{selection.method}`, cache `{cache_args.cache}` ({cache.num_examples} rows, "
            f"d = {cache.dim}); target source: `{selection.target_source}`.\n\n"
            + markdown_table(headers, rows)
            + note,
        ),
    ]
    if plot:
        sections.append(("Per-source scores", "![per-source scores](source_scores.png)"))
    sections.extend(_granularity_sections(selection))
    path = write_markdown(os.path.join(rep.output_dir, "report.md"), "hf-subset-select report", sections)
    print(f"report written to {path}")


def _granularity_sections(selection: Any) -> list[tuple[str, str]]:
    """Report sections of a per-example or per-cluster selection: rows kept per source; the clusters' sizes,
    scores, decisions and the sources they draw from."""
    from .report import markdown_table

    if selection.examples is None:
        return []
    info = selection.info
    kept = info.get("kept_per_source", {})
    table = selection.examples
    total: dict[str, int] = {}
    for src in table.sources:
        total[src] = total.get(src, 0) + 1
    rows = [[s, total.get(s, 0), kept.get(s, 0)] for s in selection.sources]
    out = [
        (
            "Per example",
            f"unit `{info.get('granularity', 'example')}`: kept {len(table.kept_ids)} of "
            f"{len(table.example_ids)} scored training rows (the target's own rows are always kept).\n\n"
            + markdown_table(["source", "rows", "kept rows"], rows),
        )
    ]
    clusters = info.get("clusters")
    if clusters:
        chosen = set(clusters["selected"])
        crow = []
        for name, size in clusters["sizes"].items():
            comp = sorted(clusters["composition"].get(name, {}).items(), key=lambda kv: -kv[1])
            crow.append(
                [
                    name,
                    size,
                    clusters["scores"].get(name, float("nan")),
                    "kept" if name in chosen else "dropped",
                    clusters["weights"].get(name, 0.0),
                    ", ".join(f"{s} {n}" for s, n in comp[:3]) + (" ..." if len(comp) > 3 else ""),
                ]
            )
        out.append(
            (
                "Clusters",
                f"{clusters['k']} clusters (spherical k-means on the projected gradients, seed {clusters['seed']}), "
                f"selected with `{clusters['method']}`.\n\n"
                + markdown_table(["cluster", "size", "score", "decision", "weight", "drawn from"], crow),
            )
        )
    return out
