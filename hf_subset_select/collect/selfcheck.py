"""The collection's self-check: cached outputs against the model's own forward pass on the trainer's rows.

For a few rows per split (first, middle and last in canonical order), the self-check

1. compares the tokens the cache was computed on with the rows as the trainer sees them (token ids, lengths,
   token types, supervised positions), and
2. runs the model's ordinary forward pass (its usual attention kernel, the trainer's data collator and padding)
   on those rows and compares the output function with the cached outputs.

A difference beyond float tolerance raises :class:`CollectionSelfCheckError`, saying what differs and how to fix
it. Turn it off with ``CollectConfig(self_check=False)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .cache import SPLIT_TARGET, SPLIT_TRAIN, GradientCache, GradientCacheError
from .engine import base_config
from .outputs import OutputSpec
from .rows import PlannedRow, RowPlan, RowSource

__all__ = ["CollectionSelfCheckError", "self_check", "token_difference"]

PER_SPLIT = 3
_FIX_TOKENS = (
    "The cached gradients are then not those of the rows the model is trained on. Run the collector as a callback of "
    "hf_subset_select.SubsetSelectTrainer / SubsetSelectSFTTrainer (it then takes the trainer's own rows), pass rows "
    "tokenized the way the trainer tokenizes them, or raise CollectConfig.max_length if the rows were cut"
)
_FIX_OUTPUTS = (
    "The per-example pass does not reproduce this model's forward pass (an input it does not pass, or a model "
    "that behaves differently under per-example attention masks). Try CollectConfig(grad_method='loop'); if the "
    "difference stays, pass output_fn= with a function for this model. CollectConfig(self_check=False) skips "
    "this check"
)


class CollectionSelfCheckError(GradientCacheError):
    """The cached rows or outputs differ from the model's own forward pass on the rows the trainer trains on."""


def _head(ids: Sequence[int], n: int = 6) -> str:
    return f"{list(ids[:n])}{' ...' if len(ids) > n else ''}"


def token_difference(cached: Mapping[str, Any], seen: Mapping[str, Any]) -> str | None:
    """What differs between the row the cache was computed on and the row as the trainer sees it (None: equal)."""
    a, b = list(cached["input_ids"]), list(seen["input_ids"])
    if a != b:
        if len(a) != len(b) and a == b[: len(a)]:
            return f"the cached row is cut at {len(a)} of its {len(b)} tokens"
        return f"token ids differ: cached {_head(a)} ({len(a)} tokens), trained {_head(b)} ({len(b)} tokens)"
    types_a = list(cached.get("token_type_ids") or [0] * len(a))
    types_b = list(seen.get("token_type_ids") or [0] * len(b))
    if types_a != types_b:
        return f"token types differ: cached {_head(types_a, 12)}, trained {_head(types_b, 12)}"
    if cached.get("labels") is not None and seen.get("labels") is not None:
        if list(cached["labels"]) != list(seen["labels"]):
            return "the supervised positions (labels) differ"
    if cached.get("label") != seen.get("label"):
        return f"the class label differs: cached {cached.get('label')}, trained {seen.get('label')}"
    return None


def _sample(plan: RowPlan, split: int) -> list[tuple[int, PlannedRow]]:
    """``(cache position, row)`` of the first, middle and last rows of ``split``."""
    rows = [(i, r) for i, r in enumerate(plan.rows) if r.split == split]
    picks = sorted({0, len(rows) // 2, len(rows) - 1}) if rows else []
    return [rows[i] for i in picks][:PER_SPLIT]


def _model_outputs(model: Any, spec: OutputSpec, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    device = next(p for p in model.parameters()).device
    batch = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
    with torch.no_grad():
        out = model(**batch)
        return spec(out, batch).detach().float().cpu()


def _tolerance(model: Any) -> float:
    dtype = next(p for p in model.parameters()).dtype
    return 1e-3 if dtype in (torch.float32, torch.float64) else 5e-2


def self_check(model: Any, spec: OutputSpec, cache: GradientCache, plan: RowPlan, source: RowSource) -> None:
    """Raise :class:`CollectionSelfCheckError` when a sampled row's tokens or output differ (see the module doc).

    ``cache`` rows are in ``plan`` order (the canonical order the collection writes).
    """
    was_training = model.training
    model.eval()
    try:
        for split in (SPLIT_TRAIN, SPLIT_TARGET):
            sample = _sample(plan, split)
            if not sample:
                continue
            _check_split(model, spec, cache, plan, source, split, sample)
    finally:
        model.train(was_training)


def _describe(plan: RowPlan, row: PlannedRow) -> str:
    split = "target" if row.split == SPLIT_TARGET else "training"
    return f"{split} row example_id={row.example_id} (source {plan.sources[row.source_index]!r})"


def _check_split(
    model: Any,
    spec: OutputSpec,
    cache: GradientCache,
    plan: RowPlan,
    source: RowSource,
    split: int,
    sample: list[tuple[int, PlannedRow]],
) -> None:
    rows = [r for _, r in sample]
    if spec.kind == "classification" and getattr(base_config(model), "pad_token_id", None) is None:
        views = [source.as_trained(split, [r.row]) for r in rows]  # no pad id: one row per batch, no padding
        seen = [v[0][0] for v in views]
        outputs = torch.cat([_model_outputs(model, spec, v[1]) for v in views])
    else:
        seen, batch = source.as_trained(split, [r.row for r in rows])
        outputs = _model_outputs(model, spec, batch)
    for row, trained in zip(rows, seen):
        diff = token_difference(source.encode(split, row.row), trained)
        if diff is not None:
            raise CollectionSelfCheckError(
                f"Self-check: {_describe(plan, row)} is not the row the trainer trains on ({source.reference}): "
                f"{diff}. {_FIX_TOKENS}."
            )
    cached = cache.outputs[[i for i, _ in sample]]
    gap = (outputs - cached).abs()
    limit = _tolerance(model) * (1.0 + cached.abs())
    if bool((gap > limit).any()):
        worst = int(torch.argmax(gap / limit))
        raise CollectionSelfCheckError(
            f"Self-check: the cached output of {_describe(plan, rows[worst])} is {float(cached[worst]):.5g}, the "
            f"model's own forward pass on {source.reference} gives {float(outputs[worst]):.5g} (differs by "
            f"{float(gap[worst]):.3g}, tolerance {float(limit[worst]):.3g}). {_FIX_OUTPUTS}."
        )
