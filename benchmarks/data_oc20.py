"""Read throughput of the OC20 loader (records/s) on synthetic OC20-format LMDB files.

Simulates ``n`` unrelaxed systems once (:func:`geolinrpe.data.oc20.synthetic_systems` with
``steps=0``: fcc(111) slab + adsorbate, EMT energy and forces; 13 to 29 atoms, 20 on average)
and writes them as a legacy IS2RE ``data.lmdb``, a two-shard S2EF LMDB folder, an ``.aselmdb``
file, and an IS2RE ``data.lmdb`` of the same systems tiled 2x2 in the surface plane (80 atoms on
average, OC20-sized) in a temporary folder. Each row reads every record through
``OC20.__getitem__`` (unpickle or JSON decode, checks, normalised ``Data``) in file order or in
a shuffled order, single process, and reports the best and median of ``repeats`` passes; the
``DataLoader`` rows add PyG collation (batch 64, shuffled, no workers). Target: at least 2,000
records/s for LMDB reading with the default ``safe=True``.

    python benchmarks/data_oc20.py [--quick] [--json PATH] [--n N] [--repeats R]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch_geometric.loader import DataLoader

from geolinrpe.data.oc20 import OC20, SyntheticSystem, synthetic_systems, write_oc20

TARGET = 2000.0  # records/s


@dataclass
class Config:
    n: int = 4000
    repeats: int = 3
    seed: int = 0
    json: str | None = None


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine() -> str:
    cpu = cpu_name()
    return (
        f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__} "
        f"({torch.get_num_threads()} threads), pure-Python LMDB reader (pread), "
        f"Python {platform.python_version()}"
    )


def tiled(system: SyntheticSystem, reps: int = 2) -> SyntheticSystem:
    """The system repeated reps x reps times in the surface plane (OC20-sized, ~80 atoms)."""
    shifts = [i * system.cell[0] + j * system.cell[1] for i in range(reps) for j in range(reps)]

    def tile(pos: np.ndarray) -> np.ndarray:
        return np.concatenate([pos + shift for shift in shifts])

    def copies(array: np.ndarray) -> np.ndarray:
        return np.concatenate([array] * len(shifts))

    cell = system.cell.copy()
    cell[:2] *= reps
    return replace(
        system,
        numbers=copies(system.numbers),
        tags=copies(system.tags),
        fixed=copies(system.fixed),
        cell=cell,
        pos_init=tile(system.pos_init),
        pos_relaxed=tile(system.pos_relaxed),
        forces_init=copies(system.forces_init),
        frames=[(fid, tile(pos), e, copies(f)) for fid, pos, e, f in system.frames],
    )


def mean_atoms(systems: list[SyntheticSystem]) -> float:
    return float(np.mean([len(s.numbers) for s in systems]))


def time_reads(ds: OC20, order: list[int], repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for i in order:
            ds[i]
        times.append(time.perf_counter() - start)
    return times


def time_loader(ds: OC20, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _batch in DataLoader(ds, batch_size=64, shuffle=True):
            pass
        times.append(time.perf_counter() - start)
    return times


def run(cfg: Config) -> list[dict]:
    rng = np.random.default_rng(cfg.seed)
    start = time.perf_counter()
    systems = synthetic_systems(cfg.n, seed=cfg.seed, steps=0, frames=1)
    simulate_s = time.perf_counter() - start
    big = [tiled(s) for s in systems]
    print(f"# OC20 loader read throughput ({machine()})")
    print(f"# {cfg.n} synthetic systems simulated in {simulate_s:.1f} s; mean atoms ", end="")
    print(f"{mean_atoms(systems):.1f}, tiled 2x2 {mean_atoms(big):.1f} (OC20: about 77)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "lmdb is2re": (write_oc20(Path(tmp) / "data.lmdb", systems, "lmdb-is2re"), "is2re"),
            "lmdb s2ef 2 shards": (write_oc20(Path(tmp) / "s2ef", systems, "lmdb-s2ef"), "s2ef"),
            "aselmdb": (write_oc20(Path(tmp) / "oc20.aselmdb", systems, "aselmdb"), "s2ef"),
            "lmdb is2re 2x2 tiled": (
                write_oc20(Path(tmp) / "big.lmdb", big, "lmdb-is2re"),
                "is2re",
            ),
        }
        atoms = {label: mean_atoms(big if "tiled" in label else systems) for label in files}
        cases = [
            ("lmdb is2re", True, "sequential"),
            ("lmdb is2re", True, "shuffled"),
            ("lmdb is2re", False, "sequential"),
            ("lmdb s2ef 2 shards", True, "shuffled"),
            ("aselmdb", True, "shuffled"),
            ("lmdb is2re 2x2 tiled", True, "shuffled"),
            ("lmdb is2re 2x2 tiled", False, "shuffled"),
            ("lmdb is2re", True, "DataLoader b=64"),
            ("aselmdb", True, "DataLoader b=64"),
        ]
        header = f"{'file':<22} {'safe':<6} {'order':<16} {'records':>8} {'best s':>8} "
        header += f"{'median s':>9} {'records/s':>10} {'us/record':>10}"
        print(header)
        print("-" * len(header))
        for label, safe, order in cases:
            path, task = files[label]
            ds = OC20(path, task=task, safe=safe)
            size_mb = sum(f.stat().st_size for f in ds.files) / 2**20
            if order.startswith("DataLoader"):
                times = time_loader(ds, cfg.repeats)
            else:
                index = list(range(len(ds)))
                if order == "shuffled":
                    index = rng.permutation(len(ds)).tolist()
                times = time_reads(ds, index, cfg.repeats)
            best = min(times)
            row = dict(
                file=label,
                atoms_mean=round(atoms[label], 1),
                safe=safe,
                order=order,
                records=len(ds),
                megabytes=round(size_mb, 2),
                best_s=best,
                median_s=statistics.median(times),
                records_per_s=len(ds) / best,
                us_per_record=best / len(ds) * 1e6,
            )
            rows.append(row)
            print(
                f"{label:<22} {safe!s:<6} {order:<16} {len(ds):>8} {best:>8.3f} "
                f"{row['median_s']:>9.3f} {row['records_per_s']:>10.0f} "
                f"{row['us_per_record']:>10.0f}"
            )
            del ds
    lmdb_safe = [r for r in rows if r["file"].startswith("lmdb") and r["safe"]]
    worst = min(r["records_per_s"] for r in lmdb_safe)
    verdict = "meets" if worst >= TARGET else "MISSES"
    print(f"# slowest safe LMDB row: {worst:.0f} records/s ({verdict} the {TARGET:.0f}/s target)")
    if cfg.json:
        with open(cfg.json, "w") as fh:
            json.dump(
                dict(config=asdict(cfg), machine=machine(), simulate_s=simulate_s, rows=rows),
                fh,
                indent=2,
            )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="500 systems, one pass")
    parser.add_argument("--n", type=int, help="systems to simulate (default 4000)")
    parser.add_argument("--repeats", type=int, help="passes per row (default 3)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="write the rows to this file")
    args = parser.parse_args()
    cfg = Config(seed=args.seed, json=args.json)
    if args.quick:
        cfg.n, cfg.repeats = 500, 1
    if args.n is not None:
        cfg.n = args.n
    if args.repeats is not None:
        cfg.repeats = args.repeats
    run(cfg)


if __name__ == "__main__":
    main()
