"""SPE (sineSPE, convSPE): unbiased codes, engine == quadratic form, convergence to the exact
target, gating, reproducible noise, translation invariance (per draw through the layer, in
distribution for raw positions), gradients, bad options."""

import math

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.features import build_feature_map
from geolinrpe.ops import feature_attention, linear_attention, to_padded
from geolinrpe.rpe import REGISTRY
from geolinrpe.rpe import spe as spe_module
from geolinrpe.rpe.spe import ConvSPE, SineSPE, SPEFeaturizer, spe_reference
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64
KINDS = ["sine", "conv1d", "conv2d"]


def make_spe(kind, heads=2, channels=4, realizations=16, gated=True, grid=24, kernel=3, sines=2):
    if kind == "sine":
        spe = SineSPE(1, heads, channels, realizations, num_sines=sines, gated=gated)
    else:
        p = 1 if kind == "conv1d" else 2
        spe = ConvSPE(p, heads, channels, grid, kernel, realizations, gated=gated)
    return spe.double()


def grid_positions(kind, n, rows=4):
    """Sine: real-valued times; conv1d: indices; conv2d: raster-order patch (row, col)."""
    if kind == "sine":
        return torch.cumsum(torch.rand(n, dtype=D64) + 0.2, 0)[:, None]
    index = torch.arange(n, dtype=D64)
    if kind == "conv1d":
        return index[:, None]
    return torch.stack([index // rows, index % rows], -1)


def featurizer(spe, kernel="elu", head_dim=4):
    fm = build_feature_map(kernel, head_dim, spe.dim).double()
    return spe.featurizer(fm, head_dim**-0.25 if kernel == "favor+" else 1.0, "mask")


def qkv(lead, heads=2, head_dim=4, e=3):
    q, k = (torch.randn(*lead, heads, head_dim, dtype=D64) * 0.7 for _ in range(2))
    return q, k, torch.randn(*lead, heads, e, dtype=D64)


def relative_error(a, b):
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- (a) codes are unbiased
def code_errors(spe, pos):
    """Per-entry z-scores and the RMS error of mean_r Qbar Kbar against the analytic P_d."""
    products = torch.einsum("ihdr,jhdr->ijhdr", spe.codes(pos, True), spe.codes(pos, False))
    mean, stderr = products.mean(-1), products.std(-1) / math.sqrt(products.shape[-1])
    exact = spe.code_kernel(pos[:, None] - pos[None, :])
    return ((mean - exact).abs() / stderr).max().item(), (mean - exact).pow(2).mean().sqrt().item()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("gated", [False, True])
def test_expected_code_kernel_is_the_analytic_kernel(kind, gated):
    """mean_r Qbar_r Kbar_r -> P_d(u - u') with error ~ R^-1/2 (max z-score about 3-4.5)."""
    grid = 5 if kind == "conv2d" else 10  # the 2D noise buffer grows as (2 grid)^2
    spe = make_spe(kind, heads=2, channels=3, realizations=4096, gated=gated, grid=grid, kernel=3)
    if kind == "sine":
        with torch.no_grad():
            spe.freqs.add_(3.0)  # frequencies ~0.3: P_d oscillates over the test positions
    pos = grid_positions(kind, 10)
    max_z, rms = code_errors(spe, pos)
    assert max_z < 5.5
    coarse = []
    for seed in range(3):  # the same parameters, R = 64: error ~ 8x larger
        small = make_spe(kind, 2, 3, 64, gated, grid=grid, kernel=3)
        small.load_state_dict(
            {k: v for k, v in spe.state_dict().items() if "noise" not in k}, False
        )
        small.redraw(torch.Generator().manual_seed(seed))
        coarse.append(code_errors(small, pos)[1])
    assert 4 < sum(coarse) / len(coarse) / rms < 16


def test_conv_kernel_is_the_cross_correlation_of_the_filters():
    spe = ConvSPE(1, 1, 1, grid_size=8, kernel_size=3, gated=False).double()
    with torch.no_grad():
        spe.query_filter.copy_(torch.tensor([1.0, 2.0, 3.0]).view(1, 1, 3))
        spe.key_filter.copy_(torch.tensor([0.5, -1.0, 4.0]).view(1, 1, 3))
    delta = torch.arange(-4, 5, dtype=D64)[:, None]
    # P(D) = sum_t wq[t] wk[t + D]: D=0: 0.5-2+12, D=1: -1+8, D=2: 4, D=-1: 1-3, D=-2: 1.5
    want = torch.tensor([0, 0, 1.5, -2.0, 10.5, 7.0, 4.0, 0, 0], dtype=D64)
    torch.testing.assert_close(spe.code_kernel(delta)[:, 0, 0], want)


def test_sine_kernel_closed_form_and_gating():
    spe = SineSPE(1, 1, 1, num_sines=2, gated=True).double()
    with torch.no_grad():
        spe.freqs.copy_(torch.tensor([[[0.0, 1.0]]]))
        spe.offsets.copy_(torch.tensor([[[0.3, -1.0]]]))
        spe.gains.copy_(torch.tensor([[[0.5, 2.0]]]))
        spe.gate.fill_(-0.4)
    delta = torch.tensor([[0.0], [1.5], [-2.0]], dtype=D64)
    f = torch.sigmoid(torch.tensor([0.0, 1.0], dtype=D64)) / 2
    lam2 = torch.nn.functional.softplus(torch.tensor([0.5, 2.0], dtype=D64)) ** 2 / 4
    p = (lam2 * torch.cos(2 * math.pi * f * delta + torch.tensor([0.3, -1.0], dtype=D64))).sum(-1)
    g = torch.sigmoid(torch.tensor(-0.4, dtype=D64))
    torch.testing.assert_close(spe.code_kernel(delta)[:, 0, 0], (1 - g) * p + g)


# ---------------------------------------------------------------- (b) engine == quadratic form
ENGINE_CASES = [
    ("sine", "elu", True, "masked"),
    ("sine", "favor+", False, "masked"),
    ("sine", "elu", False, "none"),
    ("conv1d", "elu", False, "masked"),
    ("conv1d", "favor+", True, "none"),
    ("conv2d", "elu", True, "masked"),
    ("conv2d", "favor+", True, "masked"),
]


@pytest.mark.parametrize("kind,kernel,gated,normalize", ENGINE_CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("chunk", [None, 5])
def test_engine_matches_quadratic_form_dense_with_padding(
    kind, kernel, gated, normalize, causal, chunk
):
    spe = make_spe(kind, gated=gated, realizations=11)
    feat = featurizer(spe, kernel)
    assert isinstance(feat, SPEFeaturizer) and feat.num_features == 11 and not feat.has_mask
    n = 23
    q, k, v = qkv((2, n))
    pos = grid_positions(kind, n)[None].expand(2, -1, -1).clone()
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, 14:] = True
    kw = dict(featurizer=feat, key_padding_mask=mask, causal=causal, normalize=normalize)
    fast = linear_attention(q, k, v, pos, chunk_size=chunk, **kw)
    torch.testing.assert_close(fast, feature_attention(q, k, v, pos, **kw), atol=1e-10, rtol=1e-10)
    assert fast[1, 14:].abs().max() == 0


@pytest.mark.parametrize("kind,kernel,gated,normalize", ENGINE_CASES[::2])
@pytest.mark.parametrize("causal", [False, True])
def test_engine_matches_quadratic_form_packed_and_padded(kind, kernel, gated, normalize, causal):
    spe = make_spe(kind, gated=gated, realizations=9)
    feat = featurizer(spe, kernel)
    sizes = [1, 11, 4, 17]
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    pos = torch.cat([grid_positions(kind, s) for s in sizes])
    q, k, v = qkv((sum(sizes),))
    kw = dict(featurizer=feat, causal=causal, normalize=normalize)
    packed = linear_attention(q, k, v, pos, batch=batch, chunk_size=4, **kw)
    torch.testing.assert_close(
        packed, feature_attention(q, k, v, pos, batch=batch, **kw), atol=1e-10, rtol=1e-10
    )
    dq, mask = to_padded(q, batch)
    dk, dv, dpos = (to_padded(t, batch)[0] for t in (k, v, pos))
    dense = linear_attention(dq, dk, dv, dpos, key_padding_mask=mask, **kw)
    torch.testing.assert_close(dense[~mask], packed, atol=1e-10, rtol=1e-10)


def test_sine_fast_encoding_and_conv_slicing_equal_the_plain_contraction(monkeypatch):
    """encode == R^-1/2 sum_d phi_d codes_d (sine: 2K-term path; conv: token slices)."""
    for kind in ("sine", "conv2d"):
        spe = make_spe(kind, realizations=7)
        pos = grid_positions(kind, 13)[None].expand(3, -1, -1)
        phi = torch.rand(3, 13, 2, 4, dtype=D64)
        for query in (True, False):
            plain = torch.einsum("bnhd,bnhdr->bnhr", phi, spe.codes(pos, query)) / math.sqrt(7)
            torch.testing.assert_close(spe.encode(phi, pos, query), plain, atol=1e-12, rtol=0)
            monkeypatch.setattr(spe_module, "CODE_BUDGET", 2 * 4 * 7 * 4)  # 4 tokens per slice
            torch.testing.assert_close(spe.encode(phi, pos, query), plain, atol=1e-12, rtol=0)
            monkeypatch.undo()


# ---------------------------------------------------------------- (c) convergence, normalisation
@pytest.mark.parametrize("kind", ["sine", "conv1d"])
def test_many_realisations_approach_the_exact_target(kind):
    """Gated (denominator away from 0): masked output -> spe_reference ~ R^-1/2; unnormalised
    weights are unbiased too (a wrong code scale, e.g. the reference's (R d)^-1/4, fails)."""
    torch.manual_seed(3)
    q, k, v = qkv((2, 12))
    pos = grid_positions(kind, 12)[None].expand(2, -1, -1)
    base = make_spe(kind, channels=4, realizations=16, grid=12, kernel=4)
    params = {k: v for k, v in base.state_dict().items() if "noise" not in k}
    fm = build_feature_map("elu", 4).double()
    errors = {}
    for normalize in ("masked", "none"):
        ref = spe_reference(q, k, v, pos, base, fm, normalize=normalize)
        for R in (32, 2048):
            spe = make_spe(kind, channels=4, realizations=R, grid=12, kernel=4)
            spe.load_state_dict(params, strict=False)
            errs = []
            for seed in range(3):
                spe.redraw(torch.Generator().manual_seed(seed))
                out = linear_attention(
                    q, k, v, pos, featurizer=spe.featurizer(fm, 1.0, "mask"), normalize=normalize
                )
                errs.append(relative_error(out, ref))
            errors[normalize, R] = sorted(errs)[1]
    for normalize in ("masked", "none"):
        assert errors[normalize, 2048] < 0.09
        assert 3 < errors[normalize, 32] / errors[normalize, 2048] < 40  # sqrt(2048 / 32) = 8


def test_layer_defaults_to_masked_normalisation_and_refuses_kernel():
    """SPE has no psi: the engine's "kernel" denominator would be sum qhat.khat, the masked
    one under a misleading name, so the layer defaults to "masked" and refuses "kernel"."""
    for spe in (make_spe("sine"), make_spe("conv1d")):
        assert RPEAttention(8, 2, rpe=spe, mode="mask", kernel="elu").normalize == "masked"
        with pytest.raises(ValueError, match="normalize"):
            RPEAttention(8, 2, rpe=spe, mode="mask", kernel="elu", normalize="kernel")


def test_layer_builds_by_name_and_fills_the_channels(monkeypatch):
    """Registered as "spe-sine"/"spe-conv", the layer fills ``dim`` with its kernel features."""
    monkeypatch.setitem(REGISTRY, "spe-sine", SineSPE)
    monkeypatch.setitem(REGISTRY, "spe-conv", ConvSPE)
    elu = RPEAttention(12, 2, rpe="spe-sine", pos_dim=1, mode="mask", kernel="elu")
    favor = RPEAttention(
        12, 2, rpe="spe-conv", pos_dim=2, mode="mask", kernel="favor+", num_features=16,
        rpe_options=dict(grid_size=8, num_realizations=8),
    )  # fmt: skip
    assert (elu.rpe.dim, favor.rpe.dim) == (6, 16)
    pos = grid_positions("conv2d", 10)[None]
    assert favor(torch.randn(1, 10, 12), pos.float()).shape == (1, 10, 12)


# ---------------------------------------------------------------- (d) reproducible noise
@pytest.mark.parametrize("kind", KINDS)
def test_injected_noise_is_reproducible(kind):
    spe = make_spe(kind)
    feat = featurizer(spe)
    q, k, v = qkv((1, 10))
    pos = grid_positions(kind, 10)[None]

    def run():
        return linear_attention(q, k, v, pos, featurizer=feat)

    spe.redraw(torch.Generator().manual_seed(7))
    first = run()
    spe.redraw(torch.Generator().manual_seed(8))
    assert (run() - first).abs().max() > 1e-3
    spe.redraw(torch.Generator().manual_seed(7))
    torch.testing.assert_close(run(), first, atol=0, rtol=0)
    clone = make_spe(kind)
    clone.load_state_dict(spe.state_dict())  # noise buffers travel with the state dict
    assert "noise" in spe.state_dict() and "gate_noise" in spe.state_dict()
    out = linear_attention(q, k, v, pos, featurizer=featurizer(clone))
    torch.testing.assert_close(out, first, atol=0, rtol=0)


# ---------------------------------------------------------------- (e) layer, invariance
def spe_layer(kind, kernel="elu", causal=False, **kw):
    channels = 6 if kernel == "elu" else 8
    spe = make_spe(kind, channels=channels, realizations=10, grid=16, kernel=3, **kw).float()
    return RPEAttention(
        12, 2, rpe=spe, mode="mask", kernel=kernel, num_features=8, causal=causal,
        normalize="masked", chunk_size=4,
    ).double()  # fmt: skip


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", ["elu", "favor+"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_forward_equals_reference(kind, kernel, causal):
    attn = spe_layer(kind, kernel, causal)
    x = torch.randn(2, 10, 12, dtype=D64)
    pos = grid_positions(kind, 10)[None].expand(2, -1, -1) + 3.0
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :2] = True  # left padding: positions count from the first valid token
    mask[1, 7:] = True
    fast = attn(x, pos, key_padding_mask=mask)
    ref = attn.reference(x, pos, key_padding_mask=mask, kernel="features")
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    batch = torch.tensor([0] * 7 + [1] * 3)
    packed = attn(x[0], pos[0], batch=batch)
    torch.testing.assert_close(
        packed, attn.reference(x[0], pos[0], batch=batch), atol=1e-10, rtol=0
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [False, True])
def test_layer_is_translation_invariant_for_every_draw(kind, causal):
    """Positions are taken relative to each sequence's first token (and centred when not
    causal): any integer shift of the grid leaves the output unchanged for a fixed draw."""
    attn = spe_layer(kind, causal=causal)
    x = torch.randn(2, 10, 12, dtype=D64)
    pos = grid_positions(kind, 10)[None].expand(2, -1, -1)
    shift = torch.full((pos.shape[-1],), 7.0 if kind != "sine" else 7.3, dtype=D64)
    assert_translation_invariant(attn, x, pos, shift=shift, atol=1e-10, rtol=1e-10)


def rotated_sine_noise(spe, shift):
    """Noise z' with codes(u, z') = codes(u + shift, z): each (cos, sin) pair rotated."""
    b = 2 * math.pi * torch.sigmoid(spe.freqs) / 2 * shift  # [h, d, K]
    z = spe.noise.unflatten(2, (spe.num_sines, 2))
    zc, zs = z[..., 0, :], z[..., 1, :]
    cos, sin = torch.cos(b)[..., None], torch.sin(b)[..., None]
    return torch.stack([cos * zc + sin * zs, cos * zs - sin * zc], -2).flatten(2, 3)


@pytest.mark.parametrize("kind", KINDS)
def test_raw_shift_is_a_redraw_of_the_same_distribution(kind):
    """Without re-basing, a shift changes the output of a fixed draw (not invariant per draw);
    it equals the unshifted output with transformed noise: rotated (cos, sin) pairs (sine),
    translated white noise (conv). Both have the noise's distribution: invariance in law."""
    spe = make_spe(kind, grid=20)
    feat = featurizer(spe)
    q, k, v = qkv((1, 9))
    pos = grid_positions(kind, 9, rows=3)[None]
    shift = 4.0 if kind != "sine" else 2.7

    def run(p):
        return linear_attention(q, k, v, p, featurizer=feat)

    moved = run(pos + shift)
    assert (moved - run(pos)).abs().max() > 1e-3
    with torch.no_grad():
        if kind == "sine":
            spe.noise.copy_(rotated_sine_noise(spe, shift))
        else:
            dims = tuple(range(3, spe.noise.dim()))
            spe.noise.copy_(torch.roll(spe.noise, (-int(shift),) * len(dims), dims))
    torch.testing.assert_close(run(pos), moved, atol=1e-10, rtol=1e-10)


def test_conv_layer_accepts_centred_even_grids_and_ignores_padded_positions():
    attn = spe_layer("conv2d")
    x = torch.randn(2, 12, 12, dtype=D64)
    pos = grid_positions("conv2d", 12)[None].expand(2, -1, -1).clone()  # 3 x 4: mean (1, 1.5)
    mask = torch.zeros(2, 12, dtype=torch.bool)
    mask[1, 8:] = True
    out = attn(x, pos, key_padding_mask=mask)
    pos[1, 8:] = 0.37  # padded tokens: any position
    torch.testing.assert_close(attn(x, pos, key_padding_mask=mask), out, atol=1e-12, rtol=0)


# ---------------------------------------------------------------- (f) gradients
@pytest.mark.parametrize("kind", ["sine", "conv2d"])
def test_gradients_reach_every_parameter(kind):
    attn = spe_layer(kind)
    x = torch.randn(2, 8, 12, dtype=D64)
    pos = grid_positions(kind, 8)[None].expand(2, -1, -1)
    attn(x, pos).pow(2).sum().backward()
    names = ["freqs", "offsets", "gains"] if kind == "sine" else ["query_filter", "key_filter"]
    for name in names + ["gate"]:
        grad = getattr(attn.rpe, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name


# ---------------------------------------------------------------- (g) bad options
@pytest.mark.parametrize(
    "build,name",
    [
        (lambda: SineSPE(2, 2, 4), "pos_dim"),
        (lambda: SineSPE(1, 2, 0), "dim"),
        (lambda: SineSPE(1, 2, 4, num_realizations=0), "num_realizations"),
        (lambda: SineSPE(1, 2, 4, num_sines=-1), "num_sines"),
        (lambda: SineSPE(1, 2, 4, gated=1), "gated"),
        (lambda: ConvSPE(0, 2, 4, grid_size=8), "pos_dim"),
        (lambda: ConvSPE(2, 2, 4, grid_size=(8, 8, 8)), "grid_size"),
        (lambda: ConvSPE(1, 2, 4, grid_size=0), "grid_size"),
        (lambda: ConvSPE(2, 2, 4, grid_size=8, kernel_size=(3, 0)), "kernel_size"),
        (lambda: ConvSPE(1, 2, 4, grid_size=8, kernel_size=2.5), "kernel_size"),
    ],
)
def test_bad_options_raise(build, name):
    with pytest.raises(ValueError, match=name):
        build()


def test_bad_usage_raises():
    spe = make_spe("conv1d", channels=4, grid=8)
    fm = build_feature_map("elu", 4).double()
    with pytest.raises(ValueError, match="mode"):
        spe.featurizer(fm, 1.0, "logit")
    with pytest.raises(ValueError, match="dim=4"):
        spe.featurizer(build_feature_map("elu", 3).double(), 1.0, "mask")
    feat = spe.featurizer(fm, 1.0, "mask")
    q, k, v = qkv((1, 4))
    for bad in (torch.tensor([0.0, 0.5, 1.0, 2.0]), torch.tensor([0.0, 1.0, 2.0, 8.0])):
        with pytest.raises(ValueError, match="pos"):
            linear_attention(q, k, v, bad.to(D64)[None, :, None], featurizer=feat)
    with pytest.raises(ValueError, match="pos"):
        feat.query(q, None)
    with pytest.raises(ValueError, match="normalize"):
        spe_reference(q, k, v, torch.zeros(1, 4, 1, dtype=D64), spe, fm, normalize="kernel")
    with pytest.raises(NotImplementedError, match="code_kernel"):
        spe.pairwise(torch.zeros(1, 4, 1))
    layer = RPEAttention(8, 2, rpe=make_spe("sine"), mode="mask", kernel="elu").double()
    # the layer's exact reference is spe_reference: independent of the noise draw
    x, pos = torch.randn(1, 4, 8, dtype=D64), torch.arange(4, dtype=D64).view(1, 4, 1)
    exact = layer.reference(x, pos, rpe="exact")
    layer.redraw()
    torch.testing.assert_close(layer.reference(x, pos, rpe="exact"), exact)
    with pytest.raises(ValueError, match="rpe='features'"):
        layer.reference(x, pos, kernel="exact", rpe="features")
    with pytest.raises(ValueError, match="modes"):
        RPEAttention(8, 2, rpe=make_spe("sine", channels=4), mode="logit")
    attn = RPEAttention(8, 2, rpe=make_spe("conv1d", channels=4, grid=8), mode="mask", kernel="elu")
    with pytest.raises(ValueError, match="pos"):  # 0, 0.5, 1, ...: not a unit grid
        attn.double()(
            torch.randn(1, 4, 8, dtype=D64), torch.arange(4.0, dtype=D64)[None, :, None] / 2
        )
