r"""Hand-designed baseline optimizers, tuned per family, and one evaluation of every optimizer
(baselines and learned update rules) on the same held-out tasks with the same budget.

Baselines (:data:`BASELINES`), each a factory ``(params, lr, total_steps) -> (optimizer,
scheduler | None)``; the scheduler, if any, is stepped once after every update:

* ``"adam"``: :class:`torch.optim.Adam`, constant ``lr``, default betas ``(0.9, 0.999)``;
* ``"adamw_cosine"``: :class:`torch.optim.AdamW` with weight decay :data:`WEIGHT_DECAY`
  (``1e-4``, decoupled) and cosine decay to 0 over the task's horizon ``T = total_steps``, no
  warmup: update ``t = 1..T`` uses ``lr * (1 + cos(pi (t - 1) / T)) / 2`` (the first update uses
  ``lr``; after ``T`` updates the scheduled rate is exactly 0);
* ``"sgd_momentum"``: :class:`torch.optim.SGD` with momentum 0.9 (heavy ball, no Nesterov).

Tuning (:func:`tune_learning_rates`): each baseline's learning rate is chosen per task family
from a log grid (:data:`DEFAULT_GRIDS`: Adam and AdamW ``1e-4 .. 1`` with 9 values, 2 per decade
and a bit; SGD ``1e-5 .. 1`` with 11 values) on meta-validation tasks (``split_tasks("valid",
...)``) by the mean over the family's tasks of :func:`~geolinrpe.optim.meta.final_score`
(the mean of the last 5 training losses at the tuning horizon divided by the initial loss,
capped at 10; a diverged run scores 10); ties go to the smaller learning rate. The cosine
schedule decays over the tuning horizon during tuning and over each task's own horizon in
evaluation.

Evaluation (:func:`evaluate_optimizers`): every task of every split (``"test"`` is recorded as
``split="in_dist"``, ``"ood"`` as ``"ood"``) is trained with every optimizer from the same seeded
initialisation and minibatches for ``steps * task.horizon_multiplier`` steps (5x for the ood
split). Records are taken at each requested step (default :data:`RECORD_STEPS` = 50, 200,
1,000; not rescaled for ood tasks) that lies within the task's horizon, and always at its final
step. The ``loss`` at step ``s`` is the mean of the ``window`` (5) minibatch training losses
ending at ``s`` (the losses before updates ``s - window + 1 .. s``); ``relative_loss = loss /
initial_loss``, the initial loss being the first minibatch loss at the (shared)
initialisation. :func:`summarize` reduces the records to means and spreads over tasks.

Curves come from :func:`~geolinrpe.optim.meta.run_curve`, the inner-training loop that
:func:`~geolinrpe.optim.meta.train_curve` also uses, with each optimizer *factory* and its
optional per-step scheduler (AdamW's cosine decay).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .learned import LearnedOptimizer, LearnedUpdateRule
from .meta import EvalResult, final_score, lr_grid, run_curve
from .tasks import TaskSpec

#: ``(optimizer, scheduler or None)``; the scheduler is stepped after every update
Built = tuple[torch.optim.Optimizer, "torch.optim.lr_scheduler.LRScheduler | None"]
#: ``(params, lr, total_steps) -> (optimizer, scheduler or None)``
Factory = Callable[[Sequence[Tensor], float, int], Built]

WEIGHT_DECAY = 1e-4
"""AdamW's decoupled weight decay."""
MOMENTUM = 0.9
"""SGD's momentum."""
RECORD_STEPS = (50, 200, 1000)
"""Default steps at which :func:`evaluate_optimizers` records the loss (plus each final step)."""
SPLIT_LABELS = {"test": "in_dist", "ood": "ood"}
"""Record ``split`` label by :func:`~geolinrpe.optim.tasks.split_tasks` split."""


def adam(params: Sequence[Tensor], lr: float, total_steps: int) -> Built:
    """Adam with a constant learning rate (``total_steps`` unused)."""
    return torch.optim.Adam(params, lr=lr), None


def cosine_factor(step: int, total_steps: int) -> float:
    """``(1 + cos(pi min(step, T) / T)) / 2``: 1 at step 0, 0 from step ``T`` on."""
    return 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / max(total_steps, 1)))


def adamw_cosine(params: Sequence[Tensor], lr: float, total_steps: int) -> Built:
    """AdamW (weight decay :data:`WEIGHT_DECAY`), ``lr`` decayed to 0 over ``total_steps``
    updates by a cosine, no warmup."""
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=WEIGHT_DECAY)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: cosine_factor(t, total_steps))
    return opt, sched


