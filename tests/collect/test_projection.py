"""Projectors: a pure function of (seed, name, coordinate), chunk-independent, norm-preserving, same in any process."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import torch

from hf_subset_select.collect.projection import _mix, make_projector, resolve_proj_type

SHAPES = {"layer.0.lora_A.weight": (6, 13), "layer.0.lora_B.weight": (9, 6), "head.bias": (31,)}
P_TOTAL = 6 * 13 + 9 * 6 + 31
KINDS = ("rademacher", "gaussian", "sparse", "identity")


def _splitmix_reference(values: np.ndarray) -> np.ndarray:
    z = values.astype(np.uint64)
    with np.errstate(over="ignore"):
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    return z.astype(np.int64)


def test_torch_hash_is_bit_identical_to_uint64_reference():
    vals = np.array([0, 1, -1, 2**62, -(2**63), 123456789, -987654321], dtype=np.int64)
    got = _mix(torch.from_numpy(vals)).numpy()
    np.testing.assert_array_equal(got, _splitmix_reference(vals))


@pytest.mark.parametrize("kind", KINDS)
def test_project_matches_dense_matrix_and_is_chunk_independent(kind):
    torch.manual_seed(0)
    x = torch.randn(5, P_TOTAL, dtype=torch.float64).float()
    small = make_projector(kind, 48, 7, SHAPES, chunk_size=5, cache_mb=0)
    big = make_projector(kind, 48, 7, SHAPES, chunk_size=1 << 16)
    dense = small.dense_matrix()
    assert dense.shape == (P_TOTAL, small.dim)
    assert torch.equal(dense, big.dense_matrix())  # chunking never changes the map
    torch.testing.assert_close(small.project_flat(x), x @ dense, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(big.project_flat(x), x @ dense, rtol=1e-5, atol=1e-5)
    big.project_flat(x)  # second call served from the chunk cache
    torch.testing.assert_close(big.project_flat(x), x @ dense, rtol=1e-5, atol=1e-5)
    # lift is the transpose: <Pᵀx, w> = <x, P w>
    w = torch.randn(small.dim)
    lifted = small.lift(w)
    flat = torch.cat([lifted[n].reshape(-1) for n in SHAPES])
    torch.testing.assert_close(flat, dense @ w, rtol=1e-5, atol=1e-5)


def test_seed_and_name_determine_the_map():
    a = make_projector("rademacher", 32, 1, SHAPES).dense_matrix()
    b = make_projector("rademacher", 32, 1, SHAPES).dense_matrix()
    c = make_projector("rademacher", 32, 2, SHAPES).dense_matrix()
    assert torch.equal(a, b) and not torch.equal(a, c)
    # a parameter's block depends on its name only, not on the other parameters or their order
    alone = make_projector("rademacher", 32, 1, {"head.bias": (31,)}).dense_matrix()
    reordered = make_projector("rademacher", 32, 1, dict(reversed(list(SHAPES.items())))).dense_matrix()
    assert torch.equal(alone, a[-31:]) and torch.equal(reordered[:31], a[-31:])


def test_scaling_preserves_squared_norms():
    # Exactly unit rows for Rademacher and sparse; E‖Pᵀx‖² = ‖x‖² for all kinds (averaged over seeds).
    d = 64
    for kind in ("rademacher", "sparse"):
        dense = make_projector(kind, d, 3, SHAPES).dense_matrix()
        torch.testing.assert_close((dense**2).sum(1), torch.ones(P_TOTAL), rtol=1e-6, atol=1e-6)
    sparse = make_projector("sparse", d, 3, SHAPES, nnz=4).dense_matrix()
    assert ((sparse != 0).sum(1) == 4).all()  # nnz distinct columns per input coordinate
    torch.manual_seed(0)
    x = torch.randn(P_TOTAL)
    for kind in ("rademacher", "gaussian", "sparse"):
        ratios = [
            float((make_projector(kind, d, s, SHAPES).project_flat(x[None]) ** 2).sum() / (x**2).sum())
            for s in range(60)
        ]
        assert abs(np.mean(ratios) - 1.0) < 0.08, (kind, np.mean(ratios))
    ident = make_projector("identity", 999, 0, SHAPES)
    assert ident.dim == P_TOTAL and torch.equal(ident.project_flat(x[None])[0], x)


def test_gaussian_entries_look_gaussian():
    dense = make_projector("gaussian", 256, 0, {"w": (400,)}).dense_matrix() * 16.0  # unit variance
    values = dense.flatten().double()
    assert abs(values.mean()) < 0.02 and abs(values.var() - 1) < 0.03
    assert abs(((values.abs() < 1).double().mean()) - 0.6827) < 0.01


def test_auto_kind_and_validation():
    assert resolve_proj_type("auto", 100, 128) == "identity"
    assert resolve_proj_type("auto", 129, 128) == "sparse"
    assert make_projector("auto", 1000, 0, SHAPES).kind == "identity"
    assert make_projector("auto", 16, 0, SHAPES).kind == "sparse"
    with pytest.raises(ValueError, match="not valid"):
        make_projector("fourier", 16, 0, SHAPES)
    with pytest.raises(ValueError, match="nnz"):
        make_projector("sparse", 4, 0, SHAPES, nnz=8)
    with pytest.raises(ValueError, match="no trainable"):
        make_projector("sparse", 4, 0, {})
    with pytest.raises(ValueError, match="too large"):
        make_projector("sparse", 8192, 0, {"w": (10_000_000,)}).dense_matrix()


def test_large_sparse_projection_without_dense_matrix():
    # 2M parameters at d=4096: a dense float32 map would need 32 GiB; the sparse one streams chunks.
    p, d = 2_000_000, 4096
    proj = make_projector("sparse", d, 0, {"w": (p,)}, chunk_size=1 << 18, cache_mb=0)
    x = torch.zeros(1, p)
    x[0, 123_456] = 2.0
    out = proj.project({"w": x})
    assert out.shape == (1, d) and int((out != 0).sum()) == 4
    torch.testing.assert_close((out**2).sum(), torch.tensor(4.0))
    assert proj._cached_bytes == 0


_CHILD = """
import sys, torch
from hf_subset_select.collect.projection import make_projector
shapes = {"layer.0.lora_A.weight": (6, 13), "layer.0.lora_B.weight": (9, 6), "head.bias": (31,)}
x = torch.linspace(-1, 1, 163).reshape(1, 163)
for kind in ("rademacher", "gaussian", "sparse"):
    out = make_projector(kind, 48, 7, shapes, chunk_size=int(sys.argv[1])).project_flat(x)
    sys.stdout.write(kind + ":" + out.numpy().tobytes().hex() + "\\n")
