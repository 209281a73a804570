"""``flt-gm`` with ``convention="google"`` against an independent float64 evaluation of the
formulas of Google's FLT code (scenic ``sharp_masked_favor_attention`` with
``exp_softmax_kernel_transformation``; imp ``general_favor_attention(flt=True)``, whose
coordinates ``[L, C]`` are shared by the batch rows)."""

import math

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.features import GERFFeatures, PositiveRandomFeatures
from geolinrpe.ops import linear_attention
from geolinrpe.ops.exact import feature_attention
from geolinrpe.rpe.mixture import GaussianMixtureRPE

D64 = torch.float64


def google_flt_attention(query, key, value, coords, params, points, projection, inputs_mask):
    """Google's FLT attention, written from the formulas (docs/reproducing.md), float64.

    ``query, key, value [B, L, H, D]``, ``coords [B, L, C]``, ``params [H, K (2 + C)]``
    (``[w | mu | s]``), ``points [H, M, C]``, ``projection [R, D + 2M]``, ``inputs_mask [B, L]``
    (True = token, Google's convention).
    """
    heads, c = params.shape[0], coords.shape[-1]
    k, m = params.shape[1] // (2 + c), points.shape[1]
    weights, sqsigmas = params[:, :k], params[:, (1 + c) * k :].exp()
    mus = params[:, k : (1 + c) * k].reshape(heads, k, c)
    bumps = torch.exp(-((points[:, :, None] - mus[:, None]) ** 2).sum(-1) / sqsigmas[:, None])
    ft = (weights[:, None] * bumps).sum(-1)  # tau(points) [H, M]
    densities = torch.exp(-(points**2 / 2).sum(-1)) / math.sqrt(2 * math.pi)
    ratios = ft / densities

    def snippet(coeff):
        proj = torch.einsum("bld,hmd->blhm", coords, points)
        return torch.exp(2j * math.pi * coeff * proj) * ratios / math.sqrt(m)

    coe = query.shape[-1] ** 0.25
    qs, ks = snippet(1.0), snippet(-1.0)
    new_q = torch.cat([query, coe * qs.real, coe * qs.imag], -1)
    new_k = torch.cat([key, coe * ks.real, -coe * ks.imag], -1)

    def favor(data, is_query):
        normalizer = data.shape[-1] ** -0.25
        dash = torch.einsum("blhd,md->blhm", normalizer * data, projection)
        diag = (data**2).sum(-1, keepdim=True) / 2 * normalizer**2
        stab = dash.amax(-1, keepdim=True) if is_query else dash.max()
        return (torch.exp(dash - stab - diag) + 1e-6) / math.sqrt(projection.shape[0])

    qp, kp = favor(new_q, True), favor(new_k, False)
    kp = torch.where(inputs_mask[:, :, None, None], kp, 0.0)
    kvs = torch.einsum("blhm,blhd->bhmd", kp, value)
    numerator = torch.einsum("blhm,bhmd->blhd", qp, kvs)
    denominator = torch.einsum("blhm,bhm->blh", qp, kp.sum(1))[..., None]
    denominator = torch.where(denominator <= 0, 1.0, denominator)
    return numerator / denominator


def _google_layer(c, heads, head_dim, m, k, r, gen, dtype=D64, **options):
    rpe = GaussianMixtureRPE(c, heads, m, num_components=k, convention="google").double()
    params = torch.cat(
        [
            0.3 * torch.randn(heads, k, dtype=D64, generator=gen),  # w, signed
            0.7 * torch.randn(heads, k * c, dtype=D64, generator=gen),  # mu
            0.3 * torch.randn(heads, k, dtype=D64, generator=gen) - 0.5,  # s
        ],
        dim=-1,
    )
    rpe.load_google_params(params)
    points = torch.randn(heads, m, c, dtype=D64, generator=gen)
    rpe.set_frequencies(points)
    kernel = PositiveRandomFeatures(head_dim + 2 * m, r).double()
    projection = torch.randn(r, head_dim + 2 * m, dtype=D64, generator=gen)
    kernel.set_projection(projection)
    layer = RPEAttention(
        heads * head_dim,
        heads,
        rpe=rpe,
        kernel=kernel,
        num_features=r,
        center_positions=False,
        bias=False,
        **options,
    ).to(dtype)
    with torch.no_grad():
        layer.out.weight.copy_(torch.eye(heads * head_dim))
    return layer, params, points, projection


def _split_heads(layer, x):
    q, k, v = layer.qkv(x).unflatten(-1, (3, layer.num_heads, layer.head_dim)).unbind(-3)
    return q, k, v


