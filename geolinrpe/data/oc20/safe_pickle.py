r"""Safe unpickling of legacy OC20 LMDB records: an allow-list and a memory budget.

Legacy LMDB values are pickled PyG :class:`~torch_geometric.data.Data`. :func:`unpickle` with
``safe=True`` (the default of :class:`~geolinrpe.data.OC20`) admits only the globals such
records need: tensors and their storages, numpy arrays, PyG ``Data`` and its storages, torch
dtypes and builtin containers. Anything else (``builtins.exec``, ``os.system``,
``torch.load``, ...) raises :class:`UnsafePickleError` before it is called.

Admitted callables are wrapped so that a record cannot allocate more than
:func:`~.records.record_budget` of its byte size: ``bytearray(n)``, ``numpy`` arrays of a
declared shape, tensor views larger than their storage (stride-0 views) and zip-packed
storages are checked before anything is allocated. ``safe=False`` runs :mod:`pickle` as is
(code named in the file runs): only for files you trust. See ``SECURITY.md``.
"""

from __future__ import annotations

import _codecs
import copyreg
import io
import math
import pickle
import re
import struct
import threading
import warnings
import zipfile
from collections import OrderedDict
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .records import OC20FormatError, record_budget

__all__ = ["UnsafePickleError", "unpickle"]


class UnsafePickleError(OC20FormatError):
    """A pickled record names a class or function outside the ``safe=True`` allow-list."""

    def __init__(self, file: str, record: str | None, refused: str):
        self.refused = refused
        super().__init__(
            file,
            record,
            f"refused to unpickle {refused!r}: safe=True admits only tensors, numpy arrays, "
            "PyG Data and builtin containers. Pass safe=False only if you trust this file: "
            "unpickling runs code named in it.",
        )


class _Refused(pickle.UnpicklingError):
    def __init__(self, qualname: str):
        super().__init__(qualname)
        self.qualname = qualname


class _OverBudget(pickle.UnpicklingError):
    """A record asked for more memory than its budget allows."""


class _Budget(threading.local):
    left: int | None = None


_BUDGET = _Budget()


def _charge(nbytes: int, what: str) -> None:
    """Takes ``nbytes`` from the record's budget before ``what`` is allocated."""
    left = _BUDGET.left
    if left is None:
        return
    if nbytes > left:
        raise _OverBudget(f"{what} would allocate {nbytes:,} bytes, over the record's budget")
    _BUDGET.left = left - nbytes


def _numel(shape: Any) -> int:
    dims = (shape,) if isinstance(shape, int) else tuple(shape)
    if not all(isinstance(d, int) and d >= 0 for d in dims):
        raise pickle.UnpicklingError(f"shape {dims!r} is not a tuple of sizes")
    return math.prod(dims)


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
    # weights-only unpickler, which is restricted too, after the zip's sizes are budgeted.
    if blob[:2] == b"PK":
        try:
            with zipfile.ZipFile(io.BytesIO(blob)) as archive:
                unpacked = sum(info.file_size for info in archive.infolist())
        except (zipfile.BadZipFile, ValueError, OSError) as err:
            raise pickle.UnpicklingError(f"storage payload is not a valid zip ({err})") from None
        _charge(unpacked, "a zip-packed storage")
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
    if not isinstance(blob, bytes | bytearray):
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
    if numel < 0 or nbytes > len(blob) - stream.tell():
        raise pickle.UnpicklingError(f"storage payload truncated ({numel} elements announced)")
    if numel == 0:
        return torch.empty(0, dtype=dtype)
    _charge(nbytes, "a tensor storage")
    return torch.frombuffer(bytearray(stream.read(nbytes)), dtype=dtype)


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
    numel = _numel(size)
    if numel > storage.numel():
        # Overlapping (stride-0) views would turn a few bytes into a huge item once copied.
        raise pickle.UnpicklingError(
            f"tensor of {numel:,} elements is a view of a {storage.numel():,}-element storage"
        )
    _charge(numel * storage.element_size(), "a tensor view")
    return storage.as_strided(tuple(size), tuple(stride), int(storage_offset))


def _rebuild_tensor(storage: Any, storage_offset: int, size: Sequence[int], stride: Sequence[int]):
    return _rebuild_tensor_v2(storage, storage_offset, size, stride)


