"""The on-disk gradient store: layout, shards, the collection key, and the reuse / resume / overwrite policy.

A collection writes numbered shards, then merges them into a :class:`~.cache.GradientCache`::

    <dir>/shards/collection.json            the collection key (what must match to resume), written first
    <dir>/shards/shard-000012.safetensors   rows of global shard 12 (same columns as the cache)
    <dir>/shards/shard-000012.json          its row count, example ids digest, file size and SHA-256;
                                            written last, so its presence marks the shard complete
    <dir>/manifest.json, cache.safetensors  the merged cache (see :mod:`.cache`); shards are removed then

Shards are numbered over the collection's canonical example order, not per process, so a collection killed
under k processes can resume under any number of processes. A directory holding a cache or a partial collection
made with other settings, parameters or data is refused with :class:`CollectionMismatchError` unless the caller
asks to overwrite it. See docs/cache_format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

from ..faults import kill_point
from ..io_utils import atomic_save_file, atomic_write_json, file_sha256, read_json
from .cache import (
    CACHE_COLUMNS,
    CACHE_FORMAT_VERSION,
    DATA_NAME,
    MANIFEST_NAME,
    PRECONDITIONER_NAME,
    GradientCache,
    GradientCacheError,
)
from .distributed import DistState

__all__ = [
    "CollectionMismatchError",
    "GradientStore",
    "SHARDS_DIR",
    "PROGRESS_NAME",
    "collection_key",
    "save_shard",
    "load_shard",
    "complete_shards",
    "merge_shards",
    "remove_shards",
    "remove_final_files",
    "remove_collection_files",
    "remove_temp_files",
]

SHARDS_DIR = "shards"
PROGRESS_NAME = "collection.json"
_SHARD_RE = re.compile(r"^shard-(\d{6,})\.json$")


class CollectionMismatchError(GradientCacheError):
    """The output directory holds a cache (or partial collection) made with different settings, model or data."""


# ---------------------------------------------------------------------- shard files
def _shard_paths(shards_dir: str, index: int) -> tuple[str, str]:
    stem = os.path.join(shards_dir, f"shard-{index:06d}")
    return stem + ".safetensors", stem + ".json"


def save_shard(
    shards_dir: str | os.PathLike, index: int, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> dict[str, Any]:
    """Write one shard atomically: the safetensors file first, then its JSON (whose presence marks completion).

    ``tensors`` holds the cache columns (``features``, ``outputs``, ``example_ids``, ``source_index``, ``split``,
    optional ``representations``) for the shard's rows. Returns the JSON written.
    """
    shards_dir = os.fspath(shards_dir)
    missing = [k for k in CACHE_COLUMNS if k not in tensors]
    if missing:
        raise GradientCacheError(f"A shard needs the columns {list(CACHE_COLUMNS)}; {missing} are missing.")
    data_path, meta_path = _shard_paths(shards_dir, index)
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_save_file(clean, data_path)
    kill_point("shard_data_written", index)
    meta = dict(meta)
    meta.update(
        {
            "index": int(index),
            "num_rows": int(clean["features"].shape[0]),
            "data_file": os.path.basename(data_path),
            "data_bytes": os.path.getsize(data_path),
            "data_sha256": file_sha256(data_path),
        }
    )
    atomic_write_json(meta_path, meta)
    return meta


def complete_shards(shards_dir: str | os.PathLike, verify: bool = True) -> dict[int, dict[str, Any]]:
    """``{index: shard JSON}`` of the shards that finished writing (and, with ``verify``, whose data is intact).

    A shard whose data file is missing, has the wrong size or checksum is left out (it will be recomputed).
    """
    shards_dir = os.fspath(shards_dir)
    if not os.path.isdir(shards_dir):
        return {}
    out: dict[int, dict[str, Any]] = {}
    for name in sorted(os.listdir(shards_dir)):
        match = _SHARD_RE.match(name)
        if not match:
            continue
        try:
            meta = read_json(os.path.join(shards_dir, name))
        except ValueError:
            continue
        if not isinstance(meta, dict):  # an edited or foreign file: the shard is recomputed
            continue
        data_path, _ = _shard_paths(shards_dir, int(match.group(1)))
        if not os.path.exists(data_path) or os.path.getsize(data_path) != meta.get("data_bytes"):
            continue
        if verify and file_sha256(data_path) != meta.get("data_sha256"):
            continue
        out[int(match.group(1))] = meta
    return out


def load_shard(shards_dir: str | os.PathLike, index: int) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Read one complete shard: its tensors and its JSON."""
    from safetensors.torch import load_file

    data_path, meta_path = _shard_paths(os.fspath(shards_dir), index)
    if not os.path.exists(meta_path) or not os.path.exists(data_path):
        raise GradientCacheError(
            f"Shard {index} is missing under {os.fspath(shards_dir)!r}; re-run the collection (it resumes)."
        )
    try:
        meta = read_json(meta_path)
    except ValueError:
        meta = None
    if not isinstance(meta, dict):
        raise GradientCacheError(f"Shard JSON {meta_path!r} is corrupt; delete it and re-run the collection.")
    try:
        tensors = load_file(data_path)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise GradientCacheError(
            f"Shard file {data_path!r} is unreadable ({exc}); delete it and re-run."
        ) from exc
    if "features" not in tensors or int(tensors["features"].shape[0]) != meta.get("num_rows"):
        raise GradientCacheError(f"Shard file {data_path!r} does not match its JSON; delete both and re-run.")
    return tensors, meta


