"""TemporalUpdateNetwork: attention over each entry's gradient history with a 1D RPE over lags."""

from __future__ import annotations

import copy

import pytest
import torch

from geolinrpe.optim import (
    LearnedOptimizer,
    MetaConfig,
    TemporalUpdateNetwork,
    build_network,
    init_state,
    learned_step,
    load_checkpoint,
    make_task,
    meta_train,
    save_checkpoint,
    truncation_loss,
)
from geolinrpe.optim.learned import _tensor_features, update_moments


def _model(dtype=torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))
    return model.to(dtype)


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 35, dtype=model[0].weight.dtype).view(7, 5)
    return model(x).pow(2).mean()


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()


def _net(history: int = 4, head_std: float = 0.3, **options) -> TemporalUpdateNetwork:
    """A small network whose attention path matters (the head is perturbed off zero)."""
    torch.manual_seed(1)
    net = TemporalUpdateNetwork(history=history, width=8, num_heads=2, **options)
    torch.nn.init.normal_(net.head.weight, std=head_std)
    return net


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"rpe": None},
        {"spatial_layers": 1},
        {"num_layers": 2, "history": 3},
        {"learn_direction": False},
    ],
)
def test_untrained_is_exactly_adam(options) -> None:
    """Zero head + Adam skip: the updates are Adam's, through the padded first T - 1 steps."""
    options = {"history": 4, "width": 8, **options}
    torch.manual_seed(0)
    net = TemporalUpdateNetwork(**options).double()
    m1, m2 = _model(torch.float64), _model(torch.float64)
    o1 = LearnedOptimizer(m1.parameters(), net, lr=0.02)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.02, betas=(0.9, 0.999), eps=1e-8)
    for _ in range(7):  # steps 1-3 padded (T = 4), 4-7 full
        _train(m1, o1, 1)
        _train(m2, o2, 1)
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_history_buffer_shifts() -> None:
    net = _net(history=3).double()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(4, 2, generator=gen, dtype=torch.float64)
    state = init_state([w], net)
    assert state["history"][0].shape == (3, 8, net.num_history_features)
    m, v, rows = state["momenta"][0], state["second"][0], []
    for step in range(1, 6):
        g = torch.randn(4, 2, generator=gen, dtype=torch.float64)
        m, v = update_moments(net, g, m, v)
        rows.append(_tensor_features(w, g, m, v, step, net)[:, :-1])  # no step count
        (w,), state = learned_step(net, [w], [g], state, lr=0.01)
        hist = state["history"][0]
        for lag in range(3):
            expected = rows[-1 - lag] if lag < step else torch.zeros_like(rows[0])
            torch.testing.assert_close(hist[lag], expected, rtol=0, atol=0)
        assert state["step"] == step


def test_meta_gradient_through_three_step_unroll() -> None:
    net = _net(history=4).double()
    task = make_task("quadratic", 3, dtype=torch.float64)
    params = task.init(torch.Generator().manual_seed(0))
    state = init_state(params, net)

    def loss_fn() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return truncation_loss(net, task, params, state, 3, gen, 0.05, second_order=True)[0]

    named = dict(net.named_parameters())
    grads = dict(zip(named, torch.autograd.grad(loss_fn(), list(named.values())), strict=True))
    for name, grad in grads.items():
        assert torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    rpe = net.blocks[0].attn.rpe
    for tensor, grad in ((rpe.log_lengthscale, grads["blocks.0.attn.rpe.log_lengthscale"]),
                         (net.embed.weight, grads["embed.weight"])):  # fmt: skip
        flat, idx, h = tensor.data.view(-1), 1, 1e-6
        old = flat[idx].item()
        flat[idx] = old + h
        plus = loss_fn().item()
        flat[idx] = old - h
        minus = loss_fn().item()
        flat[idx] = old
        fd = (plus - minus) / (2 * h)
        assert abs(fd - grad.view(-1)[idx].item()) <= 1e-7 + 1e-5 * abs(fd), (fd, grad)

    untrained = TemporalUpdateNetwork(history=4, width=8).double()  # zero head: head learns first
    gen = torch.Generator().manual_seed(1)
    loss = truncation_loss(untrained, task, params, init_state(params, untrained), 3, gen, 0.05)[0]
    (grad,) = torch.autograd.grad(loss, [untrained.head.weight])
    assert grad.abs().sum() > 0


def test_rpe_sees_only_lags() -> None:
    net = _net(history=6)
    tokens = torch.randn(5, 6, net.num_history_features, generator=torch.Generator().manual_seed(0))
    mask = torch.zeros(5, 6, dtype=torch.bool)
    mask[:2, 4:] = True  # two entries with 4 lags filled
    with torch.no_grad():
        ref = net.summarize(tokens, mask)
        lags = torch.arange(6.0)
        for offset in (20.0, 40.0):  # the same history at absolute steps 20.. and 40..
            torch.testing.assert_close(net.summarize(tokens, mask, lags + offset), ref)
        # the RPE is live: reordering the past changes the summary; without RPE it does not
        order = torch.tensor([0, 3, 1, 5, 2, 4])
        full = torch.zeros_like(mask)
        reordered = net.summarize(tokens[:, order], full)
        assert not torch.allclose(reordered, net.summarize(tokens, full))
        plain = _net(history=6, rpe=None)
        torch.testing.assert_close(
            plain.summarize(tokens[:, order], full), plain.summarize(tokens, full)
        )


