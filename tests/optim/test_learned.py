"""LearnedOptimizer mechanics and the functional step."""

from __future__ import annotations

import copy

import pytest
import torch

from geolinrpe.optim import (
    LearnedOptimizer,
    UpdateNetwork,
    entry_positions,
    init_state,
    learned_step,
)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3))


def _loss(model: torch.nn.Module) -> torch.Tensor:
    x = torch.linspace(-1, 1, 35).view(7, 5)
    return model(x).pow(2).mean()


def _net(rpe: str | None = "flt-kernel") -> UpdateNetwork:
    torch.manual_seed(1)
    net = UpdateNetwork(width=8, num_heads=2, rpe=rpe)
    torch.nn.init.normal_(net.head.weight, std=0.3)  # so the attention path matters
    return net


def _train(model, opt, steps: int) -> None:
    for _ in range(steps):
        opt.zero_grad()
        _loss(model).backward()
        opt.step()


def test_positions_normalised_row_col() -> None:
    pos = entry_positions(torch.Size([3, 2, 2]), torch.float64, torch.device("cpu"))
    assert pos.shape == (12, 2)
    assert torch.equal(pos[0], torch.tensor([0.0, 0.0], dtype=torch.float64))
    assert torch.equal(pos[5], torch.tensor([0.5, 1 / 3], dtype=torch.float64))
    assert torch.equal(pos[-1], torch.tensor([1.0, 1.0], dtype=torch.float64))
    vec = entry_positions(torch.Size([5]), torch.float64, torch.device("cpu"))
    assert torch.equal(vec[:, 1], torch.zeros(5, dtype=torch.float64))


@pytest.mark.parametrize("rpe", ["flt-kernel", None])
def test_steps_lower_loss_and_keep_shapes(rpe) -> None:
    model = _model()
    shapes = [p.shape for p in model.parameters()]
    opt = LearnedOptimizer(model.parameters(), UpdateNetwork(rpe=rpe), lr=0.05)
    before = _loss(model).item()
    _train(model, opt, 20)
    assert [p.shape for p in model.parameters()] == shapes
    assert _loss(model).item() < 0.5 * before


