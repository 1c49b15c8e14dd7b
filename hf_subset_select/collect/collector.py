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

Examples are put in a canonical order (split, then ``example_id``) and cut into numbered shards; each process
of a distributed run takes every k-th shard, writes it atomically, and the main process merges the shards
into ``cache.safetensors``. A killed run resumes from the completed shards; a directory collected with
different settings, parameters or data is refused unless ``overwrite=True``. See docs/cache_format.md.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback

from .. import __version__
from ..config import CollectConfig
from ..data.encode import IGNORE_INDEX, encode_example
from ..data.sources import EXAMPLE_ID_COLUMN, SOURCE_COLUMN, target_of
from ..io_utils import atomic_write_json, fingerprint_tensors, read_json
from .cache import (
    CACHE_FORMAT_VERSION,
    DATA_NAME,
    MANIFEST_NAME,
    PRECONDITIONER_NAME,
    PROGRESS_NAME,
    SHARDS_DIR,
    SPLIT_TARGET,
    SPLIT_TRAIN,
    GradientCache,
    GradientCacheError,
    complete_shards,
    merge_shards,
    remove_collection_files,
    save_shard,
)
from .outputs import OutputSpec, resolve_output_fn
from .per_example import (
    PerExampleGradients,
    check_not_sharded,
    collate_examples,
    eager_attention,
    trainable_parameters,
)
from .precondition import (
    PreconditionerError,
    adam_preconditioner,
    adam_state_summary,
    adam_step_scalars,
    check_preconditioner,
    preconditioner_sha256,
    scale_gradients,
)
from .projection import Projector, make_projector

__all__ = ["GradientCollector", "CollectionMismatchError"]

logger = get_logger(__name__)

META_INIT_MANIFEST = "meta_init.json"


class CollectionMismatchError(GradientCacheError):
    """The output directory holds a cache (or partial collection) made with different settings, model or data."""


# ---------------------------------------------------------------------- distributed helpers
@dataclass
class _Dist:
    rank: int
    world: int
    barrier: Callable[[], None]

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _dist() -> _Dist:
    """Rank, world size and barrier: torch.distributed's if initialized, else accelerate's (which sets it up)."""
    import torch.distributed as dist
    from accelerate import PartialState

    state = PartialState()  # also what accelerate's logger needs
    if dist.is_available() and dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), dist.barrier)
    return _Dist(state.process_index, state.num_processes, state.wait_for_everyone)


# ---------------------------------------------------------------------- data helpers
def _column(dataset: Any, name: str) -> list[Any]:
    if hasattr(dataset, "column_names"):
        if name not in dataset.column_names:
            raise ValueError(
                f"The dataset has no {name!r} column (it has {dataset.column_names}). Tag it with "
                "hf_subset_select.tag_sources(...) (training sources) or tag_target_eval(...) (target evaluation)."
            )
        return list(dataset[name])
    rows = [dataset[i] for i in range(len(dataset))]
    if rows and name not in rows[0]:
        raise ValueError(
            f"The examples have no {name!r} field; tag them with hf_subset_select.tag_sources(...)."
        )
    return [r[name] for r in rows]


def _row(dataset: Any, index: int) -> dict[str, Any]:
    return dict(dataset[int(index)])


def _encode_seq2seq(example: Mapping[str, Any], tokenizer: Any, max_length: int) -> dict[str, Any]:
    if example.get("input_ids") is not None and example.get("labels") is not None:
        return {
            "input_ids": list(example["input_ids"])[:max_length],
            "labels": list(example["labels"])[:max_length],
        }
    if tokenizer is None:
        raise ValueError("Untokenized seq2seq examples need a tokenizer; pass tokenizer= to the collector.")
    if example.get("prompt") is None or example.get("completion") is None:
        raise ValueError(
            "Seq2seq collection needs prompt/completion columns (source text -> decoder labels) or pre-tokenized "
            f"input_ids/labels; got columns {sorted(example)}."
        )
    src = tokenizer(example["prompt"], truncation=True, max_length=max_length)["input_ids"]
    tgt = tokenizer(text_target=example["completion"], truncation=True, max_length=max_length)["input_ids"]
    return {"input_ids": list(src), "labels": list(tgt)}


