"""build_model: every registered model builds by name; bad names and options raise ValueError."""

import pytest
import torch
from torch_geometric.data import Batch, Data

from geolinrpe.models import (
    MODELS,
    MoleculeTransformer,
    PatchTransformer,
    PointCloudTransformer,
    SchNetBaseline,
    SequenceTransformer,
    build_model,
    model_names,
    model_options,
)

SMALL = dict(embed_dim=16, num_heads=2, num_layers=1, num_features=8)


def test_names():
    assert model_names() == ["molecule", "patch", "point-cloud", "schnet", "sequence"]
    assert set(MODELS) == set(model_names())


@pytest.mark.parametrize(
    "name, kwargs, cls",
    [
        ("molecule", dict(SMALL, num_targets=2), MoleculeTransformer),
        ("point-cloud", dict(SMALL, num_classes=3), PointCloudTransformer),
        ("patch", dict(SMALL, in_channels=4, num_classes=3), PatchTransformer),
        ("sequence", dict(SMALL, vocab_size=7), SequenceTransformer),
        ("schnet", dict(hidden_channels=8, num_filters=8, num_interactions=1), SchNetBaseline),
    ],
)
def test_build_each_model(name, kwargs, cls):
    model = build_model(name, **kwargs)
    assert type(model) is cls
    assert "attention" in model_options(name) or name == "schnet"


def test_every_transformer_takes_the_shared_options():
    shared = {
        "attention",
        "rpe",
        "rpe_options",
        "mode",
        "kernel",
        "num_features",
        "num_layers",
        "embed_dim",
        "num_heads",
        "attention_options",
    }
    for name in ("molecule", "point-cloud", "patch", "sequence"):
        assert shared <= set(model_options(name)), name


@pytest.mark.parametrize("attention", ["linear", "exact"])
@pytest.mark.parametrize("rpe", [None, "flt-kernel"])
def test_baselines_in_the_same_code_path(attention, rpe):
    model = build_model("molecule", attention=attention, rpe=rpe, **SMALL)
    data = Batch.from_data_list([Data(z=torch.tensor([6, 1, 1]), pos=torch.randn(3, 3))])
    assert model(data)["y"].shape == (1, 1)


@pytest.mark.parametrize(
    "name, kwargs, match",
    [
        ("transformer", {}, "unknown model 'transformer'"),
        ("molecule", dict(hidden=3), r"unknown options \['hidden'\]"),
        ("patch", dict(num_classes=3), r"needs \['in_channels'\]"),
        ("molecule", dict(attention="sparse"), "attention"),
        ("molecule", dict(rpe="flt-nope"), "flt-nope"),
        ("molecule", dict(rpe="flt-kernel", rpe_options={"bogus": 1}), "bogus"),
        ("point-cloud", dict(num_classes=3, mode="diagonal"), "mode"),
        ("sequence", dict(vocab_size=5, kernel="cosine"), "cosine"),
        ("molecule", dict(embed_dim=30, num_heads=4), "divisible"),
        ("schnet", dict(readout="max"), "readout"),
    ],
)
def test_bad_names_and_options_raise_value_error(name, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_model(name, **kwargs)
