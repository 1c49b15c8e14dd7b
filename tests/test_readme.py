"""The README's two set-up commands are the ones CI and users run."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash", 1)[1].split("```", 1)[0]
    return [line.strip() for line in block.strip().splitlines()]


def test_readme_opens_with_the_demo_and_the_test_command():
    main_job, tests = _readme_commands()
    assert main_job.endswith("hf-subset-select demo")
    assert "pytest" in tests
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in [line.strip() for line in ci], ".ci/run must run exactly the README's test command"
    assert any(line.strip().startswith("python -m pip install --quiet torch==2.13.0") for line in ci)


def test_every_public_name_is_documented_and_importable():
    import hf_subset_select

    api = (ROOT / "docs" / "api.md").read_text()
    for name in hf_subset_select.__all__:
        if name != "__version__":
            assert getattr(hf_subset_select, name) is not None
            assert f"`{name}`" in api, f"{name} is missing from docs/api.md"
    for link in ("quickstart", "method", "api", "cache_format", "recipes", "distributed", "benchmarks"):
        assert (ROOT / "docs" / f"{link}.md").is_file(), f"README links docs/{link}.md"
