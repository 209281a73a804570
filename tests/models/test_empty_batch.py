"""An empty batch (no graphs, no atoms) gives an empty output of the right shape."""

import pytest
import torch

from geolinrpe.models import build_model

SMALL = {"embed_dim": 16, "num_heads": 2, "num_layers": 1, "num_features": 8}


@pytest.mark.parametrize("attention", ["linear", "exact"])
def test_dense_batch_of_zero_graphs(attention):
    torch.manual_seed(0)
    mol = build_model("molecule", num_targets=3, attention=attention, **SMALL)
    out = mol({"z": torch.zeros(0, 5, dtype=torch.long), "pos": torch.zeros(0, 5, 3)})
    assert out["y"].shape == (0, 3)
    cloud = build_model("point-cloud", num_classes=4, attention=attention, **SMALL)
    assert cloud({"pos": torch.zeros(0, 5, 3)}).shape == (0, 4)
    patch = build_model("patch", num_classes=4, in_channels=6, attention=attention, **SMALL)
    assert patch({"x": torch.zeros(0, 5, 6), "pos": torch.zeros(0, 5, 2)}).shape == (0, 4)
    seq = build_model("sequence", vocab_size=7, attention=attention, **SMALL)
    assert seq(torch.zeros(0, 5, dtype=torch.long)).shape == (0, 5, 7)


def test_forces_and_packed_batch_of_zero_atoms():
    torch.manual_seed(0)
    mol = build_model("molecule", num_targets=1, predict_forces=True, **SMALL)
    out = mol({"z": torch.zeros(0, 4, dtype=torch.long), "pos": torch.zeros(0, 4, 3)})
    assert out["y"].shape == (0, 1)
    assert out["forces"].shape == (0, 4, 3)
    schnet = build_model("schnet", num_targets=2, hidden_channels=8, num_filters=8)
    out = schnet({"z": torch.zeros(0, 4, dtype=torch.long), "pos": torch.zeros(0, 4, 3)})
    assert out["y"].shape == (0, 2)
    # a non-empty batch still goes through the attention: outputs differ per molecule
    z = torch.tensor([[6, 1, 1, 0], [8, 1, 1, 1]])
    pos = torch.randn(2, 4, 3)
    mask = z == 0
    y = mol({"z": z, "pos": pos, "key_padding_mask": mask})["y"]
    assert y.shape == (2, 1) and torch.isfinite(y).all() and y[0] != y[1]
