"""RPEAttention: exactness against its references, geometric contracts, numerics, bad input."""

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.features import GERFFeatures
from geolinrpe.nn.attention import _center
from geolinrpe.nn.block import RPETransformerEncoder
from geolinrpe.nn.exact import ExactRPEAttention
from geolinrpe.ops import to_padded
from geolinrpe.rpe import ShiftInvariantKernelRPE
from geolinrpe.testing import (
    assert_padding_consistent,
    assert_permutation_equivariant,
    assert_translation_invariant,
)

D64 = torch.float64
LAYERS = [
    dict(mode="logit"),
    dict(mode="mask"),
    dict(mode="mask", kernel="elu", normalize="masked"),
    dict(mode="mask", kernel="relu"),
    dict(rpe=None),
]


def layer(dtype=D64, embed_dim=120, heads=2, **kw):
    options = dict(rpe="flt-kernel", pos_dim=3, num_features=32, chunk_size=16)
    options.update(kw)
    return RPEAttention(embed_dim, heads, **options).to(dtype)


def packed_batch(sizes, embed_dim=120, dtype=D64):
    n = sum(sizes)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return torch.randn(n, embed_dim, dtype=dtype), torch.randn(n, 3, dtype=dtype) * 2, batch


@pytest.mark.parametrize("kw", LAYERS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n", [1, 63])
def test_forward_equals_explicit_reference_head_dim_60(kw, causal, n):
    attn = layer(causal=causal, **kw)
    x, pos = torch.randn(2, n, 120, dtype=D64), torch.randn(2, n, 3, dtype=D64)
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 3 + 1 :] = True
    fast = attn(x, pos, key_padding_mask=mask)
    assert fast.shape == x.shape
    torch.testing.assert_close(
        fast, attn.reference(x, pos, key_padding_mask=mask), atol=1e-10, rtol=1e-10
    )
    xp, pp, batch = packed_batch([n, 5, 1])
    torch.testing.assert_close(
        attn(xp, pp, batch), attn.reference(xp, pp, batch), atol=1e-10, rtol=1e-10
    )


@pytest.mark.parametrize("kw", LAYERS)
@pytest.mark.parametrize("causal", [False, True])
def test_padded_equals_packed_and_permutation_equivariance(kw, causal):
    attn = layer(causal=causal, **kw)
    x, pos, batch = packed_batch([7, 1, 12, 3])
    assert_padding_consistent(attn, x, pos, batch, atol=1e-10, rtol=1e-10)
    if not causal:  # a causal layer depends on the order by design
        assert_permutation_equivariant(attn, x, pos, batch=batch, atol=1e-10, rtol=1e-10)
        assert_permutation_equivariant(attn, x.view(1, 23, 120), pos.view(1, 23, 3), atol=1e-10)


def test_mask_mode_translation_invariance_is_exact_for_every_draw():
    attn = layer(mode="mask", center_positions=False)
    x, pos, batch = packed_batch([9, 4])
    shift = torch.tensor([1e3, -2e3, 5e2], dtype=D64)
    assert_translation_invariant(attn, x, pos, shift=shift, batch=batch, atol=1e-9, rtol=1e-9)
    causal = layer(mode="mask", causal=True)
    assert_translation_invariant(causal, x, pos, shift=shift, batch=batch, atol=1e-9, rtol=1e-9)


def test_logit_mode_translation_invariance_exact_with_centring():
    attn = layer(mode="logit")  # center_positions defaults to True (bidirectional)
    x, pos, batch = packed_batch([9, 4])
    assert_translation_invariant(attn, x, pos, batch=batch, atol=1e-10, rtol=1e-10)


def test_logit_mode_translation_error_without_centring_shrinks_with_features():
    """Without centring, logit mode is translation invariant only in expectation.

    Measured relative output change under a translation (mean over 4 draws): 0.22 / 0.079 /
    0.029 at 16 / 256 / 4096 features (inputs scaled 0.5), the same size as the error
    against the exact softmax; with unit-scale inputs 0.62 / 0.36 / 0.15."""
    x = torch.randn(1, 30, 32, dtype=D64) * 0.5
    pos = torch.randn(1, 30, 3, dtype=D64)
    shift = torch.tensor([3.0, -1.0, 2.0], dtype=D64)
    errors = []
    for r in (16, 256, 4096):
        trial = []
        for seed in range(4):
            torch.manual_seed(seed)
            rpe = ShiftInvariantKernelRPE(3, 2, 8, amplitude=1.0)
            attn = RPEAttention(
                32, 2, rpe=rpe, mode="logit", num_features=r, center_positions=False
            ).double()
            a, b = attn(x, pos), attn(x, pos + shift)
            trial.append(((a - b).norm() / a.norm()).item())
        errors.append(sum(trial) / len(trial))
    assert errors[0] > errors[1] > errors[2] > 1e-3
    assert errors[0] / errors[2] > 4


