"""Fuzzed manifests: a real collected cache's ``manifest.json`` and a real ``meta_init.json``, mutated by hypothesis
(keys dropped, values replaced by null / "x" / -1 / huge numbers / nested junk / other types), either load or raise
the loader's documented error (GradientCacheError, MetaInitManifestError), never another exception."""

from __future__ import annotations

import json
import shutil

import pytest
from hypothesis import HealthCheck, assume, event, given, settings
from hypothesis import strategies as st

from hf_subset_select.collect.cache import GradientCache, GradientCacheError
from hf_subset_select.collect.meta_init import (
    META_INIT_MANIFEST,
    MetaInitManifestError,
    load_meta_init,
    read_meta_init_manifest,
    save_meta_init,
)

pytestmark = pytest.mark.usefixtures("one_thread")
FUZZ = settings(
    max_examples=200, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow]
)


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """A cache written by the GradientCollector (every collector key present), and a scratch copy to edit."""
    from hf_subset_select import CollectConfig, GradientCollector, tag_sources, tag_target_eval
    from hf_subset_select.demo.toy import (
        add_lora,
        make_tiny_causal_lm,
        make_tokenizer,
        perturb_lora,
        toy_text_dataset,
    )

    train = tag_sources(
        {"add": toy_text_dataset("add", 5, seed=1), "sub": toy_text_dataset("sub", 4, seed=2)}, target="add"
    )
    target = tag_target_eval(toy_text_dataset("add", 3, seed=99), name="add_eval")
    model = perturb_lora(add_lora(make_tiny_causal_lm("gpt2")), seed=1)
    root = tmp_path_factory.mktemp("fuzz")
    config = CollectConfig(proj_dim=8, proj_type="rademacher", batch_size=4, shard_size=8, self_check=False)
    GradientCollector(config, train, target, make_tokenizer()).collect(model, output_dir=root / "cache")
    shutil.copytree(root / "cache", root / "scratch")
    return root / "scratch", json.loads((root / "cache" / "manifest.json").read_text())


def test_the_real_manifest_holds_the_collector_keys_and_loads(collected):
    scratch, manifest = collected
    assert {"projection", "theta_fingerprint", "output_fn", "precondition", "skipped", "files"} <= set(
        manifest
    )
    assert GradientCache.load(scratch).num_examples == manifest["num_examples"] == 12


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("projection", None, "projection"),
        ("projection", "x", "projection"),
        ("theta_fingerprint", -1, "theta_fingerprint"),
        ("output_fn", None, "output_fn"),
        ("precondition", "x", "precondition"),
        ("precondition", {"kind": "magic"}, "precondition.kind"),
        ("dim", -1, "dim"),
        ("num_examples", "12", "num_examples"),
        ("num_examples", 10**30, "num_examples"),
        ("sources", ["add", "add"], "sources"),
        ("counts", {"add": {"train": 5}}, "counts.add.target"),
        ("skipped", {"count": 0, "by_source": {}, "example_ids": ["x"]}, r"skipped.example_ids\[0\]"),
        ("target_source", "nowhere", "target_source"),
        ("has_representations", "yes", "has_representations"),
        ("format_version", True, "format version"),
    ],
)
def test_each_wrong_key_is_named_with_the_fix(collected, key, value, named):
    scratch, manifest = collected
    (scratch / "manifest.json").write_text(json.dumps({**manifest, key: value}))
    with pytest.raises(GradientCacheError, match=named) as info:
        GradientCache.load(scratch)
    assert "re-collect" in str(info.value)


def test_projection_dim_must_match_the_data(collected):
    scratch, manifest = collected
    edited = {**manifest, "projection": {**manifest["projection"], "dim": manifest["dim"] + 1}}
    (scratch / "manifest.json").write_text(json.dumps(edited))
    with pytest.raises(GradientCacheError, match="projection.dim"):
        GradientCache.load(scratch)


@FUZZ
@given(data=st.data())
def test_fuzzed_cache_manifests_load_or_raise_gradient_cache_error(collected, mutate_json, data):
    scratch, manifest = collected
    edited = mutate_json(data, manifest)
    (scratch / "manifest.json").write_text(json.dumps(edited))
    try:
        cache = GradientCache.load(scratch)
    except GradientCacheError:
        event("refused")
        return
    event("loaded")
    assert (
        cache.num_examples == 12
    )  # an edit that loads is one the loader does not read (collection_stats, ...)


@settings(max_examples=60, deadline=None, derandomize=True)
@given(cut=st.integers(0, 4000), junk=st.binary(max_size=40))
def test_truncated_or_garbled_manifest_text_raises_gradient_cache_error(collected, cut, junk):
    scratch, manifest = collected
    text = json.dumps(manifest).encode()
    garbled = text[: cut % len(text)] + junk
    assume(not _parses_to(garbled, manifest))  # the junk happened to complete the file
    (scratch / "manifest.json").write_bytes(garbled)
    with pytest.raises(GradientCacheError):
        GradientCache.load(scratch)


# ---------------------------------------------------------------------------------------------- meta-init
@pytest.fixture(scope="module")
def meta_init(tmp_path_factory):
    from hf_subset_select.demo.toy import add_lora, make_tiny_causal_lm, perturb_lora

    root = tmp_path_factory.mktemp("meta")
    model = perturb_lora(add_lora(make_tiny_causal_lm("gpt2")), seed=1)
    manifest = save_meta_init(model, str(root / "theta"), sources={"add": 5, "sub": 4}, target_source="add")
    return root / "theta", json.loads(json.dumps(manifest))


@FUZZ
@given(data=st.data())
def test_fuzzed_meta_init_manifests_read_or_raise_meta_init_manifest_error(meta_init, mutate_json, data):
    path, manifest = meta_init
    (path / META_INIT_MANIFEST).write_text(json.dumps(mutate_json(data, manifest)))
    try:
        read_meta_init_manifest(path)
        event("read")
    except MetaInitManifestError:
        event("refused")


@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_meta_init_manifests_load_or_raise_meta_init_manifest_error(meta_init, mutate_json, data):
    from hf_subset_select.demo.toy import make_tiny_causal_lm

    path, manifest = meta_init
    (path / META_INIT_MANIFEST).write_text(json.dumps(mutate_json(data, manifest)))
    try:
        load_meta_init(path, base_model=make_tiny_causal_lm("gpt2"))
        event("loaded")
    except MetaInitManifestError:
        event("refused")


def _parses_to(raw: bytes, doc: object) -> bool:
    try:
        return json.loads(raw) == doc
    except ValueError:
        return False
