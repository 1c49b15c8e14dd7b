"""GradientStore: the reuse / resume / overwrite policy, its refusal messages, shard checksums and the merge."""

from __future__ import annotations

import json

import pytest
import torch

from hf_subset_select.collect.cache import GradientCache
from hf_subset_select.collect.distributed import DistState
from hf_subset_select.collect.store import (
    PROGRESS_NAME,
    SHARDS_DIR,
    CollectionMismatchError,
    GradientStore,
    collection_key,
    complete_shards,
    existing_action,
)

ONE = DistState(0, 1, lambda: None)


def _key(seed: int = 0, tokens: bytes = b"t") -> dict:
    settings = {
        "projection": {"kind": "rademacher", "dim": 4, "seed": seed},
        "output_fn": "x",
        "shard_size": 3,
    }
    entries = [(0, i, "a" if i < 4 else "b", tokens) for i in range(7)]
    return collection_key(settings, entries)


def _rows(store: GradientStore, index: int) -> dict[str, torch.Tensor]:
    rows = list(store.shard_rows(index))
    g = torch.Generator().manual_seed(index)
    return {
        "features": torch.randn(len(rows), 4, generator=g),
        "outputs": torch.randn(len(rows), generator=g),
        "example_ids": torch.tensor(rows, dtype=torch.int64),
        "source_index": torch.tensor([0 if r < 4 else 1 for r in rows], dtype=torch.int64),
        "split": torch.zeros(len(rows), dtype=torch.int8),
    }


def _store(path, key=None, overwrite=False) -> GradientStore:
    return GradientStore(path, key or _key(), num_rows=7, shard_size=3, dist=ONE, overwrite=overwrite)


def _finish(store: GradientStore) -> None:
    store.finish({"note": "test"}, sources=["a", "b"], target_source=None, dim=4)


def test_key_digest_depends_on_settings_and_content():
    assert _key()["digest"] == _key()["digest"]
    assert _key(seed=1)["digest"] != _key()["digest"]
    assert _key(tokens=b"u")["dataset_fingerprint"] != _key()["dataset_fingerprint"]
    assert _key()["num_examples"] == 7


def test_fresh_collection_merges_shards_in_canonical_order(tmp_path):
    store = _store(tmp_path / "gc")
    assert store.open() == "collect"
    assert json.loads((tmp_path / "gc" / SHARDS_DIR / PROGRESS_NAME).read_text()) == store.key
    mine, reused = store.pending()
    assert (mine, reused) == ([0, 1, 2], 0)
    parts = [_rows(store, i) for i in mine]
    for i, tensors in zip(mine, parts):
        store.write_shard(i, tensors)
    _finish(store)
    cache = store.load()
    assert torch.equal(cache.features, torch.cat([p["features"] for p in parts]))
    assert torch.equal(cache.example_ids, torch.arange(7))
    assert cache.manifest["collection"] == store.key and cache.manifest["note"] == "test"
    assert not (tmp_path / "gc" / SHARDS_DIR).exists()
    # the same key again: reused as it is
    assert _store(tmp_path / "gc").open() == "reuse"


def test_resume_skips_complete_shards_and_recomputes_a_corrupt_one(tmp_path):
    store = _store(tmp_path / "gc")
    store.open()
    for i in (0, 1):
        store.write_shard(i, _rows(store, i))
    again = _store(tmp_path / "gc")
    assert again.open() == "collect"
    assert again.pending() == ([2], 6)
    data = tmp_path / "gc" / SHARDS_DIR / "shard-000001.safetensors"
    raw = bytearray(data.read_bytes())
    raw[-1] ^= 0xFF  # same size, wrong checksum
    data.write_bytes(bytes(raw))
    assert sorted(complete_shards(tmp_path / "gc" / SHARDS_DIR)) == [0]
    assert again.pending() == ([1, 2], 3)


def test_a_different_collection_is_refused_with_what_differs_unless_overwrite(tmp_path):
    store = _store(tmp_path / "gc")
    store.open()
    store.write_shard(0, _rows(store, 0))
    with pytest.raises(
        CollectionMismatchError,
        match=r"partial collection.*projection\.seed: on disk 0, now 1.*overwrite=True",
    ):
        existing_action(tmp_path / "gc", _key(seed=1))
    with pytest.raises(CollectionMismatchError, match="examples .* differ"):
        _store(tmp_path / "gc", _key(tokens=b"u")).open()
    replaced = _store(tmp_path / "gc", _key(seed=1), overwrite=True)
    assert replaced.open() == "overwrite"
    assert replaced.pending() == ([0, 1, 2], 0)  # the old shard was removed with the old key


def test_a_cache_not_written_by_a_collection_is_never_clobbered(tmp_path):
    GradientCache(torch.zeros(1, 2), torch.zeros(1), [1], [0], [0], ["x"]).save(tmp_path / "foreign")
    with pytest.raises(CollectionMismatchError, match="not written by GradientCollector"):
        _store(tmp_path / "foreign").open()


def test_a_missing_shard_stops_the_merge(tmp_path):
    store = _store(tmp_path / "gc")
    store.open()
    store.write_shard(0, _rows(store, 0))
    with pytest.raises(Exception, match=r"Shards \[1, 2\] are missing"):
        _finish(store)
