"""RegimeCheckCallback: a target fine-tune that ends above the dev loss it started from is named, with the fix."""

from __future__ import annotations

import logging
import tempfile

import pytest

from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import make_tiny_causal_lm, make_tokenizer
from hf_subset_select.train.regime import RegimeCheckCallback, RegimeError

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning")


def _evaluate(callback, losses):
    from transformers import TrainerControl, TrainerState, TrainingArguments

    args = TrainingArguments(output_dir=tempfile.mkdtemp(), report_to=[], use_cpu=True)
    state, control = TrainerState(), TrainerControl()
    for step, loss in losses:
        state.global_step = step
        callback.on_evaluate(args, state, control, metrics={"eval_loss": loss, "epoch": 0.0})
    return args, state, control


def test_report_compares_first_and_last_evaluation():
    callback = RegimeCheckCallback(tolerance=0.05)
    _evaluate(callback, [(0, 2.0), (5, 1.5), (10, 2.08)])
    report = callback.check()
    assert (report["start_loss"], report["end_loss"], report["end_step"]) == (2.0, 2.08, 10)
    assert report["relative_change"] == pytest.approx(0.04) and report["in_regime"]
    _evaluate(callback, [(20, 2.2)])  # 10% above the start: out of the regime at a 5% tolerance
    assert not callback.check()["in_regime"]


def test_needs_an_evaluation_at_the_start():
    callback = RegimeCheckCallback()
    _evaluate(callback, [(5, 1.0), (10, 1.2)])
    with pytest.raises(ValueError, match="eval_on_start=True"):
        callback.check()
    callback = RegimeCheckCallback(metric_key="eval_target_loss")  # the key is not in the metrics
    _evaluate(callback, [(0, 1.0), (10, 1.2)])
    with pytest.raises(ValueError, match="metric_key"):
        callback.check()


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"tolerance": -0.1}, "tolerance"),
        ({"on_violation": "ignore"}, "on_violation"),
        ({"metric_key": ""}, "metric_key"),
    ],
)
def test_refuses_bad_settings(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RegimeCheckCallback(**kwargs)


def _run(learning_rate, callback):
    from datasets import Dataset
    from transformers import DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tok = make_tokenizer()
    rows = [{"prompt": f"add {i} {i + 1} =", "completion": f" {2 * i + 1}"} for i in range(8)]
    data = Dataset.from_list([encode_example(r, tok, max_length=16) for r in rows])
    args = TrainingArguments(
        output_dir=tempfile.mkdtemp(),
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        seed=0,
        optim="sgd",
        learning_rate=learning_rate,
        lr_scheduler_type="constant",
        max_steps=4,
        per_device_train_batch_size=4,
        eval_strategy="steps",
        eval_steps=4,
        eval_on_start=True,
    )
    collator = DataCollatorForLanguageModeling(tok, mlm=False)
    model = make_tiny_causal_lm("llama", hidden=16, layers=1, seed=0)
    trainer = Trainer(
        model=model,
        args=args,
        train_dataset=data,
        eval_dataset=data,
        data_collator=collator,
        callbacks=[callback],
    )
    trainer.train()
    return callback.report


def test_a_real_fine_tune_that_lowers_the_loss_passes_and_one_that_raises_it_is_named(caplog):
    good = _run(0.5, RegimeCheckCallback())
    assert good["start_step"] == 0 and good["end_step"] == 4 and good["in_regime"]
    assert good["end_loss"] < good["start_loss"]
    with pytest.raises(RegimeError, match="lower learning_rate or max_steps"):
        _run(500.0, RegimeCheckCallback(on_violation="error"))
    with caplog.at_level(logging.WARNING):
        bad = _run(500.0, RegimeCheckCallback())
    assert not bad["in_regime"] and bad["end_loss"] > bad["start_loss"]
    assert "above" in caplog.text
