r"""Time QM9 processing and cached reload for each source, and check the sources agree.

Sources. ``qm9pack`` reads the CSV files that the package ships. There are no PyG raw files
or original xyz files on this machine, so the driver writes them from qm9pack's CSV text, in
their own formats and at full scale, into a work folder first (not timed):

* ``pyg-raw``: ``gdb9.sdf`` (RDKit ``MolToMolBlock``, V3000 with 10 decimals, bonds from
  ``rdDetermineBonds.DetermineConnectivity``), ``gdb9.sdf.csv`` (MoleculeNet's columns and
  units: energies in hartree, atomization energies in kcal/mol) and ``uncharacterized.txt``;
* ``xyz``: one ``dsgdb9nsd_<index>.xyz`` per molecule in the original layout (qm9pack's
  ``E`` exponents written as Mathematica's ``*^``), plus ``uncharacterized.txt``;
* ``xyz-tar``: the same files in ``dsgdb9nsd.xyz.tar.bz2``.

``uncharacterized.txt`` lists the indices missing from qm9pack (the 3,054 uncharacterised
molecules); their records are absent from the written files, so the real files hold 2% more
records to read and skip than these.

Measurement. Each step runs in a fresh child process
(``python benchmarks/data_qm9.py --worker process|reload ...``, one JSON line on stdout); the
imports are done before the clock starts, which then times ``QM9(...)`` alone:

1. ``process``: construction with an empty ``processed/`` folder (reads the source, validates,
   writes the cache); peak RSS of the child process is reported;
2. ``reload``: construction with the cache present, three times (median reported), checking
   that the cache file was not rewritten; the same child then times ``dataset[i]`` for 10,000
   random ``i`` (fresh items, PyG's item cache off) and one ``DataLoader`` pass of
   ``batch_size=128`` over 10,000 molecules;
3. agreement: every source's ``z``, ``pos``, ``idx`` and ``name`` must equal qm9pack's and
   ``y`` must agree to float32 precision (max relative difference reported).

The targets checked at the end are full processing from qm9pack in at most 60 s and a cached
reload in at most 2 s, on this 2-core machine.

Usage::

    python benchmarks/data_qm9.py                     # all 130,831 molecules (~4 min on 2 cores)
    python benchmarks/data_qm9.py --quick             # first 2,000 molecules (~20 s)
    python benchmarks/data_qm9.py --sources qm9pack --json out.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from statistics import median

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("qm9pack", "pyg-raw", "xyz", "xyz-tar")
QUICK_MOLECULES = 2000
RELOAD_REPEATS = 3
ACCESS_ITEMS = 10_000
BATCH_SIZE = 128
PROCESS_TARGET_S = 60.0
RELOAD_TARGET_S = 2.0
# qm9pack's columns in the order of line 2 of an original xyz file.
PROPERTY_COLUMNS = (
    "RotA_GHz",
    "RotB_GHz",
    "RotC_GHz",
    "Dipole_debye",
    "Polarizability_bohr3",
    "HOMO_au",
    "LUMO_au",
    "HOMO_LUMO_gap_au",
    "R2_bohr2",
    "ZPVE_au",
    "InternalEnergy_0K_au",
    "InternalEnergy_298K_au",
    "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au",
    "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip
UNCHARACTERIZED_HEADER = (
    " Molecules among the 133885 GDB9 molecules that failed the consistency check "
    "(written by benchmarks/data_qm9.py from the indices missing in qm9pack).\n\n"
    + "=" * 90
    + "\n#   Index    GDB17 SMILES    SMILES for B3LYP XYZ    SMILES for Corina XYZ    D_IJ\n"
    + "=" * 90
    + "\n"
)


@dataclass
class BenchConfig:
    max_molecules: int | None = None  # None: all 130,831
    sources: tuple[str, ...] = SOURCES
    json_path: str | None = None
    workdir: str | None = None  # default: a temporary folder, removed afterwards


@dataclass
class Row:
    source: str
    molecules: int = 0
    atoms: int = 0
    process_s: float = float("nan")
    process_peak_rss_mib: float = float("nan")
    reload_s: float = float("nan")
    reload_runs_s: list[float] = field(default_factory=list)
    reprocessed_on_reload: bool = False
    cache_mib: float = float("nan")
    get_us_per_item: float = float("nan")
    batch_ms: float = float("nan")
    num_skipped: int = 0
    same_z_pos_idx_name: bool | None = None
    y_max_rel_diff: float | None = None
    write_inputs_s: float | None = None


# ---------------------------------------------------------------------------------------------
# Worker: one construction in a fresh interpreter
# ---------------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    import resource

    import torch
    from torch_geometric.loader import DataLoader

    from geolinrpe.data.qm9 import QM9

    source = "xyz" if args.source == "xyz-tar" else args.source
    kwargs = dict(source=source, max_molecules=args.max_molecules, log=False)
    if args.raw_dir:
        kwargs["raw_dir"] = args.raw_dir
    cache = Path(args.root) / "processed"
    before = {p.name: p.stat().st_mtime_ns for p in cache.glob("qm9_*.pt")}
    start = time.perf_counter()
    ds = QM9(args.root, **kwargs)
    seconds = time.perf_counter() - start
    after = {p.name: p.stat().st_mtime_ns for p in cache.glob("qm9_*.pt")}
    out = {
        "seconds": seconds,
        "molecules": len(ds),
        "atoms": int(ds._data.z.numel()),
        "num_skipped": ds.num_skipped,
        "rewrote_cache": before != after,
        "cache_mib": Path(ds.processed_paths[0]).stat().st_size / 2**20,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    if args.worker == "reload" and args.access:
        n = min(ACCESS_ITEMS, len(ds))
        order = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n]
        start = time.perf_counter()
        for i in order.tolist():  # distinct indices: no hit in PyG's item cache
            ds[i]
        out["get_us_per_item"] = (time.perf_counter() - start) / n * 1e6
        loader = DataLoader(ds[:n], batch_size=BATCH_SIZE)
        start = time.perf_counter()
        batches = sum(1 for _ in loader)
        out["batch_ms"] = (time.perf_counter() - start) / batches * 1e3
    print(json.dumps(out))


def run_worker(
    mode: str, source: str, root: Path, raw_dir: Path | None, cfg: BenchConfig, access: bool = False
) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--source", source]
    cmd += ["--root", str(root)]
    if raw_dir is not None:
        cmd += ["--raw-dir", str(raw_dir)]
    if cfg.max_molecules is not None:
        cmd += ["--max-molecules", str(cfg.max_molecules)]
    if access:
        cmd.append("--access")
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"worker {mode} {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Inputs in the other sources' formats, written from qm9pack's CSV text
# ---------------------------------------------------------------------------------------------


def read_qm9pack_text(max_molecules: int | None):
    import pandas as pd

    from geolinrpe.data.qm9 import qm9pack_data_dir

    columns = ["Index", "SMILES", "InChi", "Elements", "XYZ_Ang", "Mulliken_pop"]
    columns += ["Harmonic_Freq_cmi", *PROPERTY_COLUMNS]
    frames, remaining = [], max_molecules
    for part in ("qm9_part1.csv", "qm9_part2.csv", "qm9_part3.csv"):
        if remaining == 0:
            break
        df = pd.read_csv(
            qm9pack_data_dir() / part,
            usecols=columns,
            dtype=str,
            nrows=remaining,
            na_filter=False,
        )
        frames.append(df)
        remaining = None if remaining is None else remaining - len(df)
    return pd.concat(frames, ignore_index=True)


def numbers(text: str) -> list[str]:
    return text.strip("[]").replace("[", "").replace("]", "").split(",")


def symbols(text: str) -> list[str]:
    return text.strip("[]").replace("'", "").split(",")


def write_uncharacterized(path: Path, present: list[int]) -> None:
    missing = sorted(set(range(1, present[-1] + 1)) - set(present))
    rows = "".join(f"{i:8d}    X    X    X    0.0\n" for i in missing)
    path.write_text(UNCHARACTERIZED_HEADER + rows + "=" * 90 + "\n")


def write_xyz_inputs(df, raw: Path, archive: bool) -> None:
    folder = raw / "files" if archive else raw
    folder.mkdir(parents=True, exist_ok=True)
    for row in df.itertuples(index=False):
        syms = symbols(row.Elements)
        coords = [c.replace("E", "*^") for c in numbers(row.XYZ_Ang)]
        charges = numbers(row.Mulliken_pop)
        props = [getattr(row, c).replace("E", "*^") for c in PROPERTY_COLUMNS]
        lines = [str(len(syms)), "\t".join(["gdb", row.Index, *props]) + "\t"]
        for k, s in enumerate(syms):
            lines.append("\t".join([s, *coords[3 * k : 3 * k + 3], charges[k]]))
        lines.append("\t".join(numbers(row.Harmonic_Freq_cmi)))
        lines += [f"{row.SMILES}\t{row.SMILES}", f"{row.InChi}\t{row.InChi}", ""]
        (folder / f"dsgdb9nsd_{int(row.Index):06d}.xyz").write_text("\n".join(lines))
    if archive:
        with tarfile.open(raw / "dsgdb9nsd.xyz.tar.bz2", "w:bz2") as tar:
            for path in sorted(folder.iterdir()):
                tar.add(path, arcname=path.name)
        shutil.rmtree(folder)
    write_uncharacterized(raw / "uncharacterized.txt", [int(i) for i in df["Index"]])


def write_pyg_raw_inputs(df, raw: Path) -> None:
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    from geolinrpe.data.qm9 import HARTREE_TO_EV, KCAL_PER_MOL_TO_EV, atom_refs

    RDLogger.DisableLog("rdApp.*")
    raw.mkdir(parents=True, exist_ok=True)
    params = Chem.MolWriterParams()
    params.precision = 10
    params.forceV3000 = True
    refs = {k: atom_refs(k, unit="hartree").numpy() for k in ("U0", "U", "H", "G")}
    z_of = {"H": 1, "C": 6, "N": 7, "O": 8, "F": 9}
    header = "mol_id,A,B,C,mu,alpha,homo,lumo,gap,r2,zpve,u0,u298,h298,g298,cv,"
    header += "u0_atom,u298_atom,h298_atom,g298_atom"
    with open(raw / "gdb9.sdf", "w") as sdf, open(raw / "gdb9.sdf.csv", "w") as csv:
        csv.write(header + "\n")
        for row in df.itertuples(index=False):
            syms = symbols(row.Elements)
            xyz = np.array(numbers(row.XYZ_Ang), dtype=np.float64).reshape(-1, 3)
            mol = Chem.RWMol()
            for s in syms:
                mol.AddAtom(Chem.Atom(s))
            conf = Chem.Conformer(len(syms))
            for k, p in enumerate(xyz.tolist()):
                conf.SetAtomPosition(k, Point3D(*p))
            mol.AddConformer(conf)
            rdDetermineBonds.DetermineConnectivity(mol)
            mol.SetProp("_Name", f"gdb_{row.Index}")
            sdf.write(Chem.MolToMolBlock(mol, params) + "$$$$\n")
            props = [getattr(row, c) for c in PROPERTY_COLUMNS]
            z = [z_of[s] for s in syms]
            atom_kcal = [
                (float(e) - float(refs[k][z].sum())) * HARTREE_TO_EV / KCAL_PER_MOL_TO_EV
                for k, e in zip(("U0", "U", "H", "G"), props[10:14], strict=True)
            ]
            csv.write(",".join([f"gdb_{row.Index}", *props, *map(repr, atom_kcal)]) + "\n")
    write_uncharacterized(raw / "uncharacterized.txt", [int(i) for i in df["Index"]])


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def machine() -> dict:
    import pandas
    import torch
    import torch_geometric

    cpu = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    commit = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.strip()
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": round(mem, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_geometric": torch_geometric.__version__,
        "pandas": pandas.__version__,
        "commit": commit or "unknown",
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
    }


def compare(root: Path, source: str, raw_dir: Path | None, reference, cfg: BenchConfig):
    import torch

    from geolinrpe.data.qm9 import QM9

    kwargs = {"raw_dir": str(raw_dir)} if raw_dir is not None else {}
    src = "xyz" if source == "xyz-tar" else source
    ds = QM9(str(root), source=src, max_molecules=cfg.max_molecules, log=False, **kwargs)
    a, b = ds._data, reference._data
    same = (
        len(ds) == len(reference)
        and all(torch.equal(a[k], b[k]) for k in ("z", "pos", "idx"))
        and a.name == b.name
    )
    rel = ((a.y.double() - b.y.double()).abs() / b.y.double().abs().clamp_min(1e-30)).max()
    return same, float(rel)


def run(cfg: BenchConfig) -> dict:
    from geolinrpe.data.qm9 import QM9

    info = machine()
    work = Path(cfg.workdir or tempfile.mkdtemp(prefix="bench_qm9_"))
    work.mkdir(parents=True, exist_ok=True)
    rows: list[Row] = []
    reference = None
    df = None
    try:
        for source in cfg.sources:
            row = Row(source)
            root, raw_dir = work / source, None
            shutil.rmtree(root, ignore_errors=True)
            if source != "qm9pack":
                df = read_qm9pack_text(cfg.max_molecules) if df is None else df
                raw_dir = root / "raw"
                start = time.perf_counter()
                if source == "pyg-raw":
                    write_pyg_raw_inputs(df, raw_dir)
                else:
                    write_xyz_inputs(df, raw_dir, archive=source == "xyz-tar")
                row.write_inputs_s = time.perf_counter() - start
            print(f"[{source}] processing ...", file=sys.stderr, flush=True)
            first = run_worker("process", source, root, raw_dir, cfg)
            if not first["rewrote_cache"]:
                raise RuntimeError(f"{source}: the first construction did not process")
            reloads = [
                run_worker("reload", source, root, raw_dir, cfg, access=k == 0)
                for k in range(RELOAD_REPEATS)
            ]
            row.molecules, row.atoms = first["molecules"], first["atoms"]
            row.process_s, row.process_peak_rss_mib = first["seconds"], first["peak_rss_mib"]
            row.num_skipped = first["num_skipped"]
            row.reload_runs_s = [r["seconds"] for r in reloads]
            row.reload_s = median(row.reload_runs_s)
            row.reprocessed_on_reload = any(r["rewrote_cache"] for r in reloads)
            row.cache_mib = first["cache_mib"]
            row.get_us_per_item = reloads[0]["get_us_per_item"]
            row.batch_ms = reloads[0]["batch_ms"]
            if source == "qm9pack":
                reference = QM9(str(root), max_molecules=cfg.max_molecules, log=False)
            elif reference is not None:
                row.same_z_pos_idx_name, row.y_max_rel_diff = compare(
                    root, source, raw_dir, reference, cfg
                )
            rows.append(row)
    finally:
        if cfg.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    checks = {}
    qm9pack = next((r for r in rows if r.source == "qm9pack"), None)
    if qm9pack is not None and cfg.max_molecules is None:
        checks["qm9pack full processing <= 60 s"] = qm9pack.process_s <= PROCESS_TARGET_S
        checks["qm9pack cached reload <= 2 s"] = qm9pack.reload_s <= RELOAD_TARGET_S
    checks["no source reprocessed on reload"] = not any(r.reprocessed_on_reload for r in rows)
    compared = [r for r in rows if r.same_z_pos_idx_name is not None]
    if compared:
        checks["sources agree with qm9pack (z, pos, idx, name equal; y to float32)"] = all(
            r.same_z_pos_idx_name and r.y_max_rel_diff <= 2**-23 for r in compared
        )
    result = {"config": asdict(cfg), "machine": info, "rows": [asdict(r) for r in rows]}
    result["checks"] = checks
    print_report(result)
    if cfg.json_path:
        Path(cfg.json_path).write_text(json.dumps(result, indent=2))
    return result


def print_report(result: dict) -> None:
    m = result["machine"]
    n = result["config"]["max_molecules"]
    print(f"QM9 loading benchmark ({'all molecules' if n is None else f'first {n} molecules'})")
    print(f"machine: {m['cpu']}, {m['cores']} cores, {m['memory_gib']} GiB; python {m['python']}")
    print(
        f"torch {m['torch']}, torch_geometric {m['torch_geometric']}, pandas {m['pandas']}; "
        f"commit {m['commit']}; {m['date']}"
    )
    head = (
        f"{'source':<9} {'molecules':>9} {'atoms':>9} {'process s':>9} {'peak MiB':>8} "
        f"{'reload s':>8} {'cache MiB':>9} {'get us':>7} {'batch ms':>8} {'skipped':>7} "
        f"{'agrees':>6} {'max rel dy':>10}"
    )
    print(head)
    print("-" * len(head))
    for r in result["rows"]:
        agrees = "-" if r["same_z_pos_idx_name"] is None else str(r["same_z_pos_idx_name"])
        dy = "-" if r["y_max_rel_diff"] is None else f"{r['y_max_rel_diff']:.1e}"
        print(
            f"{r['source']:<9} {r['molecules']:>9,} {r['atoms']:>9,} {r['process_s']:>9.2f} "
            f"{r['process_peak_rss_mib']:>8.0f} {r['reload_s']:>8.3f} {r['cache_mib']:>9.1f} "
            f"{r['get_us_per_item']:>7.0f} {r['batch_ms']:>8.1f} {r['num_skipped']:>7} "
            f"{agrees:>6} {dy:>10}"
        )
    written = [
        f"{r['source']} {r['write_inputs_s']:.1f} s"
        for r in result["rows"]
        if r["write_inputs_s"] is not None
    ]
    if written:
        print(f"(writing the inputs from qm9pack, not timed above: {', '.join(written)})")
    for name, ok in result["checks"].items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help=f"first {QUICK_MOLECULES} only")
    parser.add_argument("--max-molecules", type=int, default=None)
    parser.add_argument("--sources", default=",".join(SOURCES), help="comma-separated")
    parser.add_argument("--json", dest="json_path", default=None, help="write results here")
    parser.add_argument("--workdir", default=None, help="keep the files here")
    parser.add_argument("--worker", choices=("process", "reload"), help=argparse.SUPPRESS)
    parser.add_argument("--source", help=argparse.SUPPRESS)
    parser.add_argument("--root", help=argparse.SUPPRESS)
    parser.add_argument("--raw-dir", help=argparse.SUPPRESS)
    parser.add_argument("--access", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    sources = tuple(s.strip() for s in args.sources.split(",") if s.strip())
    unknown = [s for s in sources if s not in SOURCES]
    if unknown:
        parser.error(f"unknown sources {unknown}; choose from {', '.join(SOURCES)}")
    max_molecules = QUICK_MOLECULES if args.quick else args.max_molecules
    run(BenchConfig(max_molecules, sources, args.json_path, args.workdir))


if __name__ == "__main__":
    main()
