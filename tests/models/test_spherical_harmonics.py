"""Pure-torch real spherical harmonics: normalisation, orthonormality on the sphere, the
addition theorem, rotation-invariant power spectra, and e3nn's basis up to a rotation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from geolinrpe.data.point_clouds import random_rotation
from geolinrpe.models.spherical_harmonics import spherical_harmonics

LMAX = 8


def directions(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, generator=g, dtype=torch.float64) * 3


def degree(y: torch.Tensor, l: int) -> torch.Tensor:
    return y[..., l * l : (l + 1) ** 2]


def test_component_normalisation_and_addition_theorem():
    u, w = directions(200, 0), directions(200, 1)
    yu, yw = spherical_harmonics(LMAX, u), spherical_harmonics(LMAX, w)
    assert yu.shape == (200, (LMAX + 1) ** 2) and yu.dtype == torch.float64
    cos = ((u / u.norm(dim=-1, keepdim=True)) * (w / w.norm(dim=-1, keepdim=True))).sum(-1)
    for l in range(LMAX + 1):
        torch.testing.assert_close(
            degree(yu, l).square().sum(-1),
            torch.full((200,), 2.0 * l + 1, dtype=torch.float64),
            rtol=1e-12,
            atol=0,
        )
        legendre = np.polynomial.legendre.legval(cos.numpy(), [0] * l + [1])
        torch.testing.assert_close(
            (degree(yu, l) * degree(yw, l)).sum(-1),
            torch.from_numpy((2 * l + 1) * legendre),
            rtol=1e-10,
            atol=1e-10,
        )


def test_orthonormal_on_the_sphere():
    """Gauss-Legendre in z times a uniform grid in phi integrates these polynomials exactly:
    the mean over the sphere of Y_lm Y_l'm' is the identity (component normalisation)."""
    nodes, weights = np.polynomial.legendre.leggauss(LMAX + 2)
    phi = np.arange(2 * LMAX + 2) * 2 * math.pi / (2 * LMAX + 2)
    z, p = np.meshgrid(nodes, phi, indexing="ij")
    r = np.sqrt(1 - z**2)
    grid = torch.from_numpy(np.stack([r * np.cos(p), r * np.sin(p), z], -1).reshape(-1, 3))
    weight = torch.from_numpy(np.repeat(weights, len(phi)) / (2 * len(phi)))
    y = spherical_harmonics(LMAX, grid)
    gram = (y * weight[:, None]).T @ y
    torch.testing.assert_close(gram, torch.eye(y.shape[1], dtype=torch.float64), atol=1e-12, rtol=0)


def test_power_spectrum_is_rotation_invariant_and_gradients_are_finite_at_the_poles():
    v = directions(30)
    weights = torch.rand(30, dtype=torch.float64)
    rotation = random_rotation(3, generator=torch.Generator().manual_seed(3)).to(torch.float64)

    def power(vectors):
        density = (weights[:, None] * spherical_harmonics(LMAX, vectors)).sum(0)
        return torch.stack([degree(density, l).square().sum() for l in range(LMAX + 1)])

    torch.testing.assert_close(power(v @ rotation.T), power(v), rtol=1e-10, atol=1e-10)
    poles = torch.tensor([[0.0, 0.0, 2.0], [0.0, 0.0, -1.0]], dtype=torch.float64)
    poles.requires_grad_(True)
    spherical_harmonics(LMAX, poles).square().sum().backward()
    assert torch.isfinite(poles.grad).all()
    assert torch.isfinite(spherical_harmonics(3, torch.zeros(1, 3))).all()
    with pytest.raises(ValueError, match="lmax"):
        spherical_harmonics(-1, v)


def test_equals_e3nn_up_to_a_rotation_within_each_degree():
    o3 = pytest.importorskip("e3nn.o3")
    v = directions(300, 5)
    ours = spherical_harmonics(6, v)
    theirs = o3.spherical_harmonics(list(range(7)), v, normalize=True, normalization="component")
    for l in range(7):
        a, b = degree(ours, l), degree(theirs, l)
        rotation = torch.linalg.lstsq(a, b).solution  # b = a @ rotation
        torch.testing.assert_close(a @ rotation, b, atol=1e-9, rtol=0)
        eye = torch.eye(2 * l + 1, dtype=torch.float64)
        torch.testing.assert_close(rotation @ rotation.T, eye, atol=1e-9, rtol=0)
