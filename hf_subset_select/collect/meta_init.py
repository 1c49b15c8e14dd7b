"""MetaInitCallback: save the meta initialization θ* of a multitask SFT run, and load_meta_init to restore it.

Layout of ``<output_dir>/meta_init/`` (or the configured directory)::

    adapter_config.json + adapter_model.safetensors     (PEFT model)   or
    config.json + model.safetensors                     (full fine-tuning)
    meta_init.json                                      manifest, written last

The manifest records the byte size and SHA-256 of every file saved with θ* (``files``); loading verifies them.

The manifest records the base model, the trainable parameters (names, shapes, dtypes), a SHA-256
fingerprint of θ* (the trainable parameters), a cheap fingerprint of the base model, the sources with their
example counts, the target source, the global step and the package version.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable
from typing import Any

import torch
from accelerate.logging import get_logger
from transformers import TrainerCallback

from .. import __version__
from ..config import MetaInitConfig
from ..data.sources import SOURCE_COLUMN, source_counts, target_of
from ..data.trainers import BookkeepingColumnsError, check_bookkeeping
from ..faults import kill_point
from ..io_utils import (
    atomic_write_json,
    file_problem,
    file_record,
    fingerprint_tensors,
    json_sha256,
    read_json,
)
from ..schema import (
    SchemaError,
    dict_of,
    hexdigest,
    integer,
    list_of,
    number,
    obj,
    optional,
    string,
)

__all__ = [
    "MetaInitCallback",
    "load_meta_init",
    "read_meta_init_manifest",
    "MetaInitManifestError",
    "trainable_fingerprint",
    "META_INIT_MANIFEST",
]

logger = get_logger(__name__)

META_INIT_MANIFEST = "meta_init.json"
META_INIT_FORMAT = "hf_subset_select.collect.meta_init"
META_INIT_FORMAT_VERSION = 1
_BASE_SAMPLE = 4096  # elements per base tensor hashed for the (cheap) base-model fingerprint


class MetaInitManifestError(ValueError):
    """A meta-init directory is missing, corrupt, or does not match the model it is loaded into."""


# --------------------------------------------------------------------------- helpers
def _is_peft(model: Any) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return False
    return isinstance(model, PeftModel)


def _trainable(model: Any) -> list[tuple[str, torch.Tensor]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _check_not_sharded(model: Any) -> None:
    """The collector's sharding check, reported as a meta-init error (θ* cannot be saved from one rank)."""
    from .per_example import ShardedParametersError, check_not_sharded

    try:
        check_not_sharded(model)
    except ShardedParametersError as exc:
        raise MetaInitManifestError(
            "Parameters are sharded across processes (FSDP / DeepSpeed ZeRO-3), so θ* cannot be saved from one "
            "rank. Use DDP or ZeRO-2 for the meta-init run (docs/distributed.md)."
        ) from exc


def trainable_fingerprint(model: Any, names: Iterable[str] | None = None) -> str:
    """SHA-256 of the named (default: trainable) parameters' names, shapes, dtypes and values."""
    params = dict(model.named_parameters())
    if names is None:
        named = _trainable(model)
    else:
        missing = [n for n in names if n not in params]
        if missing:
            raise MetaInitManifestError(
                f"The model has no parameter(s) {missing[:3]}{'...' if len(missing) > 3 else ''} recorded in the "
                "manifest: it is not the model θ* was trained from."
            )
        named = [(n, params[n]) for n in names]
    return fingerprint_tensors(named)


def _adapter_saved_modules(model: Any) -> list[str]:
    """Canonical names of the base modules a PEFT model saves whole with its adapter (``modules_to_save``,
    e.g. a sequence classifier's head): θ* restores them, so the base model's own copies do not matter."""
    if not _is_peft(model):
        return []
    names = {
        _canonical(name)
        for name, module in model.named_modules()
        if type(module).__name__ == "ModulesToSaveWrapper"
    }
    return sorted(names)


def _base_parameters(model: Any, excluded: Iterable[str] = ()) -> list[tuple[str, torch.Tensor]]:
    """The frozen base parameters θ* was trained on, by canonical name; ``excluded`` modules left out."""
    base = model.get_base_model() if _is_peft(model) else model
    prefixes = tuple(f"{m}." for m in excluded)
    named = []
    for n, p in base.named_parameters():
        if "lora_" in n or "modules_to_save" in n or _canonical(n).startswith(prefixes):
            continue
        named.append((n, p))
    return named


