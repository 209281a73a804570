r"""QM9: 130,831 small organic molecules with DFT geometries and 19 targets, offline.

Items are PyG :class:`~torch_geometric.data.Data` objects with PyTorch Geometric's target
order and units (:class:`torch_geometric.datasets.QM9`), read from one of three sources:

* ``"qm9pack"`` (default): the CSV files that the PyPI package ``qm9pack`` ships (complete,
  no download). The package itself cannot be imported on current setuptools, so its data
  folder is found with :func:`importlib.util.find_spec`. Its ``qm9_polarizability.csv`` (the
  polarizability tensor) is not needed: target 1 is the isotropic alpha, which the part files
  hold as ``Polarizability_bohr3`` (equal to the tensor's trace / 3 up to the files' rounding,
  at most 0.0053 a0^3).
* ``"pyg-raw"``: PyG's raw files ``gdb9.sdf``, ``gdb9.sdf.csv`` (MoleculeNet) and
  ``uncharacterized.txt`` (figshare), read with RDKit as PyG reads them.
* ``"xyz"``: the original ``dsgdb9nsd_*.xyz`` files of Ramakrishnan et al. (2014), a folder of
  them or the ``dsgdb9nsd.xyz.tar.bz2`` archive, plus ``uncharacterized.txt``.

``datasets/qm9/README.md`` says where each source's files come from and where to put them.

Processing builds flat tensors for all molecules at once (``z`` and ``pos`` concatenated over
atoms, ``y`` stacked over molecules, plus slices) instead of one ``Data`` per molecule, and
stores them under ``root/processed/qm9_<source>..._v<FORMAT_VERSION>.pt``; a later
construction loads that file and does not reprocess. Bump :data:`FORMAT_VERSION` whenever
the stored content changes so that old caches are rebuilt.

Axes in comments: g molecules (graphs), a atoms of all molecules, t targets (19).
"""

from __future__ import annotations

import importlib.util
import logging
import math
import re
import tarfile
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data, InMemoryDataset
from torch_geometric.io import fs

__all__ = [
    "FORMAT_VERSION",
    "HARTREE_TO_EV",
    "KCAL_PER_MOL_TO_EV",
    "NUM_MOLECULES",
    "QM9",
    "SOURCES",
    "TARGETS",
    "Target",
    "atom_refs",
    "conventional_split",
    "parse_gdb_xyz",
    "qm9pack_data_dir",
    "read_uncharacterized",
    "target_index",
]

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Version of the processed cache; part of its file name, so a bump reprocesses."""

HARTREE_TO_EV = 27.211386246
KCAL_PER_MOL_TO_EV = 0.04336414
NUM_MOLECULES = 130_831  # characterised molecules; 133,885 GDB-9 ids minus 3,054
SOURCES = ("qm9pack", "pyg-raw", "xyz")
ATOMIC_NUMBERS = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
_MAX_Z = 9


class Target(NamedTuple):
    """One column of ``y``: its index, name, unit and meaning (aliases also select it)."""

    index: int
    name: str
    unit: str
    description: str
    aliases: tuple[str, ...] = ()


TARGETS: tuple[Target, ...] = (
    Target(0, "mu", "D", "Dipole moment"),
    Target(1, "alpha", "a0^3", "Isotropic polarizability"),
    Target(2, "homo", "eV", "Highest occupied molecular orbital energy", ("epsilon_homo",)),
    Target(3, "lumo", "eV", "Lowest unoccupied molecular orbital energy", ("epsilon_lumo",)),
    Target(4, "gap", "eV", "Gap between HOMO and LUMO", ("delta_epsilon",)),
    Target(5, "r2", "a0^2", "Electronic spatial extent <R^2>"),
    Target(6, "zpve", "eV", "Zero point vibrational energy"),
    Target(7, "U0", "eV", "Internal energy at 0 K"),
    Target(8, "U", "eV", "Internal energy at 298.15 K", ("u298",)),
    Target(9, "H", "eV", "Enthalpy at 298.15 K", ("h298",)),
    Target(10, "G", "eV", "Free energy at 298.15 K", ("g298",)),
    Target(11, "Cv", "cal/(mol K)", "Heat capacity at 298.15 K"),
    Target(12, "U0_atom", "eV", "Atomization energy at 0 K"),
    Target(13, "U_atom", "eV", "Atomization energy at 298.15 K", ("u298_atom",)),
    Target(14, "H_atom", "eV", "Atomization enthalpy at 298.15 K", ("h298_atom",)),
    Target(15, "G_atom", "eV", "Atomization free energy at 298.15 K", ("g298_atom",)),
    Target(16, "A", "GHz", "Rotational constant A"),
    Target(17, "B", "GHz", "Rotational constant B"),
    Target(18, "C", "GHz", "Rotational constant C"),
)
"""The 19 targets in PyG's order. Names match case-insensitively (``"gap"``, ``"U0"``)."""

_TARGET_BY_NAME = {
    key.lower(): t.index for t in TARGETS for key in (t.name, *t.aliases)
}  # no two keys collide when lower-cased

# Atom reference energies (hartree) of H, C, N, O, F for the atomization targets 12-15.
_ATOM_REF_ELEMENTS = (1, 6, 7, 8, 9)
_ATOM_REFS_HARTREE = {
    "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
    "U": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
    "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
    "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
}

