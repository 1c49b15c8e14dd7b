"""Configuration dataclasses, in the style of PEFT's configs.

Every field carries ``metadata={"help": ...}`` so the classes work with ``transformers.HfArgumentParser``
(flags, JSON or YAML); a field with a fixed set of values is typed ``Literal[...]`` and lists them in
``metadata["choices"]``. Validation happens in ``__post_init__`` with errors that say how to fix the value.

Fields come in two kinds. Result fields define what a run computes (the projection, the output function, the
λ rule, ...): they are saved into manifests and fingerprints. Runtime fields (named in the class's
``runtime_fields``: batch sizes, chunk sizes, thread counts, output paths) change how fast or where a run
goes, never what it computes: :meth:`ConfigMixin.result_dict` leaves them out, so changing one never
invalidates a cache.
Every config saves to and loads from JSON; loading warns about and drops keys it does not know (a file from a
newer or older version still loads), and raises :class:`ConfigError` (a ``ValueError``) for a value of the wrong
type or range, naming the field and what it must be.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .config_types import check_types as _check_types
from .io_utils import atomic_write_text, read_json

T = TypeVar("T", bound="ConfigMixin")

__all__ = ["ConfigMixin", "ConfigError", "MetaInitConfig", "CollectConfig", "EstimatorConfig", "SelectConfig"]


class ConfigError(ValueError):
    """A config value of the wrong type or range, or a config file that cannot be read (the message says which)."""


class _ConfigNotFound(ConfigError, FileNotFoundError):
    """No config file at the path (also a ``FileNotFoundError``)."""


class ConfigMixin:
    """JSON (de)serialization shared by all configs."""

    config_type: str = "config"
    # fields that change how fast or where a run goes, never what it computes (left out of manifests)
    runtime_fields: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serializable dict of every field (result and runtime)."""
        return dataclasses.asdict(self)  # type: ignore[arg-type]

    def result_dict(self) -> dict[str, Any]:
        """The fields that define a run's result (runtime fields left out): what manifests record."""
        return {k: v for k, v in self.to_dict().items() if k not in self.runtime_fields}

    def _check_choices(self) -> None:
        """Raise :class:`ConfigError` for a field whose value has the wrong type, then for every ``Literal`` field
        whose value is not one of its valid values (naming them)."""
        _check_types(type(self), {f.name: getattr(self, f.name) for f in dataclasses.fields(self)})  # type: ignore[arg-type]
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            choices = f.metadata.get("choices")
            if choices is not None:
                _check_choice(f.name, getattr(self, f.name), tuple(choices))

    def to_json_string(self) -> str:
        return json.dumps({"config_type": self.config_type, **self.to_dict()}, indent=2, sort_keys=True)

    def save(self, path: str | os.PathLike) -> None:
        """Write the config as JSON (atomically). ``path`` is a file, or a directory to hold ``<type>.json``."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, f"{self.config_type}.json")
        atomic_write_text(path, self.to_json_string() + "\n")

    @classmethod
    def from_dict(cls: type[T], data: dict[str, Any]) -> T:
        """Build the config from a dict (unknown keys warned about and dropped).

        Raises:
            ConfigError: ``data`` is not a dict, holds another config type, or a field has the wrong type or range.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"A {cls.__name__} is read from a JSON object, got {type(data).__name__}.")
        data = dict(data)
        stored_type = data.pop("config_type", cls.config_type)
        if stored_type != cls.config_type:
            raise ConfigError(
                f"This JSON holds a {stored_type!r} config, not a {cls.config_type!r} config; "
                f"load it with the matching class."
            )
        names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
        unknown = sorted(set(data) - names)
        if unknown:
            warnings.warn(
                f"{cls.__name__}: ignoring unknown field(s) {unknown} (written by another version of "
                f"hf-subset-select?); known fields: {sorted(names)}.",
                UserWarning,
                stacklevel=2,
            )
        known = {k: v for k, v in data.items() if k in names}
        _check_types(cls, known)
        return cls(**known)  # type: ignore[call-arg]

    @classmethod
    def load(cls: type[T], path: str | os.PathLike) -> T:
        """Read a config written by :meth:`save`."""
        path = os.fspath(path)
        if os.path.isdir(path):
            path = os.path.join(path, f"{cls.config_type}.json")
        if not os.path.isfile(path):
            raise _ConfigNotFound(f"No {cls.__name__} JSON at {path!r}.")
        try:
            data = read_json(path)
        except ValueError as exc:
            raise ConfigError(
                f"{path!r} is not valid JSON ({exc}); re-create it with {cls.__name__}.save()."
            ) from exc
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise ConfigError(f"{path!r}: {exc}") from None