def _bytearray(*args: Any) -> bytearray:
    if args and isinstance(args[0], int):
        _charge(args[0], "bytearray")
    elif args and isinstance(args[0], str | bytes | bytearray | list | tuple):
        _charge(len(args[0]), "bytearray")
    return bytearray(*args)


def _latin1_encode(obj: Any, encoding: str = "utf-8", errors: str = "strict") -> bytes:
    # Protocol-2 pickles of bytes call _codecs.encode(text, "latin1"); other codecs
    # (hex, zlib, base64, ...) would let a record expand or transform data.
    if encoding not in ("latin1", "latin-1", "latin_1") or not isinstance(obj, str):
        raise _Refused(f"_codecs.encode(..., {encoding!r})")
    _charge(len(obj), "_codecs.encode")
    return _codecs.encode(obj, encoding, errors)


def _ndarray(*args: Any, **kwargs: Any) -> np.ndarray:
    """``numpy.ndarray`` called from a pickle: its declared shape is budgeted first."""
    shape = args[0] if args else kwargs.get("shape", ())
    dtype = np.dtype(args[1] if len(args) > 1 else kwargs.get("dtype", float))
    _charge(_numel(shape) * dtype.itemsize, "numpy.ndarray")
    return np.ndarray(*args, **kwargs)


def _copyreg_reconstructor(cls: Any, base: Any, state: Any) -> Any:
    # Protocol 0/1 pickles of plain classes use base=object; other bases would call
    # base.__init__(obj, state) (bytearray(2**30), ...).
    if base is not object or not isinstance(cls, type):
        raise _Refused(f"copyreg._reconstructor with base {getattr(base, '__name__', base)!r}")
    return copyreg._reconstructor(cls, base, state)


@lru_cache(maxsize=1)
def _allowed_globals() -> dict[tuple[str, str], Any]:
    from torch_geometric.data import data as pyg_data
    from torch_geometric.data import storage as pyg_storage

    try:
        from numpy._core import multiarray, numeric
    except ImportError:  # numpy < 2
        from numpy.core import multiarray, numeric

    def reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not _ndarray:
            raise _Refused(f"numpy array subclass {getattr(subtype, '__name__', subtype)!r}")
        _charge(_numel(shape) * np.dtype(dtype).itemsize, "numpy array")
        return multiarray._reconstruct(np.ndarray, shape, dtype)

    def frombuffer(buf: Any, dtype: Any, shape: Any, order: str) -> np.ndarray:
        _charge(_numel(shape) * np.dtype(dtype).itemsize, "numpy array")
        return numeric._frombuffer(buf, dtype, shape, order)

    allowed: dict[tuple[str, str], Any] = {
        ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
        ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
        ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
        ("torch", "Size"): torch.Size,
        ("collections", "OrderedDict"): OrderedDict,
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "bytearray"): _bytearray,
        ("builtins", "complex"): complex,
        ("builtins", "object"): object,  # the base of protocol 0/1 copyreg._reconstructor
        ("_codecs", "encode"): _latin1_encode,
        ("copyreg", "_reconstructor"): _copyreg_reconstructor,
        ("numpy", "ndarray"): _ndarray,
        ("numpy", "dtype"): np.dtype,
    }
    for prefix in ("numpy.core", "numpy._core"):
        allowed[(f"{prefix}.multiarray", "_reconstruct")] = reconstruct
        allowed[(f"{prefix}.multiarray", "scalar")] = multiarray.scalar
        allowed[(f"{prefix}.numeric", "_frombuffer")] = frombuffer
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


def unpickle(raw: bytes, safe: bool, file: Path | str, record: str) -> Any:
    """Unpickles one record's bytes; errors name ``file`` and ``record``.

    ``safe=True``: only allow-listed globals, and at most ``record_budget(len(raw))`` bytes
    allocated by the callables the pickle names.
    """
    try:
        if not safe:
            return pickle.loads(raw)
        _BUDGET.left = record_budget(len(raw))
        try:
            return _RestrictedUnpickler(io.BytesIO(raw)).load()
        finally:
            _BUDGET.left = None
    except _Refused as err:
        raise UnsafePickleError(str(file), record, err.qualname) from None
    except _OverBudget as err:
        raise OC20FormatError(
            file, record, f"{err} ({record_budget(len(raw)):,} bytes for {len(raw):,} on disk)"
        ) from None
    except Exception as err:
        raise OC20FormatError(
            file, record, f"could not unpickle the value ({type(err).__name__}: {err})"
        ) from err
