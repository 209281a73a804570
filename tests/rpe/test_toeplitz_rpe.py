"""ToeplitzRPE through RPEAttention: the FFT path equals the O(n^2) reference (float64,
1e-10) dense/padded/packed, 1D/2D, causal; geometric contracts; the bias is learned;
the lookup table; bad positions and options."""

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.ops import MaskMode
from geolinrpe.rpe import ShiftInvariantKernelRPE
from geolinrpe.rpe.toeplitz import ToeplitzRPE
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_translation_invariant,
)

D64 = torch.float64
EMBED, HEADS = 24, 2


def layer(pos_dim=1, max_offset=130, kernel="elu", causal=False, dtype=D64, **kw):
    rpe = ToeplitzRPE(pos_dim, HEADS, max_offset=max_offset)
    attn = RPEAttention(EMBED, HEADS, rpe=rpe, mode="mask", kernel=kernel, causal=causal, **kw)
    with torch.no_grad():
        rpe.bias.normal_()  # a non-neutral mask (zero init is plain linear attention)
    return attn.to(dtype)


def sequences(b, n, gaps=False):
    """1D positions ``[b, n, 1]``: consecutive indices (or increasing with gaps), offset."""
    steps = torch.randint(1, 3, (b, n)) if gaps else torch.ones(b, n, dtype=torch.long)
    return (steps.cumsum(1) + 40).to(D64)[..., None]


def patches(b, rows, cols):
    """2D patch grid ``[b, rows * cols, 2]`` of (row, col), tokens in a random order."""
    grid = torch.stack(torch.meshgrid(torch.arange(rows), torch.arange(cols), indexing="ij"), -1)
    return torch.stack([grid.reshape(-1, 2)[torch.randperm(rows * cols)] for _ in range(b)]).to(D64)


def packed(sizes, pos_fn):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = torch.cat([pos_fn(n) for n in sizes])
    return torch.randn(len(batch), EMBED, dtype=D64), pos, batch


def close(a, b):
    torch.testing.assert_close(a, b, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("kernel", ["elu", "favor+"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 63])
def test_1d_forward_equals_reference_dense_padded_and_packed(kernel, causal, n):
    attn = layer(kernel=kernel, causal=causal)
    x, pos = torch.randn(2, n, EMBED, dtype=D64), sequences(2, n, gaps=True)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 3 + 1 :] = True
    fast = attn(x, pos, key_padding_mask=mask)
    close(fast, attn.reference(x, pos, key_padding_mask=mask, rpe="exact"))
    if kernel == "elu":  # ELU+1 features are the exact kernel
        close(fast, attn.reference(x, pos, key_padding_mask=mask, kernel="exact", rpe="exact"))
    xp, pp, batch = packed([n, 5, 1], lambda m: sequences(1, m, gaps=True)[0])
    close(attn(xp, pp, batch), attn.reference(xp, pp, batch, rpe="exact"))


@pytest.mark.parametrize("kernel", ["elu", "favor+"])
def test_2d_patch_grid_equals_reference_dense_padded_and_packed(kernel):
    attn = layer(pos_dim=2, max_offset=(6, 8), kernel=kernel)
    x, pos = torch.randn(2, 63, EMBED, dtype=D64), patches(2, 7, 9)
    mask = torch.zeros(2, 63, dtype=torch.bool)
    mask[1, 40:] = True  # the second image keeps a random subset of its patches
    close(
        attn(x, pos, key_padding_mask=mask),
        attn.reference(x, pos, key_padding_mask=mask, rpe="exact"),
    )
    xp, pp, batch = packed([12, 63, 4], lambda m: patches(1, 7, 9)[0, :m])
    close(attn(xp, pp, batch), attn.reference(xp, pp, batch, rpe="exact"))


@pytest.mark.parametrize("kernel", ["elu", "favor+"])
def test_attend_equals_reference_attention_hook_for_either_rpe_option(kernel):
    attn = layer(pos_dim=2, max_offset=(6, 8), kernel=kernel)
    rpe, feat = attn.rpe, attn.featurizer
    q, k, v = (torch.randn(2, 30, HEADS, 12, dtype=D64) for _ in range(3))
    pos = patches(2, 6, 5)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[0, 17:] = True
    fast = rpe.attend(q, k, v, pos, featurizer=feat, key_padding_mask=mask)
    for which in ("features", "exact"):
        slow = rpe.reference_attention(
            q,
            k,
            v,
            pos,
            featurizer=feat,
            mode="mask",
            normalize="masked",
            kernel="features",
            rpe=which,
            key_padding_mask=mask,
        )
        close(fast, slow)


def test_unnormalised_attention_equals_reference():
    attn = layer(normalize="none")
    x, pos = torch.randn(2, 30, EMBED, dtype=D64), sequences(2, 30)
    close(attn(x, pos), attn.reference(x, pos, kernel="exact", rpe="exact"))


def test_zero_init_is_plain_linear_attention():
    attn = layer()
    plain = RPEAttention(EMBED, HEADS, mode="mask", kernel="elu", normalize="masked").to(D64)
    plain.load_state_dict({k: v for k, v in attn.state_dict().items() if not k.startswith("rpe")})
    attn.rpe.reset_parameters()
    x, pos = torch.randn(2, 20, EMBED, dtype=D64), sequences(2, 20, gaps=True)
    close(attn(x, pos), plain(x))


