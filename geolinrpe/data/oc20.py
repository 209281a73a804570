r"""OC20 (Open Catalyst 2020) adsorbate-catalyst structures in their three on-disk formats.

The Open Catalyst 2020 dataset (Chanussot et al., ACS Catalysis 2021,
https://arxiv.org/abs/2010.09990) holds DFT relaxations of adsorbates on catalyst slabs.
:class:`OC20` reads the files users download (``datasets/oc20/README.md``), detecting the
format from the path:

* **legacy LMDB** (the IS2RE/S2EF releases): one ``data.lmdb`` file (IS2RE) or a folder of
  ``data.NNNN.lmdb`` shards (S2EF); keys ``"0".."n-1"`` and an optional ``length``; values
  pickled PyG :class:`~torch_geometric.data.Data` (also pickles from PyG 1.x).
* **ASE-DB LMDB** (``.aselmdb``, current fairchem; one file or a folder of them): keys are
  row ids from 1 plus ``nextid``, ``deleted_ids``, ``metadata``; values zlib-compressed JSON
  rows (ASE's ``__ndarray__`` encoding or plain lists).
* **S2EF extxyz** (the raw S2EF release): ``<k>.extxyz`` (or ``.extxyz.xz``) frames beside
  ``<k>.txt`` (or ``.txt.xz``) lines ``random<sid>,frame<fid>,<reference energy>``.

Every item is a :class:`~torch_geometric.data.Data` with the same fields whatever the format
(n atoms; energies in eV, lengths in Angstrom, forces in eV/Angstrom):

=================  ====================  ================================================
field              shape, dtype          meaning
=================  ====================  ================================================
``z``              [n] long              atomic numbers (1..118)
``pos``            [n, 3] float32        Cartesian positions (Angstrom)
``cell``           [1, 3, 3] float32     lattice vectors as rows (Angstrom)
``pbc``            [1, 3] bool           periodic directions (all True when not stored)
``tags``           [n] long              0 subsurface, 1 surface, 2 adsorbate
``fixed``          [n] bool              atoms held fixed during the relaxation
``natoms``         int                   n
``sid``            int                   system id (``random<sid>``)
``y_relaxed``      [1] float32           IS2RE: relaxed adsorption energy (eV)
``y_init``         [1] float32           IS2RE: adsorption energy of ``pos`` (eV), if stored
``pos_relaxed``    [n, 3] float32        IS2RE: relaxed positions (Angstrom), if stored
``y``              [1] float32           S2EF: adsorption-referenced energy of ``pos`` (eV)
``force``          [n, 3] float32        S2EF: forces on the atoms (eV/Angstrom)
``fid``            int                   S2EF: frame index in the relaxation, if stored
=================  ====================  ================================================

Adsorption-referenced energies are DFT total energies minus the clean slab and the gas-phase
references of the adsorbate's atoms; the extxyz files and ASE-DB rows that carry total
energies also carry that reference (``.txt`` column 3, row ``data["ref_energy"]``), and the
loader subtracts it so ``y`` means the same in every format. Precomputed graph fields of the
legacy files (``edge_index``, ``cell_offsets``, ``distances``) are not carried over: models
here build their own neighbourhoods.

.. warning::
    Legacy LMDB values are pickles, and unpickling runs code named in the file. The default
    ``safe=True`` admits only the classes OC20 records need and raises
    :class:`UnsafePickleError` otherwise; ``safe=False`` unpickles with :mod:`pickle` and must
    only be used for files from a source you trust. ASE-DB and extxyz files are plain data.
"""

from __future__ import annotations

import _codecs
import bisect
import copyreg
import io
import json
import lzma
import math
import operator
import os
import pickle
import re
import struct
import threading
import warnings
import weakref
import zlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import lmdb
import numpy as np
import torch
from torch.utils.data import Dataset
from torch_geometric.data import Data

__all__ = [
    "FORMATS",
    "OC20",
    "OC20FormatError",
    "SyntheticSystem",
    "UnsafePickleError",
    "gas_references",
    "make_synthetic",
    "synthetic_systems",
    "write_aselmdb",
    "write_oc20",
]

TASKS = ("is2re", "s2ef")
FORMATS = ("lmdb-is2re", "lmdb-s2ef", "aselmdb", "extxyz")
MAX_Z = 118
RECIPE = "datasets/oc20/README.md"


class OC20FormatError(ValueError):
    """A file or record that is not valid OC20 data; the message names the file and record."""

    def __init__(self, file: str | os.PathLike, record: str | None, problem: str):
        self.file, self.record, self.problem = str(file), record, problem
        where = self.file if record is None else f"{self.file}, record {record}"
        super().__init__(f"{where}: {problem}")


class UnsafePickleError(OC20FormatError):
    """A pickled record names a class or function outside the ``safe=True`` allow-list."""

    def __init__(self, file: str | os.PathLike, record: str | None, refused: str):
        self.refused = refused
        super().__init__(
            file,
            record,
            f"refused to unpickle {refused!r}: safe=True admits only tensors, numpy arrays, "
            "PyG Data and builtin containers. Pass safe=False only if you trust this file: "
            "unpickling runs code named in it.",
        )


# ---------------------------------------------------------------------------------------------
# Safe unpickling of legacy LMDB records
# ---------------------------------------------------------------------------------------------


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


_MODULE_ALIASES = {"__builtin__": "builtins", "copy_reg": "copyreg"}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # torch.serialization.MAGIC_NUMBER of the legacy format
_STORAGE_DTYPES = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}


