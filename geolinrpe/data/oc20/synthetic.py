r"""Synthetic OC20-format files: ASE fcc(111) slabs + adsorbates, EMT energies, BFGS relaxation.

No OC20 data ships in any package; these writers produce realistic stand-ins in each of
OC20's on-disk formats (legacy LMDB IS2RE/S2EF, ``.aselmdb``, S2EF extxyz) for tests,
benchmarks and examples. Writing uses py-lmdb; reading goes through this package's readers.
"""

from __future__ import annotations

import os
import pickle
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch_geometric.data import Data

__all__ = [
    "FORMATS",
    "SyntheticSystem",
    "gas_references",
    "make_synthetic",
    "synthetic_systems",
    "write_aselmdb",
    "write_oc20",
]

FORMATS = ("lmdb-is2re", "lmdb-s2ef", "aselmdb", "extxyz")

_METALS = ("Cu", "Pt", "Au", "Ag", "Pd", "Ni", "Al")
_SIZES = ((2, 2, 3), (2, 2, 4), (3, 3, 3))
_SITES = ("ontop", "bridge", "fcc", "hcp")
# Adsorbates: (symbol, offset above the binding atom in Angstrom), binding atom first.
_ADSORBATES = {
    "O": (("O", 0.0),),
    "H": (("H", 0.0),),
    "C": (("C", 0.0),),
    "N": (("N", 0.0),),
    "OH": (("O", 0.0), ("H", 0.97)),
    "CO": (("C", 0.0), ("O", 1.15)),
    "CH": (("C", 0.0), ("H", 1.09)),
    "NH": (("N", 0.0), ("H", 1.02)),
}
FMAX = 0.05  # eV/Angstrom, BFGS convergence


@dataclass
class SyntheticSystem:
    """One simulated adsorbate + slab relaxation (total energies in eV, lengths in Angstrom).

    ``frames`` holds ``(fid, pos, total energy, forces)`` along the relaxation, the first
    and last included; adsorption energies are ``total - reference``.
    """

    sid: int
    numbers: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    pos_init: np.ndarray
    pos_relaxed: np.ndarray
    energy_init: float
    energy_relaxed: float
    forces_init: np.ndarray
    reference: float
    frames: list[tuple[int, np.ndarray, float, np.ndarray]] = field(default_factory=list)

    @property
    def y_init(self) -> float:
        return self.energy_init - self.reference

    @property
    def y_relaxed(self) -> float:
        return self.energy_relaxed - self.reference


def _relax(atoms: Any, steps: int) -> list[tuple[np.ndarray, float, np.ndarray]]:
    from ase.optimize import BFGS

    def state() -> tuple[np.ndarray, float, np.ndarray]:
        return (
            atoms.positions.copy(),
            float(atoms.get_potential_energy()),
            atoms.get_forces(apply_constraint=False).copy(),
        )

    trajectory = [state()]
    if steps > 0:
        optimizer = BFGS(atoms, logfile=None)
        for _ in optimizer.irun(fmax=FMAX, steps=steps):
            if not np.array_equal(atoms.positions, trajectory[-1][0]):
                trajectory.append(state())
    return trajectory


@lru_cache(maxsize=8)
def gas_references(steps: int = 100) -> dict[str, float]:
    """EMT per-atom gas references (eV) built like OC20's from H2, H2O, CO and N2.

    ``H = E(H2)/2``, ``O = E(H2O) - E(H2)``, ``C = E(CO) - O``, ``N = E(N2)/2``; each
    molecule is ASE's g2 geometry in a 12 Angstrom box, relaxed with BFGS for up to
    ``steps`` steps (``fmax`` 0.05 eV/Angstrom).
    """
    from ase.build import molecule
    from ase.calculators.emt import EMT

    energy = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name)
        mol.set_cell([12.0, 12.0, 12.0])
        mol.center()
        mol.calc = EMT()
        energy[name] = _relax(mol, steps)[-1][1]
    o = energy["H2O"] - energy["H2"]
    return {"H": energy["H2"] / 2, "O": o, "C": energy["CO"] - o, "N": energy["N2"] / 2}


