r"""``MoleculeTransformer``: an O(n) transformer over atoms with a 3D RPE (QM9, OC20, MD).

Axes: n atoms, b/g molecules, L longest molecule, c channels, t targets, e edges,
k radial channels, l/m spherical-harmonic degree/order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from ..nn.block import (
    RPETransformerEncoder,
    merge_attention_options,
    pool,
    read_batch,
)
from ..nn.reciprocal import ReciprocalEnergy
from ..ops.checks import eager_checks
from ..ops.packing import to_packed
from .radius import radius_graph, radius_graph_pbc
from .spherical_harmonics import spherical_harmonics

__all__ = ["MoleculeTransformer", "SphericalHarmonicsEmbedding"]

READOUTS = ("sum", "mean")
#: dense batches up to this many atom pairs (b L^2) use the all-pairs SH path in eager mode
DENSE_PAIRS = 1 << 20


class SphericalHarmonicsEmbedding(nn.Module):
    r"""Rotation-invariant atom features from the spherical harmonics of neighbour directions.

    Per atom ``i``, channel ``k`` and degree ``l`` (neighbours ``j`` within ``cutoff``,
    ``d_ij = |r_j - r_i|``, ``u_ij = (r_j - r_i) / d_ij``):

    .. math::

        A_{ik,lm} = \frac{1}{\sqrt{N}} \sum_j R_k(d_{ij})\, s_k(z_j)\, Y_{lm}(u_{ij}),
        \qquad
        P_{ik,l} = \sum_{m=-l}^{l} A_{ik,lm}^2,
        \qquad
        x_i = W\, \mathrm{LN}(P_i)

    with ``R_k`` a learned linear mix of Gaussian radial basis functions times the cosine
    cutoff ``(1 + cos(pi d / cutoff)) / 2`` (smooth at the cutoff, so energies and forces
    are continuous), ``s_k(z)`` a learned per-element weight (a density of each species),
    ``Y_lm`` real spherical harmonics (component normalisation,
    :mod:`geolinrpe.models.spherical_harmonics`) and ``N =
    max_num_neighbors`` (32 when ``None``). ``P`` is the power spectrum (ACE / SOAP's
    ``nu = 2`` descriptor restricted to one neighbour species channel per ``k``): invariant
    under rotations, translations and permutations of the neighbours.

    Args:
        embed_dim: output channels ``c``.
        lmax: largest degree ``l`` (default 2).
        num_channels: radial channels ``k`` (default 16).
        num_radial: Gaussian basis functions on ``[0, cutoff]`` (default 16).
        cutoff: neighbour cutoff, same length unit as ``pos`` (default 5.0).
        max_z: largest atomic number (default 100).
        max_num_neighbors: nearest neighbours kept per atom (default 32; ``None``: all).

    Shapes:
        ``z [n]``, ``pos [n, 3]``, ``batch [n]`` (and ``cell [g, 3, 3]``, ``pbc [g, 3]``
        for periodic systems: neighbours include periodic images) -> ``[n, c]``.
    """

    def __init__(
        self,
        embed_dim: int,
        lmax: int = 2,
        num_channels: int = 16,
        num_radial: int = 16,
        cutoff: float = 5.0,
        max_z: int = 100,
        max_num_neighbors: int = 32,
    ) -> None:
        super().__init__()
        if not isinstance(lmax, int) or isinstance(lmax, bool) or lmax < 0:
            raise ValueError(f"sh_lmax must be a non-negative int, got {lmax!r}")
        for name, value in (("sh_channels", num_channels), ("num_radial", num_radial)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff!r}")
        self.lmax = lmax
        self.cutoff = float(cutoff)
        self.max_num_neighbors = max_num_neighbors
        self.register_buffer("centers", torch.linspace(0.0, cutoff, num_radial))
        self.width = cutoff / max(num_radial - 1, 1)
        self.radial = nn.Linear(num_radial, num_channels, bias=False)
        self.species = nn.Embedding(max_z + 1, num_channels)
        self.norm = nn.LayerNorm(num_channels * (lmax + 1))
        self.out = nn.Linear(num_channels * (lmax + 1), embed_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.radial.reset_parameters()
        nn.init.normal_(self.species.weight, 1.0, 0.1)
        self.norm.reset_parameters()
        self.out.reset_parameters()

    def forward(
        self,
        z: Tensor,
        pos: Tensor,
        batch: Tensor,
        cell: Tensor | None = None,
        pbc: Tensor | None = None,
    ) -> Tensor:
        if cell is None:
            edge_index = radius_graph(
                pos, self.cutoff, batch, max_num_neighbors=self.max_num_neighbors
            )
            j, i = edge_index
            vec = pos[j] - pos[i]  # [e, 3]
        else:
            edge_index, shift = radius_graph_pbc(
                pos, cell, self.cutoff, batch, pbc, max_num_neighbors=self.max_num_neighbors
            )
            j, i = edge_index
            vec = pos[j] + shift.to(pos.dtype) - pos[i]
        weight, sh = self._pair_terms(vec, z[j])  # [e, k], [e, m]
        messages = torch.einsum("ek,em->ekm", weight, sh)
        density = pos.new_zeros((pos.shape[0],) + messages.shape[1:]).index_add(0, i, messages)
        return self._readout(density)

    def _pair_terms(
        self, vec: Tensor, z_neighbour: Tensor, within: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """``(R_k(d) s_k(z_j) / sqrt(N) [..., k], Y_lm(u) [..., m])`` for neighbour vectors
        ``vec [..., 3]``; ``within`` (bool ``[...]``) zeroes pairs that are not neighbours."""
        dist = vec.norm(dim=-1)
        envelope = 0.5 * (torch.cos(math.pi * dist / self.cutoff) + 1.0)
        if within is not None:
            envelope = envelope * within
        basis = torch.exp(-(((dist[..., None] - self.centers) / self.width) ** 2))
        weight = self.radial(basis) * self.species(z_neighbour) * envelope[..., None]
        scale = 1.0 / math.sqrt(self.max_num_neighbors or 32)
        return weight * scale, spherical_harmonics(self.lmax, vec)  # [..., (lmax + 1)^2]

    def _readout(self, density: Tensor) -> Tensor:
        power = torch.stack(
            [density[..., l * l : (l + 1) ** 2].pow(2).sum(-1) for l in range(self.lmax + 1)], -1
        )  # [..., k, l]
        return self.out(self.norm(power.flatten(-2)))

    def neighbours_fit_the_budget(self, pos: Tensor, mask: Tensor) -> bool:
        """Whether :meth:`dense` serves this dense batch in eager mode: at most
        :data:`DENSE_PAIRS` atom pairs, and no atom with more than ``max_num_neighbors``
        neighbours within the cutoff (so :meth:`dense` equals :meth:`forward`)."""
        if pos.shape[0] * pos.shape[1] ** 2 > DENSE_PAIRS:  # too large for all pairs
            return False
        if self.max_num_neighbors is None:
            return True
        return int(self._within(pos, mask).sum(-1).max()) <= self.max_num_neighbors

    def _within(self, pos: Tensor, mask: Tensor) -> Tensor:
        """Bool ``[b, L, L]``: ``j`` is a neighbour of ``i`` (both atoms, ``i != j``, within
        the cutoff)."""
        eye = torch.eye(pos.shape[1], dtype=torch.bool, device=pos.device)
        atoms = ~mask[:, :, None] & ~mask[:, None, :] & ~eye
        return atoms & ((pos[:, None] - pos[:, :, None]).norm(dim=-1) < self.cutoff)

    def dense(self, z: Tensor, pos: Tensor, mask: Tensor) -> Tensor:
        """The same features for a dense batch with a fixed neighbour budget: every atom pair
        of a molecule, ``O(b L^2)``, no radius graph (static shapes: compiles without graph
        breaks and exports with :func:`torch.export.export`). Equals :meth:`forward` when no
        atom has more than ``max_num_neighbors`` neighbours within the cutoff (QM9: at most
        28); non-periodic only. Memory ``O(b L^2 (k + m))``: eager calls use it up to
        :data:`DENSE_PAIRS` pairs, compiled and exported models always.

        Shapes: ``z [b, L]``, ``pos [b, L, 3]``, ``mask [b, L]`` (True = padding) ->
        ``[b, L, c]`` (padded rows hold the features of an atom without neighbours).
        """
        within = self._within(pos, mask)
        vec = pos[:, None] - pos[:, :, None]  # [b, i, j, 3]: r_j - r_i
        vec = torch.where(within[..., None], vec, torch.ones_like(vec))  # no 0/0 gradients
        weight, sh = self._pair_terms(vec, z[:, None, :].expand(within.shape), within)
        return self._readout(torch.einsum("bijk,bijm->bikm", weight, sh))  # [b, L, c]


def target_buffers(
    num_targets: int, mean: Any, std: Any, atom_refs: Tensor | None, max_z: int
) -> tuple[Tensor, Tensor, Tensor | None]:
    """``(mean [t], std [t], atom_refs [max_z + 1, t] or None)`` from user values."""

    def vector(name: str, value: Any, default: float) -> Tensor:
        if value is None:
            return torch.full((num_targets,), default)
        value = torch.as_tensor(value, dtype=torch.get_default_dtype()).reshape(-1)
        if value.numel() == 1:
            value = value.expand(num_targets)
        if value.numel() != num_targets:
            raise ValueError(f"{name} has {value.numel()} values for num_targets={num_targets}")
        if not bool(torch.isfinite(value).all()):
            raise ValueError(f"{name} must be finite, got {value.tolist()}")
        return value.clone()

    mean = vector("target_mean", mean, 0.0)
    std = vector("target_std", std, 1.0)
    if not bool((std > 0).all()):
        raise ValueError(f"target_std must be positive, got {std.tolist()}")
    if atom_refs is None:
        return mean, std, None
    refs = torch.as_tensor(atom_refs, dtype=torch.get_default_dtype())
    if refs.dim() == 1:
        refs = refs[:, None]
    if refs.dim() != 2 or refs.shape[1] not in (1, num_targets) or refs.shape[0] > max_z + 1:
        raise ValueError(
            f"atom_refs must be [Z] or [Z, {num_targets}] with Z <= max_z + 1 = {max_z + 1} "
            f"(indexed by atomic number), got {list(refs.shape)}"
        )
    if not bool(torch.isfinite(refs).all()):
        raise ValueError("atom_refs must be finite")
    table = refs.new_zeros(max_z + 1, num_targets)
    table[: refs.shape[0]] = refs
    return mean, std, table


def energy_and_forces(
    y: Tensor, pos: Tensor, training: bool, key_padding_mask: Tensor | None = None
) -> dict[str, Tensor]:
    """``{"energy": y[:, 0], "forces": -d energy / d pos}`` (``create_graph`` in training, so
    a force loss trains the model; padded rows of dense ``pos`` get 0)."""
    energy = y[:, 0]
    # materialize_grads: an empty batch (no atoms) has zero forces, not an autograd error
    (grad,) = torch.autograd.grad(
        energy.sum(), pos, create_graph=training, allow_unused=True, materialize_grads=True
    )
    forces = -grad
    if key_padding_mask is not None:
        forces = forces.masked_fill(key_padding_mask.unsqueeze(-1), 0.0)
    return {"energy": energy, "forces": forces}


def check_atomic_numbers(z: Tensor, mask: Tensor | None, max_z: int) -> None:
    if z.dtype != torch.long:
        raise ValueError(f"z must be a long tensor of atomic numbers, got {z.dtype}")
    if not eager_checks():  # values are not known while compiling or exporting
        return
    valid = z if mask is None else z[~mask]
    if valid.numel() and (int(valid.min()) < 1 or int(valid.max()) > max_z):
        raise ValueError(
            f"atomic numbers must be in [1, max_z={max_z}], got [{int(valid.min())}, "
            f"{int(valid.max())}]"
        )


class MoleculeTransformer(nn.Module):
    r"""Linear-attention transformer over the atoms of molecules (or periodic cells) with a
    3D relative positional encoding.

    Atoms attend to all atoms of their molecule in O(n) with an RPE ``f(r_i - r_j)`` of the
    coordinates (FourierLearner-Transformer, Choromanski et al., AISTATS 2024,
    https://arxiv.org/abs/2302.01925), in place of the O(n^2) distance bias of
    Graphormer-3D; the per-atom readout sums to graph targets:

    .. math::

        h^{(0)}_i = E[z_i] \;(+\; \mathrm{SH}_i), \qquad
        h^{(L)} = \mathrm{Encoder}(h^{(0)}, r), \qquad
        y_g = \sigma \odot \operatorname{pool}_{i \in g} \mathrm{MLP}(h^{(L)}_i) + \mu
              + \sum_{i \in g} \mathrm{ref}[z_i]

    (``pool`` a sum or mean; ``SH`` the optional :class:`SphericalHarmonicsEmbedding`).
    With ``predict_forces`` the energy is ``y_g`` (one target) and ``F_i = -dE/dr_i`` by
    autograd.

    Invariances: translation (always), permutation of the atoms of a molecule (always), and
    rotation with a rotation-invariant attention: ``rpe=None`` (positions enter only through
    the invariant SH features), or ``rpe="flt-radial"`` with
    ``rpe_options={"rotation": "frame"}`` (exact for molecules whose PCA frame is well
    defined, see :func:`geolinrpe.rpe.radial.canonical_frame`); other 3D RPEs are invariant in
    expectation over their random draws.

    Args:
        num_targets: outputs ``t`` per molecule (default 1).
        embed_dim: channels ``c`` (default 128).
        num_heads: attention heads (default 8).
        num_layers: transformer blocks (default 6; 0 with ``use_spherical_harmonics``: the
            local features and readouts only).
        attention: ``"linear"`` (default, :class:`~geolinrpe.nn.RPEAttention`) or ``"exact"``
            (:class:`~geolinrpe.nn.ExactRPEAttention`, the O(n^2) baseline with the same
            parameters).
        rpe: registry name of a 3D RPE (default ``"flt-radial"``) or ``None`` (linear
            attention without RPE: the no-RPE baseline).
        rpe_options: options of the RPE (e.g. ``{"rotation": "frame"}``).
        mode: ``"logit"``, ``"mask"`` or ``None`` (default: the RPE's first mode).
        kernel: kernel feature map (default ``None``: the layer's, ELU in mask mode,
            FAVOR+ otherwise).
        num_features: random kernel features (default 64).
        mlp_ratio: block MLP width ratio (default 4.0).
        dropout: dropout in the blocks (default 0.0).
        max_z: largest atomic number (default 100).
        use_spherical_harmonics: add :class:`SphericalHarmonicsEmbedding` features (default
            ``False``).
        sh_lmax, sh_channels, num_radial, cutoff, max_num_neighbors: its options (defaults
            2, 16, 16, 5.0, 32).
        readout: ``"sum"`` (default; extensive targets such as energies) or ``"mean"``.
        atom_refs: per-element references ``[Z]`` or ``[Z, t]`` indexed by atomic number
            (``Z <= max_z + 1``, e.g. free-atom energies), added per atom (default ``None``).
            Stored in the default dtype: in float32, totals of ~1e4 eV keep ~1 meV, so
            prefer training on atomisation energies (references subtracted in the data)
            unless the model runs in float64.
        target_mean, target_std: ``mu``, ``sigma`` (scalars or ``[t]``; defaults 0 and 1):
            per-molecule mean and standard deviation of ``y - sum_i ref[z_i]`` over the
            training set, so the network predicts standardised values.
        predict_forces: also return ``energy`` and ``forces`` (needs ``num_targets=1``).
        periodic: read ``cell [g, 3, 3]`` (and ``pbc [g, 3]``, default all periodic) from the
            batch: the SH neighbours include periodic images and a periodic RPE
            (``"flt-periodic"``) gets the cell; a non-periodic RPE sees the raw positions.
        attention_options: further :class:`~geolinrpe.nn.RPEAttention` options
            (``normalize``, ``chunk_size``, ``center_positions``, ...).
        reciprocal_energy: options of a :class:`~geolinrpe.nn.reciprocal.ReciprocalEnergy`
            readout (``{}`` for its defaults; default ``None``: none). Needs ``periodic``
            and ``num_targets=1``: the graph energy gains ``1/2 sum_ij Q_i f(r_i - r_j) Q_j``
            of latent charges ``Q`` from the last layer, the learned reciprocal-space Ewald
            term (O(n); long-range electrostatics, ``docs/long_range.md``). With
            ``attention="exact"`` it is computed densely (:meth:`ReciprocalEnergy.reference`).

    Shapes:
        input: a PyG ``Batch`` with ``z [n]`` long, ``pos [n, 3]``, ``batch [n]`` (and
        ``cell [g, 3, 3]``, ``pbc [g, 3]`` when periodic), or the dict of
        :func:`geolinrpe.data.collate_padded` with ``z [b, L]``, ``pos [b, L, 3]``,
        ``key_padding_mask [b, L]``;
        output: ``{"y": [g, t]}``, plus ``"energy" [g]`` and ``"forces" [n, 3]``
        (``[b, L, 3]`` for a padded batch, 0 at padding) with ``predict_forces``.
    """

    def __init__(
        self,
        num_targets: int = 1,
        embed_dim: int = 128,
        num_heads: int = 8,
        num_layers: int = 6,
        attention: str = "linear",
        rpe: str | None = "flt-radial",
        rpe_options: dict | None = None,
        mode: str | None = None,
        kernel: str | None = None,
        num_features: int = 64,
        mlp_ratio: float = 4.0,
        dropout: float = 0.0,
        max_z: int = 100,
        use_spherical_harmonics: bool = False,
        sh_lmax: int = 2,
        sh_channels: int = 16,
        num_radial: int = 16,
        cutoff: float = 5.0,
        max_num_neighbors: int = 32,
        readout: str = "sum",
        atom_refs: Tensor | None = None,
        target_mean: float | Sequence[float] | Tensor | None = None,
        target_std: float | Sequence[float] | Tensor | None = None,
        predict_forces: bool = False,
        periodic: bool = False,
        attention_options: dict | None = None,
        reciprocal_energy: dict | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(num_targets, int) or isinstance(num_targets, bool) or num_targets < 1:
            raise ValueError(f"num_targets must be a positive int, got {num_targets!r}")
        if not isinstance(max_z, int) or max_z < 1:
            raise ValueError(f"max_z must be a positive int, got {max_z!r}")
        if readout not in READOUTS:
            raise ValueError(f"readout must be one of {READOUTS}, got {readout!r}")
        if predict_forces and num_targets != 1:
            raise ValueError(f"predict_forces needs num_targets=1 (the energy), got {num_targets}")
        self.num_targets = num_targets
        self.max_z = max_z
        self.readout = readout
        self.predict_forces = bool(predict_forces)
        self.periodic = bool(periodic)
        options = merge_attention_options(
            dict(
                rpe=rpe,
                pos_dim=3,
                mode=mode,
                kernel=kernel,
                num_features=num_features,
                rpe_options=rpe_options,
            ),
            attention_options,
        )
        self.embedding = nn.Embedding(max_z + 1, embed_dim, padding_idx=0)
        self.sh = (
            SphericalHarmonicsEmbedding(
                embed_dim, sh_lmax, sh_channels, num_radial, cutoff, max_z, max_num_neighbors
            )
            if use_spherical_harmonics
            else None
        )
        if num_layers == 0 and not use_spherical_harmonics:
            raise ValueError("num_layers=0 needs use_spherical_harmonics=True (the only geometry)")
        self.encoder = (
            RPETransformerEncoder(
                num_layers, embed_dim, num_heads, mlp_ratio, dropout, attention, **options
            )
            if num_layers
            else None
        )
        attn = self.encoder.blocks[0].attention if self.encoder is not None else None
        self.periodic_rpe = bool(getattr(getattr(attn, "rpe", None), "periodic", False))
        if self.periodic_rpe and not self.periodic:
            raise ValueError(f"rpe={rpe!r} is periodic: build the model with periodic=True")
        self.head = nn.Sequential(
            nn.Linear(embed_dim, embed_dim), nn.SiLU(), nn.Linear(embed_dim, num_targets)
        )
        self.reciprocal = None
        if reciprocal_energy is not None:
            if not self.periodic or num_targets != 1:
                raise ValueError(
                    "reciprocal_energy needs periodic=True and num_targets=1 (an energy), got "
                    f"periodic={periodic}, num_targets={num_targets}"
                )
            self.reciprocal = ReciprocalEnergy(embed_dim, **reciprocal_energy)
        self.exact_reciprocal = attention == "exact"
        mean, std, refs = target_buffers(num_targets, target_mean, target_std, atom_refs, max_z)
        self.register_buffer("target_mean", mean)
        self.register_buffer("target_std", std)
        self.register_buffer("atom_refs", refs)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Reset every learnable parameter (RPE parameters included); buffers stay."""
        self.embedding.reset_parameters()
        if self.sh is not None:
            self.sh.reset_parameters()
        if self.encoder is not None:
            self.encoder.reset_parameters()
        for layer in (self.head[0], self.head[2]):
            layer.reset_parameters()
        if self.reciprocal is not None:
            self.reciprocal.reset_parameters()

    def redraw(self, generator: torch.Generator | None = None) -> None:
        """Draw new random features in every attention layer."""
        if self.encoder is not None:
            self.encoder.redraw(generator)

    def forward(self, data: Any) -> dict[str, Tensor]:
        """Predict; see the class docstring for inputs and outputs."""
        optional = ("cell", "pbc") if self.periodic else ()
        tokens = read_batch(data, ("z", "pos"), optional, dense_dims=2)
        z, pos = tokens.fields["z"], tokens.fields["pos"]
        batch, mask = tokens.batch, tokens.key_padding_mask
        if pos.shape != z.shape + (3,):
            raise ValueError(f"pos must be {list(z.shape) + [3]} for z {list(z.shape)}")
        check_atomic_numbers(z, mask, self.max_z)
        cell = tokens.fields.get("cell")
        if self.periodic and cell is None:
            raise ValueError("periodic=True needs cell [g, 3, 3] in the batch")
        if self.predict_forces and not pos.requires_grad:
            pos = pos.detach().requires_grad_(True)
        with torch.set_grad_enabled(torch.is_grad_enabled() or self.predict_forces):
            y = self._predict(
                z, pos, batch, mask, cell, tokens.fields.get("pbc"), tokens.num_graphs
            )
            out = {"y": y}
            if self.predict_forces:
                out.update(energy_and_forces(y, pos, self.training, mask))
        return out

    def _predict(self, z, pos, batch, mask, cell, pbc, num_graphs) -> Tensor:
        z_safe = z if mask is None else z.masked_fill(mask, 0)
        h = self.embedding(z_safe)
        if self.sh is not None:
            h = h + self._sh_features(z_safe, pos, batch, mask, cell, pbc)
        if h.shape[0] and self.encoder is not None:  # an empty batch has nothing to attend to
            h = self.encoder(h, pos, batch, mask, cell if self.periodic_rpe else None)
        atom_out = self.head(h)
        y = pool(atom_out, batch, mask, self.readout, num_graphs)
        y = y * self.target_std + self.target_mean
        if self.reciprocal is not None and num_graphs:
            energy = self.reciprocal.reference if self.exact_reciprocal else self.reciprocal
            y = y + energy(h, pos, cell, batch, mask)[:, None].to(y.dtype)
        if self.atom_refs is not None:
            y = y + pool(self.atom_refs[z_safe], batch, mask, "sum", num_graphs)
        return y

    def _sh_features(self, z, pos, batch, mask, cell, pbc) -> Tensor:
        if batch is not None:
            return self.sh(z, pos, batch, cell, pbc)
        if mask is None:
            mask = torch.zeros(z.shape, dtype=torch.bool, device=z.device)
        if cell is None and (not eager_checks() or self.sh.neighbours_fit_the_budget(pos, mask)):
            return self.sh.dense(z, pos, mask)  # static shapes (compile, export)
        packed_pos, packed_batch = to_packed(pos, mask)
        feats = self.sh(z[~mask], packed_pos, packed_batch, cell, pbc)
        out = feats.new_zeros(mask.shape + feats.shape[-1:])
        out[~mask] = feats
        return out
