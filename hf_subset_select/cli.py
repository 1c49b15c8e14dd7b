"""The ``hf-subset-select`` command: ``demo``, ``collect``, ``estimate``, ``select``, ``report``, ``baselines``,
``calibrate``, ``forward-check`` (``report`` in :mod:`.cli_report`, the last three in :mod:`.cli_checks`).

Each subcommand takes flags or ``--config FILE`` (YAML or JSON; flags override it), parsed with TRL's
``TrlParser`` (an ``HfArgumentParser``) into this package's config dataclasses. Fields of
:class:`~hf_subset_select.EstimatorConfig` are prefixed ``--estimator_`` where they would clash with
another config (both it and :class:`~hf_subset_select.SelectConfig` have ``seed``). Bad input ends with one
line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import typing
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = ["main", "prefixed_dataclass", "unprefixed", "parse_dataclasses", "CLIError"]


class CLIError(Exception):
    """Bad input: printed as one line, exit code 2."""


# --------------------------------------------------------------------------- argument helpers
def prefixed_dataclass(cls: type, prefix: str) -> type:
    """A copy of dataclass ``cls`` whose fields are named ``<prefix><field>`` (same types, defaults and help).

    Lets one parser take several configs whose field names collide; :func:`unprefixed` turns a parsed
    instance back into ``cls`` (validated by its ``__post_init__``).
    """
    hints = typing.get_type_hints(cls)
    specs = []
    for f in dataclasses.fields(cls):
        kwargs: dict[str, Any] = {"metadata": f.metadata}
        if f.default is not dataclasses.MISSING:
            kwargs["default"] = f.default
        if f.default_factory is not dataclasses.MISSING:
            kwargs["default_factory"] = f.default_factory
        specs.append((prefix + f.name, hints[f.name], dataclasses.field(**kwargs)))
    return dataclasses.make_dataclass(f"{cls.__name__}Arguments", specs)


def unprefixed(parsed: Any, cls: type, prefix: str) -> Any:
    """Build ``cls`` from an instance of ``prefixed_dataclass(cls, prefix)``."""
    return cls(**{f.name: getattr(parsed, prefix + f.name) for f in dataclasses.fields(cls)})


def parse_dataclasses(
    dataclass_types: Sequence[type],
    argv: Sequence[str] | None,
    prog: str,
    description: str,
    shared_config: bool = False,
) -> tuple[Any, ...]:
    """Flags plus ``--config FILE`` (YAML/JSON) into instances of ``dataclass_types``.

    ``shared_config``: keys of the config file that this command does not take are skipped (with a note), so that
    the file of another command (e.g. ``recipes/configs/select.yaml``) serves this one too; flags stay strict."""
    from trl import TrlParser

    class _Formatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
        pass

    parser = TrlParser(list(dataclass_types), prog=prog, description=description, formatter_class=_Formatter)
    parser.add_argument("--config", default=None, help="YAML or JSON file with any of these options.")
    args = list(argv or [])
    if "--config" in args:
        i = args.index("--config")
        if i + 1 >= len(args) or not os.path.isfile(args[i + 1]):
            raise CLIError(
                f"--config needs an existing YAML/JSON file, got {args[i + 1 : i + 2] or 'nothing'}."
            )
    # TrlParser consumes --config itself; the argument above only documents it in --help and would come back
    # as one extra namespace, which is dropped here.
    if not shared_config:
        return tuple(parser.parse_args_and_config(args))[: len(dataclass_types)]
    *parsed, from_config, from_flags = parser.parse_args_and_config(
        args, return_remaining_strings=True, separate_remaining_strings=True
    )
    if from_flags:
        raise CLIError(f"Unknown option(s) {from_flags}; see `{prog} --help`.")
    skipped = [k[2:] for k in from_config[::2]]
    if skipped:
        print(f"{prog}: config keys not used by this command: {skipped}", file=sys.stderr)
    return tuple(parsed)[: len(dataclass_types)]


# --------------------------------------------------------------------------- subcommands
@dataclass
class CacheArguments:
    """Which gradient cache to read."""

    cache: str = field(default="", metadata={"help": "Gradient cache directory (written by the collector)."})

    def __post_init__(self) -> None:
        if not self.cache:
            raise CLIError("--cache is required: the gradient cache directory written by the collector.")


def _load_cache(path: str) -> Any:
    from .collect.cache import GradientCache

    return GradientCache.load(path)


ESTIMATOR_PREFIX = "estimator_"


def _estimator_args() -> type:
    from .config import EstimatorConfig

    return prefixed_dataclass(EstimatorConfig, ESTIMATOR_PREFIX)


def _estimator(cache: Any, parsed: Any, targets: Any = None) -> Any:
    """A FirstOrderEstimator (the cache's target, or --target_cache), or a MultiTargetEstimator (--targets)."""
    from .cli_targets import estimator_for

    return estimator_for(cache, unprefixed(parsed, _estimator_config(), ESTIMATOR_PREFIX), targets)


def _estimator_config() -> type:
    from .config import EstimatorConfig

    return EstimatorConfig


@dataclass
class EstimateArguments:
    """Subsets to estimate and where to write the result."""

    subsets: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Subsets as comma-separated source names, one argument per subset: --subsets a,b c"
        },
    )
    output: str | None = field(default=None, metadata={"help": "Also write the estimates as JSON here."})
    interval_level: float | None = field(
        default=None, metadata={"help": "Give each estimate a confidence interval at this level (e.g. 0.95)."}
    )


