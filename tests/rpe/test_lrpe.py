"""LRPE (unitary, orthogonal, permutation cores; identity, Householder, Fourier, matrix P):
closed-form relative weights, the authors' formulas, engine == quadratic form, the
normalisation choice, RPEAttention contracts, gradients and bad options."""

import math

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from geolinrpe import RPEAttention
from geolinrpe.features import build_feature_map
from geolinrpe.ops import feature_attention, linear_attention, to_padded
from geolinrpe.rpe import RoPE
from geolinrpe.rpe.lrpe import (
    LRPE,
    OrthogonalLRPE,
    PermutationLRPE,
    UnitaryLRPE,
    fixed_p_matrix,
)
from geolinrpe.rpe.rotary import rotary_kernel_reference, rotary_softmax_reference
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64

RPES = {
    "unitary": lambda dim: UnitaryLRPE(1, 2, dim).double(),
    "unitary-2d-learnable": lambda dim: UnitaryLRPE(2, 2, dim, base=100.0, learnable=True).double(),
    "unitary-fourier": lambda dim: UnitaryLRPE(1, 2, dim, p="fourier").double(),
    "orthogonal": lambda dim: OrthogonalLRPE(1, 2, dim).double(),
    "permutation": lambda dim: PermutationLRPE(1, 2, dim, seed=3).double(),
    "permutation-householder": lambda dim: PermutationLRPE(
        1, 2, dim, seed=3, p="householder", householder_learned=True
    ).double(),
}
CONFIGS = [("mask", "elu", "none"), ("mask", "favor+", "none"), ("logit", "favor+", "masked")]


def positions(rpe, lead, scale=3.0):
    """Integer positions for the permutation LRPE, real coordinates otherwise."""
    if isinstance(rpe, PermutationLRPE):
        return torch.randint(-40, 40, (*lead, 1)).to(D64)
    return torch.randn(*lead, rpe.pos_dim, dtype=D64) * scale


def inputs(rpe, lead, heads=2, e=3):
    q, k = (torch.randn(*lead, heads, rpe.dim, dtype=D64) for _ in range(2))
    return q, k, torch.randn(*lead, heads, e, dtype=D64), positions(rpe, lead)


def featurizer(rpe, mode, kernel, num_features=16):
    d = rpe.dim
    if mode == "logit":  # FAVOR+ on the transformed q, k: output_dim inputs (2 d for unitary)
        fm = build_feature_map("favor+", rpe.output_dim, num_features).double()
        return rpe.featurizer(fm, d**-0.25, mode)
    fm = build_feature_map(kernel, d, d).double()  # mask mode: the core acts on the d features
    return rpe.featurizer(fm, d**-0.25 if kernel == "favor+" else 1.0, mode)


# ---------------------------------------------------------------- the maps

# (core, p, householder_learned, extra options): every core with and without Householder P
CLOSED_FORM = [
    ("rotation", "identity", False, {}),
    ("rotation", "householder", False, {}),
    ("rotation", "householder", True, dict(learnable=True)),
    ("rotation", "dct", False, {}),
    ("rotation-odd", "householder", False, {}),
    ("rotation-2d", "householder", False, {}),
    ("permutation", "identity", False, {}),
    ("permutation", "householder", False, {}),
    ("permutation", "householder", True, {}),
    ("unitary", "identity", False, {}),
    ("unitary", "householder", False, {}),
    ("unitary", "householder", True, dict(learnable=True)),
    ("unitary", "fourier", False, {}),
    ("unitary", "odd_even", False, {}),
    ("unitary-2d", "fourier", False, {}),
]


def make_lrpe(core, p, learned, heads=2, dim=8, **options):
    if p in ("dct", "odd_even"):
        p = fixed_p_matrix(p, dim)
    kw = dict(p=p, householder_learned=learned, **options)
    if core.startswith("rotation"):
        pos_dim = 2 if core.endswith("2d") else 1
        dim = dim - 1 if core.endswith("odd") else dim
        if not isinstance(p, str):
            kw["p"] = fixed_p_matrix("dct", dim)
        rpe = OrthogonalLRPE(pos_dim, heads, dim, **kw)
    elif core == "permutation":
        rpe = PermutationLRPE(1, heads, dim, **kw)
    else:
        rpe = UnitaryLRPE(2 if core.endswith("2d") else 1, heads, dim, **kw)
    rpe = rpe.double()
    with torch.no_grad():  # frequencies away from the defaults, as after training
        if hasattr(rpe, "theta"):
            rpe.set_theta(rpe.theta * (1 + 0.5 * torch.rand_like(rpe.theta)))
    return rpe