def merge_shards(
    shards_dir: str | os.PathLike,
    indices: Iterable[int],
    *,
    sources: Sequence[str],
    target_source: str | None = None,
    manifest: dict[str, Any] | None = None,
    dim: int | None = None,
    preconditioner: Mapping[str, torch.Tensor] | None = None,
) -> GradientCache:
    """Concatenate shards (in the given order) into one :class:`GradientCache` (not saved; call ``.save``).

    ``dim`` is the feature dimension to use when there are no rows at all; ``preconditioner`` the feature scale
    the shards were collected with (None: raw gradients).
    """
    parts: dict[str, list[torch.Tensor]] = {}
    has_reps: bool | None = None
    for index in indices:
        tensors, _ = load_shard(shards_dir, index)
        kill_point("merge_loaded", index)
        reps = "representations" in tensors
        if has_reps is not None and reps != has_reps:
            raise GradientCacheError(
                "Some shards have representations and some do not; re-collect the cache."
            )
        has_reps = reps
        for key, value in tensors.items():
            parts.setdefault(key, []).append(value)
    if not parts:
        width = int(dim or 0)
        return GradientCache(
            torch.zeros(0, width),
            torch.zeros(0),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int64),
            torch.zeros(0, dtype=torch.int8),
            sources,
            target_source=target_source,
            manifest=manifest,
            preconditioner=preconditioner,
        )
    cat = {k: torch.cat(v, dim=0) for k, v in parts.items()}
    return GradientCache(
        cat["features"],
        cat["outputs"],
        cat["example_ids"],
        cat["source_index"],
        cat["split"],
        sources,
        target_source=target_source,
        manifest=manifest,
        representations=cat.get("representations"),
        preconditioner=preconditioner,
    )


def remove_shards(path: str | os.PathLike) -> None:
    """Delete the collection's shards under ``path`` (and the shard folder when nothing else is in it)."""
    shards_dir = os.path.join(os.fspath(path), SHARDS_DIR)
    if not os.path.isdir(shards_dir):
        return
    for name in os.listdir(shards_dir):
        if name == PROGRESS_NAME or name.startswith("shard-") or name.startswith(".tmp-"):
            os.remove(os.path.join(shards_dir, name))
    if not os.listdir(shards_dir):
        os.rmdir(shards_dir)


def remove_final_files(path: str | os.PathLike) -> None:
    """Delete a merged cache (manifest first, so that a half-deleted cache never looks complete)."""
    for name in (MANIFEST_NAME, DATA_NAME, PRECONDITIONER_NAME):
        if os.path.exists(os.path.join(os.fspath(path), name)):
            os.remove(os.path.join(os.fspath(path), name))


def remove_temp_files(path: str | os.PathLike) -> None:
    """Delete the temporary files an interrupted atomic write left in ``path`` (``.tmp-*``, never renamed)."""
    path = os.fspath(path)
    if not os.path.isdir(path):
        return
    for name in os.listdir(path):
        full = os.path.join(path, name)
        if name.startswith(".tmp-") and os.path.isfile(full):
            os.remove(full)


def remove_collection_files(path: str | os.PathLike) -> None:
    """Delete a cache directory's own files (manifest, data, shards); anything else in it is left alone."""
    remove_final_files(path)
    remove_shards(path)


