r"""The raw S2EF release: ``<k>.extxyz`` (or ``.extxyz.xz``) frames beside ``<k>.txt`` lines.

Each frame is an extended-XYZ block (count line, comment line with the lattice, energy and
``Properties``, one line per atom with positions, forces, tags and the fixed flag); each
``.txt`` line is ``random<sid>,frame<fid>,<reference energy>`` for the frame of the same
index, and the reference is subtracted from the frame's total energy. Frames are located by
a byte scan when the file is opened and parsed with ASE when read. An ``.xz`` file is
decompressed in memory up to :func:`xz_limit` of its size (decompress larger ones with
``xz -dk``; the plain file beside it is then read instead).
"""

from __future__ import annotations

import bisect
import io
import lzma
import math
import os
import stat
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from torch_geometric.data import Data

from .records import (
    RECIPE,
    OC20FormatError,
    as_int_id,
    fixed_from_constraints,
    make_item,
    scalar,
)

__all__ = ["SUFFIXES", "ExtxyzSource", "stem", "xz_limit"]

SUFFIXES = (".extxyz.xz", ".extxyz")


def xz_limit(nbytes: int) -> int:
    """Bytes an ``.xz`` file of ``nbytes`` may expand to (extxyz text compresses 4-6x)."""
    return (16 << 20) + 10 * nbytes


def stem(file: Path, suffixes: Sequence[str] = SUFFIXES) -> str:
    for suffix in suffixes:
        if file.name.endswith(suffix):
            return file.name[: -len(suffix)]
    return file.name


def read_bytes(file: Path) -> bytes:
    """A whole file (``.xz`` decompressed within :func:`xz_limit`); errors name it."""
    try:
        mode = os.stat(file).st_mode
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: file not found (see {RECIPE})") from None
    if not stat.S_ISREG(mode):
        raise OC20FormatError(file, None, "is not a regular file (a FIFO, device or folder)")
    if not file.name.endswith(".xz"):
        return file.read_bytes()
    compressed = file.read_bytes()
    limit = xz_limit(len(compressed))
    chunks, total, rest = [], 0, compressed
    while rest.strip(b"\0"):  # concatenated streams, then optional null padding
        inflater = lzma.LZMADecompressor()
        try:
            chunks.append(inflater.decompress(rest, limit + 1 - total))
        except lzma.LZMAError as err:
            raise OC20FormatError(file, None, f"corrupt xz stream ({err})") from None
        total += len(chunks[-1])
        if total > limit:
            raise OC20FormatError(
                file,
                None,
                f"expands past {limit:,} bytes from {len(compressed):,} compressed; decompress "
                "it with 'xz -dk' (the plain .extxyz beside it is read instead)",
            )
        if not inflater.eof:
            raise OC20FormatError(file, None, "corrupt xz stream (truncated)")
        rest = inflater.unused_data
    return b"".join(chunks)


def _scan_frames(blob: bytes, file: Path) -> list[tuple[int, int]]:
    """Byte ranges of the frames of an extxyz file: a count line, a comment line, n atoms."""
    frames, pos, end = [], 0, len(blob)
    while pos < end:
        stop = blob.find(b"\n", pos)
        stop = end if stop < 0 else stop
        line = blob[pos:stop]
        if not line.strip():
            pos = stop + 1
            continue
        record = f"frame {len(frames)}"
        try:
            count = int(line)
        except ValueError:
            raise OC20FormatError(
                file, record, f"expected an atom count at byte {pos}, found {line[:40]!r}"
            ) from None
        if count < 0:
            raise OC20FormatError(file, record, f"negative atom count {count}")
        start, cursor = pos, stop + 1
        for line_no in range(count + 1):
            if cursor >= end:
                raise OC20FormatError(
                    file, record, f"truncated: {count} atoms announced, file ends at line {line_no}"
                )
            stop = blob.find(b"\n", cursor)
            cursor = end if stop < 0 else stop + 1
        frames.append((start, cursor))
        pos = cursor
    return frames


