"""The O(n) engine equals its explicit-feature quadratic form (float64, 1e-10) in every
layout, mode, normalisation and chunking; padding and graph boundaries never leak."""

import pytest
import torch

from geolinrpe.features import build_feature_map
from geolinrpe.ops import (
    LogitMode,
    MaskMode,
    feature_attention,
    linear_attention,
    to_packed,
    to_padded,
)
from geolinrpe.rpe import ShiftInvariantKernelRPE

D64 = torch.float64


def make_featurizer(mode, kernel="favor+", head_dim=8, heads=2, pos_dim=3, rpe=True, m=5, r=16):
    rpe_mod = ShiftInvariantKernelRPE(pos_dim, heads, m, lengthscale=1.3).double() if rpe else None
    scale = head_dim**-0.25 if kernel == "favor+" else 1.0
    if mode == "logit":
        fm = build_feature_map("favor+", head_dim + 2 * m, r).double()
        return LogitMode(fm, rpe_mod, scale)
    fm = build_feature_map(kernel, head_dim, r).double()
    return MaskMode(fm, rpe_mod, scale)


def inputs(shape_lead, heads=2, d=8, e=5, p=3, scale=1.0):
    q = torch.randn(*shape_lead, heads, d, dtype=D64) * scale
    k = torch.randn(*shape_lead, heads, d, dtype=D64) * scale
    v = torch.randn(*shape_lead, heads, e, dtype=D64)
    pos = torch.randn(*shape_lead, p, dtype=D64) * 2
    return q, k, v, pos


CASES = [
    ("logit", "favor+", "masked"),
    ("mask", "favor+", "masked"),
    ("mask", "favor+", "kernel"),
    ("mask", "relu", "kernel"),
    ("mask", "elu", "masked"),
    ("mask", "identity", "none"),
    ("mask", "favor+", "none"),
]


