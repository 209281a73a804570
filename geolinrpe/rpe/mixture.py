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

Conventions (``convention=``). ``"paper"`` (default) is everything above: the formulas of
the FLT paper. ``"google"`` reproduces Google's FLT code (scenic
``projects/performer/performer.py``, ``sharp_masked_performer_dot_product_attention``;
google-research ``imp/max/modeling/scalable_attention.py``, ``general_favor_attention``
with ``flt=True``), which differs from the paper in five ways:

1. fixed frequencies ``xi ~ N(0, I_p)`` (theirs: ``normal(PRNGKey(0), (h, M, p))``, load them
   with :meth:`GaussianMixtureRPE.set_frequencies`) and the ratio ``rho = g(xi) / p_G(xi)``
   multiplies *both* the query and the key snippet, so the bias estimate is
   ``m^-1 sum_l rho_l^2 cos(2 pi xi_l . Delta)`` (:meth:`~GaussianMixtureRPE.spectrum`
   returns the weights ``rho^2``);
2. the joint vectors ``[q, d^1/4 psi]`` pass through FAVOR+ with the temperature
   ``(d + 2m)^-1/4``: content logits ``q . k / sqrt(d + 2m)``, bias scaled by
   ``sqrt(d / (d + 2m))`` (:class:`~geolinrpe.ops.modes.GoogleLogitMode`);
3. the "proposal density" is ``p_G(xi) = (2 pi)^-1/2 exp(-|xi|^2 / 2)`` for every ``p``
   (the normal density only for ``p = 1``);
4. ``g(xi) = sum_k w_k exp(-|xi - mu_k|^2 / exp(s_k))`` with unconstrained ``s`` (our
   ``sigma^2 = exp(s)``, the raw parameter is ``s``), parameters laid out per head as
   ``[w (K) | mu (K p, row-major) | s (K)]`` (:meth:`~GaussianMixtureRPE.load_google_params`,
   :meth:`~GaussianMixtureRPE.google_params`);
5. FAVOR+ features ``(exp(W x - stab - |x|^2 / 2) + 1e-6) / sqrt(r)``, the query stabiliser
   per token, the key stabiliser the maximum of ``W x`` over all keys, heads and batch rows
   (padded keys included), denominators ``<= 0`` replaced by 1.

``"google"`` supports logit mode only (bidirectional, ``kernel="favor+"``). Its exact
target (``closed_form``) is the expectation of the estimate over ``xi ~ N(0, I_p)``,
``E[rho^2 cos(2 pi xi . Delta)] = (2 pi)^(1 - p/2) int g^2 e^(|xi|^2/2) cos(2 pi xi . Delta)``,
a double sum of Gaussians over component pairs ``(i, j)``, finite while
``A_ij = exp(-s_i) + exp(-s_j) - 1/2 > 0``.

