"""The result of a selection: :class:`SourceSelection` (scores, kept sources, sampling weights), its JSON file
format, and the score-to-weight rule every selector uses.

A :class:`SourceSelection` prints as a table, saves to JSON tied to its cache, filters a tagged dataset to the
kept sources and gives per-example sampling weights. A per-example selection
(:func:`~hf_subset_select.select.examples.select_examples`) is the same type with an :class:`ExampleTable`
(scores and weights keyed by ``example_id``) that decides for the rows it names.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import __version__
from ..data.sources import EXAMPLE_ID_COLUMN, SOURCE_COLUMN
from ..io_utils import atomic_write_json, json_sha256, read_json
from ..schema import SchemaError, anything, boolean, dict_of, integer, list_of, number, obj, optional, string

__all__ = [
    "SourceSelection",
    "SelectionFileError",
    "SelectionMismatchError",
    "ExampleTable",
    "scores_to_weights",
    "cache_manifest",
    "SELECTION_FORMAT_VERSION",
]

SELECTION_FORMAT = "hf_subset_select.source_selection"
SELECTION_FORMAT_VERSION = 1  # a source-level selection
EXAMPLE_FORMAT_VERSION = 2  # with a per-example table: older releases must not read it as source-level


class SelectionFileError(ValueError):
    """A selection JSON that is missing, malformed or inconsistent (:meth:`SourceSelection.load`)."""


class SelectionMismatchError(ValueError):
    """A selection used with a cache (or estimator) it was not computed from."""


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
        "examples": obj(
            {
                "example_ids": list_of(integer(), unique=True),
                "sources": list_of(string(nonempty=True)),
                "scores": list_of(_SCORE),
                "weights": list_of(number(0.0)),
            }
        ),
        "manifest": obj(
            {},
            {
                "cache_fingerprint": optional(string(nonempty=True)),
                "cache_sources": list_of(string()),
                "cache_dim": integer(),
                "target_source": optional(string()),
                "select_config": dict_of(anything()),
                "estimator_config": dict_of(anything()),
                "target_cache_fingerprint": string(nonempty=True),
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
class ExampleTable:
    """Per-example scores and weights of a selection, keyed by ``example_id`` (parallel lists, one entry per row).

    Attributes:
        example_ids: the ``example_id`` of every scored training row (unique).
        sources: each row's source.
        scores: each row's score (direction: the selection's ``lower_is_better``).
        weights: each row's weight: 0 drops it, kept rows average 1.
    """

    example_ids: list[int]
    sources: list[str]
    scores: list[float]
    weights: list[float]

    def __post_init__(self) -> None:
        n = len(self.example_ids)
        if not (len(self.sources) == len(self.scores) == len(self.weights) == n):
            raise ValueError(
                f"The example table's lists have different lengths (ids {n}, sources {len(self.sources)}, scores "
                f"{len(self.scores)}, weights {len(self.weights)}); the file was edited or is corrupt. Re-run "
                "select_examples."
            )
        if len(set(self.example_ids)) != n:
            raise ValueError("The example table repeats an example_id; re-run select_examples on one cache.")
        if any(not math.isfinite(w) or w < 0 for w in self.weights):
            raise ValueError("Example weights must be finite and >= 0; re-run select_examples.")
        self._map = dict(zip(self.example_ids, self.weights))

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ExampleTable):
            return NotImplemented
        return self.to_dict() == other.to_dict()

    @property
    def kept_ids(self) -> list[int]:
        """The ids of the rows with a positive weight."""
        return [i for i, w in zip(self.example_ids, self.weights) if w > 0]

    def weight_of(self, example_id: int) -> float | None:
        """The row's weight, or None when the table does not name it."""
        return self._map.get(int(example_id))

    def to_dict(self) -> dict[str, Any]:
        """The JSON form (parallel lists)."""
        return {
            "example_ids": [int(i) for i in self.example_ids],
            "sources": list(self.sources),
            "scores": [_json_float(float(v)) for v in self.scores],
            "weights": [float(w) for w in self.weights],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ExampleTable:
        """Read :meth:`to_dict`'s form."""
        return cls(
            example_ids=[int(i) for i in data["example_ids"]],
            sources=[str(s) for s in data["sources"]],
            scores=[math.nan if v is None else float(v) for v in data["scores"]],
            weights=[float(w) for w in data["weights"]],
        )


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
        examples: per-example scores and weights (a per-example selection) or None. Rows it names get their own
            weight; rows it does not name (the target's own source, rows the cache did not hold) their source's.
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
    examples: ExampleTable | None = None

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
        intervals = (self.info.get("intervals") or {}).get("effects") or {}
        ci_head = (
            f"  {'effect ' + format(100 * float(self.info['intervals']['level']), 'g') + '% CI':>22}"
            if intervals
            else ""
        )
        lines = [
            head,
            f"{'source':<{width}}  {'score':>10}  {'effect':>10}{ci_head}  {'kept':>4}  {'weight':>7}",
        ]
        for s in self.ranking:
            eff = effects.get(s)
            eff_txt = f"{eff:>10.4g}" if eff is not None else f"{'-':>10}"
            ci = intervals.get(s)
            ci_txt = (f"  {f'[{ci[0]:.4g}, {ci[1]:.4g}]' if ci else '-':>22}") if intervals else ""
            lines.append(
                f"{s:<{width}}  {self.scores[s]:>10.4g}  {eff_txt}{ci_txt}  {('yes' if s in self.selected else 'no'):>4}  "
                f"{self.weights.get(s, 0.0):>7.3f}"
            )
        if self.target_source is not None and self.target_source not in self.sources:
            lines.append(
                f"{self.target_source:<{width}}  {'(target)':>10}  {'-':>10}  {'yes':>4}  {1.0:>7.3f}"
            )
        if self.examples is not None:
            lines.append(
                f"per example: kept {len(self.examples.kept_ids)}/{len(self.examples.example_ids)} scored rows "
                "(a source's score is its rows' mean; 'kept' = keeps some rows)"
            )
        return "\n".join(lines)

    __str__ = __repr__

    # ------------------------------------------------------------------ disk
    def to_dict(self) -> dict[str, Any]:
        out = {
            "format": SELECTION_FORMAT,
            "format_version": SELECTION_FORMAT_VERSION if self.examples is None else EXAMPLE_FORMAT_VERSION,
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
        if self.examples is not None:
            out["examples"] = self.examples.to_dict()
        return out

    def save(self, path: str | os.PathLike) -> None:
        """Write the selection as JSON (atomically), with the SHA-256 of its content (``content_sha256``)."""
        data = self.to_dict()
        data["content_sha256"] = json_sha256(data)
        atomic_write_json(os.fspath(path), data)

    @classmethod
    def load(cls, path: str | os.PathLike, cache: Any | None = None) -> SourceSelection:
        """Read a selection written by :meth:`save`; with ``cache``, check that it was made from that cache.

        Raises:
            SelectionFileError: the file is missing (then also a ``FileNotFoundError``), not JSON, not a selection,
                of another format version, or a key has the wrong type or disagrees with the others (the message
                names it).
            SelectionMismatchError: with ``cache``, the selection was not computed from that cache
                (:meth:`check_cache`).
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
        if isinstance(version, bool) or version not in (SELECTION_FORMAT_VERSION, EXAMPLE_FORMAT_VERSION):
            raise SelectionFileError(
                f"{path!r} has selection format version {version!r}, this release reads "
                f"{SELECTION_FORMAT_VERSION} and {EXAMPLE_FORMAT_VERSION}; re-run the selection with this version."
            )
        examples = data.get("examples")
        if (examples is not None) != (version == EXAMPLE_FORMAT_VERSION):
            raise SelectionFileError(
                f"{path!r}: format version {version} does not match whether it has an example table; "
                "the file was edited. Re-run the selection."
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
            examples=None,
        )
        try:
            if examples is not None:
                sel.examples = ExampleTable.from_dict(examples)
            sel._check_consistent()
        except ValueError as exc:
            raise SelectionFileError(f"{path!r}: {exc}") from None
        # after the key checks (which name the wrong key): an edit that left every key legal is caught here
        recorded = data.get("content_sha256")
        if recorded is not None and recorded != json_sha256(data, without="content_sha256"):
            raise SelectionFileError(
                f"{path!r} was edited or damaged after it was saved (its content no longer matches its "
                "content_sha256). Restore it from a copy, or re-run select_sources and save it."
            )
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
        """Raise :class:`SelectionMismatchError` if this selection was not computed from ``cache`` (fingerprint and sources)."""
        cache = getattr(cache, "cache", cache)  # accept an estimator
        want = self.manifest.get("cache_fingerprint")
        have = cache.fingerprint()
        if want is not None and want != have:
            raise SelectionMismatchError(
                f"This selection was computed from cache {want}, not from this cache ({have}). Re-run "
                "select_sources on this cache, or load the selection without cache= to skip the check."
            )
        missing = [s for s in self.sources if s not in cache.sources]
        if missing:
            raise SelectionMismatchError(
                f"The cache lacks the selection's sources {missing}; it is not the cache this selection came from."
            )
        if self.examples is not None:
            have_ids = set(cache.example_ids[cache.train_mask].tolist())
            absent = [i for i in self.examples.example_ids if i not in have_ids]
            if absent:
                raise SelectionMismatchError(
                    f"{len(absent)} example id(s) of the selection (e.g. {absent[:3]}) are not training rows of this "
                    "cache; it is not the cache this selection came from. Re-run select_examples on it."
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
        """Filter a tagged ``datasets.Dataset`` to the selected sources plus the target's own source; with an
        example table, to the rows with a positive :meth:`example_weight`."""
        self._dataset_sources(dataset)
        if self.examples is not None:
            self._require_ids(dataset)
            return dataset.filter(
                lambda batch: [
                    self.example_weight(s, i) > 0
                    for s, i in zip(batch[SOURCE_COLUMN], batch[EXAMPLE_ID_COLUMN])
                ],
                batched=True,
            )
        keep = set(self.keep_sources())
        return dataset.filter(lambda batch: [s in keep for s in batch[SOURCE_COLUMN]], batched=True)

    def _require_ids(self, dataset: Any) -> None:
        if EXAMPLE_ID_COLUMN not in (getattr(dataset, "column_names", None) or []):
            raise ValueError(
                f"This per-example selection needs the dataset's {EXAMPLE_ID_COLUMN!r} column (from "
                "hf_subset_select.tag_sources); keep it through preprocessing."
            )

    def example_weight(self, source: str, example_id: int | None = None) -> float:
        """A row's weight: the example table's when it names ``example_id`` (and the row is not from the
        target's own source), else its source's (:meth:`source_weight`)."""
        if self.examples is not None and example_id is not None and source != self.target_source:
            w = self.examples.weight_of(example_id)
            if w is not None:
                return w
        return self.source_weight(source)

    def source_weight(self, source: str) -> float:
        if self.target_source is not None and source == self.target_source:
            return 1.0
        try:
            return float(self.weights[source])
        except KeyError:
            raise ValueError(f"Source {source!r} is not in this selection ({self.sources}).") from None

    def sampling_weights(self, dataset: Any) -> list[float]:
        """One weight per example: its source's weight (0 for dropped sources, 1 for the target's own), or its own
        weight for the rows the example table names.

        Use them with ``torch.utils.data.WeightedRandomSampler`` or as per-example loss weights; they are
        not divided by source sizes, so among kept sources the natural proportions are tilted by the scores.
        """
        self._dataset_sources(dataset)
        if self.examples is not None:
            self._require_ids(dataset)
            return [
                self.example_weight(s, i) for s, i in zip(dataset[SOURCE_COLUMN], dataset[EXAMPLE_ID_COLUMN])
            ]
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
