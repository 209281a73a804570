r"""FLT RPE for periodic cells: the lattice image sum of a Gaussian (``"flt-periodic"``).

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

import itertools
import math

import torch
from torch import Tensor, nn

from ..features.positive_random import gaussian_orthogonal_matrix
from .base import FourierRPE, _check_positive_ints, _split_scale


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
    r"""Lattice image sum of a Gaussian per head, for crystals and slabs (``"flt-periodic"``).

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
        if not lengthscale > 0:
            raise ValueError(f"lengthscale must be positive, got {lengthscale}")
        periodic_dims = sum(pbc)
        index, multiplicity = half_space_indices(max_index, periodic_dims)
        super().__init__(pos_dim, num_heads, index.shape[0])
        self.max_index = max_index
        self.pbc = pbc
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
        """Per-token size ``E = 3 + d^2 + 1`` of :meth:`encode_positions`."""
        return 3 + self.periodic_dims**2 + 1

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
        geometry = torch.cat([metric_inv.flatten(-2), inv_volume[:, None]], -1)  # [g, d^2 + 1]
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
        if data.shape[-1] != self.encoded_dim:
            raise ValueError(
                f"PeriodicRPE expects encoded positions or pair data with {self.encoded_dim} "
                f"entries (see encode_positions), got {data.shape[-1]}"
            )
        d = self.periodic_dims
        frac, normal = data[..., :d], data[..., d:3]
        metric_inv = data[..., 3 : 3 + d * d].unflatten(-1, (d, d))
        return frac, normal, metric_inv, data[..., -1]

    def _lattice(self, data: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``cos, sin [..., M]`` and importance weights ``a [..., h, M]``."""
        frac, _, metric_inv, inv_volume = self._split(data)
        index = self.lattice_indices.to(data.dtype)
        phase = 2 * math.pi * frac @ index.T
        sq_norm = torch.einsum("...ij,mi,mj->...m", metric_inv, index, index)  # |xi_n|^2
        ls = self.lengthscale.to(data.dtype)[:, None]  # [h, 1]
        prefactor = self.amplitude.to(data.dtype)[:, None] * (2 * math.pi * ls**2) ** (
            self.periodic_dims / 2
        )
        density = prefactor * torch.exp(-2 * math.pi**2 * ls**2 * sq_norm[..., None, :])
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
        values = self.closed_form(delta) if exact else self.estimate(delta)
        return values.movedim(-1, -3)

    def image_sum(self, delta: Tensor, cell: Tensor, num_images: int = 3) -> Tensor:
        """Real-space reference ``sum_R f0(delta + R)`` over ``|n_k| <= num_images`` on the
        periodic directions.

        ``delta [..., 3]`` (Cartesian), ``cell [3, 3]`` or broadcastable ``[..., 3, 3]``
        -> ``[..., h]``.
        """
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
            f"num_perp_frequencies={self.num_perp_frequencies}, "
            f"num_features={self.num_features}"
        )
