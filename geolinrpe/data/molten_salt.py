r"""Molten-salt-like Na/Cl boxes with Ewald electrostatics: a long-range data set, offline.

Recipe (``docs/long_range.md``), one structure at a time from its own seed:

1. **Box.** ``num_atoms`` ions (half Na\ :sup:`+`, half Cl\ :sup:`-`: neutral) in a cubic
   periodic cell of side ``(num_atoms / rho)^(1/3)``, the number density ``rho`` drawn per
   structure from ``densities`` (default 0.85, 1.0 and 1.15 times :data:`MOLTEN_DENSITY`,
   molten NaCl's 0.0319 ions/Å^3 at 1,100 K).
2. **Positions.** Random sequential addition: each ion is placed uniformly at random and
   kept only if it lies at least ``min_distance`` (default 2.2 Å) from every ion placed
   before it, periodic images included. Species are assigned at random, so charges are
   uncorrelated with positions (no screening): the electrostatic energy then varies with
   the arrangement of the charges at every length scale up to the box, which is what a
   model with a cutoff cannot see and a reciprocal-space model can. Positions are rounded to
   float32 (as stored) before any energy is computed.
3. **Energy** (eV) = the Ewald energy of the point charges ``+-1 e``
   (:func:`geolinrpe.physics.ewald`, tolerance 1e-10) + the Born-Mayer-Huggins repulsion of
   Tosi and Fumi (J. Phys. Chem. Solids 25, 45, 1964) for NaCl, without its dispersion terms:

   .. math::

       \phi_{ij}(r) = c_{ij}\, b\, e^{(\sigma_i + \sigma_j - r) / \rho}, \quad
       b = 0.2110\ \mathrm{eV},\ \rho = 0.317\ \text{Å},\
       \sigma_{Na} = 1.170\ \text{Å},\ \sigma_{Cl} = 1.585\ \text{Å},\
       c_{++} = 1.25,\ c_{+-} = 1,\ c_{--} = 0.75

   summed over pairs within 8 Å (a pair beyond contributes less than 1e-7 eV).
   **Forces** (eV/Å) are ``-dE/dpos`` of both terms, in float64.

Items are :class:`~torch_geometric.data.Data` with ``z [n]`` (11, 17), ``pos [n, 3]``,
``cell [1, 3, 3]``, ``pbc [1, 3]``, ``charges [n]``, ``energy [1]`` (total, eV),
``forces [n, 3]``, ``natoms``, ``sid``. :func:`write_molten_salt` stores them in OC20's S2EF
formats (``y`` = total energy, ``force``), which :class:`geolinrpe.data.OC20` reads back and
the ``oc20-s2ef`` task trains on (``data.options.make_molten_salt``).

Cost on 2 CPU cores: about 0.05 s a structure at 64 ions, 0.2 s at 512, 3 s at 4,096.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

from ..physics.ewald import ewald, periodic_pairs

__all__ = [
    "MOLTEN_DENSITY",
    "S2EF_FORMATS",
    "make_molten_salt",
    "molten_salt_structures",
    "repulsion",
    "write_molten_salt",
]

#: ions per Å^3 of molten NaCl near 1,100 K (1.55 g/cm^3)
MOLTEN_DENSITY = 0.0319
#: OC20 formats that carry energies and forces of single frames
S2EF_FORMATS = ("lmdb-s2ef", "aselmdb", "extxyz")

NA, CL = 11, 17
_B = 0.2110  # eV
_RHO = 0.317  # Å
_SIGMA = {NA: 1.170, CL: 1.585}  # Å
_PAULING = {(NA, NA): 1.25, (NA, CL): 1.0, (CL, CL): 0.75}
REPULSION_CUTOFF = 8.0  # Å
EWALD_TOLERANCE = 1e-10


def repulsion(pos: Tensor, z: Tensor, cell: Tensor) -> Tensor:
    """Tosi-Fumi repulsion (eV) of Na/Cl ions ``pos [n, 3]``, ``z [n]`` in ``cell [3, 3]``
    (periodic, pairs within :data:`REPULSION_CUTOFF`); differentiable in ``pos``."""
    i, j, dist = periodic_pairs(pos, cell, REPULSION_CUTOFF)

    def table(values: list[float]) -> Tensor:
        return torch.tensor(values, dtype=pos.dtype, device=pos.device)

    sigma = table([_SIGMA[CL], _SIGMA[NA]])[(z == NA).long()]
    pair = (z[i] == NA).long() + (z[j] == NA).long()  # 0 Cl-Cl, 1 Na-Cl, 2 Na-Na
    pauling = table([_PAULING[(CL, CL)], _PAULING[(NA, CL)], _PAULING[(NA, NA)]])[pair]
    return 0.5 * (pauling * _B * torch.exp((sigma[i] + sigma[j] - dist) / _RHO)).sum()


def _place(rng: np.random.Generator, n: int, side: float, min_distance: float) -> np.ndarray:
    """Random sequential addition in a cubic box (minimum-image distances)."""
    pos = np.empty((n, 3))
    placed, tries = 0, 0
    limit = 1000 * n
    while placed < n:
        candidates = rng.uniform(0.0, side, (64, 3))
        for c in candidates:
            tries += 1
            diff = pos[:placed] - c
            diff -= side * np.round(diff / side)
            if placed == 0 or (diff * diff).sum(-1).min() >= min_distance**2:
                pos[placed] = c
                placed += 1
                if placed == n:
                    break
        if tries > limit:
            raise RuntimeError(
                f"could not place {n} ions {min_distance} Å apart in a box of side {side:.2f} Å "
                f"after {tries} tries: lower the density or min_distance"
            )
    return pos


def _structure(seed: np.random.SeedSequence, sid: int, n: int, densities, min_distance) -> Data:
    rng = np.random.default_rng(seed)
    density = float(densities[rng.integers(len(densities))])
    side = (n / density) ** (1 / 3)
    pos = _place(rng, n, side, min_distance).astype(np.float32)
    z = np.array([NA] * (n // 2) + [CL] * (n // 2))[rng.permutation(n)]
    cell = torch.eye(3, dtype=torch.float64) * float(np.float32(side))
    pos64 = torch.from_numpy(pos).double().requires_grad_(True)
    zt = torch.from_numpy(z)
    charges = torch.where(zt == NA, 1.0, -1.0).double()
    with torch.enable_grad():
        energy = ewald(pos64, charges, cell, tolerance=EWALD_TOLERANCE) + repulsion(pos64, zt, cell)
        (grad,) = torch.autograd.grad(energy, pos64)
    return Data(
        z=zt.long(),
        pos=torch.from_numpy(pos),
        cell=cell.float()[None],
        pbc=torch.ones(1, 3, dtype=torch.bool),
        charges=charges.float(),
        energy=energy.detach().reshape(1),
        forces=(-grad).float(),
        natoms=n,
        sid=sid,
    )


def molten_salt_structures(
    num_structures: int,
    num_atoms: int,
    seed: int = 0,
    densities: Sequence[float] = (0.85 * MOLTEN_DENSITY, MOLTEN_DENSITY, 1.15 * MOLTEN_DENSITY),
    min_distance: float = 2.2,
) -> list[Data]:
    """``num_structures`` Na/Cl boxes of ``num_atoms`` ions (module docstring).

    Structure ``i`` depends only on ``(seed, num_atoms, i)``, so a longer list starts with a
    shorter one. ``sid`` is ``seed * 10^6 + i``. ``energy`` is float64 (totals of 10^3-10^4
    eV keep sub-meV digits); positions, forces and the cell are float32 as stored.
    """
    for name, value in (("num_structures", num_structures), ("num_atoms", num_atoms)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a non-negative int, got {value!r}")
    if num_atoms < 2 or num_atoms % 2:
        raise ValueError(f"num_atoms must be even and >= 2 (neutral Na/Cl), got {num_atoms}")
    if not isinstance(seed, int) or isinstance(seed, bool) or not 0 <= seed < 2**31:
        raise ValueError(f"seed must be an int in [0, 2^31), got {seed!r}")
    densities = [float(d) for d in densities]
    if not densities or not all(math.isfinite(d) and d > 0 for d in densities):
        raise ValueError(f"densities must be positive numbers, got {densities!r}")
    if not (math.isfinite(min_distance) and min_distance > 0):
        raise ValueError(f"min_distance must be positive, got {min_distance!r}")
    seeds = np.random.SeedSequence([seed, num_atoms]).spawn(num_structures)
    return [
        _structure(s, seed * 1_000_000 + i, num_atoms, densities, min_distance)
        for i, s in enumerate(seeds)
    ]


def write_molten_salt(
    path: str | os.PathLike, structures: Sequence[Data], format: str = "lmdb-s2ef"
) -> Path:
    """Writes structures in an OC20 S2EF format (:data:`S2EF_FORMATS`; layouts as
    :func:`geolinrpe.data.oc20.make_synthetic`): ``y`` is the total energy (reference 0),
    ``force`` the forces, every atom tagged 1 and free. Returns the path written."""
    from .oc20.synthetic import SyntheticSystem, write_oc20

    if format not in S2EF_FORMATS:
        raise ValueError(f"format must be one of {S2EF_FORMATS}, got {format!r}")
    systems = []
    for item in structures:
        pos = item.pos.double().numpy()
        energy = float(item.energy)
        forces = item.forces.double().numpy()
        systems.append(
            SyntheticSystem(
                sid=int(item.sid),
                numbers=item.z.numpy().astype(np.int64),
                tags=np.ones(len(pos), dtype=np.int64),
                fixed=np.zeros(len(pos), dtype=bool),
                cell=item.cell[0].double().numpy(),
                pbc=item.pbc[0].numpy(),
                pos_init=pos,
                pos_relaxed=pos,
                energy_init=energy,
                energy_relaxed=energy,
                forces_init=forces,
                reference=0.0,
                frames=[(0, pos, energy, forces)],
            )
        )
    return write_oc20(path, systems, format, num_files=1)


def make_molten_salt(
    path: str | os.PathLike,
    num_structures: int,
    num_atoms: int,
    format: str = "lmdb-s2ef",
    seed: int = 0,
) -> Path:
    """Generates :func:`molten_salt_structures` and writes them with
    :func:`write_molten_salt`. Returns the path written."""
    structures = molten_salt_structures(num_structures, num_atoms, seed)
    return write_molten_salt(path, structures, format)