@pytest.mark.parametrize("causal", [False, True])
def test_padding_permutation_and_integer_translation(causal):
    attn = layer(causal=causal)
    x, pos, batch = packed([7, 1, 12, 3], lambda m: sequences(1, m, gaps=True)[0])
    # padded slots get random non-integer positions: they must be ignored
    assert_padding_consistent(attn, x, pos, batch, atol=1e-10, rtol=1e-10)
    shift = torch.tensor([13.0], dtype=D64)
    assert_translation_invariant(attn, x, pos, shift=shift, batch=batch, atol=1e-10, rtol=1e-10)
    if not causal:
        assert_permutation_equivariant(attn, x, pos, batch=batch, atol=1e-10, rtol=1e-10)
        uncentred = layer(pos_dim=2, max_offset=8, center_positions=False)
        xi, pi = torch.randn(2, 20, EMBED, dtype=D64), patches(2, 4, 5)
        shift2 = torch.tensor([-300.0, 1000.0], dtype=D64)
        assert_translation_invariant(uncentred, xi, pi, shift=shift2, atol=1e-10, rtol=1e-10)


def test_gradients_reach_the_bias_and_match_the_reference():
    attn = layer(pos_dim=2, max_offset=4)
    x, pos = torch.randn(2, 20, EMBED, dtype=D64), patches(2, 4, 5)
    weights = torch.randn(2, 20, EMBED, dtype=D64)
    grads = []
    for run in (attn, lambda *a: attn.reference(*a, rpe="exact")):
        attn.zero_grad()
        (run(x, pos) * weights).sum().backward()
        grads.append({name: p.grad.clone() for name, p in attn.named_parameters()})
    assert grads[0]["rpe.bias"].abs().sum() > 0
    assert grads[0]["rpe.bias"][:, 4:, 5:].abs().sum() > 0  # positive (row, col) offsets too
    for name in grads[0]:
        close(grads[0][name], grads[1][name])


def test_lookup_table_and_pairwise():
    rpe = ToeplitzRPE(2, 3, max_offset=(2, 3)).double()
    assert rpe.bias.shape == (3, 5, 7)
    with torch.no_grad():
        rpe.bias.copy_(torch.randn(3, 5, 7))
    delta = torch.tensor([[0.0, 0.0], [1.0, -3.0], [-2.0, 2.0], [3.0, 0.0]], dtype=D64)
    want = torch.stack(
        [rpe.bias[:, 2, 3].exp(), rpe.bias[:, 3, 0].exp(), rpe.bias[:, 0, 5].exp(), torch.zeros(3)]
    )
    close(rpe.closed_form(delta), want)
    pos = torch.tensor([[[0.0, 0.0], [1.0, -1.0]]], dtype=D64)
    pair = rpe.pairwise(pos)
    assert pair.shape == (1, 3, 2, 2)
    close(pair[0, :, 1, 0], rpe.bias[:, 3, 2].exp())  # r_1 - r_0 = (1, -1)
    with pytest.raises(ValueError, match="pos"):
        rpe.pairwise(pos + torch.tensor([0.0, 0.5], dtype=D64) * torch.tensor([[[0], [1]]]))


def test_bad_positions_and_options_name_the_culprit():
    attn = layer(max_offset=9)
    x = torch.randn(1, 8, EMBED, dtype=D64)
    with pytest.raises(ValueError, match="pos"):
        attn(x, sequences(1, 8) + 0.25)  # not integers
    with pytest.raises(ValueError, match="pos"):
        attn(x, sequences(1, 8) * 2)  # spans 15 cells > max_offset + 1
    causal = layer(causal=True)
    with pytest.raises(ValueError, match="pos"):
        causal(x, sequences(1, 8).flip(1))  # causal needs increasing positions
    rpe = layer(pos_dim=2, max_offset=4).rpe
    q = k = v = torch.randn(1, 8, HEADS, 12, dtype=D64)
    pos = patches(1, 2, 4)
    feat = rpe.featurizer(layer().feature_map, 1.0, "mask")
    with pytest.raises(ValueError, match="causal"):
        rpe.attend(q, k, v, pos, featurizer=feat, causal=True)
    with pytest.raises(ValueError, match="normalize"):
        rpe.attend(q, k, v, pos, featurizer=feat, normalize="kernel")
    with pytest.raises(ValueError, match="chunk_size"):
        rpe.attend(q, k, v, pos, featurizer=feat, chunk_size=0)
    with pytest.raises(ValueError, match="windows"):
        rpe.attend(q, k, v, pos, featurizer=feat, windows=3)
    with pytest.raises(ValueError, match="featurizer"):
        masked = MaskMode(feat.feature_map, ShiftInvariantKernelRPE(2, HEADS).double())
        rpe.attend(q, k, v, pos, featurizer=masked)
    with pytest.raises(ValueError, match="mode"):
        RPEAttention(EMBED, HEADS, rpe=ToeplitzRPE(1, HEADS, 5), mode="logit")
    with pytest.raises(ValueError, match="normalize"):
        RPEAttention(EMBED, HEADS, rpe=ToeplitzRPE(1, HEADS, 5), mode="mask", normalize="kernel")
    with pytest.raises(ValueError, match="max_offset"):
        ToeplitzRPE(2, HEADS, max_offset=(3,))
    with pytest.raises(ValueError, match="max_offset"):
        ToeplitzRPE(1, HEADS, max_offset=-1)


def test_bfloat16_layer_runs_in_float32():
    attn = layer(dtype=torch.float32)
    x, pos = torch.randn(2, 16, EMBED), sequences(2, 16).float()
    want = attn(x, pos)
    out = attn.to(torch.bfloat16)(x.bfloat16(), pos.bfloat16())
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), want, atol=0.1, rtol=0.05)
