"""geolinrpe.physics.ewald: Madelung constants, a cluster in a large box, forces, pymatgen."""

from __future__ import annotations

import math

import pytest
import torch

from geolinrpe.physics import COULOMB_CONSTANT, coulomb_direct, ewald, ewald_parameters

NACL_MADELUNG = 1.747564594633  # per ion pair, nearest-neighbour distance 1
CSCL_MADELUNG = 1.762674773070


def rock_salt_conventional() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """8 ions in a cube of side 2: nearest neighbours 1 apart."""
    na = torch.tensor([[0, 0, 0], [0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.float64)
    pos = torch.cat([na, na + torch.tensor([1.0, 0, 0], dtype=torch.float64)])
    charges = torch.tensor([1.0] * 4 + [-1.0] * 4, dtype=torch.float64)
    return pos, charges, 2 * torch.eye(3, dtype=torch.float64)


def random_salt(n: int, side: float, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    cell = torch.tensor([[side, 0.3, 0.0], [0.5, side * 1.1, 0.2], [0.0, 0.4, side * 0.9]])
    pos = torch.rand(n, 3, generator=g, dtype=torch.float64) @ cell.double()
    charges = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(n // 2)
    return pos, charges, cell.double()


def test_rock_salt_madelung_constant_conventional_and_primitive_cells():
    pos, charges, cell = rock_salt_conventional()
    energy = ewald(pos, charges, cell, coulomb_constant=1.0)
    assert -float(energy) / 4 == pytest.approx(NACL_MADELUNG, rel=1e-9)
    primitive = torch.tensor([[0, 1, 1], [1, 0, 1], [1, 1, 0]], dtype=torch.float64)
    pair = torch.tensor([[0, 0, 0], [1, 0, 0]], dtype=torch.float64)
    energy = ewald(
        pair, torch.tensor([1.0, -1.0], dtype=torch.float64), primitive, coulomb_constant=1
    )
    assert -float(energy) == pytest.approx(NACL_MADELUNG, rel=1e-9)


def test_cesium_chloride_madelung_constant():
    pos = torch.tensor([[0, 0, 0], [0.5, 0.5, 0.5]], dtype=torch.float64)
    charges = torch.tensor([1.0, -1.0], dtype=torch.float64)
    energy = ewald(pos, charges, torch.eye(3, dtype=torch.float64), coulomb_constant=1.0)
    assert -float(energy) * math.sqrt(3) / 2 == pytest.approx(CSCL_MADELUNG, rel=1e-9)


def test_the_energy_does_not_depend_on_the_splitting_parameter():
    pos, charges, cell = random_salt(16, 6.0, 0)
    energies = [float(ewald(pos, charges, cell, alpha=a)) for a in (0.3, 0.6, 1.2)]
    assert max(energies) - min(energies) < 1e-8 * abs(energies[0])
    default = ewald_parameters(cell, 16)
    assert default.real_cutoff == pytest.approx(math.sqrt(-math.log(1e-12)) / default.alpha)


def test_a_neutral_cluster_in_a_large_box_equals_the_direct_sum():
    """Tin-foil Ewald = vacuum sum - 2 pi |D|^2 / (3 V) (dipole D), up to image quadrupoles
    (~|Q|^2 / L^5: 1e-9 relative here)."""
    g = torch.Generator().manual_seed(1)
    pos = torch.rand(8, 3, generator=g, dtype=torch.float64) * 5.0 + 40.0
    charges = torch.tensor([1.0, -1.0, 2.0, -2.0, 0.5, -0.5, 1.0, -1.0], dtype=torch.float64)
    side = 80.0
    energy = ewald(pos, charges, side * torch.eye(3, dtype=torch.float64))
    dipole = (charges[:, None] * pos).sum(0)
    corrected = energy + COULOMB_CONSTANT * 2 * math.pi * dipole.pow(2).sum() / (3 * side**3)
    direct = coulomb_direct(pos, charges)
    assert float((corrected - direct).abs()) < 1e-6 * float(direct.abs())


def test_forces_are_minus_the_finite_difference_gradient_and_sum_to_zero():
    pos, charges, cell = random_salt(12, 5.0, 2)
    energy, forces = ewald(pos, charges, cell, forces=True)
    assert forces.shape == pos.shape
    assert float(forces.sum(0).abs().max()) < 1e-9 * float(forces.abs().max())
    h = 1e-5
    for atom, axis in ((0, 0), (5, 2), (11, 1)):
        step = torch.zeros_like(pos)
        step[atom, axis] = h
        plus, minus = ewald(pos + step, charges, cell), ewald(pos - step, charges, cell)
        numeric = -(plus - minus) / (2 * h)
        assert float(forces[atom, axis]) == pytest.approx(float(numeric), rel=1e-6, abs=1e-7)


def test_translations_and_lattice_shifts_leave_the_energy_unchanged():
    pos, charges, cell = random_salt(10, 5.0, 3)
    energy = ewald(pos, charges, cell)
    moved = pos + torch.tensor([0.37, -1.2, 2.5], dtype=torch.float64)
    wrapped = pos.clone()
    wrapped[3] += cell[0] - 2 * cell[2]
    for other in (moved, wrapped):
        assert float(ewald(other, charges, cell)) == pytest.approx(float(energy), rel=1e-10)


def test_a_charged_cell_gets_the_neutralising_background():
    """One charge in a cubic cell: the Wigner lattice energy -2.837297 / (2 L)."""
    energy = ewald(
        torch.zeros(1, 3, dtype=torch.float64),
        torch.ones(1, dtype=torch.float64),
        3.0 * torch.eye(3, dtype=torch.float64),
        coulomb_constant=1.0,
    )
    assert float(energy) == pytest.approx(-2.837297479 / (2 * 3.0), rel=1e-8)


def test_equals_pymatgen_ewald_summation():
    structure_module = pytest.importorskip("pymatgen.core")
    ewald_module = pytest.importorskip("pymatgen.analysis.ewald")
    pos, charges, cell = random_salt(24, 7.0, 4)
    charges = charges * torch.linspace(0.5, 1.5, 24, dtype=torch.float64)
    charges[-1] -= charges.sum()  # neutral
    species = ["Na" if q > 0 else "Cl" for q in charges.tolist()]
    structure = structure_module.Structure(
        structure_module.Lattice(cell.numpy()), species, pos.numpy(), coords_are_cartesian=True
    )
    structure.add_oxidation_state_by_site(charges.tolist())
    reference = ewald_module.EwaldSummation(structure, acc_factor=12.0, compute_forces=True)
    energy, forces = ewald(pos, charges, cell, forces=True)
    assert float(energy) == pytest.approx(reference.total_energy, rel=1e-6)
    torch.testing.assert_close(
        forces, torch.from_numpy(reference.forces), rtol=1e-6, atol=1e-6 * float(forces.abs().max())
    )


@pytest.mark.parametrize(
    ("args", "match"),
    [
        ((torch.zeros(4, 2), torch.zeros(4), torch.eye(3)), "pos must be"),
        ((torch.zeros(4, 3), torch.zeros(3), torch.eye(3)), "charges must be"),
        ((torch.zeros(4, 3), torch.zeros(4), torch.eye(2)), "cell must be"),
        ((torch.zeros(4, 3), torch.zeros(4), torch.zeros(3, 3)), "non-zero volume"),
        ((torch.full((4, 3), math.nan), torch.zeros(4), torch.eye(3)), "pos must be finite"),
    ],
)
def test_bad_inputs_are_named(args, match):
    with pytest.raises(ValueError, match=match):
        ewald(*args)


def test_bad_parameters_are_named():
    pos, charges, cell = rock_salt_conventional()
    with pytest.raises(ValueError, match="tolerance"):
        ewald(pos, charges, cell, tolerance=2.0)
    with pytest.raises(ValueError, match="alpha"):
        ewald(pos, charges, cell, alpha=-1.0)
