"""The bad-input catalogue (docs/errors.md): each case raises its specific library exception, and the message
names what is wrong and how to fix it."""

from __future__ import annotations

import pytest
import torch
from datasets import Dataset, concatenate_datasets

from hf_subset_select import (
    CollectConfig,
    FirstOrderEstimator,
    GradientCache,
    GradientCollector,
    SelectConfig,
    SourceSelection,
    load_meta_init,
    select_sources,
    tag_sources,
    tag_target_eval,
)
from hf_subset_select.collect.cache import GradientCacheError
from hf_subset_select.collect.meta_init import MetaInitManifestError, save_meta_init
from hf_subset_select.collect.per_example import trainable_parameters
from hf_subset_select.collect.store import CollectionMismatchError
from hf_subset_select.config import ConfigError
from hf_subset_select.data.sources import BookkeepingColumnsError, DataInputError
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora
from hf_subset_select.select.selection import SelectionMismatchError

pytestmark = pytest.mark.usefixtures("one_thread")

OK = {"input_ids": [5, 6, 7, 8], "labels": [-100, -100, 7, 8]}
MASKED = {"input_ids": [5, 6, 7], "labels": [-100, -100, -100]}


def _theta(seed: int = 0):
    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=0)), seed=seed + 1)


def _config(**kw):
    return CollectConfig(proj_dim=16, proj_type="rademacher", batch_size=4, shard_size=8, **kw)


def _train(a=None, b=None):
    return tag_sources(
        {"a": Dataset.from_list(a or [OK] * 4), "b": Dataset.from_list(b or [OK] * 3)}, target="a"
    )


def _target(rows=None):
    return tag_target_eval(Dataset.from_list(rows or [OK] * 2), name="t")


def _collect(train, target, out, model=None, config=None, **kw):
    collector = GradientCollector(config or _config(), train, target)
    return collector.collect(model or _theta(), output_dir=out, disable_tqdm=True, **kw)


@pytest.mark.parametrize("column", ["source", "example_id"])
@pytest.mark.parametrize("split", ["train", "target"])
def test_missing_bookkeeping_columns(tmp_path, column, split):
    train, target = _train(), _target()
    if split == "train":
        train = train.remove_columns(column)
    else:
        target = target.remove_columns(column)
    with pytest.raises(BookkeepingColumnsError, match=rf"no '{column}' column.*tag_sources"):
        _collect(train, target, tmp_path / "gc")


def test_duplicate_example_ids(tmp_path):
    train = _train()  # the same tagged data twice (concatenated, or tagged in two calls)
    with pytest.raises(DataInputError, match="occurs twice in the training data: tag every source once"):
        _collect(concatenate_datasets([train, train]), _target(), tmp_path / "gc")


def test_empty_source_or_target_split(tmp_path):
    with pytest.raises(DataInputError, match="Source 'b' is empty; drop it"):
        tag_sources({"a": Dataset.from_list([OK]), "b": Dataset.from_list([OK]).select([])})
    with pytest.raises(DataInputError, match="target evaluation split is empty"):
        tag_target_eval(Dataset.from_list([OK]).select([]))
    # emptied after tagging (a filter that keeps nothing)
    with pytest.raises(DataInputError, match="target evaluation split is empty; pass tag_target_eval"):
        _collect(_train(), _target().filter(lambda e: False), tmp_path / "t")
    with pytest.raises(DataInputError, match="training data is empty"):
        _collect(_train().filter(lambda e: False), _target(), tmp_path / "s")


def test_every_label_masked(tmp_path):
    with pytest.raises(
        DataInputError, match="target evaluation split has all of its labels masked.*max_length"
    ):
        _collect(_train(), _target([MASKED] * 3), tmp_path / "t")
    with pytest.raises(DataInputError, match=r"training source\(s\) \['b'\].*labels masked.*drop the source"):
        _collect(_train(b=[MASKED] * 2), _target(), tmp_path / "s")
    cache = _collect(_train(b=[OK, MASKED]), _target(), tmp_path / "ok")  # some masked rows: skipped, counted
    assert cache.manifest["skipped"]["by_source"] == {"b": 1}


def test_nan_or_inf_rows_name_their_example_ids():
    features = torch.ones(4, 3)
    features[2, 1] = float("nan")
    outputs = torch.tensor([0.0, float("inf"), 0.0, 0.0])
    with pytest.raises(
        GradientCacheError, match=r"2 row\(s\).*rows \[1, 2\], example_ids \[11, 12\].*prob_clamp"
    ):
        GradientCache(features, outputs, [10, 11, 12, 13], [0, 0, 0, 0], [0, 0, 0, 1], ["a"])


def test_a_selection_from_another_cache(tmp_path):
    cache = make_synthetic_cache(2, 1, 1, dim=12, examples_per_source=16, seed=0)
    other = make_synthetic_cache(2, 1, 1, dim=12, examples_per_source=16, seed=1)
    sel = select_sources(FirstOrderEstimator(cache), method="linear", config=SelectConfig(num_subsets=50))
    sel.save(tmp_path / "s.json")
    with pytest.raises(
        SelectionMismatchError, match="computed from cache .* Re-run select_sources on this cache"
    ):
        SourceSelection.load(tmp_path / "s.json", cache=other)
    assert SourceSelection.load(tmp_path / "s.json", cache=cache) == sel


def test_a_cache_from_another_theta_seed_dimension_or_geometry(tmp_path):
    train, target = _train(), _target()
    out = tmp_path / "gc"
    model = _theta()
    _collect(train, target, out, model)
    scale = {n: torch.full(p.shape, 0.5) for n, p in trainable_parameters(model)}
    cases = [
        ({"model": _theta(seed=4)}, "θ"),
        ({"config": _config(seed=1)}, "projection.seed"),
        ({"config": CollectConfig(proj_dim=8, proj_type="rademacher", shard_size=8)}, "projection.dim"),
        ({"preconditioner": scale, "config": _config(precondition="auto")}, "preconditioner"),
    ]
    for kwargs, needle in cases:
        with pytest.raises(CollectionMismatchError, match=rf"{needle}.*another output_dir.*overwrite=True"):
            _collect(train, target, out, **{"model": model, **kwargs})


@pytest.mark.parametrize(
    "field, value, needle",
    [("proj_dim", "2048", "proj_dim"), ("batch_size", 1.5, "batch_size"), ("overwrite", "yes", "overwrite")],
)
def test_a_config_with_wrong_types(field, value, needle):
    with pytest.raises(ConfigError, match=needle):
        CollectConfig(**{field: value})
    with pytest.raises(ConfigError, match=needle):
        CollectConfig.from_dict({field: value})


def test_a_meta_init_from_another_base_model(tmp_path):
    save_meta_init(_theta(), str(tmp_path / "mi"))
    other_base = make_tiny_causal_lm("gpt2", seed=5)
    with pytest.raises(MetaInitManifestError, match="does not match the one θ\\* was trained on.*same base"):
        load_meta_init(tmp_path / "mi", base_model=other_base)
    assert load_meta_init(tmp_path / "mi", base_model=make_tiny_causal_lm("gpt2", seed=0)) is not None