def cmd_estimate(argv: Sequence[str]) -> None:
    """Estimated target loss after fine-tuning on each given subset (and the per-source losses).

    Use it to compare a few candidate mixtures by hand. With --interval_level every estimate gets a confidence
    interval over the target rows; with --targets NAME=DIR ... it prints a subsets x targets table.
    """
    from .cli_targets import TargetArguments
    from .io_utils import atomic_write_json
    from .report import format_interval, format_table

    cache_args, est_args, target_args, est = parse_dataclasses(
        [CacheArguments, EstimateArguments, TargetArguments, _estimator_args()],
        argv,
        "hf-subset-select estimate",
        cmd_estimate.__doc__,
    )
    estimator = _estimator(_load_cache(cache_args.cache), est, target_args)
    subsets = [[s.strip() for s in item.split(",") if s.strip()] for item in est_args.subsets]
    if not subsets:
        subsets = [[s] for s in estimator.sources] + [list(estimator.sources)]
    unknown = sorted({s for sub in subsets for s in sub} - set(estimator.sources))
    if unknown:
        raise CLIError(f"Unknown source(s) {unknown}; the cache's candidate sources are {estimator.sources}.")
    if hasattr(estimator, "for_target"):  # several targets: one column per target
        table = estimator.estimate(subsets)
        print(
            format_table(
                ["subset", *estimator.names],
                [[",".join(sub), *row] for sub, row in zip(subsets, table.tolist())],
            )
        )
        if est_args.output:
            atomic_write_json(
                est_args.output,
                {
                    "cache": cache_args.cache,
                    "targets": dict(zip(estimator.names, target_args.targets)),
                    "base_loss": estimator.base_loss(),
                    "estimates": [
                        {"subset": sub, "loss": dict(zip(estimator.names, row))}
                        for sub, row in zip(subsets, table.tolist())
                    ],
                },
            )
            print(f"estimates written to {est_args.output}")
        return
    level = est_args.interval_level
    intervals = estimator.estimate_intervals(subsets, level=level) if level else None
    losses = [float(x) for x in (intervals.point if intervals is not None else estimator.estimate(subsets))]
    base = float(estimator.base_loss)
    bounds = (
        [[float(a), float(b)] for a, b in zip(intervals.lower, intervals.upper)]
        if intervals is not None
        else None
    )
    rows = [
        [",".join(sub), loss, loss - base] + ([format_interval(bounds[i])] if bounds else [])
        for i, (sub, loss) in enumerate(zip(subsets, losses))
    ]
    print(
        f"target loss at θ* (no change): {base:.4f}   λ = {estimator.resolved_l2():.4g} ({estimator.l2_rule} rule)"
    )
    ci = [f"{100 * level:g}% CI (target rows)"] if level else []
    print(format_table(["subset", "estimated loss", "change", *ci], rows))
    if est_args.output:
        atomic_write_json(
            est_args.output,
            {
                "cache": cache_args.cache,
                "target_cache": target_args.target_cache,
                "base_loss": base,
                "l2": estimator.resolved_l2(),
                "l2_rule": estimator.l2_rule,
                "interval_level": level,
                "estimates": [
                    {"subset": sub, "loss": loss, **({"interval": bounds[i]} if bounds else {})}
                    for i, (sub, loss) in enumerate(zip(subsets, losses))
                ],
            },
        )
        print(f"estimates written to {est_args.output}")


