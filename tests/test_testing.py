"""The shipped assertion helpers accept correct layers and reject broken ones."""

import pytest
import torch

from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_rotation_invariant,
    assert_translation_invariant,
    random_rotation,
)

D64 = torch.float64


def distance_layer(x, pos, batch=None, key_padding_mask=None):
    """Invariant reference: x_i * sum_j exp(-|r_i - r_j|^2) over valid same-graph tokens."""
    if x.dim() == 2:
        batch = torch.zeros(len(x), dtype=torch.long) if batch is None else batch
        same = batch[:, None] == batch[None]
        w = torch.exp(-(pos[:, None] - pos[None]).pow(2).sum(-1)) * same
        return x * w.sum(1, keepdim=True)
    w = torch.exp(-(pos[:, :, None] - pos[:, None]).pow(2).sum(-1))
    if key_padding_mask is not None:
        w = w.masked_fill(key_padding_mask[:, None, :], 0)
    return x * w.sum(2, keepdim=True)


def leaky_layer(x, pos, batch=None, key_padding_mask=None):
    """Averages over every slot of the row, padding included."""
    if x.dim() == 2:
        batch = torch.zeros(len(x), dtype=torch.long) if batch is None else batch
        counts = torch.bincount(batch).to(x.dtype)
        sums = torch.zeros(int(batch.max()) + 1, x.shape[1], dtype=x.dtype).index_add_(0, batch, x)
        return x + (sums / counts[:, None])[batch]
    return x + x.mean(1, keepdim=True)


def test_helpers_accept_an_invariant_layer():
    x, pos = torch.randn(9, 4, dtype=D64), torch.randn(9, 3, dtype=D64)
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])
    assert assert_translation_invariant(distance_layer, x, pos, batch=batch, atol=1e-12) < 1e-12
    assert assert_rotation_invariant(distance_layer, x, pos, batch=batch, atol=1e-12) < 1e-12
    assert_permutation_equivariant(distance_layer, x, pos, batch=batch, atol=1e-12)
    assert_permutation_equivariant(distance_layer, x[None], pos[None], atol=1e-12)
    assert_padding_consistent(distance_layer, x, pos, batch, atol=1e-12)


def test_helpers_reject_broken_layers():
    x, pos = torch.randn(9, 4, dtype=D64), torch.randn(9, 3, dtype=D64)
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1, 1])

    def absolute(x, pos, batch=None, key_padding_mask=None):
        return x * pos.sum(-1, keepdim=True)

    def order_dependent(x, pos, batch=None, key_padding_mask=None):
        return x.cumsum(-2)

    with pytest.raises(AssertionError, match="translation"):
        assert_translation_invariant(absolute, x, pos)
    with pytest.raises(AssertionError, match="rotation"):
        assert_rotation_invariant(absolute, x, pos)
    with pytest.raises(AssertionError, match="permutation"):
        assert_permutation_equivariant(order_dependent, x, pos, batch=batch)
    with pytest.raises(AssertionError, match="padded vs packed"):
        assert_padding_consistent(leaky_layer, x, pos, batch)


def test_random_rotation_is_a_proper_rotation():
    for _ in range(5):
        rot = random_rotation(3)
        torch.testing.assert_close(rot @ rot.T, torch.eye(3, dtype=D64))
        assert torch.det(rot) > 0