@pytest.mark.parametrize("mode,kernel,normalize", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("n,chunk", [(1, None), (63, None), (63, 7), (63, 21), (64, 16), (37, 64)])
def test_dense_matches_quadratic(mode, kernel, normalize, causal, n, chunk):
    feat = make_featurizer(mode, kernel)
    q, k, v, pos = inputs((2, n))
    mask = torch.zeros(2, n, dtype=torch.bool)
    mask[1, n // 2 + 1 :] = True
    kw = dict(featurizer=feat, key_padding_mask=mask, causal=causal, normalize=normalize)
    fast = linear_attention(q, k, v, pos, chunk_size=chunk, **kw)
    slow = feature_attention(q, k, v, pos, **kw)
    torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)
    if n > 1:  # padded queries output exactly 0
        assert fast[1, n // 2 + 1 :].abs().max() == 0


@pytest.mark.parametrize("mode,kernel,normalize", CASES)
@pytest.mark.parametrize("causal", [False, True])
def test_packed_matches_quadratic_and_padded(mode, kernel, normalize, causal):
    feat = make_featurizer(mode, kernel)
    sizes = [1, 9, 30, 2, 17, 1]  # single-token graphs included, sizes spread across buckets
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    q, k, v, pos = inputs((sum(sizes),))
    kw = dict(featurizer=feat, causal=causal, normalize=normalize)
    packed = linear_attention(q, k, v, pos, batch=batch, chunk_size=8, **kw)
    torch.testing.assert_close(
        packed, feature_attention(q, k, v, pos, batch=batch, **kw), atol=1e-10, rtol=1e-10
    )
    dq, mask = to_padded(q, batch)
    dk, dv, dpos = (to_padded(t, batch)[0] for t in (k, v, pos))
    dense = linear_attention(dq, dk, dv, dpos, key_padding_mask=mask, **kw)
    torch.testing.assert_close(to_packed(dense, mask)[0], packed, atol=1e-12, rtol=1e-12)
    # each graph alone gives the same rows as inside the batch
    start = 0
    for size in sizes:
        sl = slice(start, start + size)
        alone = linear_attention(q[None, sl], k[None, sl], v[None, sl], pos[None, sl], **kw)[0]
        torch.testing.assert_close(alone, packed[sl], atol=1e-12, rtol=1e-12)
        start += size


@pytest.mark.parametrize("mode", ["logit", "mask"])
def test_no_graph_sees_another_and_padding_does_not_leak(mode):
    feat = make_featurizer(mode)
    batch = torch.tensor([0] * 5 + [1] * 7)
    q, k, v, pos = inputs((12,))
    base = linear_attention(q, k, v, pos, featurizer=feat, batch=batch)
    q2, k2, v2, pos2 = (t.clone() for t in (q, k, v, pos))
    for t in (q2, k2, v2, pos2):
        t[5:] = 50 * torch.randn_like(t[5:])
    other = linear_attention(q2, k2, v2, pos2, featurizer=feat, batch=batch)
    assert torch.equal(base[:5], other[:5])
    assert not torch.allclose(base[5:], other[5:])
    # dense: huge values in padded slots change nothing (padded keys leave the denominator)
    dq, mask = to_padded(q, batch)
    dk, dv, dpos = (to_padded(t, batch)[0] for t in (k, v, pos))
    ref = linear_attention(dq, dk, dv, dpos, featurizer=feat, key_padding_mask=mask)
    for t in (dq, dk, dv, dpos):
        t[mask] = 1e3 * torch.randn_like(t[mask])
    noisy = linear_attention(dq, dk, dv, dpos, featurizer=feat, key_padding_mask=mask)
    torch.testing.assert_close(noisy, ref, atol=1e-12, rtol=1e-12)


def test_per_graph_key_stabilisation_float32():
    """A graph with huge logits next to one with tiny logits: each equals itself alone.

    A global (whole-batch) stabiliser would underflow every key of the second graph."""
    feat = make_featurizer("mask")
    fm = feat.feature_map.float()
    feat = MaskMode(fm, feat.rpe.float(), feat.input_scale)
    q = torch.randn(2, 10, 2, 8)
    k = torch.randn(2, 10, 2, 8)
    k[0] *= 12.0  # logits around 100 in graph 0
    v = torch.randn(2, 10, 2, 5)
    pos = torch.randn(2, 10, 3)
    both = linear_attention(q, k, v, pos, featurizer=feat, chunk_size=3)
    assert torch.isfinite(both).all()
    for b in range(2):
        sl = slice(b, b + 1)
        alone = linear_attention(q[sl], k[sl], v[sl], pos[sl], featurizer=feat)
        torch.testing.assert_close(both[b : b + 1], alone, atol=1e-5, rtol=1e-5)


def test_running_max_rescaling_across_chunks():
    """Key logits grow chunk after chunk, forcing the state to be rescaled each time."""
    feat = make_featurizer("logit")
    q, k, v, pos = inputs((1, 40))
    k = k * torch.linspace(0.1, 6.0, 40, dtype=D64)[None, :, None, None]
    for causal in (False, True):
        kw = dict(featurizer=feat, causal=causal)
        fast = linear_attention(q, k, v, pos, chunk_size=5, **kw)
        slow = feature_attention(q, k, v, pos, **kw)
        torch.testing.assert_close(fast, slow, atol=1e-10, rtol=1e-10)


def test_causal_ignores_future_tokens():
    feat = make_featurizer("mask")
    q, k, v, pos = inputs((1, 30))
    base = linear_attention(q, k, v, pos, featurizer=feat, causal=True, chunk_size=8)
    for t in (q, k, v, pos):
        t[:, 20:] = torch.randn_like(t[:, 20:]) * 10
    after = linear_attention(q, k, v, pos, featurizer=feat, causal=True, chunk_size=8)
    torch.testing.assert_close(after[:, :20], base[:, :20], atol=1e-12, rtol=1e-12)


def test_without_rpe_is_plain_linear_attention():
    feat = make_featurizer("mask", kernel="elu", rpe=False)
    q, k, v, _ = inputs((2, 11))
    fast = linear_attention(q, k, v, featurizer=feat)
    phi_q, phi_k = torch.nn.functional.elu(q) + 1, torch.nn.functional.elu(k) + 1
    w = torch.einsum("bihd,bjhd->bhij", phi_q, phi_k)
    want = torch.einsum("bhij,bjhe->bihe", w / w.sum(-1, keepdim=True), v)
    torch.testing.assert_close(fast, want, atol=1e-12, rtol=1e-12)


@pytest.mark.parametrize("mode", ["logit", "mask"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_gradcheck_inputs_positions_and_rpe_parameters(mode, causal, packed):
    feat = make_featurizer(mode, head_dim=4, m=3, r=6)
    rpe = feat.rpe
    if packed:
        batch = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
        q, k, v, pos = inputs((9,), d=4, e=3)
        kw = dict(batch=batch)
    else:
        q, k, v, pos = inputs((2, 5), d=4, e=3)
        mask = torch.tensor([[False] * 5, [False] * 3 + [True] * 2])
        kw = dict(key_padding_mask=mask)
    ls, amp = rpe.log_lengthscale, rpe.amplitude

    def attend(q, k, v, pos, chunk_size=2):
        return linear_attention(
            q, k, v, pos, featurizer=feat, causal=causal, chunk_size=chunk_size, **kw
        )

    for t in (q, k, v, pos):
        t.requires_grad_(True)
    assert torch.autograd.gradcheck(attend, (q, k, v, pos))
    # RPE parameters (reached through the reparametrised frequencies and the weights):
    # autograd against central differences, with a different chunking for the latter
    out = attend(q, k, v, pos)
    weights = torch.randn_like(out)
    grads = torch.autograd.grad((out * weights).sum(), [ls, amp])
    for param, grad in zip((ls, amp), grads, strict=True):
        for h in range(param.numel()):
            eps = 1e-6
            with torch.no_grad():
                param[h] += eps
                plus = (attend(q, k, v, pos, None) * weights).sum()
                param[h] -= 2 * eps
                minus = (attend(q, k, v, pos, None) * weights).sum()
                param[h] += eps
            fd = (plus - minus) / (2 * eps)
            assert abs(fd - grad[h]) <= 1e-6 * (1 + abs(fd)), (h, fd, grad[h])


@pytest.mark.parametrize("mode,kernel,normalize", CASES)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("packed", [False, True])
def test_recompute_gives_the_same_values_and_gradients(mode, kernel, normalize, causal, packed):
    """``recompute=True`` rebuilds each chunk in the backward pass: the same output and
    gradients (q, k, v, pos, the RPE's parameters), and far fewer tensors kept."""
    featurizer = make_featurizer(mode, kernel)
    featurizer.cache_spectrum = True  # as RPEAttention sets it: the primed spectrum is reused
    shape = (29,) if packed else (2, 29)
    layout = {"causal": causal, "normalize": normalize, "chunk_size": 6}
    if packed:
        layout["batch"] = torch.repeat_interleave(torch.arange(3), torch.tensor([11, 1, 17]))
    else:
        layout["key_padding_mask"] = torch.arange(29)[None] >= torch.tensor([[29], [20]])
    runs, drawn = [], inputs(shape)
    for recompute in (False, True):
        featurizer._cached = None
        tensors = [t.clone().requires_grad_() for t in drawn]
        kept = []
        hooks = (lambda t, kept=kept: kept.append(t.numel()) or t, lambda t: t)
        with torch.autograd.graph.saved_tensors_hooks(*hooks):
            out = linear_attention(*tensors, featurizer=featurizer, recompute=recompute, **layout)
        params = list(featurizer.rpe.parameters())
        grads = torch.autograd.grad(out, tensors + params, torch.ones_like(out).cos())
        runs.append((out, grads, sum(kept)))
    (out, grads, kept), (out_r, grads_r, kept_r) = runs
    torch.testing.assert_close(out_r, out, rtol=1e-12, atol=1e-12)
    for a, b in zip(grads_r, grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert kept_r < kept
