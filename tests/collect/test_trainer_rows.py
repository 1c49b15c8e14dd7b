"""The collector sees the rows the trainer trains on: BOS of the tokenizer, sentence pairs with token types, the
trainer's processed rows and collator, and a self-check that stops on rows that differ."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
from hf_subset_select.collect.outputs import resolve_output_fn
from hf_subset_select.collect.per_example import collate_examples
from hf_subset_select.collect.rows import EncodedRows
from hf_subset_select.collect.selfcheck import CollectionSelfCheckError
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, toy_text_dataset

pytestmark = pytest.mark.usefixtures("one_thread")


def _config(tmp_path, **kw):
    return CollectConfig(
        proj_dim=32, proj_type="rademacher", batch_size=8, output_dir=str(tmp_path / "gc"), **kw
    )


def _lm_data(n=6):
    train = tag_sources(
        {"add": toy_text_dataset("add", n, seed=1), "rev": toy_text_dataset("rev", n, seed=2)}, target="add"
    )
    return train, tag_target_eval(toy_text_dataset("add", 4, seed=9), name="add_eval")


def _outputs_on(model, spec, batch):
    model.eval()
    with torch.no_grad():
        return spec(model(**batch), batch)


def _sft_trainer(tmp_path, tokenizer, train, collector):
    from trl import SFTConfig

    from hf_subset_select import SubsetSelectSFTTrainer

    args = SFTConfig(
        output_dir=str(tmp_path / "sft"),
        max_steps=1,
        per_device_train_batch_size=4,
        report_to=[],
        disable_tqdm=True,
        save_strategy="no",
        use_cpu=True,
        max_length=64,
        learning_rate=1e-2,
    )
    return SubsetSelectSFTTrainer(
        model=add_lora(make_tiny_causal_lm("llama", seed=0)),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[collector],
    )


def test_bound_sft_trainer_rows_keep_bos_and_cached_outputs_equal_the_trainers_forward(
    tmp_path, bos_tokenizer
):
    train, target = _lm_data()
    collector = GradientCollector(_config(tmp_path), train, target)
    trainer = _sft_trainer(tmp_path, bos_tokenizer, train, collector)
    assert collector.trainer is trainer  # the mixin handed itself over
    trainer.train()
    cache = collector.cache
    model = trainer.model
    spec = resolve_output_fn(model)
    own = trainer.train_dataset
    rows = [0, 5, 11]
    assert all(own[r]["input_ids"][0] == bos_tokenizer.bos_token_id for r in rows)
    features = [{k: own[r][k] for k in ("input_ids", "labels")} for r in rows]
    expected = _outputs_on(model, spec, trainer.data_collator(features))
    for r, value in zip(rows, expected):
        where = int(torch.nonzero((cache.example_ids == own[r]["example_id"]) & (cache.split == 0))[0, 0])
        torch.testing.assert_close(cache.outputs[where], value, rtol=1e-4, atol=1e-4)
    # target rows went through TRL's own processing: BOS, completion-only labels, EOS
    target_rows = trainer._prepare_dataset(target, bos_tokenizer, trainer.args, False, None, "t")
    first = target_rows[0]
    assert (
        first["input_ids"][0] == bos_tokenizer.bos_token_id
        and first["input_ids"][-1] == bos_tokenizer.eos_token_id
    )
    expected = _outputs_on(
        model, spec, trainer.data_collator([{k: first[k] for k in ("input_ids", "labels")}])
    )
    where = int(torch.nonzero((cache.example_ids == first["example_id"]) & (cache.split == 1))[0, 0])
    torch.testing.assert_close(cache.outputs[where], expected[0], rtol=1e-4, atol=1e-4)


def test_standalone_encoder_mirrors_trl_prepare_dataset(tmp_path, bos_tokenizer):
    from trl import SFTConfig, SFTTrainer

    trainer = SFTTrainer(
        model=make_tiny_causal_lm("gpt2"),
        args=SFTConfig(output_dir=str(tmp_path / "o"), report_to=[], use_cpu=True, max_length=64),
        train_dataset=toy_text_dataset("add", 1),  # prompt-completion: TRL's default completion-only loss
        processing_class=bos_tokenizer,
    )
    for fmt in ("prompt_completion", "text", "messages"):
        raw = toy_text_dataset("rev", 3, seed=4, fmt=fmt)
        trl_rows = trainer._prepare_dataset(raw, bos_tokenizer, trainer.args, False, None, fmt)
        for example, processed in zip(raw, trl_rows):
            ours = encode_example(example, bos_tokenizer, 64)
            assert ours["input_ids"] == processed["input_ids"], fmt
            assert ours["labels"] == processed["labels"], fmt


def test_sentence_pairs_are_encoded_as_pairs_and_token_types_reach_the_model(tmp_path, pair_tokenizer):
    from datasets import Dataset
    from peft import LoraConfig, get_peft_model
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(pair_tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        type_vocab_size=2,
        num_labels=2,
        pad_token_id=0,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    model = BertForSequenceClassification(cfg)
    with torch.no_grad():
        model.bert.embeddings.token_type_embeddings.weight.normal_(0, 1.0)  # types matter
        model.classifier.weight.normal_(0, 1.0)  # and show in the margin
    model = get_peft_model(model, LoraConfig(r=2, target_modules=["query", "value"], task_type="SEQ_CLS"))

    def pairs(seed):
        g = torch.Generator().manual_seed(seed)
        words = ["add", "sub", "1", "2", "3", "yes", "no", "the", "a"]
        rows = []
        for _ in range(5):
            pick = torch.randint(0, len(words), (6,), generator=g).tolist()
            rows.append(
                {
                    "text": " ".join(words[i] for i in pick[:3]),
                    "text_pair": " ".join(words[i] for i in pick[3:]),
                    "label": pick[0] % 2,
                }
            )
        return Dataset.from_list(rows)

    train = tag_sources({"a": pairs(1), "b": pairs(2)}, target="a")
    target = tag_target_eval(pairs(3), name="t")
    cache = GradientCollector(_config(tmp_path), train, target, pair_tokenizer).collect(model)
    spec = resolve_output_fn(model)
    for row in (0, 7):
        example = train[row]
        encoded = pair_tokenizer(example["text"], example["text_pair"], return_tensors="pt")
        assert encoded["token_type_ids"][0, -1] == 1  # encoded as a pair
        batch = {**encoded, "labels": torch.tensor([example["label"]])}
        where = int(torch.nonzero((cache.example_ids == example["example_id"]) & (cache.split == 0))[0, 0])
        expected = _outputs_on(model, spec, batch)[0]
        torch.testing.assert_close(cache.outputs[where], expected, rtol=1e-4, atol=1e-4)
        without_types = _outputs_on(
            model, spec, {**batch, "token_type_ids": torch.zeros_like(encoded["token_type_ids"])}
        )
        assert abs(float(without_types[0] - expected)) > 1e-3  # so the cache saw the token types


def test_self_check_stops_on_rows_the_trainer_does_not_train_on(tmp_path, tokenizer, monkeypatch):
    train, target = _lm_data(3)
    model = add_lora(make_tiny_causal_lm("gpt2", seed=0))
    real = EncodedRows.as_trained

    def with_bos(self, split, rows):
        """The trainer's view with a BOS in front, as TRL adds it and the old collector did not."""
        seen, _ = real(self, split, rows)
        seen = [{**s, "input_ids": [2, *s["input_ids"]], "labels": [2, *s["labels"]]} for s in seen]
        return seen, collate_examples(seen, self.kind, self.pad_id)

    monkeypatch.setattr(EncodedRows, "as_trained", with_bos)
    pattern = r"training row example_id=\d+ .*token ids differ: cached \[\d+.*\(11 tokens\), trained \[2, .*\(12 tokens\)"
    with pytest.raises(CollectionSelfCheckError, match=pattern):
        GradientCollector(_config(tmp_path), train, target, tokenizer).collect(model)
    # the same rows with the check turned off: collected
    cache = GradientCollector(_config(tmp_path, self_check=False), train, target, tokenizer).collect(model)
    assert cache.num_examples == 10


