"""The Fourier RPE base and the shift-invariant kernel RPEs (Gaussian, Matern, Cauchy)."""

import functools
import math

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe import ShiftInvariantKernelRPE, build, names
from geolinrpe.rpe.kernel import KERNELS
from geolinrpe.testing import assert_translation_invariant

#: these tests are about the Monte-Carlo sampler (quadrature: tests/rpe/test_frequencies.py)
MonteShiftInvariantKernelRPE = functools.partial(ShiftInvariantKernelRPE, frequencies="mc")

D64 = torch.float64


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
def test_features_give_the_estimate_and_depend_on_differences_only(pos_dim):
    rpe = MonteShiftInvariantKernelRPE(pos_dim, 3, 7, lengthscale=0.8, amplitude=-0.7).double()
    pos = torch.randn(11, pos_dim, dtype=D64) * 3
    delta = pos[:, None] - pos[None, :]
    want = rpe.estimate(delta).permute(2, 0, 1)  # [h, i, j]
    for split in ("query", "symmetric"):
        psi_q, psi_k = rpe.query_features(pos, split), rpe.key_features(pos, split)
        got = torch.einsum("ihm,jhm->hij", psi_q, psi_k)
        torch.testing.assert_close(got, want, atol=1e-12, rtol=1e-12)
        shift = torch.randn(pos_dim, dtype=D64) * 100
        moved = torch.einsum(
            "ihm,jhm->hij",
            rpe.query_features(pos + shift, split),
            rpe.key_features(pos + shift, split),
        )
        torch.testing.assert_close(moved, want, atol=1e-10, rtol=1e-10)
    # symmetric split balances the two sides (|a| = 0.7 >> the 0.01 softening)
    torch.testing.assert_close(
        rpe.query_features(pos, "symmetric").norm(dim=-1),
        rpe.key_features(pos, "symmetric").norm(dim=-1),
        rtol=1e-3,
        atol=0,
    )


def test_symmetric_split_is_smooth_at_the_neutral_amplitude():
    """a = 0 (neutral logit bias) must give finite, non-zero gradients (sqrt|a| would not)."""
    rpe = MonteShiftInvariantKernelRPE(3, 2, 4, amplitude=0.0).double()
    pos = torch.randn(6, 3, dtype=D64)
    psi_q, psi_k = rpe.query_features(pos, "symmetric"), rpe.key_features(pos, "symmetric")
    assert psi_q.abs().max() == 0 and psi_k.abs().max() > 0
    torch.exp(psi_q @ psi_k.transpose(-1, -2) + psi_q.sum()).sum().backward()
    grad = rpe.amplitude.grad
    assert torch.isfinite(grad).all() and grad.abs().min() > 0


def test_monte_carlo_converges_at_the_inverse_sqrt_rate():
    delta = torch.randn(200, 3, dtype=D64)
    rmse = {}
    for m in (8, 32, 128, 512):
        errs = []
        for seed in range(40):
            rpe = MonteShiftInvariantKernelRPE(
                3, 2, m, lengthscale=0.7, amplitude=1.3, orthogonal=False
            )
            rpe = rpe.double()
            rpe.redraw(torch.Generator().manual_seed(seed))
            errs.append((rpe.estimate(delta) - rpe.closed_form(delta)).pow(2).mean())
        rmse[m] = torch.stack(errs).mean().sqrt().item()
    # each 4x in m halves the error (slope -1/2 in log-log), within 25%
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.5 < rmse[small] / rmse[big] < 2.5, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.08, slope


def test_closed_form_is_the_gaussian():
    rpe = MonteShiftInvariantKernelRPE(2, 2, 4, lengthscale=2.0, amplitude=0.5).double()
    delta = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0]], dtype=D64)
    want = 0.5 * torch.exp(-delta.pow(2).sum(-1) / 8.0)
    torch.testing.assert_close(rpe.closed_form(delta), want[:, None].expand(3, 2))


def test_per_head_initial_lengthscales_and_amplitudes():
    rpe = MonteShiftInvariantKernelRPE(2, 3, lengthscale=[0.5, 1.0, 4.0], amplitude=[1.0, 0.0, 2.0])
    delta = torch.randn(10, 2, dtype=D64)
    scales, amps = (
        torch.tensor([0.5, 1.0, 4.0], dtype=D64),
        torch.tensor([1.0, 0.0, 2.0], dtype=D64),
    )
    want = amps * torch.exp(-delta.pow(2).sum(-1, keepdim=True) / (2 * scales**2))
    torch.testing.assert_close(rpe.double().closed_form(delta), want)
    with pytest.raises(ValueError, match="lengthscale must be a number or 3 values"):
        MonteShiftInvariantKernelRPE(2, 3, lengthscale=[1.0, 2.0])


def test_gradients_reach_bandwidth_and_amplitude():
    rpe = MonteShiftInvariantKernelRPE(3, 2, 6).double()
    pos = torch.randn(5, 3, dtype=D64)
    (rpe.query_features(pos).sum() + rpe.key_features(pos, "symmetric").pow(2).sum()).backward()
    assert rpe.log_lengthscale.grad.abs().sum() > 0
    assert rpe.amplitude.grad.abs().sum() > 0
    assert rpe.base_frequencies.requires_grad is False