def test_same_history_same_update_at_step_20_and_40() -> None:
    """End to end: with the step-dependent inputs off (the step count, and the Adam feature with
    its bias corrections), a state at step 20 and one at step 40 with the same buffers give the
    same update (to 1e-9: ``log(v_hat + eps)`` keeps a trace of the bias correction through
    ``eps``); switching the step-count embedding back on separates them."""
    net = _net(history=4).double()
    adam = len(net.betas) + 1
    with torch.no_grad():
        net.embed.weight[:, adam] = 0
        net.skip.weight[:, adam] = 0
        net.skip.weight[:, -1] = 0
        net.step_embed.weight.zero_()
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(3, 4, generator=gen, dtype=torch.float64)
    state = init_state([w], net)
    for _ in range(5):
        _, state = learned_step(net, [w], [torch.randn_like(w)], state, lr=0.1)
    g = torch.randn_like(w)
    at = [learned_step(net, [w], [g], dict(state, step=s), lr=0.1)[0][0] for s in (20, 40)]
    torch.testing.assert_close(at[0], at[1], rtol=1e-7, atol=1e-9)
    with torch.no_grad():
        torch.nn.init.normal_(net.step_embed.weight)
    at = [learned_step(net, [w], [g], dict(state, step=s), lr=0.1)[0][0] for s in (20, 40)]
    assert (at[0] - at[1]).abs().max() > 1e-4


@pytest.mark.parametrize("spatial_layers", [0, 1])
def test_torch_optim_interface_trains(spatial_layers) -> None:
    model = _model()
    opt = LearnedOptimizer(
        model.parameters(), _net(head_std=0.01, spatial_layers=spatial_layers), lr=0.05
    )
    before = _loss(model).item()
    _train(model, opt, 20)
    assert _loss(model).item() < 0.5 * before
    assert opt.state[model[0].weight]["history"].shape == (4, 20, 7)


def test_state_dict_round_trip_reproduces_next_step() -> None:
    net = _net()
    model = _model()
    opt = LearnedOptimizer(model.parameters(), net, lr=0.01)
    _train(model, opt, 2)  # inside the padded phase (T = 4)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 3)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(model2.parameters(), net, lr=0.5)
    opt2.load_state_dict(saved_opt)
    assert opt2.state[model2[0].weight]["step"] == 2
    _train(model2, opt2, 3)
    for a, b in zip(expected, model2.parameters(), strict=True):
        assert torch.equal(a, b)
    from geolinrpe.optim import UpdateNetwork

    other = LearnedOptimizer(_model().parameters(), UpdateNetwork(width=8), lr=0.01)
    other.load_state_dict(saved_opt)  # a temporal state fits the spatial network's keys
    wrong = LearnedOptimizer(model2.parameters(), net, lr=0.01)
    wrong.load_state_dict(other.state_dict())
    wrong.state[model2[0].weight].pop("history")
    with pytest.raises(ValueError, match="history"):
        _train(model2, wrong, 1)


def test_checkpoint_round_trip_and_meta_training(tmp_path) -> None:
    cfg = MetaConfig(
        families=("quadratic",),
        network="temporal",
        history=3,
        spatial_layers=1,
        width=8,
        meta_steps=2,
        valid_every=2,
        num_valid_tasks=1,
        valid_steps=5,
        unroll=8,
        truncation=4,
        lr=0.05,
    )
    net = build_network(cfg)
    assert isinstance(net, TemporalUpdateNetwork) and net.history == 3 and len(net.spatial) == 1
    net, history = meta_train(cfg, out=tmp_path, log=None, net=net)  # 2 truncations, detached
    assert len(history["meta_loss"]) == 2
    assert all(torch.isfinite(torch.tensor(history["meta_loss"])))
    loaded, cfg2, ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert cfg2 == cfg and ckpt["network"] == "temporal"
    assert isinstance(loaded, TemporalUpdateNetwork) and loaded.config == net.config
    for (name, a), b in zip(net.state_dict().items(), loaded.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    torch.nn.init.normal_(net.head.weight, std=0.3)
    save_checkpoint(tmp_path / "perturbed.pt", net, None, cfg, {})
    loaded = load_checkpoint(tmp_path / "perturbed.pt")[0]
    w, g = torch.randn(5, 3), torch.randn(5, 3)
    a = learned_step(net, [w], [g], init_state([w], net), 0.1)[0][0]
    b = learned_step(loaded, [w], [g], init_state([w], loaded), 0.1)[0][0]
    assert torch.equal(a, b)
