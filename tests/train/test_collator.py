"""SubsetSelectingDataCollator: wrapping each kind of base collator, filter and weight modes, errors."""

from __future__ import annotations

import types
from collections import Counter

import pytest
import torch

from hf_subset_select import BookkeepingColumnsError, SubsetSelectingDataCollator
from hf_subset_select.data.encode import encode_example
from hf_subset_select.demo.toy import toy_text_dataset

quiet = pytest.mark.filterwarnings("ignore::UserWarning")


@pytest.fixture
def tagged_tokens(toy_sources, tokenizer):
    train, _ = toy_sources
    return train.map(lambda ex: encode_example(ex, tokenizer, max_length=32)).remove_columns(
        ["prompt", "completion"]
    )


def _rows(ds, idx=None):
    return [ds[i] for i in (idx if idx is not None else range(len(ds)))]


def _base_collators(tokenizer):
    from transformers import DataCollatorForLanguageModeling, DataCollatorForSeq2Seq, DataCollatorWithPadding
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling as TRLCollator

    return {
        "transformers_lm": (DataCollatorForLanguageModeling(tokenizer, mlm=False), ("input_ids",)),
        "with_padding": (DataCollatorWithPadding(tokenizer), ("input_ids",)),
        "seq2seq": (DataCollatorForSeq2Seq(tokenizer), ("input_ids", "labels")),
        "trl_sft": (TRLCollator(pad_token_id=tokenizer.pad_token_id), ("input_ids", "labels")),
    }


@quiet
@pytest.mark.parametrize("name", ["transformers_lm", "with_padding", "seq2seq", "trl_sft"])
def test_wraps_each_base_collator(name, tagged_tokens, tokenizer):
    base, columns = _base_collators(tokenizer)[name]
    rows = _rows(tagged_tokens, [0, 13, 25, 3])  # add, sub, rev, add
    features = [{c: r[c] for c in (*columns, "source", "example_id")} for r in rows]
    table = {"add": 1.0, "sub": 0.25, "rev": 0.0}

    weighted = SubsetSelectingDataCollator(base, table, mode="weight")(features)
    expected = base([{c: r[c] for c in columns} for r in rows])  # the base collator on stripped examples
    assert "source" not in weighted and "example_id" not in weighted
    for key in expected:
        assert torch.equal(weighted[key], expected[key]), key
    assert weighted["example_weight"].dtype == torch.float32
    assert weighted["example_weight"].tolist() == [table[r["source"]] for r in rows]

    filtered = SubsetSelectingDataCollator(base, table, mode="filter")(features)
    kept = [r for r in rows if table[r["source"]] > 0]
    expected = base([{c: r[c] for c in columns} for r in kept])
    assert set(filtered) == set(expected)  # no weight key: usable with a plain Trainer
    for key in expected:
        assert torch.equal(filtered[key], expected[key]), key


def test_filter_mode_one_epoch_yields_exactly_selected(tagged_tokens):
    # a copy of example_id under another name survives the stripping and shows what the base collator received
    data = tagged_tokens.add_column("eid", tagged_tokens["example_id"])
    received = []

    def recording(features):
        assert all("source" not in f and "example_id" not in f for f in features)
        received.extend(f["eid"] for f in features)
        return {"input_ids": torch.tensor([f["input_ids"][:2] for f in features])}

    with pytest.warns(UserWarning, match="selection.apply"):
        collator = SubsetSelectingDataCollator(recording, ["add", "rev"], mode="filter")
    loader = torch.utils.data.DataLoader(
        data, batch_size=4, shuffle=True, collate_fn=collator, generator=torch.Generator().manual_seed(0)
    )
    sizes = [batch["input_ids"].shape[0] for batch in loader]
    expected = [i for i, s in zip(data["example_id"], data["source"]) if s in ("add", "rev")]
    assert sorted(received) == sorted(expected) and len(set(received)) == len(received)
    assert sum(sizes) == len(expected) and min(sizes) < 4  # batches shrink (documented)
    counts = Counter(data["source"])
    assert collator.kept == Counter({"add": counts["add"], "rev": counts["rev"]})
    assert collator.seen == counts


