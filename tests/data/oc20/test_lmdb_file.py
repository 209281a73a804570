"""The pure-Python LMDB reader: equal to py-lmdb on valid files; damaged, truncated, special
and hostile files raise errors naming the file (and key) and never kill the process."""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
import zlib

import lmdb
import numpy as np
import pytest
import torch
from oc20_helpers import in_child, legacy_lmdb, peak_rss_increase, record, write_raw_lmdb

from geolinrpe.data.oc20 import (
    OC20,
    LMDBFile,
    OC20FormatError,
    make_synthetic,
    write_aselmdb,
)

MB = 1 << 20


@pytest.mark.parametrize("sizes", [(5,), (5, 300, 5000), (20000,)])
def test_reader_equals_py_lmdb(tmp_path, sizes):
    """Inline and overflow values, branch pages (depth >= 2), absent keys, key order."""
    rng = random.Random(len(sizes))
    values = {}
    for i in range(1500 if len(sizes) > 1 else 40):
        key = (str(i) if i % 3 else f"k{i:05d}-{rng.random()}").encode()
        values[key] = rng.randbytes(rng.choice(sizes))
    path = write_raw_lmdb(tmp_path / "a.lmdb", values)
    reader = LMDBFile(path)
    assert reader.entries == len(values)
    assert all(reader.get(key) == value for key, value in values.items())
    assert reader.get(b"absent") is None and reader.get(b"") is None and reader.get(b"~") is None
    assert list(reader.keys()) == sorted(values)
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        assert env.stat()["depth"] == reader.depth and list(
            txn.cursor().iternext(values=False)
        ) == list(reader.keys())
    env.close()
    clone = pickle.loads(pickle.dumps(reader))  # DataLoader workers reopen by path
    assert clone.get(next(iter(values))) == next(iter(values.values()))


def test_empty_database(tmp_path):
    path = write_raw_lmdb(tmp_path / "empty.lmdb", {})
    reader = LMDBFile(path)
    assert reader.entries == 0 and reader.get(b"0") is None and list(reader.keys()) == []
    with pytest.raises(OC20FormatError, match="holds no records"):
        OC20(path)


