r"""ASE-DB LMDB files (``.aselmdb``, current fairchem): zlib-compressed ASE JSON rows.

Keys are row ids from 1 plus ``nextid``, ``deleted_ids`` and ``metadata``; values are
``zlib``-compressed JSON rows (ASE's ``__ndarray__`` encoding or plain lists) with
``numbers``, ``positions``, ``cell``, ``pbc``, ``tags``, ``constraints``, ``energy``,
``forces`` and ``data``. Readable with this module alone (no ase, no lmdb): files are read
by :class:`~.lmdb_file.LMDBFile`, and a value may decompress to at most
:func:`text_limit` bytes of its compressed size (a zlib bomb is refused, naming the row).
Rows listed in ``deleted_ids`` are the only records skipped; they are counted, not hidden.
"""

from __future__ import annotations

import bisect
import json
import warnings
import zlib
from pathlib import Path
from typing import Any

import numpy as np
from torch_geometric.data import Data

from .lmdb_file import LMDBShards
from .records import OC20FormatError, describe, fixed_from_constraints, make_item, scalar

__all__ = ["AseSource", "text_limit"]

RESERVED = ("nextid", "deleted_ids", "metadata")
_NUMERIC_KINDS = "biufc"


def text_limit(nbytes: int) -> int:
    """Bytes a compressed row of ``nbytes`` may expand to (JSON compresses about 2.5x)."""
    return (8 << 20) + 3 * nbytes


def _ndarray_hook(dct: dict[str, Any]) -> Any:
    if "__ndarray__" in dct:
        shape, dtype, flat = dct["__ndarray__"]
        if np.dtype(dtype).kind not in _NUMERIC_KINDS:
            raise ValueError(f"refusing ndarray of dtype {dtype}")
        return np.asarray(flat, dtype=dtype).reshape(shape)
    return dct


def decode_row(raw: bytes, file: Path, record: str) -> Any:
    """A compressed ASE JSON value, decompressed within :func:`text_limit`."""
    limit = text_limit(len(raw))
    inflater = zlib.decompressobj()
    try:
        text = inflater.decompress(raw, limit + 1)
    except zlib.error as err:
        raise OC20FormatError(file, record, f"not a zlib-compressed value ({err})") from None
    if len(text) > limit or inflater.unconsumed_tail:
        raise OC20FormatError(
            file,
            record,
            f"value expands past {limit:,} bytes from {len(raw):,} compressed "
            "(a decompression bomb or a corrupt stream)",
        )
    if not inflater.eof:
        raise OC20FormatError(file, record, "not a zlib-compressed value (truncated stream)")
    try:
        return json.loads(text, object_hook=_ndarray_hook)
    except (ValueError, TypeError, RecursionError) as err:
        problem = f"not a zlib-compressed ASE JSON value ({type(err).__name__}: {err})"
        raise OC20FormatError(file, record, problem) from None


