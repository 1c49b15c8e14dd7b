"""The result of a selection: :class:`SourceSelection` (scores, kept sources, sampling weights), its JSON file
format, and the score-to-weight rule every selector uses.

A :class:`SourceSelection` prints as a table, saves to JSON tied to its cache, filters a tagged dataset to the
kept sources and gives per-example sampling weights.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..data.sources import SOURCE_COLUMN
from ..io_utils import atomic_write_json, read_json
from ..schema import SchemaError, anything, boolean, dict_of, integer, list_of, number, obj, optional, string

__all__ = [
    "SourceSelection",
    "SelectionFileError",
    "scores_to_weights",
    "cache_manifest",
    "SELECTION_FORMAT_VERSION",
]

SELECTION_FORMAT = "hf_subset_select.source_selection"
SELECTION_FORMAT_VERSION = 1


class SelectionFileError(ValueError):
    """A selection JSON that is missing, malformed or inconsistent (:meth:`SourceSelection.load`)."""


class _SelectionNotFound(SelectionFileError, FileNotFoundError):
    """No file at the path (also a ``FileNotFoundError``)."""


_SCORE = optional(number())  # NaN scores are written as null
_SCHEMA = obj(
    {
        "method": string(nonempty=True),
        "sources": list_of(string(nonempty=True), unique=True),
        "scores": dict_of(_SCORE),
        "selected": list_of(string(nonempty=True), unique=True),
        "weights": dict_of(number(0.0)),
    },
    {
        "target_source": optional(string(nonempty=True)),
        "lower_is_better": boolean(),
        "info": obj({}, {"effects": dict_of(_SCORE)}),
        "manifest": obj(
            {},
            {
                "cache_fingerprint": optional(string(nonempty=True)),
                "cache_sources": list_of(string()),
                "cache_dim": integer(),
                "target_source": optional(string()),
                "select_config": dict_of(anything()),
                "estimator_config": dict_of(anything()),
            },
        ),
    },
)


def scores_to_weights(
    scores: dict[str, float],
    selected: Sequence[str],
    *,
    lower_is_better: bool = True,
    temperature: float = 1.0,
) -> dict[str, float]:
    """Per-source sampling weights: a softmax of standardized scores over the selected sources.

    Scores are standardized over all candidates (z = (score - mean) / std, sign flipped when lower is
    better), weights ∝ exp(z / temperature) over the selected sources and rescaled to average 1 there;
    unselected sources get 0. With equal scores every selected source gets 1.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    names = list(scores)
    values = torch.tensor([scores[n] for n in names], dtype=torch.float64)
    finite = torch.isfinite(values)
    weights = {n: 0.0 for n in names}
    chosen = [n for n in names if n in set(selected)]
    if not chosen:
        return weights
    if int(finite.sum()) < 2 or float(values[finite].std()) == 0.0:
        return {n: (1.0 if n in chosen else 0.0) for n in names}
    mean, std = values[finite].mean(), values[finite].std()
    z = (values - mean) / std
    if lower_is_better:
        z = -z
    z = torch.nan_to_num(z, nan=0.0)
    idx = torch.tensor([names.index(n) for n in chosen])
    w = torch.softmax(z[idx] / temperature, dim=0) * len(chosen)
    for n, v in zip(chosen, w.tolist()):
        weights[n] = float(v)
    return weights


