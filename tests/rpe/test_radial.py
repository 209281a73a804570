"""The radial (isotropic) FLT RPE and its rotation modes."""

import functools
import math
from itertools import pairwise

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe.radial import RadialRPE, canonical_frame
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_rotation_invariant,
    random_rotation,
)

D64 = torch.float64
#: these tests are about the Monte-Carlo sampler (quadrature: tests/rpe/test_frequencies.py)
MonteRadialRPE = functools.partial(RadialRPE, frequencies="mc")


def shells(m=32, rotation="fixed", seed=0):
    """Two signed shells per head, one centred Gaussian and one ring."""
    rpe = MonteRadialRPE(3, 2, m, num_components=2, rotation=rotation).double()
    with torch.no_grad():
        rpe.shell_amplitudes.copy_(torch.tensor([[1.0, 0.6], [0.5, -0.4]]))
        rpe.shell_radii.copy_(torch.tensor([[0.0, 0.5], [0.1, 0.8]]))
        rpe.log_shell_widths.copy_(torch.tensor([[0.3, 0.15], [0.25, 0.1]]).log())
    rpe.redraw(torch.Generator().manual_seed(seed))
    return rpe


def cloud(n, generator=None):
    """Random anisotropic point cloud (well-separated PCA variances, generic skews)."""
    scale = torch.tensor([3.0, 1.8, 0.8], dtype=D64)
    return torch.randn(n, 3, dtype=D64, generator=generator) * scale + 0.3


def test_closed_form_is_the_radial_transform_of_the_shells():
    """Closed form == int g(rho) 4 pi rho^2 sinc(2 rho d) drho by quadrature (signed shells)."""
    rpe = shells()
    mu, width = rpe.shell_radii.detach(), rpe.shell_widths.detach()
    amp = rpe.shell_amplitudes.detach()
    w = amp / (2 * math.pi**1.5 * width * (2 * mu**2 + width**2))  # g's prefactors
    rho = torch.linspace(0, 4, 4001, dtype=D64)
    mu, width, w = mu[..., None], width[..., None], w[..., None]
    g = (w * ((-((rho - mu) ** 2) / width**2).exp() + (-((rho + mu) ** 2) / width**2).exp())).sum(1)
    dist = torch.tensor([0.0, 0.3, 1.0, 2.5, 4.0], dtype=D64)
    integrand = g * 4 * math.pi * rho**2 * torch.sinc(2 * rho * dist[:, None, None])
    want = torch.trapezoid(integrand, rho, dim=-1)  # [d, h]
    direction = torch.nn.functional.normalize(torch.randn(5, 3, dtype=D64), dim=-1)
    got = rpe.closed_form(dist[:, None] * direction)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-9)
    torch.testing.assert_close(got[0], amp.sum(-1), atol=1e-12, rtol=0)  # f(0) = sum_k c_k


def test_initialisation_is_the_gaussian_and_zero_amplitude_is_neutral():
    rpe = MonteRadialRPE(3, 2, 16, lengthscale=1.5, amplitude=0.7).double()
    delta = torch.randn(20, 3, dtype=D64) * 2
    want = 0.7 * torch.exp(-delta.pow(2).sum(-1) / (2 * 1.5**2))
    torch.testing.assert_close(rpe.closed_form(delta), want[:, None].expand(20, 2))
    neutral = MonteRadialRPE(3, 2, 16, amplitude=0.0).double()
    assert neutral.closed_form(delta).abs().max() == 0
    assert neutral.estimate(delta).abs().max() == 0


def test_per_head_lengthscales_and_amplitudes_give_multi_scale_heads():
    scales, amps = [0.5, 1.0, 2.0, 4.0], [2.0, 1.0, 0.0, -1.0]
    rpe = MonteRadialRPE(3, 4, 16, lengthscale=scales, amplitude=amps).double()
    delta = torch.randn(20, 3, dtype=D64) * 2
    sq = delta.pow(2).sum(-1, keepdim=True)
    want = torch.tensor(amps, dtype=D64) * torch.exp(
        -sq / (2 * torch.tensor(scales, dtype=D64) ** 2)
    )
    torch.testing.assert_close(rpe.closed_form(delta), want)
    rpe.shell_amplitudes.data.fill_(5.0)
    rpe.reset_parameters()  # back to the per-head initial values
    torch.testing.assert_close(rpe.closed_form(delta), want)
    assert "init_lengthscale" not in rpe.state_dict()  # constructor options, not state


