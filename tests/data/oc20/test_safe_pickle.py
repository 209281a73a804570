"""The safe unpickler of legacy OC20 records: no code runs, no record allocates memory out of
proportion to its size, and every refusal names the file and record."""

from __future__ import annotations

import _codecs
import copyreg
import io
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
import torch
from oc20_helpers import legacy_lmdb, peak_rss_increase, record, write_raw_lmdb

from geolinrpe.data.oc20 import OC20, OC20FormatError, UnsafePickleError, record_budget

MB = 1 << 20
try:
    from numpy._core import multiarray as np_multiarray
except ImportError:  # numpy < 2
    from numpy.core import multiarray as np_multiarray


class Reduce:
    """Pickles as ``fn(*args)``: any call a hostile file could name."""

    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def Evil(marker: Path) -> Reduce:  # noqa: N802 - reads as a class in the payload table
    return Reduce(os.system, f"touch {marker}")


def StorageBlob(blob: bytes) -> Reduce:  # noqa: N802 - torch.storage._load_from_bytes(blob)
    return Reduce(torch.storage._load_from_bytes, blob)


def TensorOver(storage, size=(3, 3), stride=(3, 1)) -> Reduce:  # noqa: N802
    return Reduce(torch._utils._rebuild_tensor_v2, storage, 0, size, stride, False, OrderedDict())


def read_first(path: Path):
    return OC20(path)[0]


def test_safe_unpickler_refuses_code_and_accepts_data(tmp_path):
    marker = tmp_path / "pwned"
    evil = pickle.dumps(Evil(marker))
    pickle.loads(evil)  # the payload is live: plain pickle runs the command
    assert marker.exists()
    marker.unlink()

    legacy_storage = io.BytesIO()
    torch.save(Evil(marker), legacy_storage, _use_new_zipfile_serialization=False)
    zip_storage = io.BytesIO()
    torch.save(Evil(marker), zip_storage)
    payloads = {
        "bare": evil,
        "inside Data": pickle.dumps(record(extra=Evil(marker))),
        "legacy storage payload": pickle.dumps(record(pos=TensorOver(StorageBlob(
            legacy_storage.getvalue())))),
        "zip storage payload": pickle.dumps(record(pos=TensorOver(StorageBlob(
            zip_storage.getvalue())))),
        "builtins.eval": pickle.dumps(record(sid=Reduce(eval, "1 + 1"))),
        "builtins.exec": pickle.dumps(Reduce(exec, f"open({str(marker)!r}, 'w')")),
        "torch.load": pickle.dumps(Reduce(torch.load, str(marker))),
        "numpy.load": pickle.dumps(Reduce(np.load, str(marker))),
    }  # fmt: skip
    for label, payload in payloads.items():
        path = write_raw_lmdb(tmp_path / f"{label.replace(' ', '_')}.lmdb", {b"0": payload})
        ds = OC20(path)
        with pytest.raises(UnsafePickleError) as info:
            ds[0]
        message = str(info.value)
        assert str(path) in message and "record 0" in message and "safe=False" in message, label
        assert info.value.record == "0" and isinstance(info.value, ValueError)
        assert not marker.exists(), label

    # Legitimate storages are accepted in both torch.save layouts, and views stay in bounds.
    values = torch.arange(9, dtype=torch.float32) * 0.5
    zip_ok = io.BytesIO()
    with pytest.warns(UserWarning, match="TypedStorage is deprecated"):
        torch.save(values.storage(), zip_ok)
    item = record(pos=TensorOver(StorageBlob(zip_ok.getvalue())))
    path = write_raw_lmdb(tmp_path / "zip_ok.lmdb", {b"0": pickle.dumps(item)})
    assert torch.equal(OC20(path)[0].pos, values.view(3, 3))
    item = record(pos=TensorOver(StorageBlob(zip_ok.getvalue()), size=(4, 3)))
    path = write_raw_lmdb(tmp_path / "out_of_bounds.lmdb", {b"0": pickle.dumps(item)})
    with pytest.raises(OC20FormatError, match="could not unpickle.*view of a 9-element"):
        OC20(path)[0]
    legit = record(extra_np=np.arange(3.0), extra_set={1, 2}, extra_od=OrderedDict(a=1))
    path = legacy_lmdb(tmp_path / "legit.lmdb", [legit])
    assert torch.equal(OC20(path)[0].pos, legit.pos)
    for protocol in (0, 2, 4, 5):
        path = write_raw_lmdb(
            tmp_path / f"p{protocol}.lmdb", {b"0": pickle.dumps(legit, protocol=protocol)}
        )
        assert torch.equal(OC20(path)[0].pos, legit.pos)


def _zip_bomb_storage() -> bytes:
    """A torch.save zip of a 40 MB storage, re-packed with deflate (about 40 KB)."""
    plain = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        torch.save(torch.zeros(10 * MB).storage(), plain)
    packed = io.BytesIO()
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(packed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    return packed.getvalue()


def test_records_cannot_allocate_out_of_proportion(tmp_path):
    """Each payload is at most a few KB and asks for 80 MB to 8 GB; each is refused before
    allocating, naming file and record, with the peak memory under 50 MB + 10x its size."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TypedStorage is deprecated
        small = torch.arange(6, dtype=torch.float32).storage()
    payloads = {
        "bytearray(1 GiB)": pickle.dumps(Reduce(bytearray, 1 << 30), protocol=2),
        "stride-0 view (20M atoms)": pickle.dumps(
            record(pos=TensorOver(small, size=(20_000_000, 3), stride=(0, 1)))
        ),
        "numpy.ndarray(1e9)": pickle.dumps(Reduce(np.ndarray, (1_000_000_000,))),
        "numpy _reconstruct(1e9)": pickle.dumps(
            Reduce(np_multiarray._reconstruct, np.ndarray, (1_000_000_000,), "f8")
        ),
        "copyreg._reconstructor(bytearray)": pickle.dumps(
            Reduce(copyreg._reconstructor, bytearray, bytearray, 1 << 30)
        ),
        "_codecs.encode(hex)": pickle.dumps(Reduce(_codecs.encode, b"x" * 64, "hex")),
        "zip-deflated storage (40 MB)": pickle.dumps(
            record(pos=TensorOver(StorageBlob(_zip_bomb_storage()), size=(3, 3)))
        ),
    }
    for label, payload in payloads.items():
        assert len(payload) < 64 << 10, label
        path = write_raw_lmdb(tmp_path / f"{len(label)}.lmdb", {b"0": payload})
        grown, outcome = peak_rss_increase(read_first, path)
        assert outcome[0] == "raised", (label, outcome)
        _, kind, message = outcome
        assert kind in ("OC20FormatError", "UnsafePickleError"), (label, kind, message)
        assert f"{path}, record 0" in message, (label, message)
        assert grown < 50 * MB + 10 * len(payload), (label, grown / MB)
    assert record_budget(1000) < 30 * MB