def test_state_dict_round_trip_reproduces_next_step() -> None:
    net = _net()
    model = _model()
    opt = LearnedOptimizer(model.parameters(), net, lr=0.01)
    _train(model, opt, 3)
    saved_model, saved_opt = copy.deepcopy(model.state_dict()), copy.deepcopy(opt.state_dict())
    _train(model, opt, 1)
    expected = [p.detach().clone() for p in model.parameters()]

    model2 = _model()
    model2.load_state_dict(saved_model)
    opt2 = LearnedOptimizer(model2.parameters(), net, lr=0.5)
    opt2.load_state_dict(saved_opt)
    assert opt2.param_groups[0]["lr"] == 0.01
    _train(model2, opt2, 1)
    for a, b in zip(expected, model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_param_groups_scale_updates() -> None:
    net = _net()
    m1, m2 = _model(), _model()
    o1 = LearnedOptimizer(m1.parameters(), net, lr=0.01)
    o2 = LearnedOptimizer(
        [{"params": m2[0].parameters(), "lr": 0.02}, {"params": m2[2].parameters()}], net, lr=0.01
    )
    start = [p.detach().clone() for p in m1.parameters()]
    _train(m1, o1, 1)
    _train(m2, o2, 1)
    for i, (s, p1, p2) in enumerate(zip(start, m1.parameters(), m2.parameters(), strict=True)):
        factor = 2.0 if i < 2 else 1.0
        torch.testing.assert_close(p2 - s, factor * (p1 - s), rtol=1e-5, atol=1e-7)


def test_closure_and_no_grad_parameter_untouched() -> None:
    net = _net()
    model = _model()
    frozen = torch.nn.Parameter(torch.ones(3))
    opt = LearnedOptimizer([*model.parameters(), frozen], net, lr=0.01)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = _loss(model)
        loss.backward()
        return loss

    loss = opt.step(closure)
    assert torch.isclose(loss, _loss(_model()))
    assert torch.equal(frozen, torch.ones(3)) and frozen not in opt.state
    assert opt.state[model[0].weight]["step"] == 1


def test_zero_grad_is_finite() -> None:
    net = _net()
    p = torch.nn.Parameter(torch.zeros(4, 3))
    opt = LearnedOptimizer([p], net, lr=0.01)
    p.grad = torch.zeros_like(p)
    opt.step()
    assert torch.isfinite(p).all()
    assert torch.isfinite(opt.state[p]["second"]).all()


def test_functional_step_matches_optimizer_and_is_pure() -> None:
    net = _net()
    model = _model()
    params = [p.detach().clone() for p in model.parameters()]
    _loss(model).backward()
    grads = [p.grad.clone() for p in model.parameters()]
    state = init_state(params, net)
    new, new_state = learned_step(net, params, grads, state, lr=0.01)
    assert state["step"] == 0 and float(state["second"][0].abs().sum()) == 0.0  # not mutated
    assert new_state["step"] == 1
    opt = LearnedOptimizer(model.parameters(), net, lr=0.01)
    opt.step()
    for a, b in zip(new, model.parameters(), strict=True):
        torch.testing.assert_close(a, b.detach())


def test_rpe_changes_the_update() -> None:
    """The RPE path is live: moving positions' structure (a transpose) changes the update."""
    net = _net()
    w = torch.randn(6, 5, generator=torch.Generator().manual_seed(0))
    g = torch.randn(6, 5, generator=torch.Generator().manual_seed(1))
    new, _ = learned_step(net, [w], [g], init_state([w], net), lr=0.1)
    new_t, _ = learned_step(
        net, [w.T.contiguous()], [g.T.contiguous()], init_state([w.T], net), 0.1
    )
    assert not torch.allclose(new[0], new_t[0].T, atol=1e-6)


def test_zero_head_is_exactly_adam_and_net_owns_its_state() -> None:
    """With its head zeroed the network is its skip, the Adam direction: Adam's updates; the
    functional wrappers are the network's own ``init_state`` / ``updates``."""
    net = UpdateNetwork(width=8).double()
    torch.nn.init.zeros_(net.head.weight)
    m1, m2 = _model().double(), _model().double()
    o1 = LearnedOptimizer(m1.parameters(), net, lr=0.02)
    o2 = torch.optim.Adam(m2.parameters(), lr=0.02)
    x = torch.linspace(-1, 1, 35, dtype=torch.float64).view(7, 5)
    for _ in range(4):
        for model, opt in ((m1, o1), (m2, o2)):
            opt.zero_grad()
            model(x).pow(2).mean().backward()
            opt.step()
        for a, b in zip(m1.parameters(), m2.parameters(), strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    params = [p.detach() for p in m1.parameters()]
    state = init_state(params, net)
    assert state.keys() == net.init_state(params).keys() == {"step", "momenta", "second"}
    grads = [torch.ones_like(p) for p in params]
    deltas, new_state = net.updates(params, grads, state, [0.02] * len(params))
    new, functional = learned_step(net, params, grads, state, lr=0.02)
    for w, d, n in zip(params, deltas, new, strict=True):
        assert torch.equal(w - d, n)
    assert new_state["step"] == functional["step"] == 1
    _, per_tensor = net.updates(params, grads, dict(state, step=[0, 3, 1, 2]), [0.02] * 4)
    assert per_tensor["step"] == [1, 4, 2, 3]


@pytest.mark.parametrize("kind", ["spatial", "temporal"])
def test_learn_direction_false_sets_step_sizes_on_the_skip_direction(kind) -> None:
    """``learn_direction=False``: a one-channel head (the log-scale), so the update is the
    two-channel network's with its direction row zeroed; gradients reach head and skip."""
    from geolinrpe.optim import TemporalUpdateNetwork

    cls = UpdateNetwork if kind == "spatial" else TemporalUpdateNetwork
    torch.manual_seed(2)
    scale_only = cls(width=8, learn_direction=False).double()
    both = cls(width=8).double()
    assert scale_only.head.out_features == 1 and scale_only.config["learn_direction"] is False
    with torch.no_grad():
        torch.nn.init.normal_(scale_only.head.weight, std=0.3)
        torch.nn.init.normal_(scale_only.head.bias, std=0.3)
        torch.nn.init.normal_(scale_only.skip.weight, std=0.3)
        both.load_state_dict(
            {k: v for k, v in scale_only.state_dict().items() if not k.startswith("head.")},
            strict=False,
        )
        both.head.weight.copy_(
            torch.cat([torch.zeros_like(scale_only.head.weight), scale_only.head.weight])
        )
        both.head.bias.copy_(torch.cat([torch.zeros(1, dtype=torch.float64), scale_only.head.bias]))
    gen = torch.Generator().manual_seed(0)
    params = [
        torch.randn(5, 3, generator=gen, dtype=torch.float64),
        torch.randn(3, generator=gen, dtype=torch.float64),
    ]
    state_a, state_b = scale_only.init_state(params), both.init_state(params)
    for _ in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in params]
        deltas_a, state_a = scale_only.updates(params, grads, state_a, [0.02, 0.02])
        deltas_b, state_b = both.updates(params, grads, state_b, [0.02, 0.02])
        for a, b in zip(deltas_a, deltas_b, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-15)
    sum(d.sum() for d in deltas_a).backward()
    assert scale_only.head.weight.grad.abs().sum() > 0
    assert scale_only.skip.weight.grad[0].abs().sum() > 0
    with pytest.raises(ValueError, match="learn_direction"):
        cls(width=8, learn_direction="no")