def _choice(default: str, choices: tuple[str, ...], help: str) -> Any:
    """A ``Literal`` field: its valid values in the metadata (HfArgumentParser and the docs read them)."""
    return field(default=default, metadata={"help": help, "choices": list(choices)})


def _runtime(help: str, **kwargs: Any) -> Any:
    """A runtime field (list it in the class's ``runtime_fields`` too): its help says it is not saved."""
    return field(metadata={"help": help + " Runtime setting: not saved into manifests."}, **kwargs)


# names added at run time by the registries (register_output_fn, register_projector, register_selector), per field:
# the Literal lists the built-in values, a registered extension is valid too
_REGISTERED_CHOICES: dict[str, list[str]] = {"output_fn": [], "proj_type": [], "method": []}
_REGISTER_HINT = {
    "output_fn": "hf_subset_select.collect.outputs.register_output_fn",
    "proj_type": "hf_subset_select.collect.projection.register_projector",
    "method": "hf_subset_select.select.register_selector",
}


def register_choice(field_name: str, value: str) -> None:
    """Make ``value`` valid for the extensible field ``field_name`` (called by the registries, not by users)."""
    if field_name not in _REGISTERED_CHOICES:
        raise ValueError(
            f"{field_name!r} is not an extensible config field; one of {sorted(_REGISTERED_CHOICES)}."
        )
    if value not in _REGISTERED_CHOICES[field_name]:
        _REGISTERED_CHOICES[field_name].append(value)


def _check_choice(name: str, value: Any, choices: tuple[Any, ...]) -> None:
    extra = tuple(c for c in _REGISTERED_CHOICES.get(name, ()) if c not in choices)
    if value not in choices + extra:
        hint = f" or register a new one with {_REGISTER_HINT[name]}" if name in _REGISTER_HINT else ""
        raise ConfigError(f"{name}={value!r} is not valid; choose one of {list(choices + extra)}{hint}.")


def _check_positive(
    name: str, value: float | int | None, allow_none: bool = False, allow_zero: bool = False
) -> None:
    if value is None:
        if allow_none:
            return
        raise ConfigError(f"{name} must be set.")
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name} must be {bound}, got {value!r}.")


@dataclass
class MetaInitConfig(ConfigMixin):
    """Where and when :class:`~hf_subset_select.MetaInitCallback` saves the meta initialization θ*."""

    config_type = "meta_init_config"

    output_dir: str | None = field(
        default=None,
        metadata={"help": "Directory for θ*. Default: <TrainingArguments.output_dir>/meta_init."},
    )
    save_steps: list[int] = field(
        default_factory=list,
        metadata={"help": "Global steps at which to also save a snapshot (into <output_dir>/step-<N>)."},
    )
    save_on_epoch_end: bool = field(
        default=False,
        metadata={"help": "Also save a snapshot at the end of every epoch (<output_dir>/epoch-<N>)."},
    )
    base_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Recorded in the manifest; default: read from the model's config (name_or_path)."},
    )

    def __post_init__(self) -> None:
        self._check_choices()
        if any((not isinstance(s, int)) or s <= 0 for s in self.save_steps):
            raise ConfigError(f"save_steps must be positive integers, got {self.save_steps!r}.")


