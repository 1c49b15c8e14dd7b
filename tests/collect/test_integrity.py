"""Integrity: every data file of a cache and of a meta-init is checked against the size and SHA-256 recorded in
its manifest, so a flipped bit, a truncation or a missing file is reported with the file's name and the fix."""

from __future__ import annotations

import json
import random
import shutil

import pytest
import torch

from hf_subset_select.collect.cache import DATA_NAME, PRECONDITIONER_NAME, GradientCache, GradientCacheError
from hf_subset_select.collect.meta_init import (
    META_INIT_MANIFEST,
    MetaInitManifestError,
    load_meta_init,
    save_meta_init,
)
from hf_subset_select.io_utils import file_sha256

FLIPS = 20


def _flip_bit(path, rng: random.Random) -> int:
    data = bytearray(path.read_bytes())
    offset = rng.randrange(len(data))
    data[offset] ^= 1 << rng.randrange(8)
    path.write_bytes(bytes(data))
    return offset


def _cache(preconditioned: bool = False) -> GradientCache:
    g = torch.Generator().manual_seed(0)
    n = 10
    return GradientCache(
        torch.randn(n, 6, generator=g),
        torch.randn(n, generator=g),
        torch.arange(n) * 7,
        torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2]),
        torch.tensor([0] * 8 + [1] * 2),
        ["a", "b", "t"],
        target_source="a",
        representations=torch.randn(n, 3, generator=g),
        manifest={"precondition": {"kind": "adam"}} if preconditioned else None,
        preconditioner={"w": torch.rand(5, generator=g) + 0.5} if preconditioned else None,
    )


@pytest.fixture
def saved(tmp_path):
    _cache(preconditioned=True).save(tmp_path / "ref")
    return tmp_path / "ref"


def test_manifest_records_size_and_sha256_of_every_data_file(saved):
    files = json.loads((saved / "manifest.json").read_text())["files"]
    assert set(files) == {DATA_NAME, PRECONDITIONER_NAME}
    for name, record in files.items():
        assert record == {"bytes": (saved / name).stat().st_size, "sha256": file_sha256(saved / name)}
    loaded = GradientCache.load(saved)
    assert torch.equal(loaded.features, _cache().features)
    # saving without a preconditioner drops both the file and its record
    _cache().save(saved)
    assert set(json.loads((saved / "manifest.json").read_text())["files"]) == {DATA_NAME}
    assert not (saved / PRECONDITIONER_NAME).exists()


@pytest.mark.parametrize("name", [DATA_NAME, PRECONDITIONER_NAME])
def test_every_single_bit_flip_is_detected(tmp_path, saved, name):
    rng = random.Random(13)
    offsets = []
    for i in range(FLIPS):
        copy = tmp_path / f"flip{i}"
        shutil.copytree(saved, copy)
        offsets.append(_flip_bit(copy / name, rng))
        with pytest.raises(GradientCacheError, match=rf"{name}.*altered.*(delete the directory|restore)"):
            GradientCache.load(copy)
    assert len(set(offsets)) > FLIPS // 2  # the flips really are spread over the file