def _base_fingerprint(named: list[tuple[str, torch.Tensor]]) -> str:
    """Names, shapes, dtypes and the first elements of each base tensor: cheap, and catches other weights."""
    digest = hashlib.sha256()
    for name, p in named:
        digest.update(f"{_canonical(name)}|{tuple(p.shape)}|{p.dtype}".encode())
        flat = p.detach().reshape(-1)[:_BASE_SAMPLE].to("cpu", torch.float32)
        digest.update(flat.numpy().tobytes())
    return digest.hexdigest()


def _canonical(name: str) -> str:
    """Base-parameter name independent of PEFT wrapping (``base_model.model.`` prefix, ``.base_layer``,
    ``.original_module``)."""
    if name.startswith("base_model.model."):
        name = name[len("base_model.model.") :]
    return (
        name.replace(".base_layer.", ".").replace(".original_module.", ".").removesuffix(".original_module")
    )


def _base_name(model: Any) -> str | None:
    base = model.get_base_model() if _is_peft(model) else model
    cfg = getattr(base, "config", None)
    return getattr(cfg, "name_or_path", None) or getattr(cfg, "_name_or_path", None) or None


def _save_dir(save: Any, final_dir: str, manifest: dict[str, Any]) -> None:
    """Save into a temporary sibling directory, record each file's size and SHA-256 in ``manifest["files"]``,
    move the files in, and write the manifest last.

    The old manifest is removed first, so a crash half-way leaves a directory that loaders refuse (no
    manifest) rather than a mix of old and new files that looks complete. Snapshot sub-directories
    (``step-N``, ``epoch-N``) inside ``final_dir`` are kept. A temporary directory that a killed save of the
    same ``final_dir`` left behind is removed.
    """
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(final_dir, exist_ok=True)
    prefix = f".tmp-meta-init-{os.path.basename(os.path.abspath(final_dir))}-"
    for name in os.listdir(parent):  # left by an earlier save of this directory that was killed
        if name.startswith(prefix) and os.path.isdir(os.path.join(parent, name)):
            shutil.rmtree(os.path.join(parent, name), ignore_errors=True)
    tmp = tempfile.mkdtemp(prefix=prefix, dir=parent)
    try:
        save(tmp)
        kill_point("meta_init_saved")
        manifest["files"] = {
            name: file_record(os.path.join(tmp, name))
            for name in sorted(os.listdir(tmp))
            if os.path.isfile(os.path.join(tmp, name))
        }
        manifest_path = os.path.join(final_dir, META_INIT_MANIFEST)
        if os.path.exists(manifest_path):
            os.remove(manifest_path)
        for moved, name in enumerate(sorted(os.listdir(tmp)), start=1):
            os.replace(os.path.join(tmp, name), os.path.join(final_dir, name))
            kill_point("meta_init_moved", moved)
        manifest["manifest_sha256"] = json_sha256(manifest, without="manifest_sha256")
        atomic_write_json(manifest_path, manifest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def build_manifest(
    model: Any,
    sources: dict[str, int] | None,
    target_source: str | None,
    global_step: int,
    epoch: float | None,
    base_model_name_or_path: str | None,
) -> dict[str, Any]:
    trainable = _trainable(model)
    excluded = _adapter_saved_modules(model)
    base = _base_parameters(model, excluded)
    return {
        "format": META_INIT_FORMAT,
        "format_version": META_INIT_FORMAT_VERSION,
        "package_version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "kind": "peft" if _is_peft(model) else "full",
        "model_class": type(model.get_base_model() if _is_peft(model) else model).__name__,
        "base_model_name_or_path": base_model_name_or_path or _base_name(model),
        "trainable_parameters": [
            {"name": n, "shape": list(p.shape), "dtype": str(p.dtype).replace("torch.", "")}
            for n, p in trainable
        ],
        "num_trainable_parameters": int(sum(p.numel() for _, p in trainable)),
        "fingerprint": trainable_fingerprint(model),
        "base_parameters": {
            "count": len(base),
            "fingerprint": _base_fingerprint(base),
            "excluded_modules": excluded,
        },
        "sources": dict(sources or {}),
        "target_source": target_source,
        "global_step": int(global_step),
        "epoch": None if epoch is None else float(epoch),
    }


def save_meta_init(
    model: Any,
    output_dir: str,
    *,
    sources: dict[str, int] | None = None,
    target_source: str | None = None,
    global_step: int = 0,
    epoch: float | None = None,
    base_model_name_or_path: str | None = None,
) -> dict[str, Any]:
    """Save ``model`` as θ* with its manifest into ``output_dir`` (call on the main process only)."""
    _check_not_sharded(model)
    manifest = build_manifest(model, sources, target_source, global_step, epoch, base_model_name_or_path)

    _save_dir(lambda tmp: model.save_pretrained(tmp), output_dir, manifest)
    return manifest


# --------------------------------------------------------------------------- callback
class MetaInitCallback(TrainerCallback):
    """Save θ* (PEFT adapter or full weights, ``save_pretrained`` format) plus ``meta_init.json``.

    Args:
        output_dir: where to write; default ``<TrainingArguments.output_dir>/meta_init``.
        config: a :class:`~hf_subset_select.MetaInitConfig` (its fields can also be passed as keywords).
        train_dataset: the tagged training dataset; source counts are read from it. If omitted they are read
            from the trainer's dataloader, which requires the ``source`` column to survive (see
            :class:`~hf_subset_select.SubsetSelectTrainer`).
        save_steps / save_on_epoch_end / base_model_name_or_path: see :class:`~hf_subset_select.MetaInitConfig`.

    Saving happens on the main process only; every rank takes part in the barrier around it.
    """

    def __init__(
        self,
        output_dir: str | None = None,
        *,
        config: MetaInitConfig | None = None,
        train_dataset: Any = None,
        save_steps: Iterable[int] | None = None,
        save_on_epoch_end: bool | None = None,
        base_model_name_or_path: str | None = None,
    ) -> None:
        config = config or MetaInitConfig()
        overrides = {
            "output_dir": output_dir,
            "save_steps": None if save_steps is None else list(save_steps),
            "save_on_epoch_end": save_on_epoch_end,
            "base_model_name_or_path": base_model_name_or_path,
        }
        values = {**config.to_dict(), **{k: v for k, v in overrides.items() if v is not None}}
        self.config = MetaInitConfig(**values)
        self.train_dataset = train_dataset
        self.sources: dict[str, int] | None = None
        self.target_source: str | None = None
        self.output_dir: str | None = None
        self.last_manifest: dict[str, Any] | None = None

    # where the counts come from
    def _resolve_sources(self, args: Any, train_dataloader: Any) -> None:
        dataset = self.train_dataset
        if dataset is None:
            check_bookkeeping(args, purpose="MetaInitCallback (per-source example counts)")
            dataset = getattr(train_dataloader, "dataset", None)
        if dataset is None or SOURCE_COLUMN not in (getattr(dataset, "column_names", None) or []):
            raise BookkeepingColumnsError(
                "MetaInitCallback cannot find the 'source' column to record per-source example counts. Pass the "
                "tagged dataset to the callback (MetaInitCallback(train_dataset=train)), or keep the column with "
                "hf_subset_select.SubsetSelectTrainer / SubsetSelectSFTTrainer (or remove_unused_columns=False)."
            )
        self.sources = source_counts(dataset)
        self.target_source = target_of(dataset)

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.output_dir = self.config.output_dir or os.path.join(args.output_dir, "meta_init")
        self._resolve_sources(args, kwargs.get("train_dataloader"))

    def _save(self, args: Any, state: Any, model: Any, subdir: str | None) -> None:
        from accelerate import PartialState

        if model is None:
            raise ValueError("MetaInitCallback received no model from the Trainer.")
        if self.output_dir is None:  # on_train_begin was skipped (e.g. the callback was added late)
            self.on_train_begin(args, state, None)
        target = self.output_dir if subdir is None else os.path.join(self.output_dir, subdir)
        state_ = PartialState()
        if state_.is_main_process:
            self.last_manifest = save_meta_init(
                model,
                target,
                sources=self.sources,
                target_source=self.target_source,
                global_step=state.global_step,
                epoch=state.epoch,
                base_model_name_or_path=self.config.base_model_name_or_path,
            )
            logger.info(f"Saved θ* (step {state.global_step}) to {target}", main_process_only=True)
        state_.wait_for_everyone()

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if state.global_step in self.config.save_steps:
            self._save(args, state, model, f"step-{state.global_step}")

    def on_epoch_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        if self.config.save_on_epoch_end:
            self._save(args, state, model, f"epoch-{round(state.epoch or 0)}")

    def on_train_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any) -> None:
        self._save(args, state, model, None)


