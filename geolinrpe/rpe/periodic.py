r"""FLT RPE for periodic cells: the lattice image sum of a Gaussian or of a screened Coulomb
potential, the reciprocal-space part of an Ewald sum (``"flt-periodic"``).

Crystals (3D periodic) and slabs (periodic along two cell vectors, as in OC20) need an
``f`` that is periodic on the lattice. With the cell ``L`` (rows ``a_1, a_2, a_3``, one per
graph) and the Gaussian ``f0(Delta) = A exp(-|Delta|^2 / (2 l^2))`` (learnable ``A``, ``l``
per head), ``f`` sums all periodic images,

.. math::

    f(\Delta) = \sum_{R \in \Lambda} f_0(\Delta + R)
              = \frac{1}{V} \sum_{n \in \mathbb{Z}^3} \hat g_0(\xi_n) \cos(2 \pi n \cdot s),
    \qquad \xi_n = L^{-1} n, \quad \hat g_0(\xi) = A (2 \pi l^2)^{3/2} e^{-2 \pi^2 l^2 |\xi|^2}

by Poisson summation, with ``Delta = L^T s`` (fractional coordinates ``s``, so
``xi_n . Delta = n . s``) and ``V = |det L|``. The features are this series truncated to
the box ``|n_i| <= K`` (``max_index``), deterministic, over the half space (``n = 0`` and the
``n`` whose first non-zero entry is positive; the others are their negatives and give the
same cosine, so their weights are doubled): ``M = ((2K + 1)^3 + 1) / 2`` frequencies
(172 for ``K = 3``), ``2M`` features. In the importance-weight notation of
:mod:`geolinrpe.rpe.base`, ``a_n = M mult_n g0_hat(xi_n) / V`` (``mult_n = 1`` for
``n = 0``, else 2) and ``f_hat = M^-1 sum_n a_n cos(2 pi n . s)``; ``psi_q`` carries ``a``,
``psi_k`` does not (``split="query"``), or both carry ``sqrt``-like factors
(``split="symmetric"``, softened like the base class).

The weights depend on the cell, which differs between graphs, so they are per token:
:meth:`PeriodicRPE.encode_positions` returns, per token, the fractional coordinates
(wrapped into ``[0, 1)``: exact for integer ``n``, and it keeps phases accurate for large
coordinates) followed by the graph's inverse metric ``G^-1 = (B B^T)^-1`` (``B`` the
periodic cell rows; ``|xi_n|^2 = n^T G^-1 n``) and ``1 / V``. ``psi_q(r_i) . psi_k(r_j)``
uses the weights of token ``i``; both tokens of an attended pair belong to the same graph,
so this is the graph's ``f``. :meth:`PeriodicRPE.pairwise`, :meth:`PeriodicRPE.estimate`
and :meth:`PeriodicRPE.closed_form` take *pair* data: coordinate differences followed by the
query token's geometry (what ``pairwise`` builds).

Slabs and wires (``pbc`` with one or two ``False``): only the periodic cell rows ``B``
(``d`` of them) form the lattice. ``Delta`` splits into its part in their span, with
fractional coordinates ``s = G^-1 B Delta`` (not the first ``d`` entries of ``L^-T Delta``
when the vacuum vector is tilted), and the orthogonal part ``Delta_perp`` (coordinates in an
orthonormal basis of the complement). Then

.. math::

    f(\Delta) = \Big[\frac{1}{V_d} \sum_{n \in \mathbb{Z}^d} \hat g_{0,d}(\xi_n)
        \cos(2 \pi n \cdot s)\Big] \; e^{-|\Delta_\perp|^2 / (2 l^2)}

with ``V_d = sqrt(det G)`` (the area of a slab's surface cell) and the ``d``-dimensional
``g0_hat``. The normal factor is estimated with ``m_perp`` random Fourier features of the
Gaussian (frequencies ``eps / (2 pi l)``, ``eps ~ N(0, I)`` in orthogonal blocks, redrawn by
:meth:`PeriodicRPE.redraw`), ``m_perp^-1/2 [cos, sin]`` on both sides, and combined with the
series by the Kronecker product of the two feature vectors: ``2M x 2 m_perp = 4 M m_perp``
features with ``M = ((2K + 1)^d + 1) / 2`` (400 for a slab with ``K = 3``, ``m_perp = 4``).
``closed_form`` uses the exact normal factor, ``estimate`` the current draw's.

Coulomb spectrum (``spectrum="coulomb"``, crystals only): the same series with

.. math::

    \hat g(\xi) = \frac{A}{\pi |\xi|^2} e^{-2 \pi^2 l^2 |\xi|^2} \;(\xi \ne 0), \qquad
    \hat g(0) = 0,

the Fourier transform of ``A erf(|r| / (sqrt(2) l)) / |r|``, the potential of a Gaussian
charge of width ``l``. With ``k = 2 pi xi`` it is ``(4 pi A / V) sum_(k != 0)
exp(-k^2 l^2 / 2) / k^2 cos(k . Delta)``: the reciprocal-space Ewald kernel with splitting
parameter ``alpha = 1 / (sqrt(2) l)`` and a neutralising background (no ``k = 0`` term), so
for charges ``q`` (values) ``1/2 sum_ij q_i q_j f(r_i - r_j)`` is ``A`` times the
reciprocal-space Ewald energy (:func:`geolinrpe.physics.ewald`; test). Linear attention over
these features is an O(n) learned reciprocal-space interaction: ``A`` and ``l`` are learned
per head, and the heads' spectra mix through the values. ``f`` has zero mean over the cell,
so constant values cancel (for neutral systems the background is exact). The real-space
image sum converges only conditionally; :meth:`PeriodicRPE.image_sum` is for the Gaussian.

Exact self term (``complete_diagonal``, default on for the Coulomb spectrum, crystals only):
a truncated series misses ``f(0) - f_hat(0)`` at ``i = j``, a token's interaction with its
own images, which for the Coulomb kernel is ``A`` times the cell's Madelung self-potential
and depends on the box size as ``1 / L``: a model trained on small boxes would carry the
wrong constant per atom to large ones. The completion adds the missing part exactly, per
graph and head: ``out_i += K(q_i, k_i) (f(0) - f_hat(0)) v_i`` in
:class:`~geolinrpe.nn.RPEAttention` (mask mode, ``normalize="none"``: O(n), no pair terms) and
on the diagonal of :meth:`PeriodicRPE.pairwise` with ``exact=True`` (the O(n^2) reference).
:meth:`PeriodicRPE.diagonal_correction` computes it from the encoded geometry: for the Gaussian
``f(0) = A sum_R exp(-|R|^2 / (2 l^2))``; for the Coulomb kernel, with ``alpha = 1 /
(sqrt(2) l)`` and the cell's self-potential ``phi_self = 2 E_1`` (the Ewald energy of one unit
charge per cell, :func:`geolinrpe.physics.ewald`, carried in the encoding),
``f(0) = A [phi_self + 2 alpha / sqrt(pi) + pi / (V alpha^2)
- sum_(R != 0) erfc(alpha |R|) / |R|]``.
Lattice sums run over ``|R| <= 9 l`` (neglected terms below 1e-16).

Truncation: every omitted ``n`` has ``|xi_n| >= (K + 1) / a_max`` (``xi_n . a_k = n_k``),
so the relative error of the series is about ``exp(-2 pi^2 l^2 (K + 1)^2 / a_max^2)``:
``K + 1 >= (a_max / (pi l)) sqrt(ln(1 / eps) / 2)`` for a tolerance ``eps``. Cells much
longer than ``l`` need many terms (the truncated series is then a smoothed ``f``, still
positive definite for ``A >= 0`` since every weight is). :meth:`PeriodicRPE.image_sum`
is the real-space reference.

Invariances (with :class:`~geolinrpe.nn.RPEAttention`): moving an atom by a lattice vector
changes nothing (its fractional coordinates change by integers). In logit mode this is
exact only with ``center_positions=False``: the layer's centring subtracts the centroid,
which moves by ``R / n_atoms``, a uniform non-lattice translation that logit mode sees (it
is translation invariant only in expectation without centring). Mask mode is exactly
translation invariant, so both hold exactly there, centred or not.

Axes: ``...`` leading axes, g graphs, n tokens, h heads, M lattice frequencies, d periodic
dimensions, m perpendicular frequencies.
"""