def test_monte_carlo_converges_at_the_inverse_sqrt_rate():
    """RMS error against the closed form over 20 draws: 0.41 / 0.25 / 0.115 / 0.061 at
    m = 8 / 32 / 128 / 512 (slope -0.46)."""
    delta = torch.randn(100, 3, dtype=D64)
    rmse = {}
    for m in (8, 32, 128, 512):
        rpe = shells(m)
        errors = []
        for seed in range(20):
            rpe.redraw(torch.Generator().manual_seed(seed))
            errors.append((rpe.estimate(delta) - rpe.closed_form(delta)).pow(2).mean())
        rmse[m] = torch.stack(errors).mean().sqrt().item()
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.5 < rmse[small] / rmse[big] < 2.6, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.1, slope


def test_estimate_depends_on_the_distance_only_in_expectation():
    """One draw: f_hat differs across directions at fixed |Delta|; the mean over draws does
    not (it is the closed form, within 4 standard errors)."""
    rpe = shells(16)
    direction = torch.nn.functional.normalize(torch.randn(8, 3, dtype=D64), dim=-1)
    delta = 1.2 * direction
    draws = []
    for seed in range(400):
        rpe.redraw(torch.Generator().manual_seed(seed))
        draws.append(rpe.estimate(delta).detach())
    draws = torch.stack(draws)  # [draw, direction, h]
    spread_one = (draws[0] - draws[0].mean(0)).abs().max()
    mean, stderr = draws.mean(0), draws.std(0) / math.sqrt(400)
    exact = rpe.closed_form(delta).detach()
    assert ((mean - exact).abs() < 4 * stderr).all()
    assert (mean - mean.mean(0)).abs().max() < spread_one / 5


@pytest.mark.parametrize("rotation", ["fixed", "frame"])
def test_features_give_the_estimate_and_gradients_reach_every_shell_parameter(rotation):
    rpe = shells(12, rotation)
    pos = rpe.encode_positions(cloud(9))
    want = rpe.estimate(pos[:, None] - pos[None]).permute(2, 0, 1)
    for split in ("query", "symmetric"):
        got = torch.einsum(
            "ihm,jhm->hij", rpe.query_features(pos, split), rpe.key_features(pos, split)
        )
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
    (rpe.query_features(pos).sum() + rpe.key_features(pos, "symmetric").pow(2).sum()).backward()
    for name in ("shell_amplitudes", "shell_radii", "log_shell_widths"):
        assert getattr(rpe, name).grad.abs().min() > 0, name
    assert not rpe.base_radii.requires_grad and not rpe.directions.requires_grad


@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_frame_mode_layer_is_exactly_rotation_invariant(mode):
    """Packed batch of 3 graphs; measured deviation ~1e-15 (asserted 1e-10)."""
    gen = torch.Generator().manual_seed(3)
    sizes = [7, 12, 5]
    pos = torch.cat([cloud(n, gen) for n in sizes])
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    x = torch.randn(24, 16, dtype=D64)
    rpe = shells(16, "frame")
    attn = RPEAttention(16, 2, rpe=rpe, mode=mode, num_features=32).double()
    for seed in range(3):
        rotation = random_rotation(generator=torch.Generator().manual_seed(seed))
        assert_rotation_invariant(
            attn, x, pos, rotation=rotation, batch=batch, atol=1e-10, rtol=1e-10
        )
    # the frame ignores padding: dense rows padded with random positions give the same rows
    assert_padding_consistent(attn, x, pos, batch, atol=1e-10, rtol=1e-10)
    fixed = RPEAttention(16, 2, rpe=shells(16, "fixed"), mode=mode, num_features=32).double()
    fixed.load_state_dict(attn.state_dict())
    with pytest.raises(AssertionError, match="rotation"):  # the fixed draw is not invariant
        assert_rotation_invariant(fixed, x, pos, batch=batch, atol=1e-6, rtol=1e-6)


