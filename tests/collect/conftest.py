"""Tokenizers with real special-token behaviours, built offline: a BOS post-processor (Gemma / Llama style) and a
BERT-like sentence-pair template with token types."""

from __future__ import annotations

import pytest


def _word_level(vocab, template=None, **special):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    table = {w: i for i, w in enumerate(dict.fromkeys(vocab))}
    core = Tokenizer(models.WordLevel(vocab=table, unk_token=special["unk_token"]))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if template is not None:
        core.post_processor = template(table)
    return PreTrainedTokenizerFast(tokenizer_object=core, **special)


@pytest.fixture
def bos_tokenizer():
    """The toy vocabulary; ``tokenizer(text)`` adds ``<bos>`` in front, as Gemma's and Llama's tokenizers do."""
    from tokenizers.processors import TemplateProcessing

    from hf_subset_select.demo.toy import TOY_VOCAB, make_tokenizer

    def bos(table):
        return TemplateProcessing(
            single="<bos> $A", pair="<bos> $A $B", special_tokens=[("<bos>", table["<bos>"])]
        )

    tok = _word_level(
        TOY_VOCAB,
        bos,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<bos>",
        eos_token="<eos>",
        model_max_length=512,
    )
    tok.chat_template = make_tokenizer().chat_template
    return tok


@pytest.fixture
def pair_tokenizer():
    """BERT-like: ``[CLS] A [SEP]`` and ``[CLS] A [SEP] B [SEP]`` with token types 0 / 1."""
    from tokenizers.processors import TemplateProcessing

    from hf_subset_select.demo.toy import TOY_VOCAB

    def bert(table):
        return TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", table["[CLS]"]), ("[SEP]", table["[SEP]"])],
        )

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", *TOY_VOCAB[4:]]
    tok = _word_level(vocab, bert, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]", sep_token="[SEP]")
    tok.model_input_names = ["input_ids", "token_type_ids", "attention_mask"]
    return tok
