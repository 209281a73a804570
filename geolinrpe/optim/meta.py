r"""Meta-training of learned update rules (:class:`~geolinrpe.optim.learned.UpdateNetwork`,
:class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork`) and the evaluation harness.

Truncated backpropagation through time (TBPTT, Metz et al. 2019,
https://arxiv.org/abs/1810.10180): each of ``meta_batch`` workers trains one task from the
meta-train split for ``unroll`` inner steps (then draws a new task and restarts); a meta-step
advances every worker by ``truncation`` steps ``K`` with the functional
:func:`~geolinrpe.optim.learned.learned_step` and back-propagates

.. math::  \mathcal{L}_{meta}(\theta) = \frac{1}{K} \sum_{t=1}^{K} L_t(w_t(\theta)) / L_0

(the inner training losses over the truncation, normalised by the task's loss at
initialisation so that families of different scale weigh alike; ``objective="log"`` averages
``log(L_t / L_0)`` instead, which weighs a halving of the loss alike at every scale and in
every family) into the network parameters
``theta``; gradients are clipped to ``clip`` (global norm) and applied with Adam. With
``second_order=True`` the inner gradients are built with ``create_graph=True`` (the exact
meta-gradient of the truncation); otherwise they are treated as constants (first order).
Inner parameters and state are detached between truncations.

``method="es"``: antithetic evolution strategies on the same truncated meta-loss,
``g = 1 / (2 sigma P) sum_p [L(theta + sigma eps_p) - L(theta - sigma eps_p)] eps_p`` with the
same minibatches for both signs (common random numbers), no backpropagation.

``method="pes"``: persistent evolution strategies (Vicol, Metz and Sohl-Dickstein, ICML 2021,
"Unbiased Gradient Estimation in Unrolled Computation Graphs with Persistent Evolution
Strategies", https://arxiv.org/abs/2112.13835). Each worker keeps ``num_particles`` antithetic
pairs of inner trajectories; pair ``i`` holds its own two inner states (trained with
``theta + eps`` and ``theta - eps``) and the sum ``xi_i`` of the perturbations it has seen since
its inner task (re)started. A truncation draws fresh ``eps_i ~ N(0, sigma^2 I)`` per pair,
accumulates ``xi_i <- xi_i + eps_i``, runs both members ``K`` steps on the same minibatches and
estimates

.. math::  \hat g = \frac{1}{P} \sum_{i=1}^{P} \frac{L_i^+ - L_i^-}{2 \sigma^2}\, \xi_i ,

an unbiased estimate of the gradient of the (Gaussian-smoothed) truncation loss with respect to
``theta`` *through the whole unroll so far* (the summed estimates over an unroll are unbiased
for the full-unroll meta-gradient, unlike truncated ES or TBPTT). ``xi_i`` and both states are
reset when the worker's inner task restarts. The logged meta-loss is ``mean (L^+ + L^-) / 2``.

Curriculum (``unroll_schedule = (T_start, T_end[, ramp[, begin]])``): the inner horizon ``T`` at
meta-step ``s`` (1-based) is ``T_start`` up to meta-step ``begin`` (default 0), then ramps
linearly, ``round(T_start + (T_end - T_start) min(1, (s - begin - 1) / max(ramp - 1, 1)))``,
``ramp`` defaulting to ``meta_steps``; a worker restarts its task once it has run ``T`` times
the task's ``horizon_multiplier`` inner steps (checked after each truncation of ``K`` steps).
With ``begin``, a run meta-trained at horizon ``T_start`` can be resumed to lengthen its
horizon (below: a resumed run may change the horizon it has not reached yet).

Base learning rate: the learned optimizer's ``eta`` is ``lr``, or ``family_lrs[family]`` for
the families listed there (e.g. tuned Adam's learning rate per family: an untrained
:class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork` is exactly Adam with ``eta``, so
meta-training then starts from tuned Adam), in meta-training, validation and evaluation alike.

Validation (before the first meta-step and every ``valid_every`` meta-steps; the best score is
saved as ``best.pt``, so it stays the untrained network if nothing beats it): each
meta-validation task is trained ``valid_steps`` steps and its loss / initial loss read at the
steps ``valid_at`` (default: the last); the score is the mean of those ratios, or of their
logarithms with ``objective="log"``, or with ``valid_metric="mean_loss"`` the mean over those
steps of the log mean loss over tasks (:func:`validation_score`).

Meta-gradient clipping: every method's meta-gradient (TBPTT's backprop, ES's and PES's
estimates) is clipped to global norm ``clip_norm`` (falling back to the older ``clip``; ``<= 0``
disables) before the Adam meta-step; ``history["grad_norm"]`` holds the norm before clipping.

Checkpoint and resume: with ``out``, ``checkpoint.pt`` is written every ``checkpoint_every``
meta-steps (``0``: at validations only), at every validation and at the end. It holds the
network, the Adam state, the config, the history, the meta-step, the best validation score,
the meta RNG and torch's global RNG state and every worker (its RNG, task index, inner
parameters and state, normaliser, steps and the PES particles with their ``xi``), so
``meta_train(cfg, resume=path)`` continues exactly where the run stopped (TBPTT, ES and PES
alike; tested bit-exact for TBPTT and PES). The resumed config may change what
:data:`RESUMABLE_CHANGES` lists, and the horizon where it has not been reached: a run stopped
at meta-step ``s`` at horizon 200 continues with ``meta_steps=1200`` and
``unroll_schedule=(200, 1000, 300, s)`` exactly as a run with that schedule from the start.

Baselines and the comparison on held-out tasks live in :mod:`geolinrpe.optim.baselines`; this
module keeps the inner-training loop they share (:func:`run_curve`, :func:`train_curve`) and
the curves' container and plot (:class:`EvalResult`, :func:`plot_curves`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from torch import Tensor

from .learned import (
    LearnedOptimizer,
    LearnedUpdateRule,
    UpdateNetwork,
    init_state,
    learned_step,
)
from .tasks import FAMILIES, Task, TaskSpec, split_tasks
from .temporal import TemporalUpdateNetwork

OPTIMIZERS = ("learned", "adam", "sgdm")
#: meta-training methods (``MetaConfig.method``)
METHODS = ("tbptt", "es", "pes")
OBJECTIVES = ("relative", "log")
VALID_METRICS = ("relative", "log_relative", "mean_loss")
#: update networks by ``MetaConfig.network`` (and the ``"network"`` key of checkpoints)
NETWORKS: dict[str, type[LearnedUpdateRule]] = {
    "spatial": UpdateNetwork,
    "temporal": TemporalUpdateNetwork,
}


@dataclass
class MetaConfig:
    """Meta-training configuration (saved in every checkpoint).

    Defaults assume a 2-core CPU (measured: 60 meta-steps in 7 s without RPE, 17 s with).
    """

    families: tuple[str, ...] = ("quadratic", "rosenbrock", "mlp", "molecule")
    rpe: str | None = "flt-kernel"
    network: str = "spatial"  # "spatial" (UpdateNetwork) or "temporal" (TemporalUpdateNetwork)
    history: int = 8  # temporal network: T, feature vectors kept per entry
    spatial_layers: int = 0  # temporal network: entry-attention blocks after the summary
    width: int = 16
    num_heads: int = 2
    num_layers: int = 1
    lr: float = 1e-2  # eta: lr_base of the learned optimizer
    family_lrs: dict[str, float] | None = None  # eta per task family (others: lr)
    mag_scale: float = 0.1  # alpha in the update's magnitude exp(alpha s)
    learn_direction: bool = True  # False: the network sets step sizes on the skip's direction
    unroll: int = 100  # T: inner steps per task before a new task is drawn
    truncation: int = 10  # K: inner steps per meta-gradient
    meta_steps: int = 200
    meta_batch: int = 2
    meta_lr: float = 3e-3
    clip: float = 1.0  # older name of clip_norm (used when clip_norm is None)
    clip_norm: float | None = None  # global-norm clip of the meta-gradient; <= 0 disables
    second_order: bool = False
    method: str = "tbptt"  # "tbptt", "es" or "pes" (module docstring)
    objective: str = "relative"  # meta-loss per inner step: L_t / L_0 or log(L_t / L_0)
    es_sigma: float = 0.01
    es_pairs: int = 4
    num_particles: int = 4  # pes: antithetic pairs per worker (2 inner trajectories each)
    sigma: float = 0.01  # pes: std of the per-truncation perturbation eps
    unroll_schedule: tuple[int, ...] | None = None  # (T_start, T_end[, ramp[, begin]])
    checkpoint_every: int = 0  # with out: also checkpoint every this many meta-steps
    num_train_tasks: int = 64
    num_valid_tasks: int = 8
    valid_every: int = 50
    valid_steps: int = 100
    valid_at: tuple[int, ...] | None = None  # validation reads the loss here (default: the end)
    valid_metric: str | None = None  # VALID_METRICS (default: after the objective)
    seed: int = 0
    dtype: str = "float32"

    def __post_init__(self) -> None:
        if self.network not in NETWORKS:
            raise ValueError(f"network must be one of {tuple(NETWORKS)}, got {self.network!r}")
        if self.history < 1 or self.spatial_layers < 0:
            raise ValueError("need history >= 1 and spatial_layers >= 0")
        if self.valid_metric is not None and self.valid_metric not in VALID_METRICS:
            raise ValueError(
                f"valid_metric must be one of {VALID_METRICS} or None, got {self.valid_metric!r}"
            )
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, got {self.objective!r}")
        if self.method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {self.method!r}")
        if self.truncation <= 0 or self.unroll < self.truncation:
            raise ValueError("need 0 < truncation <= unroll")
        if self.num_particles < 1 or not self.sigma > 0:
            raise ValueError("need num_particles >= 1 and sigma > 0")
        if self.valid_at is not None:
            self.valid_at = tuple(int(x) for x in self.valid_at)
            if not self.valid_at or not all(5 <= x <= self.valid_steps for x in self.valid_at):
                raise ValueError(
                    f"valid_at must be steps in [5, valid_steps={self.valid_steps}], "
                    f"got {self.valid_at!r}"
                )
        if self.checkpoint_every < 0:
            raise ValueError("need checkpoint_every >= 0")
        if self.unroll_schedule is not None:
            schedule = tuple(int(x) for x in self.unroll_schedule)
            if len(schedule) not in (2, 3, 4) or any(
                x != y for x, y in zip(schedule, self.unroll_schedule, strict=True)
            ):
                raise ValueError(
                    f"unroll_schedule must be (T_start, T_end[, ramp[, begin]]) ints, "
                    f"got {self.unroll_schedule!r}"
                )
            if min(schedule[:2]) < self.truncation or min(schedule[2:3], default=1) < 1:
                raise ValueError("unroll_schedule needs T_start, T_end >= truncation, ramp >= 1")
            if min(schedule[3:], default=0) < 0:
                raise ValueError("unroll_schedule needs begin >= 0")
            self.unroll_schedule = schedule
        for family in self.families:
            if family not in FAMILIES:
                raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")
        self.families = tuple(self.families)
        if self.family_lrs is not None:
            lrs = dict(self.family_lrs)
            bad = {k: v for k, v in lrs.items() if k not in FAMILIES or not float(v) > 0}
            if bad:
                raise ValueError(
                    f"family_lrs must map task families {FAMILIES} to positive learning rates, "
                    f"got {bad!r}"
                )
            self.family_lrs = {k: float(v) for k, v in sorted(lrs.items())}
        if self.dtype not in ("float32", "float64", "bfloat16", "float16"):
            raise ValueError(
                f"dtype must be float32, float64, bfloat16 or float16, got {self.dtype!r}"
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)

    @property
    def validation_metric(self) -> str:
        """``valid_metric``, or by default ``"log_relative"`` with the log objective and
        ``"relative"`` otherwise."""
        if self.valid_metric is not None:
            return self.valid_metric
        return "log_relative" if self.objective == "log" else "relative"

    @property
    def max_grad_norm(self) -> float:
        """The meta-gradient clip in use: ``clip_norm``, else ``clip`` (``inf``: no clipping)."""
        value = self.clip if self.clip_norm is None else self.clip_norm
        return float(value) if value > 0 else math.inf

    def lr_for(self, family: str) -> float:
        """The learned optimizer's ``eta`` on tasks of ``family``: ``family_lrs[family]`` if
        given, else ``lr``."""
        return (self.family_lrs or {}).get(family, self.lr)

    def unroll_at(self, meta_step: int) -> int:
        """The inner horizon ``T`` at ``meta_step`` (1-based): ``unroll``, or the linear ramp of
        ``unroll_schedule`` (module docstring)."""
        if self.unroll_schedule is None:
            return self.unroll
        start, end, *rest = self.unroll_schedule
        ramp = rest[0] if rest else self.meta_steps
        begin = rest[1] if len(rest) > 1 else 0
        frac = min(1.0, max(0, meta_step - begin - 1) / max(ramp - 1, 1))
        return int(round(start + (end - start) * frac))

    @classmethod
    def from_dict(cls, values: dict) -> MetaConfig:
        """A config from plain values (YAML, overrides, checkpoints), converted to the fields'
        types (``1e-3`` written as a string by YAML 1.1 becomes a float, lists become tuples).

        Raises:
            ValueError: an unknown key (named) or a value of the wrong type.
        """
        known = {f.name: f for f in fields(cls)}
        kwargs = {}
        for key, value in values.items():
            if key not in known:
                raise ValueError(f"unknown MetaConfig key {key!r}; known keys: {sorted(known)}")
            kwargs[key] = _coerce(key, value, getattr(cls, key, None))
        return cls(**kwargs)


_NULLABLE = ("rpe", "clip_norm", "unroll_schedule", "family_lrs", "valid_at", "valid_metric")


def _coerce(key: str, value, default):
    """``value`` of MetaConfig field ``key`` (default ``default``) converted to its type."""
    if value is None or (key == "rpe" and str(value).lower() in ("none", "null")):
        if key in _NULLABLE:
            return None
        raise ValueError(f"MetaConfig key {key!r} cannot be null")
    if key == "family_lrs":
        if not isinstance(value, dict):
            raise ValueError(f"MetaConfig key 'family_lrs' needs a mapping, got {value!r}")
        try:
            return {str(k): float(v) for k, v in value.items()}
        except (TypeError, ValueError):
            raise ValueError(f"MetaConfig key 'family_lrs': {value!r} has a non-number") from None
    if key in ("families", "unroll_schedule", "valid_at"):
        value = [value] if isinstance(value, (str, int)) else value
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"MetaConfig key {key!r} needs a list, got {value!r}")
        return tuple(value)
    kind = "str" if default is None else type(default).__name__
    wrong = ValueError(f"MetaConfig key {key!r}: {value!r} is not a {kind}")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise wrong
        return value
    if key == "clip_norm" or isinstance(default, float):
        if isinstance(value, bool):
            raise wrong
        try:
            return float(value)
        except (TypeError, ValueError):
            raise wrong from None
    if isinstance(default, int):
        if isinstance(value, bool) or not isinstance(value, int):
            raise wrong
        return value
    if not isinstance(value, str):
        raise wrong
    return value


def build_network(cfg: MetaConfig) -> LearnedUpdateRule:
    """The network that ``cfg`` describes (seeded by ``cfg.seed``): ``network="spatial"``, an
    :class:`UpdateNetwork`; ``"temporal"``, a :class:`TemporalUpdateNetwork` with ``history``
    and ``spatial_layers`` (``rpe`` names both its 1D temporal and its 2D spatial RPE)."""
    torch.manual_seed(cfg.seed)
    shared = dict(
        width=cfg.width,
        num_heads=cfg.num_heads,
        num_layers=cfg.num_layers,
        rpe=cfg.rpe,
        mag_scale=cfg.mag_scale,
        learn_direction=cfg.learn_direction,
    )
    if cfg.network == "temporal":
        net = TemporalUpdateNetwork(
            cfg.history, spatial_layers=cfg.spatial_layers, spatial_rpe=cfg.rpe, **shared
        )
    else:
        net = UpdateNetwork(**shared)
    return net.to(cfg.torch_dtype)


def truncation_loss(
    net: LearnedUpdateRule,
    task: Task,
    params: Sequence[Tensor],
    state: dict,
    steps: int,
    generator: torch.Generator,
    lr: float,
    norm: float = 1.0,
    second_order: bool = False,
    objective: str = "relative",
) -> tuple[Tensor, list[Tensor], dict]:
    """Run ``steps`` functional inner steps; return (meta-loss, params, state).

    The meta-loss is the mean over the steps of ``L_t / norm`` (``objective="relative"``) or of
    ``log(L_t / norm)`` (``"log"``). It is differentiable with respect to ``net``'s parameters;
    ``params`` may be leaves (they are made to require grad). A non-finite inner loss ends the
    truncation at once and is returned as the meta-loss (callers check).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    params = [p if p.requires_grad else p.detach().requires_grad_(True) for p in params]
    total = 0.0
    for _ in range(steps):
        loss = task.loss(params, task.sample(generator))
        if not torch.isfinite(loss):
            return loss, params, state
        grads = torch.autograd.grad(loss, params, retain_graph=True, create_graph=second_order)
        if not second_order:
            grads = [g.detach() for g in grads]
        params, state = learned_step(net, params, grads, state, lr=lr)
        ratio = loss / norm
        total = total + (torch.log(ratio.clamp_min(1e-30)) if objective == "log" else ratio)
    return total / steps, params, state


