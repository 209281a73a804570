r"""Local (window) RPE in 1D with learnable half-width and height (``"flt-local"``).

Axes: ``...`` leading axes, p position dim (1), h heads, m frequencies.

The window ``c 1[|Delta| <= a]`` has the signed spectrum ``2 a c sinc(2 a xi)``
(``sinc(x) = sin(pi x) / (pi x)``), which is not absolutely integrable. Hence no proposal
``p`` gives a usable Monte-Carlo estimate: ``E_p|g/p| = int |g| = infinity``, so the
importance-weighted cosines have no mean (sample means do not converge, for any ``p``).
This module therefore estimates the window smoothed by a Gaussian of width
``tau = softness * a``:

.. math::

    f(\Delta) = c\,(1_{[-a, a]} * N(0, \tau^2))(\Delta)
        = \frac{c}{2}\Big[\mathrm{erf}\Big(\frac{a - \Delta}{\sqrt2 \tau}\Big)
        + \mathrm{erf}\Big(\frac{a + \Delta}{\sqrt2 \tau}\Big)\Big], \qquad
    g(\xi) = 2 a c\, \mathrm{sinc}(2 a \xi)\, e^{-2 \pi^2 \tau^2 \xi^2}.

It equals the hard window up to ``|c| Phi(-d / tau)`` at distance ``d`` from the edges
``|Delta| = a`` (``3e-5 |c|`` at ``d = 4 tau``); ``closed_form`` is this smoothed ``f``
(exact) and :meth:`LocalRPE.hard_window` the box itself.

Sampler: the proposal is the smoothing Gaussian's own spectrum,
``p = N(0, (2 pi tau)^-2)``, by reparametrisation ``xi = eps / (2 pi softness a)`` with fixed
``eps ~ N(0, 1)``, so gradients reach ``a`` through the frequencies. The importance weights

.. math::

    \frac{g(\xi)}{p(\xi)} = \frac{2 c}{\sqrt{2\pi}\, \kappa}\,
        \mathrm{sinc}\Big(\frac{\epsilon}{\pi \kappa}\Big), \qquad \kappa = \mathrm{softness},

do not depend on ``a``, are signed and bounded by ``|c| sqrt(2 / pi) / softness``, with
``E[a_l^2] <= sqrt(2 / pi) c^2 / softness``: the variance of ``f_hat`` is at most
``0.8 c^2 / (softness m)`` (measured ``0.33-0.53 c^2 / (softness m)`` for ``|Delta| <= 3 a``
at ``softness = 0.2``). A sharper window (smaller ``softness``) costs proportionally more
frequencies.

Normalisation: ``f >= 0`` for ``c >= 0``, but ``f_hat`` is signed and, outside the window,
is zero-mean noise. With :class:`~geolinrpe.nn.RPEAttention` in mask mode use
``normalize="kernel"`` (its default): ``out_i = sum_j K_ij f_hat_ij v_j / sum_j K_ij``, and with
a positive kernel feature map ``|out_i| <= max_j |f_hat_ij| max_j |v_j|``. The masked
denominator ``sum_j K_ij f_hat_ij`` is unsafe: it can be 0 or negative (rows whose
neighbours lie outside the window) and the output is then unbounded. In logit mode ``f`` is
an additive bias (``amplitude=0`` is neutral).

Frequency sets (``frequencies=``, :mod:`geolinrpe.rpe.frequencies`): ``"mc"`` draws
``eps ~ N(0, 1)``; ``"qmc"`` uses scrambled Sobol points through the normal inverse CDF;
``"quadrature"`` uses the deterministic 1D lattice rule of the proposal (the weights are even
in ``eps``, so the rule is folded), built for offsets ``|Delta| <= quadrature_range * a``.
The rule is periodic: offsets near ``rule.period * softness * a`` see the window again, so a
sequence longer than that period needs more frequencies (or ``"mc"``, whose error is noise
instead of an image).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import FourierRPE
from .frequencies import QUADRATURE_RANGE, check_frequencies, check_range, lattice_rule, normal


class LocalRPE(FourierRPE):
    r"""Smoothed window ``f_h(Delta) = c_h (1[|Delta| <= a_h] * N(0, (softness a_h)^2))``.

    Local RPE of Choromanski et al., `"Learning a Fourier Transform for Linear Relative
    Positional Encodings in Transformers" <https://arxiv.org/abs/2302.01925>`_
    (AISTATS 2024), estimated with random Fourier features. See the module docstring for
    why the window is smoothed, the sampler and the normalisation.

    .. math::

        \hat f_h(\Delta) = \frac{1}{m} \sum_{l=1}^m
            \frac{2 c_h}{\sqrt{2\pi}\,\kappa} \mathrm{sinc}\Big(\frac{\epsilon_{hl}}{\pi\kappa}\Big)
            \cos\Big(\frac{\epsilon_{hl} \Delta}{\kappa a_h}\Big)

    Args:
        pos_dim: position dimension; must be 1 (a 1D window).
        num_heads: number of heads ``h``.
        num_frequencies: frequencies ``m`` per head (default 64).
        half_width: initial half-width ``a > 0`` in position units (default 1.0; learned as
            ``log a``).
        amplitude: initial height ``c`` (default 1.0; 0.0 is the neutral logit-mode bias).
        softness: edge width ``tau / a`` of the Gaussian smoothing, fixed (default 0.2).
        frequencies: ``"mc"`` (default), ``"qmc"`` or ``"quadrature"`` (module docstring).
        quadrature_range: offsets ``|Delta| <= quadrature_range * a`` the lattice rule is
            optimised for (default 3.0, in initial half-widths; ``"quadrature"`` only).

    Shapes:
        ``spectrum()`` -> ``xi [h, m, 1]``, ``weight [h, m]``;
        ``closed_form(delta [..., 1])`` and ``hard_window(delta [..., 1])`` -> ``[..., h]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        num_frequencies: int = 64,
        half_width: float = 1.0,
        amplitude: float = 1.0,
        softness: float = 0.2,
        frequencies: str = "mc",
        quadrature_range: float = QUADRATURE_RANGE,
    ) -> None:
        super().__init__(pos_dim, num_heads, num_frequencies)
        if pos_dim != 1:
            raise ValueError(f"pos_dim must be 1 (LocalRPE is a 1D window), got {pos_dim}")
        if not half_width > 0:
            raise ValueError(f"half_width must be positive, got {half_width}")
        if not softness > 0:
            raise ValueError(
                f"softness must be positive (the hard window has no Monte-Carlo estimate), "
                f"got {softness}"
            )
        self.init_half_width = float(half_width)
        self.init_amplitude = float(amplitude)
        self.softness = float(softness)
        self.frequencies = check_frequencies(frequencies)
        self.quadrature_range = check_range(quadrature_range)
        if self.frequencies == "quadrature":  # standardised offsets: Delta / (softness a)
            range_ = self.quadrature_range / softness
            self.rule = lattice_rule(1, num_frequencies, "gaussian", range_)
        self.log_half_width = nn.Parameter(torch.empty(num_heads))
        self.amplitude = nn.Parameter(torch.empty(num_heads))
        self.register_buffer("base_noise", torch.empty(num_heads, num_frequencies))
        self.register_buffer("base_weights", torch.ones(num_heads, num_frequencies), False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.log_half_width.fill_(math.log(self.init_half_width))
            self.amplitude.fill_(self.init_amplitude)
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New ``eps`` (``"mc"``, ``"qmc"``); the fixed rule (``"quadrature"``)."""
        if self.frequencies == "quadrature":
            eps = self.rule.nodes[:, 0].expand(self.num_heads, -1)
            weights = self.num_frequencies * self.rule.weights.expand(self.num_heads, -1)
            self.base_weights.copy_(weights)
        else:
            shape = tuple(self.base_noise.shape)
            eps = normal((*shape, 1), self.frequencies, generator)[..., 0]
        self.base_noise.copy_(eps)

    @property
    def half_width(self) -> Tensor:
        """``a [h]``."""
        return self.log_half_width.exp()

    def spectrum(self) -> tuple[Tensor, Tensor]:
        kappa, eps = self.softness, self.base_noise
        xi = eps / (2 * math.pi * kappa * self.half_width[:, None])
        ratio = torch.sinc(eps / (math.pi * kappa)) * (2 / (math.sqrt(2 * math.pi) * kappa))
        weight = self.amplitude[:, None] * ratio * self.base_weights.to(ratio)
        return xi[..., None], weight

    def spectral_density(self, xi: Tensor) -> Tensor:
        """``g(xi) = 2 a c sinc(2 a xi) exp(-2 pi^2 tau^2 xi^2)``: ``[h, ...]`` -> ``[h, ...]``."""
        shape = (self.num_heads,) + (1,) * (xi.dim() - 1)
        a, c = self.half_width.view(shape), self.amplitude.view(shape)
        tau = self.softness * a
        return 2 * a * c * torch.sinc(2 * a * xi) * torch.exp(-2 * math.pi**2 * tau**2 * xi**2)

    def closed_form(self, delta: Tensor) -> Tensor:
        a = self.half_width.to(delta.dtype)
        c = self.amplitude.to(delta.dtype)
        scale = math.sqrt(2) * self.softness * a
        return c / 2 * (torch.erf((a - delta) / scale) + torch.erf((a + delta) / scale))

    def hard_window(self, delta: Tensor) -> Tensor:
        """The unsmoothed ``c 1[|Delta| <= a]`` (plots; ``closed_form`` is what is estimated)."""
        a = self.half_width.to(delta.dtype)
        return self.amplitude.to(delta.dtype) * (delta.abs() <= a).to(delta.dtype)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", softness={self.softness}"
