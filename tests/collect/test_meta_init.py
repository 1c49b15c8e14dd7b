"""MetaInitCallback + load_meta_init with Trainer and SFTTrainer, LoRA and full fine-tuning."""

from __future__ import annotations

import json
import os

import pytest
import torch
from transformers import DataCollatorForSeq2Seq, Trainer, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_subset_select import (
    MetaInitCallback,
    SubsetSelectSFTTrainer,
    load_meta_init,
)
from hf_subset_select.collect.meta_init import MetaInitManifestError
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm

COMMON = dict(
    per_device_train_batch_size=4,
    learning_rate=5e-2,
    report_to=[],
    save_strategy="no",
    use_cpu=True,
    bf16=False,  # the trained model must compute exactly like the reloaded one
    disable_tqdm=True,
    logging_strategy="no",
)
PROBE = torch.tensor([[40, 5, 6, 48, 7, 3], [41, 9, 9, 48, 1, 3]])


def _tokenize(ds, tok):
    return ds.map(lambda e: encode_example(e, tok, 32))


def _logits(model):
    model.eval()
    with torch.no_grad():
        return model(PROBE).logits


def _same(a, b):
    # Identical weights; a reloaded tensor may differ in memory layout from the trained one, which changes the
    # order of float additions in a matmul, so allow float32 rounding only.
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _manifest(path):
    with open(os.path.join(path, "meta_init.json")) as handle:
        return json.load(handle)


@pytest.mark.parametrize("kind, lora", [("gpt2", True), ("llama", False)])
def test_trainer_meta_init_round_trip(tmp_path, toy_sources, tokenizer, kind, lora):
    train, _ = toy_sources
    model = make_tiny_causal_lm(kind)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if lora:
        model = add_lora(model)
    callback = MetaInitCallback(train_dataset=train, save_steps=[2])
    trainer = Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=4, **COMMON),
        train_dataset=_tokenize(train, tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[callback],
    )
    trainer.train()
    out = tmp_path / "meta_init"
    manifest = _manifest(out)
    assert manifest["kind"] == ("peft" if lora else "full")
    assert manifest["sources"] == {"add": 12, "sub": 10, "rev": 8}
    assert manifest["target_source"] == "add"
    assert manifest["global_step"] == 4
    assert manifest["num_trainable_parameters"] == sum(
        p.numel() for p in model.parameters() if p.requires_grad
    )
    assert (out / "step-2" / "meta_init.json").exists() and _manifest(out / "step-2")["global_step"] == 2
    expected = _logits(model)
    base = make_tiny_causal_lm(kind) if lora else None
    restored = load_meta_init(out, base_model=base)
    _same(_logits(restored), expected)
    if not lora:  # training really moved θ away from the random init
        changed = [n for n, p in restored.named_parameters() if not torch.equal(p, before[n])]
        assert changed
        # full weights also load into a given base model of the same architecture
        into = load_meta_init(out, base_model=make_tiny_causal_lm(kind, seed=5))
        _same(_logits(into), expected)
    else:
        assert all(p.requires_grad for n, p in restored.named_parameters() if "lora_" in n)


def test_sft_trainer_lora_counts_from_the_kept_columns(tmp_path, toy_sources, tokenizer):
    train, _ = toy_sources
    model = add_lora(make_tiny_causal_lm("gpt2"))
    trainer = SubsetSelectSFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=3, **COMMON),
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[MetaInitCallback(output_dir=str(tmp_path / "theta"))],
    )
    trainer.train()
    manifest = _manifest(tmp_path / "theta")
    assert manifest["sources"] == {"add": 12, "sub": 10, "rev": 8}
    restored = load_meta_init(tmp_path / "theta", base_model=make_tiny_causal_lm("gpt2"))
    _same(_logits(restored), _logits(model))


def test_sft_trainer_full_finetune(tmp_path, toy_sources, tokenizer):
    train, _ = toy_sources
    model = make_tiny_causal_lm("llama")
    trainer = SFTTrainer(
        model=model,
        args=SFTConfig(output_dir=str(tmp_path), max_steps=2, **COMMON),
        train_dataset=train,
        processing_class=tokenizer,
        callbacks=[MetaInitCallback(train_dataset=train)],
    )
    trainer.train()
    restored = load_meta_init(tmp_path / "meta_init")
    _same(_logits(restored), _logits(model))


def test_load_refuses_wrong_base_tampering_and_non_meta_init_dirs(tmp_path, toy_sources, tokenizer):
    train, _ = toy_sources
    model = add_lora(make_tiny_causal_lm("gpt2"))
    Trainer(
        model=model,
        args=TrainingArguments(output_dir=str(tmp_path), max_steps=1, **COMMON),
        train_dataset=_tokenize(train, tokenizer),
        data_collator=DataCollatorForSeq2Seq(tokenizer, padding=True),
        callbacks=[MetaInitCallback(train_dataset=train)],
    ).train()
    out = tmp_path / "meta_init"
    with pytest.raises(MetaInitManifestError, match="does not match"):
        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2", seed=1))  # other weights
    with pytest.raises(MetaInitManifestError, match="does not match"):
        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2", hidden=48))  # other shapes
    with pytest.raises(MetaInitManifestError, match="pass the base model"):
        load_meta_init(out)
    with pytest.raises(MetaInitManifestError, match="No meta_init.json"):
        load_meta_init(tmp_path)
    manifest = _manifest(out)
    manifest["fingerprint"] = "0" * 64
    (out / "meta_init.json").write_text(json.dumps(manifest))
    with pytest.raises(MetaInitManifestError, match="edited or damaged.*manifest_sha256"):
        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2"))
    del manifest["manifest_sha256"]  # without its checksum, θ*'s fingerprint still catches the edit
    (out / "meta_init.json").write_text(json.dumps(manifest))
    with pytest.raises(MetaInitManifestError, match="fingerprint"):
        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2"))
    (out / "meta_init.json").write_text("{not json")
    with pytest.raises(MetaInitManifestError, match="not valid JSON"):
        load_meta_init(out, base_model=make_tiny_causal_lm("gpt2"))


def test_peft_sequence_classifier_round_trip_ignores_the_unused_base_head(tmp_path):
    """PEFT wraps a classifier's head (modules_to_save): θ* restores it, so a base model whose own random head
    differs must load, and one whose body differs must still be refused."""
    from hf_subset_select.collect.meta_init import MetaInitManifestError, load_meta_init, save_meta_init
    from hf_subset_select.demo.toy import add_lora, make_tiny_classifier

    model = add_lora(make_tiny_classifier(3, seed=0))
    with torch.no_grad():
        for _, p in model.named_parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    manifest = save_meta_init(model, str(tmp_path / "theta"))
    assert manifest["base_parameters"]["excluded_modules"] == ["score"]
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    model.eval()
    expected = model(input_ids=ids).logits

    other_head = make_tiny_classifier(3, seed=0)
    with torch.no_grad():
        other_head.score.weight.normal_()  # a fresh random head, as from_pretrained on a new label count gives
    restored = load_meta_init(str(tmp_path / "theta"), base_model=other_head)
    assert torch.allclose(restored(input_ids=ids).logits, expected, atol=1e-5)

    other_body = make_tiny_classifier(3, seed=0)
    with torch.no_grad():
        other_body.transformer.h[0].mlp.c_fc.weight.add_(1.0)
    with pytest.raises(MetaInitManifestError, match="base model does not match"):
        load_meta_init(str(tmp_path / "theta"), base_model=other_body)
