"""Seeded Johnson-Lindenstrauss projections of per-example gradients, generated chunk by chunk.

A projector maps a gradient ``∇θ f`` (p numbers spread over named parameters) to ``g = Pᵀ ∇θ f`` with
d numbers. ``P`` is never held as a dense p x d matrix: its entries are a pure function of
``(seed, parameter name, coordinate inside the parameter, output column)`` computed with an integer hash
(SplitMix64), so any process, any later run and any device regenerates exactly the same map, and the
chunk size (rows of ``P`` materialized at once) changes memory and speed but never the map.

Kinds (all scaled so that ``E‖Pᵀx‖² = ‖x‖²``):

* ``"rademacher"``: dense ``±1/√d``. Cost p·d per example.
* ``"gaussian"``: dense ``N(0, 1/d)`` (Box-Muller on hashed uniforms). Cost p·d per example.
* ``"sparse"``: block sparse JL (a CountSketch per block): output columns are split into ``nnz`` blocks and
  every input coordinate lands in one hashed column of each block with a hashed sign, value
  ``±1/√nnz``. Cost p·nnz per example, so d in the thousands stays cheap.
* ``"identity"``: no projection (d = p), the gradient flattened in parameter order.

Extra memory is O(d x chunk) for the dense kinds and O(nnz x chunk) for the sparse one, plus an optional
cache of generated chunks bounded by ``cache_mb`` (0 disables it), never a p x d matrix.
"""

from __future__ import annotations

import hashlib
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "Projector",
    "make_projector",
    "projector_from_manifest",
    "resolve_proj_type",
    "PROJECTION_KINDS",
    "PROJECTION_SCHEME",
]

PROJECTION_KINDS = ("rademacher", "gaussian", "sparse", "identity")
# Bumped whenever the map generated for a given (seed, name, coordinate) changes.
PROJECTION_SCHEME = "splitmix64-v1"  # rademacher: word bits; gaussian: Box-Muller cos/sin pairs

_MASK64 = (1 << 64) - 1


def _signed(x: int) -> int:
    x &= _MASK64
    return x - (1 << 64) if x >= (1 << 63) else x


_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)
_GOLDEN = _signed(0x9E3779B97F4A7C15)
_COLUMN = _signed(0xD1B54A32D192ED03)
_DENSE_BLOCK_ELEMENTS = 1 << 22  # rows x d elements generated at once for the dense kinds


def _lsr(z: torch.Tensor, s: int) -> torch.Tensor:
    """Logical right shift of int64 (torch's ``>>`` is arithmetic)."""
    return (z >> s) & ((1 << (64 - s)) - 1)


def _mix(z: torch.Tensor) -> torch.Tensor:
    """SplitMix64 finalizer on int64 tensors (wrapping arithmetic, bit-identical to the uint64 reference)."""
    z = (z ^ _lsr(z, 30)) * _M1
    z = (z ^ _lsr(z, 27)) * _M2
    return z ^ _lsr(z, 31)


def _param_key(seed: int, name: str) -> int:
    digest = hashlib.blake2b(f"{int(seed)}\x00{name}".encode(), digest_size=8).digest()
    return _signed(int.from_bytes(digest, "little"))


def _row_hashes(key: int, start: int, stop: int, device: torch.device) -> torch.Tensor:
    rows = torch.arange(start, stop, dtype=torch.int64, device=device)
    return _mix(rows * _GOLDEN + key)


def _column_hashes(row_hash: torch.Tensor, num: int) -> torch.Tensor:
    cols = torch.arange(1, num + 1, dtype=torch.int64, device=row_hash.device) * _COLUMN
    return _mix(row_hash.unsqueeze(-1) + cols)


