"""Batched per-example gradients of a scalar output with respect to the trainable parameters.

Two batched paths, each one forward and one backward per batch like a training step, but every example
keeps its own gradient:

* ``hooks`` (used automatically when every trainable parameter sits in a layer with a closed-form rule:
  ``nn.Linear``, which covers LoRA, GPT-2's ``Conv1D``, ``nn.Embedding``, ``nn.LayerNorm``, RMSNorm): an ordinary
  batched forward records each trainable layer's input x, one backward of ``Σ_i f_i`` to the layer outputs
  gives dy, and example i's gradient follows in closed form (``Σ_t dy_it x_itᵀ`` for a Linear weight). Exact
  because examples do not interact (per-example attention masks, eval mode). Rules other than Linear are
  checked against vmap on the first batch in ``auto`` mode.
* ``vmap`` (any trainable parameters, e.g. full fine-tuning): ``torch.func`` ``vmap(grad(f))`` over the
  examples, where ``f`` runs the model on one example through ``functional_call``.

Two things make this exact and vmap-safe:

* attention masks are built here as 4-D additive masks (causal and key-padding for decoder-only models,
  key-padding only for bidirectional encoders), which transformers passes through untouched; its own 2-D
  mask preparation uses data-dependent control flow that breaks under ``vmap`` for some models;
* padding sits on the right and carries label -100, and padded keys are masked, so an example's output and
  gradient do not depend on what it is batched with (tested).

While collecting, the attention kernel is switched to ``eager`` (``sdpa`` batches badly under ``vmap``) and
switched back afterwards. If the batched path fails for a model, :class:`PerExampleGradients` falls back (with a
logged warning) to one ``torch.autograd.grad`` call per unpadded example, which gives the same numbers,
only slower. A custom output function must keep examples separate (f_i may depend on example i only).
"""

from __future__ import annotations

import contextlib
import inspect
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from accelerate.logging import get_logger

from ..data.encode import IGNORE_INDEX
from .outputs import OutputSpec

__all__ = [
    "PerExampleGradients",
    "PerExampleResult",
    "ShardedParametersError",
    "trainable_parameters",
    "check_not_sharded",
    "collate_examples",
    "eager_attention",
]

logger = get_logger(__name__)


class ShardedParametersError(RuntimeError):
    """Parameters are sharded in a way the collector cannot use (FSDP1, DeepSpeed ZeRO-3; see collect/sharded.py)."""


def trainable_parameters(model: Any) -> list[tuple[str, torch.nn.Parameter]]:
    """``(name, parameter)`` for every parameter with ``requires_grad`` (the LoRA weights of a PEFT model)."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError(
            "The model has no trainable parameters (requires_grad=False everywhere). Load θ* with "
            "load_meta_init(path, is_trainable=True), or mark the parameters to differentiate as trainable."
        )
    return named


def check_not_sharded(model: Any, named: Sequence[tuple[str, torch.Tensor]] | None = None) -> None:
    """Raise :class:`ShardedParametersError` if any trainable parameter is an FSDP / ZeRO-3 shard."""
    if any(type(m).__name__ == "FullyShardedDataParallel" for m in model.modules()):
        raise ShardedParametersError(
            "The model is wrapped in FSDP, so each rank holds only a slice of the parameters and per-example "
            "gradients cannot be taken. Collect with DDP / ZeRO-2 (or on one process) from the saved θ*: "
            "load_meta_init(...) then GradientCollector.collect(model)."
        )
    for name, p in named if named is not None else model.named_parameters():
        if (
            p.numel() == 0
            or type(p).__name__ == "DTensor"
            or hasattr(p, "ds_id")
            or hasattr(p, "_sharded_param")
        ):
            raise ShardedParametersError(
                f"Parameter {name!r} is sharded across processes (FSDP / DeepSpeed ZeRO-3): per-example gradients "
                "from one rank would be wrong. Collect with DDP / ZeRO-2 (or on one process) from the saved θ*: "
                "load_meta_init(...) then GradientCollector.collect(model)."
            )


@contextlib.contextmanager
def eager_attention(model: Any) -> Iterator[None]:
    """Switch the model's attention kernel to ``eager`` for the duration (restored afterwards)."""
    base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
    config = getattr(base, "config", None)
    previous = getattr(config, "_attn_implementation", None)
    setter = getattr(base, "set_attn_implementation", None)
    switched = False
    if previous not in (None, "eager") and callable(setter):
        try:
            setter("eager")
            switched = True
        except Exception as exc:  # a model that supports only one kernel
            logger.warning(f"Could not switch attention to 'eager' ({exc}); collecting with {previous!r}.")
    try:
        yield
    finally:
        if switched:
            setter(previous)