def test_canonical_frame_exact_cases_degenerate_cases_and_finite_gradients():
    gen = torch.Generator().manual_seed(0)
    rotation = random_rotation(generator=gen)
    generic = cloud(10, gen)
    planar = generic * torch.tensor([1.0, 1.0, 0.0], dtype=D64)  # normal axis has no sign
    # water: C2v, planar; the H-H axis (largest variance) has zero third moment
    water = torch.tensor([[0.0, 0.0, 0.1173], [0.0, 0.7572, -0.4692], [0.0, -0.7572, -0.4692]])
    for points in (generic, planar, water.double()):
        frame = canonical_frame(points)
        rotated = canonical_frame(points @ rotation.T)
        torch.testing.assert_close(rotated.coords, frame.coords, atol=1e-12, rtol=0)
        torch.testing.assert_close(torch.linalg.det(frame.axes).abs(), torch.ones(1, dtype=D64))
    assert canonical_frame(generic).signed.all()
    assert canonical_frame(water.double()).signed.tolist() == [[False, True, False]]
    # methane: three equal variances, the frame is arbitrary (documented), values stay finite
    methane = torch.tensor([[1.0, 1, 1], [1, -1, -1], [-1, 1, -1], [-1, -1, 1]], dtype=D64)
    methane = torch.cat([torch.zeros(1, 3, dtype=D64), 0.63 * methane])
    variances = canonical_frame(methane).variances
    assert (variances.max() - variances.min()) < 1e-12 * variances.max()
    # one-atom graphs, pairs and methane: no NaN gradients through the eigenvectors
    pos = torch.cat([torch.randn(3, 3, dtype=D64), methane, generic]).requires_grad_(True)
    batch = torch.tensor([0, 1, 1] + [2] * 5 + [3] * 10)
    coords = canonical_frame(pos, batch).coords
    (coords * torch.randn_like(coords)).sum().backward()
    assert torch.isfinite(pos.grad).all()


def test_frame_gradient_matches_finite_differences():
    pos = cloud(6, torch.Generator().manual_seed(1)).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda p: canonical_frame(p).coords, (pos,))


def test_fixed_rotation_error_shrinks_with_the_number_of_frequencies():
    """RMS of f_hat(Q Delta) - f_hat(Delta) over 12 draws: 0.57 / 0.35 / 0.16 / 0.082 at
    m = 8 / 32 / 128 / 512 (about sqrt(2) x the Monte-Carlo error); layer outputs (mask mode,
    ELU kernel) change by 22% / 18% / 6.3% relative at m = 8 / 64 / 512 (mean of 3 draws)."""
    delta = torch.randn(100, 3, dtype=D64)
    rotation = random_rotation(generator=torch.Generator().manual_seed(1))
    errors = []
    for m in (8, 32, 128, 512):
        rpe = shells(m)
        trial = []
        for seed in range(12):
            rpe.redraw(torch.Generator().manual_seed(seed))
            diff = rpe.estimate(delta @ rotation.T) - rpe.estimate(delta)
            trial.append(diff.pow(2).mean())
        errors.append(torch.stack(trial).mean().sqrt().item())
    assert all(a / b > 1.5 for a, b in pairwise(errors)), errors
    assert errors[-1] < 0.15
    x, pos = torch.randn(1, 20, 16, dtype=D64), cloud(20)[None]
    layer_errors = []
    for m in (8, 64, 512):
        attn = RPEAttention(16, 2, rpe=shells(m), mode="mask", kernel="elu").double()
        trial = []
        for seed in range(3):
            attn.rpe.redraw(torch.Generator().manual_seed(seed))
            out = attn(x, pos)
            trial.append(((attn(x, pos @ rotation.T) - out).norm() / out.norm()).item())
        layer_errors.append(sum(trial) / len(trial))
    assert layer_errors[0] > layer_errors[1] > layer_errors[2] > 1e-4, layer_errors


