"""GeolinrpeCalculator: ASE energies, forces and stress of a trained S2EF model.

A tiny periodic S2EF model (SH neighbour features with periodic images, no neighbour cap
inside the cutoff, so the energy is smooth) is trained for a few steps on synthetic OC20
frames (EMT slabs with H, C, N, O adsorbates on Al, Ni, Cu, Pd, Ag, Pt, Au); the calculator
runs it in float64. Forces must equal central finite differences of the calculator's own
energy and the stress finite strain differences (ASE's convention, checked on EMT).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from ase import units
from ase.build import add_adsorbate, bulk, fcc111, molecule
from ase.calculators.calculator import PropertyNotImplementedError
from ase.calculators.emt import EMT
from ase.constraints import FixAtoms
from ase.md import velocitydistribution
from ase.md.verlet import VelocityVerlet

from geolinrpe.calculators import GeolinrpeCalculator
from geolinrpe.data.oc20 import make_synthetic
from geolinrpe.train import CheckpointError, Config, LoadedRun, build_model, build_task, run

TINY_MODEL = [
    "model.name=molecule",
    "model.embed_dim=16",
    "model.num_layers=1",
    "model.num_heads=2",
    "model.num_features=16",
    "model.rpe=flt-kernel",
    "model.rpe_options={num_frequencies: 8}",
]
FAST = [
    "optim.lr=3e-3",
    "train.epochs=1",
    "train.progress=false",
    "train.plot=false",
    "train.tensorboard=false",
    "train.num_threads=1",
    "train.device=cpu",
]
S2EF_OPTIONS = (
    "model.options={periodic: true, use_spherical_harmonics: true, cutoff: 4.0, "
    "max_num_neighbors: 64, num_radial: 8, sh_channels: 8}"
)


def _split(root, out, task):
    return [
        f"data.task={task}",
        f"data.path={root}",
        "data.valid_size=2",
        "data.test_size=2",
        "data.batch_size=4",
        f"train.out_dir={out}",
    ]


@pytest.fixture(scope="module")
def s2ef_checkpoint(tmp_path_factory):
    """A tiny S2EF model trained for 8 steps on 36 synthetic frames (about 2 s)."""
    tmp = tmp_path_factory.mktemp("s2ef")
    root = make_synthetic(tmp / "data", 12, format="lmdb-s2ef", steps=5, frames=3)
    out = tmp / "run"
    run(Config.load(None, [*_split(root, out, "oc20-s2ef"), *TINY_MODEL, S2EF_OPTIONS, *FAST]))
    return out / "best.pt"


@pytest.fixture(scope="module")
def calc(s2ef_checkpoint):
    return GeolinrpeCalculator(s2ef_checkpoint, device="cpu", default_dtype="float64")


def _unfitted(overrides) -> LoadedRun:
    """An untrained S2EF model built from a config (no checkpoint), as a loaded run."""
    cfg = Config.load(None, ["data.task=oc20-s2ef", "data.path=unused", *overrides])
    state = {"mean": torch.zeros(1), "std": torch.ones(1)}
    task = build_task(cfg, state)
    model = build_model(cfg, task).eval()
    return LoadedRun(cfg, task, model, {}, torch.device("cpu"))


def _finite_difference_forces(atoms, calc, h=1e-4):
    """``-dE/dr`` by central differences of the calculator's energy."""
    probe = atoms.copy()
    probe.calc = calc
    forces = np.zeros((len(atoms), 3))
    for i in range(len(atoms)):
        for k in range(3):
            energies = []
            for sign in (1, -1):
                probe.positions = atoms.positions
                probe.positions[i, k] += sign * h
                energies.append(probe.get_potential_energy())
            forces[i, k] = -(energies[0] - energies[1]) / (2 * h)
    return forces


