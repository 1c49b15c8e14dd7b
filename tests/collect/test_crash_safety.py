"""Crash safety: a collection or a meta-init save killed with SIGKILL at each labelled point of its writes
(:mod:`hf_subset_select.faults`) never leaves a directory that loads as something it is not, and the rerun ends
with exactly what an uninterrupted run writes.

The kill is real (the child process sends itself SIGKILL at the armed point, so no ``finally`` or ``atexit`` runs);
the child is forked from the test process so it skips the seconds of imports a fresh interpreter needs.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import types

import pytest
import torch

from hf_subset_select import (
    CollectConfig,
    GradientCache,
    GradientCollector,
    MetaInitCallback,
    faults,
    load_meta_init,
    tag_sources,
    tag_target_eval,
)
from hf_subset_select.collect.cache import GradientCacheError
from hf_subset_select.collect.meta_init import MetaInitManifestError, trainable_fingerprint
from hf_subset_select.collect.store import SHARDS_DIR
from hf_subset_select.demo.toy import (
    add_lora,
    make_tiny_causal_lm,
    make_tokenizer,
    perturb_lora,
    toy_text_dataset,
)
from hf_subset_select.io_utils import fingerprint_tensors

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not hasattr(os, "fork"), reason="forks a child process to kill"),
]

# 36 rows, 8 per shard: shards 0..4. (label, shards the rerun must recompute)
COLLECTION_POINTS = [
    ("shard_computed:2", [2, 3, 4]),
    ("shard_data_written:1", [1, 2, 3, 4]),
    ("replace:shard-000003.json", [3, 4]),
    ("shard_written:0", [1, 2, 3, 4]),
    ("shard_written:4", []),
    ("merge_loaded:3", []),
    ("replace:cache.safetensors", []),
    ("cache_data_written", []),
    ("replace:manifest.json", []),
    ("manifest_written", []),  # the cache is complete here; the rerun only removes the shards
]


def _data_digest(path) -> str:
    """SHA-256 of every tensor of a cache's data file (names, shapes, dtypes, bytes); its metadata (the manifest's
    SHA-256, which covers this run's timings) left out."""
    from safetensors.torch import load_file

    return fingerprint_tensors(sorted(load_file(path).items()))


def _theta_star(seed: int = 0):
    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=seed)), seed=seed + 1)


def _toy_data():
    train = tag_sources(
        {
            "add": toy_text_dataset("add", 12, seed=1),
            "sub": toy_text_dataset("sub", 10, seed=2),
            "rev": toy_text_dataset("rev", 8, seed=3),
        },
        target="add",
    )
    return train, tag_target_eval(toy_text_dataset("add", 6, seed=99), name="add_eval")


def _config(**kw):
    return CollectConfig(proj_dim=64, proj_type="rademacher", batch_size=4, shard_size=8, **kw)


def _killed(target, *args) -> None:
    """Run ``target(*args)`` in a forked child armed to SIGKILL itself; assert that it died by the signal."""
    child = multiprocessing.get_context("fork").Process(target=target, args=args)
    child.start()
    child.join(timeout=120)
    assert child.exitcode == -signal.SIGKILL, f"the child was not killed (exit code {child.exitcode})"


def _collect_armed(label: str, out: str) -> None:
    faults.arm(label)
    train, target = _toy_data()
    GradientCollector(_config(), train, target, make_tokenizer()).collect(
        _theta_star(), output_dir=out, disable_tqdm=True
    )


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("ref") / "gc"
    train, target = _toy_data()
    torch.set_num_threads(1)
    cache = GradientCollector(_config(), train, target, make_tokenizer()).collect(
        _theta_star(), output_dir=out, disable_tqdm=True
    )
    return cache, _data_digest(out / "cache.safetensors")


@pytest.mark.parametrize("label, recomputed", COLLECTION_POINTS, ids=[p[0] for p in COLLECTION_POINTS])
def test_collection_killed_at_each_point_resumes_to_the_same_cache(
    tmp_path, monkeypatch, reference, label, recomputed
):
    import hf_subset_select.collect.store as store_mod

    ref_cache, ref_sha = reference
    out = tmp_path / "gc"
    _killed(_collect_armed, label, str(out))

    if label == "manifest_written":  # killed after the manifest rename: a complete, correct cache
        loaded = GradientCache.load(out)
        assert torch.equal(loaded.features, ref_cache.features)
    else:  # anything earlier never loads as a cache
        with pytest.raises(GradientCacheError, match="did not finish"):
            GradientCache.load(out)

    redone = []
    real_save = store_mod.save_shard
    monkeypatch.setattr(store_mod, "save_shard", lambda *a, **k: redone.append(a[1]) or real_save(*a, **k))
    train, target = _toy_data()
    cache = GradientCollector(_config(), train, target, make_tokenizer()).collect(
        _theta_star(), output_dir=out, disable_tqdm=True
    )
    assert redone == recomputed
    assert _data_digest(out / "cache.safetensors") == ref_sha  # bit for bit the uninterrupted run's tensors
    assert torch.equal(cache.features, ref_cache.features) and torch.equal(cache.outputs, ref_cache.outputs)
    assert torch.equal(cache.example_ids, ref_cache.example_ids)
    assert not (out / SHARDS_DIR).exists()
    assert not [n for n in os.listdir(out) if n.startswith(".tmp-")]  # interrupted writes cleaned up


# --------------------------------------------------------------------------- MetaInitCallback
def _base():
    return make_tiny_causal_lm("gpt2", seed=0)


def _theta(seed: int):
    return perturb_lora(add_lora(_base()), seed=seed)


def _save_with_callback(model, out: str) -> None:
    train, _ = _toy_data()
    callback = MetaInitCallback(output_dir=out, train_dataset=train)
    args = types.SimpleNamespace(output_dir=os.path.dirname(out))
    state = types.SimpleNamespace(global_step=7, epoch=1.0)
    callback.on_train_begin(args, state, None)
    callback.on_train_end(args, state, None, model=model)


def _save_armed(label: str, out: str) -> None:
    faults.arm(label)
    _save_with_callback(_theta(seed=2), out)


# (label, what the killed directory loads as): before anything is moved the earlier save is untouched and
# complete; from the first move on the old manifest is gone, so the mix of old and new files is refused.
META_POINTS = [
    ("meta_init_saved", "old"),
    ("meta_init_moved:1", "refused"),
    ("meta_init_moved:2", "refused"),
    ("replace:meta_init.json", "refused"),
]


@pytest.mark.parametrize("label, outcome", META_POINTS, ids=[p[0] for p in META_POINTS])
def test_meta_init_save_killed_at_each_point_never_loads_mixed_weights(tmp_path, label, outcome):
    out = str(tmp_path / "meta_init")
    _save_with_callback(
        _theta(seed=1), out
    )  # an earlier θ* in the same directory (as a re-run would find it)
    old_fp, new_fp = trainable_fingerprint(_theta(seed=1)), trainable_fingerprint(_theta(seed=2))

    _killed(_save_armed, label, out)
    if outcome == "old":
        assert trainable_fingerprint(load_meta_init(out, base_model=_base())) == old_fp
    else:
        with pytest.raises(MetaInitManifestError, match="save did not finish"):
            load_meta_init(out, base_model=_base())

    _save_with_callback(_theta(seed=2), out)  # the rerun
    restored = load_meta_init(out, base_model=_base())
    assert trainable_fingerprint(restored) == new_fp
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".tmp-")]  # the killed save's leftovers
