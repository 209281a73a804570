"""RPETransformerBlock / Encoder, ExactRPEAttention, use_reference, read_batch and pool."""

import pytest
import torch
from torch import nn

from geolinrpe.nn import (
    ExactRPEAttention,
    RPEAttention,
    RPETransformerBlock,
    RPETransformerEncoder,
    use_reference,
)
from geolinrpe.nn.block import build_attention, pool, read_batch
from geolinrpe.ops.packing import to_padded
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_translation_invariant,
)

D64 = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-10)


def packed(sizes, channels=24, pos_dim=3):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    n = sum(sizes)
    return torch.randn(n, channels, dtype=D64), 2 * torch.randn(n, pos_dim, dtype=D64), batch


def block(**kw):
    options = dict(rpe="flt-kernel", pos_dim=3, num_features=16)
    options.update(kw)
    return RPETransformerBlock(24, 4, mlp_ratio=2, **options).to(D64)


@pytest.mark.parametrize("kw", [dict(), dict(mode="mask"), dict(rpe=None), dict(attention="exact")])
def test_block_contracts_packed_padded_permutation_translation(kw):
    layer = block(**kw)
    x, pos, batch = packed([5, 1, 9])
    out = layer(x, pos, batch)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert_padding_consistent(layer, x, pos, batch, **TIGHT)
    assert_permutation_equivariant(layer, x, pos, batch=batch, **TIGHT)
    assert_translation_invariant(layer, x, pos, batch=batch, **TIGHT)


def test_block_dense_padding_rows_are_zero_and_pre_norm_residual():
    layer = block()
    x, pos = torch.randn(2, 6, 24, dtype=D64), torch.randn(2, 6, 3, dtype=D64)
    mask = torch.zeros(2, 6, dtype=torch.bool)
    mask[1, 4:] = True
    out = layer(x, pos, key_padding_mask=mask)
    assert (out[1, 4:] == 0).all()
    # pre-norm residual: x + attn(LN1 x), then + MLP(LN2 .)
    h = x + layer.attention(layer.norm1(x), pos, key_padding_mask=mask)
    want = (h + layer.mlp(layer.norm2(h))).masked_fill(mask[..., None], 0)
    torch.testing.assert_close(out, want, **TIGHT)


def test_block_passes_attention_options_factories_and_modules():
    layer = block(mode="mask", kernel="elu", normalize="masked", chunk_size=7)
    attn = layer.attention
    assert isinstance(attn, RPEAttention) and not isinstance(attn, ExactRPEAttention)
    assert (attn.mode, attn.normalize, attn.chunk_size) == ("mask", "masked", 7)
    assert isinstance(block(attention="exact").attention, ExactRPEAttention)
    calls = []

    def factory(embed_dim, num_heads, **options):
        calls.append((embed_dim, num_heads, options))
        return RPEAttention(embed_dim, num_heads, **options)

    RPETransformerBlock(24, 4, attention=factory, rpe=None, num_features=8)
    assert calls == [(24, 4, {"rpe": None, "num_features": 8})]
    module = RPEAttention(24, 4)
    assert RPETransformerBlock(24, 4, attention=module).attention is module
    # mode=None: the RPE's first supported mode
    options = dict(rpe="toeplitz-fft", pos_dim=1, mode=None, rpe_options={"max_offset": 8})
    toeplitz = build_attention(24, 4, **options)
    assert toeplitz.mode == "mask"
    assert build_attention(32, 4, rpe="rope", pos_dim=2, mode=None).mode == "logit"


@pytest.mark.parametrize(
    "bad",
    [
        dict(attention="quadratic"),
        dict(attention="linear", bogus=1),
        dict(attention=RPEAttention(24, 4), rpe=None),
        dict(attention=3),
        dict(mlp_ratio=0),
        dict(dropout=1.0),
        dict(activation="tanh"),
    ],
)
def test_block_bad_options_raise_value_error(bad):
    with pytest.raises(ValueError):
        RPETransformerBlock(24, 4, **bad)


def test_encoder_rejects_module_instance_and_bad_layers():
    with pytest.raises(ValueError, match="num_layers"):
        RPETransformerEncoder(0, 24, 4)
    with pytest.raises(ValueError, match="factory"):
        RPETransformerEncoder(2, 24, 4, attention=RPEAttention(24, 4))


@pytest.mark.parametrize(
    "kw",
    [
        dict(rpe="flt-kernel", pos_dim=3, mode="logit"),
        dict(rpe="flt-kernel", pos_dim=3, mode="mask"),
        dict(rpe="flt-radial", pos_dim=3, rpe_options={"rotation": "frame"}),
        dict(rpe=None),
        dict(rpe="rope", pos_dim=3, causal=True),
    ],
)
def test_exact_attention_forward_is_reference_with_same_state(kw):
    linear = RPEAttention(24, 4, num_features=16, **kw).to(D64)
    exact = ExactRPEAttention(24, 4, num_features=16, **kw).to(D64)
    exact.load_state_dict(linear.state_dict())
    x, pos, batch = packed([6, 1, 11])
    want = linear.reference(x, pos, batch, kernel="exact", rpe="exact")
    torch.testing.assert_close(exact(x, pos, batch), want, **TIGHT)  # padded internally
    torch.testing.assert_close(exact(x[:6], pos[:6]), want[:6], **TIGHT)  # one graph
    dense_x, mask = to_padded(x, batch)
    dense_pos = to_padded(pos, batch)[0]
    torch.testing.assert_close(
        exact(dense_x, dense_pos, key_padding_mask=mask),
        linear.reference(dense_x, dense_pos, key_padding_mask=mask, kernel="exact", rpe="exact"),
        **TIGHT,
    )
    # the linear estimate is not the exact target (the baseline is a different model)
    assert (linear(x, pos, batch) - want).abs().max() > 1e-6


