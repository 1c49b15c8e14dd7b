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


def test_load_rejects_wrong_type_and_unknown_fields(tmp_path):
    CollectConfig().save(tmp_path / "c.json")
    with pytest.raises(ValueError, match="collect_config"):
        SelectConfig.load(tmp_path / "c.json")
    (tmp_path / "bad.json").write_text(json.dumps({"config_type": "collect_config", "bogus": 1}))
    with pytest.raises(ValueError, match="bogus"):
        CollectConfig.load(tmp_path / "bad.json")
