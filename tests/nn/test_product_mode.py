"""Product mode (kernel features x the deterministic mask exp(f)) and the explicit small-n path."""

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.rpe import build

D64 = torch.float64
FAMILIES = [("flt-kernel", 1), ("flt-kernel", 2), ("flt-kernel", 3), ("flt-radial", 3)]


def product_layer(name, pos_dim, causal=False, **kw):
    torch.manual_seed(0)
    options = {"num_frequencies": 16, "frequencies": "quadrature", "amplitude": 0.8}
    return RPEAttention(
        24,
        2,
        rpe=name,
        pos_dim=pos_dim,
        mode="product",
        num_features=8,
        causal=causal,
        rpe_options=options,
        **kw,
    ).double()


def inputs(pos_dim, n=9):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, n, 24, generator=g, dtype=D64)
    pos = torch.randn(2, n, pos_dim, generator=g, dtype=D64)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n - 3 :] = True
    return x, pos, mask


@pytest.mark.parametrize("name, pos_dim", FAMILIES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("quadratic_below", [0, None])
def test_product_mode_equals_its_explicit_reference(name, pos_dim, causal, quadratic_below):
    layer = product_layer(name, pos_dim, causal, quadratic_below=quadratic_below)
    x, pos, mask = inputs(pos_dim)
    out = layer(x, pos, key_padding_mask=mask)
    torch.testing.assert_close(
        out, layer.reference(x, pos, key_padding_mask=mask), atol=1e-10, rtol=1e-10
    )
    batch = torch.tensor([0] * 9 + [1] * 6)
    packed = layer(x[~mask], pos[~mask], batch=batch)
    torch.testing.assert_close(packed, out[~mask], atol=1e-10, rtol=1e-10)
    out.sum().backward()
    grads = [p.grad for p in layer.rpe.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(float(g.abs().max()) > 0 for g in grads)


def test_product_mode_mask_estimates_exp_f_and_the_layer_the_biased_softmax():
    rpe = build(
        "flt-kernel",
        pos_dim=1,
        num_heads=2,
        num_frequencies=32,
        frequencies="quadrature",
        amplitude=[0.5, 2.0],
        lengthscale=[1.0, 3.0],
    ).double()
    delta = torch.linspace(-3, 3, 101, dtype=D64)[:, None] * torch.tensor([1.0, 3.0], dtype=D64)
    for h in range(2):
        estimate = rpe.estimate(delta[:, h : h + 1], "exp")[:, h]
        exact = rpe.closed_form(delta[:, h : h + 1])[:, h].exp()
        assert float(((estimate - exact) / exact).abs().max().detach()) < 1e-3
    rpe3 = build(
        "flt-radial",
        pos_dim=3,
        num_heads=1,
        num_frequencies=64,
        frequencies="quadrature",
        amplitude=0.5,
    ).double()
    d = torch.randn(500, 3, dtype=D64)
    d = d / d.norm(dim=-1, keepdim=True) * 3 * torch.rand(500, 1, dtype=D64) ** (1 / 3)
    est, exact = rpe3.estimate(d, "exp"), rpe3.closed_form(d).exp()
    assert float(((est - exact).pow(2).mean() / exact.pow(2).mean()).sqrt().detach()) < 1e-2
    # the layer's exact target is the softmax with bias f (the logit-mode target)
    layer = RPEAttention(24, 2, rpe=rpe, mode="product", num_features=8).double()
    logit = RPEAttention(24, 2, rpe=rpe, mode="logit", num_features=8).double()
    state = {k: v for k, v in layer.state_dict().items() if not k.startswith("feature_map")}
    logit.load_state_dict(state, strict=False)
    x, pos, _ = inputs(1)
    pos = pos * 0.5
    torch.testing.assert_close(
        layer.reference(x, pos, kernel="exact", rpe="exact"),
        logit.reference(x, pos, kernel="exact", rpe="exact"),
    )
    features = layer.reference(x, pos, kernel="exact", rpe="features")
    exact = layer.reference(x, pos, kernel="exact", rpe="exact")
    assert float((features - exact).norm() / exact.norm()) < 1e-3


def test_product_mode_needs_quadrature_and_the_masked_normalisation():
    with pytest.raises(ValueError, match="supports modes"):
        RPEAttention(
            8, 2, rpe="flt-kernel", pos_dim=3, mode="product", rpe_options={"frequencies": "mc"}
        )
    with pytest.raises(ValueError, match="supports modes"):
        RPEAttention(
            8, 2, rpe="flt-gm", pos_dim=2, mode="product", rpe_options={"frequencies": "quadrature"}
        )
    with pytest.raises(ValueError, match="normalize"):
        RPEAttention(
            8,
            2,
            rpe="flt-kernel",
            pos_dim=3,
            mode="product",
            normalize="kernel",
            rpe_options={"frequencies": "quadrature"},
        )


@pytest.mark.parametrize("mode", ["logit", "mask", "product"])
def test_the_explicit_small_n_path_equals_the_engine(mode):
    torch.manual_seed(0)
    options = {"num_frequencies": 8, "frequencies": "quadrature"}
    engine = RPEAttention(
        24,
        2,
        rpe="flt-kernel",
        pos_dim=3,
        mode=mode,
        num_features=8,
        rpe_options=options,
        quadratic_below=0,
    ).double()
    explicit = RPEAttention(
        24,
        2,
        rpe="flt-kernel",
        pos_dim=3,
        mode=mode,
        num_features=8,
        rpe_options=options,
        quadratic_below=100,
    ).double()
    explicit.load_state_dict(engine.state_dict())
    x, pos, mask = inputs(3, n=11)
    torch.testing.assert_close(
        explicit(x, pos, key_padding_mask=mask),
        engine(x, pos, key_padding_mask=mask),
        atol=1e-10,
        rtol=1e-10,
    )
    batch = torch.tensor([0] * 11 + [1] * 8)
    xp, pp = x[~mask], pos[~mask]
    torch.testing.assert_close(
        explicit(xp, pp, batch=batch), engine(xp, pp, batch=batch), atol=1e-10, rtol=1e-10
    )
    auto = RPEAttention(24, 2, rpe="flt-kernel", pos_dim=3, mode=mode, rpe_options=options)
    assert auto._quadratic(
        torch.zeros(1, 10, 2, 12), torch.zeros(1, 10, 2, 12), auto.featurizer, None, None
    )
    assert not auto._quadratic(
        torch.zeros(1, 5000, 2, 12), torch.zeros(1, 5000, 2, 12), auto.featurizer, None, None
    )
    with pytest.raises(ValueError, match="quadratic_below"):
        RPEAttention(24, 2, quadratic_below=-1)
