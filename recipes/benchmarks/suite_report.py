"""Markdown tables from a suite result (``suite.py --output``): one row per task with every method's test mean, ours
minus each baseline with its paired 95% interval, fidelity, and the summary; what ``docs/benchmarks.md`` shows.

    python recipes/benchmarks/suite_report.py docs/results/suite.json
"""

from __future__ import annotations

import argparse
import json
from typing import Any

METHODS = (
    "ours",
    "ours_weighted",
    "ours@base",
    "variant/forward",
    "variant/linear",
    "variant/confident",
    "variant/forward_confident",
    "target_only",
    "all_sources",
    "all_sources@base",
    "random",
    "gradient_similarity",
    "gradient_similarity_own",
    "representation_similarity",
    "representation_similarity_own",
    "oracle",
)
BASELINES = ("target_only", "all_sources", "random", "best_similarity", "best_similarity_own_rule", "oracle")


def _mean(entry: dict[str, Any], name: str) -> str:
    m = entry["methods"].get(name)
    if m is None:
        return "-"
    std = m.get("test_metric_std")
    return f"{m['test_metric_mean']:.3f}" + (f" ± {std:.3f}" if std is not None and name != "random" else "")


def _diff(d: dict[str, Any] | None) -> str:
    if d is None:
        return "-"
    mark = "**" if d["ci_low"] > 0 else ""
    return f"{mark}{d['diff_mean']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]{mark}"


def _which(d: dict[str, Any] | None) -> str:
    """Which similarity a ``best_similarity*`` comparison ended up against (empty for the other baselines)."""
    method = (d or {}).get("method", "")
    return f" ({method.split('_')[0]})" if method else ""


def _sources(entry: dict[str, Any], name: str) -> str:
    m = entry["methods"].get(name)
    if m is None or name == "random":
        return ""
    return ", ".join(m["sources"]) or "(none: target only)"


def methods_table(tasks: dict[str, Any]) -> str:
    """Rows: methods; columns: tasks (test metric mean ± std over the paired seeds)."""
    names = list(tasks)
    lines = ["| method | " + " | ".join(names) + " |", "|---|" + "---|" * len(names)]
    for method in METHODS:
        if any(method in e["methods"] for e in tasks.values()):
            lines.append(f"| {method} | " + " | ".join(_mean(tasks[n], method) for n in names) + " |")
    return "\n".join(lines)


def comparison_table(tasks: dict[str, Any]) -> str:
    """Ours minus each baseline, paired bootstrap 95% intervals (bold: above zero), and fidelity per task."""
    head = (
        "| task | "
        + " | ".join(f"ours − {b}" for b in BASELINES)
        + " | budget Spearman | error / no change |"
    )
    lines = [head, "|---|" + "---|" * (len(BASELINES) + 2)]
    for name, e in tasks.items():
        diffs = [_diff(e["ours_vs"].get(b)) + _which(e["ours_vs"].get(b)) for b in BASELINES]
        f = e["fidelity"]
        lines.append(
            f"| {name} | "
            + " | ".join(diffs)
            + f" | {f['budget_spearman']:.2f} | {f['budget_mean_relative_error']:.1%} / "
            f"{f['no_change_mean_relative_error']:.1%} |"
        )
    return "\n".join(lines)


def selections_table(tasks: dict[str, Any]) -> str:
    """What each method kept, with the single-source roles measured on test."""
    lines = ["| task | ours | gradient sim. | measured helpful | measured harmful |", "|---|---|---|---|---|"]
    for name, e in tasks.items():
        roles = e.get("ablations", {})
        helpful = ", ".join(s for s, r in roles.items() if r["measured_role"] == "helpful") or "-"
        harmful = ", ".join(s for s, r in roles.items() if r["measured_role"] == "harmful") or "-"
        lines.append(
            f"| {name} | {_sources(e, 'ours')} | {_sources(e, 'gradient_similarity')} | {helpful} | {harmful} |"
        )
    return "\n".join(lines)


def summary_lines(summary: dict[str, Any]) -> str:
    """The cross-task summary as a short list."""
    out = [f"- tasks: {summary['num_tasks']} ({summary['num_causal_lm_tasks']} causal LM)"]
    for b in BASELINES:
        r = summary.get(f"beats_{b}")
        if r is None:  # the oracle (no beats_ key), or results older than the baseline
            continue
        out.append(
            f"- ours vs {b}: {r['wins']} wins / {r['ties']} ties / {r['losses']} losses (interval), "
            f"higher mean on {r['higher_mean']}"
        )
    ranks = sorted(summary["mean_rank"].items(), key=lambda kv: kv[1])
    out.append("- mean rank: " + ", ".join(f"{k} {v:.1f}" for k, v in ranks))
    keys = (
        "oracle_tasks",
        "oracle_tasks_without_test_gain",
        "oracle_gain_fraction_min",
        "end_to_end_speedup_min",
        "budget_spearman_min",
        "frozen_commit",
    )
    for key in keys:
        out.append(f"- {key}: {summary.get(key)}")
    return "\n".join(out)


def report(result: dict[str, Any]) -> str:
    """All the tables of one suite result."""
    tasks = result["tasks"]
    return "\n\n".join(
        [
            methods_table(tasks),
            comparison_table(tasks),
            selections_table(tasks),
            summary_lines(result["summary"]),
        ]
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("result", help="a suite.py results JSON")
    args = parser.parse_args(argv)
    with open(args.result) as f:
        print(report(json.load(f)))


if __name__ == "__main__":
    main()
