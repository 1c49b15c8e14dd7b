"""Determinism on CPU: the same seed, model and data give a bitwise-identical cache when collected twice (every
tensor bit for bit; the manifest differs only in the run's timings, and so the data file only in the manifest
SHA-256 its metadata records)."""

from __future__ import annotations

import json

import pytest

from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
from hf_subset_select.demo.toy import (
    add_lora,
    make_tiny_causal_lm,
    make_tokenizer,
    perturb_lora,
    toy_text_dataset,
)
from hf_subset_select.io_utils import fingerprint_tensors

pytestmark = pytest.mark.usefixtures("one_thread")


def _data_digest(path) -> str:
    """SHA-256 of every tensor of a cache's data file (names, shapes, dtypes, bytes); its metadata (the manifest's
    SHA-256, which covers this run's timings) left out."""
    from safetensors.torch import load_file

    return fingerprint_tensors(sorted(load_file(path).items()))


def _collect(out, proj_type: str):
    model = perturb_lora(add_lora(make_tiny_causal_lm("gpt2", seed=3)), seed=4)
    train = tag_sources(
        {"add": toy_text_dataset("add", 9, seed=1), "rev": toy_text_dataset("rev", 7, seed=2)}, target="add"
    )
    target = tag_target_eval(toy_text_dataset("add", 4, seed=9), name="add_eval")
    config = CollectConfig(proj_dim=48, proj_type=proj_type, batch_size=3, shard_size=5, representations=True)
    GradientCollector(config, train, target, make_tokenizer()).collect(
        model, output_dir=out, disable_tqdm=True
    )
    manifest = json.loads((out / "manifest.json").read_text())
    manifest.pop("collection_stats")  # seconds and counts of this run
    manifest.pop(
        "files"
    )  # the data file's SHA-256 covers its metadata: the manifest's hash, with the timings
    return _data_digest(out / "cache.safetensors"), manifest


@pytest.mark.parametrize("proj_type", ["rademacher", "sparse"])
def test_same_seed_and_data_give_a_bitwise_identical_cache(tmp_path, proj_type):
    first = _collect(tmp_path / "a", proj_type)
    second = _collect(tmp_path / "b", proj_type)
    assert first[0] == second[0]
    assert first[1] == second[1]  # fingerprints, counts, projection, skipped rows, ...
