r"""``SchNetBaseline``: PyG's SchNet on the library's radius graph, with the outputs of
:class:`~geolinrpe.models.MoleculeTransformer`.

Axes: n atoms, g molecules, e edges, t targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch_geometric.nn.models import SchNet

from ..nn.block import pool, read_batch
from ..ops.packing import to_packed
from .molecule import READOUTS, check_atomic_numbers, energy_and_forces, target_buffers
from .radius import RadiusInteractionGraph

__all__ = ["SchNetBaseline"]

#: atomic numbers SchNet embeds (``Embedding(100, ...)``)
SCHNET_MAX_Z = 99


class SchNetBaseline(nn.Module):
    r"""The SchNet baseline (Schütt et al., NeurIPS 2017, https://arxiv.org/abs/1706.08566),
    ``torch_geometric.nn.models.SchNet`` with a pure-torch radius graph.

    Continuous-filter convolutions over the neighbours within ``cutoff``:

    .. math::

        x_i' = \sum_{j \in \mathcal{N}(i)} x_j \odot
            h_\Theta\big(\exp(-\gamma (\lVert r_j - r_i \rVert - \mu)^2)\big), \qquad
        y_g = \sigma \odot \operatorname{pool}_{i \in g} \mathrm{MLP}(x_i) + \mu_y
              + \sum_{i \in g} \mathrm{ref}[z_i]

    The interaction graph is :class:`~geolinrpe.models.radius.RadiusInteractionGraph` (PyG's
    default needs ``torch-cluster``/``pyg-lib``); it keeps the ``max_num_neighbors`` nearest
    neighbours, deterministically. Target scaling, atom references and forces are those of
    :class:`~geolinrpe.models.MoleculeTransformer`, so the two compare on the same outputs
    (SchNet's own ``mean``/``std``/``atomref`` are not used).

    Args:
        hidden_channels: atom embedding size (default 128).
        num_filters: filter size (default 128).
        num_interactions: interaction blocks (default 6).
        num_gaussians: radial basis functions (default 50).
        cutoff: neighbour cutoff in the unit of ``pos`` (default 10.0).
        max_num_neighbors: nearest neighbours per atom (default 32).
        num_targets: outputs ``t`` per molecule (default 1).
        readout: ``"sum"`` (default) or ``"mean"``.
        atom_refs, target_mean, target_std, predict_forces: as for
            :class:`~geolinrpe.models.MoleculeTransformer` (atomic numbers up to 99).
        periodic: read ``cell [g, 3, 3]`` (and ``pbc [g, 3]``, default all periodic) from
            the batch; neighbours include periodic images (:func:`radius_graph_pbc`).

    Shapes:
        input: a PyG ``Batch`` with ``z [n]``, ``pos [n, 3]``, ``batch [n]``, or the dict of
        :func:`geolinrpe.data.collate_padded` (computed packed);
        output: ``{"y": [g, t]}``, plus ``"energy" [g]`` and ``"forces"`` (``[n, 3]``, or
        ``[b, L, 3]`` for a padded batch) with ``predict_forces``.
    """

    def __init__(
        self,
        hidden_channels: int = 128,
        num_filters: int = 128,
        num_interactions: int = 6,
        num_gaussians: int = 50,
        cutoff: float = 10.0,
        max_num_neighbors: int = 32,
        num_targets: int = 1,
        readout: str = "sum",
        atom_refs: Tensor | None = None,
        target_mean: float | Sequence[float] | Tensor | None = None,
        target_std: float | Sequence[float] | Tensor | None = None,
        predict_forces: bool = False,
        periodic: bool = False,
    ) -> None:
        super().__init__()
        for name, value in (
            ("hidden_channels", hidden_channels),
            ("num_filters", num_filters),
            ("num_interactions", num_interactions),
            ("num_gaussians", num_gaussians),
            ("max_num_neighbors", max_num_neighbors),
            ("num_targets", num_targets),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if hidden_channels < 2:
            raise ValueError(f"hidden_channels must be >= 2, got {hidden_channels}")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if predict_forces and num_targets != 1:
            raise ValueError(f"predict_forces needs num_targets=1 (the energy), got {num_targets}")
        self.num_targets = num_targets
        self.readout = readout
        self.predict_forces = bool(predict_forces)
        self.periodic = bool(periodic)
        self.schnet = SchNet(
            hidden_channels=hidden_channels,
            num_filters=num_filters,
            num_interactions=num_interactions,
            num_gaussians=num_gaussians,
            cutoff=cutoff,
            interaction_graph=RadiusInteractionGraph(cutoff, max_num_neighbors),
            readout="add" if readout == "sum" else "mean",
        )
        self.schnet.lin2 = nn.Linear(hidden_channels // 2, num_targets)
        mean, std, refs = target_buffers(
            num_targets, target_mean, target_std, atom_refs, SCHNET_MAX_Z
        )
        self.register_buffer("target_mean", mean)
        self.register_buffer("target_std", std)
        self.register_buffer("atom_refs", refs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset SchNet's parameters (PyG's initialisation)."""
        self.schnet.reset_parameters()

    def forward(self, data: Any) -> dict[str, Tensor]:
        """Predict; see the class docstring for inputs and outputs."""
        optional = ("cell", "pbc") if self.periodic else ()
        tokens = read_batch(data, ("z", "pos"), optional, dense_dims=2)
        cell = tokens.fields.get("cell")
        if self.periodic and cell is None:
            raise ValueError("periodic=True needs cell [g, 3, 3] in the batch")
        z, pos, mask = tokens.fields["z"], tokens.fields["pos"], tokens.key_padding_mask
        if pos.shape != z.shape + (3,):
            raise ValueError(f"pos must be {list(z.shape) + [3]} for z {list(z.shape)}")
        check_atomic_numbers(z, mask, SCHNET_MAX_Z)
        if self.predict_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(torch.is_grad_enabled() or self.predict_forces):
            if tokens.batch is None:  # dense: SchNet runs on the packed atoms
                if mask is None:
                    mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
                packed_pos, batch = to_packed(pos, mask)
                packed_z = z[~mask]
            else:
                packed_z, packed_pos, batch = z, pos, tokens.batch
            graph = self.schnet.interaction_graph
            graph.cell, graph.pbc = cell, tokens.fields.get("pbc")
            try:
                out = self.schnet(packed_z, packed_pos, batch)  # [g', t]
            finally:
                graph.cell = graph.pbc = None
            y = out.new_zeros(tokens.num_graphs, self.num_targets)
            y[: out.shape[0]] = out  # trailing all-padding rows stay 0
            y = y * self.target_std + self.target_mean
            if self.atom_refs is not None:
                y = y + pool(self.atom_refs[packed_z], batch, None, "sum", tokens.num_graphs)
            result = {"y": y}
            if self.predict_forces:
                result.update(energy_and_forces(y, pos, self.training, tokens.key_padding_mask))
        return result
