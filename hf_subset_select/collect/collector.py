"""GradientCollector: per-example projected gradients and outputs at θ*, written as a :class:`GradientCache`.

Use it as a ``transformers.TrainerCallback`` (one extra pass at ``on_train_end``, after the meta-init
training run) or standalone on a model restored with :func:`~hf_subset_select.load_meta_init`::

    collector = GradientCollector(CollectConfig(proj_dim=2048), train_dataset=train, target_dataset=target_eval)
    trainer = SFTTrainer(..., callbacks=[MetaInitCallback(), collector])
    trainer.train()                                   # writes <output_dir>/grad_cache
    cache = collector.collect(model, tokenizer, output_dir="grad_cache")   # or without a Trainer

The pass never reuses the optimizer's (batch-summed) gradients: the model goes to eval mode (no dropout), every
example gets its own gradient, and the previous train/eval mode and attention kernel are restored afterwards.
With ``CollectConfig.precondition="auto"`` (opt-in; the default is raw gradients) each per-example gradient is
scaled by Adam's feature scale ``s = (sqrt(v̂) + eps)^(-1/2)`` read from the meta-training optimizer before it is
projected, so the estimate works in AdamW's geometry (docs/method.md, "Adam geometry"); the scale is stored with
the cache. Either way, when the optimizer has Adam state, the manifest records AdamW's step size in a few numbers
(``precondition.adam_scalars``) for the estimator's budget rule.

**A new target against an existing training cache.** Collecting the training pool is the expensive part; a new
target costs only its own rows with ``train_cache=``::

    collector = GradientCollector(target_dataset=new_target_eval, tokenizer=tok, train_cache="grad_cache")
    target_cache = collector.collect(model, output_dir="grad_cache_new_target")   # target rows only
    est = FirstOrderEstimator(GradientCache.load("grad_cache"), target=target_cache)

The collection settings default to the training cache's (its manifest's ``collect_config``); before any gradient
is computed, θ* (its fingerprint), the projection, the geometry (the training cache's stored preconditioner is
reused) and the output function are checked against the training cache's manifest, and a difference is refused with
:class:`~.compat.TargetCacheMismatchError` naming the field and the fix (:mod:`.compat`).

The collector only wires the pieces: :mod:`.rows` orders and encodes the examples, :mod:`.engine` computes the
cache columns, and :mod:`.store` owns the directory (shards, resume, reuse, refusal with
:class:`~.store.CollectionMismatchError`, the merge). Each process of a distributed run computes every k-th shard.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback

from .. import __version__
from ..config import CollectConfig
from ..data.sources import target_of
from ..faults import kill_point
from ..io_utils import fingerprint_tensors, read_json
from .cache import SPLIT_TARGET, GradientCache
from .compat import TargetCacheMismatchError, check_collection, train_geometry
from .distributed import DistState, dist_state
from .engine import GradientEngine, base_config, pad_token_id
from .outputs import OutputSpec, resolve_output_fn
from .per_example import trainable_parameters
from .precondition import resolve_preconditioner
from .projection import Projector, make_projector
from .rows import EncodedRows, RowPlan, RowSource, plan_rows
from .selfcheck import CollectionSelfCheckError, self_check
from .sharded import full_tensors, idle_batches, is_fsdp2, max_over_ranks, sharded_optimizer
from .store import CollectionMismatchError, GradientStore, collection_key
from .trainer_rows import TrainerRows

__all__ = [
    "GradientCollector",
    "CollectionMismatchError",
    "CollectionSelfCheckError",
    "TargetCacheMismatchError",
]

logger = get_logger(__name__)

META_INIT_MANIFEST = "meta_init.json"


class GradientCollector(TrainerCallback):
    """Collect per-example projected gradients of the output f at θ* into a :class:`GradientCache`.

    Args:
        config: :class:`~hf_subset_select.CollectConfig` (projection, batch size, output function, shards, ...).
        train_dataset: every training example of every source, tagged with ``source`` and ``example_id``
            (:func:`~hf_subset_select.tag_sources`); raw (text / messages / prompt-completion) or pre-tokenized.
        target_dataset: the target task's evaluation examples, tagged (:func:`~hf_subset_select.tag_target_eval`).
        tokenizer: used to encode raw examples; in a Trainer the callback's ``processing_class`` is used when
            this is None.
        output_fn: optional callable ``fn(model_output, batch) -> Tensor[B]`` replacing ``config.output_fn``.
        train_cache: an existing training cache (a directory or a :class:`GradientCache`): collect only the
            target rows, with the same θ*, projection, geometry and output function (checked, see the module doc);
            then leave ``train_dataset`` out, and ``config`` None to take the training cache's settings. The result
            is a target-only cache (no training rows) for ``FirstOrderEstimator(train, target=...)``.

    As a callback of ``SubsetSelectTrainer`` / ``SubsetSelectSFTTrainer`` the collector is bound to the trainer
    (:meth:`bind_trainer`) and collects the rows the trainer trains on: its processed ``train_dataset``, and the
    target rows processed by the trainer's own code (:mod:`.trainer_rows`). Otherwise tokenized rows are used as
    they are and raw rows are encoded by TRL's rules (:mod:`hf_subset_select.data.encode`). Either way a
    self-check compares a few cached outputs with the model's own forward pass on those rows (:mod:`.selfcheck`).

    After a run, ``self.cache`` holds the merged cache (on every process) and ``self.cache_dir`` its directory.
    """

    def __init__(
        self,
        config: CollectConfig | None = None,
        train_dataset: Any = None,
        target_dataset: Any = None,
        tokenizer: Any = None,
        *,
        output_fn: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor] | None = None,
        train_cache: str | os.PathLike | GradientCache | None = None,
    ) -> None:
        self.train_cache: GradientCache | None = None
        self.train_cache_path: str | None = None
        if train_cache is not None:
            if train_dataset is not None:
                raise ValueError(
                    "Pass either train_dataset= (collect the training pool and the target) or train_cache= (collect "
                    "only the target against an existing training cache), not both."
                )
            if isinstance(train_cache, GradientCache):
                self.train_cache = train_cache
            else:
                self.train_cache_path = os.fspath(train_cache)
                self.train_cache = GradientCache.load(self.train_cache_path)
            if config is None:
                config = _config_of(self.train_cache)
        self.config = config if config is not None else CollectConfig()
        if not isinstance(self.config, CollectConfig):
            raise TypeError(f"config must be a CollectConfig, got {type(self.config).__name__}.")
        if train_dataset is None and self.train_cache is None:
            raise ValueError(
                "GradientCollector needs train_dataset= (every training example of every source, tagged with "
                "tag_sources) to know which examples to collect."
            )
        if target_dataset is None:
            raise ValueError(
                "GradientCollector needs target_dataset= (the target's evaluation examples, tagged with "
                "tag_target_eval): the estimate compares every subset on them."
            )
        self.train_dataset = train_dataset
        self.target_dataset = target_dataset
        self.tokenizer = tokenizer
        self.output_fn = output_fn
        self.cache: GradientCache | None = None
        self.cache_dir: str | None = None
        self.stats: dict[str, Any] = {}
        self.trainer: Any = None

    # ------------------------------------------------------------------ Trainer hooks
    def bind_trainer(self, trainer: Any) -> None:
        """Collect the rows ``trainer`` trains on (called by ``SubsetSelectTrainerMixin``; see the class doc)."""
        if self.train_cache is not None:
            raise ValueError(
                "A target-only collector (train_cache=...) runs standalone: call collector.collect(model, ...) on "
                "θ* (load_meta_init) instead of passing it to a Trainer as a callback."
            )
        self.trainer = trainer

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradientCollector.on_train_end received no model from the Trainer.")
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        output_dir = self.config.output_dir or os.path.join(args.output_dir, "grad_cache")
        self.collect(
            model,
            tokenizer,
            output_dir=output_dir,
            disable_tqdm=bool(getattr(args, "disable_tqdm", False)),
            optimizer=kwargs.get("optimizer"),
        )

    # ------------------------------------------------------------------ the pass
    def collect(
        self,
        model: Any,
        tokenizer: Any = None,
        output_dir: str | os.PathLike | None = None,
        *,
        disable_tqdm: bool = False,
        optimizer: Any = None,
        preconditioner: Mapping[str, torch.Tensor] | None = None,
    ) -> GradientCache:
        """Run the collection pass on ``model`` (θ*) and return the merged :class:`GradientCache` (on every process;
        every process of a distributed run must call this).

        Args:
            optimizer: the meta-training optimizer (torch Adam/AdamW, possibly wrapped by accelerate; the Trainer
                callback passes it); with ``config.precondition`` "auto" or "adam" its preconditioner scales the
                gradients.
            preconditioner: an explicit feature scale ``{name: tensor}`` per trainable parameter instead of
                ``optimizer`` (recorded as kind "custom").

        Raises:
            CollectionMismatchError: ``output_dir`` holds a cache or partial collection made with other settings,
                parameters or data (and ``config.overwrite`` is False).
            ShardedParametersError: sharding the collector cannot use (FSDP1, ZeRO-3; see :mod:`.sharded`).
            PreconditionerError: ``config.precondition="adam"`` and the optimizer has no Adam state.
            CollectionSelfCheckError: the cached outputs of the sampled rows differ from the model's own forward
                pass on the rows the trainer trains on (``config.self_check``).
            TargetCacheMismatchError: with ``train_cache``, θ*, the projection, geometry or output function differ.
        """
        cfg = self.config
        output_dir = os.fspath(output_dir or cfg.output_dir or "")
        if not output_dir:
            raise ValueError("Pass output_dir= to collect() or set CollectConfig(output_dir=...).")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        dist, start_time = dist_state(), time.perf_counter()
        spec = resolve_output_fn(model, self.output_fn or cfg.output_fn, prob_clamp=cfg.prob_clamp)
        named = trainable_parameters(model)
        optimizer = sharded_optimizer(model, named, optimizer, cfg)  # refuses what cannot run sharded, up front
        projector = make_projector(
            cfg.proj_type,
            cfg.proj_dim,
            cfg.seed,
            [(n, tuple(p.shape)) for n, p in named],
            nnz=cfg.sparse_nnz,
            chunk_size=cfg.proj_chunk_size,
            cache_mb=cfg.proj_cache_mb,
        )
        theta_fp = fingerprint_tensors(full_tensors(named))  # FSDP2: the full tensors, as unsharded
        if self.train_cache is not None:  # a target-only collection: the training cache's geometry, checked
            scale, precondition = train_geometry(
                self.train_cache, cfg, model, named, optimizer, preconditioner, dist
            )
            check_collection(self.train_cache, projector.manifest(), spec, theta_fp, precondition, cfg)
        else:
            scale, precondition = resolve_preconditioner(
                cfg.precondition, model, named, optimizer, preconditioner, dist
            )
        source = self._row_source(spec, tokenizer, model)
        plan, target_source = self._plan(source)
        key = self._key(projector, spec, theta_fp, plan, precondition)
        store = GradientStore(
            output_dir,
            key,
            num_rows=len(plan.rows),
            shard_size=cfg.shard_size,
            dist=dist,
            overwrite=cfg.overwrite,
        )
        action = store.open()
        if action == "reuse":
            logger.info(f"GradientCollector: {output_dir} already holds this collection; reusing it.")
            return self._loaded(store, model, spec, plan, source)
        if action == "overwrite":
            logger.warning(f"GradientCollector: overwriting the collection in {output_dir} (overwrite=True).")

        mine, reused = store.pending()
        engine = GradientEngine(
            model,
            spec,
            projector,
            batch_size=cfg.batch_size,
            grad_method=cfg.grad_method,
            representations=cfg.representations,
            scale=scale,
            pad_id=pad_token_id(model, tokenizer),
        )
        compute_s = self._compute_shards(engine, store, plan, mine, source, dist, disable_tqdm)
        computed = sum(len(store.shard_rows(i)) for i in mine)
        manifest = self._manifest(projector, spec, theta_fp, model, plan, dist, engine.method_used)
        manifest["precondition"] = precondition
        manifest.update(self._train_cache_entry())
        manifest["collection_stats"] = {
            "examples_computed_main_process": computed,
            "examples_reused_from_shards": reused,
            "seconds": round(time.perf_counter() - start_time, 3),
            "compute_seconds_main_process": round(compute_s, 3),
        }
        store.finish(
            manifest,
            sources=plan.sources,
            target_source=target_source,
            dim=projector.dim,
            preconditioner=scale,
        )
        self._loaded(store, model, spec, plan, source)
        elapsed = time.perf_counter() - start_time
        self.stats = {
            "examples": len(plan.rows),
            "computed": computed,
            "reused": reused,
            "skipped": sum(plan.skipped.values()),
            "seconds": elapsed,
            "compute_seconds": compute_s,
            "examples_per_s": computed / compute_s if compute_s > 0 else float("nan"),
            "grad_method": engine.method_used,
            "precondition": precondition["kind"],
        }
        self._log(projector, output_dir)
        return self.cache

    def _log(self, projector: Projector, output_dir: str) -> None:
        st = self.stats
        logger.info(
            f"GradientCollector: {st['examples']} examples in {st['seconds']:.1f}s ({st['computed']} computed on "
            f"this process at {st['examples_per_s']:.1f} examples/s, {st['reused']} reused from shards, "
            f"{st['skipped']} skipped without supervised tokens), d={projector.dim} ({projector.kind}), "
            f"precondition={st['precondition']}, written to {output_dir}"
        )

    def _key(
        self,
        projector: Projector,
        spec: OutputSpec,
        theta_fp: str,
        plan: RowPlan,
        precondition: Mapping[str, Any],
    ) -> dict[str, Any]:
        """The collection key: the result-shaping settings, θ* and the rows' content."""
        cfg = self.config
        settings = {
            "projection": projector.manifest(),
            "output_fn": spec.name,
            "model_kind": spec.kind,
            "prob_clamp": cfg.prob_clamp,
            "max_length": cfg.max_length,
            "theta_fingerprint": theta_fp,
            "sources": list(plan.sources),
            "shard_size": cfg.shard_size,
            "representations": cfg.representations,
        }
        if self.train_cache is not None:  # a target-only collection: tied to its training cache
            settings["train_cache_fingerprint"] = self.train_cache.fingerprint()
        return collection_key(settings, plan.key_entries(), precondition)

    def _train_cache_entry(self) -> dict[str, Any]:
        """The manifest's ``train_cache`` entry of a target-only collection (empty otherwise)."""
        if self.train_cache is None:
            return {}
        return {"train_cache": {"fingerprint": self.train_cache.fingerprint(), "path": self.train_cache_path}}

    def _plan(self, source: RowSource) -> tuple[RowPlan, str | None]:
        """The rows to collect (the target's only against a training cache) and the target's training source."""
        if self.train_cache is not None:
            return plan_rows(source, splits=(SPLIT_TARGET,)), None
        plan = plan_rows(source)
        target_source = target_of(self.train_dataset)
        if target_source is not None and target_source not in plan.sources:
            raise ValueError(
                f"target_source={target_source!r} is not among the collected sources {plan.sources}."
            )
        return plan, target_source

    def _row_source(self, spec: OutputSpec, tokenizer: Any, model: Any) -> RowSource:
        """The trainer's rows when bound to a trainer, else the collector's own."""
        max_length = self.config.max_length
        if self.trainer is not None and self.train_cache is None:
            return TrainerRows(
                self.trainer, self.train_dataset, self.target_dataset, max_length, spec.kind, tokenizer
            )
        pad_id = pad_token_id(model, tokenizer)
        return EncodedRows(self.train_dataset, self.target_dataset, tokenizer, max_length, spec.kind, pad_id)

    def _loaded(
        self, store: GradientStore, model: Any, spec: OutputSpec, plan: RowPlan, source: RowSource
    ) -> GradientCache:
        """Load the merged cache and, unless turned off, self-check it against the model's own forward pass."""
        self.cache = store.load()
        self.cache_dir = store.output_dir
        if self.config.self_check:
            self_check(model, spec, self.cache, plan, source)
        return self.cache

    def _compute_shards(
        self,
        engine: GradientEngine,
        store: GradientStore,
        plan: RowPlan,
        mine: list[int],
        source: RowSource,
        dist: DistState,
        disable_tqdm: bool,
    ) -> float:
        """Compute and write this rank's pending shards; returns the seconds spent computing."""
        from tqdm.auto import tqdm

        # FSDP2: every batch is a collective, so every rank runs as many batches as the busiest one
        fsdp = is_fsdp2(engine.model)
        batches = sum(-(-len(store.shard_rows(i)) // engine.batch_size) for i in mine)
        idle = max_over_ranks(batches) - batches if fsdp else 0
        if not mine and not idle:
            return 0.0
        compute_s = 0.0
        total = sum(len(store.shard_rows(i)) for i in mine)
        bar = tqdm(
            total=total, desc="Collecting gradients", unit="ex", disable=disable_tqdm or not dist.is_main
        )
        with engine.running():
            for index in mine:
                rows = [plan.rows[i] for i in store.shard_rows(index)]
                t0 = time.perf_counter()
                tensors = engine.compute([source.encode(r.split, r.row) for r in rows], bar)
                compute_s += time.perf_counter() - t0
                kill_point("shard_computed", index)
                tensors["example_ids"] = torch.tensor([r.example_id for r in rows], dtype=torch.int64)
                tensors["source_index"] = torch.tensor([r.source_index for r in rows], dtype=torch.int64)
                tensors["split"] = torch.tensor([r.split for r in rows], dtype=torch.int8)
                store.write_shard(index, tensors)
                kill_point("shard_written", index)
            if idle:
                first = plan.rows[0]
                idle_batches(engine, idle, source.encode(first.split, first.row))
        bar.close()
        return compute_s

    def _manifest(
        self,
        projector: Projector,
        spec: OutputSpec,
        theta_fp: str,
        model: Any,
        plan: RowPlan,
        dist: DistState,
        method_used: str,
    ) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "projection": projector.manifest(),
            "output_fn": spec.name,
            "model_kind": spec.kind,
            "prob_clamp": self.config.prob_clamp,
            "theta_fingerprint": theta_fp,
            "trainable_parameters": projector.num_params,
            "skipped": {
                "count": sum(plan.skipped.values()),
                "by_source": plan.skipped,
                "example_ids": plan.skipped_ids[:1000],
            },
            "collect_config": self.config.result_dict(),
            "model_class": type(model).__name__,
            "base_model_name_or_path": _name_or_path(model),
            "world_size": dist.world,
            "grad_method": method_used,
            "package_version": __version__,
        }
        meta = _find_meta_init(model)
        if meta is not None:
            manifest["meta_init"] = {
                "path": meta[0],
                "fingerprint": meta[1].get("fingerprint")
                if isinstance(meta[1].get("fingerprint"), str)
                else None,
                "matches_theta": meta[1].get("fingerprint") == theta_fp,
            }
        return manifest


def _config_of(cache: GradientCache) -> CollectConfig:
    """The CollectConfig a cache was collected with (its manifest's result fields; runtime fields at defaults)."""
    recorded = cache.manifest.get("collect_config")
    if not isinstance(recorded, dict):
        raise TargetCacheMismatchError(
            "The training cache's manifest has no 'collect_config' (it was not written by GradientCollector), so "
            "the target's collection settings cannot be taken from it. Pass config=CollectConfig(...) with the "
            "settings the training cache was collected with.",
            field="collect_config",
        )
    return CollectConfig.from_dict(recorded)


def _name_or_path(model: Any) -> str | None:
    config = base_config(model)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def _find_meta_init(model: Any) -> tuple[str, dict[str, Any]] | None:
    for path in (getattr(model, "name_or_path", None), _name_or_path(model)):
        if isinstance(path, str) and os.path.isfile(os.path.join(path, META_INIT_MANIFEST)):
            try:
                manifest = read_json(os.path.join(path, META_INIT_MANIFEST))
            except ValueError:
                return None
            return (path, manifest) if isinstance(manifest, dict) else None
    return None