def _finite_strain_stress(atoms, calc, d=1e-5):
    """ASE's stress by central differences of the energy under symmetric strain
    (``cell (I + eps)``, atoms scaled along): ``(1/V) dE/d eps``, Voigt order."""
    probe = atoms.copy()
    probe.calc = calc
    cell, volume = atoms.cell.array.copy(), atoms.get_volume()
    stress = np.zeros((3, 3))
    for i in range(3):
        for j in range(i, 3):
            energies = []
            for sign in (1, -1):
                x = np.eye(3)
                x[i, j] += sign * d
                x[j, i] += sign * d
                probe.positions = atoms.positions
                probe.cell = atoms.cell
                probe.set_cell(cell @ x, scale_atoms=True)
                energies.append(probe.get_potential_energy())
            stress[i, j] = stress[j, i] = (energies[0] - energies[1]) / (4 * d * volume)
    return stress[[0, 1, 2, 1, 0, 0], [0, 1, 2, 2, 2, 1]]


def _ethanol():
    return molecule("CH3CH2OH")


def _slab():
    slab = fcc111("Cu", size=(2, 2, 3), vacuum=6.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.rattle(0.05, seed=1)  # off the symmetric sites
    return slab


def _bulk():
    crystal = bulk("Cu", cubic=True).repeat((2, 1, 1))
    crystal.rattle(0.05, seed=2)
    return crystal


@pytest.mark.parametrize("build", [_ethanol, _slab, _bulk], ids=["molecule", "slab", "bulk"])
def test_forces_are_the_negative_gradient_of_the_energy(calc, build):
    atoms = build()
    atoms.calc = calc
    forces = atoms.get_forces()
    assert forces.shape == (len(atoms), 3) and forces.dtype == np.float64
    assert np.isfinite(atoms.get_potential_energy())
    assert atoms.get_potential_energy() == atoms.get_potential_energy(force_consistent=True)
    reference = _finite_difference_forces(atoms, calc)
    error = np.abs(forces - reference).max()
    # measured: max error ~1e-8 eV/A for forces of 0.05-0.3 eV/A (float64, h = 1e-4 A)
    assert error < 1e-5 * max(1.0, np.abs(reference).max()), error
    assert np.abs(reference).max() > 1e-3  # the comparison is not between zeros


def test_stress_sign_convention_matches_ase_emt():
    """The finite-strain helper reproduces EMT's own stress (ASE's sign convention: a
    compressed crystal has negative stress)."""
    crystal = bulk("Cu", a=3.5, cubic=True)  # EMT's lattice constant is about 3.59 A
    crystal.calc = EMT()
    stress = crystal.get_stress()
    assert (stress[:3] < 0).all()
    np.testing.assert_allclose(_finite_strain_stress(crystal, EMT()), stress, atol=1e-8)


def test_stress_equals_finite_strain_differences(calc):
    crystal = _bulk()
    crystal.calc = calc
    stress = crystal.get_stress()
    assert stress.shape == (6,)
    reference = _finite_strain_stress(crystal, calc)
    # measured: ~5e-11 eV/A^3 for components of 1e-4 to 4e-3 eV/A^3
    np.testing.assert_allclose(stress, reference, rtol=1e-5, atol=1e-9)
    assert np.abs(stress).max() > 1e-4
    full = crystal.get_stress(voigt=False)
    np.testing.assert_allclose(full, full.T)


def test_stress_of_a_periodic_rpe_model_equals_finite_strain_differences():
    """``flt-periodic`` (the OC20 config's RPE) reads the cell in its frequencies: the strain
    derivative goes through them too."""
    loaded = _unfitted(
        [
            *TINY_MODEL[:5],
            "model.rpe=flt-periodic",
            "model.rpe_options={max_index: 1}",
            "model.options={periodic: true}",
        ]
    )
    calc = GeolinrpeCalculator.from_loaded(loaded, device="cpu")
    crystal = bulk("Cu", cubic=True)
    crystal.rattle(0.05, seed=3)
    crystal.calc = calc
    np.testing.assert_allclose(
        crystal.get_stress(), _finite_strain_stress(crystal, calc), rtol=1e-5, atol=1e-9
    )
    assert next(loaded.model.parameters()).dtype == torch.float32  # the run was copied


def test_stress_of_non_periodic_atoms_is_not_implemented(calc):
    for atoms in (_ethanol(), _slab()):
        atoms.calc = calc
        atoms.get_potential_energy()
        with pytest.raises(PropertyNotImplementedError, match="fully periodic"):
            atoms.get_stress()


def test_nve_dynamics_conserves_energy(calc):
    """100 velocity Verlet steps of 1 fs from 300 K on a slab + adsorbate (bottom layers
    fixed): the total energy stays within 1 % of the initial kinetic energy."""
    atoms = _slab()
    atoms.set_constraint(FixAtoms(mask=atoms.get_tags() >= 2))
    atoms.calc = calc
    thermalize = getattr(velocitydistribution, "thermalize_momenta", None)  # ASE >= 3.29
    thermalize = thermalize or velocitydistribution.MaxwellBoltzmannDistribution
    thermalize(atoms, temperature_K=300, rng=np.random.default_rng(0))
    kinetic = atoms.get_kinetic_energy()
    total = [atoms.get_total_energy()]
    dyn = VelocityVerlet(atoms, 1.0 * units.fs)
    dyn.attach(lambda: total.append(atoms.get_total_energy()), interval=1)
    dyn.run(100)
    drift = np.abs(np.array(total) - total[0]).max()
    # measured: ~1e-5 of the kinetic energy (float64)
    assert drift < 0.01 * kinetic, (drift, kinetic)
    assert np.linalg.norm(atoms.positions - _slab().positions) > 1e-3  # it moved


def test_results_are_reused_until_the_atoms_change(calc):
    crystal = _bulk()
    crystal.calc = calc
    before = calc.num_evaluations
    energy = crystal.get_potential_energy()
    forces = crystal.get_forces()
    crystal.get_stress()
    assert crystal.get_potential_energy() == energy
    assert calc.num_evaluations == before + 1  # one pass: energy, forces and stress
    crystal.positions[0, 0] += 0.01
    moved = crystal.get_potential_energy()
    assert calc.num_evaluations == before + 2
    assert moved != energy
    assert not np.array_equal(crystal.get_forces(), forces)
    crystal.set_cell(crystal.cell * 1.01, scale_atoms=True)
    crystal.get_stress()
    assert calc.num_evaluations == before + 3


def test_float32_matches_float64(s2ef_checkpoint, calc):
    single = GeolinrpeCalculator(s2ef_checkpoint, device="cpu", default_dtype="float32")
    slab = _slab()
    slab.calc = single
    forces32, energy32 = slab.get_forces(), slab.get_potential_energy()
    slab.calc = calc
    np.testing.assert_allclose(forces32, slab.get_forces(), atol=1e-4)
    assert energy32 == pytest.approx(slab.get_potential_energy(), abs=1e-4)


def test_periodic_atoms_need_a_periodic_model():
    loaded = _unfitted([*TINY_MODEL, "model.options={periodic: false}"])
    calc = GeolinrpeCalculator.from_loaded(loaded, device="cpu")
    atoms = _ethanol()
    atoms.calc = calc
    assert np.isfinite(atoms.get_forces()).all()
    crystal = _bulk()
    crystal.calc = calc
    with pytest.raises(ValueError, match="ignores the cell"):
        crystal.get_potential_energy()


def test_a_missing_checkpoint_is_a_named_error(tmp_path):
    path = tmp_path / "nothing.pt"
    with pytest.raises(CheckpointError, match="nothing.pt"):
        GeolinrpeCalculator(path, device="cpu")
    with pytest.raises(ValueError, match="default_dtype"):
        GeolinrpeCalculator(path, default_dtype="float16")


def test_a_model_without_energies_is_refused(tmp_path):
    """An OC20 IS2RE model predicts relaxed energies from initial structures: no potential
    energy surface, no forces."""
    root = make_synthetic(tmp_path / "is2re.lmdb", 10, format="lmdb-is2re", steps=2)
    out = tmp_path / "run"
    run(
        Config.load(
            None,
            [
                *_split(root, out, "oc20-is2re"),
                *TINY_MODEL,
                *FAST,
                "model.options={periodic: true}",
            ],
        )
    )
    with pytest.raises(ValueError, match=r"best\.pt.*'oc20-is2re'.*oc20-s2ef"):
        GeolinrpeCalculator(out / "best.pt", device="cpu")
