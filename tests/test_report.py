"""Tables and plots."""

from __future__ import annotations

from hf_subset_select.report import (
    format_table,
    markdown_table,
    plot_estimate_vs_true,
    plot_source_scores,
    write_markdown,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_tables_align_and_format_numbers():
    text = format_table(["source", "score"], [["alpha", 0.123456], ["b", float("nan")]])
    lines = text.splitlines()
    assert lines[0].startswith("source") and set(lines[1]) <= {"-", " "}
    assert "0.1235" in text and "nan" in text
    assert len({line.index("score") if "score" in line else None for line in lines[:1]}) == 1
    md = markdown_table(["a", "b"], [[1, 2.5]])
    assert md.splitlines() == ["| a | b |", "|---|---|", "| 1 | 2.5000 |"]


def test_plots_are_png_files(tmp_path):
    p = plot_source_scores(
        {"h": -0.2, "i": 0.0, "x": 0.3},
        tmp_path / "scores.png",
        roles={"h": "helpful", "i": "irrelevant", "x": "harmful"},
        selected=["h"],
    )
    q = plot_estimate_vs_true([1.0, 1.2], [1.05, 1.3], tmp_path / "scatter.png", labels=["a", "b"])
    for path in (p, q):
        with open(path, "rb") as handle:
            assert handle.read(8) == PNG


def test_markdown_report(tmp_path):
    path = write_markdown(tmp_path / "r.md", "Title", [("One", "body 1"), ("Two", "body 2\n")])
    text = open(path).read()
    assert text.startswith("# Title") and "## One\n\nbody 1" in text and "## Two" in text
