"""Weighted loss (WeightedLossTrainer / WeightedLossSFTTrainer), example_weights, and the trainers' weighted
sampling."""

from __future__ import annotations

import tempfile

import pytest
import torch

from hf_subset_select.data.encode import encode_example
from hf_subset_select.data.trainers import SubsetSelectSFTTrainer, SubsetSelectTrainer
from hf_subset_select.demo.toy import make_tiny_causal_lm
from hf_subset_select.train.collator import SubsetSelectingDataCollator
from hf_subset_select.train.sampler import SourceWeightedSampler
from hf_subset_select.train.weighted_loss import WeightedLossSFTTrainer, WeightedLossTrainer, example_weights

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture(scope="module")
def tokenized(sources):
    from hf_subset_select.demo.toy import make_tokenizer

    tok = make_tokenizer()
    return sources.map(lambda ex: encode_example(ex, tok, max_length=32)).remove_columns(
        ["prompt", "completion"]
    )


def _trl_collator():
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0)


def _args(cls, **kw):
    from trl import SFTConfig

    base = dict(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        optim="sgd",
        learning_rate=0.5,
        lr_scheduler_type="constant",
        train_sampling_strategy="sequential",
        max_grad_norm=0.0,
    )
    base.update(kw)
    if cls is SFTConfig:  # SFTConfig defaults to bf16 autocast and activation checkpointing, even on CPU
        base.setdefault("max_length", 64)
        base.setdefault("bf16", False)
        base.setdefault("activation_checkpointing", False)
    return cls(**base)


def _model():
    return make_tiny_causal_lm("llama", hidden=16, layers=1, seed=0)


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _loss_and_grads(trainer, model, batch, num_items_in_batch=None):
    model.zero_grad()
    model.train()
    loss = trainer.compute_loss(model, dict(batch), num_items_in_batch=num_items_in_batch)
    loss.backward()
    return loss.detach(), _grads(model)


def _assert_grads_close(a, b, atol=1e-6):
    assert a.keys() == b.keys() and a
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


def _rows(ds):
    return [ds[i] for i in range(len(ds))]


# ---------------------------------------------------------------------------------------------------------------
# Trainer: loss and gradients on one batch
# ---------------------------------------------------------------------------------------------------------------


def test_all_ones_weights_equal_ordinary_loss_and_grads(tokenized):
    from transformers import TrainingArguments

    model = _model()
    rows = _rows(tokenized)
    plain = SubsetSelectTrainer(model=model, args=_args(TrainingArguments), data_collator=_trl_collator())
    weighted = WeightedLossTrainer(
        model=model,
        args=_args(TrainingArguments),
        data_collator=SubsetSelectingDataCollator(_trl_collator(), ["add", "sub", "rev"], mode="weight"),
    )
    batch_w = weighted.data_collator(rows)
    assert torch.equal(batch_w["example_weight"], torch.ones(len(rows)))
    batch_p = plain.data_collator(rows)

    # without num_items_in_batch: the model's own mean loss
    loss_p, grads_p = _loss_and_grads(plain, model, batch_p)
    loss_w, grads_w = _loss_and_grads(weighted, model, batch_w)
    torch.testing.assert_close(loss_w, loss_p, atol=1e-6, rtol=1e-6)
    _assert_grads_close(grads_w, grads_p)

    # with num_items_in_batch (the gradient-accumulation path): counts and losses agree
    n_plain = plain._get_num_items_in_batch([batch_p], torch.device("cpu"))
    n_weighted = weighted._get_num_items_in_batch([batch_w], torch.device("cpu"))
    assert float(n_weighted) == float(n_plain) > 0
    loss_p, grads_p = _loss_and_grads(plain, model, batch_p, n_plain)
    loss_w, grads_w = _loss_and_grads(weighted, model, batch_w, n_weighted)
    torch.testing.assert_close(loss_w, loss_p, atol=1e-6, rtol=1e-6)
    _assert_grads_close(grads_w, grads_p)
    assert weighted.loss_is_scaled_for_ga is True


