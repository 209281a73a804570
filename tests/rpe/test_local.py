"""LocalRPE: the smoothed window, its sampler and weights, normalisation, gradients, layer."""

import math

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.features import ELUFeatures
from geolinrpe.ops.linear import linear_attention
from geolinrpe.rpe.local import LocalRPE
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64


def test_closed_form_is_the_smoothed_window_and_the_transform_of_g():
    rpe = LocalRPE(1, 2, 8, half_width=1.5, amplitude=-0.7, softness=0.1).double()
    with torch.no_grad():
        rpe.log_half_width[1] = math.log(3.0)
        rpe.amplitude[1] = 2.0
    a, c = torch.tensor([1.5, 3.0], dtype=D64), torch.tensor([-0.7, 2.0], dtype=D64)
    tau = 0.1 * a
    delta = torch.linspace(-8, 8, 800, dtype=D64)[:, None]  # no lag exactly on an edge
    smooth, hard = rpe.closed_form(delta), rpe.hard_window(delta)
    torch.testing.assert_close(hard, c * (delta.abs() <= a))
    # the hard window, up to |c| Phi(-4) = 3.2e-5 |c|, at least 4 tau from the edges
    far = ((delta.abs() - a).abs() >= 4 * tau).to(D64)
    assert ((smooth - hard).abs() * far).max() <= 3.2e-5 * c.abs().max()
    torch.testing.assert_close(rpe.closed_form(a[:, None])[[0, 1], [0, 1]], c / 2)  # edges
    # f(Delta) = int g(xi) cos(2 pi xi Delta) dxi (Riemann sum; g decays like a Gaussian)
    xi = torch.linspace(-12, 12, 24001, dtype=D64)
    g = rpe.spectral_density(xi.expand(2, -1))  # [h, n]
    lags = delta[::40]
    riemann = torch.cos(2 * math.pi * lags * xi) @ g.T * (xi[1] - xi[0])
    torch.testing.assert_close(rpe.closed_form(lags), riemann, atol=1e-10, rtol=0)


def test_weights_are_g_over_p_bounded_and_independent_of_the_width():
    rpe = LocalRPE(1, 2, 5000, half_width=2.0, amplitude=1.3, softness=0.2).double()
    xi, weight = rpe.spectrum()
    tau = 0.2 * 2.0
    proposal = math.sqrt(2 * math.pi) * tau * torch.exp(-2 * math.pi**2 * tau**2 * xi[..., 0] ** 2)
    torch.testing.assert_close(weight, rpe.spectral_density(xi[..., 0]) / proposal)
    assert weight.abs().max() <= 1.3 * math.sqrt(2 / math.pi) / 0.2
    assert weight.min() < 0  # signed
    with torch.no_grad():
        rpe.log_half_width.fill_(math.log(7.0))
    xi_wide, weight_wide = rpe.spectrum()
    torch.testing.assert_close(weight_wide, weight)  # reparametrised: only xi moves with a
    torch.testing.assert_close(xi_wide * 7.0, xi * 2.0)