def _row_id(value: Any, file: Path, record: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise OC20FormatError(file, record, f"{describe(value)} is not a row id")
    return value


class AseSource(LMDBShards):
    """Rows of ``.aselmdb`` files, indexed across the files in order (deleted rows skipped)."""

    def __init__(self, files: list[Path]):
        super().__init__(files)
        self.ids: list[np.ndarray] = []
        deleted = 0
        for k in range(len(files)):
            ids, gone = self._ids(k)
            self.ids.append(ids)
            deleted += gone
        self.offsets = np.cumsum([0] + [len(ids) for ids in self.ids]).tolist()
        self.skipped = {"deleted_ids": deleted} if deleted else {}
        if deleted:
            warnings.warn(
                f"{len(files)} ASE-DB file(s) under {files[0].parent}: skipped {deleted} deleted "
                "row id(s) listed in 'deleted_ids' (counted in OC20.skipped)",
                stacklevel=3,
            )

    def _ids(self, k: int) -> tuple[np.ndarray, int]:
        file = self.files[k]
        meta = {}
        for name in RESERVED:
            raw = self.get(k, name)
            if raw is not None:
                meta[name] = decode_row(raw, file, name)
        entries = self.reader(k).entries
        if "nextid" not in meta:
            if entries == len(meta):
                return np.zeros(0, dtype=np.int64), 0
            raise OC20FormatError(file, None, "ASE-DB LMDB without a 'nextid' key")
        nextid = meta["nextid"]
        if isinstance(nextid, bool) or not isinstance(nextid, int) or nextid < 1:
            raise OC20FormatError(file, "nextid", f"nextid is {describe(nextid)}, not a row id")
        deleted = meta.get("deleted_ids") or []
        if not isinstance(deleted, list):
            raise OC20FormatError(
                file, "deleted_ids", f"deleted_ids is a {type(deleted).__name__}, not a list"
            )
        gone = frozenset(_row_id(i, file, "deleted_ids") for i in deleted)
        count = nextid - 1 - sum(1 for i in gone if 1 <= i < nextid)
        ids = None
        if count == entries - len(meta):  # only now is nextid known to be of the file's size
            ids = np.arange(1, nextid, dtype=np.int64)
            ids = ids[~np.isin(ids, np.fromiter(gone, dtype=np.int64, count=len(gone)))]
        if ids is None or (
            len(ids) and (self.get(k, str(ids[0])) is None or self.get(k, str(ids[-1])) is None)
        ):
            census = self.census(k, 1, nextid, gone, RESERVED)
            raise OC20FormatError(
                file,
                None,
                f"expected row ids 1..{nextid - 1} less {len(gone)} deleted "
                f"(the file holds {entries - len(meta)} rows): {census}",
            )
        return ids, nextid - 1 - len(ids)

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, index: int, task: str, require_targets: bool) -> Data:
        k = bisect.bisect_right(self.offsets, index) - 1
        row_id = int(self.ids[k][index - self.offsets[k]])
        key, file = str(row_id), self.files[k]
        raw = self.get(k, key)
        if raw is None:
            raise OC20FormatError(file, key, "row id missing from the LMDB")
        row = decode_row(raw, file, key)
        if not isinstance(row, dict):
            raise OC20FormatError(file, key, f"row is a {type(row).__name__}, not an object")
        data, pairs = row.get("data") or {}, row.get("key_value_pairs") or {}
        for name, value in (("data", data), ("key_value_pairs", pairs)):
            if not isinstance(value, dict):
                raise OC20FormatError(
                    file, key, f"{name} is a {type(value).__name__}, not an object"
                )

        def lookup(name: str) -> Any:
            return data[name] if data.get(name) is not None else pairs.get(name)

        numbers = row.get("numbers")
        n = int(np.size(numbers)) if isinstance(numbers, list | np.ndarray) else 0
        cell = row.get("cell")
        if isinstance(cell, dict):  # an encoded ase.cell.Cell
            cell = cell.get("array")
        tags = row.get("tags")
        energy, ref = row.get("energy"), lookup("ref_energy")
        y = energy
        if energy is not None and ref is not None:
            y = scalar(energy, file, key, "energy") - scalar(ref, file, key, "ref_energy")
        canonical = {
            "z": numbers,
            "pos": row.get("positions"),
            "cell": cell,
            "pbc": row.get("pbc"),
            # ASE stores tags only when some are non-zero.
            "tags": np.zeros(n, dtype=np.int64) if tags is None else tags,
            "fixed": fixed_from_constraints(row.get("constraints"), n, file, key),
            "sid": row_id if lookup("sid") is None else lookup("sid"),
            "y_relaxed": lookup("y_relaxed"),
            "y_init": lookup("y_init"),
            "pos_relaxed": lookup("pos_relaxed"),
            "y": y,
            "force": row.get("forces"),
            "fid": lookup("fid"),
        }
        return make_item(canonical, task, require_targets, file, key)
