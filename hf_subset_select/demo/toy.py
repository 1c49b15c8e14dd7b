"""Tiny, offline building blocks: a word-level tokenizer, tiny causal LMs built from configs, and toy text.

Used by the tests, the demo and the recipes' defaults. Nothing here touches the network.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Sequence
from typing import Any

__all__ = [
    "TOY_VOCAB",
    "make_tokenizer",
    "make_tiny_causal_lm",
    "make_tiny_classifier",
    "add_lora",
    "toy_text_dataset",
]

_SPECIAL = ["<pad>", "<unk>", "<bos>", "<eos>"]
_LETTERS = [chr(ord("a") + i) for i in range(26)]
_DIGITS = [str(i) for i in range(10)]
_WORDS = [
    "add",
    "sub",
    "mul",
    "rev",
    "copy",
    "sort",
    "count",
    "noise",
    "=",
    "+",
    "-",
    "*",
    ":",
    "|",
    "?",
    "user",
    "assistant",
    "system",
    "yes",
    "no",
    "the",
    "a",
    "is",
    "of",
    "to",
    "and",
    "in",
    "it",
]
TOY_VOCAB: list[str] = _SPECIAL + _DIGITS + _LETTERS + _WORDS

_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['role'] }} : {{ message['content'] }} | {% endfor %}"
    "{% if add_generation_prompt %}assistant : {% endif %}"
)


def make_tokenizer(vocab: Sequence[str] | None = None, model_max_length: int = 512) -> Any:
    """A whitespace word-level ``PreTrainedTokenizerFast`` over ``vocab`` (default :data:`TOY_VOCAB`)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(vocab) if vocab is not None else list(TOY_VOCAB)
    for tok in _SPECIAL:
        if tok not in words:
            words.insert(0, tok)
    table = {w: i for i, w in enumerate(dict.fromkeys(words))}
    core = Tokenizer(models.WordLevel(vocab=table, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=model_max_length,
    )
    tok.chat_template = _CHAT_TEMPLATE
    # Pieces are whole words: decode with spaces so that text round-trips.
    return tok


def make_tiny_causal_lm(
    kind: str = "gpt2",
    vocab_size: int | None = None,
    *,
    hidden: int = 32,
    layers: int = 2,
    heads: int = 2,
    max_positions: int = 128,
    seed: int = 0,
    attn_implementation: str = "eager",
) -> Any:
    """A randomly initialized tiny GPT-2 or Llama built from a config (no download)."""
    import torch
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

    vocab_size = vocab_size or len(TOY_VOCAB)
    torch.manual_seed(seed)
    if kind == "gpt2":
        cfg = GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden,
            n_layer=layers,
            n_head=heads,
            n_positions=max_positions,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
    elif kind == "llama":
        cfg = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            intermediate_size=hidden * 2,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            max_position_embeddings=max_positions,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
            tie_word_embeddings=False,
        )
    else:
        raise ValueError(f"kind={kind!r}: choose 'gpt2' or 'llama'.")
    cfg._attn_implementation = attn_implementation
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation=attn_implementation)
    model.config.name_or_path = f"tiny-{kind}-h{hidden}-l{layers}-seed{seed}"
    return model


def make_tiny_classifier(
    num_labels: int = 2, vocab_size: int | None = None, *, hidden: int = 32, seed: int = 0
) -> Any:
    """A tiny GPT-2 sequence classifier built from a config."""
    import torch
    from transformers import GPT2Config, GPT2ForSequenceClassification

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size or len(TOY_VOCAB),
        n_embd=hidden,
        n_layer=2,
        n_head=2,
        n_positions=128,
        num_labels=num_labels,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    cfg._attn_implementation = "eager"
    model = GPT2ForSequenceClassification(cfg)
    model.config.name_or_path = f"tiny-gpt2-cls-h{hidden}-seed{seed}"
    return model


def add_lora(model: Any, r: int = 4, alpha: int = 8, target_modules: Iterable[str] | None = None) -> Any:
    """Wrap ``model`` in a PEFT LoRA adapter with sensible tiny-model targets."""
    from peft import LoraConfig, get_peft_model

    if target_modules is None:
        mt = model.config.model_type
        target_modules = ["c_attn", "c_proj"] if mt == "gpt2" else ["q_proj", "v_proj"]
    task = "SEQ_CLS" if "ForSequenceClassification" in type(model).__name__ else "CAUSAL_LM"
    cfg = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(target_modules), task_type=task
    )
    return get_peft_model(model, cfg)


def perturb_lora(model: Any, seed: int = 1, scale: float = 0.1) -> Any:
    """Fill every LoRA B matrix with seeded noise (as after a meta-init run), so that every LoRA gradient is
    non-trivial; returns ``model`` (in place, mode unchanged)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn(p.shape, generator=g) * scale)
    return model


def toy_text_dataset(task: str, n: int, seed: int = 0, fmt: str = "prompt_completion") -> Any:
    """Small synthetic tasks over digits: 'add', 'sub', 'copy', 'rev', 'sort', 'count' (mod 10 / per-digit).

    ``fmt`` is 'prompt_completion', 'text' or 'messages'.
    """
    from datasets import Dataset

    rng = random.Random(f"{task}-{seed}")
    rows = []
    for _ in range(n):
        xs = [rng.randrange(10) for _ in range(4)]
        if task == "add":
            prompt, answer = f"add {xs[0]} {xs[1]} =", [str((xs[0] + xs[1]) % 10)]
        elif task == "sub":
            prompt, answer = f"sub {xs[0]} {xs[1]} =", [str((xs[0] - xs[1]) % 10)]
        elif task == "copy":
            prompt, answer = "copy " + " ".join(map(str, xs)) + " =", [str(x) for x in xs]
        elif task == "rev":
            prompt, answer = "rev " + " ".join(map(str, xs)) + " =", [str(x) for x in reversed(xs)]
        elif task == "sort":
            prompt, answer = "sort " + " ".join(map(str, xs)) + " =", [str(x) for x in sorted(xs)]
        elif task == "count":
            prompt, answer = "count " + " ".join(map(str, xs)) + " =", [str(len(set(xs)))]
        else:
            raise ValueError(f"Unknown toy task {task!r}.")
        completion = " " + " ".join(answer)
        if fmt == "prompt_completion":
            rows.append({"prompt": prompt, "completion": completion})
        elif fmt == "text":
            rows.append({"text": prompt + completion})
        elif fmt == "messages":
            rows.append(
                {
                    "messages": [
                        {"role": "user", "content": prompt},
                        {"role": "assistant", "content": completion.strip()},
                    ]
                }
            )
        else:
            raise ValueError(f"fmt={fmt!r}: choose 'prompt_completion', 'text' or 'messages'.")
    return Dataset.from_list(rows)