class Projector:
    """A seeded, chunked projection ``g = Pᵀ ∇θ f`` over named parameters (see the module docstring).

    Build one with :func:`make_projector`. Call :meth:`project` on per-example gradients
    ``{name: Tensor[B, *shape]}`` to get ``[B, d]`` float32 features; :meth:`lift` maps a d-vector ``w`` back to
    parameter space (``P w``), e.g. to move θ* along an estimated step.
    """

    def __init__(
        self,
        kind: str,
        dim: int | None,
        seed: int,
        param_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
        *,
        nnz: int = 4,
        chunk_size: int = 65536,
        cache_mb: float = 256.0,
    ) -> None:
        if kind not in PROJECTION_KINDS:
            raise ValueError(
                f"Projection kind {kind!r} is not valid; choose one of {list(PROJECTION_KINDS)}."
            )
        items = list(param_shapes.items()) if isinstance(param_shapes, Mapping) else list(param_shapes)
        if not items:
            raise ValueError("No parameters to project: the model has no trainable parameters.")
        self.param_shapes: dict[str, tuple[int, ...]] = {
            str(n): tuple(int(s) for s in shape) for n, shape in items
        }
        self.param_numels = {n: math.prod(s) for n, s in self.param_shapes.items()}
        self.num_params = sum(self.param_numels.values())
        self.kind = kind
        self.seed = int(seed)
        if kind == "identity":
            dim = self.num_params
        if dim is None or int(dim) <= 0:
            raise ValueError(f"Projection dimension must be a positive integer, got {dim!r}.")
        self.dim = int(dim)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}.")
        self.chunk_size = int(chunk_size)
        self.nnz = int(nnz) if kind == "sparse" else None
        if kind == "sparse" and not 1 <= self.nnz <= self.dim:
            raise ValueError(f"sparse nnz must lie in [1, dim={self.dim}], got {nnz}.")
        self.cache_bytes = int(max(0.0, cache_mb) * 2**20)
        self._cache: dict[tuple[str, int, str], Any] = {}
        self._cached_bytes = 0
        self._keys = {n: _param_key(self.seed, n) for n in self.param_shapes}
        if kind == "sparse":
            # Output columns split into nnz contiguous blocks; block k spans [lo_k, lo_k + size_k).
            bounds = [(k * self.dim) // self.nnz for k in range(self.nnz + 1)]
            self._block_lo = bounds[:-1]
            self._block_size = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    # ------------------------------------------------------------------ description
    def manifest(self) -> dict[str, Any]:
        """What identifies the map (recorded in the cache manifest)."""
        out: dict[str, Any] = {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "scheme": PROJECTION_SCHEME,
            "num_params": self.num_params,
        }
        if self.kind == "sparse":
            out["nnz"] = self.nnz
        return out

    def __repr__(self) -> str:
        extra = f", nnz={self.nnz}" if self.kind == "sparse" else ""
        return f"Projector(kind={self.kind!r}, p={self.num_params}, d={self.dim}, seed={self.seed}{extra})"

    def _rows_per_chunk(self) -> int:
        if self.kind in ("rademacher", "gaussian"):
            return max(1, min(self.chunk_size, _DENSE_BLOCK_ELEMENTS // self.dim))
        return self.chunk_size

    def _chunks(self, name: str) -> Iterable[tuple[int, int]]:
        n, step = self.param_numels[name], self._rows_per_chunk()
        for start in range(0, n, step):
            yield start, min(n, start + step)

    # ------------------------------------------------------------------ generation
    def _remember(self, key: tuple[str, int, str], value: Any, nbytes: int) -> Any:
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[key] = value
            self._cached_bytes += nbytes
        return value

    def dense_block(
        self, name: str, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Rows ``start:stop`` of ``P`` for parameter ``name`` (flattened, row-major), shape ``[stop-start, d]``."""
        device = torch.device(device)
        if self.kind == "identity":
            block = torch.zeros(stop - start, self.dim, device=device)
            offset = self._offsets()[name]
            block[torch.arange(stop - start), torch.arange(offset + start, offset + stop)] = 1.0
            return block
        if self.kind == "sparse":
            pos, sign = self._sparse_block(name, start, stop, device)
            block = torch.zeros(stop - start, self.dim, device=device)
            rows = torch.arange(stop - start, device=device).unsqueeze(0).expand_as(pos)
            block[rows, pos.long()] = sign.float() / math.sqrt(self.nnz)
            return block
        key = (name, start, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        rows = _row_hashes(self._keys[name], start, stop, device)
        n = stop - start
        if self.kind == "rademacher":
            # 64 signs per hashed word: bit c of word c // 64 is the sign of column c. Bytes of the (little-endian)
            # words index a 256 x 8 table of signed values, which is much cheaper than shifting every bit.
            words = _column_hashes(rows, (self.dim + 63) // 64)  # [n, ceil(d/64)]
            if sys.byteorder == "little":
                bytes_ = words.contiguous().view(torch.uint8).reshape(-1).long()
                block = torch.index_select(self._sign_table(device), 0, bytes_).reshape(n, -1)[:, : self.dim]
            else:  # pragma: no cover - same map, bit by bit
                shifts = torch.arange(64, dtype=torch.int64, device=device)
                bits = ((words.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, : self.dim]
                block = (1.0 - 2.0 * bits.to(torch.float32)) / math.sqrt(self.dim)
        else:  # gaussian: Box-Muller, two normals (cos and sin) from the two 24-bit uniforms of one hash
            h = _column_hashes(rows, (self.dim + 1) // 2)
            scale = 1.0 / float(1 << 24)
            u1 = ((_lsr(h, 40) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
            u2 = ((_lsr(h, 8) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
            radius = torch.sqrt(-2.0 * torch.log(u1)) / math.sqrt(self.dim)
            angle = (2.0 * math.pi) * u2
            block = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
            block = block.reshape(n, -1)[:, : self.dim]
        block = block.contiguous()
        return self._remember(key, block, block.numel() * 4)

    def _sign_table(self, device: torch.device) -> torch.Tensor:
        """``table[b, k] = ±1/√d`` by bit k of byte b (1 -> negative)."""
        bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
        return (1.0 - 2.0 * bits.to(torch.float32)) / math.sqrt(self.dim)

    def _signed_columns(self, name: str, start: int, stop: int, device: torch.device) -> torch.Tensor:
        """int32 ``[nnz, n]``: column of each non-zero, plus d when its sign is negative (one cached array)."""
        key = (name, start, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        h = _column_hashes(_row_hashes(self._keys[name], start, stop, device), self.nnz).t()  # [nnz, n]
        lo = torch.tensor(self._block_lo, dtype=torch.int64, device=device).unsqueeze(-1)
        size = torch.tensor(self._block_size, dtype=torch.int64, device=device).unsqueeze(-1)
        pos = lo + torch.remainder(_lsr(h, 1), size)
        signed = (pos + self.dim * (h & 1)).to(torch.int32).contiguous()
        return self._remember(key, signed, signed.numel() * 4)

    def _sparse_block(
        self, name: str, start: int, stop: int, device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Columns (int32 ``[nnz, n]``, distinct per input coordinate) and signs (int8 ±1) of the non-zeros."""
        signed = self._signed_columns(name, start, stop, device)
        negative = signed >= self.dim
        return torch.where(negative, signed - self.dim, signed), (1 - 2 * negative.to(torch.int8))

    def _offsets(self) -> dict[str, int]:
        offsets, total = {}, 0
        for n, k in self.param_numels.items():
            offsets[n] = total
            total += k
        return offsets

    # ------------------------------------------------------------------ use
    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project per-example gradients ``{name: [B, *shape]}`` (every parameter of the projector) to ``[B, d]``."""
        missing = [n for n in self.param_shapes if n not in grads]
        if missing:
            raise ValueError(
                f"Gradients for {missing[:3]} are missing; the projector covers {self.num_params} params."
            )
        first = grads[next(iter(self.param_shapes))]
        batch, device = first.shape[0], first.device
        if self.kind == "identity":
            return torch.cat([grads[n].reshape(batch, -1).float() for n in self.param_shapes], dim=1)
        if self.kind == "sparse":
            # Positive and negative entries accumulate into two halves of a [B, 2d] buffer (the sign is folded
            # into the column index), so the gradient is scattered as is: no signed copy, O(B * p * nnz) adds.
            out2 = torch.zeros(batch, 2 * self.dim, dtype=torch.float32, device=device)
            for name in self.param_shapes:
                flat = grads[name].reshape(batch, -1).float()
                for start, stop in self._chunks(name):
                    signed = self._signed_columns(name, start, stop, device)
                    part = flat[:, start:stop]
                    for k in range(self.nnz):
                        out2.scatter_add_(1, signed[k].long().unsqueeze(0).expand(batch, -1), part)
            out = out2[:, : self.dim] - out2[:, self.dim :]
            return out.mul_(1.0 / math.sqrt(self.nnz))
        out = torch.zeros(batch, self.dim, dtype=torch.float32, device=device)
        for name in self.param_shapes:
            flat = grads[name].reshape(batch, -1)
            for start, stop in self._chunks(name):
                out.addmm_(flat[:, start:stop].float(), self.dense_block(name, start, stop, device))
        return out

    def project_flat(self, flat: torch.Tensor) -> torch.Tensor:
        """Project ``[B, p]`` gradients flattened in parameter order (as :meth:`dense_matrix` rows are ordered)."""
        grads, offset = {}, 0
        for name, shape in self.param_shapes.items():
            k = self.param_numels[name]
            grads[name] = flat[:, offset : offset + k].reshape(flat.shape[0], *shape)
            offset += k
        return self.project(grads)

    def lift(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``P w`` split into parameter-shaped tensors (the parameter-space direction of a step ``w`` in d dims)."""
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        if w.numel() != self.dim:
            raise ValueError(f"lift() needs a vector of length d={self.dim}, got {w.numel()}.")
        out: dict[str, torch.Tensor] = {}
        offsets = self._offsets()
        for name, shape in self.param_shapes.items():
            if self.kind == "identity":
                k = self.param_numels[name]
                out[name] = w[offsets[name] : offsets[name] + k].reshape(shape).clone()
                continue
            pieces = []
            for start, stop in self._chunks(name):
                if self.kind == "sparse":
                    pos, sign = self._sparse_block(name, start, stop, w.device)
                    vals = w[pos.long()] * sign.float() / math.sqrt(self.nnz)
                    pieces.append(vals.sum(0))
                else:
                    pieces.append(self.dense_block(name, start, stop, w.device) @ w)
            out[name] = torch.cat(pieces).reshape(shape)
        return out

    def dense_matrix(self, max_elements: int = 50_000_000) -> torch.Tensor:
        """The full ``[p, d]`` matrix (for tests and small adapters only; refuses above ``max_elements``)."""
        if self.num_params * self.dim > max_elements:
            raise ValueError(
                f"A dense {self.num_params} x {self.dim} matrix is too large to materialize; use project()."
            )
        blocks = [self.dense_block(n, a, b) for n in self.param_shapes for a, b in self._chunks(n)]
        return torch.cat(blocks, dim=0)

    def clear_cache(self) -> None:
        self._cache.clear()
        self._cached_bytes = 0


def resolve_proj_type(proj_type: str, num_params: int, proj_dim: int) -> str:
    """``'auto'`` -> ``'identity'`` when ``num_params <= proj_dim``, else ``'sparse'``; other kinds unchanged."""
    if proj_type == "auto":
        return "identity" if num_params <= proj_dim else "sparse"
    if proj_type not in PROJECTION_KINDS:
        raise ValueError(
            f"proj_type={proj_type!r} is not valid; choose 'auto' or one of {list(PROJECTION_KINDS)}."
        )
    return proj_type


def make_projector(
    kind: str,
    dim: int,
    seed: int,
    param_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
    *,
    nnz: int = 4,
    chunk_size: int = 65536,
    cache_mb: float = 256.0,
) -> Projector:
    """Build a :class:`Projector`.

    Args:
        kind: ``"rademacher"``, ``"gaussian"``, ``"sparse"``, ``"identity"`` or ``"auto"`` (identity when the
            parameter count is at most ``dim``, else sparse).
        dim: output dimension d (ignored for identity, where d = p).
        seed: the map is a pure function of ``(seed, parameter name, coordinate, column)``.
        param_shapes: ``{name: shape}`` (or ``(name, shape)`` pairs) of the projected parameters, in order.
        nnz: non-zeros per input coordinate of the sparse map.
        chunk_size: parameter coordinates generated at once (memory knob only; the map does not depend on it).
        cache_mb: keep generated chunks up to this many MiB for reuse across batches (0: regenerate every time).
    """
    items = list(param_shapes.items()) if isinstance(param_shapes, Mapping) else list(param_shapes)
    num_params = sum(math.prod(int(s) for s in shape) for _, shape in items)
    kind = resolve_proj_type(kind, num_params, dim)
    return Projector(kind, dim, seed, items, nnz=nnz, chunk_size=chunk_size, cache_mb=cache_mb)


def projector_from_manifest(
    projection: Mapping[str, Any],
    param_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
    *,
    chunk_size: int = 65536,
    cache_mb: float = 256.0,
) -> Projector:
    """Regenerate the projector recorded in a cache manifest's ``projection`` entry, for the given parameters.

    Raises ``ValueError`` when the manifest's generator scheme is not this release's or when the parameters do not
    add up to the recorded parameter count (a different θ* architecture or adapter).
    """
    scheme = projection.get("scheme", PROJECTION_SCHEME)
    if scheme != PROJECTION_SCHEME:
        raise ValueError(
            f"The cache's projection was generated with scheme {scheme!r}; this release implements "
            f"{PROJECTION_SCHEME!r}. Re-collect the cache with this release."
        )
    proj = make_projector(
        str(projection["kind"]),
        int(projection["dim"]),
        int(projection["seed"]),
        param_shapes,
        nnz=int(projection.get("nnz") or 4),
        chunk_size=chunk_size,
        cache_mb=cache_mb,
    )
    expected = projection.get("num_params")
    if expected is not None and int(expected) != proj.num_params:
        raise ValueError(
            f"The cache was projected from {expected} trainable parameters, these parameters number "
            f"{proj.num_params}: load the same θ* (and adapter) the cache was collected from."
        )
    if proj.dim != int(projection["dim"]):
        raise ValueError(f"Projection dimension {proj.dim} differs from the cache's {projection['dim']}.")
    return proj
