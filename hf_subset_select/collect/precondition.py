"""Adam's per-coordinate preconditioner as a feature scale for the gradient cache.

AdamW fine-tuning from θ* moves the parameters by roughly Δθ ≈ -η D⁻¹ Σ_i r_i ∇f_i with
D = sqrt(v̂) + eps (v̂ the bias-corrected second-moment estimate of the optimizer). The first-order change of
example j's output is then -η Σ_i r_i ∇f_jᵀ D⁻¹ ∇f_i = -η Σ_i r_i (s ⊙ ∇f_j)ᵀ (s ⊙ ∇f_i) with s = D^(-1/2).
Collecting the features g_i = Pᵀ(s ⊙ ∇f_i) therefore lets the unchanged estimator fit its step in Adam's
geometry; a fitted step w maps back to parameters as Δθ = s ⊙ (P w). See docs/method.md ("Adam geometry").
(LESS, Xia et al. 2024, also uses Adam-preconditioned gradient features for data selection.)
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.logging import get_logger

from .distributed import DistState, same_on_every_rank

logger = get_logger(__name__)

__all__ = [
    "resolve_preconditioner",
    "PreconditionerError",
    "adam_preconditioner",
    "adam_state_summary",
    "adam_step_scalars",
    "preconditioner_sha256",
    "check_preconditioner",
    "scale_gradients",
    "unwrap_optimizer",
]


class PreconditionerError(ValueError):
    """Adam's preconditioner cannot be read from this optimizer, or a given preconditioner does not fit the model."""


def unwrap_optimizer(optimizer: Any) -> Any:
    """The optimizer that holds the per-parameter state (accelerate's ``AcceleratedOptimizer`` wraps it)."""
    seen = 0
    while hasattr(optimizer, "optimizer") and optimizer.optimizer is not optimizer and seen < 8:
        inner = optimizer.optimizer
        if not hasattr(inner, "param_groups") or not hasattr(inner, "state"):
            break
        optimizer, seen = inner, seen + 1
    return optimizer


def _step_value(step: Any) -> float:
    return float(step.item()) if isinstance(step, torch.Tensor) else float(step)


def _adam_entries(optimizer: Any, model: Any) -> list[tuple[str, torch.Tensor, float, float, float, bool]]:
    """``(name, second moment, step, beta2, eps, amsgrad)`` per trainable parameter, or PreconditionerError."""
    from .per_example import trainable_parameters

    if optimizer is None:
        raise PreconditionerError(
            "No optimizer was given, so Adam's preconditioner cannot be read. Run the collector as a Trainer "
            "callback, pass collect(..., optimizer=trainer.optimizer), or set CollectConfig(precondition='none')."
        )
    inner = unwrap_optimizer(optimizer)
    kind = type(inner).__name__
    groups = getattr(inner, "param_groups", None)
    state = getattr(inner, "state", None)
    if groups is None or state is None:
        raise PreconditionerError(
            f"The optimizer {kind} has no param_groups/state; Adam's preconditioner needs a torch Adam/AdamW "
            "optimizer. Use CollectConfig(precondition='none') for raw gradients."
        )
    group_of = {id(p): g for g in groups for p in g.get("params", [])}
    entries = []
    for name, param in trainable_parameters(model):
        group = group_of.get(id(param))
        if group is None:
            raise PreconditionerError(
                f"Trainable parameter {name!r} is not among the parameters of the optimizer {kind} (a partitioned "
                "optimizer such as DeepSpeed ZeRO keeps flattened copies, or the optimizer was built for another "
                "model). Collect with precondition='none', or from an optimizer over this model's parameters."
            )
        pstate = state.get(param) or {}
        if "exp_avg_sq" not in pstate:
            has = sorted(pstate) if pstate else "no state yet (the optimizer has not stepped on it)"
            raise PreconditionerError(
                f"The optimizer {kind} keeps no per-parameter 'exp_avg_sq' for {name!r} ({has}); Adam's "
                "preconditioner needs torch Adam/AdamW state after at least one step (SGD, Adafactor and 8-bit "
                "optimizers do not have it). Use CollectConfig(precondition='none') for raw gradients."
            )
        betas, eps = group.get("betas"), group.get("eps")
        if betas is None or eps is None or len(betas) != 2:
            raise PreconditionerError(
                f"The optimizer {kind}'s parameter group has no Adam betas/eps; use precondition='none'."
            )
        step = _step_value(pstate.get("step", 0))
        if step <= 0:
            raise PreconditionerError(
                f"The optimizer state of {name!r} is at step {step:g}; run at least one optimizer step first, or "
                "use precondition='none'."
            )
        amsgrad = bool(group.get("amsgrad", False)) and "max_exp_avg_sq" in pstate
        moment = pstate["max_exp_avg_sq"] if amsgrad else pstate["exp_avg_sq"]
        if not isinstance(moment, torch.Tensor) or tuple(moment.shape) != tuple(param.shape):
            raise PreconditionerError(
                f"The optimizer {kind}'s second moment for {name!r} does not have the parameter's shape "
                f"{tuple(param.shape)} (a partitioned or factored state); use precondition='none'."
            )
        entries.append((name, moment, step, float(betas[1]), float(eps), amsgrad))
    return entries