def p_closed_form(rpe):
    """``P [h, d, d]`` (complex) from the stored parameters, without calling the module."""
    h, d = rpe.num_heads, rpe.dim
    eye = torch.eye(d, dtype=D64)
    if rpe.p_kind == "identity":
        p = eye.expand(h, d, d)
    elif rpe.p_kind == "householder":
        v = rpe.householder.detach()
        if rpe.householder_learned:
            v = v / (v.norm(dim=-1, keepdim=True) + 1e-6)
        p = eye - 2 * v[:, :, None] * v[:, None, :]
    elif rpe.p_kind == "fourier":
        j = torch.arange(d, dtype=D64)
        p = torch.exp(-2j * math.pi * j[:, None] * j[None, :] / d) / math.sqrt(d)
        return p.expand(h, d, d)
    else:
        p = rpe.p_matrix
    return p.to(torch.complex128)


def core_closed_form(rpe, delta):
    """``Lambda_delta [..., h, d, d]`` (complex) for displacements ``delta [..., p]``."""
    h, d = rpe.num_heads, rpe.dim
    if isinstance(rpe, PermutationLRPE):  # (Q y)_j = y_sigma(j): Q = I[sigma]
        mats = []
        for s in delta[..., 0].long().reshape(-1).tolist():
            q = torch.eye(d, dtype=D64)[rpe.permutation]  # [h, d, d]
            mats.append(torch.linalg.matrix_power(q if s >= 0 else q.transpose(-1, -2), abs(s)))
        return torch.stack(mats).reshape(*delta.shape[:-1], h, d, d).to(torch.complex128)
    theta = rpe.theta.detach()
    angle = delta[..., rpe.axis].unsqueeze(-2) * theta  # [..., h, m]
    if isinstance(rpe, UnitaryLRPE):
        return torch.diag_embed(torch.exp(1j * angle.to(torch.complex128)))
    out = torch.zeros(*angle.shape[:-1], d, d, dtype=D64)
    out[...] = torch.eye(d, dtype=D64)
    c, s = torch.cos(angle), torch.sin(angle)
    k = torch.arange(angle.shape[-1])
    out[..., 2 * k, 2 * k], out[..., 2 * k + 1, 2 * k + 1] = c, c
    out[..., 2 * k, 2 * k + 1], out[..., 2 * k + 1, 2 * k] = -s, s
    return out.to(torch.complex128)


@pytest.mark.parametrize("core,p,learned,options", CLOSED_FORM)
def test_weights_are_the_closed_form_and_depend_on_t_minus_s_only(core, p, learned, options):
    """``<T_s a, T_t b> = Re (P a)^H Lambda_(t-s) (P b)`` in float64, for every core and P."""
    torch.manual_seed(0)
    rpe = make_lrpe(core, p, learned, **options)
    assert isinstance(rpe, LRPE)
    a, b = torch.randn(2, 30, 2, rpe.dim, dtype=D64)
    rs, rt = positions(rpe, (2, 30))
    got = (rpe.transform(a, rs) * rpe.transform(b, rt)).sum(-1)
    p_mat = p_closed_form(rpe)
    pa = torch.einsum("hde,...he->...hd", p_mat, a.to(torch.complex128))
    pb = torch.einsum("hde,...he->...hd", p_mat, b.to(torch.complex128))
    lam = core_closed_form(rpe, rt - rs)
    want = torch.einsum("...hd,...hde,...he->...h", pa.conj(), lam, pb).real
    torch.testing.assert_close(got, want, atol=1e-12, rtol=0)
    assert rpe.transform(a, rs).shape[-1] == rpe.output_dim
    integer = isinstance(rpe, PermutationLRPE)
    t = positions(rpe, (), scale=10.0) * (1000 if integer else 1)
    moved = (rpe.transform(a, rs + t) * rpe.transform(b, rt + t)).sum(-1)
    torch.testing.assert_close(moved, got, atol=1e-11, rtol=0)


