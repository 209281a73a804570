"""The fused Triton kernels (geolinrpe.ops.fused) against the torch engine, their reference.

Without a GPU, tests/conftest.py sets ``TRITON_INTERPRET=1`` and the kernels run on the CPU
through Triton's interpreter (small sizes). Outputs in float32 (relative 2e-5 of the
output's largest entry; measured 1e-7 to 1e-6) and bf16 inputs with float32 accumulation;
gradients come from the torch engine's recomputation and are compared too.
"""

import pytest
import torch

from geolinrpe import RPEAttention
from geolinrpe.ops import fused, linear_attention

pytestmark = pytest.mark.skipif(
    not fused.available() or not (fused.interpreting() or torch.cuda.is_available()),
    reason="needs triton (the test extra) and a GPU or TRITON_INTERPRET=1",
)
DEVICE = "cpu" if fused.interpreting() else "cuda"

CONFIGS = {
    "mask-elu-kernel": dict(rpe="flt-kernel", mode="mask", kernel="elu", normalize="kernel"),
    "mask-favor-masked": dict(rpe="flt-kernel", mode="mask", kernel="favor+", normalize="masked"),
    "mask-favor-none": dict(rpe="flt-kernel", mode="mask", kernel="favor+", normalize="none"),
    "mask-relu-none": dict(rpe="flt-mlp", mode="mask", kernel="relu", normalize="none"),
    "mask-gerf-kernel": dict(rpe="flt-kernel", mode="mask", kernel="favor++", normalize="kernel"),
    "product-quadrature": dict(rpe="flt-kernel", mode="product", kernel="favor+"),
    "logit-gm": dict(rpe="flt-gm", mode="logit", kernel="favor+"),
    "logit-kernel": dict(rpe="flt-kernel", mode="logit", kernel="favor+"),
    "plain-favor": dict(rpe=None, mode="logit", kernel="favor+"),
    "plain-identity": dict(rpe=None, mode="mask", kernel="identity", normalize="none"),
}


def _layer(name, head_dim=16, heads=2, pos_dim=2, causal=False):
    """Small maps (one block of features) except ``mask-favor-masked``: 24 kernel features and
    8 frequencies span two blocks of each, so the ``F`` blocks' sums are exercised."""
    options = dict(CONFIGS[name])
    rpe = options.pop("rpe")
    wide = name == "mask-favor-masked"
    rpe_options = None
    if rpe is not None:
        rpe_options = {"num_frequencies": 8 if wide else 4}
        if rpe == "flt-gm":
            rpe_options.update(num_components=4, init_weight=0.3)
        if name == "product-quadrature":  # the mask exp(f) from a lattice rule
            rpe_options.update(frequencies="quadrature", amplitude=0.5)
    layer = RPEAttention(
        heads * head_dim,
        heads,
        rpe=rpe,
        pos_dim=pos_dim if rpe else None,
        num_features=24 if wide else 16,
        causal=causal,
        rpe_options=rpe_options,
        **options,
    )
    if name == "mask-gerf-kernel":  # a calibrated FAVOR++ map (A != 0)
        layer.feature_map.rho.fill_(0.7)
    return layer


def _inputs(shape, heads, head_dim, pos_dim, dtype=torch.float32):
    gen = torch.Generator().manual_seed(sum(shape) + head_dim)
    q, k, v = (torch.randn(*shape, heads, head_dim, generator=gen) for _ in range(3))
    pos = torch.randn(*shape, pos_dim, generator=gen)
    return [t.to(DEVICE, dtype) for t in (q, k, v)] + [pos.to(DEVICE)]


def _both(layer, q, k, v, pos, **layout):
    featurizer = layer.featurizer
    options = dict(featurizer=featurizer, normalize=layer.normalize, causal=layer.causal)
    pos = pos if layer.rpe is not None else None
    out = linear_attention(q, k, v, pos, engine="triton", **options, **layout)
    want = linear_attention(q, k, v, pos, engine="torch", **options, **layout)
    return out, want


def _close(out, want, rel=2e-5):
    scale = want.abs().max().clamp_min(1e-30)
    assert (out - want).abs().max() <= rel * scale, float((out - want).abs().max() / scale)


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", list(CONFIGS))
def test_dense_padded_matches_torch_engine(name, causal):
    layer = _layer(name, causal=causal).to(DEVICE)
    q, k, v, pos = _inputs((2, 37), 2, 16, 2)
    padding = torch.zeros(2, 37, dtype=torch.bool, device=DEVICE)
    padding[1, 29:] = True
    out, want = _both(layer, q, k, v, pos, key_padding_mask=padding)
    _close(out, want)
    assert bool((out[padding] == 0).all())


