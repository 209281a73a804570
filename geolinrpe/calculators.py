r"""ASE calculator: run molecular dynamics and relaxations with a trained geolinrpe model.

:class:`GeolinrpeCalculator` wraps a checkpoint of an energy model (``data.task=oc20-s2ef``:
a model built with ``predict_forces``) as an :class:`ase.calculators.calculator.Calculator`,
as ``MACECalculator`` (MACE), ``FAIRChemCalculator`` (fairchem), ``NequIPCalculator`` or
``SpkCalculator`` (schnetpack) do for theirs.

Use it with ASE::

    from ase.build import add_adsorbate, fcc111
    from ase.md.verlet import VelocityVerlet
    from ase.optimize import BFGS
    from ase import units

    from geolinrpe.calculators import GeolinrpeCalculator

    slab = fcc111("Cu", size=(2, 2, 3), vacuum=7.0)
    add_adsorbate(slab, "O", 1.8, "fcc")
    slab.calc = GeolinrpeCalculator("runs/s2ef/best.pt", device="auto")
    BFGS(slab).run(fmax=0.05)                      # relaxation
    VelocityVerlet(slab, 1.0 * units.fs).run(100)  # NVE molecular dynamics
    print(slab.get_potential_energy(), slab.get_forces().shape)

What is computed, per structure of ``n`` atoms (units: eV and Angstrom):

* ``energy`` (and ``free_energy``, the same number): the model's energy ``E`` in eV. A model
  predicts the energy it was trained on: one trained on OC20 S2EF's ``y`` (also the
  synthetic OC20 data of :func:`geolinrpe.data.oc20.make_synthetic`) predicts the
  *adsorption-referenced* energy ``E_total - E_clean_slab - sum of gas references``, not a
  total DFT (or EMT) energy. Differences between structures of the same slab and adsorbate
  (relaxations, MD) are meaningful; comparing to another code's total energies is not.
* ``forces`` ``[n, 3]`` in eV/Angstrom: ``F_i = -dE/dr_i`` by autograd (exactly the gradient
  of the returned energy, so NVE dynamics conserves ``E + kinetic``). ASE applies the atoms'
  constraints (e.g. ``FixAtoms``) itself in ``atoms.get_forces()``.
* ``stress`` ``[6]`` in eV/Angstrom^3, ASE's Voigt order ``(xx, yy, zz, yz, xz, xy)`` and
  sign convention: ``sigma = (1 / V) dE/d(epsilon)`` at ``epsilon = 0``, the derivative of the
  energy of the homogeneously strained structure (positions ``r (I + epsilon)`` and cell
  rows ``L (I + epsilon)``, ``epsilon`` symmetric) divided by the cell volume ``V``. A
  compressed crystal has negative stress (pressure ``-trace(sigma) / 3`` positive), as with
  ASE's EMT. Only for fully periodic structures (``pbc`` all ``True``, non-singular cell);
  otherwise ``atoms.get_stress()`` raises
  :class:`~ase.calculators.calculator.PropertyNotImplementedError`.

Periodic structures need a periodic model (``model.options.periodic: true``, as OC20
models are): the calculator refuses periodic atoms for a model that ignores the cell (it
would see a cluster). A model with a periodic RPE (``"flt-periodic"``) also needs a
non-singular cell for non-periodic structures.

Elements: the model accepts atomic numbers up to its ``max_z``, but only elements of its
training data have trained embeddings; the calculator cannot tell which those were.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ase.calculators.calculator import Calculator, PropertyNotImplementedError, all_changes
from torch import nn

__all__ = ["DTYPES", "GeolinrpeCalculator"]

#: accepted ``default_dtype`` values
DTYPES = {"float32": torch.float32, "float64": torch.float64}


@contextlib.contextmanager
def _energy_only(model: nn.Module) -> Iterator[None]:
    """Turns the model's own force computation off for one forward: the calculator
    differentiates the energy itself, with respect to positions and strain in one pass."""
    saved = model.predict_forces
    model.predict_forces = False
    try:
        yield
    finally:
        model.predict_forces = saved


def _is_singular(cell: np.ndarray) -> bool:
    return abs(float(np.linalg.det(cell))) < 1e-12


class GeolinrpeCalculator(Calculator):
    r"""ASE calculator of a trained geolinrpe energy model (energy, forces, stress).

    See the module docstring (:mod:`geolinrpe.calculators`) for what is computed, the units
    and the sign conventions; in short: ``energy`` and ``free_energy`` in eV (the model's
    energy: adsorption-referenced for OC20 S2EF models, not a total energy), ``forces [n, 3]``
    in eV/Angstrom (``-dE/dr``), ``stress [6]`` in eV/Angstrom^3 (Voigt ``xx, yy, zz, yz, xz,
    xy``; ``(1/V) dE/d(strain)``, fully periodic structures only).

    Args:
        model_path: a ``last.pt``/``best.pt`` checkpoint of a run whose task predicts energies
            (``data.task=oc20-s2ef``). Read with :func:`geolinrpe.train.load_checkpoint`.
        device: ``"auto"`` (CUDA when available, default), ``"cpu"`` or ``"cuda"``.
        default_dtype: ``"float64"`` (default: finite differences, long MD and relaxations
            are cleaner in double precision; about twice the cost of float32 on a CPU) or
            ``"float32"``. The model is converted to it (a copy when given a loaded model).
        model: instead of ``model_path``, a run already loaded by
            :func:`geolinrpe.train.load_checkpoint` (a :class:`~geolinrpe.train.LoadedRun`);
            see also :meth:`from_loaded`.
        **kwargs: passed to :class:`ase.calculators.calculator.Calculator` (``label``, ...).

    Raises:
        geolinrpe.train.CheckpointError: (a ``ValueError``) ``model_path`` is missing or not
            a readable geolinrpe checkpoint; the message names the file.
        ValueError: the checkpoint's task does not predict energies (e.g. a QM9 property or
            an OC20 IS2RE model); the message names the file and the task.
    """

    implemented_properties = ["energy", "free_energy", "forces", "stress"]

    def __init__(
        self,
        model_path: str | Path | None = None,
        device: str = "auto",
        default_dtype: str = "float64",
        *,
        model: Any = None,
        **kwargs: Any,
    ) -> None:
        from .train import load_checkpoint

        if default_dtype not in DTYPES:
            raise ValueError(
                f"default_dtype must be one of {sorted(DTYPES)}, got {default_dtype!r}"
            )
        if (model_path is None) == (model is None):
            raise ValueError("give exactly one of model_path and model (a loaded run)")
        if model is None:
            source = f"checkpoint {str(model_path)!r}"
            loaded = load_checkpoint(model_path, device=device)
        else:
            source = "the loaded run"
            loaded = model
        if getattr(loaded.model, "predict_forces", None) is not True:
            raise ValueError(
                f"{source} was trained for task {loaded.task.name!r}, which does not predict "
                "a potential energy with forces; GeolinrpeCalculator needs an energy model "
                "(a run with data.task=oc20-s2ef)"
            )
        super().__init__(**kwargs)
        self.loaded = loaded
        self.task = loaded.task
        self.device = loaded.device if model is None else _resolve_device(device, loaded)
        self.dtype = DTYPES[default_dtype]
        net = loaded.model
        first = next(iter(net.parameters()), None)
        if first is not None and (first.dtype != self.dtype or first.device != self.device):
            net = copy.deepcopy(net) if model is not None else net
            net = net.to(device=self.device, dtype=self.dtype)
        self.model = net.eval()
        #: whether the model reads ``cell``/``pbc`` (periodic structures allowed)
        self.periodic = bool(getattr(net, "periodic", False))
        self.periodic_rpe = bool(getattr(net, "periodic_rpe", False))
        #: forward passes done (each ``calculate`` that ASE could not serve from its cache)
        self.num_evaluations = 0

    @classmethod
    def from_loaded(
        cls, loaded: Any, device: str = "auto", default_dtype: str = "float64", **kwargs: Any
    ) -> GeolinrpeCalculator:
        """A calculator of a run loaded by :func:`geolinrpe.train.load_checkpoint` (its model
        is copied when the dtype or device changes, so ``loaded`` stays as it was)."""
        return cls(device=device, default_dtype=default_dtype, model=loaded, **kwargs)

    # ------------------------------------------------------------------------------ ASE
    def calculate(
        self,
        atoms: Any = None,
        properties: list[str] | None = None,
        system_changes: list[str] = all_changes,
    ) -> None:
        """Compute energy, free energy, forces and (fully periodic structures) stress of
        ``atoms`` into ``self.results`` (ASE calls this through ``atoms.get_*``)."""
        properties = ["energy"] if properties is None else properties
        super().calculate(atoms, properties, system_changes)
        atoms = self.atoms
        pbc = np.asarray(atoms.pbc, dtype=bool)
        cell = np.array(atoms.cell, dtype=np.float64)
        with_stress = bool(pbc.all()) and not _is_singular(cell)
        if "stress" in properties and not with_stress:
            raise PropertyNotImplementedError(
                "stress needs a fully periodic structure (pbc all True) with a non-singular "
                f"cell; these atoms have pbc={pbc.tolist()} and cell volume "
                f"{abs(float(np.linalg.det(cell))):.3g} A^3"
            )
        cell = self._model_cell(atoms, pbc, cell)
        energy, forces, stress = self._evaluate(atoms, cell, pbc, with_stress)
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if stress is not None:
            self.results["stress"] = stress

    # ------------------------------------------------------------------------ internals
    def _model_cell(self, atoms: Any, pbc: np.ndarray, cell: np.ndarray) -> np.ndarray:
        """The cell handed to the model, or a ``ValueError`` for structures it cannot do."""
        if not self.periodic:
            if pbc.any():
                raise ValueError(
                    f"{atoms.get_chemical_formula()} is periodic (pbc={pbc.tolist()}) but this "
                    "model ignores the cell (it was not built with periodic=True): it would "
                    "see a cluster. Use a periodic model or set atoms.pbc = False"
                )
            return cell
        if not _is_singular(cell):
            return cell
        if pbc.any() or self.periodic_rpe:
            why = "is periodic" if pbc.any() else "has a periodic RPE"
            raise ValueError(
                f"{atoms.get_chemical_formula()}: the cell is singular (volume "
                f"{abs(float(np.linalg.det(cell))):.3g} A^3) but the model {why} and needs "
                "three independent cell vectors (set atoms.cell)"
            )
        # a molecule without a cell: the model only searches periodic images along the
        # (here: no) periodic axes, any non-singular cell does
        return np.array(atoms.cell.complete(), dtype=np.float64)

    def _evaluate(
        self, atoms: Any, cell: np.ndarray, pbc: np.ndarray, with_stress: bool
    ) -> tuple[float, np.ndarray, np.ndarray | None]:
        from torch_geometric.data import Data

        dev, dt = self.device, self.dtype
        n = len(atoms)
        pos0 = torch.tensor(atoms.positions, dtype=dt, device=dev).requires_grad_(True)
        cell0 = torch.tensor(cell, dtype=dt, device=dev)
        item = Data(
            z=torch.as_tensor(np.asarray(atoms.numbers), dtype=torch.long),
            pos=pos0.detach().cpu(),
            cell=cell0.detach().cpu().reshape(1, 3, 3),
            pbc=torch.as_tensor(pbc).reshape(1, 3),
            tags=torch.as_tensor(np.asarray(atoms.get_tags()), dtype=torch.long),
            natoms=torch.tensor([n]),
        )
        batch = self.task.collate([item]).to(dev)
        with torch.enable_grad():
            eps = torch.zeros(3, 3, dtype=dt, device=dev, requires_grad=with_stress)
            strain = torch.eye(3, dtype=dt, device=dev) + 0.5 * (eps + eps.T)  # symmetric
            batch.pos = pos0 @ strain  # r' = r (I + eps), rows are atoms
            batch.cell = (cell0 @ strain).reshape(1, 3, 3)  # L' = L (I + eps), rows a_k
            with _energy_only(self.model):
                out = self.task.forward(self.model, batch)
            energy = out["y"][:, 0].sum()
            inputs = [pos0, eps] if with_stress else [pos0]
            grads = torch.autograd.grad(energy, inputs, allow_unused=True, materialize_grads=True)
        self.num_evaluations += 1
        forces = (-grads[0]).detach().cpu().double().numpy()
        stress = None
        if with_stress:
            volume = abs(float(np.linalg.det(cell)))
            s = grads[1].detach().cpu().double().numpy() / volume  # [3, 3] symmetric
            stress = np.array([s[0, 0], s[1, 1], s[2, 2], s[1, 2], s[0, 2], s[0, 1]])
        return float(energy.detach().cpu()), forces, stress


def _resolve_device(device: str, loaded: Any) -> torch.device:
    """``auto``: the loaded run's device; ``cpu``/``cuda`` as named."""
    if device == "auto":
        return torch.device(loaded.device)
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device 'cuda' asked for but CUDA is not available")
    return torch.device(device)