@pytest.mark.parametrize("pos_dim", [1, 2, 3])
@pytest.mark.parametrize("quadratic_below", [None, 0])
def test_layer_equals_googles_formulas_with_padding(pos_dim, quadratic_below):
    """Padded batch, odd sizes: the explicit path and the chunked engine equal the
    transcription to 1e-11 in float64 (the padded keys enter the key stabiliser, as there)."""
    gen = torch.Generator().manual_seed(pos_dim)
    layer, params, points, projection = _google_layer(
        pos_dim, 3, 5, 7, 4, 33, gen, quadratic_below=quadratic_below, chunk_size=4
    )
    x = torch.randn(2, 9, 15, dtype=D64, generator=gen)
    pos = 2 * torch.randn(2, 9, pos_dim, dtype=D64, generator=gen)
    padding = torch.zeros(2, 9, dtype=torch.bool)
    padding[1, 6:] = True
    out = layer(x, pos, key_padding_mask=padding).unflatten(-1, (3, 5))
    q, k, v = _split_heads(layer, x)
    want = google_flt_attention(q, k, v, pos, params, points, projection, ~padding)
    valid = ~padding
    torch.testing.assert_close(out[valid], want[valid], rtol=1e-11, atol=1e-12)
    assert bool((out[padding] == 0).all())


def test_imp_path_shared_coordinates_and_packed_graphs():
    """imp's coordinates ``[L, C]`` are shared by the batch rows: the same as repeating
    them. Packed graphs run the engine per graph with one key stabiliser for the call."""
    gen = torch.Generator().manual_seed(7)
    layer, params, points, projection = _google_layer(2, 2, 4, 6, 3, 16, gen)
    x = torch.randn(3, 5, 8, dtype=D64, generator=gen)
    coords = torch.randn(5, 2, dtype=D64, generator=gen)
    pos = coords.expand(3, 5, 2)
    out = layer(x, pos).unflatten(-1, (2, 4))
    q, k, v = _split_heads(layer, x)
    mask = torch.ones(3, 5, dtype=torch.bool)
    want = google_flt_attention(q, k, v, pos, params, points, projection, mask)
    torch.testing.assert_close(out, want, rtol=1e-11, atol=1e-12)
    # packed: the batch's rows as three graphs of one call give the same numbers
    batch = torch.arange(3).repeat_interleave(5)
    packed = layer(x.reshape(15, 8), pos.reshape(15, 2), batch=batch).unflatten(-1, (2, 4))
    torch.testing.assert_close(packed, want.reshape(15, 2, 4), rtol=1e-11, atol=1e-12)


@pytest.mark.parametrize("spread", [1.0, 3.0])
def test_float32_equals_googles_float32_formulas(spread):
    """float32 layer against the same formulas in float32 (what Google's float32 code
    computes) on the same inputs: measured max |a - b| / max |b| = 5.7e-7 (spread 1) and
    1.6e-7 (spread 3), |a - b| / |b| = 2.3e-7 and 1.9e-7. Both are 2.5e-6 and 7.0e-6 from
    the float64 values, as Google's float32 code is: the phases 2 pi xi . r lose digits."""
    gen = torch.Generator().manual_seed(3)
    layer, params, points, projection = _google_layer(3, 4, 16, 64, 25, 128, gen)
    layer = layer.float()
    x = torch.randn(2, 40, 64, generator=gen)
    pos = spread * torch.randn(2, 40, 3, generator=gen)
    padding = torch.zeros(2, 40, dtype=torch.bool)
    padding[0, 31:] = True
    with torch.no_grad():
        q, k, v = _split_heads(layer, x)
        tensors = (params.float(), points.float(), projection.float())
        want = google_flt_attention(q, k, v, pos, *tensors, ~padding)
        out = layer(x, pos, key_padding_mask=padding).unflatten(-1, (4, 16))
    valid = ~padding
    difference = out[valid] - want[valid]
    assert difference.norm() < 1e-6 * want[valid].norm()
    assert difference.abs().max() < 2e-6 * want[valid].abs().max()


def test_engine_equals_explicit_features_and_needs_prepare():
    gen = torch.Generator().manual_seed(4)
    layer, *_ = _google_layer(1, 2, 4, 5, 3, 12, gen)
    q, k, v = (torch.randn(2, 11, 2, 4, dtype=D64, generator=gen) for _ in range(3))
    pos = torch.randn(2, 11, 1, dtype=D64, generator=gen)
    featurizer = layer.featurizer
    engine = linear_attention(q, k, v, pos, featurizer=featurizer, chunk_size=3)
    explicit = feature_attention(q, k, v, pos, featurizer=featurizer)
    torch.testing.assert_close(engine, explicit, rtol=1e-12, atol=1e-13)
    with pytest.raises(RuntimeError, match="prepare"):
        layer.featurizer.key(k, pos)