def test_self_check_stops_on_outputs_that_differ(tmp_path, tokenizer, monkeypatch):
    import hf_subset_select.collect.engine as engine_mod

    train, target = _lm_data(3)
    model = add_lora(make_tiny_causal_lm("gpt2", seed=0))
    real = engine_mod.GradientEngine.compute

    def shifted(self, encoded, progress=None):
        out = real(self, encoded, progress)
        out["outputs"] = out["outputs"] + 0.5
        return out

    monkeypatch.setattr(engine_mod.GradientEngine, "compute", shifted)
    with pytest.raises(CollectionSelfCheckError, match=r"differs by 0\.5.*grad_method='loop'"):
        GradientCollector(_config(tmp_path), train, target, tokenizer).collect(model)


def test_bound_plain_trainer_uses_its_tokenized_rows_and_collator(tmp_path, bos_tokenizer):
    from transformers import DataCollatorForSeq2Seq, TrainingArguments

    from hf_subset_select import SubsetSelectTrainer

    train, target = _lm_data(4)
    tokenized = train.map(
        lambda ex: encode_example(ex, bos_tokenizer, 64), remove_columns=["prompt", "completion"]
    )
    collector = GradientCollector(_config(tmp_path), train, target)
    trainer = SubsetSelectTrainer(
        model=add_lora(make_tiny_causal_lm("gpt2", seed=0)),
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=1,
            per_device_train_batch_size=4,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=tokenized,
        data_collator=DataCollatorForSeq2Seq(bos_tokenizer, padding=True),
        processing_class=bos_tokenizer,
        callbacks=[collector],
    )
    assert collector.trainer is trainer
    trainer.train()  # the self-check ran on the trainer's rows and collator
    cache = collector.cache
    assert cache.num_examples == 12
    spec = resolve_output_fn(trainer.model)
    row = tokenized[3]
    expected = _outputs_on(
        trainer.model, spec, trainer.data_collator([{k: row[k] for k in ("input_ids", "labels")}])
    )
    where = int(torch.nonzero((cache.example_ids == row["example_id"]) & (cache.split == 0))[0, 0])
    torch.testing.assert_close(cache.outputs[where], expected[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("given", ["collector_tokenizer", "collator_tokenizer"])
def test_bound_trainer_without_processing_class_encodes_raw_target_rows(tmp_path, pair_tokenizer, given):
    """The quickstart's plain-Trainer setup passes no processing_class: raw target rows are encoded with the
    collector's tokenizer= (as the error message advises) or else the data collator's tokenizer."""
    from datasets import Dataset
    from transformers import (
        BertConfig,
        BertForSequenceClassification,
        DataCollatorWithPadding,
        TrainingArguments,
    )

    from hf_subset_select import SubsetSelectTrainer

    torch.manual_seed(0)
    cfg = BertConfig(
        vocab_size=len(pair_tokenizer),
        hidden_size=16,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=64,
        num_labels=2,
        pad_token_id=0,
    )
    rows = [{"text": "add 1 2", "text_pair": "yes the a", "label": i % 2} for i in range(4)]
    train = tag_sources({"a": Dataset.from_list(rows), "b": Dataset.from_list(rows[:2])}, target="a")
    target = tag_target_eval(Dataset.from_list(rows[:2]), name="t")
    tokenized = train.map(lambda ex: pair_tokenizer(ex["text"], ex["text_pair"]))
    tokenizer = pair_tokenizer if given == "collector_tokenizer" else None
    collector = GradientCollector(_config(tmp_path), train, target, tokenizer)
    trainer = SubsetSelectTrainer(
        model=BertForSequenceClassification(cfg),
        args=TrainingArguments(
            output_dir=str(tmp_path / "run"),
            max_steps=1,
            per_device_train_batch_size=2,
            report_to=[],
            disable_tqdm=True,
            save_strategy="no",
            use_cpu=True,
        ),
        train_dataset=tokenized,
        data_collator=DataCollatorWithPadding(pair_tokenizer),
        callbacks=[collector],
    )
    trainer.train()
    assert collector.cache.num_examples == 8
    assert int((collector.cache.split == 1).sum()) == 2
