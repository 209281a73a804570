"""Feature maps estimate (or equal) the kernels they claim, stay finite and redraw on demand."""

import math

import pytest
import torch

from geolinrpe.features import (
    ELUFeatures,
    GERFFeatures,
    IdentityFeatures,
    PositiveRandomFeatures,
    ReLUFeatures,
    build_feature_map,
    gaussian_orthogonal_matrix,
    optimal_gerf_parameter,
)

D64 = torch.float64


def true_features(fm, x):
    phi, log_scale = fm(x)
    return phi if log_scale is None else phi * torch.exp(log_scale)[..., None]


@pytest.mark.parametrize("orthogonal", [False, True])
def test_positive_random_features_are_unbiased(orthogonal):
    """Mean over 1000 draws within 5 standard errors of exp(x.y) for every pair."""
    d = 6
    x = torch.randn(5, d, dtype=D64) * 0.25
    y = torch.randn(7, d, dtype=D64) * 0.25
    exact = torch.exp(x @ y.T)
    draws = []
    for seed in range(1000):
        fm = PositiveRandomFeatures(d, 12, orthogonal=orthogonal).double()
        fm.redraw(torch.Generator().manual_seed(seed))
        draws.append(true_features(fm, x) @ true_features(fm, y).T)
    draws = torch.stack(draws)
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / math.sqrt(len(draws)))
    assert z.max() < 5, z.max()
    assert ((draws.mean(0) - exact).abs() / exact).max() < 0.1
    torch.testing.assert_close(fm.kernel(x, y), exact)


def test_orthogonal_blocks_lower_the_variance():
    d = 8
    x = torch.randn(4, d, dtype=D64) * 0.5
    y = torch.randn(4, d, dtype=D64) * 0.5
    exact = torch.exp(x @ y.T)
    mse = {}
    for orthogonal in (False, True):
        errs = []
        for seed in range(300):
            fm = PositiveRandomFeatures(d, 16, orthogonal=orthogonal).double()
            fm.redraw(torch.Generator().manual_seed(seed))
            est = true_features(fm, x) @ true_features(fm, y).T
            errs.append(((est - exact) / exact).pow(2).mean())
        mse[orthogonal] = torch.stack(errs).mean().item()
    assert mse[True] < 0.9 * mse[False], mse


def test_orthogonal_matrix_structure():
    w = gaussian_orthogonal_matrix(10, 4, dtype=D64, generator=torch.Generator().manual_seed(1))
    assert w.shape == (10, 4)
    block = w[:4] / w[:4].norm(dim=1, keepdim=True)
    torch.testing.assert_close(block @ block.T, torch.eye(4, dtype=D64), atol=1e-12, rtol=0)
    # chi-distributed norms: mean squared norm ~ d over many rows
    big = gaussian_orthogonal_matrix(4000, 4, dtype=D64, generator=torch.Generator().manual_seed(2))
    assert abs(big.pow(2).sum(1).mean().item() - 4) < 0.2


def test_stabilised_features_equal_the_formula_and_never_overflow():
    fm = PositiveRandomFeatures(5, 9).double()
    x = torch.randn(3, 5, dtype=D64)
    w = fm.projection
    formula = torch.exp(x @ w.T - 0.5 * x.pow(2).sum(-1, keepdim=True)) / 3.0
    torch.testing.assert_close(true_features(fm, x), formula, atol=1e-14, rtol=1e-12)
    phi, log_scale = fm.float()(torch.randn(3, 5) * 300)  # exp would overflow float32
    assert torch.isfinite(phi).all() and torch.isfinite(log_scale).all()
    assert phi.max() <= 1.0 / 3.0 + 1e-6


def test_redraw_changes_features_and_generator_reproduces():
    fm = PositiveRandomFeatures(4, 8)
    before = fm.projection.clone()
    fm.redraw()
    assert not torch.equal(before, fm.projection)
    fm.redraw(torch.Generator().manual_seed(3))
    first = fm.projection.clone()
    fm.redraw(torch.Generator().manual_seed(3))
    assert torch.equal(first, fm.projection)
    assert "projection" in fm.state_dict()


@pytest.mark.parametrize(
    "cls,fn,positive",
    [
        (ReLUFeatures, torch.relu, True),
        (ELUFeatures, lambda t: torch.nn.functional.elu(t) + 1, True),
        (IdentityFeatures, lambda t: t, False),
    ],
)
def test_elementwise_maps(cls, fn, positive):
    fm = cls(6)
    x, y = torch.randn(4, 6, dtype=D64), torch.randn(3, 6, dtype=D64)
    phi, log_scale = fm(x)
    assert log_scale is None and fm.num_features == 6
    torch.testing.assert_close(phi, fn(x))
    torch.testing.assert_close(fm.kernel(x, y), fn(x) @ fn(y).T)
    assert fm.positive is positive
    assert (phi >= 0).all() or not positive