def _has_supervision(encoded: Mapping[str, Any], kind: str) -> bool:
    if not encoded.get("input_ids"):
        return False
    if kind == "classification":
        return True
    labels = encoded["labels"][1:] if kind == "causal_lm" else encoded["labels"]
    return any(int(t) != IGNORE_INDEX for t in labels)


def _content_digest(encoded: Mapping[str, Any]) -> bytes:
    payload = json.dumps(
        [list(map(int, encoded["input_ids"])), encoded.get("labels", encoded.get("label"))],
        separators=(",", ":"),
    )
    return hashlib.blake2b(payload.encode(), digest_size=16).digest()


@dataclass
class _Item:
    split: int
    example_id: int
    source_index: int
    row: int  # row in its dataset


# ---------------------------------------------------------------------- the collector
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
    ) -> None:
        self.config = config if config is not None else CollectConfig()
        if not isinstance(self.config, CollectConfig):
            raise TypeError(f"config must be a CollectConfig, got {type(self.config).__name__}.")
        if train_dataset is None:
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

    # ------------------------------------------------------------------ Trainer hook
    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if model is None:
            raise ValueError("GradientCollector.on_train_end received no model from the Trainer.")
        tokenizer = self.tokenizer or kwargs.get("processing_class") or kwargs.get("tokenizer")
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor wraps its tokenizer
        output_dir = self.config.output_dir or os.path.join(args.output_dir, "grad_cache")
        self.collect(
            model,
            tokenizer,
            output_dir=output_dir,
            disable_tqdm=bool(getattr(args, "disable_tqdm", False)),
            optimizer=kwargs.get("optimizer"),
        )

    # ------------------------------------------------------------------ planning
    def _plan(
        self, spec: OutputSpec, tokenizer: Any
    ) -> tuple[list[str], list[_Item], list[bytes], dict[str, int], list[int]]:
        """Canonical item order, per-item content digests, skipped counts per source and skipped ids."""
        sources: list[str] = []
        items: list[tuple[int, int, int, int]] = []
        for split, dataset in ((SPLIT_TRAIN, self.train_dataset), (SPLIT_TARGET, self.target_dataset)):
            names = _column(dataset, SOURCE_COLUMN)
            ids = _column(dataset, EXAMPLE_ID_COLUMN)
            for row, (name, ex_id) in enumerate(zip(names, ids)):
                if name not in sources:
                    sources.append(str(name))
                items.append((split, int(ex_id), sources.index(name), row))
        items.sort(key=lambda t: (t[0], t[1]))
        seen = set()
        for split, ex_id, _, _ in items:
            if (split, ex_id) in seen:
                raise ValueError(
                    f"example_id {ex_id} occurs twice in the {'target' if split else 'training'} data: tag every "
                    "source once, in one tag_sources call (and the target split with tag_target_eval)."
                )
            seen.add((split, ex_id))
        kept: list[_Item] = []
        digests: list[bytes] = []
        skipped: dict[str, int] = {}
        skipped_ids: list[int] = []
        for split, ex_id, src, row in items:
            encoded = self._encode(self._dataset(split), row, spec, tokenizer)
            if not _has_supervision(encoded, spec.kind):
                skipped[sources[src]] = skipped.get(sources[src], 0) + 1
                skipped_ids.append(ex_id)
                continue
            kept.append(_Item(split, ex_id, src, row))
            digests.append(_content_digest(encoded))
        return sources, kept, digests, skipped, skipped_ids

    def _dataset(self, split: int) -> Any:
        return self.train_dataset if split == SPLIT_TRAIN else self.target_dataset

    def _encode(self, dataset: Any, row: int, spec: OutputSpec, tokenizer: Any) -> dict[str, Any]:
        example = _row(dataset, row)
        if spec.kind == "seq2seq":
            return _encode_seq2seq(example, tokenizer, self.config.max_length)
        return encode_example(
            example, tokenizer, self.config.max_length, classification=spec.kind == "classification"
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
        """Run the collection pass on ``model`` (θ*) and return the merged :class:`GradientCache`.

        Every process of a distributed run must call this. Returns the cache on every process.

        Args:
            optimizer: the meta-training optimizer (torch Adam/AdamW, possibly wrapped by accelerate); with
                ``config.precondition`` "auto" or "adam" its preconditioner scales the gradients. The Trainer
                callback passes the Trainer's optimizer.
            preconditioner: an explicit feature scale ``{name: tensor}`` per trainable parameter instead of
                ``optimizer`` (recorded as kind "custom").

        Raises:
            CollectionMismatchError: ``output_dir`` holds a cache or partial collection made with other settings,
                parameters or data (and ``config.overwrite`` is False).
            ShardedParametersError: parameters are sharded (FSDP / ZeRO-3).
            PreconditionerError: ``config.precondition="adam"`` and the optimizer has no Adam state.
        """
        cfg = self.config
        output_dir = os.fspath(output_dir or cfg.output_dir or "")
        if not output_dir:
            raise ValueError("Pass output_dir= to collect() or set CollectConfig(output_dir=...).")
        tokenizer = tokenizer if tokenizer is not None else self.tokenizer
        tokenizer = getattr(tokenizer, "tokenizer", tokenizer)
        dist = _dist()
        start_time = time.perf_counter()

        spec = resolve_output_fn(model, self.output_fn or cfg.output_fn, prob_clamp=cfg.prob_clamp)
        named = trainable_parameters(model)
        check_not_sharded(model, named)
        projector = make_projector(
            cfg.proj_type,
            cfg.proj_dim,
            cfg.seed,
            [(n, tuple(p.shape)) for n, p in named],
            nnz=cfg.sparse_nnz,
            chunk_size=cfg.proj_chunk_size,
            cache_mb=cfg.proj_cache_mb,
        )
        scale, precondition = self._preconditioner(model, named, optimizer, preconditioner, dist)
        sources, items, digests, skipped, skipped_ids = self._plan(spec, tokenizer)
        target_source = target_of(self.train_dataset)
        if target_source is not None and target_source not in sources:
            raise ValueError(f"target_source={target_source!r} is not among the collected sources {sources}.")
        theta_fp = fingerprint_tensors(named)
        key = self._collection_key(spec, projector, theta_fp, sources, items, digests, precondition)
        num_shards = (len(items) + cfg.shard_size - 1) // cfg.shard_size
        shards_dir = os.path.join(output_dir, SHARDS_DIR)

        # 1. What is already on disk? (every rank checks, so that every rank raises the same error)
        action = self._check_existing(output_dir, key)
        if action == "reuse":
            dist.barrier()
            if dist.is_main:
                _remove_shards(output_dir)
            logger.info(f"GradientCollector: {output_dir} already holds this collection; reusing it.")
            self.cache = GradientCache.load(output_dir)
            self.cache_dir = output_dir
            dist.barrier()
            return self.cache
        dist.barrier()
        if dist.is_main:
            if action == "overwrite":
                logger.warning(
                    f"GradientCollector: overwriting the collection in {output_dir} (overwrite=True)."
                )
                remove_collection_files(output_dir)
            elif os.path.exists(os.path.join(output_dir, MANIFEST_NAME)):
                _remove_final_files(output_dir)
            os.makedirs(shards_dir, exist_ok=True)
            atomic_write_json(os.path.join(shards_dir, PROGRESS_NAME), key)
        dist.barrier()

        # 2. This rank's shards, minus those already complete.
        done = complete_shards(shards_dir)
        done = {i: m for i, m in done.items() if i < num_shards and m.get("key_digest") == key["digest"]}
        mine = [i for i in range(num_shards) if i % dist.world == dist.rank and i not in done]
        todo_rows = sum(min(cfg.shard_size, len(items) - i * cfg.shard_size) for i in mine)
        reused = len(items) - sum(
            min(cfg.shard_size, len(items) - i * cfg.shard_size) for i in range(num_shards) if i not in done
        )
        computed, method_used, compute_s = self._run_shards(
            model,
            tokenizer,
            spec,
            projector,
            items,
            mine,
            shards_dir,
            key,
            todo_rows,
            dist,
            disable_tqdm,
            scale,
        )
        dist.barrier()

        # 3. Merge on the main process.
        if dist.is_main:
            missing = [i for i in range(num_shards) if i not in complete_shards(shards_dir, verify=False)]
            if missing:
                raise GradientCacheError(
                    f"Shards {missing[:5]} are missing after collection (a process failed?); re-run to resume."
                )
            elapsed = time.perf_counter() - start_time
            manifest = self._manifest(
                key, projector, spec, theta_fp, model, skipped, skipped_ids, dist, method_used
            )
            manifest["precondition"] = precondition
            manifest["collection_stats"] = {
                "examples_computed_main_process": computed,
                "examples_reused_from_shards": reused,
                "seconds": round(elapsed, 3),
                "compute_seconds_main_process": round(compute_s, 3),
            }
            cache = merge_shards(
                shards_dir,
                range(num_shards),
                sources=sources,
                target_source=target_source,
                manifest=manifest,
                dim=projector.dim,
                preconditioner=scale,
            )
            cache.save(output_dir)
            _remove_shards(output_dir)
        dist.barrier()
        self.cache = GradientCache.load(output_dir)
        self.cache_dir = output_dir
        elapsed = time.perf_counter() - start_time
        rate = computed / compute_s if compute_s > 0 else float("nan")
        self.stats = {
            "examples": len(items),
            "computed": computed,
            "reused": reused,
            "skipped": sum(skipped.values()),
            "seconds": elapsed,
            "compute_seconds": compute_s,
            "examples_per_s": rate,
            "grad_method": method_used,
            "precondition": precondition["kind"],
        }
        logger.info(
            f"GradientCollector: {len(items)} examples in {elapsed:.1f}s ({computed} computed on this process at "
            f"{rate:.1f} examples/s, {reused} reused from shards, {sum(skipped.values())} skipped without supervised "
            f"tokens), d={projector.dim} ({projector.kind}), precondition={precondition['kind']}, written to {output_dir}"
        )
        return self.cache

    def _run_shards(
        self,
        model: Any,
        tokenizer: Any,
        spec: OutputSpec,
        projector: Projector,
        items: Sequence[_Item],
        mine: Sequence[int],
        shards_dir: str,
        key: dict[str, Any],
        todo_rows: int,
        dist: _Dist,
        disable_tqdm: bool,
        scale: Mapping[str, torch.Tensor] | None = None,
    ) -> tuple[int, str, float]:
        from tqdm.auto import tqdm

        cfg = self.config
        if not mine:
            return 0, "none", 0.0
        device = next(p for _, p in trainable_parameters(model)).device
        if scale is not None:  # on the gradients' device once, not once per batch
            scale = {n: s.to(device) for n, s in scale.items()}
        pad_id = _pad_token_id(model, tokenizer)
        was_training = model.training
        model.eval()
        computed = 0
        compute_s = 0.0
        method = cfg.grad_method
        if spec.kind == "classification" and getattr(_base_config(model), "pad_token_id", None) is None:
            method = "loop"  # no pad id: the model pools the last position, so padding must not exist at all
        try:
            with eager_attention(model):
                engine = PerExampleGradients(
                    model, spec, method=method, with_representations=cfg.representations
                )
                bar = tqdm(
                    total=todo_rows,
                    desc="Collecting gradients",
                    unit="ex",
                    disable=disable_tqdm or not dist.is_main,
                )
                for index in mine:
                    rows = items[index * cfg.shard_size : (index + 1) * cfg.shard_size]
                    t0 = time.perf_counter()
                    tensors = self._compute_shard(
                        engine, projector, spec, tokenizer, rows, pad_id, device, bar, scale
                    )
                    compute_s += time.perf_counter() - t0
                    computed += len(rows)
                    shard_meta = {
                        "key_digest": key["digest"],
                        "example_ids_sha256": hashlib.sha256(
                            json.dumps([r.example_id for r in rows]).encode()
                        ).hexdigest(),
                        "rank": dist.rank,
                    }
                    save_shard(shards_dir, index, tensors, shard_meta)
                bar.close()
        finally:
            model.train(was_training)
        used = "loop" if engine.used_fallback else engine.method
        return computed, used, compute_s

    def _compute_shard(
        self,
        engine: PerExampleGradients,
        projector: Projector,
        spec: OutputSpec,
        tokenizer: Any,
        rows: Sequence[_Item],
        pad_id: int,
        device: torch.device,
        bar: Any,
        scale: Mapping[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        cfg = self.config
        encoded = [self._encode(self._dataset(r.split), r.row, spec, tokenizer) for r in rows]
        # Longest first: batches of similar length waste less compute on padding (results do not depend on it).
        order = sorted(range(len(rows)), key=lambda i: -len(encoded[i]["input_ids"]))
        features = torch.empty(len(rows), projector.dim, dtype=torch.float32)
        outputs = torch.empty(len(rows), dtype=torch.float32)
        reps: torch.Tensor | None = None
        for start in range(0, len(order), cfg.batch_size):
            idx = order[start : start + cfg.batch_size]
            batch = collate_examples([encoded[i] for i in idx], spec.kind, pad_token_id=pad_id)
            batch = {k: v.to(device) for k, v in batch.items()}
            result = engine(batch)
            # {name: [B, *shape]} from every gradient path (hooks, vmap, loop); Adam's geometry scales it here
            grads = result.grads if scale is None else scale_gradients(result.grads, scale)
            proj = projector.project(grads)
            features[idx] = proj.detach().float().cpu()
            outputs[idx] = result.outputs.detach().float().cpu()
            if result.representations is not None:
                if reps is None:
                    reps = torch.empty(len(rows), result.representations.shape[-1], dtype=torch.float32)
                reps[idx] = result.representations.detach().float().cpu()
            bar.update(len(idx))
        tensors = {
            "features": features,
            "outputs": outputs,
            "example_ids": torch.tensor([r.example_id for r in rows], dtype=torch.int64),
            "source_index": torch.tensor([r.source_index for r in rows], dtype=torch.int64),
            "split": torch.tensor([r.split for r in rows], dtype=torch.int8),
        }
        if reps is not None:
            tensors["representations"] = reps
        return tensors

    # ------------------------------------------------------------------ preconditioning
    def _preconditioner(
        self,
        model: Any,
        named: Sequence[tuple[str, torch.Tensor]],
        optimizer: Any,
        preconditioner: Mapping[str, torch.Tensor] | None,
        dist: _Dist,
    ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
        """The feature scale to apply (or None) and the manifest's ``precondition`` entry."""
        mode = self.config.precondition
        shapes = [(n, tuple(p.shape)) for n, p in named]
        if preconditioner is not None and optimizer is not None:
            raise ValueError("Pass either optimizer= or preconditioner= to collect(), not both.")
        # AdamW's step size in a few numbers, for the estimator's budget λ rule. Informational: not part of the
        # collection key, and only the main process (which writes the manifest) computes it.
        denominator: dict[str, Any] = {}
        if optimizer is not None and dist.is_main:
            try:
                denominator["adam_scalars"] = adam_step_scalars(optimizer, model)
            except PreconditionerError as exc:  # kept, so that the estimator can say why they are missing
                denominator["adam_scalars_error"] = str(exc)
        if mode == "none":
            if preconditioner is not None:
                raise ValueError(
                    "collect(preconditioner=...) was given but CollectConfig(precondition='none') asks for raw "
                    "gradients; drop the argument or set precondition='auto'."
                )
            return None, {"kind": "none", **denominator}
        scale: dict[str, torch.Tensor] | None = None
        info: dict[str, Any] = {"kind": "none"}
        error: PreconditionerError | None = None
        if preconditioner is not None:
            scale = check_preconditioner(preconditioner, shapes)
            info = {"kind": "custom"}
        else:
            try:
                scale = check_preconditioner(adam_preconditioner(optimizer, model), shapes)
                info = {"kind": "adam", **adam_state_summary(optimizer, model)}
            except PreconditionerError as exc:
                error = exc
        if scale is not None:
            info["sha256"] = preconditioner_sha256(scale)
        info.update(denominator)
        # every rank reaches this point (errors are raised after it), so no rank waits for one that gave up
        _check_same_on_every_rank(info.get("sha256") or ("error" if error else "none"), dist)
        if error is not None:
            if mode == "adam":
                raise error
            logger.info(
                f"GradientCollector: precondition='auto' collects raw gradients (no Adam preconditioner: {error})"
            )
        return scale, info

    # ------------------------------------------------------------------ manifest and resume checks
    def _collection_key(
        self,
        spec: OutputSpec,
        projector: Projector,
        theta_fp: str,
        sources: Sequence[str],
        items: Sequence[_Item],
        digests: Sequence[bytes],
        precondition: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        cfg = self.config
        ids = hashlib.sha256()
        for item, digest in zip(items, digests):
            ids.update(f"{item.split}:{item.example_id}:{sources[item.source_index]}\n".encode())
            ids.update(digest)
        key: dict[str, Any] = {
            "format_version": CACHE_FORMAT_VERSION,
            "projection": projector.manifest(),
            "output_fn": spec.name,
            "model_kind": spec.kind,
            "prob_clamp": cfg.prob_clamp,
            "max_length": cfg.max_length,
            "theta_fingerprint": theta_fp,
            "dataset_fingerprint": ids.hexdigest(),
            "num_examples": len(items),
            "sources": list(sources),
            "shard_size": cfg.shard_size,
            "representations": cfg.representations,
        }
        if precondition is not None and precondition.get("kind", "none") != "none":
            # only when scaled, so that caches collected before preconditioning existed are still reused
            key["precondition"] = {"kind": precondition["kind"], "sha256": precondition["sha256"]}
        key["digest"] = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return key

    def _check_existing(self, output_dir: str, key: dict[str, Any]) -> str:
        """'fresh', 'resume', 'reuse' or 'overwrite'; raises CollectionMismatchError when refused."""
        manifest_path = os.path.join(output_dir, MANIFEST_NAME)
        progress_path = os.path.join(output_dir, SHARDS_DIR, PROGRESS_NAME)
        existing: dict[str, Any] | None = None
        where = ""
        final = False
        if os.path.exists(manifest_path) and os.path.exists(os.path.join(output_dir, DATA_NAME)):
            try:
                existing = read_json(manifest_path).get("collection")
            except ValueError:
                existing = None
            if (
                existing is None
            ):  # a cache saved by other means (or a corrupt manifest): never clobber it silently
                existing = {"origin": "not written by GradientCollector"}
            where, final = manifest_path, True
        if existing is None and os.path.exists(progress_path):
            try:
                existing = read_json(progress_path)
            except ValueError:
                existing = {}
            where = progress_path
        if existing is None:
            if self.config.overwrite and (
                os.path.exists(manifest_path) or os.path.isdir(os.path.join(output_dir, SHARDS_DIR))
            ):
                return "overwrite"
            return "fresh"
        if existing.get("digest") == key["digest"] and _same(existing, key):
            return "reuse" if final else "resume"
        if self.config.overwrite:
            return "overwrite"
        diffs = _differences(existing, key)
        raise CollectionMismatchError(
            f"{output_dir!r} already holds a {'gradient cache' if final else 'partial collection'} made differently "
            f"({where}): {'; '.join(diffs) or 'settings differ'}. Use another output_dir, or pass "
            "CollectConfig(overwrite=True) to replace it."
        )

    def _manifest(
        self,
        key: dict[str, Any],
        projector: Projector,
        spec: OutputSpec,
        theta_fp: str,
        model: Any,
        skipped: dict[str, int],
        skipped_ids: list[int],
        dist: _Dist,
        method_used: str,
    ) -> dict[str, Any]:
        manifest: dict[str, Any] = {
            "collection": key,
            "projection": projector.manifest(),
            "output_fn": spec.name,
            "model_kind": spec.kind,
            "prob_clamp": self.config.prob_clamp,
            "theta_fingerprint": theta_fp,
            "dataset_fingerprint": key["dataset_fingerprint"],
            "trainable_parameters": projector.num_params,
            "skipped": {
                "count": sum(skipped.values()),
                "by_source": skipped,
                "example_ids": skipped_ids[:1000],
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
                "fingerprint": meta[1].get("fingerprint"),
                "matches_theta": meta[1].get("fingerprint") == theta_fp,
            }
        return manifest


# ---------------------------------------------------------------------- small helpers
def _same(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    labels = {
        "precondition": "the gradient preconditioner (optimizer state) differs: on disk "
        f"{(old.get('precondition') or {}).get('kind', 'none')}, now {(new.get('precondition') or {}).get('kind', 'none')}",
        "theta_fingerprint": "the model parameters (θ*) differ",
        "dataset_fingerprint": "the examples (ids, sources or token content) differ",
    }
    out = []
    for k in sorted(set(old) | set(new)):
        if k == "digest" or old.get(k) == new.get(k):
            continue
        if k in labels:
            out.append(labels[k])
        elif isinstance(old.get(k), dict) and isinstance(new.get(k), dict):
            for sub in sorted(set(old[k]) | set(new[k])):
                if old[k].get(sub) != new[k].get(sub):
                    out.append(f"{k}.{sub}: on disk {old[k].get(sub)!r}, now {new[k].get(sub)!r}")
        else:
            out.append(f"{k}: on disk {old.get(k)!r}, now {new.get(k)!r}")
    return out


def _check_same_on_every_rank(digest: str, dist: _Dist) -> None:
    """Every rank must scale by the same preconditioner (DDP keeps optimizer states identical; ZeRO does not)."""
    import torch.distributed as tdist

    if dist.world <= 1 or not (tdist.is_available() and tdist.is_initialized()):
        return
    digests: list[Any] = [None] * dist.world
    tdist.all_gather_object(digests, digest)
    if len(set(digests)) != 1:
        raise PreconditionerError(
            "The processes hold different optimizer states, so their Adam preconditioners differ (a partitioned "
            "optimizer?). Collect with CollectConfig(precondition='none'), or on one process with "
            "collect(..., preconditioner=adam_preconditioner(optimizer, model))."
        )


def _remove_shards(path: str) -> None:
    """Drop the shards once the merged cache is written."""
    shards_dir = os.path.join(path, SHARDS_DIR)
    if not os.path.isdir(shards_dir):
        return
    for name in os.listdir(shards_dir):
        if name == PROGRESS_NAME or name.startswith("shard-") or name.startswith(".tmp-"):
            os.remove(os.path.join(shards_dir, name))
    if not os.listdir(shards_dir):
        os.rmdir(shards_dir)


def _remove_final_files(path: str) -> None:
    """Drop a stale merged cache (its manifest first) while keeping shards that will be resumed."""
    for name in (MANIFEST_NAME, DATA_NAME, PRECONDITIONER_NAME):
        if os.path.exists(os.path.join(path, name)):
            os.remove(os.path.join(path, name))


def _base_config(model: Any) -> Any:
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base, "config", None)


def _pad_token_id(model: Any, tokenizer: Any) -> int:
    config = _base_config(model)
    for value in (getattr(config, "pad_token_id", None), getattr(tokenizer, "pad_token_id", None)):
        if isinstance(value, int):
            return value
    return 0


def _name_or_path(model: Any) -> str | None:
    config = _base_config(model)
    return getattr(config, "_name_or_path", None) or getattr(config, "name_or_path", None) or None


def _find_meta_init(model: Any) -> tuple[str, dict[str, Any]] | None:
    candidates = [getattr(model, "name_or_path", None), _name_or_path(model)]
    for path in candidates:
        if isinstance(path, str) and os.path.isfile(os.path.join(path, META_INIT_MANIFEST)):
            try:
                return path, read_json(os.path.join(path, META_INIT_MANIFEST))
            except ValueError:
                return None
    return None
