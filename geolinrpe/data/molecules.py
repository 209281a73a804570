r"""Molecules and materials from SMILES strings and from anything ASE reads.

Both converters return ``(data_list, report)``: a list of PyG :class:`~torch_geometric.data.Data`
and a :class:`ConversionReport` that names every input that did not convert and why. Nothing
is dropped silently; ``strict=True`` raises a :class:`ValueError` listing the failures instead.

Fields of each ``Data`` (n atoms, hydrogens included):

* ``z [n]`` long: atomic numbers.
* ``pos [n, 3]`` float32: Cartesian coordinates in Angstrom.
* ``name`` str and ``idx [1]`` long: a label and the position of the input (SMILES) or of
  the structure in the stream of inputs (ASE), so results map back to inputs after failures.
* :func:`from_smiles` adds ``smiles`` (the input string) and ``force_field`` (``"MMFF94"``,
  ``"UFF"`` or ``"none"``: the force field that optimised the geometry).
* :func:`from_ase` adds ``cell [1, 3, 3]`` float32 (rows are lattice vectors, Angstrom; zeros
  for a molecule without a cell), ``pbc [1, 3]`` bool, and when the input has them
  ``energy [1]`` float64 (eV; float64 because total energies of large cells exceed float32's
  resolution) and ``forces [n, 3]`` float32 (eV/Angstrom).
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data

__all__ = ["ConversionFailure", "ConversionReport", "from_ase", "from_smiles"]

MAX_ATOMIC_NUMBER = 118


class ConversionFailure(NamedTuple):
    """One input that did not convert: ``(index, input, reason)``."""

    index: int
    input: str
    reason: str


@dataclass
class ConversionReport:
    """What happened to each input of a conversion.

    Attributes:
        num_inputs: inputs seen (SMILES strings, or structures/frames for ASE inputs).
        failures: inputs that produced no ``Data``, as ``(index, input, reason)``.
        warnings: inputs that converted with a caveat (e.g. the force field did not
            converge), as ``(index, input, message)``.
    """

    num_inputs: int = 0
    failures: list[ConversionFailure] = field(default_factory=list)
    warnings: list[ConversionFailure] = field(default_factory=list)

    @property
    def num_converted(self) -> int:
        return self.num_inputs - len(self.failures)

    @property
    def ok(self) -> bool:
        """``True`` when every input converted."""
        return not self.failures

    def summary(self) -> str:
        lines = [f"{self.num_converted} of {self.num_inputs} inputs converted"]
        lines += [f"  [{f.index}] {f.input!r}: {f.reason}" for f in self.failures]
        return "\n".join(lines)

    def raise_if_failed(self) -> None:
        """Raise a :class:`ValueError` listing every failure (nothing when all converted)."""
        if self.failures:
            raise ValueError(self.summary())


# ---------------------------------------------------------------------------------- SMILES
_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\]\s*")


@contextlib.contextmanager
def _rdkit_log():
    """Capture RDKit's error log (returned as a list of lines) instead of printing it."""
    from rdkit import rdBase

    lines: list[str] = []
    if hasattr(rdBase, "CaptureErrorLog"):  # RDKit >= 2025
        with rdBase.CaptureErrorLog() as capture:
            yield lines
        text = capture.messages or ""
        lines += [_TIMESTAMP.sub("", line) for line in text.splitlines() if line.strip()]
    else:  # older RDKit: keep stderr quiet, reasons fall back to generic messages
        blocker = rdBase.BlockLogs()
        try:
            yield lines
        finally:
            del blocker


def _embed(mol, seed: int) -> bool:
    """ETKDGv3 embedding in place; retry from random coordinates when it fails."""
    from rdkit.Chem import AllChem

    params = AllChem.ETKDGv3()
    params.randomSeed = seed
    if AllChem.EmbedMolecule(mol, params) == 0:
        return True
    params.useRandomCoords = True
    return AllChem.EmbedMolecule(mol, params) == 0


