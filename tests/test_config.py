"""Config dataclasses: validation, JSON round trip, HfArgumentParser."""

from __future__ import annotations

import json

import pytest
from transformers import HfArgumentParser

from hf_subset_select import CollectConfig, EstimatorConfig, MetaInitConfig, SelectConfig

ALL = [MetaInitConfig, CollectConfig, EstimatorConfig, SelectConfig]


@pytest.mark.parametrize("cls", ALL)
def test_round_trip_and_help(cls, tmp_path):
    cfg = cls()
    cfg.save(tmp_path)
    assert cls.load(tmp_path) == cfg
    path = tmp_path / "x.json"
    cfg.save(path)
    assert cls.load(path) == cfg
    import dataclasses

    assert all(f.metadata.get("help") for f in dataclasses.fields(cls))


def test_hf_argument_parser_flags_and_json(tmp_path):
    from hf_subset_select.cli import prefixed_dataclass, unprefixed

    # configs that share a field name (seed) go into one parser with a prefix on one of them
    parser = HfArgumentParser((CollectConfig, prefixed_dataclass(EstimatorConfig, "estimator_")))
    collect, est = parser.parse_args_into_dataclasses(
        ["--proj_dim", "256", "--proj_type", "sparse", "--estimator_l2", "0.5", "--seed", "3"]
    )
    est = unprefixed(est, EstimatorConfig, "estimator_")
    assert collect.proj_dim == 256 and collect.proj_type == "sparse" and collect.seed == 3
    assert isinstance(est, EstimatorConfig) and est.l2 == 0.5
    (select,) = HfArgumentParser(SelectConfig).parse_args_into_dataclasses(
        ["--method", "linear", "--top_k", "3"]
    )
    assert select.method == "linear" and select.top_k == 3
    (tmp_path / "c.json").write_text(json.dumps({"proj_dim": 64, "seed": 7}))
    (collect,) = HfArgumentParser(CollectConfig).parse_json_file(str(tmp_path / "c.json"))
    assert collect.proj_dim == 64 and collect.seed == 7


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (CollectConfig, {"proj_dim": 0}, "proj_dim"),
        (CollectConfig, {"proj_type": "dense"}, "proj_type"),
        (CollectConfig, {"prob_clamp": 0.7}, "prob_clamp"),
        (EstimatorConfig, {"solver": "magic"}, "solver"),
        (EstimatorConfig, {"l2": -1.0}, "l2"),
        (SelectConfig, {"subset_ratio": 1.5}, "subset_ratio"),
        (SelectConfig, {"method": "greedy"}, "method"),
        (MetaInitConfig, {"save_steps": [0]}, "save_steps"),
    ],
)
def test_invalid_values_are_rejected_with_the_field_name(cls, kwargs, message):
    with pytest.raises(ValueError, match=message):
        cls(**kwargs)


def test_load_rejects_wrong_type_and_warns_about_unknown_fields(tmp_path):
    CollectConfig().save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="collect_config"):
        SelectConfig.load(tmp_path / "c.json")
    (tmp_path / "bad.json").write_text(
        json.dumps({"config_type": "collect_config", "bogus": 1, "proj_dim": 64})
    )
    with pytest.warns(UserWarning, match="bogus"):
        loaded = CollectConfig.load(tmp_path / "bad.json")
    assert loaded.proj_dim == 64 and not hasattr(loaded, "bogus")


def test_result_dict_leaves_out_runtime_fields_and_literals_list_their_choices():
    import dataclasses
    import typing

    cfg = CollectConfig(batch_size=3, output_dir="x", overwrite=True)
    result = cfg.result_dict()
    for runtime in (
        "batch_size",
        "output_dir",
        "overwrite",
        "proj_chunk_size",
        "proj_cache_mb",
        "grad_method",
    ):
        assert runtime not in result and runtime in cfg.to_dict()
    assert result["proj_dim"] == 2048 and result["precondition"] == "none"
    # a runtime change never changes what a manifest records
    assert CollectConfig(batch_size=99).result_dict() == CollectConfig().result_dict()
    assert (
        "chunk_size" not in EstimatorConfig().result_dict()
        and "num_threads" not in EstimatorConfig().result_dict()
    )
    # every Literal field carries its values as metadata choices, and they agree with the annotation
    for cls in (CollectConfig, EstimatorConfig, SelectConfig):
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            if typing.get_origin(hints[f.name]) is typing.Literal:
                assert list(typing.get_args(hints[f.name])) == f.metadata["choices"], f.name


def test_estimator_config_from_training_args_reads_the_budget(tmp_path):
    from transformers import TrainingArguments

    def targs(**kw):
        return TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True, **kw)

    # linear decay from 1e-4 over 20 steps: the mean rate is 1e-4 * (20 + 19 + ... + 1) / 20 / 20
    cfg = EstimatorConfig.from_training_args(
        targs(max_steps=20, learning_rate=1e-4, lr_scheduler_type="linear", optim="adamw_torch")
    )
    assert cfg.finetune_steps == 20 and cfg.reduction == "mean" and cfg.finetune_optimizer == "adamw"
    assert cfg.finetune_lr == pytest.approx(1e-4 * 210 / 400)
    warm = EstimatorConfig.from_training_args(
        targs(max_steps=10, learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=4)
    )
    assert warm.finetune_lr == pytest.approx(1e-3 * (0 + 0.25 + 0.5 + 0.75 + 6) / 10)
    # epochs: steps over all training rows of the cache, summed reduction; other fields pass through and win
    epochs = EstimatorConfig.from_training_args(
        targs(num_train_epochs=2, per_device_train_batch_size=8, gradient_accumulation_steps=2, optim="sgd",
              lr_scheduler_type="constant", learning_rate=0.1),
        num_train_examples=100,
        solver="exact",
    )  # fmt: skip
    assert (epochs.finetune_steps, epochs.reduction, epochs.finetune_optimizer) == (14, "sum", "sgd")
    assert epochs.finetune_batch_size == 16 and cfg.finetune_batch_size == 8
    assert epochs.finetune_lr == pytest.approx(0.1) and epochs.solver == "exact"
    with pytest.raises(ValueError, match="num_train_examples"):
        EstimatorConfig.from_training_args(targs(num_train_epochs=1))
    with pytest.raises(ValueError, match="models AdamW and SGD.*calibrate"):
        EstimatorConfig.from_training_args(targs(max_steps=5, optim="adafactor"))
    with pytest.raises(ValueError, match="reduction='sum'.*does not match.*max_steps is set"):
        EstimatorConfig.from_training_args(targs(max_steps=5), reduction="sum")
    # schedules that follow evaluation metrics are taken as constant
    greedy = EstimatorConfig.from_training_args(
        targs(max_steps=5, learning_rate=2e-4, lr_scheduler_type="greedy", eval_strategy="steps")
    )
    assert greedy.finetune_lr == pytest.approx(2e-4)
    # the fields round-trip through JSON like every other config field
    again = EstimatorConfig.from_dict(json.loads(cfg.to_json_string()))
    assert again.finetune_lr == cfg.finetune_lr and again.finetune_steps == 20
