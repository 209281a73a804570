"""QM9 loader: qm9pack items, PyG-raw and xyz fixtures against qm9pack, cache, errors.

Fixtures are written from qm9pack's first rows (GDB-9 indices 1-57, 59, 60) in each source's
own format, plus a made-up record 58 that ``uncharacterized.txt`` lists (as the real file
does), so every source must skip it and give the same 59 molecules.
"""

from __future__ import annotations

import ast
import logging
import tarfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch_geometric.loader import DataLoader

import geolinrpe.data.qm9 as qm9
from geolinrpe.data.qm9 import (
    QM9,
    TARGETS,
    atom_refs,
    conventional_split,
    parse_gdb_xyz,
    qm9pack_data_dir,
    read_uncharacterized,
    target_index,
)

NUM_FIXTURE = 59  # characterised molecules among GDB-9 indices 1..60
HARTREE_TO_EV = 27.211386246
KCAL_TO_EV = 0.04336414
# DATA.md's atom references (hartree) for H, C, N, O, F, kept here as an independent copy.
REFS = {
    kind: dict(zip("HCNOF", values, strict=True))
    for kind, values in {
        "U0": (-0.500273, -37.846772, -54.583861, -75.064579, -99.718730),
        "U": (-0.498857, -37.845355, -54.582445, -75.063163, -99.717314),
        "H": (-0.497912, -37.844411, -54.581501, -75.062219, -99.716370),
        "G": (-0.510927, -37.861317, -54.598897, -75.079532, -99.733544),
    }.items()
}
# qm9pack columns in the order of line 2 of an original xyz file (A ... Cv).
PROPS = (
    "RotA_GHz", "RotB_GHz", "RotC_GHz", "Dipole_debye", "Polarizability_bohr3",
    "HOMO_au", "LUMO_au", "HOMO_LUMO_gap_au", "R2_bohr2", "ZPVE_au",
    "InternalEnergy_0K_au", "InternalEnergy_298K_au", "Enthalphy_298K_au",
    "GibbsFreeEnergy_298K_au", "Heatcapacity_Cv_cal_mol_K",
)  # fmt: skip
UNCHARACTERIZED_HEADER = """\
 List of molecules among the 133885 GDB9 molecules for which the Corina generated Cartesian
 coordinates and the B3LYP/6-31G(2df,p) equilibrium geometry lead to different SMILES and
 InChI strings when parsed through the program Openbabel.

=========================================================================================
#   Index                 GDB17 SMILES        SMILES for B3LYP XYZ        D_IJ
=========================================================================================
"""


@dataclass
class Record:
    index: int
    symbols: list[str]
    xyz: list[list[float]]
    charges: list[float]
    props: list[float]  # A, B, C, mu, alpha, homo, lumo, gap, r2, zpve, U0, U, H, G, Cv
    freqs: list[float]
    smiles: str
    inchi: str


@pytest.fixture(scope="module")
def records() -> list[Record]:
    """Indices 1..60 from qm9pack's CSV (parsed independently of the loader), where 58,
    uncharacterised and absent from qm9pack, is a copy of 57 under its own index."""
    df = pd.read_csv(qm9pack_data_dir() / "qm9_part1.csv", nrows=NUM_FIXTURE)
    out = []
    for row in df.itertuples(index=False):
        out.append(
            Record(
                index=int(row.Index),
                symbols=ast.literal_eval(row.Elements),
                xyz=ast.literal_eval(row.XYZ_Ang),  # Python literals accept "0."
                charges=ast.literal_eval(row.Mulliken_pop),
                props=[float(getattr(row, c)) for c in PROPS],
                freqs=ast.literal_eval(row.Harmonic_Freq_cmi),
                smiles=row.SMILES,
                inchi=row.InChi,
            )
        )
    assert [r.index for r in out] == [*range(1, 58), 59, 60]
    fake = Record(**{**out[56].__dict__, "index": 58})
    return [*out[:57], fake, *out[57:]]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> QM9:
    return QM9(str(tmp_path_factory.mktemp("qm9pack")), max_molecules=NUM_FIXTURE, log=False)


def write_uncharacterized(path: Path, indices=(58, 61, 80)) -> None:
    rows = "".join(f"{i:8d}          CC(=O)N           CC(=O)N      1.234567\n" for i in indices)
    path.write_text(UNCHARACTERIZED_HEADER + rows + "=" * 89 + "\n")


