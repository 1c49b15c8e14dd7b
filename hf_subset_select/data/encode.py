"""Turn one example (any of the formats :func:`~hf_subset_select.tag_sources` accepts) into token ids and labels.

The supervision follows TRL's ``SFTTrainer`` defaults, so that the gradient cache measures the same loss
the trainer optimizes: prompt/completion -> loss on completion tokens only; ``text`` -> every token;
``messages`` -> the chat template, every token; pre-tokenized ``input_ids`` -> ``labels`` if present,
else ``completion_mask`` / ``assistant_masks`` if present, else every token. An EOS token is appended to
plain text and completions, as ``SFTTrainer`` does. Classification examples keep their ``label``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["encode_example", "encode_seq2seq_example", "encode_row", "IGNORE_INDEX"]

IGNORE_INDEX = -100


def _ids(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


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


def encode_example(
    example: Mapping[str, Any], tokenizer: Any | None, max_length: int, classification: bool = False
) -> dict[str, Any]:
    """Return ``{"input_ids": [...], "labels": [...]}`` (LM) or ``{"input_ids": [...], "label": int}`` (classification).

    Labels use ``-100`` for positions that carry no loss. Sequences are truncated to ``max_length``.
    """
    if "input_ids" in example and example["input_ids"] is not None:
        input_ids = list(example["input_ids"])
        if classification:
            labels = None
        elif example.get("labels") is not None and not isinstance(example["labels"], int):
            labels = list(example["labels"])
        else:
            mask = example.get("completion_mask") or example.get("assistant_masks")
            labels = [
                t if (mask is None or m) else IGNORE_INDEX for t, m in zip(input_ids, mask or input_ids)
            ]
    else:
        if tokenizer is None:
            raise ValueError(
                "These examples are not tokenized and no tokenizer is available; pass processing_class= to the "
                "Trainer or tokenizer= to the collector."
            )
        if example.get("prompt") is not None and not classification:
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
            input_ids = full
            labels = [IGNORE_INDEX] * start + full[start:]
        elif example.get("messages") is not None:
            input_ids = _chat_ids(tokenizer, example["messages"])
            labels = list(input_ids)
        elif example.get("text") is not None:
            text = example["text"] if classification else _with_eos(tokenizer, example["text"])
            input_ids = _ids(tokenizer, text)
            labels = list(input_ids)
        elif example.get("prompt") is not None:  # classification on a prompt column
            input_ids = _ids(tokenizer, example["prompt"])
            labels = None
        else:
            raise ValueError(
                f"Cannot encode an example with columns {sorted(example)}; it needs text, messages, "
                "prompt/completion or input_ids."
            )
    input_ids = input_ids[:max_length]
    if classification:
        label = example.get("label", example.get("labels"))
        if label is None:
            raise ValueError("A classification example needs a 'label' (or 'labels') column.")
        return {"input_ids": input_ids, "label": int(label)}
    return {"input_ids": input_ids, "labels": labels[:max_length]}


def encode_seq2seq_example(example: Mapping[str, Any], tokenizer: Any | None, max_length: int) -> dict[str, Any]:
    """Return ``{"input_ids": [...], "labels": [...]}`` for an encoder-decoder model: ``prompt`` -> encoder,
    ``completion`` -> decoder labels (``text_target``), or pre-tokenized ``input_ids`` / ``labels`` as they are."""
    if example.get("input_ids") is not None and example.get("labels") is not None:
        return {"input_ids": list(example["input_ids"])[:max_length], "labels": list(example["labels"])[:max_length]}
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


def encode_row(example: Mapping[str, Any], tokenizer: Any | None, max_length: int, kind: str) -> dict[str, Any]:
    """Encode one example for a model of ``kind`` (``"causal_lm"``, ``"seq2seq"`` or ``"classification"``)."""
    if kind == "seq2seq":
        return encode_seq2seq_example(example, tokenizer, max_length)
    return encode_example(example, tokenizer, max_length, classification=kind == "classification")