def test_monte_carlo_converges_at_the_inverse_sqrt_rate_and_its_mean_is_the_window():
    """RMSE over 128 draws (heads) x 81 lags in [-3a, 3a], edges included (f is smooth).

    Measured at m = 8 / 32 / 128 / 512 (a = 1.5, c = 1, softness = 0.2): 0.51 / 0.25 /
    0.12 / 0.059 (slope -0.51), i.e. 1.33-1.45 c / sqrt(m), within the bound
    sqrt(0.8 / (softness m)) = 2 c / sqrt(m)."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.linspace(-4.5, 4.5, 81, dtype=D64)[:, None]
    rmse, mean = {}, None
    for m in (8, 32, 128, 512):
        rpe = LocalRPE(1, 128, m, half_width=1.5).double()
        rpe.redraw(gen)
        estimate = rpe.estimate(delta)  # [81, 128]
        rmse[m] = (estimate - rpe.closed_form(delta)).pow(2).mean().sqrt().item()
        mean = estimate.mean(-1)
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.6 < rmse[small] / rmse[big] < 2.4, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.06, slope
    # mean over 128 x 512 frequencies: the hard window away from the edges (std ~ 0.006)
    far = (delta[:, 0].abs() - 1.5).abs() >= 4 * 0.2 * 1.5
    hard = (delta[:, 0].abs() <= 1.5).to(D64)
    assert (mean - hard)[far].abs().max() < 0.03


def test_gradients_reach_width_and_height():
    rpe = LocalRPE(1, 3, 16, half_width=2.0, amplitude=0.5).double()
    pos = torch.randn(7, 1, dtype=D64) * 3
    psi = rpe.query_features(pos), rpe.key_features(pos, "symmetric")
    (psi[0].sum() + psi[1].pow(2).sum()).backward()
    for param in (rpe.log_half_width, rpe.amplitude):
        assert torch.isfinite(param.grad).all() and param.grad.abs().min() > 0
    rpe.zero_grad()
    rpe.closed_form(torch.tensor([[0.0], [1.9], [2.2]], dtype=D64)).sum().backward()
    assert rpe.log_half_width.grad.abs().min() > 0 and rpe.amplitude.grad.abs().min() > 0
    # d f_hat / d a by autograd == finite differences
    delta = torch.tensor([[0.7], [2.5]], dtype=D64)

    def estimate(log_a):
        with torch.no_grad():
            rpe.log_half_width.fill_(log_a)
        return rpe.estimate(delta).sum().item()

    h = 1e-6
    numeric = (estimate(math.log(2.0) + h) - estimate(math.log(2.0) - h)) / (2 * h)
    rpe.zero_grad()
    rpe.log_half_width.data.fill_(math.log(2.0))
    rpe.estimate(delta).sum().backward()
    assert rpe.log_half_width.grad.sum().item() == pytest.approx(numeric, rel=1e-6)


def test_kernel_normalisation_is_bounded_and_the_masked_one_is_not():
    """normalize="kernel": |out_i| <= max_j |f_hat_ij| max_j |v_j|; masked denominators < 0."""
    gen = torch.Generator().manual_seed(3)
    rpe = LocalRPE(1, 2, 16, half_width=1.0).double()
    rpe.redraw(gen)
    featurizer = rpe.featurizer(ELUFeatures(8), 1.0, "mask")  # positive kernel features
    q, k, v = (torch.randn(1, 64, 2, 8, dtype=D64, generator=gen) for _ in range(3))
    pos = 40 * torch.rand(1, 64, 1, dtype=D64, generator=gen)  # most pairs outside the window
    out = linear_attention(q, k, v, pos, featurizer=featurizer, normalize="kernel")
    f_hat = rpe.pairwise(pos)  # [b, h, i, j]
    bound = f_hat.abs().amax(-1).transpose(1, 2)[..., None] * v.abs().amax(1, keepdim=True)
    assert (out.abs() <= bound + 1e-12).all()
    ones = torch.ones_like(v[..., :1])
    den = linear_attention(q, k, ones, pos, featurizer=featurizer, normalize="none")
    assert (den < 0).float().mean() > 0.1  # the masked denominator changes sign
    masked = linear_attention(q, k, v, pos, featurizer=featurizer, normalize="masked")
    assert masked.abs().max() > 10 * v.abs().max()


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (dict(pos_dim=2), "pos_dim"),
        (dict(pos_dim=0), "pos_dim"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_frequencies=0), "num_frequencies"),
        (dict(half_width=0.0), "half_width"),
        (dict(softness=0.0), "softness"),
    ]
    for kwargs, match in cases:
        options = dict(pos_dim=1, num_heads=2)
        options.update(kwargs)
        with pytest.raises(ValueError, match=match):
            LocalRPE(**options)


def _assert_layer_matches_reference(rpe, mode):
    """forward == explicit-feature reference (dense + packed), translation invariance (mask)."""
    heads, p = rpe.num_heads, rpe.pos_dim
    attn = RPEAttention(6 * heads, heads, rpe=rpe, mode=mode, num_features=16, chunk_size=8)
    attn = attn.double()
    x, pos = torch.randn(2, 13, 6 * heads, dtype=D64), torch.randn(2, 13, p, dtype=D64) * 2
    mask = torch.zeros(2, 13, dtype=torch.bool)
    mask[1, 9:] = True
    torch.testing.assert_close(
        attn(x, pos, key_padding_mask=mask),
        attn.reference(x, pos, key_padding_mask=mask),
        atol=1e-10,
        rtol=1e-10,
    )
    batch = torch.tensor([0] * 5 + [1] + [2] * 9)
    xp, pp = torch.randn(15, 6 * heads, dtype=D64), torch.randn(15, p, dtype=D64) * 2
    torch.testing.assert_close(
        attn(xp, pp, batch), attn.reference(xp, pp, batch), atol=1e-10, rtol=1e-10
    )
    if mode == "mask":
        attn.center_positions = False
        shift = torch.linspace(7.0, -5.0, p, dtype=D64)
        assert_translation_invariant(attn, xp, pp, shift=shift, batch=batch, atol=1e-9, rtol=1e-9)


@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_through_the_attention_layer(mode):
    rpe = LocalRPE(1, 2, 12, half_width=1.5, amplitude=0.8)
    _assert_layer_matches_reference(rpe, mode)
