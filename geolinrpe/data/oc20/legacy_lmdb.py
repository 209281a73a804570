r"""Legacy OC20 LMDB files (the IS2RE/S2EF releases): pickled PyG ``Data`` per key.

One ``data.lmdb`` file (IS2RE) or a folder of ``data.NNNN.lmdb`` shards (S2EF); keys
``"0".."n-1"`` and an optional pickled ``length``; values pickled
:class:`~torch_geometric.data.Data` (also pickles from PyG 1.x, whose attributes sit in
``__dict__``). Values are unpickled by :func:`~.safe_pickle.unpickle` (allow-list and memory
budget unless ``safe=False``); files are read by :class:`~.lmdb_file.LMDBFile` (no memory
map). Keys are checked against the record count when a file is opened, without building a
list of the count a damaged ``length`` announces.
"""

from __future__ import annotations

import bisect
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch_geometric.data import Data

from .lmdb_file import LMDBShards
from .records import OC20FormatError, first, make_item
from .safe_pickle import unpickle

__all__ = ["LegacySource"]


def _record_fields(obj: Any, file: Path, record: str) -> dict[str, Any]:
    if isinstance(obj, Data):
        if "_store" in obj.__dict__:
            return obj.to_dict()
        # A PyG 1.x pickle: attributes sit in __dict__ and every access raises under PyG 2.x.
        return {k: v for k, v in obj.__dict__.items() if v is not None and not k.startswith("_")}
    if isinstance(obj, dict):
        return dict(obj)
    raise OC20FormatError(file, record, f"value is a {type(obj).__name__}, not a PyG Data")


class LegacySource(LMDBShards):
    """Records of legacy LMDB files, indexed across the files in order."""

    def __init__(self, files: list[Path], safe: bool):
        super().__init__(files)
        self.safe = safe
        self.skipped: dict[str, int] = {}
        self.offsets = np.cumsum([0] + [self._length(k) for k in range(len(files))]).tolist()

    def _length(self, k: int) -> int:
        file, entries = self.files[k], self.reader(k).entries
        raw = self.get(k, "length")
        if raw is None:
            n, stored = entries, 0
        else:
            n, stored = unpickle(raw, self.safe, file, "length"), 1
            if isinstance(n, torch.Tensor) and n.numel() == 1:
                n = n.item()
            if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 0:
                raise OC20FormatError(file, "length", f"length is {n!r}, not a count")
            n = int(n)
        if entries != n + stored or (
            n > 0 and (self.get(k, "0") is None or self.get(k, str(n - 1)) is None)
        ):
            source = "its 'length' key" if stored else "its entry count"
            census = self.census(k, 0, n, frozenset(), ("length",))
            raise OC20FormatError(
                file,
                None,
                f"expected keys '0'..'{n - 1}' ({n} records, from {source}; the file holds "
                f"{entries} keys): {census}",
            )
        return n

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, index: int, task: str, require_targets: bool) -> Data:
        k = bisect.bisect_right(self.offsets, index) - 1
        key, file = str(index - self.offsets[k]), self.files[k]
        raw = self.get(k, key)
        if raw is None:
            raise OC20FormatError(file, key, "key missing from the LMDB")
        obj = unpickle(raw, self.safe, file, key)
        try:
            fields = _record_fields(obj, file, key)
        except OC20FormatError:
            raise
        except Exception as err:  # a Data whose pickled state is not PyG's
            problem = f"unreadable Data ({type(err).__name__}: {err})"
            raise OC20FormatError(file, key, problem) from err
        canonical = {
            "z": first(fields, "atomic_numbers", "z"),
            "pos": fields.get("pos"),
            "cell": fields.get("cell"),
            "pbc": fields.get("pbc"),
            "tags": fields.get("tags"),
            "fixed": fields.get("fixed"),
            "natoms": fields.get("natoms"),
            "sid": fields.get("sid"),
            "y_relaxed": fields.get("y_relaxed"),
            "y_init": fields.get("y_init"),
            "pos_relaxed": fields.get("pos_relaxed"),
            "y": first(fields, "y", "energy"),
            "force": first(fields, "force", "forces"),
            "fid": fields.get("fid"),
        }
        return make_item(canonical, task, require_targets, file, key)