@dataclass
class SourceSelection:
    """Which sources to fine-tune on, with scores and sampling weights.

    Attributes:
        method: how the scores were made ("random_ensemble", "linear", "forward", or a baseline).
        sources: the candidate sources, in cache order.
        scores: one score per candidate (an estimated target loss unless ``lower_is_better`` is False).
        selected: the kept sources (the target's own training source is always kept on top of these).
        weights: per-source sampling weights (selected average 1, unselected 0).
        target_source: the target's own training source (kept by :meth:`apply`, weight 1), if any.
        lower_is_better: direction of ``scores``.
        info: method details (λ, number of subsets, effects, greedy path, ...).
        manifest: ties the selection to its cache (fingerprint, sources, dim).
    """

    method: str
    sources: list[str]
    scores: dict[str, float]
    selected: list[str]
    weights: dict[str, float]
    target_source: str | None = None
    lower_is_better: bool = True
    info: dict[str, Any] = field(default_factory=dict)
    manifest: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ views
    @property
    def dropped(self) -> list[str]:
        return [s for s in self.sources if s not in self.selected]

    @property
    def ranking(self) -> list[str]:
        """Candidates from best to worst score."""
        sign = 1.0 if self.lower_is_better else -1.0
        return sorted(
            self.sources,
            key=lambda s: (
                math.isnan(self.scores[s]),
                sign * self.scores[s] if not math.isnan(self.scores[s]) else 0.0,
            ),
        )

    def keep_sources(self) -> list[str]:
        """Sources that :meth:`apply` keeps: the selected ones plus the target's own source."""
        keep = list(self.selected)
        if self.target_source is not None and self.target_source not in keep:
            keep.append(self.target_source)
        return keep

    def __repr__(self) -> str:
        effects = self.info.get("effects", {})
        head = (
            f"SourceSelection(method={self.method!r}, kept {len(self.selected)}/{len(self.sources)}, "
            f"target_source={self.target_source!r}, scores: {'lower' if self.lower_is_better else 'higher'} is better)"
        )
        width = max([len("source"), *(len(s) for s in self.sources)])
        lines = [head, f"{'source':<{width}}  {'score':>10}  {'effect':>10}  {'kept':>4}  {'weight':>7}"]
        for s in self.ranking:
            eff = effects.get(s)
            eff_txt = f"{eff:>10.4g}" if eff is not None else f"{'-':>10}"
            lines.append(
                f"{s:<{width}}  {self.scores[s]:>10.4g}  {eff_txt}  {('yes' if s in self.selected else 'no'):>4}  "
                f"{self.weights.get(s, 0.0):>7.3f}"
            )
        if self.target_source is not None and self.target_source not in self.sources:
            lines.append(
                f"{self.target_source:<{width}}  {'(target)':>10}  {'-':>10}  {'yes':>4}  {1.0:>7.3f}"
            )
        return "\n".join(lines)

    __str__ = __repr__

    # ------------------------------------------------------------------ disk
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": SELECTION_FORMAT,
            "format_version": SELECTION_FORMAT_VERSION,
            "package_version": __version__,
            "method": self.method,
            "sources": list(self.sources),
            "scores": {k: _json_float(v) for k, v in self.scores.items()},
            "selected": list(self.selected),
            "weights": dict(self.weights),
            "target_source": self.target_source,
            "lower_is_better": self.lower_is_better,
            "info": _jsonable(self.info),
            "manifest": _jsonable(self.manifest),
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write the selection as JSON (atomically)."""
        atomic_write_json(os.fspath(path), self.to_dict())

    @classmethod
    def load(cls, path: str | os.PathLike, cache: Any | None = None) -> SourceSelection:
        """Read a selection written by :meth:`save`; with ``cache``, check that it was made from that cache.

        Raises:
            SelectionFileError: the file is missing (then also a ``FileNotFoundError``), not JSON, not a selection,
                of another format version, or a key has the wrong type or disagrees with the others (the message
                names it).
            ValueError: with ``cache``, the selection was not computed from that cache (:meth:`check_cache`).
        """
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise _SelectionNotFound(
                f"No source selection at {path!r}; create one with select_sources(...).save(path)."
            )
        try:
            data = read_json(path)
        except ValueError as exc:
            raise SelectionFileError(
                f"{path!r} is not valid JSON ({exc}); re-create it with SourceSelection.save()."
            ) from exc
        if not isinstance(data, dict) or data.get("format") != SELECTION_FORMAT:
            raise SelectionFileError(f"{path!r} is not a hf_subset_select source selection.")
        version = data.get("format_version")
        if version != SELECTION_FORMAT_VERSION or isinstance(version, bool):
            raise SelectionFileError(
                f"{path!r} has selection format version {version!r}, this release reads "
                f"{SELECTION_FORMAT_VERSION}; re-run select_sources with this version."
            )
        try:
            _SCHEMA(data, "")
        except SchemaError as exc:
            raise SelectionFileError(
                f"{path!r} is malformed: {exc}. The file was edited or damaged; re-run select_sources and save it."
            ) from None
        sel = cls(
            method=data["method"],
            sources=list(data["sources"]),
            scores={k: (math.nan if v is None else float(v)) for k, v in data["scores"].items()},
            selected=list(data["selected"]),
            weights={k: float(v) for k, v in data["weights"].items()},
            target_source=data.get("target_source"),
            lower_is_better=data.get("lower_is_better", True),
            info=data.get("info", {}),
            manifest=data.get("manifest", {}),
        )
        try:
            sel._check_consistent()
        except ValueError as exc:
            raise SelectionFileError(f"{path!r}: {exc}") from None
        if cache is not None:
            sel.check_cache(cache)
        return sel

    def _check_consistent(self) -> None:
        unknown = [s for s in self.selected if s not in self.sources]
        if unknown or set(self.scores) != set(self.sources) or not set(self.weights) <= set(self.sources):
            raise ValueError(
                "The selection's sources, scores, weights and selected lists disagree; the file was edited or is "
                "corrupt. Re-run select_sources and save it."
            )

    def check_cache(self, cache: Any) -> None:
        """Raise ValueError if this selection was not computed from ``cache`` (fingerprint and sources)."""
        cache = getattr(cache, "cache", cache)  # accept an estimator
        want = self.manifest.get("cache_fingerprint")
        have = cache.fingerprint()
        if want is not None and want != have:
            raise ValueError(
                f"This selection was computed from cache {want}, not from this cache ({have}). Re-run "
                "select_sources on this cache, or load the selection without cache= to skip the check."
            )
        missing = [s for s in self.sources if s not in cache.sources]
        if missing:
            raise ValueError(
                f"The cache lacks the selection's sources {missing}; it is not the cache this selection came from."
            )

    # ------------------------------------------------------------------ datasets
    def _dataset_sources(self, dataset: Any) -> list[str]:
        columns = getattr(dataset, "column_names", None)
        if columns is None or SOURCE_COLUMN not in columns:
            raise ValueError(
                f"The dataset has no {SOURCE_COLUMN!r} column; tag it with hf_subset_select.tag_sources(...) "
                "(and keep the column through preprocessing) before applying a selection."
            )
        present = list(dict.fromkeys(dataset[SOURCE_COLUMN]))
        known = set(self.sources) | ({self.target_source} if self.target_source else set())
        unknown = [s for s in present if s not in known]
        if unknown:
            raise ValueError(
                f"The dataset has source(s) {unknown} that this selection does not know (it scored "
                f"{self.sources}, target {self.target_source!r}). Apply it to the training mix it was made for, "
                "or re-run the selection on a cache that includes those sources."
            )
        return present

    def apply(self, dataset: Any) -> Any:
        """Filter a tagged ``datasets.Dataset`` to the selected sources plus the target's own source."""
        self._dataset_sources(dataset)
        keep = set(self.keep_sources())
        return dataset.filter(lambda batch: [s in keep for s in batch[SOURCE_COLUMN]], batched=True)

    def source_weight(self, source: str) -> float:
        if self.target_source is not None and source == self.target_source:
            return 1.0
        try:
            return float(self.weights[source])
        except KeyError:
            raise ValueError(f"Source {source!r} is not in this selection ({self.sources}).") from None

    def sampling_weights(self, dataset: Any) -> list[float]:
        """One weight per example: its source's weight (0 for dropped sources, 1 for the target's own).

        Use them with ``torch.utils.data.WeightedRandomSampler`` or as per-example loss weights; they are
        not divided by source sizes, so among kept sources the natural proportions are tilted by the scores.
        """
        self._dataset_sources(dataset)
        table = {s: self.source_weight(s) for s in set(self.sources) | ({self.target_source} - {None})}
        return [table[s] for s in dataset[SOURCE_COLUMN]]


def _json_float(v: float) -> float | None:
    return None if (isinstance(v, float) and not math.isfinite(v)) else float(v)


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, torch.Tensor):
        return _jsonable(obj.tolist())
    if isinstance(obj, float):
        return _json_float(obj)
    if isinstance(obj, (int, str, bool)) or obj is None:
        return obj
    if hasattr(obj, "item"):
        return _jsonable(obj.item())
    return str(obj)


def cache_manifest(cache: Any) -> dict[str, Any]:
    """The fields that tie a selection to its cache."""
    return {
        "cache_fingerprint": cache.fingerprint(),
        "cache_sources": list(cache.sources),
        "cache_dim": int(cache.dim),
        "target_source": cache.target_source,
    }
