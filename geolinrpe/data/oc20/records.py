r"""One OC20 record, whatever its format: checks and normalisation to the item fields.

Every format reader (:mod:`.legacy_lmdb`, :mod:`.aselmdb`, :mod:`.extxyz`) gathers a record's
fields under canonical names and calls :func:`make_item`, which checks shapes, element
numbers, tags and finiteness and returns the :class:`~torch_geometric.data.Data` item. Every
error is an :class:`OC20FormatError` naming the file, the record and the field.

Memory: a record may allocate at most :func:`record_budget` bytes of its byte size while it
is decoded (pickled tensors, decompressed JSON, declared counts), so no file can take memory
out of proportion to its size.
"""

from __future__ import annotations

import math
import os
import re
import reprlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

__all__ = ["MAX_Z", "RECIPE", "TASKS", "OC20FormatError", "make_item", "record_budget"]

TASKS = ("is2re", "s2ef")
MAX_Z = 118
RECIPE = "datasets/oc20/README.md"
#: bytes any record may allocate while it is decoded, beyond ``BUDGET_FACTOR`` x its size
BUDGET_BASE = 24 << 20
BUDGET_FACTOR = 4
FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def record_budget(nbytes: int) -> int:
    """Bytes a record of ``nbytes`` bytes on disk may allocate while it is decoded."""
    return BUDGET_BASE + BUDGET_FACTOR * nbytes


class OC20FormatError(ValueError):
    """A file or record that is not valid OC20 data; the message names the file and record."""

    def __init__(self, file: str | os.PathLike, record: str | None, problem: str):
        self.file, self.record, self.problem = str(file), record, problem
        where = self.file if record is None else f"{self.file}, record {record}"
        super().__init__(f"{where}: {problem}")


_SHORT = reprlib.Repr()
_SHORT.maxlevel, _SHORT.maxstring, _SHORT.maxother = 3, 60, 60


def describe(value: Any) -> str:
    """A short ``repr`` for error messages (bounded length and nesting)."""
    if isinstance(value, torch.Tensor | np.ndarray):
        return f"{type(value).__name__} of shape {tuple(value.shape)}"
    return _SHORT.repr(value)


def as_int_id(value: Any, prefix: str, file: Path, record: str, name: str) -> int:
    if isinstance(value, torch.Tensor | np.ndarray):
        if math.prod(value.shape) != 1:
            raise OC20FormatError(file, record, f"{name} is not a single id")
        value = value.reshape(-1)[0].item()
    if isinstance(value, str):
        match = re.fullmatch(rf"(?:{prefix})?(\d+)", value.strip())
        if match is None:
            raise OC20FormatError(file, record, f"{name} {describe(value)} is not '{prefix}<int>'")
        return int(match.group(1))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    raise OC20FormatError(file, record, f"{name} {describe(value)} is not an integer id")


def scalar(value: Any, file: Path, record: str, name: str) -> float:
    """A finite float64 scalar."""
    try:
        array = np.asarray(value.detach() if isinstance(value, torch.Tensor) else value)
        number = float(array.reshape(-1)[0]) if array.size == 1 else math.nan
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number):
        raise OC20FormatError(file, record, f"{name} is {describe(value)}, not a finite energy")
    return number


def energy(value: Any, file: Path, record: str, name: str) -> torch.Tensor:
    """A finite scalar as a float32 [1] tensor; values beyond float32's range are refused."""
    number = scalar(value, file, record, name)
    if abs(number) > FLOAT32_MAX:
        raise OC20FormatError(
            file, record, f"{name} is {describe(value)}, beyond float32's range (|x| > 3.4e38)"
        )
    return torch.tensor([number], dtype=torch.float32)