@quiet
def test_filter_in_sft_trainer_trains_only_on_selected(toy_sources, tokenizer):
    import tempfile

    from trl import SFTConfig
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    from hf_subset_select import SubsetSelectSFTTrainer
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    train, _ = toy_sources
    collator = SubsetSelectingDataCollator(DataCollatorForLanguageModeling(pad_token_id=0), ["add", "rev"])
    args = SFTConfig(
        tempfile.mkdtemp(), report_to=[], use_cpu=True, bf16=False, activation_checkpointing=False,
        per_device_train_batch_size=4, num_train_epochs=1, save_strategy="no", disable_tqdm=True, max_length=32,
    )  # fmt: skip
    trainer = SubsetSelectSFTTrainer(
        model=make_tiny_causal_lm("llama", hidden=16, layers=1),
        args=args,
        train_dataset=train,
        processing_class=tokenizer,
        data_collator=collator,
    )
    trainer.train()
    counts = Counter(train["source"])
    assert collator.seen == counts  # the source column reached the collator through SFTTrainer
    assert collator.kept == Counter({"add": counts["add"], "rev": counts["rev"]})


@quiet
def test_all_dropped_batch(tagged_tokens, tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=0)
    subs = [r for r in _rows(tagged_tokens) if r["source"] == "sub"][:3]
    with pytest.raises(ValueError, match="empty batch"):
        SubsetSelectingDataCollator(base, ["add"], mode="filter")(subs)
    zero = SubsetSelectingDataCollator(base, ["add"], mode="filter", on_empty="zero_weight")
    batch = zero(subs)
    assert batch["input_ids"].shape[0] == 3 and batch["example_weight"].tolist() == [0.0, 0.0, 0.0]
    mixed = zero(_rows(tagged_tokens, [0, 13]))  # add kept, sub dropped: weights present and 1
    assert mixed["input_ids"].shape[0] == 1 and mixed["example_weight"].tolist() == [1.0]


def test_missing_source_column_names_the_fix(tagged_tokens):
    collator = SubsetSelectingDataCollator(lambda f: {}, {"add": 1.0}, mode="weight")
    rows = [{"input_ids": r["input_ids"]} for r in _rows(tagged_tokens, [0, 1])]
    with pytest.raises(BookkeepingColumnsError, match="SubsetSelectSFTTrainer") as err:
        collator(rows)
    assert isinstance(err.value, ValueError)


@quiet
def test_padding_free_weights_refused_filter_ok(tagged_tokens):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    base = DataCollatorForLanguageModeling(pad_token_id=0, padding_free=True)
    rows = [{k: r[k] for k in ("input_ids", "labels", "source")} for r in _rows(tagged_tokens, [0, 1, 13])]
    with pytest.raises(BookkeepingColumnsError, match="padding_free"):
        SubsetSelectingDataCollator(base, {"add": 1.0, "sub": 0.5}, mode="weight")(rows)
    batch = SubsetSelectingDataCollator(base, ["add"], mode="filter")(rows)
    assert batch["input_ids"].shape[0] == 1
    assert batch["input_ids"].shape[1] == len(rows[0]["input_ids"]) + len(rows[1]["input_ids"])


def test_unknown_sources_policy(tagged_tokens):
    rows = _rows(tagged_tokens, [0, 13])  # add, sub

    def base(features):
        return {"input_ids": torch.tensor([f["input_ids"][:2] for f in features])}

    with pytest.warns(UserWarning, match="'sub' is not in the selection"):
        batch = SubsetSelectingDataCollator(base, {"add": 0.5}, mode="weight")(rows)
    assert batch["example_weight"].tolist() == [0.5, 1.0]
    batch = SubsetSelectingDataCollator(base, {"add": 0.5}, mode="weight", unknown_sources="drop")(rows)
    assert batch["example_weight"].tolist() == [0.5]
    with pytest.raises(KeyError, match="not in the selection"):
        SubsetSelectingDataCollator(base, {"add": 0.5}, mode="weight", unknown_sources="error")(rows)
    batch = SubsetSelectingDataCollator(base, {"add": 0.5, "sub": 0.0}, mode="weight", always_keep=["sub"])(
        rows
    )
    assert batch["example_weight"].tolist() == [0.5, 1.0]


