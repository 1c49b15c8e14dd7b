"""What a gradient cache's ``manifest.json`` must hold: every key's type and range, checked before any data is read.

:func:`check_cache_manifest` raises :class:`~hf_subset_select.schema.SchemaError` naming the first wrong key;
:meth:`~hf_subset_select.collect.cache.GradientCache.load` reports it as a ``GradientCacheError`` with the fix.
Keys written by every :meth:`~hf_subset_select.collect.cache.GradientCache.save` are required; keys the collector
adds (projection, output function, θ* fingerprint, ...) are checked when present. Unknown keys are allowed (a
newer release may add some).
"""

from __future__ import annotations

from typing import Any

from ..schema import (
    SchemaError,
    anything,
    boolean,
    dict_of,
    file_records,
    hexdigest,
    integer,
    list_of,
    number,
    obj,
    optional,
    string,
)

__all__ = ["check_cache_manifest", "DATA_NAME", "PRECONDITIONER_NAME"]

DATA_NAME = "cache.safetensors"
PRECONDITIONER_NAME = "preconditioner.safetensors"
_ANY_INT = integer(-(2**63))

_PROJECTION = obj(
    {"kind": string(nonempty=True), "dim": integer(1), "seed": _ANY_INT},
    {"scheme": string(), "num_params": integer(1), "nnz": integer(1)},
)
_PRECONDITION = obj(
    {"kind": string(choices=("none", "adam", "custom"))},
    {
        "sha256": hexdigest(64),
        "file": string(choices=(PRECONDITIONER_NAME,)),
        "adam_scalars": dict_of(anything()),
        "adam_scalars_error": string(),
    },
)
_REQUIRED = {
    "format": string(choices=("hf_subset_select.gradient_cache",)),
    "format_version": integer(1),
    "package_version": string(),
    "sources": list_of(string(nonempty=True), unique=True),
    "target_source": optional(string(nonempty=True)),
    "num_examples": integer(),
    "dim": integer(),
    "counts": dict_of(obj({"train": integer(), "target": integer()}, closed=True)),
    "has_representations": boolean(),
    "fingerprint": string(nonempty=True),
    "files": file_records((DATA_NAME,), (PRECONDITIONER_NAME,)),
}
_OPTIONAL = {
    "precondition": _PRECONDITION,  # absent in caches from before preconditioning: raw gradients
    "projection": _PROJECTION,
    "output_fn": string(nonempty=True),
    "model_kind": string(nonempty=True),
    "prob_clamp": number(0.0, 0.5, open_lo=True),
    "theta_fingerprint": hexdigest(64),
    "dataset_fingerprint": hexdigest(64),
    "trainable_parameters": integer(),
    "skipped": obj(
        {"count": integer(), "by_source": dict_of(integer()), "example_ids": list_of(_ANY_INT)},
    ),
    "collect_config": dict_of(anything()),
    "collection": obj({"digest": string(nonempty=True)}),
    "collection_stats": dict_of(anything()),
    "model_class": string(),
    "base_model_name_or_path": optional(string()),
    "world_size": integer(1),
    "grad_method": string(),
    "train_cache": obj({"fingerprint": string(nonempty=True)}, {"path": optional(string())}),
    "meta_init": obj(
        {}, {"path": optional(string()), "fingerprint": optional(string()), "matches_theta": boolean()}
    ),
}
_MANIFEST = obj(_REQUIRED, _OPTIONAL)


def check_cache_manifest(manifest: Any) -> None:
    """Raise :class:`SchemaError` for the first key of a cache manifest with a wrong type, range or value."""
    if isinstance(manifest, dict) and "files" not in manifest and "format" in manifest:
        raise SchemaError(
            "files",
            "present (the manifest was written by an older hf-subset-select, without checksums)",
            None,
        )
    _MANIFEST(manifest, "")
    sources = manifest["sources"]
    target = manifest["target_source"]
    if target is not None and target not in sources:
        raise SchemaError("target_source", f"null or one of the sources {sources}", target)
    counts = manifest["counts"]
    if sorted(counts) != sorted(sources):
        raise SchemaError("counts", f"an entry for each source {sources}", counts)
    total = sum(c["train"] + c["target"] for c in counts.values())
    if total != manifest["num_examples"]:
        raise SchemaError("num_examples", f"the sum of the counts ({total})", manifest["num_examples"])
    projection = manifest.get("projection")
    if projection is not None and projection["dim"] != manifest["dim"]:
        raise SchemaError("projection.dim", f"the cache's dim ({manifest['dim']})", projection["dim"])
    precondition = manifest.get("precondition", {"kind": "none"})
    if precondition["kind"] != "none":
        if "sha256" not in precondition:
            raise SchemaError(
                "precondition.sha256", f"present for a {precondition['kind']!r} preconditioner", None
            )
        if PRECONDITIONER_NAME not in manifest["files"]:
            raise SchemaError(
                f"files.{PRECONDITIONER_NAME}", "present (the cache has a preconditioner)", None
            )
    elif PRECONDITIONER_NAME in manifest["files"]:
        raise SchemaError(f"files.{PRECONDITIONER_NAME}", "absent (precondition.kind is 'none')", "a record")
    if "skipped" in manifest and manifest["skipped"]["count"] < len(manifest["skipped"]["example_ids"]):
        raise SchemaError(
            "skipped.count", "at least the number of skipped example_ids", manifest["skipped"]["count"]
        )