# ---------------------------------------------------------------------- the collection key and the policy
def collection_key(
    settings: Mapping[str, Any],
    entries: Iterable[tuple[int, int, str, bytes]],
    precondition: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What must match for a directory's collection to be reused or resumed, with a short ``digest`` of it.

    Args:
        settings: the result-shaping settings (projection manifest, output function, model kind, prob_clamp,
            max_length, θ fingerprint, sources, shard_size, representations).
        entries: ``(split, example_id, source name, content digest)`` per collected row, in canonical order.
        precondition: the manifest's ``precondition`` entry; part of the key only when gradients are scaled,
            so that caches collected before preconditioning existed are still reused.
    """
    ids = hashlib.sha256()
    count = 0
    for split, example_id, source, digest in entries:
        ids.update(f"{split}:{example_id}:{source}\n".encode())
        ids.update(digest)
        count += 1
    key: dict[str, Any] = {"format_version": CACHE_FORMAT_VERSION, **settings}
    key["dataset_fingerprint"] = ids.hexdigest()
    key["num_examples"] = count
    if precondition is not None and precondition.get("kind", "none") != "none":
        key["precondition"] = {"kind": precondition["kind"], "sha256": precondition["sha256"]}
    key["digest"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    return key


def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def key_differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """Human-readable differences between two collection keys (for :class:`CollectionMismatchError`)."""
    old_kind = (old.get("precondition") or {}).get("kind", "none")
    new_kind = (new.get("precondition") or {}).get("kind", "none")
    labels = {
        "precondition": "the gradient preconditioner (optimizer state) differs: on disk "
        f"{old_kind}, now {new_kind}",
        "theta_fingerprint": "the model parameters (θ*) differ",
        "dataset_fingerprint": "the examples (ids, sources or token content) differ",
    }
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "digest" or old.get(k) == new.get(k):
            continue
        if k in labels:
            out.append(labels[k])
        elif isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            for sub in sorted(set(old[k]) | set(new[k])):
                if old[k].get(sub) != new[k].get(sub):
                    out.append(f"{k}.{sub}: on disk {old[k].get(sub)!r}, now {new[k].get(sub)!r}")
        else:
            out.append(f"{k}: on disk {old.get(k)!r}, now {new.get(k)!r}")
    return out


def existing_action(output_dir: str | os.PathLike, key: Mapping[str, Any], overwrite: bool = False) -> str:
    """What to do with ``output_dir``: ``"fresh"``, ``"resume"``, ``"reuse"`` or ``"overwrite"``.

    Raises:
        CollectionMismatchError: the directory holds a cache (any cache not written by a collection included) or a
            partial collection with another key, and ``overwrite`` is False.
    """
    output_dir = os.fspath(output_dir)
    manifest_path = os.path.join(output_dir, MANIFEST_NAME)
    progress_path = os.path.join(output_dir, SHARDS_DIR, PROGRESS_NAME)
    existing: dict[str, Any] | None = None
    where = ""
    final = False
    if os.path.exists(manifest_path) and os.path.exists(os.path.join(output_dir, DATA_NAME)):
        try:
            on_disk = read_json(manifest_path)
        except ValueError:
            on_disk = None
        existing = on_disk.get("collection") if isinstance(on_disk, dict) else None
        if not isinstance(
            existing, dict
        ):  # a cache saved by other means (or corrupt): never clobber it silently
            existing = {"origin": "not written by GradientCollector"}
        elif "files" not in on_disk:  # written before manifests held checksums: collected again, not reused
            existing = {**existing, "files": "not recorded (written by an older hf-subset-select)"}
        where, final = manifest_path, True
    if existing is None and os.path.exists(progress_path):
        try:
            existing = read_json(progress_path)
        except ValueError:
            existing = {}
        if not isinstance(existing, dict):
            existing = {}
        where = progress_path
    if existing is None:
        if overwrite and (
            os.path.exists(manifest_path) or os.path.isdir(os.path.join(output_dir, SHARDS_DIR))
        ):
            return "overwrite"
        return "fresh"
    if existing.get("digest") == key["digest"] and _same(existing, key):
        return "reuse" if final else "resume"
    if overwrite:
        return "overwrite"
    diffs = key_differences(existing, key)
    raise CollectionMismatchError(
        f"{output_dir!r} already holds a {'gradient cache' if final else 'partial collection'} made differently "
        f"({where}): {'; '.join(diffs) or 'settings differ'}. Use another output_dir, or pass "
        "CollectConfig(overwrite=True) to replace it."
    )


# ---------------------------------------------------------------------- the store
class GradientStore:
    """One collection's directory: decides reuse / resume / overwrite, writes shards, merges them into the cache.

    Every process of a distributed run builds the same store and calls the same methods in the same order (the
    methods hold the barriers); only the main process deletes, merges and writes the manifest.

    Args:
        output_dir: the cache directory.
        key: from :func:`collection_key`.
        num_rows: rows in the collection (shards cover them in canonical order).
        shard_size: rows per shard.
        dist: rank, world size and barrier (:func:`~.distributed.dist_state`).
        overwrite: replace a directory made differently instead of raising :class:`CollectionMismatchError`.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        key: dict[str, Any],
        *,
        num_rows: int,
        shard_size: int,
        dist: DistState,
        overwrite: bool = False,
    ) -> None:
        self.output_dir = os.fspath(output_dir)
        self.shards_dir = os.path.join(self.output_dir, SHARDS_DIR)
        self.key = key
        self.num_rows = int(num_rows)
        self.shard_size = int(shard_size)
        self.num_shards = (self.num_rows + self.shard_size - 1) // self.shard_size
        self.dist = dist
        self.overwrite = overwrite

    def shard_rows(self, index: int) -> range:
        """The canonical row positions that shard ``index`` holds."""
        return range(index * self.shard_size, min((index + 1) * self.shard_size, self.num_rows))

    def open(self) -> str:
        """Apply the policy: ``"reuse"`` (a complete equal cache, shards cleaned up) or ``"collect"`` (shards
        directory ready, the key written, stale files removed). Every rank checks, so every rank raises the same
        :class:`CollectionMismatchError`."""
        action = existing_action(self.output_dir, self.key, self.overwrite)
        self.dist.barrier()
        if self.dist.is_main:
            remove_temp_files(self.output_dir)  # left by a write that a kill interrupted
        if action == "reuse":
            if self.dist.is_main:
                remove_shards(self.output_dir)
            self.dist.barrier()
            return "reuse"
        if self.dist.is_main:
            if action == "overwrite":
                remove_collection_files(self.output_dir)
            elif os.path.exists(os.path.join(self.output_dir, MANIFEST_NAME)):
                remove_final_files(self.output_dir)  # a stale merged cache; its shards may still be resumed
            os.makedirs(self.shards_dir, exist_ok=True)
            atomic_write_json(os.path.join(self.shards_dir, PROGRESS_NAME), self.key)
        self.dist.barrier()
        return action if action == "overwrite" else "collect"

    def done_shards(self) -> set[int]:
        """Shards of this collection already complete and intact on disk."""
        done = complete_shards(self.shards_dir)
        return {
            i for i, m in done.items() if i < self.num_shards and m.get("key_digest") == self.key["digest"]
        }

    def pending(self) -> tuple[list[int], int]:
        """This rank's shards still to compute (every ``world``-th one) and the rows reused from complete shards."""
        done = self.done_shards()
        mine = [i for i in range(self.num_shards) if i % self.dist.world == self.dist.rank and i not in done]
        reused = self.num_rows - sum(len(self.shard_rows(i)) for i in range(self.num_shards) if i not in done)
        return mine, reused

    def write_shard(self, index: int, tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
        """Write shard ``index`` atomically, tagged with the collection key."""
        ids = tensors["example_ids"].tolist()
        meta = {
            "key_digest": self.key["digest"],
            "example_ids_sha256": hashlib.sha256(json.dumps(ids).encode()).hexdigest(),
            "rank": self.dist.rank,
        }
        return save_shard(self.shards_dir, index, tensors, meta)

    def finish(
        self,
        manifest: dict[str, Any],
        *,
        sources: Sequence[str],
        target_source: str | None,
        dim: int,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
    ) -> None:
        """Merge every shard into the cache on the main process (manifest last), then drop the shards."""
        self.dist.barrier()
        if self.dist.is_main:
            complete = complete_shards(self.shards_dir, verify=False)
            missing = [i for i in range(self.num_shards) if i not in complete]
            if missing:
                raise GradientCacheError(
                    f"Shards {missing[:5]} are missing after collection (a process failed?); re-run to resume."
                )
            cache = merge_shards(
                self.shards_dir,
                range(self.num_shards),
                sources=sources,
                target_source=target_source,
                manifest={
                    "collection": self.key,
                    "dataset_fingerprint": self.key["dataset_fingerprint"],
                    **manifest,
                },
                dim=dim,
                preconditioner=preconditioner,
            )
            cache.save(self.output_dir)
            kill_point("manifest_written")
            remove_shards(self.output_dir)
        self.dist.barrier()

    def load(self) -> GradientCache:
        """The merged cache in the directory."""
        return GradientCache.load(self.output_dir)