@dataclass
class SelectArguments:
    """Where to write the selection."""

    output: str = field(default="selection.json", metadata={"help": "Selection JSON to write."})


UNITS = ("source", "example", "cluster")


@dataclass
class UnitArguments:
    """What a selection decides on: whole sources, single examples, or clusters of the pool's examples."""

    unit: str = field(
        default="source",
        metadata={
            "help": "'source': score and keep whole sources; 'example': score every training example "
            "(first-order effect on the estimated target loss; with --method gradient_similarity the LESS-style "
            "cosine) and keep the better ones (--fraction, else --threshold, else the scores that lower the "
            "estimate / cosines above the mean); 'cluster': cluster the pooled examples by their gradients into "
            "--clusters pseudo-sources and select those. Example and cluster selections are keyed by example_id "
            "and apply to the untouched dataset.",
            "choices": list(UNITS),
        },
    )
    clusters: int = field(default=8, metadata={"help": "Number of clusters (--unit cluster)."})
    cluster_seed: int = field(default=0, metadata={"help": "Seed of the spherical k-means (--unit cluster)."})
    fraction: float | None = field(
        default=None, metadata={"help": "--unit example: keep this share of the examples (the best scores)."}
    )

    def __post_init__(self) -> None:
        if self.unit not in UNITS:
            raise CLIError(f"--unit must be one of {list(UNITS)}, got {self.unit!r}.")
        if self.clusters < 1:
            raise CLIError(f"--clusters must be >= 1 (the number of pseudo-sources), got {self.clusters}.")
        if self.fraction is not None and not 0.0 < self.fraction <= 1.0:
            raise CLIError(
                f"--fraction must lie in (0, 1] (the share of examples kept), got {self.fraction}."
            )


def _select_unit(cache: Any, unit: Any, select_config: Any, est: Any) -> Any:
    """The selection at ``unit.unit`` granularity."""
    from .config import EstimatorConfig

    if unit.unit == "cluster":
        from .select.clusters import select_clusters

        return select_clusters(  # k above the number of rows: a ValueError that names the limit
            cache,
            unit.clusters,
            estimator_config=unprefixed(est, EstimatorConfig, ESTIMATOR_PREFIX),
            select_config=select_config,
            seed=unit.cluster_seed,
        )
    if unit.unit == "example":
        from .select.examples import select_examples

        similarity = select_config.method == "gradient_similarity"
        if select_config.method not in ("random_ensemble", "gradient_similarity"):
            raise CLIError(
                f"--unit example scores examples by their first-order effect (the default --method) or by "
                f"--method gradient_similarity; --method {select_config.method} works on sources only."
            )
        return select_examples(
            cache if similarity else _estimator(cache, est),
            "gradient_similarity" if similarity else "first_order",
            fraction=unit.fraction,
            threshold=select_config.threshold,
            temperature=select_config.temperature,
        )
    from .select.registry import select_sources

    return select_sources(_estimator(cache, est), config=select_config)


