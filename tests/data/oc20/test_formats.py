"""OC20 loader: every format reads back what was written; unsafe, corrupt and invalid files
raise errors that name the file and record; nothing is dropped silently."""

from __future__ import annotations

import json
import lzma
import pickle
import shutil
import zlib
from pathlib import Path

import lmdb
import numpy as np
import pytest
import torch
import torch_geometric.data.data as pyg_data_module
from oc20_helpers import legacy_lmdb, record, write_raw_lmdb
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader

from geolinrpe.data.oc20 import (
    OC20,
    OC20FormatError,
    make_synthetic,
    synthetic_systems,
    write_aselmdb,
    write_oc20,
)

F32 = np.float32


@pytest.fixture(scope="module")
def systems():
    return synthetic_systems(5, seed=3, steps=15, frames=3)


def frames_of(systems):
    return [(s, frame) for s in systems for frame in s.frames]


def assert_common(item: Data, system, pos: np.ndarray) -> None:
    n = len(system.numbers)
    assert item.natoms == n and item.sid == system.sid
    assert item.z.dtype == torch.long and item.z.tolist() == system.numbers.tolist()
    assert item.pos.dtype == torch.float32 and item.pos.shape == (n, 3)
    assert item.cell.shape == (1, 3, 3) and item.pbc.shape == (1, 3)
    assert torch.equal(item.cell, torch.tensor(system.cell.astype(F32)).view(1, 3, 3))
    assert item.pbc.tolist() == [system.pbc.tolist()]
    assert item.tags.tolist() == system.tags.tolist()
    assert item.fixed.dtype == torch.bool and item.fixed.tolist() == system.fixed.tolist()
    assert torch.equal(item.pos, torch.tensor(pos.astype(F32)))


def test_synthetic_systems_are_oc20_like(systems):
    again = synthetic_systems(5, seed=3, steps=15, frames=3)
    assert [s.sid for s in again] == [s.sid for s in systems]
    assert np.array_equal(again[2].pos_relaxed, systems[2].pos_relaxed)
    assert len({s.sid for s in systems}) == len(systems)
    for s in systems:
        # Adsorbate last (tag 2), top layer 1, fixed atoms exactly the subsurface layers.
        assert s.tags[-1] == 2 and set(s.tags.tolist()) == {0, 1, 2}
        assert np.array_equal(s.fixed, s.tags == 0)
        assert s.pbc.all() and s.energy_relaxed <= s.energy_init
        assert np.isclose(s.y_relaxed, s.energy_relaxed - s.reference)
        assert np.array_equal(s.pos_relaxed[s.fixed], s.pos_init[s.fixed])
        fids = [f[0] for f in s.frames]
        assert fids[0] == 0 and fids == sorted(fids) and 1 <= len(fids) <= 3
        assert np.array_equal(s.frames[-1][1], s.pos_relaxed)
    unrelaxed = synthetic_systems(2, seed=0, steps=0)
    assert all(len(s.frames) == 1 and s.y_init == s.y_relaxed for s in unrelaxed)


@pytest.mark.parametrize("safe", [True, False])
def test_lmdb_is2re_reads_back_what_was_written(tmp_path, systems, safe):
    path = write_oc20(tmp_path / "data.lmdb", systems, "lmdb-is2re")
    ds = OC20(path, task="is2re", safe=safe)
    assert ds.format == "lmdb" and len(ds) == len(systems) and ds.skipped == {}
    for item, s in zip(ds, systems, strict=True):
        assert_common(item, s, s.pos_init)
        assert item.y_relaxed.tolist() == [F32(s.y_relaxed)]
        assert item.y_init.tolist() == [F32(s.y_init)]
        assert torch.equal(item.pos_relaxed, torch.tensor(s.pos_relaxed.astype(F32)))
    assert torch.equal(ds[-1].pos, ds[len(ds) - 1].pos)
    assert torch.equal(ds[torch.tensor(2)].pos, ds[np.int64(2)].pos)
    with pytest.raises(IndexError):
        ds[len(ds)]
    with pytest.raises(TypeError):
        ds[1.0]