def _optimize(mol, max_iters: int) -> tuple[str, str | None]:
    """MMFF94 optimisation in place, UFF when MMFF has no parameters or fails to set up.

    Returns ``(force field used, warning or None)``.
    """
    from rdkit.Chem import AllChem

    tried = []
    if AllChem.MMFFHasAllMoleculeParams(mol):
        status = AllChem.MMFFOptimizeMolecule(mol, maxIters=max_iters)
        if status >= 0:
            return "MMFF94", None if status == 0 else f"MMFF94 not converged in {max_iters} steps"
        tried.append("MMFF94 setup failed")
    else:
        tried.append("no MMFF94 parameters")
    if AllChem.UFFHasAllMoleculeParams(mol):
        status = AllChem.UFFOptimizeMolecule(mol, maxIters=max_iters)
        if status >= 0:
            note = "; ".join(tried) + ", used UFF"
            if status:
                note += f" (not converged in {max_iters} steps)"
            return "UFF", note
        tried.append("UFF setup failed")
    else:
        tried.append("no UFF parameters")
    return "none", "; ".join(tried) + ": kept the unoptimised ETKDG geometry"


def _smiles_to_data(
    smiles: str, seed: int, optimize: bool, max_iters: int
) -> tuple[Data, str | None] | str:
    """One SMILES -> ``(Data without name/idx, warning or None)``, or why it failed.

    The string must be read whole: RDKit stops at the first whitespace and takes the rest as
    the molecule's name (``"C CC"`` parses as methane named ``"CC"``), so any whitespace
    (leading and trailing included; CXSMILES extensions too) is refused, as is a string
    RDKit reads with a leftover name."""
    from rdkit import Chem

    space = next((k for k, ch in enumerate(smiles) if ch.isspace()), None)
    if space is not None:
        return (
            f"invalid SMILES {smiles!r}: whitespace {smiles[space]!r} at character {space} "
            f"(RDKit would parse only {smiles[:space]!r} and ignore the rest); give one "
            "molecule per input, without spaces"
        )
    with _rdkit_log() as log:
        mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is None:
        return f"invalid SMILES {smiles!r}: " + ("; ".join(log) or "RDKit could not parse it")
    leftover = mol.GetProp("_Name") if mol.HasProp("_Name") else ""
    if leftover:
        return f"invalid SMILES {smiles!r}: RDKit did not read {leftover!r}"
    try:
        with _rdkit_log():
            Chem.SanitizeMol(mol)
    except Exception as exc:  # RDKit raises several exception types for chemistry errors
        return f"invalid SMILES {smiles!r}: {exc}"
    if mol.GetNumAtoms() == 0:
        return "empty molecule"
    mol = Chem.AddHs(mol)
    with _rdkit_log() as log:
        embedded = _embed(mol, seed)
    if not embedded:
        detail = f" ({'; '.join(log)})" if log else ""
        return "3D embedding failed with ETKDGv3, also from random coordinates" + detail
    force_field, note = "none", None
    if optimize:
        with _rdkit_log():
            force_field, note = _optimize(mol, max_iters)
    pos = mol.GetConformer().GetPositions()
    if not np.isfinite(pos).all():
        return "non-finite coordinates after embedding/optimisation"
    z = [atom.GetAtomicNum() for atom in mol.GetAtoms()]
    data = Data(
        z=torch.tensor(z, dtype=torch.long),
        pos=torch.as_tensor(pos, dtype=torch.float32),
        smiles=smiles,
        force_field=force_field,
    )
    return data, note


def from_smiles(
    smiles_list: str | Iterable[str],
    seed: int = 0,
    optimize: bool = True,
    names: Sequence[str] | None = None,
    strict: bool = False,
    max_iters: int = 1000,
) -> tuple[list[Data], ConversionReport]:
    r"""3D molecules from SMILES: RDKit ETKDGv3 embedding and MMFF94 (UFF fallback) relaxation.

    Hydrogens are added explicitly. A failed embedding is retried from random coordinates;
    a molecule without MMFF94 parameters is optimised with UFF, and one without either keeps
    its ETKDG geometry (both noted in ``report.warnings``). About 10 ms per QM9-sized molecule.

    Args:
        smiles_list: SMILES strings (a single string is one molecule).
        seed: ETKDG random seed, the same for every molecule, so a molecule's geometry does
            not depend on the other inputs.
        optimize: relax the embedded geometry with a force field.
        names: one name per SMILES (default: the SMILES itself).
        strict: raise a :class:`ValueError` listing every failure instead of returning them.
        max_iters: force-field optimisation steps.

    Returns:
        ``(data_list, report)``: one ``Data`` per converted input, in input order, with
        ``z [n]``, ``pos [n, 3]`` (Angstrom), ``smiles``, ``name``, ``idx [1]`` (input
        position) and ``force_field``; ``report.failures`` lists ``(index, smiles, reason)``
        for the rest (unparsable SMILES, chemistry errors, embedding failures). A SMILES
        must be read whole: one with whitespace anywhere (``"C CC"``, ``"CCO name"``, or a
        trailing newline; RDKit would parse only the text before it) or with text RDKit
        leaves unread is a failure, never a truncated molecule.
    """
    if isinstance(smiles_list, str):
        smiles_list = [smiles_list]
    smiles_list = list(smiles_list)
    if names is not None and len(names) != len(smiles_list):
        raise ValueError(f"got {len(names)} names for {len(smiles_list)} SMILES")
    report = ConversionReport(num_inputs=len(smiles_list))
    out = []
    for i, smiles in enumerate(smiles_list):
        if not isinstance(smiles, str):
            report.failures.append(
                ConversionFailure(i, repr(smiles), f"not a string ({type(smiles).__name__})")
            )
            continue
        result = _smiles_to_data(smiles, seed, optimize, max_iters)
        if isinstance(result, str):
            report.failures.append(ConversionFailure(i, smiles, result))
            continue
        result, note = result
        if note is not None:
            report.warnings.append(ConversionFailure(i, smiles, note))
        result.name = smiles if names is None else str(names[i])
        result.idx = torch.tensor([i], dtype=torch.long)
        out.append(result)
    if strict:
        report.raise_if_failed()
    return out, report


