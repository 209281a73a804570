"""RoPE and STRING: relative-only maps, engine == quadratic form, convergence to the exact
RoPE-softmax, RPEAttention contracts, gradients and bad options."""

import pytest
import torch
from torch.func import functional_call

from geolinrpe import RPEAttention
from geolinrpe.features import build_feature_map
from geolinrpe.ops import feature_attention, linear_attention, softmax_attention, to_padded
from geolinrpe.rpe.rotary import (
    STRING,
    RoPE,
    axial_frequencies,
    rotary_kernel_reference,
    rotary_softmax_reference,
)
from geolinrpe.testing import assert_padding_consistent, assert_translation_invariant

D64 = torch.float64


def string(pos_dim, heads, dim, **kw):
    """STRING with a non-trivial basis (A = 0 at init would be plain RoPE)."""
    rpe = STRING(pos_dim, heads, dim, **kw).double()
    with torch.no_grad():
        rpe.skew_param.normal_(0, 0.5)
    return rpe


RPES = {
    "rope-1d": lambda dim: RoPE(1, 2, dim).double(),
    "rope-3d-learnable": lambda dim: RoPE(3, 2, dim, base=100.0, learnable=True).double(),
    "string-2d": lambda dim: string(2, 2, dim),
}
DIMS = {"rope-1d": 8, "rope-3d-learnable": 12, "string-2d": 8}
# (mode, kernel, normalize): logit is the softmax; mask mode uses "none" (module docstring)
CONFIGS = [("logit", "favor+", "masked"), ("mask", "elu", "none"), ("mask", "favor+", "none")]


def featurizer(rpe, mode, kernel, num_features=16):
    d = rpe.dim
    if mode == "logit":
        return rpe.featurizer(build_feature_map("favor+", d, num_features).double(), d**-0.25, mode)
    fm = build_feature_map(kernel, d, d).double()  # mask mode: M acts on the d features
    return rpe.featurizer(fm, d**-0.25 if kernel == "favor+" else 1.0, mode)


def inputs(lead, d, p, heads=2, e=3, scale=3.0):
    q, k = (torch.randn(*lead, heads, d, dtype=D64) for _ in range(2))
    v = torch.randn(*lead, heads, e, dtype=D64)
    return q, k, v, torch.randn(*lead, p, dtype=D64) * scale


# ---------------------------------------------------------------- the maps


@pytest.mark.parametrize("name", list(RPES))
def test_inner_products_depend_on_relative_positions_only(name):
    rpe = RPES[name](DIMS[name])
    p = rpe.pos_dim
    a, b = torch.randn(2, 50, 2, rpe.dim, dtype=D64)
    ri, rj = torch.randn(2, 50, p, dtype=D64) * 5
    want = (rpe.transform(a, ri) * rpe.transform(b, rj)).sum(-1)
    for _ in range(3):
        t = torch.randn(p, dtype=D64) * 10
        moved = (rpe.transform(a, ri + t) * rpe.transform(b, rj + t)).sum(-1)
        torch.testing.assert_close(moved, want, atol=1e-12, rtol=0)
    # <M(r_i) a, M(r_j) b> = <a, M(r_j - r_i) b>, M(x + y) = M(x) M(y), |M(r) a| = |a|
    relative = (a * rpe.transform(b, rj - ri)).sum(-1)
    torch.testing.assert_close(relative, want, atol=1e-12, rtol=0)
    composed = rpe.transform(rpe.transform(a, ri), rj)
    torch.testing.assert_close(composed, rpe.transform(a, ri + rj), atol=1e-12, rtol=0)
    torch.testing.assert_close(rpe.transform(a, ri).norm(dim=-1), a.norm(dim=-1))
    torch.testing.assert_close(rpe.transform(a, torch.zeros_like(ri)), a, atol=1e-13, rtol=0)


def test_rope_1d_is_the_complex_rotation_with_theta_k_base_pow_minus_2k_over_d():
    rpe = RoPE(1, 1, 8).double()
    x = torch.randn(5, 1, 8, dtype=D64)
    r = torch.tensor([[0.0], [1.0], [-2.5], [0.3], [1e3]], dtype=D64)  # real-valued positions
    theta = 10000.0 ** (-2 * torch.arange(4, dtype=D64) / 8)
    z = torch.complex(x[..., 0::2], x[..., 1::2]) * torch.exp(1j * theta * r[:, :, None])
    got = rpe.transform(x, r)
    torch.testing.assert_close(got[..., 0::2], z.real, atol=1e-12, rtol=0)
    torch.testing.assert_close(got[..., 1::2], z.imag, atol=1e-12, rtol=0)


