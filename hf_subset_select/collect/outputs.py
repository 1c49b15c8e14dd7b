"""Per-example scalar outputs f whose gradients the collector records.

Language models, ``"token_log_odds"``: the mean, over the example's supervised tokens, of the gold token's log-odds
``z = log(p / (1 - p))`` with ``p`` the softmax probability of the gold token. From the logits ``l``,
``log p = l_gold - logsumexp(l)`` and ``log(1 - p) = logsumexp(l_others) - logsumexp(l)``, so
``z = l_gold - logsumexp(l_others)``: computed that way it never forms ``1 - p`` and stays exact when
``p`` is close to 1. Clamping ``p`` to ``[eps, 1 - eps]`` is clamping ``z`` to ``±log((1 - eps) / eps)``.
Since the per-token loss is ``-log p = log(1 + exp(-z))``, the first-order estimator becomes a logistic
regression (see docs/method.md).

``"sequence_log_odds"`` (what ``"auto"`` picks for language models) is the log-odds of the geometric mean of the gold tokens' probabilities,
``p̄ = exp(mean_t log p_t)``, ``f = log(p̄ / (1 - p̄))``. Then ``log(1 + exp(-f)) = -log p̄`` is exactly the
example's mean token cross entropy, so each row's logistic loss and its gradient at θ* equal the
example's SFT loss and gradient (the mean of log-odds does not: an easy EOS token with a large log-odds
hides uncertain answer tokens). With one supervised token both outputs are the same.

``"sequence_margin"`` (language models, opt-in) is the smallest, over the supervised tokens, of the gold token's logit
minus the largest other logit. It is positive exactly when greedy teacher-forced decoding reproduces every gold token,
so its logistic loss ``log(1 + exp(-f))`` is a smooth stand-in for the exact-match error of short answers. Use it when
the target is scored by exact match or accuracy of a generated answer rather than by its loss: a source that teaches
the answer format with wrong answers lowers the token cross entropy (the model hedges) while the argmax stays wrong.

Sequence classification: the margin ``logit_gold - logsumexp(other logits)`` (the same formula over classes).

Every output function here is written to work on a batch of any size, including a batch of one inside
``torch.func.vmap`` (no data-dependent Python control flow, no ``.item()``).

A user-supplied output function is any callable ``fn(model_output, batch) -> Tensor[B]`` where
``model_output`` is what the model returned (with ``.logits``) and ``batch`` holds ``input_ids``,
``attention_mask`` and ``labels`` (token labels ``[B, L]`` with -100 for no loss, or class ids ``[B]``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from ..data.encode import IGNORE_INDEX

__all__ = [
    "token_log_odds_output",
    "sequence_log_odds_output",
    "seq2seq_token_log_odds_output",
    "classification_margin_output",
    "sequence_margin_output",
    "gold_log_odds",
    "OutputSpec",
    "model_kind",
    "resolve_output_fn",
    "register_output_fn",
    "OutputFunction",
    "MODEL_KINDS",
]

MODEL_KINDS = ("causal_lm", "seq2seq", "classification")


def gold_log_odds(logits: torch.Tensor, gold: torch.Tensor) -> torch.Tensor:
    """``logits[..., gold] - logsumexp(logits[..., others])`` for every position (``gold`` must be valid ids)."""
    gold = gold.clamp(min=0)
    gold_logit = torch.gather(logits, -1, gold.unsqueeze(-1)).squeeze(-1)
    classes = torch.arange(logits.shape[-1], device=logits.device)
    is_gold = classes == gold.unsqueeze(-1)
    others = torch.logsumexp(logits.masked_fill(is_gold, float("-inf")), dim=-1)
    return gold_logit - others


def _clamp_log_odds(z: torch.Tensor, prob_clamp: float) -> torch.Tensor:
    if prob_clamp <= 0:
        return z
    bound = math.log((1.0 - prob_clamp) / prob_clamp)
    return z.clamp(-bound, bound)


def token_log_odds_output(
    logits: torch.Tensor, labels: torch.Tensor, *, prob_clamp: float = 1e-6, shift: bool = True
) -> torch.Tensor:
    """Mean over supervised tokens of the gold token's clamped log-odds, one value per example.

    Args:
        logits: ``[B, L, V]`` token logits.
        labels: ``[B, L]`` gold ids, ``-100`` where there is no loss.
        prob_clamp: ``p`` is clamped to ``[prob_clamp, 1 - prob_clamp]`` (0 disables clamping).
        shift: causal LMs predict token ``t+1`` at position ``t`` (True); seq2seq decoder logits are
            already aligned with their labels (False).

    Returns:
        ``[B]`` float32 tensor. An example without supervised tokens gets 0 (the collector skips those).
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    z = _clamp_log_odds(gold_log_odds(logits.float(), labels), prob_clamp)
    weight = (labels != IGNORE_INDEX).to(z.dtype)
    return (z * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)


