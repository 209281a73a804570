"""Meta-gradients, meta-training, ES, baselines and checkpoints."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from geolinrpe.optim import (
    LearnedUpdateRule,
    MetaConfig,
    UpdateNetwork,
    build_network,
    init_state,
    load_checkpoint,
    make_task,
    meta_train,
    split_tasks,
    train_curve,
    truncation_loss,
    tune_learning_rates,
)


def _meta_loss(net: UpdateNetwork, specs, cfg: MetaConfig) -> float:
    """Mean normalised truncation loss of the first ``2 K`` steps on fixed tasks."""
    total = 0.0
    for i, spec in enumerate(specs):
        task = spec.build()
        gen = torch.Generator().manual_seed(i)
        params = task.init(gen)
        norm = task.loss(params, None).item()
        loss, _, _ = truncation_loss(
            net, task, params, init_state(params, net), 2 * cfg.truncation, gen, cfg.lr, norm
        )
        total += loss.item()
    return total / len(specs)


def test_meta_gradient_matches_central_differences() -> None:
    torch.manual_seed(0)
    net = UpdateNetwork(width=4, num_heads=1, rpe="flt-kernel").double()
    torch.nn.init.normal_(net.head.weight, std=0.5)
    task = make_task("quadratic", 3, dtype=torch.float64)
    params = task.init(torch.Generator().manual_seed(0))
    state = init_state(params, net)

    def loss_fn() -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return truncation_loss(net, task, params, state, 3, gen, 0.05, second_order=True)[0]

    targets = [net.head.weight, net.embed.bias, net.skip.weight, net.blocks[0].attn.qkv.weight]
    grads = torch.autograd.grad(loss_fn(), targets)
    assert all(torch.isfinite(g).all() for g in grads)
    h = 1e-6
    for tensor, grad in zip(targets, grads, strict=True):
        for idx in [0, tensor.numel() // 2, tensor.numel() - 1]:
            flat = tensor.data.view(-1)
            old = flat[idx].item()
            flat[idx] = old + h
            plus = loss_fn().item()
            flat[idx] = old - h
            minus = loss_fn().item()
            flat[idx] = old
            fd = (plus - minus) / (2 * h)
            assert abs(fd - grad.view(-1)[idx].item()) <= 1e-6 + 1e-5 * abs(fd), (fd, grad)


def test_short_meta_training_lowers_meta_loss(tmp_path) -> None:
    cfg = MetaConfig(
        families=("quadratic",),
        width=8,
        meta_steps=30,
        valid_every=30,
        num_valid_tasks=2,
        valid_steps=20,
        unroll=40,
        truncation=5,
        lr=0.05,
        meta_lr=1e-2,
        seed=0,
    )
    torch.manual_seed(0)
    specs = split_tasks("valid", cfg.families, 4)
    net = build_network(cfg)
    before = _meta_loss(net, specs, cfg)
    net, history = meta_train(cfg, out=tmp_path, log=None, net=net)
    after = _meta_loss(net, specs, cfg)
    # measured with seed 0: before 0.640, after 0.303
    assert after < 0.8 * before, (before, after)
    assert len(history["meta_loss"]) == 30 and history["valid"][-1][0] == 30
    # the untrained network is validated first; best.pt holds whichever scored lower
    assert history["valid"][0][0] == 0 and len(history["valid"]) == 2
    _, _, best = load_checkpoint(tmp_path / "best.pt")
    start, end = history["valid"][0][1], history["valid"][1][1]
    assert best["meta_step"] == (30 if end < start else 0) and best["best"] == min(start, end)
    loaded, cfg2, ckpt = load_checkpoint(tmp_path / "checkpoint.pt")
    assert cfg2 == cfg and ckpt["meta_optimizer"] is not None
    for a, b in zip(loaded.parameters(), net.parameters(), strict=True):
        assert torch.equal(a, b)


def test_es_and_no_rpe_run() -> None:
    for method, rpe in (("es", "flt-kernel"), ("tbptt", None)):
        cfg = MetaConfig(
            families=("quadratic", "rosenbrock"),
            rpe=rpe,
            width=8,
            method=method,
            es_pairs=2,
            meta_steps=3,
            valid_every=3,
            num_valid_tasks=2,
            valid_steps=10,
            unroll=10,
            truncation=5,
        )
        before = [p.detach().clone() for p in build_network(cfg).parameters()]
        net, history = meta_train(cfg, log=None)
        assert all(torch.isfinite(torch.tensor(history["meta_loss"])))
        assert any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))


def test_baselines_tune_and_train() -> None:
    specs = split_tasks("valid", ("quadratic",), 2)
    lrs = tune_learning_rates(specs, steps=30, names=["adam"], grids={"adam": [1e-3, 1e-1]})
    assert lrs == {"adam": {"quadratic": 1e-1}}
    curve = train_curve(specs[0].build(), "sgdm", 1e-2, 30)
    assert len(curve) == 30 and curve[-1] < curve[0]


def test_task_suite_losses_finite_and_differentiable() -> None:
    for spec in split_tasks("test", ("quadratic", "rosenbrock", "mlp", "conv", "molecule"), 5):
        task = spec.build()
        gen = torch.Generator().manual_seed(0)
        params = [p.requires_grad_(True) for p in task.init(gen)]
        loss = task.loss(params, task.sample(gen))
        grads = torch.autograd.grad(loss, params)
        assert loss.dim() == 0 and torch.isfinite(loss)
        assert all(torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads)
    seeds = {
        s.seed for split in ("train", "valid", "test") for s in split_tasks(split, ["mlp"], 50)
    }
    assert len(seeds) == 150


# ----------------------------------------------------------------------------- PES, curriculum,
# clipping, resume (issue 17)
class _ScalarLR(LearnedUpdateRule):
    """A 1-parameter "optimizer": ``w <- w - exp(theta) g``."""

    kind = "toy"
    state_keys = ()

    def __init__(self, log_lr: float) -> None:
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor([log_lr], dtype=torch.float64))
        self.config = {}

    def tensor_state(self, p):
        return {}

    def updates(self, params, grads, state, lrs):
        return [self.theta.exp() * g for g in grads], {"step": state["step"] + 1}


class _ToyQuadratic:
    """Deterministic ``0.5 sum a_i w_i^2`` with ``a = (1, 4)`` from ``w = (1, -1)``."""

    horizon_multiplier = 1

    def build(self, dtype):
        return self

    def init(self, gen):
        return [torch.tensor([1.0, -1.0], dtype=torch.float64)]

    def sample(self, gen):
        return None

    def loss(self, params, batch):
        return 0.5 * (torch.tensor([1.0, 4.0], dtype=torch.float64) * params[0] ** 2).sum()


def test_pes_is_unbiased_for_the_full_unroll_gradient() -> None:
    """Summed over the 4 truncations of one unroll (T = 8, K = 2), the PES estimates of 2000
    antithetic pairs average to the full-backprop gradient of the summed truncation losses
    (within 4 standard errors, themselves under 4% of it); truncated ES (perturbations not
    persisted) is biased."""
    from geolinrpe.optim.meta import _pes_gradient, _Worker

    cfg = MetaConfig(
        families=("quadratic",),
        method="pes",
        truncation=2,
        unroll=8,
        lr=1.0,
        num_particles=2000,
        sigma=0.02,
        dtype="float64",
    )
    net = _ScalarLR(-2.0)
    worker = _Worker([_ToyQuadratic()], 0, cfg, net)
    task, norm = worker.task, worker.norm
    # the true gradient: backprop through all 4 truncations (second order, nothing detached)
    params, state, total = task.init(None), init_state(task.init(None), net), 0.0
    for _ in range(4):
        loss, params, state = truncation_loss(net, task, params, state, 2, None, 1.0, norm, True)
        total = total + loss
    (true,) = torch.autograd.grad(total, [net.theta])
    gen = torch.Generator().manual_seed(0)
    per_pair = 0.0
    truncated = 0.0
    for _ in range(4):
        xi_before = torch.stack([p["xi"] for p in worker.particles])
        _, _, particles, estimates = _pes_gradient(net, worker, cfg, gen)
        per_pair = per_pair + estimates
        # the same losses with only this truncation's perturbation: truncated ES
        eps = torch.stack([p["xi"] for p in particles]) - xi_before
        truncated = truncated + estimates * eps / (xi_before + eps)
        worker.particles = particles
        worker.advance(None, None)
    assert worker.steps == 0 and all(p["xi"].eq(0).all() for p in worker.particles)  # reset
    mean, se = per_pair.mean().item(), per_pair.std().item() / per_pair.numel() ** 0.5
    # measured: mean -0.5731, standard error 0.0170, true -0.5533, truncated ES -0.265
    assert se < 0.04 * abs(true.item())  # the tolerance below is tight enough to mean something
    assert abs(mean - true.item()) <= 4 * se, (mean, se, true.item())
    tes = truncated.mean().item()
    assert abs(tes - true.item()) > 0.2 * abs(true.item()), (tes, true.item())


def _small(**kw) -> MetaConfig:
    base = dict(
        families=("quadratic", "rosenbrock"),
        width=8,
        meta_steps=4,
        valid_every=100,
        num_valid_tasks=1,
        valid_steps=5,
        unroll=10,
        truncation=5,
    )
    return MetaConfig(**{**base, **kw})


@pytest.mark.parametrize("network", ["spatial", "temporal"])
def test_learn_direction_through_config_and_checkpoint(tmp_path, network) -> None:
    """``learn_direction: false`` reaches the network, meta-trains (PES) and survives a
    checkpoint; a non-bool is refused by name."""
    cfg = MetaConfig.from_dict(
        {
            **_small(method="pes", meta_steps=2).__dict__,
            "network": network,
            "learn_direction": False,
        }
    )
    assert not build_network(cfg).learn_direction
    trained, _ = meta_train(cfg, out=tmp_path, log=None)
    net, loaded, _ = load_checkpoint(tmp_path / "checkpoint.pt")
    assert loaded.learn_direction is False and net.head.out_features == 1
    for a, b in zip(net.parameters(), trained.parameters(), strict=True):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="'learn_direction'"):
        MetaConfig.from_dict({"learn_direction": "no"})


def test_curriculum_and_clipping(monkeypatch) -> None:
    cfg = _small(unroll_schedule=(5, 20, 3), meta_steps=5, clip_norm=1e-3)
    assert [cfg.unroll_at(s) for s in range(1, 6)] == [5, 12, 20, 20, 20]
    assert MetaConfig(unroll_schedule=[10, 30], meta_steps=5).unroll_at(3) == 20
    held = _small(unroll_schedule=(5, 20, 3, 2), meta_steps=6)  # 5 up to meta-step 2, then ramp
    assert [held.unroll_at(s) for s in range(1, 7)] == [5, 5, 5, 12, 20, 20]
    for bad in [(5, 20, 3, -1), (5, 20, 0), (5,), (5, 20, 3, 2, 1)]:
        with pytest.raises(ValueError, match="unroll_schedule"):
            _small(unroll_schedule=bad)
    seen = []
    step = torch.optim.Adam.step

    def spy(self, *args, **kwargs):
        grads = [p.grad for g in self.param_groups for p in g["params"] if p.grad is not None]
        seen.append(torch.linalg.vector_norm(torch.stack([g.norm() for g in grads])).item())
        return step(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", spy)
    _, history = meta_train(cfg, log=None)
    assert history["unroll"] == [5, 12, 20, 20, 20]
    assert len(seen) == 5 and max(seen) <= 1e-3 * (1 + 1e-5), seen
    assert min(history["grad_norm"]) > 1e-3  # the clip was active
    assert MetaConfig(clip_norm=0.0).max_grad_norm == float("inf")
    assert MetaConfig(clip=2.0).max_grad_norm == 2.0


def test_resume_continues_exactly(tmp_path) -> None:
    for method in ("tbptt", "pes"):
        # 4 meta-steps in one go == 2, checkpoint, resume, 2 more (the ramp is given: by
        # default it follows meta_steps, which differs between the two halves)
        whole = _small(method=method, num_particles=2, unroll_schedule=(5, 10, 4))
        half = _small(method=method, num_particles=2, unroll_schedule=(5, 10, 4), meta_steps=2)
        out = tmp_path / method
        full, history = meta_train(whole, log=None)
        meta_train(half, out=out, log=None)
        resumed, history2 = meta_train(whole, log=None, resume=out / "checkpoint.pt")
        for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
            assert torch.equal(a, b), method
        assert history2["meta_loss"] == history["meta_loss"], method
    with pytest.raises(ValueError, match="lr"):
        meta_train(MetaConfig(**{**whole.__dict__, "lr": 0.5}), resume=out / "checkpoint.pt")
    # a 2-value schedule ramps over meta_steps: changing meta_steps moves horizons already run
    ramp_all = _small(method="tbptt", unroll_schedule=(5, 10), meta_steps=2)
    meta_train(ramp_all, out=tmp_path / "ramp", log=None)
    with pytest.raises(ValueError, match="horizon"):
        longer = MetaConfig(**{**ramp_all.__dict__, "meta_steps": 4})
        meta_train(longer, log=None, resume=tmp_path / "ramp" / "checkpoint.pt")


def test_resume_lengthens_the_horizon(tmp_path) -> None:
    # 2 meta-steps at horizon 10, resumed with a schedule holding 10 to meta-step 2 then
    # ramping to 20, == the whole run with that schedule; a schedule that changes a horizon
    # already run is refused
    longer = _small(method="pes", num_particles=2, unroll_schedule=(10, 20, 2, 2))
    full, history = meta_train(longer, log=None)
    meta_train(_small(method="pes", num_particles=2, meta_steps=2), out=tmp_path, log=None)
    resumed, history2 = meta_train(longer, log=None, resume=tmp_path / "checkpoint.pt")
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert history2["unroll"] == history["unroll"] == [10, 10, 10, 20]
    assert history2["meta_loss"] == history["meta_loss"]
    early = MetaConfig(**{**longer.__dict__, "unroll_schedule": (10, 20, 2)})
    with pytest.raises(ValueError, match="unroll_schedule"):
        meta_train(early, log=None, resume=tmp_path / "checkpoint.pt")


def test_validation_does_not_change_meta_training() -> None:
    # validating every meta-step or never gives the same network (validation draws from its
    # own generators), so how often a run validates only changes which checkpoints compete
    runs = [
        meta_train(_small(method="pes", num_particles=2, valid_every=every), log=None)[0]
        for every in (1, 100)
    ]
    for a, b in zip(*(net.parameters() for net in runs), strict=True):
        assert torch.equal(a, b)


def test_config_from_dict_and_cli(tmp_path) -> None:
    from geolinrpe.optim.cli import load_config

    cfg = MetaConfig.from_dict({"lr": "1e-3", "families": ["quadratic"], "rpe": "none"})
    assert cfg.lr == 1e-3 and cfg.families == ("quadratic",) and cfg.rpe is None
    with pytest.raises(ValueError, match="'learning_rate'"):
        MetaConfig.from_dict({"learning_rate": 1.0})
    with pytest.raises(ValueError, match="'meta_steps'"):
        MetaConfig.from_dict({"meta_steps": "many"})
    path = tmp_path / "c.yaml"
    path.write_text("method: pes\nmeta_steps: 7\nunroll_schedule: [10, 40]\n")
    cfg = load_config(path, ["sigma=0.1", "families=[quadratic]"])
    assert (cfg.method, cfg.meta_steps, cfg.unroll_schedule, cfg.sigma) == ("pes", 7, (10, 40), 0.1)
    assert cfg.families == ("quadratic",)
    path.write_text("metod: pes\n")
    with pytest.raises(ValueError, match="'metod'"):
        load_config(path)
    example = Path(__file__).parents[2] / "examples" / "configs" / "lopt" / "meta_train.yaml"
    cfg = load_config(example)
    assert cfg.method == "pes" and cfg.network == "temporal" and cfg.objective == "log"
    assert cfg.family_lrs["rosenbrock"] == pytest.approx(0.1, rel=1e-7)
    assert cfg.valid_at == (200, 1000) and cfg.valid_metric == "mean_loss"
    assert not cfg.learn_direction and cfg.unroll_schedule == (200, 1000, 300, 600)
    assert [cfg.unroll_at(s) for s in (600, 601, 750, 900, 1200)] == [200, 200, 599, 1000, 1000]


def test_cli_meta_train_with_config(tmp_path, capsys) -> None:
    from geolinrpe.optim.cli import main

    path = tmp_path / "c.yaml"
    path.write_text(
        "families: [quadratic]\nwidth: 4\nmeta_steps: 2\nvalid_every: 2\nnum_valid_tasks: 1\n"
        "valid_steps: 5\nunroll: 10\ntruncation: 5\nmethod: pes\nnum_particles: 1\n"
    )
    main(
        [
            "meta-train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "--meta-steps",
            "3",
            "meta_steps=2",
            "checkpoint_every=1",
        ]
    )
    _, cfg, ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert cfg.method == "pes" and cfg.meta_steps == 2 and ckpt["meta_step"] == 2
    main(
        [
            "meta-train",
            "--config",
            str(path),
            "--out",
            str(tmp_path / "run"),
            "meta_steps=3",
            "--resume",
            str(tmp_path / "run" / "checkpoint.pt"),
        ]
    )
    _, cfg, ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert ckpt["meta_step"] == 3 and len(ckpt["history"]["meta_loss"]) == 3
    # without --config, --resume starts from the checkpoint's config (method: pes, not tbptt)
    run = ["meta-train", "--out", str(tmp_path / "run"), "--resume"]
    main(run + [str(tmp_path / "run" / "checkpoint.pt"), "meta_steps=4"])
    _, cfg, ckpt = load_checkpoint(tmp_path / "run" / "checkpoint.pt")
    assert (cfg.method, cfg.meta_steps, ckpt["meta_step"]) == ("pes", 4, 4)
    from geolinrpe.optim.cli import _config, build_parser

    flags = ["meta-train", "--family-lrs", "{quadratic: 0.05}", "--valid-at", "50", "100"]
    flags += ["--valid-metric", "mean_loss", "--no-learn-direction"]
    cfg = _config(build_parser().parse_args(flags))
    assert cfg.family_lrs == {"quadratic": 0.05} and cfg.valid_at == (50, 100)
    assert cfg.valid_metric == "mean_loss" and cfg.learn_direction is False
    with pytest.raises(SystemExit):
        build_parser().parse_args(["meta-train", "--family-lrs", "[0.1]"])


def test_family_learning_rates() -> None:
    cfg = MetaConfig.from_dict({"lr": 0.02, "family_lrs": {"quadratic": "1e-3"}})
    assert cfg.lr_for("quadratic") == 1e-3 and cfg.lr_for("mlp") == 0.02
    for bad in ({"cooking": 0.1}, {"mlp": 0.0}):
        with pytest.raises(ValueError, match="family_lrs"):
            MetaConfig(family_lrs=bad)
    with pytest.raises(ValueError, match="family_lrs"):
        MetaConfig.from_dict({"family_lrs": [0.1]})
    # workers train with their family's eta: a vanishing one leaves the loss where it started
    frozen = _small(families=("quadratic",), family_lrs={"quadratic": 1e-12}, meta_steps=1)
    _, history = meta_train(frozen, log=None)
    assert history["meta_loss"][0] == pytest.approx(1.0, rel=0.05)
    _, moving = meta_train(_small(families=("quadratic",), lr=0.1, meta_steps=1), log=None)
    assert moving["meta_loss"][0] < 0.9


def test_log_objective_and_early_exit() -> None:
    net = build_network(_small())
    task = make_task("quadratic", 0)
    gen = torch.Generator().manual_seed(0)
    params = task.init(gen)
    after_init = gen.get_state()
    norm = task.loss(params, None).item()
    curve = []
    for objective in ("relative", "log"):
        gen.set_state(after_init)
        loss, _, _ = truncation_loss(
            net, task, params, init_state(params, net), 6, gen, 0.05, norm, objective=objective
        )
        curve.append(loss.item())
    # train_curve's trajectory (seed 0: the same init and minibatches), read as the mean of
    # L_t / L_0 and of log(L_t / L_0)
    losses = train_curve(task, "learned", 0.05, 6, net=net, seed=0)
    assert curve[0] == pytest.approx(sum(losses) / 6 / norm, rel=1e-5)
    assert curve[1] == pytest.approx(sum(math.log(x / norm) for x in losses) / 6, rel=1e-5)
    with pytest.raises(ValueError, match="objective"):
        MetaConfig(objective="mean")

    class Exploding:
        calls = 0

        def sample(self, gen):
            return None

        def loss(self, params, batch):
            self.calls += 1
            return (params[0] ** 2).sum() * (math.inf if self.calls == 3 else 1.0)

    task = Exploding()
    p = [torch.ones(3)]
    loss, _, _ = truncation_loss(net, task, p, init_state(p, net), 10, None, 0.1)
    assert not torch.isfinite(loss) and task.calls == 3  # stopped at the first inf


def test_validation_reads_the_requested_steps() -> None:
    cfg = _small(valid_steps=20, valid_at=(10, 20))
    assert cfg.valid_at == (10, 20)
    with pytest.raises(ValueError, match="valid_at"):
        _small(valid_steps=20, valid_at=(30,))
    from geolinrpe.optim.meta import final_score, validation_score

    net = build_network(cfg)
    spec = split_tasks("valid", ("quadratic",), 1)
    curve = train_curve(spec[0].build(), "learned", cfg.lr, 20, net=net)
    expected = (final_score(curve[:10]) + final_score(curve)) / 2
    assert validation_score(net, spec, cfg) == pytest.approx(expected, rel=1e-6)
    cfg.objective = "log"  # the geometric mean
    expected = (math.log(final_score(curve[:10])) + math.log(final_score(curve))) / 2
    assert validation_score(net, spec, cfg) == pytest.approx(expected, rel=1e-6)
    assert cfg.validation_metric == "log_relative"
    # mean_loss: per step, log of the mean over tasks of the 5 losses ending there
    specs = split_tasks("valid", ("quadratic", "rosenbrock"), 2)
    cfg.valid_metric = "mean_loss"
    curves = [train_curve(s.build(), "learned", cfg.lr, 20, net=net) for s in specs]
    expected = sum(
        math.log(sum(sum(c[step - 5 : step]) / 5 for c in curves) / 2) for step in (10, 20)
    )
    assert validation_score(net, specs, cfg) == pytest.approx(expected / 2, rel=1e-6)
    with pytest.raises(ValueError, match="valid_metric"):
        _small(valid_metric="median")
    assert MetaConfig.from_dict({"valid_metric": "mean_loss"}).validation_metric == "mean_loss"
    with pytest.raises(ValueError, match="'valid_metric': 3 is not a str"):
        MetaConfig.from_dict({"valid_metric": 3})


def test_cli_evaluate_compares_checkpoints_with_tuned_baselines(tmp_path, capsys) -> None:
    from geolinrpe.optim.cli import main

    cfg = _small(families=("quadratic",), meta_steps=1, family_lrs={"quadratic": 0.05})
    meta_train(cfg, out=tmp_path / "run", log=None)
    main(
        [
            "evaluate",
            str(tmp_path / "run" / "best.pt"),
            "--out",
            str(tmp_path / "eval"),
            "--num-tasks",
            "1",
            "--steps",
            "20",
            "--tune-steps",
            "10",
        ]
    )
    import json

    results = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert (tmp_path / "eval" / "curves.png").is_file()
    names = {r["optimizer"] for r in results["rows"]}
    assert names == {"adam", "adamw_cosine", "sgd_momentum", "lopt-flt-kernel"}
    assert results["lrs"]["lopt-flt-kernel"] == {"quadratic": 0.05}  # the checkpoint's eta
    assert {r["step"] for r in results["records"]} == {5, 10, 20}
    assert "lopt-flt-kernel" in capsys.readouterr().out
