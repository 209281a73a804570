"""SMILES -> 3D geometry has chemically sane bond lengths and reports every failure;
ASE inputs round-trip through files and bad structures are named by file and frame."""

import ase
import ase.db
import ase.io
import numpy as np
import pytest
import torch
from ase.build import bulk, molecule
from ase.calculators.singlepoint import SinglePointCalculator

from geolinrpe.data.molecules import ConversionFailure, from_ase, from_smiles


def pair_distances(data, za, zb):
    """All distances between atoms of element ``za`` and atoms of element ``zb``."""
    a, b = data.pos[data.z == za].double(), data.pos[data.z == zb].double()
    d = torch.cdist(a, b)
    if za == zb:
        d = d[~torch.eye(len(a), dtype=torch.bool)]
    return d.flatten()


# ------------------------------------------------------------------------------- SMILES
def test_from_smiles_fields_and_bond_lengths():
    data, report = from_smiles(["CC", "CC(C)=O", "C#N"])
    assert report.ok and report.num_inputs == 3 and not report.warnings
    ethane, acetone, hcn = data
    assert ethane.z.dtype == torch.long and ethane.pos.dtype == torch.float32
    assert sorted(ethane.z.tolist()) == [1] * 6 + [6] * 2  # hydrogens included
    assert ethane.pos.shape == (8, 3) and acetone.pos.shape == (10, 3)
    assert ethane.smiles == "CC" and ethane.name == "CC" and ethane.force_field == "MMFF94"
    assert [d.idx.item() for d in data] == [0, 1, 2]
    assert pair_distances(ethane, 6, 6).min() == pytest.approx(1.53, abs=0.03)  # C-C single
    assert pair_distances(acetone, 6, 8).min() == pytest.approx(1.22, abs=0.03)  # C=O
    assert pair_distances(hcn, 6, 7).min() == pytest.approx(1.16, abs=0.03)  # C#N
    ch = pair_distances(ethane, 6, 1).sort().values[:6]  # the six C-H bonds
    assert torch.allclose(ch, torch.full_like(ch, 1.09), atol=0.02)
    # no two atoms closer than a bond
    d = torch.pdist(acetone.pos.double())
    assert d.min() > 0.9


def test_from_smiles_is_deterministic_and_independent_of_other_inputs():
    (a,), _ = from_smiles(["OCC(N)C(=O)O"], seed=3)
    (_, b), _ = from_smiles(["c1ccccc1", "OCC(N)C(=O)O"], seed=3)
    assert torch.equal(a.pos, b.pos)
    (c,), _ = from_smiles("OCC(N)C(=O)O", seed=4)  # one string is one molecule
    assert c.pos.shape == a.pos.shape and not torch.equal(a.pos, c.pos)


def test_from_smiles_unoptimised_geometry_differs():
    (relaxed,), _ = from_smiles(["CCO"])
    (raw,), _ = from_smiles(["CCO"], optimize=False)
    assert raw.force_field == "none" and relaxed.force_field == "MMFF94"
    assert torch.equal(raw.z, relaxed.z) and not torch.allclose(raw.pos, relaxed.pos)


def test_from_smiles_reports_failures_by_index():
    inputs = ["CCO", "C1CC", "C(C)(C)(C)(C)C", "", 7, "c1ccccc1"]
    data, report = from_smiles(inputs, names=list("abcdef"))
    assert [d.name for d in data] == ["a", "f"]
    assert [d.idx.item() for d in data] == [0, 5]
    assert report.num_inputs == 6 and report.num_converted == 2 and not report.ok
    failed = {f.index: f for f in report.failures}
    assert sorted(failed) == [1, 2, 3, 4]
    assert all(isinstance(f, ConversionFailure) for f in report.failures)
    index, smiles, reason = report.failures[0]  # plain (index, input, reason) tuples
    assert (index, smiles) == (1, "C1CC") and "invalid SMILES" in reason
    assert "valence" in failed[2].reason.lower()
    assert "empty" in failed[3].reason
    assert "not a string" in failed[4].reason
    with pytest.raises(ValueError, match=r"\[1\] 'C1CC'") as info:
        from_smiles(inputs, strict=True)
    assert "[2] 'C(C)(C)(C)(C)C'" in str(info.value)


def test_from_smiles_uff_fallback_is_reported():
    (data,), report = from_smiles(["[B-](F)(F)(F)F"])  # no MMFF94 parameters for boron
    assert data.force_field == "UFF"
    assert report.ok and report.warnings[0].index == 0 and "UFF" in report.warnings[0].reason
    assert pair_distances(data, 5, 9).min() == pytest.approx(1.4, abs=0.1)


