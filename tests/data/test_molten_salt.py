"""geolinrpe.data.molten_salt: the Na/Cl Ewald data set, its physics and its OC20 round trip."""

from __future__ import annotations

import pytest
import torch

from geolinrpe.data.molten_salt import (
    MOLTEN_DENSITY,
    S2EF_FORMATS,
    make_molten_salt,
    molten_salt_structures,
    repulsion,
    write_molten_salt,
)
from geolinrpe.physics import ewald


@pytest.fixture(scope="module")
def structures():
    return molten_salt_structures(4, 32, seed=3)


def test_structures_are_neutral_boxes_at_the_requested_densities(structures):
    densities = {round(0.85 * MOLTEN_DENSITY, 6), MOLTEN_DENSITY, round(1.15 * MOLTEN_DENSITY, 6)}
    for item in structures:
        assert item.z.tolist().count(11) == item.z.tolist().count(17) == 16
        torch.testing.assert_close(item.charges, torch.where(item.z == 11, 1.0, -1.0))
        side = float(item.cell[0, 0, 0])
        assert torch.equal(item.cell[0], side * torch.eye(3))
        assert any(abs(32 / side**3 - d) < 1e-5 * d for d in densities)
        assert bool(((item.pos >= 0) & (item.pos <= side)).all())
        diff = item.pos[:, None] - item.pos[None]
        diff -= side * torch.round(diff / side)
        dist = diff.norm(dim=-1) + 1e9 * torch.eye(32)
        assert float(dist.min()) >= 2.2 - 1e-5


def test_structures_depend_only_on_seed_size_and_index(structures):
    again = molten_salt_structures(2, 32, seed=3)
    for a, b in zip(structures, again, strict=False):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.energy, b.energy)
        assert a.sid == b.sid
    other = molten_salt_structures(1, 32, seed=4)[0]
    assert not torch.equal(other.pos, structures[0].pos)


def test_energy_is_ewald_plus_repulsion_and_forces_its_gradient(structures):
    item = structures[1]
    pos, cell = item.pos.double(), item.cell[0].double()
    charges = item.charges.double()

    def energy(p):
        return ewald(p, charges, cell, tolerance=1e-10) + repulsion(p, item.z, cell)

    assert float(item.energy) == pytest.approx(float(energy(pos)), rel=1e-12)
    assert item.energy.dtype == torch.float64
    h = 1e-5
    for atom, axis in ((0, 0), (17, 2)):
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        numeric = -(energy(pos + step) - energy(pos - step)) / (2 * h)
        assert float(item.forces[atom, axis]) == pytest.approx(float(numeric), rel=1e-4, abs=1e-4)


def test_repulsion_is_the_tosi_fumi_pair_term():
    """Two ions 2.75 Å apart in a 30 Å box: c b exp((sigma_i + sigma_j - r) / rho)."""
    pos = torch.tensor([[1.0, 1.0, 1.0], [3.75, 1.0, 1.0]], dtype=torch.float64)
    cell = 30 * torch.eye(3, dtype=torch.float64)
    for z, c, sigma in (
        ((11, 17), 1.0, 1.170 + 1.585),
        ((11, 11), 1.25, 2.34),
        ((17, 17), 0.75, 3.17),
    ):
        want = c * 0.2110 * torch.exp(torch.tensor((sigma - 2.75) / 0.317, dtype=torch.float64))
        assert float(repulsion(pos, torch.tensor(z), cell)) == pytest.approx(float(want), rel=1e-12)


@pytest.mark.parametrize("fmt", S2EF_FORMATS)
def test_oc20_round_trip(tmp_path, structures, fmt):
    from geolinrpe.data import OC20

    path = write_molten_salt(
        tmp_path / ("data.aselmdb" if fmt == "aselmdb" else "s2ef"), structures, fmt
    )
    data = OC20(str(path), task="s2ef")
    assert len(data) == len(structures)
    by_sid = {int(data[i].sid): data[i] for i in range(len(data))}
    for item in structures:
        read = by_sid[item.sid]
        assert torch.equal(read.z, item.z)
        torch.testing.assert_close(read.pos, item.pos)
        torch.testing.assert_close(read.cell, item.cell)
        assert bool(read.pbc.all())
        assert float(read.y) == pytest.approx(float(item.energy), rel=1e-6)
        torch.testing.assert_close(read.force.float(), item.forces)


def test_make_molten_salt_writes_lmdb(tmp_path):
    path = make_molten_salt(tmp_path / "s2ef", 2, 16, seed=1)
    assert sorted(p.name for p in path.iterdir()) == ["data.0000.lmdb"]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_structures=1, num_atoms=15), "even"),
        (dict(num_structures=-1, num_atoms=16), "num_structures"),
        (dict(num_structures=1, num_atoms=16, densities=()), "densities"),
        (dict(num_structures=1, num_atoms=16, densities=(-1.0,)), "densities"),
        (dict(num_structures=1, num_atoms=16, min_distance=0.0), "min_distance"),
        (dict(num_structures=1, num_atoms=16, seed=-1), "seed"),
    ],
)
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        molten_salt_structures(**kwargs)


def test_an_impossible_packing_is_an_error_not_a_hang():
    with pytest.raises(RuntimeError, match="could not place"):
        molten_salt_structures(1, 64, densities=(0.5,), min_distance=2.2)


def test_write_refuses_formats_without_forces(tmp_path, structures):
    with pytest.raises(ValueError, match="format must be one of"):
        write_molten_salt(tmp_path / "x.lmdb", structures, "lmdb-is2re")
