"""Whether two gradient caches can be used together: a training cache and a target cache collected apart.

A target's features are comparable with a training cache's only when both were computed at the same θ*, with the
same projection (kind, dimension, seed, scheme, number of parameters), the same geometry (preconditioner) and the
same output function (name, model kind, probability clamp, max length). :func:`compatibility_fields` reads those
from a cache manifest and :func:`check_compatible` refuses a pair that differs in one of them with a
:class:`TargetCacheMismatchError` that names the field, both values and the fix.

Used by :class:`~hf_subset_select.GradientCollector` with ``train_cache=`` (before any gradient is computed) and by
the estimator when it is given a separate ``target=`` cache.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from .cache import GradientCache, GradientCacheError

__all__ = [
    "TargetCacheMismatchError",
    "compatibility_fields",
    "check_compatible",
    "check_collection",
    "train_geometry",
    "COMPAT_FIELDS",
]


class TargetCacheMismatchError(GradientCacheError):
    """A target cache (or a target collection) that does not match the training cache it is used with.

    ``field`` is the differing field (e.g. ``"projection.seed"``, ``"theta_fingerprint"``)."""

    def __init__(self, message: str, field: str) -> None:
        super().__init__(message)
        self.field = field


#: the fields compared, in the order they are checked
COMPAT_FIELDS = (
    "theta_fingerprint",
    "projection",
    "precondition",
    "output_fn",
    "model_kind",
    "prob_clamp",
    "max_length",
)

_FIX = {
    "theta_fingerprint": "collect the target from the same θ* as the training cache (load_meta_init of the "
    "meta-init directory the training cache was collected from, unchanged since)",
    "projection": "collect with the training cache's projection settings (CollectConfig proj_type, proj_dim, "
    "seed, sparse_nnz), or pass config=None to GradientCollector(..., train_cache=...) to take them from the "
    "training cache's manifest; a different number of trainable parameters means another model or adapter",
    "precondition": "collect with the training cache's geometry: pass no optimizer / preconditioner (the "
    "training cache's stored preconditioner is then reused) or the same optimizer state it was collected with",
    "output_fn": "set CollectConfig.output_fn to the training cache's value (or pass config=None)",
    "model_kind": "use a model of the same kind (causal LM, seq2seq or classifier) as the training cache's",
    "prob_clamp": "set CollectConfig.prob_clamp to the training cache's value (or pass config=None)",
    "max_length": "set CollectConfig.max_length to the training cache's value (or pass config=None)",
}


def compatibility_fields(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """The fields of a cache manifest that two caches must share (None where the manifest lacks one)."""
    precondition = manifest.get("precondition") or {"kind": "none"}
    collect_config = manifest.get("collect_config") or {}
    return {
        "theta_fingerprint": manifest.get("theta_fingerprint"),
        "projection": manifest.get("projection"),
        "precondition": {k: v for k, v in precondition.items() if k in ("kind", "sha256")},
        "output_fn": manifest.get("output_fn"),
        "model_kind": manifest.get("model_kind"),
        "prob_clamp": manifest.get("prob_clamp"),
        "max_length": collect_config.get("max_length"),
    }


def _differences(
    train: Mapping[str, Any], target: Mapping[str, Any], strict: bool
) -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = []
    for name in COMPAT_FIELDS:
        a, b = train.get(name), target.get(name)
        if a is None or b is None:
            if strict and a != b:
                out.append((name, a, b))
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            for sub in sorted(set(a) | set(b)):
                if a.get(sub) != b.get(sub) and not (
                    not strict and (a.get(sub) is None or b.get(sub) is None)
                ):
                    out.append((f"{name}.{sub}", a.get(sub), b.get(sub)))
        elif a != b:
            out.append((name, a, b))
    return out


def check_compatible(
    train: Mapping[str, Any],
    target: Mapping[str, Any],
    *,
    strict: bool = False,
    what: str = "the target cache",
) -> None:
    """Raise :class:`TargetCacheMismatchError` for the first field of :data:`COMPAT_FIELDS` that differs.

    Args:
        train, target: :func:`compatibility_fields` of the training cache and of the target (a cache's manifest or
            the settings of a collection about to run).
        strict: a field recorded on one side only counts as a difference (used before a target-only collection,
            where the training cache must say what it was collected with); otherwise it is skipped (caches built by
            hand carry no collection settings).
        what: how the message names the target side.
    """
    diffs = _differences(train, target, strict)
    if not diffs:
        return
    name, a, b = diffs[0]
    fix = _FIX[name.split(".")[0]]
    more = f" (also differ: {', '.join(d[0] for d in diffs[1:])})" if len(diffs) > 1 else ""
    if a is None:
        detail = "the training cache does not record it (it was not written by GradientCollector)"
        fix = "re-collect the training cache with GradientCollector so that its manifest records it"
    else:
        detail = f"training cache {a!r}, {what} {b!r}"
    raise TargetCacheMismatchError(
        f"{what[0].upper() + what[1:]} does not match the training cache in {name!r}: {detail}{more}; its "
        f"features are not comparable. Fix: {fix}.",
        field=name,
    )


def train_geometry(
    train: GradientCache,
    config: Any,
    model: Any,
    named: list[tuple[str, torch.Tensor]],
    optimizer: Any,
    preconditioner: Mapping[str, torch.Tensor] | None,
    dist: Any,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The geometry of a target collected against ``train``: the training cache's stored preconditioner (and its
    manifest entry), unless an optimizer / preconditioner is given (then that one, which :func:`check_collection`
    compares with the training cache's)."""
    from .precondition import resolve_preconditioner

    if optimizer is None and preconditioner is None:
        info = dict(train.manifest.get("precondition") or {"kind": "none"})
        if train.preconditioner is None:
            return None, {"kind": "none", **{k: v for k, v in info.items() if k.startswith("adam_scalars")}}
        info.update(train.precondition_info())
        info.pop("file", None)
        return dict(train.preconditioner), info
    return resolve_preconditioner(config.precondition, model, named, optimizer, preconditioner, dist)


def check_collection(
    train: GradientCache,
    projection: Mapping[str, Any],
    spec: Any,
    theta_fingerprint: str,
    precondition: Mapping[str, Any],
    config: Any,
) -> None:
    """Refuse a target collection whose θ*, projection, geometry or output function differ from the training
    cache's (called before any gradient is computed; ``strict``: the training cache must record each field)."""
    now = compatibility_fields(
        {
            "theta_fingerprint": theta_fingerprint,
            "projection": dict(projection),
            "precondition": dict(precondition),
            "output_fn": spec.name,
            "model_kind": spec.kind,
            "prob_clamp": config.prob_clamp,
            "collect_config": {"max_length": config.max_length},
        }
    )
    check_compatible(compatibility_fields(train.manifest), now, strict=True, what="this target collection")