def test_lmdb_s2ef_shards(tmp_path, systems):
    path = write_oc20(tmp_path / "s2ef", systems, "lmdb-s2ef", num_files=3)
    ds = OC20(path, task="s2ef")
    frames = frames_of(systems)
    assert [f.name for f in ds.files] == ["data.0000.lmdb", "data.0001.lmdb", "data.0002.lmdb"]
    assert len(ds) == len(frames)
    for item, (s, (fid, pos, energy, forces)) in zip(ds, frames, strict=True):
        assert_common(item, s, pos)
        assert item.fid == fid
        assert item.y.tolist() == [F32(energy - s.reference)]
        assert torch.equal(item.force, torch.tensor(forces.astype(F32)))
    with pytest.raises(OC20FormatError, match="use task='s2ef'"):
        OC20(path, task="is2re")[0]


def test_aselmdb_reads_back_both_tasks(tmp_path, systems):
    path = write_oc20(tmp_path / "oc20.aselmdb", systems, "aselmdb")
    is2re, s2ef = OC20(path, task="is2re"), OC20(path, task="s2ef")
    assert is2re.format == "aselmdb" and len(is2re) == len(s2ef) == len(systems)
    for a, b, s in zip(is2re, s2ef, systems, strict=True):
        assert_common(a, s, s.pos_init)
        assert_common(b, s, s.pos_init)
        assert a.y_relaxed.tolist() == [F32(s.y_relaxed)]
        assert a.y_init.tolist() == [F32(s.y_init)]
        assert torch.equal(a.pos_relaxed, torch.tensor(s.pos_relaxed.astype(F32)))
        assert b.y.tolist() == [F32(s.energy_init - s.reference)] and b.fid == 0
        assert torch.equal(b.force, torch.tensor(s.forces_init.astype(F32)))
    # A folder of .aselmdb files is read in natural order.
    folder = tmp_path / "folder"
    write_oc20(folder / "b10.aselmdb", systems[3:], "aselmdb")
    write_oc20(folder / "b2.aselmdb", systems[:3], "aselmdb")
    assert [item.sid for item in OC20(folder)] == [s.sid for s in systems]


def test_aselmdb_plain_list_rows(tmp_path, systems):
    # Newer fairchem writes rows with orjson: plain lists, no __ndarray__ wrappers.
    s = systems[0]
    row = {
        "numbers": s.numbers.tolist(),
        "positions": s.pos_init.tolist(),
        "cell": s.cell.tolist(),
        "pbc": s.pbc.tolist(),
        "tags": s.tags.tolist(),
        "constraints": [
            {"name": "FixAtoms", "kwargs": {"indices": np.flatnonzero(s.fixed).tolist()}}
        ],
        "energy": s.energy_init,
        "forces": s.forces_init.tolist(),
        "data": {"sid": f"random{s.sid}", "ref_energy": s.reference, "y_relaxed": s.y_relaxed},
    }
    packed = {k: zlib.compress(json.dumps(v).encode()) for k, v in {"nextid": 2, "1": row}.items()}
    path = write_raw_lmdb(tmp_path / "plain.aselmdb", {k.encode(): v for k, v in packed.items()})
    item = OC20(path, task="is2re")[0]
    assert_common(item, s, s.pos_init)
    assert item.y_relaxed.tolist() == [F32(s.y_relaxed)]
    assert OC20(path, task="s2ef")[0].y.tolist() == [F32(s.energy_init - s.reference)]


def test_extxyz_and_xz_read_back(tmp_path, systems):
    path = write_oc20(tmp_path / "raw", systems, "extxyz", num_files=2)
    frames = frames_of(systems)
    ds = OC20(path, task="s2ef")
    assert ds.format == "extxyz" and len(ds) == len(frames)
    for item, (s, (fid, pos, energy, forces)) in zip(ds, frames, strict=True):
        assert item.sid == s.sid and item.fid == fid and item.z.tolist() == s.numbers.tolist()
        assert item.tags.tolist() == s.tags.tolist()
        assert item.fixed.tolist() == s.fixed.tolist() and item.pbc.all()
        # extxyz prints 8 decimals; energies keep full precision.
        assert torch.allclose(item.pos, torch.tensor(pos.astype(F32)), rtol=0, atol=1e-6)
        assert torch.allclose(item.force, torch.tensor(forces.astype(F32)), rtol=0, atol=1e-6)
        assert torch.allclose(item.cell, torch.tensor(s.cell.astype(F32)).view(1, 3, 3))
        assert item.y.tolist() == [F32(energy - s.reference)]
    packed = tmp_path / "xz"
    packed.mkdir()
    for file in path.iterdir():
        suffix = ".extxyz.xz" if file.suffix == ".extxyz" else ".txt.xz"
        (packed / (file.stem + suffix)).write_bytes(lzma.compress(file.read_bytes()))
    xz = OC20(packed, task="s2ef")
    assert [f.name for f in xz.files] == ["0.extxyz.xz", "1.extxyz.xz"]
    for i in (0, len(ds) - 1, 2):
        assert torch.equal(xz[i].pos, ds[i].pos) and torch.equal(xz[i].y, ds[i].y)
    shutil.copy(path / "1.extxyz", packed / "1.extxyz")  # `xz -dk` leaves both copies
    both = OC20(packed, task="s2ef")
    assert [f.name for f in both.files] == ["0.extxyz.xz", "1.extxyz"] and len(both) == len(ds)
    assert torch.equal(both[len(ds) - 1].force, ds[len(ds) - 1].force)
    with pytest.raises(ValueError, match="task='s2ef'"):
        OC20(path, task="is2re")