# The 15 properties on line 2 of an original xyz file, in that order; MoleculeNet's
# gdb9.sdf.csv has the same first 15 columns after mol_id.
_GDB_PROPERTIES = (
    "A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve",
    "U0", "U", "H", "G", "Cv",
)  # fmt: skip
# qm9pack's columns for _GDB_PROPERTIES, in the same order.
_QM9PACK_PROPERTIES = (
    "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3",
    "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip
_QM9PACK_PARTS = ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv")
_QM9PACK_COLUMNS = ("XYZ_file", "Index", "SMILES", "N_atoms", "Elements", "XYZ_Ang")
_MOLECULENET_COLUMNS = (
    "mol_id", "A", "B", "C", "mu", "alpha", "homo", "lumo", "gap", "r2", "zpve",
    "u0", "u298", "h298", "g298", "cv", "u0_atom", "u298_atom", "h298_atom", "g298_atom",
)  # fmt: skip
_H = HARTREE_TO_EV
_K = KCAL_PER_MOL_TO_EV
# PyG's conversion of MoleculeNet's columns after moving A, B, C to the end.
_MOLECULENET_TO_PYG = np.array(
    [1, 1, _H, _H, _H, 1, _H, _H, _H, _H, _H, 1, _K, _K, _K, _K, 1, 1, 1], dtype=np.float64
)
_README = "datasets/qm9/README.md in the geolinrpe repository"
_XYZ_ARCHIVE = "dsgdb9nsd.xyz.tar.bz2"
_XYZ_NAME = re.compile(r"dsgdb9nsd_(\d+)\.xyz")
_GDB_NAME = re.compile(r"gdb_(\d+)")
# A decimal number as QM9's files write it: "0.", "-1.5", ".5", "2.1997E-6" (no nan/inf).
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
#: values beyond this become inf when stored as float32: refused when read
FLOAT32_MAX = float(np.finfo(np.float32).max)
_TRIPLE = rf"\[\s*{_NUMBER}\s*,\s*{_NUMBER}\s*,\s*{_NUMBER}\s*\]"
_XYZ_ANG_RE = re.compile(rf"\s*\[\s*{_TRIPLE}(?:\s*,\s*{_TRIPLE})*\s*\]\s*")


def target_index(target: int | str) -> int:
    """Column of ``y`` for a target given by index (0-18) or name (see :data:`TARGETS`).

    Raises:
        ValueError: for an unknown name or an index out of range; the message lists the names.
    """
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool):
        if 0 <= int(target) < len(TARGETS):
            return int(target)
    elif isinstance(target, str) and target.lower() in _TARGET_BY_NAME:
        return _TARGET_BY_NAME[target.lower()]
    names = ", ".join(t.name for t in TARGETS)
    raise ValueError(
        f"unknown QM9 target {target!r}: give an index 0-{len(TARGETS) - 1} or one of {names} "
        "(case-insensitive)"
    )


def atom_refs(kind: int | str = "U0", unit: str = "eV") -> Tensor:
    r"""Atom reference energies of QM9 (B3LYP/6-31G(2df,p)), indexed by atomic number.

    The atomization targets are ``E_atom = (E - sum_atoms ref[z]) * 27.211386246`` eV, so
    ``y[:, 12] == y[:, 7] - atom_refs("U0")[z].sum()`` for each molecule. Methane
    (C + 4 H): ``U0_atom = -17.1722`` eV.

    Args:
        kind (int or str): ``"U0"``, ``"U"``, ``"H"`` or ``"G"``, or a target that names one
            of them (``7``-``10``, ``12``-``15``, ``"U0_atom"``, ...). (default: ``"U0"``)
        unit (str): ``"eV"`` or ``"hartree"``. (default: ``"eV"``)

    Returns:
        float64 tensor ``[10]``: the reference of H, C, N, O, F at indices 1, 6, 7, 8, 9 and
        zero elsewhere.
    """
    index = target_index(kind)
    if not (7 <= index <= 10 or 12 <= index <= 15):
        raise ValueError(
            f"atom references exist for U0, U, H and G (and their atomization targets), "
            f"not for {TARGETS[index].name!r}"
        )
    name = TARGETS[index if index <= 10 else index - 5].name
    if unit not in ("eV", "hartree"):
        raise ValueError(f"unit must be 'eV' or 'hartree', got {unit!r}")
    out = torch.zeros(_MAX_Z + 1, dtype=torch.float64)
    out[list(_ATOM_REF_ELEMENTS)] = torch.tensor(_ATOM_REFS_HARTREE[name], dtype=torch.float64)
    return out * HARTREE_TO_EV if unit == "eV" else out


def conventional_split(
    n: int = NUM_MOLECULES,
    seed: int = 42,
    num_train: int = 110_000,
    num_valid: int = 10_000,
) -> tuple[Tensor, Tensor, Tensor]:
    """DimeNet++'s QM9 split: ``numpy.random.RandomState(seed).permutation(n)`` cut in three.

    Returns positions into the dataset (``dataset[train]``), not ``idx`` values: train
    ``perm[:110000]``, valid ``perm[110000:120000]``, test ``perm[120000:]`` (10,831 for
    the full 130,831 molecules), each an int64 tensor in permutation order.
    """
    if num_train < 0 or num_valid < 0 or num_train + num_valid > n:
        raise ValueError(
            f"cannot take {num_train} train and {num_valid} valid molecules out of n={n}"
        )
    perm = torch.from_numpy(np.random.RandomState(seed).permutation(n).astype(np.int64))
    stop = num_train + num_valid
    return perm[:num_train], perm[num_train:stop], perm[stop:]


def read_uncharacterized(path: str | Path) -> list[int]:
    """The GDB-9 indices (1-based) listed in figshare's ``uncharacterized.txt``.

    The file is a text table between lines of ``=``: a header row (``#   Index ...``), then one
    row per molecule starting with its index. PyG reads it as lines ``[9:-2]``; this reader
    finds the table by its rules instead, and raises on a row that does not start with an index.
    """
    path = Path(path)
    lines = path.read_text().splitlines()
    rules = [i for i, line in enumerate(lines) if line.strip().startswith("===")]
    if len(rules) < 2:
        raise ValueError(
            f"{path}: not figshare's uncharacterized.txt (expected a table between lines of "
            f"'='); see {_README}"
        )
    stop = rules[2] if len(rules) > 2 else len(lines)
    indices = []
    for lineno in range(rules[1] + 1, stop):
        tokens = lines[lineno].split()
        if not tokens:
            continue
        if not tokens[0].isdigit():
            raise ValueError(
                f"{path}, line {lineno + 1}: expected a molecule index, got {lines[lineno]!r}"
            )
        indices.append(int(tokens[0]))
    if not indices:
        raise ValueError(f"{path}: lists no molecule index")
    return indices


@dataclass
class _Molecules:
    """Flat arrays for g molecules and a atoms, as every reader returns them."""

    z: np.ndarray  # [a] int64
    pos: np.ndarray  # [a, 3] float64, Angstrom
    num_atoms: np.ndarray  # [g] int64
    index: np.ndarray  # [g] int64, 1-based GDB-9 index
    y: np.ndarray  # [g, 19] float64, PyG order and units
    smiles: list[str]
    skipped: list[int]  # 1-based indices skipped as uncharacterised


def _targets_from_gdb_properties(
    props: np.ndarray, z: np.ndarray, num_atoms: np.ndarray
) -> np.ndarray:
    """``y [g, 19]`` in PyG units from the 15 xyz-file properties ``[g, 15]`` (hartree etc.)."""
    g = len(num_atoms)
    y = np.empty((g, len(TARGETS)), dtype=np.float64)
    y[:, 0:2] = props[:, 3:5]  # mu, alpha
    y[:, 2:5] = props[:, 5:8] * HARTREE_TO_EV  # homo, lumo, gap
    y[:, 5] = props[:, 8]  # r2
    y[:, 6] = props[:, 9] * HARTREE_TO_EV  # zpve
    y[:, 7:11] = props[:, 10:14] * HARTREE_TO_EV  # U0, U, H, G
    y[:, 11] = props[:, 14]  # Cv
    molecule = np.repeat(np.arange(g), num_atoms)  # [a]
    for j, kind in enumerate(("U0", "U", "H", "G")):
        ref = atom_refs(kind, unit="hartree").numpy()
        ref_sum = np.bincount(molecule, weights=ref[z], minlength=g)  # [g]
        y[:, 12 + j] = (props[:, 10 + j] - ref_sum) * HARTREE_TO_EV
    y[:, 16:19] = props[:, 0:3]  # A, B, C
    return y


