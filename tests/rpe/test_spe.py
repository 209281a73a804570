"""SPE (sineSPE, convSPE): unbiased codes, engine == quadratic form, convergence to the exact
target, gating, reproducible noise, translation invariance (per draw through the layer, in
distribution for raw positions), gradients, bad options."""

import copy
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


def make_spe(
    kind, heads=2, channels=4, realizations=16, gated=True, grid=24, kernel=3, sines=2, **kw
):
    """placement="after" unless given (most tests here check the kernel-feature encoding)."""
    kw.setdefault("placement", "after")
    if kind == "sine":
        spe = SineSPE(1, heads, channels, realizations, num_sines=sines, gated=gated, **kw)
    else:
        p = 1 if kind == "conv1d" else 2
        spe = ConvSPE(p, heads, channels, grid, kernel, realizations, gated=gated, **kw)
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
    """Registered as "spe-sine"/"spe-conv", the layer fills ``dim``: with placement="after"
    the kernel features, with "before" (the default) the head dim, and the feature map then
    reads the R encoded features."""
    monkeypatch.setitem(REGISTRY, "spe-sine", SineSPE)
    monkeypatch.setitem(REGISTRY, "spe-conv", ConvSPE)
    pos = grid_positions("conv2d", 10)[None]
    for placement, dims in (("after", (6, 16)), ("before", (6, 6))):
        elu = RPEAttention(
            12, 2, rpe="spe-sine", pos_dim=1, mode="mask", kernel="elu",
            rpe_options=dict(placement=placement),
        )  # fmt: skip
        favor = RPEAttention(
            12, 2, rpe="spe-conv", pos_dim=2, mode="mask", kernel="favor+", num_features=16,
            rpe_options=dict(grid_size=8, num_realizations=8, placement=placement),
        )  # fmt: skip
        assert (elu.rpe.dim, favor.rpe.dim) == dims
        if placement == "before":
            assert (elu.feature_map.input_dim, favor.feature_map.input_dim) == (64, 8)
            assert favor.rpe.code_scale == "reference" and favor.normalize == "masked"
        assert favor(torch.randn(1, 10, 12), pos.float()).shape == (1, 10, 12)
    default = RPEAttention(12, 2, rpe="spe-sine", pos_dim=1, kernel="favor+")
    assert default.rpe.placement == "before" and default.mode == "mask"


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


# ---------------------------------------------------------------- (h) the reference code
# An independent float64 transcription of the formulas of the reference implementation
# (aliutkus/spe, src/pytorch/spe/spe.py: SineSPE, ConvSPE, SPEFilter), then attention on
# qhat, khat: the exact softmax exp(qhat.khat / sqrt(R)) and FAVOR+ with the Performer's data
# normaliser R^-1/4 and a given projection W. Draws are the standard-normal tensors of the
# reference forward; positions are 0, 1, ... (raster (row, col) in 2D).
H, HEAD, R_REF, M_REF = 2, 4, 16, 32


def ref_codes(kind, params, z, size):
    """Ungated (qbar, kbar) ``[n, h, d, R]``, scaled by (R d)^-1/4."""
    if kind == "sine":
        freqs, offsets, gains = params["freqs"], params["offsets"], params["gains"]
        sines = freqs.shape[-1]
        u = torch.arange(size[0], dtype=freqs.dtype)
        f = torch.sigmoid(freqs) / 2
        amplitude = torch.nn.functional.softplus(gains).repeat_interleave(2, -1)
        weights = z[0] / math.sqrt(2 * sines) * amplitude[..., None]  # [h, d, 2K, R]

        def omega(offset):  # [h, d, n, 2K]: (cos, sin) of each sine, interleaved
            phase = 2 * math.pi * f[:, :, None, :] * u[:, None] + offset[:, :, None, :]
            return torch.stack([torch.cos(phase), torch.sin(phase)], -1).flatten(-2)

        qbar = omega(offsets) @ weights
        kbar = omega(torch.zeros_like(offsets)) @ weights
        qbar, kbar = (c.permute(2, 0, 1, 3) for c in (qbar, kbar))
    else:
        wq, wk = params["conv_q.weight"], params["conv_k.weight"]
        taps = wq.shape[2:]
        conv = torch.nn.functional.conv1d if len(taps) == 1 else torch.nn.functional.conv2d
        window = (slice(None), slice(None)) + tuple(
            slice(t, t + s) for t, s in zip(taps, size, strict=True)
        )
        kbar = conv(z, wq, groups=wq.shape[0])[window]  # the reference's conv_q -> kbar
        qbar = conv(z, wk, groups=wk.shape[0])[window]
        qbar, kbar = (
            c.reshape(R_REF, H, HEAD, -1).permute(3, 1, 2, 0) for c in (qbar, kbar)
        )  # raster order of the grid
    scale = (R_REF * HEAD) ** 0.25
    return qbar / scale, kbar / scale