def test_from_smiles_embedding_retries_then_reports(monkeypatch):
    from rdkit.Chem import AllChem

    real = AllChem.EmbedMolecule
    calls = []

    def first_fails(mol, params):
        calls.append(params.useRandomCoords)
        return -1 if not params.useRandomCoords else real(mol, params)

    monkeypatch.setattr(AllChem, "EmbedMolecule", first_fails)
    (data,), report = from_smiles(["CCO"])
    assert calls == [False, True] and report.ok and data.pos.shape == (9, 3)

    monkeypatch.setattr(AllChem, "EmbedMolecule", lambda mol, params: -1)
    data, report = from_smiles(["CCO"])
    assert data == [] and report.failures[0].index == 0
    assert "embedding failed" in report.failures[0].reason


# ---------------------------------------------------------------------------------- ASE
def water_frames(k=3):
    frames = []
    for i in range(k):
        atoms = molecule("H2O")
        atoms.positions += 0.1 * i
        atoms.calc = SinglePointCalculator(atoms, energy=-14.0 - i, forces=np.full((3, 3), 0.5 * i))
        frames.append(atoms)
    return frames


def assert_same_structure(data, atoms):
    assert torch.equal(data.z, torch.as_tensor(atoms.numbers, dtype=torch.long))
    np.testing.assert_allclose(data.pos.numpy(), atoms.positions, atol=1e-5)
    assert data.pos.dtype == torch.float32 and data.cell.shape == (1, 3, 3)
    assert data.pbc.shape == (1, 3) and data.pbc.dtype == torch.bool
    np.testing.assert_allclose(data.cell[0].numpy(), np.asarray(atoms.cell), atol=1e-5)
    assert data.pbc[0].tolist() == atoms.pbc.tolist()


@pytest.mark.parametrize("suffix", ["xyz", "extxyz"])
def test_from_ase_xyz_round_trip_with_energy_and_forces(tmp_path, suffix):
    frames = water_frames()
    path = tmp_path / f"water.{suffix}"
    ase.io.write(path, frames)
    data, report = from_ase(path)
    assert report.ok and report.num_inputs == 3 and len(data) == 3
    for i, (d, atoms) in enumerate(zip(data, frames, strict=True)):
        assert_same_structure(d, atoms)
        assert d.name == f"water.{suffix}:{i}" and d.idx.item() == i
        assert d.energy.dtype == torch.float64 and d.energy.item() == -14.0 - i
        assert torch.allclose(d.forces, torch.full((3, 3), 0.5 * i))
    # index selects frames; frame numbers follow the file
    data, _ = from_ase(str(path), index="1:")
    assert [d.name for d in data] == [f"water.{suffix}:1", f"water.{suffix}:2"]
    assert torch.allclose(data[0].pos.double(), torch.as_tensor(frames[1].positions), atol=1e-5)


def test_from_ase_periodic_files(tmp_path):
    salt = bulk("NaCl", "rocksalt", a=5.64)
    ase.io.write(tmp_path / "salt.cif", salt)
    ase.io.write(tmp_path / "POSCAR", bulk("Si"), format="vasp")
    (cif,), report = from_ase(tmp_path / "salt.cif")
    assert report.ok and cif.pbc.all() and "energy" not in cif
    # a CIF stores cell lengths/angles and fractional coordinates: compare those
    lengths = cif.cell[0].double().norm(dim=1)
    assert torch.allclose(lengths, torch.as_tensor(salt.cell.lengths()), atol=1e-4)
    frac = torch.linalg.solve(cif.cell[0].double().T, cif.pos.double().T).T
    assert torch.allclose(frac % 1.0, torch.as_tensor(salt.get_scaled_positions()), atol=1e-4)
    assert sorted(cif.z.tolist()) == [11, 17]
    (si,), _ = from_ase(tmp_path / "POSCAR")
    assert_same_structure(si, bulk("Si"))


def test_from_ase_database_and_atoms_inputs(tmp_path):
    frames = water_frames(2)
    db = ase.db.connect(tmp_path / "water.db")
    for atoms in frames:
        db.write(atoms)
    data, report = from_ase(tmp_path / "water.db")
    assert report.ok and len(data) == 2
    for d, atoms in zip(data, frames, strict=True):
        assert_same_structure(d, atoms)
        assert d.energy.item() == atoms.get_potential_energy()
    named = molecule("CH4")
    named.info["name"] = "methane"
    data, report = from_ase([named, copper := bulk("Cu"), str(tmp_path / "water.db")])
    assert [d.name for d in data[:2]] == ["methane", "atoms1"]
    assert [d.idx.item() for d in data] == [0, 1, 2, 3] and report.num_inputs == 4
    assert_same_structure(data[1], copper)