def test_random_rotation_redraws_every_training_forward_and_not_in_eval():
    attn = RPEAttention(16, 2, rpe=shells(16, "random"), mode="mask", kernel="elu").double()
    x, pos = torch.randn(1, 10, 16, dtype=D64), cloud(10)[None]
    attn.train()
    xi0 = attn.rpe.spectrum()[0].detach().clone()
    first, second = attn(x, pos), attn(x, pos)
    xi1 = attn.rpe.spectrum()[0].detach().clone()
    assert not torch.allclose(first, second) and not torch.allclose(xi0, xi1)
    # only the directions turn: same radii, weights and so the same f_hat(0)
    torch.testing.assert_close(xi0.norm(dim=-1), xi1.norm(dim=-1))
    attn.eval()
    third = attn(x, pos)
    torch.testing.assert_close(attn(x, pos), third, atol=0, rtol=0)
    torch.testing.assert_close(attn.rpe.spectrum()[0], xi1, atol=0, rtol=0)
    torch.testing.assert_close(third, attn.reference(x, pos), atol=1e-10, rtol=1e-10)


def test_random_rotation_is_invariant_in_expectation():
    """Averaged over training-mode rotations, f_hat at Delta and at Q Delta agree to 4
    standard errors although one rotation's values differ."""
    rpe = shells(8, "random").train()
    delta = torch.randn(6, 3, dtype=D64) * 1.5
    rotated = delta @ random_rotation(generator=torch.Generator().manual_seed(2)).T
    pairs = []
    for _ in range(400):
        rpe.encode_positions(delta)  # a training forward: new rotation
        pairs.append(torch.stack([rpe.estimate(delta), rpe.estimate(rotated)]).detach())
    pairs = torch.stack(pairs)  # [draw, 2, 6, h]
    diff = pairs[:, 0] - pairs[:, 1]
    assert diff[0].abs().max() > 1e-2
    assert (diff.mean(0).abs() < 4 * diff.std(0) / math.sqrt(len(diff))).all()


@pytest.mark.parametrize("rotation", ["fixed", "frame"])
@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_forward_equals_explicit_reference(rotation, mode):
    attn = RPEAttention(16, 2, rpe=shells(16, rotation), mode=mode, chunk_size=5).double()
    sizes = [9, 1, 6]
    pos = torch.cat([cloud(n) for n in sizes])
    batch = torch.repeat_interleave(torch.arange(3), torch.tensor(sizes))
    x = torch.randn(16, 16, dtype=D64)
    torch.testing.assert_close(
        attn(x, pos, batch), attn.reference(x, pos, batch), atol=1e-10, rtol=1e-10
    )


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (dict(pos_dim=2), "pos_dim must be 3"),
        (dict(rotation="spin"), "rotation must be one of"),
        (dict(num_frequencies=3, num_components=4), "num_frequencies=3 must be >="),
        (dict(num_components=0), "num_components"),
        (dict(lengthscale=0.0), "lengthscale"),
        (dict(lengthscale=[1.0, -1.0]), "lengthscale must be positive"),
        (dict(lengthscale=[1.0, 2.0, 3.0]), "lengthscale must be a number or 2 values"),
        (dict(amplitude=[1.0, float("nan")]), "amplitude must be finite"),
        (dict(num_frequencies=0), "num_frequencies"),
    ]
    for options, match in cases:
        with pytest.raises(ValueError, match=match):
            MonteRadialRPE(**{"pos_dim": 3, "num_heads": 2, **options})
    with pytest.raises(ValueError, match=r"pos must be \[n, 3\]"):
        canonical_frame(torch.randn(4, 2))


def test_frame_mode_float32_and_bfloat16_autocast():
    """The frame is computed in full precision even under autocast (eigh has no bf16)."""
    attn = RPEAttention(16, 2, rpe=shells(16, "frame"), mode="mask").double()
    x, pos = torch.randn(2, 30, 16, dtype=D64), torch.randn(2, 30, 3, dtype=D64) * 3
    want = attn(x, pos)
    attn.float()
    got = attn(x.float(), pos.float())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x.float(), pos.float())
    assert low.dtype == torch.bfloat16 and ((low.double() - want).norm() / want.norm()) < 0.05