def test_make_synthetic_writes_every_format(tmp_path):
    for fmt, target, task in [
        ("lmdb-is2re", tmp_path / "is2re" / "data.lmdb", "is2re"),
        ("lmdb-s2ef", tmp_path / "s2ef", "s2ef"),
        ("aselmdb", tmp_path / "x.aselmdb", "is2re"),
        ("extxyz", tmp_path / "xyz", "s2ef"),
    ]:
        path = make_synthetic(target, 3, format=fmt, seed=1, steps=0)
        assert path == target and len(OC20(path, task=task)) == 3


def test_old_pyg_pickles_are_rebuilt(tmp_path, systems):
    s = systems[0]

    class OldData:  # PyG 1.x Data: attributes straight in __dict__, pickled under that name
        pass

    OldData.__module__, OldData.__qualname__ = pyg_data_module.__name__, "Data"
    old = OldData()
    old.__dict__.update(
        x=None, edge_index=None, edge_attr=None, y=None, normal=None, face=None,
        __num_nodes__=None, pos=torch.tensor(s.pos_init, dtype=torch.float32),
        cell=torch.tensor(s.cell, dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(s.numbers, dtype=torch.float32), natoms=len(s.numbers),
        tags=torch.tensor(s.tags, dtype=torch.float32),
        fixed=torch.tensor(s.fixed, dtype=torch.float32), sid=s.sid, y_relaxed=s.y_relaxed,
    )  # fmt: skip
    saved, pyg_data_module.Data = pyg_data_module.Data, OldData
    try:
        payload = pickle.dumps(old, protocol=-1)
    finally:
        pyg_data_module.Data = saved
    with pytest.raises(RuntimeError, match="older version of PyG"):
        _ = pickle.loads(payload).pos  # what a naive loader hits under PyG 2.x
    path = write_raw_lmdb(tmp_path / "old.lmdb", {b"0": payload})  # no length key
    for safe in (True, False):
        item = OC20(path, safe=safe)[0]
        assert_common(item, s, s.pos_init)
        assert item.y_relaxed.tolist() == [F32(s.y_relaxed)]


def test_missing_keys_and_files(tmp_path, systems):
    values = {str(i).encode(): pickle.dumps(record(sid=i)) for i in (0, 1, 3)}
    with_length = write_raw_lmdb(tmp_path / "a.lmdb", {**values, b"length": pickle.dumps(4)})
    without_length = write_raw_lmdb(tmp_path / "b.lmdb", values)
    for path in (with_length, without_length):
        with pytest.raises(OC20FormatError, match=r"1 missing \(first: \['2'\]\)") as info:
            OC20(path)
        assert info.value.file == str(path)
    extra = write_raw_lmdb(tmp_path / "c.lmdb", {**values, b"2": values[b"0"], b"x": b"?"})
    with pytest.raises(OC20FormatError, match=r"1 unexpected \(first: \['x'\]\)"):
        OC20(extra)

    with pytest.raises(FileNotFoundError, match="README"):
        OC20(tmp_path / "nowhere")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="no .lmdb"):
        OC20(empty)
    raw = write_oc20(tmp_path / "raw", systems[:2], "extxyz", num_files=2)
    (raw / "1.txt").unlink()
    with pytest.raises(FileNotFoundError, match="1.txt"):
        OC20(raw, task="s2ef")
    (raw / "1.txt").write_text("random1,frame0,-1.0\n")
    with pytest.raises(OC20FormatError, match="1 lines in 1.txt") as info:
        OC20(raw, task="s2ef")
    assert info.value.file == str(raw / "1.extxyz")
    text = (raw / "0.extxyz").read_text().splitlines()
    (raw / "0.extxyz").write_text("\n".join(text[:-2]) + "\n")
    with pytest.raises(OC20FormatError, match="truncated"):
        OC20(raw, task="s2ef")


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        (dict(pos=torch.tensor([[0.0, 0.0, 7.0], [float("nan"), 0.0, 7.0], [0.7, 0.7, 9.0]])),
         r"non-finite values in pos \(rows \[1\]\)"),
        (dict(pos=torch.zeros(0, 3), atomic_numbers=torch.zeros(0), natoms=0, tags=torch.zeros(0),
              fixed=torch.zeros(0)), "empty structure"),
        (dict(atomic_numbers=torch.tensor([29.0, 0.0, 8.0])), r"unknown element.*\[0\.0\]"),
        (dict(atomic_numbers=torch.tensor([29.0, 119.0, 8.0])), r"unknown element.*\[119\.0\]"),
        (dict(tags=torch.tensor([1.0, 1.5, 2.0])), r"tags must be 32-bit integers, found \[1\.5\]"),
        (dict(pos=torch.tensor([[0.0, 0, 7], [1e300, 0, 7], [0.7, 0.7, 9]], dtype=torch.float64)),
         r"values beyond torch.float32's range in pos \(rows \[1\]\)"),
        (dict(y_relaxed=1e39), r"y_relaxed is 1e\+39, beyond float32's range"),
        (dict(pos_relaxed=np.full((3, 3), -1e39)), "beyond torch.float32's range in pos_relaxed"),
        (dict(natoms=4), "natoms is 4"),
        (dict(y_relaxed=float("inf")), "y_relaxed"),
        (dict(cell=torch.eye(2)), "cell has shape"),
    ],
)  # fmt: skip
def test_invalid_records_name_file_and_record(tmp_path, overrides, match):
    path = legacy_lmdb(tmp_path / "data.lmdb", [record(), record(**overrides)])
    ds = OC20(path)
    assert ds[0].sid == 7
    with pytest.raises(OC20FormatError, match=match) as info:
        ds[1]
    assert info.value.file == str(path) and info.value.record == "1"


