"""GaussianMixtureRPE: closed form, both samplers, their weights, gradients, options, layer."""

import math

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe.mixture import GaussianMixtureRPE
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64


def _set_mixture(rpe, weights, means, sigma):
    """Give every head the same mixture (``[K]``, ``[K, p]``, ``[K]``)."""
    with torch.no_grad():
        rpe.mixture_weights.copy_(weights)
        rpe.mixture_means.copy_(means)
        if rpe.sampler == "mixture":
            rpe.raw_mixture_scales.copy_(sigma.log())
        else:
            ratio = sigma / rpe.sigma_max
            rpe.raw_mixture_scales.copy_((ratio / (1 - ratio)).log())
    torch.testing.assert_close(rpe.mixture_scales, sigma.expand_as(rpe.mixture_scales))


def _random_mixture(pos_dim, components, gen):
    weights = torch.randn(components, dtype=D64, generator=gen)  # signed
    means = 0.5 * torch.randn(components, pos_dim, dtype=D64, generator=gen)
    sigma = 0.3 + 0.5 * torch.rand(components, dtype=D64, generator=gen)  # below s = 1
    return weights, means, sigma


def test_closed_form_is_the_fourier_transform_of_g():
    """Re f(Delta) = int g(xi) cos(2 pi xi . Delta) dxi by a Riemann sum on a fine grid (p = 2)."""
    gen = torch.Generator().manual_seed(1)
    rpe = GaussianMixtureRPE(2, 1, 8, num_components=3).double()
    _set_mixture(rpe, *_random_mixture(2, 3, gen))
    axis = torch.linspace(-6, 6, 481, dtype=D64)
    grid = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1).reshape(-1, 2)
    density = rpe.spectral_density(grid[None])[0]  # [n]
    delta = torch.tensor([[0.0, 0.0], [0.3, -0.2], [1.0, 0.5]], dtype=D64)
    riemann = (density * torch.cos(2 * math.pi * delta @ grid.T)).sum(-1) * (axis[1] - axis[0]) ** 2
    torch.testing.assert_close(rpe.closed_form(delta)[:, 0], riemann, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(rpe.closed_form(delta[:1])[0], rpe.component_masses().sum(-1))


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("sampler", ["mixture", "proposal"])
def test_both_samplers_converge_at_the_inverse_sqrt_rate(sampler, pos_dim):
    """RMSE of f_hat - f over 128 draws (heads) x 100 lags, K = 4 signed components.

    Measured at m = 8 / 32 / 128 / 512 (rms of f itself 0.18-0.29): mixture sampler
    0.57-1.9 / 0.28-0.98 / 0.14-0.49 / 0.07-0.24, proposal sampler 0.50-2.0 / 0.27-1.05 /
    0.13-0.52 / 0.07-0.26 over p = 1, 2, 3 (log-log slopes -0.48..-0.51). With signed
    weights both pay for the cancellation: the variance scales with (sum_k |W_k|)^2."""
    gen = torch.Generator().manual_seed(10 + pos_dim)
    mixture = _random_mixture(pos_dim, 4, gen)
    delta = torch.randn(100, pos_dim, dtype=D64, generator=gen)
    rmse = {}
    for m in (8, 32, 128, 512):
        rpe = GaussianMixtureRPE(pos_dim, 128, m, num_components=4, sampler=sampler).double()
        _set_mixture(rpe, *mixture)
        rpe.redraw(gen)
        rmse[m] = (rpe.estimate(delta) - rpe.closed_form(delta)).pow(2).mean().sqrt().item()
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.6 < rmse[small] / rmse[big] < 2.4, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.06, slope


@pytest.mark.parametrize("num_frequencies", [12, 14])
def test_mixture_sampler_weights_are_constant_per_component(num_frequencies):
    """a_l = (m / m_k) W_k: K W_k when K divides m; remainder draws go to the first components."""
    gen = torch.Generator().manual_seed(2)
    rpe = GaussianMixtureRPE(3, 2, num_frequencies, num_components=4).double()
    _set_mixture(rpe, *_random_mixture(3, 4, gen))
    xi, weight = rpe.spectrum()
    masses = rpe.component_masses()  # [h, K]
    counts = [num_frequencies // 4 + (k < num_frequencies % 4) for k in range(4)]
    for k in range(4):
        mine = torch.arange(num_frequencies) % 4 == k
        assert int(mine.sum()) == counts[k]
        want = num_frequencies / counts[k] * masses[:, k : k + 1].expand(2, counts[k])
        torch.testing.assert_close(weight[:, mine], want, atol=1e-14, rtol=1e-14)
        # xi = mu_k + sigma_k eps / sqrt(2)
        sigma = rpe.mixture_scales[:, k, None, None]
        noise = (xi[:, mine] - rpe.mixture_means[:, k, None]) * math.sqrt(2) / sigma
        torch.testing.assert_close(noise, rpe.base_noise[:, mine])
    # stratification makes f_hat(0) = f(0) for every draw
    zero = torch.zeros(1, 3, dtype=D64)
    torch.testing.assert_close(rpe.estimate(zero), rpe.closed_form(zero), atol=1e-13, rtol=1e-13)


def test_proposal_sampler_weights_are_g_over_p_and_bounded():
    gen = torch.Generator().manual_seed(3)
    s = 0.8
    rpe = GaussianMixtureRPE(2, 1, 4000, num_components=3, sampler="proposal", proposal_scale=s)
    rpe = rpe.double()
    weights, means, _ = _random_mixture(2, 3, gen)
    # widths close to sigma_max = s: the largest ratio g/p allowed
    _set_mixture(rpe, weights, 2 * means, torch.tensor([0.79, 0.5, 0.7], dtype=D64))
    xi, weight = rpe.spectrum()
    proposal = torch.exp(-xi.pow(2).sum(-1) / (2 * s**2)) / (2 * math.pi * s**2)
    torch.testing.assert_close(weight, rpe.spectral_density(xi) / proposal)
    sigma = rpe.mixture_scales[0]
    bound = (
        weights.abs()
        * (2 * math.pi * s**2)
        * torch.exp(rpe.mixture_means[0].pow(2).sum(-1) / (2 * s**2 - sigma**2))
    ).sum()
    assert weight.abs().max() <= bound
    # however large the raw parameter, sigma stays below sigma_max < sqrt(2) s
    with torch.no_grad():
        rpe.raw_mixture_scales.fill_(50.0)
    assert rpe.mixture_scales.max() <= s and torch.isfinite(rpe.spectrum()[1]).all()


@pytest.mark.parametrize("sampler", ["mixture", "proposal"])
def test_gradients_reach_weights_means_and_widths(sampler):
    gen = torch.Generator().manual_seed(4)
    rpe = GaussianMixtureRPE(3, 2, 8, num_components=4, sampler=sampler).double()
    _set_mixture(rpe, *_random_mixture(3, 4, gen))
    pos = torch.randn(6, 3, dtype=D64)
    psi = rpe.query_features(pos), rpe.key_features(pos, "symmetric")
    (psi[0].sum() + psi[1].pow(2).sum()).backward()
    for param in (rpe.mixture_weights, rpe.mixture_means, rpe.raw_mixture_scales):
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0
    assert rpe.base_noise.requires_grad is False
    # the closed form is differentiable too (used as a training target in tests and plots)
    rpe.zero_grad()
    rpe.closed_form(torch.randn(5, 3, dtype=D64)).sum().backward()
    assert rpe.raw_mixture_scales.grad.abs().min() > 0


def test_zero_initialisation_is_neutral_and_init_weight_sets_w():
    rpe = GaussianMixtureRPE(2, 3, 32).double()  # default 25 components, w = 0
    delta = torch.randn(7, 2, dtype=D64)
    assert rpe.num_components == 25 and rpe.mixture_weights.abs().max() == 0
    assert rpe.closed_form(delta).abs().max() == 0 and rpe.estimate(delta).abs().max() == 0
    rpe.estimate(delta).sum().backward()
    assert rpe.mixture_weights.grad.abs().sum() > 0
    init = torch.randn(3, 25)
    given = GaussianMixtureRPE(2, 3, 32, init_weight=init)
    torch.testing.assert_close(given.mixture_weights.data, init)
    given.mixture_weights.data.zero_()
    given.reset_parameters()
    torch.testing.assert_close(given.mixture_weights.data, init)
    per_component = GaussianMixtureRPE(2, 3, 8, num_components=2, init_weight=[0.5, -1.0])
    assert per_component.mixture_weights[:, 1].eq(-1.0).all()


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (dict(num_components=0), "num_components"),
        (dict(num_components=2.0), "num_components"),
        (dict(num_frequencies=0), "num_frequencies"),
        (dict(num_frequencies=8, num_components=25), "num_frequencies"),
        (dict(sampler="gibbs"), "sampler must be one of"),
        (dict(sampler="proposal", proposal_scale=0.0), "proposal_scale"),
        (dict(sampler="proposal", sigma_max=1.5), "sigma_max"),
        (dict(sampler="proposal", sigma_max=-1.0), "sigma_max"),
        (dict(sampler="proposal", init_sigma=1.0), "init_sigma"),
        (dict(sigma_max=1.0), "sigma_max"),
        (dict(proposal_scale=2.0), "proposal_scale"),
        (dict(init_sigma=0.0), "init_sigma"),
        (dict(init_mu_std=-1.0), "init_mu_std"),
        (dict(init_weight=torch.zeros(3, 25)), "init_weight"),
        (dict(pos_dim=0), "pos_dim"),
        (dict(num_heads=0), "num_heads"),
    ]
    for kwargs, match in cases:
        options = dict(pos_dim=2, num_heads=2, num_frequencies=32)
        options.update(kwargs)
        with pytest.raises(ValueError, match=match):
            GaussianMixtureRPE(**options)


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
@pytest.mark.parametrize("sampler", ["mixture", "proposal"])
def test_through_the_attention_layer(sampler, mode):
    # a non-neutral init survives RPEAttention.reset_parameters (which resets the RPE)
    init = torch.randn(2, 5) * 0.5
    rpe = GaussianMixtureRPE(3, 2, 10, num_components=5, sampler=sampler, init_weight=init)
    _assert_layer_matches_reference(rpe, mode)
