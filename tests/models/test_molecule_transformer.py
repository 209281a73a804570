"""MoleculeTransformer: outputs, invariances, packed == padded, forces, baselines, training."""

import pytest
import torch
from torch_geometric.data import Batch, Data

from geolinrpe.data import collate_padded, from_smiles
from geolinrpe.models import MoleculeTransformer, SphericalHarmonicsEmbedding
from geolinrpe.nn import use_reference
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_rotation_invariant,
    assert_translation_invariant,
    random_rotation,
)

D64 = torch.float64
TIGHT = dict(atol=1e-9, rtol=1e-9)
FRAME = dict(rpe="flt-radial", rpe_options={"rotation": "frame"})


def tiny(**kw):
    options = dict(embed_dim=16, num_heads=2, num_layers=2, num_features=16, cutoff=3.0)
    options.update(kw)
    return MoleculeTransformer(**options).to(D64).eval()


def molecules(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    z = torch.randint(1, 10, (sum(sizes),), generator=g)
    return z, 1.3 * torch.randn(sum(sizes), 3, generator=g, dtype=D64), batch


def as_graph_fn(model, key="y"):
    """``fn(x, pos, batch=..., key_padding_mask=...)`` for ``geolinrpe.testing``: ``x`` holds
    atomic numbers as floats (so padding can be noise); graph outputs are broadcast to atoms,
    which turns invariance into the helpers' equivariance."""

    def fn(x, pos, batch=None, key_padding_mask=None):
        z = x.abs().round().long().clamp(1, 9)
        if key_padding_mask is None:
            batch = torch.zeros(len(z), dtype=torch.long) if batch is None else batch
            out = model({"z": z, "pos": pos, "batch": batch})
            return out[key] if key == "forces" else out[key][batch]
        out = model({"z": z, "pos": pos, "key_padding_mask": key_padding_mask})
        if key == "forces":
            return out[key]
        return out[key][:, None].expand(-1, z.shape[1], -1)

    return fn


def test_outputs_shapes_and_dict():
    z, pos, batch = molecules([4, 7, 1])
    model = tiny(num_targets=3)
    out = model(Batch(z=z, pos=pos, batch=batch))
    assert set(out) == {"y"} and out["y"].shape == (3, 3)
    out = tiny(predict_forces=True)(Batch(z=z, pos=pos, batch=batch))
    assert set(out) == {"y", "energy", "forces"}
    assert out["energy"].shape == (3,) and out["forces"].shape == (12, 3)
    single = tiny()(Data(z=z[:4], pos=pos[:4]))["y"]
    assert single.shape == (1, 1)


@pytest.mark.parametrize(
    "kw",
    [
        dict(FRAME),
        dict(FRAME, mode="mask"),
        dict(rpe=None, use_spherical_harmonics=True),
        dict(FRAME, use_spherical_harmonics=True, attention="exact"),
    ],
)
def test_translation_rotation_permutation_invariance(kw):
    model = tiny(**kw)
    z, pos, batch = molecules([6, 9])
    fn = as_graph_fn(model)
    x = z.to(D64)
    assert_translation_invariant(fn, x, pos, batch=batch, **TIGHT)
    assert_rotation_invariant(fn, x, pos, batch=batch, **TIGHT)
    assert_permutation_equivariant(fn, x, pos, batch=batch, **TIGHT)


def test_default_rpe_is_translation_and_permutation_invariant():
    model = tiny()  # flt-radial, fixed draw: rotation invariant only in expectation
    z, pos, batch = molecules([5, 8])
    fn = as_graph_fn(model)
    assert_translation_invariant(fn, z.to(D64), pos, batch=batch, **TIGHT)
    assert_permutation_equivariant(fn, z.to(D64), pos, batch=batch, **TIGHT)


def test_forces_rotate_with_the_molecule():
    model = tiny(predict_forces=True, use_spherical_harmonics=True, **FRAME)
    z, pos, batch = molecules([6, 5])
    rot = random_rotation(3, dtype=D64)
    data = {"z": z, "pos": pos, "batch": batch}
    forces = model(data)["forces"]
    rotated = model({**data, "pos": pos @ rot.T})["forces"]
    torch.testing.assert_close(rotated, forces @ rot.T, **TIGHT)


def smiles_batch():
    data, report = from_smiles(["O", "CCO", "c1ccncc1"])
    assert not report.failures
    for d in data:
        d.pos = d.pos.to(D64)
    return data


@pytest.mark.parametrize("kw", [dict(), dict(use_spherical_harmonics=True, mode="mask")])
def test_packed_equals_padded(kw):
    data = smiles_batch()
    model = tiny(predict_forces=True, num_targets=1, **kw)
    packed = model(Batch.from_data_list(data))
    padded_batch = collate_padded(data)
    padded = model(padded_batch)
    torch.testing.assert_close(padded["y"], packed["y"], **TIGHT)
    mask = padded_batch["key_padding_mask"]
    torch.testing.assert_close(padded["forces"][~mask], packed["forces"], **TIGHT)
    assert (padded["forces"][mask] == 0).all()
    # padding slots filled with noise (random elements and positions) change nothing
    z, pos, batch = molecules([3, 8, 1])
    model = tiny(use_spherical_harmonics=True)
    assert_padding_consistent(as_graph_fn(model), z.to(D64), pos, batch, **TIGHT)


def test_forces_are_minus_gradient_of_energy_finite_differences():
    model = tiny(predict_forces=True, use_spherical_harmonics=True, cutoff=5.0)
    water = smiles_batch()[0]
    z, pos = water.z, water.pos.clone()
    out = model({"z": z, "pos": pos, "batch": torch.zeros(3, dtype=torch.long)})
    eps = 1e-5
    numeric = torch.zeros_like(pos)
    for a in range(3):
        for k in range(3):
            step = torch.zeros_like(pos)
            step[a, k] = eps
            plus = model(Data(z=z, pos=pos + step))["energy"]
            minus = model(Data(z=z, pos=pos - step))["energy"]
            numeric[a, k] = -(plus - minus) / (2 * eps)
    torch.testing.assert_close(out["forces"], numeric, atol=1e-7, rtol=1e-6)
    assert out["forces"].abs().max() > 1e-4
    torch.testing.assert_close(out["forces"].sum(0), torch.zeros(3, dtype=D64), atol=1e-10, rtol=0)


def test_forces_in_training_mode_are_differentiable_and_under_no_grad():
    model = tiny(predict_forces=True).train()
    z, pos, batch = molecules([4, 3])
    out = model(Batch(z=z, pos=pos, batch=batch))
    assert out["forces"].requires_grad  # create_graph: a force loss trains the model
    out["forces"].square().sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    with torch.no_grad():  # evaluation loops run under no_grad
        forces = model.eval()(Batch(z=z, pos=pos, batch=batch))["forces"]
    assert not forces.requires_grad and torch.isfinite(forces).all()


def test_exact_attention_model_equals_reference_path_of_linear_model():
    linear = tiny(**FRAME, use_spherical_harmonics=True)
    exact = tiny(**FRAME, use_spherical_harmonics=True, attention="exact")
    exact.load_state_dict(linear.state_dict())
    z, pos, batch = molecules([5, 9])
    data = Batch(z=z, pos=pos, batch=batch)
    with use_reference(linear):
        reference = linear(data)["y"]
    torch.testing.assert_close(exact(data)["y"], reference, **TIGHT)
    with use_reference(linear, kernel="features", rpe="features"):
        explicit = linear(data)["y"]
    torch.testing.assert_close(explicit, linear(data)["y"], **TIGHT)


def test_atom_refs_and_target_scaling():
    z, pos, batch = molecules([3, 5])
    refs = torch.arange(10, dtype=D64) / 4 - 2  # [Z]: elements 0..9, exact in float32
    plain = tiny()
    scaled = tiny(atom_refs=refs, target_mean=3.0, target_std=2.0)
    weights = {k: v for k, v in plain.state_dict().items() if not k.startswith("target_")}
    scaled.load_state_dict(weights, strict=False)  # the scaling buffers are checkpointed too
    data = Batch(z=z, pos=pos, batch=batch)
    want = (
        2.0 * plain(data)["y"][:, 0]
        + 3.0
        + torch.stack([refs[z[batch == g]].sum() for g in (0, 1)])
    )
    torch.testing.assert_close(scaled(data)["y"][:, 0], want, **TIGHT)
    assert scaled.atom_refs.shape == (101, 1)
    with pytest.raises(ValueError, match="atom_refs"):
        tiny(atom_refs=torch.zeros(200))
    with pytest.raises(ValueError, match="target_std"):
        tiny(target_std=0.0)


def test_periodic_cell_lattice_shift_invariance():
    model = tiny(rpe="flt-periodic", periodic=True, use_spherical_harmonics=True)
    cell = torch.tensor([[[3.0, 0.0, 0.0], [0.5, 3.2, 0.0], [0.0, 0.3, 3.5]]], dtype=D64)
    z, pos, _ = molecules([5])
    data = {"z": z, "pos": pos, "batch": torch.zeros(5, dtype=torch.long), "cell": cell}
    y = model(data)["y"]
    moved = pos.clone()
    moved[0] += cell[0, 1] - 2 * cell[0, 2]  # one atom to another periodic image
    torch.testing.assert_close(model({**data, "pos": moved})["y"], y, **TIGHT)
    slab = model({**data, "pbc": torch.tensor([[True, True, False]])})["y"]
    assert torch.isfinite(slab).all()
    with pytest.raises(ValueError, match="cell"):
        model({"z": z, "pos": pos})
    with pytest.raises(ValueError, match="periodic"):
        tiny(rpe="flt-periodic")


def salt_boxes():
    """Two periodic boxes of 6 and 5 ions (packed), with their cells."""
    cells = torch.tensor(
        [
            [[6.0, 0.0, 0.0], [0.5, 6.2, 0.0], [0.0, 0.3, 6.5]],
            [[5.5, 0.2, 0.0], [0.0, 6.0, 0.0], [0.3, 0.0, 5.8]],
        ],
        dtype=D64,
    )
    g = torch.Generator().manual_seed(4)
    sizes = [6, 5]
    pos = torch.cat(
        [torch.rand(n, 3, generator=g, dtype=D64) @ cells[i] for i, n in enumerate(sizes)]
    )
    z = torch.tensor([11, 17] * 3 + [11, 17, 11, 17, 11])
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor(sizes))
    return {"z": z, "pos": pos, "batch": batch, "cell": cells}


