"""Step 4b (optional), verification: let a few real fine-tunes scored on ``dev`` decide how much of the ranking to keep.

The first-order estimate ranks sources by their effect on the target *loss* at θ*. Where that loss is not what the
target is scored by (a generation task scored by exact match whose fine-tune overfits, docs/benchmarks.md) the
estimate can rank the sources' losses right and still keep a source that lowers the loss and the metric alike. A
check against reality that stays far cheaper than any search: fine-tune target only and the prefixes of the
selection's ranking (best source first, then the two best, ... up to the selection's own size), score each on the
target's ``dev`` split with the metric the user cares about, and keep the best. That is ``k + 1`` fine-tunes for a
selection of ``k`` sources (greedy forward selection with real fine-tunes needs about ``n²/2``).

The fine-tunes are the user's: :func:`verify_selection` takes a callable ``evaluate(sources) -> float`` that trains
on the target plus ``sources`` (e.g. ``selection.apply``-style filtering of the training set and a ``Trainer`` run)
and returns the dev metric. It must not look at ``test``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence

from .selection import SourceSelection

__all__ = ["verify_selection"]


def verify_selection(
    selection: SourceSelection,
    evaluate: Callable[[list[str]], float],
    *,
    max_sources: int | None = None,
    higher_is_better: bool = True,
    min_gain: float = 0.0,
) -> SourceSelection:
    """The prefix of ``selection``'s ranking (or target only) whose real fine-tune scores best on ``dev``.

    Args:
        selection: a source selection (its ``ranking`` orders the candidates, best first).
        evaluate: ``evaluate(sources)`` fine-tunes on the target's training split plus ``sources`` and returns the
            dev metric (called once for ``[]``, target only, and once per prefix).
        max_sources: the longest prefix tried (default: the selection's own size, at least 1, so that a selection
            that kept nothing is still checked against its best-ranked source).
        higher_is_better: direction of ``evaluate``'s value (True for accuracy or exact match, False for a loss).
        min_gain: a prefix replaces a shorter one only when it is better by more than this (ties keep fewer
            sources).

    Returns:
        A new selection (``method`` + ``"+verified"``) that keeps the chosen prefix, with filter weights (1 kept,
        0 dropped) and ``info["verification"]`` listing every evaluated subset and its value.
    """
    if not callable(evaluate):
        raise TypeError("evaluate must be a callable evaluate(sources: list[str]) -> float (the dev metric).")
    if not (isinstance(min_gain, (int, float)) and math.isfinite(min_gain) and min_gain >= 0):
        raise ValueError(f"min_gain must be a finite number >= 0, got {min_gain!r}.")
    longest = max(1, len(selection.selected)) if max_sources is None else int(max_sources)
    if longest < 0:
        raise ValueError(f"max_sources must be >= 0, got {max_sources!r}.")
    ranked = [s for s in selection.ranking if not math.isnan(selection.scores[s])][:longest]
    sign = 1.0 if higher_is_better else -1.0

    def value_of(sources: Sequence[str]) -> float:
        value = evaluate(list(sources))
        if not isinstance(value, (int, float)) or not math.isfinite(float(value)):
            raise ValueError(
                f"evaluate({list(sources)}) returned {value!r}; it must return the finite dev metric of the "
                "fine-tune on the target plus those sources."
            )
        return float(value)

    evaluated = [{"sources": [], "value": value_of([])}]
    best, best_value = 0, evaluated[0]["value"]
    for size in range(1, len(ranked) + 1):
        value = value_of(ranked[:size])
        evaluated.append({"sources": ranked[:size], "value": value})
        if sign * (value - best_value) > min_gain:
            best, best_value = size, value
    chosen = ranked[:best]
    info = {
        **selection.info,
        "verification": {
            "evaluated": evaluated,
            "chosen_size": best,
            "higher_is_better": higher_is_better,
            "min_gain": float(min_gain),
            "unverified_selected": list(selection.selected),
        },
    }
    return dataclasses.replace(
        selection,
        method=f"{selection.method}+verified",
        selected=chosen,
        weights={s: (1.0 if s in chosen else 0.0) for s in selection.sources},
        info=info,
    )
