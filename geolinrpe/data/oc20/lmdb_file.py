r"""Read-only LMDB files in pure Python: pages read with ``pread``, never memory-mapped.

OC20's legacy ``.lmdb`` and fairchem's ``.aselmdb`` files are LMDB databases. py-lmdb maps
the file into memory, and LMDB trusts what it finds there: one flipped byte in a page header
makes it follow a page number past the end of the file, and the process dies with SIGBUS
(12 of 1,138 single-byte corruptions of a small file did). :class:`LMDBFile` reads the same
files without a memory map and checks everything it follows:

* at open: the two meta pages (magic, version, page size, last page, the main tree's root,
  depth, entry count and flags), and that the pages they claim fit in the file;
* on every page read: the page number against the file's pages, the page header's own page
  number and type, ``lower``/``upper`` and every node offset against the page, keys sorted;
* on every walk: depth bounded by the stored depth (so cycles end), leaves at that depth,
  each page visited once when iterating, the leaf entries adding up to the stored count;
* overflow values: the pages they span inside the file, their header's page number and type.

A violation raises :class:`~.records.OC20FormatError` naming the file (and the key looked up),
so a damaged file is an error, never a dead process. Reading costs one ``pread`` per page
(branch and leaf pages are cached, 512 at most) plus one for an overflow value.

Format (LMDB 0.9, 64-bit little-endian, as py-lmdb, fairchem and ASE's LMDB backend write):
a page starts with ``pgno u64, pad u16, flags u16, lower u16, upper u16`` (16 bytes; an
overflow page has ``pages u32`` in place of lower/upper); pages 0 and 1 are meta pages (the
one with the larger transaction id is current); a node is ``lo u16, hi u16, flags u16, ksize
u16``, its key, then its data: a branch node's child page is ``lo | hi << 16 | flags << 32``,
a leaf node's data size ``lo | hi << 16`` and its data inline or, with ``F_BIGDATA``, on the
overflow pages whose number follows the key. Only plain databases are read (no duplicate
keys or sub-databases), which is what OC20's files are.
"""

from __future__ import annotations

import bisect
import os
import stat
import struct
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from .records import OC20FormatError

__all__ = ["LMDBFile", "LMDBShards"]

PAGEHDRSZ = 16
NODESIZE = 8
P_BRANCH, P_LEAF, P_OVERFLOW, P_META, P_LEAF2, P_SUBP = 0x01, 0x02, 0x04, 0x08, 0x20, 0x40
_TYPE_BITS = P_BRANCH | P_LEAF | P_OVERFLOW | P_META | P_LEAF2 | P_SUBP
F_BIGDATA, F_SUBDATA, F_DUPDATA = 0x01, 0x02, 0x04
MAGIC, DATA_VERSION = 0xBEEFC0DE, 1
P_INVALID = (1 << 64) - 1
MAX_DEPTH = 32
CACHED_PAGES = 512
# meta page: magic u32, version u32, address u64, mapsize u64, then two MDB_db records
# (pad u32, flags u16, depth u16, branch/leaf/overflow pages u64 x 3, entries u64, root u64),
# last page u64, transaction id u64.
_META = struct.Struct("<IIQQ" + "IHHQQQQQ" * 2 + "QQ")


class _Page:
    """A parsed branch or leaf page: sorted keys and, per key, a child page or a value."""

    __slots__ = ("leaf", "keys", "values")

    def __init__(self, leaf: bool, keys: list[bytes], values: list[Any]):
        self.leaf, self.keys, self.values = leaf, keys, values


