"""The FFT Toeplitz operator equals its O(n^2) reference (float32 1e-6, float64 1e-10) in
outputs and gradients, 1D/2D/3D grids, partial grids, padding, causal; hand-computed weights
pin the offset convention; stabilisation, dtypes and bad input."""

import pytest
import torch
import torch.nn.functional as F

from geolinrpe.ops.toeplitz import toeplitz_attention, toeplitz_reference

D64 = torch.float64
TOL = {torch.float32: dict(atol=1e-6, rtol=1e-5), D64: dict(atol=1e-10, rtol=1e-10)}


def features(b, n, h, r, e, dtype=D64):
    phi_q = F.elu(torch.randn(b, n, h, r, dtype=dtype)) + 1
    phi_k = F.elu(torch.randn(b, n, h, r, dtype=dtype)) + 1
    return phi_q, phi_k, torch.randn(b, n, h, e, dtype=dtype)


def cells(grid_shape, b, n, order="permuted"):
    """``[b, n, p]`` grid cells: a permutation of the grid's first n cells, a sorted subset
    (``"sorted"``, strictly increasing in 1D) or random cells with repeats (``"random"``)."""
    total = 1
    for size in grid_shape:
        total *= size
    rows = []
    for _ in range(b):
        if order == "random":
            flat = torch.randint(0, total, (n,))
        else:
            flat = torch.randperm(total)[:n]
            flat = flat.sort().values if order == "sorted" else flat
        rows.append(torch.stack(torch.unravel_index(flat, grid_shape), -1))
    return torch.stack(rows)


def run_both(*args, **kw):
    return toeplitz_attention(*args, **kw), toeplitz_reference(*args, **kw)


