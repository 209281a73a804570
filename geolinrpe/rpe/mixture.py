r"""FLT RPE with a learned Gaussian-mixture spectral density (``"flt-gm"``).

Per head, ``K`` components with signed weights ``w_k``, centres ``mu_k`` and widths
``sigma_k``:

.. math::

    g(\xi) = \sum_k w_k \exp(-|\xi - \mu_k|^2 / \sigma_k^2), \qquad
    \mathrm{Re} f(\Delta) = \sum_k W_k \exp(-\pi^2 \sigma_k^2 |\Delta|^2)
        \cos(2 \pi \mu_k \cdot \Delta), \quad W_k = w_k (\pi \sigma_k^2)^{p/2},

since ``exp(-|xi - mu|^2 / sigma^2) = (pi sigma^2)^(p/2) N(xi; mu, sigma^2 / 2 I)`` and the
Fourier transform of ``N(mu, s^2 I)`` is ``exp(2 pi i mu . Delta - 2 pi^2 s^2 |Delta|^2)``.
``W_k`` is the mass of component ``k`` and ``f(0) = sum_k W_k``.

Two samplers (``sampler=``):

* ``"mixture"`` (default): each component is sampled from its own normalised density,
  ``xi = mu_k + sigma_k eps / sqrt(2)`` with fixed ``eps ~ N(0, I_p)``, stratified: frequency
  ``l`` belongs to component ``k(l) = l mod K``, so component ``k`` gets ``m_k`` draws
  (``floor(m / K)``, one more for ``k < m mod K``). The stratified estimate
  ``sum_k W_k m_k^-1 sum_(l in k) cos(2 pi xi_l . Delta)`` written as
  ``m^-1 sum_l a_l cos(2 pi xi_l . Delta)`` has the importance weights
  ``a_l = (m / m_k) W_k``: constant per component, bounded, signed like ``w_k``
  (``K W_k`` when ``K`` divides ``m``), and ``f_hat(0) = f(0)`` exactly for every draw.
  Gradients reach ``w`` and ``sigma`` through ``a`` and ``mu``, ``sigma`` through ``xi``
  (reparametrisation). Needs ``m >= K`` (every component must be sampled). (Drawing each
  frequency's component at random with probability ``|W_k| / sum_j |W_j|`` would give
  ``a = sign(w_k) sum_j |W_j|`` instead, but then the allocation depends on ``w`` through a
  discrete draw that carries no gradient, and the estimate is noisier.)
  Widths are ``sigma = exp(raw)``, unbounded.
* ``"proposal"``: fixed ``xi = s eps`` from ``p = N(0, s^2 I)`` (``s = proposal_scale``) and
  ``a = g(xi) / p(xi)``. The ratio ``exp(-|xi - mu|^2 / sigma^2 + |xi|^2 / (2 s^2))`` is
  unbounded when ``sigma^2 >= 2 s^2`` (and the estimate has infinite variance when
  ``sigma^2 >= 4 s^2``), so the widths are parametrised as
  ``sigma = sigma_max sigmoid(raw)`` with ``sigma_max < sqrt(2) s`` (default
  ``sigma_max = s``); then
  ``|a| <= sum_k |w_k| (2 pi s^2)^(p/2) exp(|mu_k|^2 / (2 s^2 - sigma_k^2))``.
  Components far from the proposal's bulk (``|mu_k| >> s``) still give large weights:
  this sampler suits spectra concentrated within a few ``s`` of 0.

Both estimates are signed (cosines, and ``w_k`` may be negative): in mask mode use
``normalize="kernel"`` (the default of :class:`~geolinrpe.nn.RPEAttention`); the masked
denominator ``sum_j K_ij f_hat_ij`` can reach 0. In logit mode ``f`` is an additive bias and
the zero initialisation ``w = 0`` (``f = 0``) is neutral.

Frequency sets (``frequencies=``, :mod:`geolinrpe.rpe.frequencies`): ``"mc"`` draws
``eps ~ N(0, I)``; ``"qmc"`` uses scrambled Sobol points through the normal inverse CDF (one
sequence per head and component); ``"quadrature"`` uses
deterministic lattice rules:

* ``sampler="mixture"``: component ``k`` gets an unfolded Gaussian lattice rule with its
  ``m_k`` slots (``xi = mu_k + sigma_k eps / sqrt(2)`` is not symmetric about 0, so the rule is
  not folded), optimised for offsets within ``quadrature_range`` of the component's length
  scale ``1 / (sqrt(2) pi sigma_k)``; weight ``m w_l W_k``. With few slots per component
  (the default ``m = 32``, ``K = 25`` gives 1-2) the rule sees little more than each
  component's centre ``mu_k``: use ``m >> K``.
* ``sampler="proposal"``: the proposal's folded lattice rule, with the symmetrised weights
  ``(g(xi) + g(-xi)) / (2 p(xi))`` (the same ``E_p[. cos]``), for offsets
  ``|Delta| <= quadrature_range / (2 pi s)``.

Axes: ``...`` leading axes, p position dim, h heads, k components, m frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .base import FourierRPE, _check_positive_ints
from .frequencies import (
    QUADRATURE_RANGE,
    blocks,
    check_frequencies,
    check_range,
    lattice_rule,
    normal,
)

SAMPLERS = ("mixture", "proposal")


class GaussianMixtureRPE(FourierRPE):
    r"""Learned Gaussian-mixture spectral density per head (``"flt-gm"``).

    FourierLearner-Transformer RPE from Choromanski et al., `"Learning a Fourier Transform
    for Linear Relative Positional Encodings in Transformers"
    <https://arxiv.org/abs/2302.01925>`_ (AISTATS 2024), whose code uses 25 components per
    head, a zero (neutral) initialisation and 32-64 frequencies. The spectral density and
    the samplers are described in the module docstring:

    .. math::

        g_h(\xi) = \sum_{k=1}^K w_{hk} e^{-|\xi - \mu_{hk}|^2 / \sigma_{hk}^2}, \qquad
        \hat f_h(\Delta) = \frac{1}{m} \sum_{l=1}^m a_{hl} \cos(2 \pi \xi_{hl} \cdot \Delta)

    Args:
        pos_dim: position dimension ``p`` (any positive int; 1, 2, 3 in practice).
        num_heads: number of heads ``h``.
        num_frequencies: frequencies ``m`` per head (default 32; ``>= num_components`` for
            ``sampler="mixture"``).
        num_components: mixture components ``K`` per head (default 25).
        sampler: ``"mixture"`` (default; sample each component, constant weights) or
            ``"proposal"`` (fixed Gaussian proposal, weights ``g/p``).
        proposal_scale: standard deviation ``s`` of the proposal ``N(0, s^2 I)``
            (``sampler="proposal"`` only; default 1.0).
        sigma_max: upper bound on the widths ``sigma`` (``sampler="proposal"`` only); must
            be below ``sqrt(2) proposal_scale`` (default: ``proposal_scale``).
        init_weight: initial ``w``, a float or a tensor broadcastable to ``[h, K]``
            (default 0.0: ``f = 0``, the neutral logit-mode bias).
        init_sigma: initial width of every component in frequency units (default 0.5 with
            ``sampler="mixture"``, ``sigma_max / 2`` with ``"proposal"``; must be below
            ``sigma_max``). ``sigma = 0.5`` gives ``f`` a Gaussian envelope of length scale
            ``1 / (sqrt(2) pi sigma) = 0.45`` position units.
        init_mu_std: the centres start at ``N(0, init_mu_std^2 I)`` (default 0.5).
        frequencies: ``"mc"`` (default), ``"qmc"`` or ``"quadrature"`` (module docstring).
        quadrature_range: range of offsets the lattice rules are optimised for (default 3.0;
            module docstring).

    Shapes:
        ``spectrum()`` -> ``xi [h, m, p]``, ``weight [h, m]``;
        ``closed_form(delta [..., p])`` -> ``[..., h]``.
    """

    #: logit first: the default zero initialisation (``f = 0``) is a neutral logit bias but
    #: a mask that switches attention off
    modes = ("logit", "mask")

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        num_frequencies: int = 32,
        num_components: int = 25,
        sampler: str = "mixture",
        proposal_scale: float | None = None,
        sigma_max: float | None = None,
        init_weight: float | Tensor = 0.0,
        init_sigma: float | None = None,
        init_mu_std: float = 0.5,
        frequencies: str = "mc",
        quadrature_range: float = QUADRATURE_RANGE,
    ) -> None:
        super().__init__(pos_dim, num_heads, num_frequencies)
        _check_positive_ints(num_components=num_components)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if init_sigma is not None and not init_sigma > 0:
            raise ValueError(f"init_sigma must be positive, got {init_sigma}")
        if not init_mu_std >= 0:
            raise ValueError(f"init_mu_std must be non-negative, got {init_mu_std}")
        if sampler == "mixture":
            if num_frequencies < num_components:
                raise ValueError(
                    f"num_frequencies={num_frequencies} must be >= num_components="
                    f"{num_components} with sampler='mixture' (every component needs a draw)"
                )
            if sigma_max is not None:
                raise ValueError("sigma_max applies to sampler='proposal' only")
            init_sigma = 0.5 if init_sigma is None else init_sigma
            if proposal_scale is not None:
                raise ValueError("proposal_scale applies to sampler='proposal' only")
        else:
            proposal_scale = 1.0 if proposal_scale is None else float(proposal_scale)
            if not proposal_scale > 0:
                raise ValueError(f"proposal_scale must be positive, got {proposal_scale}")
            sigma_max = proposal_scale if sigma_max is None else float(sigma_max)
            if not 0 < sigma_max < math.sqrt(2) * proposal_scale:
                raise ValueError(
                    f"sigma_max must be in (0, sqrt(2) * proposal_scale = "
                    f"{math.sqrt(2) * proposal_scale:.4g}) so that g/p stays bounded, "
                    f"got {sigma_max}"
                )
            init_sigma = 0.5 * sigma_max if init_sigma is None else init_sigma
            if not init_sigma < sigma_max:
                raise ValueError(f"init_sigma={init_sigma} must be below sigma_max={sigma_max}")
        init = torch.as_tensor(init_weight, dtype=torch.float64).detach()
        try:
            init = init.expand(num_heads, num_components).clone()
        except RuntimeError as err:
            raise ValueError(
                f"init_weight must broadcast to [num_heads, num_components] = "
                f"[{num_heads}, {num_components}], got shape {list(init.shape)}"
            ) from err
        self.num_components = num_components
        self.sampler = sampler
        self.frequencies = check_frequencies(frequencies)
        self.quadrature_range = check_range(quadrature_range)
        self.proposal_scale = proposal_scale
        self.sigma_max = sigma_max
        self.init_weight = init
        self.init_sigma = float(init_sigma)
        self.init_mu_std = float(init_mu_std)
        self.mixture_weights = nn.Parameter(torch.empty(num_heads, num_components))
        self.mixture_means = nn.Parameter(torch.empty(num_heads, num_components, pos_dim))
        self.raw_mixture_scales = nn.Parameter(torch.empty(num_heads, num_components))
        self.register_buffer("base_noise", torch.empty(num_heads, num_frequencies, pos_dim))
        # stratification: frequency l samples component l mod K
        component = torch.arange(num_frequencies) % num_components
        counts = torch.bincount(component, minlength=num_components)
        self.register_buffer("component", component, persistent=False)
        self.register_buffer(
            "allocation", num_frequencies / counts[component].double(), persistent=False
        )
        if self.frequencies == "quadrature":
            self._quadrature_rules(component, counts)
        self.reset_parameters()

    def _quadrature_rules(self, component: Tensor, counts: Tensor) -> None:
        """Fixed nodes ``[m, p]`` and weights ``m w_l`` (replacing ``allocation``)."""
        m, p = self.num_frequencies, self.pos_dim
        nodes = torch.zeros(m, p, dtype=torch.float64)
        weights = torch.zeros(m, dtype=torch.float64)
        if self.sampler == "proposal":
            rule = lattice_rule(p, m, "gaussian", self.quadrature_range)
            nodes, weights = rule.nodes, m * rule.weights
        else:
            for k in range(self.num_components):
                slots = (component == k).nonzero()[:, 0]
                rule = lattice_rule(p, int(counts[k]), "gaussian", self.quadrature_range, False)
                nodes[slots] = rule.nodes
                weights[slots] = m * rule.weights
        self.register_buffer("quadrature_nodes", nodes, persistent=False)
        self.register_buffer("allocation", weights, persistent=False)

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.mixture_weights.copy_(self.init_weight)
            self.mixture_means.normal_(0.0, self.init_mu_std)
            if self.sampler == "mixture":
                self.raw_mixture_scales.fill_(math.log(self.init_sigma))
            else:
                ratio = self.init_sigma / self.sigma_max
                self.raw_mixture_scales.fill_(math.log(ratio / (1 - ratio)))
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New ``eps`` (``"mc"``, ``"qmc"``); the fixed rules (``"quadrature"``)."""
        h, m, p = self.base_noise.shape
        if self.frequencies == "quadrature":
            eps = self.quadrature_nodes.expand(h, -1, -1)
        elif self.frequencies == "qmc" and self.sampler == "mixture":  # a sequence per component
            eps = blocks(self.component, lambda n: normal((h, n, p), "qmc", generator))
        else:
            eps = normal((h, m, p), self.frequencies, generator)
        self.base_noise.copy_(eps)

    @property
    def mixture_scales(self) -> Tensor:
        """Widths ``sigma [h, K]``."""
        if self.sampler == "mixture":
            return self.raw_mixture_scales.exp()
        return self.sigma_max * torch.sigmoid(self.raw_mixture_scales)

    def component_masses(self) -> Tensor:
        """``W = w (pi sigma^2)^(p/2) [h, K]``: ``f(0) = sum_k W_k``."""
        sigma = self.mixture_scales
        return self.mixture_weights * (math.pi * sigma**2) ** (self.pos_dim / 2)

    def spectral_density(self, xi: Tensor) -> Tensor:
        """``g(xi)``: ``xi [h, ..., p]`` -> ``[h, ...]`` (each head's own mixture)."""
        lead = xi.shape[1:-1]
        flat = xi.reshape(self.num_heads, -1, 1, self.pos_dim)  # [h, n, 1, p]
        sq = (flat - self.mixture_means[:, None]).pow(2).sum(-1)  # [h, n, K]
        sigma = self.mixture_scales[:, None]
        value = (self.mixture_weights[:, None] * torch.exp(-sq / sigma**2)).sum(-1)
        return value.reshape(self.num_heads, *lead)

    def spectrum(self) -> tuple[Tensor, Tensor]:
        if self.sampler == "mixture":
            c = self.component
            sigma = self.mixture_scales[:, c]  # [h, m]
            xi = self.mixture_means[:, c] + sigma[..., None] * self.base_noise / math.sqrt(2)
            weight = self.allocation.to(sigma.dtype) * self.component_masses()[:, c]
            return xi, weight
        xi = self.proposal_scale * self.base_noise  # [h, m, p]
        if self.frequencies == "quadrature":  # folded rule: the even part of g / p
            ratio = (self._proposal_ratio(xi) + self._proposal_ratio(-xi)) / 2
            return xi, ratio * self.allocation.to(ratio)
        return xi, self._proposal_ratio(xi)

    def _proposal_ratio(self, xi: Tensor) -> Tensor:
        """``g(xi) / p(xi)`` for the proposal ``p = N(0, s^2 I)``: ``[h, m, p]`` -> ``[h, m]``."""
        s, p = self.proposal_scale, self.pos_dim
        sq = (xi[:, :, None] - self.mixture_means[:, None]).pow(2).sum(-1)  # [h, m, K]
        sigma = self.mixture_scales[:, None]  # [h, 1, K]
        # log(g_k / p) in one exponent: bounded above because sigma^2 < 2 s^2
        log_ratio = (
            -sq / sigma**2
            + xi.pow(2).sum(-1, keepdim=True) / (2 * s**2)
            + p / 2 * math.log(2 * math.pi * s**2)
        )
        return (self.mixture_weights[:, None] * torch.exp(log_ratio)).sum(-1)

    def closed_form(self, delta: Tensor) -> Tensor:
        means = self.mixture_means.to(delta.dtype)
        sigma = self.mixture_scales.to(delta.dtype)
        masses = self.component_masses().to(delta.dtype)
        sq = delta.pow(2).sum(-1, keepdim=True)[..., None]  # [..., 1, 1]
        phase = 2 * math.pi * torch.einsum("...p,hkp->...hk", delta, means)
        terms = masses * torch.exp(-(math.pi**2) * sigma**2 * sq) * torch.cos(phase)
        return terms.sum(-1)

    def extra_repr(self) -> str:
        extra = (
            f", num_components={self.num_components}, sampler={self.sampler!r}, "
            f"frequencies={self.frequencies!r}"
        )
        if self.sampler == "proposal":
            extra += f", proposal_scale={self.proposal_scale}, sigma_max={self.sigma_max}"
        return super().extra_repr() + extra