def test_exact_attention_periodic_cell():
    kw = dict(rpe="flt-periodic", pos_dim=3, num_features=16)
    linear, exact = RPEAttention(24, 4, **kw).to(D64), ExactRPEAttention(24, 4, **kw).to(D64)
    exact.load_state_dict(linear.state_dict())
    x, pos, batch = packed([4, 7])
    cell = torch.diag_embed(torch.tensor([[3.0, 4.0, 5.0], [4.0, 4.0, 6.0]], dtype=D64))
    want = linear.reference(x, pos, batch, kernel="exact", rpe="exact", cell=cell)
    torch.testing.assert_close(exact(x, pos, batch, cell=cell), want, **TIGHT)


def test_use_reference_switches_every_block_and_restores():
    options = dict(rpe="flt-kernel", pos_dim=3, num_features=16)
    linear = RPETransformerEncoder(2, 24, 4, mlp_ratio=2, **options).to(D64)
    exact = RPETransformerEncoder(2, 24, 4, mlp_ratio=2, attention="exact", **options).to(D64)
    exact.load_state_dict(linear.state_dict())
    x, pos, batch = packed([5, 8])
    fast = linear(x, pos, batch)
    with use_reference(linear, kernel="features", rpe="features"):
        explicit = linear(x, pos, batch)
    torch.testing.assert_close(explicit, fast, **TIGHT)  # O(n^2) form of the same draws
    with use_reference(linear):
        target = linear(x, pos, batch)
    torch.testing.assert_close(exact(x, pos, batch), target, **TIGHT)
    assert (target - fast).abs().max() > 1e-6
    torch.testing.assert_close(linear(x, pos, batch), fast, atol=0, rtol=0)  # restored
    with pytest.raises(ValueError):
        with use_reference(linear, kernel="fast"):
            pass


def test_encoder_gradients_finite_and_redraw_changes_features():
    enc = RPETransformerEncoder(  # random features: FAVOR+ and Monte-Carlo frequencies
        2, 24, 4, rpe="flt-kernel", pos_dim=3, num_features=16, kernel="favor+",
        rpe_options={"frequencies": "mc"},
    )  # fmt: skip
    x, pos, batch = (t.float() if t.is_floating_point() else t for t in packed([5, 3]))
    x.requires_grad_(True)
    enc(x, pos, batch).square().sum().backward()
    grads = [p.grad for p in enc.parameters() if p.grad is not None] + [x.grad]
    assert len(grads) > 10 and all(torch.isfinite(g).all() for g in grads)
    before = enc(x, pos, batch).detach()
    enc.redraw(torch.Generator().manual_seed(5))
    assert (enc(x, pos, batch) - before).abs().max() > 1e-6


def test_pool_packed_equals_dense():
    x, _, batch = packed([3, 1, 5])
    dense, mask = to_padded(x, batch)
    dense = dense.masked_fill(mask[..., None], 7.0)  # padding must not count
    for reduce in ("sum", "mean", "max"):
        got = pool(x, batch, reduce=reduce)
        torch.testing.assert_close(got, pool(dense, key_padding_mask=mask, reduce=reduce))
        reducer = {"sum": torch.sum, "mean": torch.mean, "max": torch.amax}[reduce]
        want = torch.stack([reducer(x[batch == g], 0) for g in range(3)])
        torch.testing.assert_close(got, want)
    with pytest.raises(ValueError):
        pool(x, batch, reduce="median")


def test_read_batch_layouts():
    from torch_geometric.data import Batch, Data

    graphs = [
        Data(z=torch.tensor([1, 6]), pos=torch.randn(2, 3)),
        Data(z=torch.tensor([8]), pos=torch.randn(1, 3)),
    ]
    tokens = read_batch(Batch.from_data_list(graphs), ("z", "pos"))
    assert not tokens.dense and tokens.num_graphs == 2 and tokens.batch.tolist() == [0, 0, 1]
    one = read_batch(graphs[0], ("z", "pos"))
    assert one.batch.tolist() == [0, 0] and one.num_graphs == 1
    padded = {
        "z": torch.ones(2, 3, dtype=torch.long),
        "pos": torch.randn(2, 3, 3),
        "key_padding_mask": torch.zeros(2, 3, dtype=torch.bool),
    }
    dense = read_batch(padded, ("z", "pos"))
    assert dense.dense and dense.num_graphs == 2
    with pytest.raises(ValueError, match="'x'"):
        read_batch(graphs[0], ("x",))


def test_block_is_a_module_with_reset():
    layer = block()
    before = {k: v.clone() for k, v in layer.state_dict().items()}
    for p in layer.parameters():
        nn.init.constant_(p, 0.3)
    layer.reset_parameters()
    changed = [k for k, v in layer.state_dict().items() if not torch.equal(v, before[k])]
    assert any("mlp" in k for k in changed) and any("qkv" in k for k in changed)