@dataclass
class CollectConfig(ConfigMixin):
    """How :class:`~hf_subset_select.GradientCollector` computes and stores per-example projected gradients."""

    config_type = "collect_config"
    runtime_fields = (
        "proj_chunk_size",
        "batch_size",
        "grad_method",
        "proj_cache_mb",
        "output_dir",
        "overwrite",
        "self_check",
    )

    proj_dim: int = field(
        default=2048,
        metadata={
            "help": "Projection dimension d. Inner products of projected gradients are kept up to an error of "
            "about 1/sqrt(d) of their norms, so use d in the thousands (the estimate's ranking degrades at d=128, "
            "docs/benchmarks.md); with proj_type='auto' and fewer trainable parameters than d no projection is used."
        },
    )
    proj_type: Literal["auto", "rademacher", "gaussian", "sparse", "identity"] = _choice(
        "auto",
        ("auto", "rademacher", "gaussian", "sparse", "identity"),
        "'auto' (identity when the trainable parameter count <= proj_dim, else 'sparse'), "
        "'rademacher', 'gaussian', 'sparse' (sparse JL / CountSketch, O(p) per example) or 'identity'.",
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the projection map (same seed -> same map anywhere)."}
    )
    sparse_nnz: int = field(
        default=4, metadata={"help": "Non-zeros per input coordinate of the sparse map (1 = CountSketch)."}
    )
    proj_chunk_size: int = _runtime(
        "Parameters projected per chunk (bounds the projector's extra memory).", default=65536
    )
    batch_size: int = _runtime("Examples per batched per-example-gradient call.", default=16)
    max_length: int = field(default=512, metadata={"help": "Token sequences are truncated to this length."})
    output_fn: Literal[
        "auto", "token_log_odds", "sequence_log_odds", "sequence_margin", "classification_margin"
    ] = _choice(
        "auto",
        ("auto", "token_log_odds", "sequence_log_odds", "sequence_margin", "classification_margin"),
        "'auto' ('sequence_log_odds' for language models, 'classification_margin' for sequence "
        "classifiers), 'sequence_log_odds' (causal / seq2seq LM: log-odds of the geometric-mean gold-token "
        "probability, whose logistic loss is the example's mean token cross entropy), 'token_log_odds' (LM: "
        "mean of the gold tokens' log-odds, the paper's output; the same for one supervised token), "
        "'sequence_margin' (LM: smallest gold-token logit margin over the supervised tokens, positive exactly when "
        "greedy teacher-forced decoding is an exact match; for targets scored by exact match rather than loss) or "
        "'classification_margin'.",
    )
    prob_clamp: float = field(
        default=1e-6, metadata={"help": "p is clamped to [eps, 1-eps] before the log-odds log(p/(1-p))."}
    )
    grad_method: Literal["auto", "hooks", "vmap", "loop"] = field(
        default="auto",
        metadata={
            "help": "How per-example gradients are taken (all give the same numbers; only speed differs): 'auto' "
            "(closed-form layer hooks when every trainable parameter sits in a Linear, GPT-2 Conv1D, Embedding, "
            "LayerNorm or RMSNorm, checked once against torch.func; else torch.func vmap; falling back to a "
            "per-example loop with a warning), 'hooks', 'vmap' or 'loop'.",
            "choices": ["auto", "hooks", "vmap", "loop"],
        },
    )
    proj_cache_mb: float = _runtime(
        "MiB of generated projection chunks kept for reuse across batches (0: regenerate each batch). "
        "Bounds the projector's extra memory independently of the trainable parameter count.",
        default=256.0,
    )
    representations: bool = field(
        default=True,
        metadata={
            "help": "Also store each example's mean last hidden state (for the representation-similarity baseline)."
        },
    )
    precondition: Literal["none", "auto", "adam"] = _choice(
        "none",
        ("none", "auto", "adam"),
        "Scale per-example gradients by Adam's feature scale (sqrt(v_hat) + eps)^(-1/2) of the "
        "meta-training optimizer before projecting, so the estimate works in AdamW's geometry "
        "(docs/method.md, 'Adam geometry'). 'none' (default): raw gradients. 'auto': Adam's when the collector "
        "runs as a Trainer callback whose optimizer has Adam state (or collect() gets optimizer= / "
        "preconditioner=), else raw gradients; 'adam': required (error if unavailable). Use it when the target "
        "fine-tune runs AdamW at a small learning rate and you check the estimates against real fine-tunes; "
        "docs/method.md compares both geometries.",
    )
    shard_size: int = field(default=1024, metadata={"help": "Examples per on-disk shard (unit of resume)."})
    output_dir: str | None = _runtime(
        "Cache directory. Default: <TrainingArguments.output_dir>/grad_cache.", default=None
    )
    overwrite: bool = _runtime(
        "Replace an existing cache whose manifest differs instead of refusing.", default=False
    )
    self_check: bool = _runtime(
        "After collecting, compare the cached outputs of a few rows per split with the model's own forward pass "
        "on the rows as the trainer sees them, and stop with CollectionSelfCheckError when they differ.",
        default=True,
    )

    def __post_init__(self) -> None:
        self._check_choices()
        _check_positive("proj_dim", self.proj_dim)
        _check_positive("sparse_nnz", self.sparse_nnz)
        if self.proj_type == "sparse" and self.sparse_nnz > self.proj_dim:
            raise ConfigError(f"sparse_nnz={self.sparse_nnz} cannot exceed proj_dim={self.proj_dim}.")
        _check_positive("proj_chunk_size", self.proj_chunk_size)
        _check_positive("batch_size", self.batch_size)
        _check_positive("max_length", self.max_length)
        if not 0.0 < self.prob_clamp < 0.5:
            raise ConfigError(f"prob_clamp must lie in (0, 0.5), got {self.prob_clamp!r}.")
        _check_positive("shard_size", self.shard_size)
        _check_positive("proj_cache_mb", self.proj_cache_mb, allow_zero=True)