def test_axial_rope_rotates_each_group_by_its_own_coordinate():
    theta, axis = axial_frequencies(12, 3, base=100.0)
    assert axis.tolist() == [0, 0, 1, 1, 2, 2]  # 4 entries = 2 pairs per coordinate
    torch.testing.assert_close(theta, torch.tensor([1.0, 0.1] * 3, dtype=D64))
    rpe = RoPE(3, 2, 12, base=100.0).double()
    one_d = RoPE(1, 2, 4, base=100.0).double()
    x = torch.randn(6, 2, 12, dtype=D64)
    pos = torch.randn(6, 3, dtype=D64) * 4
    got = rpe.transform(x, pos)
    for c in range(3):
        group = slice(4 * c, 4 * c + 4)
        want = one_d.transform(x[..., group], pos[:, c : c + 1])
        torch.testing.assert_close(got[..., group], want, atol=1e-13, rtol=0)


def test_string_is_exp_of_commuting_skew_generators_and_starts_as_rope():
    rpe = string(3, 2, 6)
    basis = rpe.orthogonal_matrix()
    eye = torch.eye(6, dtype=D64).expand(2, 6, 6)
    torch.testing.assert_close(basis.transpose(-1, -2) @ basis, eye, atol=1e-12, rtol=0)
    gen = rpe.generators()  # [h, p, d, d]
    torch.testing.assert_close(gen, -gen.transpose(-1, -2), atol=1e-13, rtol=0)
    for a, b in ((0, 1), (0, 2), (1, 2)):
        comm = gen[:, a] @ gen[:, b] - gen[:, b] @ gen[:, a]
        assert comm.abs().max() < 1e-12
    x = torch.randn(4, 2, 6, dtype=D64)
    r = torch.randn(4, 3, dtype=D64) * 2
    m = torch.linalg.matrix_exp(torch.einsum("np,hpde->nhde", r, gen))
    torch.testing.assert_close(
        rpe.transform(x, r), torch.einsum("nhde,nhe->nhd", m, x), atol=1e-12, rtol=0
    )
    fresh = STRING(3, 2, 6).double()  # A = 0: P = I, plain RoPE
    torch.testing.assert_close(fresh.transform(x, r), RoPE(3, 2, 6).double().transform(x, r))


