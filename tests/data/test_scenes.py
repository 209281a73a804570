"""ContextScenes: determinism, the label rule, the placement rules, balance."""

import numpy as np
import pytest
import torch

from geolinrpe.data.scenes import ContextScenes


def test_scenes_follow_their_rules():
    data = ContextScenes(num_points=2000, num_samples=6, seed=4)
    positives = []
    for i in range(len(data)):
        scene = data[i]
        assert scene.pos.shape == (2000, 3) and scene.x.shape == (2000, 2)
        assert scene.pos.dtype == torch.float32 and scene.y.dtype == torch.long
        sizes = torch.bincount(scene.object)
        assert sizes.numel() == 48 and int(sizes.max() - sizes.min()) <= 1
        centres = scene.centers.double().numpy()
        kinds = scene.x.argmax(-1).numpy()
        per_object = np.array([kinds[scene.object.numpy() == k][0] for k in range(48)])
        # every point lies within object_radius (+ noise) of its object's centre
        offset = scene.pos.double() - scene.centers.double()[scene.object]
        assert float(offset.norm(dim=-1).max()) < 0.6 + 0.05
        dist = np.linalg.norm(centres[:, None] - centres[None], axis=-1)
        red = (per_object[:, None] == 1) | (per_object[None] == 1)
        np.fill_diagonal(dist, np.inf)
        assert dist.min() >= 2 * 0.6 + 1.0 - 1e-5  # spacing
        assert (np.abs(dist[red] - 3.6) > 0.25 - 1e-5).all()  # margin around R
        label = ((dist < 3.6) & (per_object[None] == 1)).any(1).astype(np.int64)
        np.testing.assert_array_equal(scene.y.numpy(), label[scene.object.numpy()])
        positives.append(float(scene.y.float().mean()))
    assert 0.25 < np.mean(positives) < 0.75
    again = data[3]
    assert torch.equal(again.pos, data[3].pos) and torch.equal(again.y, data[3].y)
    other_seed = ContextScenes(num_points=2000, num_samples=6, seed=5)[3]
    assert not torch.equal(other_seed.pos, again.pos)


@pytest.mark.parametrize(
    "bad",
    [
        dict(num_points=0),
        dict(num_points=10, num_objects=48),
        dict(box=-1.0),
        dict(reach=float("nan")),
        dict(gap=-0.1),
        dict(box=1.0),
    ],
)
def test_bad_options(bad):
    with pytest.raises(ValueError):
        ContextScenes(**bad)


def test_crowded_box_is_a_named_error():
    with pytest.raises(RuntimeError, match="make the box larger"):
        ContextScenes(num_points=100, num_objects=40, box=4.0)[0]
    with pytest.raises(IndexError):
        ContextScenes(num_points=100, num_samples=2)[2]
