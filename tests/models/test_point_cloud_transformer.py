"""PointCloudTransformer: shapes, invariances, packed == padded, exact baseline, training."""

import pytest
import torch
from torch_geometric.data import Batch, Data

from geolinrpe.data import SyntheticShapes, collate_padded
from geolinrpe.models import PointCloudTransformer, knn_graph
from geolinrpe.models.point_cloud import LocalAggregation, pointcept_batch
from geolinrpe.nn import use_reference
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_rotation_invariant,
    assert_translation_invariant,
)

D64 = torch.float64
TIGHT = dict(atol=1e-9, rtol=1e-9)
FRAME = dict(rpe="flt-radial", rpe_options={"rotation": "frame"})


def tiny(num_classes=4, **kw):
    options = dict(embed_dim=16, num_heads=2, num_layers=2, num_features=16)
    options.update(kw)
    return PointCloudTransformer(num_classes, **options).to(D64).eval()


def clouds(sizes):
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(sum(sizes), 3, dtype=D64), batch


def as_fn(model):
    """``fn(x, pos, batch=..., key_padding_mask=...)`` for ``geolinrpe.testing`` (``x`` is
    unused); per-cloud logits are broadcast to points (invariance as equivariance)."""

    def fn(x, pos, batch=None, key_padding_mask=None):
        if key_padding_mask is not None:
            out = model({"pos": pos, "key_padding_mask": key_padding_mask})
            if model.task == "segmentation":
                return out
            return out[:, None].expand(-1, pos.shape[1], -1)
        batch = torch.zeros(len(pos), dtype=torch.long) if batch is None else batch
        out = model({"pos": pos, "batch": batch})
        return out if model.task == "segmentation" else out[batch]

    return fn


@pytest.mark.parametrize("task", ["classification", "segmentation"])
def test_shapes_packed_and_padded(task):
    pos, batch = clouds([9, 14])
    model = tiny(task=task, pooling="mean+max")
    out = model(Batch(pos=pos, batch=batch))
    assert out.shape == ((2, 4) if task == "classification" else (23, 4))
    data = [Data(pos=pos[:9]), Data(pos=pos[9:])]
    padded = collate_padded(data)
    dense = model(padded)
    if task == "classification":
        torch.testing.assert_close(dense, out, **TIGHT)
    else:
        mask = padded["key_padding_mask"]
        torch.testing.assert_close(dense[~mask], out, **TIGHT)
        assert (dense[mask] == 0).all()


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("kw", [dict(FRAME), dict(FRAME, mode="mask"), dict(rpe=None)])
def test_invariances_and_padding(task, kw):
    model = tiny(task=task, pooling="max", **kw)
    pos, batch = clouds([10, 6, 1])
    fn = as_fn(model)
    assert_translation_invariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_rotation_invariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_permutation_equivariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_padding_consistent(fn, pos, pos, batch, **TIGHT)


def test_in_channels_features():
    pos, batch = clouds([5, 4])
    model = tiny(in_channels=2)
    out = model(Batch(pos=pos, x=torch.randn(9, 2, dtype=D64), batch=batch))
    assert out.shape == (2, 4)
    with pytest.raises(ValueError, match="'x'"):
        model(Batch(pos=pos, batch=batch))
    with pytest.raises(ValueError, match="x must be"):
        model(Batch(pos=pos, x=torch.randn(9, 3, dtype=D64), batch=batch))


def test_exact_attention_model_equals_reference_path():
    linear = tiny(**FRAME, task="segmentation")
    exact = tiny(**FRAME, task="segmentation", attention="exact")
    exact.load_state_dict(linear.state_dict())
    pos, batch = clouds([8, 11])
    data = Batch(pos=pos, batch=batch)
    with use_reference(linear):
        want = linear(data)
    torch.testing.assert_close(exact(data), want, **TIGHT)


def test_training_on_synthetic_shapes_decreases_loss():
    torch.manual_seed(0)
    shapes = SyntheticShapes(num_classes=8, num_points=48, num_samples=16, seed=3)
    data = Batch.from_data_list([shapes[i] for i in range(16)])
    model = tiny(num_classes=8, rpe="flt-radial").float().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(25):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), data.y)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]


LOCAL = dict(local="knn", local_k=3, local_radius=1.5)


@pytest.mark.parametrize("task", ["classification", "segmentation"])
@pytest.mark.parametrize("kw", [dict(FRAME), dict(rpe=None), dict(num_layers=0)])
def test_local_stage_invariances_and_padding(task, kw):
    model = tiny(task=task, pooling="mean+max", **LOCAL, **kw)
    assert len(model.local_stage) == 2 and (model.encoder is None) == (kw.get("num_layers") == 0)
    pos, batch = clouds([10, 6, 1, 7])
    fn = as_fn(model)
    assert_translation_invariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_rotation_invariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_permutation_equivariant(fn, pos, pos, batch=batch, **TIGHT)
    assert_padding_consistent(fn, pos, pos, batch, **TIGHT)


def test_local_aggregation_equals_a_loop_over_neighbours():
    torch.manual_seed(0)
    layer = LocalAggregation(6, radius=2.0).to(D64)
    pos, batch = clouds([9, 5])
    h = torch.randn(14, 6, dtype=D64)
    edge_index = knn_graph(pos, 4, batch)
    out = layer(h, pos, edge_index)
    a, b = layer.node(layer.norm(h)).chunk(2, -1)
    for i in range(14):
        nbrs = edge_index[0, edge_index[1] == i]
        dist = (pos[nbrs] - pos[i]).norm(dim=-1, keepdim=True)
        basis = torch.exp(-(((dist - layer.centers) / layer.width) ** 2))
        msg = torch.nn.functional.gelu(a[nbrs] + b[i] + layer.edge(basis)).amax(0)
        torch.testing.assert_close(out[i], h[i] + layer.out(msg), **TIGHT)


def test_pointcept_inputs_equal_a_pyg_batch():
    model = tiny(task="segmentation", in_channels=2, **LOCAL)
    pos, batch = clouds([7, 12])
    feat = torch.randn(19, 2, dtype=D64)
    want = model(Batch(pos=pos, x=feat, batch=batch))
    got = model({"coord": pos, "feat": feat, "offset": torch.tensor([7, 19], dtype=torch.int32)})
    torch.testing.assert_close(got, want, **TIGHT)
    converted = pointcept_batch({"coord": pos, "offset": torch.tensor([7, 19])})
    assert torch.equal(converted["batch"], batch) and "x" not in converted
    for offset in ([7, 18], [12, 7, 19], [7.0, 19.0]):
        with pytest.raises(ValueError, match="offset"):
            pointcept_batch({"coord": pos, "offset": torch.tensor(offset)})


@pytest.mark.parametrize(
    "bad",
    [
        dict(task="detection"),
        dict(pooling="median"),
        dict(max_radius=0.0),
        dict(num_radial=0),
        dict(num_layers=0),
        dict(local="radius"),
        dict(local="knn", local_k=0),
    ],
)
def test_bad_options(bad):
    with pytest.raises(ValueError):
        tiny(**bad)