def test_reciprocal_energy_readout_invariances_forces_and_exact_path():
    """The learned reciprocal-space energy: lattice shifts, translations and permutations
    leave energies unchanged, forces are finite differences of the energy, packed equals
    padded, and attention="exact" (dense readout) equals the linear model's reference path."""
    kw = dict(
        rpe=None,
        periodic=True,
        use_spherical_harmonics=True,
        predict_forces=True,
        reciprocal_energy={"num_channels": 2, "max_index": 2},
    )
    torch.manual_seed(0)
    model = tiny(**kw)
    data = salt_boxes()
    out = model(data)
    moved = data["pos"].clone()
    moved[1] += data["cell"][0, 0] - data["cell"][0, 2]
    moved[8] += 2 * data["cell"][1, 1]
    moved += torch.tensor([0.2, -0.4, 0.9], dtype=D64)
    torch.testing.assert_close(model({**data, "pos": moved})["y"], out["y"], **TIGHT)
    perm = torch.cat([torch.randperm(6), 6 + torch.randperm(5)])
    permuted = {**data, "z": data["z"][perm], "pos": data["pos"][perm]}
    torch.testing.assert_close(model(permuted)["y"], out["y"], **TIGHT)
    pos, eps = data["pos"], 1e-5
    for atom, axis in ((0, 0), (7, 2)):
        step = torch.zeros_like(pos)
        step[atom, axis] = eps
        plus = model({**data, "pos": pos + step})["energy"].sum()
        minus = model({**data, "pos": pos - step})["energy"].sum()
        numeric = -(plus - minus) / (2 * eps)
        assert float(out["forces"][atom, axis]) == pytest.approx(float(numeric), rel=1e-5, abs=1e-7)
    from geolinrpe.ops.packing import to_padded

    zd, mask = to_padded(data["z"], data["batch"])
    padded = model(
        {
            "z": zd,
            "pos": to_padded(pos, data["batch"])[0],
            "key_padding_mask": mask,
            "cell": data["cell"],
        }
    )
    torch.testing.assert_close(padded["y"], out["y"], **TIGHT)
    torch.manual_seed(0)
    exact = tiny(attention="exact", **kw)
    with use_reference(model):
        torch.testing.assert_close(exact(data)["y"], model(data)["y"], **TIGHT)
    without = tiny(**{**kw, "reciprocal_energy": None})
    assert without.reciprocal is None
    with pytest.raises(ValueError, match="reciprocal_energy needs periodic"):
        tiny(reciprocal_energy={})