def atomization(record: Record, kind: str, energy: float) -> float:
    """Atomization energy in hartree."""
    return energy - sum(REFS[kind][s] for s in record.symbols)


def write_pyg_raw(raw: Path, records: list[Record]) -> None:
    """gdb9.sdf (V3000, 10 decimals), gdb9.sdf.csv (MoleculeNet's columns and units: energies
    in hartree, atomization energies in kcal/mol) and uncharacterized.txt."""
    from rdkit import Chem
    from rdkit.Chem import rdDetermineBonds
    from rdkit.Geometry import Point3D

    raw.mkdir(parents=True, exist_ok=True)
    params = Chem.MolWriterParams()
    params.precision = 10  # V2000 (and MoleculeNet's file) would keep 4 decimals
    params.forceV3000 = True
    blocks, lines = [], [",".join(qm9._MOLECULENET_COLUMNS)]
    for r in records:
        mol = Chem.RWMol()
        for s in r.symbols:
            mol.AddAtom(Chem.Atom(s))
        conf = Chem.Conformer(len(r.symbols))
        for i, p in enumerate(r.xyz):
            conf.SetAtomPosition(i, Point3D(*p))
        mol.AddConformer(conf)
        rdDetermineBonds.DetermineConnectivity(mol)
        mol.SetProp("_Name", f"gdb_{r.index}")
        blocks.append(Chem.MolToMolBlock(mol, params) + "$$$$\n")
        atom_kcal = [
            atomization(r, kind, e) * HARTREE_TO_EV / KCAL_TO_EV
            for kind, e in zip("U0 U H G".split(), r.props[10:14], strict=True)
        ]
        lines.append(",".join([f"gdb_{r.index}", *map(repr, r.props), *map(repr, atom_kcal)]))
    (raw / "gdb9.sdf").write_text("".join(blocks))
    (raw / "gdb9.sdf.csv").write_text("\n".join(lines) + "\n")
    write_uncharacterized(raw / "uncharacterized.txt")


def xyz_text(r: Record) -> str:
    """One file in the original format (tabs, Mathematica exponents for two numbers)."""
    props = [repr(v) for v in r.props]
    if r.index == 2:
        assert r.props[1] == 293.54111
        props[1] = "2.9354111*^2"
    head = "\t".join(["gdb", str(r.index), *props]) + "\t"
    atoms = []
    for k, (s, p, q) in enumerate(zip(r.symbols, r.xyz, r.charges, strict=True)):
        coords = [repr(v) for v in p]
        if r.index == 1 and k == 1:
            assert p[0] == 0.002150416
            coords[0] = "2.150416*^-3"
        atoms.append("\t".join([s, *coords, repr(q)]))
    return "\n".join(
        [
            str(len(r.symbols)),
            head,
            *atoms,
            "\t".join(map(repr, r.freqs)),
            f"{r.smiles}\t{r.smiles}",
            f"{r.inchi}\t{r.inchi}",
            "",
        ]
    )


def write_xyz(raw: Path, records: list[Record], archive: bool = False) -> None:
    raw.mkdir(parents=True, exist_ok=True)
    folder = raw / "xyz_files" if archive else raw
    folder.mkdir(exist_ok=True)
    for r in records:
        (folder / f"dsgdb9nsd_{r.index:06d}.xyz").write_text(xyz_text(r))
    if archive:
        with tarfile.open(raw / "dsgdb9nsd.xyz.tar.bz2", "w:bz2") as tar:
            for path in sorted(folder.iterdir(), reverse=True):  # order must not matter
                tar.add(path, arcname=path.name)
    write_uncharacterized(raw / "uncharacterized.txt")


def assert_same_molecules(a: QM9, b: QM9) -> None:
    assert len(a) == len(b) == NUM_FIXTURE
    for key in ("z", "pos", "idx"):
        torch.testing.assert_close(a._data[key], b._data[key], rtol=0, atol=0)
    assert a._data.name == b._data.name
    # float32 precision: the same float64 values up to rounding, at most one float32 ulp
    torch.testing.assert_close(a._data.y, b._data.y, rtol=2**-23, atol=0)


# --- qm9pack ---------------------------------------------------------------------------------