def _require_files(paths: Sequence[Path], what_to_do: str) -> None:
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"QM9: missing {', '.join(missing)}. {what_to_do}")


def qm9pack_data_dir() -> Path:
    """The ``data`` folder of the installed ``qm9pack`` package (without importing it)."""
    spec = importlib.util.find_spec("qm9pack")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "QM9: the package 'qm9pack' is not installed, so its CSV files cannot be found. "
            "Run `pip install qm9pack`, or pass raw_dir= with its data files, or use "
            f"source='pyg-raw' or 'xyz' with files under root/raw (see {_README})."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data"


# ---------------------------------------------------------------------------------------------
# qm9pack
# ---------------------------------------------------------------------------------------------


def _read_qm9pack(data_dir: Path, max_molecules: int | None) -> _Molecules:
    import pandas as pd

    paths = [data_dir / name for name in _QM9PACK_PARTS]
    _require_files(
        paths,
        f"They ship with `pip install qm9pack` (folder qm9pack/data); see {_README}.",
    )
    columns = (*_QM9PACK_COLUMNS, *_QM9PACK_PROPERTIES)
    z_parts, pos_parts, n_parts, index_parts, prop_parts, smiles = [], [], [], [], [], []
    remaining = max_molecules
    for path in paths:
        if remaining == 0:
            break
        header = pd.read_csv(path, nrows=0).columns
        absent = [c for c in columns if c not in header]
        if absent:
            raise ValueError(
                f"{path}: missing columns {absent}; expected qm9pack's QM9 CSV ({_README})"
            )
        # na_filter=False: an empty or "nan" field stays text here and is reported below.
        df = pd.read_csv(path, usecols=list(columns), nrows=remaining, na_filter=False)
        z, pos, num_atoms, index, props = _parse_qm9pack_frame(df, path)
        z_parts.append(z)
        pos_parts.append(pos)
        n_parts.append(num_atoms)
        index_parts.append(index)
        prop_parts.append(props)
        smiles.extend(df["SMILES"].astype(str).tolist())
        if remaining is not None:
            remaining -= len(df)
    z = np.concatenate(z_parts)
    num_atoms = np.concatenate(n_parts)
    index = np.concatenate(index_parts)
    bad = np.flatnonzero(np.diff(index) <= 0)
    if len(bad):
        raise ValueError(
            f"{data_dir}: qm9pack rows are not in increasing Index order (Index "
            f"{index[bad[0]]} is followed by {index[bad[0] + 1]}); row order must equal PyG's"
        )
    props = np.concatenate(prop_parts)
    return _Molecules(
        z=z,
        pos=np.concatenate(pos_parts),
        num_atoms=num_atoms,
        index=index,
        y=_targets_from_gdb_properties(props, z, num_atoms),
        smiles=smiles,
        skipped=[],
    )


def _parse_qm9pack_frame(df, path: Path) -> tuple[np.ndarray, ...]:
    """Validate and convert one qm9pack part: z, pos, num_atoms, index, props [g, 15]."""
    import pandas as pd

    def where(row: int) -> str:
        # Line numbers count the header (line 1); qm9pack's fields hold no newlines.
        return f"{path}, line {row + 2} (Index {df['Index'].iat[row]}, {df['XYZ_file'].iat[row]})"

    def as_numbers(column: str, integer: bool) -> np.ndarray:
        values = pd.to_numeric(df[column], errors="coerce").to_numpy(dtype=np.float64)
        ok = np.abs(values) <= FLOAT32_MAX  # False for nan and inf too
        if integer:
            ok &= values == np.round(values)
        if not ok.all():
            row = int(np.flatnonzero(~ok)[0])
            kind = "an integer" if integer else "a finite number within float32's range"
            raise ValueError(f"{where(row)}: {column} is {df[column].iat[row]!r}, not {kind}")
        return values.astype(np.int64) if integer else values

    index = as_numbers("Index", integer=True)
    num_atoms = as_numbers("N_atoms", integer=True)
    props = np.stack([as_numbers(c, integer=False) for c in _QM9PACK_PROPERTIES], axis=1)
    for row, (name, i) in enumerate(zip(df["XYZ_file"].tolist(), index.tolist(), strict=True)):
        if name != f"dsgdb9nsd_{i:06d}.xyz":
            raise ValueError(f"{where(row)}: XYZ_file {name!r} does not match Index {i}")
    if (num_atoms < 1).any():
        row = int(np.flatnonzero(num_atoms < 1)[0])
        raise ValueError(f"{where(row)}: N_atoms is {num_atoms[row]}")

    # Elements: "['C','H','H','H','H']".
    symbols = [
        s.strip().strip("[]").replace("'", "").replace('"', "").replace(" ", "").split(",")
        for s in df["Elements"].tolist()
    ]
    for row, (syms, n) in enumerate(zip(symbols, num_atoms.tolist(), strict=True)):
        if len(syms) != n:
            raise ValueError(f"{where(row)}: Elements lists {len(syms)} atoms, N_atoms is {n}")
    flat = [ATOMIC_NUMBERS.get(s, 0) for syms in symbols for s in syms]
    z = np.array(flat, dtype=np.int64)
    if not z.all():
        atom = int(np.flatnonzero(z == 0)[0])
        row = int(np.searchsorted(np.cumsum(num_atoms), atom, side="right"))
        sym = [s for syms in symbols for s in syms][atom]
        raise ValueError(
            f"{where(row)}: unknown element {sym!r} in Elements (QM9 has H, C, N, O, F)"
        )

    # XYZ_Ang: "[[x,y,z],[x,y,z],...]" with numbers such as "0." and "2.1997E-6"; validate
    # each row with a regex, then convert all numbers at once.
    xyz = df["XYZ_Ang"].tolist()
    for row, (text, n) in enumerate(zip(xyz, num_atoms.tolist(), strict=True)):
        if _XYZ_ANG_RE.fullmatch(text) is None:
            raise ValueError(
                f"{where(row)}: XYZ_Ang is not a list of [x, y, z] numbers: {text[:120]!r}"
            )
        if text.count("[") - 1 != n:
            raise ValueError(
                f"{where(row)}: XYZ_Ang has {text.count('[') - 1} atoms, N_atoms is {n}"
            )
    flat_text = " ".join(xyz).translate(str.maketrans("[],", "   "))
    pos = np.fromstring(flat_text, dtype=np.float64, sep=" ").reshape(-1, 3)  # [a, 3]
    if len(pos) != int(num_atoms.sum()):  # cannot happen after the row checks
        raise ValueError(f"{path}: parsed {len(pos)} atoms, expected {int(num_atoms.sum())}")
    in_range = (np.abs(pos) <= FLOAT32_MAX).all(axis=1)  # False for nan and inf too
    if not in_range.all():  # e.g. an exponent past float64's or float32's range
        atom = int(np.flatnonzero(~in_range)[0])
        row = int(np.searchsorted(np.cumsum(num_atoms), atom, side="right"))
        raise ValueError(
            f"{where(row)}: XYZ_Ang has a coordinate that is not a finite number within "
            f"float32's range ({pos[atom].tolist()})"
        )
    return z, pos, num_atoms, index, props