def sequence_log_odds_output(
    logits: torch.Tensor, labels: torch.Tensor, *, prob_clamp: float = 1e-6, shift: bool = True
) -> torch.Tensor:
    """Log-odds of the geometric-mean gold-token probability ``p̄ = exp(mean_t log p_t)``, one value per example.

    ``log(1 + exp(-f))`` equals the example's mean token cross entropy (its SFT loss), for any number of
    supervised tokens. Arguments as in :func:`token_log_odds_output`; ``p̄`` is clamped to
    ``[prob_clamp, 1 - prob_clamp]``. An example without supervised tokens gets ``logit(1 - prob_clamp)``
    (the collector skips those).
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits = logits.float()
    gold = labels.clamp(min=0)
    log_p = torch.gather(logits, -1, gold.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)
    weight = (labels != IGNORE_INDEX).to(log_p.dtype)
    mean_log_p = (log_p * weight).sum(-1) / weight.sum(-1).clamp(min=1.0)
    if prob_clamp > 0:
        mean_log_p = mean_log_p.clamp(math.log(prob_clamp), math.log1p(-prob_clamp))
    else:  # keep 1 - p̄ > 0 in float32
        mean_log_p = mean_log_p.clamp(max=-1e-7)
    return mean_log_p - torch.log(-torch.expm1(mean_log_p))


def sequence_margin_output(logits: torch.Tensor, labels: torch.Tensor, *, shift: bool = True) -> torch.Tensor:
    """Smallest gold-token margin ``min_t (l_gold,t - max_{v != gold} l_v,t)`` over the supervised tokens, per example.

    ``f > 0`` exactly when the argmax at every supervised position is the gold token (teacher-forced exact match).
    Arguments as in :func:`token_log_odds_output`. An example without supervised tokens gets 0 (the collector
    skips those).
    """
    if shift:
        logits, labels = logits[..., :-1, :], labels[..., 1:]
    logits = logits.float()
    gold = labels.clamp(min=0)
    gold_logit = torch.gather(logits, -1, gold.unsqueeze(-1)).squeeze(-1)
    classes = torch.arange(logits.shape[-1], device=logits.device)
    best_other = logits.masked_fill(classes == gold.unsqueeze(-1), float("-inf")).amax(-1)
    supervised = labels != IGNORE_INDEX
    smallest = (gold_logit - best_other).masked_fill(~supervised, float("inf")).amin(-1)
    return torch.where(supervised.any(-1), smallest, torch.zeros_like(smallest))


def seq2seq_token_log_odds_output(
    logits: torch.Tensor, labels: torch.Tensor, *, prob_clamp: float = 1e-6
) -> torch.Tensor:
    """:func:`token_log_odds_output` on decoder logits, which are aligned with the labels (no shift)."""
    return token_log_odds_output(logits, labels, prob_clamp=prob_clamp, shift=False)


def classification_margin_output(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``logit_gold - logsumexp(other logits)`` per example: ``logits`` ``[B, C]``, ``labels`` ``[B]`` class ids."""
    return gold_log_odds(logits.float(), labels.long())


@dataclass(frozen=True)
class OutputSpec:
    """A resolved output function: ``fn(model_output, batch) -> Tensor[B]`` plus what it needs.

    Attributes:
        name: recorded in the cache manifest.
        kind: ``"causal_lm"``, ``"seq2seq"`` or ``"classification"`` (decides encoding and masking).
        fn: the callable.
    """

    name: str
    kind: str
    fn: Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]

    def __call__(self, model_output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.fn(model_output, batch)


def _base(model: Any) -> Any:
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def model_kind(model: Any) -> str:
    """``"classification"``, ``"seq2seq"`` or ``"causal_lm"``, from the (PEFT-unwrapped) model's class and config."""
    base = _base(model)
    name = type(base).__name__
    config = getattr(base, "config", None)
    if name.endswith("ForSequenceClassification"):
        return "classification"
    if getattr(config, "is_encoder_decoder", False):
        return "seq2seq"
    return "causal_lm"


def _logits(model_output: Any) -> torch.Tensor:
    logits = getattr(model_output, "logits", None)
    if logits is None and isinstance(model_output, (tuple, list)):
        logits = model_output[0]
    if logits is None:
        raise ValueError(
            "The model output has no `logits`; pass output_fn=<callable(model_output, batch) -> Tensor[B]> "
            "to the GradientCollector for this model."
        )
    return logits


@dataclass(frozen=True)
class OutputFunction:
    """A named output function in the registry (:func:`register_output_fn`).

    Attributes:
        name: the name ``CollectConfig.output_fn`` uses.
        kinds: model kinds it applies to.
        build: ``build(kind, prob_clamp) -> fn(model_output, batch) -> Tensor[B]``.
        needs: what a model must be, for the error on another kind (e.g. ``"a language model"``).
        instead: the output function to suggest then.
        kind_in_name: record ``"<kind>_<name>"`` in manifests for seq2seq models.
    """

    name: str
    kinds: tuple[str, ...]
    build: Callable[[str, float], Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]]
    needs: str
    instead: str
    kind_in_name: bool = False

    def recorded_name(self, kind: str) -> str:
        return f"seq2seq_{self.name}" if self.kind_in_name and kind == "seq2seq" else self.name


