"""Assertion helpers for the geometric contracts of geolinrpe layers and models.

Use them in your own tests the way e3nn users use ``assert_equivariant``::

    from geolinrpe.testing import assert_translation_invariant
    assert_translation_invariant(layer, x, pos, atol=1e-10)

Each helper takes a module (or callable) with the signature of
:class:`geolinrpe.nn.RPEAttention`: ``fn(x, pos, batch=None, key_padding_mask=None)``,
and raises ``AssertionError`` with the measured deviation.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from ..ops.packing import to_packed, to_padded

Layer = Callable[..., Tensor]


def _check(name: str, got: Tensor, want: Tensor, atol: float, rtol: float) -> float:
    err = (got - want).abs().max().item() if got.numel() else 0.0
    if not torch.allclose(got, want, atol=atol, rtol=rtol):
        raise AssertionError(f"{name}: max abs deviation {err:.3e} > atol={atol}, rtol={rtol}")
    return err


def random_rotation(dim: int = 3, *, dtype=torch.float64, generator=None) -> Tensor:
    """Haar-random rotation matrix ``[dim, dim]`` with determinant +1."""
    q, r = torch.linalg.qr(torch.randn(dim, dim, dtype=dtype, generator=generator))
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def assert_translation_invariant(
    fn: Layer, x: Tensor, pos: Tensor, *, shift: Tensor | None = None, atol=1e-6, rtol=1e-5, **kw
) -> float:
    """``fn(x, pos + t) == fn(x, pos)`` for a translation ``t`` (default: random, scale 10)."""
    if shift is None:
        shift = 10 * torch.randn(pos.shape[-1], dtype=pos.dtype, device=pos.device)
    return _check("translation", fn(x, pos + shift, **kw), fn(x, pos, **kw), atol, rtol)


def assert_rotation_invariant(
    fn: Layer, x: Tensor, pos: Tensor, *, rotation: Tensor | None = None, atol=1e-6, rtol=1e-5, **kw
) -> float:
    """``fn(x, pos R^T) == fn(x, pos)`` for a rotation ``R`` (default: Haar-random)."""
    if rotation is None:
        rotation = random_rotation(pos.shape[-1], dtype=pos.dtype).to(pos.device)
    return _check("rotation", fn(x, pos @ rotation.T, **kw), fn(x, pos, **kw), atol, rtol)


def assert_permutation_equivariant(
    fn: Layer, x: Tensor, pos: Tensor | None, *, batch: Tensor | None = None, atol=1e-6, rtol=1e-5
) -> float:
    """Permuting the tokens of each graph permutes the output the same way.

    Dense ``x [b, n, c]`` permutes axis 1; packed ``x [n, c]`` permutes within each graph
    of ``batch`` (so ``batch`` stays sorted).
    """
    if x.dim() == 3:
        perm = torch.randperm(x.shape[1], device=x.device)
        out = fn(x[:, perm], None if pos is None else pos[:, perm])
        return _check("permutation", out, fn(x, pos)[:, perm], atol, rtol)
    if batch is None:
        batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
    keys = batch.to(torch.float64) + torch.rand(batch.shape, dtype=torch.float64, device=x.device)
    perm = torch.argsort(keys)  # random order within each graph, graphs stay in order
    out = fn(x[perm], None if pos is None else pos[perm], batch=batch)
    return _check("permutation", out, fn(x, pos, batch=batch)[perm], atol, rtol)


def assert_padding_consistent(
    fn: Layer, x: Tensor, pos: Tensor | None, batch: Tensor, *, atol=1e-6, rtol=1e-5, pad: int = 3
) -> float:
    """Packed ``(x, pos, batch)`` gives the same rows as the padded dense batch.

    The dense batch gets ``pad`` extra padding slots filled with random values, so a layer
    that lets padding leak into valid rows fails.
    """
    packed_out = fn(x, pos, batch=batch)
    dense_x, mask = _padded_with_noise(x, batch, pad)
    dense_pos = None if pos is None else _padded_with_noise(pos, batch, pad)[0]
    dense_out = fn(dense_x, dense_pos, key_padding_mask=mask)
    return _check("padded vs packed", to_packed(dense_out, mask)[0], packed_out, atol, rtol)


def _padded_with_noise(x: Tensor, batch: Tensor, pad: int) -> tuple[Tensor, Tensor]:
    """Padded layout with ``pad`` extra slots; every padding slot holds random values."""
    dense, mask = to_padded(x, batch)
    dense = torch.cat([dense, dense.new_zeros((dense.shape[0], pad) + dense.shape[2:])], 1)
    mask = torch.cat([mask, mask.new_ones(mask.shape[0], pad)], 1)
    noise = torch.randn_like(dense)
    return torch.where(mask.view(mask.shape + (1,) * (dense.dim() - 2)), noise, dense), mask


__all__ = [
    "assert_padding_consistent",
    "assert_permutation_equivariant",
    "assert_rotation_invariant",
    "assert_translation_invariant",
    "random_rotation",
]
