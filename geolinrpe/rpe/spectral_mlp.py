r"""FLT RPE with a spectral density learned by a small network (``"flt-mlp"``).

Axes: ``...`` leading axes, p position dim, h heads, m frequencies, n quadrature nodes,
c hidden channels.

A network output used directly as ``g(xi)`` need not be integrable (a softplus output
tends to a positive constant or grows linearly), and then ``f`` does not exist and
``g / p`` is unbounded for every Gaussian proposal ``p``. The network therefore learns the
density *ratio* against the fixed proposal ``p = N(0, s^2 I)``:

.. math::

    g_\theta(\xi) = h_\theta(\xi / s)\, p(\xi), \qquad
    f(\Delta) = \mathbb{E}_{\xi \sim p}[h_\theta(\xi / s) \cos(2 \pi \xi \cdot \Delta)],

with ``h_theta`` one MLP per head (tanh hidden layers; ``softplus`` output, so
``g >= 0``, or a linear, signed output). The importance weights are exactly
``a = g / p = h_theta(xi / s)``: bounded, because tanh layers bound the last layer's
input (``|a| <= softplus(|W_out|_1 + |b_out|)`` for the softplus output). Any density with a
bounded, smooth ratio to ``p`` can be represented; frequencies far beyond a few ``s`` are
not reachable, so choose ``s`` for the finest length scale you need (``~ 1 / (2 pi s)``).
The default ``s = 1 / (2 pi)`` makes ``p`` the spectral density of ``exp(-|Delta|^2 / 2)``: a
constant ``h`` gives that Gaussian kernel, the ``"flt-kernel"`` default.

``closed_form`` has no analytic expression. It is a high-accuracy numerical reference:
the trapezoidal rule for ``E_p[.]`` on a tensor grid of ``n`` nodes per axis over
``[-8 s, 8 s]^p`` (``n = quadrature_nodes``; defaults 1024, 160, 64 for ``p = 1, 2, 3``), node
spacing ``step = 16 / (n - 1)`` in units of ``s``. By Poisson summation the rule is exactly
the periodisation of ``f``,

.. math::

    \mathrm{closed\_form}(\Delta) = \sum_{j \in \mathbb{Z}^p} (-1)^{(n-1) \sum_i j_i}
        f(\Delta + j T), \qquad T = \frac{1}{s\, \mathrm{step}},

up to the ``~1e-14`` Gaussian tail cut at ``8 s``. It is accurate for
``|Delta| <= max_lag = T / 2`` (``32 / s``, ``5.0 / s``, ``2.0 / s`` at the default nodes; 201,
31, 12.4 position units at the default ``s``) to within the size of ``f`` at lags beyond
``T / 2``, the nearest image. Measured against a 1.5x finer grid up to ``max_lag``: ``1e-15``
(``p = 1, 2, 3``) for the default initialisation, whose ``f`` decays like a Gaussian; with
all network weights x3 (a rougher ``h``, a heavier-tailed ``f``) ``2e-7`` for ``p = 2`` and
``7e-5`` for ``p = 3``, the size of ``f`` near ``max_lag``: raise ``quadrature_nodes`` for such
networks, and do not use it beyond ``max_lag``. Gauss-Hermite nodes were measured to resolve
``cos(2 pi s xi . Delta)`` only up to ``2 pi s |Delta| ~ 1.3 sqrt(n)`` (``|Delta| < 1.6 / s``
at ``n = 64``), so the uniform grid is the better reference here. The cost is ``n^p``
network evaluations per call and ``n^p`` cosines per lag (``p <= 3`` only).

The estimate is signed (cosines; and ``h`` itself with ``positive=False``): in mask mode use
``normalize="kernel"`` (the default of :class:`~geolinrpe.nn.RPEAttention`).

Frequency sets (``frequencies=``, :mod:`geolinrpe.rpe.frequencies`): ``"mc"`` draws
``eps ~ N(0, I)``; ``"qmc"`` uses scrambled Sobol points through the normal inverse CDF;
``"quadrature"`` uses the proposal's deterministic lattice rule (folded over ``+-eps``, with the
symmetrised weights ``(h(xi) + h(-xi)) / 2``, which have the same ``E_p[. cos]``), built for
offsets ``|Delta| <= quadrature_range / (2 pi s)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import FourierRPE, _check_positive_ints
from .frequencies import QUADRATURE_RANGE, check_frequencies, check_range, lattice_rule, normal

#: half-width of the quadrature grid in units of ``s`` (Gaussian tail ``exp(-32) ~ 1e-14``)
QUADRATURE_HALF_WIDTH = 8.0
#: default quadrature nodes per axis for ``p = 1, 2, 3``
QUADRATURE_NODES = {1: 1024, 2: 160, 3: 64}
#: elements of the ``[lags, nodes]`` cosine buffer per chunk of ``closed_form``
_CHUNK_ELEMENTS = 2**22


class SpectralMLPRPE(FourierRPE):
    r"""Per-head spectral density ``g = h_theta(xi / s) N(xi; 0, s^2 I)`` with an MLP ``h_theta``.

    FourierLearner-Transformer RPE with a learned spectral density, from Choromanski et al.,
    `"Learning a Fourier Transform for Linear Relative Positional Encodings in
    Transformers" <https://arxiv.org/abs/2302.01925>`_ (AISTATS 2024). See the module
    docstring for why the network learns the ratio ``g / p`` and how ``closed_form`` is
    computed.

    .. math::

        \hat f_h(\Delta) = \frac{1}{m} \sum_{l=1}^m h_{\theta,h}(\epsilon_{hl})
            \cos(2 \pi s\, \epsilon_{hl} \cdot \Delta), \qquad \epsilon_{hl} \sim N(0, I_p)

    Args:
        pos_dim: position dimension ``p`` (1, 2 or 3: the quadrature reference is a
            tensor grid).
        num_heads: number of heads ``h`` (each has its own MLP).
        num_frequencies: frequencies ``m`` per head (default 32).
        hidden_dim: width of the hidden layers (default 32).
        num_layers: number of tanh hidden layers (default 2).
        positive: ``softplus`` output, ``g >= 0`` (default ``True``); ``False`` gives a
            signed linear output whose last layer starts at zero, so ``f = 0`` at
            initialisation (the neutral logit-mode bias).
        proposal_scale: standard deviation ``s`` of the proposal ``N(0, s^2 I)`` in
            frequency units (cycles per position unit; default ``1 / (2 pi)``, the spectral
            density of ``exp(-|Delta|^2 / 2)``).
        quadrature_nodes: nodes per axis of the ``closed_form`` grid (default by ``p``:
            1024, 160, 64).
        frequencies: ``"mc"`` (default), ``"qmc"`` or ``"quadrature"`` (module docstring).
        quadrature_range: offsets ``|Delta| <= quadrature_range / (2 pi s)`` (position units)
            the lattice rule is optimised for (default 3.0; ``"quadrature"`` only).

    Shapes:
        ``spectrum()`` -> ``xi [h, m, p]``, ``weight [h, m]``;
        ``closed_form(delta [..., p])`` -> ``[..., h]``;
        ``density_ratio(xi [h, ..., p])`` and ``spectral_density(xi [h, ..., p])`` -> ``[h, ...]``.
    """

    def __init__(
        self,
        pos_dim: int,
        num_heads: int,
        num_frequencies: int = 32,
        hidden_dim: int = 32,
        num_layers: int = 2,
        positive: bool = True,
        proposal_scale: float = 1 / (2 * math.pi),
        quadrature_nodes: int | None = None,
        frequencies: str = "mc",
        quadrature_range: float = QUADRATURE_RANGE,
    ) -> None:
        super().__init__(pos_dim, num_heads, num_frequencies)
        if pos_dim > 3:
            raise ValueError(f"pos_dim must be 1, 2 or 3 (tensor-grid reference), got {pos_dim}")
        _check_positive_ints(hidden_dim=hidden_dim, num_layers=num_layers)
        if not proposal_scale > 0:
            raise ValueError(f"proposal_scale must be positive, got {proposal_scale}")
        if quadrature_nodes is None:
            quadrature_nodes = QUADRATURE_NODES[pos_dim]
        _check_positive_ints(quadrature_nodes=quadrature_nodes)
        if quadrature_nodes < 2:
            raise ValueError(f"quadrature_nodes must be at least 2, got {quadrature_nodes}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.positive = positive
        self.proposal_scale = float(proposal_scale)
        self.quadrature_nodes = quadrature_nodes
        self.frequencies = check_frequencies(frequencies)
        self.quadrature_range = check_range(quadrature_range)
        if self.frequencies == "quadrature":
            self.rule = lattice_rule(pos_dim, num_frequencies, "gaussian", self.quadrature_range)
        sizes = [pos_dim] + [hidden_dim] * num_layers + [1]
        self.weights = nn.ParameterList(
            nn.Parameter(torch.empty(num_heads, fan_in, fan_out))
            for fan_in, fan_out in zip(sizes[:-1], sizes[1:], strict=True)
        )
        self.biases = nn.ParameterList(
            nn.Parameter(torch.empty(num_heads, fan_out)) for fan_out in sizes[1:]
        )
        self.register_buffer("base_noise", torch.empty(num_heads, num_frequencies, pos_dim))
        self.register_buffer("base_weights", torch.ones(num_heads, num_frequencies), False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for weight, bias in zip(self.weights[:-1], self.biases[:-1], strict=True):
                fan_in, fan_out = weight.shape[1:]
                bound = math.sqrt(6 / (fan_in + fan_out))  # Xavier for tanh
                weight.uniform_(-bound, bound)
                bias.uniform_(-1.0, 1.0)
            out_weight, out_bias = self.weights[-1], self.biases[-1]
            if self.positive:
                out_weight.uniform_(-1 / math.sqrt(self.hidden_dim), 1 / math.sqrt(self.hidden_dim))
            else:
                out_weight.zero_()  # f = 0: neutral
            out_bias.zero_()
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New ``eps`` (``"mc"``, ``"qmc"``); the fixed rule (``"quadrature"``)."""
        if self.frequencies == "quadrature":
            eps = self.rule.nodes.expand(self.num_heads, -1, -1)
            weights = self.num_frequencies * self.rule.weights.expand(self.num_heads, -1)
            self.base_weights.copy_(weights)
        else:
            eps = normal(tuple(self.base_noise.shape), self.frequencies, generator)
        self.base_noise.copy_(eps)

    @property
    def step(self) -> float:
        """Spacing of the quadrature grid in units of ``s``."""
        return 2 * QUADRATURE_HALF_WIDTH / (self.quadrature_nodes - 1)

    @property
    def max_lag(self) -> float:
        """``T / 2``, half the period of ``closed_form``'s aliasing (module docstring)."""
        return 1 / (2 * self.step * self.proposal_scale)

    def density_ratio(self, xi: Tensor) -> Tensor:
        """``h_theta(xi / s) = g(xi) / p(xi)``: ``xi [h, ..., p]`` -> ``[h, ...]``."""
        lead = xi.shape[1:-1]
        x = xi.reshape(self.num_heads, -1, self.pos_dim) / self.proposal_scale  # [h, n, p]
        last = len(self.weights) - 1
        for i, (weight, bias) in enumerate(zip(self.weights, self.biases, strict=True)):
            x = torch.einsum("hnc,hco->hno", x, weight.to(x.dtype)) + bias.to(x.dtype)[:, None]
            if i < last:
                x = torch.tanh(x)
        out = F.softplus(x) if self.positive else x
        return out.reshape(self.num_heads, *lead)

    def spectral_density(self, xi: Tensor) -> Tensor:
        """``g(xi) = h_theta(xi / s) N(xi; 0, s^2 I)``: ``xi [h, ..., p]`` -> ``[h, ...]``."""
        s, p = self.proposal_scale, self.pos_dim
        proposal = torch.exp(-xi.pow(2).sum(-1) / (2 * s**2)) / (2 * math.pi * s**2) ** (p / 2)
        return self.density_ratio(xi) * proposal

    def spectrum(self) -> tuple[Tensor, Tensor]:
        xi = self.proposal_scale * self.base_noise
        if self.frequencies == "quadrature":  # folded rule: the even part of h
            ratio = (self.density_ratio(xi) + self.density_ratio(-xi)) / 2
            return xi, ratio * self.base_weights.to(ratio)
        return xi, self.density_ratio(xi)

    def quadrature(
        self, dtype: torch.dtype = torch.float64, device: torch.device | None = None
    ) -> tuple[Tensor, Tensor]:
        """Trapezoidal grid for ``E_p[.]``: nodes ``xi [n^p, p]`` and weights ``[n^p]``."""
        n = self.quadrature_nodes
        x = torch.linspace(
            -QUADRATURE_HALF_WIDTH, QUADRATURE_HALF_WIDTH, n, dtype=dtype, device=device
        )
        w = self.step * torch.exp(-(x**2) / 2) / math.sqrt(2 * math.pi)
        axes = torch.meshgrid(*[x] * self.pos_dim, indexing="ij")
        nodes = torch.stack(axes, -1).reshape(-1, self.pos_dim) * self.proposal_scale
        weights = w
        for _ in range(self.pos_dim - 1):
            weights = (weights[:, None] * w[None, :]).reshape(-1)
        return nodes, weights

    def closed_form(self, delta: Tensor) -> Tensor:
        """Numerical reference ``Re f(delta)`` (accurate for ``|delta| <= max_lag``)."""
        nodes, weights = self.quadrature(delta.dtype, delta.device)
        ratio = self.density_ratio(nodes.expand(self.num_heads, -1, -1))  # [h, n]
        weighted = (ratio * weights).T  # [n, h]
        flat = delta.reshape(-1, self.pos_dim)
        chunk = max(1, _CHUNK_ELEMENTS // nodes.shape[0])
        out = flat.new_empty(flat.shape[0], self.num_heads)
        for start in range(0, flat.shape[0], chunk):
            part = flat[start : start + chunk]
            out[start : start + chunk] = torch.cos(2 * math.pi * part @ nodes.T) @ weighted
        return out.reshape(*delta.shape[:-1], self.num_heads)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", hidden_dim={self.hidden_dim}, num_layers={self.num_layers}, "
            f"positive={self.positive}, proposal_scale={self.proposal_scale}"
        )