def test_causal_layer_ignores_the_future_and_is_not_centred():
    attn = layer(mode="logit", causal=True)
    assert attn.center_positions is False
    x, pos = torch.randn(1, 20, 120, dtype=D64), torch.randn(1, 20, 3, dtype=D64)
    base = attn(x, pos)
    x2, pos2 = x.clone(), pos.clone()
    x2[:, 12:] += 5
    pos2[:, 12:] += 5
    torch.testing.assert_close(attn(x2, pos2)[:, :12], base[:, :12], atol=1e-12, rtol=1e-12)
    with pytest.raises(ValueError, match="center_positions"):
        layer(causal=True, center_positions=True)


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("causal", [False, True])
def test_layer_gradcheck_x_and_pos(mode, causal):
    attn = RPEAttention(8, 2, rpe="flt-kernel", pos_dim=2, mode=mode, num_features=6, causal=causal)
    attn = attn.double()
    x = torch.randn(7, 8, dtype=D64, requires_grad=True)
    pos = torch.randn(7, 2, dtype=D64, requires_grad=True)
    batch = torch.tensor([0, 0, 0, 0, 1, 1, 1])
    assert torch.autograd.gradcheck(lambda x, pos: attn(x, pos, batch), (x, pos))
    out = attn(x, pos, batch).pow(2).sum()
    out.backward()
    for name, p in attn.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_layer_approaches_exact_target(mode):
    """reference(kernel="exact", rpe="exact") is the exact target; error falls with R and m."""
    x = torch.randn(1, 30, 32, dtype=D64) * 0.5
    pos = torch.randn(1, 30, 3, dtype=D64)
    errors = []
    for r, m in ((16, 4), (256, 64), (4096, 512)):
        trial = []
        for seed in range(3):
            torch.manual_seed(seed)
            attn = RPEAttention(
                32,
                2,
                rpe="flt-kernel",
                pos_dim=3,
                mode=mode,
                num_features=r,
                rpe_options=dict(num_frequencies=m, amplitude=0.5),
            ).double()
            exact = attn.reference(x, pos, kernel="exact", rpe="exact")
            trial.append(((attn(x, pos) - exact).norm() / exact.norm()).item())
        errors.append(sum(trial) / len(trial))
    assert errors[0] > errors[1] > errors[2]
    assert errors[2] < 0.1


def test_reference_variants_are_consistent():
    attn = layer(mode="mask", kernel="elu")
    x, pos = torch.randn(1, 9, 120, dtype=D64), torch.randn(1, 9, 3, dtype=D64)
    # a deterministic kernel has no feature error: "features" == "exact" kernel
    torch.testing.assert_close(
        attn.reference(x, pos, kernel="exact"), attn(x, pos), atol=1e-10, rtol=1e-10
    )
    torch.testing.assert_close(
        attn.reference(x, pos, kernel="exact", rpe="exact"),
        attn.reference(x, pos, kernel="features", rpe="exact"),
        atol=1e-10,
        rtol=1e-10,
    )
    logit = layer(mode="logit")
    with pytest.raises(ValueError, match="logit mode"):
        logit.reference(x, pos, kernel="features", rpe="exact")
    with pytest.raises(ValueError, match="kernel must be"):
        logit.reference(x, pos, kernel="approx")


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("causal", [False, True])
def test_no_nan_for_extreme_positions_single_tokens_and_bf16(mode, causal):
    attn = layer(torch.float32, mode=mode, causal=causal)
    x = torch.randn(2, 40, 120)
    far = torch.randn(2, 40, 3) * 1e4
    same = torch.full((2, 40, 3), 3.0)
    for pos in (far, same):
        assert torch.isfinite(attn(x, pos)).all()
    assert torch.isfinite(attn(x[:, :1], far[:, :1])).all()
    xp, pp, batch = packed_batch([1, 1, 5], dtype=torch.float32)
    assert torch.isfinite(attn(xp, pp, batch)).all()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        low = attn(x, far)
    assert low.dtype == torch.bfloat16 and torch.isfinite(low).all()
    full = attn(x, far)
    assert ((low.float() - full).norm() / full.norm()) < 0.05


