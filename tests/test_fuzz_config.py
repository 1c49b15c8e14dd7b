"""Fuzzed config files: each config's JSON, mutated by hypothesis (keys dropped, values replaced by null / "x" / -1
/ huge numbers / nested junk / other types), either loads or raises ConfigError (a ValueError), never another
exception; a wrong type names the field and what it must be."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from hf_subset_select import CollectConfig, EstimatorConfig, MetaInitConfig, SelectConfig
from hf_subset_select.config import ConfigError

ALL = [MetaInitConfig, CollectConfig, EstimatorConfig, SelectConfig]


@pytest.mark.parametrize(
    "cls, key, value, named",
    [
        (CollectConfig, "proj_dim", "x", r"proj_dim must be an integer"),
        (CollectConfig, "proj_dim", 1.5, r"proj_dim must be an integer"),
        (CollectConfig, "proj_dim", True, r"proj_dim must be an integer"),
        (CollectConfig, "proj_type", None, r"proj_type must be one of"),
        (CollectConfig, "prob_clamp", float("nan"), r"prob_clamp must be a finite number"),
        (CollectConfig, "overwrite", "yes", r"overwrite must be true or false"),
        (CollectConfig, "output_dir", 3, r"output_dir must be a string or null"),
        (MetaInitConfig, "save_steps", [1, "2"], r"save_steps must be a list of integers"),
        (EstimatorConfig, "finetune_lr", {"x": 1}, r"finetune_lr must be a finite number or null"),
        (SelectConfig, "top_k", [3], r"top_k must be an integer or null"),
        (SelectConfig, "subset_ratio", 2.0, r"subset_ratio must lie in \(0, 1\)"),
    ],
)
def test_wrong_types_and_ranges_raise_config_error_naming_the_field(tmp_path, cls, key, value, named):
    data = {"config_type": cls.config_type, **cls().to_dict(), key: value}
    with pytest.raises(ConfigError, match=named):
        cls.from_dict(data)
    path = tmp_path / "c.json"
    path.write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=named):
        cls.load(path)


def test_non_object_json_and_missing_file_raise_config_error(tmp_path):
    for doc in ([], "x", None, 3):
        with pytest.raises(ConfigError, match="JSON object"):
            CollectConfig.from_dict(doc)
    with pytest.raises(ConfigError) as info:
        CollectConfig.load(tmp_path / "missing.json")
    assert isinstance(info.value, FileNotFoundError)
    (tmp_path / "bad.json").write_bytes(b"\xff\xfe{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        CollectConfig.load(tmp_path / "bad.json")


@pytest.mark.parametrize("cls", ALL)
@settings(max_examples=100, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_configs_load_or_raise_config_error(cls, mutate_json, data):
    doc = mutate_json(data, {"config_type": cls.config_type, **cls().to_dict()})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # unknown keys are warned about, then dropped
        try:
            cfg = cls.from_dict(doc)
        except ConfigError:
            event("refused")
            return
    event("loaded")
    assert cls.from_dict(json.loads(cfg.to_json_string())) == cfg  # what loads round-trips