def _detach_state(state: dict) -> dict:
    """``state`` with every tensor list (any network's ``state_keys``) detached."""
    return {
        key: value if key == "step" else [x.detach() for x in value] for key, value in state.items()
    }


class _Worker:
    """One inner-training run of the meta-batch: a task, its parameters and optimizer state
    (and, for PES, ``num_particles`` antithetic pairs of states with their summed
    perturbations ``xi``). ``unroll`` is the current horizon (set by :func:`meta_train`)."""

    def __init__(self, specs: Sequence[TaskSpec], seed: int, cfg: MetaConfig, net) -> None:
        self.specs, self.cfg, self.net = specs, cfg, net
        self.unroll = cfg.unroll_at(1)
        self.gen = torch.Generator().manual_seed(seed)
        self.reset()

    def reset(self) -> None:
        self.index = int(torch.randint(len(self.specs), (1,), generator=self.gen))
        self._build()
        self.params = self.task.init(self.gen)
        self.state = init_state(self.params, self.net)
        with torch.no_grad():
            self.norm = float(self.task.loss(self.params, self.task.sample(self.gen))) + 1e-8
        self.steps = 0
        self.particles: list[dict] = []
        if self.cfg.method == "pes":
            size = sum(p.numel() for p in self.net.parameters())
            dtype = next(self.net.parameters()).dtype
            fresh = {"params": self.params, "state": self.state}
            self.particles = [
                {"xi": torch.zeros(size, dtype=dtype), "plus": fresh, "minus": fresh}
                for _ in range(self.cfg.num_particles)
            ]

    def _build(self) -> None:
        spec = self.specs[self.index]
        self.task = spec.build(self.cfg.torch_dtype)
        self.lr = self.cfg.lr_for(getattr(spec, "family", ""))
        self.horizon_multiplier = getattr(spec, "horizon_multiplier", 1)

    def advance(self, params: list[Tensor] | None, state: dict | None) -> None:
        if params is not None:
            self.params = [p.detach() for p in params]
            self.state = _detach_state(state)
        self.steps += self.cfg.truncation
        if self.steps >= self.unroll * self.horizon_multiplier:
            self.reset()

    def state_dict(self) -> dict:
        """Everything needed to continue exactly (plain data and tensors)."""
        return {
            "index": self.index,
            "gen": self.gen.get_state(),
            "params": self.params,
            "state": self.state,
            "norm": self.norm,
            "steps": self.steps,
            "particles": self.particles,
        }

    def load_state_dict(self, data: dict) -> None:
        self.index = int(data["index"])
        self._build()
        self.gen.set_state(data["gen"])
        self.params, self.state = list(data["params"]), dict(data["state"])
        self.norm, self.steps = float(data["norm"]), int(data["steps"])
        self.particles = list(data["particles"])


