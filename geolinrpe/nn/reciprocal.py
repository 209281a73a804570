r"""``ReciprocalEnergy``: a learned reciprocal-space (Ewald-type) energy of latent charges, O(n).

Axes: n atoms, b/g graphs, L longest graph, c channels, h charge channels (heads),
F RPE features.

Per atom ``i`` of a periodic graph, ``h`` latent charges ``Q_ih = (W x_i)_h - mean_(j in g)
(W x_j)_h`` (neutral per graph and channel, as the series leaves out ``k = 0``) interact through
the lattice-periodic Coulomb kernel of :class:`~geolinrpe.rpe.periodic.PeriodicRPE`
(``spectrum="coulomb"``: amplitude ``A_h`` and Gaussian width ``l_h`` learned per channel):

.. math::

    E_g = \frac12 \sum_h \sum_{i, j \in g} Q_{ih} f_h(r_i - r_j) Q_{jh}
        = \frac{2 \pi}{V} \sum_h A_h \sum_{k \ne 0} \frac{e^{-k^2 l_h^2 / 2}}{k^2}
          \Big|\sum_j Q_{jh} e^{i k \cdot r_j}\Big|^2

the reciprocal-space Ewald energy (``docs/long_range.md``) with learned charges, splitting
and scale, over the lattice frequencies ``|n_i| <= max_index`` and with the exact self term
(``complete_diagonal``). It is linear attention with a constant kernel: per graph the state
``S_g = sum_j psi_k(r_j) Q_j`` (``h x F``), then ``E_g = 1/2 sum_i Q_i (psi_q(r_i) . S_g +
delta_i Q_i)``: O(n F) time and memory, against O(n^2 F) for :meth:`reference`. ``A_h`` starts
at :data:`~geolinrpe.physics.COULOMB_CONSTANT` (eV Å), so charges are in elementary charges
and energies in eV when positions are in Å. With ``A_h >= 0`` the energy is ``>= 0`` (every
lattice weight is); the short-range model supplies the rest (real-space and self terms).

Invariances: translations, lattice shifts of any atom and permutations within a graph leave
``E_g`` unchanged exactly; rotations of atoms and cell together change it only through the
truncation of the series (a cube of lattice indices, not a sphere).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ..ops.packing import to_packed
from ..physics.ewald import COULOMB_CONSTANT
from ..rpe.periodic import PeriodicRPE

__all__ = ["ReciprocalEnergy"]


class ReciprocalEnergy(nn.Module):
    r"""Learned reciprocal-space energy of latent charges (module docstring).

    Args:
        embed_dim: input channels ``c``.
        num_channels: charge channels ``h``, each with its own ``A_h``, ``l_h`` (default 4).
        max_index: lattice indices ``|n_i| <= K`` (default 4: ``M = 365`` frequencies).
        lengthscale: initial widths ``l_h`` (Å): a float or one per channel (default
            ``(1.5, 2.0, 3.0, 4.0)`` cycled over the channels).
        amplitude: initial ``A_h`` (default :data:`~geolinrpe.physics.COULOMB_CONSTANT`).
        rpe_options: further :class:`~geolinrpe.rpe.periodic.PeriodicRPE` options.

    Shapes:
        ``forward(x, pos, cell, batch=None, key_padding_mask=None)``: packed ``x [n, c]``,
        ``pos [n, 3]``, ``batch [n]`` or dense ``x [b, L, c]``, ``pos [b, L, 3]``,
        ``key_padding_mask [b, L]``; ``cell [g, 3, 3]`` -> energies ``[g]``.
    """

    def __init__(
        self,
        embed_dim: int,
        num_channels: int = 4,
        max_index: int = 4,
        lengthscale: float | tuple[float, ...] = (1.5, 2.0, 3.0, 4.0),
        amplitude: float = COULOMB_CONSTANT,
        rpe_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_channels, int) or isinstance(num_channels, bool) or num_channels < 1:
            raise ValueError(f"num_channels must be a positive int, got {num_channels!r}")
        widths = (lengthscale,) if isinstance(lengthscale, (int, float)) else tuple(lengthscale)
        if not widths or not all(float(w) > 0 for w in widths):
            raise ValueError(f"lengthscale must be positive, got {lengthscale!r}")
        self.init_lengthscales = [float(widths[h % len(widths)]) for h in range(num_channels)]
        options = dict(spectrum="coulomb", complete_diagonal=True, **(rpe_options or {}))
        self.rpe = PeriodicRPE(3, num_channels, max_index=max_index, amplitude=amplitude, **options)
        self.charges = nn.Linear(embed_dim, num_channels, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.rpe.reset_parameters()
        with torch.no_grad():
            self.rpe.log_lengthscale.copy_(torch.tensor(self.init_lengthscales).log())
        self.charges.reset_parameters()

    def _prepare(self, x, pos, cell, batch, key_padding_mask):
        """Packed neutral charges ``[n, h]``, encoded positions, ``batch`` and graph count."""
        x, pos, batch, num_graphs = self._packed(x, pos, cell, batch, key_padding_mask)
        charges = self._neutral(self.charges(x), batch, num_graphs)
        enc = self.rpe.encode_positions(pos, batch=batch, cell=cell.to(pos.dtype))
        return charges, enc, batch, num_graphs

    def _packed(self, x, pos, cell, batch, key_padding_mask):
        if x.dim() == 3:
            mask = (
                key_padding_mask
                if key_padding_mask is not None
                else torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device)
            )
            packed_x, batch = to_packed(x, mask)
            return packed_x, to_packed(pos, mask)[0], batch, x.shape[0]
        if batch is None:
            batch = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        return x, pos, batch, cell.shape[0]

    @staticmethod
    def _neutral(charges: Tensor, batch: Tensor, num_graphs: int) -> Tensor:
        """Subtract each graph's mean charge per channel."""
        total = charges.new_zeros(num_graphs, charges.shape[-1]).index_add(0, batch, charges)
        count = torch.bincount(batch, minlength=num_graphs).clamp_min(1).to(charges.dtype)
        return charges - (total / count[:, None])[batch]

    def forward(
        self,
        x: Tensor,
        pos: Tensor,
        cell: Tensor,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """Energies ``[g]``; see the class docstring."""
        charges, enc, batch, num_graphs = self._prepare(x, pos, cell, batch, key_padding_mask)
        psi_q = self.rpe.query_features(enc).to(charges.dtype)  # [n, h, F]
        psi_k = self.rpe.key_features(enc).to(charges.dtype)
        state = charges.new_zeros(num_graphs, *psi_k.shape[1:])
        state = state.index_add(0, batch, psi_k * charges[..., None])  # [g, h, F]
        potential = (psi_q * state[batch]).sum(-1)  # [n, h]
        potential = potential + self.rpe.diagonal_correction(enc).to(charges.dtype) * charges
        energy = 0.5 * (charges * potential).sum(-1)  # [n]
        return charges.new_zeros(num_graphs).index_add(0, batch, energy)

    def reference(
        self,
        x: Tensor,
        pos: Tensor,
        cell: Tensor,
        batch: Tensor | None = None,
        key_padding_mask: Tensor | None = None,
    ) -> Tensor:
        """The same energies from the dense ``[h, n, n]`` kernel of each graph
        (``pairwise(exact=True)``, completed diagonal): O(n^2) memory, for tests and the
        exact baseline."""
        charges, enc, batch, num_graphs = self._prepare(x, pos, cell, batch, key_padding_mask)
        energies = []
        for g in range(num_graphs):
            rows = batch == g
            kernel = self.rpe.pairwise(enc[rows][None], exact=True)[0].to(charges.dtype)
            q = charges[rows].T  # [h, n_g]
            energies.append(0.5 * torch.einsum("hi,hij,hj->", q, kernel, q))
        return torch.stack(energies) if energies else charges.new_zeros(0)

    def extra_repr(self) -> str:
        return f"num_channels={self.rpe.num_heads}, max_index={self.rpe.max_index}"
