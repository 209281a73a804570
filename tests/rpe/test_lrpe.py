"""LRPE (unitary, orthogonal, permutation): relative-only maps, engine == quadratic form,
the normalisation choice, RPEAttention contracts, gradients and bad options."""

import math

import pytest
import torch
from torch.func import functional_call

from geolinrpe import RPEAttention
from geolinrpe.features import build_feature_map
from geolinrpe.ops import feature_attention, linear_attention, to_padded
from geolinrpe.rpe.lrpe import LRPE, OrthogonalLRPE, PermutationLRPE, UnitaryLRPE
from geolinrpe.rpe.rotary import rotary_kernel_reference, rotary_softmax_reference
from geolinrpe.testing import assert_translation_invariant

D64 = torch.float64

RPES = {
    "unitary": lambda dim: UnitaryLRPE(1, 2, dim).double(),
    "unitary-2d-learnable": lambda dim: UnitaryLRPE(2, 2, dim, base=100.0, learnable=True).double(),
    "orthogonal": lambda dim: OrthogonalLRPE(1, 2, dim).double(),
    "permutation": lambda dim: PermutationLRPE(1, 2, dim, seed=3).double(),
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
    if mode == "logit":
        return rpe.featurizer(build_feature_map("favor+", d, num_features).double(), d**-0.25, mode)
    fm = build_feature_map(kernel, d, d).double()  # mask mode: M acts on the d features
    return rpe.featurizer(fm, d**-0.25 if kernel == "favor+" else 1.0, mode)


# ---------------------------------------------------------------- the maps


@pytest.mark.parametrize("name", list(RPES))
def test_inner_products_depend_on_relative_positions_only(name):
    rpe = RPES[name](8)
    assert isinstance(rpe, LRPE)
    a, b = torch.randn(2, 50, 2, 8, dtype=D64)
    ri, rj = positions(rpe, (2, 50))
    want = (rpe.transform(a, ri) * rpe.transform(b, rj)).sum(-1)
    integer = isinstance(rpe, PermutationLRPE)
    for _ in range(3):
        t = positions(rpe, (), scale=10.0) * (1000 if integer else 1)
        moved = (rpe.transform(a, ri + t) * rpe.transform(b, rj + t)).sum(-1)
        torch.testing.assert_close(moved, want, atol=1e-12, rtol=0)
    # M_s^T M_t = M_(t-s), M_s M_t = M_(s+t), |M_s a| = |a|, M_0 = I
    torch.testing.assert_close((a * rpe.transform(b, rj - ri)).sum(-1), want, atol=1e-12, rtol=0)
    composed = rpe.transform(rpe.transform(a, ri), rj)
    torch.testing.assert_close(composed, rpe.transform(a, ri + rj), atol=1e-12, rtol=0)
    torch.testing.assert_close(rpe.transform(a, ri).norm(dim=-1), a.norm(dim=-1))
    torch.testing.assert_close(rpe.transform(a, torch.zeros_like(ri)), a, atol=1e-13, rtol=0)


def test_unitary_is_exp_i_theta_s_on_complex_feature_pairs():
    rpe = UnitaryLRPE(1, 1, 6, learnable=True).double()
    with torch.no_grad():
        rpe.rotation.theta.copy_(torch.tensor([[0.7, -1.3, 2.0]], dtype=D64))
    x = torch.randn(4, 1, 6, dtype=D64)
    s = torch.tensor([[0.0], [1.0], [5.0], [-2.5]], dtype=D64)
    z = torch.complex(x[..., 0::2], x[..., 1::2])
    want = z * torch.exp(1j * torch.tensor([0.7, -1.3, 2.0], dtype=D64) * s[:, :, None])
    got = rpe.transform(x, s)
    torch.testing.assert_close(torch.complex(got[..., 0::2], got[..., 1::2]), want)


def test_orthogonal_is_householder_conjugated_rotation():
    rpe = OrthogonalLRPE(1, 2, 6).double()
    u = rpe.householder.detach()
    u = u / u.norm(dim=-1, keepdim=True)
    h = torch.eye(6, dtype=D64) - 2 * torch.einsum("hd,he->hde", u, u)
    torch.testing.assert_close(h @ h, torch.eye(6, dtype=D64).expand(2, 6, 6))
    x = torch.randn(5, 2, 6, dtype=D64)
    s = torch.randn(5, 1, dtype=D64) * 4
    rotated = UnitaryLRPE(1, 2, 6).double().transform(torch.einsum("hde,nhe->nhd", h, x), s)
    torch.testing.assert_close(
        rpe.transform(x, s), torch.einsum("hde,nhe->nhd", h, rotated), atol=1e-12, rtol=0
    )
    torch.testing.assert_close(rpe.reflect(rpe.reflect(x)), x)


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
    rpe = UnitaryLRPE(1, 1, 2, learnable=True).double()
    with torch.no_grad():
        rpe.rotation.theta.fill_(2 * math.pi / 3)
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
    rpe = UnitaryLRPE(1, 4, 16, learnable=True).double()
    fm = build_feature_map("elu", 16).double()
    q, k = torch.randn(2, 2, 64, 4, 16, dtype=D64)
    pos = torch.arange(64, dtype=D64).view(1, 64, 1).expand(2, 64, 1)

    def denominators():
        phi_q, phi_k = rpe.transform(fm(q)[0], pos), rpe.transform(fm(k)[0], pos)
        return torch.einsum("bihr,bjhr->bhi", phi_q, phi_k)

    assert denominators().min() > 0
    with torch.no_grad():
        rpe.rotation.theta.uniform_(0, math.pi)
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
        (lambda: UnitaryLRPE(1, 2, 4, learnable=True), ["rotation.theta"]),
        (lambda: OrthogonalLRPE(1, 2, 4, learnable=True), ["householder", "rotation.theta"]),
    ],
)
def test_gradcheck_reaches_theta_and_householder_vector(mode, make, names):
    rpe = make()
    assert sorted(n for n, _ in rpe.named_parameters()) == names
    kw = dict(num_features=4) if mode == "logit" else dict(kernel="elu", normalize="none")
    attn = RPEAttention(8, 2, rpe=rpe, mode=mode, **kw).double()
    with torch.no_grad():
        rpe.rotation.theta.add_(0.3 * torch.randn_like(rpe.rotation.theta))
    x, pos = torch.randn(6, 8, dtype=D64), torch.randn(6, 1, dtype=D64) * 2
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
        (lambda: UnitaryLRPE(1, 2, 7), "dim=7"),
        (lambda: OrthogonalLRPE(2, 2, 6), "divisible by 2 \\* pos_dim"),
        (lambda: UnitaryLRPE(1, 2, 8, base=-1.0), "base"),
        (lambda: PermutationLRPE(2, 2, 8), "pos_dim=1"),
        (lambda: PermutationLRPE(1, 2, 0), "dim"),
        (lambda: PermutationLRPE(1, 2, 8).transform(x, integer + 0.5), "integer positions"),
        (lambda: PermutationLRPE(1, 2, 8).pairwise(integer), "rotary_kernel_reference"),
        (lambda: UnitaryLRPE(1, 2, 8).pairwise(integer), "no scalar f"),
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
