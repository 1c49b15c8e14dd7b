"""The gradient engine: per-example projected gradients, outputs and representations for a list of encoded rows.

It batches rows (longest first, so batches waste little compute on padding; results do not depend on the
order), takes per-example gradients with :class:`~.per_example.PerExampleGradients`, scales them by Adam's
feature scale when one is given, and projects them. Use :meth:`GradientEngine.running` around the calls: the
model is put in eval mode with the eager attention kernel and restored afterwards.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from .outputs import OutputSpec
from .per_example import PerExampleGradients, collate_examples, eager_attention, trainable_parameters
from .precondition import scale_gradients
from .projection import Projector

__all__ = ["GradientEngine", "base_config", "pad_token_id"]


def base_config(model: Any) -> Any:
    """The (PEFT-unwrapped) model's config, or None."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    return getattr(base, "config", None)


def pad_token_id(model: Any, tokenizer: Any = None) -> int:
    """The padding id: the model config's, else the tokenizer's, else 0."""
    for value in (
        getattr(base_config(model), "pad_token_id", None),
        getattr(tokenizer, "pad_token_id", None),
    ):
        if isinstance(value, int):
            return value
    return 0


class GradientEngine:
    """Compute the cache columns ``features``, ``outputs`` (and ``representations``) for encoded rows.

    Args:
        model: the model at θ* (optionally PEFT-wrapped).
        spec: the output function (:func:`~.outputs.resolve_output_fn`).
        projector: maps per-example gradients to ``projector.dim`` features.
        batch_size: rows per batched per-example-gradient call.
        grad_method: ``"auto"``, ``"hooks"``, ``"vmap"`` or ``"loop"`` (see :class:`~.per_example.PerExampleGradients`).
        representations: also return each row's mean last hidden state.
        scale: Adam's feature scale ``{name: tensor}`` applied before projecting, or None for raw gradients.
        pad_id: token id used to pad ``input_ids``.
    """

    def __init__(
        self,
        model: Any,
        spec: OutputSpec,
        projector: Projector,
        *,
        batch_size: int = 16,
        grad_method: str = "auto",
        representations: bool = True,
        scale: Mapping[str, torch.Tensor] | None = None,
        pad_id: int = 0,
    ) -> None:
        self.model = model
        self.spec = spec
        self.projector = projector
        self.batch_size = int(batch_size)
        self.representations = representations
        self.pad_id = int(pad_id)
        self.device = next(p for _, p in trainable_parameters(model)).device
        self.scale = None if scale is None else {n: s.to(self.device) for n, s in scale.items()}
        self.method = grad_method
        if spec.kind == "classification" and getattr(base_config(model), "pad_token_id", None) is None:
            self.method = (
                "loop"  # no pad id: the model pools the last position, so padding must not exist at all
            )
        self._grads: PerExampleGradients | None = None

    @property
    def method_used(self) -> str:
        """The gradient path that ran (``"none"`` before any row was computed)."""
        if self._grads is None:
            return "none"
        return "loop" if self._grads.used_fallback else self._grads.method

    @contextmanager
    def running(self) -> Iterator[GradientEngine]:
        """Eval mode (no dropout) and eager attention for the duration; the previous mode and kernel come back."""
        was_training = self.model.training
        self.model.eval()
        try:
            with eager_attention(self.model):
                if self._grads is None:
                    self._grads = PerExampleGradients(
                        self.model, self.spec, method=self.method, with_representations=self.representations
                    )
                yield self
        finally:
            self.model.train(was_training)

    def compute(self, encoded: Sequence[Mapping[str, Any]], progress: Any = None) -> dict[str, torch.Tensor]:
        """``features`` [N, d], ``outputs`` [N] and optional ``representations`` [N, h] for ``encoded`` rows (call
        inside :meth:`running`); ``progress`` (a tqdm bar, optional) is advanced per batch."""
        if self._grads is None:
            raise RuntimeError("GradientEngine.compute must be called inside `with engine.running():`.")
        order = sorted(range(len(encoded)), key=lambda i: -len(encoded[i]["input_ids"]))
        features = torch.empty(len(encoded), self.projector.dim, dtype=torch.float32)
        outputs = torch.empty(len(encoded), dtype=torch.float32)
        reps: torch.Tensor | None = None
        for start in range(0, len(order), self.batch_size):
            idx = order[start : start + self.batch_size]
            batch = collate_examples([encoded[i] for i in idx], self.spec.kind, pad_token_id=self.pad_id)
            result = self._grads({k: v.to(self.device) for k, v in batch.items()})
            # {name: [B, *shape]} from every gradient path (hooks, vmap, loop); Adam's geometry scales it here
            grads = result.grads if self.scale is None else scale_gradients(result.grads, self.scale)
            features[idx] = self.projector.project(grads).detach().float().cpu()
            outputs[idx] = result.outputs.detach().float().cpu()
            if result.representations is not None:
                if reps is None:
                    reps = torch.empty(len(encoded), result.representations.shape[-1], dtype=torch.float32)
                reps[idx] = result.representations.detach().float().cpu()
            if progress is not None:
                progress.update(len(idx))
        out = {"features": features, "outputs": outputs}
        if reps is not None:
            out["representations"] = reps
        return out
