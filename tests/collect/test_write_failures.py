"""Write failures: a full disk (simulated ``OSError: [Errno 28] No space left on device`` in the middle of a write)
stops the collection with StorageWriteError naming the file and the fix; completed shards stay intact, no
half-written file is left, and the rerun after space is back resumes to the cache an uninterrupted run writes."""

from __future__ import annotations

import errno
import os

import pytest
import torch

import hf_subset_select.io_utils as io_utils
from hf_subset_select import (
    CollectConfig,
    GradientCache,
    GradientCollector,
    tag_sources,
    tag_target_eval,
)
from hf_subset_select.collect.cache import GradientCacheError
from hf_subset_select.collect.store import SHARDS_DIR, complete_shards
from hf_subset_select.demo.toy import (
    add_lora,
    make_tiny_causal_lm,
    make_tokenizer,
    perturb_lora,
    toy_text_dataset,
)
from hf_subset_select.io_utils import StorageWriteError, fingerprint_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _data_digest(path) -> str:
    """SHA-256 of every tensor of a cache's data file (names, shapes, dtypes, bytes); its metadata (the manifest's
    SHA-256, which covers this run's timings) left out."""
    from safetensors.torch import load_file

    return fingerprint_tensors(sorted(load_file(path).items()))


def _data():
    train = tag_sources(
        {"add": toy_text_dataset("add", 12, seed=1), "sub": toy_text_dataset("sub", 10, seed=2)}, target="add"
    )
    return train, tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")


def _collect(out):
    model = perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=0)), seed=1)
    train, target = _data()
    config = CollectConfig(proj_dim=32, proj_type="rademacher", batch_size=4, shard_size=8)
    return GradientCollector(config, train, target, make_tokenizer()).collect(
        model, output_dir=out, disable_tqdm=True
    )


def _disk_full() -> OSError:
    return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.fixture
def reference(tmp_path):
    cache = _collect(tmp_path / "ref")
    return cache, _data_digest(tmp_path / "ref" / "cache.safetensors")


def _no_temp_files(root) -> bool:
    return not [n for _, _, files in os.walk(root) for n in files if n.startswith(".tmp-")]


def test_disk_full_during_a_shard_write_stops_with_the_path_and_resumes(tmp_path, monkeypatch, reference):
    import safetensors.torch

    real = safetensors.torch.save_file
    written = []

    def fills_up(tensors, filename, metadata=None):
        if len(written) == 2:  # the third shard: half of its bytes reach the disk, then the disk is full
            real(tensors, filename, metadata=metadata)
            with open(filename, "r+b") as handle:
                handle.truncate(os.path.getsize(filename) // 2)
            raise _disk_full()
        written.append(filename)
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(safetensors.torch, "save_file", fills_up)
    out = tmp_path / "gc"
    with pytest.raises(StorageWriteError) as info:
        _collect(out)
    message = str(info.value)
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert "shard-000002.safetensors" in message and "No space left on device" in message
    assert "Free space" in message and "re-run" in message
    shards = out / SHARDS_DIR
    assert sorted(complete_shards(shards)) == [0, 1]  # the earlier shards are intact (checksums verified)
    assert not (shards / "shard-000002.safetensors").exists() and _no_temp_files(out)
    with pytest.raises(GradientCacheError, match="did not finish"):
        GradientCache.load(out)

    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space is back
    cache = _collect(out)
    ref_cache, ref_sha = reference
    assert _data_digest(out / "cache.safetensors") == ref_sha
    assert torch.equal(cache.features, ref_cache.features)
    assert _no_temp_files(out) and not shards.exists()
    assert cache.manifest["collection_stats"]["examples_reused_from_shards"] == 16


def test_disk_full_during_the_manifest_write_keeps_every_shard(tmp_path, monkeypatch, reference):
    real = io_utils._write_text

    def fills_up(tmp, text):
        if '"format": "hf_subset_select.gradient_cache"' in text:
            real(tmp, text[: len(text) // 2])
            raise _disk_full()
        return real(tmp, text)

    monkeypatch.setattr(io_utils, "_write_text", fills_up)
    out = tmp_path / "gc"
    with pytest.raises(StorageWriteError, match=r"manifest\.json.*No space left on device.*Free space"):
        _collect(out)
    assert not (out / "manifest.json").exists() and _no_temp_files(out)
    assert sorted(complete_shards(out / SHARDS_DIR)) == [0, 1, 2, 3]  # 34 rows, 8 per shard
    with pytest.raises(GradientCacheError, match="did not finish"):
        GradientCache.load(out)

    monkeypatch.setattr(io_utils, "_write_text", real)
    cache = _collect(out)
    assert cache.manifest["collection_stats"]["examples_computed_main_process"] == 0  # merged from the shards
    assert _data_digest(out / "cache.safetensors") == reference[1]


def test_a_failed_write_leaves_the_previous_file_untouched(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    io_utils.atomic_write_json(path, {"v": 1})
    monkeypatch.setattr(io_utils, "_write_text", lambda tmp, text: (_ for _ in ()).throw(_disk_full()))
    with pytest.raises(StorageWriteError, match="x.json"):
        io_utils.atomic_write_json(path, {"v": 2})
    assert io_utils.read_json(path) == {"v": 1}
    assert os.listdir(tmp_path) == ["x.json"]