def test_spherical_harmonics_features_are_rotation_invariant():
    sh = SphericalHarmonicsEmbedding(8, lmax=3, cutoff=3.0).to(D64)
    z, pos, batch = molecules([7, 4])
    rot = random_rotation(3, dtype=D64)
    torch.testing.assert_close(sh(z, pos @ rot.T, batch), sh(z, pos, batch), **TIGHT)
    assert sh(z, pos, batch).std() > 0.1


def test_training_decreases_loss_and_gradients_are_finite():
    torch.manual_seed(1)
    model = tiny(use_spherical_harmonics=True, predict_forces=True).float().train()
    z, pos, batch = molecules([4, 6, 5, 3])
    data = Batch(z=z, pos=pos.float(), batch=batch)
    target = torch.tensor([1.0, -0.5, 0.3, 2.0])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        out = model(data)
        loss = (out["energy"] - target).square().mean() + 0.1 * out["forces"].square().mean()
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


@pytest.mark.parametrize(
    "bad, match",
    [
        (dict(attention="dense"), "attention"),
        (dict(readout="max"), "readout"),
        (dict(num_targets=2, predict_forces=True), "predict_forces"),
        (dict(rpe="flt-radial", rpe_options={"rotation": "sometimes"}), "rotation"),
        (dict(attention_options={"mode": "mask"}), "repeats"),
    ],
)
def test_bad_options(bad, match):
    with pytest.raises(ValueError, match=match):
        tiny(**bad)