def ref_filter(qbar, kbar, q, k, gate=None, gate_z=None):
    """SPEFilter: gating, then qhat = sum_d qbar q, for one sequence q, k ``[n, h, d]``."""
    if gate is not None:
        g = torch.sigmoid(gate)[..., None]
        noise = gate_z / (HEAD * R_REF) ** 0.25
        qbar = torch.sqrt(1 - g) * qbar + torch.sqrt(g) * noise
        kbar = torch.sqrt(1 - g) * kbar + torch.sqrt(g) * noise
    return torch.einsum("nhdr,nhd->nhr", qbar, q), torch.einsum("nhdr,nhd->nhr", kbar, k)


def ref_softmax(qhat, khat, v):
    weights = torch.softmax(torch.einsum("ihr,jhr->hij", qhat, khat) / math.sqrt(R_REF), -1)
    return torch.einsum("hij,jhe->ihe", weights, v)


def ref_performer(qhat, khat, v, w):
    def phi(x):
        x = x * R_REF**-0.25
        return torch.exp(x @ w.T - x.pow(2).sum(-1, keepdim=True) / 2) / math.sqrt(w.shape[0])

    fq, fk = phi(qhat), phi(khat)
    num = torch.einsum("ihm,jhm,jhe->ihe", fq, fk, v)
    return num / torch.einsum("ihm,jhm->ih", fq, fk)[..., None]


def reference_case(kind, gated, dtype, seed=0):
    """The reference code's parameters and draws, the matching layer, inputs and positions."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=D64)

    if kind == "sine":
        sines, size = 3, (9,)
        params = {"freqs": randn(H, HEAD, sines) - 1.0, "offsets": randn(H, HEAD, sines)}
        params["gains"] = randn(H, HEAD, sines)
        z = randn(1, H, HEAD, 2 * sines, R_REF)
        name, options = "spe-sine", dict(num_sines=sines)
    else:
        taps, size = ((3,), (9,)) if kind == "conv1d" else ((2, 3), (3, 4))
        shape = (H * HEAD, 1, *taps)
        scale = math.sqrt(math.prod(taps) / 2)
        params = {
            "conv_q.weight": torch.rand(shape, generator=gen, dtype=D64) / scale,
            "conv_k.weight": (torch.rand(shape, generator=gen, dtype=D64) - 0.3) / scale,
        }
        z = randn(R_REF, H * HEAD, *(4 * t + s for t, s in zip(taps, size, strict=True)))
        grid = tuple(s + 2 for s in size)
        name, options = "spe-conv", dict(grid_size=grid, kernel_size=taps)
    gate_z = None
    if gated:
        params["gate"] = randn(H, HEAD)
        gate_z = randn(H, HEAD, R_REF)
    w = randn(M_REF, R_REF)
    n = math.prod(size)
    x = randn(2, n, H * HEAD)
    # every input rounded to the layer's dtype, so that only its arithmetic differs
    params, z, gate_z, w, x = (
        t if t is None else {k: v.to(dtype).to(D64) for k, v in t.items()}
        if isinstance(t, dict) else t.to(dtype).to(D64)
        for t in (params, z, gate_z, w, x)
    )  # fmt: skip
    layer = RPEAttention(
        H * HEAD, H, rpe=name, pos_dim=len(size), kernel="favor+", num_features=M_REF,
        rpe_options=dict(num_realizations=R_REF, gated=gated, **options),
    ).to(dtype)  # fmt: skip
    layer.rpe.load_reference(params, z, gate_z)
    layer.feature_map.set_projection(w)
    if len(size) == 1:
        pos = torch.arange(n, dtype=D64)[:, None]
    else:
        pos = torch.stack(torch.meshgrid(*(torch.arange(s) for s in size), indexing="ij"), -1)
        pos = pos.reshape(n, 2).to(D64)
    return layer, params, z, gate_z, w, x, pos[None].expand(2, -1, -1), size


def reference_outputs(kind, layer, params, z, gate_z, w, x, mask, size):
    """Per batch row, the reference pipeline on the row's valid tokens (positions 0, 1, ...),
    through the layer's q/k/v and output projections (in float64)."""
    exact = layer.double() if layer.qkv.weight.dtype == D64 else copy.deepcopy(layer).double()
    qbar, kbar = ref_codes(kind, params, z, size)
    q, k, v = exact.qkv(x).unflatten(-1, (3, H, HEAD)).unbind(-3)
    soft, perf = (torch.zeros_like(v) for _ in range(2))
    for row in range(x.shape[0]):
        valid = ~mask[row]
        m = int(valid.sum())
        qhat, khat = ref_filter(
            qbar[:m], kbar[:m], q[row, valid], k[row, valid], params.get("gate"), gate_z
        )
        soft[row, valid] = ref_softmax(qhat, khat, v[row, valid])
        perf[row, valid] = ref_performer(qhat, khat, v[row, valid], w)
    qhat_all, _ = ref_filter(qbar, kbar, q[0], k[0], params.get("gate"), gate_z)
    return exact.out(soft.flatten(-2)), exact.out(perf.flatten(-2)), q[0], qhat_all