@dataclass
class EstimatorConfig(ConfigMixin):
    """How :class:`~hf_subset_select.FirstOrderEstimator` solves the per-subset logistic regression.

    See ``docs/method.md`` for the math behind every field.
    """

    config_type = "estimator_config"
    runtime_fields = ("chunk_size", "num_threads")

    l2: float | None = field(
        default=None,
        metadata={
            "help": "L2 strength λ. None: the budget rule when finetune_lr and finetune_steps are set, else the "
            "automatic trust-radius rule (see docs/method.md); calibrate() overrides it from a few real "
            "fine-tuning results."
        },
    )
    finetune_lr: float | None = field(
        default=None,
        metadata={
            "help": "Learning rate of the target fine-tune the estimate stands for (its mean over the schedule, "
            "sum of per-step rates / steps). With finetune_steps it replaces the trust-radius rule by the budget "
            "rule λ = 1 / (η_eff · steps) (docs/method.md, section 6). Default: unset."
        },
    )
    finetune_steps: int | None = field(
        default=None,
        metadata={
            "help": "Optimizer steps of that fine-tune: per subset with reduction='mean'; with reduction='sum', "
            "the steps of the same number of epochs over all training rows (a subset takes its share)."
        },
    )
    finetune_optimizer: Literal["adamw", "sgd"] = _choice(
        "adamw",
        ("adamw", "sgd"),
        "Optimizer of that fine-tune, for the budget rule: 'adamw' (step size η_eff = η / κ in a cache "
        "collected in Adam geometry, η / (D̄ κ) for raw gradients, with D̄ from the cache manifest's adam_scalars "
        "and the noise scale κ from the cache and finetune_batch_size) or 'sgd' (η_eff = η; raw-gradient caches "
        "only).",
    )
    finetune_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Examples per optimizer step of that fine-tune (per device x accumulation x processes); the "
            "budget rule needs it for AdamW, whose step size depends on its minibatch noise."
        },
    )
    trust_radius: float = field(
        default=1.0,
        metadata={
            "help": "Automatic λ rule: λ is set so that a typical random subset's fitted step changes the "
            "outputs of its own training examples by this much (RMS, in log-odds units)."
        },
    )
    step_scale: float = field(
        default=1.0,
        metadata={
            "help": "Multiplies the fitted step ŵ before the target loss is evaluated (set by calibrate())."
        },
    )
    solver: Literal["fast", "exact"] = _choice(
        "fast",
        ("fast", "exact"),
        "'fast' (second-order model from per-source sufficient statistics; cost per subset "
        "independent of the number of examples) or 'exact' (batched Newton-CG on all examples).",
    )
    reduction: Literal["mean", "sum"] = _choice(
        "mean",
        ("mean", "sum"),
        "'mean': the training loss of a subset is averaged over its examples (a fixed number "
        "of fine-tuning steps per subset); 'sum': summed (a fixed number of epochs; bigger subsets "
        "move further).",
    )
    include_target_train: bool = field(
        default=True,
        metadata={
            "help": "Always add the target's own training source (if the cache has one) to every subset."
        },
    )
    reduce_dim: int | None = field(
        default=None,
        metadata={
            "help": "Fast path: keep this many principal curvature directions exactly and model the rest "
            "as isotropic. None: automatic (256 when d > 256, else no reduction). Set it >= d to turn the "
            "reduction off."
        },
    )
    chunk_size: int = _runtime("Subsets solved together in one batched call (fast path).", default=64)
    num_threads: int | None = _runtime(
        "Fast path: chunks are solved in this many Python threads, each running single-threaded "
        "kernels (torch's thread count is set to 1 during the call and restored). None: "
        "torch.get_num_threads().",
        default=None,
    )
    fast_dtype: Literal["float32", "float64"] = _choice(
        "float32",
        ("float32", "float64"),
        "Precision of the fast path ('float32' is about twice as fast; a subset whose matrix "
        "is not positive definite in float32 is redone in float64). The exact solver is always float64.",
    )
    max_iter: int = field(default=50, metadata={"help": "Maximum Newton iterations of the exact solver."})
    tol: float = field(
        default=1e-8,
        metadata={
            "help": "Exact solver stops when ||∇J(ŵ)|| <= tol * ||∇J(0)|| for every subset in the batch."
        },
    )
    seed: int = field(
        default=0, metadata={"help": "Seed of the reference subsets used by the automatic λ rule."}
    )

    def __post_init__(self) -> None:
        self._check_choices()
        _check_positive("l2", self.l2, allow_none=True)
        _check_positive("finetune_lr", self.finetune_lr, allow_none=True)
        _check_positive("finetune_steps", self.finetune_steps, allow_none=True)
        if (self.finetune_lr is None) != (self.finetune_steps is None):
            raise ConfigError(
                "The budget λ rule needs both finetune_lr and finetune_steps (the target fine-tune's learning rate "
                f"and optimizer steps); got finetune_lr={self.finetune_lr!r}, finetune_steps={self.finetune_steps!r}. "
                "Set both, or neither for the trust-radius rule."
            )
        _check_positive("finetune_batch_size", self.finetune_batch_size, allow_none=True)
        _check_positive("trust_radius", self.trust_radius)
        _check_positive("step_scale", self.step_scale, allow_zero=True)
        _check_positive("reduce_dim", self.reduce_dim, allow_none=True)
        _check_positive("chunk_size", self.chunk_size)
        _check_positive("num_threads", self.num_threads, allow_none=True)
        _check_positive("max_iter", self.max_iter)
        _check_positive("tol", self.tol)

    @classmethod
    def from_training_args(
        cls, args: Any, num_train_examples: int | None = None, **fields: Any
    ) -> EstimatorConfig:
        """The budget λ rule's fields read off the ``TrainingArguments`` (or TRL ``SFTConfig``) of a fine-tune.

        ``finetune_lr`` is the learning rate averaged over the run's schedule (warmup and decay included, from
        transformers' own scheduler), ``finetune_optimizer`` comes from ``args.optim`` and ``finetune_batch_size``
        is per-device batch x gradient accumulation x processes. With ``args.max_steps > 0``
        every subset gets the same number of steps: ``reduction="mean"``, ``finetune_steps = max_steps``. Otherwise
        the fine-tune runs ``num_train_epochs`` epochs and a bigger subset takes more steps: ``reduction="sum"``, and
        ``finetune_steps`` counts those epochs over ``num_train_examples`` rows (all training rows of the cache, so
        a subset takes its share); pass that number. Weight decay and gradient clipping are not modelled.

        Args:
            args: the fine-tune's ``transformers.TrainingArguments``.
            num_train_examples: training rows of every source together (needed for epoch-based runs).
            **fields: other :class:`EstimatorConfig` fields (they win over what is read from ``args``).
        """
        from .estimate.regularization import budget_fields_from_training_args

        return cls(**budget_fields_from_training_args(args, num_train_examples, **fields))