class _StorageUnpickler(pickle.Unpickler):
    """Reads the small pickles of a legacy ``torch.save`` storage blob; admits storage types."""

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise _Refused(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        return pid


def _storage_via_torch_load(blob: bytes) -> torch.Tensor:
    # Formats the fast path does not parse (zip, big-endian, storage views): torch's own
    # weights-only unpickler, which is restricted too.
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            storage = torch.load(io.BytesIO(blob), weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as err:
        named = re.search(r"GLOBAL ([\w.]+)", str(err))
        raise _Refused(
            f"{named.group(1) if named else 'an object'} inside a torch.load storage payload"
        ) from None
    if isinstance(storage, torch.UntypedStorage):
        return torch.empty(0, dtype=torch.uint8).set_(storage, 0, (storage.nbytes(),), (1,))
    if not isinstance(storage, torch.storage.TypedStorage):
        raise pickle.UnpicklingError(f"storage payload holds a {type(storage).__name__}")
    flat = torch.empty(0, dtype=storage.dtype)
    return flat.set_(storage._untyped_storage, 0, (storage.size(),), (1,))


def _storage_from_bytes(blob: bytes) -> torch.Tensor:
    """Safe stand-in for ``torch.storage._load_from_bytes``: a flat tensor over the storage.

    ``_load_from_bytes`` calls ``torch.load(weights_only=False)`` on bytes from the file;
    here the legacy layout (magic, protocol, sys_info, the storage's persistent id, its key,
    then int64 numel and the raw little-endian data) is parsed with a restricted unpickler.
    """
    if not isinstance(blob, (bytes, bytearray)):
        raise pickle.UnpicklingError("storage payload is not bytes")
    if blob[:2] == b"PK":
        return _storage_via_torch_load(blob)
    stream = io.BytesIO(blob)
    reader = _StorageUnpickler(stream)
    magic, _, sys_info = reader.load(), reader.load(), reader.load()
    pid, keys = reader.load(), reader.load()
    if magic != _LEGACY_MAGIC:
        raise pickle.UnpicklingError("storage payload is not a torch.save blob")
    simple = (
        isinstance(sys_info, dict)
        and sys_info.get("little_endian") is True
        and isinstance(pid, tuple)
        and len(pid) == 6
        and pid[0] == "storage"
        and isinstance(pid[1], torch.dtype)
        and pid[5] is None
        and keys == [pid[2]]
    )
    if not simple:
        return _storage_via_torch_load(blob)
    dtype: torch.dtype = pid[1]
    header = stream.read(8)
    if len(header) != 8:
        raise pickle.UnpicklingError("storage payload truncated")
    (numel,) = struct.unpack("<q", header)
    nbytes = numel * dtype.itemsize
    data = stream.read(nbytes) if numel > 0 else b""
    if numel < 0 or len(data) != nbytes:
        raise pickle.UnpicklingError(f"storage payload truncated ({len(data)} of {nbytes} bytes)")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype)


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: int,
    size: Sequence[int],
    stride: Sequence[int],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    # as_strided checks the view against the storage bounds; hooks and grad flags are dropped.
    if not isinstance(storage, torch.Tensor):
        raise pickle.UnpicklingError("tensor rebuilt from something that is not a storage")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor(storage: Any, storage_offset: int, size: Sequence[int], stride: Sequence[int]):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch_geometric.data import data as pyg_data
    from torch_geometric.data import storage as pyg_storage

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): bytearray,
        ("builtins", "complex"): complex,
        ("_codecs", "encode"): _codecs.encode,
        ("copyreg", "_reconstructor"): copyreg._reconstructor,
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = multiarray._reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = numeric._frombuffer
    for name in ("Data", "DataEdgeAttr", "DataTensorAttr"):
        if hasattr(pyg_data, name):
            allowed[("torch_geometric.data.data", name)] = getattr(pyg_data, name)
    for name in ("BaseStorage", "GlobalStorage", "NodeStorage", "EdgeStorage"):
        if hasattr(pyg_storage, name):
            allowed[("torch_geometric.data.storage", name)] = getattr(pyg_storage, name)
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


class _RestrictedUnpickler(pickle.Unpickler):
    """Admits only the globals in :func:`_allowed_globals` and no persistent ids."""

    def find_class(self, module: str, name: str) -> Any:
        module = _MODULE_ALIASES.get(module, module)
        try:
            return _allowed_globals()[(module, name)]
        except KeyError:
            raise _Refused(f"{module}.{name}") from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not part of OC20 records")


def _unpickle(raw: bytes, safe: bool, file: Path, record: str) -> Any:
    try:
        if safe:
            return _RestrictedUnpickler(io.BytesIO(raw)).load()
        return pickle.loads(raw)
    except _Refused as err:
        raise UnsafePickleError(file, record, err.qualname) from None
    except Exception as err:
        raise OC20FormatError(
            file, record, f"could not unpickle the value ({type(err).__name__}: {err})"
        ) from err


def _record_fields(obj: Any, file: Path, record: str) -> dict[str, Any]:
    if isinstance(obj, Data):
        if "_store" in obj.__dict__:
            return obj.to_dict()
        # A PyG 1.x pickle: attributes sit in __dict__ and every access raises under PyG 2.x.
        return {k: v for k, v in obj.__dict__.items() if v is not None and not k.startswith("_")}
    if isinstance(obj, dict):
        return dict(obj)
    raise OC20FormatError(file, record, f"value is a {type(obj).__name__}, not a PyG Data")


# ---------------------------------------------------------------------------------------------
# Record normalisation: the same fields and checks for every format
# ---------------------------------------------------------------------------------------------


def _as_int_id(value: Any, prefix: str, file: Path, record: str, name: str) -> int:
    if isinstance(value, torch.Tensor | np.ndarray):
        if math.prod(value.shape) != 1:
            raise OC20FormatError(file, record, f"{name} is not a single id")
        value = value.reshape(-1)[0].item()
    if isinstance(value, str):
        match = re.fullmatch(rf"(?:{prefix})?(\d+)", value.strip())
        if match is None:
            raise OC20FormatError(file, record, f"{name} {value!r} is not '{prefix}<int>'")
        return int(match.group(1))
    if isinstance(value, float | np.floating) and float(value).is_integer():
        return int(value)
    if isinstance(value, int | np.integer) and not isinstance(value, bool):
        return int(value)
    raise OC20FormatError(file, record, f"{name} {value!r} is not an integer id")