def adam_preconditioner(optimizer: Any, model: Any) -> dict[str, torch.Tensor]:
    """Adam's feature scale ``s = (sqrt(v̂) + eps)^(-1/2)`` per trainable parameter of ``model``.

    ``v̂ = exp_avg_sq / (1 - beta2**step)`` is the bias-corrected second moment of the optimizer (``max_exp_avg_sq``
    with ``amsgrad``); betas and eps are read from each parameter's group. Names are those of
    ``per_example.trainable_parameters(model)``; tensors are float32 on the CPU, shaped like the parameters.

    Args:
        optimizer: a torch ``Adam`` / ``AdamW`` (or accelerate's ``AcceleratedOptimizer`` around one) that has
            stepped at least once on every trainable parameter.
        model: the model whose trainable parameters the optimizer updates.

    Raises:
        PreconditionerError: the optimizer keeps no per-parameter ``exp_avg_sq`` (SGD, Adafactor, DeepSpeed's
            partitioned state) or a parameter has no state yet.
    """
    out: dict[str, torch.Tensor] = {}
    for name, moment, step, beta2, eps, _ in _adam_entries(optimizer, model):
        correction = 1.0 - beta2**step
        v_hat = moment.detach().to("cpu", torch.float64) / correction
        out[name] = (v_hat.sqrt() + eps).rsqrt().to(torch.float32).contiguous()
    return out


def adam_state_summary(optimizer: Any, model: Any) -> dict[str, Any]:
    """``{"step", "eps", "beta2", "amsgrad"}`` of the optimizer (for the cache manifest).

    A value shared by every parameter is a number; differing values become their sorted list.
    """

    def one(values: Sequence[Any]) -> Any:
        unique = sorted(set(values))
        return unique[0] if len(unique) == 1 else unique

    entries = _adam_entries(optimizer, model)
    steps = [int(e[2]) if float(e[2]).is_integer() else e[2] for e in entries]
    return {
        "step": one(steps),
        "eps": one([e[4] for e in entries]),
        "beta2": one([e[3] for e in entries]),
        "amsgrad": one([e[5] for e in entries]),
        "optimizer": type(unwrap_optimizer(optimizer)).__name__,
    }


def adam_step_scalars(optimizer: Any, model: Any) -> dict[str, float]:
    """AdamW's step size summarized in a few numbers, for the estimator's budget λ rule (kept in the cache manifest).

    With D_c = sqrt(v̂_c) + eps the optimizer's per-coordinate denominators over every trainable coordinate c:

    * ``denominator``: D̄ = Σ_c v̂_c / Σ_c (v̂_c / D_c). AdamW moves output j by about -η Σ_c ∂_c f_j ∂_c L / D_c;
      replacing 1/D_c by 1/D̄, exact on average over coordinates weighted by their gradient energy (which v̂_c
      measures), turns AdamW at rate η into gradient descent at η / D̄ on raw gradients.
    * ``sum_denominator``: Σ_c D_c, and ``sum_second_moment``: Σ_c v̂_c, against which the estimator compares the
      second moment of a fine-tune's own minibatch gradients (``EstimatorConfig.finetune_batch_size``).
    * ``num_parameters``: the number of coordinates.

    Raises:
        PreconditionerError: the optimizer keeps no Adam state for every trainable parameter, or it is all zero.
    """
    energy, weighted, total_d, count = 0.0, 0.0, 0.0, 0
    for _, moment, step, beta2, eps, _ in _adam_entries(optimizer, model):
        correction = 1.0 - beta2**step
        # on the state's own device, a few million entries at a time: no full float64 copy of a large moment
        for chunk in moment.detach().reshape(-1).split(1 << 22):
            v_hat = chunk.to(torch.float64) / correction
            denom = v_hat.sqrt() + eps
            energy += float(v_hat.sum())
            weighted += float((v_hat / denom).sum())
            total_d += float(denom.sum())
        count += moment.numel()
    if not (energy > 0.0 and weighted > 0.0):
        raise PreconditionerError(
            "The optimizer's second moments are all zero (no gradient reached the trainable parameters), so "
            "AdamW's step size cannot be read from them."
        )
    return {
        "denominator": energy / weighted,
        "sum_denominator": total_d,
        "sum_second_moment": energy,
        "num_parameters": float(count),
    }