def _parse_txt(blob: bytes, file: Path) -> list[tuple[int, int, float]]:
    """``random<sid>,frame<fid>,<reference energy>`` lines of a S2EF ``.txt`` file."""
    rows = []
    for line_no, line in enumerate(blob.decode("ascii", "replace").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.strip().split(",")
        record = f"line {line_no}"
        if len(parts) != 3:
            raise OC20FormatError(
                file, record, f"expected 'random<sid>,frame<fid>,<energy>': {line[:80]!r}"
            )
        sid = as_int_id(parts[0], "random", file, record, "sid")
        fid = as_int_id(parts[1], "frame", file, record, "fid")
        try:
            ref = float(parts[2])
        except ValueError:
            ref = math.nan
        if not math.isfinite(ref):
            raise OC20FormatError(file, record, f"reference energy {parts[2]!r} is not finite")
        rows.append((sid, fid, ref))
    return rows


class ExtxyzSource:
    """Frames of S2EF extxyz files, indexed across the files in order."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.frames: list[list[tuple[int, int]]] = []
        self.refs: list[list[tuple[int, int, float]]] = []
        self.skipped: dict[str, int] = {}
        self._cache: tuple[int, bytes] | None = None
        for file in files:
            name = stem(file)
            txts = [file.with_name(name + s) for s in (".txt", ".txt.xz")]
            txt = next((t for t in txts if t.exists()), None)
            if txt is None:
                raise FileNotFoundError(
                    f"{file}: no {txts[0].name} beside it (S2EF frames need the "
                    f"'random<sid>,frame<fid>,<reference energy>' lines; see {RECIPE})"
                )
            frames = _scan_frames(read_bytes(file), file)
            refs = _parse_txt(read_bytes(txt), txt)
            if len(frames) != len(refs):
                raise OC20FormatError(
                    file, None, f"{len(frames)} frames but {len(refs)} lines in {txt.name}"
                )
            self.frames.append(frames)
            self.refs.append(refs)
        self.offsets = np.cumsum([0] + [len(f) for f in self.frames]).tolist()

    def __len__(self) -> int:
        return self.offsets[-1]

    def _frame_text(self, k: int, j: int) -> str:
        start, stop = self.frames[k][j]
        file = self.files[k]
        if file.name.endswith(".xz"):
            # xz has no random access: keep the last decompressed file (decompress for training).
            if self._cache is None or self._cache[0] != k:
                self._cache = (k, read_bytes(file))
            return self._cache[1][start:stop].decode("utf-8", "replace")
        with open(file, "rb") as fh:
            fh.seek(start)
            return fh.read(stop - start).decode("utf-8", "replace")

    def read(self, index: int, task: str, require_targets: bool) -> Data:
        import ase.io

        k = bisect.bisect_right(self.offsets, index) - 1
        j, file = index - self.offsets[k], self.files[k]
        record = f"frame {j}"
        try:
            atoms = ase.io.read(io.StringIO(self._frame_text(k, j)), index=0, format="extxyz")
        except Exception as err:
            raise OC20FormatError(
                file, record, f"not a readable extxyz frame ({type(err).__name__}: {err})"
            ) from err
        sid, fid, ref = self.refs[k][j]
        results: dict[str, Any] = atoms.calc.results if atoms.calc is not None else {}
        energy = results.get("energy", atoms.info.get("energy"))
        canonical = {
            "z": atoms.numbers,
            "pos": atoms.positions,
            "cell": atoms.cell.array,
            "pbc": atoms.pbc,
            "tags": atoms.get_tags(),
            "fixed": fixed_from_constraints(atoms.constraints, len(atoms), file, record),
            "sid": sid,
            "fid": fid,
            "y": None if energy is None else scalar(energy, file, record, "energy") - ref,
            "force": results.get("forces", atoms.arrays.get("forces")),
        }
        return make_item(canonical, task, require_targets, file, record)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}
