"""Safe loading: nothing in the package (or its recipes) can unpickle. The source is parsed and every import of a
pickle-based module, every ``torch.load`` without ``weights_only=True``, every ``numpy.load(allow_pickle=True)``,
``pandas.read_pickle`` and ``trust_remote_code=True`` fails this test (docs/cache_format.md, "Trust model")."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCANNED = [ROOT / "hf_subset_select", ROOT / "recipes"]
PICKLING_MODULES = {
    "pickle",
    "cPickle",
    "_pickle",
    "dill",
    "cloudpickle",
    "joblib",
    "shelve",
    "marshal",
    "jsonpickle",
}


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Name):
        return node.id
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    return ""


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def _is_true(node: ast.AST | None) -> bool:
    return isinstance(node, ast.Constant) and node.value is True


def unsafe_calls(source: str, filename: str = "<source>") -> list[str]:
    """Every unpickling construct in ``source``, as ``file:line what``."""
    found = []
    for node in ast.walk(ast.parse(source, filename)):
        where = f"{filename}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Import):
            found += [
                f"{where} import {a.name}" for a in node.names if a.name.split(".")[0] in PICKLING_MODULES
            ]
        elif isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] in PICKLING_MODULES:
            found.append(f"{where} from {node.module} import ...")
        elif isinstance(node, ast.Call):
            name = _dotted(node.func)
            last = name.rsplit(".", 1)[-1]
            if name == "torch.load" and not _is_true(_keyword(node, "weights_only")):
                found.append(f"{where} torch.load without weights_only=True")
            allow = _keyword(node, "allow_pickle")
            if name in ("np.load", "numpy.load") and allow is not None:
                if not (isinstance(allow, ast.Constant) and allow.value is False):
                    found.append(f"{where} {name} with allow_pickle")
            if last in ("read_pickle", "to_pickle") or name in ("torch.serialization.load",):
                found.append(f"{where} {name}")
            if _is_true(_keyword(node, "trust_remote_code")):
                found.append(f"{where} {name}(trust_remote_code=True)")
    return found


def test_the_scanner_finds_each_unsafe_construct():
    bad = (
        "import pickle\nfrom dill import loads\nimport torch\ntorch.load('x')\ntorch.load('x', weights_only=False)\n"
        "import numpy as np\nnp.load('x', allow_pickle=True)\nimport pandas as pd\npd.read_pickle('x')\n"
        "AutoModel.from_pretrained('m', trust_remote_code=True)\n"
    )
    lines = [int(f.split()[0].rsplit(":", 1)[1]) for f in unsafe_calls(bad)]
    assert lines == [1, 2, 4, 5, 7, 9, 10]
    good = "import torch\ntorch.load('x', weights_only=True)\nimport numpy as np\nnp.load('x')\nnp.load('x', allow_pickle=False)\n"
    assert unsafe_calls(good) == []


def test_nothing_in_the_package_or_recipes_unpickles():
    found = []
    for base in SCANNED:
        for path in sorted(base.rglob("*.py")):
            found += unsafe_calls(path.read_text(encoding="utf-8"), str(path.relative_to(ROOT)))
    assert not found, "unpickling constructs (see docs/cache_format.md, Trust model):\n" + "\n".join(found)
