"""Every registered RPE works by name through RPEAttention in every mode it supports, in
dense and packed layouts, and equals its explicit-feature O(n^2) form."""

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe import REGISTRY, build, names
from geolinrpe.testing import assert_padding_consistent

D64 = torch.float64
POS_DIM = {"flt-local": 1, "flt-radial": 3, "flt-periodic": 3, "spe-sine": 1, "spe-conv": 1}
OPTIONS = {"spe-conv": dict(grid_size=16), "toeplitz-fft": dict(max_offset=8)}
INTEGER = {"spe-conv", "lrpe-permutation", "toeplitz-fft"}


def test_names_lists_the_registry():
    assert names() == sorted(REGISTRY)
    assert len(names()) >= 14


@pytest.mark.parametrize("name", names())
def test_every_rpe_by_name_in_every_mode(name):
    pos_dim = POS_DIM.get(name, 1 if name == "lrpe-permutation" else 2)
    sizes = [5, 1, 7]
    n = sum(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    x = torch.randn(n, 16, dtype=D64)
    if name in INTEGER:
        pos = torch.randint(0, 6, (n, pos_dim)).to(D64)
    else:
        pos = torch.randn(n, pos_dim, dtype=D64)
    extra = {}
    if name == "flt-periodic":
        extra["cell"] = torch.stack([torch.eye(3, dtype=D64) * s for s in (3.0, 4.0, 5.0)])
    probe = build(name, pos_dim=pos_dim, num_heads=2, **_dim_options(name))
    for mode in probe.modes:
        kernel = "favor+" if mode == "logit" else "elu"
        attn = RPEAttention(
            16,
            2,
            rpe=name,
            pos_dim=pos_dim,
            mode=mode,
            kernel=kernel,
            num_features=8,
            rpe_options=OPTIONS.get(name),
            chunk_size=4,
        ).double()
        out = attn(x, pos, batch, **extra)
        assert out.shape == x.shape and torch.isfinite(out).all()
        ref = attn.reference(x, pos, batch, **extra)
        torch.testing.assert_close(out, ref, atol=1e-10, rtol=1e-10)
        if not extra and name not in INTEGER:  # padded slots get random positions
            assert_padding_consistent(attn, x, pos, batch, atol=1e-10, rtol=1e-10)


def _dim_options(name):
    options = dict(OPTIONS.get(name, {}))
    if "dim" in __import__("inspect").signature(REGISTRY[name]).parameters:
        options["dim"] = 8
    return options