def _es_gradient(
    net: LearnedUpdateRule, worker: _Worker, cfg: MetaConfig, gen: torch.Generator
) -> tuple[Tensor, float, list[Tensor], dict]:
    """Antithetic ES estimate of the truncated meta-gradient, flat like ``parameters_to_vector``."""
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    batch_seed = int(torch.randint(2**31, (1,), generator=gen))

    def loss_at(vector: Tensor) -> tuple[float, list[Tensor], dict]:
        with torch.no_grad():
            torch.nn.utils.vector_to_parameters(vector, net.parameters())
        inner = torch.Generator().manual_seed(batch_seed)
        loss, params, state = truncation_loss(
            net,
            worker.task,
            worker.params,
            worker.state,
            cfg.truncation,
            inner,
            worker.lr,
            worker.norm,
            objective=cfg.objective,
        )
        return float(loss.detach()), params, state

    grad = torch.zeros_like(theta)
    for _ in range(cfg.es_pairs):
        eps = torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
        plus, _, _ = loss_at(theta + cfg.es_sigma * eps)
        minus, _, _ = loss_at(theta - cfg.es_sigma * eps)
        if math.isfinite(plus) and math.isfinite(minus):
            grad += (plus - minus) / (2 * cfg.es_sigma * cfg.es_pairs) * eps
    center, params, state = loss_at(theta)
    with torch.no_grad():
        torch.nn.utils.vector_to_parameters(theta, net.parameters())
    return grad, center, params, state