def test_build_feature_map_errors_name_the_option():
    assert isinstance(build_feature_map("favor+", 4, 16), PositiveRandomFeatures)
    with pytest.raises(ValueError, match="unknown kernel 'softmax'"):
        build_feature_map("softmax", 4)
    with pytest.raises(ValueError, match="num_features"):
        build_feature_map("favor+", 4, 0)
    with pytest.raises(ValueError, match="input_dim"):
        build_feature_map("relu", 0)
    with pytest.raises(ValueError, match="takes no options"):
        build_feature_map("relu", 4, orthogonal=True)
    assert math.isclose(PositiveRandomFeatures(3, 5).num_features, 5)


# ---------------------------------------------------------------- FAVOR++ (GERF)


def log_second_moment_ratio(a, rho):
    """``log(E[f^2 f^2] / exp(2 x.y)) / d`` averaged over pairs with mean |x+y|^2 / d = rho."""
    return 0.5 * torch.log((1 - 4 * a) ** 2 / (1 - 8 * a)) + rho / (1 - 8 * a)


@pytest.mark.parametrize("rho", [None, 1.5])
def test_gerf_features_are_unbiased_and_positive(rho):
    """A = 0 (uncalibrated) and A = A*(1.5) < 0: mean over 2000 draws -> exp(x.y)."""
    d = 6
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(5, d, dtype=D64, generator=gen) * 0.3
    y = torch.randn(7, d, dtype=D64, generator=gen) * 0.3
    exact = torch.exp(x @ y.T)
    draws = []
    fm = GERFFeatures(d, 12, rho=rho).double()
    for seed in range(2000):
        fm.redraw(torch.Generator().manual_seed(seed))
        fx, fy = true_features(fm, x), true_features(fm, y)
        assert (fx > 0).all() and (fy > 0).all()
        draws.append(fx @ fy.T)
    assert (fm.A == 0).item() if rho is None else fm.A.item() < -0.25
    draws = torch.stack(draws)
    z = (draws.mean(0) - exact).abs() / (draws.std(0) / math.sqrt(len(draws)))
    assert z.max() < 5, z.max()
    assert ((draws.mean(0) - exact).abs() / exact).max() < 0.1
    torch.testing.assert_close(fm.kernel(x, y), exact)


def test_gerf_optimal_parameter_minimises_the_variance_bound():
    """A*(rho) equals a numerical minimiser of the pair-averaged log second moment."""
    grid = torch.linspace(-20, 0.1249, 2_000_001, dtype=D64)
    for rho in (0.0, 1e-6, 0.05, 0.5, 1.0, 3.0, 20.0):
        a_star = optimal_gerf_parameter(torch.tensor(rho, dtype=D64))
        values = log_second_moment_ratio(grid, rho)
        a_num = grid[values.argmin()]
        assert abs(a_star.item() - a_num.item()) < 2e-5 * (1 + abs(a_num.item())), rho
        closed = (1 - 2 * rho - math.sqrt((2 * rho + 1) ** 2 + 8 * rho)) / 16  # the paper's form
        assert math.isclose(a_star.item(), closed, rel_tol=1e-12, abs_tol=1e-15)
        assert a_star.item() <= 0
        assert log_second_moment_ratio(a_star, rho) <= log_second_moment_ratio(
            torch.tensor(0.0, dtype=D64), rho
        )


def test_gerf_has_lower_variance_than_favor_plus():
    """|x + y|^2 / d ~ 1: the measured relative MSE of the pair estimates drops clearly."""
    d, r = 8, 16
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, d, dtype=D64, generator=gen) / math.sqrt(2)
    y = torch.randn(6, d, dtype=D64, generator=gen) / math.sqrt(2)
    exact = torch.exp(x @ y.T)
    gerf = GERFFeatures(d, r, orthogonal=False).double()
    gerf.calibrate(x, y)
    pairs = (x[:, None] + y[None]).pow(2).sum(-1).mean() / d
    torch.testing.assert_close(gerf.rho, pairs, atol=1e-12, rtol=1e-12)
    assert 0.7 < gerf.rho.item() < 1.3 and gerf.A.item() < -0.2
    favor = PositiveRandomFeatures(d, r, orthogonal=False).double()
    mse = {"favor+": [], "favor++": []}
    for seed in range(400):
        for name, fm in (("favor+", favor), ("favor++", gerf)):
            fm.redraw(torch.Generator().manual_seed(seed))
            est = true_features(fm, x) @ true_features(fm, y).T
            mse[name].append(((est - exact) / exact).pow(2).mean())
    mse = {name: torch.stack(v).mean().item() for name, v in mse.items()}
    assert mse["favor++"] < 0.25 * mse["favor+"], mse