def sgd_momentum(params: Sequence[Tensor], lr: float, total_steps: int) -> Built:
    """SGD with momentum :data:`MOMENTUM`, constant learning rate (``total_steps`` unused)."""
    return torch.optim.SGD(params, lr=lr, momentum=MOMENTUM), None


BASELINES: dict[str, Factory] = {
    "adam": adam,
    "adamw_cosine": adamw_cosine,
    "sgd_momentum": sgd_momentum,
}
"""The hand-designed optimizers by name."""

DEFAULT_GRIDS: dict[str, list[float]] = {
    "adam": lr_grid(1e-4, 1.0, 9),
    "adamw_cosine": lr_grid(1e-4, 1.0, 9),
    "sgd_momentum": lr_grid(1e-5, 1.0, 11),
}
"""Log grids of learning rates searched by :func:`tune_learning_rates`."""


def learned_factory(net: LearnedUpdateRule) -> Factory:
    """A factory for :class:`~geolinrpe.optim.learned.LearnedOptimizer` with ``net``
    (``lr`` is its ``eta``; no scheduler)."""

    def build(params: Sequence[Tensor], lr: float, total_steps: int) -> Built:
        return LearnedOptimizer(params, net, lr=lr), None

    return build


def _factory(name: str) -> Factory:
    if name not in BASELINES:
        raise ValueError(f"unknown baseline {name!r}; choose from {tuple(BASELINES)}")
    return BASELINES[name]


def grid_scores(
    name: str,
    specs: Sequence[TaskSpec],
    steps: int,
    grid: Sequence[float] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, list[float]]:
    """``{family: [score per grid value]}``: the mean :func:`final_score` over the family's
    ``specs`` of baseline ``name`` trained ``steps * spec.horizon_multiplier`` steps."""
    factory = _factory(name)
    grid = DEFAULT_GRIDS[name] if grid is None else list(grid)
    scores: dict[str, list[float]] = {}
    for family in sorted({s.family for s in specs}):
        family_specs = [s for s in specs if s.family == family]
        scores[family] = []
        for lr in grid:
            values = [
                final_score(
                    run_curve(s.build(dtype), factory, lr, steps * s.horizon_multiplier, seed)
                )
                for s in family_specs
            ]
            scores[family].append(sum(values) / len(values))
    return scores