def test_unitary_is_exp_i_theta_s_with_real_and_imaginary_parts_side_by_side():
    """The paper's unitary solution, not RoPE: d frequencies, output [Re, Im] (2 d reals)."""
    theta = torch.tensor([0.7, -1.3, 2.0], dtype=D64)
    x = torch.randn(4, 1, 3, dtype=D64)
    s = torch.tensor([[0.0], [1.0], [5.0], [-2.5]], dtype=D64)
    phase = torch.exp(1j * theta * s[:, :, None])
    for p, z in (("identity", x.to(torch.complex128)), ("fourier", torch.fft.fft(x, norm="ortho"))):
        rpe = UnitaryLRPE(1, 1, 3, theta=theta, p=p).double()
        rpe.reset_parameters()  # theta is stored in the module's dtype: float64 values now
        got = rpe.transform(x, s)
        assert got.shape == (4, 1, 6) and rpe.output_dim == 6
        torch.testing.assert_close(torch.complex(got[..., :3], got[..., 3:]), z * phase)
    default = UnitaryLRPE(1, 2, 8)
    torch.testing.assert_close(default.theta[1], 10000.0 ** (-2 * torch.arange(8.0) / 8))
    assert not any(True for _ in default.parameters())  # fixed theta: a buffer
    assert "theta" in default.state_dict()


def test_orthogonal_is_rotation_after_p_and_keeps_the_old_h_r_h_weights():
    rpe = OrthogonalLRPE(1, 2, 6).double()  # fixed unit v: H is exactly a reflection
    rpe.reset_parameters()
    rpe.set_theta(RoPE(1, 2, 6).rotation.frequencies(D64))  # RoPE's, in float64
    v = rpe.householder_vector().detach()
    h = torch.eye(6, dtype=D64) - 2 * torch.einsum("hd,he->hde", v, v)
    x, y = torch.randn(2, 5, 2, 6, dtype=D64)
    s, t = torch.randn(2, 5, 1, dtype=D64) * 4
    rope = RoPE(1, 2, 6).double()
    hx = torch.einsum("hde,nhe->nhd", h, x)
    torch.testing.assert_close(rpe.transform(x, s), rope.transform(hx, s), atol=1e-12, rtol=0)
    # the earlier form H R_s H x gives the same weights (H^T H = I)
    old = [
        torch.einsum("hde,nhe->nhd", h, rope.transform(torch.einsum("hde,nhe->nhd", h, z), r))
        for z, r in ((x, s), (y, t))
    ]
    new = (rpe.transform(x, s) * rpe.transform(y, t)).sum(-1)
    torch.testing.assert_close((old[0] * old[1]).sum(-1), new, atol=1e-12, rtol=0)
    # odd d: the last coordinate is not turned (the authors' e = d - 1)
    odd = OrthogonalLRPE(1, 2, 7, p="identity").double()
    odd.reset_parameters()
    z = torch.randn(5, 2, 7, dtype=D64)
    assert torch.equal(odd.transform(z, s)[..., 6], z[..., 6])
    torch.testing.assert_close(odd.theta[0], 10000.0 ** (-2 * torch.arange(3.0, dtype=D64) / 6))


def test_fixed_p_matrices_are_the_authors_dct_and_odd_even():
    d = 7
    dct = fixed_p_matrix("dct", d)
    torch.testing.assert_close(dct @ dct.T, torch.eye(d, dtype=D64))
    x = torch.randn(3, d, dtype=D64)
    n = torch.arange(d, dtype=D64)
    want = torch.stack(  # DCT-II, orthonormal: sum_n x_n cos(pi (2n + 1) k / 2d) * scale_k
        [(x * torch.cos(math.pi * (2 * n + 1) * k / (2 * d))).sum(-1) for k in range(d)], -1
    )
    want = want * torch.tensor([math.sqrt(1 / d)] + [math.sqrt(2 / d)] * (d - 1), dtype=D64)
    torch.testing.assert_close(x @ dct.T, want)
    odd_even = fixed_p_matrix("odd_even", d)  # 2k -> x_k, 2k + 1 -> x_(4 + k)
    assert (x @ odd_even.T)[:, [0, 1, 2, 3, 4, 5, 6]].equal(x[:, [0, 4, 1, 5, 2, 6, 3]])