def collate_examples(
    examples: Sequence[Mapping[str, Any]], kind: str, pad_token_id: int = 0
) -> dict[str, torch.Tensor]:
    """Right-pad encoded examples into a batch.

    LM examples have ``input_ids`` and ``labels`` (same length); seq2seq examples ``input_ids`` and decoder
    ``labels``; classification examples ``input_ids`` and an int ``label``; any of them may have
    ``token_type_ids``. Padding uses ``pad_token_id`` in the inputs, 0 in the attention mask and the token types,
    and -100 in the labels.
    """
    batch_size = len(examples)
    max_len = max(len(e["input_ids"]) for e in examples)
    input_ids = torch.full((batch_size, max_len), int(pad_token_id), dtype=torch.long)
    attention_mask = torch.zeros((batch_size, max_len), dtype=torch.long)
    for i, e in enumerate(examples):
        n = len(e["input_ids"])
        input_ids[i, :n] = torch.as_tensor(e["input_ids"], dtype=torch.long)
        attention_mask[i, :n] = 1
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if any(e.get("token_type_ids") is not None for e in examples):
        token_types = torch.zeros((batch_size, max_len), dtype=torch.long)
        for i, e in enumerate(examples):
            if e.get("token_type_ids") is not None:
                token_types[i, : len(e["token_type_ids"])] = torch.as_tensor(
                    e["token_type_ids"], dtype=torch.long
                )
        batch["token_type_ids"] = token_types
    if kind == "classification":
        batch["labels"] = torch.as_tensor([int(e["label"]) for e in examples], dtype=torch.long)
        return batch
    lab_len = max_len if kind == "causal_lm" else max(len(e["labels"]) for e in examples)
    labels = torch.full((batch_size, lab_len), IGNORE_INDEX, dtype=torch.long)
    for i, e in enumerate(examples):
        labels[i, : len(e["labels"])] = torch.as_tensor(e["labels"], dtype=torch.long)
    batch["labels"] = labels
    if kind == "seq2seq":
        dec_mask = torch.zeros((batch_size, lab_len), dtype=torch.long)
        for i, e in enumerate(examples):
            dec_mask[i, : len(e["labels"])] = 1
        batch["decoder_attention_mask"] = dec_mask
    return batch


@dataclass
class PerExampleResult:
    """Per-example gradients ``{name: [B, *shape]}``, outputs ``[B]`` and optional representations ``[B, h]``."""

    grads: dict[str, torch.Tensor]
    outputs: torch.Tensor
    representations: torch.Tensor | None


def _rms_eps(module: torch.nn.Module) -> float | None:
    for attr in ("variance_epsilon", "eps", "epsilon"):
        value = getattr(module, attr, None)
        if isinstance(value, float):
            return value
    return None


def _module_rule(module: torch.nn.Module, role: str) -> str | None:
    """Which closed-form per-example gradient rule covers ``module.<role>`` (None: not covered)."""
    name = type(module).__name__
    if isinstance(module, torch.nn.Linear) and role in ("weight", "bias"):
        return "linear"
    if name == "Conv1D" and hasattr(module, "nf") and role in ("weight", "bias"):  # transformers' GPT-2 layer
        return "conv1d"
    if type(module) is torch.nn.Embedding and role == "weight" and module.max_norm is None:
        return "embedding"
    if type(module) is torch.nn.LayerNorm and role in ("weight", "bias"):
        return "layer_norm"
    if name.endswith("RMSNorm") and role == "weight" and _rms_eps(module) is not None:
        return "rms_norm"
    return None