_OUTPUT_FUNCTIONS: dict[str, OutputFunction] = {}
_AUTO = {
    "classification": "classification_margin",
    "causal_lm": "sequence_log_odds",
    "seq2seq": "sequence_log_odds",
}


def register_output_fn(entry: OutputFunction) -> OutputFunction:
    """Add (or replace) a named output function, so that ``CollectConfig(output_fn=name)`` can select it."""
    from ..config import register_choice

    register_choice("output_fn", entry.name)
    _OUTPUT_FUNCTIONS[entry.name] = entry
    return entry


def _margin(kind: str, prob_clamp: float) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
    def margin(model_output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return classification_margin_output(_logits(model_output), batch["labels"])

    return margin


def _log_odds(reduce: Callable[..., torch.Tensor]) -> Callable[[str, float], Callable]:
    def build(kind: str, prob_clamp: float) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
        shift = kind == "causal_lm"

        def log_odds(model_output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
            return reduce(_logits(model_output), batch["labels"], prob_clamp=prob_clamp, shift=shift)

        return log_odds

    return build


register_output_fn(
    OutputFunction(
        "classification_margin",
        ("classification",),
        _margin,
        "a sequence-classification model",
        "token_log_odds",
    )
)
for _name, _reduce in (
    ("token_log_odds", token_log_odds_output),
    ("sequence_log_odds", sequence_log_odds_output),
):
    register_output_fn(
        OutputFunction(
            _name,
            ("causal_lm", "seq2seq"),
            _log_odds(_reduce),
            "a language model",
            "classification_margin",
            kind_in_name=True,
        )
    )


def _sequence_margin(kind: str, prob_clamp: float) -> Callable[[Any, Mapping[str, torch.Tensor]], torch.Tensor]:
    shift = kind == "causal_lm"

    def margin(model_output: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return sequence_margin_output(_logits(model_output), batch["labels"], shift=shift)

    return margin


register_output_fn(
    OutputFunction(
        "sequence_margin",
        ("causal_lm", "seq2seq"),
        _sequence_margin,
        "a language model",
        "classification_margin",
        kind_in_name=True,
    )
)


def resolve_output_fn(
    model: Any, output_fn: str | Callable = "auto", *, prob_clamp: float = 1e-6
) -> OutputSpec:
    """Pick the output function for ``model``.

    Args:
        model: the (possibly PEFT-wrapped) model.
        output_fn: ``"auto"`` (``"sequence_log_odds"`` for language models, ``"classification_margin"`` for
            classifiers), a registered name (``"token_log_odds"``, ``"sequence_log_odds"``, ``"sequence_margin"``,
            ``"classification_margin"``, or one added with :func:`register_output_fn`), or a callable
            ``fn(model_output, batch) -> Tensor[B]`` (used as is; it must work under ``torch.func.vmap`` for the
            batched path, otherwise the collector falls back to a per-example loop).
        prob_clamp: clamp of ``p`` for the token log-odds.
    """
    kind = model_kind(model)
    if callable(output_fn):
        name = getattr(output_fn, "__qualname__", None) or type(output_fn).__name__
        module = getattr(output_fn, "__module__", None)
        return OutputSpec(
            name=f"custom:{module}.{name}" if module else f"custom:{name}", kind=kind, fn=output_fn
        )
    if output_fn == "auto":
        output_fn = _AUTO[kind]
    if output_fn in ("seq2seq_token_log_odds", "seq2seq_sequence_log_odds", "seq2seq_sequence_margin"):  # names as manifests record them
        output_fn = output_fn.removeprefix("seq2seq_")
    entry = _OUTPUT_FUNCTIONS.get(output_fn)
    if entry is None:
        choices = ", ".join(repr(n) for n in ["auto", *_OUTPUT_FUNCTIONS])
        raise ValueError(
            f"output_fn={output_fn!r} is not valid; choose one of {choices} or pass a "
            "callable(model_output, batch) -> Tensor[B]."
        )
    if kind not in entry.kinds:
        raise ValueError(
            f"output_fn={output_fn!r} needs {entry.needs}, got {type(_base(model)).__name__}; use "
            f"output_fn={entry.instead!r} (or 'auto')."
        )
    return OutputSpec(name=entry.recorded_name(kind), kind=kind, fn=entry.build(kind, prob_clamp))