def test_qm9pack_items_shapes_units_and_methane(reference):
    assert len(reference) == NUM_FIXTURE
    d = reference[0]
    assert d.z.dtype == torch.long and d.z.tolist() == [6, 1, 1, 1, 1]
    assert d.pos.dtype == torch.float32 and d.pos.shape == (5, 3)
    torch.testing.assert_close(d.pos[0], torch.tensor([-0.0126981359, 1.0858041578, 0.0080009958]))
    assert d.y.dtype == torch.float32 and d.y.shape == (1, 19)
    assert d.idx.tolist() == [0] and d.name == "gdb_1" and d.smiles == "C"
    y = d.y[0].double()
    assert y[7].item() == pytest.approx(-40.47893 * HARTREE_TO_EV, abs=1e-3)  # U0, eV
    assert y[2].item() == pytest.approx(-0.3877 * HARTREE_TO_EV, abs=1e-5)  # HOMO, eV
    assert y[12].item() == pytest.approx(-17.1722, abs=1e-4)  # U0 atomization, eV
    assert y[[0, 1, 5, 11]].tolist() == pytest.approx([0.0, 13.21, 35.3641, 6.469], abs=1e-4)
    assert y[16:].tolist() == pytest.approx([157.7118, 157.70997, 157.70699], abs=1e-3)
    # row order = index order; idx = Index - 1 (58 and 61 are uncharacterised, so absent)
    idx = reference._data.idx.tolist()
    assert idx[-3:] == [56, 58, 59] and idx == sorted(idx)
    assert reference[-1].name == "gdb_60"


def test_batches_and_single_molecule(reference, tmp_path):
    batch = next(iter(DataLoader(reference, batch_size=7)))
    assert batch.y.shape == (7, 19) and batch.num_graphs == 7
    assert batch.name[:2] == ["gdb_1", "gdb_2"]
    centred = QM9(
        reference.root,
        max_molecules=NUM_FIXTURE,
        transform=lambda d: d.update({"pos": d.pos - d.pos.mean(0)}),
        log=False,
    )
    assert centred[3].pos.mean(0).abs().max() < 1e-6 and centred[3].name == reference[3].name
    one = QM9(str(tmp_path), max_molecules=1, log=False)
    assert len(one) == 1 and one[0].name == "gdb_1" and one[0].y.shape == (1, 19)
    torch.testing.assert_close(one[0].y, reference[0].y, rtol=0, atol=0)


def test_atom_refs_and_atomization_targets(reference):
    u0 = atom_refs("U0", unit="hartree")
    assert u0.dtype == torch.float64 and u0.shape == (10,)
    assert u0[[1, 6, 7, 8, 9]].tolist() == [REFS["U0"][s] for s in "HCNOF"]
    assert u0[[0, 2, 5]].abs().sum() == 0
    methane = torch.tensor([6, 1, 1, 1, 1])
    assert (-40.47893 - u0[methane].sum().item()) * HARTREE_TO_EV == pytest.approx(
        -17.1722, abs=1e-4
    )
    torch.testing.assert_close(atom_refs("U0_atom"), atom_refs(7))
    torch.testing.assert_close(atom_refs("G"), atom_refs("G", "hartree") * HARTREE_TO_EV)
    for kind, total, atom in (("U0", 7, 12), ("U", 8, 13), ("H", 9, 14), ("G", 10, 15)):
        ref = atom_refs(kind)
        for d in (reference[i] for i in range(0, NUM_FIXTURE, 5)):
            expected = d.y[0, total].double() - ref[d.z].sum()
            assert d.y[0, atom].item() == pytest.approx(expected.item(), abs=2e-3)
    with pytest.raises(ValueError, match="atom references exist"):
        atom_refs("gap")
    assert reference.atomref() is None  # no single target selected
    assert reference.atomref("gap") is None
    pyg_style = reference.atomref("U0")  # for SchNet(atomref=...)
    assert pyg_style.shape == (100, 1) and pyg_style[1, 0].item() == pytest.approx(-13.61312172)