def test_invalid_records_in_text_formats(tmp_path, systems):
    raw = write_oc20(tmp_path / "raw", systems[:1], "extxyz", num_files=1)
    lines = (raw / "0.extxyz").read_text().splitlines(keepends=True)
    second = next(i for i, line in enumerate(lines) if i > 0 and line.strip().isdigit())
    lines[second + 2] = "Xx" + lines[second + 2][2:]
    (raw / "0.extxyz").write_text("".join(lines))
    ds = OC20(raw, task="s2ef")
    assert ds[0].sid == systems[0].sid
    with pytest.raises(OC20FormatError, match="not a readable extxyz frame") as info:
        ds[1]
    assert info.value.file == str(raw / "0.extxyz") and info.value.record == "frame 1"

    row = {"numbers": [29, 8], "positions": [[0, 0, 0], [0, 0, float("nan")]], "cell": np.eye(3)}
    path = tmp_path / "nan.aselmdb"
    write_aselmdb(path, [row])
    with pytest.raises(OC20FormatError, match="non-finite values in pos") as info:
        OC20(path, require_targets=False)[0]
    assert info.value.file == str(path) and info.value.record == "1"


def test_aselmdb_deleted_rows_are_counted_not_hidden(tmp_path, systems):
    path = write_oc20(tmp_path / "x.aselmdb", systems, "aselmdb")
    rows = [json.loads(zlib.decompress(v)) for v in read_values(path, len(systems))]
    deleted = tmp_path / "deleted.aselmdb"
    write_aselmdb(deleted, rows, deleted=[2, 4])
    with pytest.warns(UserWarning, match="skipped 2 deleted"):
        ds = OC20(deleted)
    assert ds.skipped == {"deleted_ids": 2} and len(ds) == len(systems) - 2
    assert [item.sid for item in ds] == [systems[i].sid for i in (0, 2, 4)]
    del ds  # the last dataset on a file closes its environment, so it can be written again
    env = lmdb.open(str(deleted), subdir=False)
    with env.begin(write=True) as txn:
        txn.delete(b"3")  # gone without being listed in deleted_ids
    env.close()
    with pytest.raises(OC20FormatError, match=r"1 missing \(first: \['3'\]\)"):
        OC20(deleted)


