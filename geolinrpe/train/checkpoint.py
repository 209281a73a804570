r"""Writing and reading checkpoints: plain data only, atomically written, verified on load.

A checkpoint is a dict of tensors and plain data (dicts, lists, tuples, str, int, float,
bool, ``None``) written with :func:`torch.save`. :func:`save_checkpoint` adds
``"integrity": {"scheme": "sha256-v1", "sha256": ...}``, a SHA-256 of every tensor's dtype,
shape and bytes and of every other value, walked in a fixed order (:func:`content_digest`),
and replaces the file atomically (a temporary file in the same folder, then
:func:`os.replace`).

:func:`read_checkpoint` reads with ``torch.load(weights_only=True)`` only (nothing in the
file can run code), checks the zip CRCs of the archive (``torch.load`` does not), recomputes
the SHA-256 and checks the keys the caller needs. Every problem raises
:class:`CheckpointError` (a :class:`ValueError`) naming the file and what is wrong.
Checkpoints written before the hash existed still load, with a warning that they are
unverified.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
import zipfile
import zlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "INTEGRITY_KEY",
    "CheckpointError",
    "UnverifiedCheckpointWarning",
    "content_digest",
    "read_checkpoint",
    "save_checkpoint",
]

INTEGRITY_KEY = "integrity"
"""Key of the stored hash in a checkpoint dict."""

_SCHEME = "sha256-v1"


class CheckpointError(ValueError):
    """A checkpoint file is missing, truncated, corrupted, or lacks a key; names the file."""


class UnverifiedCheckpointWarning(UserWarning):
    """A checkpoint written before integrity hashes existed was loaded without a hash check."""


def _feed(h: Any, obj: Any, where: str) -> None:
    """Feed ``obj`` into hash ``h`` (type tags and lengths keep the encoding unambiguous)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu()
        if t.layout != torch.strided:
            raise TypeError(f"{where}: a {t.layout} tensor cannot be checkpointed")
        t = t.contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}:".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}:".encode())
        for key, value in sorted(obj.items(), key=lambda kv: (type(kv[0]).__name__, repr(kv[0]))):
            _feed(h, key, where)
            _feed(h, value, f"{where}[{key!r}]")
    elif isinstance(obj, (list, tuple)):
        h.update(f"{'L' if isinstance(obj, list) else 'U'}{len(obj)}:".encode())
        for i, value in enumerate(obj):
            _feed(h, value, f"{where}[{i}]")
    elif isinstance(obj, str):
        data = obj.encode("utf-8", "surrogatepass")
        h.update(f"S{len(data)}:".encode() + data)
    elif isinstance(obj, bytes):
        h.update(f"B{len(obj)}:".encode() + obj)
    elif obj is None or isinstance(obj, (bool, int, float, torch.dtype, torch.device)):
        text = repr(obj)
        h.update(f"{type(obj).__name__}{len(text)}:{text}".encode())
    else:
        raise TypeError(
            f"{where}: a {type(obj).__name__} is not plain data (checkpoints hold tensors, "
            "dicts, lists, tuples, str, int, float, bool and None only)"
        )


def content_digest(payload: Any) -> str:
    """SHA-256 (hex) of a checkpoint's content: tensors by dtype, shape and bytes, dicts in
    sorted key order, everything else by type and ``repr``.

    Raises:
        TypeError: ``payload`` holds something other than tensors and plain data.
    """
    h = hashlib.sha256()
    _feed(h, payload, "checkpoint")
    return h.hexdigest()


def save_checkpoint(payload: dict[str, Any], paths: str | Path | Sequence[str | Path]) -> None:
    """Write ``payload`` plus its :func:`content_digest` under ``"integrity"`` to each of
    ``paths``, atomically (temporary file in the same folder, flushed, then renamed).

    Raises:
        TypeError: ``payload`` holds something other than tensors and plain data (it would
            not load with ``weights_only=True``).
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    body = {k: v for k, v in payload.items() if k != INTEGRITY_KEY}
    body[INTEGRITY_KEY] = {"scheme": _SCHEME, "sha256": content_digest(body)}
    for path in paths:
        path = Path(path)
        tmp = path.with_name(f".{path.name}.tmp")
        with open(tmp, "wb") as f:
            torch.save(body, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)


def _check_zip(path: Path) -> None:
    """The archive's central directory and every member's CRC-32 (``torch.load`` checks
    neither)."""
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a checkpoint (no zip archive found)"
        )
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is truncated or not a checkpoint ({err})"
        ) from err
    if bad is not None:
        raise CheckpointError(
            f"checkpoint {str(path)!r} failed its integrity check: the CRC-32 of member "
            f"{bad!r} does not match its data (the file is corrupted)"
        )


def read_checkpoint(
    path: str | Path, required: Sequence[str] = (), what: str = "geolinrpe checkpoint"
) -> dict[str, Any]:
    """Read and verify a checkpoint written by :func:`save_checkpoint`.

    Reads only with ``torch.load(weights_only=True)``; checks the zip CRCs, the stored
    SHA-256 (a checkpoint without one loads with an :class:`UnverifiedCheckpointWarning`)
    and that every key of ``required`` is present. Returns the dict without the hash.

    Raises:
        CheckpointError: the file is missing, truncated, corrupted (CRC or hash mismatch),
            holds objects other than tensors and plain data, or lacks a required key; the
            message names the file (and the key).
    """
    path = Path(path)
    name = str(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {name!r} does not exist")
    _check_zip(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise CheckpointError(
            f"checkpoint {name!r} holds objects other than tensors and plain data and was not "
            f"loaded (nothing in it was run): {first}"
        ) from err
    except Exception as err:  # torch's reader raises many kinds on damaged archives
        raise CheckpointError(
            f"checkpoint {name!r} is truncated or not a checkpoint ({type(err).__name__}: "
            f"{str(err).strip().splitlines()[0] if str(err).strip() else ''})"
        ) from err
    if not isinstance(ckpt, dict):
        raise CheckpointError(
            f"checkpoint {name!r} is not a {what}: it holds a {type(ckpt).__name__}, not a dict"
        )
    stored = ckpt.pop(INTEGRITY_KEY, None)
    if stored is None:
        warnings.warn(
            f"checkpoint {name!r} has no integrity hash (written by an older version): "
            "loaded unverified",
            UnverifiedCheckpointWarning,
            stacklevel=2,
        )
    else:
        if (
            not isinstance(stored, dict)
            or stored.get("scheme") != _SCHEME
            or not isinstance(stored.get("sha256"), str)
        ):
            raise CheckpointError(
                f"checkpoint {name!r} failed its integrity check: key {INTEGRITY_KEY!r} is not "
                f"a {_SCHEME} hash record"
            )
        try:
            actual = content_digest(ckpt)
        except TypeError as err:
            raise CheckpointError(f"checkpoint {name!r}: {err}") from err
        if actual != stored["sha256"]:
            raise CheckpointError(
                f"checkpoint {name!r} failed its integrity check: the SHA-256 hash of its "
                f"contents ({actual[:16]}...) does not match the stored hash "
                f"({stored['sha256'][:16]}...); the file is corrupted or was modified"
            )
    for key in required:
        if key not in ckpt:
            raise CheckpointError(f"checkpoint {name!r} is not a {what}: key {key!r} is missing")
    return ckpt