def test_exact_reference_is_what_the_features_estimate():
    """``reference(kernel="exact")``: softmax of ``q.k / sqrt(d + 2m) + sqrt(d / (d + 2m))
    f_hat``; 16k random features come within 2% of it."""
    gen = torch.Generator().manual_seed(5)
    layer, *_ = _google_layer(2, 1, 4, 8, 3, 16384, gen)
    x = 0.5 * torch.randn(1, 12, 4, dtype=D64, generator=gen)
    pos = torch.randn(1, 12, 2, dtype=D64, generator=gen)
    exact = layer.reference(x, pos, kernel="exact", rpe="features")
    q, k, v = _split_heads(layer, x)
    total = 4 + 16
    bias = layer.rpe.pairwise(pos) * math.sqrt(4 / total)
    logits = torch.einsum("bihd,bjhd->bhij", q, k) / math.sqrt(total) + bias
    want = torch.einsum("bhij,bjhe->bihe", logits.softmax(-1), v).flatten(-2)
    torch.testing.assert_close(exact, want, rtol=1e-12, atol=1e-12)
    estimate = layer(x, pos)
    assert (estimate - exact).abs().max() < 0.02 * exact.abs().max()


@pytest.mark.parametrize("pos_dim", [1, 2])
def test_closed_form_is_the_expectation_of_the_estimate(pos_dim):
    """``E_(xi ~ N(0, I))[rho^2 cos(2 pi xi . Delta)]`` by a Riemann sum over xi."""
    gen = torch.Generator().manual_seed(8 + pos_dim)
    rpe = GaussianMixtureRPE(pos_dim, 1, 4, num_components=2, convention="google").double()
    params = torch.tensor([[0.8, -0.5] + [0.3, -0.4] * pos_dim + [0.2, -0.6]], dtype=D64)
    rpe.load_google_params(params)
    axis = torch.linspace(-9, 9, 1801 if pos_dim == 1 else 361, dtype=D64)
    grid = torch.stack(torch.meshgrid(*[axis] * pos_dim, indexing="ij"), -1).reshape(-1, pos_dim)
    rpe.base_noise = grid[None]  # every grid point as a frequency
    _, rho = rpe.google_ratio()
    normal = torch.exp(-(grid**2).sum(-1) / 2) / (2 * math.pi) ** (pos_dim / 2)
    delta = torch.randn(5, pos_dim, dtype=D64, generator=gen)
    phase = 2 * math.pi * delta @ grid.T
    riemann = (normal * rho[0] ** 2 * torch.cos(phase)).sum(-1) * (axis[1] - axis[0]) ** pos_dim
    torch.testing.assert_close(rpe.closed_form(delta)[:, 0], riemann, rtol=1e-8, atol=1e-10)


def test_google_parameters_round_trip_and_validation():
    rpe = GaussianMixtureRPE(3, 2, 8, num_components=4, convention="google")
    params = torch.randn(2, 4 * 5)
    rpe.load_google_params(params)
    torch.testing.assert_close(rpe.google_params(), params)
    torch.testing.assert_close(rpe.mixture_scales**2, params[:, 16:].exp())
    with pytest.raises(ValueError, match=r"\[2, 20\]"):
        rpe.load_google_params(torch.randn(2, 19))
    with pytest.raises(ValueError, match="finite"):
        rpe.set_frequencies(torch.full((8, 3), float("nan")))
    rpe.set_frequencies(torch.ones(8, 3))  # shared by the heads
    assert bool((rpe.base_noise == 1).all())
    with pytest.raises(ValueError, match="sampler"):
        GaussianMixtureRPE(1, 1, 8, convention="google", sampler="proposal")
    with pytest.raises(ValueError, match="mc"):
        GaussianMixtureRPE(1, 1, 8, convention="google", frequencies="quadrature")
    with pytest.raises(ValueError, match="convention"):
        GaussianMixtureRPE(1, 1, 8, convention="scenic")
    with pytest.raises(ValueError, match="convention='google'"):
        GaussianMixtureRPE(1, 1, 32).google_params()
    with pytest.raises(ValueError, match="base_noise"):
        GaussianMixtureRPE(1, 1, 32).set_frequencies(torch.zeros(32, 1))
    with pytest.raises(ValueError, match="infinite expectation"):
        rpe.load_google_params(torch.zeros(2, 20).index_fill_(1, torch.arange(16, 20), 2.0))
        rpe.closed_form(torch.zeros(1, 3))


def test_google_convention_refuses_what_it_does_not_define():
    rpe = GaussianMixtureRPE(1, 2, 8, num_components=4, convention="google")
    assert rpe.modes == ("logit",)
    with pytest.raises(ValueError, match="modes"):
        RPEAttention(8, 2, rpe=rpe, mode="mask")
    with pytest.raises(ValueError, match="causal"):
        RPEAttention(8, 2, rpe=rpe, causal=True)
    with pytest.raises(ValueError, match="favor"):
        _ = RPEAttention(8, 2, rpe=rpe, kernel=GERFFeatures(4 + 16, 8)).featurizer
    with pytest.raises(ValueError, match="shape"):
        PositiveRandomFeatures(4, 8).set_projection(torch.zeros(8, 5))
