"""Turn one example (any of the formats :func:`~hf_subset_select.tag_sources` accepts) into model inputs.

Raw rows are encoded by the rules of TRL 1.16's ``SFTTrainer`` (``_prepare_dataset``), so that the gradient cache
measures the loss the trainer optimizes on the tokens it trains on:

* plain text is tokenized with the tokenizer's own special tokens (e.g. the BOS of Gemma / Llama tokenizers), as
  ``tokenizer(text)`` does; chat messages go through the chat template, which adds its own;
* an EOS token is appended to ``text`` and to ``completion`` (non-conversational rows) unless already there;
* prompt/completion: ``prompt`` and ``prompt + completion`` are tokenized; the loss covers the tokens from where
  the two diverge (completion-only loss, TRL's default for such rows);
* ``text`` / ``messages``: every token carries loss;
* sequences are truncated to ``max_length`` from the end (TRL's ``keep_start``).

Classification rows are encoded as ``datasets.map(tokenizer)`` would: ``tokenizer(text)``, or
``tokenizer(text, text_pair)`` for sentence pairs, with special tokens and ``token_type_ids`` when the tokenizer
returns them; the class comes from ``label`` (or ``labels``).

Pre-tokenized rows (with ``input_ids``) are used as they are: ``labels`` if present, else ``completion_mask`` /
``assistant_masks``, else every token; ``token_type_ids`` are kept.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["encode_example", "encode_seq2seq_example", "encode_row", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text)["input_ids"])


def _chat_ids(tokenizer: Any, messages: list, **kwargs: Any) -> list[int]:
    out = tokenizer.apply_chat_template(list(messages), tokenize=True, **kwargs)
    if isinstance(out, Mapping) or hasattr(out, "keys"):
        out = out["input_ids"]
    if out and isinstance(out[0], list):
        out = out[0]
    return list(out)


def _with_eos(tokenizer: Any, text: str) -> str:
    eos = getattr(tokenizer, "eos_token", None)
    return text if not eos or text.endswith(eos) else text + eos


def _need_tokenizer(tokenizer: Any) -> None:
    if tokenizer is None:
        raise ValueError(
            "These examples are not tokenized and no tokenizer is available; pass processing_class= to the "
            "Trainer or tokenizer= to the collector."
        )


def _pretokenized(example: Mapping[str, Any], classification: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"input_ids": list(example["input_ids"])}
    if not classification:
        if example.get("labels") is not None and not isinstance(example["labels"], int):
            out["labels"] = list(example["labels"])
        else:
            mask = example.get("completion_mask") or example.get("assistant_masks")
            ids = out["input_ids"]
            out["labels"] = [t if (mask is None or m) else IGNORE_INDEX for t, m in zip(ids, mask or ids)]
    if example.get("token_type_ids") is not None:
        out["token_type_ids"] = list(example["token_type_ids"])
    return out


def _language_model(example: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    if example.get("prompt") is not None:
        prompt, completion = example["prompt"], example.get("completion")
        if isinstance(prompt, list):  # conversational prompt/completion
            p_ids = _chat_ids(tokenizer, prompt, add_generation_prompt=True)
            full = _chat_ids(tokenizer, prompt + list(completion))
        else:
            p_ids = _ids(tokenizer, prompt)
            full = _ids(tokenizer, prompt + _with_eos(tokenizer, completion))
        # Supervise from where the tokenized prompt and prompt+completion diverge.
        start = 0
        while start < min(len(p_ids), len(full)) and p_ids[start] == full[start]:
            start += 1
        return {"input_ids": full, "labels": [IGNORE_INDEX] * start + full[start:]}
    if example.get("messages") is not None:
        ids = _chat_ids(tokenizer, example["messages"])
    elif example.get("text") is not None:
        ids = _ids(tokenizer, _with_eos(tokenizer, example["text"]))
    else:
        raise ValueError(
            f"Cannot encode an example with columns {sorted(example)}; it needs text, messages, "
            "prompt/completion or input_ids."
        )
    return {"input_ids": ids, "labels": list(ids)}


def _classification(example: Mapping[str, Any], tokenizer: Any) -> dict[str, Any]:
    text = example.get("text") if example.get("text") is not None else example.get("prompt")
    if text is None and example.get("messages") is not None:
        return {"input_ids": _chat_ids(tokenizer, example["messages"])}
    if text is None:
        raise ValueError(
            f"Cannot encode a classification example with columns {sorted(example)}; it needs text (and "
            "optionally text_pair), prompt, messages, or input_ids."
        )
    pair = example.get("text_pair")
    encoded = tokenizer(text, pair) if pair is not None else tokenizer(text)
    out: dict[str, Any] = {"input_ids": list(encoded["input_ids"])}
    if encoded.get("token_type_ids") is not None:
        out["token_type_ids"] = list(encoded["token_type_ids"])
    return out


def encode_example(
    example: Mapping[str, Any], tokenizer: Any | None, max_length: int, classification: bool = False
) -> dict[str, Any]:
    """Return ``{"input_ids", "labels"}`` (LM) or ``{"input_ids", "label"}`` (classification), plus
    ``token_type_ids`` when the row or the tokenizer has them (see the module docstring for the rules).

    Labels use ``-100`` for positions that carry no loss. Sequences are truncated to ``max_length``.
    """
    if example.get("input_ids") is not None:
        out = _pretokenized(example, classification)
    else:
        _need_tokenizer(tokenizer)
        out = _classification(example, tokenizer) if classification else _language_model(example, tokenizer)
    out = {k: v[:max_length] for k, v in out.items()}
    if classification:
        label = example.get("label", example.get("labels"))
        if label is None:
            raise ValueError("A classification example needs a 'label' (or 'labels') column.")
        out["label"] = int(label)
    return out


def encode_seq2seq_example(
    example: Mapping[str, Any], tokenizer: Any | None, max_length: int
) -> dict[str, Any]:
    """Return ``{"input_ids": [...], "labels": [...]}`` for an encoder-decoder model: ``prompt`` -> encoder,
    ``completion`` -> decoder labels (``text_target``), or pre-tokenized ``input_ids`` / ``labels`` as they are."""
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


def encode_row(
    example: Mapping[str, Any], tokenizer: Any | None, max_length: int, kind: str
) -> dict[str, Any]:
    """Encode one example for a model of ``kind`` (``"causal_lm"``, ``"seq2seq"`` or ``"classification"``)."""
    if kind == "seq2seq":
        return encode_seq2seq_example(example, tokenizer, max_length)
    return encode_example(example, tokenizer, max_length, classification=kind == "classification")