"""


def test_same_seed_same_projection_in_another_process():
    x = torch.linspace(-1, 1, P_TOTAL).reshape(1, P_TOTAL)
    child = subprocess.run([sys.executable, "-c", _CHILD, "11"], capture_output=True, text=True, check=True)
    lines = dict(line.split(":", 1) for line in child.stdout.strip().splitlines())
    for kind in ("rademacher", "gaussian", "sparse"):
        here = make_projector(kind, 48, 7, SHAPES, chunk_size=1 << 16).project_flat(x)
        there = np.frombuffer(bytes.fromhex(lines[kind]), dtype=np.float32).reshape(1, -1)
        # the child streams the map in chunks of 11 parameters, this process in one chunk: the same map, float32 sums
        # in another order (a few 1e-7 of the outputs' scale); another seed or map would differ by O(1)
        np.testing.assert_allclose(there, here.numpy(), rtol=1e-5, atol=2e-6)


def test_projector_from_manifest_regenerates_the_map_or_refuses():
    from hf_subset_select.collect.projection import projector_from_manifest

    original = make_projector("sparse", 48, 5, SHAPES, nnz=3)
    again = projector_from_manifest(original.manifest(), SHAPES)
    assert torch.equal(again.dense_matrix(), original.dense_matrix())
    with pytest.raises(ValueError, match="scheme"):
        projector_from_manifest({**original.manifest(), "scheme": "old-v0"}, SHAPES)
    with pytest.raises(ValueError, match="same θ"):
        projector_from_manifest(original.manifest(), {"other": (7,)})


def test_a_registered_projector_kind_is_built_by_make_projector():
    from hf_subset_select.collect.projection import _PROJECTORS, IdentityProjector, register_projector

    @register_projector
    class Doubled(IdentityProjector):
        kind = "doubled"

        def project(self, grads):
            return 2 * super().project(grads)

    try:
        from hf_subset_select import CollectConfig

        assert (
            CollectConfig(proj_type="doubled").proj_type == "doubled"
        )  # the config accepts a registered kind
        proj = make_projector("doubled", 8, 0, [("w", (2, 3))])
        assert isinstance(proj, Doubled) and proj.manifest()["kind"] == "doubled" and proj.dim == 6
        g = {"w": torch.ones(1, 2, 3)}
        assert torch.equal(proj.project(g), 2 * torch.ones(1, 6))
    finally:
        _PROJECTORS.pop("doubled")
    with pytest.raises(ValueError, match="'doubled' is not valid"):
        make_projector("doubled", 8, 0, [("w", (2, 3))])