def cmd_select(argv: Sequence[str]) -> None:
    """Score every source (or example, or cluster: --unit) from the gradient cache and write selection.json.

    The main command: which sources to keep for the target fine-tune. Add --interval_level 0.95 for confidence
    intervals and --require_significant to keep only sources whose effect interval excludes 'no effect'. With
    --targets NAME=DIR ... it selects for several targets at once (the output holds every target's selection, and
    <output>.<target>.json each one's, for `report`).
    """
    from .cli_targets import TargetArguments
    from .config import SelectConfig
    from .select.registry import select_sources

    cache_args, sel_args, target_args, unit, select_config, est = parse_dataclasses(
        [CacheArguments, SelectArguments, TargetArguments, UnitArguments, SelectConfig, _estimator_args()],
        argv,
        "hf-subset-select select",
        cmd_select.__doc__,
    )
    cache = _load_cache(cache_args.cache)
    os.makedirs(os.path.dirname(os.path.abspath(sel_args.output)), exist_ok=True)
    if unit.unit != "source":
        if target_args.targets or target_args.target_cache:
            raise CLIError(
                f"--unit {unit.unit} selects for the target rows in --cache; drop --targets / --target_cache, or "
                "use --unit source for several targets."
            )
        selection = _select_unit(cache, unit, select_config, est)
        selection.save(sel_args.output)
        print(selection)
        print(f"selection written to {sel_args.output}")
        return
    estimator = _estimator(cache, est, target_args)
    if hasattr(estimator, "for_target"):
        from .select.targets import select_for_targets

        result = select_for_targets(estimator, config=select_config)
        result.save(sel_args.output)
        stem = sel_args.output[:-5] if sel_args.output.endswith(".json") else sel_args.output
        for target, selection in result.selections.items():
            selection.save(f"{stem}.{target}.json")
        print(result)
        print(f"selections written to {sel_args.output} (and {stem}.<target>.json)")
        return
    selection = select_sources(estimator, config=select_config)
    selection.save(sel_args.output)
    print(selection)
    print(f"selection written to {sel_args.output}")


@dataclass
class CollectArguments:
    """θ*, data and tokenizer for the collection pass."""

    meta_init: str = field(
        default="",
        metadata={"help": "Meta-init directory written by MetaInitCallback (holds meta_init.json)."},
    )
    base_model: str | None = field(
        default=None,
        metadata={"help": "Base model path for a PEFT θ* (default: the manifest's base_model_name_or_path)."},
    )
    tokenizer: str | None = field(
        default=None,
        metadata={"help": "Tokenizer path (default: the meta-init directory, then the base model)."},
    )
    train_files: list[str] = field(
        default_factory=list,
        metadata={
            "help": "Training sources as NAME=PATH (.json/.jsonl/.csv/.parquet or a save_to_disk folder)."
        },
    )
    target_eval_file: str = field(
        default="", metadata={"help": "The target task's evaluation split (same formats)."}
    )
    target_eval_name: str = field(
        default="target_eval", metadata={"help": "Source name given to the target split."}
    )
    target_source: str | None = field(
        default=None,
        metadata={
            "help": "The NAME among --train_files that is the target task's own training split (default: the "
            "meta-init manifest's target)."
        },
    )

    train_cache: str | None = field(
        default=None,
        metadata={
            "help": "Collect only --target_eval_file against this existing training cache (same θ*, projection, "
            "geometry and output function, checked): a new target costs its own rows. Settings not given are "
            "taken from the training cache; given ones must match it. No --train_files then."
        },
    )

    def __post_init__(self) -> None:
        if not self.meta_init:
            raise CLIError("--meta_init is required: the directory MetaInitCallback wrote.")
        if self.train_cache and self.train_files:
            raise CLIError(
                "Pass either --train_files (collect the pool and the target) or --train_cache (the target only)."
            )
        if not (self.train_files or self.train_cache) or not self.target_eval_file:
            raise CLIError(
                "--target_eval_file PATH and either --train_files NAME=PATH ... or --train_cache DIR are required."
            )