# (grid_shape, tokens, cell order, causal, offset-table half-widths beyond the grid)
GRIDS = [
    ((1,), 1, "permuted", False, 0),
    ((63,), 63, "permuted", False, 0),
    ((63,), 63, "sorted", True, 0),
    ((40,), 17, "sorted", True, 5),  # partial grid, larger bias table
    ((30,), 25, "random", False, 2),  # partial grid with shared cells
    ((7, 9), 63, "permuted", False, 0),
    ((6, 11), 30, "random", False, 3),
    ((3, 4, 5), 20, "permuted", False, 1),
]


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("grid_shape,n,order,causal,extra", GRIDS)
@pytest.mark.parametrize("normalize", ["masked", "none"])
def test_fft_matches_quadratic_reference(dtype, grid_shape, n, order, causal, extra, normalize):
    b, h = 3, 2
    phi_q, phi_k, v = features(b, n, h, 6, 5, dtype)
    bias = torch.randn((h,) + tuple(2 * (s + extra) - 1 for s in grid_shape), dtype=dtype)
    grid_pos = cells(grid_shape, b, n, order)
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, n // 2 + 1 :] = True
    mask[2, : n // 3] = True
    grid_pos[mask] = 10**6  # padded tokens' cells are ignored, even out of range
    log_scale = torch.randn(b, n, h, dtype=dtype)
    fast, slow = run_both(
        phi_q,
        phi_k,
        v,
        bias,
        grid_pos,
        grid_shape,
        query_log_scale=log_scale.flip(1),
        key_log_scale=log_scale,
        key_padding_mask=mask,
        causal=causal,
        normalize=normalize,
    )
    assert fast.dtype == dtype and fast.shape == v.shape
    assert bool((fast[mask] == 0).all())
    # unnormalised sums are signed and unbounded: compare relative to their scale
    scale = 1.0 if normalize == "masked" else slow.abs().amax()
    torch.testing.assert_close(fast / scale, slow / scale, **TOL[dtype])


@pytest.mark.parametrize("grid_shape,causal", [((9,), False), ((9,), True), ((3, 4), False)])
def test_gradients_of_every_input_match_reference(grid_shape, causal):
    b, n, h = 2, 8, 2
    phi_q, phi_k, v = features(b, n, h, 4, 3)
    bias = torch.randn((h,) + tuple(2 * s + 1 for s in grid_shape), dtype=D64)
    log_scale = torch.randn(b, n, h, dtype=D64)
    grid_pos = cells(grid_shape, b, n, "sorted")
    mask = torch.zeros(b, n, dtype=torch.bool)
    mask[1, 5:] = True
    grads = []
    for fn in (toeplitz_attention, toeplitz_reference):
        leaves = [t.clone().requires_grad_() for t in (phi_q, phi_k, v, bias, log_scale)]
        out = fn(
            *leaves[:4],
            grid_pos,
            grid_shape,
            key_log_scale=leaves[4],
            key_padding_mask=mask,
            causal=causal,
        )
        (out * torch.linspace(-1, 1, out.numel(), dtype=D64).view_as(out)).sum().backward()
        grads.append([t.grad for t in leaves])
    for fast, slow in zip(*grads, strict=True):
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    assert grads[0][3].abs().sum() > 0  # the bias is learned


@pytest.mark.parametrize(
    "grid_shape,causal,normalize",
    [((5,), False, "masked"), ((5,), True, "none"), ((2, 3), False, "masked")],
)
def test_gradcheck_features_values_and_bias(grid_shape, causal, normalize):
    b, n, h = 1, 4, 1
    phi_q, phi_k, v = features(b, n, h, 2, 2)
    bias = torch.randn((h,) + tuple(2 * s - 1 for s in grid_shape), dtype=D64)
    grid_pos = cells(grid_shape, b, n, "sorted")

    def attend(phi_q, phi_k, v, bias):
        return toeplitz_attention(
            phi_q, phi_k, v, bias, grid_pos, grid_shape, causal=causal, normalize=normalize
        )

    leaves = [t.requires_grad_() for t in (phi_q, phi_k, v, bias)]
    assert torch.autograd.gradcheck(attend, leaves)


def test_offset_convention_by_hand():
    """Query at cell 1 sees the key at cell 0 through b[+1] and itself through b[0]."""
    phi = torch.ones(1, 2, 1, 1, dtype=D64)
    v = torch.tensor([10.0, 20.0], dtype=D64).view(1, 2, 1, 1)
    bias = torch.log(torch.tensor([[5.0, 1.0, 3.0]], dtype=D64))  # offsets -1, 0, +1
    grid_pos = torch.tensor([[[0], [1]]])
    for fn in (toeplitz_attention, toeplitz_reference):
        out = fn(phi, phi, v, bias, grid_pos, (2,)).flatten()
        want = torch.tensor([(10 + 5 * 20) / 6, (3 * 10 + 20) / 4], dtype=D64)
        torch.testing.assert_close(out, want, atol=1e-12, rtol=1e-12)
        causal = fn(phi, phi, v, bias, grid_pos, (2,), causal=True).flatten()
        torch.testing.assert_close(causal, torch.tensor([10.0, 12.5], dtype=D64))


def test_zero_bias_is_plain_linear_attention():
    phi_q, phi_k, v = features(2, 31, 3, 5, 4)
    bias = torch.zeros(3, 2 * 40 - 1, dtype=D64)
    out = toeplitz_attention(phi_q, phi_k, v, bias, cells((40,), 2, 31), (40,))
    num = torch.einsum("bihr,bjhr,bjhe->bihe", phi_q, phi_k, v)
    den = torch.einsum("bihr,bjhr->bih", phi_q, phi_k)
    torch.testing.assert_close(out, num / den[..., None], atol=1e-12, rtol=1e-12)


def test_causal_ignores_future_tokens_and_translation_of_the_grid():
    phi_q, phi_k, v = features(1, 20, 2, 4, 3)
    bias = torch.randn(2, 2 * 30 - 1, dtype=D64)
    grid_pos = cells((25,), 1, 20, "sorted")
    out = toeplitz_attention(phi_q, phi_k, v, bias, grid_pos, (25,), causal=True)
    _, k_new, v_new = features(1, 20, 2, 4, 3)
    k2, v2 = torch.cat([phi_k[:, :12], k_new[:, 12:]], 1), torch.cat([v[:, :12], v_new[:, 12:]], 1)
    changed = toeplitz_attention(phi_q, k2, v2, bias, grid_pos, (25,), causal=True)
    # the future only enters through FFT rounding, relative to the largest sums
    torch.testing.assert_close(changed[:, :12], out[:, :12], atol=1e-10, rtol=1e-10)
    assert not torch.allclose(changed[:, 12:], out[:, 12:])
    shifted = grid_pos + 4 - grid_pos.min()  # same offsets, other cells of a larger grid
    moved = toeplitz_attention(phi_q, phi_k, v, bias, shifted, (30,), causal=True)
    torch.testing.assert_close(moved, out, atol=1e-10, rtol=1e-10)


def test_large_log_scales_and_bias_are_stabilised_in_float32():
    phi_q, phi_k, v = features(2, 16, 2, 4, 3, torch.float32)
    # multiples of 1/64, so that adding 500 or 800 is exact in float32
    bias = (torch.randn(2, 31) * 64).round() / 64
    grid_pos = cells((16,), 2, 16)
    log_scale = (torch.randn(2, 16, 2) * 64).round() / 64
    base = toeplitz_attention(phi_q, phi_k, v, bias, grid_pos, (16,), key_log_scale=log_scale)
    big = toeplitz_attention(
        phi_q, phi_k, v, bias + 500.0, grid_pos, (16,), key_log_scale=log_scale + 800.0
    )  # exp(1300) overflows float32 and float64; both constants cancel in the ratio
    assert bool(torch.isfinite(big).all())
    torch.testing.assert_close(big, base, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_inputs_are_computed_in_float32(dtype):
    phi_q, phi_k, v = features(1, 12, 2, 4, 3, torch.float32)
    phi_q, phi_k, v = (t.to(dtype) for t in (phi_q, phi_k, v))
    bias = torch.randn(2, 23)
    grid_pos = cells((12,), 1, 12)
    out = toeplitz_attention(phi_q, phi_k, v, bias, grid_pos, (12,))
    want = toeplitz_reference(phi_q.float(), phi_k.float(), v.float(), bias, grid_pos, (12,))
    assert out.dtype == dtype
    torch.testing.assert_close(out.float(), want, atol=1e-2, rtol=1e-2)


def test_bad_input_names_the_argument():
    phi_q, phi_k, v = features(1, 4, 2, 3, 2)
    bias, grid_pos = torch.zeros(2, 9, dtype=D64), torch.arange(4).view(1, 4, 1)
    args = (phi_q, phi_k, v, bias, grid_pos, (5,))

    def fails(match, *a, **kw):
        with pytest.raises(ValueError, match=match):
            toeplitz_attention(*(a or args), **kw)

    fails("normalize", normalize="kernel")
    fails("causal", causal=1)
    fails(
        "causal",
        phi_q,
        phi_k,
        v,
        torch.zeros(2, 9, 9, dtype=D64),
        torch.zeros(1, 4, 2, dtype=torch.long),
        (5, 5),
        causal=True,
    )
    fails("bias", phi_q, phi_k, v, torch.zeros(2, 7, dtype=D64), grid_pos, (5,))
    fails("bias", phi_q, phi_k, v, torch.zeros(3, 9, dtype=D64), grid_pos, (5,))
    fails("grid_pos", phi_q, phi_k, v, bias, grid_pos + 2, (5,))
    fails("grid_pos", phi_q, phi_k, v, bias, grid_pos.double(), (5,))
    fails("grid_shape", phi_q, phi_k, v, bias, grid_pos, 5)
    fails("phi_k", phi_q, phi_k[:, :3], v, bias, grid_pos, (5,))
    fails("v", phi_q, phi_k, v[:, :3], bias, grid_pos, (5,))
    fails("key_log_scale", key_log_scale=torch.zeros(1, 4, dtype=D64))
    fails("key_padding_mask", key_padding_mask=torch.zeros(1, 4))
