"""The Fourier RPE base and the Gaussian shift-invariant kernel RPE."""

import math

import pytest
import torch

from geolinrpe.rpe import ShiftInvariantKernelRPE, build, names

D64 = torch.float64


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
def test_features_give_the_estimate_and_depend_on_differences_only(pos_dim):
    rpe = ShiftInvariantKernelRPE(pos_dim, 3, 7, lengthscale=0.8, amplitude=-0.7).double()
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
    rpe = ShiftInvariantKernelRPE(3, 2, 4, amplitude=0.0).double()
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
            rpe = ShiftInvariantKernelRPE(3, 2, m, lengthscale=0.7, amplitude=1.3, orthogonal=False)
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
    rpe = ShiftInvariantKernelRPE(2, 2, 4, lengthscale=2.0, amplitude=0.5).double()
    delta = torch.tensor([[0.0, 0.0], [2.0, 0.0], [1.0, 1.0]], dtype=D64)
    want = 0.5 * torch.exp(-delta.pow(2).sum(-1) / 8.0)
    torch.testing.assert_close(rpe.closed_form(delta), want[:, None].expand(3, 2))


def test_gradients_reach_bandwidth_and_amplitude():
    rpe = ShiftInvariantKernelRPE(3, 2, 6).double()
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
        build("flt-kernel", pos_dim=1, num_heads=3, kernel="cauchy")
