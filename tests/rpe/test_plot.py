"""rpe.plot writes a PNG of f for 1D, 2D and 3D RPEs and rejects what it cannot plot."""

import pytest
import torch

from geolinrpe.rpe import build, plot


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
def test_plot_writes_png(tmp_path, pos_dim):
    rpe = build("flt-kernel", pos_dim=pos_dim, num_heads=2, lengthscale=1.5)
    out = plot(rpe, tmp_path / "sub" / f"f{pos_dim}.png", resolution=21)
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 2000


def test_plot_rejects_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="FourierRPE"):
        plot(torch.nn.Linear(2, 2), tmp_path / "x.png")
    with pytest.raises(ValueError, match="extent"):
        plot(build("flt-kernel", pos_dim=1, num_heads=1), tmp_path / "x.png", extent=0)