Axes: ``...`` leading axes, p position dim, h heads, k components, m frequencies.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..ops.exact import softmax_attention
from ..ops.modes import GoogleLogitMode
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
CONVENTIONS = ("paper", "google")


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
        convention: ``"paper"`` (default) or ``"google"`` (Google's FLT code, logit mode
            only; module docstring). ``"google"`` takes the default ``sampler`` and no
            ``proposal_scale``/``sigma_max``; its widths are ``sigma = exp(s / 2)``.

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
        convention: str = "paper",
    ) -> None:
        super().__init__(pos_dim, num_heads, num_frequencies)
        _check_positive_ints(num_components=num_components)
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        if convention not in CONVENTIONS:
            raise ValueError(f"convention must be one of {CONVENTIONS}, got {convention!r}")
        if init_sigma is not None and not init_sigma > 0:
            raise ValueError(f"init_sigma must be positive, got {init_sigma}")
        if not init_mu_std >= 0:
            raise ValueError(f"init_mu_std must be non-negative, got {init_mu_std}")
        if convention == "google":
            if sampler != "mixture" or proposal_scale is not None or sigma_max is not None:
                raise ValueError(
                    "convention='google' has its own fixed proposal: leave sampler, "
                    "proposal_scale and sigma_max at their defaults"
                )
            if frequencies == "quadrature":
                raise ValueError("convention='google' draws its frequencies: 'mc' or 'qmc'")
            sampler = "google"
            init_sigma = 0.5 if init_sigma is None else init_sigma
        elif sampler == "mixture":
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
        self.convention = convention
        self.sampler = sampler  # "google" for convention="google"
        if convention == "google":  # an instance attribute: Google's FLT is logit-only
            self.modes = ("logit",)
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
            elif self.sampler == "google":  # s = log sigma^2
                self.raw_mixture_scales.fill_(2 * math.log(self.init_sigma))
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
        if self.sampler == "google":  # exp(s) = sigma^2
            return (self.raw_mixture_scales / 2).exp()
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
        if self.sampler == "google":  # rho on both sides: weights rho^2
            xi, rho = self.google_ratio()
            return xi, rho.pow(2)
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

    # ------------------------------------------------------------------ Google's convention
    def google_ratio(self) -> tuple[Tensor, Tensor]:
        """``(xi [h, m, p], rho [h, m])``: Google's fixed frequencies and signed ratios
        ``rho = g(xi) / p_G(xi)``, ``p_G(xi) = (2 pi)^-1/2 exp(-|xi|^2 / 2)`` (module
        docstring; ``convention="google"`` only)."""
        self._require_google("google_ratio")
        xi = self.base_noise
        sq = (xi[:, :, None] - self.mixture_means[:, None]).pow(2).sum(-1)  # [h, m, K]
        bumps = torch.exp(-sq / self.raw_mixture_scales.exp()[:, None])
        g = (self.mixture_weights[:, None] * bumps).sum(-1)
        density = torch.exp(-xi.pow(2).sum(-1) / 2) / math.sqrt(2 * math.pi)
        return xi, g / density

    @torch.no_grad()
    def set_frequencies(self, xi: Tensor) -> None:
        """Load fixed frequencies ``xi [h, m, p]`` (or ``[m, p]``, shared by the heads).

        For ``convention="google"`` these are Google's ``points`` (``normal(PRNGKey(0),
        (h, M, p))`` in their code); for ``sampler="proposal"`` the frequencies are
        ``proposal_scale * draw``, so the draw becomes ``xi / proposal_scale``. The
        ``"mixture"`` sampler's frequencies move with ``mu`` and ``sigma`` (set
        ``base_noise``, its standard-normal draw, instead). :meth:`redraw` replaces them.
        """
        if self.sampler == "mixture":
            raise ValueError(
                "sampler='mixture' frequencies depend on mu and sigma: copy a standard-normal "
                "draw into base_noise [h, m, p] instead"
            )
        xi = torch.as_tensor(xi)
        shape = tuple(self.base_noise.shape)
        if tuple(xi.shape) not in (shape, shape[1:]) or not xi.is_floating_point():
            raise ValueError(
                f"xi must be a float tensor of shape {list(shape)} or {list(shape[1:])}, "
                f"got {list(xi.shape)}"
            )
        if not bool(torch.isfinite(xi).all()):
            raise ValueError("xi must be finite")
        scale = 1.0 if self.sampler == "google" else self.proposal_scale
        self.base_noise.copy_((xi / scale).expand(shape))

    def google_params(self) -> Tensor:
        """Parameters in Google's layout ``[h, K (2 + p)]``: ``[w | mu (row-major) | s]``."""
        self._require_google("google_params")
        w, mu, s = self.mixture_weights, self.mixture_means, self.raw_mixture_scales
        return torch.cat([w, mu.flatten(1), s], dim=-1)

    @torch.no_grad()
    def load_google_params(self, params: Tensor) -> None:
        """Load Google's ``toeplitz_params`` / ``flt_params`` ``[h, K (2 + p)]`` as they are."""
        self._require_google("load_google_params")
        h, k, p = self.num_heads, self.num_components, self.pos_dim
        params = torch.as_tensor(params)
        if tuple(params.shape) != (h, k * (2 + p)) or not params.is_floating_point():
            raise ValueError(
                f"params must be a float tensor [num_heads, K (2 + p)] = [{h}, {k * (2 + p)}] "
                f"([w (K) | mu (K p) | s (K)] per head), got {list(params.shape)}"
            )
        if not bool(torch.isfinite(params).all()):
            raise ValueError("params must be finite")
        self.mixture_weights.copy_(params[:, :k])
        self.mixture_means.copy_(params[:, k : k * (1 + p)].reshape(h, k, p))
        self.raw_mixture_scales.copy_(params[:, k * (1 + p) :])

    def _require_google(self, name: str) -> None:
        if self.convention != "google":
            raise ValueError(f"{name} needs convention='google', got {self.convention!r}")

    @property
    def uses_whole_graph(self) -> bool:
        """Google's key stabiliser is a maximum over all keys: not causal."""
        return self.convention == "google"

    def featurizer(self, feature_map, input_scale: float, mode: str):
        if self.convention == "google":
            if mode != "logit":
                raise ValueError(f"convention='google' is logit mode only, got mode={mode!r}")
            return GoogleLogitMode(feature_map, self)
        return super().featurizer(feature_map, input_scale, mode)

    def reference_attention(self, q, k, v, pos, *, featurizer, mode, normalize, **options):
        """Google's convention: the exact softmax with logits ``q . k / sqrt(d + 2m)`` and the
        bias ``sqrt(d / (d + 2m)) f`` (``kernel="exact"``); otherwise as the base class."""
        if self.convention != "google":
            return super().reference_attention(
                q, k, v, pos, featurizer=featurizer, mode=mode, normalize=normalize, **options
            )
        kernel, rpe = options.pop("kernel", "exact"), options.pop("rpe", "exact")
        if kernel != "exact":
            raise ValueError("convention='google' has no kernel='features' reference here")
        packed = options.get("batch") is not None
        dense = pos[None] if packed else pos
        bias = self.pairwise(dense, exact=rpe == "exact")
        bias = bias[0] if packed else bias
        total = q.shape[-1] + self.num_features
        bias = bias * math.sqrt(q.shape[-1] / total)
        return softmax_attention(q, k, v, bias, scale=total**-0.5, **options)

    def _google_closed_form(self, delta: Tensor) -> Tensor:
        """``E_(xi ~ N(0, I))[rho^2 cos(2 pi xi . Delta)]`` in closed form (module docstring)."""
        p = self.pos_dim
        w = self.mixture_weights.to(delta.dtype)
        mu = self.mixture_means.to(delta.dtype)
        a = torch.exp(-self.raw_mixture_scales.to(delta.dtype))  # 1 / sigma^2
        big_a = a[:, :, None] + a[:, None, :] - 0.5  # [h, K, K]
        if not bool((big_a > 0).all()):
            raise ValueError(
                "Google's estimate has an infinite expectation: exp(-s_i) + exp(-s_j) <= 1/2 "
                "for some pair of components (widths sigma^2 = exp(s) >= 4)"
            )
        b = a[..., None] * mu  # [h, K, p]
        b = b[:, :, None] + b[:, None, :]  # [h, K, K, p]
        quad = a * mu.pow(2).sum(-1)  # a_i |mu_i|^2 [h, K]
        const = b.pow(2).sum(-1) / big_a - quad[:, :, None] - quad[:, None, :]
        coef = (2 * math.pi) ** (1 - p / 2) * w[:, :, None] * w[:, None, :]
        coef = coef * (math.pi / big_a) ** (p / 2) * torch.exp(const)
        sq = delta.pow(2).sum(-1)[..., None, None, None]  # [..., 1, 1, 1]
        phase = 2 * math.pi * torch.einsum("...p,hijp->...hij", delta, b / big_a[..., None])
        terms = coef * torch.exp(-(math.pi**2) * sq / big_a) * torch.cos(phase)
        return terms.sum((-1, -2))

    def closed_form(self, delta: Tensor) -> Tensor:
        if self.convention == "google":
            return self._google_closed_form(delta)
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
        if self.convention != "paper":
            extra += f", convention={self.convention!r}"
        if self.sampler == "proposal":
            extra += f", proposal_scale={self.proposal_scale}, sigma_max={self.sigma_max}"
        return super().extra_repr() + extra