from __future__ import annotations

import functools
import itertools
import math

import torch
from torch import Tensor, nn

from ..features.positive_random import gaussian_orthogonal_matrix
from .base import FourierRPE, _check_positive_ints, _split_scale

SPECTRA = ("gaussian", "coulomb")


def self_potential(cell: Tensor) -> Tensor:
    """``phi_self = 2 E_1`` of each cell ``[g, 3, 3]`` -> ``[g]``: the potential a unit
    charge feels from its own periodic images and the neutralising background (Gaussian
    units; ``-2.837297 / L`` for a cube of side ``L``). Data, not learned: no gradient."""
    rows = cell.detach().double().cpu().numpy()
    values = [_self_potential(row.tobytes()) for row in rows]
    return torch.tensor(values, dtype=cell.dtype, device=cell.device)


@functools.lru_cache(maxsize=4096)
def _self_potential(cell_bytes: bytes) -> float:
    """Cached per cell (training sets repeat their cells every epoch): about 1.4 ms each."""
    from ..physics.ewald import ewald

    cell = torch.frombuffer(bytearray(cell_bytes), dtype=torch.float64).reshape(3, 3)
    one, origin = torch.ones(1, dtype=torch.float64), torch.zeros(1, 3, dtype=torch.float64)
    return 2 * float(ewald(origin, one, cell, coulomb_constant=1.0, tolerance=1e-12))