def _pes_gradient(
    net: LearnedUpdateRule, worker: _Worker, cfg: MetaConfig, gen: torch.Generator
) -> tuple[Tensor, float, list[dict] | None, Tensor]:
    """PES estimate for one truncation of ``worker`` (module docstring), flat like
    ``parameters_to_vector``: ``(mean estimate, mean (L+ + L-) / 2, new particles, per-pair
    estimates [P, D])``; the new particles are ``None`` when a loss is not finite."""
    theta = torch.nn.utils.parameters_to_vector(net.parameters()).detach()
    batch_seed = int(torch.randint(2**31, (1,), generator=gen))
    flags = [p.requires_grad for p in net.parameters()]
    for p in net.parameters():  # the inner loop needs gradients of params only
        p.requires_grad_(False)
    estimates, losses, particles = [], [], []
    finite = True
    try:
        for particle in worker.particles:
            eps = cfg.sigma * torch.randn(theta.shape, generator=gen, dtype=theta.dtype)
            xi = particle["xi"] + eps
            new = {"xi": xi}
            values = []
            for sign, key in ((1.0, "plus"), (-1.0, "minus")):
                torch.nn.utils.vector_to_parameters(theta + sign * eps, net.parameters())
                loss, params, state = truncation_loss(
                    net,
                    worker.task,
                    particle[key]["params"],
                    particle[key]["state"],
                    cfg.truncation,
                    torch.Generator().manual_seed(batch_seed),
                    worker.lr,
                    worker.norm,
                    objective=cfg.objective,
                )
                values.append(float(loss.detach()))
                new[key] = {"params": [p.detach() for p in params], "state": _detach_state(state)}
            finite = finite and all(math.isfinite(v) for v in values)
            estimates.append((values[0] - values[1]) / (2 * cfg.sigma**2) * xi)
            losses.append(sum(values) / 2)
            particles.append(new)
    finally:
        torch.nn.utils.vector_to_parameters(theta, net.parameters())
        for p, flag in zip(net.parameters(), flags, strict=True):
            p.requires_grad_(flag)
    stacked = torch.stack(estimates)
    return stacked.mean(0), sum(losses) / len(losses), particles if finite else None, stacked