def cmd_collect(argv: Sequence[str]) -> None:
    """Collect per-example projected gradients at θ* (a meta-init directory) into a gradient cache.

    Run it once per θ*: it is the expensive step. For a new target against an existing training cache, pass
    --train_cache DIR instead of --train_files: only the target's rows are computed.
    """
    from .cli_targets import load_theta, target_only_config
    from .collect.collector import GradientCollector
    from .collect.meta_init import read_meta_init_manifest
    from .config import CollectConfig
    from .data.sources import load_dataset_file, parse_source_specs, tag_sources, tag_target_eval

    args, config = parse_dataclasses(
        [CollectArguments, CollectConfig], argv, "hf-subset-select collect", cmd_collect.__doc__
    )
    if not config.output_dir:
        raise CLIError("--output_dir is required: where the gradient cache goes.")
    manifest = read_meta_init_manifest(args.meta_init)
    train = None
    if args.train_cache:
        config = target_only_config(args.train_cache, config)
    else:
        sources = parse_source_specs(args.train_files)
        target = args.target_source or manifest.get("target_source")
        if target is not None and target not in sources:
            raise CLIError(f"target_source {target!r} is not among --train_files {sorted(sources)}.")
        train = tag_sources(sources, target=target)
    target_eval = tag_target_eval(load_dataset_file(args.target_eval_file), name=args.target_eval_name)
    tokenizer = _load_tokenizer(args, manifest)
    model = load_theta(args.meta_init, args.base_model, manifest)
    collector = GradientCollector(
        config,
        train_dataset=train,
        target_dataset=target_eval,
        tokenizer=tokenizer,
        train_cache=args.train_cache,
    )
    cache = collector.collect(model, tokenizer, output_dir=config.output_dir)
    print(f"{cache} written to {config.output_dir}")


def _load_tokenizer(args: Any, manifest: dict[str, Any]) -> Any:
    from transformers import AutoTokenizer

    for path in (args.tokenizer, args.meta_init, args.base_model, manifest.get("base_model_name_or_path")):
        if (
            path
            and os.path.isdir(path)
            and any(
                os.path.exists(os.path.join(path, f)) for f in ("tokenizer.json", "tokenizer_config.json")
            )
        ):
            return AutoTokenizer.from_pretrained(path)
    raise CLIError(
        "No tokenizer found: pass --tokenizer PATH (a directory written by tokenizer.save_pretrained)."
    )


@dataclass
class DemoArguments:
    """Settings of the demo run."""

    output_dir: str = field(default="hf_subset_select_demo", metadata={"help": "Where the demo writes."})
    scale: str = field(default="full", metadata={"help": "'full', or 'test': reduced sizes, same code path."})
    seed: int = field(default=0, metadata={"help": "Seed for data, models and training."})


def cmd_demo(argv: Sequence[str]) -> None:
    """Run the whole pipeline on built-in toy sources (offline, CPU) and write a report."""
    from .demo.run import DemoConfig, run_demo

    (args,) = parse_dataclasses([DemoArguments], argv, "hf-subset-select demo", cmd_demo.__doc__)
    run_demo(DemoConfig(output_dir=args.output_dir, scale=args.scale, seed=args.seed))


def _commands() -> dict[str, Callable[[Sequence[str]], None]]:
    from .cli_checks import cmd_baselines, cmd_calibrate, cmd_forward_check
    from .cli_report import cmd_report

    return {
        "demo": cmd_demo,
        "collect": cmd_collect,
        "estimate": cmd_estimate,
        "select": cmd_select,
        "report": cmd_report,
        "baselines": cmd_baselines,
        "calibrate": cmd_calibrate,
        "forward-check": cmd_forward_check,
    }


def __getattr__(name: str) -> Any:
    if name == "COMMANDS":  # the subcommands by name (built on use: cli_checks imports this module)
        return _commands()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _usage() -> str:
    from . import __version__

    COMMANDS = _commands()
    lines = [
        f"usage: hf-subset-select {{{','.join(COMMANDS)}}} [options]   (hf-subset-select {__version__})",
        "",
        "Choose auxiliary data sources for a target task from cached projected gradients.",
        "",
        "commands:",
    ]
    lines += [f"  {name:<13} {(fn.__doc__ or '').strip().splitlines()[0]}" for name, fn in COMMANDS.items()]
    lines += ["", "Run `hf-subset-select COMMAND --help` for a command's options."]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``hf-subset-select`` console script."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args or args[0] in ("-h", "--help"):
        print(_usage())
        return 0 if args else 2
    if args[0] == "--version":
        from . import __version__

        print(f"hf-subset-select {__version__}")
        return 0
    command, rest = args[0], args[1:]
    COMMANDS = _commands()
    if command not in COMMANDS:
        print(
            f"hf-subset-select: error: unknown command {command!r}; choose one of {list(COMMANDS)}.",
            file=sys.stderr,
        )
        return 2
    try:
        COMMANDS[command](rest)
    except (CLIError, ValueError, FileNotFoundError, KeyError) as exc:
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        print(f"hf-subset-select {command}: error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