def max_relative(a, b):
    return ((a.to(D64) - b).abs().max() / b.abs().max()).item()


AGREEMENT = {}


@pytest.mark.parametrize("dtype", [D64, torch.float32])
@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("kind", KINDS)
def test_layer_equals_the_reference_code(kind, gated, dtype):
    """Placement "before" (default) with the reference code's parameters and draws: encode ==
    SPEFilter's qhat; the layer == Performer on qhat (data normaliser R^-1/4, given W);
    layer.reference(kernel="exact") == softmax(qhat khat^T / sqrt(R)); padded rows (left
    and right padding) == the reference on the unpadded sequence."""
    layer, params, z, gate_z, w, x, pos, size = reference_case(kind, gated, dtype)
    mask = torch.zeros(2, x.shape[1], dtype=torch.bool)
    if kind != "conv2d":  # 2D: raster positions count from the first token; no padding
        mask[1, :2] = True
        mask[1, -2:] = True
    soft, perf, q0, qhat0 = reference_outputs(kind, layer, params, z, gate_z, w, x, mask, size)
    xs, ps = x.to(dtype), pos.to(dtype)
    tol = 1e-10 if dtype == D64 else 1e-6
    valid = ~mask
    with torch.no_grad():
        encoded = layer.rpe.encode(q0.to(dtype), torch.zeros_like(ps[0]) + pos[0].to(dtype), True)
        errors = {"qhat": max_relative(encoded, qhat0)}
        errors["favor+"] = max_relative(layer(xs, ps, key_padding_mask=mask)[valid], perf[valid])
        layer.quadratic_below = 0  # the chunked O(n) engine, not the explicit form
        layer.chunk_size = 4
        errors["favor+ engine"] = max_relative(
            layer(xs, ps, key_padding_mask=mask)[valid], perf[valid]
        )
        exact = layer.reference(xs, ps, key_padding_mask=mask, kernel="exact", rpe="features")
        errors["softmax"] = max_relative(exact[valid], soft[valid])
    AGREEMENT[kind, gated, str(dtype)] = errors
    assert max(errors.values()) < tol, errors


