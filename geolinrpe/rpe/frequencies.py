r"""Frequency sets for Fourier RPEs: Monte Carlo, randomised quasi-Monte Carlo, quadrature.

A Fourier RPE estimates ``f(Delta) = E_(eps ~ p)[a(eps) cos(eps . Delta)]`` (standardised
frequencies ``eps``, a base density ``p`` and importance weights ``a``; each family maps
``eps`` to its frequencies ``xi``). The estimate is ``sum_l w_l a(eps_l) cos(eps_l . Delta)``
over ``m`` nodes ``eps_l`` with weights ``w_l``. Three ways to pick them (``frequencies=``):

* ``"mc"``: independent draws from ``p``, ``w_l = 1 / m`` (orthogonal blocks where a family
  offers them). Unbiased; error ``~ m^-1/2``; ``redraw`` renews them.
* ``"qmc"``: randomised quasi-Monte Carlo. A scrambled Sobol sequence (``torch.quasirandom``,
  linear matrix scrambling plus a random digital shift: every point is uniform on the unit
  cube) pushed through each family's sampler by inverse CDFs, ``w_l = 1 / m``. Unbiased for
  every draw, so redraws still work; for smooth integrands the error falls faster than Monte
  Carlo (``(log m)^P / m`` asymptotically).
* ``"quadrature"``: a deterministic lattice rule (:func:`lattice_rule`): the nodes are the
  points of a lattice with spacing ``s`` inside a ball (:data:`LATTICES`), with weights
  ``w_l = v s^P p(eps_l)`` (``v`` the unit cell's volume: the trapezoidal rule), folded over
  ``+-eps`` because cosines are even (one frequency per pair: its ``cos`` and ``sin``
  features). Nothing is random; ``redraw`` is a no-op.

What a lattice rule resolves. By Poisson summation the untruncated rule is exactly the
periodisation ``sum_j f(Delta + T_j)`` over the aliased images ``T_j`` (``2 pi / s`` times the
dual lattice; the nearest at distance ``T = rule.period``), in the units of ``Delta`` in which
``eps`` has unit scale (lengthscales for the kernel families). Truncating to the ball
``|eps| <= E`` drops the spectral mass beyond ``E``. With ``m`` frequencies the ball holds
``~2m`` nodes, so ``s`` and ``E`` trade against each other: :func:`lattice_rule` chooses ``s``
to minimise the relative RMS error over offsets ``|Delta| <= range`` (3 lengthscales by
default). Beyond ``T - range`` the estimate sees the next image of ``f``: **a low-rank
estimate cannot resolve a lengthscale much shorter than the cloud's extent**. The number of
nodes a rule needs grows like ``(range x bandwidth)^P``: the Gaussian in 3D reaches 6.9e-3 at
``m = 64`` and 6.4e-5 at ``m = 256`` over 3 lengthscales, but a molecule 8 Å across with a
0.5 Å lengthscale spans 16 lengthscales and would need ``(16 / 3)^3 ~ 150`` times as many
frequencies; heavy-tailed spectra (Matern-3/2, Laplace) converge slowly in 3D (their kernels
have little smoothness at 0). Monte Carlo has no period, but its error (``~ m^-1/2 f(0)``) is
the same at every offset, so it resolves no lengthscale either.

Axes: n nodes, p position dim.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor

FREQUENCY_SETS = ("mc", "qmc", "quadrature")
#: default range of offsets (in the rule's length units) a lattice rule is optimised for
QUADRATURE_RANGE = 3.0


def check_frequencies(value: str) -> str:
    """``value`` if it names a frequency set, else ValueError."""
    if value not in FREQUENCY_SETS:
        raise ValueError(f"frequencies must be one of {FREQUENCY_SETS}, got {value!r}")
    return value


def check_range(value: float) -> float:
    """``value`` as a float if positive and finite, else ValueError."""
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"quadrature_range must be positive, got {value}")
    return value


# ----------------------------------------------------------------------------- random draws
def sobol_uniform(n: int, dim: int, generator: torch.Generator | None = None) -> Tensor:
    """``[n, dim]`` float64 scrambled Sobol points; each point is uniform on ``(0, 1)^dim``.

    The scrambling seed comes from ``generator`` (or the global RNG), so a seeded generator
    reproduces the draw. Points are kept away from 0 and 1 by ``2^-53`` so that inverse CDFs
    stay finite.
    """
    seed = int(torch.randint(0, 2**62, (1,), generator=generator).item())
    engine = torch.quasirandom.SobolEngine(dim, scramble=True, seed=seed)
    points = engine.draw(n, dtype=torch.float64)
    return points.clamp(2.0**-53, 1 - 2.0**-53)


def uniform(
    shape: tuple[int, ...], frequencies: str, generator: torch.Generator | None = None
) -> Tensor:
    """Uniform ``(0, 1)`` draws of ``shape [..., n, dim]`` in float64: independent (``"mc"``)
    or one scrambled Sobol sequence of ``n`` points per leading index (``"qmc"``)."""
    if frequencies == "mc":
        return torch.rand(shape, generator=generator, dtype=torch.float64)
    if frequencies != "qmc":
        raise ValueError(f"uniform draws are for 'mc' or 'qmc', got {frequencies!r}")
    *lead, n, dim = shape
    count = math.prod(lead)
    points = [sobol_uniform(n, dim, generator) for _ in range(count)]
    return torch.stack(points).reshape(shape) if points else torch.empty(shape)


def blocks(component: Tensor, draw: Callable[[int], Tensor]) -> Tensor:
    """Stack ``draw(m_k)`` (``[..., m_k, dim]``) into the slots ``component == k``
    (``[..., m, dim]``): one quasi-random sequence per component of a stratified sampler.

    A scrambled Sobol sequence split by ``l mod K`` is far from uniform within each stride
    (base-2 strides of a base-2 sequence fall in one corner of the cube), so each component
    gets a sequence of its own."""
    parts = {int(k): draw(int((component == k).sum())) for k in torch.unique(component)}
    first = next(iter(parts.values()))
    out = first.new_empty(*first.shape[:-2], len(component), first.shape[-1])
    for k, part in parts.items():
        out[..., component == k, :] = part
    return out


def normal(
    shape: tuple[int, ...], frequencies: str, generator: torch.Generator | None = None
) -> Tensor:
    """Standard normal draws ``[..., n, dim]`` in float64: ``"mc"`` independent, ``"qmc"``
    scrambled Sobol points through the normal inverse CDF (``ndtri``), per leading index."""
    if frequencies == "mc":
        return torch.randn(shape, generator=generator, dtype=torch.float64)
    return torch.special.ndtri(uniform(shape, frequencies, generator))


def gamma_icdf(u: Tensor, shape: float) -> Tensor:
    """Inverse CDF of ``Gamma(shape, 1)`` at ``u`` (float64, bisection on ``gammainc``;
    120 halvings of a bracket that grows until it holds every quantile: exact to rounding
    down to quantiles ``~1e-30``)."""
    u = u.double()
    lo = torch.zeros_like(u)
    hi = torch.full_like(u, max(1.0, 2 * shape))
    while bool((torch.special.gammainc(torch.full_like(hi, shape), hi) < u).any()):
        hi = hi * 2
    for _ in range(120):
        mid = (lo + hi) / 2
        below = torch.special.gammainc(torch.full_like(mid, shape), mid) < u
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    return (lo + hi) / 2


# ----------------------------------------------------------------------------- lattice rules
class LatticeRule(NamedTuple):
    """A lattice rule for ``E_p[a(eps) cos(eps . Delta)]`` (see :func:`lattice_rule`).

    Attributes:
        nodes: ``[m, p]`` float64; unused slots (the ball held fewer nodes) are 0.
        weights: ``[m]`` float64, ``v s^P p(eps)`` (doubled for a folded ``+-eps`` pair); 0 in
            unused slots.
        spacing: lattice spacing ``s``.
        radius: radius ``E`` of the ball of nodes.
        period: distance ``T`` from the origin to the nearest aliased image of ``f`` (the
            shortest vector of ``2 pi / s`` times the dual lattice).
        volumes: ``[m]`` float64, the lattice cell's volume ``v s^P`` (doubled for a folded
            pair; 0 in unused slots): ``weights = volumes * p(nodes)``. A rule for another
            integrand ``G`` on the same nodes has weights ``volumes * G(nodes)``.
        range: offsets ``|Delta| <= range`` the rule was optimised for.
        error: relative RMS error ``rms(f_hat - k) / rms(k)`` of the rule for its own kernel
            ``k`` on those offsets (see :func:`lattice_rule`).
    """

    nodes: Tensor
    weights: Tensor
    volumes: Tensor
    spacing: float
    radius: float
    period: float
    range: float
    error: float


#: generator matrices (rows are basis vectors) of the node lattices: the integers in 1D, the
#: hexagonal lattice in 2D and the body-centred cubic lattice in 3D. Their duals (the
#: lattices of aliased images of ``f``) are the densest circle and sphere packings, so for a
#: given distance to the nearest image they need the fewest nodes: 1.15x (2D) and 1.41x (3D)
#: fewer than the square and cubic lattices.
LATTICES = {
    1: ((1.0,),),
    2: ((1.0, 0.0), (0.5, math.sqrt(3) / 2)),
    3: ((-0.5, 0.5, 0.5), (0.5, -0.5, 0.5), (0.5, 0.5, -0.5)),
}


def _ball_points(pos_dim: int, count: int, fold: bool) -> tuple[Tensor, float]:
    """Points of the unit-spacing node lattice (:data:`LATTICES`; cubic beyond 3D) in the
    largest centred ball (whole shells) with at most ``count`` nodes: one of each ``+-``
    pair plus the origin (``fold``), or all of them. Returns ``(points [n, p], cell volume)``."""
    basis = torch.tensor(
        LATTICES.get(pos_dim, torch.eye(pos_dim).tolist()), dtype=torch.float64
    )  # [p, p], rows
    volume_cell = float(torch.linalg.det(basis).abs())
    ball = math.pi ** (pos_dim / 2) / math.gamma(pos_dim / 2 + 1)
    total = 2 * count if fold else count
    reach = (total * volume_cell / ball) ** (1 / pos_dim)  # ball radius holding `total` nodes
    extent = int(math.ceil(reach * 2)) + 2  # integer coefficients (basis vectors >= 0.7)
    axis = torch.arange(-extent, extent + 1, dtype=torch.float64)
    coeffs = torch.stack(torch.meshgrid(*[axis] * pos_dim, indexing="ij"), -1).reshape(-1, pos_dim)
    if fold:  # the lexicographically positive half of the coefficients, and the origin
        nonzero = coeffs != 0
        first = torch.where(nonzero.any(-1), nonzero.double().argmax(-1), 0)
        lead = coeffs.gather(-1, first[:, None])[:, 0]
        coeffs = coeffs[(lead > 0) | ~nonzero.any(-1)]
    grid = coeffs @ basis
    norms = grid.pow(2).sum(-1)
    order = torch.argsort(norms, stable=True)
    grid, norms = grid[order], norms[order]
    # whole shells only: cut where the next point starts a shell that does not fit
    keep = min(count, len(norms))
    while 0 < keep < len(norms) and bool(torch.isclose(norms[keep], norms[keep - 1])):
        keep -= 1
    return grid[:keep], volume_cell


def _dual_shortest(pos_dim: int) -> float:
    """Length of the shortest non-zero vector of the dual of the unit node lattice."""
    basis = torch.tensor(LATTICES.get(pos_dim, torch.eye(pos_dim).tolist()), dtype=torch.float64)
    dual = torch.linalg.inv(basis).T  # rows: dual basis
    axis = torch.arange(-2, 3, dtype=torch.float64)
    coeffs = torch.stack(torch.meshgrid(*[axis] * pos_dim, indexing="ij"), -1).reshape(-1, pos_dim)
    lengths = (coeffs @ dual).norm(dim=-1)
    return float(lengths[lengths > 1e-9].min())


def _test_offsets(pos_dim: int, range_: float) -> Tensor:
    """Deterministic offsets ``|Delta| <= range`` in every direction: ``[k, p]`` float64."""
    count = 31
    # radii at the quantiles of |Delta| for offsets uniform in the ball (density ~ r^(p-1))
    radii = range_ * ((torch.arange(count, dtype=torch.float64) + 0.5) / count) ** (1 / pos_dim)
    if pos_dim == 1:
        directions = torch.ones(1, 1, dtype=torch.float64)
    else:
        count = 16 if pos_dim == 2 else 48
        g = torch.Generator().manual_seed(12345)
        directions = torch.randn(count, pos_dim, generator=g, dtype=torch.float64)
        directions = directions / directions.norm(dim=-1, keepdim=True)
    return (radii[:, None, None] * directions[None]).reshape(-1, pos_dim)


@lru_cache(maxsize=128)
def _lattice_rule_cached(
    pos_dim: int, num_frequencies: int, family: str, range_: float, fold: bool
) -> LatticeRule:
    density, kernel = DENSITIES[family]
    points, cell = _ball_points(pos_dim, num_frequencies, fold)
    is_origin = (points == 0).all(-1)
    pair = torch.where(is_origin, 1.0, 2.0) if fold else torch.ones(len(points))
    offsets = _test_offsets(pos_dim, range_)
    target = kernel(offsets.norm(dim=-1), pos_dim)
    reach = float(points.norm(dim=-1).max()) if len(points) > 1 else 1.0

    def rule(spacing: float) -> tuple[Tensor, Tensor, float]:
        nodes = points * spacing
        weights = cell * spacing**pos_dim * density(nodes, pos_dim) * pair.to(nodes)
        estimate = torch.cos(offsets @ nodes.T) @ weights
        error = (estimate - target).pow(2).mean() / target.pow(2).mean()
        return nodes, weights, float(error.sqrt())

    # the ball radius E = spacing * reach: search the spacing on a log grid, then refine
    spacings = torch.logspace(math.log10(0.5 / reach), math.log10(40.0 / reach), 100).tolist()
    errors = [rule(s)[2] for s in spacings]
    best = min(range(len(spacings)), key=errors.__getitem__)
    lo = spacings[max(best - 1, 0)]
    hi = spacings[min(best + 1, len(spacings) - 1)]
    for _ in range(40):  # golden-section on [lo, hi]
        a, b = lo + 0.382 * (hi - lo), lo + 0.618 * (hi - lo)
        if rule(a)[2] < rule(b)[2]:
            hi = b
        else:
            lo = a
    spacing = (lo + hi) / 2
    if rule(spacing)[2] > errors[best]:
        spacing = spacings[best]
    # among near-optimal spacings prefer the smallest: the longest period (1D rules reach
    # rounding error over a wide range of spacings)
    tolerance = max(min(errors[best], rule(spacing)[2]), 1e-13)
    spacing = min([s for s, e in zip(spacings, errors, strict=True) if e <= tolerance] + [spacing])
    nodes, weights, error = rule(spacing)
    m = num_frequencies
    padded_nodes = torch.zeros(m, pos_dim, dtype=torch.float64)
    padded_weights = torch.zeros(m, dtype=torch.float64)
    padded_nodes[: len(nodes)] = nodes
    padded_weights[: len(nodes)] = weights
    padded_volumes = torch.zeros(m, dtype=torch.float64)
    padded_volumes[: len(nodes)] = cell * spacing**pos_dim * pair.to(nodes)
    return LatticeRule(
        padded_nodes,
        padded_weights,
        padded_volumes,
        spacing,
        spacing * reach,
        2 * math.pi * _dual_shortest(pos_dim) / spacing,
        range_,
        error,
    )


def lattice_rule(
    pos_dim: int,
    num_frequencies: int,
    family: str = "gaussian",
    range_: float = QUADRATURE_RANGE,
    fold: bool = True,
) -> LatticeRule:
    r"""Deterministic lattice rule with ``num_frequencies`` slots for the standardised
    spectral density ``family`` (:data:`DENSITIES`: ``p`` and its kernel ``k(|Delta|)``).

    Nodes: the lattice of :data:`LATTICES` with spacing ``s`` inside the largest ball (whole
    shells) that fits the slots;
    with ``fold`` one node per ``+-`` pair (plus the origin), valid when the integrand is
    even in ``eps`` (``cos``; a weight ``a`` even in ``eps``). Weights ``v s^P p(eps)`` (twice
    that for a pair; ``v`` the unit cell's volume). The spacing ``s`` minimises the relative
    RMS error ``rms(f_hat - k) / rms(k)`` over offsets uniform in the ball
    ``|Delta| <= range_`` (31 radius quantiles, 1 / 16 / 48 fixed directions in 1D / 2D / 3D).
    Results are cached; returns float64 tensors (clone before modifying).
    """
    if family not in DENSITIES:
        raise ValueError(f"no lattice rule for {family!r}; known: {sorted(DENSITIES)}")
    return _lattice_rule_cached(pos_dim, num_frequencies, family, float(range_), fold)


# ------------------------------------------------------------- radial Fourier transforms
#: radial grid points of :func:`radial_fourier_transform`
RADIAL_POINTS = 384


def radial_fourier_transform(values: Tensor, step: Tensor, kappa: Tensor, pos_dim: int) -> Tensor:
    r"""Fourier transform ``G(kappa) = int F(|x|) exp(-i kappa . x) d^P x`` of radial functions.

    ``values [..., n]`` holds ``F`` at the radii ``x_j = j step`` (``j = 0 .. n - 1``, ``step
    [...]`` per leading index; ``F`` is taken as 0 beyond the grid), ``kappa [..., k]`` the
    wave numbers ``|eps|``. Trapezoidal rule on
    ``2 int F cos(kappa x) dx`` (1D), ``2 pi int x F J_0(kappa x) dx`` (2D),
    ``4 pi int x^2 F sin(kappa x) / (kappa x) dx`` (3D). Differentiable in ``values``.
    Returns ``[..., k]``.
    """
    n = values.shape[-1]
    x = torch.arange(n, dtype=values.dtype, device=values.device) * step[..., None]  # [..., n]
    trapezoid = torch.ones(n, dtype=values.dtype, device=values.device)
    trapezoid[0] = trapezoid[-1] = 0.5
    arg = kappa[..., :, None] * x[..., None, :]  # [..., k, n]
    if pos_dim == 1:
        kernel = 2 * torch.cos(arg)
    elif pos_dim == 2:
        kernel = 2 * math.pi * x[..., None, :] * torch.special.bessel_j0(arg)
    elif pos_dim == 3:
        kernel = 4 * math.pi * x[..., None, :] ** 2 * torch.sinc(arg / math.pi)
    else:
        raise ValueError(f"radial transforms are for pos_dim 1, 2 or 3, got {pos_dim}")
    return (kernel * (trapezoid * values)[..., None, :]).sum(-1) * step[..., None]


# ----------------------------------------------------------- standardised spectral densities
def _gaussian_density(eps: Tensor, p: int) -> Tensor:
    return torch.exp(-eps.pow(2).sum(-1) / 2) / (2 * math.pi) ** (p / 2)


def _gaussian_kernel(r: Tensor, p: int) -> Tensor:
    return torch.exp(-(r**2) / 2)


def _student(dof: int) -> tuple[Callable, Callable]:
    """Multivariate t with ``dof`` degrees of freedom (the spectrum of a Matern kernel with
    ``nu = dof / 2``, in the reparametrisation ``eps = z sqrt(dof / u)``) and its kernel."""

    def density(eps: Tensor, p: int) -> Tensor:
        log_norm = (
            math.lgamma((dof + p) / 2) - math.lgamma(dof / 2) - p / 2 * math.log(dof * math.pi)
        )
        return torch.exp(log_norm - (dof + p) / 2 * torch.log1p(eps.pow(2).sum(-1) / dof))

    def kernel(r: Tensor, p: int) -> Tensor:
        s = math.sqrt(dof) * r
        if dof == 1:
            return torch.exp(-s)
        if dof == 3:
            return (1 + s) * torch.exp(-s)
        return (1 + s + s**2 / 3) * torch.exp(-s)

    return density, kernel


def _cauchy_density(eps: Tensor, p: int) -> Tensor:
    if p != 1:
        raise ValueError(
            "no lattice rule for the cauchy kernel in p >= 2 (its spectral density is "
            "singular at 0); use frequencies='qmc' or 'mc'"
        )
    return torch.exp(-eps.abs().sum(-1)) / 2


def _cauchy_kernel(r: Tensor, p: int) -> Tensor:
    return 1 / (1 + r**2)


#: standardised spectral densities ``p(eps)`` (``eps`` in ``[..., p]``) with their kernels
#: ``k(r, p) = E_p[cos(eps . Delta)]`` at ``r = |Delta|``, as in :mod:`geolinrpe.rpe.kernel`
DENSITIES: dict[str, tuple[Callable, Callable]] = {
    "gaussian": (_gaussian_density, _gaussian_kernel),
    "laplace": _student(1),
    "matern32": _student(3),
    "matern52": _student(5),
    "cauchy": (_cauchy_density, _cauchy_kernel),
}
