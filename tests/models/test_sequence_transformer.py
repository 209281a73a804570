"""SequenceTransformer: causal LM with 1D RPEs (no future leak, padding, exact baseline)."""

import pytest
import torch

from geolinrpe.models import SequenceTransformer
from geolinrpe.nn import use_reference

D64 = torch.float64
TIGHT = dict(atol=1e-10, rtol=1e-10)
RPES = [
    dict(rpe="flt-kernel"),
    dict(rpe="flt-kernel", mode="mask"),
    dict(rpe="flt-gm"),
    dict(rpe="rope"),
    dict(rpe="toeplitz-fft", max_len=32),
    dict(rpe="lrpe-unitary"),
    dict(rpe=None),
    dict(rpe="flt-kernel", attention="exact"),
]


def tiny(**kw):
    options = dict(vocab_size=13, embed_dim=16, num_heads=2, num_layers=2, num_features=16)
    options.update(kw)
    return SequenceTransformer(**options).to(D64).eval()


@pytest.mark.parametrize("kw", RPES)
def test_logits_at_t_do_not_depend_on_later_tokens(kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 13, (2, 17))
    logits = model(tokens)
    assert logits.shape == (2, 17, 13) and torch.isfinite(logits).all()
    for t in (0, 5, 16):
        changed = tokens.clone()
        changed[:, t + 1 :] = torch.randint(0, 13, changed[:, t + 1 :].shape)
        torch.testing.assert_close(model(changed)[:, : t + 1], logits[:, : t + 1], **TIGHT)
    # ... and do depend on earlier ones
    changed = tokens.clone()
    changed[:, 0] = (changed[:, 0] + 1) % 13
    assert (model(changed)[:, 1:] - logits[:, 1:]).abs().max() > 1e-6


def test_no_future_gradient():
    model = tiny(rpe="flt-kernel")
    emb = model.embedding.weight
    tokens = torch.randint(0, 13, (1, 9))
    h = emb[tokens].detach().requires_grad_(True)
    pos = torch.arange(9, dtype=D64).view(1, 9, 1)
    out = model.encoder(h, pos)
    weights = torch.randn(out.shape[-1], dtype=D64)  # not .sum(): a layer-normed row sums to 0
    (grad,) = torch.autograd.grad((out[0, 4] * weights).sum(), h)
    assert (grad[0, 5:] == 0).all() and grad[0, :5].abs().sum() > 0


@pytest.mark.parametrize("kw", [dict(rpe="flt-kernel"), dict(rpe="toeplitz-fft", max_len=16)])
def test_right_padding_equals_shorter_sequence(kw):
    model = tiny(**kw)
    tokens = torch.randint(0, 13, (2, 11))
    mask = torch.zeros(2, 11, dtype=torch.bool)
    mask[1, 6:] = True
    logits = model(tokens, key_padding_mask=mask)
    torch.testing.assert_close(logits[1, :6], model(tokens[1:, :6])[0], **TIGHT)
    assert (logits[1, 6:] == 0).all()
    as_dict = model({"tokens": tokens, "key_padding_mask": mask})
    torch.testing.assert_close(as_dict, logits, **TIGHT)


def test_exact_attention_model_equals_reference_path():
    linear, exact = tiny(rpe="flt-kernel"), tiny(rpe="flt-kernel", attention="exact")
    exact.load_state_dict(linear.state_dict())
    tokens = torch.randint(0, 13, (2, 12))
    with use_reference(linear):
        want = linear(tokens)
    torch.testing.assert_close(exact(tokens), want, **TIGHT)
    with use_reference(linear, kernel="features", rpe="features"):
        explicit = linear(tokens)
    torch.testing.assert_close(explicit, linear(tokens), **TIGHT)


def test_training_decreases_loss():
    torch.manual_seed(0)
    model = tiny(rpe="flt-kernel", tie_embeddings=False).float().train()
    tokens = torch.arange(24).remainder(6).repeat(4, 1)  # a periodic sequence to memorise
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        logits = model(tokens[:, :-1])
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 13), tokens[:, 1:].reshape(-1))
        loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.3 * losses[0]


def test_bad_options_and_inputs():
    with pytest.raises(ValueError, match="max_len"):
        tiny(rpe="toeplitz-fft")
    with pytest.raises(ValueError, match="vocab_size"):
        tiny(vocab_size=0)
    with pytest.raises(ValueError, match="repeats"):
        tiny(attention_options={"causal": False})
    with pytest.raises(ValueError, match="pos_dim"):
        tiny(rpe="flt-radial")  # 3D only
    model = tiny(max_len=8)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 4), 13))
    with pytest.raises(ValueError, match="max_len"):
        model(torch.zeros(1, 9, dtype=torch.long))
    with pytest.raises(ValueError, match="long"):
        model(torch.zeros(1, 4))