def tune_learning_rates(
    specs: Sequence[TaskSpec],
    steps: int,
    names: Sequence[str] = tuple(BASELINES),
    grids: Mapping[str, Sequence[float]] | None = None,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """``{baseline: {family: lr}}``: per family, the grid value with the lowest mean
    :func:`final_score` on ``specs`` (meta-validation tasks) at horizon ``steps``; ties go to the
    smaller learning rate. ``grids`` overrides :data:`DEFAULT_GRIDS` per baseline."""
    best: dict[str, dict[str, float]] = {}
    for name in names:
        grid = list(grids[name]) if grids is not None and name in grids else DEFAULT_GRIDS[name]
        scores = grid_scores(name, specs, steps, grid, dtype, seed)
        best[name] = {
            family: grid[min(range(len(grid)), key=values.__getitem__)]
            for family, values in scores.items()
        }
    return best


@dataclass
class Evaluation:
    """:func:`evaluate_optimizers`' output: the records, the full curves per split (as
    :class:`~geolinrpe.optim.meta.EvalResult`, for :func:`~geolinrpe.optim.meta.plot_curves`)
    and the wall-clock seconds per optimizer."""

    records: list[dict] = field(default_factory=list)
    curves: dict[str, EvalResult] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def record_steps(horizon: int, at: Sequence[int] = RECORD_STEPS) -> list[int]:
    """The steps of ``at`` within ``[1, horizon]``, and ``horizon``, sorted."""
    return sorted({s for s in at if 1 <= s <= horizon} | {horizon})


def curve_records(curve: Sequence[float], at: Sequence[int], window: int = 5) -> list[dict]:
    """``{step, loss, relative_loss, initial_loss}`` at each step of ``at`` (module docstring)."""
    initial = curve[0]
    rows = []
    for step in at:
        tail = curve[max(step - window, 0) : step]
        loss = sum(tail) / len(tail)
        rows.append(dict(step=step, loss=loss, relative_loss=loss / initial, initial_loss=initial))
    return rows


def evaluate_optimizers(
    splits: Mapping[str, Sequence[TaskSpec]],
    steps: int,
    tuned_lrs: Mapping[str, Mapping[str, float]],
    learned: Mapping[str, tuple[LearnedUpdateRule, float | Mapping[str, float]]] | None = None,
    at: Sequence[int] = RECORD_STEPS,
    window: int = 5,
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> Evaluation:
    """Train every task with every optimizer; records at the requested steps.

    Args:
        splits: ``{split: specs}``, split ``"test"`` (recorded as ``"in_dist"``) or ``"ood"``
            (any other name is recorded as is).
        steps: the step budget; each task trains ``steps * spec.horizon_multiplier`` steps.
        tuned_lrs: ``{baseline: {family: lr}}`` (:func:`tune_learning_rates`).
        learned: ``{label: (update rule, eta)}`` learned optimizers; ``eta`` a float or
            ``{family: eta}`` (e.g. ``MetaConfig.family_lrs``).
        at: record steps (module docstring); the final step is always recorded.

    Returns:
        :class:`Evaluation` whose records are ``{optimizer, family, split, task, seed, horizon,
        lr, step, loss, relative_loss, initial_loss}``.
    """
    optimizers: dict[str, tuple[Factory, Callable[[str], float]]] = {}
    for name, lrs in tuned_lrs.items():
        optimizers[name] = (_factory(name), lambda family, lrs=lrs: lrs[family])
    for label, (net, eta) in (learned or {}).items():
        eta_of = (lambda f, e=eta: e[f]) if isinstance(eta, Mapping) else (lambda f, e=eta: e)
        optimizers[label] = (learned_factory(net), eta_of)
    result = Evaluation()
    for split, specs in splits.items():
        label = SPLIT_LABELS.get(split, split)
        result.curves[label] = EvalResult()
        for name, (factory, lr_of) in optimizers.items():
            start = time.perf_counter()
            curves = result.curves[label].curves.setdefault(name, {})
            lrs = result.curves[label].lrs.setdefault(name, {})
            for spec in specs:
                lr = lr_of(spec.family)
                lrs[spec.family] = lr
                horizon = steps * spec.horizon_multiplier
                curve = run_curve(spec.build(dtype), factory, lr, horizon, seed)
                task = f"{spec.family}-{spec.seed}"
                curves[task] = curve
                for row in curve_records(curve, record_steps(horizon, at), window):
                    result.records.append(
                        dict(
                            optimizer=name,
                            family=spec.family,
                            split=label,
                            task=task,
                            seed=spec.seed,
                            horizon=horizon,
                            lr=lr,
                            **row,
                        )
                    )
            result.seconds[name] = result.seconds.get(name, 0.0) + time.perf_counter() - start
    return result


def summarize(records: Sequence[dict]) -> list[dict]:
    """Rows ``{optimizer, split, family, step, tasks, diverged, loss_mean, loss_std,
    relative_mean, relative_std}`` over the tasks of each (optimizer, split, family, step); means
    and (population) standard deviations over the tasks whose loss is finite (``diverged``
    counts the others); ``family="all"`` pools the tasks of every family of the split (with as
    many tasks per family, its ``loss_mean`` is the mean of the families' mean losses), except
    records marked ``pool=False``."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["optimizer"], r["split"], r["family"], r["step"]), []).append(r)
        if r.get("pool", True):
            groups.setdefault((r["optimizer"], r["split"], "all", r["step"]), []).append(r)

    def stats(values: list[float]) -> tuple[float, float]:
        if not values:
            return math.nan, math.nan
        mean = sum(values) / len(values)
        return mean, math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))

    rows = []
    for (optimizer, split, family, step), group in groups.items():
        finite = [r for r in group if math.isfinite(r["loss"])]
        loss = stats([r["loss"] for r in finite])
        rel = stats([r["relative_loss"] for r in finite])
        rows.append(
            dict(
                optimizer=optimizer,
                split=split,
                family=family,
                step=step,
                tasks=len(group),
                diverged=len(group) - len(finite),
                loss_mean=loss[0],
                loss_std=loss[1],
                relative_mean=rel[0],
                relative_std=rel[1],
            )
        )
    order = {name: i for i, name in enumerate(dict.fromkeys(r["optimizer"] for r in records))}
    rows.sort(
        key=lambda r: (
            r["split"] != "in_dist",
            r["family"] == "all",
            r["family"],
            order[r["optimizer"]],
            r["step"],
        )
    )
    return rows
