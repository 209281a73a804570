"""The models' forward on dense batches traces with zero graph breaks (what
torch.compile(fullgraph=True) needs), counted with dynamo's tracer; value checks still run
eagerly. The molecule transformer's own test covers it with torch.export."""

from __future__ import annotations

import pytest
import torch

from geolinrpe.models.patch import PatchTransformer
from geolinrpe.models.point_cloud import PointCloudTransformer
from geolinrpe.models.sequence import SequenceTransformer

SMALL = dict(embed_dim=16, num_heads=2, num_layers=1, num_features=8)


def grid(b: int = 2) -> torch.Tensor:
    rows, cols = torch.meshgrid(torch.arange(3.0), torch.arange(3.0), indexing="ij")
    return torch.stack([rows, cols], -1).reshape(1, 9, 2).expand(b, 9, 2)


CASES = {
    "patch": (
        lambda: PatchTransformer(in_channels=4, num_classes=3, **SMALL),
        lambda: ({"x": torch.randn(2, 9, 4), "pos": grid()},),
    ),
    "point-cloud": (
        lambda: PointCloudTransformer(num_classes=3, **SMALL),
        lambda: ({"pos": torch.randn(2, 20, 3)},),
    ),
    "sequence": (
        lambda: SequenceTransformer(vocab_size=20, **SMALL),
        lambda: ({"tokens": torch.randint(0, 20, (2, 12))},),
    ),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_dense_forward_has_no_graph_breaks(name):
    torch.manual_seed(0)
    make, inputs = CASES[name]
    model = make().eval()
    args = inputs()
    explained = torch._dynamo.explain(model)(*args)
    torch._dynamo.reset()
    assert explained.graph_break_count == 0, explained.break_reasons
    assert torch.isfinite(model(*args)).all()


def test_value_checks_still_run_eagerly():
    model = SequenceTransformer(vocab_size=20, **SMALL).eval()
    with pytest.raises(ValueError, match=r"token ids must be in \[0, 20\)"):
        model({"tokens": torch.full((1, 4), 25)})