# ---------------------------------------------------------------- engine == quadratic form


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("mode,kernel,normalize", CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,chunk", [(37, None), (63, 7), (50, 16)])  # one chunk, divides, not
def test_engine_matches_quadratic_form_dense(name, mode, kernel, normalize, causal, n, chunk):
    rpe = RPES[name](DIMS[name])
    feat = featurizer(rpe, mode, kernel)
    q, k, v, pos = inputs((2, n), rpe.dim, rpe.pos_dim)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 2 :] = True
    kw = dict(featurizer=feat, key_padding_mask=mask, causal=causal, normalize=normalize)
    fast = linear_attention(q, k, v, pos, chunk_size=chunk, **kw)
    torch.testing.assert_close(fast, feature_attention(q, k, v, pos, **kw), atol=1e-10, rtol=1e-10)
    assert fast[1, n // 2 :].abs().max() == 0


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("mode,kernel,normalize", CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
def test_engine_matches_quadratic_form_packed_and_padded(name, mode, kernel, normalize, causal):
    rpe = RPES[name](DIMS[name])
    feat = featurizer(rpe, mode, kernel)
    sizes = [1, 9, 20, 2]
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    q, k, v, pos = inputs((sum(sizes),), rpe.dim, rpe.pos_dim)
    kw = dict(featurizer=feat, causal=causal, normalize=normalize)
    packed = linear_attention(q, k, v, pos, batch=batch, chunk_size=5, **kw)
    torch.testing.assert_close(
        packed, feature_attention(q, k, v, pos, batch=batch, **kw), atol=1e-10, rtol=1e-10
    )
    dq, mask = to_padded(q, batch)
    dk, dv, dpos = (to_padded(t, batch)[0] for t in (k, v, pos))
    dense = linear_attention(dq, dk, dv, dpos, key_padding_mask=mask, **kw)
    torch.testing.assert_close(dense[~mask], packed, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("causal", [False, True])
def test_references_from_relative_maps_equal_the_absolute_forms(name, causal):
    """Mask mode: the relative-map reference == the explicit-feature form of the featurizer
    (deterministic and random maps, both normalisations); logit mode: the relative-map
    softmax == softmax attention on M(r_i) q_i, M(r_j) k_j."""
    rpe = RPES[name](DIMS[name])
    q, k, v, pos = inputs((2, 21), rpe.dim, rpe.pos_dim)
    mask = torch.zeros(2, 21, dtype=torch.bool)
    mask[0, 15:] = True
    layout = dict(key_padding_mask=mask, causal=causal)
    for kernel in ("elu", "favor+"):
        feat = featurizer(rpe, "mask", kernel)
        for normalize in ("none", "masked"):
            want = feature_attention(q, k, v, pos, featurizer=feat, normalize=normalize, **layout)
            got = rotary_kernel_reference(
                q,
                k,
                v,
                pos,
                rpe,
                feat.feature_map,
                input_scale=feat.input_scale,
                normalize=normalize,
                **layout,
            )
            torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)
    rot_q, rot_k = rpe.transform(q, pos), rpe.transform(k, pos)
    torch.testing.assert_close(
        rotary_softmax_reference(q, k, v, pos, rpe, **layout),
        softmax_attention(rot_q, rot_k, v, **layout),
        atol=1e-12,
        rtol=1e-12,
    )
    batch = torch.tensor([0] * 8 + [1] * 13)
    flat = [t[1] for t in (q, k, v, pos)]
    packed = rotary_softmax_reference(*flat, rpe, batch=batch, causal=causal)
    alone = rotary_softmax_reference(*(t[None, 8:] for t in flat), rpe, causal=causal)[0]
    torch.testing.assert_close(packed[8:], alone, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", ["rope-1d", "string-2d"])
def test_logit_mode_approaches_the_exact_rope_softmax(name):
    """Relative error vs rotary_softmax_reference, mean over 3 draws (q, k ~ 0.5 N(0, 1),
    30 tokens): measured 0.36 / 0.11 / 0.032 (RoPE 1D) and 0.34 / 0.13 / 0.035 (STRING 2D)
    at 16 / 256 / 4096 features, i.e. about 1/sqrt(R)."""
    errors = []
    for r in (16, 256, 4096):
        trial = []
        for seed in range(3):
            torch.manual_seed(seed)
            rpe = RPES[name](8)
            q, k, v, pos = inputs((1, 30), 8, rpe.pos_dim, e=4)
            q, k = q * 0.5, k * 0.5
            out = linear_attention(q, k, v, pos, featurizer=featurizer(rpe, "logit", "favor+", r))
            exact = rotary_softmax_reference(q, k, v, pos, rpe)
            trial.append(((out - exact).norm() / exact.norm()).item())
        errors.append(sum(trial) / len(trial))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[2] > 5 and errors[2] < 0.06, errors


# ---------------------------------------------------------------- RPEAttention


def rope_layer(mode, rpe=None, pos_dim=3, **kw):
    head_dim = 12
    if rpe is None:
        rpe = RoPE(pos_dim, 2, head_dim, learnable=True)
    options = dict(num_features=head_dim, chunk_size=8)
    if mode == "mask":
        options.update(kernel="elu", normalize="none")
    options.update(kw)
    return RPEAttention(2 * head_dim, 2, rpe=rpe, mode=mode, **options).double()


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("make", [RoPE, STRING])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_forward_equals_feature_reference(mode, make, causal):
    rpe = make(3, 2, 12)
    with torch.no_grad():
        for p in rpe.parameters():
            p.add_(0.3 * torch.randn_like(p))
    attn = rope_layer(mode, rpe=rpe, causal=causal)
    x, pos = torch.randn(2, 19, 24, dtype=D64), torch.randn(2, 19, 3, dtype=D64) * 3
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[1, 11:] = True
    torch.testing.assert_close(
        attn(x, pos, key_padding_mask=mask),
        attn.reference(x, pos, key_padding_mask=mask, kernel="features"),
        atol=1e-10,
        rtol=1e-10,
    )
    batch = torch.tensor([0] * 5 + [1] * 9)
    xp, pp = torch.randn(14, 24, dtype=D64), torch.randn(14, 3, dtype=D64)
    torch.testing.assert_close(
        attn(xp, pp, batch), attn.reference(xp, pp, batch), atol=1e-10, rtol=1e-10
    )
    assert_padding_consistent(attn, xp, pp, batch, atol=1e-10, rtol=1e-10)


def test_layer_translation_invariance_mask_mode_exact_for_every_draw():
    """Mask mode: phi(q)^T M(r_j - r_i) phi(k) is relative for every feature draw."""
    x, pos = torch.randn(1, 17, 24, dtype=D64), torch.randn(1, 17, 3, dtype=D64) * 3
    shift = torch.tensor([1e3, -2e3, 5e2], dtype=D64)
    for seed in range(2):
        torch.manual_seed(seed)
        attn = rope_layer("mask", kernel="favor+", center_positions=False)
        assert_translation_invariant(attn, x, pos, shift=shift, atol=1e-9, rtol=1e-9)
        causal = rope_layer("mask", rpe=string(3, 2, 12), causal=True)
        assert_translation_invariant(causal, x, pos, shift=shift, atol=1e-9, rtol=1e-9)


def test_layer_translation_invariance_logit_mode_exact_with_centring_only():
    """Logit mode: a translation t turns the projection W into W M(t) (same law, other
    draw), so without centring the output changes. Measured relative change (RoPE 1D,
    mean of 4 draws): 0.051 / 0.012 / 0.0037 at 16 / 256 / 4096 features."""
    x, pos = torch.randn(1, 30, 32, dtype=D64) * 0.5, torch.randn(1, 30, 1, dtype=D64) * 3
    centred = RPEAttention(32, 2, rpe=RoPE(1, 2, 16), num_features=16).double()
    assert_translation_invariant(centred, x, pos, atol=1e-10, rtol=1e-10)
    errors = []
    for r in (16, 256, 4096):
        trial = []
        for seed in range(4):
            torch.manual_seed(seed)
            attn = RPEAttention(32, 2, rpe=RoPE(1, 2, 16), num_features=r, center_positions=False)
            attn = attn.double()
            a, b = attn(x, pos), attn(x, pos + 7.0)
            trial.append(((a - b).norm() / a.norm()).item())
        errors.append(sum(trial) / len(trial))
    assert errors[0] > errors[1] > errors[2] > 1e-4, errors


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize(
    "make,names",
    [
        (lambda: RoPE(2, 2, 4, learnable=True), ["rotation.theta"]),
        (lambda: STRING(2, 2, 4, learnable=True), ["rotation.theta", "skew_param"]),
    ],
)
def test_gradcheck_reaches_frequencies_and_cayley_parameters(mode, make, names):
    rpe = make()
    assert sorted(n for n, _ in rpe.named_parameters()) == names
    kw = dict(num_features=4) if mode == "logit" else dict(kernel="elu", normalize="none")
    attn = RPEAttention(8, 2, rpe=rpe, mode=mode, **kw).double()
    with torch.no_grad():
        for p in rpe.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x, pos = torch.randn(6, 8, dtype=D64), torch.randn(6, 2, dtype=D64)
    batch = torch.tensor([0, 0, 0, 0, 1, 1])
    params = tuple(dict(rpe.named_parameters())[n].detach().clone().requires_grad_() for n in names)

    def run(*tensors):
        swapped = {f"rpe.{n}": t for n, t in zip(names, tensors, strict=True)}
        return functional_call(attn, swapped, (x, pos, batch))

    assert torch.autograd.gradcheck(run, params)
    attn(x, pos, batch).pow(2).sum().backward()
    for n, p in rpe.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, n


# ---------------------------------------------------------------- bad options


def test_bad_options_raise_value_error_naming_the_option():
    cases = [
        (lambda: RoPE(1, 2, 7), "dim=7"),
        (lambda: RoPE(3, 2, 8), "divisible by 2 \\* pos_dim"),
        (lambda: STRING(2, 2, 6), "divisible by 2 \\* pos_dim"),
        (lambda: RoPE(1, 2, 8, base=0.0), "base"),
        (lambda: RoPE(1, 2, 0), "dim"),
        (lambda: RoPE(0, 2, 8), "pos_dim"),
        (lambda: RPEAttention(32, 2, rpe=RoPE(1, 2, 8)), "dim=8 must equal the head dim 16"),
        (lambda: RoPE(1, 2, 8).featurizer(build_feature_map("elu", 8), 1.0, "logit"), "favor+"),
        (
            lambda: RoPE(1, 2, 8).featurizer(build_feature_map("favor+", 8, 16), 1.0, "mask"),
            "num_features=16",
        ),
        (lambda: RoPE(1, 2, 8).featurizer(build_feature_map("elu", 8), 1.0, "bias"), "mode"),
        (lambda: RoPE(1, 2, 8).transform(torch.randn(3, 2, 6), torch.randn(3, 1)), "transforms x"),
        (lambda: RoPE(1, 2, 8).transform(torch.randn(3, 2, 8), torch.randn(3, 2)), "pos must"),
        (lambda: RoPE(1, 2, 8).pairwise(torch.randn(1, 4, 1)), "rotary_softmax_reference"),
        (
            lambda: rotary_kernel_reference(
                *inputs((1, 3), 8, 1), RoPE(1, 2, 8), build_feature_map("elu", 8), normalize="x"
            ),
            "normalize",
        ),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    # the layer's exact reference dispatches to the functions here: with a deterministic
    # kernel (elu) mask mode has no estimation error at all
    attn = rope_layer("mask")
    x, pos = torch.randn(1, 4, 24, dtype=D64), torch.randn(1, 4, 3, dtype=D64)
    torch.testing.assert_close(attn.reference(x, pos, kernel="exact"), attn(x, pos))
    with pytest.raises(ValueError, match="kernel='features'"):
        rope_layer("mask", kernel="favor+", normalize="none").reference(x, pos, kernel="exact")