def test_selection_kinds_and_mixture(tagged_tokens, tmp_path):
    def base(features):
        return {"input_ids": torch.zeros(len(features), 1)}

    rows = _rows(tagged_tokens, [0, 13, 25])  # add, sub, rev
    as_object = types.SimpleNamespace(
        selected=["add", "sub"], weights={"add": 0.6, "sub": 0.4}, scores={"add": 1, "sub": 2, "rev": 3}
    )
    out = SubsetSelectingDataCollator(base, as_object, mode="weight")(rows)  # 'rev' scored, not selected -> 0
    assert out["example_weight"].tolist() == pytest.approx([0.6, 0.4, 0.0])
    out = SubsetSelectingDataCollator(base, ["add"], mode="weight", unknown_sources="drop")(rows)
    assert out["example_weight"].tolist() == [1.0]

    counts = Counter(tagged_tokens["source"])  # add 12, sub 10, rev 8
    mix = SubsetSelectingDataCollator(
        base,
        {"add": 0.5, "sub": 0.5, "rev": 0.0},
        mode="weight",
        source_weighting="mixture",
        source_counts=counts,
    )
    w = {s: mix.example_weight(s) for s in counts}
    assert w["add"] * counts["add"] == pytest.approx(w["sub"] * counts["sub"])  # equal shares of the loss
    assert sum(w[s] * counts[s] for s in counts) == pytest.approx(sum(counts.values()))  # mean weight 1
    assert w["rev"] == 0.0
    with pytest.raises(ValueError, match="source_counts"):
        SubsetSelectingDataCollator(base, {"add": 1.0}, mode="weight", source_weighting="mixture")

    with pytest.raises(ValueError, match="weight 0"):
        SubsetSelectingDataCollator(base, {"add": 0.0}, mode="weight")
    with pytest.raises(ValueError, match=">= 0"):
        SubsetSelectingDataCollator(base, {"add": -1.0}, mode="weight")
    with pytest.raises(ValueError, match="mode"):
        SubsetSelectingDataCollator(base, ["add"], mode="drop")
    with pytest.raises(TypeError, match="SourceSelection"):
        SubsetSelectingDataCollator(base, 3, mode="weight")


def test_reads_attributes_of_base(tokenizer):
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    collator = SubsetSelectingDataCollator(
        DataCollatorForLanguageModeling(pad_token_id=7), ["add"], warn=False
    )
    assert collator.pad_token_id == 7 and collator.handles_bookkeeping is True
    with pytest.raises(AttributeError):
        collator.no_such_attribute  # noqa: B018


@quiet
def test_target_eval_split_passes_through(tokenizer):
    """A target eval split tagged under its own name is kept (weight 1) in filter mode, with one warning."""
    from hf_subset_select import tag_target_eval

    ev = tag_target_eval(toy_text_dataset("add", 3, seed=5), name="add_eval")
    ev = ev.map(lambda ex: encode_example(ex, tokenizer, max_length=32))
    collator = SubsetSelectingDataCollator(lambda f: {"n": torch.tensor(len(f))}, {"add": 1.0}, warn=False)
    with pytest.warns(UserWarning, match="add_eval"):
        assert int(collator(_rows(ev))["n"]) == 3
    # a plain list means exactly these sources: name the eval split in always_keep
    collator = SubsetSelectingDataCollator(
        lambda f: {"n": torch.tensor(len(f))}, ["add"], always_keep=["add_eval"]
    )
    assert int(collator(_rows(ev))["n"]) == 3


def test_source_selection_file(tagged_tokens, tmp_path):
    from hf_subset_select import SourceSelection

    sel = SourceSelection(
        method="random_ensemble",
        sources=["sub", "rev"],
        scores={"sub": 1.0, "rev": 2.0},
        selected=["sub"],
        weights={"sub": 1.0, "rev": 0.0},
        target_source="add",
    )
    sel.save(tmp_path / "selection.json")

    def base(features):
        return {"input_ids": torch.zeros(len(features), 1)}

    rows = _rows(tagged_tokens, [0, 13, 25])  # add, sub, rev
    for selection in (sel, str(tmp_path / "selection.json")):
        weighted = SubsetSelectingDataCollator(base, selection, mode="weight")
        assert weighted(rows)["example_weight"].tolist() == [
            1.0,
            1.0,
            0.0,
        ]  # the target source keeps weight 1
        filtered = SubsetSelectingDataCollator(base, selection, mode="filter", warn=False)
        assert filtered(rows)["input_ids"].shape[0] == 2
    # the collator's per-example weights agree with the selection's own
    expected = sel.sampling_weights(tagged_tokens)
    assert [weighted.example_weight(s) for s in tagged_tokens["source"]] == expected
    # filtering in the collator keeps what selection.apply keeps
    applied = sel.apply(tagged_tokens)
    assert sorted(applied["example_id"]) == sorted(
        i
        for i, s in zip(tagged_tokens["example_id"], tagged_tokens["source"])
        if filtered.example_weight(s) > 0
    )