def _hook_owners(
    model: Any, named: Sequence[tuple[str, torch.Tensor]]
) -> tuple[dict[str, list[tuple[str, str, str]]], bool] | None:
    """``{param name: [(module name, role, rule), ...]}`` if every trainable parameter is covered by a rule.

    A parameter shared by several modules (tied embeddings) has several owners whose contributions add up.
    The flag says whether every rule is the plain Linear one (then no runtime check is needed).
    """
    by_id = {id(p): n for n, p in named}
    owners: dict[str, list[tuple[str, str, str]]] = {}
    for module_name, module in model.named_modules(remove_duplicate=False):
        for role, param in module.named_parameters(recurse=False):
            name = by_id.get(id(param))
            if name is None:
                continue
            rule = _module_rule(module, role)
            if rule is None:
                return None
            entry = (module_name, role, rule)
            if entry not in owners.setdefault(name, []):
                owners[name].append(entry)
    if set(owners) != set(by_id.values()):
        return None
    only_linear = all(rule == "linear" for entries in owners.values() for _, _, rule in entries)
    return owners, only_linear


def _ensure_accelerate_state() -> None:
    """accelerate's logger needs its state; creating it is cheap and idempotent."""
    from accelerate import PartialState

    PartialState()


def _model_dtype(model: Any) -> torch.dtype:
    for p in model.parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def _additive_mask(keep: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    zero = torch.zeros((), dtype=dtype, device=keep.device)
    return torch.where(keep, zero, torch.finfo(dtype).min)


def _probe_causal(model: Any) -> bool:
    """True if position 0's last hidden state ignores later tokens (a decoder-only backbone)."""
    vocab = int(getattr(getattr(model, "config", None), "vocab_size", 8) or 8)
    device = next(model.parameters()).device
    a = torch.tensor([[1 % vocab, 2 % vocab, 3 % vocab, 4 % vocab]], device=device)
    b = a.clone()
    b[0, 1:] = torch.tensor([5 % vocab, 6 % vocab, 7 % vocab], device=device)
    with torch.no_grad():
        ha = model(input_ids=a, output_hidden_states=True).hidden_states[-1][0, 0]
        hb = model(input_ids=b, output_hidden_states=True).hidden_states[-1][0, 0]
    return bool(torch.allclose(ha, hb, atol=1e-6, rtol=1e-5))


def _layer_grad(
    module: torch.nn.Module, role: str, rule: str, x: torch.Tensor, dy: torch.Tensor, batch_size: int
) -> torch.Tensor:
    """Per-example gradient ``[B, *param.shape]`` of ``module.<role>`` from its input ``x`` and output grad ``dy``."""
    dy = dy.reshape(batch_size, -1, dy.shape[-1])
    if role == "bias":
        return dy.sum(1)
    if rule == "linear":
        return torch.einsum("bto,bti->boi", dy, x.reshape(batch_size, -1, x.shape[-1]).float())
    if rule == "conv1d":
        return torch.einsum("bti,bto->bio", x.reshape(batch_size, -1, x.shape[-1]).float(), dy)
    if rule == "embedding":
        ids = x.reshape(batch_size, -1)
        out = torch.zeros((batch_size, *module.weight.shape), dtype=torch.float32, device=dy.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, dy.shape[-1]), dy)
        if module.padding_idx is not None:
            out[:, module.padding_idx] = 0.0
        return out
    xf = x.reshape(batch_size, -1, x.shape[-1]).float()
    if rule == "layer_norm":
        normed = torch.nn.functional.layer_norm(xf, module.normalized_shape, None, None, module.eps)
    else:  # rms_norm: y = w ⊙ x / rms(x) (or (1 + w) ⊙ ...: the same gradient)
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + _rms_eps(module))
        normed = normed.to(x.dtype).float()
    return (dy * normed).sum(1)