# ---------------------------------------------------------------------------------------------
# PyG raw files (gdb9.sdf, gdb9.sdf.csv, uncharacterized.txt)
# ---------------------------------------------------------------------------------------------


def _read_moleculenet_csv(path: Path) -> dict[int, np.ndarray]:
    """``{GDB-9 index: y [19] in PyG order and units}`` from MoleculeNet's ``gdb9.sdf.csv``."""
    with open(path) as f:
        header = f.readline().strip().split(",")
        if [h.strip() for h in header[: len(_MOLECULENET_COLUMNS)]] != list(_MOLECULENET_COLUMNS):
            raise ValueError(
                f"{path}, line 1: expected MoleculeNet's header {','.join(_MOLECULENET_COLUMNS)}, "
                f"got {','.join(header)}"
            )
        rows: dict[int, np.ndarray] = {}
        for lineno, line in enumerate(f, start=2):
            if not line.strip():
                continue
            fields = line.rstrip("\n").split(",")
            match = _GDB_NAME.fullmatch(fields[0].strip())
            if match is None or len(fields) < len(_MOLECULENET_COLUMNS):
                raise ValueError(
                    f"{path}, line {lineno}: expected 'gdb_<index>' and 19 numbers, got {line!r}"
                )
            values = []
            for column, text in zip(_MOLECULENET_COLUMNS[1:], fields[1:20], strict=True):
                if _NUMBER_RE.fullmatch(text.strip()) is None:
                    raise ValueError(
                        f"{path}, line {lineno} ({fields[0]}): {column} is {text!r}, "
                        "not a finite number"
                    )
                values.append(float(text))
                if not abs(values[-1]) <= FLOAT32_MAX:
                    raise ValueError(
                        f"{path}, line {lineno} ({fields[0]}): {column} is {text!r}, beyond "
                        "float32's range"
                    )
            index = int(match.group(1))
            if index in rows:
                raise ValueError(f"{path}, line {lineno}: {fields[0]} appears twice")
            rows[index] = np.array(values, dtype=np.float64)
    return rows