def test_target_selection(tmp_path, reference):
    root = str(tmp_path)
    full = reference._data.y
    gap = QM9(root, target="gap", max_molecules=NUM_FIXTURE, log=False)
    assert gap[0].y.shape == (1,) and gap.target_names == ["gap"]
    torch.testing.assert_close(gap._data.y, full[:, 4])
    assert next(iter(DataLoader(gap, batch_size=4))).y.shape == (4,)
    for name, index in (("GAP", 4), (4, 4), ("U0", 7), ("u0_atom", 12), ("mu", 0), ("C", 18)):
        assert target_index(name) == index
    pair = QM9(root, target=["U0", 12], max_molecules=NUM_FIXTURE, log=False)
    assert pair[3].y.shape == (1, 2) and pair.target_names == ["U0", "U0_atom"]
    torch.testing.assert_close(pair._data.y, full[:, [7, 12]])
    u0 = QM9(root, target="U0", max_molecules=NUM_FIXTURE, log=False)
    assert gap.atomref() is None
    assert u0.atomref()[6, 0].item() == pytest.approx(-37.846772 * HARTREE_TO_EV, rel=1e-6)


def test_targets_table_and_docstring():
    assert [t.index for t in TARGETS] == list(range(19))
    units = {t.name: t.unit for t in TARGETS}
    assert units["mu"] == "D" and units["alpha"] == "a0^3" and units["r2"] == "a0^2"
    assert units["Cv"] == "cal/(mol K)" and units["A"] == "GHz"
    assert all(units[n] == "eV" for n in ("homo", "lumo", "gap", "zpve", "U0", "G_atom"))
    table = [line.strip() for line in QM9.__doc__.splitlines()]
    for t in TARGETS:
        row = next(r for r in table if r.split()[:2] == [str(t.index), t.name])
        assert row.split(None, 2)[2].split() == f"{t.description} {t.unit}".split(), row


def test_conventional_split():
    train, valid, test = conventional_split()
    assert (len(train), len(valid), len(test)) == (110_000, 10_000, 10_831)
    assert train.dtype == torch.long
    joined = torch.cat([train, valid, test])
    assert torch.equal(joined.sort().values, torch.arange(130_831))  # disjoint and complete
    assert torch.equal(joined, torch.from_numpy(np.random.RandomState(42).permutation(130_831)))
    assert [len(s) for s in conventional_split(100, num_train=80, num_valid=10)] == [80, 10, 10]
    with pytest.raises(ValueError, match="cannot take"):
        conventional_split(1000)


def test_cache_reload_and_version_bump(tmp_path, monkeypatch):
    calls = []
    read = qm9._read_qm9pack
    monkeypatch.setattr(qm9, "_read_qm9pack", lambda *a: calls.append(a) or read(*a))
    root = str(tmp_path)
    first = QM9(root, max_molecules=20, log=False)
    assert len(calls) == 1 and Path(first.processed_paths[0]).name == "qm9_qm9pack_first20_v1.pt"
    again = QM9(root, max_molecules=20, target="gap", log=False)
    assert len(calls) == 1 and len(again) == 20  # loaded, not reprocessed
    QM9(root, max_molecules=20, force_reload=True, log=False)
    assert len(calls) == 2
    monkeypatch.setattr(qm9, "FORMAT_VERSION", qm9.FORMAT_VERSION + 1)
    bumped = QM9(root, max_molecules=20, log=False)
    assert len(calls) == 3 and Path(bumped.processed_paths[0]).name.endswith("_v2.pt")
    QM9(root, max_molecules=20, log=False)
    assert len(calls) == 3
    # a cache whose content is an older version under the current name is rebuilt too
    payload = torch.load(bumped.processed_paths[0], weights_only=True)
    torch.save({**payload, "format_version": 1}, bumped.processed_paths[0])
    rebuilt = QM9(root, max_molecules=20, log=False)
    assert len(calls) == 4 and len(rebuilt) == 20


def test_pre_filter_and_pre_transform(tmp_path, reference):
    def add_count(d):
        d.num_heavy = int((d.z > 1).sum())
        return d

    ds = QM9(
        str(tmp_path),
        max_molecules=NUM_FIXTURE,
        pre_filter=lambda d: d.z.numel() > 8,
        pre_transform=add_count,
        log=False,
    )
    kept = [d for d in reference if d.z.numel() > 8]
    assert 0 < len(ds) == len(kept) < NUM_FIXTURE
    assert [d.name for d in ds] == [d.name for d in kept]
    assert ds[0].num_heavy == int((kept[0].z > 1).sum()) and ds[0].smiles == kept[0].smiles


