"""PatchTransformer: RPE families on patch grids, packed == padded, exact baseline, training."""

import pytest
import torch
from torch_geometric.data import Batch, Data

from geolinrpe.data import collate_padded, image_to_patches
from geolinrpe.models import PatchTransformer
from geolinrpe.nn import use_reference
from geolinrpe.testing import assert_padding_consistent, assert_translation_invariant

D64 = torch.float64
TIGHT = dict(atol=1e-9, rtol=1e-9)
RPES = [
    dict(rpe="rope"),
    dict(rpe="flt-kernel"),
    dict(rpe="toeplitz-fft", grid_size=4),
    dict(rpe="string"),
    dict(rpe=None),
]


def tiny(**kw):
    options = dict(in_channels=4, num_classes=3, embed_dim=16, num_heads=2, num_layers=2)
    options.update(num_features=16, **kw)
    return PatchTransformer(**options).to(D64).eval()


def images(shapes):
    """Images of different sizes as patch graphs (2x2 patches of one channel)."""
    out = []
    for h, w in shapes:
        x, pos = image_to_patches(torch.rand(1, h, w, dtype=D64), 2)
        out.append(Data(x=x, pos=pos.to(D64)))
    return out


@pytest.mark.parametrize("kw", RPES)
def test_logits_packed_equals_padded_for_images_of_different_sizes(kw):
    model = tiny(**kw)
    data = images([(8, 8), (4, 6), (6, 2)])  # 16, 6 and 3 patches
    logits = model(Batch.from_data_list(data))
    assert logits.shape == (3, 3) and torch.isfinite(logits).all()
    torch.testing.assert_close(model(collate_padded(data)), logits, **TIGHT)
    batch = Batch.from_data_list(data)

    def fn(x, pos, batch=None, key_padding_mask=None):
        if key_padding_mask is None:
            return model({"x": x, "pos": pos, "batch": batch})[batch]
        logits = model({"x": x, "pos": pos.round(), "key_padding_mask": key_padding_mask})
        return logits[:, None].expand(-1, x.shape[1], -1)

    assert_padding_consistent(fn, batch.x, batch.pos, batch.batch, **TIGHT)
    # shifting the grid (an image crop offset) changes nothing: relative positions only
    shift = torch.tensor([3.0, -2.0], dtype=D64)
    assert_translation_invariant(fn, batch.x, batch.pos, shift=shift, batch=batch.batch, **TIGHT)


@pytest.mark.parametrize("kw", [dict(rpe="rope"), dict(rpe="toeplitz-fft", grid_size=(4, 3))])
def test_exact_attention_model_equals_reference_path(kw):
    linear, exact = tiny(**kw), tiny(attention="exact", **kw)
    exact.load_state_dict(linear.state_dict())
    data = Batch.from_data_list(images([(8, 6), (4, 4)]))
    with use_reference(linear):
        want = linear(data)
    torch.testing.assert_close(exact(data), want, **TIGHT)


def test_rpe_sees_positions():
    model = tiny(rpe="flt-kernel", rpe_options={"amplitude": 2.0, "lengthscale": 0.5})
    data = images([(8, 8)])[0]
    scrambled = data.clone()
    # same patches at permuted grid positions (not a flip: f is even, so the default mask
    # mode is exactly invariant under the point reflection that reversing a grid is)
    scrambled.pos = scrambled.pos[
        torch.randperm(len(scrambled.pos), generator=torch.Generator().manual_seed(0))
    ]
    assert (model(data) - model(scrambled)).abs().max() > 1e-6


def test_training_decreases_loss():
    torch.manual_seed(0)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    graphs = []
    for c in labels.tolist():  # the class sets the brightness
        x, pos = image_to_patches(0.5 * torch.rand(1, 8, 8) + c, 2)
        graphs.append(Data(x=x, pos=pos))
    data = Batch.from_data_list(graphs)
    model = tiny(rpe="rope").float().train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(data), labels)
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.4 * losses[0]


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="grid_size"):
        tiny(rpe="toeplitz-fft")
    with pytest.raises(ValueError, match="mode"):
        tiny(rpe="toeplitz-fft", grid_size=4, mode="logit")
    with pytest.raises(ValueError, match="pooling"):
        tiny(pooling="cls")
    model = tiny()
    data = images([(4, 4)])[0]
    with pytest.raises(ValueError, match="channels"):
        model({"x": data.x[:, :3], "pos": data.pos, "batch": torch.zeros(4, dtype=torch.long)})
