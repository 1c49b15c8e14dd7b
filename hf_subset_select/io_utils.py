"""Atomic file writes and fingerprints shared by every on-disk artifact."""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from .faults import kill_point

__all__ = [
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_file",
    "read_json",
    "fingerprint_tensors",
    "file_sha256",
    "file_record",
    "file_problem",
]


def _atomic_replace(path: str, write: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        kill_point("replace", os.path.basename(path))
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file)."""

    def write(tmp: str) -> None:
        with open(tmp, "w", encoding="utf-8") as handle:
            handle.write(text)

    _atomic_replace(os.fspath(path), write)


def atomic_write_json(path: str | os.PathLike, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=True) + "\n")


def atomic_save_file(
    tensors: dict[str, Any], path: str | os.PathLike, metadata: dict[str, str] | None = None
) -> None:
    """Atomically write a safetensors file of torch tensors."""
    from safetensors.torch import save_file

    _atomic_replace(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def read_json(path: str | os.PathLike) -> Any:
    """Parse a JSON file; any malformed content (bad syntax, bad UTF-8, absurd nesting) raises ``ValueError``."""
    with open(path, encoding="utf-8") as handle:
        try:
            return json.load(handle)
        except RecursionError:
            raise ValueError("the JSON is nested too deeply") from None


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 hex digest of a file's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def file_record(path: str | os.PathLike) -> dict[str, Any]:
    """``{"bytes": size, "sha256": digest}`` of a file: what a manifest records to verify it on load."""
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def file_problem(path: str | os.PathLike, record: dict[str, Any]) -> str | None:
    """What is wrong with ``path`` against its manifest ``record`` (from :func:`file_record`), or None if intact.

    The size is compared first (cheap, catches truncation); the SHA-256 always, so no altered byte goes unseen.
    """
    if not os.path.isfile(path):
        return "is missing"
    size = os.path.getsize(path)
    if size != record.get("bytes"):
        return f"has {size} bytes but the manifest records {record.get('bytes')} (truncated or replaced)"
    if file_sha256(path) != record.get("sha256"):
        return "does not match the SHA-256 recorded in the manifest (its bytes were altered)"
    return None


def fingerprint_tensors(named: Iterable[tuple[str, Any]]) -> str:
    """SHA-256 over names, shapes, dtypes and bytes of tensors, in the given order."""
    import torch

    digest = hashlib.sha256()
    for name, tensor in named:
        t = tensor.detach().to("cpu").contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(str(t.dtype).encode())
        digest.update(t.reshape(-1).view(dtype=torch.uint8).numpy().tobytes())
    return digest.hexdigest()