class LMDBFile:
    """One LMDB data file (``subdir=False`` layout), read-only, checked as it is read.

    Args:
        path: the data file (``data.lmdb``, ``*.aselmdb``); the ``-lock`` file is not used.

    Attributes:
        entries: the number of keys the main tree holds (from its meta page).
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._pages: OrderedDict[int, _Page] = OrderedDict()
        self._open()

    # ----------------------------------------------------------------------------- opening
    def _error(self, problem: str, key: str | None = None) -> OC20FormatError:
        return OC20FormatError(self.path, key, f"damaged LMDB file: {problem}")

    def _open(self) -> None:
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise FileNotFoundError(f"{self.path}: LMDB file not found") from None
        except OSError as err:
            raise OC20FormatError(self.path, None, f"cannot open ({err.strerror})") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or special file"
                raise OC20FormatError(self.path, None, f"is {kind}, not a regular LMDB file")
            self._fd, self.size, self._stamp = fd, st.st_size, (st.st_size, st.st_mtime_ns)
            self._read_meta()
        except BaseException:
            os.close(fd)
            self._fd = None
            raise

    def _read_meta(self) -> None:
        if self.size < 2 * 512:
            raise OC20FormatError(
                self.path, None, f"not an LMDB file ({self.size} bytes, shorter than two pages)"
            )
        head = os.pread(self._fd, PAGEHDRSZ + _META.size, 0)
        psize = _META.unpack_from(head, PAGEHDRSZ)[4]  # the free DB's pad holds the page size
        if psize < 512 or psize > 65536 or psize & (psize - 1):
            raise OC20FormatError(
                self.path, None, f"not an LMDB file (page size {psize} in meta page 0)"
            )
        metas = []
        for pgno in (0, 1):
            raw = os.pread(self._fd, PAGEHDRSZ + _META.size, pgno * psize)
            if len(raw) < PAGEHDRSZ + _META.size:
                continue
            flags = struct.unpack_from("<H", raw, 10)[0]
            fields = _META.unpack_from(raw, PAGEHDRSZ)
            if flags & P_META and fields[0] == MAGIC and fields[1] == DATA_VERSION:
                metas.append(fields)
        if not metas:
            raise OC20FormatError(
                self.path, None, "not an LMDB file (no meta page with LMDB's magic and version)"
            )
        meta = max(metas, key=lambda m: m[-1])  # the larger transaction id is current
        self.psize = psize
        self.last_pg = meta[-2]
        _, main_flags, self.depth, *_, self.entries, self.root = meta[4 + 8 : 4 + 16]
        pages_on_disk = self.size // psize
        if self.last_pg < 1 or self.last_pg >= pages_on_disk:
            raise self._error(
                f"truncated: its header needs {self.last_pg + 1} pages of {psize} bytes, "
                f"the file holds {self.size} bytes"
            )
        if main_flags != 0:
            raise self._error(f"main database flags {main_flags:#x} (duplicate keys unsupported)")
        if self.root == P_INVALID:
            if self.entries or self.depth:
                raise self._error(f"no root page but {self.entries} entries")
        elif not 2 <= self.root <= self.last_pg or not 1 <= self.depth <= MAX_DEPTH:
            raise self._error(f"root page {self.root} at depth {self.depth}")
        if self.entries * (NODESIZE + 2) > (self.last_pg + 1) * psize:
            raise self._error(f"{self.entries} entries cannot fit in {self.last_pg + 1} pages")

    # ----------------------------------------------------------------------------- pages
    @property
    def fd(self) -> int:
        if self._fd is None:  # after unpickling in a DataLoader worker
            with self._lock:
                if self._fd is None:
                    stamp = self._stamp
                    self._open()
                    if self._stamp != stamp:
                        raise OC20FormatError(self.path, None, "changed on disk while in use")
        return self._fd

    def _read(self, offset: int, size: int, key: str | None) -> bytes:
        data = os.pread(self.fd, size, offset)
        if len(data) != size:
            raise self._error(f"truncated at byte {offset + len(data)}", key)
        return data

    def _check_pgno(self, pgno: int, key: str | None) -> None:
        if not 2 <= pgno <= self.last_pg:
            raise self._error(f"page number {pgno} outside pages 2..{self.last_pg}", key)

    def _page(self, pgno: int, key: str | None) -> _Page:
        with self._lock:
            page = self._pages.get(pgno)
            if page is not None:
                self._pages.move_to_end(pgno)
                return page
        self._check_pgno(pgno, key)
        data = self._read(pgno * self.psize, self.psize, key)
        page = self._parse(pgno, data, key)
        with self._lock:
            self._pages[pgno] = page
            if len(self._pages) > CACHED_PAGES:
                self._pages.popitem(last=False)
        return page

    def _parse(self, pgno: int, data: bytes, key: str | None) -> _Page:
        stored, _, flags, lower, upper = struct.unpack_from("<QHHHH", data)
        kind = flags & _TYPE_BITS
        if stored != pgno or kind not in (P_BRANCH, P_LEAF):
            raise self._error(f"page {pgno} has header page {stored}, flags {flags:#x}", key)
        psize = self.psize
        if not PAGEHDRSZ < lower <= upper <= psize or (lower - PAGEHDRSZ) % 2:
            raise self._error(f"page {pgno} has lower {lower}, upper {upper}", key)
        count = (lower - PAGEHDRSZ) // 2
        keys: list[bytes] = []
        values: list[Any] = []
        for ptr in struct.unpack_from(f"<{count}H", data, PAGEHDRSZ):
            if not upper <= ptr <= psize - NODESIZE:
                raise self._error(f"page {pgno} has a node at offset {ptr}", key)
            lo, hi, nflags, ksize = struct.unpack_from("<HHHH", data, ptr)
            start = ptr + NODESIZE
            end = start + ksize
            if kind == P_BRANCH:
                if end > psize:
                    raise self._error(f"page {pgno} has a key past its end", key)
                values.append(lo | hi << 16 | nflags << 32)
            else:
                dsize = lo | hi << 16
                if nflags & (F_SUBDATA | F_DUPDATA):
                    raise self._error(f"page {pgno} holds duplicate keys or a sub-database", key)
                if nflags & F_BIGDATA:
                    if end + 8 > psize:
                        raise self._error(f"page {pgno} has a node past its end", key)
                    values.append((dsize, struct.unpack_from("<Q", data, end)[0]))
                else:
                    if end + dsize > psize:
                        raise self._error(f"page {pgno} has a value past its end", key)
                    values.append(data[end : end + dsize])
            keys.append(data[start:end])
        ordered = keys[1:] if kind == P_BRANCH else keys  # a branch's first key is unused
        if any(a >= b for a, b in zip(ordered, ordered[1:], strict=False)):
            raise self._error(f"page {pgno} has keys out of order", key)
        return _Page(kind == P_LEAF, keys, values)

    def _value(self, value: Any, key: str | None) -> bytes:
        if isinstance(value, bytes):
            return value
        dsize, ovpgno = value
        self._check_pgno(ovpgno, key)
        if ovpgno * self.psize + PAGEHDRSZ + dsize > (self.last_pg + 1) * self.psize:
            raise self._error(f"a {dsize}-byte value on page {ovpgno} runs past the file", key)
        raw = self._read(ovpgno * self.psize, PAGEHDRSZ + dsize, key)
        stored, _, flags, pages = struct.unpack_from("<QHHI", raw)
        needed = (PAGEHDRSZ - 1 + dsize) // self.psize + 1
        if stored != ovpgno or flags & _TYPE_BITS != P_OVERFLOW or pages < needed:
            raise self._error(f"overflow page {ovpgno} has header page {stored}", key)
        if ovpgno + pages - 1 > self.last_pg:
            raise self._error(f"overflow pages {ovpgno}+{pages} run past the file", key)
        return raw[PAGEHDRSZ:]

    # ----------------------------------------------------------------------------- reading
    def get(self, key: bytes) -> bytes | None:
        """The value stored under ``key``, or ``None``."""
        name = key.decode("ascii", "replace")
        if self.root == P_INVALID:
            return None
        pgno = self.root
        for level in range(1, self.depth + 1):
            page = self._page(pgno, name)
            if page.leaf != (level == self.depth):
                what = "leaf" if page.leaf else "branch"
                raise self._error(f"page {pgno} is a {what} at level {level} of {self.depth}", name)
            if page.leaf:
                i = bisect.bisect_left(page.keys, key)
                if i < len(page.keys) and page.keys[i] == key:
                    return self._value(page.values[i], name)
                return None
            pgno = page.values[bisect.bisect_right(page.keys, key, 1) - 1]
        raise AssertionError("unreachable")  # pragma: no cover

    def keys(self) -> Iterator[bytes]:
        """Every key in order; each page is visited once and the count is checked."""
        if self.root == P_INVALID:
            return
        seen: set[int] = set()
        stack = [(self.root, 1)]
        count = 0
        while stack:
            pgno, level = stack.pop()
            if pgno in seen:
                raise self._error(f"page {pgno} is reached twice")
            seen.add(pgno)
            page = self._page(pgno, None)
            if page.leaf != (level == self.depth):
                raise self._error(f"page {pgno} at level {level} of {self.depth}")
            if page.leaf:
                count += len(page.keys)
                yield from page.keys
            else:
                stack.extend((child, level + 1) for child in reversed(page.values))
        if count != self.entries:
            raise self._error(f"holds {count} keys, its header says {self.entries}")

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __del__(self) -> None:
        self.close()

    def __getstate__(self) -> dict[str, Any]:
        return {
            **self.__dict__,
            "_fd": None,
            "_lock": None,
            "_pages": OrderedDict(),
        }

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


class LMDBShards:
    """The :class:`LMDBFile` readers of a list of files, opened on first use; errors name
    the file and key."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._readers: dict[int, LMDBFile] = {}

    def reader(self, k: int) -> LMDBFile:
        if k not in self._readers:
            self._readers[k] = LMDBFile(self.files[k])
        return self._readers[k]

    def get(self, k: int, key: str) -> bytes | None:
        return self.reader(k).get(key.encode("ascii"))

    def census(
        self, k: int, lo: int, hi: int, excluded: frozenset[int], reserved: tuple[str, ...]
    ) -> str:
        """Which of the integer keys ``lo..hi-1`` (less ``excluded``) are missing and which
        keys are unexpected, in memory proportional to the file (not to ``hi - lo``)."""
        seen: set[int] = set()
        unexpected: list[str] = []
        surplus = 0
        for key in self.reader(k).keys():
            text = key.decode("ascii", "replace")
            number = int(text) if text.isdigit() and str(int(text)) == text else None
            if number is not None and lo <= number < hi and number not in excluded:
                seen.add(number)
            elif text not in reserved:
                surplus += 1
                unexpected += [text[:40]] if len(unexpected) < 5 else []
        missing: list[str] = []
        number = lo
        while len(missing) < 5 and number < hi:  # at most len(seen) + len(excluded) + 5 steps
            if number not in seen and number not in excluded:
                missing.append(str(number))
            number += 1
        expected = hi - lo - sum(1 for e in excluded if lo <= e < hi)
        return (
            f"{expected - len(seen)} missing (first: {missing}), "
            f"{surplus} unexpected (first: {unexpected})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_readers": {}}
