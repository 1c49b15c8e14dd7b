"""Subcommands that compare and check the estimate: ``baselines``, ``calibrate`` and ``forward-check``.

They take the same flags and ``--config FILE`` (YAML/JSON, e.g. ``recipes/configs/select.yaml``) as ``select``;
keys a command does not know are ignored, so one file serves every command.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .cli import (
    CacheArguments,
    CLIError,
    _estimator,
    _estimator_args,
    _load_cache,
    parse_dataclasses,
)
from .cli_targets import TargetArguments, load_theta

__all__ = ["cmd_baselines", "cmd_calibrate", "cmd_forward_check", "read_real_losses"]

BASELINES = ("gradient_similarity", "representation_similarity", "random")


@dataclass
class BaselineArguments:
    """Which baselines to run and where their selections go."""

    output_dir: str = field(
        default="baselines", metadata={"help": "One <method>.json selection per baseline."}
    )
    methods: list[str] = field(
        default_factory=lambda: list(BASELINES),
        metadata={"help": f"Baselines to run (default: all of {list(BASELINES)})."},
    )


def cmd_baselines(argv: Sequence[str]) -> None:
    """Run the baseline selectors (gradient / representation similarity, random) on the cache.

    Use it to see what the usual heuristics would keep, on the same cache and target as `select` (LESS-like
    gradient similarity, similarity of mean hidden states, seeded random draws; higher scores are better). Takes
    --top_k / --threshold / --seed like `select`; representation similarity is skipped when the cache has no
    representations.
    """
    from dataclasses import replace

    from .config import SelectConfig
    from .report import format_table
    from .select.registry import select_sources

    cache_args, args, target_args, select_config, est = parse_dataclasses(
        [CacheArguments, BaselineArguments, TargetArguments, SelectConfig, _estimator_args()],
        argv,
        "hf-subset-select baselines",
        cmd_baselines.__doc__,
        shared_config=True,
    )
    unknown = [m for m in args.methods if m not in BASELINES]
    if unknown:
        raise CLIError(f"Unknown baseline(s) {unknown}; choose from {list(BASELINES)}.")
    if target_args.targets:
        raise CLIError("baselines takes one target (--target_cache); run it once per target.")
    estimator = _estimator(_load_cache(cache_args.cache), est, target_args)
    os.makedirs(args.output_dir, exist_ok=True)
    kept = {}
    for method in args.methods:
        if method == "representation_similarity" and estimator.cache.representations is None:
            print("representation_similarity skipped: the cache has no representations")
            continue
        selection = select_sources(estimator, config=replace(select_config, method=method))
        selection.save(os.path.join(args.output_dir, f"{method}.json"))
        kept[method] = selection
    rows = [
        [
            s,
            *[sel.scores[s] for sel in kept.values()],
            ",".join(m for m, sel in kept.items() if s in sel.selected),
        ]
        for s in estimator.sources
    ]
    print(format_table(["source", *kept, "kept by"], rows))
    print(f"selections written to {args.output_dir}/<method>.json")


def read_real_losses(path: str) -> list[tuple[list[str], float]]:
    """Real fine-tuning results from a file: JSON ``{"a,b": loss, ...}`` or ``[{"subset": [...], "loss": x}, ...]``,
    or CSV with columns ``subset`` (source names joined by ``,`` or ``+``) and ``loss``."""
    if not os.path.isfile(path):
        raise CLIError(f"No file of real losses at {path!r}.")

    def names(value: Any) -> list[str]:
        if isinstance(value, str):
            return [s.strip() for s in value.replace("+", ",").split(",") if s.strip()]
        if isinstance(value, list) and all(isinstance(s, str) for s in value):
            return list(value)
        raise CLIError(f"{path!r}: a subset must be a list of source names or 'a,b', got {value!r}.")

    def loss(value: Any) -> float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise CLIError(f"{path!r}: a loss must be a number, got {value!r}.") from None

    if path.lower().endswith(".csv"):
        with open(path, encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            if not reader.fieldnames or not {"subset", "loss"} <= set(reader.fieldnames):
                raise CLIError(f"{path!r}: the CSV needs the columns 'subset' and 'loss'.")
            return [(names(row["subset"]), loss(row["loss"])) for row in reader]
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except json.JSONDecodeError as exc:
        raise CLIError(f"{path!r} is not valid JSON ({exc}).") from None
    if isinstance(data, dict):
        return [(names(k), loss(v)) for k, v in data.items()]
    if isinstance(data, list) and all(isinstance(r, dict) and {"subset", "loss"} <= set(r) for r in data):
        return [(names(r["subset"]), loss(r["loss"])) for r in data]
    raise CLIError(f"{path!r}: expected {{'a,b': loss}} or [{{'subset': [...], 'loss': x}}, ...].")


@dataclass
class CalibrateArguments:
    """The real results and where the calibration goes."""

    real_losses: str = field(
        default="",
        metadata={
            "help": 'JSON {"a,b": loss} / [{"subset": [...], "loss": x}] or CSV (subset, loss): the target '
            "loss after real fine-tunes on a few subsets."
        },
    )
    output: str | None = field(
        default=None,
        metadata={"help": "Write the calibration as JSON here (with the flags / config keys to reuse it)."},
    )
    fit_step_scale: bool = field(default=True, metadata={"help": "Fit the step scale too (else only λ)."})

    def __post_init__(self) -> None:
        if not self.real_losses:
            raise CLIError("--real_losses FILE is required: the target losses of a few real fine-tunes.")


def cmd_calibrate(argv: Sequence[str]) -> None:
    """Fit λ and the step scale to the target losses of a few real fine-tunes.

    Use it once you have 3-10 real fine-tunes on subsets of the sources: the estimate then matches their scale,
    not only their ranking. It prints the error before and after and the --estimator_l2 / --estimator_step_scale
    flags (or config keys) that reuse the calibration in `estimate` and `select`.
    """
    from .estimate.validation import calibrate
    from .io_utils import atomic_write_json

    cache_args, args, target_args, est = parse_dataclasses(
        [CacheArguments, CalibrateArguments, TargetArguments, _estimator_args()],
        argv,
        "hf-subset-select calibrate",
        cmd_calibrate.__doc__,
        shared_config=True,
    )
    if target_args.targets:
        raise CLIError("calibrate takes one target (--target_cache): real losses belong to one target.")
    pairs = read_real_losses(args.real_losses)
    estimator = _estimator(_load_cache(cache_args.cache), est, target_args)
    result = calibrate(estimator, [(tuple(s), v) for s, v in pairs], fit_step_scale=args.fit_step_scale)
    config_keys = {"estimator_l2": result["l2"], "estimator_step_scale": result["step_scale"]}
    print(
        f"calibrated on {result['num_results']} real results: λ = {result['l2']:.4g} (was {result['l2_before']:.4g}), "
        f"step scale = {result['step_scale']:.4g}; mean relative error {result['mean_relative_error_before']:.3f} "
        f"-> {result['mean_relative_error_after']:.3f}"
    )
    print("reuse with: " + " ".join(f"--{k} {v:.6g}" for k, v in config_keys.items()))
    if args.output:
        atomic_write_json(args.output, {**result, "config": config_keys})
        print(f"calibration written to {args.output}")


@dataclass
class ForwardCheckArguments:
    """θ*, the target split and the subsets to check."""

    meta_init: str = field(default="", metadata={"help": "Meta-init directory θ* (the cache's)."})
    base_model: str | None = field(default=None, metadata={"help": "Base model path for a PEFT θ*."})
    tokenizer: str | None = field(
        default=None, metadata={"help": "Tokenizer path (default: the meta-init dir)."}
    )
    target_eval_file: str = field(
        default="", metadata={"help": "The target evaluation split the cache holds."}
    )
    subsets: list[str] = field(
        default_factory=list,
        metadata={"help": "Subsets as comma-separated names (default: each source alone)."},
    )
    output: str | None = field(default=None, metadata={"help": "Also write the results as JSON here."})

    def __post_init__(self) -> None:
        if not self.meta_init or not self.target_eval_file:
            raise CLIError("--meta_init DIR and --target_eval_file PATH are required.")


def cmd_forward_check(argv: Sequence[str]) -> None:
    """Evaluate the target for real at θ* + P·ŵ_S, next to the linear estimate.

    Use it to check the estimate where it matters before trusting a selection: a forward pass of the real model
    with the fitted step applied (no training). Large gaps mean the step leaves the linear regime: raise λ
    (--estimator_l2) or calibrate on real fine-tunes.
    """
    from .cli import _load_tokenizer
    from .collect.meta_init import read_meta_init_manifest
    from .data.sources import load_dataset_file
    from .estimate.validation import forward_check
    from .io_utils import atomic_write_json
    from .report import format_table

    cache_args, args, est = parse_dataclasses(
        [CacheArguments, ForwardCheckArguments, _estimator_args()],
        argv,
        "hf-subset-select forward-check",
        cmd_forward_check.__doc__,
        shared_config=True,
    )
    estimator = _estimator(_load_cache(cache_args.cache), est)
    subsets = [[s.strip() for s in item.split(",") if s.strip()] for item in args.subsets]
    subsets = subsets or [[s] for s in estimator.sources]
    manifest = read_meta_init_manifest(args.meta_init)
    tokenizer = _load_tokenizer(args, manifest)
    model = load_theta(args.meta_init, args.base_model, manifest)
    real = forward_check(
        estimator, model, subsets, load_dataset_file(args.target_eval_file), tokenizer=tokenizer
    )
    linear = estimator.estimate(subsets)
    rows = [[",".join(s), float(a), float(b), float(b) - float(a)] for s, a, b in zip(subsets, linear, real)]
    print(format_table(["subset", "linear estimate", "forward check", "difference"], rows))
    if args.output:
        atomic_write_json(
            args.output,
            {"results": [{"subset": r[0].split(","), "linear": r[1], "forward": r[2]} for r in rows]},
        )
        print(f"results written to {args.output}")