def test_float32_matches_float64():
    attn = layer(mode="mask")
    x, pos = torch.randn(2, 50, 120, dtype=D64), torch.randn(2, 50, 3, dtype=D64) * 3
    want = attn(x, pos)
    got = attn.float()(x.float(), pos.float())
    torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4)


def test_state_dict_round_trip_keeps_the_draws_and_redraw_changes_them():
    attn = layer(mode="logit")
    x, pos = torch.randn(1, 10, 120, dtype=D64), torch.randn(1, 10, 3, dtype=D64)
    out = attn(x, pos)
    clone = layer(mode="logit")
    clone.load_state_dict(attn.state_dict())
    torch.testing.assert_close(clone(x, pos), out, atol=0, rtol=0)
    clone.redraw()
    assert not torch.allclose(clone(x, pos), out)
    clone.redraw(torch.Generator().manual_seed(5))
    first = clone(x, pos)
    clone.redraw(torch.Generator().manual_seed(5))
    torch.testing.assert_close(clone(x, pos), first, atol=0, rtol=0)


# ---------------------------------------------------------------- FAVOR++


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("causal", [False, True])
def test_favor_pp_calibrated_layer_equals_explicit_reference(mode, causal):
    """A training-mode forward calibrates rho (padding excluded); the layer then equals its
    explicit-feature reference, dense and packed; eval mode leaves rho alone."""
    attn = layer(mode=mode, causal=causal, kernel="favor++")
    fm = attn.feature_map
    assert fm.adaptive and not fm.calibrated and fm.A.item() == 0
    x, pos = torch.randn(2, 30, 120, dtype=D64), torch.randn(2, 30, 3, dtype=D64)
    mask = torch.zeros(2, 30, dtype=torch.bool)
    mask[1, 11:] = True
    attn.train()
    fast = attn(x, pos, key_padding_mask=mask)
    assert fm.calibrated and fm.A.item() < -0.01
    if not causal:  # calibrated before the engine: the reference uses the same A
        torch.testing.assert_close(
            fast, attn.reference(x, pos, key_padding_mask=mask), atol=1e-10, rtol=1e-10
        )
    # padded tokens do not enter rho: garbage there gives the same statistic
    twin = layer(mode=mode, causal=causal, kernel="favor++")
    twin.load_state_dict({**attn.state_dict(), "feature_map.calibrated": torch.tensor(False)})
    noisy_x, noisy_pos = x.clone(), pos.clone()
    noisy_x[1, 11:] = 1e3
    noisy_pos[1, 11:] = -50.0
    twin.train()(noisy_x, noisy_pos, key_padding_mask=mask)
    torch.testing.assert_close(twin.feature_map.rho, fm.rho, atol=1e-13, rtol=1e-13)
    attn.eval()
    rho = fm.rho.clone()
    torch.testing.assert_close(
        attn(x, pos, key_padding_mask=mask),
        attn.reference(x, pos, key_padding_mask=mask),
        atol=1e-10,
        rtol=1e-10,
    )
    xp, pp, batch = packed_batch([17, 5, 1])
    torch.testing.assert_close(
        attn(xp, pp, batch), attn.reference(xp, pp, batch), atol=1e-10, rtol=1e-10
    )
    assert_padding_consistent(attn, xp, pp, batch, atol=1e-10, rtol=1e-10)
    assert torch.equal(fm.rho, rho)  # eval mode never calibrates