def _read_pyg_raw(
    raw_dir: Path, max_molecules: int | None, skip_uncharacterized: bool
) -> _Molecules:
    sdf, csv, unchar = (
        raw_dir / "gdb9.sdf",
        raw_dir / "gdb9.sdf.csv",
        raw_dir / "uncharacterized.txt",
    )
    _require_files(
        [sdf, csv, *([unchar] if skip_uncharacterized else [])],
        f"Put PyG's raw QM9 files there: gdb9.sdf and gdb9.sdf.csv from MoleculeNet's qm9.zip "
        f"and figshare file 3195404 saved as uncharacterized.txt; see {_README}.",
    )
    from rdkit import Chem, RDLogger

    skip = set(read_uncharacterized(unchar)) if skip_uncharacterized else set()
    table = _read_moleculenet_csv(csv)
    z, pos, num_atoms, index, y, smiles, skipped = [], [], [], [], [], [], []
    RDLogger.DisableLog("rdApp.*")
    try:
        supplier = Chem.SDMolSupplier(str(sdf), removeHs=False, sanitize=False)
        for record, mol in enumerate(supplier, start=1):
            if max_molecules is not None and len(index) == max_molecules:
                break
            if mol is None:
                raise ValueError(f"{sdf}, record {record}: RDKit cannot parse this molecule")
            name = mol.GetProp("_Name").strip() if mol.HasProp("_Name") else ""
            match = _GDB_NAME.fullmatch(name)
            if match is None:
                raise ValueError(f"{sdf}, record {record}: title {name!r} is not 'gdb_<index>'")
            gdb = int(match.group(1))
            if gdb in skip:
                skipped.append(gdb)
                continue
            if gdb not in table:
                raise ValueError(f"{sdf}, record {record} ({name}): no row {name} in {csv}")
            numbers = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
            bad = [n for n in numbers if n not in _ATOM_REF_ELEMENTS]
            if bad or not numbers:
                raise ValueError(
                    f"{sdf}, record {record} ({name}): atomic numbers {bad or numbers} are not "
                    "H, C, N, O, F"
                )
            xyz = mol.GetConformer().GetPositions()
            if not (np.abs(xyz) <= FLOAT32_MAX).all():
                raise ValueError(
                    f"{sdf}, record {record} ({name}): coordinates that are not finite numbers "
                    "within float32's range"
                )
            z.extend(numbers)
            pos.append(xyz)
            num_atoms.append(len(numbers))
            index.append(gdb)
            y.append(table[gdb])
            smiles.append(Chem.MolToSmiles(mol, isomericSmiles=True))
    finally:
        RDLogger.EnableLog("rdApp.*")
    if not index:
        raise ValueError(f"{sdf}: holds no characterised molecule")
    if max_molecules is None:
        unused = sorted(set(table) - set(index) - set(skipped))
        if unused:
            names = ", ".join(f"gdb_{i}" for i in unused[:5])
            raise ValueError(
                f"{csv}: {len(unused)} rows have no record in {sdf} ({names}"
                f"{', ...' if len(unused) > 5 else ''}); are the two files from one release?"
            )
    if any(b <= a for a, b in zip(index, index[1:], strict=False)):
        raise ValueError(f"{sdf}: records are not in increasing gdb_<index> order")
    values = np.stack(y)  # [g, 19] in MoleculeNet's column order and units
    y_pyg = np.concatenate([values[:, 3:], values[:, :3]], axis=1) * _MOLECULENET_TO_PYG
    return _Molecules(
        z=np.array(z, dtype=np.int64),
        pos=np.concatenate(pos).astype(np.float64),
        num_atoms=np.array(num_atoms, dtype=np.int64),
        index=np.array(index, dtype=np.int64),
        y=y_pyg,
        smiles=smiles,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# Original xyz files (dsgdb9nsd_*.xyz or dsgdb9nsd.xyz.tar.bz2)
# ---------------------------------------------------------------------------------------------


class _XYZRecord(NamedTuple):
    index: int
    z: list[int]
    pos: list[list[float]]
    props: list[float]
    smiles: str


def _xyz_number(text: str, where: str, lineno: int) -> float:
    # Mathematica writes exponents as "1.2*^-6".
    normal = text.replace("*^", "e")
    if _NUMBER_RE.fullmatch(normal) is None:
        raise ValueError(f"{where}, line {lineno}: {text!r} is not a finite number")
    value = float(normal)
    if not abs(value) <= FLOAT32_MAX:
        raise ValueError(
            f"{where}, line {lineno}: {text!r} is not a finite number within float32's range"
        )
    return value


def parse_gdb_xyz(text: str, where: str = "<xyz>") -> _XYZRecord:
    """Parse one original QM9 xyz file (the extended format of Ramakrishnan et al., 2014).

    Layout: line 1 the number of atoms ``n``; line 2 ``gdb <index>`` and 15 properties (A, B,
    C in GHz, mu in D, alpha in a0^3, HOMO, LUMO, gap in hartree, R2 in a0^2, ZPVE, U0, U, H,
    G in hartree, Cv in cal/(mol K)); ``n`` lines ``element x y z mulliken_charge`` (Angstrom,
    e); harmonic frequencies; the GDB-17 and the relaxed SMILES; the two InChI strings.
    Numbers may use Mathematica exponents (``1.2*^-6``).

    Raises:
        ValueError: naming ``where`` and the line, for a truncated file, an unknown element, a
            field that is not a finite number or a wrong number of fields.
    """
    lines = text.splitlines()
    first = lines[0].strip() if lines else ""
    if not first.isdigit() or int(first) < 1:
        raise ValueError(f"{where}, line 1: expected the number of atoms, got {first!r}")
    n = int(first)
    if len(lines) < n + 5:
        raise ValueError(f"{where}: truncated, {len(lines)} lines for {n} atoms (expected {n + 5})")
    head = lines[1].split()
    if len(head) != 2 + len(_GDB_PROPERTIES) or head[0] != "gdb" or not head[1].isdigit():
        raise ValueError(
            f"{where}, line 2: expected 'gdb <index>' and {len(_GDB_PROPERTIES)} properties, "
            f"got {lines[1]!r}"
        )
    props = [_xyz_number(t, where, 2) for t in head[2:]]
    z, pos = [], []
    for lineno in range(3, n + 3):
        fields = lines[lineno - 1].split()
        if len(fields) != 5:
            raise ValueError(
                f"{where}, line {lineno}: expected 'element x y z charge', got "
                f"{lines[lineno - 1]!r}"
            )
        if fields[0] not in ATOMIC_NUMBERS:
            raise ValueError(
                f"{where}, line {lineno}: unknown element {fields[0]!r} (QM9 has H, C, N, O, F)"
            )
        z.append(ATOMIC_NUMBERS[fields[0]])
        pos.append([_xyz_number(t, where, lineno) for t in fields[1:4]])
    smiles = lines[n + 3].split()
    if not smiles:
        raise ValueError(f"{where}, line {n + 4}: expected the SMILES strings, got an empty line")
    return _XYZRecord(int(head[1]), z, pos, props, smiles[0])


def _read_xyz(raw_dir: Path, max_molecules: int | None, skip_uncharacterized: bool) -> _Molecules:
    unchar = raw_dir / "uncharacterized.txt"
    files: dict[int, Path] = {}
    for path in sorted(raw_dir.glob("dsgdb9nsd_*.xyz")):
        match = _XYZ_NAME.fullmatch(path.name)
        if match is not None:
            i = int(match.group(1))
            if i in files:
                raise ValueError(f"{raw_dir}: {files[i].name} and {path.name} are both gdb {i}")
            files[i] = path
    archive = raw_dir / _XYZ_ARCHIVE
    if not files and not archive.is_file():
        raise FileNotFoundError(
            f"QM9: no dsgdb9nsd_*.xyz files and no {archive} in {raw_dir}. Put the original "
            f"QM9 xyz files (figshare file 3195389, {_XYZ_ARCHIVE}) there, as the archive or "
            f"unpacked; see {_README}."
        )
    if skip_uncharacterized:
        _require_files(
            [unchar],
            "Save figshare file 3195404 as uncharacterized.txt there (it lists the 3,054 "
            "molecules that QM9 users leave out), or pass skip_uncharacterized=False to keep "
            f"all 133,885; see {_README}.",
        )
    skip = set(read_uncharacterized(unchar)) if skip_uncharacterized else set()

    texts: dict[int, tuple[str, str]] = {}  # index -> (where, text)
    listed: list[int] = []  # present but listed in uncharacterized.txt
    if files:
        if archive.is_file():
            logger.info(
                "QM9(xyz): reading the %d xyz files in %s, not %s", len(files), raw_dir, archive
            )
        listed = [i for i in files if i in skip]
        for i in sorted(i for i in files if i not in skip)[:max_molecules]:
            texts[i] = (str(files[i]), files[i].read_text())
    else:
        with tarfile.open(archive, "r:*") as tar:  # a compressed stream: read in one pass
            for member in tar:
                match = _XYZ_NAME.fullmatch(Path(member.name).name)
                if match is None or not member.isfile():
                    continue
                i = int(match.group(1))
                if i in skip:
                    listed.append(i)
                    continue
                if i in texts:
                    raise ValueError(f"{archive}: holds gdb {i} twice ({member.name})")
                handle = tar.extractfile(member)
                texts[i] = (f"{archive}:{member.name}", handle.read().decode())
        texts = {i: texts[i] for i in sorted(texts)[:max_molecules]}
    if not texts:
        raise ValueError(f"{raw_dir}: holds no characterised molecule")
    # Count what was left out up to the last kept molecule, as a sequential read would.
    last = max(texts) if max_molecules is not None else math.inf
    skipped = sorted(i for i in listed if i < last)

    z, pos, num_atoms, props, smiles = [], [], [], [], []
    for i, (where, text) in texts.items():
        record = parse_gdb_xyz(text, where)
        if record.index != i:
            raise ValueError(f"{where}, line 2: says gdb {record.index}, the file name {i}")
        z.extend(record.z)
        pos.extend(record.pos)
        num_atoms.append(len(record.z))
        props.append(record.props)
        smiles.append(record.smiles)
    z_arr = np.array(z, dtype=np.int64)
    n_arr = np.array(num_atoms, dtype=np.int64)
    return _Molecules(
        z=z_arr,
        pos=np.array(pos, dtype=np.float64),
        num_atoms=n_arr,
        index=np.array(list(texts), dtype=np.int64),
        y=_targets_from_gdb_properties(np.array(props, dtype=np.float64), z_arr, n_arr),
        smiles=smiles,
        skipped=skipped,
    )


# ---------------------------------------------------------------------------------------------
# Storage: flat tensors + slices (InMemoryDataset's layout), strings packed into uint8 tensors
# ---------------------------------------------------------------------------------------------


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _check_plain(value: object, where: str) -> None:
    """Raise ``ValueError`` naming the field when ``value`` holds anything but tensors and
    plain data (it would not load with ``torch.load(weights_only=True)``)."""
    if isinstance(value, dict):
        for key, item in value.items():
            if not isinstance(key, (str, int)):
                raise ValueError(f"{where}: key {key!r} is a {type(key).__name__}")
            _check_plain(item, f"{where}[{key!r}]")
    elif isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
    elif not (value is None or isinstance(value, (Tensor, str, int, float, bool))):
        raise ValueError(
            f"{where} is a {type(value).__name__}: the cache holds tensors and plain data only "
            "(check what pre_transform adds)"
        )


def _cache_problem(payload: dict) -> str | None:
    """What is wrong with the structure of a cache payload, or ``None``."""
    expected = {"data": dict, "slices": dict, "strings": dict, "skipped_idx": Tensor}
    for key, kind in expected.items():
        if not isinstance(payload.get(key), kind):
            found = type(payload.get(key)).__name__ if key in payload else "missing"
            return f"field {key!r} is {found}, not a {kind.__name__}"
    if not all(isinstance(k, str) for k in payload["data"]):
        return "field 'data' has a key that is not a string"
    for key, ptr in payload["slices"].items():
        if not isinstance(ptr, Tensor) or ptr.dim() != 1:
            return f"field 'slices' entry {key!r} is not a 1-d tensor"
    for key, count in payload["strings"].items():
        if not isinstance(count, int) or not isinstance(payload["data"].get(key), Tensor):
            return f"field 'strings' entry {key!r} does not describe a packed tensor"
    return None


def _pack_strings(values: list[str]) -> Tensor:
    data = "\x00".join(values).encode()
    return (
        torch.frombuffer(bytearray(data), dtype=torch.uint8)
        if data
        else torch.zeros(0, dtype=torch.uint8)
    )


def _unpack_strings(packed: Tensor, count: int) -> list[str]:
    return bytes(packed.numpy()).decode().split("\x00") if count else []


def _storage(mols: _Molecules) -> tuple[Data, dict[str, Tensor]]:
    """One collated ``Data`` and its slices, as ``InMemoryDataset.collate`` would make them."""
    g = len(mols.num_atoms)
    atom_ptr = torch.zeros(g + 1, dtype=torch.long)
    atom_ptr[1:] = torch.from_numpy(np.cumsum(mols.num_atoms))
    graph_ptr = torch.arange(g + 1)
    y = torch.from_numpy(mols.y).to(torch.float32)
    bad = ~torch.isfinite(y)
    if bad.any():  # a raw value in range whose conversion to PyG's units is not
        row, column = (int(v) for v in torch.nonzero(bad)[0])
        raise ValueError(
            f"QM9 molecule gdb_{int(mols.index[row])}: target {TARGETS[column].name} is "
            f"{float(mols.y[row, column]):g} {TARGETS[column].unit}, beyond float32's range"
        )
    data = Data(
        z=torch.from_numpy(mols.z),
        pos=torch.from_numpy(mols.pos).to(torch.float32),
        y=y,
        idx=torch.from_numpy(mols.index - 1),
        name=[f"gdb_{i}" for i in mols.index.tolist()],
        smiles=list(mols.smiles),
    )
    slices = {"z": atom_ptr, "pos": atom_ptr, "y": graph_ptr, "idx": graph_ptr}
    slices.update(name=graph_ptr, smiles=graph_ptr)
    return data, slices


def _save_atomically(obj: object, path: str) -> None:
    """``torch.save`` to a temporary file beside ``path``, then rename it over ``path``:
    a reader never sees a partly written cache, also when the trainers of several nodes
    sharing a filesystem build the same cache at once (each on its local rank 0; the
    last complete file wins, and they are identical). Non-local paths (``fsspec`` URLs)
    are written by PyG's ``fs.torch_save``."""
    if "://" in path:
        fs.torch_save(obj, path)
        return
    import os
    import uuid

    target = Path(path)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        torch.save(obj, tmp)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


class QM9(InMemoryDataset):
    r"""QM9 (`Ramakrishnan et al., 2014 <https://doi.org/10.1038/sdata.2014.22>`_) with the 19
    targets of :class:`torch_geometric.datasets.QM9`, read offline from qm9pack's CSV files,
    PyG's raw files or the original xyz files.

    130,831 molecules (the 133,885 GDB-9 molecules minus the 3,054 that failed QM9's
    consistency check), up to 29 atoms of H, C, N, O, F; one relaxed geometry each.
    Row order equals PyG's QM9, so the DimeNet++ split (:func:`conventional_split`) picks the
    same molecules. It is an :class:`~torch_geometric.data.InMemoryDataset`, so indexing with
    a split, ``shuffle()``, ``copy()`` and PyG's ``DataLoader`` work as for PyG's QM9;
    processing writes that class's collated layout directly instead of collating 130,831
    per-molecule ``Data`` objects (seconds instead of minutes).

    Targets (``y[:, index]``; :data:`TARGETS` holds this table, the names select columns):

    ===== ========= =========================================== ===============
    Index Name      Description                                 Unit
    ===== ========= =========================================== ===============
    0     mu        Dipole moment                               D
    1     alpha     Isotropic polarizability                    a0^3
    2     homo      Highest occupied molecular orbital energy   eV
    3     lumo      Lowest unoccupied molecular orbital energy  eV
    4     gap       Gap between HOMO and LUMO                   eV
    5     r2        Electronic spatial extent <R^2>             a0^2
    6     zpve      Zero point vibrational energy               eV
    7     U0        Internal energy at 0 K                      eV
    8     U         Internal energy at 298.15 K                 eV
    9     H         Enthalpy at 298.15 K                        eV
    10    G         Free energy at 298.15 K                     eV
    11    Cv        Heat capacity at 298.15 K                   cal/(mol K)
    12    U0_atom   Atomization energy at 0 K                   eV
    13    U_atom    Atomization energy at 298.15 K              eV
    14    H_atom    Atomization enthalpy at 298.15 K            eV
    15    G_atom    Atomization free energy at 298.15 K         eV
    16    A         Rotational constant A                       GHz
    17    B         Rotational constant B                       GHz
    18    C         Rotational constant C                       GHz
    ===== ========= =========================================== ===============

    Energies in hartree are converted with 1 Ha = 27.211386246 eV. Atomization energies are
    ``(E - sum of atom references) * 27.211386246`` (:func:`atom_refs`); from ``"pyg-raw"``
    they are MoleculeNet's kcal/mol values times 0.04336414, as in PyG. A is 0 or very large
    for (near-)linear molecules: do not standardise it naively.

    Each item is a :class:`~torch_geometric.data.Data` with

    * ``z`` ``[n]`` int64: atomic numbers;
    * ``pos`` ``[n, 3]`` float32: coordinates in Angstrom;
    * ``y`` float32: ``[1, 19]``, or ``[1]`` with one ``target``, or ``[1, k]`` with ``k``;
    * ``idx`` ``[1]`` int64: the GDB-9 index minus one (0-based, as PyG's ``idx``);
    * ``name`` ``"gdb_<index>"``; ``smiles``: the GDB-17 SMILES (``"qm9pack"``, ``"xyz"``)
      or RDKit's SMILES of the SDF record (``"pyg-raw"``, as PyG).

    Coordinates: qm9pack's and the xyz files' are full precision (10 decimals); MoleculeNet's
    ``gdb9.sdf`` rounds them to 4 decimals. This class computes no bonds or atom features.

    Args:
        root (str): Folder for ``processed/`` (the cache) and, for ``"pyg-raw"`` and
            ``"xyz"``, ``raw/`` with the source files.
        source (str): ``"qm9pack"``, ``"pyg-raw"`` or ``"xyz"``. (default: ``"qm9pack"``)
        target (int, str or sequence, optional): Keep only these columns of ``y``, by index or
            name (case-insensitive, e.g. ``"gap"``, ``"U0"``, ``"U0_atom"``, ``7``); the cache
            always holds all 19. (default: :obj:`None`, all 19)
        transform (callable, optional): Applied to each item on access. (default: :obj:`None`)
        pre_transform (callable, optional): Applied to each item before caching; makes
            processing build one ``Data`` per molecule (slower). (default: :obj:`None`)
        pre_filter (callable, optional): Keeps the items for which it returns ``True`` before
            caching; also per molecule. (default: :obj:`None`)
        max_molecules (int, optional): Process only the first ``max_molecules`` molecules in
            index order (after leaving out uncharacterised ones), e.g. a few hundred for tests;
            part of the cache file name. With the xyz archive the whole archive is still read.
            (default: :obj:`None`, all)
        raw_dir (str, optional): Folder with the source files. (default: qm9pack's ``data``
            folder for ``"qm9pack"``, ``root/raw`` otherwise)
        skip_uncharacterized (bool): Leave out the molecules listed in ``uncharacterized.txt``
            (``"pyg-raw"``, ``"xyz"``); the number left out is :attr:`num_skipped`, their
            ``idx`` :attr:`skipped_idx`, and processing logs it. ``False`` keeps all 133,885
            and needs no ``uncharacterized.txt``. qm9pack holds none of them, so ``False`` is
            an error there. (default: :obj:`True`)
        log (bool): Print PyG's "Processing..." lines. (default: :obj:`True`)
        force_reload (bool): Reprocess even if the cache exists. (default: :obj:`False`)

    Raises:
        FileNotFoundError: a source file is missing (the message names it and what to do).
        ValueError: an unknown source or target, or a malformed record (the message names the
            file, the molecule and the line).

    Example::

        dataset = QM9("data/qm9", target="gap")  # about 5 s once, then well under 1 s
        train, valid, test = conventional_split()
        loader = DataLoader(dataset[train], batch_size=32, shuffle=True)
    """

    def __init__(
        self,
        root: str,
        source: str = "qm9pack",
        target: int | str | Sequence[int | str] | None = None,
        transform: Callable | None = None,
        pre_transform: Callable | None = None,
        pre_filter: Callable | None = None,
        max_molecules: int | None = None,
        raw_dir: str | None = None,
        skip_uncharacterized: bool = True,
        log: bool = True,
        force_reload: bool = False,
    ) -> None:
        if source not in SOURCES:
            raise ValueError(f"unknown QM9 source {source!r}; choose one of {', '.join(SOURCES)}")
        if source == "qm9pack" and not skip_uncharacterized:
            raise ValueError(
                "qm9pack holds only the 130,831 characterised molecules, so "
                "skip_uncharacterized=False cannot add the other 3,054; use source='pyg-raw' "
                "or 'xyz' for them"
            )
        if max_molecules is not None and max_molecules < 1:
            raise ValueError(f"max_molecules must be a positive int or None, got {max_molecules}")
        if target is None:
            self.target_indices: list[int] | None = None
        elif isinstance(target, (str, int, np.integer)):
            self.target_indices = [target_index(target)]
        else:
            self.target_indices = [target_index(t) for t in target]
        self.target = target
        self.source = source
        self.max_molecules = max_molecules
        self.skip_uncharacterized = skip_uncharacterized
        self._raw_dir = raw_dir
        self.num_skipped = 0
        self.skipped_idx = torch.zeros(0, dtype=torch.long)
        super().__init__(root, transform, pre_transform, pre_filter, log, force_reload)
        self._load_processed()
        self._select_targets()

    @property
    def raw_dir(self) -> str:
        if self._raw_dir is not None:
            return str(self._raw_dir)
        if self.source == "qm9pack":
            return str(qm9pack_data_dir())
        return str(Path(self.root) / "raw")

    @property
    def raw_file_names(self) -> list[str]:
        if self.source == "qm9pack":
            return list(_QM9PACK_PARTS)
        unchar = ["uncharacterized.txt"] if self.skip_uncharacterized else []
        if self.source == "pyg-raw":
            return ["gdb9.sdf", "gdb9.sdf.csv", *unchar]
        return [_XYZ_ARCHIVE, *unchar]  # or the unpacked dsgdb9nsd_*.xyz files

    @property
    def processed_file_names(self) -> str:
        parts = ["qm9", self.source.replace("-", "_")]
        if not self.skip_uncharacterized:
            parts.append("all")
        if self.max_molecules is not None:
            parts.append(f"first{self.max_molecules}")
        return "_".join(parts) + f"_v{FORMAT_VERSION}.pt"

    @property
    def target_names(self) -> list[str]:
        """Names of the columns of ``y`` as served."""
        indices = range(len(TARGETS)) if self.target_indices is None else self.target_indices
        return [TARGETS[i].name for i in indices]

    def atomref(self, target: int | str | None = None) -> Tensor | None:
        """PyG-style ``[100, 1]`` atom references in eV for U0, U, H or G (else ``None``), e.g.
        for :class:`torch_geometric.nn.models.SchNet`'s ``atomref``; defaults to the selected
        target when there is exactly one."""
        if target is None:
            if self.target_indices is None or len(self.target_indices) != 1:
                return None
            target = self.target_indices[0]
        index = target_index(target)
        if not 7 <= index <= 10:
            return None
        out = torch.zeros(100, 1)
        out[: _MAX_Z + 1, 0] = atom_refs(index).float()
        return out

    def process(self) -> None:
        start = time.perf_counter()
        raw_dir = Path(self.raw_dir)
        if self.source == "qm9pack":
            mols = _read_qm9pack(raw_dir, self.max_molecules)
        elif self.source == "pyg-raw":
            mols = _read_pyg_raw(raw_dir, self.max_molecules, self.skip_uncharacterized)
        else:
            mols = _read_xyz(raw_dir, self.max_molecules, self.skip_uncharacterized)
        data, slices = _storage(mols)
        if self.pre_filter is not None or self.pre_transform is not None or len(mols.index) == 1:
            # Per-molecule Data (slow for all of QM9); PyG stores a single molecule unsliced.
            data_list = [self._separate(data, slices, i) for i in range(len(mols.index))]
            if self.pre_filter is not None:
                data_list = [d for d in data_list if self.pre_filter(d)]
            if self.pre_transform is not None:
                data_list = [self.pre_transform(d) for d in data_list]
            if not data_list:
                raise ValueError("QM9: pre_filter rejected every molecule")
            data, slices = self.collate(data_list)
        if slices is None:  # a single molecule, stored as PyG stores it
            slices = {}
        if mols.skipped:
            logger.warning(
                "QM9(%s): left out %d uncharacterised molecules listed in %s (idx %s%s)",
                self.source,
                len(mols.skipped),
                Path(self.raw_dir) / "uncharacterized.txt",
                ", ".join(str(i - 1) for i in mols.skipped[:10]),
                ", ..." if len(mols.skipped) > 10 else "",
            )
        stored = data.to_dict()
        strings = {}
        for key, value in list(stored.items()):
            if isinstance(value, list) and all(
                isinstance(s, str) and "\x00" not in s for s in value
            ):
                strings[key] = len(value)
                stored[key] = _pack_strings(value)
        payload = {
            "format_version": FORMAT_VERSION,
            "source": self.source,
            "data": stored,
            "slices": slices,
            "strings": strings,
            "skipped_idx": torch.tensor(mols.skipped, dtype=torch.long) - 1,
        }
        _check_plain(payload, "the QM9 cache")
        _save_atomically(payload, self.processed_paths[0])
        logger.info(
            "QM9(%s): processed %d molecules in %.1f s into %s",
            self.source,
            len(mols.index),
            time.perf_counter() - start,
            self.processed_paths[0],
        )

    def _separate(self, data: Data, slices: dict[str, Tensor], i: int) -> Data:
        out = Data()
        for key, ptr in slices.items():
            value = data[key][ptr[i] : ptr[i + 1]]
            out[key] = value[0] if isinstance(value, list) else value
        return out

    def _process(self) -> None:
        """PyG's ``Dataset._process`` without its ``torch.load(weights_only=False)`` of
        ``processed/pre_transform.pt`` and ``pre_filter.pt``: those are read with
        ``weights_only=True`` (they hold strings); one that cannot be read that way is
        treated as differing and the cache is rebuilt, with a warning naming the file."""
        from torch_geometric.data.dataset import _repr, files_exist

        rebuild = self.force_reload
        for name, value in (("pre_transform", self.pre_transform), ("pre_filter", self.pre_filter)):
            path = Path(self.processed_dir) / f"{name}.pt"
            if rebuild or not path.exists():
                continue
            try:
                stored = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # never executed: a file that fails is rebuilt
                logger.warning(
                    "QM9: %s cannot be read safely (%s); rebuilding the cache from the raw data",
                    path,
                    _first_line(err),
                )
                rebuild = True
                continue
            if stored != _repr(value):
                warnings.warn(
                    f"QM9: the {name} argument differs from the one used for the cache in "
                    f"{self.processed_dir}; pass force_reload=True to rebuild it",
                    stacklevel=3,
                )
        if not rebuild and files_exist(self.processed_paths):
            return
        Path(self.processed_dir).mkdir(parents=True, exist_ok=True)
        self.process()
        for name, value in (("pre_transform", self.pre_transform), ("pre_filter", self.pre_filter)):
            _save_atomically(_repr(value), str(Path(self.processed_dir) / f"{name}.pt"))

    def _read_cache(self, path: str) -> tuple[dict | None, str | None]:
        """The cache payload read with ``weights_only=True`` (never anything else), or
        ``None`` and why it is unusable."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # refused or damaged: rebuilt, never executed
            return None, f"it cannot be read safely ({type(err).__name__}: {_first_line(err)})"
        if not isinstance(payload, dict):
            return None, f"it holds a {type(payload).__name__}, not a dict"
        if payload.get("format_version") != FORMAT_VERSION:
            found = payload.get("format_version")
            return None, f"it has format version {found!r}, this code writes {FORMAT_VERSION}"
        problem = _cache_problem(payload)
        return (None, problem) if problem else (payload, None)

    def _load_processed(self) -> None:
        path = self.processed_paths[0]
        payload, problem = self._read_cache(path)
        if payload is None:
            logger.warning("QM9: cache %s is unusable: %s; rebuilding it", path, problem)
            self.process()
            payload, problem = self._read_cache(path)
            if payload is None:
                raise ValueError(f"QM9: the rebuilt cache {path} is unusable: {problem}")
        stored = dict(payload["data"])
        for key, count in payload["strings"].items():
            stored[key] = _unpack_strings(stored[key], count)
        self.data = Data.from_dict(stored)
        self.slices = payload["slices"] or None
        self.skipped_idx = payload["skipped_idx"]
        self.num_skipped = len(self.skipped_idx)

    def _select_targets(self) -> None:
        if self.target_indices is None:
            return
        y = self._data.y
        if y.dim() != 2 or y.size(1) != len(TARGETS):
            raise ValueError(f"QM9: target selection needs y of shape [g, 19], got {list(y.shape)}")
        cols = self.target_indices
        single = isinstance(self.target, (str, int, np.integer))
        self._data.y = y[:, cols[0]].contiguous() if single else y[:, cols].contiguous()

    def __repr__(self) -> str:
        target = "" if self.target is None else f", target={self.target!r}"
        return f"{self.__class__.__name__}({len(self)}, source={self.source!r}{target})"