def test_permutation_powers_follow_the_cycles():
    rpe = PermutationLRPE(1, 2, 9, seed=0)
    sigma = rpe.permutation
    x = torch.randn(2, 9, dtype=D64)
    one = rpe.transform(x[None], torch.ones(1, 1, dtype=D64))[0]
    torch.testing.assert_close(one, torch.gather(x, -1, sigma), atol=0, rtol=0)  # x_sigma(j)
    minus = rpe.transform(x[None], -torch.ones(1, 1, dtype=D64))[0]
    assert torch.equal(torch.gather(minus, -1, sigma), x)  # P^-1 P = I
    period = [math.lcm(*rpe.cycle_length[h].tolist()) for h in range(2)]
    steps = torch.tensor([[0.0], [float(period[0] * 7)], [12345.0], [-9876.0]], dtype=D64)
    moved = rpe.transform(x.expand(4, 2, 9), steps)
    assert torch.equal(moved[1, 0], x[0])  # P^(period) = I
    brute = x.clone()
    for _ in range(12345):
        brute = torch.gather(brute, -1, sigma)
    assert torch.equal(moved[2], brute)
    # the same seed gives the same permutation; redraw keeps it (it is part of the model)
    again = PermutationLRPE(1, 2, 9, seed=0)
    again.redraw()
    assert torch.equal(again.permutation, sigma)
    other = PermutationLRPE(1, 2, 9, seed=1)
    assert not torch.equal(other.transform(x.expand(4, 2, 9), steps), moved)
    other.load_state_dict(rpe.state_dict())  # the cycle tables travel with the permutation
    assert torch.equal(other.transform(x.expand(4, 2, 9), steps), moved)


def test_permutation_is_settable_and_matches_the_authors_table():
    """``expanded[s] = expanded[s-1].gather(-1, sigma)``, ``x_s = x.gather(-1, expanded[s])``."""
    sigma = torch.tensor([3, 0, 4, 1, 2, 6, 5])
    table = [torch.arange(7)]
    for _ in range(30):
        table.append(table[-1].gather(-1, sigma))
    x = torch.randn(31, 2, 7, dtype=D64)
    s = torch.arange(31, dtype=D64)[:, None]
    want = torch.stack([x[i].gather(-1, table[i].expand(2, 7)) for i in range(31)])
    built = PermutationLRPE(1, 2, 7, permutation=sigma)
    assert torch.equal(built.transform(x, s), want)
    built.reset_parameters()  # a given permutation is kept
    assert torch.equal(built.permutation, sigma.expand(2, 7))
    drawn = PermutationLRPE(1, 2, 7, seed=5)
    drawn.set_permutation(torch.stack([sigma, torch.arange(7)]))  # per head
    assert torch.equal(drawn.transform(x, s)[:, 0], want[:, 0])
    assert torch.equal(drawn.transform(x, s)[:, 1], x[:, 1])
    drawn.set_permutation(sigma)
    assert torch.equal(drawn.transform(x, s), want)