# ------------------------------------------------------------------------------------- ASE
def _frame_numbers(index: Any):
    """Map the k-th structure of ``iread(path, index)`` to its frame number in the file."""
    from ase.io.formats import string2index

    if isinstance(index, str):
        index = string2index(index)
    if isinstance(index, int):
        return lambda k: index if index >= 0 else None
    if isinstance(index, slice):
        start, step = index.start or 0, index.step or 1
        if start >= 0 and step > 0:
            return lambda k: start + k * step
    return lambda k: None


def _atoms_problem(atoms) -> str | None:
    """Why an ``ase.Atoms`` cannot become a ``Data``, or ``None``."""
    if len(atoms) == 0:
        return "empty structure (no atoms)"
    numbers = np.asarray(atoms.numbers)
    bad = (numbers < 1) | (numbers > MAX_ATOMIC_NUMBER)
    if bad.any():
        first = int(np.flatnonzero(bad)[0])
        return f"unknown element (atomic number {int(numbers[first])}) at atom {first}"
    return None


def _float32(values: Any, field: str, key: str, what: str = "atom") -> Tensor | str:
    """``values`` as a float32 tensor, or why not: non-finite values, and finite float64
    values beyond float32's range (``|x| > 3.4e38``, which the cast turns into ``inf``), are
    refused naming ``field`` (``Data`` key ``key``) and the first bad row (``what`` index)."""
    array = np.asarray(values, dtype=np.float64)
    tensor = torch.as_tensor(array, dtype=torch.float32)  # out of range -> inf, checked next
    bad = (~torch.isfinite(tensor)).reshape(-1)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])  # first bad element, row-major
        value = float(array.reshape(-1)[first])
        kind = "non-finite" if not np.isfinite(value) else "out of float32 range"
        where = f" at {what} {first // max(array[0].size, 1)}" if array.ndim else ""
        return f"{kind} {field}{where} ({key} = {value!r})"
    return tensor


def _results(atoms) -> dict:
    """Energy and forces from the attached calculator (or ``info``), when present."""
    results = {}
    calc = getattr(atoms, "calc", None)
    if calc is not None and getattr(calc, "results", None):
        results.update({k: calc.results[k] for k in ("energy", "forces") if k in calc.results})
    if "energy" not in results and "energy" in atoms.info:
        results["energy"] = atoms.info["energy"]
    if "forces" not in results and "forces" in atoms.arrays:
        results["forces"] = atoms.arrays["forces"]
    return results


def _atoms_to_data(atoms, name: str, idx: int) -> Data | str:
    problem = _atoms_problem(atoms)
    if problem is not None:
        return problem
    pos = _float32(atoms.positions, "coordinates", "pos")
    if isinstance(pos, str):
        return pos
    cell = _float32(np.asarray(atoms.cell), "cell", "cell", "lattice vector")
    if isinstance(cell, str):
        return cell
    data = Data(
        z=torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long),
        pos=pos,
        cell=cell.reshape(1, 3, 3),
        pbc=torch.as_tensor(np.asarray(atoms.pbc), dtype=torch.bool).reshape(1, 3),
        name=name,
        idx=torch.tensor([idx], dtype=torch.long),
    )
    results = _results(atoms)
    if "energy" in results:
        energy = float(results["energy"])
        # kept in float64 (resolution), but models and losses compute in float32
        problem = _float32(energy, "energy", "energy")
        if isinstance(problem, str):
            return problem
        data.energy = torch.tensor([energy], dtype=torch.float64)
    if "forces" in results:
        forces = np.asarray(results["forces"], dtype=np.float64)
        if forces.shape != (len(atoms), 3):
            return f"forces have shape {forces.shape}, expected ({len(atoms)}, 3)"
        forces = _float32(forces, "forces", "forces")
        if isinstance(forces, str):
            return forces
        data.forces = forces
    return data


