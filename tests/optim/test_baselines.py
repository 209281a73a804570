import math

import pytest
import torch

from geolinrpe.optim import MetaConfig, build_network, split_tasks, train_curve
from geolinrpe.optim.baselines import (
    BASELINES,
    WEIGHT_DECAY,
    adamw_cosine,
    evaluate_optimizers,
    grid_scores,
    record_steps,
    run_curve,
    summarize,
    tune_learning_rates,
)
from geolinrpe.optim.meta import final_score
from geolinrpe.optim.tasks import TaskSpec

QUAD = TaskSpec("quadratic", 20_001)
LRS = {"adam": 3e-2, "adamw_cosine": 3e-2, "sgd_momentum": 1e-2}


@pytest.mark.parametrize("name", sorted(BASELINES))
def test_factory_builds_and_lowers_quadratic_loss(name):
    task = QUAD.build()
    params = [p.requires_grad_(True) for p in task.init(torch.Generator().manual_seed(0))]
    opt, sched = BASELINES[name](params, LRS[name], 100)
    assert isinstance(opt, torch.optim.Optimizer)
    assert (sched is not None) == (name == "adamw_cosine")
    curve = run_curve(task, BASELINES[name], LRS[name], 100)
    assert len(curve) == 100 and all(math.isfinite(c) for c in curve)
    assert sum(curve[-5:]) / 5 < 0.5 * curve[0]


def test_adamw_cosine_decays_to_zero_at_horizon():
    param = torch.zeros(3, requires_grad=True)
    opt, sched = adamw_cosine([param], 0.1, 20)
    assert opt.param_groups[0]["weight_decay"] == WEIGHT_DECAY
    used = []
    for _ in range(20):
        used.append(opt.param_groups[0]["lr"])
        param.grad = torch.ones(3)
        opt.step()
        sched.step()
    assert used[0] == pytest.approx(0.1)
    assert used[10] == pytest.approx(0.05)
    assert all(a > b for a, b in zip(used, used[1:], strict=False))
    assert 0 < used[-1] < 0.1 * (math.pi / 20) ** 2
    assert opt.param_groups[0]["lr"] == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize(("name", "key"), [("adam", "adam"), ("sgd_momentum", "sgdm")])
def test_run_curve_matches_train_curve(name, key):
    spec = TaskSpec("mlp", 20_002)
    ours = run_curve(spec.build(), BASELINES[name], 1e-2, 12, seed=3)
    theirs = train_curve(spec.build(), key, 1e-2, 12, seed=3)
    assert ours == theirs


def test_tuning_picks_brute_force_best():
    specs = [TaskSpec("quadratic", 10_000), TaskSpec("rosenbrock", 10_001)]
    grid = [1e-3, 1e-2, 1e-1, 1.0]
    tuned = tune_learning_rates(
        specs, 30, names=["adam", "sgd_momentum"], grids={"adam": grid, "sgd_momentum": grid}
    )
    for name in ("adam", "sgd_momentum"):
        for spec in specs:
            brute = [final_score(run_curve(spec.build(), BASELINES[name], lr, 30)) for lr in grid]
            assert tuned[name][spec.family] == grid[brute.index(min(brute))]
    # the score is the mean over the family's tasks
    two = [TaskSpec("quadratic", 10_000), TaskSpec("quadratic", 10_002)]
    scores = grid_scores("adam", two, 30, grid)["quadratic"]
    for lr, score in zip(grid, scores, strict=True):
        each = [final_score(run_curve(s.build(), BASELINES["adam"], lr, 30)) for s in two]
        assert score == pytest.approx(sum(each) / 2)


def test_evaluation_records():
    families = ("quadratic", "rosenbrock")
    splits = {"test": split_tasks("test", families, 2), "ood": split_tasks("ood", families, 2)}
    lrs = {name: {f: LRS[name] for f in families} for name in BASELINES}
    net = build_network(MetaConfig(width=8, rpe=None, families=families))
    result = evaluate_optimizers(splits, 12, lrs, {"learned": (net, 1e-2)}, at=(5, 50, 200))
    keys = {"optimizer", "family", "split", "task", "step", "loss", "relative_loss"}
    assert all(keys <= set(r) for r in result.records)
    assert {r["optimizer"] for r in result.records} == set(BASELINES) | {"learned"}
    assert {r["split"] for r in result.records} == {"in_dist", "ood"}
    for r in result.records:
        assert r["relative_loss"] == pytest.approx(r["loss"] / r["initial_loss"])
    ood = [r for r in result.records if r["split"] == "ood"]
    ind = [r for r in result.records if r["split"] == "in_dist"]
    assert {r["horizon"] for r in ood} == {60} and {r["step"] for r in ood} == {5, 50, 60}
    assert {r["horizon"] for r in ind} == {12} and {r["step"] for r in ind} == {5, 12}
    for label in ("in_dist", "ood"):
        for curves in result.curves[label].curves.values():
            assert {len(c) for c in curves.values()} == {12 if label == "in_dist" else 60}
    # the records' losses are window means of the curve ending at the step
    r = next(r for r in ood if r["optimizer"] == "adam" and r["step"] == 50)
    curve = result.curves["ood"].curves["adam"][r["task"]]
    assert r["loss"] == pytest.approx(sum(curve[45:50]) / 5)
    assert r["initial_loss"] == curve[0]
    rows = summarize(result.records)
    row = next(
        x
        for x in rows
        if (x["optimizer"], x["split"], x["family"], x["step"]) == ("adam", "ood", "quadratic", 60)
    )
    assert row["tasks"] == 1 and row["diverged"] == 0 and row["relative_std"] == 0.0


def test_record_steps():
    assert record_steps(60) == [50, 60]
    assert record_steps(300) == [50, 200, 300]
    assert record_steps(1000) == [50, 200, 1000]


def test_summary_pools_tasks_except_unpooled_records():
    def rec(family, loss, pool=True, optimizer="adam"):
        return dict(
            optimizer=optimizer,
            split="in_dist",
            family=family,
            step=200,
            loss=loss,
            relative_loss=loss / 10,
            pool=pool,
        )

    records = [rec("a", 1.0), rec("a", 3.0), rec("b", 0.5), rec("b", 1.5), rec("c", 100.0, False)]
    rows = {r["family"]: r for r in summarize(records)}
    assert rows["a"]["loss_mean"] == 2.0 and rows["c"]["loss_mean"] == 100.0
    # two tasks per pooled family: the mean over tasks is the mean of the families' means
    assert rows["all"]["tasks"] == 4 and rows["all"]["loss_mean"] == pytest.approx(1.5)
    assert rows["all"]["relative_mean"] == pytest.approx(0.15)
    diverged = summarize([rec("a", math.inf), rec("a", 2.0)])
    assert diverged[0]["diverged"] == 1 and diverged[0]["loss_mean"] == 2.0