def preconditioner_sha256(preconditioner: Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over the names (sorted), shapes and float32 bytes of a preconditioner."""
    digest = hashlib.sha256()
    for name in sorted(preconditioner):
        t = preconditioner[name].detach().to("cpu", torch.float32).contiguous()
        digest.update(name.encode())
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_preconditioner(
    preconditioner: Mapping[str, Any], param_shapes: Sequence[tuple[str, Sequence[int]]] | None = None
) -> dict[str, torch.Tensor]:
    """Validate a preconditioner (finite, positive, and, when given, one tensor per parameter of the right shape).

    Returns it as float32 CPU tensors in ``param_shapes`` order (else in the given order).
    """
    if not isinstance(preconditioner, Mapping):
        raise PreconditionerError(
            f"A preconditioner must be a mapping {{parameter name: tensor}}, got {type(preconditioner).__name__}."
        )
    if param_shapes is not None:
        names = [n for n, _ in param_shapes]
        missing = [n for n in names if n not in preconditioner]
        extra = [n for n in preconditioner if n not in set(names)]
        if missing or extra:
            raise PreconditionerError(
                f"The preconditioner does not cover the model's trainable parameters (missing {missing[:3]}, "
                f"unknown {extra[:3]}); build it for this model with adam_preconditioner(optimizer, model)."
            )
        order = list(param_shapes)
    else:
        order = [(n, None) for n in preconditioner]
    out: dict[str, torch.Tensor] = {}
    for name, shape in order:
        t = torch.as_tensor(preconditioner[name]).detach().to("cpu", torch.float32).contiguous()
        if shape is not None and tuple(t.shape) != tuple(int(s) for s in shape):
            raise PreconditionerError(
                f"The preconditioner's {name!r} has shape {tuple(t.shape)}, the parameter {tuple(shape)}."
            )
        if t.numel() and not bool((torch.isfinite(t) & (t > 0)).all()):
            raise PreconditionerError(
                f"The preconditioner's {name!r} holds non-finite or non-positive values; a feature scale must be "
                "positive (Adam's is (sqrt(v_hat) + eps)^(-1/2))."
            )
        out[name] = t
    return out


class _ScaledGradients(Mapping):
    """Read-only view ``{name: s[name] * g}`` that scales one parameter's block at a time when it is read, so the
    projector never holds a second full copy of the batch's per-example gradients."""

    def __init__(self, grads: Mapping[str, torch.Tensor], scale: Mapping[str, torch.Tensor]) -> None:
        self._grads, self._scale = grads, scale

    def __getitem__(self, name: str) -> torch.Tensor:
        g = self._grads[name]
        return g.to(torch.float32) * self._scale[name].to(g.device)

    def __iter__(self) -> Any:
        return iter(self._grads)

    def __len__(self) -> int:
        return len(self._grads)


def scale_gradients(
    grads: Mapping[str, torch.Tensor], preconditioner: Mapping[str, torch.Tensor]
) -> Mapping[str, torch.Tensor]:
    """``{name: s[name] * g}`` for per-example gradients ``{name: [B, *shape]}`` (float32, on the gradients' device).

    The result is a lazy mapping: each block is scaled when it is read.
    """
    missing = [n for n in grads if n not in preconditioner]
    if missing:
        raise PreconditionerError(f"The preconditioner has no scale for {missing[:3]}.")
    return _ScaledGradients(grads, preconditioner)


def resolve_preconditioner(
    mode: str,
    model: Any,
    named: Sequence[tuple[str, torch.Tensor]],
    optimizer: Any,
    preconditioner: Mapping[str, torch.Tensor] | None,
    dist: DistState,
) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """The feature scale a collection applies (or None) and its manifest ``precondition`` entry.

    Args:
        mode: ``CollectConfig.precondition`` (``"none"``, ``"auto"`` or ``"adam"``).
        model: the model at θ*; ``named`` its trainable parameters.
        optimizer: the meta-training optimizer, or None.
        preconditioner: an explicit feature scale (recorded as kind ``"custom"``), or None.
        dist: every rank must end with the same scale.

    Raises:
        PreconditionerError: ``mode="adam"`` without Adam state, or the ranks hold different optimizer states.
    """
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
    if not same_on_every_rank(info.get("sha256") or ("error" if error else "none"), dist):
        raise PreconditionerError(
            "The processes hold different optimizer states, so their Adam preconditioners differ (a partitioned "
            "optimizer?). Collect with CollectConfig(precondition='none'), or on one process with "
            "collect(..., preconditioner=adam_preconditioner(optimizer, model))."
        )
    if error is not None:
        if mode == "adam":
            raise error
        logger.info(
            f"GradientCollector: precondition='auto' collects raw gradients (no Adam preconditioner: {error})"
        )
    return scale, info
