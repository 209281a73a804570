"""Bad inputs tried per class, and what the library did with each (the table of SECURITY.md).

Every input runs in a forked child process, so a signal (SIGBUS, SIGSEGV), a hang or a
memory blow-up is measured instead of ending the benchmark. Each outcome is one of:

* ``named error``: an exception whose message names the file (and the record, where the
  input has records) or, for inputs that are not files, the argument;
* ``read correctly``: the input was legitimate after all (a byte flip in unused space) and
  the values read equal the original's;
* ``crashed``: an exception that does not name the file, or an unexpected exception type;
* ``silently wrong``: values were returned that differ from the truth, without a word;
* ``killed``: the child died by a signal;
* ``code executed``: a marker file that the payload would create exists afterwards.

``peak MiB`` is the largest rise of the child's resident set size over a rejected input, to
compare with the target of 50 MB plus 10x the input's size.

    python benchmarks/security.py [--quick] [--json PATH] [--flips N]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import random
import resource
import signal
import struct
import tempfile
import time
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

OUTCOMES = (
    "named error",
    "read correctly",
    "crashed",
    "silently wrong",
    "killed",
    "code executed",
)
MB = 1 << 20
TIMEOUT_S = 120


@dataclass
class Case:
    """One bad input: ``run()`` reads it; ``names`` must appear in the error message."""

    cls: str
    label: str
    run: Callable[[], Any]
    names: list[str]
    nbytes: int = 0
    marker: Path | None = None
    truth: Callable[[Any], bool] | None = None  # when reading is right, not an attack


@dataclass
class Result:
    cls: str
    label: str
    outcome: str
    message: str
    peak_mib: float
    nbytes: int
    extra: dict[str, Any] = field(default_factory=dict)


def _child(case: Case) -> tuple[str, Any, str]:
    with open("/proc/self/status") as fh:
        start = next(int(line.split()[1]) for line in fh if line.startswith("VmRSS"))
    try:
        value = case.run()
        kind, message = "returned", ""
        verdict = case.truth(value) if case.truth is not None else False
    except BaseException as err:  # noqa: BLE001 - classified by the parent
        kind, message, verdict = type(err).__name__, str(err), False
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - start
    return kind, verdict, f"{peak}\n{message}"


def run_case(case: Case) -> Result:
    """Runs ``case`` in a forked child and classifies what happened."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        os.close(read_end)
        signal.alarm(TIMEOUT_S)
        try:
            payload = pickle.dumps(_child(case))
        except BaseException as err:  # noqa: BLE001
            payload = pickle.dumps((type(err).__name__, False, f"0\n{err}"))
        with os.fdopen(write_end, "wb") as fh:
            fh.write(payload)
        os._exit(0)
    os.close(write_end)
    with os.fdopen(read_end, "rb") as fh:
        blob = fh.read()
    _, status = os.waitpid(pid, 0)
    if case.marker is not None and case.marker.exists():
        case.marker.unlink()
        return Result(case.cls, case.label, "code executed", "", 0.0, case.nbytes)
    if os.WIFSIGNALED(status):
        name = signal.Signals(os.WTERMSIG(status)).name
        return Result(case.cls, case.label, "killed", name, 0.0, case.nbytes)
    kind, verdict, rest = pickle.loads(blob)
    peak_kib, message = rest.split("\n", 1)
    peak = int(peak_kib) / 1024
    if kind == "returned":
        outcome = "read correctly" if verdict else "silently wrong"
    elif all(name in message for name in case.names):
        outcome = "named error"
    else:
        outcome = "crashed"
    return Result(case.cls, case.label, outcome, f"{kind}: {message[:300]}", peak, case.nbytes)


# ---------------------------------------------------------------------------------------------
# OC20 files
# ---------------------------------------------------------------------------------------------


class Reduce:
    """Pickles as ``fn(*args)``."""

    def __init__(self, fn: Any, *args: Any):
        self.fn, self.args = fn, args

    def __reduce__(self) -> tuple[Any, tuple[Any, ...]]:
        return (self.fn, self.args)


