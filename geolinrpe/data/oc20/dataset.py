r"""The :class:`OC20` dataset: detects the format of a path and reads its records.

See the package docstring (:mod:`geolinrpe.data.oc20`) for the formats and item fields.
"""

from __future__ import annotations

import operator
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch.utils.data import Dataset
from torch_geometric.data import Data

from .aselmdb import AseSource
from .extxyz import SUFFIXES, ExtxyzSource, stem
from .legacy_lmdb import LegacySource
from .records import RECIPE, TASKS, OC20FormatError

__all__ = ["OC20"]


def _natural_key(file: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", file.name)]


def _detect(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; see {RECIPE} for how to obtain OC20")
    if not path.is_file() and not path.is_dir():
        raise OC20FormatError(path, None, "is not a regular file or folder (a FIFO or device?)")
    if path.is_file():
        if path.name.endswith(".aselmdb"):
            return "aselmdb", [path]
        if path.name.endswith(SUFFIXES):
            return "extxyz", [path]
        if path.name.endswith(".lmdb"):
            return "lmdb", [path]
        raise ValueError(f"{path}: unknown OC20 file type (expected .lmdb, .aselmdb, .extxyz)")
    found = {
        "lmdb": sorted(path.glob("*.lmdb"), key=_natural_key),
        "aselmdb": sorted(path.glob("*.aselmdb"), key=_natural_key),
        "extxyz": sorted([p for s in SUFFIXES for p in path.glob("*" + s)], key=_natural_key),
    }
    kinds = [kind for kind, files in found.items() if files]
    if not kinds:
        raise FileNotFoundError(
            f"{path}: no .lmdb, .aselmdb or .extxyz files in this folder (see {RECIPE})"
        )
    if len(kinds) > 1:
        raise ValueError(f"{path}: mixes OC20 formats {kinds}; point at one of them")
    files = found[kinds[0]]
    if kinds[0] == "extxyz":
        # After `xz -dk`, k.extxyz sits beside k.extxyz.xz: read the uncompressed copy.
        plain = {stem(f) for f in files if f.name.endswith(".extxyz")}
        files = [f for f in files if f.name.endswith(".extxyz") or stem(f) not in plain]
    return kinds[0], files


class OC20(Dataset):
    r"""The Open Catalyst 2020 dataset (https://arxiv.org/abs/2010.09990) from local files.

    Reads IS2RE (initial structure to relaxed energy) and S2EF (structure to energy and
    forces) records from a legacy LMDB file or folder of shards, ``.aselmdb`` files, or
    S2EF ``.extxyz``/``.txt`` pairs; the format follows from ``path`` (see the module
    docstring and ``datasets/oc20/README.md``). Items are
    :class:`~torch_geometric.data.Data` with ``z``, ``pos``, ``cell``, ``pbc``, ``tags``,
    ``fixed``, ``natoms``, ``sid`` and the task's targets:

    * ``task="is2re"``: ``y_relaxed`` [1] (relaxed adsorption energy, eV), plus ``y_init``
      [1] (adsorption energy of the initial structure, eV) and ``pos_relaxed`` [n, 3]
      (Angstrom) when the file stores them.
    * ``task="s2ef"``: ``y`` [1] (adsorption-referenced energy, eV), ``force`` [n, 3]
      (eV/Angstrom), ``fid`` (frame index) when stored.

    Records are checked when read: non-finite coordinates (also values beyond float32's
    range, which the cast would turn into ``inf``), empty structures, unknown elements,
    non-integer tags and missing fields raise :class:`OC20FormatError` naming the file,
    record and field. Nothing is skipped silently: LMDB keys are checked against
    the record count when a file is opened, and ASE-DB rows listed in ``deleted_ids`` (the
    only records ever skipped) are counted in :attr:`skipped` with a warning.

    Args:
        path: a ``.lmdb`` or ``.aselmdb`` file, an ``.extxyz(.xz)`` file, or a folder holding
            files of one of these formats.
        task: ``"is2re"`` or ``"s2ef"`` (default ``"is2re"``).
        safe: unpickle legacy LMDB records with an allow-list of classes (tensors, numpy
            arrays, PyG ``Data``, builtin containers); a record naming anything else raises
            :class:`UnsafePickleError`. ``safe=False`` uses :mod:`pickle` as is, which runs
            whatever code the file names: only for files you trust. (default ``True``)
        transform: a callable applied to each item. (default ``None``)
        require_targets: raise when a record lacks the task's targets; ``False`` reads
            test splits, whose records carry no targets. (default ``True``)

    Attributes:
        format: ``"lmdb"``, ``"aselmdb"`` or ``"extxyz"``.
        files: the files read, in index order.
        skipped: counts of records skipped on purpose, by reason (``{}`` when none).

    Shapes:
        item: ``z`` [n], ``pos`` [n, 3], ``cell`` [1, 3, 3], ``pbc`` [1, 3], ``tags`` [n],
        ``fixed`` [n], ``y_relaxed``/``y_init``/``y`` [1], ``pos_relaxed``/``force`` [n, 3].
    """

    def __init__(
        self,
        path: str | os.PathLike,
        task: str = "is2re",
        safe: bool = True,
        transform: Callable[[Data], Any] | None = None,
        *,
        require_targets: bool = True,
    ):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        self.path, self.task, self.safe = Path(path), task, safe
        self.transform, self.require_targets = transform, require_targets
        self.format, self.files = _detect(self.path)
        if self.format == "lmdb":
            self._source: Any = LegacySource(self.files, safe)
        elif self.format == "aselmdb":
            self._source = AseSource(self.files)
        else:
            if task != "s2ef":
                raise ValueError(f"{self.path}: extxyz files hold S2EF frames; use task='s2ef'")
            self._source = ExtxyzSource(self.files)
        self.skipped: dict[str, int] = dict(self._source.skipped)
        if len(self._source) == 0:
            raise OC20FormatError(self.path, None, "holds no records")

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> Any:
        n = len(self)
        try:
            index = operator.index(index)
        except TypeError:
            raise TypeError(f"OC20 indices are integers, got {type(index).__name__}") from None
        if not -n <= index < n:
            raise IndexError(f"index {index} out of range for {n} records")
        item = self._source.read(index % n, self.task, self.require_targets)
        return item if self.transform is None else self.transform(item)

    def __repr__(self) -> str:
        return f"OC20({len(self)}, task={self.task!r}, format={self.format!r}, path='{self.path}')"