def half_space_indices(max_index: int, dim: int) -> tuple[Tensor, Tensor]:
    """Integer vectors ``n`` with ``|n_i| <= max_index``: ``0`` and those whose first non-zero
    entry is positive, with multiplicities 1 (for ``n = 0``) and 2.

    Returns ``(n [M, dim], multiplicity [M])`` in float64, ``M = ((2K + 1)^dim + 1) / 2``.
    """
    span = range(-max_index, max_index + 1)
    keep = [n for n in itertools.product(span, repeat=dim) if next((v for v in n if v), 0) >= 0]
    keep.sort(key=lambda n: (sum(abs(v) for v in n), n))  # n = 0 first
    index = torch.tensor(keep, dtype=torch.float64).reshape(-1, dim)
    multiplicity = torch.where(index.abs().sum(-1) > 0, 2.0, 1.0).to(torch.float64)
    return index, multiplicity


class PeriodicRPE(FourierRPE):
    r"""Lattice image sum of a Gaussian (or a screened Coulomb potential) per head, for crystals
    and slabs (``"flt-periodic"``).

    FourierLearner-Transformer RPE (Choromanski et al., `"Learning a Fourier Transform for
    Linear Relative Positional Encodings in Transformers" <https://arxiv.org/abs/2302.01925>`_,
    AISTATS 2024) whose frequencies lie on the reciprocal lattice of each graph's cell
    (``docs/math.md``); see the module docstring for the derivation, slabs, truncation and
    invariances:

    .. math::

        f_h(\Delta) = \sum_R A_h e^{-|\Delta + R|^2 / (2 l_h^2)}
            \approx \frac{1}{V} \sum_{\|n\|_\infty \le K} \hat g_{0,h}(L^{-1} n)
            \cos(2 \pi n \cdot s)

    Needs ``cell [g, 3, 3]`` (rows are lattice vectors, one per graph) in
    :class:`~geolinrpe.nn.RPEAttention` (``periodic = True``). Estimates are signed although
    ``f >= 0`` for ``A >= 0``: a truncated series can dip below 0 when ``max_index`` is small
    for ``l``, and a slab's normal-factor estimate is a cosine average. In mask mode use
    ``normalize="kernel"`` (the layer's default).

    Args:
        pos_dim: position dimension; must be 3.
        num_heads: number of heads ``h``.
        max_index: ``K``, the series keeps ``|n_i| <= K`` (default 3; ``>= 0``).
        pbc: periodic cell directions, three bools, at least one ``True`` (default
            ``(True, True, True)``; ``(True, True, False)`` for a slab whose third cell vector
            spans the vacuum).
        num_perp_frequencies: ``m_perp``, random Fourier features of the non-periodic
            factor (default 4; unused when every direction is periodic).
        lengthscale: initial ``l`` in position units (default 1.0).
        amplitude: initial ``A`` (default 1.0; 0.0 = neutral logit-mode bias).
        spectrum: ``"gaussian"`` (default: the image sum of a Gaussian) or ``"coulomb"``
            (the reciprocal-space Ewald kernel of a Gaussian charge of width ``l``; every
            direction periodic).
        complete_diagonal: add the truncated series' missing ``f(0) - f_hat(0)`` to each
            token's own term (module docstring; crystals only; needs mask mode with
            ``normalize="none"`` in the layer). Default: ``True`` for ``"coulomb"``, else
            ``False``.

    Shapes:
        ``encode_positions(pos [n, 3] or [b, n, 3], cell [g, 3, 3])`` -> ``[..., n, E]`` with
        ``E = 3 + d^2 + 1`` (``d`` periodic directions: 13 for a crystal, 8 for a slab);
        ``pairwise(pos [b, n, E])`` -> ``[b, h, i, j]``;
        ``closed_form(delta [..., E])``, ``estimate(delta [..., E])`` -> ``[..., h]``;
        ``image_sum(delta [..., 3], cell [..., 3, 3])`` -> ``[..., h]``;
        features ``[..., h, num_features]``.
    """

    periodic = True

    takes_spectrum = False  # its features are lattice series, not spectrum() draws

    def __init__(
        self,
        pos_dim: int = 3,
        num_heads: int = 1,
        max_index: int = 3,
        pbc: tuple[bool, bool, bool] = (True, True, True),
        num_perp_frequencies: int = 4,
        lengthscale: float = 1.0,
        amplitude: float = 1.0,
        spectrum: str = "gaussian",
        complete_diagonal: bool | None = None,
    ) -> None:
        if pos_dim != 3:
            raise ValueError(f"pos_dim must be 3 for a periodic RPE, got {pos_dim!r}")
        if not isinstance(max_index, int) or isinstance(max_index, bool) or max_index < 0:
            raise ValueError(f"max_index must be an int >= 0, got {max_index!r}")
        pbc = tuple(pbc) if isinstance(pbc, (tuple, list)) else pbc
        if (
            not isinstance(pbc, tuple)
            or len(pbc) != 3
            or not all(isinstance(p, bool) for p in pbc)
            or not any(pbc)
        ):
            raise ValueError(f"pbc must be three bools, at least one True, got {pbc!r}")
        _check_positive_ints(num_perp_frequencies=num_perp_frequencies)
        if spectrum not in SPECTRA:
            raise ValueError(f"spectrum must be one of {SPECTRA}, got {spectrum!r}")
        if spectrum == "coulomb" and not all(pbc):
            raise ValueError(
                "spectrum='coulomb' needs every direction periodic (a slab's Coulomb kernel "
                f"does not factor into a lattice series times a normal factor), got pbc={pbc}"
            )
        if not lengthscale > 0:
            raise ValueError(f"lengthscale must be positive, got {lengthscale}")
        periodic_dims = sum(pbc)
        index, multiplicity = half_space_indices(max_index, periodic_dims)
        super().__init__(pos_dim, num_heads, index.shape[0])
        self.max_index = max_index
        if complete_diagonal is None:
            complete_diagonal = spectrum == "coulomb"
        if complete_diagonal and not all(pbc):
            raise ValueError(f"complete_diagonal needs every direction periodic, got pbc={pbc}")
        self.pbc = pbc
        self.spectrum = spectrum
        self.complete_diagonal = bool(complete_diagonal)
        self.periodic_dims = periodic_dims
        self.perp_dims = 3 - periodic_dims
        self.num_perp_frequencies = num_perp_frequencies
        self.init_lengthscale = float(lengthscale)
        self.init_amplitude = float(amplitude)
        self.amplitude = nn.Parameter(torch.empty(num_heads))
        self.log_lengthscale = nn.Parameter(torch.empty(num_heads))
        self.register_buffer("lattice_indices", index, persistent=False)
        self.register_buffer("multiplicity", multiplicity, persistent=False)
        if self.perp_dims:
            shape = (num_heads, num_perp_frequencies, self.perp_dims)
            self.register_buffer("perp_noise", torch.empty(shape))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.amplitude.fill_(self.init_amplitude)
            self.log_lengthscale.fill_(math.log(self.init_lengthscale))
        self.redraw()

    @torch.no_grad()
    def redraw(self, generator: torch.Generator | None = None) -> None:
        """New normal-direction frequencies (slabs, wires); the series is deterministic."""
        if not self.perp_dims:
            return
        eps = torch.stack(
            [
                gaussian_orthogonal_matrix(
                    self.num_perp_frequencies, self.perp_dims, generator=generator
                )
                for _ in range(self.num_heads)
            ]
        )
        self.perp_noise.copy_(eps.to(self.perp_noise))

    @property
    def lengthscale(self) -> Tensor:
        return self.log_lengthscale.exp()

    @property
    def num_features(self) -> int:
        """``2M`` (every direction periodic) or ``4 M m_perp``."""
        if self.perp_dims:
            return 4 * self.num_frequencies * self.num_perp_frequencies
        return 2 * self.num_frequencies

    @property
    def encoded_dim(self) -> int:
        """Per-token size ``E = 3 + d^2 + 1`` of :meth:`encode_positions` (``+ 1`` for the
        cell's self-potential with the Coulomb spectrum's ``complete_diagonal``)."""
        return 3 + self.periodic_dims**2 + 1 + int(self._carries_self_potential)

    @property
    def _carries_self_potential(self) -> bool:
        return self.complete_diagonal and self.spectrum == "coulomb"

    # ------------------------------------------------------------------ geometry
    def cell_geometry(self, cell: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Per-graph maps of ``cell [g, 3, 3]`` (rows are lattice vectors).

        Returns ``to_frac [g, 3, d]`` (``s = r @ to_frac``), ``perp_basis [g, 3, 3 - d]``
        (orthonormal columns spanning the complement of the periodic rows),
        ``metric_inv [g, d, d]`` (``G^-1``) and ``inv_volume [g]`` (``1 / sqrt(det G)``).
        """
        if cell.dim() != 3 or tuple(cell.shape[-2:]) != (3, 3):
            raise ValueError(f"cell must be [g, 3, 3], got {list(cell.shape)}")
        periodic = [k for k in range(3) if self.pbc[k]]
        free = [k for k in range(3) if not self.pbc[k]]
        rows = cell[:, periodic]  # B [g, d, 3]
        metric = rows @ rows.transpose(-1, -2)
        metric_inv = torch.linalg.inv(metric)
        to_frac = rows.transpose(-1, -2) @ metric_inv
        inv_volume = torch.linalg.det(metric).rsqrt()
        q, _ = torch.linalg.qr(cell[:, periodic + free].transpose(-1, -2))
        return to_frac, q[..., self.periodic_dims :], metric_inv, inv_volume

    def encode_positions(
        self,
        pos: Tensor,
        *,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
        cell: Tensor | None = None,
    ) -> Tensor:
        """Per token: ``[s (d, wrapped), Delta_perp coords (3 - d), G^-1 (d^2), 1 / V]``.

        ``pos [n, 3]`` (packed, ``batch``; ``None`` = one graph) or ``[b, n, 3]`` (dense, one
        cell per row); ``cell [g, 3, 3]``.
        """
        if cell is None:
            raise ValueError("PeriodicRPE needs cell [g, 3, 3] (rows are lattice vectors)")
        if pos.dim() not in (2, 3) or pos.shape[-1] != 3:
            raise ValueError(f"pos must be [n, 3] or [b, n, 3], got {list(pos.shape)}")
        pos = pos.to(torch.promote_types(pos.dtype, torch.float32))  # phases need precision
        with torch.autocast(pos.device.type, enabled=False):
            return self._encode(pos, batch, cell.to(pos.dtype))

    def _encode(self, pos: Tensor, batch: Tensor | None, cell: Tensor) -> Tensor:
        to_frac, perp, metric_inv, inv_volume = self.cell_geometry(cell)
        columns = [metric_inv.flatten(-2), inv_volume[:, None]]  # [g, d^2 + 1]
        if self._carries_self_potential:
            columns.append(self_potential(cell)[:, None])
        geometry = torch.cat(columns, -1)
        if pos.dim() == 2:
            if batch is None:
                batch = torch.zeros(pos.shape[0], dtype=torch.long, device=pos.device)
            frac = torch.einsum("np,npk->nk", pos, to_frac[batch])
            normal = torch.einsum("np,npk->nk", pos, perp[batch])
            geometry = geometry[batch]
        else:
            if cell.shape[0] != pos.shape[0]:
                raise ValueError(
                    f"dense pos has {pos.shape[0]} rows but cell has {cell.shape[0]} cells"
                )
            frac = torch.einsum("bnp,bpk->bnk", pos, to_frac)
            normal = torch.einsum("bnp,bpk->bnk", pos, perp)
            geometry = geometry[:, None].expand(-1, pos.shape[1], -1)
        return torch.cat([frac - frac.floor(), normal, geometry], -1)

    # ------------------------------------------------------------------ features
    def _split(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(frac, normal, metric_inv, inv_volume)`` of encoded positions or pair data."""
        if data.shape[-1] != self.encoded_dim:
            raise ValueError(
                f"PeriodicRPE expects encoded positions or pair data with {self.encoded_dim} "
                f"entries (see encode_positions), got {data.shape[-1]}"
            )
        d = self.periodic_dims
        frac, normal = data[..., :d], data[..., d:3]
        metric_inv = data[..., 3 : 3 + d * d].unflatten(-1, (d, d))
        return frac, normal, metric_inv, data[..., 3 + d * d]

    def _lattice(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``cos, sin [..., M]`` and importance weights ``a [..., h, M]``."""
        frac, _, metric_inv, inv_volume = self._split(data)
        index = self.lattice_indices.to(data.dtype)
        phase = 2 * math.pi * frac @ index.T
        sq_norm = torch.einsum("...ij,mi,mj->...m", metric_inv, index, index)  # |xi_n|^2
        ls = self.lengthscale.to(data.dtype)[:, None]  # [h, 1]
        amplitude = self.amplitude.to(data.dtype)[:, None]
        damping = torch.exp(-2 * math.pi**2 * ls**2 * sq_norm[..., None, :])
        if self.spectrum == "coulomb":  # A / (pi |xi|^2), 0 at n = 0
            inverse = torch.where(sq_norm > 0, 1 / (math.pi * sq_norm.clamp_min(1e-30)), 0.0)
            density = amplitude * inverse[..., None, :] * damping
        else:
            density = amplitude * (2 * math.pi * ls**2) ** (self.periodic_dims / 2) * damping
        weight = self.num_frequencies * self.multiplicity.to(data.dtype) * density
        return torch.cos(phase), torch.sin(phase), weight * inv_volume[..., None, None]

    def _perp_phase(self, normal: Tensor) -> Tensor:
        """``2 pi xi_perp . z``: ``[..., h, m_perp]``."""
        xi = (
            self.perp_noise.to(normal.dtype)
            / (2 * math.pi * self.lengthscale.to(normal.dtype))[:, None, None]
        )
        return 2 * math.pi * torch.einsum("...p,hmp->...hm", normal, xi)

    def _features(self, pos: Tensor, split: str, query: bool) -> Tensor:
        cos, sin, weight = self._lattice(pos)
        if split == "query":
            factor = weight if query else torch.ones_like(weight)
        elif split == "symmetric":
            factor = weight / _split_scale(weight) if query else _split_scale(weight)
        else:
            raise ValueError(f"split must be 'query' or 'symmetric', got {split!r}")
        scale = factor / math.sqrt(self.num_frequencies)
        psi = torch.cat([cos[..., None, :] * scale, sin[..., None, :] * scale], dim=-1)
        if not self.perp_dims:
            return psi
        phase = self._perp_phase(pos[..., self.periodic_dims : 3])
        normal = torch.cat([phase.cos(), phase.sin()], -1) / math.sqrt(self.num_perp_frequencies)
        return (psi[..., :, None] * normal[..., None, :]).flatten(-2)

    def query_features(self, pos: Tensor, split: str = "query") -> Tensor:
        """``psi_q``: encoded ``pos [..., E]`` -> ``[..., h, num_features]``."""
        return self._features(pos, split, query=True)

    def key_features(self, pos: Tensor, split: str = "query") -> Tensor:
        """``psi_k``: encoded ``pos [..., E]`` -> ``[..., h, num_features]``."""
        return self._features(pos, split, query=False)

    def _series(self, delta: Tensor) -> Tensor:
        cos, _, weight = self._lattice(delta)
        return (weight * cos[..., None, :]).mean(-1)  # [..., h]

    def estimate(self, delta: Tensor) -> Tensor:
        """``f_hat`` of pair data ``delta [..., E]`` (see :meth:`pairwise`) -> ``[..., h]``.

        The truncated series, times the current draw's normal-factor estimate (slabs).
        """
        series = self._series(delta)
        if not self.perp_dims:
            return series
        return series * self._perp_phase(delta[..., self.periodic_dims : 3]).cos().mean(-1)

    def closed_form(self, delta: Tensor) -> Tensor:
        """Truncated series times the exact normal factor: pair data ``[..., E]`` -> ``[..., h]``.

        Equals :meth:`estimate` when every direction is periodic; converges to
        :meth:`image_sum` as ``max_index`` grows.
        """
        series = self._series(delta)
        if not self.perp_dims:
            return series
        sq = delta[..., self.periodic_dims : 3].pow(2).sum(-1, keepdim=True)
        return series * torch.exp(-sq / (2 * self.lengthscale.to(delta.dtype) ** 2))

    def pairwise(self, pos: Tensor, exact: bool = False) -> Tensor:
        """Dense ``f(r_i - r_j)``: encoded ``pos [b, n, E]`` -> ``[b, h, i, j]`` (O(n^2) memory
        times ``M``; references and tests only).

        Pair data are the coordinate differences followed by the query token's geometry.
        """
        coords, geometry = pos[..., :3], pos[..., 3:]
        diff = coords.unsqueeze(-2) - coords.unsqueeze(-3)  # [b, i, j, 3]
        query_geometry = geometry.unsqueeze(-2).expand(*diff.shape[:-1], geometry.shape[-1])
        delta = torch.cat([diff, query_geometry], -1)
        values = (self.closed_form(delta) if exact else self.estimate(delta)).movedim(-1, -3)
        if exact and self.complete_diagonal:  # f(0) - f_hat(0) on i = j
            eye = torch.eye(values.shape[-1], dtype=values.dtype, device=values.device)
            values = values + self.diagonal_correction(pos).movedim(-1, -2)[..., None] * eye
        return values

    def diagonal_correction(self, pos: Tensor) -> Tensor:
        """``f(0) - f_hat(0)`` per token and head: encoded ``pos [..., E]`` -> ``[..., h]``
        (module docstring, "Exact self term"; crystals only).

        Computed once per distinct cell in ``pos``; differentiable in ``A`` and ``l``.
        """
        if not all(self.pbc):
            raise ValueError("diagonal_correction needs every direction periodic")
        geometry = pos[..., 3:].reshape(-1, pos.shape[-1] - 3)
        cells, index = torch.unique(geometry.detach(), dim=0, return_inverse=True)
        cells = (
            geometry.new_zeros(cells.shape).index_add(0, index, geometry)
            / torch.bincount(index, minlength=cells.shape[0]).to(geometry.dtype)[:, None]
        )  # the same rows, with their autograd history
        data = torch.cat([cells.new_zeros(cells.shape[0], 3), cells], -1)
        _, _, metric_inv, inv_volume = self._split(data)
        estimate = self._lattice(data)[2].mean(-1)  # f_hat(0) = mean of the weights [c, h]
        ls = self.lengthscale.to(data.dtype)
        # lattice vectors R within 9 l_max: |n_i| <= 9 l / h_i, h_i = 1 / sqrt(G^-1_ii)
        spacing = torch.diagonal(metric_inv.detach(), dim1=-2, dim2=-1).max().sqrt()  # 1 / h_min
        reach = 9 * float(ls.detach().max()) * float(spacing)
        span = torch.arange(-math.ceil(reach), math.ceil(reach) + 1, dtype=data.dtype)
        n = torch.stack(torch.meshgrid(span, span, span, indexing="ij"), -1).reshape(-1, 3)
        sq = torch.einsum("cij,ri,rj->cr", torch.linalg.inv(metric_inv), n, n)  # |R|^2 [c, r]
        amplitude = self.amplitude.to(data.dtype)
        if self.spectrum == "gaussian":
            exact = amplitude * torch.exp(-sq[..., None] / (2 * ls**2)).sum(-2)
        else:
            alpha = 1 / (math.sqrt(2) * ls)  # [h]
            dist = sq.clamp_min(1e-30).sqrt()[..., None]  # [c, r, 1]
            images = torch.where(sq[..., None] > 0, torch.erfc(alpha * dist) / dist, 0.0)
            exact = amplitude * (
                data[:, -1:]  # the cell's self-potential
                + 2 * alpha / math.sqrt(math.pi)
                + math.pi * inv_volume[:, None] / alpha**2
                - images.sum(-2)
            )
        return (exact - estimate)[index].reshape(*pos.shape[:-1], self.num_heads)

    def image_sum(self, delta: Tensor, cell: Tensor, num_images: int = 3) -> Tensor:
        """Real-space reference ``sum_R f0(delta + R)`` over ``|n_k| <= num_images`` on the
        periodic directions.

        ``delta [..., 3]`` (Cartesian), ``cell [3, 3]`` or broadcastable ``[..., 3, 3]``
        -> ``[..., h]``. Gaussian spectrum only.
        """
        if self.spectrum != "gaussian":
            raise ValueError(
                "image_sum is the Gaussian's image sum; the Coulomb kernel's converges only "
                "conditionally (use closed_form, or geolinrpe.physics.ewald)"
            )
        axes = [
            torch.arange(-num_images if p else 0, (num_images if p else 0) + 1) for p in self.pbc
        ]
        index = torch.stack(torch.meshgrid(*axes, indexing="ij"), -1).reshape(-1, 3)
        index = index.to(device=delta.device, dtype=delta.dtype)
        shifts = torch.einsum("ik,...kp->...ip", index, cell.to(delta.dtype))
        sq = (delta.unsqueeze(-2) + shifts).pow(2).sum(-1, keepdim=True)  # [..., I, 1]
        ls = self.lengthscale.to(delta.dtype)
        return (self.amplitude.to(delta.dtype) * torch.exp(-sq / (2 * ls**2))).sum(-2)

    def spectrum(self) -> tuple[Tensor, Tensor]:
        raise NotImplementedError(
            "PeriodicRPE's frequencies L^-1 n depend on each graph's cell; the features come "
            "from encode_positions (see lattice_indices)"
        )

    def extra_repr(self) -> str:
        return (
            f"num_heads={self.num_heads}, max_index={self.max_index}, pbc={self.pbc}, "
            f"spectrum={self.spectrum!r}, num_perp_frequencies={self.num_perp_frequencies}, "
            f"num_features={self.num_features}"
        )