# --- PyG raw files and original xyz files against qm9pack ------------------------------------


def test_pyg_raw_matches_qm9pack(tmp_path, records, reference, caplog):
    write_pyg_raw(tmp_path / "raw", records)
    with caplog.at_level(logging.WARNING, logger="geolinrpe.data.qm9"):
        ds = QM9(str(tmp_path), source="pyg-raw", log=False)
    assert_same_molecules(ds, reference)
    assert ds.num_skipped == 1 and ds.skipped_idx.tolist() == [57]
    assert "left out 1 uncharacterised" in caplog.text and "idx 57" in caplog.text
    assert ds[0].smiles == "[H]C([H])([H])[H]"  # RDKit's SMILES of the SDF record, as PyG
    reloaded = QM9(str(tmp_path), source="pyg-raw", log=False)
    assert reloaded.num_skipped == 1 and reloaded.skipped_idx.tolist() == [57]
    first = QM9(str(tmp_path), source="pyg-raw", max_molecules=58, log=False)
    assert len(first) == 58 and first.num_skipped == 1
    everything = QM9(str(tmp_path), source="pyg-raw", skip_uncharacterized=False, log=False)
    assert len(everything) == NUM_FIXTURE + 1 and everything.num_skipped == 0
    assert everything[57].name == "gdb_58"


@pytest.mark.parametrize("archive", [False, True], ids=["files", "tar.bz2"])
def test_xyz_matches_qm9pack(tmp_path, records, reference, archive):
    write_xyz(tmp_path / "raw", records, archive=archive)
    ds = QM9(str(tmp_path), source="xyz", log=False)
    assert_same_molecules(ds, reference)
    assert ds._data.smiles == reference._data.smiles  # both GDB-17 SMILES
    assert ds.num_skipped == 1 and ds.skipped_idx.tolist() == [57]
    first = QM9(str(tmp_path), source="xyz", max_molecules=10, log=False)
    assert first._data.name == reference._data.name[:10] and first.num_skipped == 0


def test_parse_gdb_xyz_mathematica_exponents(records):
    parsed = parse_gdb_xyz(xyz_text(records[0]), "methane.xyz")
    assert "*^" in xyz_text(records[0]) and parsed.pos[1][0] == 0.002150416
    assert parsed.index == 1 and parsed.z == [6, 1, 1, 1, 1] and parsed.smiles == "C"
    assert parse_gdb_xyz(xyz_text(records[1])).props[1] == 293.54111


def test_read_uncharacterized(tmp_path):
    path = tmp_path / "uncharacterized.txt"
    write_uncharacterized(path, (58, 61, 133866))
    assert read_uncharacterized(path) == [58, 61, 133866]


# --- errors ----------------------------------------------------------------------------------


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="gap.*U0_atom"):
        QM9(str(tmp_path), target="band_gap")
    with pytest.raises(ValueError, match="index 0-18"):
        target_index(19)
    with pytest.raises(ValueError, match="unknown QM9 source"):
        QM9(str(tmp_path), source="sdf")
    with pytest.raises(ValueError, match="max_molecules"):
        QM9(str(tmp_path), max_molecules=0)
    with pytest.raises(ValueError, match="skip_uncharacterized=False"):
        QM9(str(tmp_path), skip_uncharacterized=False)


def test_missing_files(tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="qm9_part1.csv.*pip install qm9pack"):
        QM9(str(tmp_path / "a"), raw_dir=str(empty))
    with pytest.raises(FileNotFoundError, match=r"gdb9\.sdf.*README"):
        QM9(str(tmp_path / "b"), source="pyg-raw")
    with pytest.raises(FileNotFoundError, match=r"dsgdb9nsd\.xyz\.tar\.bz2.*README"):
        QM9(str(tmp_path / "c"), source="xyz")


def test_xyz_needs_uncharacterized_list(tmp_path, records):
    write_xyz(tmp_path / "raw", records[:3])
    (tmp_path / "raw" / "uncharacterized.txt").unlink()
    with pytest.raises(FileNotFoundError, match="uncharacterized.txt.*skip_uncharacterized"):
        QM9(str(tmp_path), source="xyz", log=False)
    assert len(QM9(str(tmp_path), source="xyz", skip_uncharacterized=False, log=False)) == 3


