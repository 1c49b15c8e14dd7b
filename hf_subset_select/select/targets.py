"""Selection for several targets at once: a sources × targets table of scores and one selection per target.

:func:`select_for_targets` runs a selector for every target of a
:class:`~hf_subset_select.estimate.targets.MultiTargetEstimator` (one training cache, many target caches); the sampled
subsets are the same for every target (same seed), so each subset is solved once for all targets. The result,
:class:`MultiTargetSelection`, prints the table, saves one JSON file (each target's selection in the format of
:class:`~hf_subset_select.SourceSelection`) and gives each target's selection.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any

from .. import __version__
from ..config import SelectConfig
from ..io_utils import atomic_write_json, json_sha256, read_json
from .registry import select_sources
from .selection import SelectionFileError, SourceSelection

__all__ = ["MultiTargetSelection", "select_for_targets"]

MULTI_FORMAT = "hf_subset_select.multi_target_selection"


@dataclass
class MultiTargetSelection:
    """One :class:`~hf_subset_select.SourceSelection` per target, over the same candidate sources.

    Attributes:
        selections: ``{target name: selection}``, in target order.
    """

    selections: dict[str, SourceSelection]

    @property
    def targets(self) -> list[str]:
        return list(self.selections)

    @property
    def sources(self) -> list[str]:
        return list(next(iter(self.selections.values())).sources)

    def scores(self) -> dict[str, dict[str, float]]:
        """The sources × targets table: ``{source: {target: score}}``."""
        return {s: {t: sel.scores[s] for t, sel in self.selections.items()} for s in self.sources}

    def intervals(self) -> dict[str, dict[str, list[float]]] | None:
        """``{source: {target: [lower, upper]}}`` of the scores, when the selections have intervals."""
        first = next(iter(self.selections.values()))
        if "intervals" not in first.info:
            return None
        return {
            s: {t: sel.info["intervals"]["scores"][s] for t, sel in self.selections.items()}
            for s in self.sources
        }

    def selected(self) -> dict[str, list[str]]:
        """``{target: kept sources}``."""
        return {t: list(sel.selected) for t, sel in self.selections.items()}

    def __getitem__(self, target: str) -> SourceSelection:
        try:
            return self.selections[target]
        except KeyError:
            raise KeyError(f"No selection for target {target!r}; the targets are {self.targets}.") from None

    def __repr__(self) -> str:
        method = next(iter(self.selections.values())).method
        width = max([len("source"), *(len(s) for s in self.sources)])
        cols = [max(12, len(t) + 2) for t in self.targets]
        head = f"{'source':<{width}}" + "".join(f"  {t:>{w}}" for t, w in zip(self.targets, cols))
        lines = [f"MultiTargetSelection(method={method!r}, targets={len(self.targets)}; * = kept)", head]
        for s in self.sources:
            cells = []
            for t, w in zip(self.targets, cols):
                sel = self.selections[t]
                value = sel.scores[s]
                text = "nan" if math.isnan(value) else f"{value:.4g}"
                cells.append(f"  {text + ('*' if s in sel.selected else ' '):>{w}}")
            lines.append(f"{s:<{width}}" + "".join(cells))
        return "\n".join(lines)

    __str__ = __repr__

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": MULTI_FORMAT,
            "format_version": 1,
            "package_version": __version__,
            "targets": self.targets,
            "sources": self.sources,
            "scores": {
                s: {t: (None if math.isnan(v) else v) for t, v in row.items()}
                for s, row in self.scores().items()
            },
            "selected": self.selected(),
            "selections": {t: sel.to_dict() for t, sel in self.selections.items()},
        }

    def save(self, path: str | os.PathLike) -> None:
        """Write every target's selection and the table as one JSON file (atomically, with ``content_sha256``)."""
        data = self.to_dict()
        data["content_sha256"] = json_sha256(data)
        atomic_write_json(os.fspath(path), data)

    def save_each(self, directory: str | os.PathLike) -> dict[str, str]:
        """Write ``<directory>/<target>.json`` per target (each a :class:`SourceSelection` file); returns the paths."""
        os.makedirs(directory, exist_ok=True)
        paths = {}
        for t, sel in self.selections.items():
            paths[t] = os.path.join(os.fspath(directory), f"{t}.json")
            sel.save(paths[t])
        return paths

    @classmethod
    def load(cls, path: str | os.PathLike) -> MultiTargetSelection:
        """Read a file written by :meth:`save` (each target's selection checked as by ``SourceSelection.load``)."""
        import tempfile

        path = os.fspath(path)
        if not os.path.isfile(path):
            raise SelectionFileError(
                f"No multi-target selection at {path!r}; create one with select_for_targets()."
            )
        try:
            data = read_json(path)
        except ValueError as exc:
            raise SelectionFileError(f"{path!r} is not valid JSON ({exc}).") from exc
        if not isinstance(data, dict) or data.get("format") != MULTI_FORMAT:
            raise SelectionFileError(f"{path!r} is not a hf_subset_select multi-target selection.")
        recorded = data.get("content_sha256")
        if recorded is not None and recorded != json_sha256(data, without="content_sha256"):
            raise SelectionFileError(
                f"{path!r} was edited or damaged after it was saved; re-run select_for_targets and save it."
            )
        selections = {}
        with tempfile.TemporaryDirectory() as tmp:
            for t, entry in (data.get("selections") or {}).items():
                one = os.path.join(tmp, "one.json")
                atomic_write_json(one, entry)
                selections[t] = SourceSelection.load(one)
        if not selections:
            raise SelectionFileError(f"{path!r} holds no selection.")
        return cls(selections)


def select_for_targets(
    multi: Any, method: str | None = None, config: SelectConfig | None = None
) -> MultiTargetSelection:
    """Score the candidate sources for every target of ``multi`` and keep the helpful ones per target.

    Args:
        multi: a :class:`~hf_subset_select.estimate.targets.MultiTargetEstimator`.
        method, config: as :func:`~hf_subset_select.select_sources` (the same for every target; the sampled
            subsets are the same too, so each is solved once for all targets).
    """
    if not hasattr(multi, "for_target"):
        raise TypeError(
            f"select_for_targets needs a MultiTargetEstimator, got {type(multi).__name__}; for one target use "
            "select_sources(FirstOrderEstimator(cache, target=...))."
        )
    return MultiTargetSelection(
        {name: select_sources(multi.for_target(name), method=method, config=config) for name in multi.names}
    )
