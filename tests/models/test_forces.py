"""Forces are the exact gradient of the energy: autograd forces against central finite
differences of the same model's energy (float64), on structures with shells of equidistant
neighbours (where a neighbour cap that cuts ties makes the energy jump), and the tie rule of
the radius graphs against its brute-force definition."""

import ase.build
import pytest
import torch
from torch_geometric.data import Batch, Data

from geolinrpe.models import build_model
from geolinrpe.models.radius import radius_graph, radius_graph_pbc

D64 = torch.float64
STEP = 1e-5  # finite-difference step (Angstrom), far below the tie tolerance (0.01)


def structure(kind: str):
    if kind == "molecule":
        atoms = ase.build.molecule("CH3CH2OH")
    elif kind == "slab":
        atoms = ase.build.fcc111("Cu", (3, 3, 3), vacuum=10.0)
        atoms.pbc = (True, True, False)
    else:
        atoms = ase.build.bulk("Cu", cubic=True).repeat(2)
    return (
        torch.as_tensor(atoms.numbers, dtype=torch.long),
        torch.as_tensor(atoms.positions, dtype=D64),
        torch.as_tensor(atoms.cell.array, dtype=D64)[None],
        torch.as_tensor(atoms.pbc)[None],
    )


def model_for(name: str, periodic: bool):
    torch.manual_seed(0)
    if name == "schnet":  # non-periodic; a cap of 8 cuts through the 12-atom first shell
        options = dict(hidden_channels=16, num_filters=16, num_interactions=2, cutoff=6.0)
        options["max_num_neighbors"] = 8
    else:  # the OC20 configuration (examples/configs/oc20_is2re_synthetic.yaml), smaller,
        # with the spherical-harmonics neighbour features (cutoff 5 A, default cap 32)
        options = dict(embed_dim=16, num_layers=2, num_heads=2, num_features=8, mode="logit")
        options.update(use_spherical_harmonics=True, sh_channels=4, num_radial=8)
        if periodic:
            options.update(rpe="flt-periodic", rpe_options={"max_index": 2}, periodic=True)
    return build_model(name, predict_forces=True, **options).to(D64).eval()


def energy_fn(model, z, cell, pbc, periodic):
    def run(pos):
        extra = {"cell": cell, "pbc": pbc} if periodic else {}
        return model(Batch.from_data_list([Data(z=z, pos=pos, **extra)]))

    return run


@pytest.mark.parametrize(
    "name,kind",
    [
        ("schnet", "molecule"),
        ("schnet", "slab"),
        ("schnet", "bulk"),
        ("molecule", "molecule"),
        ("molecule", "slab"),
        ("molecule", "bulk"),
    ],
)
def test_forces_equal_finite_differences_of_the_energy(name, kind):
    z, pos, cell, pbc = structure(kind)
    periodic = name == "molecule" and kind != "molecule"
    model = model_for(name, periodic)
    run = energy_fn(model, z, cell, pbc, periodic)
    out = run(pos.clone())
    forces = out["forces"].detach()
    assert forces.shape == pos.shape and forces.dtype == D64
    scale = float(forces.norm())
    assert scale > 1e-6  # the structures are not all at equilibrium: a real test
    generator = torch.Generator().manual_seed(1)
    for _ in range(3):  # directional derivatives along random displacements of all atoms
        v = torch.randn(pos.shape, dtype=D64, generator=generator)
        v /= v.norm()
        with torch.no_grad():
            e_plus = float(run(pos + STEP * v)["energy"])
            e_minus = float(run(pos - STEP * v)["energy"])
        numeric = -(e_plus - e_minus) / (2 * STEP)
        analytic = float((forces * v).sum())
        # FD error ~ STEP^2 * E''' + eps * |E| / STEP ~ 1e-9; a jump in the edge set gives
        # errors of order (energy jump) / STEP >> 1
        assert abs(numeric - analytic) <= 1e-6 * scale + 1e-8, (numeric, analytic, scale)
    # one atom, one axis (the surface/bulk atom of largest force)
    atom = int(forces.norm(dim=-1).argmax())
    for axis in range(3):
        with torch.no_grad():
            plus, minus = pos.clone(), pos.clone()
            plus[atom, axis] += STEP
            minus[atom, axis] -= STEP
            numeric = -(float(run(plus)["energy"]) - float(run(minus)["energy"])) / (2 * STEP)
        assert abs(numeric - float(forces[atom, axis])) <= 1e-6 * scale + 1e-8