def array(value: Any, dtype: torch.dtype, shape: tuple[int, ...], file, record, name):
    """``value`` as a contiguous ``dtype`` tensor of ``shape``; floats finite after the cast."""
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError, OverflowError) as err:
        raise OC20FormatError(file, record, f"{name} is not an array ({err})") from err
    if tensor.numel() != math.prod(shape):
        raise OC20FormatError(
            file, record, f"{name} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    out = tensor.reshape(shape).to(dtype).contiguous()
    if out.is_floating_point():
        finite = torch.isfinite(out)
        if not finite.all():
            rows = torch.nonzero(~finite.reshape(shape[0], -1).all(1)).flatten().tolist()
            beyond = bool(torch.isfinite(tensor.double()).all())
            what = f"values beyond {dtype}'s range" if beyond else "non-finite values"
            raise OC20FormatError(file, record, f"{what} in {name} (rows {rows[:8]})")
    return out


def first(fields: dict[str, Any], *names: str) -> Any:
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    return None


def fixed_from_constraints(constraints: Any, n: int, file: Path, record: str) -> np.ndarray:
    """The FixAtoms mask [n] of ASE constraints (objects or their ``todict()`` form)."""
    fixed = np.zeros(n, dtype=bool)
    if constraints is None:
        return fixed
    if not isinstance(constraints, list | tuple):
        raise OC20FormatError(
            file, record, f"constraints is a {type(constraints).__name__}, not a list"
        )
    for constraint in constraints:
        if hasattr(constraint, "todict"):  # ase.constraints objects (extxyz)
            constraint = constraint.todict()
        name = constraint.get("name") if isinstance(constraint, dict) else None
        if name != "FixAtoms":
            raise OC20FormatError(
                file,
                record,
                f"unsupported constraint {name or describe(constraint)} (OC20 uses FixAtoms)",
            )
        kwargs = constraint.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise OC20FormatError(file, record, "FixAtoms kwargs is not an object")
        try:
            if kwargs.get("indices") is not None:
                index = np.asarray(kwargs["indices"], dtype=np.int64).reshape(-1)
            else:
                mask = np.asarray(kwargs.get("mask", []), dtype=bool).reshape(-1)
                if mask.size not in (0, n):
                    raise ValueError(f"mask of {mask.size} entries for {n} atoms")
                index = np.flatnonzero(mask)
        except (TypeError, ValueError, OverflowError) as err:
            raise OC20FormatError(file, record, f"FixAtoms is not an index list ({err})") from err
        if index.size and (index.min() < 0 or index.max() >= n):
            raise OC20FormatError(file, record, f"FixAtoms index out of range for {n} atoms")
        fixed[index] = True
    return fixed


def make_item(
    raw: dict[str, Any], task: str, require_targets: bool, file: Path, record: str
) -> Data:
    """Checks one record's canonical fields and returns the normalised ``Data``."""
    for name in ("z", "pos", "cell"):
        if raw.get(name) is None:
            label = {"z": "atomic numbers"}.get(name, name)
            raise OC20FormatError(file, record, f"record has no {label}")
    try:
        shape = tuple(np.shape(raw["pos"]))
    except ValueError:  # a ragged or too deeply nested list
        shape = ()
    if len(shape) != 2 or shape[1] != 3:
        raise OC20FormatError(file, record, f"pos has shape {shape}, not [n, 3]")
    n = shape[0]
    if n == 0:
        raise OC20FormatError(file, record, "empty structure (0 atoms)")
    pos = array(raw["pos"], torch.float32, (n, 3), file, record, "pos")

    z_raw = array(raw["z"], torch.float64, (n,), file, record, "atomic numbers")
    unknown = (z_raw < 1) | (z_raw > MAX_Z) | (z_raw != z_raw.round())
    if unknown.any():
        values = sorted({float(v) for v in z_raw[unknown].tolist()})
        raise OC20FormatError(file, record, f"unknown element(s): atomic numbers {values[:8]}")
    z = z_raw.long()

    cell = array(raw["cell"], torch.float32, (1, 3, 3), file, record, "cell")
    pbc_raw = raw.get("pbc")
    pbc = (
        torch.ones(1, 3, dtype=torch.bool)
        if pbc_raw is None
        else array(pbc_raw, torch.bool, (1, 3), file, record, "pbc")
    )
    tags_raw = raw.get("tags")
    if tags_raw is None:
        raise OC20FormatError(file, record, "record has no tags")
    tags = array(tags_raw, torch.float64, (n,), file, record, "tags")
    bad = (tags != tags.round()) | (tags.abs() >= 2**31)
    if bad.any():
        values = sorted({float(v) for v in tags[bad].tolist()})
        raise OC20FormatError(file, record, f"tags must be 32-bit integers, found {values[:8]}")
    tags = tags.long()
    fixed_raw = raw.get("fixed")
    fixed = (
        torch.zeros(n, dtype=torch.bool)
        if fixed_raw is None
        else array(fixed_raw, torch.float64, (n,), file, record, "fixed") != 0
    )
    if raw.get("natoms") is not None:
        natoms = as_int_id(raw["natoms"], "", file, record, "natoms")
        if natoms != n:
            raise OC20FormatError(file, record, f"natoms is {natoms} but pos holds {n} atoms")
    if raw.get("sid") is None:
        raise OC20FormatError(file, record, "record has no sid")
    sid = as_int_id(raw["sid"], "random", file, record, "sid")

    item = Data(z=z, pos=pos, cell=cell, pbc=pbc, tags=tags, fixed=fixed, natoms=n, sid=sid)
    if task == "is2re":
        if raw.get("y_relaxed") is not None:
            item.y_relaxed = energy(raw["y_relaxed"], file, record, "y_relaxed")
        elif require_targets:
            hint = " (an S2EF record? use task='s2ef')" if raw.get("y") is not None else ""
            raise OC20FormatError(file, record, f"record has no y_relaxed{hint}")
        if raw.get("y_init") is not None:
            item.y_init = energy(raw["y_init"], file, record, "y_init")
        if raw.get("pos_relaxed") is not None:
            item.pos_relaxed = array(
                raw["pos_relaxed"], torch.float32, (n, 3), file, record, "pos_relaxed"
            )
    else:
        for name in ("y", "force"):
            if raw.get(name) is not None:
                continue
            if require_targets:
                is2re = raw.get("y_relaxed") is not None
                hint = " (an IS2RE record? use task='is2re')" if is2re else ""
                raise OC20FormatError(file, record, f"record has no {name}{hint}")
        if raw.get("y") is not None:
            item.y = energy(raw["y"], file, record, "y")
        if raw.get("force") is not None:
            item.force = array(raw["force"], torch.float32, (n, 3), file, record, "force")
        if raw.get("fid") is not None:
            item.fid = as_int_id(raw["fid"], "frame", file, record, "fid")
    return item