def _slab(metal: str, size: tuple[int, int, int]) -> Any:
    from ase.build import fcc111
    from ase.constraints import FixAtoms

    slab = fcc111(metal, size=size, vacuum=7.0, periodic=True)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() >= 2))  # all but the top layer
    return slab


@lru_cache(maxsize=64)
def _clean_slab_energy(metal: str, size: tuple[int, int, int], steps: int) -> float:
    from ase.calculators.emt import EMT

    slab = _slab(metal, size)
    slab.calc = EMT()
    return _relax(slab, steps)[-1][1]


def synthetic_systems(
    n: int, seed: int = 0, steps: int = 100, frames: int = 3
) -> list[SyntheticSystem]:
    """Simulates ``n`` adsorbate-on-slab relaxations with ASE's EMT calculator.

    Each system: an fcc(111) slab of Cu, Pt, Au, Ag, Pd, Ni or Al (2x2x3, 2x2x4 or 3x3x3
    atoms, 7 Angstrom vacuum, periodic in all directions like OC20's VASP cells), all but the
    top layer fixed, with O, H, C, N, OH, CO, CH or NH placed 1.6-2.2 Angstrom above an
    ontop, bridge, fcc or hcp site (jittered), free atoms rattled by 0.02 Angstrom, then
    relaxed with BFGS (``fmax`` 0.05 eV/Angstrom, at most ``steps`` steps; ``steps=0`` keeps
    the initial structure: about 5 ms a system on one core instead of about 45 ms).

    The adsorption energy is ``E(slab+ads) - E(clean slab) - sum of gas references``
    (:func:`gas_references`), the clean slab relaxed the same way. Tags follow OC20 (ASE's
    0 -> 2 adsorbate, 1 -> 1 surface, deeper layers -> 0). ``frames`` caps the S2EF frames
    kept per system, evenly spaced along the relaxation.
    """
    from ase import Atoms
    from ase.build import add_adsorbate
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    refs = gas_references(steps)
    sids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    systems = []
    for sid in sids.tolist():
        metal = _METALS[rng.integers(len(_METALS))]
        size = _SIZES[rng.integers(len(_SIZES))]
        name = list(_ADSORBATES)[rng.integers(len(_ADSORBATES))]
        site = _SITES[rng.integers(len(_SITES))]
        slab = _slab(metal, size)
        adsorbate = Atoms(
            [s for s, _ in _ADSORBATES[name]], positions=[(0, 0, dz) for _, dz in _ADSORBATES[name]]
        )
        add_adsorbate(slab, adsorbate, float(rng.uniform(1.6, 2.2)), site, mol_index=0)
        ase_tags = slab.get_tags()
        free = ase_tags < 2
        slab.positions[ase_tags == 0, :2] += rng.normal(0.0, 0.1, 2)
        slab.positions[free] += rng.normal(0.0, 0.02, (int(free.sum()), 3))
        slab.calc = EMT()
        trajectory = _relax(slab, steps)
        keep = np.unique(np.linspace(0, len(trajectory) - 1, max(1, frames)).round().astype(int))
        systems.append(
            SyntheticSystem(
                sid=int(sid),
                numbers=slab.numbers.astype(np.int64),
                tags=np.where(ase_tags == 0, 2, np.where(ase_tags == 1, 1, 0)).astype(np.int64),
                fixed=~free,
                cell=np.array(slab.cell[:], dtype=np.float64),
                pbc=slab.pbc.copy(),
                pos_init=trajectory[0][0],
                pos_relaxed=trajectory[-1][0],
                energy_init=trajectory[0][1],
                energy_relaxed=trajectory[-1][1],
                forces_init=trajectory[0][2],
                reference=_clean_slab_energy(metal, size, steps)
                + sum(refs[s] for s, _ in _ADSORBATES[name]),
                frames=[(int(i), *trajectory[i]) for i in keep.tolist()],
            )
        )
    return systems