def from_ase(
    atoms_or_path: Any,
    index: str | int | slice = ":",
    strict: bool = True,
    format: str | None = None,
) -> tuple[list[Data], ConversionReport]:
    r"""Structures from ``ase.Atoms`` or from any file ASE reads (xyz, extxyz, cif, POSCAR,
    ase .db, ...).

    Args:
        atoms_or_path: an ``ase.Atoms``, a path, or a sequence of them (mixed is fine).
        index: which frames of each file, as for ``ase.io.read`` (default: all).
        strict: raise a :class:`ValueError` naming the file and frame of every structure
            that cannot be used (unknown elements, non-finite coordinates, empty structures,
            unreadable or truncated files, and coordinates, cell, energy or forces that are
            not finite or beyond float32's range, about 3.4e38, naming the field and atom).
            Default ``True``: a corrupt structure file is a
            data error, not an expected outcome as a failed SMILES embedding is. With
            ``False`` the valid structures are returned and the rest listed in the report.
        format: ASE format name, when the file name does not tell it.

    Returns:
        ``(data_list, report)``: ``Data`` with ``z [n]``, ``pos [n, 3]``, ``cell [1, 3, 3]``,
        ``pbc [1, 3]``, ``name`` (``"file:frame"`` or ``atoms.info["name"]``), ``idx [1]``
        (position in the stream of structures), and ``energy [1]`` / ``forces [n, 3]`` where
        the input has them. A failure's ``input`` names the file and frame; a file that
        cannot be read past some frame is one failure at that frame.
    """
    import ase
    import ase.io

    if isinstance(atoms_or_path, (ase.Atoms, str, os.PathLike)):
        inputs = [atoms_or_path]
    else:
        inputs = list(atoms_or_path)
    report = ConversionReport()
    out: list[Data] = []

    def add(item, label: str, name: str) -> None:
        idx = report.num_inputs
        report.num_inputs += 1
        result = _atoms_to_data(item, name, idx)
        if isinstance(result, str):
            report.failures.append(ConversionFailure(idx, label, result))
        else:
            out.append(result)

    for position, item in enumerate(inputs):
        if isinstance(item, ase.Atoms):
            name = str(item.info.get("name", f"atoms{position}"))
            add(item, f"Atoms #{position} ({item.get_chemical_formula()})", name)
            continue
        if not isinstance(item, (str, os.PathLike)):
            report.failures.append(
                ConversionFailure(
                    report.num_inputs,
                    f"input #{position}",
                    f"expected ase.Atoms or a path, got {type(item).__name__}",
                )
            )
            report.num_inputs += 1
            continue
        path = Path(item)
        frame_of = _frame_numbers(index)
        k = 0
        try:
            if not path.is_file():
                raise FileNotFoundError(f"no such file: {path}")
            for atoms in ase.io.iread(str(path), index=index, format=format):
                frame = frame_of(k)
                where = f"frame {frame}" if frame is not None else f"item {k} of index={index!r}"
                add(atoms, f"{path}, {where}", f"{path.name}:{frame if frame is not None else k}")
                k += 1
        except Exception as exc:  # ASE raises many types (KeyError for unknown symbols, ...)
            frame = frame_of(k)
            where = f"frame {frame}" if frame is not None else f"item {k} of index={index!r}"
            if isinstance(exc, KeyError):
                reason = f"unknown element or key {exc}"
            else:
                reason = f"{type(exc).__name__}: {exc}".rstrip(": ")
            if k == 0:
                reason = "ASE could not read the file: " + reason
            else:
                reason = f"ASE could not read {where} or beyond: " + reason
            report.failures.append(ConversionFailure(report.num_inputs, f"{path}, {where}", reason))
            report.num_inputs += 1
    if strict:
        report.raise_if_failed()
    return out, report
