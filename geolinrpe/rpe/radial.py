r"""FLT RPE with a learned isotropic 3D spectrum, so ``f = f(|Delta|)`` (``"flt-radial"``).

Spectral density, per head, a sum of ``K`` symmetrised Gaussian shells in ``rho = |xi|``:

.. math::

    g(\xi) = \sum_k w_k \left[e^{-(\rho - \mu_k)^2 / s_k^2} + e^{-(\rho + \mu_k)^2 / s_k^2}\right],

(``mu_k = 0`` is a centred Gaussian, ``mu_k >> s_k`` a thin shell of radius ``mu_k``). With
``d = |Delta|`` the isotropic transform ``f(d) = int g(rho) 4 pi rho^2 sinc(2 rho d) drho``
(``sinc(x) = sin(pi x) / (pi x)``) of one shell is, in closed form,

.. math::

    f_k(d) = c_k\, e^{-\pi^2 s_k^2 d^2}\,
        \frac{2 \mu_k^2 \operatorname{sinc}(2 \mu_k d) + s_k^2 \cos(2 \pi \mu_k d)}
             {2 \mu_k^2 + s_k^2},
    \qquad c_k = f_k(0) = 2 \pi^{3/2} s_k (2 \mu_k^2 + s_k^2)\, w_k

(the radial integral extends to the whole line because ``rho sin(2 pi rho d)`` is even, and
the Gaussian moments give the bracket). The learned quantities are the shell amplitudes
``c_k`` (so ``f(0) = sum_k c_k`` whatever the widths), radii ``mu_k`` and widths ``s_k``.
``c_k >= 0`` makes ``f`` positive definite; signed ``c_k`` are allowed (signed mask).

Sampling (unbiased, reparametrised, stratified). By the same even extension,
``int g(xi) cos(2 pi xi . Delta) dxi = sum_k w_k int_(S^2) int_R e^{-(rho - mu_k)^2 / s_k^2}
rho^2 cos(2 pi rho u . Delta) drho du``. Frequency ``l`` belongs to component ``k = l mod K``
(``m_k`` frequencies each) and is ``xi_l = rho_l R u_l`` with a uniform direction ``u_l``, the
radius ``rho_l = mu_k + s_k t_l / sqrt(2)`` (``t_l`` a stratified standard normal: the
``m_k`` draws of a component fall one in each of ``m_k`` equal-probability strata) and the
current rotation ``R`` (identity unless ``rotation="random"``). The importance weights are

.. math::

    a_l = \frac{m}{m_k} \, c_k \, \frac{2 \rho_l^2}{2 \mu_k^2 + s_k^2},

bounded in mean square (``E[a_l] = (m / m_k) c_k``), and ``m^-1 sum_l a_l cos(2 pi xi_l . Delta)``
is unbiased for ``f(|Delta|)``. Gradients reach ``c, mu, s`` through ``a`` and ``xi``.

Rotation invariance (``docs/math.md``): ``f`` is radial, but a fixed draw of directions
makes ``f_hat`` radial only in expectation. ``rotation=``

* ``"fixed"``: one draw; a rotated input changes the output by the Monte-Carlo error
  (``O(m^-1/2)``).
* ``"random"``: a fresh Haar-random ``R`` on every :meth:`RadialRPE.encode_positions` call
  (once per layer forward) while ``training``; in eval the last ``R`` stays (deterministic).
  Invariant in expectation over ``R``: ``E_R f_hat(Delta)`` is exactly radial for every
  draw of radii. A training forward and :meth:`~geolinrpe.nn.RPEAttention.reference` then
  use different ``R``; compare them in eval mode.
* ``"frame"``: :meth:`RadialRPE.encode_positions` expresses every graph's positions in its
  canonical PCA frame (:func:`canonical_frame`), so the features see rotation-invariant
  coordinates: exactly invariant (both modes, every draw) whenever the frame is well defined,
  and exactly translation invariant (the frame is centred). The frame uses every token of a
  graph, so it must not be combined with ``causal=True`` (it would see future positions).

Frequency sets (``frequencies=``, :mod:`geolinrpe.rpe.frequencies`):

* ``"mc"``: the stratified sampler above (independent uniforms for the strata and
  directions).
* ``"qmc"``: the same sampler driven by one scrambled Sobol point per frequency (a sequence
  per head and shell; its first
  coordinate places the radius in its stratum, the other two give the direction through the
  area-preserving map ``z = 1 - 2 u_1``, ``phi = 2 pi u_2``): unbiased for every draw.
* ``"quadrature"``: a deterministic lattice rule in frequency space (the trapezoidal rule on
  the body-centred cubic lattice of :func:`~geolinrpe.rpe.frequencies.lattice_rule`, built for
  the initial Gaussian ``N(0, (2 pi l_h)^-2 I)`` of head ``h`` and fixed thereafter), with
  weights ``a_l = m V g(xi_l)``: ``V`` the lattice cell's volume (doubled for a folded ``+-xi``
  pair) and ``g`` the learned density, :meth:`RadialRPE.spectral_density`. The learned
  spectrum is integrated against the rule's base measure, so gradients reach ``c, mu, s``
  through the weights only; shells that move beyond the ball of nodes (radius
  ``rule.radius / (2 pi l_h)``) are cut off, and offsets beyond ``rule.period * l_h`` see
  aliased images. With ``m = 64`` the rule reproduces the initial Gaussian to 6.9e-3
  (relative RMS) over ``|Delta| <= 3 l_h``. The estimate is then a fixed function of
  ``Delta``: under a rotation it changes by at most twice the rule's error.

Axes: ``...`` leading axes, g graphs, n tokens, p position dim (3), h heads, k components,
m frequencies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..ops.packing import to_padded
from .base import FourierRPE, _check_positive_ints, per_head
from .frequencies import (
    QUADRATURE_RANGE,
    RADIAL_POINTS,
    blocks,
    check_frequencies,
    check_range,
    lattice_rule,
    radial_fourier_transform,
    uniform,
)

ROTATIONS = ("fixed", "random", "frame")
#: a PCA axis whose third moment is below ``SKEW_TOLERANCE * variance^(3/2)`` has no sign
SKEW_TOLERANCE = 1e-6
#: a variance below ``FLAT_TOLERANCE`` x the largest one counts as zero (planar, linear clouds)
FLAT_TOLERANCE = 1e-10
#: eigenvalue gaps below ``GAP_TOLERANCE`` x the largest eigenvalue get no gradient
GAP_TOLERANCE = 1e-10


class CanonicalFrame(NamedTuple):
    """Per-graph PCA frame of a point cloud (see :func:`canonical_frame`).

    Attributes:
        coords: positions in the frame, the shape of the input ``pos``.
        mean: centroids ``[g, 3]``.
        axes: ``[g, 3, 3]``, columns are the axes (descending variance), ``det = +1``
            unless all three axes are signed by their third moments.
        variances: eigenvalues of the covariance ``[g, 3]``, descending.
        signed: ``[g, 3]`` bool, whether each axis's sign comes from its third moment.
    """

    coords: Tensor
    mean: Tensor
    axes: Tensor
    variances: Tensor
    signed: Tensor


def canonical_frame(
    pos: Tensor, batch: Tensor | None = None, key_padding_mask: Tensor | None = None
) -> CanonicalFrame:
    r"""Express each graph's positions in its canonical (PCA) frame.

    Per graph: centre at the centroid, take the covariance's eigenvectors as axes (descending
    eigenvalues), and sign each axis by its third moment ``sum_i (e_k . (r_i - r_bar))^3``.
    An axis whose third moment vanishes (below ``SKEW_TOLERANCE variance^(3/2)``), or whose
    variance does (below ``FLAT_TOLERANCE`` x the largest: the normal of a planar cloud), is
    *unsigned* and keeps the eigensolver's sign, except that one unsigned axis (the last with
    non-zero variance, else the last) is flipped if needed so that ``det = +1``. Under a
    rotation ``r -> Q r`` the axes become ``Q e_k`` and the coordinates are unchanged,
    exactly, **when the frame is well defined**:

    * the eigenvalues are distinct, or the degenerate ones are 0 (their arbitrary eigenbasis
      multiplies zero coordinates: planar and linear clouds), and
    * at most one axis with non-zero variance is unsigned (it is fixed by ``det = +1``).

    Well defined: generic clouds, generic planar ones, planar C2v molecules such as water
    (the in-plane axis normal to the C2 axis is the one unsigned axis with variance).
    Ill defined: methane and other tetrahedral or octahedral clouds (three equal
    eigenvalues), ammonia and benzene (two equal eigenvalues), non-planar molecules with two
    mirror planes such as CH2F2 (two unsigned axes). Then the eigensolver's arbitrary basis
    and signs enter the coordinates: the frame is still orthonormal, finite and deterministic,
    but a rotated input can get another frame, so invariance holds only in expectation over
    the frequency draw, like ``rotation="fixed"``. A centrosymmetric linear molecule (CO2)
    has a well-defined axis but no sign for it: its coordinates flip as a whole, ``y -> -y``,
    which mask mode does not see (``f_hat`` is even) but logit mode does. Near-degenerate
    eigenvalues make the frame, and the output, change fast with the positions; eigenvalue
    gaps below ``GAP_TOLERANCE`` get no eigenvector gradient (finite gradients, no NaN).
    Reflections are not covered (``det = +1`` is imposed where a sign is free).

    Args:
        pos: ``[n, 3]`` (packed, with ``batch``; ``None`` = one graph) or ``[b, n, 3]`` (dense,
            with an optional ``key_padding_mask [b, n]``, True = padding, excluded).
        batch: sorted graph ids ``[n]`` for packed ``pos``.
        key_padding_mask: ``[b, n]`` for dense ``pos``.

    Returns:
        :class:`CanonicalFrame`; ``coords`` has the shape of ``pos`` (padding rows hold the
        transformed padding values and are meaningless).
    """
    if pos.dim() not in (2, 3) or pos.shape[-1] != 3:
        raise ValueError(f"pos must be [n, 3] or [b, n, 3], got {list(pos.shape)}")
    packed = pos.dim() == 2
    if packed:
        if batch is None:
            batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
        dense, mask = to_padded(pos, batch)
    else:
        dense = pos
        mask = key_padding_mask
        if mask is None:
            mask = torch.zeros(pos.shape[:2], dtype=torch.bool, device=pos.device)
    valid = (~mask).unsqueeze(-1).to(pos.dtype)  # [g, n, 1]
    count = valid.sum(1).clamp_min(1)  # [g, 1]
    mean = (dense * valid).sum(1) / count  # [g, 3]
    centred = (dense - mean[:, None]) * valid
    cov = torch.einsum("gnp,gnq->gpq", centred, centred) / count[..., None]
    variances, axes = _SafeEigh.apply(cov)
    variances, axes = variances.flip(-1), axes.flip(-1)  # descending
    with torch.no_grad():
        proj = torch.einsum("gnp,gpk->gnk", centred, axes)
        third = proj.pow(3).sum(1) / count  # [g, 3]
        var = variances.clamp_min(0)
        flat = var <= FLAT_TOLERANCE * var[:, :1]
        signed = (third.abs() > SKEW_TOLERANCE * var.pow(1.5)) & ~flat
        sign = torch.where(signed, torch.sign(third), torch.ones_like(third))
        det = torch.linalg.det(axes * sign[:, None, :])
        # one unsigned axis makes det = +1: the last one with variance, else the last one
        k = torch.arange(3, device=pos.device)
        score = torch.where(signed, -1, k + 3 * (~flat).long())
        chosen = score.argmax(-1)  # [g]
        flip = (det < 0) & (score.amax(-1) >= 0)
        sign = torch.where(flip[:, None] & (k == chosen[:, None]), -sign, sign)
    axes = axes * sign[:, None, :]
    if packed:
        coords = torch.einsum("np,npk->nk", pos - mean[batch], axes[batch])
    else:
        coords = torch.einsum("bnp,bpk->bnk", pos - mean[:, None], axes)
    return CanonicalFrame(coords, mean, axes, variances, signed)


class _SafeEigh(torch.autograd.Function):
    """``torch.linalg.eigh`` whose backward ignores (near-)degenerate eigenvalue pairs.

    The exact derivative of an eigenvector has ``1 / (lambda_j - lambda_i)`` terms, infinite
    for degenerate pairs (one-atom graphs, linear molecules), where ``torch.linalg.eigh``
    gives NaN even with a zero incoming gradient. Pairs closer than ``GAP_TOLERANCE`` x the
    largest eigenvalue get no eigenvector gradient; elsewhere this is the exact derivative.
    """

    @staticmethod
    def forward(ctx, cov: Tensor) -> tuple[Tensor, Tensor]:
        values, vectors = torch.linalg.eigh(cov)
        ctx.save_for_backward(values, vectors)
        return values, vectors

    @staticmethod
    def backward(ctx, grad_values: Tensor, grad_vectors: Tensor) -> Tensor:
        values, vectors = ctx.saved_tensors
        gap = values.unsqueeze(-2) - values.unsqueeze(-1)  # [g, i, j]: lambda_j - lambda_i
        scale = values.abs().amax(-1, keepdim=True).unsqueeze(-1)
        far = gap.abs() > GAP_TOLERANCE * scale
        inv_gap = torch.where(far, 1 / torch.where(far, gap, torch.ones_like(gap)), 0.0)
        inner = inv_gap * (vectors.transpose(-1, -2) @ grad_vectors)
        inner = inner + torch.diag_embed(grad_values)
        return vectors @ inner @ vectors.transpose(-1, -2)


def _haar_rotation(generator=None, dtype=torch.float64, device=None) -> Tensor:
    """Haar-random ``[3, 3]`` rotation (det +1)."""
    gauss = torch.randn(3, 3, generator=generator, dtype=torch.float64, device=device)
    q, r = torch.linalg.qr(gauss)
    q = q * torch.sign(torch.diagonal(r))
    if torch.det(q) < 0:
        q = q * torch.tensor([-1.0, 1.0, 1.0], dtype=q.dtype, device=q.device)
    return q.to(dtype)


class RadialRPE(FourierRPE):
    r"""Learned isotropic (radial) spectrum in 3D, ``f(Delta) = f(|Delta|)`` (``"flt-radial"``).

    FourierLearner-Transformer RPE (Choromanski et al., `"Learning a Fourier Transform for
    Linear Relative Positional Encodings in Transformers" <https://arxiv.org/abs/2302.01925>`_,
    AISTATS 2024) restricted to isotropic spectral densities, the rotation-invariant choice
    for 3D point clouds and molecules; see the module docstring for the family, sampler and
    rotation modes:

    .. math::

        f_h(d) = \sum_k c_{hk}\, e^{-\pi^2 s_{hk}^2 d^2}
            \frac{2 \mu_{hk}^2 \operatorname{sinc}(2 \mu_{hk} d) + s_{hk}^2 \cos(2 \pi \mu_{hk} d)}
                 {2 \mu_{hk}^2 + s_{hk}^2}, \qquad
        \hat f_h(\Delta) = \frac{1}{m} \sum_l a_{hl} \cos(2 \pi \xi_{hl} \cdot \Delta)

    Initialisation: shell ``k`` has radius ``mu_k = k s_0`` and width ``s_0 = 1 / (sqrt(2) pi l)``
    (``l = lengthscale``); only shell 0 (a centred Gaussian) is switched on, with
    ``c_0 = amplitude``, so ``f(d) = amplitude exp(-d^2 / (2 l^2))`` at the start (the
    ``"flt-kernel"`` Gaussian); ``amplitude=0`` gives ``f = 0``, the neutral logit-mode bias.

    Estimates are signed (cosines): in mask mode use ``normalize="kernel"`` (the layer's
    default), the masked denominator can reach 0.

    Args:
        pos_dim: position dimension; must be 3.
        num_heads: number of heads ``h``.
        num_frequencies: frequencies ``m`` per head (default 64 with quadrature, else 32;
            ``>= num_components``).
        num_components: shells ``K`` per head (default 4).
        lengthscale: initial length scale ``l`` of the Gaussian shell 0 (default 1.0), or one
            per head (multi-scale heads, e.g. ``[0.5, 1, 2, 4]``).
        amplitude: initial ``c_0 = f(0)`` (default 1.0; 0.0 = neutral), or one per head.
        rotation: ``"fixed"`` (default; with the quadrature rule a rotation changes
            ``f_hat`` by at most twice the rule's error), ``"frame"`` (exactly invariant
            where the canonical frame is well defined; its eigenvector derivatives are
            dropped at degenerate eigenvalues, so forces of symmetric molecules are wrong
            there: not for force fields) or ``"random"`` (module docstring).
        frequencies: ``"quadrature"`` (default), ``"qmc"`` or ``"mc"`` (module docstring).
        quadrature_range: offsets ``|Delta| <= quadrature_range * l_h`` the lattice rule is
            optimised for (default 3.0; ``frequencies="quadrature"`` only).

    Shapes:
        ``spectrum()`` -> ``xi [h, m, 3]``, ``weight [h, m]``;
        ``closed_form(delta [..., 3])`` -> ``[..., h]``;
        ``encode_positions(pos [n, 3] or [b, n, 3])`` -> same shape.
    """

    def __init__(
        self,
        pos_dim: int = 3,
        num_heads: int = 1,
        num_frequencies: int | None = None,
        num_components: int = 4,
        lengthscale: float | Sequence[float] = 1.0,
        amplitude: float | Sequence[float] = 1.0,
        rotation: str = "fixed",
        frequencies: str = "quadrature",
        quadrature_range: float = QUADRATURE_RANGE,
    ) -> None:
        if pos_dim != 3:
            raise ValueError(f"pos_dim must be 3 for a radial RPE, got {pos_dim!r}")
        if num_frequencies is None:
            num_frequencies = 64 if frequencies == "quadrature" else 32
        super().__init__(pos_dim, num_heads, num_frequencies)
        _check_positive_ints(num_components=num_components)
        if num_frequencies < num_components:
            raise ValueError(
                f"num_frequencies={num_frequencies} must be >= num_components={num_components} "
                "(every shell needs a draw)"
            )
        if rotation not in ROTATIONS:
            raise ValueError(f"rotation must be one of {ROTATIONS}, got {rotation!r}")
        self.num_components = num_components
        self.rotation = rotation
        self.frequencies = check_frequencies(frequencies)
        self.quadrature_range = check_range(quadrature_range)
        self.register_buffer(
            "init_lengthscale", per_head("lengthscale", lengthscale, num_heads, True), False
        )
        self.register_buffer(
            "init_amplitude", per_head("amplitude", amplitude, num_heads, False), False
        )
        self.shell_amplitudes = nn.Parameter(torch.empty(num_heads, num_components))
        self.shell_radii = nn.Parameter(torch.empty(num_heads, num_components))
        self.log_shell_widths = nn.Parameter(torch.empty(num_heads, num_components))
        self.register_buffer("base_radii", torch.empty(num_heads, num_frequencies))
        self.register_buffer("directions", torch.empty(num_heads, num_frequencies, 3))
        self.register_buffer("rotation_matrix", torch.eye(3))
        if self.frequencies == "quadrature":  # fixed nodes and cell volumes per head
            self.rule = lattice_rule(3, num_frequencies, "gaussian", self.quadrature_range)
            scale = 2 * math.pi * self.init_lengthscale[:, None]  # [h, 1]
            nodes = self.rule.nodes[None] / scale[..., None]  # [h, m, 3]
            volume = num_frequencies * self.rule.volumes[None] / scale**3
            self.register_buffer("quadrature_nodes", nodes.float(), False)
            self.register_buffer("quadrature_weights", volume.float(), False)
            self.modes = ("mask", "logit", "product")
        # stratification: frequency l samples shell l mod K, stratum l // K of m_k
        component = torch.arange(num_frequencies) % num_components
        counts = torch.bincount(component, minlength=num_components)
        self.register_buffer("component", component, persistent=False)
        self.register_buffer("stratum", torch.arange(num_frequencies) // num_components, False)
        self.register_buffer("stratum_count", counts[component], persistent=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        width = 1 / (math.sqrt(2) * math.pi * self.init_lengthscale.double())  # [h]
        with torch.no_grad():
            self.shell_amplitudes.zero_()
            self.shell_amplitudes[:, 0] = self.init_amplitude
            steps = torch.arange(self.num_components, dtype=torch.float64, device=width.device)
            self.shell_radii.copy_(width[:, None] * steps)
            self.log_shell_widths.copy_(width.log()[:, None].expand(-1, self.num_components))
        self.redraw()

    @property
    def uses_whole_graph(self) -> bool:
        """The canonical frame of ``rotation="frame"`` depends on all tokens of a graph."""
        return self.rotation == "frame"

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New stratified radii, directions and (``rotation="random"``) rotation
        (``"quadrature"``: the rule is fixed; only the random rotation is redrawn)."""
        shape = self.base_radii.shape
        if self.frequencies == "qmc":  # one Sobol sequence per head and shell
            u = blocks(self.component, lambda n: uniform((shape[0], n, 3), "qmc", generator))
            cos_theta, phi = 1 - 2 * u[..., 1], 2 * math.pi * u[..., 2]
            sin_theta = (1 - cos_theta**2).clamp_min(0).sqrt()
            directions = torch.stack(
                [sin_theta * torch.cos(phi), sin_theta * torch.sin(phi), cos_theta], -1
            )
            u = u[..., 0]
        else:
            u = torch.rand(shape, generator=generator, dtype=torch.float64)
            gauss = torch.randn(self.directions.shape, generator=generator, dtype=torch.float64)
            directions = gauss / gauss.norm(dim=-1, keepdim=True)
        level = (self.stratum.double() + u) / self.stratum_count.double()
        self.base_radii.copy_(torch.special.ndtri(level))
        self.directions.copy_(directions)
        if self.rotation == "random":
            self.rotation_matrix.copy_(_haar_rotation(generator))
        else:
            self.rotation_matrix.copy_(torch.eye(3))

    @property
    def shell_widths(self) -> Tensor:
        """Widths ``s [h, K]``."""
        return self.log_shell_widths.exp()

    def encode_positions(
        self,
        pos: Tensor,
        *,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """``"frame"``: canonical coordinates; ``"random"`` in training: draw a new rotation.

        ``pos [n, 3]`` (packed, ``batch``) or ``[b, n, 3]`` (dense, ``key_padding_mask``).
        """
        if self.rotation == "frame":
            pos = pos.to(torch.promote_types(pos.dtype, torch.float32))  # eigh needs it
            with torch.autocast(pos.device.type, enabled=False):
                return canonical_frame(pos, batch, key_padding_mask).coords
        if self.rotation == "random" and self.training:
            with torch.no_grad():
                rotation = _haar_rotation(device=self.rotation_matrix.device)
                self.rotation_matrix.copy_(rotation)
        return pos

    def spectral_density(self, xi: Tensor) -> Tensor:
        """``g(xi)`` (module docstring): ``xi [h, ..., 3]`` -> ``[h, ...]`` (each head's own).

        ``w_k = c_k / (2 pi^(3/2) s_k (2 mu_k^2 + s_k^2))`` makes ``int g_k = c_k``.
        """
        lead = xi.shape[1:-1]
        rho = torch.linalg.vector_norm(xi.reshape(self.num_heads, -1, 1, 3), dim=-1)  # [h, n, 1]
        mu = self.shell_radii[:, None]  # [h, 1, K]
        width = self.shell_widths[:, None]
        amp = self.shell_amplitudes[:, None]
        w = amp / (2 * math.pi**1.5 * width * (2 * mu**2 + width**2))
        shells = torch.exp(-((rho - mu) ** 2) / width**2) + torch.exp(-((rho + mu) ** 2) / width**2)
        return (w * shells).sum(-1).reshape(self.num_heads, *lead)

    def spectrum(self) -> tuple[Tensor, Tensor]:
        if self.frequencies == "quadrature":
            nodes = self.quadrature_nodes.to(self.shell_radii.dtype)
            weight = self.quadrature_weights.to(nodes) * self.spectral_density(nodes)
            return nodes @ self.rotation_matrix.T.to(nodes), weight
        mu = self.shell_radii[:, self.component]  # [h, m]
        width = self.shell_widths[:, self.component]
        amp = self.shell_amplitudes[:, self.component]
        rho = mu + width * self.base_radii / math.sqrt(2)
        directions = self.directions @ self.rotation_matrix.T
        xi = rho[..., None] * directions
        allocation = self.num_frequencies / self.stratum_count.to(rho.dtype)
        weight = allocation * amp * 2 * rho**2 / (2 * mu**2 + width**2)
        return xi, weight

    def exp_spectrum(self) -> tuple[Tensor, Tensor]:
        """Product mode (``frequencies="quadrature"``): the rule's nodes with the weights of
        ``exp(f) = 1 + (exp(f) - 1)``: ``m`` at the zero frequency plus ``m V G(xi_l)``, ``G``
        the Fourier transform of ``exp(f(|Delta|)) - 1`` (radial transform of the closed form
        on ``[0, period l_h / 2]``), ``V`` the cell volumes of :meth:`spectrum`."""
        if "product" not in self.modes:
            raise ValueError("product mode needs frequencies='quadrature'")
        xi, _ = self.spectrum()
        dtype, h, m = self.shell_radii.dtype, self.num_heads, self.num_frequencies
        reach = self.rule.period / 2 * self.init_lengthscale.to(dtype)  # [h]
        step = reach / (RADIAL_POINTS - 1)
        radii = torch.arange(RADIAL_POINTS, dtype=dtype) * step[:, None]  # [h, n]
        delta = torch.zeros(h, RADIAL_POINTS, 3, dtype=dtype)
        delta[..., 0] = radii
        values = self.closed_form(delta)  # [h, n, h]: every head's f on every head's grid
        excess = torch.expm1(torch.diagonal(values, dim1=0, dim2=2).T)  # [h, n]
        nodes = self.quadrature_nodes.to(dtype)
        kappa = 2 * math.pi * nodes.norm(dim=-1)  # [h, m]
        transform = radial_fourier_transform(excess, step, kappa, 3)
        weight = self.quadrature_weights.to(dtype) * transform
        origin = torch.zeros(m, dtype=dtype)
        origin[0] = m  # the rule's first node is the zero frequency
        return xi, weight + origin.to(weight.device)

    def closed_form(self, delta: Tensor) -> Tensor:
        dist = torch.linalg.vector_norm(delta, dim=-1)[..., None, None]  # [..., 1, 1]
        dtype = delta.dtype
        mu = self.shell_radii.to(dtype)
        width = self.shell_widths.to(dtype)
        amp = self.shell_amplitudes.to(dtype)
        shell = 2 * mu**2 * torch.sinc(2 * mu * dist) + width**2 * torch.cos(
            2 * math.pi * mu * dist
        )
        envelope = torch.exp(-((math.pi * width * dist) ** 2))
        return (amp * envelope * shell / (2 * mu**2 + width**2)).sum(-1)  # [..., h]

    def extra_repr(self) -> str:
        return (
            super().extra_repr()
            + f", num_components={self.num_components}, rotation={self.rotation!r}, "
            f"frequencies={self.frequencies!r}"
        )