@dataclass
class SelectConfig(ConfigMixin):
    """How :func:`~hf_subset_select.select_sources` scores and keeps sources."""

    config_type = "select_config"

    method: Literal[
        "random_ensemble", "linear", "forward", "gradient_similarity", "representation_similarity", "random"
    ] = _choice(
        "random_ensemble",
        (
            "random_ensemble",
            "linear",
            "forward",
            "gradient_similarity",
            "representation_similarity",
            "random",
        ),
        "'random_ensemble' (score = mean estimated loss of the random subsets that hold the source), 'linear' "
        "(coefficients of a linear fit of the estimates on subset membership) or 'forward' (greedy forward "
        "selection on the estimates); or a baseline, scored without the estimates (higher is better): "
        "'gradient_similarity', 'representation_similarity' (mean cosine of a source's gradients / "
        "representations to the target's) or 'random' (seeded random draws).",
    )
    num_subsets: int = field(
        default=2000, metadata={"help": "Random subsets to estimate (ensemble / linear)."}
    )
    subset_ratio: float = field(
        default=0.5,
        metadata={
            "help": "Probability α that a source is in a random subset; the 'random' baseline keeps this share "
            "of the candidates when neither top_k nor threshold is set."
        },
    )
    top_k: int | None = field(
        default=None,
        metadata={
            "help": "Keep the k best sources (instead of a threshold); 'forward' keeps the first k of its "
            "greedy path."
        },
    )
    threshold: float | None = field(
        default=None,
        metadata={
            "help": "Keep sources whose score is better than this: below it for our methods (an estimated "
            "target loss), above it for the baselines. None: keep sources that lower the estimate (ensemble: "
            "mean loss with the source below the mean without it; linear: negative coefficient; forward: the "
            "greedy path's own stop); the similarity baselines keep sources above the mean similarity."
        },
    )
    confidence: float | None = field(
        default=None,
        metadata={
            "help": "Account for estimation uncertainty in the default keep rule of our methods: keep a source "
            "(ensemble: its effect; forward: each step of the greedy path) only if its estimated improvement of "
            "the target loss exceeds this many standard errors over the target rows, so that a gain carried by "
            "a few rows is not taken for one that holds on new rows; with no such source the selection is the "
            "target's data alone. None: keep every estimated improvement. 1.64: a one-sided test at the 0.95 level."
        },
    )
    interval_level: float | None = field(
        default=None,
        metadata={
            "help": "Confidence intervals at this level (e.g. 0.95) on every score and effect of our methods: a "
            "bootstrap over the sampled subsets and the target rows (docs/uncertainty.md). None: none."
        },
    )
    bootstrap_samples: int = field(default=1000, metadata={"help": "Bootstrap replicates of the intervals."})
    require_significant: bool = field(
        default=False,
        metadata={
            "help": "Keep a source only if its effect interval excludes 'no effect' on the helpful side (upper "
            "bound below 0; forward: each step), on top of the keep rule. Needs interval_level."
        },
    )
    seed: int = field(default=0, metadata={"help": "Seed for the random subsets (and the bootstrap)."})
    temperature: float = field(
        default=1.0,
        metadata={"help": "Softmax temperature turning standardized scores into sampling weights."},
    )

    def __post_init__(self) -> None:
        self._check_choices()
        _check_positive("num_subsets", self.num_subsets)
        if self.interval_level is not None and not 0.0 < self.interval_level < 1.0:
            raise ConfigError(
                f"interval_level must lie in (0, 1) (e.g. 0.95) or be None, got {self.interval_level!r}."
            )
        if self.bootstrap_samples < 20 or (self.require_significant and self.interval_level is None):
            raise ConfigError(
                "bootstrap_samples must be >= 20, and require_significant=True needs interval_level."
            )
        if not 0.0 < self.subset_ratio < 1.0:
            raise ConfigError(f"subset_ratio must lie in (0, 1), got {self.subset_ratio!r}.")
        _check_positive("top_k", self.top_k, allow_none=True)
        _check_positive("temperature", self.temperature)
        if self.confidence is not None and not (
            isinstance(self.confidence, (int, float)) and 0.0 <= self.confidence < math.inf
        ):
            raise ConfigError(
                f"confidence must be a number of standard errors >= 0 (e.g. 1.64) or None, got {self.confidence!r}."
            )
