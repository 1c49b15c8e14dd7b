"""Pseudo-sources: spherical k-means recovers planted groups, the cluster cache feeds the estimator and the
selectors, and tag_clusters relabels a dataset so the selection applies to it."""

from __future__ import annotations

import pytest
import torch

from hf_subset_select import EstimatorConfig, FirstOrderEstimator, SelectConfig, select_sources
from hf_subset_select.data.sources import tag_clusters
from hf_subset_select.demo.synthetic import make_synthetic_cache
from hf_subset_select.select.clusters import adjusted_rand_index, cluster_sources, spherical_kmeans


def test_adjusted_rand_index():
    assert adjusted_rand_index([0, 0, 1, 1], ["b", "b", "a", "a"]) == pytest.approx(1.0)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 1, 0, 1]) < 0.0
    with pytest.raises(ValueError, match="equal length"):
        adjusted_rand_index([0], [0, 1])


def test_spherical_kmeans_recovers_directions_and_is_seeded():
    gen = torch.Generator().manual_seed(0)
    centers = torch.linalg.qr(torch.randn(16, 4, generator=gen)).Q.T  # 4 orthonormal directions
    truth = torch.arange(4).repeat_interleave(50)
    x = 3.0 * centers[truth] + 0.5 * torch.randn(200, 16, generator=gen)
    x = x * torch.rand(200, 1, generator=gen).add(0.5)  # lengths do not matter, directions do
    labels, cent = spherical_kmeans(x, 4, seed=1)
    assert adjusted_rand_index(labels, truth) > 0.95
    assert torch.allclose(cent.norm(dim=1), torch.ones(4, dtype=cent.dtype), atol=1e-5)
    again, _ = spherical_kmeans(x, 4, seed=1)
    assert torch.equal(labels, again)
    with pytest.raises(ValueError, match="k must"):
        spherical_kmeans(x, 0)


@pytest.fixture(scope="module")
def pool():
    """Sources of three roles, pooled and clustered as if the pool were untagged."""
    cache = make_synthetic_cache(1, 1, 1, dim=24, examples_per_source=80, noise=0.5, seed=2)
    return cache, cluster_sources(cache, 3, seed=0)


def test_cluster_cache_recovers_sources(pool):
    cache, (clustered, mapping) = pool
    rows = cache.train_mask & (cache.source_index != cache.source_id("target_train"))
    truth = [cache.sources[i] for i in cache.source_index[rows].tolist()]
    found = [mapping[i] for i in cache.example_ids[rows].tolist()]
    assert adjusted_rand_index(found, truth) > 0.9
    assert clustered.train_sources == ["target_train", "cluster_00", "cluster_01", "cluster_02"]
    # target rows and the target's own source are untouched; cluster_00 is the largest
    assert torch.equal(clustered.features, cache.features)
    t_rows = cache.target_mask | (cache.source_index == cache.source_id("target_train"))
    names = [clustered.sources[i] for i in clustered.source_index[t_rows].tolist()]
    assert names == [cache.sources[i] for i in cache.source_index[t_rows].tolist()]
    sizes = clustered.manifest["clusters"]["sizes"]
    assert list(sizes.values()) == sorted(sizes.values(), reverse=True) and sum(sizes.values()) == 240
    assert clustered.fingerprint() != cache.fingerprint()
    with pytest.raises(ValueError, match="prefix"):
        cluster_sources(clustered, 2, sources=["cluster_02"])
    with pytest.raises(Exception, match="not in the cache"):
        cluster_sources(cache, 2, sources=["nope"])


def test_estimator_and_selectors_run_on_clusters(pool):
    cache, (clustered, mapping) = pool
    est = FirstOrderEstimator(clustered, EstimatorConfig())
    assert est.sources == ["cluster_00", "cluster_01", "cluster_02"]
    for method in ("random_ensemble", "forward", "gradient_similarity"):
        sel = select_sources(est, method=method, config=SelectConfig(num_subsets=200, top_k=1))
        assert sel.selected, method
        # the kept clusters are (mostly) the aligned source's rows
        aligned = set(cache.example_ids[cache.source_index == cache.source_id("aligned_0")].tolist())
        kept_rows = [i for i, c in mapping.items() if c in sel.selected]
        assert len(set(kept_rows) & aligned) / len(kept_rows) > 0.9, method


def test_tag_clusters_makes_the_selection_apply(pool):
    from datasets import Dataset

    cache, (clustered, mapping) = pool
    rows = torch.nonzero(cache.train_mask).flatten()
    ds = Dataset.from_dict(
        {
            "text": [f"r{i}" for i in range(rows.numel())],
            "source": [cache.sources[i] for i in cache.source_index[rows].tolist()],
            "example_id": cache.example_ids[rows].tolist(),
        }
    )
    tagged = tag_clusters(ds, {str(k): v for k, v in mapping.items()})  # JSON-style keys work too
    assert set(tagged["source"]) == {"target_train", "cluster_00", "cluster_01", "cluster_02"}
    assert [mapping.get(i, "target_train") for i in tagged["example_id"]] == tagged["source"]
    sel = select_sources(FirstOrderEstimator(clustered), method="forward", config=SelectConfig(top_k=1))
    kept = sel.apply(tagged)
    assert set(kept["source"]) == {sel.selected[0], "target_train"}
    with pytest.raises(ValueError, match="tag_sources"):
        tag_clusters(ds.remove_columns("example_id"), mapping)
    with pytest.raises(ValueError, match="another"):
        tag_clusters(ds, {10**12: "cluster_00"})


def test_select_clusters_is_a_per_example_selection_of_the_original_cache(pool, tmp_path):
    from datasets import Dataset

    from hf_subset_select import SourceSelection
    from hf_subset_select.select.clusters import select_clusters

    cache, (clustered, mapping) = pool
    sel = select_clusters(cache, 3, select_config=SelectConfig(num_subsets=200), seed=0)
    info = sel.info["clusters"]
    assert info["sizes"] == clustered.manifest["clusters"]["sizes"]
    assert sum(info["composition"]["cluster_00"].values()) == info["sizes"]["cluster_00"]
    # the kept cluster is the aligned source's rows, so exactly its rows keep a weight
    aligned = set(cache.example_ids[cache.source_index == cache.source_id("aligned_0")].tolist())
    assert info["composition"][info["selected"][0]] == {"aligned_0": 80} and len(info["selected"]) == 1
    assert set(sel.examples.kept_ids) == aligned
    assert sel.selected == ["aligned_0"] and sel.info["kept_per_source"]["opposed_0"] == 0
    # each row carries its cluster's score; tied to the original cache (fingerprint), saved and loaded back
    by_id = dict(zip(sel.examples.example_ids, sel.examples.scores))
    assert all(by_id[i] == info["scores"][c] for i, c in mapping.items())
    path = tmp_path / "sel.json"
    sel.save(path)
    back = SourceSelection.load(path, cache=cache)
    assert back.examples == sel.examples and back.info["clusters"]["selected"] == info["selected"]
    # applies to the untouched tagged dataset (no relabelling needed): target rows + the kept cluster's rows
    rows = torch.nonzero(cache.train_mask).flatten()
    ds = Dataset.from_dict(
        {
            "text": [f"r{i}" for i in range(rows.numel())],
            "source": [cache.sources[i] for i in cache.source_index[rows].tolist()],
            "example_id": cache.example_ids[rows].tolist(),
        }
    )
    kept = sel.apply(ds)
    assert set(kept["example_id"]) - aligned == set(
        cache.example_ids[cache.source_index == cache.source_id("target_train")].tolist()
    )
