"""SchNetBaseline: PyG's SchNet on the pure-torch radius graph."""

import pytest
import torch
from torch_geometric.data import Batch

from geolinrpe.data import collate_padded, from_smiles
from geolinrpe.models import SchNetBaseline
from geolinrpe.models.radius import RadiusInteractionGraph
from geolinrpe.testing import random_rotation

D64 = torch.float64
TIGHT = dict(atol=1e-9, rtol=1e-9)


def tiny(**kw):
    options = dict(hidden_channels=16, num_filters=16, num_interactions=2, cutoff=4.0)
    options.update(kw)
    return SchNetBaseline(**options).to(D64).eval()


@pytest.fixture(scope="module")
def mols():
    data, report = from_smiles(["O", "CCO", "c1ccncc1", "CC(=O)N"])
    assert not report.failures
    for d in data:
        d.pos = d.pos.to(D64)
    return data


def test_runs_on_a_batch_with_the_library_radius_graph(mols):
    model = tiny(num_targets=2)
    assert isinstance(model.schnet.interaction_graph, RadiusInteractionGraph)
    out = model(Batch.from_data_list(mols))
    assert set(out) == {"y"} and out["y"].shape == (4, 2) and torch.isfinite(out["y"]).all()


def test_packed_equals_padded_and_invariances(mols):
    model = tiny(predict_forces=True)
    packed = model(Batch.from_data_list(mols))
    padded_batch = collate_padded(mols)
    padded = model(padded_batch)
    mask = padded_batch["key_padding_mask"]
    torch.testing.assert_close(padded["y"], packed["y"], **TIGHT)
    torch.testing.assert_close(padded["forces"][~mask], packed["forces"], **TIGHT)
    batch = Batch.from_data_list(mols)
    rot = random_rotation(3, dtype=D64)
    moved = batch.clone()
    moved.pos = batch.pos @ rot.T + torch.tensor([1.0, -2.0, 3.0], dtype=D64)
    out = model(moved)
    torch.testing.assert_close(out["y"], packed["y"], **TIGHT)
    torch.testing.assert_close(out["forces"], packed["forces"] @ rot.T, **TIGHT)


def test_forces_are_minus_gradient(mols):
    model = tiny(predict_forces=True)
    water = mols[0]
    out = model(water)
    eps, numeric = 1e-5, torch.zeros(3, 3, dtype=D64)
    for a in range(3):
        for k in range(3):
            step = torch.zeros(3, 3, dtype=D64)
            step[a, k] = eps
            plus = model({"z": water.z, "pos": water.pos + step})["energy"]
            minus = model({"z": water.z, "pos": water.pos - step})["energy"]
            numeric[a, k] = -(plus - minus) / (2 * eps)
    torch.testing.assert_close(out["forces"], numeric, atol=1e-7, rtol=1e-6)


def test_atom_refs_and_scaling(mols):
    refs = torch.zeros(100, dtype=D64)
    refs[[1, 6, 7, 8]] = torch.tensor([-0.5, -37.75, -54.5, -75.0], dtype=D64)
    plain, scaled = tiny(), tiny(atom_refs=refs, target_mean=1.0, target_std=3.0)
    weights = {k: v for k, v in plain.state_dict().items() if not k.startswith("target_")}
    scaled.load_state_dict(weights, strict=False)
    batch = Batch.from_data_list(mols)
    ref_sum = torch.stack([refs[d.z].sum() for d in mols])
    want = 3.0 * plain(batch)["y"][:, 0] + 1.0 + ref_sum
    torch.testing.assert_close(scaled(batch)["y"][:, 0], want, **TIGHT)


def test_training_decreases_loss(mols):
    torch.manual_seed(0)
    model = tiny().float().train()
    batch = Batch.from_data_list(mols)
    batch.pos = batch.pos.float()
    target = torch.tensor([[0.5], [-1.0], [2.0], [0.0]])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = (model(batch)["y"] - target).square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "bad",
    [
        dict(cutoff=0.0),
        dict(readout="max"),
        dict(num_targets=2, predict_forces=True),
        dict(hidden_channels=0),
        dict(atom_refs=torch.zeros(101)),
    ],
)
def test_bad_options(bad):
    with pytest.raises(ValueError):
        tiny(**bad)


def test_atomic_numbers_beyond_schnet_embedding(mols):
    data = mols[0].clone()
    data.z = torch.tensor([100, 1, 1])
    with pytest.raises(ValueError, match="atomic numbers"):
        tiny()(data)


def test_periodic_schnet_sees_images_and_is_invariant_to_lattice_shifts():
    """A small box: the periodic graph includes images (the energy differs from the open
    one), moving an atom by a lattice vector or translating everything changes nothing,
    and the forces are those of the periodic energy."""
    from torch_geometric.data import Data

    gen = torch.Generator().manual_seed(0)
    cell = torch.tensor([[5.0, 0.2, 0.0], [0.3, 5.5, 0.0], [0.1, 0.2, 6.0]], dtype=D64)
    pos = torch.rand(6, 3, generator=gen, dtype=D64) @ cell
    z = torch.tensor([11, 17, 11, 17, 11, 17])

    def item(p):
        return Data(z=z, pos=p, cell=cell[None], pbc=torch.ones(1, 3, dtype=torch.bool))

    torch.manual_seed(0)
    model = tiny(periodic=True, predict_forces=True)
    torch.manual_seed(0)
    open_model = tiny(predict_forces=True)
    out = model(Batch.from_data_list([item(pos)]))
    assert abs(float(out["y"]) - float(open_model(Batch.from_data_list([item(pos)]))["y"])) > 1e-6
    moved = pos.clone()
    moved[2] += cell[0] - 2 * cell[2]
    moved = moved + torch.tensor([0.3, -0.7, 1.1], dtype=D64)
    other = model(Batch.from_data_list([item(moved)]))
    torch.testing.assert_close(other["y"], out["y"], **TIGHT)
    torch.testing.assert_close(other["forces"], out["forces"], **TIGHT)
    with pytest.raises(ValueError, match="needs cell"):
        model(Batch.from_data_list([Data(z=z, pos=pos)]))