def _raw_lmdb(path: Path, values: dict[bytes, bytes]) -> Path:
    import lmdb

    env = lmdb.open(str(path), subdir=False, map_size=1 << 26)
    with env.begin(write=True) as txn:
        for key, value in values.items():
            txn.put(key, value)
    env.close()
    path.with_name(path.name + "-lock").unlink(missing_ok=True)
    return path


def _record(**overrides: Any) -> Any:
    from torch_geometric.data import Data

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


def _read_all(path: Path, task: str = "is2re") -> list[Any]:
    from geolinrpe.data.oc20 import OC20

    ds = OC20(path, task=task, require_targets=False)
    return [ds[i] for i in range(len(ds))]


def _read_one(path: Path, index: int, task: str = "is2re") -> Any:
    from geolinrpe.data.oc20 import OC20

    return OC20(path, task=task, require_targets=False)[index]


def oc20_pickle_gadgets(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Legacy LMDB records whose pickle calls code; read with the default ``safe=True``."""
    import builtins
    import importlib
    import subprocess

    marker = work / "pwned"
    command = f"touch {marker}"
    gadgets = {
        "os.system": Reduce(os.system, command),
        "os.popen": Reduce(os.popen, command),
        "subprocess.call": Reduce(subprocess.call, ["touch", str(marker)]),
        "subprocess.Popen": Reduce(subprocess.Popen, ["touch", str(marker)]),
        "builtins.exec": Reduce(builtins.exec, f"open({str(marker)!r}, 'w')"),
        "builtins.eval": Reduce(builtins.eval, f"open({str(marker)!r}, 'w')"),
        "builtins.open": Reduce(builtins.open, str(marker), "w"),
        "builtins.getattr": Reduce(getattr, Reduce(builtins.__import__, "os"), "system"),
        "builtins.__import__": Reduce(builtins.__import__, "os"),
        "importlib.import_module": Reduce(importlib.import_module, "os"),
        "torch.load": Reduce(torch.load, str(marker)),
        "numpy.load": Reduce(np.load, str(marker)),
        "torch.storage._load_from_bytes(zip of os.system)": None,
        "torch.storage._load_from_bytes(legacy of os.system)": None,
        "inside a Data field": _record(extra=Reduce(os.system, command)),
        "pickle.loads": Reduce(pickle.loads, pickle.dumps(Reduce(os.system, command))),
        "copyreg._reconstructor(os.system)": Reduce(
            __import__("copyreg")._reconstructor, os.system, object, None
        ),
    }
    import io

    for label in [k for k, v in gadgets.items() if v is None]:
        blob = io.BytesIO()
        legacy = "legacy" in label
        torch.save(Reduce(os.system, command), blob, _use_new_zipfile_serialization=not legacy)
        gadgets[label] = Reduce(torch.storage._load_from_bytes, blob.getvalue())
    for i, (label, gadget) in enumerate(gadgets.items()):
        payload = pickle.dumps(gadget, protocol=2 if i % 2 else 5)
        path = _raw_lmdb(work / f"gadget{i}.lmdb", {b"0": payload})
        yield Case(
            "code execution: OC20 legacy pickles (safe=True)",
            label,
            lambda path=path: _read_all(path),
            [str(path), "record 0"],
            len(payload),
            marker,
        )


def oc20_memory(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Records and files that declare far more data than they hold."""
    import copyreg
    import lzma

    from geolinrpe.data.oc20 import make_synthetic, write_aselmdb

    try:
        from numpy._core import multiarray
    except ImportError:  # numpy < 2
        from numpy.core import multiarray
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        small = torch.arange(6, dtype=torch.float32).storage()
    rebuild = torch._utils._rebuild_tensor_v2
    from collections import OrderedDict

    payloads = {
        "bytearray(1 GiB) (30-byte record)": Reduce(bytearray, 1 << 30),
        "stride-0 view, 20M atoms": _record(
            pos=Reduce(rebuild, small, 0, (20_000_000, 3), (0, 1), False, OrderedDict())
        ),
        "numpy.ndarray((1e9,))": Reduce(np.ndarray, (1_000_000_000,)),
        "numpy _reconstruct 1e9": Reduce(multiarray._reconstruct, np.ndarray, (10**9,), "f8"),
        "copyreg._reconstructor(bytearray, 1 GiB)": Reduce(
            copyreg._reconstructor, bytearray, bytearray, 1 << 30
        ),
    }
    for i, (label, obj) in enumerate(payloads.items()):
        payload = pickle.dumps(obj, protocol=2)
        path = _raw_lmdb(work / f"mem{i}.lmdb", {b"0": payload})
        yield Case(
            "memory: records declaring more than they hold",
            label,
            lambda path=path: _read_all(path),
            [str(path), "record 0"],
            len(payload),
        )
    values = {str(i).encode(): pickle.dumps(_record(sid=i)) for i in range(3)}
    path = _raw_lmdb(work / "length.lmdb", {**values, b"length": pickle.dumps(10**9)})
    yield Case(
        "memory: records declaring more than they hold",
        "'length' key of 1e9",
        lambda: _read_all(path),
        [str(path)],
        path.stat().st_size,
    )
    row = {"numbers": [29, 8], "positions": [[0, 0, 0], [0, 0, 2]], "cell": np.eye(3) * 5}
    nextid = work / "nextid.aselmdb"
    write_aselmdb(nextid, [row, row])
    _raw_lmdb(nextid, {b"nextid": zlib.compress(b"1000000000")})
    yield Case(
        "memory: records declaring more than they hold",
        "aselmdb 'nextid' of 1e9",
        lambda: _read_all(nextid, "s2ef"),
        [str(nextid)],
        nextid.stat().st_size,
    )
    from ase.io.jsonio import encode

    bomb_file = work / "bomb.aselmdb"
    write_aselmdb(bomb_file, [row])
    deflate = zlib.compressobj(9)
    bomb = b"".join(deflate.compress(b" " * MB) for _ in range(1000))
    bomb += deflate.compress(encode(row).encode()) + deflate.flush()
    _raw_lmdb(bomb_file, {b"1": bomb})
    yield Case(
        "memory: records declaring more than they hold",
        f"aselmdb row: {len(bomb) // 1024} KB of zlib expanding to 1 GB",
        lambda: _read_all(bomb_file, "s2ef"),
        [str(bomb_file), "record 1"],
        len(bomb),
    )
    folder = make_synthetic(work / "xz", 1, "extxyz", steps=0, num_files=1)
    text = (folder / "0.extxyz").read_bytes()
    (folder / "0.extxyz").unlink()
    packer = lzma.LZMACompressor(preset=0)
    xz = packer.compress(text) + b"".join(packer.compress(b"\n" * MB) for _ in range(500))
    xz += packer.flush()
    (folder / "0.extxyz.xz").write_bytes(xz)
    yield Case(
        "memory: records declaring more than they hold",
        f"extxyz.xz: {len(xz) // 1024} KB expanding to 500 MB",
        lambda: _read_all(folder, "s2ef"),
        [str(folder / "0.extxyz.xz")],
        len(xz),
    )


def oc20_float32(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Finite float64 values beyond float32's range, in every OC20 format."""
    from geolinrpe.data.oc20 import make_synthetic, write_aselmdb

    cls = "float32 overflow: OC20 readers"
    for field_name, value in (("pos", 1e300), ("y_relaxed", 1e39), ("pos_relaxed", -1e39)):
        if field_name == "y_relaxed":
            rec = _record(y_relaxed=value)
        else:
            data = torch.tensor([[0.0, 0, 7], [value, 0, 7], [0.7, 0.7, 9]], dtype=torch.float64)
            rec = _record(**{field_name: data})
        path = _raw_lmdb(work / f"f32_{field_name}.lmdb", {b"0": pickle.dumps(rec)})
        yield Case(cls, f"legacy LMDB {field_name}={value:g}", lambda p=path: _read_all(p),
                   [str(path), "record 0", field_name])  # fmt: skip
    row = {"numbers": [29, 8], "positions": [[0, 0, 0], [0, 0, 1e300]], "cell": np.eye(3) * 5}
    path = work / "f32.aselmdb"
    write_aselmdb(path, [row, {**row, "positions": [[0, 0, 0], [0, 0, 2]], "energy": 1e39}])
    yield Case(cls, "aselmdb positions=1e300", lambda: _read_one(path, 0, "s2ef"),
               [str(path), "record 1", "pos"])  # fmt: skip
    yield Case(cls, "aselmdb energy=1e39", lambda: _read_one(path, 1, "s2ef"),
               [str(path), "record 2", "y"])  # fmt: skip

    folder = make_synthetic(work / "f32xyz", 1, "extxyz", steps=0, num_files=1)
    lines = (folder / "0.extxyz").read_text().splitlines(keepends=True)
    parts = lines[2].split()
    parts[1] = "1e300"
    lines[2] = " ".join(parts) + "\n"
    (folder / "0.extxyz").write_text("".join(lines))
    yield Case(cls, "extxyz position=1e300", lambda: _read_all(folder, "s2ef"),
               [str(folder / "0.extxyz"), "frame 0", "pos"])  # fmt: skip


def _structural_offsets(blob: bytes, psize: int) -> list[int]:
    offsets = []
    for pgno in range(len(blob) // psize):
        base = pgno * psize
        flags = struct.unpack_from("<H", blob, base + 10)[0]
        if flags & 0x04:  # overflow page: only its header is structure
            offsets += range(base, base + 16)
        elif flags & 0x0B:  # meta, branch or leaf page
            lower, upper = struct.unpack_from("<HH", blob, base + 12)
            used = list(range(base, base + lower)) + list(range(base + upper, base + psize))
            offsets += used if not flags & 0x08 else range(base, base + 160)
    return offsets


def _py_lmdb_read_all(path: Path) -> int:
    """What the loader did before: every key through py-lmdb's memory map."""
    import lmdb

    env = lmdb.open(str(path), subdir=False, readonly=True, lock=False, readahead=False)
    total = 0
    with env.begin() as txn:
        for key, value in txn.cursor():
            total += len(key) + len(value)
    env.close()
    return total


def oc20_byte_flips(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Single-byte corruptions of a small legacy LMDB and aselmdb file: 2/3 on the bytes
    LMDB navigates by (meta pages, used parts of branch/leaf pages, overflow headers), 1/3
    anywhere; each read whole by the loader, and by py-lmdb as the loader did before."""
    from geolinrpe.data.oc20 import LMDBFile, make_synthetic

    for name, fmt, task in (("data.lmdb", "lmdb-is2re", "is2re"), ("x.aselmdb", "aselmdb", "s2ef")):
        clean = make_synthetic(work / name, 8, fmt, steps=0)
        reference = [(item.z, item.pos, item.sid) for item in _read_all(clean, task)]
        blob = clean.read_bytes()
        psize = LMDBFile(clean).psize
        structural = _structural_offsets(blob, psize)
        structural_set = set(structural)
        rng = random.Random(f"{name}-flips")
        suffix = name[name.index(".") :]

        def same(items: list[Any], reference: list[Any] = reference) -> bool:
            return len(items) == len(reference) and all(
                torch.equal(a.z, z) and torch.equal(a.pos, p) and a.sid == s
                for a, (z, p, s) in zip(items, reference, strict=True)
            )

        for trial in range(cfg.flips):
            offset = rng.choice(structural) if trial % 3 else rng.randrange(len(blob))
            damaged = bytearray(blob)
            damaged[offset] ^= rng.randrange(1, 256)
            where = "structure" if offset in structural_set else "overflow value or free space"
            path = work / f"flip{trial}{suffix}"
            path.write_bytes(bytes(damaged))
            for reader in ("geolinrpe", "py-lmdb (before)"):
                if reader == "geolinrpe":
                    run, names, truth = (lambda p=path, t=task: _read_all(p, t)), [str(path)], same
                else:
                    run, names = (lambda p=path: _py_lmdb_read_all(p)), ["lmdb", "Error"]
                    truth = lambda total: True  # noqa: E731 - py-lmdb values are not checked
                yield Case(
                    f"byte flips: {fmt} read by {reader}",
                    f"byte {offset} ({where})",
                    run,
                    names,
                    len(blob),
                    truth=truth,
                )


# ---------------------------------------------------------------------------------------------
# QM9 caches, checkpoints, learned-optimizer files, configs
# ---------------------------------------------------------------------------------------------


def _qm9_root(work: Path) -> Path:
    from geolinrpe.data import QM9

    root = work / "qm9"
    if not root.exists():
        QM9(str(root), max_molecules=160, log=False)
    return root


def _tiny(root: Path, out: Path, *overrides: str) -> Any:
    from geolinrpe.train import Config

    return Config.load(None, [
        "data.task=qm9", f"data.path={root}", "data.max_molecules=160", "data.train_size=48",
        "data.valid_size=16", "data.test_size=16", "data.batch_size=16", "model.name=molecule",
        "model.embed_dim=16", "model.num_layers=1", "model.num_heads=2", "model.num_features=8",
        "model.rpe_options={num_frequencies: 4}", f"train.out_dir={out}", "train.epochs=1",
        "train.progress=false", "train.plot=false", "train.tensorboard=false",
        "train.device=cpu", *overrides,
    ])  # fmt: skip


def _expect_warning(fn: Callable[[], Any], *names: str) -> Callable[[], Any]:
    """Runs ``fn``; the warnings and log records it gave that name everything in ``names``
    are raised as one error, so the case counts as a named refusal."""
    import logging
    import warnings

    def run() -> Any:
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.WARNING)
        handler.emit = records.append  # type: ignore[method-assign]
        logging.getLogger().addHandler(handler)
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                fn()
        finally:
            logging.getLogger().removeHandler(handler)
        said = " | ".join([str(w.message) for w in caught] + [r.getMessage() for r in records])
        if all(name in said for name in names):
            raise UserWarning(said)  # the named warning is the expected outcome
        return said

    return run


def files_that_run_code(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Payloads that would create a marker file, through every entry point that reads them."""
    import builtins

    from geolinrpe.data import QM9
    from geolinrpe.optim import meta
    from geolinrpe.train import run
    from geolinrpe.train.trainer import load_checkpoint

    marker = work / "pwned"
    exec_ = Reduce(builtins.exec, f"open({str(marker)!r}, 'w').write('x')")
    cls = "code execution: QM9 cache, checkpoints, lopt files"
    root = _qm9_root(work)

    for kind in ("pickle", "torch.save"):
        cache_root = work / f"qm9_{kind}"
        import shutil

        shutil.copytree(root, cache_root)
        cache = next((cache_root / "processed").glob("qm9*.pt"))
        if kind == "pickle":
            cache.write_bytes(pickle.dumps(exec_))
        else:
            torch.save({"data": exec_}, cache)
        yield Case(cls, f"QM9 processed cache ({kind})", _expect_warning(
            lambda r=cache_root: QM9(str(r), max_molecules=160, log=False), str(cache)),
            [str(cache)], cache.stat().st_size, marker)  # fmt: skip
    pre = work / "qm9_pre"
    shutil.copytree(root, pre)
    torch.save(exec_, pre / "processed" / "pre_transform.pt")
    yield Case(cls, "QM9 pre_transform.pt (PyG reads it to compare transforms)",
               lambda: QM9(str(pre), max_molecules=160, log=False), [str(pre)], 0, marker,
               truth=lambda ds: len(ds) == 160)  # fmt: skip

    trained = work / "trained"
    run(_tiny(root, trained))
    good = torch.load(trained / "last.pt", weights_only=True)
    for label, payload in {
        "checkpoint: whole file": exec_,
        "checkpoint: inside the model state": {**good, "model": {"w": exec_}},
        "checkpoint: inside the config": {**good, "config": {"data": exec_}},
    }.items():
        path = work / f"{label.split(': ')[1].replace(' ', '_')}.pt"
        torch.save(payload, path)
        yield Case(cls, label, lambda p=path: load_checkpoint(p, device="cpu"), [str(path)],
                   path.stat().st_size, marker)  # fmt: skip
        yield Case(cls, f"lopt evaluate: {label.split(': ')[1]}",
                   lambda p=path: meta.load_checkpoint(p), [str(path)], 0, marker)  # fmt: skip

    unsafe = work / "unsafe.pt"
    stored = {k: v for k, v in good.items() if k != "integrity"}  # as an older version wrote
    torch.save({**stored, "config": {**good["config"], "data": {
        **good["config"]["data"], "options": {"safe": False}}}}, unsafe)  # fmt: skip
    loads = _expect_warning(lambda: load_checkpoint(unsafe, device="cpu"), "data.options.safe")
    yield Case("safety settings from files", "checkpoint storing data.options.safe=false",
               loads, [str(unsafe), "data.options.safe"], 0, marker)  # fmt: skip


def damaged_checkpoints(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Bit flips, truncation and missing keys in a training checkpoint."""
    import zipfile

    from geolinrpe.train.trainer import load_checkpoint

    root = _qm9_root(work)
    run_dir = work / "run"
    from geolinrpe.train import run

    run(_tiny(root, run_dir))
    clean = (run_dir / "last.pt").read_bytes()
    cls = "damaged checkpoints"
    with zipfile.ZipFile(run_dir / "last.pt") as archive:
        data = [i for i in archive.infolist() if "/data/" in i.filename and i.file_size > 64]
    rng = random.Random("checkpoint")
    reference = torch.load(run_dir / "last.pt", weights_only=True)["model"]

    def same_model(loaded: Any) -> bool:  # a flip in bytes no reader uses (zip timestamps)
        state = loaded.model.state_dict()
        return all(torch.equal(state[k], v) for k, v in reference.items())

    for trial in range(cfg.flips // 10):
        blob = bytearray(clean)
        if trial == 0:  # 4,096 flipped mantissa bits over the tensors' data
            for _ in range(4096):
                info = rng.choice(data)
                start = info.header_offset + 30 + len(info.filename) + len(info.extra)
                blob[start + rng.randrange(info.file_size // 4) * 4] ^= 1 << rng.randrange(7)
            label = "4,096 flipped mantissa bits"
        else:
            blob[rng.randrange(len(blob))] ^= rng.randrange(1, 256)
            label = "one flipped byte"
        path = work / f"flip{trial}.pt"
        path.write_bytes(bytes(blob))
        yield Case(cls, label, lambda p=path: load_checkpoint(p, device="cpu"), [str(path)],
                   len(blob), truth=same_model)  # fmt: skip
    for fraction in (0.0, 0.1, 0.5, 0.9, 0.999):
        path = work / f"cut{fraction}.pt"
        path.write_bytes(clean[: int(len(clean) * fraction)])
        yield Case(cls, f"truncated to {fraction:.1%}", lambda p=path: load_checkpoint(p),
                   [str(path)], len(clean))  # fmt: skip
    full = torch.load(run_dir / "last.pt", weights_only=True)
    for key in ("config", "model", "task_state", "loss_window"):
        path = work / f"no_{key}.pt"
        torch.save({k: v for k, v in full.items() if k not in (key, "integrity")}, path)
        if key == "loss_window":  # only resuming needs it
            run_cfg = _tiny(root, work / f"resume_{key}", "train.epochs=2")

            def resume(p: Path = path, c: Any = run_cfg) -> Any:
                import dataclasses

                c = dataclasses.replace(c, train=dataclasses.replace(c.train, resume=str(p)))
                return run(c)

            yield Case(cls, f"missing key {key!r} (resume)", resume, [str(path), key])
        else:
            yield Case(cls, f"missing key {key!r}", lambda p=path: load_checkpoint(p),
                       [str(path), key])  # fmt: skip


def non_finite_training(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Learning rates that make training diverge: the run must stop before the update."""
    from geolinrpe.train import run

    root = _qm9_root(work)
    schnet = [
        "model.name=schnet", "model.rpe=flt-kernel", "model.embed_dim=128",
        "model.num_layers=4", "model.num_heads=8", "model.num_features=64",
        "model.rpe_options={}", "model.options={hidden_channels: 16, num_filters: 16, "
        "num_interactions: 1, num_gaussians: 8}",
    ]  # fmt: skip
    for model, extra in (("molecule transformer", []), ("SchNet", schnet)):
        for lr in ("1.0", "1e4"):
            out = work / f"{model[:4]}_{lr}"
            c = _tiny(root, out, *extra, "train.epochs=20", "train.max_steps=40",
                      "train.eval_every=1", "optim.schedule=constant", f"optim.lr={lr}",
                      "optim.grad_clip=null")  # fmt: skip

            def train(c: Any = c, out: Path = out) -> Any:
                try:
                    return run(c)
                finally:  # whatever happened, no saved weight may be non-finite
                    for name in ("last.pt", "best.pt"):
                        if (out / name).exists():
                            state = torch.load(out / name, weights_only=True)["model"]
                            if not all(torch.isfinite(v).all() for v in state.values()):
                                raise AssertionError(f"non-finite weights in {out / name}")

            yield Case("non-finite training", f"{model}, optim.lr={lr}", train,
                       ["step", f"learning rate {float(lr):.4g}"],
                       truth=lambda results: all(np.isfinite(list(results.values()))))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Molecules, point clouds, QM9 raw files
# ---------------------------------------------------------------------------------------------


def _failures_raise(result: Any) -> Any:
    """``(items, report)`` of the molecule readers: a reported failure becomes an error."""
    items, report = result
    if report.failures:
        raise ValueError("; ".join(f"{f.input}: {f.reason}" for f in report.failures))
    return items


def smiles_not_read_whole(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    from geolinrpe.data import from_smiles

    for text in ("C CC", "C\tCC", "CC C", "CCO extra", "CC\nC", "c1ccccc1)", " CCO", "CCO\n",
                 "CC\x00C"):  # fmt: skip
        read = lambda t=text: _failures_raise(from_smiles([t]))  # noqa: E731
        yield Case("SMILES not read whole", repr(text), read, [text])


def float32_other_readers(work: Path, cfg: argparse.Namespace) -> Iterator[Case]:
    """Finite float64 values beyond float32's range in molecule, point-cloud and QM9 files."""
    from geolinrpe.data import QM9, from_ase, read_point_cloud

    cls = "float32 overflow: molecule, point-cloud, QM9 readers"
    for value in ("1e300", "1e39", "-1e39"):
        xyz = work / f"mol{value}.extxyz"
        xyz.write_text(f'2\nPBC="F F F"\nC 0 0 0\nO 0 0 {value}\n')
        yield Case(cls, f"from_ase extxyz z={value}",
                   lambda p=xyz: _failures_raise(from_ase(p)), [str(xyz)])  # fmt: skip
        cloud = work / f"cloud{value}.xyz"
        cloud.write_text(f"0 0 0\n1 1 1\n2 2 {value}\n")
        yield Case(cls, f".xyz point cloud z={value}", lambda p=cloud: read_point_cloud(p),
                   [str(cloud)])  # fmt: skip
        npy = work / f"cloud{value}.npy"
        np.save(npy, np.array([[0, 0, 0], [1, 1, float(value)]], dtype=np.float64))
        yield Case(cls, f".npy point cloud z={value}", lambda p=npy: read_point_cloud(p),
                   [str(npy)])  # fmt: skip
        ply = work / f"cloud{value}.ply"
        ply.write_text("ply\nformat ascii 1.0\nelement vertex 2\nproperty double x\n"
                       "property double y\nproperty double z\nend_header\n"
                       f"0 0 0\n1 1 {value}\n")  # fmt: skip
        yield Case(cls, f".ply point cloud z={value}", lambda p=ply: read_point_cloud(p),
                   [str(ply)])  # fmt: skip
    import pandas as pd

    from geolinrpe.data.qm9 import qm9pack_data_dir

    pack = work / "qm9pack"
    pack.mkdir()
    df = pd.read_csv(qm9pack_data_dir() / "qm9_part1.csv", nrows=3)
    df["HOMO_au"] = df["HOMO_au"].astype(object)
    df.loc[1, "HOMO_au"] = "1e39"
    df.to_csv(pack / "qm9_part1.csv", index=False)
    for name in ("qm9_part2.csv", "qm9_part3.csv"):
        df.iloc[:0].to_csv(pack / name, index=False)
    yield Case(cls, "qm9pack CSV HOMO=1e39",
               lambda: QM9(str(work / "qm9x"), raw_dir=str(pack), log=False),
               [str(pack / "qm9_part1.csv"), "line 3", "HOMO_au"])  # fmt: skip


CLASSES: list[Callable[[Path, argparse.Namespace], Iterator[Case]]] = [
    oc20_pickle_gadgets,
    oc20_memory,
    oc20_float32,
    oc20_byte_flips,
    files_that_run_code,
    damaged_checkpoints,
    non_finite_training,
    smiles_not_read_whole,
    float32_other_readers,
]


# ---------------------------------------------------------------------------------------------


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            cpu = next(line.split(":", 1)[1].strip() for line in fh if "model name" in line)
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}"


def table(results: list[Result]) -> str:
    rows = ["| class | tried | " + " | ".join(OUTCOMES) + " | max peak MiB (rejected) |"]
    rows.append("| --- | ---: | " + " | ".join("---:" for _ in OUTCOMES) + " | ---: |")
    for cls in dict.fromkeys(r.cls for r in results):
        mine = [r for r in results if r.cls == cls]
        counts = [sum(r.outcome == o for r in mine) for o in OUTCOMES]
        rejected = [r.peak_mib for r in mine if r.outcome == "named error"]
        peak = f"{max(rejected):.1f}" if rejected else "-"
        rows.append(f"| {cls} | {len(mine)} | " + " | ".join(map(str, counts)) + f" | {peak} |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> list[Result]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="60 byte flips per file")
    parser.add_argument("--flips", type=int, default=600, help="byte flips per file")
    parser.add_argument("--json", help="write one record per input to this path")
    cfg = parser.parse_args(argv)
    if cfg.quick:
        cfg.flips = 60
    # Children are forked: an OpenMP pool started in the parent would deadlock them.
    torch.set_num_threads(1)
    start = time.perf_counter()
    results: list[Result] = []
    with tempfile.TemporaryDirectory() as tmp:
        for make in CLASSES:
            work = Path(tmp) / make.__name__
            work.mkdir()
            print(f"{make.__name__} ...", flush=True)
            for case in make(work, cfg):
                results.append(run_case(case))
                bad = results[-1].outcome not in ("named error", "read correctly")
                if bad and "before" not in case.cls:
                    print(f"  {case.cls} / {case.label}: {results[-1].outcome} "
                          f"{results[-1].message[:200]}", flush=True)  # fmt: skip
    print(f"{machine()}; {time.perf_counter() - start:.0f} s; load {os.getloadavg()[0]:.2f}")
    print(table(results))
    for r in results:
        limit = 50 + 10 * r.nbytes / MB
        if r.outcome == "named error" and r.peak_mib > limit:
            print(f"  over the memory target: {r.cls} / {r.label}: {r.peak_mib:.0f} MiB")
    if cfg.json:
        Path(cfg.json).write_text(json.dumps([r.__dict__ for r in results], indent=1))
    return results


if __name__ == "__main__":
    main()