def test_favor_pp_training_mode_padding_consistency_and_causality():
    """Bidirectional: dense (padding excluded) and packed calibrate to the same rho, so the
    training-mode outputs agree. Causal: calibration happens after the engine, so later
    tokens never change earlier outputs, even in training mode."""
    attn = layer(mode="mask", kernel="favor++").train()
    x, pos, batch = packed_batch([7, 1, 12, 3])
    assert_padding_consistent(attn, x, pos, batch, atol=1e-10, rtol=1e-10)
    causal = layer(mode="logit", causal=True, kernel="favor++").train()
    x, pos = torch.randn(1, 20, 120, dtype=D64), torch.randn(1, 20, 3, dtype=D64)
    causal(x * 2, pos)  # calibrate once
    state = {name: t.clone() for name, t in causal.state_dict().items()}
    base = causal(x, pos)
    assert not torch.equal(causal.feature_map.rho, state["feature_map.rho"])  # updated after
    causal.load_state_dict(state)
    x2, pos2 = x.clone(), pos.clone()
    x2[:, 12:] += 5
    pos2[:, 12:] += 5
    torch.testing.assert_close(causal(x2, pos2)[:, :12], base[:, :12], atol=1e-12, rtol=1e-12)


def test_favor_pp_state_dict_redraw_and_other_featurizers():
    attn = layer(mode="logit", kernel="favor++")
    x, pos = torch.randn(1, 10, 120, dtype=D64), torch.randn(1, 10, 3, dtype=D64)
    attn.train()(x, pos)
    out = attn.eval()(x, pos)
    clone = layer(mode="logit", kernel="favor++").eval()
    clone.load_state_dict(attn.state_dict())
    assert torch.equal(clone.feature_map.rho, attn.feature_map.rho)
    torch.testing.assert_close(clone(x, pos), out, atol=0, rtol=0)
    clone.redraw()
    assert not torch.allclose(clone(x, pos), out)
    assert torch.equal(clone.feature_map.rho, attn.feature_map.rho)
    # featurizers of other RPE families are calibrated through a hook on the feature map
    steps = pos[..., :1] * 5
    for kw in (dict(rpe="rope", mode="logit"), dict(rpe="spe-sine", mode="mask")):
        other = layer(kernel="favor++", pos_dim=1, **kw).train()
        other(x, steps)
        assert other.feature_map.calibrated and other.feature_map.A.item() < -0.01, kw
        if kw["rpe"] == "rope":  # the map's inputs there: rotated q and k, times d^-1/4
            q, k, _, steps_enc, _ = other._prepare(x, steps, None, None, None)
            direct = GERFFeatures(60, 32).double()
            rotate = other.rpe.transform
            direct.calibrate(rotate(q, steps_enc) * 60**-0.25, rotate(k, steps_enc) * 60**-0.25)
            torch.testing.assert_close(other.feature_map.rho, direct.rho, atol=1e-13, rtol=1e-13)
        other.eval()
        torch.testing.assert_close(
            other(x, steps), other.reference(x, steps), atol=1e-10, rtol=1e-10
        )


# ---------------------------------------------------------------- bad input