def test_reference_scale_and_temperature_conventions():
    """code_scale="reference" codes are the unbiased ones times (R/d)^1/4; for a softmax map
    the feature map's input is the same for both scales (the Performer's input)."""
    spe = make_spe("sine", placement="before", realizations=R_REF, channels=HEAD)
    assert spe.code_scale == "reference"
    unbiased = make_spe("sine", placement="before", realizations=R_REF, channels=HEAD)
    unbiased.code_scale = "unbiased"
    unbiased.load_state_dict(spe.state_dict())
    q = torch.randn(5, H, HEAD, dtype=D64)
    pos = torch.arange(5, dtype=D64)[:, None]
    ratio = (R_REF / HEAD) ** 0.25
    torch.testing.assert_close(spe.encode(q, pos, True), unbiased.encode(q, pos, True) * ratio)
    fm = build_feature_map("favor+", R_REF, 8).double()
    a, b = (s.featurizer(fm, HEAD**-0.25, "mask") for s in (spe, unbiased))
    assert a.kernel_scale == pytest.approx(R_REF**-0.25)
    torch.testing.assert_close(a.encoded(q, pos, True), b.encoded(q, pos, True))
    assert make_spe("sine").code_scale == "unbiased"  # placement "after": unchanged default


# ---------------------------------------------------------------- (i) placement "before"
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("kernel", ["elu", "favor+"])
def test_before_layer_forward_equals_reference_and_gradients(kind, kernel):
    spe = make_spe(kind, channels=6, realizations=10, grid=16, placement="before").float()
    attn = RPEAttention(
        12, 2, rpe=spe, kernel=kernel, num_features=8, chunk_size=4, quadratic_below=0
    ).double()
    assert attn.feature_map.input_dim == 10
    x = torch.randn(2, 10, 12, dtype=D64)
    pos = grid_positions(kind, 10)[None].expand(2, -1, -1) + 3.0
    mask = torch.zeros(2, 10, dtype=torch.bool)
    mask[0, :2] = True
    mask[1, 7:] = True
    fast = attn(x, pos, key_padding_mask=mask)
    ref = attn.reference(x, pos, key_padding_mask=mask)
    torch.testing.assert_close(fast, ref, atol=1e-10, rtol=1e-10)
    exact = attn.reference(x, pos, key_padding_mask=mask, kernel="exact", rpe="features")
    if kernel == "elu":  # a deterministic map: its features are its kernel
        torch.testing.assert_close(exact, ref, atol=1e-10, rtol=1e-10)
    with pytest.raises(ValueError, match="rpe='features'"):
        attn.reference(x, pos, key_padding_mask=mask, rpe="exact")
    fast.pow(2).sum().backward()
    names = ["freqs", "offsets", "gains"] if kind == "sine" else ["query_filter", "key_filter"]
    for name in names + ["gate"]:
        grad = getattr(attn.rpe, name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().max() > 0, name


def test_before_is_after_for_the_identity_kernel_up_to_the_code_scale():
    """Linear kernel: phi(encode(q)) == encode(phi(q)); the two placements agree."""
    before = make_spe("conv1d", placement="before", code_scale="unbiased")
    after = make_spe("conv1d", placement="after")
    after.load_state_dict(before.state_dict())
    q, k, v = qkv((1, 9))
    pos = grid_positions("conv1d", 9)[None]
    outs = [
        linear_attention(
            q, k, v, pos,
            featurizer=s.featurizer(build_feature_map("identity", dim).double(), 1.0, "mask"),
            normalize="none",
        )
        for s, dim in ((before, 16), (after, 4))
    ]  # fmt: skip
    torch.testing.assert_close(outs[0], outs[1], atol=1e-12, rtol=1e-12)


# ---------------------------------------------------------------- (j) fresh noise, injection
def test_fresh_noise_redraws_every_forward_and_keeps_autograd():
    spe = make_spe("sine", placement="before", realizations=8, fresh_noise=True)
    attn = RPEAttention(8, 2, rpe=spe.float(), kernel="favor+", num_features=8).double()
    x = torch.randn(1, 7, 8, dtype=D64)
    pos = torch.arange(7, dtype=D64).view(1, 7, 1)
    first = attn(x, pos)
    drawn = attn.rpe.noise
    second = attn(x, pos)  # a new draw; the first graph keeps the previous buffer
    assert not torch.equal(attn.rpe.noise, drawn) and (first - second).abs().max() > 1e-6
    (first.sum() + second.sum()).backward()  # in-place redraws would break this backward
    attn.rpe.fresh_noise = False  # the stored draw is the one the last forward used, for
    torch.testing.assert_close(attn(x, pos), second, atol=0, rtol=0)  # queries and keys


def test_set_noise_and_load_reference_validate():
    spe = make_spe("conv1d", placement="before", grid=8)
    good = torch.randn(spe.noise.shape, dtype=D64)
    spe.set_noise(good, torch.randn(spe.gate_noise.shape))
    assert torch.equal(spe.noise, good) and spe.noise is not good
    for bad in (good[..., :-1], good.clone().fill_(float("nan")), good.long()):
        with pytest.raises(ValueError, match="noise"):
            spe.set_noise(bad)
    with pytest.raises(ValueError, match="gate_noise"):
        make_spe("sine", gated=False).set_noise(
            make_spe("sine").noise, torch.randn(2, 4, 16, dtype=D64)
        )
    with pytest.raises(ValueError, match="unknown reference parameter"):
        spe.load_reference({"conv_v.weight": torch.ones(8, 1, 3)})
    with pytest.raises(ValueError, match="conv_q.weight"):
        spe.load_reference({"conv_q.weight": torch.ones(8, 3)})
    with pytest.raises(ValueError, match="grid_size"):  # s = 9 > grid_size = 8
        spe.load_reference(noise=torch.randn(16, 8, 4 * 3 + 9))
    with pytest.raises(ValueError, match="noise"):
        make_spe("sine").load_reference(noise=torch.randn(2, 4, 4, 16))
    with pytest.raises(ValueError, match="placement"):
        make_spe("sine", placement="middle")
    with pytest.raises(ValueError, match="code_scale"):
        make_spe("sine", code_scale="authors")
    with pytest.raises(ValueError, match="fresh_noise"):
        make_spe("sine", fresh_noise=1)
    with pytest.raises(ValueError, match="placement='after'"):
        spe_reference(*qkv((1, 4)), torch.zeros(1, 4, 1, dtype=D64), spe, None)
    feat = spe.featurizer(build_feature_map("elu", 16).double(), 1.0, "mask")
    with pytest.raises(ValueError, match="head dim"):
        feat.query(torch.randn(1, 4, 2, 3, dtype=D64), torch.zeros(1, 4, 1, dtype=D64))
    with pytest.raises(ValueError, match="input_dim"):
        spe.featurizer(build_feature_map("elu", 4).double(), 1.0, "mask")


def test_reproducing_doc_script_runs():
    """The SPE script of docs/reproducing.md runs; its qhat is the transcription's."""
    from pathlib import Path

    text = (Path(__file__).parents[2] / "docs" / "reproducing.md").read_text()
    blocks = [block.split("```")[0] for block in text.split("```python\n")[1:]]
    (script,) = [block for block in blocks if 'rpe="spe-sine"' in block]
    scope = {}
    torch.manual_seed(0)
    exec(compile(script, "reproducing.md", "exec"), scope)
    assert scope["out"].shape == scope["x"].shape == scope["out_conv"].shape
    assert torch.isfinite(scope["out"]).all() and torch.isfinite(scope["out_conv"]).all()
    theirs, n = scope["theirs"], scope["n"]
    params = {k: v.double() for k, v in theirs.items()}
    head_dim, r = scope["head_dim"], scope["R"]
    qbar, kbar = ref_codes("sine", params, scope["z"].double(), (n,))
    scale = (r * head_dim) ** 0.25 / (R_REF * HEAD) ** 0.25  # ref_codes assumes R_REF, HEAD
    qbar, kbar = qbar / scale, kbar / scale
    g = torch.sigmoid(params["gate"])[..., None]
    noise = scope["gate_z"].double() / (head_dim * r) ** 0.25
    qbar = torch.sqrt(1 - g) * qbar + torch.sqrt(g) * noise
    want = torch.einsum("nhdr,bnhd->bnhr", qbar, scope["q"].double())
    assert max_relative(scope["qhat"].detach(), want) < 1e-6