def test_bad_inputs():
    model = tiny(max_z=9)
    z, pos, batch = molecules([3])
    with pytest.raises(ValueError, match="atomic numbers"):
        model(Batch(z=z + 20, pos=pos, batch=batch))
    with pytest.raises(ValueError, match="'pos'"):
        model(Data(z=z))
    with pytest.raises(ValueError, match="pos must be"):
        model(Batch(z=z, pos=pos[:, :2], batch=batch))


def test_dense_neighbour_budget_equals_the_radius_graph_and_is_smooth():
    """The all-pairs (fixed neighbour budget) SH features equal the radius-graph ones while no
    atom has more than max_num_neighbors neighbours; gradients finite; padding ignored."""
    from torch_geometric.data import Data

    from geolinrpe.data import collate_padded

    torch.manual_seed(0)
    sh = SphericalHarmonicsEmbedding(8, lmax=3, cutoff=3.0).to(D64)
    z, pos, batch = molecules([7, 4, 9])
    dense = collate_padded([Data(z=z[batch == g], pos=pos[batch == g]) for g in range(3)])
    mask = dense["key_padding_mask"]
    assert sh.neighbours_fit_the_budget(dense["pos"], mask)
    pos_dense = dense["pos"].clone().requires_grad_(True)
    features = sh.dense(dense["z"], pos_dense, mask)
    torch.testing.assert_close(features[~mask], sh(z, pos, batch), **TIGHT)
    features[~mask].square().sum().backward()
    assert torch.isfinite(pos_dense.grad).all() and (pos_dense.grad[mask] == 0).all()
    crowded = SphericalHarmonicsEmbedding(8, lmax=1, cutoff=30.0, max_num_neighbors=3)
    assert not crowded.neighbours_fit_the_budget(dense["pos"], mask)  # packed path then


def test_dense_model_compiles_without_graph_breaks_and_exports():
    """A dense batch (z [b, L], pos [b, L, 3], key_padding_mask) traces with zero graph
    breaks and exports with torch.export; the exported program equals eager."""
    from torch_geometric.data import Data

    from geolinrpe.data import collate_padded

    torch.manual_seed(0)
    model = tiny(use_spherical_harmonics=True, rpe="flt-kernel").float()
    z, pos, batch = molecules([5, 3])
    dense = collate_padded([Data(z=z[batch == g], pos=pos[batch == g].float()) for g in range(2)])
    inputs = {k: dense[k] for k in ("z", "pos", "key_padding_mask")}
    explained = torch._dynamo.explain(model)(inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    program = torch.export.export(model, (inputs,))
    torch.testing.assert_close(program.module()(inputs)["y"], model(inputs)["y"])
    packed = model(Batch(z=z, pos=pos.float(), batch=batch))["y"]
    torch.testing.assert_close(model(inputs)["y"], packed, rtol=1e-4, atol=1e-5)