def test_gerf_calibration_statistic_mask_and_moving_average():
    d = 4
    fm = GERFFeatures(d, 8, momentum=0.25).double()
    assert not fm.calibrated and fm.adaptive and fm.A.item() == 0
    x = torch.randn(2, 5, 3, d, dtype=D64)  # [b, n, h, d]
    y = torch.randn(2, 5, 3, d, dtype=D64) + 0.5
    valid = torch.ones(2, 5, 1, dtype=torch.bool)
    valid[1, 3:] = False
    fm.calibrate(x, y, valid)
    xs, ys = x[valid.expand(2, 5, 3)], y[valid.expand(2, 5, 3)]  # valid vectors only
    first = (xs[:, None] + ys[None]).pow(2).sum(-1).mean() / d
    torch.testing.assert_close(fm.rho, first, atol=1e-12, rtol=1e-12)
    assert fm.calibrated
    fm.calibrate(x * 2, y * 2)
    second = (2 * x.reshape(-1, 1, d) + 2 * y.reshape(1, -1, d)).pow(2).sum(-1).mean() / d
    torch.testing.assert_close(fm.rho, 0.75 * first + 0.25 * second, atol=1e-12, rtol=1e-12)
    before = fm.rho.clone()
    fm.calibrate(x, y, torch.zeros(2, 5, 1, dtype=torch.bool))  # no valid token: no change
    assert torch.equal(fm.rho, before)
    fixed = GERFFeatures(d, 8, rho=0.5)
    fixed.calibrate(x.float(), y.float())
    assert fixed.rho.item() == 0.5 and not fixed.adaptive
    state = fm.state_dict()
    assert "rho" in state and "calibrated" in state
    clone = GERFFeatures(d, 8).double()
    clone.load_state_dict(state)
    assert torch.equal(clone.rho, fm.rho) and clone.calibrated
    clone.redraw()  # a redraw keeps the statistic
    assert torch.equal(clone.rho, fm.rho)


def test_gerf_uncalibrated_equals_favor_plus_and_stabilised_formula():
    d, r = 5, 9
    gerf = GERFFeatures(d, r).double()
    favor = PositiveRandomFeatures(d, r).double()
    favor.projection.copy_(gerf.projection)
    x = torch.randn(3, d, dtype=D64)
    for got, want in zip(gerf(x), favor(x), strict=True):
        assert torch.equal(got, want)
    gerf = GERFFeatures(d, r, rho=2.0).double()
    a, w = gerf.A, gerf.projection
    formula = (1 - 4 * a) ** (d / 4) * torch.exp(
        a * w.pow(2).sum(-1) + torch.sqrt(1 - 4 * a) * x @ w.T - 0.5 * x.pow(2).sum(-1, True)
    )
    torch.testing.assert_close(true_features(gerf, x), formula / 3.0, atol=1e-14, rtol=1e-12)
    phi, log_scale = gerf.float()(torch.randn(3, d) * 300)  # exp would overflow float32
    assert torch.isfinite(phi).all() and torch.isfinite(log_scale).all()
    assert phi.max() <= 1.0 / 3.0 + 1e-6


def test_build_gerf_and_bad_options():
    fm = build_feature_map("favor++", 4, 16, rho=1.0, momentum=0.5)
    assert isinstance(fm, GERFFeatures) and isinstance(fm, PositiveRandomFeatures)
    assert fm.num_features == 16 and fm.momentum == 0.5 and not fm.adaptive
    assert "rho=1" in repr(fm) and "rho=adaptive" in repr(build_feature_map("favor++", 4))
    with pytest.raises(ValueError, match="rho"):
        GERFFeatures(4, rho=-1.0)
    with pytest.raises(ValueError, match="momentum"):
        GERFFeatures(4, momentum=0.0)
    with pytest.raises(ValueError, match="features, expected 4"):
        GERFFeatures(4).calibrate(torch.randn(3, 5), torch.randn(3, 4))