@pytest.mark.parametrize("name", [DATA_NAME, PRECONDITIONER_NAME])
def test_truncated_or_missing_file_is_named_with_the_fix(saved, name):
    path = saved / name
    full = path.read_bytes()
    for size in (len(full) - 1, len(full) // 2, 0):
        path.write_bytes(full[:size])
        with pytest.raises(GradientCacheError, match=rf"{name}.*{size} bytes.*truncated.*re-collect"):
            GradientCache.load(saved)
    path.write_bytes(full + b"\0")  # grown: replaced by something else
    with pytest.raises(GradientCacheError, match="truncated or replaced"):
        GradientCache.load(saved)
    path.unlink()
    with pytest.raises(GradientCacheError, match=rf"{name}.*is missing.*re-collect"):
        GradientCache.load(saved)
    path.write_bytes(full)
    GradientCache.load(saved)  # restored: loads again


def test_same_size_replacement_from_another_cache_is_detected(tmp_path, saved):
    other = _cache(preconditioned=True)
    other.features.mul_(2.0)
    other.save(tmp_path / "other")
    assert (tmp_path / "other" / DATA_NAME).stat().st_size == (saved / DATA_NAME).stat().st_size
    shutil.copy(tmp_path / "other" / DATA_NAME, saved / DATA_NAME)
    with pytest.raises(GradientCacheError, match="SHA-256"):
        GradientCache.load(saved)


def test_manifest_without_checksums_is_refused_as_from_an_older_release(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    del manifest["files"]
    (saved / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(GradientCacheError, match="older hf-subset-select.*checksums.*overwrite=True"):
        GradientCache.load(saved)


def test_checksum_records_must_be_well_formed(saved):
    manifest = json.loads((saved / "manifest.json").read_text())
    for bad in ({"bytes": -1}, {"sha256": "x"}, {"bytes": "12"}):
        edited = json.loads(json.dumps(manifest))
        edited["files"][DATA_NAME].update(bad)
        (saved / "manifest.json").write_text(json.dumps(edited))
        with pytest.raises(GradientCacheError, match=rf"files\.{DATA_NAME}\.(bytes|sha256)"):
            GradientCache.load(saved)
    edited = json.loads(json.dumps(manifest))
    edited["files"]["../../elsewhere"] = edited["files"][DATA_NAME]
    (saved / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(GradientCacheError, match="unknown key"):
        GradientCache.load(saved)


# ---------------------------------------------------------------------------------------------- meta-init
@pytest.fixture(scope="module")
def lora_theta():
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora

    return perturb_lora(add_lora(make_tiny_causal_lm("gpt2")), seed=1)


def _base():
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    return make_tiny_causal_lm("gpt2")


def test_meta_init_manifest_records_every_saved_file(tmp_path, lora_theta):
    manifest = save_meta_init(lora_theta, str(tmp_path / "theta"))
    on_disk = json.loads((tmp_path / "theta" / META_INIT_MANIFEST).read_text())
    assert on_disk["files"] == manifest["files"]
    assert {"adapter_model.safetensors", "adapter_config.json"} <= set(manifest["files"])
    for name, record in manifest["files"].items():
        assert record["sha256"] == file_sha256(tmp_path / "theta" / name)
    load_meta_init(tmp_path / "theta", base_model=_base())


def test_meta_init_bit_flips_truncation_and_missing_files_are_detected(tmp_path, lora_theta):
    save_meta_init(lora_theta, str(tmp_path / "theta"))
    rng = random.Random(7)
    for i in range(FLIPS):
        copy = tmp_path / f"flip{i}"
        shutil.copytree(tmp_path / "theta", copy)
        _flip_bit(copy / "adapter_model.safetensors", rng)
        # verify=False skips the fingerprints, never the checksums
        with pytest.raises(
            MetaInitManifestError, match="adapter_model.safetensors.*altered.*MetaInitCallback"
        ):
            load_meta_init(copy, base_model=_base(), verify=False)
    weights = tmp_path / "theta" / "adapter_model.safetensors"
    full = weights.read_bytes()
    weights.write_bytes(full[:-10])
    with pytest.raises(MetaInitManifestError, match="adapter_model.safetensors.*truncated"):
        load_meta_init(tmp_path / "theta", base_model=_base())
    weights.unlink()
    with pytest.raises(MetaInitManifestError, match="adapter_model.safetensors.*is missing"):
        load_meta_init(tmp_path / "theta", base_model=_base())
    weights.write_bytes(full)
    (tmp_path / "theta" / "adapter_config.json").write_text("{}")
    with pytest.raises(MetaInitManifestError, match="adapter_config.json"):
        load_meta_init(tmp_path / "theta", base_model=_base())


def test_full_weights_meta_init_is_verified(tmp_path):
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    save_meta_init(make_tiny_causal_lm("llama"), str(tmp_path / "full"))
    _flip_bit(tmp_path / "full" / "model.safetensors", random.Random(3))
    with pytest.raises(MetaInitManifestError, match="model.safetensors.*altered"):
        load_meta_init(tmp_path / "full", base_model=make_tiny_causal_lm("llama"), verify=False)


def test_meta_init_without_checksums_loads_with_a_warning_and_its_fingerprint_checked(tmp_path, lora_theta):
    save_meta_init(lora_theta, str(tmp_path / "theta"))
    path = tmp_path / "theta" / META_INIT_MANIFEST
    manifest = json.loads(path.read_text())
    del manifest["files"], manifest["manifest_sha256"]  # as an older release wrote it
    path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning, match="without file checksums"):
        load_meta_init(tmp_path / "theta", base_model=_base(), verify=False)
    manifest["fingerprint"] = "0" * 64  # the fingerprint check still runs, even with verify=False
    path.write_text(json.dumps(manifest))
    with pytest.warns(UserWarning), pytest.raises(MetaInitManifestError, match="fingerprint"):
        load_meta_init(tmp_path / "theta", base_model=_base(), verify=False)
    manifest["files"] = {"../outside": {"bytes": 1, "sha256": "0" * 64}}
    path.write_text(json.dumps(manifest))
    with pytest.raises(MetaInitManifestError, match="plain file name"):
        load_meta_init(tmp_path / "theta", base_model=_base())


@pytest.mark.parametrize(
    "key, value",
    [
        ("fingerprint", "0123456789abcdef"),
        ("target_source", "b"),
        ("output_fn", "x"),
        ("theta_fingerprint", "a" * 64),
    ],
)
def test_a_legal_but_different_manifest_value_is_caught_by_the_data_files_record(saved, key, value):
    path = saved / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest.get(key) != value
    manifest[key] = value  # still parses and passes every key check
    path.write_text(json.dumps(manifest))
    with pytest.raises(
        GradientCacheError, match="manifest.json' was edited or damaged.*SHA-256 that cache.safetensors"
    ):
        GradientCache.load(saved)