def test_registry_and_bad_options():
    assert "flt-kernel" in names()
    rpe = build("flt-kernel", pos_dim=2, num_heads=3, num_frequencies=5)
    assert rpe.num_features == 10 and rpe.pos_dim == 2
    with pytest.raises(ValueError, match="unknown rpe 'flt-nope'"):
        build("flt-nope", pos_dim=2, num_heads=3)
    with pytest.raises(ValueError, match="bad option"):
        build("flt-kernel", pos_dim=2, num_heads=3, bandwidth=3)
    with pytest.raises(ValueError, match="num_frequencies"):
        build("flt-kernel", pos_dim=2, num_heads=3, num_frequencies=0)
    with pytest.raises(ValueError, match="pos_dim"):
        build("flt-kernel", pos_dim=0, num_heads=3)
    with pytest.raises(ValueError, match="lengthscale"):
        build("flt-kernel", pos_dim=1, num_heads=3, lengthscale=-1.0)
    with pytest.raises(ValueError, match="kernel must be one of"):
        build("flt-kernel", pos_dim=1, num_heads=3, kernel="matern72")


# ---------------------------------------------------------------- Matern and Cauchy kernels


def _rmse_by_num_frequencies(kernel, pos_dim, draws=128):
    """RMSE of f_hat - f over ``draws`` independent draws (heads) and 100 lags."""
    gen = torch.Generator().manual_seed(pos_dim)
    delta = torch.randn(100, pos_dim, dtype=D64, generator=gen)
    rmse = {}
    for m in (8, 32, 128, 512):
        rpe = MonteShiftInvariantKernelRPE(
            pos_dim, draws, m, kernel=kernel, lengthscale=0.7, amplitude=1.3, orthogonal=False
        ).double()
        rpe.redraw(gen)
        rmse[m] = (rpe.estimate(delta) - rpe.closed_form(delta)).pow(2).mean().sqrt().item()
    return rmse


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("kernel", [k for k in KERNELS if k != "gaussian"])
def test_matern_and_cauchy_samplers_converge_at_the_inverse_sqrt_rate(kernel, pos_dim):
    """A wrong spectral density (e.g. exp(-2 pi l |xi|) for the Cauchy kernel in p > 1)
    leaves a bias, so the error would stop falling at large m.

    Measured RMSE at m = 8 / 32 / 128 / 512 (128 draws x 100 lags, l = 0.7, a = 1.3):
    0.24-0.32 / 0.12-0.16 / 0.060-0.079 / 0.030-0.040 over the kernels and p = 1, 2, 3
    (log-log slopes -0.47..-0.51)."""
    rmse = _rmse_by_num_frequencies(kernel, pos_dim)
    for small, big in ((8, 32), (32, 128), (128, 512)):
        assert 1.6 < rmse[small] / rmse[big] < 2.4, rmse
    slope = math.log(rmse[512] / rmse[8]) / math.log(512 / 8)
    assert abs(slope + 0.5) < 0.06, slope


def test_closed_forms_of_the_matern_and_cauchy_kernels():
    delta = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [1.0, -1.0, 2.0]], dtype=D64)
    r = delta.norm(dim=-1) / 2.0
    s3, s5 = math.sqrt(3) * r, math.sqrt(5) * r
    want = {
        "laplace": torch.exp(-r),
        "matern32": (1 + s3) * torch.exp(-s3),
        "matern52": (1 + s5 + s5**2 / 3) * torch.exp(-s5),
        "cauchy": 1 / (1 + r**2),
    }
    for kernel, profile in want.items():
        rpe = MonteShiftInvariantKernelRPE(3, 2, 4, kernel=kernel, lengthscale=2.0, amplitude=-0.5)
        got = rpe.double().closed_form(delta)
        torch.testing.assert_close(got, -0.5 * profile[:, None].expand(3, 2))


@pytest.mark.parametrize("kernel", KERNELS)
def test_every_kernel_is_reparametrised_in_the_lengthscale(kernel):
    """Gradients reach l through the frequencies; closed form has finite gradients at 0."""
    rpe = MonteShiftInvariantKernelRPE(2, 3, 8, kernel=kernel, lengthscale=0.5).double()
    pos = torch.randn(6, 2, dtype=D64)
    rpe.query_features(pos).pow(2).sum().backward()
    assert rpe.log_lengthscale.grad.abs().min() > 0
    assert rpe.amplitude.grad.abs().min() > 0
    rpe.zero_grad()
    delta = torch.cat([torch.zeros(1, 2, dtype=D64), torch.randn(4, 2, dtype=D64)])
    rpe.closed_form(delta).sum().backward()
    assert torch.isfinite(rpe.log_lengthscale.grad).all()
    assert rpe.log_lengthscale.grad.abs().min() > 0
    # the estimate is a * mean cos(eps . Delta / l): scaling l and Delta together changes nothing
    scaled = MonteShiftInvariantKernelRPE(2, 3, 8, kernel=kernel).double()
    scaled.base_frequencies.copy_(rpe.base_frequencies)
    with torch.no_grad():
        scaled.log_lengthscale.copy_(rpe.log_lengthscale + math.log(3))
    torch.testing.assert_close(scaled.estimate(3 * delta), rpe.estimate(delta))


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
@pytest.mark.parametrize("kernel", ["laplace", "cauchy"])
def test_heavy_tailed_kernels_through_the_attention_layer(kernel, mode):
    rpe = MonteShiftInvariantKernelRPE(3, 2, 8, kernel=kernel, lengthscale=1.5, amplitude=0.8)
    _assert_layer_matches_reference(rpe, mode)
