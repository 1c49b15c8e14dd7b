"""Per-example loss weights in the target fine-tune: a ``Trainer`` mixin, the ``Trainer`` and TRL ``SFTTrainer``
classes built from it, and the per-example weights of a tagged dataset under a selection.

The weighted loss is the weighted mean over supervised tokens,
``sum_i w_i * sum_t loss_it / sum_i w_i * n_i`` (``n_i`` = supervised tokens of example ``i``), summed over
every micro-batch of a gradient-accumulation step (and every process): all-ones weights give exactly the
ordinary token-mean loss, a weight of 0 removes an example exactly as if it were not in the batch, and the
scale of the weights does not matter, only their ratios. The weights come from
:class:`~hf_subset_select.SubsetSelectingDataCollator` (``mode="weight"``, :mod:`.collator`).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from transformers import Trainer
from trl import SFTTrainer

from ..data.sources import EXAMPLE_ID_COLUMN, SOURCE_COLUMN
from ..data.trainers import FIX_COLUMNS, BookkeepingColumnsError, SubsetSelectTrainerMixin, strip_bookkeeping
from .collator import (
    EXAMPLE_WEIGHT_KEY,
    SOURCE_WEIGHTING,
    SourceWeightPolicy,
    check_choice,
    source_weight_table,
)
from .sampler import SourceWeightedSampler

__all__ = [
    "EXAMPLE_WEIGHT_KEY",
    "WeightedLossTrainerMixin",
    "WeightedLossTrainer",
    "WeightedLossSFTTrainer",
    "example_weights",
]

_IGNORE_INDEX = -100


def example_weights(
    dataset: Any,
    selection: Any,
    *,
    unknown_sources: str | None = None,
    source_weighting: str = "per_example",
    always_keep: Sequence[str] = (),
) -> torch.Tensor:
    """Per-example weights (float64, one per row) of a tagged dataset under ``selection``.

    Feeds :class:`~hf_subset_select.train.sampler.SourceWeightedSampler` (or ``torch.utils.data.WeightedRandomSampler``). With
    ``source_weighting="mixture"`` the selection's weights are the probabilities of drawing each source.
    """
    names = getattr(dataset, "column_names", None)
    if names is None or SOURCE_COLUMN not in names:
        raise BookkeepingColumnsError(
            f"Weighted sampling needs the {SOURCE_COLUMN!r} column of the training dataset (it has {names}). "
            f"Tag the data with hf_subset_select.tag_sources; if it is tagged: {FIX_COLUMNS}."
        )
    sources = [str(s) for s in dataset[SOURCE_COLUMN]]
    policy = SourceWeightPolicy(selection, unknown_sources, source_weighting, Counter(sources), always_keep)
    ids: list[Any] = [None] * len(sources)
    if policy.needs_example_ids:
        if EXAMPLE_ID_COLUMN not in names:
            raise BookkeepingColumnsError(
                f"A per-example selection needs the {EXAMPLE_ID_COLUMN!r} column of the training dataset (it has "
                f"{names}): {FIX_COLUMNS}."
            )
        ids = list(dataset[EXAMPLE_ID_COLUMN])
    values = [policy.weight(s, i) for s, i in zip(sources, ids)]
    out = torch.tensor([0.0 if math.isnan(v) else v for v in values], dtype=torch.float64)
    if not bool((out > 0).any()):
        raise ValueError("No example of this dataset has a positive weight under the selection.")
    return out


def _safe_divide(numerator: torch.Tensor, denominator: Any) -> torch.Tensor:
    den = torch.as_tensor(denominator, dtype=torch.float32, device=numerator.device)
    return numerator / torch.where(den > 0, den, torch.ones_like(den))


class WeightedLossTrainerMixin:
    """Mix into a ``Trainer`` subclass (first in the bases) to train with per-example loss weights.

    Batches that carry ``inputs[example_weight_key]`` (a float tensor ``[batch_size]``, e.g. from
    ``SubsetSelectingDataCollator(mode="weight")``) get the loss
    ``sum_i w_i * sum_t loss_it / sum_i w_i * n_i``, where the denominator is summed over all micro-batches of the
    gradient-accumulation step and, with ``average_tokens_across_devices`` (the default), over all processes.
    All-ones weights reproduce the ordinary loss and its gradients; a weight of 0 removes an example exactly.
    Evaluation ignores the weights (the evaluation loss is the ordinary one); batches without weights take the
    trainer's ordinary path.

    Causal LMs (labels shifted by one), encoder-decoder LMs and single-label sequence classifiers are supported.
    Label smoothing and ``compute_loss_func`` are refused.

    Args (keyword-only, besides the trainer's own):
        example_weight_key: batch key of the weights (default ``"example_weight"``).
        sampling_selection: optional selection (``SourceSelection``, path, dict or list) for weighted sampling:
            the training sampler then draws examples with probability proportional to their source's weight.
        sampling_source_weighting: ``"per_example"`` or ``"mixture"`` (the selection's weights are the
            probabilities of drawing each source), see :func:`example_weights`.
        sampling_num_samples: draws per epoch (default: the number of examples with positive weight).
    """

    def __init__(
        self,
        *args: Any,
        example_weight_key: str = EXAMPLE_WEIGHT_KEY,
        sampling_selection: Any = None,
        sampling_source_weighting: str = "per_example",
        sampling_num_samples: int | None = None,
        **kwargs: Any,
    ) -> None:
        check_choice("sampling_source_weighting", sampling_source_weighting, SOURCE_WEIGHTING)
        self.example_weight_key = example_weight_key
        self.sampling_selection = sampling_selection
        self.sampling_source_weighting = sampling_source_weighting
        self.sampling_num_samples = sampling_num_samples
        if sampling_selection is not None:
            source_weight_table(sampling_selection)  # fail early on a bad selection
        super().__init__(*args, **kwargs)
        if getattr(self, "label_smoother", None) is not None:
            raise ValueError(
                f"{type(self).__name__} does not support label smoothing with example weights; set "
                "label_smoothing_factor=0."
            )
        if getattr(self, "compute_loss_func", None) is not None:
            raise ValueError(
                f"{type(self).__name__} computes the loss itself; do not pass compute_loss_func (subclass and override "
                "_per_token_loss instead)."
            )

    # ---- sampling -------------------------------------------------------------------------------------------

    def _get_train_sampler(self, train_dataset: Any = None) -> Any:
        if self.sampling_selection is None:
            return super()._get_train_sampler(train_dataset)  # type: ignore[misc]
        dataset = train_dataset if train_dataset is not None else self.train_dataset  # type: ignore[attr-defined]
        weights = example_weights(
            dataset, self.sampling_selection, source_weighting=self.sampling_source_weighting
        )
        args = self.args  # type: ignore[attr-defined]
        seed = args.data_seed if args.data_seed is not None else args.seed
        return SourceWeightedSampler(weights, num_samples=self.sampling_num_samples, seed=seed)

    # ---- loss -----------------------------------------------------------------------------------------------

    def _weighted_shifts_labels(self) -> bool:
        """Whether the model's loss predicts token t+1 at position t (causal LMs)."""
        cached = getattr(self, "_wl_shifts", None)
        if cached is None:
            from peft import PeftModel
            from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

            model = self.accelerator.unwrap_model(self.model)  # type: ignore[attr-defined]
            if isinstance(model, PeftModel):
                model = model.get_base_model()
            config = getattr(model, "config", None)
            enc_dec = bool(getattr(config, "is_encoder_decoder", False))
            causal = bool(getattr(self, "_loss_shifts_labels", False)) or (
                type(model).__name__ in set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
            )
            cached = causal and not enc_dec
            self._wl_shifts = cached
        return cached

    def _loss_targets(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Target ids aligned with the per-token losses (shifted for causal LMs)."""
        if batch.get("shift_labels") is not None:
            return batch["shift_labels"]
        labels = batch["labels"]
        return labels[..., 1:] if self._weighted_shifts_labels() and labels.dim() > 1 else labels

    def _weighted_item_count(self, batch: Mapping[str, Any]) -> torch.Tensor:
        targets = self._loss_targets(batch)
        weights = batch[self.example_weight_key]
        valid = (targets != _IGNORE_INDEX).reshape(targets.shape[0], -1).sum(dim=1).to(torch.float32)
        return (weights.to(device=valid.device, dtype=torch.float32) * valid).sum()

    def _get_num_items_in_batch(self, batch_samples: list, device: torch.device) -> Any:
        key = self.example_weight_key
        if not batch_samples or any(key not in b or "labels" not in b for b in batch_samples):
            return super()._get_num_items_in_batch(batch_samples, device)  # type: ignore[misc]
        total = torch.stack([self._weighted_item_count(b).to(device) for b in batch_samples]).sum()
        args = self.args  # type: ignore[attr-defined]
        if args.average_tokens_across_devices and args.world_size > 1:
            total = self.accelerator.gather(total).sum()  # type: ignore[attr-defined]
        return total

    def _per_token_loss(self, model: Any, inputs: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, Any]:
        """Forward pass; returns (per-item loss, per-item validity mask, outputs), first dimension = batch.

        Items are the supervised positions (causal / seq2seq LM, shifted for causal LMs) or the examples
        (sequence classification). Losses are zero where the mask is False.
        """
        shifts = self._weighted_shifts_labels()
        shift_labels = inputs.pop("shift_labels", None)
        if shifts or shift_labels is not None:
            labels = inputs.pop("labels", None)
        else:
            labels = inputs.get("labels")  # encoder-decoder models build decoder inputs from the labels
        if shift_labels is not None:
            targets = shift_labels
        elif labels is None:
            raise ValueError("Weighted loss needs 'labels' in the batch; the collator produced none.")
        else:
            targets = labels[..., 1:] if shifts and labels.dim() > 1 else labels
        outputs = model(**inputs)
        logits = outputs["logits"] if isinstance(outputs, Mapping) else outputs[0]
        if targets.is_floating_point():
            raise ValueError(
                "Weighted loss supports class / token labels only (integer labels); regression and multi-label "
                "targets are not supported."
            )
        if logits.dim() == targets.dim() + 1 and logits.shape[-2] != targets.shape[-1] and shifts:
            logits = logits[..., :-1, :]
        if logits.shape[:-1] != targets.shape:
            raise ValueError(
                f"Cannot align logits {tuple(logits.shape)} with labels {tuple(targets.shape)} for the weighted loss."
            )
        targets = targets.to(logits.device)
        per_item = F.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            targets.reshape(-1),
            ignore_index=_IGNORE_INDEX,
            reduction="none",
        ).view(targets.shape)
        return per_item, targets != _IGNORE_INDEX, outputs

    def _reduce_weighted(
        self,
        per_item: torch.Tensor,
        mask: torch.Tensor,
        weights: torch.Tensor,
        num_items_in_batch: Any,
    ) -> torch.Tensor:
        if weights.dim() != 1 or weights.shape[0] != per_item.shape[0]:
            raise ValueError(
                f"The example weights have shape {tuple(weights.shape)} but the batch has {per_item.shape[0]} rows; "
                "weights must be one float per example (packing / padding-free collation is not supported)."
            )
        weights = weights.to(device=per_item.device, dtype=torch.float32)
        rows = per_item.shape[0]
        per_example = per_item.reshape(rows, -1).sum(dim=1)
        numerator = (weights * per_example).sum()
        if num_items_in_batch is None:
            count = mask.reshape(rows, -1).sum(dim=1).to(torch.float32)
            return _safe_divide(numerator, (weights * count).sum())
        loss = _safe_divide(numerator, num_items_in_batch)
        if self.args.average_tokens_across_devices:  # type: ignore[attr-defined]
            # num_items_in_batch counts every process and DDP averages gradients over processes
            tp = self.get_tp_size() if hasattr(self, "get_tp_size") else 1  # type: ignore[attr-defined]
            loss = loss * (self.accelerator.num_processes // tp)  # type: ignore[attr-defined]
        return loss

    def _weighted_compute_loss(
        self, model: Any, inputs: dict[str, Any], weights: torch.Tensor, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        per_item, mask, outputs = self._per_token_loss(model, inputs)
        return self._reduce_weighted(per_item, mask, weights, num_items_in_batch), outputs

    def compute_loss(
        self,
        model: Any,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: Any = None,
    ) -> Any:
        inputs = dict(inputs)
        weights = inputs.pop(self.example_weight_key, None)
        if weights is None or not model.training:
            self.__dict__.pop("loss_is_scaled_for_ga", None)  # the trainer's own rule applies
            return super().compute_loss(  # type: ignore[misc]
                model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch
            )
        inputs = strip_bookkeeping(inputs)
        loss, outputs = self._weighted_compute_loss(model, inputs, weights, num_items_in_batch)
        # Normalized by the weighted count of the whole accumulated batch -> already scaled for accumulation.
        self.loss_is_scaled_for_ga = num_items_in_batch is not None
        return (loss, outputs) if return_outputs else loss

    def prediction_step(self, model: Any, inputs: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        inputs = {k: v for k, v in inputs.items() if k != self.example_weight_key}
        return super().prediction_step(model, inputs, *args, **kwargs)  # type: ignore[misc]


class WeightedLossTrainer(WeightedLossTrainerMixin, SubsetSelectTrainerMixin, Trainer):
    """``transformers.Trainer`` with per-example loss weights (:class:`WeightedLossTrainerMixin`) that keeps the
    bookkeeping columns (:class:`~hf_subset_select.SubsetSelectTrainerMixin`)."""


class WeightedLossSFTTrainer(WeightedLossTrainerMixin, SubsetSelectTrainerMixin, SFTTrainer):
    """``trl.SFTTrainer`` with per-example loss weights that keeps the bookkeeping columns.

    The weighted loss uses TRL's fused LM head (no full logits), honours ``loss_type="dft"`` and the MoE auxiliary
    loss, and logs the same ``entropy`` / ``mean_token_accuracy`` / ``num_tokens`` metrics as ``SFTTrainer``
    (unweighted, like TRL's).
    """

    def _weighted_shifts_labels(self) -> bool:
        return True  # TRL's fused LM head scores labels[:, 1:] (or the given shift_labels)

    def _weighted_compute_loss(
        self, model: Any, inputs: dict[str, Any], weights: torch.Tensor, num_items_in_batch: Any
    ) -> tuple[torch.Tensor, Any]:
        pc = getattr(self.accelerator, "parallelism_config", None)
        if pc is not None and getattr(pc, "sp_enabled", False):
            raise ValueError(
                "WeightedLossSFTTrainer does not support sequence parallelism; use SubsetSelectSFTTrainer with "
                "mode='filter' or selection.apply(dataset)."
            )
        inputs["use_cache"] = False
        if getattr(self, "aux_loss_enabled", False):
            inputs["output_router_logits"] = True
        outputs = model(**inputs, fused_lm_head=True)
        per_token = -outputs.log_probs  # zero where the label is ignored
        if self.args.loss_type == "dft":
            per_token = per_token * outputs.log_probs.exp().detach()
        loss = self._reduce_weighted(per_token, outputs.label_mask, weights, num_items_in_batch)
        if getattr(self, "aux_loss_enabled", False) and getattr(outputs, "aux_loss", None) is not None:
            steps = self.current_gradient_accumulation_steps if num_items_in_batch is not None else 1
            loss = loss + self.router_aux_loss_coef * outputs.aux_loss / steps
        self._log_sft_metrics(inputs, outputs)
        return loss, outputs

    def _log_sft_metrics(self, inputs: Mapping[str, Any], outputs: Any) -> None:
        """The training metrics SFTTrainer logs (token entropy, top-1 accuracy, tokens seen), unweighted."""
        metrics = getattr(self, "_metrics", None)
        if metrics is None:
            return
        gather = self.accelerator.gather_for_metrics
        mode = "train" if self.model.training else "eval"
        valid = gather(outputs.label_mask.sum()).sum()
        if getattr(outputs, "entropy", None) is not None:
            entropy = gather(outputs.entropy.detach().sum()).sum()
            metrics[mode]["entropy"].append((entropy / valid).item() if valid > 0 else 0.0)
        if getattr(outputs, "is_top1", None) is not None:
            correct = gather(outputs.is_top1.sum()).sum()
            metrics[mode]["mean_token_accuracy"].append((correct / valid).item() if valid > 0 else 0.0)
        if mode == "train" and hasattr(self, "_total_train_tokens"):
            if "attention_mask" in inputs:
                tokens = gather(inputs["attention_mask"].sum()).sum().item()
            else:
                ids = inputs["input_ids"]
                tokens = gather(torch.tensor(ids.numel(), device=ids.device)).sum().item()
            self._total_train_tokens += tokens // max(1, int(getattr(self, "_tp_size", 1)))
        if hasattr(self, "_total_train_tokens"):
            metrics[mode]["num_tokens"] = [self._total_train_tokens]
        if getattr(self, "aux_loss_enabled", False) and getattr(outputs, "aux_loss", None) is not None:
            metrics[mode]["aux_loss"].append(gather(outputs.aux_loss).mean().item())