# --------------------------------------------------------------------------- loading
def read_meta_init_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read and check ``meta_init.json`` in ``path``."""
    path = os.fspath(path)
    mpath = os.path.join(path, META_INIT_MANIFEST)
    if not os.path.exists(mpath):
        raise MetaInitManifestError(
            f"No {META_INIT_MANIFEST} in {path!r}: not a meta-init directory, or the save did not finish. "
            "Re-run the multitask SFT with MetaInitCallback."
        )
    try:
        manifest = read_json(mpath)
    except ValueError as exc:
        raise MetaInitManifestError(f"{mpath!r} is not valid JSON ({exc}); {_REDO}.") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != META_INIT_FORMAT:
        raise MetaInitManifestError(f"{mpath!r} is not a hf_subset_select meta-init manifest.")
    version = manifest.get("format_version")
    if version != META_INIT_FORMAT_VERSION or isinstance(version, bool):
        raise MetaInitManifestError(
            f"Meta-init format version {version!r} is not supported by this release "
            f"(expects {META_INIT_FORMAT_VERSION}); {_REDO} with this version."
        )
    try:
        _MANIFEST(manifest, "")
        for name in manifest.get("files", {}):
            if not name or name.startswith(".") or "/" in name or "\\" in name:
                raise SchemaError(f"files.{name}", "a plain file name inside the directory", name)
    except SchemaError as exc:
        raise MetaInitManifestError(
            f"{mpath!r} is malformed: {exc}. It was edited or damaged; restore it from a copy, or {_REDO}."
        ) from None
    recorded = manifest.get("manifest_sha256")  # absent in manifests saved before it was recorded
    if recorded is not None and recorded != json_sha256(manifest, without="manifest_sha256"):
        raise MetaInitManifestError(
            f"{mpath!r} was edited or damaged after it was saved (its content no longer matches its "
            f"manifest_sha256); restore it from a copy, or {_REDO}."
        )
    return manifest


_REDO = "re-run the multitask SFT with MetaInitCallback"
_RECORD = obj({"bytes": integer(), "sha256": hexdigest(64)}, closed=True)
_MANIFEST = obj(
    {
        "kind": string(choices=("peft", "full")),
        "trainable_parameters": list_of(
            obj({"name": string(nonempty=True), "shape": list_of(integer()), "dtype": string()})
        ),
        "fingerprint": hexdigest(64),
        "base_parameters": obj(
            {"count": integer(), "fingerprint": hexdigest(64)}, {"excluded_modules": list_of(string())}
        ),
    },
    {
        "package_version": string(),
        "created": string(),
        "model_class": string(),
        "base_model_name_or_path": optional(string()),
        "num_trainable_parameters": integer(),
        "sources": dict_of(integer()),
        "target_source": optional(string()),
        "global_step": integer(),
        "epoch": optional(number()),
        "files": dict_of(_RECORD),
    },
)


def _verify_files(path: str, manifest: dict[str, Any]) -> bool:
    """Check every file the manifest lists against its size and SHA-256; False for a manifest from before
    checksums were recorded (then only θ*'s fingerprint can vouch for the weights)."""
    if "files" not in manifest:
        warnings.warn(
            f"{path!r} was saved by an older hf-subset-select without file checksums; only θ*'s fingerprint is "
            "checked. Save it again with this version to have every file verified.",
            UserWarning,
            stacklevel=3,
        )
        return False
    for name, record in manifest["files"].items():
        problem = file_problem(os.path.join(path, name), record)
        if problem is not None:
            raise MetaInitManifestError(
                f"{os.path.join(path, name)!r} {problem}: the meta-init is damaged. Restore the directory from "
                f"where it was copied, or {_REDO} (delete the directory first)."
            )
    return True


def _check_base(model: Any, manifest: dict[str, Any]) -> None:
    expected = manifest["base_parameters"]
    base = _base_parameters(model, expected.get("excluded_modules") or ())
    if len(base) != expected["count"] or _base_fingerprint(base) != expected["fingerprint"]:
        raise MetaInitManifestError(
            "The base model does not match the one θ* was trained on (parameter names, shapes or weights differ; "
            f"manifest base: {manifest.get('base_model_name_or_path')!r}). Load the same base checkpoint."
        )


def load_meta_init(
    path: str | os.PathLike, base_model: Any = None, *, is_trainable: bool = True, verify: bool = True
) -> Any:
    """Restore θ* saved by :class:`MetaInitCallback`.

    Args:
        path: the meta-init directory (holding ``meta_init.json``).
        base_model: the base model (required for a PEFT adapter unless the manifest's
            ``base_model_name_or_path`` loads with ``from_pretrained``; optional for full weights, which are then
            loaded into it after checking that its parameters match).
        is_trainable: keep the adapter's parameters trainable (needed to collect gradients or fine-tune).
        verify: check the base model and the restored θ* against the manifest's fingerprints.

    Every file is checked against the size and SHA-256 in the manifest first, whatever ``verify`` says.

    Raises:
        MetaInitManifestError: the directory is not a meta-init, its manifest is malformed, a file is missing,
            truncated or altered, or the base model / θ* does not match.
    """
    import transformers

    path = os.fspath(path)
    manifest = read_meta_init_manifest(path)
    checksummed = _verify_files(path, manifest)
    verify = verify or not checksummed  # without checksums, θ*'s fingerprint is the only integrity check
    names = [p["name"] for p in manifest["trainable_parameters"]]
    if manifest["kind"] == "peft":
        from peft import PeftModel

        if base_model is None:
            name = manifest.get("base_model_name_or_path")
            cls = getattr(transformers, manifest.get("model_class", ""), None)
            if not name or cls is None or not os.path.isdir(str(name)):
                raise MetaInitManifestError(
                    f"θ* in {path!r} is a PEFT adapter; pass the base model it was trained on: "
                    f"load_meta_init(path, base_model=...) (manifest base: {name!r})."
                )
            base_model = cls.from_pretrained(name)
        if _is_peft(base_model):
            raise MetaInitManifestError("base_model is already a PEFT model; pass the plain base model.")
        if verify:
            _check_base(base_model, manifest)
        model = PeftModel.from_pretrained(base_model, path, is_trainable=is_trainable)
    elif manifest["kind"] == "full":
        if base_model is None:
            cls = getattr(transformers, manifest.get("model_class", ""), None) or transformers.AutoModel
            model = cls.from_pretrained(path)
        else:
            from safetensors.torch import load_file

            shapes = {p["name"]: p["shape"] for p in manifest["trainable_parameters"]}
            own = dict(base_model.named_parameters())
            bad = [n for n, s in shapes.items() if n not in own or list(own[n].shape) != s]
            if bad:
                raise MetaInitManifestError(
                    f"base_model's parameters do not match the manifest (e.g. {bad[:3]}): it is a different "
                    "architecture or size than the model θ* was trained from."
                )
            weights = os.path.join(path, "model.safetensors")
            if not os.path.isfile(weights):
                raise MetaInitManifestError(f"{weights!r} is missing; {_REDO} (delete the directory first).")
            state = load_file(weights)
            missing, _unexpected = base_model.load_state_dict(state, strict=False)
            real_missing = [m for m in missing if m in shapes]
            if real_missing:
                raise MetaInitManifestError(f"θ* in {path!r} lacks parameters {real_missing[:3]}.")
            model = base_model
        trainable = set(names)
        for n, p in model.named_parameters():
            p.requires_grad_(is_trainable and n in trainable)
    else:
        raise MetaInitManifestError(f"Unknown meta-init kind {manifest['kind']!r} in {path!r}.")
    if verify and trainable_fingerprint(model, names) != manifest["fingerprint"]:
        raise MetaInitManifestError(
            f"The restored parameters do not reproduce θ*'s fingerprint from {path!r}: the files were changed or "
            "the base model differs. Re-run the meta-init."
        )
    model.eval()
    return model