@pytest.mark.parametrize("n", [1, 63, 65])
@pytest.mark.parametrize("head_dim", [16, 32, 60])
def test_odd_sizes(n, head_dim):
    layer = _layer("mask-favor-masked", head_dim=head_dim).to(DEVICE)
    q, k, v, pos = _inputs((1, n), 2, head_dim, 2)
    _close(*_both(layer, q, k, v, pos))


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
@pytest.mark.parametrize("name", ["mask-favor-masked", "logit-gm", "mask-elu-kernel"])
def test_packed_mixed_sizes_with_one_token_graphs(name, causal):
    layer = _layer(name, pos_dim=3, causal=causal).to(DEVICE)
    sizes = torch.tensor([1, 40, 1, 7, 33])
    batch = torch.repeat_interleave(torch.arange(5), sizes).to(DEVICE)
    q, k, v, pos = _inputs((int(sizes.sum()),), 2, 16, 3)
    _close(*_both(layer, q, k, v, pos, batch=batch))


def test_bf16_inputs_accumulate_in_float32():
    layer = _layer("mask-favor-masked").to(DEVICE)
    q, k, v, pos = _inputs((2, 33), 2, 16, 2, dtype=torch.bfloat16)
    out, want = _both(layer, q, k, v, pos)
    assert out.dtype == torch.bfloat16
    _close(out.float(), want.float(), rel=2e-2)  # both round to bf16 at the end


@pytest.mark.parametrize("causal", [False, True], ids=["bidirectional", "causal"])
def test_gradients_reach_inputs_and_rpe_parameters(causal):
    layer = _layer("logit-gm", causal=causal).to(DEVICE)
    grads = []
    for engine in ("triton", "torch"):
        layer.zero_grad()
        q, k, v, pos = (t.clone().requires_grad_() for t in _inputs((2, 21), 2, 16, 2))
        out = linear_attention(
            q, k, v, pos, featurizer=layer.featurizer, causal=causal, engine=engine
        )
        out.backward(torch.linspace(-1, 1, out.numel(), device=DEVICE).view_as(out))
        params = [p.grad.clone() for p in layer.rpe.parameters() if p.grad is not None]
        grads.append([q.grad, k.grad, v.grad, pos.grad] + params)
    assert len(grads[0]) == len(grads[1]) > 4
    for a, b in zip(*grads, strict=True):
        # float32 recomputation in another operation order: 1e-5 relative measured
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5 * float(b.abs().max()))


def test_layer_switch_and_unsupported_configurations():
    layer = _layer("mask-favor-masked").to(DEVICE)
    layer.engine = "triton"
    x = torch.randn(2, 9, 32, device=DEVICE)
    pos = torch.randn(2, 9, 2, device=DEVICE)
    torch.testing.assert_close(layer(x, pos), layer.reference(x, pos), rtol=2e-5, atol=1e-6)
    spe = RPEAttention(32, 2, rpe="spe-sine", pos_dim=1, num_features=16).to(DEVICE)
    q, k, v, pos = _inputs((1, 5), 2, 16, 1)
    with pytest.raises(ValueError, match="does not support"):
        linear_attention(q, k, v, pos, featurizer=spe.featurizer, engine="triton")
    with pytest.raises(ValueError, match="engine must be"):
        linear_attention(q, k, v, pos, featurizer=spe.featurizer, engine="cuda")
    assert fused.fused_support(spe.featurizer) is not None
    with pytest.raises(ValueError, match="engine must be"):
        RPEAttention(32, 2, engine="fast")


@pytest.mark.parametrize("name", ["mask-favor-masked", "mask-elu-kernel", "logit-gm"])
def test_long_graphs_split_over_programs(name, monkeypatch):
    """Keys of one graph spread over several programs (their states add atomically) and
    queries over several readers, as at 1M tokens; graphs run in groups of one (a state
    budget smaller than a graph's state), as for many graphs."""
    monkeypatch.setattr(fused, "STATE_CHUNK", 32)
    monkeypatch.setattr(fused, "READ_CHUNK", 32)
    monkeypatch.setattr(fused, "STATE_BUDGET", 1)
    layer = _layer(name).to(DEVICE)
    sizes = torch.tensor([100, 3, 70])
    batch = torch.repeat_interleave(torch.arange(3), sizes).to(DEVICE)
    q, k, v, pos = _inputs((int(sizes.sum()),), 2, 16, 2)
    _close(*_both(layer, q, k, v, pos, batch=batch))
    assert fused._graph_groups(3, per_graph=10) == [(0, 1), (1, 2), (2, 3)]
    work = fused._work(torch.tensor([0, 100, 103, 173]), 32)
    assert work.tolist() == [
        [0, 0, 32], [0, 32, 64], [0, 64, 96], [0, 96, 100], [1, 100, 103],
        [2, 103, 135], [2, 135, 167], [2, 167, 173],
    ]  # fmt: skip