def test_from_ase_rejects_bad_structures_naming_file_and_frame(tmp_path):
    good = tmp_path / "good.xyz"
    ase.io.write(good, water_frames(3))
    lines = good.read_text().splitlines()
    lines[7] = "H 0.0 0.0"  # a coordinate missing in frame 1
    truncated = tmp_path / "truncated.xyz"
    truncated.write_text("\n".join(lines) + "\n")
    unknown = tmp_path / "unknown.xyz"
    unknown.write_text("2\n\nXx 0 0 0\nH 0 0 1\n")
    nan = tmp_path / "nan.xyz"
    nan.write_text("2\n\nC 0 0 0\nH nan 0 1\n")
    for path, words in [
        (truncated, ["truncated.xyz, frame 1"]),
        (unknown, ["unknown.xyz, frame 0", "Xx"]),
        (nan, ["nan.xyz, frame 0", "non-finite coordinates at atom 1"]),
        (tmp_path / "missing.xyz", ["missing.xyz"]),
    ]:
        with pytest.raises(ValueError) as info:
            from_ase(path)
        for word in words:
            assert word in str(info.value)
    with pytest.raises(ValueError, match="empty structure"):
        from_ase(ase.Atoms())
    with pytest.raises(ValueError, match="unknown element"):
        from_ase(ase.Atoms("X2", positions=[[0, 0, 0], [1, 1, 1]]))

    data, report = from_ase([good, truncated, unknown, nan, ase.Atoms()], strict=False)
    assert [d.name for d in data] == ["good.xyz:0", "good.xyz:1", "good.xyz:2", "truncated.xyz:0"]
    assert report.num_inputs == 8 and len(report.failures) == 4
    assert [f.index for f in report.failures] == [4, 5, 6, 7]
    assert report.failures[0].input.endswith("truncated.xyz, frame 1")


# ------------------------------------------------------------------ inputs read whole or refused
def test_from_smiles_refuses_input_not_read_whole():
    # RDKit stops at whitespace and takes the rest as the name: "C CC" would be methane
    bad = ["C CC", "C\tCC", "CC C", "CCO extra", "c1ccccc1)", "CC\nC", " CCO", "CCO\n", "CC\x00C"]
    good = ["CCO", "c1ccccc1", "[CH4]", "C.C"]
    data, report = from_smiles(bad + good, optimize=False)
    assert [d.smiles for d in data] == good
    assert [d.idx.item() for d in data] == list(range(len(bad), len(bad) + len(good)))
    assert [f.index for f in report.failures] == list(range(len(bad)))
    for failure, smiles in zip(report.failures, bad, strict=True):
        assert failure.input == smiles and "invalid SMILES" in failure.reason
        assert repr(smiles) in failure.reason  # the message names the input
    assert "whitespace ' ' at character 1" in report.failures[0].reason
    assert "whitespace '\\t'" in report.failures[1].reason
    # each good one is the whole molecule (heavy atoms + H), not a prefix
    assert [d.z.numel() for d in data] == [9, 12, 5, 10]
    with pytest.raises(ValueError, match=r"\[0\] 'C CC'"):
        from_smiles(["C CC"], strict=True)


@pytest.mark.parametrize("value", [1e300, 1e39, -1e39, float("inf")])
@pytest.mark.parametrize("field", ["pos", "cell", "energy", "forces"])
def test_from_ase_refuses_values_beyond_float32(tmp_path, field, value):
    atoms = molecule("H2O")
    atoms.cell = 10 * np.eye(3)
    energy, forces = -14.0, np.zeros((3, 3))
    if field == "pos":
        atoms.positions[2, 1] = value
    elif field == "cell":
        atoms.cell[1, 2] = value
    elif field == "energy":
        energy = value
    else:
        forces[1, 0] = value
    atoms.calc = SinglePointCalculator(atoms, energy=energy, forces=forces)
    kind = "non-finite" if value == float("inf") else "out of float32 range"
    expected = {
        "pos": f"{kind} coordinates at atom 2 (pos = {value!r})",
        "cell": f"{kind} cell at lattice vector 1 (cell = {value!r})",
        "energy": f"{kind} energy (energy = {value!r})",
        "forces": f"{kind} forces at atom 1 (forces = {value!r})",
    }[field]
    data, report = from_ase([molecule("H2O"), atoms], strict=False)
    assert len(data) == 1 and [f.index for f in report.failures] == [1]
    assert report.failures[0].reason == expected
    assert all(torch.isfinite(d.pos).all() for d in data)
    if field != "cell":  # extxyz stores the values as text; the failure names file and frame
        path = tmp_path / "big.extxyz"
        ase.io.write(path, [molecule("H2O"), atoms])
        with pytest.raises(ValueError) as info:
            from_ase(path)
        assert "big.extxyz, frame 1" in str(info.value) and expected in str(info.value)
    # the largest float32 value is kept exactly
    ok = molecule("H2O")
    ok.calc = SinglePointCalculator(ok, energy=3.0e38, forces=np.full((3, 3), -3.0e38))
    (d,), _ = from_ase(ok)
    assert d.energy.item() == 3.0e38 and torch.isfinite(d.forces).all()
