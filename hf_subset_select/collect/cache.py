"""GradientCache: per-example projected gradients and outputs at θ*, with a JSON manifest.

On disk (see docs/cache_format.md)::

    <dir>/manifest.json          format version, projection, output function, fingerprints, counts, and the
                                 byte size and SHA-256 of every data file (``files``), verified on load
    <dir>/cache.safetensors      features [N, d] float32, outputs [N], example_id [N] int64,
                                 source_index [N] int64, split [N] int8 (0 = train, 1 = target),
                                 optional representations [N, h] float32
    <dir>/preconditioner.safetensors   optional feature scale s per trainable parameter (Adam geometry);
                                 its SHA-256 is in the manifest's ``precondition`` entry

Collection writes shards first and merges them into ``cache.safetensors``; the shards, the collection key and
the reuse / resume policy belong to :mod:`.store`. Nothing is ever loaded with pickle.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .. import __version__
from ..faults import kill_point
from ..io_utils import (
    atomic_save_file,
    atomic_write_json,
    file_problem,
    file_record,
    json_sha256,
    read_json,
)
from ..schema import SchemaError
from .cache_manifest import DATA_NAME, PRECONDITIONER_NAME, check_cache_manifest
from .precondition import check_preconditioner, preconditioner_sha256

__all__ = [
    "GradientCache",
    "GradientCacheError",
    "CACHE_FORMAT_VERSION",
    "SPLIT_TRAIN",
    "SPLIT_TARGET",
    "MANIFEST_NAME",
    "DATA_NAME",
    "PRECONDITIONER_NAME",
    "CACHE_COLUMNS",
]

CACHE_FORMAT_VERSION = 1
SPLIT_TRAIN = 0
SPLIT_TARGET = 1
MANIFEST_NAME = "manifest.json"
MANIFEST_SHA256_KEY = (
    "manifest_sha256"  # in cache.safetensors' metadata: the manifest's SHA-256 (json_sha256)
)
CACHE_COLUMNS = ("features", "outputs", "example_ids", "source_index", "split")


class GradientCacheError(ValueError):
    """A cache that is missing, corrupt, or does not match what it is used with."""


def _as_tensor(x: Any, dtype: torch.dtype, name: str) -> torch.Tensor:
    if isinstance(x, np.ndarray):
        x = torch.from_numpy(np.ascontiguousarray(x))
    elif not isinstance(x, torch.Tensor):
        x = torch.as_tensor(x)
    return x.detach().to("cpu", dtype).contiguous()


class GradientCache:
    """Per-example features ``g_i`` (N x d), outputs ``f_i``, ids, sources and splits.

    Args:
        features: projected gradients, shape (N, d).
        outputs: output values f at θ*, shape (N,).
        example_ids: int64 ids from :func:`~hf_subset_select.tag_sources`, shape (N,).
        source_index: index into ``sources`` per row, shape (N,).
        split: 0 for training rows, 1 for target evaluation rows, shape (N,).
        sources: source names; ``sources[source_index[i]]`` is row i's source.
        target_source: name of the source that is the target's own training split (or None).
        manifest: extra manifest fields (projection, output function, fingerprints, ...).
        representations: optional per-example mean last hidden states (N, h), for baselines.
        preconditioner: optional feature scale ``s`` per trainable parameter (``{name: tensor}``): the features
            are ``Pᵀ(s ⊙ ∇f)``, and a fitted step ``w`` maps to parameters as ``s ⊙ (P w)``
            (see :func:`~hf_subset_select.collect.precondition.adam_preconditioner`). None: raw gradients.
    """

    def __init__(
        self,
        features: Any,
        outputs: Any,
        example_ids: Any,
        source_index: Any,
        split: Any,
        sources: Sequence[str],
        *,
        target_source: str | None = None,
        manifest: dict[str, Any] | None = None,
        representations: Any | None = None,
        preconditioner: Mapping[str, Any] | None = None,
    ) -> None:
        self.features = _as_tensor(features, torch.float32, "features")
        self.outputs = _as_tensor(outputs, torch.float32, "outputs")
        self.example_ids = _as_tensor(example_ids, torch.int64, "example_ids")
        self.source_index = _as_tensor(source_index, torch.int64, "source_index")
        self.split = _as_tensor(split, torch.int8, "split")
        self.sources = [str(s) for s in sources]
        self.target_source = target_source
        self.representations = (
            None if representations is None else _as_tensor(representations, torch.float32, "representations")
        )
        self.manifest = dict(manifest or {})
        self.preconditioner: dict[str, torch.Tensor] | None = None
        if preconditioner is not None:
            try:
                self.preconditioner = check_preconditioner(preconditioner)
            except ValueError as exc:
                raise GradientCacheError(str(exc)) from exc
        self.validate()

    # ------------------------------------------------------------------ checks
    def validate(self) -> None:
        """Raise :class:`GradientCacheError` naming the fix if the arrays are inconsistent or hold NaN."""
        if self.features.ndim != 2:
            raise GradientCacheError(f"features must be 2-D (N, d), got shape {tuple(self.features.shape)}.")
        n = self.features.shape[0]
        for name in ("outputs", "example_ids", "source_index", "split"):
            t = getattr(self, name)
            if t.shape != (n,):
                raise GradientCacheError(f"{name} must have shape ({n},), got {tuple(t.shape)}.")
        if self.representations is not None and self.representations.shape[0] != n:
            raise GradientCacheError("representations must have one row per example.")
        if len(set(self.sources)) != len(self.sources):
            raise GradientCacheError(f"Duplicate source names in the cache: {self.sources}.")
        if n and (int(self.source_index.min()) < 0 or int(self.source_index.max()) >= len(self.sources)):
            raise GradientCacheError("source_index refers to a source that is not in `sources`.")
        if n and not bool(((self.split == SPLIT_TRAIN) | (self.split == SPLIT_TARGET)).all()):
            raise GradientCacheError("split must be 0 (train) or 1 (target) for every row.")
        if self.target_source is not None and self.target_source not in self.sources:
            raise GradientCacheError(
                f"target_source={self.target_source!r} is not among the sources {self.sources}."
            )
        if torch.unique(self.example_ids).numel() != n:
            raise GradientCacheError(
                "example_ids are not unique; the cache mixes two collections. Re-collect it."
            )
        bad = ~torch.isfinite(self.outputs)
        step = max(1, (16 << 20) // max(1, self.features.shape[1]))  # blocks of ~16 M entries: no N×d mask
        for s in range(0, n, step):
            bad[s : s + step] |= ~torch.isfinite(self.features[s : s + step]).all(dim=1)
        if bool(bad.any()):
            rows = torch.nonzero(bad).flatten()[:5]
            ids = self.example_ids[rows].tolist()
            raise GradientCacheError(
                f"The cache holds NaN/inf in {int(bad.sum())} row(s) (e.g. rows {rows.tolist()}, example_ids {ids}). "
                "Re-collect with a "
                "smaller learning rate for θ* or a larger prob_clamp, or drop those rows with cache.take(mask)."
            )

    # ------------------------------------------------------------------ views
    @property
    def num_examples(self) -> int:
        return int(self.features.shape[0])

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])

    @property
    def train_mask(self) -> torch.Tensor:
        return self.split == SPLIT_TRAIN

    @property
    def target_mask(self) -> torch.Tensor:
        return self.split == SPLIT_TARGET

    @property
    def train_sources(self) -> list[str]:
        """Sources that have training rows, in cache order (the target's own train source included)."""
        present = set(torch.unique(self.source_index[self.train_mask]).tolist())
        return [s for i, s in enumerate(self.sources) if i in present]

    def source_id(self, name: str) -> int:
        try:
            return self.sources.index(name)
        except ValueError:
            raise GradientCacheError(
                f"Source {name!r} is not in the cache; it has {self.sources}. Check the spelling or re-collect."
            ) from None

    def counts(self) -> dict[str, dict[str, int]]:
        out: dict[str, dict[str, int]] = {}
        for i, name in enumerate(self.sources):
            rows = self.source_index == i
            out[name] = {
                "train": int((rows & self.train_mask).sum()),
                "target": int((rows & self.target_mask).sum()),
            }
        return out

    def replace(self, **changes: Any) -> GradientCache:
        """A new cache with the given constructor fields changed (``features=``, ``manifest=``, ...), the rest
        shared with this one."""
        fields = {
            "features": self.features,
            "outputs": self.outputs,
            "example_ids": self.example_ids,
            "source_index": self.source_index,
            "split": self.split,
            "sources": self.sources,
            "target_source": self.target_source,
            "manifest": self.manifest,
            "representations": self.representations,
            "preconditioner": self.preconditioner,
        }
        unknown = sorted(set(changes) - set(fields))
        if unknown:
            raise TypeError(f"GradientCache.replace got unknown field(s) {unknown}; valid: {sorted(fields)}.")
        return GradientCache(**{**fields, **changes})

    def take(self, rows: torch.Tensor) -> GradientCache:
        """A new cache with the given rows (a boolean mask or an index tensor), in that order."""
        rows = torch.as_tensor(rows)
        return self.replace(
            features=self.features[rows],
            outputs=self.outputs[rows],
            example_ids=self.example_ids[rows],
            source_index=self.source_index[rows],
            split=self.split[rows],
            representations=None if self.representations is None else self.representations[rows],
        )

    def sort_by_id(self) -> GradientCache:
        """Rows ordered by (split, example_id): the canonical order used to compare two caches."""
        order = torch.argsort(self.example_ids, stable=True)
        order = order[torch.argsort(self.split[order].to(torch.int64), stable=True)]
        return self.take(order)

    def fingerprint(self) -> str:
        """Identifies this cache (used to tie a selection to the cache it came from)."""
        return str(self.manifest.get("fingerprint") or self._content_fingerprint())

    def _content_fingerprint(self) -> str:
        from ..io_utils import fingerprint_tensors

        digest = fingerprint_tensors(
            [
                ("features", self.features),
                ("outputs", self.outputs),
                ("example_ids", self.example_ids),
                ("split", self.split),
            ]
        )
        if self.preconditioner is not None:  # same features, other geometry: another cache
            pre = preconditioner_sha256(self.preconditioner)
            digest = hashlib.sha256(f"{digest}:{pre}".encode()).hexdigest()
        return digest[:16]

    def precondition_info(self, with_sha256: bool = True) -> dict[str, Any]:
        """The manifest's ``precondition`` entry for this cache (``{"kind": "none"}`` without a preconditioner);
        ``with_sha256=False`` skips hashing the preconditioner (for callers that only need the kind)."""
        info = dict(self.manifest.get("precondition") or {})
        if self.preconditioner is None:  # raw gradients; AdamW's scalar step size is kept (the budget λ rule)
            return {
                "kind": "none",
                **{k: v for k, v in info.items() if k in ("adam_scalars", "adam_scalars_error")},
            }
        if info.get("kind") in (None, "none"):
            info["kind"] = "custom"
        if with_sha256:
            info["sha256"] = preconditioner_sha256(self.preconditioner)
        info["file"] = PRECONDITIONER_NAME
        return info

    def __repr__(self) -> str:
        return (
            f"GradientCache(N={self.num_examples}, d={self.dim}, sources={len(self.sources)}, "
            f"target_rows={int(self.target_mask.sum())}, target_source={self.target_source!r})"
        )

    # ------------------------------------------------------------------ disk
    def save(self, path: str | os.PathLike) -> None:
        """Write ``cache.safetensors`` then ``manifest.json`` (both atomic; the manifest last marks completion)."""
        path = os.fspath(path)
        os.makedirs(path, exist_ok=True)
        tensors = {
            "features": self.features,
            "outputs": self.outputs,
            "example_ids": self.example_ids,
            "source_index": self.source_index,
            "split": self.split,
        }
        if self.representations is not None:
            tensors["representations"] = self.representations
        manifest = {k: v for k, v in self.manifest.items() if k != "files"}
        manifest["precondition"] = self.precondition_info()
        manifest.update(
            {
                "format": "hf_subset_select.gradient_cache",
                "format_version": CACHE_FORMAT_VERSION,
                "package_version": __version__,
                "sources": self.sources,
                "target_source": self.target_source,
                "num_examples": self.num_examples,
                "dim": self.dim,
                "counts": self.counts(),
                "has_representations": self.representations is not None,
            }
        )
        manifest.setdefault("fingerprint", self._content_fingerprint())
        # The data file carries the SHA-256 of the manifest (all but its `files`), the manifest the SHA-256 of the
        # data file: an edit anywhere in either is caught on load.
        data_path = os.path.join(path, DATA_NAME)
        atomic_save_file(tensors, data_path, metadata={MANIFEST_SHA256_KEY: json_sha256(manifest)})
        kill_point("cache_data_written")
        files = {DATA_NAME: file_record(data_path)}
        pre_path = os.path.join(path, PRECONDITIONER_NAME)
        if self.preconditioner is not None:
            atomic_save_file(dict(self.preconditioner), pre_path)
            files[PRECONDITIONER_NAME] = file_record(pre_path)
        elif os.path.exists(pre_path):  # a stale file from an earlier cache in this directory
            os.remove(pre_path)
        manifest["files"] = files
        self.manifest = manifest
        atomic_write_json(os.path.join(path, MANIFEST_NAME), manifest)

    @classmethod
    def load(cls, path: str | os.PathLike) -> GradientCache:
        """Load and check a cache written by :meth:`save` or by the collector.

        The manifest is checked key by key, then every data file against the size and SHA-256 it records.

        Raises:
            GradientCacheError: the directory is not a complete cache, its manifest is malformed or from an older
                release, or a file is missing, truncated or altered (the message names it and the fix).
        """
        from safetensors import safe_open
        from safetensors.torch import load_file

        path = os.fspath(path)
        mpath, dpath = os.path.join(path, MANIFEST_NAME), os.path.join(path, DATA_NAME)
        if not os.path.isdir(path):
            raise GradientCacheError(
                f"No gradient cache at {path!r}: run the GradientCollector (or `hf-subset-select collect`) first."
            )
        if not os.path.exists(mpath):
            raise GradientCacheError(
                f"{path!r} has no {MANIFEST_NAME}: the collection did not finish. Re-run it; completed shards are reused."
            )
        manifest = _read_manifest(mpath)
        _verify_files(path, manifest["files"])
        try:
            t = load_file(dpath)
            with safe_open(dpath, framework="pt") as handle:
                recorded = (handle.metadata() or {}).get(MANIFEST_SHA256_KEY)
        except Exception as exc:  # safetensors raises its own error types for corrupt files
            raise GradientCacheError(f"{dpath!r} is unreadable ({exc}); re-collect the cache.") from exc
        if recorded is not None and recorded != json_sha256(manifest, without="files"):
            raise GradientCacheError(
                f"{mpath!r} was edited or damaged: its content does not match the SHA-256 that {DATA_NAME} records "
                f"for it. Restore the manifest from where the cache was copied, or {_FIX}."
            )
        missing = [k for k in CACHE_COLUMNS if k not in t]
        if missing:
            raise GradientCacheError(f"{dpath!r} lacks {missing}; re-collect the cache.")
        preconditioner = _load_preconditioner(path, manifest)
        cache = cls(
            t["features"],
            t["outputs"],
            t["example_ids"],
            t["source_index"],
            t["split"],
            manifest["sources"],
            target_source=manifest.get("target_source"),
            manifest=manifest,
            representations=t.get("representations"),
            preconditioner=preconditioner,
        )
        if cache.num_examples != manifest["num_examples"] or cache.dim != manifest["dim"]:
            raise GradientCacheError(
                f"{path!r}: the data ({cache.num_examples} x {cache.dim}) does not match its manifest "
                f"({manifest['num_examples']} x {manifest['dim']}); re-collect the cache."
            )
        if cache.counts() != manifest["counts"] or manifest["has_representations"] != (
            "representations" in t
        ):
            raise GradientCacheError(
                f"{mpath!r}: 'counts' or 'has_representations' do not match the data (the manifest was edited); "
                "restore the original manifest or re-collect the cache."
            )
        return cache


_FIX = "delete the directory and re-collect the cache (re-run the collection)"


def _read_manifest(mpath: str) -> dict[str, Any]:
    """Parse ``manifest.json`` and check every key; raise :class:`GradientCacheError` naming the bad key."""
    try:
        manifest = read_json(mpath)
    except ValueError as exc:
        raise GradientCacheError(f"{mpath!r} is not valid JSON ({exc}); {_FIX}.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != "hf_subset_select.gradient_cache":
        raise GradientCacheError(f"{mpath!r} is not a hf_subset_select gradient cache manifest.")
    version = manifest.get("format_version")
    if version != CACHE_FORMAT_VERSION or isinstance(version, bool):
        raise GradientCacheError(
            f"Cache format version {version!r} is not supported by this release (expects {CACHE_FORMAT_VERSION}); "
            "re-collect with this version of hf-subset-select."
        )
    try:
        check_cache_manifest(manifest)
    except SchemaError as exc:
        if exc.key == "files" and "files" not in manifest:
            raise GradientCacheError(
                f"{mpath!r} was written by an older hf-subset-select that did not record file checksums, so the "
                "cache cannot be verified. Re-collect it with this version (in the same output_dir, pass "
                "CollectConfig(overwrite=True))."
            ) from None
        raise GradientCacheError(
            f"{mpath!r} is malformed: {exc}. The manifest was edited or damaged; restore it from a copy, or {_FIX}."
        ) from None
    return manifest


def _verify_files(path: str, records: dict[str, Any]) -> None:
    """Check every data file the manifest lists against its recorded size and SHA-256."""
    for name, record in records.items():
        problem = file_problem(os.path.join(path, name), record)
        if problem is not None:
            raise GradientCacheError(
                f"{os.path.join(path, name)!r} {problem}: the cache is damaged. Restore the file from where the "
                f"cache was copied, or {_FIX}."
            )


def _load_preconditioner(path: str, manifest: dict[str, Any]) -> dict[str, torch.Tensor] | None:
    """The cache's preconditioner (None for ``kind == "none"`` or caches older than the key), checked by SHA-256."""
    from safetensors.torch import load_file

    info = manifest.get("precondition", {"kind": "none"})
    if info["kind"] == "none":
        return None
    ppath = os.path.join(path, PRECONDITIONER_NAME)
    if not os.path.exists(ppath):
        raise GradientCacheError(
            f"{path!r} was collected with a {info.get('kind')!r} preconditioner but {PRECONDITIONER_NAME} is missing; "
            "restore the file from where the cache was copied, or re-collect the cache."
        )
    try:
        tensors = load_file(ppath)
    except Exception as exc:  # safetensors raises its own error types for corrupt files
        raise GradientCacheError(f"{ppath!r} is unreadable ({exc}); re-collect the cache.") from exc
    if preconditioner_sha256(tensors) != info.get("sha256"):
        raise GradientCacheError(
            f"{ppath!r} does not match the SHA-256 recorded in the manifest (modified, or copied from another cache); "
            "restore the original file or re-collect the cache."
        )
    expected = (manifest.get("projection") or {}).get("num_params")
    if expected is not None and sum(t.numel() for t in tensors.values()) != int(expected):
        raise GradientCacheError(
            f"{ppath!r} covers {sum(t.numel() for t in tensors.values())} parameters, the projection {expected}; "
            "re-collect the cache."
        )
    return tensors