def test_weighted_loss_matches_per_example_reference(tokenized):
    """The loss is sum_i w_i * (token-loss sum of i) / sum_i w_i * n_i, with each example run on its own."""
    from transformers import TrainingArguments

    model = _model()
    model.eval()  # the reference is computed without grad; the weighted path needs model.training
    rows = _rows(tokenized)
    table = {"add": 0.7, "sub": 2.5, "rev": 0.2}
    collator = SubsetSelectingDataCollator(_trl_collator(), table, mode="weight")
    trainer = WeightedLossTrainer(model=model, args=_args(TrainingArguments), data_collator=collator)
    num, den = 0.0, 0.0
    with torch.no_grad():
        for row in rows:
            one = _trl_collator()([{"input_ids": row["input_ids"], "labels": row["labels"]}])
            n_i = int((one["labels"][:, 1:] != -100).sum())
            loss_i = float(model(**one).loss)  # mean over the example's n_i supervised tokens
            num += table[row["source"]] * loss_i * n_i
            den += table[row["source"]] * n_i
    model.train()
    with torch.no_grad():
        loss = trainer.compute_loss(model, collator(rows))
        # scale invariance: multiplying all weights by a constant changes nothing
        scaled = SubsetSelectingDataCollator(
            _trl_collator(), {k: 13.0 * v for k, v in table.items()}, mode="weight"
        )
        loss_scaled = trainer.compute_loss(model, scaled(rows))
    assert loss.item() == pytest.approx(num / den, rel=1e-5)
    assert loss_scaled.item() == pytest.approx(num / den, rel=1e-5)


def test_zero_weight_removes_example_exactly(tokenized):
    from transformers import TrainingArguments

    model = _model()
    rows = _rows(tokenized)
    table = {"add": 1.0, "sub": 0.0, "rev": 1.0}
    weighted = WeightedLossTrainer(
        model=model,
        args=_args(TrainingArguments),
        data_collator=SubsetSelectingDataCollator(_trl_collator(), table, mode="weight"),
    )
    plain = SubsetSelectTrainer(model=model, args=_args(TrainingArguments), data_collator=_trl_collator())
    batch_w = weighted.data_collator(rows)
    assert batch_w["example_weight"].tolist() == [table[r["source"]] for r in rows]
    kept = [r for r in rows if table[r["source"]] > 0]
    batch_p = plain.data_collator(kept)
    for use_count in (False, True):
        n_w = weighted._get_num_items_in_batch([batch_w], torch.device("cpu")) if use_count else None
        n_p = plain._get_num_items_in_batch([batch_p], torch.device("cpu")) if use_count else None
        if use_count:
            assert float(n_w) == float(n_p)
        loss_w, grads_w = _loss_and_grads(weighted, model, batch_w, n_w)
        loss_p, grads_p = _loss_and_grads(plain, model, batch_p, n_p)
        torch.testing.assert_close(loss_w, loss_p, atol=1e-6, rtol=1e-5)
        _assert_grads_close(grads_w, grads_p)


def test_all_zero_batch_gives_zero_loss(tokenized):
    from transformers import TrainingArguments

    model = _model()
    trainer = WeightedLossTrainer(model=model, args=_args(TrainingArguments), data_collator=_trl_collator())
    batch = _trl_collator()([{"input_ids": r["input_ids"], "labels": r["labels"]} for r in _rows(tokenized)])
    batch["example_weight"] = torch.zeros(len(tokenized))
    loss, grads = _loss_and_grads(trainer, model, batch)
    assert loss.item() == 0.0 and torch.isfinite(loss)
    assert all(float(g.abs().max()) == 0.0 for g in grads.values())


def _seq2seq_model():
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(0)
    config = T5Config(
        vocab_size=40, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, dropout_rate=0.0,
    )  # fmt: skip
    return T5ForConditionalGeneration(config)


