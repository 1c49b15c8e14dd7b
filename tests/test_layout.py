"""Guard rails on the package's shape: small modules, classes and functions, a small public surface, and docs
that stand alone. They catch the worst regressions, not elegance."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES, MAX_PUBLIC_NAMES = 600, 400, 120, 25


def _python_files() -> list[Path]:
    return sorted([*ROOT.joinpath("hf_subset_select").rglob("*.py"), *ROOT.joinpath("recipes").rglob("*.py")])


def test_modules_classes_and_functions_stay_small():
    too_big = []
    for path in _python_files():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if len(text.splitlines()) > MAX_MODULE_LINES:
            too_big.append(f"{rel}: {len(text.splitlines())} lines (module bar {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text)):
            size = getattr(node, "end_lineno", 0) - getattr(node, "lineno", 0) + 1
            if isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
                too_big.append(f"{rel}: class {node.name} {size} lines (bar {MAX_CLASS_LINES})")
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and size > MAX_FUNCTION_LINES:
                too_big.append(f"{rel}: {node.name}() {size} lines (bar {MAX_FUNCTION_LINES})")
    assert not too_big, "\n".join(too_big)


def test_public_surface_is_small_and_lazy():
    import subprocess
    import sys

    import hf_subset_select

    assert len(hf_subset_select.__all__) <= MAX_PUBLIC_NAMES, hf_subset_select.__all__
    # importing the package (and a name's subpackage registry) does not import torch or transformers
    code = "import sys, hf_subset_select; print('torch' in sys.modules or 'transformers' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_docs_and_code_stand_alone():
    """Nothing in the repository cites the private design brief or files outside the repository."""
    cited = []
    for path in [*_python_files(), *ROOT.joinpath("docs").rglob("*.md"), ROOT / "README.md"]:
        text = path.read_text(encoding="utf-8")
        if "DESIGN" + ".md" in text or "../" + "shared" in text:
            cited.append(str(path.relative_to(ROOT)))
    assert not cited, cited