def _scalar(value: Any, file: Path, record: str, name: str) -> float:
    try:
        array = np.asarray(value.detach() if isinstance(value, torch.Tensor) else value)
        number = float(array.reshape(-1)[0]) if array.size == 1 else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise OC20FormatError(file, record, f"{name} is {value!r}, not a finite energy")
    return number


def _energy(value: Any, file: Path, record: str, name: str) -> torch.Tensor:
    return torch.tensor([_scalar(value, file, record, name)], dtype=torch.float32)


def _array(value: Any, dtype: torch.dtype, shape: tuple[int, ...], file, record, name):
    try:
        tensor = torch.as_tensor(value)
    except (TypeError, ValueError, RuntimeError) as err:
        raise OC20FormatError(file, record, f"{name} is not an array ({err})") from err
    if tensor.numel() != math.prod(shape):
        raise OC20FormatError(
            file, record, f"{name} has shape {tuple(tensor.shape)}, expected {shape}"
        )
    tensor = tensor.reshape(shape)
    if tensor.is_floating_point() and dtype in (torch.float32, torch.float64):
        finite = torch.isfinite(tensor)
        if not finite.all():
            rows = torch.nonzero(~finite.reshape(shape[0], -1).all(1)).flatten().tolist()
            raise OC20FormatError(file, record, f"non-finite values in {name} (rows {rows[:8]})")
    return tensor.to(dtype).contiguous()