@pytest.mark.parametrize("kind", ["seq2seq", "classifier"])
def test_other_model_kinds_weighted_equals_ordinary(kind, tokenizer):
    """Encoder-decoder (unshifted labels) and sequence classification (one label per example)."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding, TrainingArguments

    from hf_subset_select.demo.toy import make_tiny_classifier

    if kind == "seq2seq":
        model = _seq2seq_model()
        base = DataCollatorForSeq2Seq(tokenizer, model=model)
        rows = [
            {"input_ids": [5, 6, 7, 8, 9, 1], "labels": [11, 12, 1], "source": "a"},
            {"input_ids": [5, 6, 1], "labels": [13, 14, 15, 16, 1], "source": "b"},
            {"input_ids": [7, 1], "labels": [20, 1], "source": "a"},
        ]
    else:
        model = make_tiny_classifier(num_labels=3)
        base = DataCollatorWithPadding(tokenizer)
        rows = [
            {"input_ids": [5, 6, 7, 8], "label": 2, "source": "a"},
            {"input_ids": [5, 6], "label": 0, "source": "b"},
            {"input_ids": [9, 10, 11], "label": 1, "source": "a"},
        ]
    plain = SubsetSelectTrainer(model=model, args=_args(TrainingArguments), data_collator=base)
    weighted = WeightedLossTrainer(
        model=model,
        args=_args(TrainingArguments),
        data_collator=SubsetSelectingDataCollator(base, {"a": 1.0, "b": 1.0}, mode="weight"),
    )
    loss_p, grads_p = _loss_and_grads(plain, model, plain.data_collator(rows))
    loss_w, grads_w = _loss_and_grads(weighted, model, weighted.data_collator(rows))
    torch.testing.assert_close(loss_w, loss_p, atol=1e-6, rtol=1e-6)
    _assert_grads_close(grads_w, grads_p)
    # weight 0 for 'b' == the batch without the 'b' example
    zero = SubsetSelectingDataCollator(base, {"a": 1.0, "b": 0.0}, mode="weight")
    loss_z, grads_z = _loss_and_grads(weighted, model, zero(rows))
    without = [r for r in rows if r["source"] == "a"]
    loss_a, grads_a = _loss_and_grads(plain, model, plain.data_collator(without))
    torch.testing.assert_close(loss_z, loss_a, atol=1e-6, rtol=1e-5)
    _assert_grads_close(grads_z, grads_a)


# ---------------------------------------------------------------------------------------------------------------
# training runs: gradient accumulation and exact removal, Trainer and SFTTrainer
# ---------------------------------------------------------------------------------------------------------------


def _train(trainer_cls, args_cls, dataset, collator, tokenizer=None, **args_kw):
    model = _model()
    kwargs = dict(model=model, args=_args(args_cls, **args_kw), train_dataset=dataset, data_collator=collator)
    if tokenizer is not None:
        kwargs["processing_class"] = tokenizer
    trainer = trainer_cls(**kwargs)
    trainer.train()
    return {n: p.detach().clone() for n, p in model.named_parameters()}, trainer


def _assert_params_close(a, b, atol=1e-6):
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=1e-5, msg=name)


@pytest.mark.parametrize("kind", ["trainer", "sft"])
def test_gradient_accumulation_and_zero_weight_in_training(kind, sources, tokenized, tokenizer):
    from transformers import TrainingArguments
    from trl import SFTConfig

    if kind == "trainer":
        w_cls, p_cls, a_cls, data, tok = (
            WeightedLossTrainer,
            SubsetSelectTrainer,
            TrainingArguments,
            tokenized,
            None,
        )
    else:
        w_cls, p_cls, a_cls, data, tok = (
            WeightedLossSFTTrainer,
            SubsetSelectSFTTrainer,
            SFTConfig,
            sources,
            tokenizer,
        )
    table = {"add": 1.0, "sub": 0.4, "rev": 0.0}
    n = len(data)

    def coll(t):
        return SubsetSelectingDataCollator(_trl_collator(), t, mode="weight")

    # one optimizer step over all 6 examples: one batch of 6 == 3 accumulated micro-batches of 2
    full, trainer = _train(w_cls, a_cls, data, coll(table), tok, per_device_train_batch_size=n, max_steps=1)
    accum, _ = _train(
        w_cls,
        a_cls,
        data,
        coll(table),
        tok,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=1,
    )
    initial = {n_: p.detach() for n_, p in _model().named_parameters()}
    assert any(not torch.allclose(full[k], initial[k]) for k in full), (
        "the step did not change the parameters"
    )
    _assert_params_close(accum, full)

    # weight 0 for 'rev' == training without the 'rev' examples; all-ones == the ordinary trainer
    ones = {"add": 1.0, "sub": 1.0, "rev": 0.0}
    zero_w, _ = _train(
        w_cls,
        a_cls,
        data,
        coll(ones),
        tok,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=3,
        max_steps=1,
    )
    without = data.filter(lambda ex: ex["source"] != "rev")
    plain, _ = _train(
        p_cls, a_cls, without, _trl_collator(), tok, per_device_train_batch_size=len(without), max_steps=1
    )
    _assert_params_close(zero_w, plain)
    if kind == "sft":  # SFTTrainer's own metrics still get logged
        logged = trainer.state.log_history[0]
        assert "mean_token_accuracy" in logged and "entropy" in logged and "num_tokens" in logged


def test_evaluation_ignores_weights(sources, tokenizer):
    from trl import SFTConfig

    model = _model()
    collator = SubsetSelectingDataCollator(
        _trl_collator(), {"add": 1.0, "sub": 0.1, "rev": 0.0}, mode="weight"
    )
    weighted = WeightedLossSFTTrainer(
        model=model,
        args=_args(SFTConfig),
        train_dataset=sources,
        eval_dataset=sources,
        processing_class=tokenizer,
        data_collator=collator,
    )
    plain = SubsetSelectSFTTrainer(
        model=model,
        args=_args(SFTConfig),
        train_dataset=sources,
        eval_dataset=sources,
        processing_class=tokenizer,
        data_collator=_trl_collator(),
    )
    assert weighted.evaluate()["eval_loss"] == pytest.approx(plain.evaluate()["eval_loss"], rel=1e-6)


def test_refuses_label_smoothing(tokenized):
    from transformers import TrainingArguments

    with pytest.raises(ValueError, match="label smoothing"):
        WeightedLossTrainer(model=_model(), args=_args(TrainingArguments, label_smoothing_factor=0.1))


# ---------------------------------------------------------------------------------------------------------------
# weighted sampling
# ---------------------------------------------------------------------------------------------------------------


def test_example_weights(sources):
    w = example_weights(sources, {"add": 2.0, "sub": 1.0, "rev": 0.0})
    assert w.tolist() == [{"add": 2.0, "sub": 1.0, "rev": 0.0}[s] for s in sources["source"]]
    mix = example_weights(sources, {"add": 0.5, "sub": 0.5, "rev": 0.0}, source_weighting="mixture")
    # mixture: each source's total weight is its share (3 'add' and 2 'sub' examples share equally)
    shares = {
        s: float(sum(m for m, t in zip(mix.tolist(), sources["source"]) if t == s)) for s in ("add", "sub")
    }
    assert shares["add"] == pytest.approx(shares["sub"])


def test_trainer_uses_weighted_sampler(sources, tokenizer):
    from trl import SFTConfig

    collator = SubsetSelectingDataCollator(_trl_collator(), ["add", "sub", "rev"], mode="filter", warn=False)
    trainer = WeightedLossSFTTrainer(
        model=_model(),
        args=_args(SFTConfig, per_device_train_batch_size=2, num_train_epochs=2),
        train_dataset=sources,
        processing_class=tokenizer,
        data_collator=collator,
        sampling_selection={"add": 1.0, "sub": 1.0, "rev": 0.0},
    )
    assert isinstance(trainer._get_train_sampler(), SourceWeightedSampler)
    trainer.train()
    # 5 examples with positive weight -> 5 draws per epoch, never from 'rev'
    assert sum(collator.seen.values()) == 10 and collator.seen["rev"] == 0


# ---------------------------------------------------------------------------------------------------------------
# two processes (gloo): the weighted loss of a data-parallel step equals the single-process step
# ---------------------------------------------------------------------------------------------------------------

_DDP_TABLE = {"add": 1.0, "sub": 0.4, "rev": 0.0}

# Run in fresh interpreters by torchrun: forking the test process (accelerate.debug_launcher) after torch has
# started its intra-op threads can deadlock the children.
_DDP_WORKER = """
import sys
sys.path.insert(0, sys.argv[1])
import datasets, torch, torch.distributed as dist
from transformers import TrainingArguments
import test_weighted_loss as T
from hf_subset_select.train.collator import SubsetSelectingDataCollator
from hf_subset_select.train.weighted_loss import WeightedLossTrainer