def test_corrupt_and_truncated_lmdb(tmp_path):
    path = make_synthetic(tmp_path / "data.lmdb", 4, steps=0)
    truncated = shutil.copy(path, tmp_path / "truncated.lmdb")
    with open(truncated, "r+b") as fh:
        fh.truncate(os.path.getsize(truncated) // 2)
    with pytest.raises(OC20FormatError, match="truncated") as info:
        OC20(truncated)
    assert info.value.file == str(truncated)

    garbage = tmp_path / "garbage.lmdb"
    garbage.write_bytes(np.random.default_rng(0).bytes(20000))
    with pytest.raises(OC20FormatError, match="not an LMDB file") as info:
        OC20(garbage)
    assert str(garbage) in str(info.value)
    tiny = tmp_path / "tiny.lmdb"
    tiny.write_bytes(b"\0" * 10)
    with pytest.raises(OC20FormatError, match="not an LMDB file"):
        OC20(tiny)

    bad_value = legacy_lmdb(tmp_path / "bad_value.lmdb", [record(), record()])
    env = lmdb.open(str(bad_value), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"1", b"\x80\x04not a pickle")
    env.close()
    ds = OC20(bad_value)
    assert ds[0].sid == 7
    with pytest.raises(OC20FormatError, match="could not unpickle") as info:
        ds[1]
    assert info.value.file == str(bad_value) and info.value.record == "1"


def _current_meta(blob: bytes, psize: int) -> int:
    return max((0, 1), key=lambda p: struct.unpack_from("<Q", blob, p * psize + 144)[0])


def _first_node(blob: bytes, psize: int, pgno: int) -> int:
    """Offset of the first node of page ``pgno``."""
    return pgno * psize + struct.unpack_from("<H", blob, pgno * psize + 16)[0]


def test_page_pointers_past_the_file_are_errors(tmp_path):
    """The root, an overflow value and a branch child pointing past the end of the file:
    py-lmdb follows them through its memory map (SIGBUS); the reader names the file."""
    records = make_synthetic(tmp_path / "data.lmdb", 30, steps=0)  # depth 1, overflow values
    inline = write_raw_lmdb(  # depth 2: a branch root over leaves of small values
        tmp_path / "inline.lmdb", {str(i).encode(): b"v" * 20 for i in range(2000)}
    )
    cases = {}
    for source in (records, inline):
        blob = source.read_bytes()
        reader = LMDBFile(source)
        psize, root, past = reader.psize, reader.root, reader.last_pg + 5
        node = _first_node(blob, psize, root)
        meta_root = _current_meta(blob, psize) * psize + 128
        if source == records:
            ksize = struct.unpack_from("<H", blob, node + 6)[0]
            cases["root"] = (blob, meta_root, "<Q", past)
            cases["overflow"] = (blob, node + 8 + ksize, "<Q", past)
        else:
            assert reader.depth == 2
            cases["branch child"] = (blob, node, "<HH", (past & 0xFFFF, past >> 16))
    for label, (blob, offset, layout, value) in cases.items():
        damaged = bytearray(blob)
        struct.pack_into(
            layout, damaged, offset, *(value if isinstance(value, tuple) else (value,))
        )
        file = tmp_path / f"{label.replace(' ', '_')}.lmdb"
        file.write_bytes(bytes(damaged))

        def read_all(file=file):
            reader = LMDBFile(file)
            return [reader.get(key) for key in (b"0", b"1", b"1999")]

        died, result = in_child(read_all)
        assert died is None, label
        assert result[0] == "raised" and result[1] == "OC20FormatError", (label, result)
        assert str(file) in result[2] and "damaged LMDB file" in result[2], (label, result)


def test_special_files_are_named(tmp_path):
    fifo = tmp_path / "fifo.lmdb"
    os.mkfifo(fifo)
    with pytest.raises(OC20FormatError, match="not a regular file or folder") as info:
        OC20(fifo)
    assert info.value.file == str(fifo)
    device = tmp_path / "zero.lmdb"
    device.symlink_to("/dev/zero")
    with pytest.raises(OC20FormatError, match="not a regular file or folder"):
        OC20(device)
    folder = tmp_path / "shards"
    folder.mkdir()
    os.mkfifo(folder / "data.0000.lmdb")
    with pytest.raises(OC20FormatError, match="is a FIFO, not a regular LMDB file") as info:
        OC20(folder)
    assert info.value.file == str(folder / "data.0000.lmdb")


def test_declared_counts_are_checked_before_allocating(tmp_path):
    """A 'length' of 1e9 and an ASE 'nextid' of 1e9 are refused against the entries present,
    with the peak memory under 50 MB (before: 3.5 GB for the length)."""
    values = {str(i).encode(): pickle.dumps(record(sid=i)) for i in range(3)}
    huge_length = write_raw_lmdb(tmp_path / "a.lmdb", {**values, b"length": pickle.dumps(10**9)})
    grown, outcome = peak_rss_increase(OC20, huge_length)
    assert outcome[0] == "raised" and outcome[1] == "OC20FormatError", outcome
    assert "1000000000 records" in outcome[2] and "999999997 missing" in outcome[2], outcome
    assert grown < 50 * MB, grown / MB

    row = {"numbers": [29], "positions": [[0, 0, 0]], "cell": np.eye(3)}
    path = tmp_path / "nextid.aselmdb"
    write_aselmdb(path, [row, row])
    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(b"nextid", zlib.compress(b"1000000000"))
    env.close()
    grown, outcome = peak_rss_increase(OC20, path)
    assert outcome[0] == "raised" and "999999997 missing" in outcome[2], outcome
    assert grown < 50 * MB, grown / MB


def _set_key(path, key: bytes, value: bytes) -> None:
    env = lmdb.open(str(path), subdir=False)
    with env.begin(write=True) as txn:
        txn.put(key, value)
    env.close()


def test_aselmdb_wrong_types_and_bombs_are_named(tmp_path):
    row = {"numbers": [29, 8], "positions": [[0, 0, 0], [0, 0, 2]], "cell": np.eye(3) * 5}
    cases = {
        "deleted_ids": (b"deleted_ids", b'{"a": 1}', "deleted_ids is a dict, not a list"),
        "deleted id": (b"deleted_ids", b'["x"]', "'x' is not a row id"),
        "nextid": (b"nextid", b'"3"', "nextid is '3', not a row id"),
        "constraints": (b"1", {**row, "constraints": 5}, "constraints is a int, not a list"),
        "FixAtoms": (
            b"1",
            {**row, "constraints": [{"name": "FixAtoms", "kwargs": {"indices": "ab"}}]},
            "FixAtoms is not an index list",
        ),
        "data": (b"1", {**row, "data": [1, 2]}, "data is a list, not an object"),
        "numbers": (b"1", {**row, "numbers": 29}, "record has no atomic numbers|shape"),
        "string ndarray": (
            b"1",
            {**row, "positions": {"__ndarray__": [[2, 3], "U100000000", ["a"] * 6]}},
            "refusing ndarray of dtype",
        ),
        "deep nesting": (b"1", b"[" * 100_000 + b"]" * 100_000, "not a zlib-compressed ASE JSON"),
    }
    for label, (key, value, match) in cases.items():
        path = tmp_path / f"{label.replace(' ', '_')}.aselmdb"
        write_aselmdb(path, [row, row])
        if isinstance(value, dict):
            value = json_row(value)
        _set_key(path, key, zlib.compress(value))

        def read_all(path=path):
            return [OC20(path, task="s2ef", require_targets=False)[i].natoms for i in range(2)]

        with pytest.raises(OC20FormatError, match=match) as info:
            read_all()
        assert str(path) in str(info.value), label

    # A 100 KB zlib bomb (100 MB of whitespace before a valid row) is refused unparsed.
    path = tmp_path / "bomb.aselmdb"
    write_aselmdb(path, [row])
    deflate = zlib.compressobj(9)
    bomb = b"".join(deflate.compress(b" " * MB) for _ in range(100))
    bomb += deflate.compress(json_row(row)) + deflate.flush()
    _set_key(path, b"1", bomb)
    grown, outcome = peak_rss_increase(lambda: OC20(path, require_targets=False)[0])
    assert outcome[0] == "raised" and "decompression bomb" in outcome[2], outcome
    assert f"{path}, record 1" in outcome[2]
    assert grown < 50 * MB + 10 * len(bomb), grown / MB


def json_row(row: dict) -> bytes:
    from ase.io.jsonio import encode

    return encode(row).encode()


def test_xz_bomb_is_refused(tmp_path):
    import lzma

    folder = make_synthetic(tmp_path / "raw", 1, "extxyz", steps=0, num_files=1)
    text = (folder / "0.extxyz").read_bytes()
    (folder / "0.extxyz").unlink()
    packer = lzma.LZMACompressor(preset=0)
    bomb = packer.compress(text) + b"".join(packer.compress(b"\n" * MB) for _ in range(40))
    (folder / "0.extxyz.xz").write_bytes(bomb + packer.flush())
    with pytest.raises(OC20FormatError, match="decompress it with 'xz -dk'") as info:
        OC20(folder, task="s2ef")
    assert info.value.file == str(folder / "0.extxyz.xz")


def _structural_offsets(blob: bytes, psize: int) -> list[int]:
    """Bytes LMDB trusts to navigate: meta pages, branch/leaf pages, overflow headers."""
    offsets = []
    for pgno in range(len(blob) // psize):
        base = pgno * psize
        flags = struct.unpack_from("<H", blob, base + 10)[0]
        if flags & 0x04:  # overflow page: only its header is structure
            offsets += range(base, base + 16)
        elif flags & 0x0B:  # meta, branch or leaf
            offsets += range(base, base + psize)
    return offsets


def _read_everything(path, task, reference):
    """Reads every record; counts records equal to / different from the original's."""
    ds = OC20(path, task=task, require_targets=False)
    same = sum(
        bool(torch.equal(ds[i].pos, reference[i].pos) and torch.equal(ds[i].z, reference[i].z))
        for i in range(len(ds))
    )
    return ("read", len(ds), same)


@pytest.mark.parametrize(("name", "task"), [("data.lmdb", "is2re"), ("x.aselmdb", "s2ef")])
def test_byte_flip_fuzz_never_kills_the_process(tmp_path, name, task):
    """150 seeded byte flips (2/3 on the bytes LMDB navigates by, 1/3 anywhere), each read
    whole in a forked child: no child dies by a signal, every failure is an OC20FormatError
    naming the damaged file, and nothing else escapes."""
    fmt = "lmdb-is2re" if task == "is2re" else "aselmdb"
    clean = make_synthetic(tmp_path / name, 6, fmt, steps=0)
    reference = [OC20(clean, task=task)[i] for i in range(6)]
    blob = clean.read_bytes()
    psize = LMDBFile(clean).psize
    structural = _structural_offsets(blob, psize)
    rng = random.Random(f"{name}-fuzz")
    outcomes = {"read": 0, "named error": 0}
    for trial in range(150):
        offset = rng.choice(structural) if trial % 3 else rng.randrange(len(blob))
        damaged = bytearray(blob)
        damaged[offset] ^= 1 << rng.randrange(8) if trial % 2 else rng.randrange(1, 256)
        path = tmp_path / f"{trial}{name[name.index('.') :]}"
        path.write_bytes(bytes(damaged))
        died, result = in_child(_read_everything, path, task, reference)
        assert died is None, f"byte {offset}: child killed by {died}"
        if result[0] == "read":
            outcomes["read"] += 1
        else:
            _, kind, message = result
            assert kind in ("OC20FormatError", "UnsafePickleError"), (offset, kind, message)
            assert str(path) in message, (offset, message)
            outcomes["named error"] += 1
        path.unlink()
    assert outcomes["named error"] >= 10, outcomes  # the flips did reach the structure
