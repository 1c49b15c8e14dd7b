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
    "IdentityProjector",
    "RademacherProjector",
    "GaussianProjector",
    "SparseProjector",
    "register_projector",
    "make_projector",
    "projector_from_manifest",
    "resolve_proj_type",
    "PROJECTION_KINDS",
    "PROJECTION_SCHEME",
]

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

    Each kind is a subclass registered under its name with :func:`register_projector`; a subclass implements
    :meth:`dense_block` and may override :meth:`project` and :meth:`_lift_chunk` with faster forms.
    """

    kind: str = ""

    def __init__(
        self,
        dim: int | None,
        seed: int,
        param_shapes: Mapping[str, Sequence[int]] | Iterable[tuple[str, Sequence[int]]],
        *,
        nnz: int = 4,
        chunk_size: int = 65536,
        cache_mb: float = 256.0,
    ) -> None:
        items = list(param_shapes.items()) if isinstance(param_shapes, Mapping) else list(param_shapes)
        if not items:
            raise ValueError("No parameters to project: the model has no trainable parameters.")
        self.param_shapes: dict[str, tuple[int, ...]] = {
            str(n): tuple(int(s) for s in shape) for n, shape in items
        }
        self.param_numels = {n: math.prod(s) for n, s in self.param_shapes.items()}
        self.num_params = sum(self.param_numels.values())
        self.seed = int(seed)
        dim = self._resolve_dim(dim)
        if dim is None or int(dim) <= 0:
            raise ValueError(f"Projection dimension must be a positive integer, got {dim!r}.")
        self.dim = int(dim)
        if chunk_size <= 0:
            raise ValueError(f"chunk_size must be > 0, got {chunk_size}.")
        self.chunk_size = int(chunk_size)
        self.cache_bytes = int(max(0.0, cache_mb) * 2**20)
        self._cache: dict[tuple[str, int, str], Any] = {}
        self._cached_bytes = 0
        self._keys = {n: _param_key(self.seed, n) for n in self.param_shapes}
        self.nnz: int | None = (
            None  # non-zeros per input coordinate (sparse kinds only; others ignore ``nnz``)
        )

    def _resolve_dim(self, dim: int | None) -> int | None:
        return dim

    # ------------------------------------------------------------------ description
    def manifest(self) -> dict[str, Any]:
        """What identifies the map (recorded in the cache manifest)."""
        return {
            "kind": self.kind,
            "dim": self.dim,
            "seed": self.seed,
            "scheme": PROJECTION_SCHEME,
            "num_params": self.num_params,
        }

    def _describe(self) -> str:
        return ""

    def __repr__(self) -> str:
        return f"Projector(kind={self.kind!r}, p={self.num_params}, d={self.dim}, seed={self.seed}{self._describe()})"

    def _rows_per_chunk(self) -> int:
        return self.chunk_size

    def _chunks(self, name: str) -> Iterable[tuple[int, int]]:
        n, step = self.param_numels[name], self._rows_per_chunk()
        for start in range(0, n, step):
            yield start, min(n, start + step)

    def _remember(self, key: tuple[str, int, str], value: Any, nbytes: int) -> Any:
        if self._cached_bytes + nbytes <= self.cache_bytes:
            self._cache[key] = value
            self._cached_bytes += nbytes
        return value

    def _offsets(self) -> dict[str, int]:
        offsets, total = {}, 0
        for n, k in self.param_numels.items():
            offsets[n] = total
            total += k
        return offsets

    # ------------------------------------------------------------------ generation and use
    def dense_block(
        self, name: str, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """Rows ``start:stop`` of ``P`` for parameter ``name`` (flattened, row-major), shape ``[stop-start, d]``."""
        raise NotImplementedError

    def _check_grads(self, grads: Mapping[str, torch.Tensor]) -> tuple[int, torch.device]:
        missing = [n for n in self.param_shapes if n not in grads]
        if missing:
            raise ValueError(
                f"Gradients for {missing[:3]} are missing; the projector covers {self.num_params} params."
            )
        first = grads[next(iter(self.param_shapes))]
        return first.shape[0], first.device

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Project per-example gradients ``{name: [B, *shape]}`` (every parameter of the projector) to ``[B, d]``."""
        batch, device = self._check_grads(grads)
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

    def _lift_chunk(self, name: str, start: int, stop: int, w: torch.Tensor) -> torch.Tensor:
        return self.dense_block(name, start, stop, w.device) @ w

    def lift(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """``P w`` split into parameter-shaped tensors (the parameter-space direction of a step ``w`` in d dims)."""
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        if w.numel() != self.dim:
            raise ValueError(f"lift() needs a vector of length d={self.dim}, got {w.numel()}.")
        out: dict[str, torch.Tensor] = {}
        for name, shape in self.param_shapes.items():
            pieces = [self._lift_chunk(name, a, b, w) for a, b in self._chunks(name)]
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


_PROJECTORS: dict[str, type[Projector]] = {}


def register_projector(cls: type[Projector]) -> type[Projector]:
    """Class decorator: make ``cls`` available as ``CollectConfig(proj_type=cls.kind)`` / :func:`make_projector`."""
    if not cls.kind:
        raise ValueError(f"{cls.__name__} needs a `kind` class attribute to be registered.")
    from ..config import register_choice

    register_choice("proj_type", cls.kind)
    _PROJECTORS[cls.kind] = cls
    return cls


@register_projector
class IdentityProjector(Projector):
    """No projection (d = p): the gradient flattened in parameter order."""

    kind = "identity"

    def _resolve_dim(self, dim: int | None) -> int | None:
        return self.num_params

    def dense_block(
        self, name: str, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        device = torch.device(device)
        block = torch.zeros(stop - start, self.dim, device=device)
        offset = self._offsets()[name]
        block[torch.arange(stop - start), torch.arange(offset + start, offset + stop)] = 1.0
        return block

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        batch, _ = self._check_grads(grads)
        return torch.cat([grads[n].reshape(batch, -1).float() for n in self.param_shapes], dim=1)

    def lift(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        w = torch.as_tensor(w, dtype=torch.float32).reshape(-1)
        if w.numel() != self.dim:
            raise ValueError(f"lift() needs a vector of length d={self.dim}, got {w.numel()}.")
        offsets = self._offsets()
        return {
            name: w[offsets[name] : offsets[name] + self.param_numels[name]].reshape(shape).clone()
            for name, shape in self.param_shapes.items()
        }


class _DenseProjector(Projector):
    """Dense kinds: blocks of ``P`` generated from hashed rows, cached up to ``cache_mb``."""

    def _rows_per_chunk(self) -> int:
        return max(1, min(self.chunk_size, _DENSE_BLOCK_ELEMENTS // self.dim))

    def _generate(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[n, d]`` entries of ``P`` for the hashed rows ``rows``."""
        raise NotImplementedError

    def dense_block(
        self, name: str, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        device = torch.device(device)
        key = (name, start, str(device))
        cached = self._cache.get(key)
        if cached is not None:
            return cached
        block = self._generate(_row_hashes(self._keys[name], start, stop, device), device).contiguous()
        return self._remember(key, block, block.numel() * 4)


@register_projector
class RademacherProjector(_DenseProjector):
    """Dense ``±1/√d`` entries."""

    kind = "rademacher"

    def _generate(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        # 64 signs per hashed word: bit c of word c // 64 is the sign of column c. Bytes of the (little-endian)
        # words index a 256 x 8 table of signed values, which is much cheaper than shifting every bit.
        n = rows.shape[0]
        words = _column_hashes(rows, (self.dim + 63) // 64)  # [n, ceil(d/64)]
        if sys.byteorder == "little":
            bytes_ = words.contiguous().view(torch.uint8).reshape(-1).long()
            return torch.index_select(self._sign_table(device), 0, bytes_).reshape(n, -1)[:, : self.dim]
        else:  # pragma: no cover - same map, bit by bit
            shifts = torch.arange(64, dtype=torch.int64, device=device)
            bits = ((words.unsqueeze(-1) >> shifts) & 1).reshape(n, -1)[:, : self.dim]
            return (1.0 - 2.0 * bits.to(torch.float32)) / math.sqrt(self.dim)

    def _sign_table(self, device: torch.device) -> torch.Tensor:
        """``table[b, k] = ±1/√d`` by bit k of byte b (1 -> negative)."""
        bits = (torch.arange(256, device=device).unsqueeze(-1) >> torch.arange(8, device=device)) & 1
        return (1.0 - 2.0 * bits.to(torch.float32)) / math.sqrt(self.dim)


@register_projector
class GaussianProjector(_DenseProjector):
    """Dense ``N(0, 1/d)`` entries: Box-Muller, two normals (cos and sin) from the two 24-bit uniforms of a hash."""

    kind = "gaussian"

    def _generate(self, rows: torch.Tensor, device: torch.device) -> torch.Tensor:
        n = rows.shape[0]
        h = _column_hashes(rows, (self.dim + 1) // 2)
        scale = 1.0 / float(1 << 24)
        u1 = ((_lsr(h, 40) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
        u2 = ((_lsr(h, 8) & 0xFFFFFF).to(torch.float32) + 0.5) * scale
        radius = torch.sqrt(-2.0 * torch.log(u1)) / math.sqrt(self.dim)
        angle = (2.0 * math.pi) * u2
        block = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=-1)
        return block.reshape(n, -1)[:, : self.dim]


@register_projector
class SparseProjector(Projector):
    """Block sparse JL: ``nnz`` hashed columns per input coordinate (one per block of columns), ``±1/√nnz``."""

    kind = "sparse"

    def __init__(self, dim: int | None, seed: int, param_shapes: Any, *, nnz: int = 4, **kwargs: Any) -> None:
        super().__init__(dim, seed, param_shapes, **kwargs)
        self.nnz = int(nnz)
        if not 1 <= self.nnz <= self.dim:
            raise ValueError(f"sparse nnz must lie in [1, dim={self.dim}], got {nnz}.")
        # Output columns split into nnz contiguous blocks; block k spans [lo_k, lo_k + size_k).
        bounds = [(k * self.dim) // self.nnz for k in range(self.nnz + 1)]
        self._block_lo = bounds[:-1]
        self._block_size = [b - a for a, b in zip(bounds[:-1], bounds[1:])]

    def manifest(self) -> dict[str, Any]:
        return {**super().manifest(), "nnz": self.nnz}

    def _describe(self) -> str:
        return f", nnz={self.nnz}"

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

    def dense_block(
        self, name: str, start: int, stop: int, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        device = torch.device(device)
        pos, sign = self._sparse_block(name, start, stop, device)
        block = torch.zeros(stop - start, self.dim, device=device)
        rows = torch.arange(stop - start, device=device).unsqueeze(0).expand_as(pos)
        block[rows, pos.long()] = sign.float() / math.sqrt(self.nnz)
        return block

    def project(self, grads: Mapping[str, torch.Tensor]) -> torch.Tensor:
        # Positive and negative entries accumulate into two halves of a [B, 2d] buffer (the sign is folded into
        # the column index), so the gradient is scattered as is: no signed copy, O(B * p * nnz) adds.
        batch, device = self._check_grads(grads)
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

    def _lift_chunk(self, name: str, start: int, stop: int, w: torch.Tensor) -> torch.Tensor:
        pos, sign = self._sparse_block(name, start, stop, w.device)
        return (w[pos.long()] * sign.float() / math.sqrt(self.nnz)).sum(0)


PROJECTION_KINDS = tuple(_PROJECTORS)


def resolve_proj_type(proj_type: str, num_params: int, proj_dim: int) -> str:
    """``'auto'`` -> ``'identity'`` when ``num_params <= proj_dim``, else ``'sparse'``; other kinds unchanged."""
    if proj_type == "auto":
        return "identity" if num_params <= proj_dim else "sparse"
    if proj_type not in _PROJECTORS:
        raise ValueError(
            f"proj_type={proj_type!r} is not valid; choose 'auto' or one of {list(_PROJECTORS)}."
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
    return _PROJECTORS[kind](dim, seed, items, nnz=nnz, chunk_size=chunk_size, cache_mb=cache_mb)


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