data = datasets.load_from_disk(sys.argv[2])
collator = SubsetSelectingDataCollator(T._trl_collator(), T._DDP_TABLE, mode="weight")
params, trainer = T._train(
    WeightedLossTrainer, TrainingArguments, data, collator, per_device_train_batch_size=3, max_steps=1
)
assert trainer.args.world_size == 2 and dist.get_world_size() == 2
if trainer.is_world_process_zero():
    torch.save(params, sys.argv[3])
dist.barrier()
dist.destroy_process_group()  # a clean gloo teardown: exiting with live threads can abort a rank
"""


@pytest.mark.multiprocess
def test_two_process_step_equals_single_process(tokenized, tmp_path, torchrun):
    import os

    from transformers import TrainingArguments

    tokenized.save_to_disk(str(tmp_path / "data"))
    out = tmp_path / "ddp_params.pt"
    tests_dir = os.path.dirname(os.path.abspath(__file__))
    torchrun(_DDP_WORKER, [tests_dir, str(tmp_path / "data"), str(out)])
    single, _ = _train(
        WeightedLossTrainer,
        TrainingArguments,
        tokenized,
        SubsetSelectingDataCollator(_trl_collator(), _DDP_TABLE, mode="weight"),
        per_device_train_batch_size=6,
        max_steps=1,
    )
    _assert_params_close(torch.load(out), single)