# ---------------------------------------------------------------- engine == quadratic form


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("mode,kernel,normalize", CONFIGS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,chunk", [(37, None), (63, 7), (50, 16)])  # one chunk, divides, not
def test_engine_matches_quadratic_form_dense(name, mode, kernel, normalize, causal, n, chunk):
    rpe = RPES[name](8)
    feat = featurizer(rpe, mode, kernel)
    q, k, v, pos = inputs(rpe, (2, n))
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
    rpe = RPES[name](8)
    feat = featurizer(rpe, mode, kernel)
    sizes = [1, 9, 20, 2]
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    q, k, v, pos = inputs(rpe, (sum(sizes),))
    kw = dict(featurizer=feat, causal=causal, normalize=normalize)
    packed = linear_attention(q, k, v, pos, batch=batch, chunk_size=5, **kw)
    torch.testing.assert_close(
        packed, feature_attention(q, k, v, pos, batch=batch, **kw), atol=1e-10, rtol=1e-10
    )
    dq, mask = to_padded(q, batch)  # zero padding: integer positions stay integer
    dk, dv, dpos = (to_padded(t, batch)[0] for t in (k, v, pos))
    dense = linear_attention(dq, dk, dv, dpos, key_padding_mask=mask, **kw)
    torch.testing.assert_close(dense[~mask], packed, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("causal", [False, True])
def test_mask_mode_equals_the_relative_kernel_reference(name, causal):
    """1+ELU features (the paper's), rotated: engine == sum_t phi_s^T M_(t-s) phi_t v_t."""
    rpe = RPES[name](8)
    feat = featurizer(rpe, "mask", "elu")
    q, k, v, pos = inputs(rpe, (2, 21))
    mask = torch.zeros(2, 21, dtype=torch.bool)
    mask[0, 15:] = True
    layout = dict(key_padding_mask=mask, causal=causal)
    for normalize in ("none", "masked"):
        fast = linear_attention(q, k, v, pos, featurizer=feat, normalize=normalize, **layout)
        exact = rotary_kernel_reference(
            q, k, v, pos, rpe, feat.feature_map, normalize=normalize, **layout
        )
        torch.testing.assert_close(fast, exact, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("name", ["orthogonal", "permutation"])
def test_logit_mode_approaches_the_exact_softmax(name):
    """Relative error vs rotary_softmax_reference (mean of 3 draws, q, k ~ 0.5 N(0, 1),
    30 tokens): measured 0.35 / 0.11 / 0.038 (orthogonal) at 16 / 256 / 4096 features."""
    errors = []
    for r in (16, 256, 4096):
        trial = []
        for seed in range(3):
            torch.manual_seed(seed)
            rpe = RPES[name](8)
            q, k, v, pos = inputs(rpe, (1, 30))
            q, k = q * 0.5, k * 0.5
            out = linear_attention(q, k, v, pos, featurizer=featurizer(rpe, "logit", "favor+", r))
            exact = rotary_softmax_reference(q, k, v, pos, rpe)
            trial.append(((out - exact).norm() / exact.norm()).item())
        errors.append(sum(trial) / len(trial))
    assert errors[0] > errors[1] > errors[2], errors
    assert errors[0] / errors[2] > 5 and errors[2] < 0.06, errors


# ---------------------------------------------------------------- normalisation


def test_masked_denominator_of_rotated_features_vanishes_so_lrpe_uses_none():
    """Tokens at 0, 1, 2 and a pair frequency 2 pi / 3: the signed weights of query 0 are
    cos(0), cos(2 pi/3), cos(4 pi/3) = 1, -1/2, -1/2, whose sum (the "masked" denominator)
    is 0. The unrotated denominator stays positive; "none" is the plain weighted sum."""
    rpe = OrthogonalLRPE(1, 1, 2, learnable=True, p="identity").double()
    with torch.no_grad():
        rpe.theta.fill_(2 * math.pi / 3)
    feat = rpe.featurizer(build_feature_map("identity", 2).double(), 1.0, "mask")
    q = k = torch.tensor([1.0, 0.0], dtype=D64).expand(1, 3, 1, 2)
    v = torch.tensor([0.0, 1.0, 2.0], dtype=D64).view(1, 3, 1, 1)
    pos = torch.arange(3, dtype=D64).view(1, 3, 1)
    phi = feat.query(q, pos).phi
    den = torch.einsum("bihr,bjhr->bhi", phi, phi)
    assert abs(den[0, 0, 0].item()) < 1e-15
    none = linear_attention(q, k, v, pos, featurizer=feat, normalize="none")
    torch.testing.assert_close(none[0, 0, 0, 0], torch.tensor(-1.5, dtype=D64))  # -1/2 - 1
    fm = build_feature_map("identity", 2).double()
    kernel = rotary_kernel_reference(q, k, v, pos, rpe, fm, normalize="kernel")
    torch.testing.assert_close(kernel[0, 0, 0, 0], torch.tensor(-0.5, dtype=D64))  # -1.5 / 3


def test_masked_denominators_change_sign_on_random_inputs_with_high_frequencies():
    """1+ELU features, 64 integer positions, d = 16: with the default RoPE frequencies no
    row's masked denominator was <= 0 (min 0.14 x the unrotated one at n = 128), with
    frequencies ~ U(0, pi) (reachable by learning) 49% of rows were <= 0."""
    rpe = OrthogonalLRPE(1, 4, 16, learnable=True, p="identity").double()
    rpe.reset_parameters()
    fm = build_feature_map("elu", 16).double()
    q, k = torch.randn(2, 2, 64, 4, 16, dtype=D64)
    pos = torch.arange(64, dtype=D64).view(1, 64, 1).expand(2, 64, 1)

    def denominators():
        phi_q, phi_k = rpe.transform(fm(q)[0], pos), rpe.transform(fm(k)[0], pos)
        return torch.einsum("bihr,bjhr->bhi", phi_q, phi_k)

    assert denominators().min() > 0
    with torch.no_grad():
        rpe.theta.uniform_(0, math.pi)
    assert (denominators() <= 0).double().mean() > 0.2


# ---------------------------------------------------------------- RPEAttention


def lrpe_layer(rpe, mode="mask", **kw):
    options = dict(num_features=rpe.dim, chunk_size=8)
    if mode == "mask":
        options.update(kernel="elu", normalize="none")
    if isinstance(rpe, PermutationLRPE):
        options.update(center_positions=False)  # centring makes positions fractional
    options.update(kw)
    return RPEAttention(2 * 8, 2, rpe=rpe, mode=mode, **options).double()


@pytest.mark.parametrize("name", list(RPES))
@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_forward_equals_feature_reference(name, mode, causal):
    rpe = RPES[name](8)
    attn = lrpe_layer(rpe, mode, causal=causal)
    x, pos = torch.randn(2, 19, 16, dtype=D64), positions(rpe, (2, 19))
    mask = torch.zeros(2, 19, dtype=torch.bool)
    mask[1, 11:] = True
    torch.testing.assert_close(
        attn(x, pos, key_padding_mask=mask),
        attn.reference(x, pos, key_padding_mask=mask, kernel="features"),
        atol=1e-10,
        rtol=1e-10,
    )
    batch = torch.tensor([0] * 5 + [1] * 9)
    xp, pp = torch.randn(14, 16, dtype=D64), positions(rpe, (14,))
    torch.testing.assert_close(
        attn(xp, pp, batch), attn.reference(xp, pp, batch), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("name", list(RPES))
def test_layer_translation_invariance(name):
    """Mask mode: exact for every draw without centring (integer shifts for permutations).
    Logit mode: exact with the layer's centring (not for permutations: see bad options)."""
    rpe = RPES[name](8)
    x, pos = torch.randn(1, 17, 16, dtype=D64), positions(rpe, (1, 17))
    shift = torch.full((rpe.pos_dim,), 1000.0 if isinstance(rpe, PermutationLRPE) else 123.4)
    shift = shift.to(D64)
    for causal in (False, True):
        attn = lrpe_layer(rpe, "mask", center_positions=False, causal=causal)
        assert_translation_invariant(attn, x, pos, shift=shift, atol=1e-9, rtol=1e-9)
    if isinstance(rpe, PermutationLRPE):
        attn = lrpe_layer(rpe, "mask", kernel="favor+")
        assert_translation_invariant(attn, x, pos, shift=shift, atol=1e-12, rtol=1e-12)
    else:
        attn = lrpe_layer(rpe, "logit")
        assert_translation_invariant(attn, x, pos, shift=shift, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize(
    "make,names",
    [
        (lambda: UnitaryLRPE(1, 2, 4, learnable=True), ["theta"]),
        (
            lambda: UnitaryLRPE(1, 2, 4, learnable=True, p="householder", householder_learned=True),
            ["householder", "theta"],
        ),
        (
            lambda: OrthogonalLRPE(1, 2, 4, learnable=True, householder_learned=True),
            ["householder", "theta"],
        ),
        (
            lambda: PermutationLRPE(1, 2, 4, p="householder", householder_learned=True),
            ["householder"],
        ),
    ],
)
def test_gradcheck_reaches_theta_and_householder_vector(mode, make, names):
    rpe = make()
    assert sorted(n for n, _ in rpe.named_parameters()) == names
    kw = dict(num_features=4) if mode == "logit" else dict(kernel="elu", normalize="none")
    x, pos = torch.randn(6, 8, dtype=D64), torch.randn(6, 1, dtype=D64) * 2
    if isinstance(rpe, PermutationLRPE):  # integer positions, kept integer
        pos, kw["center_positions"] = pos.round(), False
    attn = RPEAttention(8, 2, rpe=rpe, mode=mode, **kw).double()
    if hasattr(rpe, "theta"):
        with torch.no_grad():
            rpe.theta.add_(0.3 * torch.randn_like(rpe.theta))
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
    integer = torch.arange(4, dtype=D64).view(1, 4, 1)
    x = torch.randn(1, 4, 2, 8, dtype=D64)
    cases = [
        (lambda: UnitaryLRPE(2, 2, 7), "divisible by pos_dim"),
        (lambda: OrthogonalLRPE(2, 2, 6), "divisible by 2 \\* pos_dim"),
        (lambda: OrthogonalLRPE(1, 2, 1), "dim >= 2"),
        (lambda: OrthogonalLRPE(1, 2, 6, p="fourier"), "only the unitary core"),
        (lambda: PermutationLRPE(1, 2, 6, p="fourier"), "only the unitary core"),
        (lambda: UnitaryLRPE(1, 2, 6, p="dct"), "p must be one of"),
        (lambda: UnitaryLRPE(1, 2, 6, p=torch.eye(5)), "p must have shape"),
        (lambda: UnitaryLRPE(1, 2, 6, p=torch.eye(6, dtype=torch.long)), "real floating"),
        (lambda: UnitaryLRPE(1, 2, 6, householder_learned=True), "needs p='householder'"),
        (lambda: UnitaryLRPE(1, 2, 6).set_householder(torch.ones(6)), "needs p='householder'"),
        (lambda: OrthogonalLRPE(1, 2, 6).set_householder(torch.zeros(6)), "nonzero"),
        (lambda: OrthogonalLRPE(1, 2, 6).set_theta(torch.ones(6)), "theta must have shape"),
        (lambda: UnitaryLRPE(1, 2, 6, theta=torch.ones(3)), "theta must have shape"),
        (lambda: PermutationLRPE(1, 2, 4, permutation=torch.tensor([0, 0, 1, 2])), "once"),
        (lambda: PermutationLRPE(1, 2, 4, permutation=torch.arange(4.0)), "integer tensor"),
        (lambda: PermutationLRPE(1, 2, 4).set_permutation(torch.arange(5)), "shape"),
        (lambda: fixed_p_matrix("hadamard", 4), "kind"),
        (lambda: UnitaryLRPE(1, 2, 8, base=-1.0), "base"),
        (lambda: PermutationLRPE(2, 2, 8), "pos_dim=1"),
        (lambda: PermutationLRPE(1, 2, 0), "dim"),
        (lambda: PermutationLRPE(1, 2, 8).transform(x, integer + 0.5), "integer positions"),
        (lambda: PermutationLRPE(1, 2, 8).pairwise(integer), "rotary_kernel_reference"),
        (lambda: UnitaryLRPE(1, 2, 8).pairwise(integer), "no scalar f"),
        (
            lambda: UnitaryLRPE(1, 2, 8).featurizer(build_feature_map("favor+", 8), 1.0, "logit"),
            "maps vectors of dim=8 to 16",
        ),
        (
            lambda: UnitaryLRPE(1, 2, 8).featurizer(build_feature_map("elu", 16), 1.0, "mask"),
            "num_features=16",
        ),
    ]
    for make, match in cases:
        with pytest.raises(ValueError, match=match):
            make()
    # RPEAttention centres integer positions by a rounded mean: they stay integers, and
    # fractional positions are rejected
    attn = RPEAttention(16, 2, rpe=PermutationLRPE(1, 2, 8), mode="mask", kernel="elu")
    assert torch.isfinite(
        attn(torch.randn(1, 4, 16), torch.tensor([[[0.0], [1.0], [2.0], [4.0]]]))
    ).all()
    with pytest.raises(ValueError, match="integer positions"):
        attn(torch.randn(1, 4, 16), torch.tensor([[[0.0], [1.5], [2.0], [4.0]]]))


# ---------------------------------------------------------------- the authors' formulas


def authors_lrpe(x, core, theta=None, v=None, v_learned=False, sigma=None, p="identity"):
    """Our own float64 transcription of the authors' ``Lrpe.forward`` = ``core(P x)``.

    ``x [B, l, e]`` (their ``(N h, L, d)`` layout), positions ``0 .. l-1``, one parameter set
    for all heads. Written from the formulas, not from their code.
    """
    length, d = x.shape[-2:]
    real = x.real.dtype
    theta = None if theta is None else theta.to(real)
    if p == "householder":
        v = v.to(real)
        u = v / (v.norm() + 1e-6) if v_learned else v
        x = x - 2 * (x @ u)[..., None] * u
    elif p == "fourier":
        x = torch.fft.fft(x, norm="ortho")
    s = torch.arange(length, dtype=real)[:, None]
    if core == "rotation":  # (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); odd d: last kept
        e = d - d % 2
        a, b = x[..., 0:e:2], x[..., 1:e:2]
        c, sn = torch.cos(s * theta), torch.sin(s * theta)
        pairs = torch.stack([a * c - b * sn, b * c + a * sn], -1).flatten(-2)
        return torch.cat([pairs, x[..., e:]], -1)
    if core == "permutation":  # table[s] = table[s - 1][sigma]; x_s = x[table[s]]
        table = [torch.arange(d)]
        for _ in range(length - 1):
            table.append(table[-1][sigma])
        return x.gather(-1, torch.stack(table).expand_as(x))
    z = x if x.is_complex() else torch.complex(x, torch.zeros_like(x))
    z = z * torch.exp(1j * s * theta)  # complex exp: one frequency per coordinate
    return torch.cat([z.real, z.imag], -1)


def authors_attention(x, params, heads, causal, lrpe):
    """NormLinearAttention: 1+elu -> lrpe -> unnormalised attention -> LayerNorm -> out."""
    b, length, c = x.shape
    d = c // heads
    q, k, v = (x @ params["qkv.weight"].T + params["qkv.bias"]).chunk(3, -1)
    q, k, v = (
        t.reshape(b, length, heads, d).transpose(1, 2).reshape(b * heads, length, d)
        for t in (q, k, v)
    )
    q, k = lrpe(1 + F.elu(q)), lrpe(1 + F.elu(k))
    if causal:
        out = (q @ k.transpose(1, 2) * torch.ones(length, length, dtype=x.dtype).tril()) @ v
    else:
        out = q @ (k.transpose(1, 2) @ v)
    out = out.reshape(b, heads, length, d).transpose(1, 2).reshape(b, length, c)
    out = F.layer_norm(out, (c,), params["output_norm.weight"], params["output_norm.bias"], 1e-5)
    return out @ params["out.weight"].T + params["out.bias"]


AUTHORS = [
    ("rotation", "identity", False),
    ("rotation", "householder", False),
    ("rotation", "householder", True),
    ("rotation-odd", "householder", False),
    ("permutation", "identity", False),
    ("permutation", "householder", False),
    ("permutation", "householder", True),
    ("unitary", "identity", False),
    ("unitary", "householder", False),
    ("unitary", "householder", True),
    ("unitary", "fourier", False),
]


def authors_case(core, p, learned, causal, float32=False, seed=0):
    """Their parameters (shared by the heads), their output in float64, and our layer
    loaded with them: ``RPEAttention(mode="mask", kernel="elu", normalize="none",
    output_norm="layernorm")``. ``float32``: every parameter and input is a float32 value
    (a float32 checkpoint), so the comparison measures the arithmetic only."""
    gen = torch.Generator().manual_seed(seed)

    def values(t):
        return t.float().double() if float32 else t

    heads, d, length = 2, 7 if core.endswith("odd") else 8, 23
    c = heads * d
    theta = torch.rand(
        d if core == "unitary" else d // 2, generator=gen, dtype=D64
    )  # (0, 1), as base^(-2k/d)
    v = torch.randn(d, generator=gen, dtype=D64)
    theta, v = values(theta), values(v if learned else v / v.norm())
    sigma = torch.randperm(d, generator=gen)
    options = dict(p=p, householder_learned=learned)
    if core.startswith("rotation"):
        rpe = OrthogonalLRPE(1, heads, d, **options)
    elif core == "permutation":
        rpe = PermutationLRPE(1, heads, d, permutation=sigma, **options)
    else:
        rpe = UnitaryLRPE(1, heads, d, **options)
    layer = RPEAttention(
        c,
        heads,
        rpe=rpe,
        mode="mask",
        kernel="elu",
        normalize="none",
        causal=causal,
        output_norm="layernorm",
    ).double()
    params = {
        name: torch.randn(t.shape, generator=gen, dtype=D64) / math.sqrt(c)
        for name, t in layer.named_parameters()
        if not name.startswith("rpe.")
    }
    params["output_norm.weight"] = params["output_norm.weight"] * math.sqrt(c)  # ~ N(0, 1)
    params = {name: values(value) for name, value in params.items()}
    with torch.no_grad():
        for name, value in params.items():
            layer.get_parameter(name).copy_(value)
        if hasattr(rpe, "theta"):
            rpe.set_theta(theta)  # [m]: repeated per head
        if p == "householder":
            rpe.set_householder(v)
    x = values(torch.randn(2, length, c, generator=gen, dtype=D64))
    key = "rotation" if core.startswith("rotation") else core

    def lrpe(t):
        return authors_lrpe(t, key, theta=theta, v=v, v_learned=learned, sigma=sigma, p=p)

    want = authors_attention(x, params, heads, causal, lrpe)
    pos = torch.arange(length, dtype=D64).view(1, length, 1).expand(2, length, 1)
    return layer, x, pos, want


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("core,p,learned", AUTHORS)
def test_layer_equals_the_authors_norm_linear_attention(core, p, learned, causal):
    """float64: 1e-10 (engine and explicit form; positions centred as the layer does by
    default when not causal, which relative encodings ignore). float32 layer (float32
    parameters and inputs) vs the float64 transcription: max|a - b| / max|b| measured at most
    9.3e-7 over these cases (unitary + Fourier, causal), the same as the transcription itself
    run in float32 (9.0e-7; float32 angles up to 22 rad); asserted <= 2e-6."""
    layer, x, pos, want = authors_case(core, p, learned, causal)
    for quadratic_below in (None, 0):  # explicit O(n^2) form, chunked engine
        layer.quadratic_below = quadratic_below
        layer.chunk_size = 8
        torch.testing.assert_close(layer(x, pos), want, atol=1e-10, rtol=1e-10)
    torch.testing.assert_close(layer.reference(x, pos), want, atol=1e-10, rtol=1e-10)
    layer, x, pos, want = authors_case(core, p, learned, causal, float32=True)
    got = layer.float()(x.float(), pos.float()).double()
    assert ((got - want).abs().max() / want.abs().max()).item() <= 2e-6
