"""Atomic file writes and fingerprints shared by every on-disk artifact."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import tempfile
from collections.abc import Iterable
from typing import Any

from .faults import kill_point

__all__ = [
    "StorageWriteError",
    "atomic_write_text",
    "atomic_write_json",
    "atomic_save_file",
    "read_json",
    "fingerprint_tensors",
    "file_sha256",
    "json_sha256",
    "file_record",
    "file_problem",
]


class StorageWriteError(OSError):
    """Writing a file failed (no space left, quota, read-only or failing disk); ``errno`` is the system's.

    Raised by every atomic write of the library; the half-written temporary file is removed and the file that was
    there before, if any, is left as it was.
    """

    def __init__(self, path: str, cause: OSError) -> None:
        reason = cause.strerror or str(cause)
        if cause.errno in (errno.ENOSPC, errno.EDQUOT):
            fix = (
                "Free space on that filesystem (or write to another output_dir) and re-run: finished work is kept, "
                "a gradient collection resumes from its completed shards."
            )
        elif cause.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            fix = "Make the directory writable (or choose another output_dir) and re-run."
        else:
            fix = "Check the disk and the directory, then re-run: finished work is kept."
        super().__init__(cause.errno, f"Could not write {path!r}: {reason}. {fix}")
        self.filename = path

    def __str__(self) -> str:
        return str(self.strerror)


def _atomic_replace(path: str, write: Any) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    tmp = None
    try:
        os.makedirs(directory, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
        os.close(fd)
        write(tmp)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        kill_point("replace", os.path.basename(path))
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None and os.path.exists(tmp):
            try:
                os.remove(tmp)
            except OSError:
                pass
        if isinstance(exc, OSError) and not isinstance(exc, StorageWriteError):
            raise StorageWriteError(path, exc) from exc
        raise


def _write_text(tmp: str, text: str) -> None:
    with open(tmp, "w", encoding="utf-8") as handle:
        handle.write(text)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and ``os.replace`` (never a half-written file).

    Raises:
        StorageWriteError: the write failed (e.g. no space left on device); the message names the path and the fix.
    """

    _atomic_replace(os.fspath(path), lambda tmp: _write_text(tmp, text))


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


def json_sha256(data: Any, *, without: str | None = None) -> str:
    """SHA-256 of ``data``'s canonical JSON (sorted keys, no spaces), leaving the top-level key ``without`` out.

    The same value gives the same digest after a write and a read back, so a JSON file can carry its own checksum
    (detecting edits and damage that still parse, not deliberate tampering: whoever edits can recompute it).
    """
    if without is not None and isinstance(data, dict):
        data = {k: v for k, v in data.items() if k != without}
    text = json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return hashlib.sha256(text.encode()).hexdigest()


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