def write_qm9pack_parts(folder: Path, edit) -> None:
    """qm9pack-format parts: part1 holds the first 3 rows (after ``edit``), 2 and 3 none."""
    folder.mkdir()
    df = pd.read_csv(qm9pack_data_dir() / "qm9_part1.csv", nrows=3)
    edit(df)
    df.to_csv(folder / "qm9_part1.csv", index=False)
    for name in ("qm9_part2.csv", "qm9_part3.csv"):
        df.iloc[:0].to_csv(folder / name, index=False)


@pytest.mark.parametrize(
    ("column", "value", "message"),
    [
        ("XYZ_Ang", "[[nan,0.,1.],[0.,0.,0.],[1.,1.,1.],[2.,2.,2.]]", "XYZ_Ang is not a list"),
        ("XYZ_Ang", "[[0.,0.,1.],[0.,0.,0.],[1.,1.,1.]]", "XYZ_Ang has 3 atoms, N_atoms is 4"),
        ("Elements", "['N','H','Xx','H']", "unknown element 'Xx'"),
        ("HOMO_au", "abc", "HOMO_au is 'abc', not a finite number"),
        ("InternalEnergy_0K_au", "", "InternalEnergy_0K_au is '', not a finite number"),
        ("HOMO_au", "1e39", "not a finite number within float32's range"),
        (
            "XYZ_Ang",
            "[[1e300,0.,1.],[0.,0.,0.],[1.,1.,1.],[2.,2.,2.]]",
            "XYZ_Ang has a coordinate that is not a finite number within float32's range",
        ),
        ("GibbsFreeEnergy_298K_au", "3e38", "gdb_2: target G is 8.16342e+39 eV, beyond float32"),
        ("XYZ_file", "dsgdb9nsd_000009.xyz", "does not match Index 2"),
    ],
)
def test_corrupt_qm9pack_rows(tmp_path, column, value, message):
    def edit(df):
        df[column] = df[column].astype(object)
        df.loc[1, column] = value

    write_qm9pack_parts(tmp_path / "pack", edit)
    named = r"qm9_part1\.csv, line 3 \(Index 2|QM9 molecule gdb_2"
    with pytest.raises(ValueError, match=named) as err:
        QM9(str(tmp_path), raw_dir=str(tmp_path / "pack"), log=False)
    assert message in str(err.value)


def test_corrupt_xyz_files(tmp_path, records):
    raw = tmp_path / "raw"
    write_xyz(raw, records[:4])
    path = raw / "dsgdb9nsd_000002.xyz"
    good = path.read_text()
    cases = [
        (good.replace("\nN\t", "\nXx\t", 1), "line 3: unknown element 'Xx'"),
        (good.replace("0.0172574639", "0.017.2574639"), "line 4: '0.017.2574639' is not"),
        (good.replace("0.0172574639", "NaN"), "line 4: 'NaN' is not a finite number"),
        (good.replace("0.0172574639", "1e39"), "line 4: '1e39' is not a finite number within"),
        (good.replace("0.0172574639", "1.2*^300"), "line 4: '1.2*^300' is not a finite number"),
        ("\n".join(good.splitlines()[:5]), "truncated, 5 lines for 4 atoms"),
        (good.replace("gdb\t2\t", "gdb\t7\t"), "says gdb 7, the file name 2"),
    ]
    for text, message in cases:
        path.write_text(text)
        with pytest.raises(ValueError, match="dsgdb9nsd_000002.xyz") as err:
            QM9(str(tmp_path), source="xyz", log=False)
        assert message in str(err.value)
    path.write_text(good)
    (raw / "dsgdb9nsd_2.xyz").write_text(good)
    with pytest.raises(ValueError, match="dsgdb9nsd_000002.xyz and dsgdb9nsd_2.xyz are both"):
        QM9(str(tmp_path), source="xyz", log=False)