class PerExampleGradients:
    """Compute per-example gradients of ``output_spec`` at the model's current parameters.

    Args:
        model: a transformers model (optionally PEFT-wrapped), in eval mode.
        output_spec: from :func:`~hf_subset_select.collect.outputs.resolve_output_fn`.
        method: ``"auto"`` (hooks when all trainable parameters are Linear weights/biases, else vmap; falling
            back to a loop with a warning), ``"hooks"``, ``"vmap"`` or ``"loop"``.
        with_representations: also return the mean last hidden state over each example's tokens.

    The gradient paths are looked up by name in :attr:`methods` (``{name: fn(self, batch) -> PerExampleResult}``);
    a subclass adds a path by extending that table.
    """

    methods: ClassVar[
        dict[str, Callable[[PerExampleGradients, Mapping[str, torch.Tensor]], PerExampleResult]]
    ] = {}

    def __init__(
        self,
        model: Any,
        output_spec: OutputSpec,
        *,
        method: str = "auto",
        with_representations: bool = True,
    ) -> None:
        if method != "auto" and method not in self.methods:
            choices = ", ".join(repr(m) for m in ["auto", *self.methods])
            raise ValueError(f"method={method!r} is not valid; choose one of {choices}.")
        from .sharded import sharded_method

        self.model = model
        self.spec = output_spec
        self.named = trainable_parameters(model)
        method = sharded_method(model, self.named, method)  # FSDP2: "hooks"; other sharding is refused
        self.method = method
        self.requested = method
        self.with_representations = with_representations
        self.param_shapes = {n: tuple(p.shape) for n, p in self.named}
        self.dtype = _model_dtype(model)
        self.causal = True if output_spec.kind == "causal_lm" else False
        if output_spec.kind == "classification":
            self.causal = _probe_causal(model)
        self.used_fallback = False
        base = model.get_base_model() if callable(getattr(model, "get_base_model", None)) else model
        self._accepts_position_ids = "position_ids" in inspect.signature(base.forward).parameters
        found = _hook_owners(model, self.named)
        self._owners = found[0] if found is not None else None
        # Closed forms beyond Linear (Conv1D, Embedding, LayerNorm, RMSNorm) are checked against vmap on the
        # first batch in 'auto' mode, so an unusual module variant can never produce wrong numbers silently.
        self._needs_check = found is not None and not found[1] and method == "auto"
        if method == "hooks" and self._owners is None:
            raise ValueError(
                "method='hooks' needs every trainable parameter to belong to an nn.Linear (as in LoRA), a GPT-2 "
                "Conv1D, an nn.Embedding, an nn.LayerNorm or an RMSNorm; this model trains other parameters. Use "
                "method='vmap' (or 'auto')."
            )
        if method == "auto":
            self.method = "hooks" if self._owners is not None else "vmap"

    # ------------------------------------------------------------------ model call for one example
    def _forward_kwargs(
        self, batch: Mapping[str, torch.Tensor], per_example_positions: bool = False
    ) -> dict[str, Any]:
        """Model kwargs for a batch whose leading dim is the (possibly vmapped, size-1) example.

        ``per_example_positions`` passes explicit ``position_ids`` of shape [B, L] (right padding: 0..L-1, what
        the model would use anyway), so that a learned position embedding sees one row per example.
        """
        keep = batch["attention_mask"].bool()  # [b, L]
        length = keep.shape[-1]
        if self.causal:
            tri = torch.ones(length, length, dtype=torch.bool, device=keep.device).tril()
            allowed = tri.unsqueeze(0).unsqueeze(0) & keep[:, None, None, :]  # [b, 1, L, L]
        else:
            allowed = keep[:, None, None, :]  # [b, 1, 1, L], broadcast over queries
        kwargs: dict[str, Any] = {
            "input_ids": batch["input_ids"],
            "attention_mask": _additive_mask(allowed, self.dtype),
            "output_hidden_states": self.with_representations,
        }
        if "token_type_ids" in batch:
            kwargs["token_type_ids"] = batch["token_type_ids"]
        if per_example_positions and self.spec.kind != "seq2seq" and self._accepts_position_ids:
            positions = torch.arange(length, device=keep.device)
            kwargs["position_ids"] = positions.unsqueeze(0).expand(keep.shape[0], -1)
        if self.spec.kind == "seq2seq":
            base = (
                self.model.get_base_model()
                if callable(getattr(self.model, "get_base_model", None))
                else self.model
            )
            labels = batch["labels"]
            if hasattr(base, "prepare_decoder_input_ids_from_labels"):
                kwargs["decoder_input_ids"] = base.prepare_decoder_input_ids_from_labels(labels=labels)
            else:
                kwargs["decoder_input_ids"] = base._shift_right(labels)
            kwargs["use_cache"] = False
        elif self.spec.kind == "causal_lm":
            kwargs["use_cache"] = False
        return kwargs

    def _representation(self, out: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if self.spec.kind == "seq2seq":
            hidden = out.encoder_last_hidden_state
        else:
            hidden = out.hidden_states[-1]
        w = batch["attention_mask"].to(hidden.dtype).unsqueeze(-1)
        return ((hidden * w).sum(-2) / w.sum(-2).clamp(min=1.0)).float()

    # ------------------------------------------------------------------ vmap path
    def _vmap(self, batch: Mapping[str, torch.Tensor]) -> PerExampleResult:
        from torch.func import functional_call, grad, vmap

        params = {n: p.detach() for n, p in self.named}
        keys = sorted(batch)

        def single(p: dict[str, torch.Tensor], *values: torch.Tensor) -> tuple[torch.Tensor, tuple]:
            one = {k: v.unsqueeze(0) for k, v in zip(keys, values)}
            out = functional_call(self.model, p, (), self._forward_kwargs(one), strict=False)
            value = self.spec(out, one).reshape(())
            rep = self._representation(out, one)[0] if self.with_representations else value.detach()
            return value, (value.detach(), rep.detach())

        in_dims = (None, *[0] * len(keys))
        grads, (values, reps) = vmap(grad(single, has_aux=True), in_dims=in_dims)(
            params, *[batch[k] for k in keys]
        )
        return PerExampleResult(grads, values, reps if self.with_representations else None)

    # ------------------------------------------------------------------ hooks path (Linear-only parameters)
    def _hooks(self, batch: Mapping[str, torch.Tensor]) -> PerExampleResult:
        """One batched forward and one backward to the outputs of the layers that hold trainable parameters.

        ``dy_i = ∂(Σ_j f_j)/∂y_i = ∂f_i/∂y_i`` because examples do not interact (per-example attention masks,
        eval mode), so each layer's per-example parameter gradient follows in closed form from its input and dy:
        Linear ``Σ_t dy_t x_tᵀ``; Conv1D ``Σ_t x_t dy_tᵀ``; Embedding: dy rows added at the token ids; LayerNorm /
        RMSNorm: ``Σ_t dy_t ⊙ x̂_t`` (and ``Σ_t dy_t`` for biases). Nothing is accumulated into ``.grad``.
        """
        if self._owners is None:
            raise RuntimeError("The hooks path does not cover this model's trainable parameters.")
        records: dict[str, list[tuple[torch.Tensor, torch.Tensor]]] = {}
        handles = []

        def make_hook(module_name: str):
            def hook(module: torch.nn.Module, args: tuple, output: torch.Tensor) -> None:
                if not args or not isinstance(output, torch.Tensor):
                    raise RuntimeError(f"{module_name} was called in a form the hooks path does not support.")
                records.setdefault(module_name, []).append((args[0].detach(), output))

            return hook

        modules = dict(self.model.named_modules(remove_duplicate=False))
        for module_name in {m for entries in self._owners.values() for m, _, _ in entries}:
            handles.append(modules[module_name].register_forward_hook(make_hook(module_name)))
        try:
            with torch.enable_grad():
                out = self.model(**self._forward_kwargs(batch, per_example_positions=True))
                values = self.spec(out, batch)
                outputs = [y for recs in records.values() for _, y in recs]
                douts = torch.autograd.grad(values.sum(), outputs, allow_unused=True)
        finally:
            for h in handles:
                h.remove()
        batch_size = values.shape[0]
        dys: dict[str, list[torch.Tensor | None]] = {}
        i = 0
        for module_name, recs in records.items():
            dys[module_name] = list(douts[i : i + len(recs)])
            i += len(recs)
        grads: dict[str, torch.Tensor] = {}
        for name, entries in self._owners.items():
            total = torch.zeros(
                (batch_size, *self.param_shapes[name]), dtype=torch.float32, device=values.device
            )
            for module_name, role, rule in entries:
                module = modules[module_name]
                for (x, _), dy in zip(records.get(module_name, []), dys.get(module_name, [])):
                    if dy is None:
                        continue
                    if x.shape[0] != batch_size or dy.shape[0] != batch_size:
                        raise RuntimeError(
                            f"{module_name} sees a broadcast (not per-example) input of shape {tuple(x.shape)}."
                        )
                    total += _layer_grad(module, role, rule, x, dy.float(), batch_size)
            grads[name] = total
        reps = self._representation(out, batch).detach() if self.with_representations else None
        return PerExampleResult(grads, values.detach().float(), reps)

    # ------------------------------------------------------------------ loop fallback
    def _loop(self, batch: Mapping[str, torch.Tensor]) -> PerExampleResult:
        params = [p for _, p in self.named]
        grads: dict[str, list[torch.Tensor]] = {n: [] for n, _ in self.named}
        values, reps = [], []
        for i in range(batch["input_ids"].shape[0]):
            n = int(batch["attention_mask"][i].sum())
            one = {k: v[i : i + 1] for k, v in batch.items()}
            for key in ("input_ids", "attention_mask", "token_type_ids"):
                if key in one:
                    one[key] = one[key][:, :n]
            if self.spec.kind == "causal_lm":
                one["labels"] = one["labels"][:, :n]
            elif self.spec.kind == "seq2seq":
                m = int(batch["decoder_attention_mask"][i].sum())
                one["labels"], one["decoder_attention_mask"] = (
                    one["labels"][:, :m],
                    one["decoder_attention_mask"][:, :m],
                )
            with torch.enable_grad():
                out = self.model(**self._forward_kwargs(one))
                value = self.spec(out, one).reshape(())
                gs = torch.autograd.grad(value, params, allow_unused=True)
            for (name, p), g in zip(self.named, gs):
                grads[name].append(torch.zeros_like(p) if g is None else g)
            values.append(value.detach())
            if self.with_representations:
                reps.append(self._representation(out, one)[0].detach())
        return PerExampleResult(
            {n: torch.stack(v) for n, v in grads.items()},
            torch.stack(values),
            torch.stack(reps) if self.with_representations else None,
        )

    def _checked_hooks(self, batch: Mapping[str, torch.Tensor]) -> PerExampleResult:
        """First batch with non-Linear rules: compare hooks with vmap; keep hooks only if they agree."""
        self._needs_check = False
        try:
            fast = self._hooks(batch)
        except Exception as exc:  # noqa: BLE001 - an unsupported layer form: use the general path
            _ensure_accelerate_state()
            logger.info(f"hooks path unavailable ({type(exc).__name__}: {exc}); using vmap")
            self.method = "vmap"
            return self(batch)
        self.method = "vmap"
        reference = self(batch)  # vmap (or its loop fallback)
        agree = all(
            torch.allclose(fast.grads[n], g, rtol=1e-3, atol=1e-3 * float(g.abs().max()) + 1e-12)
            for n, g in reference.grads.items()
        )
        if agree:
            self.method = "hooks"
        else:
            _ensure_accelerate_state()
            logger.warning(
                "The closed-form per-example gradients (hooks) disagree with torch.func on this model; using vmap.",
                main_process_only=False,
            )
        return reference

    def __call__(self, batch: Mapping[str, torch.Tensor]) -> PerExampleResult:
        """Per-example gradients, outputs and representations for one right-padded batch (on the model's device)."""
        if self.method == "loop" or self.used_fallback:
            return self._loop(batch)
        if self.requested != "auto":  # asked for by name: no check, no fallback
            return self.methods[self.requested](self, batch)
        if self._needs_check and self.method == "hooks":
            return self._checked_hooks(batch)
        try:
            return self.methods[self.method](self, batch)
        except Exception as exc:  # noqa: BLE001 - any vmap incompatibility triggers the documented fallback
            if isinstance(exc, torch.cuda.OutOfMemoryError):
                raise
            self.used_fallback = True
            _ensure_accelerate_state()
            logger.warning(
                f"Batched per-example gradients ({self.method}) failed for {type(self.model).__name__} "
                f"({type(exc).__name__}: {str(exc)[:300]}). Falling back to one autograd call per example: same "
                "numbers, slower. Set CollectConfig(grad_method='loop') to silence this.",
                main_process_only=False,
            )
            return self._loop(batch)


PerExampleGradients.methods = {
    "hooks": PerExampleGradients._hooks,
    "vmap": PerExampleGradients._vmap,
    "loop": PerExampleGradients._loop,
}
