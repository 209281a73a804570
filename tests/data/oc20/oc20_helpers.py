"""Helpers shared by the OC20 tests: raw LMDB files and minimal legacy records."""

from __future__ import annotations

import pickle
from pathlib import Path

import lmdb
import torch
from torch_geometric.data import Data


def write_raw_lmdb(file: Path, values: dict[bytes, bytes]) -> Path:
    env = lmdb.open(str(file), subdir=False, map_size=1 << 24)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    return file


def record(**overrides) -> Data:
    fields = dict(
        pos=torch.tensor([[0.0, 0.0, 7.0], [1.5, 0.0, 7.0], [0.7, 0.7, 9.0]]),
        cell=torch.eye(3).view(1, 3, 3) * 5,
        atomic_numbers=torch.tensor([29.0, 29.0, 8.0]),
        natoms=3,
        tags=torch.tensor([1.0, 1.0, 2.0]),
        fixed=torch.tensor([1.0, 0.0, 0.0]),
        sid=7,
        y_relaxed=-0.5,
    )
    fields.update(overrides)
    return Data(**fields)


def legacy_lmdb(file: Path, records: list) -> Path:
    values = {str(i).encode(): pickle.dumps(r, protocol=-1) for i, r in enumerate(records)}
    values[b"length"] = pickle.dumps(len(records))
    return write_raw_lmdb(file, values)


def in_child(fn, *args):
    """Runs ``fn(*args)`` in a forked child; returns ``(signal or None, result)``.

    The result comes back pickled through a pipe (test data only); a child killed by a
    signal returns that signal and ``None``.
    """
    import os
    import signal

    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        try:
            result = fn(*args)
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            result = ("raised", type(err).__name__, str(err))
        with os.fdopen(write_end, "wb") as fh:
            pickle.dump(result, fh)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        blob = fh.read()
    _, status = os.waitpid(pid, 0)
    if os.WIFSIGNALED(status):
        return signal.Signals(os.WTERMSIG(status)).name, None
    return None, pickle.loads(blob)


def peak_rss_increase(fn, *args) -> tuple[int, object]:
    """Bytes by which ``fn(*args)`` raised the peak resident set size, run in a child."""
    import resource

    def measure():
        with open("/proc/self/status") as fh:
            start = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
        try:
            outcome = ("returned", fn(*args))
        except BaseException as err:  # noqa: BLE001 - reported to the parent
            outcome = ("raised", type(err).__name__, str(err))
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return (peak - start) * 1024, outcome

    died, result = in_child(measure)
    assert died is None, f"child killed by {died}"
    return result