def test_corrupt_pyg_raw_files(tmp_path, records):
    raw = tmp_path / "raw"
    write_pyg_raw(raw, records[:5])
    csv = raw / "gdb9.sdf.csv"
    lines = csv.read_text().splitlines()
    csv.write_text("\n".join(lines[:3] + lines[4:]) + "\n")  # drop gdb_3's row
    with pytest.raises(ValueError, match=r"record 3 \(gdb_3\): no row gdb_3"):
        QM9(str(tmp_path), source="pyg-raw", log=False)
    fields = lines[3].split(",")
    fields[8] = "nan"
    csv.write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
    with pytest.raises(ValueError, match=r"gdb9\.sdf\.csv, line 4 \(gdb_3\): gap is 'nan'"):
        QM9(str(tmp_path), source="pyg-raw", log=False)
    fields[8] = "1e39"
    csv.write_text("\n".join([*lines[:3], ",".join(fields), *lines[4:]]) + "\n")
    with pytest.raises(ValueError, match=r"line 4 \(gdb_3\): gap is '1e39', beyond float32"):
        QM9(str(tmp_path), source="pyg-raw", log=False)
    extra = lines[3].replace("gdb_3,", "gdb_999,", 1)
    csv.write_text("\n".join([*lines, extra]) + "\n")
    with pytest.raises(ValueError, match=r"1 rows have no record in .*gdb9\.sdf \(gdb_999\)"):
        QM9(str(tmp_path), source="pyg-raw", log=False)
    csv.write_text("\n".join(lines) + "\n")
    unchar = raw / "uncharacterized.txt"
    unchar.write_text(unchar.read_text().replace("      61", "     6x1"))
    with pytest.raises(ValueError, match=r"uncharacterized\.txt, line 9: expected a molecule"):
        QM9(str(tmp_path), source="pyg-raw", log=False)


# ------------------------------------------------------------------ cache safety
class _Hostile:
    """Unpickles (unsafely) into ``exec(code)``, which creates the marker file."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (exec, (f"open({str(self.marker)!r}, 'w').write('x')",))


@pytest.mark.parametrize("kind", ["pickle", "torch-save", "not-a-dict", "no-slices", "truncated"])
def test_unusable_cache_is_rebuilt_never_executed(tmp_path, caplog, kind):
    import pickle

    marker = tmp_path / "MARKER"
    root = tmp_path / "root"
    first = QM9(str(root), max_molecules=20, log=False)
    path = Path(first.processed_paths[0])
    good = torch.load(path, weights_only=True)
    if kind == "pickle":
        path.write_bytes(pickle.dumps({"format_version": _Hostile(marker)}))
    elif kind == "torch-save":
        torch.save({**good, "data": _Hostile(marker)}, path)
    elif kind == "not-a-dict":
        torch.save([1, 2, 3], path)
    elif kind == "no-slices":
        torch.save({k: v for k, v in good.items() if k != "slices"}, path)
    else:
        path.write_bytes(path.read_bytes()[:200])
    with caplog.at_level(logging.WARNING, logger="geolinrpe.data.qm9"):
        again = QM9(str(root), max_molecules=20, log=False)
    assert not marker.exists()
    assert len(again) == 20 and torch.equal(again._data.z, first._data.z)
    warning = " ".join(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)
    assert str(path) in warning and "rebuilding" in warning
    expected = {
        "pickle": "cannot be read safely",
        "torch-save": "cannot be read safely",
        "not-a-dict": "holds a list",
        "no-slices": "field 'slices' is missing",
        "truncated": "cannot be read safely",
    }[kind]
    assert expected in warning
    assert torch.load(path, weights_only=True)["format_version"] == qm9.FORMAT_VERSION


def test_hostile_pre_transform_record_is_not_executed(tmp_path, caplog):
    marker = tmp_path / "MARKER"
    root = tmp_path / "root"
    QM9(str(root), max_molecules=20, log=False)
    record = root / "processed" / "pre_transform.pt"
    assert torch.load(record, weights_only=True) == "None"  # what PyG writes: a string
    torch.save(_Hostile(marker), record)
    with caplog.at_level(logging.WARNING, logger="geolinrpe.data.qm9"):
        again = QM9(str(root), max_molecules=20, log=False)
    assert not marker.exists() and len(again) == 20
    assert str(record) in caplog.text and "rebuilding" in caplog.text
    assert torch.load(record, weights_only=True) == "None"  # rewritten


def test_cache_that_cannot_round_trip_weights_only_is_refused(tmp_path):
    def add_path(data):
        data.origin = Path("x")
        return data

    with pytest.raises(ValueError, match=r"\['origin'\]\[0\] is a \w*Path"):
        QM9(str(tmp_path), max_molecules=3, pre_transform=add_path, log=False)
