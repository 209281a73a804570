"""RPE attention inside PyG's GPSConv and as a drop-in for PerformerAttention: the attention
is really used (a test fails if GPSConv skips it), positions reach it, PyG's mask convention."""

from __future__ import annotations

import pytest
import torch
from torch_geometric.nn import GINConv, GPSConv
from torch_geometric.nn.attention import PerformerAttention
from torch_geometric.utils import to_dense_batch

from geolinrpe.nn import RPEAttention
from geolinrpe.nn.pyg import PerformerRPEAttention, RPEGPSConv


def graphs(sizes=(5, 8), channels=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    x = torch.randn(n, channels, generator=g, dtype=torch.float64)
    pos = torch.randn(n, 3, generator=g, dtype=torch.float64) * 2
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    ring = [(i, (i + 1) % s) for s in sizes for i in range(s)]
    offsets = torch.cumsum(torch.tensor((0,) + tuple(sizes[:-1])), 0)
    edges = [
        (a + int(offsets[k]), b + int(offsets[k]))
        for k, s in enumerate(sizes)
        for a, b in ring[sum(sizes[:k]) : sum(sizes[:k]) + s]
    ]
    edge_index = torch.tensor(edges).t()
    return x, pos, batch, torch.cat([edge_index, edge_index.flip(0)], 1)


def test_drop_in_call_signature_and_mask_convention():
    """``attn(x, mask)`` as PerformerAttention (mask True = node); each padded graph gets
    what it gets alone; the output depends on the positions."""
    torch.manual_seed(0)
    attn = PerformerRPEAttention(16, heads=2, rpe="flt-kernel", pos_dim=3).double()
    assert isinstance(attn, PerformerAttention)
    x, pos, batch, _ = graphs()
    xd, mask = to_dense_batch(x, batch)
    pd, _ = to_dense_batch(pos, batch)
    out = attn(xd, mask=mask, pos=pd)
    assert out.shape == xd.shape
    alone = attn(xd[:1, :5], mask=torch.ones(1, 5, dtype=torch.bool), pos=pd[:1, :5])
    torch.testing.assert_close(out[:1, :5], alone, rtol=1e-10, atol=1e-10)
    reference = attn.attention(xd, pd, key_padding_mask=~mask)  # our convention: True = pad
    torch.testing.assert_close(out, reference, rtol=0, atol=0)
    moved = attn(xd, mask=mask, pos=pd * 1.7)
    assert (moved - out)[mask].abs().max() > 1e-3  # positions are used
    shifted = attn(xd, mask=mask, pos=pd + torch.tensor([3.0, -1.0, 2.0], dtype=pd.dtype))
    torch.testing.assert_close(shifted[mask], out[mask], rtol=1e-9, atol=1e-9)
    with pytest.raises(ValueError, match="needs positions"):
        attn(xd, mask=mask)
    with pytest.raises(ValueError, match="mask must have shape"):
        attn(xd, mask=mask[:, :3], pos=pd)
    plain = PerformerRPEAttention(16, heads=2, rpe=None).double()
    assert plain(xd, mask=mask).shape == xd.shape  # no RPE: no positions needed


@pytest.mark.parametrize("use_subclass", [True, False])
def test_gps_layer_uses_the_rpe_attention(use_subclass):
    """GPSConv's output equals its formula with our attention in it (norm=None, conv=None:
    out = h + MLP(h), h = attention(x) + x), so a skipped attention fails; with a local conv
    too, and either through RPEGPSConv(pos=...) or by assigning the attention to a GPSConv."""
    torch.manual_seed(0)
    x, pos, batch, edge_index = graphs()
    if use_subclass:
        gps = RPEGPSConv(16, conv=None, heads=2, norm=None, rpe="flt-kernel", pos_dim=3).double()

        def call(p):
            return gps(x, edge_index, batch, pos=p)
    else:
        gps = GPSConv(16, conv=None, heads=2, norm=None, attn_type="performer").double()
        gps.attn = PerformerRPEAttention(16, heads=2, rpe="flt-kernel", pos_dim=3).double()

        def call(p):
            with gps.attn.positions(p, batch):
                return gps(x, edge_index, batch)

    gps.eval()
    out = call(pos)
    xd, mask = to_dense_batch(x, batch)
    pd, _ = to_dense_batch(pos, batch)
    h = gps.attn.attention(xd, pd, key_padding_mask=~mask)[mask] + x
    torch.testing.assert_close(out, h + gps.mlp(h), rtol=1e-10, atol=1e-10)
    skipped = x + gps.mlp(x)  # what GPSConv computes when it skips an unknown attention
    assert (out - skipped).abs().max() > 1e-3
    assert (call(pos * 1.5) - out).abs().max() > 1e-4  # positions reach the attention
    torch.testing.assert_close(call(pos + 5.0), out, rtol=1e-9, atol=1e-9)  # translation


def test_gps_with_local_conv_trains_and_resets():
    torch.manual_seed(0)
    x, pos, batch, edge_index = graphs()
    conv = GINConv(torch.nn.Sequential(torch.nn.Linear(16, 16), torch.nn.ReLU()))
    gps = RPEGPSConv(16, conv=conv, heads=4, rpe="flt-kernel", pos_dim=3).double()
    out = gps(x, edge_index, batch, pos=pos)
    out.square().mean().backward()
    rpe_grads = [p.grad for p in gps.attn.attention.rpe.parameters()]
    assert rpe_grads and all(g is not None and torch.isfinite(g).all() for g in rpe_grads)
    gps.reset_parameters()  # calls attn._reset_parameters as GPSConv does
    assert "attn_type=rpe" in repr(gps)
    assert isinstance(gps.attn.attention, RPEAttention)