def brute_force_capped(dist: torch.Tensor, r: float, k: int | None, tol: float | None):
    """Sorted (i, column) pairs: distance < r (self excluded by the caller), and of those at
    most the k nearest plus every one within tol of the k-th distance."""
    edges = []
    for i in range(dist.shape[0]):
        near = sorted((float(d), c) for c, d in enumerate(dist[i].tolist()) if d < r)
        if k is not None and len(near) > k:
            bound = near[k - 1][0] + tol
            near = [(d, c) for d, c in near if d <= bound]
        edges += sorted((i, c) for _, c in near)
    return edges


def test_radius_graph_cap_keeps_equidistant_shells():
    # fcc lattice: every interior atom has 12 nearest neighbours at a / sqrt(2)
    atoms = ase.build.bulk("Cu", cubic=True).repeat(3)
    pos = torch.as_tensor(atoms.positions, dtype=D64)
    pos = pos + 1e-4 * torch.randn(pos.shape, dtype=D64)  # ties within the tolerance only
    r, shell = 3.0, atoms.cell[0, 0] / 3 / 2**0.5
    j, i = radius_graph(pos, r, max_num_neighbors=8)
    dist = torch.cdist(pos, pos)
    dist.fill_diagonal_(float("inf"))
    expected = brute_force_capped(dist, r, 8, 0.01)
    assert list(zip(i.tolist(), j.tolist(), strict=True)) == expected
    degree = torch.bincount(i, minlength=len(pos))
    interior = (dist < shell + 0.01).sum(1) == 12
    assert interior.any() and (degree[interior] == 12).all()  # not cut to 8
    assert (degree <= 12).all() and (degree >= 3).all()
    # the strict cap of earlier versions: exactly 8, ties to the lower index
    j, i = radius_graph(pos, r, max_num_neighbors=8, tie_tolerance=None)
    assert (torch.bincount(i)[interior] == 8).all()
    # a tolerance of 0 keeps exact ties only: here (perturbed) it is the strict cap
    j0, i0 = radius_graph(pos, r, max_num_neighbors=8, tie_tolerance=0.0)
    assert list(zip(i0.tolist(), j0.tolist(), strict=True)) == brute_force_capped(dist, r, 8, 0.0)
    with pytest.raises(ValueError, match="tie_tolerance"):
        radius_graph(pos, r, tie_tolerance=-1.0)


def test_radius_graph_pbc_cap_keeps_equidistant_shells():
    atoms = ase.build.bulk("Cu", cubic=True).repeat(2)
    pos = torch.as_tensor(atoms.positions, dtype=D64)
    cell = torch.as_tensor(atoms.cell.array, dtype=D64)[None]
    # first shell (12 at a / sqrt(2) = 2.55 A) and second (6 at a = 3.61 A) within r = 4
    edge_index, shift = radius_graph_pbc(pos, cell, 4.0, max_num_neighbors=8)
    j, i = edge_index
    assert (torch.bincount(i) == 12).all()  # 12 equidistant, none cut by the cap of 8
    dist = (pos[j] + shift - pos[i]).norm(dim=-1)
    shell = atoms.cell[0, 0] / 2 / 2**0.5  # a / sqrt(2)
    assert torch.allclose(dist, torch.full_like(dist, shell), atol=1e-9)
    # cap 14: the 12 of the first shell and all 6 of the second (tied), not 2 of them
    edge_index, shift = radius_graph_pbc(pos, cell, 4.0, max_num_neighbors=14)
    assert (torch.bincount(edge_index[1]) == 18).all()
    everything, _ = radius_graph_pbc(pos, cell, 4.0, max_num_neighbors=None)
    assert torch.equal(edge_index, everything)
    strict, _ = radius_graph_pbc(pos, cell, 4.0, max_num_neighbors=14, tie_tolerance=None)
    assert (torch.bincount(strict[1]) == 14).all()