def _write_lmdb(file: Path, values: list[bytes], length: bytes) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    for stale in (file, file.with_name(file.name + "-lock")):
        stale.unlink(missing_ok=True)
    # Overflow values take whole 4 KiB pages: budget each value rounded up, twice over.
    map_size = 2 * sum(4096 * (len(v) // 4096 + 2) for v in values) + (16 << 20)
    env = lmdb.open(str(file), subdir=False, map_size=map_size, meminit=False, map_async=True)
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(values):
                txn.put(str(i).encode("ascii"), value)
            txn.put(b"length", length)
        env.sync(True)
    finally:
        env.close()
    file.with_name(file.name + "-lock").unlink(missing_ok=True)


def _base_record(system: SyntheticSystem, pos: np.ndarray) -> dict[str, Any]:
    # Field types of fairchem's AtomsToGraphs: float tensors for numbers, tags and fixed.
    return dict(
        pos=torch.tensor(pos, dtype=torch.float32),
        cell=torch.tensor(system.cell, dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(system.numbers, dtype=torch.float32),
        natoms=len(system.numbers),
        tags=torch.tensor(system.tags, dtype=torch.float32),
        fixed=torch.tensor(system.fixed, dtype=torch.float32),
        sid=system.sid,
    )


def _chunks(items: list[Any], parts: int) -> list[list[Any]]:
    bounds = np.linspace(0, len(items), max(1, min(parts, len(items))) + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _atoms(system: SyntheticSystem, pos: np.ndarray, energy: float, forces: np.ndarray) -> Any:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = Atoms(
        numbers=system.numbers, positions=pos, cell=system.cell, pbc=system.pbc, tags=system.tags
    )
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(system.fixed)))
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def write_aselmdb(file: Path, rows: list[dict[str, Any]], deleted: Sequence[int] = ()) -> None:
    """Writes ASE-DB rows (dicts of ASE row fields) as fairchem's ``.aselmdb`` does."""
    from ase.io.jsonio import encode

    def pack(obj: Any) -> bytes:
        return zlib.compress(encode(obj).encode())

    file.parent.mkdir(parents=True, exist_ok=True)
    for stale in (file, file.with_name(file.name + "-lock")):
        stale.unlink(missing_ok=True)
    values = [pack(row) for row in rows]
    map_size = 2 * sum(4096 * (len(v) // 4096 + 2) for v in values) + (16 << 20)
    env = lmdb.open(str(file), subdir=False, map_size=map_size, meminit=False, map_async=True)
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(values, 1):
                if i not in deleted:
                    txn.put(str(i).encode("ascii"), value)
            txn.put(b"nextid", pack(len(rows) + 1))
            txn.put(b"metadata", pack({}))
            if deleted:
                txn.put(b"deleted_ids", pack(list(deleted)))
        env.sync(True)
    finally:
        env.close()
    file.with_name(file.name + "-lock").unlink(missing_ok=True)


def _ase_row(system: SyntheticSystem) -> dict[str, Any]:
    from ase.db.row import AtomsRow

    row = AtomsRow(_atoms(system, system.pos_init, system.energy_init, system.forces_init))
    dct = {k: row[k] for k in row.__dict__ if k[0] != "_" and k not in row._keys and k != "id"}
    dct["cell"] = np.asarray(dct["cell"])
    dct["constraints"] = [c.todict() for c in row.constraints]
    dct["data"] = {
        "sid": system.sid,
        "fid": 0,
        "ref_energy": system.reference,
        "y_init": system.y_init,
        "y_relaxed": system.y_relaxed,
        "pos_relaxed": system.pos_relaxed,
    }
    return dct


def write_oc20(
    path: str | os.PathLike, systems: list[SyntheticSystem], format: str, num_files: int = 2
) -> Path:
    """Writes simulated systems in one of OC20's formats (see :func:`make_synthetic`)."""
    import ase.io

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if format == "lmdb-is2re":
        values = []
        for system in systems:
            record = _base_record(system, system.pos_init)
            record.update(
                y_init=system.y_init,
                y_relaxed=system.y_relaxed,
                pos_relaxed=torch.tensor(system.pos_relaxed, dtype=torch.float32),
            )
            values.append(pickle.dumps(Data(**record), protocol=pickle.HIGHEST_PROTOCOL))
        _write_lmdb(path, values, pickle.dumps(len(values), protocol=pickle.HIGHEST_PROTOCOL))
    elif format == "lmdb-s2ef":
        path.mkdir(parents=True, exist_ok=True)
        frames = [(s, f) for s in systems for f in s.frames]
        for k, chunk in enumerate(_chunks(frames, num_files)):
            values = []
            for system, (fid, pos, energy, forces) in chunk:
                record = _base_record(system, pos)
                record.update(
                    fid=fid,
                    y=energy - system.reference,
                    force=torch.tensor(forces, dtype=torch.float32),
                )
                values.append(pickle.dumps(Data(**record), protocol=pickle.HIGHEST_PROTOCOL))
            length = pickle.dumps(len(values), protocol=pickle.HIGHEST_PROTOCOL)
            _write_lmdb(path / f"data.{k:04d}.lmdb", values, length)
    elif format == "aselmdb":
        write_aselmdb(path, [_ase_row(system) for system in systems])
    else:
        path.mkdir(parents=True, exist_ok=True)
        frames = [(s, f) for s in systems for f in s.frames]
        for k, chunk in enumerate(_chunks(frames, num_files)):
            images = [_atoms(s, pos, energy, forces) for s, (_, pos, energy, forces) in chunk]
            ase.io.write(path / f"{k}.extxyz", images, format="extxyz")
            lines = [f"random{s.sid},frame{fid},{s.reference!r}" for s, (fid, *_) in chunk]
            (path / f"{k}.txt").write_text("\n".join(lines) + "\n")
    return path


def make_synthetic(
    path: str | os.PathLike,
    n: int,
    format: str = "lmdb-is2re",
    seed: int = 0,
    *,
    steps: int = 100,
    frames: int = 3,
    num_files: int = 2,
) -> Path:
    """Writes ``n`` simulated OC20-like systems in one of OC20's on-disk formats.

    Systems come from :func:`synthetic_systems` (ASE fcc(111) slab + adsorbate, EMT
    energies and forces, BFGS relaxation). Formats:

    * ``"lmdb-is2re"``: ``path`` is the ``data.lmdb`` file; one pickled PyG ``Data`` per
      system (initial ``pos``, ``y_init``, ``y_relaxed``, ``pos_relaxed``) and ``length``.
    * ``"lmdb-s2ef"``: ``path`` is a folder of ``data.NNNN.lmdb`` shards (``num_files``);
      one record per frame (``y`` adsorption-referenced, ``force``, ``fid``).
    * ``"aselmdb"``: ``path`` is the ``.aselmdb`` file; one row per system, the initial
      structure with its total energy and forces (readable as S2EF frame 0) and ``data``
      ``{sid, fid, ref_energy, y_init, y_relaxed, pos_relaxed}`` (readable as IS2RE).
    * ``"extxyz"``: ``path`` is a folder of ``<k>.extxyz`` frames (total energies) with
      ``<k>.txt`` lines ``random<sid>,frame<fid>,<reference energy>``.

    S2EF formats keep up to ``frames`` frames a system (one when ``steps=0``). Returns the
    path written.
    """
    systems = synthetic_systems(n, seed=seed, steps=steps, frames=frames)
    return write_oc20(path, systems, format, num_files=num_files)
