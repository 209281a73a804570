"""Feature maps estimate (or equal) the kernels they claim, stay finite and redraw on demand."""

import math

import pytest
import torch

from geolinrpe.features import (
    ELUFeatures,
    IdentityFeatures,
    PositiveRandomFeatures,
    ReLUFeatures,
    build_feature_map,
    gaussian_orthogonal_matrix,
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
