"""Collection on a model sharded with FSDP2 (``torch.distributed.fsdp.fully_shard``).

Under FSDP2 each rank holds a slice of every parameter (a ``DTensor`` shard) and FSDP all-gathers a layer's full
weights just before that layer runs (forward and backward) and frees them afterwards. The collector keeps it that
way: it never materializes the model, only the ``hooks`` gradient path runs, and that path needs nothing but each
trainable layer's input ``x`` and output gradient ``dy`` (an ordinary batched forward and one ``autograd.grad`` to
the layer outputs, both through FSDP's own hooks), from which example i's gradient of the *full* weight follows
in closed form (``Σ_t dy_it x_itᵀ`` for a Linear weight; :mod:`.per_example`). Each rank computes the rows of its
own shards, exactly as under DDP, so the cache equals the unsharded one (tested to 1e-5).

What sharding changes, and what it costs:

* every forward and backward is a collective (FSDP's all-gathers), so the ranks must run the same number of
  gradient batches: a rank with fewer rows runs idle batches on a repeated row whose results are discarded
  (:func:`idle_batches`);
* only ``grad_method="hooks"`` (or ``"auto"``, which then means hooks) works: ``vmap`` / ``loop`` differentiate with
  respect to the registered parameters, which under FSDP are the shards, not the tensors the forward used. So every
  trainable parameter must sit in a layer with a closed-form rule (nn.Linear, which covers LoRA and the linear
  layers of full fine-tuning, GPT-2's Conv1D, nn.Embedding, nn.LayerNorm, RMSNorm); the vmap cross-check that
  ``auto`` runs for non-Linear rules on one device is skipped (it cannot run on shards);
* θ*'s fingerprint is taken over the full trainable tensors, gathered one at a time (:func:`full_tensors`), so it
  equals the unsharded model's; Adam preconditioning from a sharded optimizer is not supported (pass
  ``preconditioner=`` with full tensors, or collect raw gradients).

FSDP1 (``FullyShardedDataParallel``), DeepSpeed ZeRO-3 and DTensor parameters without FSDP2 (tensor
parallelism) stay refused with :class:`~.per_example.ShardedParametersError`.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

import torch

from .per_example import ShardedParametersError, _hook_owners

__all__ = [
    "is_fsdp2",
    "sharded_method",
    "sharded_optimizer",
    "full_tensors",
    "max_over_ranks",
    "idle_batches",
]

_UNSUPPORTED_FIX = (
    "Collect with FSDP2 (torch.distributed.fsdp.fully_shard, e.g. accelerate's fsdp_version: 2), DDP / ZeRO-2, "
    "or on one process from the saved θ*: load_meta_init(...) then GradientCollector.collect(model)."
)


def _is_dtensor(p: Any) -> bool:
    return type(p).__name__ == "DTensor"


def is_fsdp2(model: Any) -> bool:
    """True when some submodule of ``model`` was sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - a torch without FSDP2
        return False
    return any(isinstance(m, FSDPModule) for m in model.modules())


def _refuse_other_sharding(model: Any, named: Iterable[tuple[str, torch.Tensor]], fsdp2: bool) -> None:
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ShardedParametersError(
            "The model is wrapped in FSDP1 (FullyShardedDataParallel), whose flat parameters hide the layers the "
            "per-example gradients need. " + _UNSUPPORTED_FIX
        )
    for name, p in named:
        if p.numel() == 0 or hasattr(p, "ds_id"):
            raise ShardedParametersError(
                f"Parameter {name!r} is sharded by DeepSpeed ZeRO-3 (or is empty): its per-example gradients "
                "cannot be taken from one rank. " + _UNSUPPORTED_FIX
            )
        if _is_dtensor(p) and not fsdp2:
            raise ShardedParametersError(
                f"Parameter {name!r} is a DTensor outside FSDP2 (tensor parallelism?): per-example gradients of "
                "such parameters are not supported. " + _UNSUPPORTED_FIX
            )


def sharded_method(model: Any, named: Sequence[tuple[str, torch.Tensor]], method: str) -> str:
    """The gradient path to use: ``method`` itself on an unsharded model, ``"hooks"`` under FSDP2.

    Raises:
        ShardedParametersError: FSDP1 / ZeRO-3 / tensor-parallel parameters; or FSDP2 with a method other than
            hooks, or with trainable parameters no closed-form rule covers (both would need the full weights).
    """
    fsdp2 = is_fsdp2(model)
    _refuse_other_sharding(model, named, fsdp2)
    if not fsdp2:
        return method
    if method not in ("auto", "hooks"):
        raise ShardedParametersError(
            f"grad_method={method!r} cannot run on an FSDP2-sharded model (it differentiates with respect to the "
            "registered parameters, which are shards). Use CollectConfig(grad_method='auto') or 'hooks'. (A "
            "classification model without pad_token_id needs the loop path: set model.config.pad_token_id.)"
        )
    if _hook_owners(model, named) is None:
        raise ShardedParametersError(
            "Under FSDP2 only the hooks gradient path runs, and some trainable parameters are not in an nn.Linear "
            "(LoRA), GPT-2 Conv1D, nn.Embedding, nn.LayerNorm or RMSNorm layer. Train only such layers (e.g. LoRA), "
            "or collect without FSDP (DDP / one process) from the saved θ*."
        )
    return "hooks"


def sharded_optimizer(
    model: Any, named: Sequence[tuple[str, torch.Tensor]], optimizer: Any, config: Any
) -> Any:
    """Check that the collection can run as sharded (:func:`sharded_method`) and return the optimizer it may read:
    ``optimizer`` itself unless the model is FSDP2-sharded (then None, after refusing Adam preconditioning, whose
    state would be shards)."""
    sharded_method(model, named, config.grad_method)
    precondition = config.precondition
    if optimizer is None or not is_fsdp2(model):
        return optimizer
    if precondition != "none":
        raise ShardedParametersError(
            f"CollectConfig(precondition={precondition!r}) reads Adam's state, which FSDP2 shards across ranks. "
            "Collect raw gradients (precondition='none'), or pass preconditioner={name: full tensor} to collect()."
        )
    return None  # AdamW's step-size summary (adam_scalars) is not recorded from a sharded optimizer


def full_tensors(named: Iterable[tuple[str, torch.Tensor]]) -> Iterator[tuple[str, torch.Tensor]]:
    """``(name, full tensor)``, gathering DTensor shards one at a time (a collective: call on every rank)."""
    for name, p in named:
        yield name, (p.full_tensor() if _is_dtensor(p) else p)


def max_over_ranks(value: int) -> int:
    """The largest ``value`` over the ranks of the default process group (``value`` itself without one)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() <= 1:
        return int(value)
    t = torch.tensor([int(value)], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return int(t.item())


def idle_batches(engine: Any, count: int, row: Mapping[str, Any]) -> None:
    """Run ``count`` gradient batches on ``row`` and discard them, so that this rank joins the FSDP collectives
    the others still run (inside ``engine.running()``)."""
    for _ in range(max(0, int(count))):
        engine.compute([row])
