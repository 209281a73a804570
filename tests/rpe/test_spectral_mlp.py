"""SpectralMLPRPE: quadrature reference, Monte-Carlo convergence, weights, gradients, layer."""

import math

import pytest
import torch
import torch.nn.functional as F

from geolinrpe import RPEAttention
from geolinrpe.rpe.spectral_mlp import SpectralMLPRPE
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64
#: fewer nodes than the default in p = 3 keep the tests fast (max_lag 1.9 / s = 11.7)
NODES_3D = 48


def _copy_network(source, target):
    """Give every head of ``target`` the network of head 0 of ``source``."""
    with torch.no_grad():
        for name, param in target.named_parameters():
            param.copy_(dict(source.named_parameters())[name][:1].expand_as(param))


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
def test_constant_network_gives_the_gaussian_kernel(pos_dim):
    """h = softplus(b): g = softplus(b) N(0, s^2 I), f = softplus(b) exp(-2 pi^2 s^2 |Delta|^2)."""
    nodes = NODES_3D if pos_dim == 3 else None
    rpe = SpectralMLPRPE(pos_dim, 2, 16, proposal_scale=0.3, quadrature_nodes=nodes).double()
    with torch.no_grad():
        for param in rpe.parameters():
            param.zero_()
        rpe.biases[-1].copy_(torch.tensor([[0.4], [-1.0]], dtype=D64))
    delta = torch.randn(30, pos_dim, dtype=D64)
    delta = delta / delta.norm(dim=-1, keepdim=True) * torch.linspace(0, rpe.max_lag, 30)[:, None]
    height = F.softplus(torch.tensor([0.4, -1.0], dtype=D64))
    want = height * torch.exp(-2 * math.pi**2 * 0.09 * delta.pow(2).sum(-1, keepdim=True))
    torch.testing.assert_close(rpe.closed_form(delta), want, atol=1e-12, rtol=1e-12)
    xi, weight = rpe.spectrum()
    torch.testing.assert_close(weight, height[:, None].expand(2, 16))
    torch.testing.assert_close(xi, 0.3 * rpe.base_noise)


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
def test_quadrature_reference_is_converged_within_max_lag(pos_dim):
    """The default network agrees with a 1.5x finer grid to 1e-10 up to max_lag."""
    nodes = NODES_3D if pos_dim == 3 else None
    rpe = SpectralMLPRPE(pos_dim, 1, quadrature_nodes=nodes).double()
    fine = SpectralMLPRPE(pos_dim, 1, quadrature_nodes=rpe.quadrature_nodes * 3 // 2).double()
    fine.load_state_dict(rpe.state_dict())
    assert fine.max_lag > rpe.max_lag
    delta = torch.randn(20, pos_dim, dtype=D64)
    delta = delta / delta.norm(dim=-1, keepdim=True) * torch.linspace(0, rpe.max_lag, 20)[:, None]
    with torch.no_grad():
        coarse, finer = rpe.closed_form(delta), fine.closed_form(delta)
    assert coarse[0].min() > 0.1  # f(0) = E_p[h] > 0: not a trivially small target
    torch.testing.assert_close(coarse, finer, atol=1e-10, rtol=0)


@pytest.mark.parametrize("nodes", [16, 17])
def test_quadrature_is_the_periodisation_of_f(nodes):
    """Poisson summation: closed_form = sum_j (-1)^((n-1) j) f(Delta + j T), T = 1 / (s step).

    A coarse grid and the constant network (f Gaussian) make the images visible."""
    rpe = SpectralMLPRPE(1, 1, 4, proposal_scale=0.5, quadrature_nodes=nodes).double()
    with torch.no_grad():
        for param in rpe.parameters():
            param.zero_()
    period = 1 / (0.5 * rpe.step)
    assert rpe.max_lag == pytest.approx(period / 2)
    delta = torch.linspace(-period / 2, period / 2, 9, dtype=D64)[:, None]
    height = math.log(2)  # softplus(0)

    def gaussian(d):
        return height * torch.exp(-2 * math.pi**2 * 0.25 * d**2)

    images = sum((-1) ** ((nodes - 1) * j) * gaussian(delta + j * period) for j in range(-4, 5))
    assert (images - gaussian(delta)).abs().max() > 1e-3  # the aliasing is real ...
    torch.testing.assert_close(rpe.closed_form(delta), images, atol=1e-13, rtol=0)  # ... and exact


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("positive", [True, False])
def test_monte_carlo_converges_to_the_quadrature_reference(pos_dim, positive):
    """RMSE of f_hat - f over 128 draws (heads) x 60 lags ~ N(0, I) (|f(0)| 0.36-0.95).

    Measured at m = 8 / 32 / 128 / 512: 0.13-0.23 / 0.06-0.11 / 0.029-0.057 / 0.015-0.029
    over p = 1, 2, 3 and both outputs (log-log slopes -0.49..-0.52)."""
    nodes = NODES_3D if pos_dim == 3 else None
    gen = torch.Generator().manual_seed(pos_dim)
    reference = SpectralMLPRPE(pos_dim, 1, positive=positive, quadrature_nodes=nodes).double()
    if not positive:  # leave the neutral start
        with torch.no_grad():
            reference.weights[-1].normal_(0.0, 0.5, generator=gen)
            reference.biases[-1].fill_(0.2)
    delta = torch.randn(60, pos_dim, dtype=D64, generator=gen)
    assert delta.norm(dim=-1).max() < reference.max_lag
    want = reference.closed_form(delta)  # [60, 1]
    rmse = {}
    for m in (8, 32, 128, 512):
        rpe = SpectralMLPRPE(pos_dim, 128, m, positive=positive).double()
        _copy_network(reference, rpe)
        rpe.redraw(gen)
        rmse[m] = (rpe.estimate(delta) - want).pow(2).mean().sqrt().item()
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.6 < rmse[small] / rmse[big] < 2.4, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.06, slope


def test_weights_are_g_over_p_and_bounded():
    rpe = SpectralMLPRPE(2, 3, 4096, proposal_scale=0.5).double()
    xi, weight = rpe.spectrum()
    proposal = torch.exp(-xi.pow(2).sum(-1) / 0.5) / (2 * math.pi * 0.25)
    torch.testing.assert_close(weight, rpe.spectral_density(xi) / proposal)
    assert weight.min() > 0
    # tanh hidden layers bound the output: |a| <= softplus(|W_out|_1 + |b_out|)
    bound = F.softplus(rpe.weights[-1].abs().sum((1, 2)) + rpe.biases[-1].abs()[:, 0])
    far = 1e3 * torch.randn(3, 100, 2, dtype=D64)
    assert (rpe.density_ratio(far) <= bound[:, None]).all()
    assert (weight <= bound[:, None]).all()


@pytest.mark.parametrize("positive", [True, False])
def test_gradients_reach_every_layer(positive):
    rpe = SpectralMLPRPE(3, 2, 8, positive=positive).double()
    with torch.no_grad():  # the signed start has a zero last layer, which blocks the rest
        rpe.weights[-1].normal_()
    pos = torch.randn(6, 3, dtype=D64)
    (rpe.query_features(pos).sum() + rpe.key_features(pos, "symmetric").pow(2).sum()).backward()
    for name, param in rpe.named_parameters():
        assert torch.isfinite(param.grad).all() and param.grad.abs().sum() > 0, name
    assert rpe.base_noise.requires_grad is False


def test_signed_network_starts_neutral():
    rpe = SpectralMLPRPE(2, 2, 8, positive=False).double()
    delta = torch.randn(5, 2, dtype=D64)
    assert rpe.estimate(delta).abs().max() == 0
    assert rpe.closed_form(delta).abs().max() == 0
    rpe.estimate(delta).sum().backward()
    assert rpe.weights[-1].grad.abs().sum() > 0 and rpe.biases[-1].grad.abs().sum() > 0


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (dict(pos_dim=4), "pos_dim"),
        (dict(pos_dim=0), "pos_dim"),
        (dict(num_heads=0), "num_heads"),
        (dict(num_frequencies=0), "num_frequencies"),
        (dict(hidden_dim=0), "hidden_dim"),
        (dict(num_layers=0), "num_layers"),
        (dict(proposal_scale=0.0), "proposal_scale"),
        (dict(quadrature_nodes=1), "quadrature_nodes"),
        (dict(quadrature_nodes=8.0), "quadrature_nodes"),
    ]
    for kwargs, match in cases:
        options = dict(pos_dim=2, num_heads=2)
        options.update(kwargs)
        with pytest.raises(ValueError, match=match):
            SpectralMLPRPE(**options)


def _assert_layer_matches_reference(rpe, mode, after_init=None):
    """forward == explicit-feature reference (dense + packed), translation invariance (mask)."""
    heads, p = rpe.num_heads, rpe.pos_dim
    attn = RPEAttention(6 * heads, heads, rpe=rpe, mode=mode, num_features=16, chunk_size=8)
    attn = attn.double()
    if after_init is not None:  # RPEAttention.reset_parameters resets the RPE
        after_init(rpe)
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


def _perturb_output_layer(rpe):
    with torch.no_grad():
        rpe.weights[-1].normal_()
        rpe.biases[-1].fill_(0.3)


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("positive", [True, False])
def test_through_the_attention_layer(positive, mode):
    rpe = SpectralMLPRPE(3, 2, 8, positive=positive)
    _assert_layer_matches_reference(rpe, mode, None if positive else _perturb_output_layer)