def _make_item(
    raw: dict[str, Any], task: str, require_targets: bool, file: Path, record: str
) -> Data:
    """Checks one record's canonical fields and returns the normalised ``Data``."""
    for name in ("z", "pos", "cell"):
        if raw.get(name) is None:
            label = {"z": "atomic numbers"}.get(name, name)
            raise OC20FormatError(file, record, f"record has no {label}")
    try:
        shape = tuple(np.shape(raw["pos"]))
    except ValueError:  # a ragged nested list
        shape = ()
    if len(shape) != 2 or shape[1] != 3:
        raise OC20FormatError(file, record, f"pos has shape {shape}, not [n, 3]")
    n = shape[0]
    if n == 0:
        raise OC20FormatError(file, record, "empty structure (0 atoms)")
    pos = _array(raw["pos"], torch.float32, (n, 3), file, record, "pos")

    z_raw = _array(raw["z"], torch.float64, (n,), file, record, "atomic numbers")
    z = z_raw.long()
    unknown = (z < 1) | (z > MAX_Z) | (z != z_raw)
    if unknown.any():
        values = sorted({float(v) for v in z_raw[unknown].tolist()})
        raise OC20FormatError(file, record, f"unknown element(s): atomic numbers {values}")

    cell = _array(raw["cell"], torch.float32, (1, 3, 3), file, record, "cell")
    pbc_raw = raw.get("pbc")
    pbc = (
        torch.ones(1, 3, dtype=torch.bool)
        if pbc_raw is None
        else _array(pbc_raw, torch.bool, (1, 3), file, record, "pbc")
    )
    tags_raw = raw.get("tags")
    if tags_raw is None:
        raise OC20FormatError(file, record, "record has no tags")
    tags = _array(tags_raw, torch.float64, (n,), file, record, "tags")
    if ((tags != 0) & (tags != 1) & (tags != 2)).any():
        values = sorted({float(v) for v in tags.unique().tolist()} - {0.0, 1.0, 2.0})
        raise OC20FormatError(file, record, f"tags must be 0, 1 or 2, found {values}")
    tags = tags.long()
    fixed_raw = raw.get("fixed")
    fixed = (
        torch.zeros(n, dtype=torch.bool)
        if fixed_raw is None
        else _array(fixed_raw, torch.float64, (n,), file, record, "fixed") != 0
    )
    if raw.get("natoms") is not None:
        natoms = _as_int_id(raw["natoms"], "", file, record, "natoms")
        if natoms != n:
            raise OC20FormatError(file, record, f"natoms is {natoms} but pos holds {n} atoms")
    if raw.get("sid") is None:
        raise OC20FormatError(file, record, "record has no sid")
    sid = _as_int_id(raw["sid"], "random", file, record, "sid")

    item = Data(z=z, pos=pos, cell=cell, pbc=pbc, tags=tags, fixed=fixed, natoms=n, sid=sid)
    if task == "is2re":
        if raw.get("y_relaxed") is not None:
            item.y_relaxed = _energy(raw["y_relaxed"], file, record, "y_relaxed")
        elif require_targets:
            hint = " (an S2EF record? use task='s2ef')" if raw.get("y") is not None else ""
            raise OC20FormatError(file, record, f"record has no y_relaxed{hint}")
        if raw.get("y_init") is not None:
            item.y_init = _energy(raw["y_init"], file, record, "y_init")
        if raw.get("pos_relaxed") is not None:
            item.pos_relaxed = _array(
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
            item.y = _energy(raw["y"], file, record, "y")
        if raw.get("force") is not None:
            item.force = _array(raw["force"], torch.float32, (n, 3), file, record, "force")
        if raw.get("fid") is not None:
            item.fid = _as_int_id(raw["fid"], "frame", file, record, "fid")
    return item


def _first(fields: dict[str, Any], *names: str) -> Any:
    for name in names:
        if fields.get(name) is not None:
            return fields[name]
    return None


def _fixed_from_constraints(constraints: Any, n: int, file: Path, record: str) -> np.ndarray:
    fixed = np.zeros(n, dtype=bool)
    for constraint in constraints or []:
        if hasattr(constraint, "todict"):  # ase.constraints objects (extxyz)
            constraint = constraint.todict()
        name = constraint.get("name") if isinstance(constraint, dict) else None
        if name != "FixAtoms":
            raise OC20FormatError(
                file, record, f"unsupported constraint {name or constraint!r} (OC20 uses FixAtoms)"
            )
        kwargs = constraint.get("kwargs", {})
        if kwargs.get("indices") is not None:
            index = np.asarray(kwargs["indices"], dtype=np.int64).reshape(-1)
        else:
            index = np.flatnonzero(np.asarray(kwargs.get("mask", []), dtype=bool))
        if index.size and (index.min() < 0 or index.max() >= n):
            raise OC20FormatError(file, record, f"FixAtoms index out of range for {n} atoms")
        fixed[index] = True
    return fixed


# ---------------------------------------------------------------------------------------------
# Sources: one per on-disk format, each a flat index over its files
# ---------------------------------------------------------------------------------------------


def _open_lmdb(file: Path) -> lmdb.Environment:
    try:
        env = lmdb.open(
            str(file), subdir=False, readonly=True, lock=False, readahead=False, meminit=False
        )
    except lmdb.Error as err:
        raise OC20FormatError(file, None, f"not a readable LMDB file ({err})") from err
    # Pages past the end of a truncated file would be a SIGBUS through the memory map.
    needed = (env.info()["last_pgno"] + 1) * env.stat()["psize"]
    size = file.stat().st_size
    if size < needed:
        env.close()
        raise OC20FormatError(
            file, None, f"truncated LMDB file: {size} bytes on disk, its header needs {needed}"
        )
    return env


class _SharedEnv:
    """A read-only environment shared by every dataset on one LMDB file; closed with the last.

    LMDB forbids opening one file twice in a process (py-lmdb refuses it), so datasets share
    environments by the file's (device, inode). Forked DataLoader workers inherit and read
    through the parent's map, which is safe for read-only environments without locks.
    """

    def __init__(self, file: Path, stamp: tuple[int, int]):
        self.env, self.stamp = _open_lmdb(file), stamp
        weakref.finalize(self, self.env.close)


_SHARED_ENVS: weakref.WeakValueDictionary[tuple[int, int], _SharedEnv] = (
    weakref.WeakValueDictionary()
)
_SHARED_ENVS_LOCK = threading.Lock()


def _shared_env(file: Path) -> _SharedEnv:
    try:
        st = file.stat()
    except FileNotFoundError:
        raise FileNotFoundError(f"{file}: LMDB file not found (see {RECIPE})") from None
    key, stamp = (st.st_dev, st.st_ino), (st.st_size, st.st_mtime_ns)
    with _SHARED_ENVS_LOCK:
        holder = _SHARED_ENVS.get(key)
        if holder is None:
            holder = _SHARED_ENVS[key] = _SharedEnv(file, stamp)
        elif holder.stamp != stamp:
            raise OC20FormatError(
                file, None, "changed on disk while another dataset in this process reads it"
            )
        return holder


class _LMDBFiles:
    """Read-only LMDB environments of a list of files, opened on first use."""

    def __init__(self, files: list[Path]):
        self.files = files
        self._envs: dict[int, _SharedEnv] = {}

    def env(self, k: int) -> lmdb.Environment:
        if k not in self._envs:
            self._envs[k] = _shared_env(self.files[k])
        return self._envs[k].env

    def get(self, k: int, key: str) -> bytes | None:
        try:
            with self.env(k).begin() as txn:
                return txn.get(key.encode("ascii"))
        except lmdb.Error as err:
            raise OC20FormatError(self.files[k], key, f"LMDB read failed ({err})") from err

    def key_census(self, k: int, expected: list[str], reserved: Sequence[str]) -> str:
        """Describes which expected keys are missing and which keys are unexpected."""
        wanted, seen, unexpected = set(expected), set(), []
        try:
            with self.env(k).begin() as txn:
                for key in txn.cursor().iternext(values=False):
                    text = key.decode("ascii", "replace")
                    if text in wanted:
                        seen.add(text)
                    elif text not in reserved:
                        unexpected.append(text)
        except lmdb.Error as err:
            raise OC20FormatError(self.files[k], None, f"LMDB scan failed ({err})") from err
        missing = [key for key in expected if key not in seen]
        return (
            f"{len(missing)} missing (first: {missing[:5]}), "
            f"{len(unexpected)} unexpected (first: {unexpected[:5]})"
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_envs": {}}


class _LegacySource(_LMDBFiles):
    def __init__(self, files: list[Path], safe: bool):
        super().__init__(files)
        self.safe = safe
        self.skipped: dict[str, int] = {}
        self.offsets = np.cumsum([0] + [self._length(k) for k in range(len(files))]).tolist()

    def _length(self, k: int) -> int:
        file, env = self.files[k], self.env(k)
        entries = env.stat()["entries"]
        raw = self.get(k, "length")
        if raw is None:
            n, stored = entries, 0
        else:
            n, stored = _unpickle(raw, self.safe, file, "length"), 1
            if isinstance(n, torch.Tensor) and n.numel() == 1:
                n = n.item()
            if not isinstance(n, int | np.integer) or n < 0:
                raise OC20FormatError(file, "length", f"length is {n!r}, not a count")
            n = int(n)
        if entries != n + stored or (
            n > 0 and (self.get(k, "0") is None or self.get(k, str(n - 1)) is None)
        ):
            source = "its 'length' key" if stored else "its entry count"
            census = self.key_census(k, [str(i) for i in range(n)], ("length",))
            raise OC20FormatError(
                file, None, f"expected keys '0'..'{n - 1}' ({n} records, from {source}): {census}"
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
        obj = _unpickle(raw, self.safe, file, key)
        try:
            fields = _record_fields(obj, file, key)
        except OC20FormatError:
            raise
        except Exception as err:  # a Data whose pickled state is not PyG's
            problem = f"unreadable Data ({type(err).__name__}: {err})"
            raise OC20FormatError(file, key, problem) from err
        canonical = {
            "z": _first(fields, "atomic_numbers", "z"),
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
            "y": _first(fields, "y", "energy"),
            "force": _first(fields, "force", "forces"),
            "fid": fields.get("fid"),
        }
        return _make_item(canonical, task, require_targets, file, key)


_ASE_RESERVED = ("nextid", "deleted_ids", "metadata")


def _ase_json_hook(dct: dict[str, Any]) -> Any:
    if "__ndarray__" in dct:
        shape, dtype, flat = dct["__ndarray__"]
        if np.dtype(dtype).kind in "OV":
            raise ValueError(f"refusing ndarray of dtype {dtype}")
        return np.asarray(flat, dtype=dtype).reshape(shape)
    return dct


def _ase_json(raw: bytes, file: Path, record: str) -> Any:
    try:
        return json.loads(zlib.decompress(raw), object_hook=_ase_json_hook)
    except (zlib.error, ValueError, TypeError) as err:
        raise OC20FormatError(
            file, record, f"not a zlib-compressed ASE JSON value ({err})"
        ) from err


class _AseSource(_LMDBFiles):
    def __init__(self, files: list[Path]):
        super().__init__(files)
        self.ids: list[list[int]] = []
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

    def _ids(self, k: int) -> tuple[list[int], int]:
        file = self.files[k]
        meta = {}
        for name in _ASE_RESERVED:
            raw = self.get(k, name)
            if raw is not None:
                meta[name] = _ase_json(raw, file, name)
        entries = self.env(k).stat()["entries"]
        if "nextid" not in meta:
            if entries == len(meta):
                return [], 0
            raise OC20FormatError(file, None, "ASE-DB LMDB without a 'nextid' key")
        nextid, deleted = meta["nextid"], meta.get("deleted_ids") or []
        if not isinstance(nextid, int) or nextid < 1:
            raise OC20FormatError(file, "nextid", f"nextid is {nextid!r}, not a row id")
        gone = {int(i) for i in deleted}
        ids = [i for i in range(1, nextid) if i not in gone]
        if entries != len(ids) + len(meta) or (
            ids and (self.get(k, str(ids[0])) is None or self.get(k, str(ids[-1])) is None)
        ):
            census = self.key_census(k, [str(i) for i in ids], _ASE_RESERVED)
            raise OC20FormatError(
                file,
                None,
                f"expected row ids 1..{nextid - 1} less {len(gone)} deleted: {census}",
            )
        return ids, nextid - 1 - len(ids)

    def __len__(self) -> int:
        return self.offsets[-1]

    def read(self, index: int, task: str, require_targets: bool) -> Data:
        k = bisect.bisect_right(self.offsets, index) - 1
        row_id = self.ids[k][index - self.offsets[k]]
        key, file = str(row_id), self.files[k]
        raw = self.get(k, key)
        if raw is None:
            raise OC20FormatError(file, key, "row id missing from the LMDB")
        row = _ase_json(raw, file, key)
        if not isinstance(row, dict):
            raise OC20FormatError(file, key, f"row is a {type(row).__name__}, not an object")
        data = row.get("data") or {}
        pairs = row.get("key_value_pairs") or {}

        def lookup(name: str) -> Any:
            return data[name] if data.get(name) is not None else pairs.get(name)

        numbers = row.get("numbers")
        n = len(numbers) if numbers is not None else 0
        cell = row.get("cell")
        if isinstance(cell, dict):  # an encoded ase.cell.Cell
            cell = cell.get("array")
        tags = row.get("tags")
        energy, ref = row.get("energy"), lookup("ref_energy")
        y = energy
        if energy is not None and ref is not None:
            y = _scalar(energy, file, key, "energy") - _scalar(ref, file, key, "ref_energy")
        canonical = {
            "z": numbers,
            "pos": row.get("positions"),
            "cell": cell,
            "pbc": row.get("pbc"),
            # ASE stores tags only when some are non-zero.
            "tags": np.zeros(n, dtype=np.int64) if tags is None else tags,
            "fixed": _fixed_from_constraints(row.get("constraints"), n, file, key),
            "sid": row_id if lookup("sid") is None else lookup("sid"),
            "y_relaxed": lookup("y_relaxed"),
            "y_init": lookup("y_init"),
            "pos_relaxed": lookup("pos_relaxed"),
            "y": y,
            "force": row.get("forces"),
            "fid": lookup("fid"),
        }
        return _make_item(canonical, task, require_targets, file, key)


_XYZ_SUFFIXES = (".extxyz.xz", ".extxyz")


def _stem(file: Path, suffixes: Sequence[str]) -> str:
    for suffix in suffixes:
        if file.name.endswith(suffix):
            return file.name[: -len(suffix)]
    return file.name


def _read_bytes(file: Path) -> bytes:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: file not found (see {RECIPE})")
    try:
        if file.name.endswith(".xz"):
            with lzma.open(file, "rb") as fh:
                return fh.read()
        return file.read_bytes()
    except (lzma.LZMAError, EOFError) as err:
        raise OC20FormatError(file, None, f"corrupt xz stream ({err})") from err


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
                file, record, f"expected 'random<sid>,frame<fid>,<energy>': {line!r}"
            )
        sid = _as_int_id(parts[0], "random", file, record, "sid")
        fid = _as_int_id(parts[1], "frame", file, record, "fid")
        try:
            ref = float(parts[2])
        except ValueError:
            ref = math.nan
        if not math.isfinite(ref):
            raise OC20FormatError(file, record, f"reference energy {parts[2]!r} is not finite")
        rows.append((sid, fid, ref))
    return rows


class _ExtxyzSource:
    def __init__(self, files: list[Path]):
        self.files = files
        self.frames: list[list[tuple[int, int]]] = []
        self.refs: list[list[tuple[int, int, float]]] = []
        self.skipped: dict[str, int] = {}
        self._cache: tuple[int, bytes] | None = None
        for file in files:
            stem = _stem(file, _XYZ_SUFFIXES)
            txts = [file.with_name(stem + s) for s in (".txt", ".txt.xz")]
            txt = next((t for t in txts if t.is_file()), None)
            if txt is None:
                raise FileNotFoundError(
                    f"{file}: no {txts[0].name} beside it (S2EF frames need the "
                    f"'random<sid>,frame<fid>,<reference energy>' lines; see {RECIPE})"
                )
            frames = _scan_frames(_read_bytes(file), file)
            refs = _parse_txt(_read_bytes(txt), txt)
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
                self._cache = (k, _read_bytes(file))
            return self._cache[1][start:stop].decode()
        with open(file, "rb") as fh:
            fh.seek(start)
            return fh.read(stop - start).decode()

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
        results = atoms.calc.results if atoms.calc is not None else {}
        energy = results.get("energy", atoms.info.get("energy"))
        canonical = {
            "z": atoms.numbers,
            "pos": atoms.positions,
            "cell": atoms.cell.array,
            "pbc": atoms.pbc,
            "tags": atoms.get_tags(),
            "fixed": _fixed_from_constraints(atoms.constraints, len(atoms), file, record),
            "sid": sid,
            "fid": fid,
            "y": None if energy is None else _scalar(energy, file, record, "energy") - ref,
            "force": results.get("forces", atoms.arrays.get("forces")),
        }
        return _make_item(canonical, task, require_targets, file, record)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_cache": None}


def _natural_key(file: Path) -> list[Any]:
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", file.name)]


def _detect(path: Path) -> tuple[str, list[Path]]:
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist; see {RECIPE} for how to obtain OC20")
    if path.is_file():
        if path.name.endswith(".aselmdb"):
            return "aselmdb", [path]
        if path.name.endswith(_XYZ_SUFFIXES):
            return "extxyz", [path]
        if path.name.endswith(".lmdb"):
            return "lmdb", [path]
        raise ValueError(f"{path}: unknown OC20 file type (expected .lmdb, .aselmdb, .extxyz)")
    found = {
        "lmdb": sorted(path.glob("*.lmdb"), key=_natural_key),
        "aselmdb": sorted(path.glob("*.aselmdb"), key=_natural_key),
        "extxyz": sorted([p for s in _XYZ_SUFFIXES for p in path.glob("*" + s)], key=_natural_key),
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
        plain = {_stem(f, _XYZ_SUFFIXES) for f in files if f.name.endswith(".extxyz")}
        files = [
            f for f in files if f.name.endswith(".extxyz") or _stem(f, _XYZ_SUFFIXES) not in plain
        ]
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

    Records are checked when read: non-finite coordinates, empty structures, unknown
    elements, tags outside {0, 1, 2} and missing fields raise :class:`OC20FormatError`
    naming the file and record. Nothing is skipped silently: LMDB keys are checked against
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
            self._source: Any = _LegacySource(self.files, safe)
        elif self.format == "aselmdb":
            self._source = _AseSource(self.files)
        else:
            if task != "s2ef":
                raise ValueError(f"{self.path}: extxyz files hold S2EF frames; use task='s2ef'")
            self._source = _ExtxyzSource(self.files)
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


# ---------------------------------------------------------------------------------------------
# Synthetic OC20-format files: ASE fcc(111) slabs + adsorbates, EMT energies, BFGS relaxation
# ---------------------------------------------------------------------------------------------

_METALS = ("Cu", "Pt", "Au", "Ag", "Pd", "Ni", "Al")
_SIZES = ((2, 2, 3), (2, 2, 4), (3, 3, 3))
_SITES = ("ontop", "bridge", "fcc", "hcp")
# Adsorbates: (symbol, offset above the binding atom in Angstrom), binding atom first.
_ADSORBATES = {
    "O": (("O", 0.0),),
    "H": (("H", 0.0),),
    "C": (("C", 0.0),),
    "N": (("N", 0.0),),
    "OH": (("O", 0.0), ("H", 0.97)),
    "CO": (("C", 0.0), ("O", 1.15)),
    "CH": (("C", 0.0), ("H", 1.09)),
    "NH": (("N", 0.0), ("H", 1.02)),
}
FMAX = 0.05  # eV/Angstrom, BFGS convergence


@dataclass
class SyntheticSystem:
    """One simulated adsorbate + slab relaxation (total energies in eV, lengths in Angstrom).

    ``frames`` holds ``(fid, pos, total energy, forces)`` along the relaxation, the first
    and last included; adsorption energies are ``total - reference``.
    """

    sid: int
    numbers: np.ndarray
    tags: np.ndarray
    fixed: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray
    pos_init: np.ndarray
    pos_relaxed: np.ndarray
    energy_init: float
    energy_relaxed: float
    forces_init: np.ndarray
    reference: float
    frames: list[tuple[int, np.ndarray, float, np.ndarray]] = field(default_factory=list)

    @property
    def y_init(self) -> float:
        return self.energy_init - self.reference

    @property
    def y_relaxed(self) -> float:
        return self.energy_relaxed - self.reference


def _relax(atoms: Any, steps: int) -> list[tuple[np.ndarray, float, np.ndarray]]:
    from ase.optimize import BFGS

    def state() -> tuple[np.ndarray, float, np.ndarray]:
        return (
            atoms.positions.copy(),
            float(atoms.get_potential_energy()),
            atoms.get_forces(apply_constraint=False).copy(),
        )

    trajectory = [state()]
    if steps > 0:
        optimizer = BFGS(atoms, logfile=None)
        for _ in optimizer.irun(fmax=FMAX, steps=steps):
            if not np.array_equal(atoms.positions, trajectory[-1][0]):
                trajectory.append(state())
    return trajectory


@lru_cache(maxsize=8)
def gas_references(steps: int = 100) -> dict[str, float]:
    """EMT per-atom gas references (eV) built like OC20's from H2, H2O, CO and N2.

    ``H = E(H2)/2``, ``O = E(H2O) - E(H2)``, ``C = E(CO) - O``, ``N = E(N2)/2``; each
    molecule is ASE's g2 geometry in a 12 Angstrom box, relaxed with BFGS for up to
    ``steps`` steps (``fmax`` 0.05 eV/Angstrom).
    """
    from ase.build import molecule
    from ase.calculators.emt import EMT

    energy = {}
    for name in ("H2", "H2O", "CO", "N2"):
        mol = molecule(name)
        mol.set_cell([12.0, 12.0, 12.0])
        mol.center()
        mol.calc = EMT()
        energy[name] = _relax(mol, steps)[-1][1]
    o = energy["H2O"] - energy["H2"]
    return {"H": energy["H2"] / 2, "O": o, "C": energy["CO"] - o, "N": energy["N2"] / 2}


def _slab(metal: str, size: tuple[int, int, int]) -> Any:
    from ase.build import fcc111
    from ase.constraints import FixAtoms

    slab = fcc111(metal, size=size, vacuum=7.0, periodic=True)
    slab.set_constraint(FixAtoms(mask=slab.get_tags() >= 2))  # all but the top layer
    return slab


@lru_cache(maxsize=64)
def _clean_slab_energy(metal: str, size: tuple[int, int, int], steps: int) -> float:
    from ase.calculators.emt import EMT

    slab = _slab(metal, size)
    slab.calc = EMT()
    return _relax(slab, steps)[-1][1]


def synthetic_systems(
    n: int, seed: int = 0, steps: int = 100, frames: int = 3
) -> list[SyntheticSystem]:
    """Simulates ``n`` adsorbate-on-slab relaxations with ASE's EMT calculator.

    Each system: an fcc(111) slab of Cu, Pt, Au, Ag, Pd, Ni or Al (2x2x3, 2x2x4 or 3x3x3
    atoms, 7 Angstrom vacuum, periodic in all directions like OC20's VASP cells), all but the
    top layer fixed, with O, H, C, N, OH, CO, CH or NH placed 1.6-2.2 Angstrom above an
    ontop, bridge, fcc or hcp site (jittered), free atoms rattled by 0.02 Angstrom, then
    relaxed with BFGS (``fmax`` 0.05 eV/Angstrom, at most ``steps`` steps; ``steps=0`` keeps
    the initial structure: about 5 ms a system on one core instead of about 45 ms).

    The adsorption energy is ``E(slab+ads) - E(clean slab) - sum of gas references``
    (:func:`gas_references`), the clean slab relaxed the same way. Tags follow OC20 (ASE's
    0 -> 2 adsorbate, 1 -> 1 surface, deeper layers -> 0). ``frames`` caps the S2EF frames
    kept per system, evenly spaced along the relaxation.
    """
    from ase import Atoms
    from ase.build import add_adsorbate
    from ase.calculators.emt import EMT

    rng = np.random.default_rng(seed)
    refs = gas_references(steps)
    sids = rng.choice(9_000_000, size=n, replace=False) + 1_000_000
    systems = []
    for sid in sids.tolist():
        metal = _METALS[rng.integers(len(_METALS))]
        size = _SIZES[rng.integers(len(_SIZES))]
        name = list(_ADSORBATES)[rng.integers(len(_ADSORBATES))]
        site = _SITES[rng.integers(len(_SITES))]
        slab = _slab(metal, size)
        adsorbate = Atoms(
            [s for s, _ in _ADSORBATES[name]], positions=[(0, 0, dz) for _, dz in _ADSORBATES[name]]
        )
        add_adsorbate(slab, adsorbate, float(rng.uniform(1.6, 2.2)), site, mol_index=0)
        ase_tags = slab.get_tags()
        free = ase_tags < 2
        slab.positions[ase_tags == 0, :2] += rng.normal(0.0, 0.1, 2)
        slab.positions[free] += rng.normal(0.0, 0.02, (int(free.sum()), 3))
        slab.calc = EMT()
        trajectory = _relax(slab, steps)
        keep = np.unique(np.linspace(0, len(trajectory) - 1, max(1, frames)).round().astype(int))
        systems.append(
            SyntheticSystem(
                sid=int(sid),
                numbers=slab.numbers.astype(np.int64),
                tags=np.where(ase_tags == 0, 2, np.where(ase_tags == 1, 1, 0)).astype(np.int64),
                fixed=~free,
                cell=np.array(slab.cell[:], dtype=np.float64),
                pbc=slab.pbc.copy(),
                pos_init=trajectory[0][0],
                pos_relaxed=trajectory[-1][0],
                energy_init=trajectory[0][1],
                energy_relaxed=trajectory[-1][1],
                forces_init=trajectory[0][2],
                reference=_clean_slab_energy(metal, size, steps)
                + sum(refs[s] for s, _ in _ADSORBATES[name]),
                frames=[(int(i), *trajectory[i]) for i in keep.tolist()],
            )
        )
    return systems


def _write_lmdb(file: Path, values: list[bytes], length: bytes) -> None:
    file.parent.mkdir(parents=True, exist_ok=True)
    for stale in (file, file.with_name(file.name + "-lock")):
        stale.unlink(missing_ok=True)
    # Overflow values take whole 4 KiB pages: budget each value rounded up, twice over.
    map_size = 2 * sum(4096 * (len(v) // 4096 + 2) for v in values) + (16 << 20)
    env = lmdb.open(str(file), subdir=False, map_size=map_size, meminit=False, map_async=True)
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(values):
                txn.put(str(i).encode("ascii"), value)
            txn.put(b"length", length)
        env.sync(True)
    finally:
        env.close()
    file.with_name(file.name + "-lock").unlink(missing_ok=True)


def _base_record(system: SyntheticSystem, pos: np.ndarray) -> dict[str, Any]:
    # Field types of fairchem's AtomsToGraphs: float tensors for numbers, tags and fixed.
    return dict(
        pos=torch.tensor(pos, dtype=torch.float32),
        cell=torch.tensor(system.cell, dtype=torch.float32).view(1, 3, 3),
        atomic_numbers=torch.tensor(system.numbers, dtype=torch.float32),
        natoms=len(system.numbers),
        tags=torch.tensor(system.tags, dtype=torch.float32),
        fixed=torch.tensor(system.fixed, dtype=torch.float32),
        sid=system.sid,
    )


def _chunks(items: list[Any], parts: int) -> list[list[Any]]:
    bounds = np.linspace(0, len(items), max(1, min(parts, len(items))) + 1).round().astype(int)
    return [items[a:b] for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


def _atoms(system: SyntheticSystem, pos: np.ndarray, energy: float, forces: np.ndarray) -> Any:
    from ase import Atoms
    from ase.calculators.singlepoint import SinglePointCalculator
    from ase.constraints import FixAtoms

    atoms = Atoms(
        numbers=system.numbers, positions=pos, cell=system.cell, pbc=system.pbc, tags=system.tags
    )
    atoms.set_constraint(FixAtoms(indices=np.flatnonzero(system.fixed)))
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    return atoms


def write_aselmdb(file: Path, rows: list[dict[str, Any]], deleted: Sequence[int] = ()) -> None:
    """Writes ASE-DB rows (dicts of ASE row fields) as fairchem's ``.aselmdb`` does."""
    from ase.io.jsonio import encode

    def pack(obj: Any) -> bytes:
        return zlib.compress(encode(obj).encode())

    file.parent.mkdir(parents=True, exist_ok=True)
    for stale in (file, file.with_name(file.name + "-lock")):
        stale.unlink(missing_ok=True)
    values = [pack(row) for row in rows]
    map_size = 2 * sum(4096 * (len(v) // 4096 + 2) for v in values) + (16 << 20)
    env = lmdb.open(str(file), subdir=False, map_size=map_size, meminit=False, map_async=True)
    try:
        with env.begin(write=True) as txn:
            for i, value in enumerate(values, 1):
                if i not in deleted:
                    txn.put(str(i).encode("ascii"), value)
            txn.put(b"nextid", pack(len(rows) + 1))
            txn.put(b"metadata", pack({}))
            if deleted:
                txn.put(b"deleted_ids", pack(list(deleted)))
        env.sync(True)
    finally:
        env.close()
    file.with_name(file.name + "-lock").unlink(missing_ok=True)


def _ase_row(system: SyntheticSystem) -> dict[str, Any]:
    from ase.db.row import AtomsRow

    row = AtomsRow(_atoms(system, system.pos_init, system.energy_init, system.forces_init))
    dct = {k: row[k] for k in row.__dict__ if k[0] != "_" and k not in row._keys and k != "id"}
    dct["cell"] = np.asarray(dct["cell"])
    dct["constraints"] = [c.todict() for c in row.constraints]
    dct["data"] = {
        "sid": system.sid,
        "fid": 0,
        "ref_energy": system.reference,
        "y_init": system.y_init,
        "y_relaxed": system.y_relaxed,
        "pos_relaxed": system.pos_relaxed,
    }
    return dct


def write_oc20(
    path: str | os.PathLike, systems: list[SyntheticSystem], format: str, num_files: int = 2
) -> Path:
    """Writes simulated systems in one of OC20's formats (see :func:`make_synthetic`)."""
    import ase.io

    if format not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {format!r}")
    path = Path(path)
    if format == "lmdb-is2re":
        values = []
        for system in systems:
            record = _base_record(system, system.pos_init)
            record.update(
                y_init=system.y_init,
                y_relaxed=system.y_relaxed,
                pos_relaxed=torch.tensor(system.pos_relaxed, dtype=torch.float32),
            )
            values.append(pickle.dumps(Data(**record), protocol=pickle.HIGHEST_PROTOCOL))
        _write_lmdb(path, values, pickle.dumps(len(values), protocol=pickle.HIGHEST_PROTOCOL))
    elif format == "lmdb-s2ef":
        path.mkdir(parents=True, exist_ok=True)
        frames = [(s, f) for s in systems for f in s.frames]
        for k, chunk in enumerate(_chunks(frames, num_files)):
            values = []
            for system, (fid, pos, energy, forces) in chunk:
                record = _base_record(system, pos)
                record.update(
                    fid=fid,
                    y=energy - system.reference,
                    force=torch.tensor(forces, dtype=torch.float32),
                )
                values.append(pickle.dumps(Data(**record), protocol=pickle.HIGHEST_PROTOCOL))
            length = pickle.dumps(len(values), protocol=pickle.HIGHEST_PROTOCOL)
            _write_lmdb(path / f"data.{k:04d}.lmdb", values, length)
    elif format == "aselmdb":
        write_aselmdb(path, [_ase_row(system) for system in systems])
    else:
        path.mkdir(parents=True, exist_ok=True)
        frames = [(s, f) for s in systems for f in s.frames]
        for k, chunk in enumerate(_chunks(frames, num_files)):
            images = [_atoms(s, pos, energy, forces) for s, (_, pos, energy, forces) in chunk]
            ase.io.write(path / f"{k}.extxyz", images, format="extxyz")
            lines = [f"random{s.sid},frame{fid},{s.reference!r}" for s, (fid, *_) in chunk]
            (path / f"{k}.txt").write_text("\n".join(lines) + "\n")
    return path


def make_synthetic(
    path: str | os.PathLike,
    n: int,
    format: str = "lmdb-is2re",
    seed: int = 0,
    *,
    steps: int = 100,
    frames: int = 3,
    num_files: int = 2,
) -> Path:
    """Writes ``n`` simulated OC20-like systems in one of OC20's on-disk formats.

    Systems come from :func:`synthetic_systems` (ASE fcc(111) slab + adsorbate, EMT
    energies and forces, BFGS relaxation). Formats:

    * ``"lmdb-is2re"``: ``path`` is the ``data.lmdb`` file; one pickled PyG ``Data`` per
      system (initial ``pos``, ``y_init``, ``y_relaxed``, ``pos_relaxed``) and ``length``.
    * ``"lmdb-s2ef"``: ``path`` is a folder of ``data.NNNN.lmdb`` shards (``num_files``);
      one record per frame (``y`` adsorption-referenced, ``force``, ``fid``).
    * ``"aselmdb"``: ``path`` is the ``.aselmdb`` file; one row per system, the initial
      structure with its total energy and forces (readable as S2EF frame 0) and ``data``
      ``{sid, fid, ref_energy, y_init, y_relaxed, pos_relaxed}`` (readable as IS2RE).
    * ``"extxyz"``: ``path`` is a folder of ``<k>.extxyz`` frames (total energies) with
      ``<k>.txt`` lines ``random<sid>,frame<fid>,<reference energy>``.

    S2EF formats keep up to ``frames`` frames a system (one when ``steps=0``). Returns the
    path written.
    """
    systems = synthetic_systems(n, seed=seed, steps=steps, frames=frames)
    return write_oc20(path, systems, format, num_files=num_files)