def read_values(path: Path, n: int) -> list[bytes]:
    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False)
    with env.begin() as txn:
        values = [txn.get(str(i).encode()) for i in range(1, n + 1)]
    env.close()
    return values


def test_fairchem_s2ef_field_types(tmp_path):
    # fairchem's S2EF preprocessing stores ids as LongTensor([k]) and may add graph fields.
    r = record(
        y_relaxed=None, sid=torch.LongTensor([7]), fid=torch.LongTensor([3]), y=-1.25,
        force=torch.ones(3, 3), edge_index=torch.zeros(2, 4, dtype=torch.long),
        cell_offsets=torch.zeros(4, 3), distances=torch.ones(4),
    )  # fmt: skip
    item = OC20(legacy_lmdb(tmp_path / "data.0000.lmdb", [r]), task="s2ef")[0]
    assert item.sid == 7 and item.fid == 3 and item.y.tolist() == [-1.25]
    assert torch.equal(item.force, torch.ones(3, 3)) and "edge_index" not in item


def test_test_split_without_targets(tmp_path):
    path = legacy_lmdb(tmp_path / "test.lmdb", [record(y_relaxed=None)])
    with pytest.raises(OC20FormatError, match="no y_relaxed"):
        OC20(path)[0]
    item = OC20(path, require_targets=False)[0]
    assert "y_relaxed" not in item and item.natoms == 3


def test_batches_pickling_and_shared_files(tmp_path, systems):
    path = write_oc20(tmp_path / "data.lmdb", systems, "lmdb-is2re")
    ds = OC20(path, transform=lambda d: d.update({"n2": d.natoms * 2}) or d)
    other = OC20(path)  # a second dataset on the same file shares its environment
    batch = next(iter(DataLoader(other, batch_size=3)))
    assert batch.y_relaxed.shape == (3,) and batch.num_graphs == 3
    assert batch.cell.shape == (3, 3, 3) and batch.pbc.shape == (3, 3)
    assert batch.natoms.tolist() == [len(s.numbers) for s in systems[:3]]
    assert ds[1].n2 == 2 * len(systems[1].numbers)
    clone = pickle.loads(pickle.dumps(other))
    assert torch.equal(clone[4].pos, other[4].pos)


def test_aselmdb_from_ase_slab_builders_keeps_layer_tags(tmp_path):
    """ASE's fcc111 tags layers 1, 2, 3 from the top and add_adsorbate tags the adsorbate 0:
    read as stored, not refused and not remapped."""
    from ase.build import add_adsorbate, fcc111
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.db.row import AtomsRow

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.calc = SinglePointCalculator(slab, energy=-1.5, forces=np.zeros((len(slab), 3)))
    row = AtomsRow(slab)
    dct = {k: row[k] for k in row.__dict__ if k[0] != "_" and k not in row._keys and k != "id"}
    path = tmp_path / "ase.aselmdb"
    write_aselmdb(path, [dct])
    item = OC20(path, task="s2ef")[0]
    assert sorted(set(item.tags.tolist())) == [0, 1, 2, 3]
    assert item.tags.tolist() == slab.get_tags().tolist()
    assert item.y.tolist() == [-1.5]


@pytest.mark.parametrize("field", ["pos", "sid", "y_relaxed", "tags", "natoms", "cell"])
def test_deeply_nested_lists_are_named_not_recursion_errors(tmp_path, field):
    """A list nested 200,000 deep (written op by op: pickle itself cannot) in any field."""
    raw = pickle.dumps(record(**{field: "PLACEHOLDER"}), protocol=2)
    placeholder = b"X\x0b\x00\x00\x00PLACEHOLDER"
    assert placeholder in raw
    depth = 200_000
    raw = raw.replace(placeholder, b"]" * depth + b"a" * (depth - 1))
    path = write_raw_lmdb(tmp_path / "deep.lmdb", {b"0": raw})
    with pytest.raises(OC20FormatError, match=field) as info:
        OC20(path)[0]
    assert info.value.file == str(path) and info.value.record == "0"