def _set_flat_grad(net: LearnedUpdateRule, flat: Tensor) -> None:
    offset = 0
    for p in net.parameters():
        p.grad = flat[offset : offset + p.numel()].view_as(p).clone()
        offset += p.numel()


RESUMABLE_CHANGES = ("meta_steps", "valid_every", "valid_steps", "valid_at", "checkpoint_every")
"""Config fields a resumed run may change freely; ``unroll`` and ``unroll_schedule`` may change
too, and any change must leave the horizon the same at every meta-step already run (a
schedule's default ``ramp`` follows ``meta_steps``)."""


def meta_train(
    cfg: MetaConfig | None,
    out: str | Path | None = None,
    log: Callable[[str], None] | None = print,
    net: LearnedUpdateRule | None = None,
    resume: str | Path | None = None,
) -> tuple[LearnedUpdateRule, dict]:
    """Meta-train an update network (``cfg.method``: TBPTT, ES or PES); return it and the history.

    History: ``meta_loss`` (per meta-step, mean over the meta-batch of the normalised truncation
    loss), ``grad_norm`` (per meta-step, the meta-gradient's global norm before clipping; ``nan``
    when no worker gave a finite loss), ``unroll`` (the horizon of each meta-step), ``valid``
    (``(meta_step, score)`` on meta-validation tasks, :func:`validation_score`, from meta-step 0:
    the untrained network), ``seconds``.
    With ``out``, writes ``checkpoint.pt`` (see the module docstring: everything needed to
    resume) every ``cfg.checkpoint_every`` meta-steps, at every validation and at the end, and
    ``best.pt`` for the best validation score.

    Args:
        cfg: the configuration; ``None`` with ``resume``: the checkpoint's.
        resume: a ``checkpoint.pt`` of an earlier run: training continues at the meta-step after
            the saved one, exactly as if it had not stopped, up to ``cfg.meta_steps``. ``cfg``
            may differ from the saved config only in :data:`RESUMABLE_CHANGES`, and in the
            horizon (``unroll``, ``unroll_schedule``) at meta-steps after the saved one.

    Raises:
        ValueError: (``CheckpointError``) ``resume`` is not a resumable checkpoint, or ``cfg``
            differs from its config elsewhere (keys named).
    """
    ckpt = None
    if resume is not None:
        loaded_net, saved_cfg, ckpt = load_checkpoint(resume)
        if "workers" not in ckpt or "meta_step" not in ckpt:
            raise ValueError(f"checkpoint {str(resume)!r} has no meta-training state to resume")
        if cfg is None:
            cfg = saved_cfg
        free = RESUMABLE_CHANGES + ("unroll", "unroll_schedule")
        diff = [
            f.name
            for f in fields(MetaConfig)
            if f.name not in free and getattr(cfg, f.name) != getattr(saved_cfg, f.name)
        ]
        done = int(ckpt["meta_step"])
        if any(cfg.unroll_at(s) != saved_cfg.unroll_at(s) for s in range(1, done + 1)):
            diff.append(
                "the horizon (unroll, unroll_schedule, or meta_steps as its ramp) at "
                f"meta-steps 1-{done}, already run"
            )
        if diff:
            raise ValueError(f"cannot resume {str(resume)!r}: the config differs in {diff}")
        if net is None:
            net = loaded_net
        else:
            net.load_state_dict(loaded_net.state_dict())
    if cfg is None:
        raise ValueError("meta_train needs cfg (or resume)")
    net = build_network(cfg) if net is None else net
    meta_opt = torch.optim.Adam(net.parameters(), lr=cfg.meta_lr)
    train_specs = split_tasks("train", cfg.families, cfg.num_train_tasks)
    valid_specs = split_tasks("valid", cfg.families, cfg.num_valid_tasks)
    gen = torch.Generator().manual_seed(cfg.seed)
    workers = [_Worker(train_specs, cfg.seed * 1000 + i, cfg, net) for i in range(cfg.meta_batch)]
    history: dict = {"meta_loss": [], "grad_norm": [], "unroll": [], "valid": [], "seconds": 0.0}
    best = math.inf
    first = 1
    if ckpt is not None:
        meta_opt.load_state_dict(ckpt["meta_optimizer"])
        gen.set_state(ckpt["rng"]["meta"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        for worker, data in zip(workers, ckpt["workers"], strict=True):
            worker.load_state_dict(data)
        saved = ckpt["history"]
        history.update(
            {key: list(saved.get(key, [])) for key in ("meta_loss", "grad_norm", "unroll")}
        )
        history["valid"] = [tuple(v) for v in saved.get("valid", [])]
        history["seconds"] = float(saved.get("seconds", 0.0))
        best = float(ckpt.get("best", math.inf))
        first = int(ckpt["meta_step"]) + 1
    start = time.perf_counter() - history["seconds"]
    out = None if out is None else Path(out)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)

    def save(path: Path, meta_step: int) -> None:
        history["seconds"] = time.perf_counter() - start
        extra = {
            "meta_step": meta_step,
            "best": best,
            "rng": {"meta": gen.get_state(), "torch": torch.get_rng_state()},
            "workers": [w.state_dict() for w in workers],
        }
        save_checkpoint(path, net, meta_opt, cfg, history, extra)

    if ckpt is None:  # the starting point's score: best.pt stays there if nothing beats it
        best = validation_score(net, valid_specs, cfg)
        history["valid"].append((0, best))
        if log is not None:
            log(f"meta-step 0/{cfg.meta_steps}  valid {best:.4f}")
        if out is not None:
            save(out / "best.pt", 0)
    for meta_step in range(first, cfg.meta_steps + 1):
        meta_opt.zero_grad(set_to_none=True)
        losses = []
        unroll = cfg.unroll_at(meta_step)
        for worker in workers:
            worker.unroll = unroll
        if cfg.method == "tbptt":
            for worker in workers:
                inner = torch.Generator().manual_seed(
                    int(torch.randint(2**31, (1,), generator=gen))
                )
                loss, params, state = truncation_loss(
                    net,
                    worker.task,
                    worker.params,
                    worker.state,
                    cfg.truncation,
                    inner,
                    worker.lr,
                    worker.norm,
                    cfg.second_order,
                    cfg.objective,
                )
                if not torch.isfinite(loss):
                    worker.reset()
                    continue
                (loss / len(workers)).backward()
                losses.append(float(loss.detach()))
                worker.advance(params, state)
        elif cfg.method == "es":
            flat = None
            for worker in workers:
                grad, loss, params, state = _es_gradient(net, worker, cfg, gen)
                if not math.isfinite(loss):
                    worker.reset()
                    continue
                flat = grad / len(workers) if flat is None else flat + grad / len(workers)
                losses.append(loss)
                worker.advance(params, state)
            if flat is not None:
                _set_flat_grad(net, flat)
        else:  # pes
            flat = None
            for worker in workers:
                grad, loss, particles, _ = _pes_gradient(net, worker, cfg, gen)
                if particles is None:
                    worker.reset()
                    continue
                flat = grad / len(workers) if flat is None else flat + grad / len(workers)
                losses.append(loss)
                worker.particles = particles
                worker.advance(None, None)
            if flat is not None:
                _set_flat_grad(net, flat)
        grad_norm = math.nan
        if losses:
            grad_norm = float(torch.nn.utils.clip_grad_norm_(net.parameters(), cfg.max_grad_norm))
            grads_ok = all(p.grad is None or torch.isfinite(p.grad).all() for p in net.parameters())
            if grads_ok:
                meta_opt.step()
        history["meta_loss"].append(sum(losses) / len(losses) if losses else math.nan)
        history["grad_norm"].append(grad_norm)
        history["unroll"].append(unroll)
        if meta_step % cfg.valid_every == 0 or meta_step == cfg.meta_steps:
            score = validation_score(net, valid_specs, cfg)
            history["valid"].append((meta_step, score))
            history["seconds"] = time.perf_counter() - start
            if log is not None:
                recent = history["meta_loss"][-cfg.valid_every :]
                log(
                    f"meta-step {meta_step}/{cfg.meta_steps}  meta-loss "
                    f"{sum(recent) / len(recent):.4f}  valid {score:.4f}  "
                    f"({history['seconds']:.0f} s)"
                )
            improved = score < best
            best = min(best, score)
            if out is not None:
                save(out / "checkpoint.pt", meta_step)
                if improved:
                    save(out / "best.pt", meta_step)
        elif out is not None and cfg.checkpoint_every and meta_step % cfg.checkpoint_every == 0:
            save(out / "checkpoint.pt", meta_step)
    history["seconds"] = time.perf_counter() - start
    return net, history


def save_checkpoint(
    path: str | Path,
    net: LearnedUpdateRule,
    meta_opt,
    cfg: MetaConfig,
    history: dict,
    extra: dict | None = None,
) -> None:
    """Save ``{"net", "network", "net_config", "meta_optimizer", "config", "history"}``
    (``network``: the network's kind, a key of :data:`NETWORKS`) plus ``extra`` (from
    :func:`meta_train`: ``meta_step``, ``best``, ``rng``, ``workers``, what resuming needs) as
    plain data (tensors, dicts, lists, str, numbers: loadable with ``weights_only=True``), with
    a SHA-256 of the contents, atomically (:func:`geolinrpe.train.checkpoint.save_checkpoint`)."""
    from ..train.checkpoint import save_checkpoint as write

    write(
        {
            "net": net.state_dict(),
            "network": getattr(net, "kind", "spatial"),
            "net_config": _plain(net.config),
            "meta_optimizer": None if meta_opt is None else meta_opt.state_dict(),
            "config": _plain(asdict(cfg)),
            "history": _plain(history),
            **(extra or {}),
        },
        path,
    )


def _plain(value):
    """``value`` with tuples as lists and numpy scalars as Python numbers (plain data)."""
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and not isinstance(value, Tensor):
        return value.item()
    return value


_CHECKPOINT_KEYS = ("net", "net_config", "config")


def load_checkpoint(path: str | Path) -> tuple[LearnedUpdateRule, MetaConfig, dict]:
    """Rebuild ``(net, cfg, checkpoint)`` from :func:`save_checkpoint`'s file.

    Reads with ``torch.load(weights_only=True)`` only and verifies the file
    (:func:`geolinrpe.train.checkpoint.read_checkpoint`).

    Raises:
        CheckpointError: (a ``ValueError``) the file is missing, truncated, corrupted, holds
            objects other than tensors and plain data, lacks a key, or its network does not
            match its config; the message names the file.
    """
    from ..train.checkpoint import CheckpointError, read_checkpoint

    ckpt = read_checkpoint(path, _CHECKPOINT_KEYS, "learned-optimizer checkpoint")
    try:
        cfg = MetaConfig.from_dict(dict(ckpt["config"]))
        net_config = dict(ckpt["net_config"])
        if "betas" in net_config:
            net_config["betas"] = tuple(net_config["betas"])
        network = ckpt.get("network", "spatial")  # checkpoints before the temporal network
        if network not in NETWORKS:
            raise ValueError(f"unknown network {network!r}")
        net = NETWORKS[network](**net_config).to(cfg.torch_dtype)
        net.load_state_dict(ckpt["net"])
    except (KeyError, TypeError, ValueError, RuntimeError, AttributeError) as err:
        raise CheckpointError(
            f"checkpoint {str(path)!r} is not a usable learned-optimizer checkpoint "
            f"({type(err).__name__}: {err})"
        ) from err
    return net, cfg, ckpt


# ----------------------------------------------------------------------------- harness
def run_curve(task: Task, factory, lr: float, steps: int, seed: int = 0) -> list[float]:
    """Train ``task`` from its seeded init for ``steps`` updates with the optimizer (and
    optional per-step scheduler) ``factory(params, lr, steps) -> (optimizer, scheduler or
    None)``; the training loss at each step. Entry ``t`` is the minibatch loss before update
    ``t + 1``; a diverged run is padded with ``inf``."""
    gen = torch.Generator().manual_seed(seed)
    params = [p.requires_grad_(True) for p in task.init(gen)]
    opt, sched = factory(params, lr, steps)
    losses: list[float] = []
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss = task.loss(params, task.sample(gen))
        if not torch.isfinite(loss):
            return losses + [math.inf] * (steps - len(losses))
        loss.backward()
        opt.step()
        if sched is not None:
            sched.step()
        losses.append(loss.item())
    return losses


def train_curve(
    task: Task,
    optimizer: str,
    lr: float,
    steps: int,
    seed: int = 0,
    net: LearnedUpdateRule | None = None,
) -> list[float]:
    """:func:`run_curve` with an optimizer by name: ``"learned"`` (:class:`LearnedOptimizer`
    with ``net``, ``lr`` = eta), ``"adam"`` or ``"sgdm"`` (momentum 0.9)."""
    if optimizer == "learned" and net is None:
        raise ValueError("optimizer='learned' needs net")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")

    def factory(params, lr, steps):
        if optimizer == "learned":
            return LearnedOptimizer(params, net, lr=lr), None
        if optimizer == "adam":
            return torch.optim.Adam(params, lr=lr), None
        return torch.optim.SGD(params, lr=lr, momentum=0.9), None

    return run_curve(task, factory, lr, steps, seed)


def final_score(curve: Sequence[float], window: int = 5) -> float:
    """Normalised final loss: mean of the last ``window`` losses / the first loss (``inf`` if
    diverged; capped at 10 so one divergence cannot dominate a mean)."""
    tail = curve[-window:]
    value = sum(tail) / len(tail) / (curve[0] + 1e-12)
    return min(value, 10.0) if math.isfinite(value) else 10.0


def validation_score(net: LearnedUpdateRule, specs: Sequence[TaskSpec], cfg: MetaConfig) -> float:
    """The learned optimizer's validation score on ``specs`` (lower is better): each task is
    trained ``cfg.valid_steps`` steps and read at each step of ``cfg.valid_at`` (default: the
    last). ``cfg.valid_metric`` (default: ``"relative"`` or ``"log_relative"`` after
    ``cfg.objective``):

    * ``"relative"``: the mean over tasks and steps of :func:`final_score` (loss / initial
      loss);
    * ``"log_relative"``: the mean of its logarithm (a geometric mean, so that no family's
      collapse hides behind another's gain);
    * ``"mean_loss"``: the mean over steps of ``log`` of the mean loss over tasks (each loss the
      mean of the 5 ending at that step; ``inf`` if one is not finite): the quantity a
      comparison of mean losses at those steps ranks, each step weighted alike.
    """
    at = cfg.valid_at or (cfg.valid_steps,)
    metric = cfg.validation_metric
    curves = [
        train_curve(
            s.build(cfg.torch_dtype), "learned", cfg.lr_for(s.family), cfg.valid_steps, net=net
        )
        for s in specs
    ]
    if metric != "mean_loss":
        scores = [final_score(curve[:step]) for curve in curves for step in at]
        if metric == "log_relative":
            scores = [math.log(max(value, 1e-30)) for value in scores]
        return sum(scores) / len(scores)
    tails = [[curve[max(step - 5, 0) : step] for curve in curves] for step in at]
    means = [sum(sum(t) / len(t) for t in per_step) / len(curves) for per_step in tails]
    if not all(math.isfinite(m) and m > 0 for m in means):
        return math.inf
    return sum(math.log(m) for m in means) / len(means)


def lr_grid(low: float, high: float, num: int) -> list[float]:
    """``num`` log-spaced learning rates from ``low`` to ``high``."""
    return [float(x) for x in torch.logspace(math.log10(low), math.log10(high), num)]


@dataclass
class EvalResult:
    """Curves per optimizer label and task name, plus the learning rates used."""

    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    lrs: dict[str, dict[str, float]] = field(default_factory=dict)


def plot_curves(result: EvalResult, path: str | Path) -> None:
    """PNG of the mean normalised training loss (loss / initial loss) against step, one panel
    per family, one line per optimizer (log scale)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(result.curves)
    families = sorted({n.rsplit("-", 1)[0] for n in result.curves[labels[0]]})
    fig, axes = plt.subplots(1, len(families), figsize=(4 * len(families), 3.2), squeeze=False)
    for ax, family in zip(axes[0], families, strict=True):
        for label in labels:
            curves = [
                torch.tensor(c) / c[0]
                for n, c in result.curves[label].items()
                if n.startswith(family + "-")
            ]
            mean = torch.stack(curves).clamp(max=10).mean(0)
            ax.plot(mean.numpy(), label=label)
        ax.set_yscale("log")
        ax.set_title(family)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("loss / initial loss")
    axes[0][-1].legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
