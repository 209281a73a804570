"""Packed and padded batches of every dataset type hold exactly the same values, and the
padded layout drives RPEAttention like the packed one."""

import pickle

import pytest
import torch
from torch_geometric.data import Data
from torch_geometric.loader import DataLoader as PackedLoader

from geolinrpe.data.batching import (
    DenseDataLoader,
    PaddedCollater,
    collate_packed,
    collate_padded,
)
from geolinrpe.data.images import ImagePatches, load_digits_patches
from geolinrpe.data.molecules import from_smiles
from geolinrpe.data.point_clouds import SyntheticShapes
from geolinrpe.nn import RPEAttention
from geolinrpe.ops.packing import to_packed


@pytest.fixture(scope="module")
def molecules():
    data, report = from_smiles(["C", "CCO", "c1ccccc1O", "O=C=O", "CC(=O)NC"])
    assert report.ok
    return data


@pytest.fixture(scope="module")
def digits():
    return load_digits_patches(2)


def shapes():
    """Clouds of two sizes, so the padded batch has padding."""
    small = SyntheticShapes(num_classes=8, num_points=30, num_samples=4, seed=0)
    large = SyntheticShapes(num_classes=8, num_points=45, num_samples=4, seed=1)
    return [small[0], large[0], small[1], large[1], small[2]]


def assert_same_values(data_list, node_keys, graph_keys):
    packed = collate_packed(data_list)
    padded = collate_padded(data_list)
    mask = padded["key_padding_mask"]
    counts = torch.tensor([d.num_nodes for d in data_list])
    assert mask.dtype == torch.bool and mask.shape == (len(data_list), int(counts.max()))
    assert torch.equal((~mask).sum(1), counts) and torch.equal(padded["num_nodes"], counts)
    assert sorted(k for k in padded if k not in ("key_padding_mask", "num_nodes")) == sorted(
        data_list[0].keys()
    )  # every field comes through
    for key in node_keys:
        dense = padded[key]
        assert dense.shape[:2] == mask.shape and dense.dtype == packed[key].dtype
        values, batch = to_packed(dense, mask)
        assert torch.equal(values, packed[key]) and torch.equal(batch, packed.batch)
        assert not dense[mask].any()  # zero at padding
    for key in graph_keys:
        assert torch.equal(padded[key], packed[key])
    return packed, padded


def test_molecules_packed_equals_padded(molecules):
    _, padded = assert_same_values(molecules, ["z", "pos"], ["idx"])
    assert padded["pos"].shape == (5, 13, 3) and padded["smiles"][2] == "c1ccccc1O"
    assert padded["force_field"] == ["MMFF94"] * 5  # strings become lists


def test_digits_patches_packed_equals_padded(digits):
    data_list = [digits[i] for i in range(6)]
    _, padded = assert_same_values(data_list, ["x", "pos"], ["y"])
    assert padded["x"].shape == (6, 16, 4) and not padded["key_padding_mask"].any()
    assert padded["y"].shape == (6,)
    # images of different sizes pad
    mixed = [ImagePatches(torch.rand(1, 1, h, 4), 2, labels=[h])[0] for h in (2, 6, 4)]
    _, padded = assert_same_values(mixed, ["x", "pos"], ["y"])
    assert padded["key_padding_mask"].sum(1).tolist() == [4, 0, 2]


def test_synthetic_shapes_packed_equals_padded():
    _, padded = assert_same_values(shapes(), ["pos", "normal", "part"], ["y"])
    assert padded["part"].dtype == torch.long and padded["pos"].shape == (5, 45, 3)


def test_explicit_keys_graph_keys_and_errors(molecules):
    padded = collate_padded(molecules, keys=["pos"])
    assert set(padded) >= {"pos", "key_padding_mask", "z"}
    assert isinstance(padded["z"], list)  # not padded: varying shapes stay a list
    # equal node counts make [1]-shaped graph fields ambiguous: graph_keys settles it
    single = [Data(pos=torch.randn(1, 3), y=torch.tensor([k])) for k in range(3)]
    assert collate_padded(single)["y"].shape == (3, 1)
    fixed = collate_padded(single, graph_keys=["y"])
    assert fixed["y"].tolist() == [0, 1, 2] and fixed["pos"].shape == (3, 1, 3)
    with pytest.raises(KeyError, match="'x'"):
        collate_padded(molecules, keys=["x"])
    with pytest.raises(ValueError, match="idx"):
        collate_padded(molecules, keys=["idx"])
    with pytest.raises(ValueError, match="empty"):
        collate_padded([])
    with pytest.raises(ValueError, match="graph 1 has fields"):
        collate_padded([Data(pos=torch.zeros(2, 3)), Data(pos=torch.zeros(2, 3), y=1)])


def test_dense_data_loader(digits):
    loader = DenseDataLoader(digits, batch_size=32, shuffle=True)
    batch = next(iter(loader))
    assert batch["x"].shape == (32, 16, 4) and batch["y"].shape == (32,)
    collate = PaddedCollater(keys=("pos", "part"), graph_keys=("y",))
    collate = pickle.loads(pickle.dumps(collate))  # picklable: usable with num_workers > 0
    plain = torch.utils.data.DataLoader(shapes(), batch_size=5, collate_fn=collate)
    padded = next(iter(plain))
    assert padded["pos"].shape == (5, 45, 3) and padded["y"].shape == (5,)
    assert isinstance(padded["normal"], list)  # not requested: kept per graph
    with pytest.raises(ValueError, match="collate_fn"):
        DenseDataLoader(digits, collate_fn=collate)


def test_attention_sees_the_same_batch_in_both_layouts():
    data_list = shapes()
    layer = RPEAttention(8, 2, rpe="flt-gm", pos_dim=3).double()
    embed = torch.nn.Linear(3, 8, dtype=torch.float64)
    packed = next(iter(PackedLoader(data_list, batch_size=5)))
    out_packed = layer(embed(packed.pos.double()), packed.pos.double(), batch=packed.batch)
    padded = collate_padded(data_list)
    pos, mask = padded["pos"].double(), padded["key_padding_mask"]
    out_dense = layer(embed(pos), pos, key_padding_mask=mask)
    values, _ = to_packed(out_dense, mask)
    assert torch.allclose(values, out_packed, atol=1e-10)