def test_bad_input_raises_value_error_naming_the_argument():
    attn = layer(torch.float32)
    x, pos = torch.randn(2, 6, 120), torch.randn(2, 6, 3)
    cases = [
        (dict(x=torch.randn(2, 6, 100), pos=pos), "embed_dim"),
        (dict(x=torch.randn(6), pos=pos), "x must be"),
        (dict(x=x, pos=None), "pos is required"),
        (dict(x=x, pos=torch.randn(2, 6, 2)), "pos must have shape"),
        (dict(x=x, pos=torch.randn(2, 5, 3)), "pos must have shape"),
        (dict(x=x, pos=pos.double()), "dtype"),
        (dict(x=x.clone().index_fill_(1, torch.tensor([2]), float("nan")), pos=pos), "x contains"),
        (
            dict(x=x, pos=pos.clone().index_fill_(1, torch.tensor([0]), float("inf"))),
            "pos contains",
        ),
        (dict(x=x, pos=pos, key_padding_mask=torch.zeros(2, 6)), "key_padding_mask must be a bool"),
        (
            dict(x=x, pos=pos, key_padding_mask=torch.zeros(2, 5, dtype=torch.bool)),
            "key_padding_mask must have shape",
        ),
        (dict(x=x, pos=pos, batch=torch.zeros(6, dtype=torch.long)), "batch is for packed"),
        (dict(x=x.int(), pos=pos), "x must be a floating"),
        (dict(x=torch.randn(0, 6, 120), pos=torch.randn(0, 6, 2)), "pos must have shape"),
        (dict(x=x, pos=pos, cell=torch.eye(3).expand(2, 3, 3)), "only used by periodic"),
    ]
    xp, pp = torch.randn(6, 120), torch.randn(6, 3)
    cases += [
        (dict(x=xp, pos=pp, batch=torch.tensor([0, 0, 1, 1, 0, 0])), "sorted"),
        (dict(x=xp, pos=pp, batch=torch.tensor([-1, 0, 0, 1, 1, 1])), "negative"),
        (dict(x=xp, pos=pp, batch=torch.tensor([0, 0, 2, 2, 2, 2])), "gaps"),
        (dict(x=xp, pos=pp, batch=torch.tensor([1, 1, 1, 1, 1, 1])), "gaps"),
        (dict(x=xp, pos=pp, batch=torch.tensor([0, 0, 1])), r"batch must have shape \[6\]"),
        (dict(x=xp, pos=pp, batch=torch.zeros(6)), "batch must be an integer"),
        (
            dict(x=xp, pos=pp, key_padding_mask=torch.zeros(1, 6, dtype=torch.bool)),
            "key_padding_mask is for dense",
        ),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            attn(**kwargs)


def test_bad_construction_raises_value_error_naming_the_option():
    cases = [
        (dict(embed_dim=10, num_heads=3), "divisible"),
        (dict(embed_dim=0, num_heads=1), "embed_dim"),
        (dict(embed_dim=8, num_heads=2, mode="concat"), "mode"),
        (dict(embed_dim=8, num_heads=2, rpe="flt-kernel"), "pos_dim is required"),
        (dict(embed_dim=8, num_heads=2, rpe="nope", pos_dim=3), "unknown rpe"),
        (
            dict(
                embed_dim=8, num_heads=2, rpe="flt-kernel", pos_dim=3, mode="logit", kernel="relu"
            ),
            "favor",
        ),
        (
            dict(
                embed_dim=8,
                num_heads=2,
                rpe="flt-kernel",
                pos_dim=3,
                mode="logit",
                normalize="kernel",
            ),
            "normalize must be one of",
        ),
        (dict(embed_dim=8, num_heads=2, normalize="l2"), "normalize"),
        (dict(embed_dim=8, num_heads=2, num_features=0), "num_features"),
        (dict(embed_dim=8, num_heads=2, rpe=ShiftInvariantKernelRPE(3, 4)), "heads"),
        (dict(embed_dim=8, num_heads=2, rpe=ShiftInvariantKernelRPE(3, 2), pos_dim=2), "pos_dim"),
        (dict(embed_dim=8, num_heads=2, chunk_size=0), "chunk_size"),
    ]
    for kwargs, match in cases:
        with pytest.raises(ValueError, match=match):
            RPEAttention(**kwargs)


def test_cell_without_rpe_is_rejected():
    attn = RPEAttention(8, 2)
    with pytest.raises(ValueError, match="rpe=None"):
        attn(torch.randn(4, 8), cell=torch.eye(3)[None])


# ------------------------------------------------------- centring: segment means, integer shifts


def padded_center(pos, batch, integer):
    """The former computation: pad every graph to the largest, mean over the valid slots."""
    dense, mask = to_padded(pos, batch)
    counts = (~mask).sum(1, keepdim=True).clamp_min(1)
    mean = (dense.sum(1) / counts)[batch]
    return pos - (torch.floor(mean + 0.5) if integer else mean)


def test_center_segment_means_equal_the_padded_computation():
    sizes = [1, 5, 1, 40, 3, 1, 17]
    x, pos, batch = packed_batch(sizes)
    torch.testing.assert_close(_center(pos, batch, None, False), padded_center(pos, batch, False))
    ints = torch.randint(-50, 50, pos.shape).to(D64)
    got = _center(ints, batch, None, True)
    assert torch.equal(got, padded_center(ints, batch, True)) and torch.equal(got, got.round())
    # dense rows with padding: the mean of the valid tokens
    dense, mask = to_padded(pos, batch)
    centred, _ = to_padded(_center(pos, batch, None, False), batch)
    torch.testing.assert_close(
        _center(dense, None, mask, False).masked_fill(mask[..., None], 0), centred
    )
    # a 40k-token graph and 2,000 single tokens: O(n) (the padded form held [g, n_max, p],
    # 1.7 GB and 4.5 s here); each single token is its own centre
    batch = torch.repeat_interleave(torch.arange(2001), torch.tensor([40_000] + [1] * 2000))
    pos = torch.randn(len(batch), 3) + 100.0
    out = _center(pos, batch, None, False)
    assert out[40_000:].abs().max() == 0.0
    assert out[:40_000].mean(0).abs().max() < 1e-3


def test_integer_centring_commutes_with_integer_shifts():
    # means k + 1/2: round-half-to-even moves 0.5 -> 0 but 1.5 -> 2, floor(m + 1/2) does not
    pos = torch.tensor([[[0.0], [1.0]]])  # dense [1, 2, 1]
    for s in range(-9, 10):
        assert _center(pos + s, None, None, True).tolist() == [[[-1.0], [0.0]]]
    batch = torch.tensor([0, 0, 1, 1, 1, 1])
    pos = torch.tensor([[0.0], [1.0], [0.0], [3.0], [6.0], [1.0]])  # means 0.5 and 2.5
    want = _center(pos, batch, None, True)
    for s in range(-9, 10):
        assert torch.equal(_center(pos + s, batch, None, True), want)


INTEGER_RPES = [
    ("lrpe-permutation", "logit", {}),
    ("lrpe-permutation", "mask", {}),
    ("spe-conv", "mask", {"grid_size": 64, "kernel_size": 8, "num_realizations": 16}),
    ("toeplitz-fft", "mask", {"max_offset": 40}),
]


@pytest.mark.parametrize("rpe,mode,options", INTEGER_RPES)
def test_integer_position_rpes_are_invariant_under_integer_shifts(rpe, mode, options):
    attn = RPEAttention(
        32, 2, rpe=rpe, pos_dim=1, mode=mode, num_features=16, rpe_options=options
    ).double()
    # row means 3.5, 8.17 and (valid tokens) 2.5: half-integers where rounding matters
    pos = torch.tensor([[0, 1, 2, 5, 7, 6], [3, 4, 9, 10, 11, 12], [0, 3, 6, 1, 0, 0]])
    pos = pos.to(D64)[..., None]
    x = torch.randn(3, 6, 32, dtype=D64)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[2, 4:] = True
    xp, pp = x[~mask], pos[~mask]
    batch = torch.tensor([0] * 6 + [1] * 6 + [2] * 4)
    out, packed = attn(x, pos, key_padding_mask=mask), attn(xp, pp, batch)
    for s in range(1, 10):
        for got, want in (
            (attn(x, pos + s, key_padding_mask=mask), out),
            (attn(xp, pp + s, batch), packed),
        ):
            assert (got - want).norm() <= 1e-5 * want.norm(), (s, rpe, mode)


# ------------------------------------------------------------------- compile, export, empty


def compile_inputs():
    x, pos = torch.randn(2, 7, 32), torch.randn(2, 7, 3)
    mask = torch.zeros(2, 7, dtype=torch.bool)
    mask[1, 5:] = True
    return x, pos, mask


def test_export_traces_the_layer_and_eager_checks_still_raise():
    attn = RPEAttention(32, 2, rpe="flt-kernel", pos_dim=3, num_features=16).eval()
    x, pos, mask = compile_inputs()
    program = torch.export.export(attn, (x, pos), {"key_padding_mask": mask})
    torch.testing.assert_close(
        program.module()(x, pos, key_padding_mask=mask), attn(x, pos, key_padding_mask=mask)
    )
    perm = RPEAttention(32, 2, rpe="lrpe-permutation", pos_dim=1, num_features=16).eval()
    steps = torch.randint(0, 9, (2, 7, 1)).float()
    program = torch.export.export(perm, (x, steps), {"key_padding_mask": mask})
    torch.testing.assert_close(
        program.module()(x, steps, key_padding_mask=mask), perm(x, steps, key_padding_mask=mask)
    )
    # the value checks skipped while tracing still run in eager mode
    with pytest.raises(ValueError, match="x contains 32 NaN"):
        attn(x.index_put((torch.tensor([0]), torch.tensor([3])), torch.tensor(float("nan"))), pos)
    with pytest.raises(ValueError, match="integer positions"):
        perm(x, steps + 0.5)
    with pytest.raises(ValueError, match="sorted"):
        attn(x[0], pos[0], torch.tensor([0, 0, 1, 1, 0, 1, 1]))


@pytest.mark.slow  # 10-35 s of inductor compilation on a 2-core CPU
def test_compile_fullgraph_matches_eager():
    attn = RPEAttention(32, 2, rpe="flt-kernel", pos_dim=3, num_features=16).eval()
    x, pos, mask = compile_inputs()
    compiled = torch.compile(attn, fullgraph=True)
    torch.testing.assert_close(
        compiled(x, pos, key_padding_mask=mask), attn(x, pos, key_padding_mask=mask)
    )


@pytest.mark.parametrize("kw", LAYERS + [dict(mode="logit", causal=True)])
def test_empty_batches_give_empty_outputs(kw):
    attn = layer(**kw)
    exact = ExactRPEAttention(120, 2, **{"rpe": "flt-kernel", "pos_dim": 3, **kw}).double()
    encoder = RPETransformerEncoder(
        1, 120, 2, 2.0, 0.0, "linear", **{"rpe": "flt-kernel", "pos_dim": 3, **kw}
    ).double()
    for shape, extra in [
        ((0, 5), {}),
        ((0, 5), {"key_padding_mask": torch.zeros(0, 5, dtype=torch.bool)}),
        ((3, 0), {}),
        ((0,), {}),
        ((0,), {"batch": torch.zeros(0, dtype=torch.long)}),
    ]:
        x, pos = torch.randn(*shape, 120, dtype=D64), torch.randn(*shape, 3, dtype=D64)
        for module in (attn, exact, encoder):
            out = module(x, pos, **extra)
            assert out.shape == x.shape and out.dtype == D64
        assert attn.reference(x, pos, **extra, kernel="exact", rpe="exact").shape == x.shape


@pytest.mark.parametrize(
    "kw",
    [
        dict(rpe="flt-kernel", mode="logit"),
        dict(rpe="flt-kernel", mode="mask"),
        dict(rpe="flt-radial", mode="logit"),
        dict(rpe=None),
    ],
)
def test_dense_layer_traces_without_graph_breaks(kw):
    """What torch.compile(fullgraph=True) needs, counted by dynamo's tracer (no compilation):
    zero graph breaks for dense input, with and without a padding mask."""
    attn = RPEAttention(32, 2, pos_dim=3, num_features=16, **kw).eval()
    x, pos, mask = compile_inputs()
    for extra in ({}, {"key_padding_mask": mask}):
        explained = torch._dynamo.explain(attn)(x, pos, **extra)
        assert explained.graph_break_count == 0, explained.break_reasons
        torch._dynamo.reset()


def test_output_norm_layernorm_before_the_projection_keeps_padded_rows_zero():
    """output_norm="layernorm": nn.LayerNorm(embed_dim) on the concatenated heads, then the
    output projection, in forward and reference; padded rows stay 0 before the projection."""
    torch.manual_seed(0)
    kw = dict(rpe="lrpe-unitary", pos_dim=1, mode="mask", kernel="elu", normalize="none")
    attn = RPEAttention(16, 2, output_norm="layernorm", chunk_size=4, **kw).double()
    plain = RPEAttention(16, 2, **kw).double()
    plain.load_state_dict(attn.state_dict(), strict=False)
    with torch.no_grad():
        attn.output_norm.weight.normal_()
        attn.output_norm.bias.normal_()
    x, pos = torch.randn(2, 9, 16, dtype=D64), torch.arange(9.0, dtype=D64).expand(2, 9)[..., None]
    mask = torch.zeros(2, 9, dtype=torch.bool)
    mask[1, 6:] = True
    heads = {}
    plain.out.register_forward_hook(lambda m, args, out: heads.update(x=args[0]))
    plain(x, pos, key_padding_mask=mask)
    norm = attn.output_norm
    want = torch.nn.functional.layer_norm(heads["x"], (16,), norm.weight, norm.bias)
    want = attn.out(want.masked_fill(mask[..., None], 0.0))
    for quadratic_below in (None, 0):
        attn.quadratic_below = quadratic_below
        torch.testing.assert_close(attn(x, pos, key_padding_mask=mask), want)
    torch.testing.assert_close(attn.reference(x, pos, key_padding_mask=mask), want)
    torch.testing.assert_close(
        attn(x, pos, key_padding_mask=mask)[1, 6:], attn.out.bias.expand(3, 16)
    )
    assert "output_norm.weight" in attn.state_dict() and plain.output_norm is None
    with pytest.raises(ValueError, match="output_norm must be one of"):
        RPEAttention(16, 2, output_norm="rmsnorm")
