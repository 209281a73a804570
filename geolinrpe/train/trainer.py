r"""The training loop: :func:`run` trains a model from a :class:`~geolinrpe.train.Config`.

What a run does, in order:

1. checks the config (:meth:`Config.validate`: unknown keys, types, data paths) and, under
   ``torchrun``, joins the process group (gloo on CPU, NCCL on GPU);
2. seeds torch, numpy and random from ``train.seed``, loads the task's splits, fits the
   normalisation on the training split and builds the model
   (:func:`geolinrpe.models.build_model`);
3. trains with the configured optimizer, warm-up + cosine / plateau / constant schedule,
   gradient clipping, bf16/fp16 autocast, and evaluates on the validation split every
   ``train.eval_every`` steps (or epoch), with tqdm progress bars when stderr is a terminal
   (``train.progress``; piped or redirected output gets one line per epoch instead);
4. writes into ``train.out_dir`` (process 0 only): ``config.yaml``, ``metrics.csv`` (one row
   per logged step or evaluation), TensorBoard events when ``tensorboard`` is installed,
   ``last.pt`` at every evaluation and when it stops, ``best.pt`` when the monitored metric
   improves, ``results.json`` (:func:`run`'s results plus ``units``: key -> unit of the
   stored value, e.g. ``"test_mae": "eV"``) and, at the end, ``learning_curve.png`` and the
   learned RPE profiles ``rpe/*.png``;
5. returns the final metrics: validation metrics of the last model, ``test_*`` metrics of
   the best one.

Non-finite values. A non-finite training loss or gradient norm (on any process) stops the
run with :class:`NonFiniteError` before the optimizer update, naming the step, the learning
rate and what to try; so does a non-finite validation metric, before it is saved or taken
as the best. ``last.pt``/``best.pt`` therefore only ever hold finite weights of earlier steps
(saving non-finite weights is refused). With ``fp16`` the gradient scaler still skips steps
whose gradients overflow, as usual.

Checkpoints are written and read by :mod:`geolinrpe.train.checkpoint`: plain data read with
``torch.load(weights_only=True)``, a SHA-256 of the contents verified on load (resuming
included), missing keys named; configs rebuilt from them never weaken safety
(:meth:`Config.from_saved`).

Determinism and resuming. Epoch ``e`` visits the training split in the order of
``torch.randperm`` seeded with ``seed + e``, sharded over processes as
:class:`~torch.utils.data.DistributedSampler` does; data loading never touches the global RNG,
and evaluation restores it afterwards. A checkpoint holds the config, model, optimizer,
schedule, gradient scaler, the torch/CUDA/numpy/random RNG states and the position
(epoch, batch in epoch, step), so ``train.resume`` after an interruption continues with the
same batches and random draws: the weights equal those of an uninterrupted run.

Redrawing random features (``train.redraw_every: k``). Before optimizer step ``s`` (0-based,
the trainer's step count) with ``s > 0`` and ``s % k == 0``, every random feature map and RPE
of the model draws new features (:func:`redraw_random_features`) from a fresh CPU generator
seeded by ``(train.seed, s)`` (:func:`redraw_generator`). Every process draws the same
features without communicating; the draws are buffers, saved in checkpoints, so a resumed
run holds and redraws exactly what an uninterrupted run does; the global RNG is not touched
(data order and dropout are unchanged).

Distributed runs (``torchrun --nproc_per_node P -m geolinrpe.cli train cfg.yaml``, or one
plain ``python -m geolinrpe.cli train cfg.yaml`` per task under SLURM's ``srun``):
``data.batch_size`` is the global batch, each process takes ``batch_size / P`` of every
step's batch (``data.balance: graphs``) or a share with nearly the same number of atoms
(``atoms``, :class:`AtomBalancedBatchSampler`); the union equals the single-process batch,
gradients are averaged by DistributedDataParallel, losses are means over the global batch,
and metrics are summed over processes before they are divided.

* Launch: torchrun's ``RANK``/``WORLD_SIZE``/``LOCAL_RANK``/``MASTER_ADDR``/``MASTER_PORT``
  when set, else SLURM's (:func:`slurm_environment`: ``SLURM_PROCID``, ``SLURM_NTASKS``,
  ``SLURM_LOCALID``, the first host of ``SLURM_JOB_NODELIST`` and port
  ``20000 + SLURM_JOB_ID % 20000`` unless ``MASTER_ADDR``/``MASTER_PORT`` are set).
* Data caches (QM9's ``processed/``) are built by local rank 0 of every node while the
  other processes wait (:func:`builds_data_first`): nodes without a shared filesystem
  build their own; on a shared one the cache is written atomically.
* Resuming: every process reads its own ``train.resume`` file; before training they
  compare steps and weight fingerprints (:func:`check_resume_agreement`) and all stop,
  naming every rank's step, when they differ or one of them cannot resume.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

from .checkpoint import CheckpointError, content_digest, read_checkpoint, save_checkpoint
from .config import Config
from .distributed import (
    DistEnv,
    _all_reduce,
    _barrier,
    _init_distributed,
    _select_device,
    builds_data_first,
    check_resume_agreement,
    choose_num_threads,
)
from .sampling import AtomBalancedBatchSampler, EpochSampler, item_sizes
from .tasks import Task, build_task

__all__ = [
    "CHECKPOINT_FORMAT",
    "LRSchedule",
    "CheckpointError",
    "LoadedRun",
    "NonFiniteError",
    "build_model",
    "evaluate",
    "load_checkpoint",
    "plot_learning_curve",
    "plot_rpe_profiles",
    "predict",
    "redraw_generator",
    "redraw_random_features",
    "run",
]

CHECKPOINT_FORMAT = 1
"""Version of the checkpoint layout (``ckpt["format"]``)."""

_MODEL_KEYS = ("config", "model", "task_state")
"""Keys :func:`load_checkpoint` needs."""
_RESUME_KEYS = (
    *_MODEL_KEYS,
    "optimizer",
    "scheduler",
    "scaler",
    "rng",
    "step",
    "epoch",
    "batch_in_epoch",
    "best",
    "elapsed_s",
    "loss_window",
)
"""Keys ``train.resume`` needs."""


class NonFiniteError(FloatingPointError):
    """Training met a non-finite loss, gradient norm or validation metric and stopped before
    applying it; the message names the step, the learning rate and what to try."""


# ----------------------------------------------------------------------------- processes
class LRSchedule:
    """Learning rate per optimizer step: linear warm-up, then ``cosine`` decay to ``min_lr``
    at ``total_steps``, ``constant``, or ``plateau`` (a factor applied after ``patience``
    evaluations without improvement, floored at ``min_lr``).

    Call :meth:`step` after each optimizer step and :meth:`observe` after each evaluation;
    :meth:`state_dict` / :meth:`load_state_dict` checkpoint it.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        kind: str,
        base_lr: float,
        total_steps: int,
        warmup_steps: int = 0,
        min_lr: float = 0.0,
        factor: float = 0.5,
        patience: int = 5,
        higher_is_better: bool = False,
    ) -> None:
        self.optimizer, self.kind, self.base_lr = optimizer, kind, base_lr
        self.total_steps, self.warmup_steps, self.min_lr = total_steps, warmup_steps, min_lr
        self.factor, self.patience, self.higher_is_better = factor, patience, higher_is_better
        self.steps, self.scale, self.best, self.bad = 0, 1.0, None, 0
        self._apply()

    def lr(self) -> float:
        """The learning rate of the next optimizer step."""
        s = self.steps
        warm = min(1.0, (s + 1) / self.warmup_steps) if self.warmup_steps else 1.0
        if self.kind == "cosine":
            span = max(self.total_steps - self.warmup_steps, 1)
            t = min(max(s - self.warmup_steps, 0) / span, 1.0)
            lr = self.min_lr + (self.base_lr - self.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
            return lr * warm if s < self.warmup_steps else lr
        if self.kind == "plateau":
            return max(self.base_lr * self.scale, self.min_lr) * warm
        return self.base_lr * warm

    def _apply(self) -> None:
        lr = self.lr()
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        """Advance one optimizer step and set the next learning rate."""
        self.steps += 1
        self._apply()

    def observe(self, metric: float) -> None:
        """A validation metric; ``plateau`` decays after ``patience`` without improvement."""
        if self.kind != "plateau" or not math.isfinite(metric):
            return
        better = self.best is None or (
            metric > self.best if self.higher_is_better else metric < self.best
        )
        if better:
            self.best, self.bad = metric, 0
            return
        self.bad += 1
        if self.bad >= self.patience:
            self.scale *= self.factor
            self.bad = 0
            self._apply()

    def state_dict(self) -> dict[str, Any]:
        """Position and plateau state (the configuration comes from the config)."""
        return {"steps": self.steps, "scale": self.scale, "best": self.best, "bad": self.bad}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` and set the learning rate it implies."""
        self.steps, self.scale = int(state["steps"]), float(state["scale"])
        self.best, self.bad = state["best"], int(state["bad"])
        self._apply()


# ------------------------------------------------------------------------------ models
def rpe_param_groups(model: nn.Module, rpe_lr_scale: float) -> list[dict[str, Any]]:
    """Optimizer parameter groups: the parameters of every :class:`~geolinrpe.rpe.RPE`
    submodule (spectra, shells, rotation angles) with ``lr_scale = rpe_lr_scale``, all other
    trainable parameters with ``lr_scale = 1`` (the scheduler multiplies its rate by it)."""
    from ..rpe import RPE

    rpe_ids = {id(p) for m in model.modules() if isinstance(m, RPE) for p in m.parameters()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    if rpe_lr_scale == 1.0:  # one group, as in checkpoints written before the option
        return [{"params": trainable, "lr_scale": 1.0}]
    groups = [
        {"params": [p for p in trainable if id(p) not in rpe_ids], "lr_scale": 1.0},
        {"params": [p for p in trainable if id(p) in rpe_ids], "lr_scale": float(rpe_lr_scale)},
    ]
    return [g for g in groups if g["params"]]


def build_model(cfg: Config, task: Task) -> nn.Module:
    """``geolinrpe.models.build_model(cfg.model.name, ...)`` with the model section's options
    (:meth:`Config.model_kwargs`) and what the task derives from the data
    (:meth:`Task.model_kwargs`, e.g. ``num_targets`` and the target statistics).

    Raises:
        ValueError: the model cannot learn the task or rejects a value; the message names
            the config key.
    """
    from ..models import build_model as build
    from ..models import model_options

    name = cfg.model.name
    kwargs = cfg.model_kwargs()
    accepted = model_options(name)
    for key, value in task.model_kwargs().items():
        if key in accepted:
            kwargs[key] = value
        elif key in _REQUIRED_TASK_KWARGS:
            raise ValueError(
                f"config key 'model.name': model {name!r} cannot learn task {task.name!r} "
                f"(it has no option {key!r})"
            )
    try:
        return build(name, **kwargs)
    except ValueError as err:
        raise ValueError(f"config key 'model' (model {name!r}): {err}") from err


# Task-derived options a model must take to learn the task (others, such as ``max_len``,
# are passed when the model has them).
_REQUIRED_TASK_KWARGS = {
    "num_targets",
    "num_classes",
    "in_channels",
    "vocab_size",
    "predict_forces",
}


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def redraw_generator(seed: int, step: int) -> torch.Generator:
    """A fresh CPU generator for the redraw before optimizer step ``step`` of a run seeded
    with ``seed`` (``train.seed``): seeded with ``seed * 1_000_003 + step`` masked to 63
    bits, the same on every process and in a resumed run."""
    return torch.Generator(device="cpu").manual_seed((seed * 1_000_003 + step) & (2**63 - 1))


def redraw_random_features(model: nn.Module, generator: torch.Generator) -> list[str]:
    """Draw new random features in every kernel feature map
    (:class:`~geolinrpe.features.FeatureMap`) and RPE (:class:`~geolinrpe.rpe.RPE`) of
    ``model`` (unwrapped from DistributedDataParallel), each once, in module order, all from
    ``generator``; a feature map or RPE inside one already redrawn is left to it. Returns
    the names of the modules redrawn (deterministic ones included: their ``redraw`` is a
    no-op). The global RNG is not used."""
    from ..features import FeatureMap
    from ..rpe import RPE

    redrawn: list[str] = []
    for name, module in _unwrap(model).named_modules():
        if not isinstance(module, (FeatureMap, RPE)):
            continue
        if any(done == "" or name.startswith(done + ".") for done in redrawn):
            continue  # its ancestor's redraw covers it
        module.redraw(generator)
        redrawn.append(name)
    return redrawn


def _autocast(device: torch.device, precision: str):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device_type=device.type, dtype=dtype)


# ------------------------------------------------------------------------------ RNG
def _rng_state() -> dict[str, Any]:
    """torch (CPU and every CUDA device), numpy and random states, as tensors and tuples
    (loadable with ``torch.load(weights_only=True)``)."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, gauss),
        "python": random.getstate(),
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# ---------------------------------------------------------------------------- evaluation
def _move(batch: Any, device: torch.device) -> Any:
    return batch.to(device) if hasattr(batch, "to") else batch


def _evaluate(
    model: nn.Module,
    task: Task,
    dataset: Dataset,
    batch_size: int,
    env: DistEnv,
    precision: str = "fp32",
    progress: bool = False,
    desc: str = "eval",
) -> dict[str, float]:
    """Metrics of ``model`` on ``dataset``: each process takes every ``world_size``-th item,
    the sums of :meth:`Task.batch_stats` are added over processes, then divided. The global
    RNG state is restored afterwards, so evaluating never changes a training run."""
    from tqdm.auto import tqdm

    rng = _rng_state()
    model = _unwrap(model)
    was_training = model.training
    model.eval()
    sampler = EpochSampler(len(dataset), False, 0, env.rank, env.world_size, pad=False)
    loader = DataLoader(dataset, batch_size, sampler=sampler, collate_fn=task.collate)
    sums: dict[str, Tensor] = {}
    bar = tqdm(loader, desc=desc, leave=False, disable=not _bars(progress, env))
    for batch in bar:
        batch = _move(batch, env.device)
        grad = torch.enable_grad() if task.needs_grad else torch.no_grad()
        with grad, _autocast(env.device, precision):
            out = task.forward(model, batch)
        with torch.no_grad():
            for key, value in task.batch_stats(out, batch).items():
                value = value.detach().double().cpu()
                sums[key] = sums[key] + value if key in sums else value
    if env.distributed:
        if not sums:  # this process's share was empty: reduce zeros of the same shapes
            sums = _zero_stats(task, model, dataset, env)
        for key in sorted(sums):
            _all_reduce(sums[key], env)
    model.train(was_training)
    _set_rng_state(rng)
    return task.compute_metrics(sums)


def _zero_stats(task: Task, model: nn.Module, dataset: Dataset, env: DistEnv):
    """Zero sums shaped like :meth:`Task.batch_stats` (from one item), for a process whose
    share of the evaluation split is empty."""
    batch = _move(task.collate([dataset[0]]), env.device)
    with torch.enable_grad() if task.needs_grad else torch.no_grad():
        stats = task.batch_stats(task.forward(model, batch), batch)
    return {k: torch.zeros_like(v.detach().double().cpu()) for k, v in stats.items()}


# ------------------------------------------------------------------------------ logging
class _MetricsLog:
    """``metrics.csv`` (wide: one column per quantity, empty where a row has no value) and,
    when the ``tensorboard`` package is installed and wanted, TensorBoard scalars."""

    def __init__(self, out_dir: Path, columns: list[str], resume_step: int | None, tb: bool):
        self.path = out_dir / "metrics.csv"
        self.columns = columns
        kept: list[dict[str, str]] = []
        if resume_step is not None and self.path.is_file():
            with self.path.open(newline="") as f:
                kept = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with self.path.open("w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(kept)
        self.writer = None
        if tb:
            if importlib.util.find_spec("tensorboard") is None:
                _say(
                    "TensorBoard logging off: the 'tensorboard' package is not installed "
                    "(pip install tensorboard); metrics go to metrics.csv"
                )
            else:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def write(self, row: dict[str, Any]) -> None:
        """Append one row (missing columns stay empty) and its TensorBoard scalars."""
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self.columns, extrasaction="ignore").writerow(
                {k: _csv_value(v) for k, v in row.items()}
            )
        if self.writer is not None:
            step = int(row["step"])
            for key, value in row.items():
                if key not in ("step", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(key.replace("_", "/", 1), value, step)
            self.writer.flush()

    def close(self) -> None:
        """Close the TensorBoard writer."""
        if self.writer is not None:
            self.writer.close()


def _csv_value(value: Any) -> Any:
    return f"{value:.8g}" if isinstance(value, float) else value


def _bars(progress: bool, env: DistEnv) -> bool:
    """Whether to draw tqdm bars: ``train.progress`` on process 0, and only when stderr (where
    tqdm draws) is a terminal; redraws would fill a piped log or file with ``\\r`` lines."""
    import sys

    stream = sys.stderr
    try:
        tty = stream is not None and stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        tty = False
    return bool(progress and env.is_main and tty)


def _say(message: str, env: DistEnv | None = None) -> None:
    """Print a line without breaking progress bars (process 0 only when ``env`` is given)."""
    from tqdm.auto import tqdm

    if env is None or env.is_main:
        tqdm.write(message)


# -------------------------------------------------------------------------------- plots
def plot_learning_curve(csv_path: str | Path, png_path: str | Path, task: Task | None = None):
    """Draw ``train_loss`` and ``valid_loss`` against the step from ``metrics.csv`` (and, with
    ``task``, the main validation metric in a second panel) into ``png_path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with Path(csv_path).open(newline="") as f:
        rows = list(csv.DictReader(f))

    def series(key: str) -> tuple[list[int], list[float]]:
        pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        return [p[0] for p in pairs], [p[1] for p in pairs]

    main = None if task is None else f"valid_{task.main_metric}"
    panels = 2 if main is not None and series(main)[0] else 1
    fig, axes = plt.subplots(1, panels, figsize=(6 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for key, style in (("train_loss", "-"), ("valid_loss", "o-")):
        steps, values = series(key)
        if steps:
            ax.plot(steps, values, style, label=key.replace("_", " "), markersize=3)
    steps, values = series("train_loss")
    if values and min(values) > 0:
        ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_title("learning curve")
    ax.legend()
    if panels == 2:
        ax = axes[0][1]
        steps, values = series(main)
        unit = task.metric_unit(task.main_metric)
        if unit == "eV" and task.name == "qm9":
            values, unit = [v * 1000 for v in values], "meV"
        ax.plot(steps, values, "o-", color="C1", markersize=3)
        ax.set_xlabel("step")
        ax.set_ylabel(f"valid {task.main_metric}" + (f" ({unit})" if unit else ""))
        ax.set_title(f"validation {task.main_metric}")
    fig.tight_layout()
    png_path = Path(png_path)
    fig.savefig(png_path, dpi=110)
    plt.close(fig)
    return png_path


def plot_rpe_profiles(model: nn.Module, folder: str | Path, unit: str | None = None) -> list[Path]:
    """Save ``f`` of every RPE with a closed form ``f(Delta)`` (a
    :class:`~geolinrpe.rpe.FourierRPE` that :func:`geolinrpe.rpe.plot` can draw) in the
    model as ``folder/<module name>.png``, titled with the module name (its layer), axes in
    ``unit`` (the task's :attr:`~geolinrpe.train.tasks.Task.position_unit`); returns the paths.

    Lattice-periodic RPEs (``flt-periodic``), whose ``f`` depends on each structure's cell,
    have no single profile: they are skipped with one line for the whole model. Another RPE
    that cannot be drawn gets one line each."""
    from ..rpe import FourierRPE, PeriodicRPE
    from ..rpe import plot as plot_rpe

    paths = []
    periodic = 0
    for name, module in _unwrap(model).named_modules():
        if isinstance(module, PeriodicRPE):
            periodic += 1
            continue
        if not isinstance(module, FourierRPE):
            continue
        try:
            path = Path(folder) / f"{name or 'rpe'}.png"
            paths.append(plot_rpe(module, path, unit=unit, title=name or None))
        except (ValueError, RuntimeError, NotImplementedError) as err:
            _say(f"no RPE profile for {name} ({type(module).__name__}): {err}")
    if periodic:
        layers = f"{periodic} layer" + ("s" if periodic > 1 else "")
        _say(
            f"RPE profiles: none drawn for the periodic RPE ({layers}); its f(Delta) depends "
            "on each structure's cell"
        )
    return paths


# ------------------------------------------------------------------------------ training
class _Trainer:
    """State of one training run; :meth:`fit` runs it (see the module docstring)."""

    def __init__(self, cfg: Config, env: DistEnv) -> None:
        self.cfg, self.env = cfg, env
        t = cfg.train
        threads = choose_num_threads(t.num_threads)
        if threads is not None:
            torch.set_num_threads(threads)
        self.out = Path(t.out_dir)
        if env.is_main:
            _check_out_dir(self.out)
        self.resume_path = self._resume_path()

        # data (local rank 0 of every node first: it may build a cache the others of its
        # node then read; nodes without a shared filesystem build their own)
        self.task = build_task(cfg)
        if env.distributed:
            self.task.shard_count = lambda count: _all_reduce(count, env) / env.world_size
            self.task.global_item_mean = cfg.data.balance == "atoms"
        first = builds_data_first(env)
        if not first:
            _barrier(env)
        self.splits = self.task.datasets()
        if first:
            _barrier(env)
        if self.splits.get("train") is None or len(self.splits["train"]) == 0:
            raise ValueError("config key 'data': the training split is empty")
        if self.splits.get("valid") is None or len(self.splits["valid"]) == 0:
            raise ValueError("config key 'data': the validation split is empty")
        self.task.fit_state(self.splits["train"])

        d = cfg.data
        if d.batch_size % env.world_size:
            raise ValueError(
                f"config key 'data.batch_size' ({d.batch_size}) must be divisible by the "
                f"number of processes ({env.world_size})"
            )
        self.local_batch = d.batch_size // env.world_size
        self.eval_batch = max((d.eval_batch_size or d.batch_size) // env.world_size, 1)
        self.sampler = EpochSampler(
            len(self.splits["train"]), True, t.seed, env.rank, env.world_size, pad=True
        )
        self.steps_per_epoch = math.ceil(len(self.sampler.indices()) / self.local_batch)
        self.batch_sampler: AtomBalancedBatchSampler | None = None
        if d.balance == "atoms":
            sizes = item_sizes(self.splits["train"])
            self.batch_sampler = AtomBalancedBatchSampler(
                sizes, d.batch_size, True, t.seed, env.rank, env.world_size
            )
        self.total_steps = t.epochs * self.steps_per_epoch
        if t.max_steps is not None:
            self.total_steps = min(self.total_steps, t.max_steps)

        # model, optimizer, schedule (the seed again: the initialisation does not depend on
        # what loading the data drew)
        _seed_everything(t.seed)
        model = build_model(cfg, self.task).to(env.device)
        self.model: nn.Module = model
        if env.distributed:
            self.model = nn.parallel.DistributedDataParallel(
                model,
                device_ids=[env.device.index] if env.device.type == "cuda" else None,
                find_unused_parameters=t.find_unused_parameters,
            )
        self.optimizer = self._optimizer(model)
        o = cfg.optim
        self.schedule = LRSchedule(
            self.optimizer,
            o.schedule,
            o.lr,
            self.total_steps,
            o.warmup_steps,
            o.min_lr,
            o.plateau_factor,
            o.plateau_patience,
            self.task.higher_is_better,
        )
        self.scaler = torch.amp.GradScaler(env.device.type, enabled=t.precision == "fp16")
        self.monitor = t.monitor or self.task.main_metric
        if self.monitor not in self.task.metric_names:
            raise ValueError(
                f"config key 'train.monitor': {self.monitor!r} is not a metric of task "
                f"{self.task.name!r} ({', '.join(self.task.metric_names)})"
            )

        # position
        self.step = self.epoch = self.batch_in_epoch = 0
        self.best: float | None = None
        self.best_step = -1
        self.bad_evals = 0
        self.elapsed = 0.0
        self.saved_step = -1
        self.window = torch.zeros(2, dtype=torch.float64)  # training loss since last log, steps
        self.last_valid: dict[str, float] = {}
        self.best_state: dict[str, Tensor] | None = None
        self.last_lr = self.schedule.lr()
        resume_step = None
        self.resumed_digest = ""
        failed: ValueError | None = None
        if self.resume_path is not None:
            try:
                resume_step = self._load(self.resume_path)
            except ValueError as err:  # CheckpointError too
                if not env.distributed:
                    raise
                failed = err  # raised after the others have heard of it (no hang)
        if env.distributed:
            self._check_resume(failed)
        elif (self.out / "last.pt").is_file():
            _say(
                f"starting afresh in {self.out}: its last.pt and metrics.csv will be replaced "
                "(train.resume=auto continues a run instead)",
                env,
            )
        self.log = None
        if env.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(cfg.to_yaml())
            columns = ["step", "epoch", "elapsed_s", "lr", "train_loss", "grad_norm"]
            columns += [f"valid_{m}" for m in self.task.metric_names]
            columns += [f"test_{m}" for m in self.task.metric_names]
            self.log = _MetricsLog(self.out, columns, resume_step, t.tensorboard)

    # ---------------------------------------------------------------------------- setup
    def _resume_path(self) -> Path | None:
        resume = self.cfg.train.resume
        if resume is None:
            return None
        if resume == "auto":
            path = self.out / "last.pt"
            return path if path.is_file() else None
        return Path(resume)

    def _optimizer(self, model: nn.Module) -> torch.optim.Optimizer:
        o = self.cfg.optim
        params = rpe_param_groups(model, o.rpe_lr_scale)
        if o.optimizer == "adamw":
            return torch.optim.AdamW(
                params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
        if o.optimizer == "adam":
            return torch.optim.Adam(
                params, lr=o.lr, betas=tuple(o.betas), weight_decay=o.weight_decay
            )
        return torch.optim.SGD(params, lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)

    # ------------------------------------------------------------------------ checkpoints
    def _state(self) -> dict[str, Any]:
        return {
            "format": CHECKPOINT_FORMAT,
            "config": self.cfg.to_dict(),
            "task": self.task.name,
            "task_state": self.task.state,
            "model": _unwrap(self.model).state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.schedule.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": _rng_state(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "best": {"metric": self.best, "step": self.best_step, "bad_evals": self.bad_evals},
            "monitor": self.monitor,
            "valid_metrics": dict(self.last_valid),
            "elapsed_s": self.elapsed,
            "world_size": self.env.world_size,
            "versions": {"torch": str(torch.__version__), "geolinrpe": _package_version()},
        }

    def _save(self, best: bool = False, collective: bool = True) -> None:
        """Write ``last.pt`` (and ``best.pt``) from process 0, atomically.

        ``collective``: every process calls this at the same step, so the running training
        loss is summed over processes and stored as each one's equal share."""
        bad = [
            k
            for k, v in _unwrap(self.model).state_dict().items()
            if v.is_floating_point() and not bool(torch.isfinite(v).all())
        ]
        if bad:  # every process holds the same weights: all of them stop here
            raise NonFiniteError(
                f"refusing to save non-finite weights ({', '.join(bad[:3])}"
                f"{', ...' if len(bad) > 3 else ''}) at step {self.step}; "
                f"{self._advice()}"
            )
        self.saved_step = self.step
        window = self.window.clone()
        if collective and self.env.distributed:
            window = _all_reduce(window, self.env) / self.env.world_size
        if not self.env.is_main:
            return
        state = self._state()
        state["loss_window"] = window
        names = ("last.pt", "best.pt") if best else ("last.pt",)
        save_checkpoint(state, [self.out / name for name in names])

    def _load(self, path: Path) -> int:
        """Restore a checkpoint (same data and model config required); returns its step."""
        ckpt = read_checkpoint(path, _RESUME_KEYS, "geolinrpe training checkpoint")
        try:  # compared without the safety settings, which never come from a file
            saved = Config.from_dict(ckpt["config"]).safe_settings()
        except ValueError as err:
            raise CheckpointError(f"checkpoint {str(path)!r}: stored config: {err}") from err
        mine = self.cfg.safe_settings()
        free = {"num_workers", "eval_batch_size"}  # may change between invocations
        for section in ("data", "model"):
            ours, theirs = getattr(mine, section), getattr(saved, section)
            for key, value in vars(ours).items():
                if key not in free and getattr(theirs, key) != value:
                    raise ValueError(
                        f"config key '{section}.{key}' differs from the checkpoint {path} "
                        f"({value!r} vs {getattr(theirs, key)!r}); resume with the same data "
                        "and model"
                    )
        try:
            _unwrap(self.model).load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.schedule.load_state_dict(ckpt["scheduler"])
            self.scaler.load_state_dict(ckpt["scaler"])
            self.step, self.epoch = int(ckpt["step"]), int(ckpt["epoch"])
            self.batch_in_epoch = int(ckpt["batch_in_epoch"])
            self.best, self.best_step = ckpt["best"]["metric"], int(ckpt["best"]["step"])
            self.bad_evals = int(ckpt["best"]["bad_evals"])
            self.last_valid = dict(ckpt.get("valid_metrics", {}))
            self.elapsed = float(ckpt["elapsed_s"])
            self.window = ckpt["loss_window"].clone()
            _set_rng_state(ckpt["rng"])
            if self.env.distributed:  # compared between processes (_check_resume)
                self.resumed_digest = content_digest(ckpt["model"])
        except (KeyError, TypeError, ValueError, IndexError, RuntimeError, AttributeError) as err:
            detail = f"key {err.args[0]!r} is missing" if isinstance(err, KeyError) else err
            raise CheckpointError(
                f"checkpoint {str(path)!r} cannot be resumed from: {detail}"
            ) from err
        self.saved_step = self.step
        if ckpt.get("world_size", 1) != self.env.world_size and self.batch_in_epoch:
            raise ValueError(
                f"{path} stopped mid-epoch in a run of {ckpt.get('world_size', 1)} processes; "
                f"resume it with the same number of processes (now {self.env.world_size})"
            )
        _say(f"resumed from {path} at step {self.step} (epoch {self.epoch})", self.env)
        return self.step

    def _check_resume(self, failed: ValueError | None) -> None:
        """All processes exchange their resumed step, weight fingerprint and whether
        resuming failed (``failed``: this process's error), then raise the same way: this
        process's error, a ``ValueError`` naming a failed rank, or
        :func:`check_resume_agreement`'s. A collective call, made by every process."""
        import torch.distributed as dist

        digest = int(self.resumed_digest[:15], 16) if self.resumed_digest else -1
        mine = torch.tensor(
            [self.step, digest, int(failed is not None)], dtype=torch.int64, device=self.env.device
        )
        gathered = [torch.zeros_like(mine) for _ in range(self.env.world_size)]
        dist.all_gather(gathered, mine)
        rows = [g.cpu().tolist() for g in gathered]
        if failed is not None:
            raise failed
        bad = [rank for rank, row in enumerate(rows) if row[2]]
        if bad:
            raise ValueError(
                f"config key 'train.resume': rank {', '.join(map(str, bad))} could not resume "
                "from its checkpoint (its own error says why); no process trains"
            )
        check_resume_agreement(
            [r[0] for r in rows], [f"{r[1]:015x}" if r[1] >= 0 else "" for r in rows]
        )

    # --------------------------------------------------------------------------- steps
    def _redraw(self) -> bool:
        """``train.redraw_every``: before the forward of optimizer step ``s = self.step``
        (0-based), when ``s > 0`` and ``s % redraw_every == 0``, redraw every random feature
        of the model (:func:`redraw_random_features`) from :func:`redraw_generator`
        ``(train.seed, s)``. Every process draws the same features without communicating.
        The draws are buffers saved in checkpoints, and a checkpoint at step ``s`` is
        written before this redraw, so a run resumed at any step holds and redraws exactly
        what the uninterrupted run does. The global RNG is untouched, so the data order and
        dropout do not change. Returns whether it redrew."""
        every, s = self.cfg.train.redraw_every, self.step
        if every is None or s == 0 or s % every:
            return False
        redraw_random_features(self.model, redraw_generator(self.cfg.train.seed, s))
        return True

    def _train_step(self, batch: Any, lr: float) -> tuple[Tensor, Tensor | None]:
        """One optimizer step at learning rate ``lr``; returns the loss and the gradient norm
        before clipping (``None`` without ``optim.grad_clip``).

        A non-finite loss or gradient norm on any process raises :class:`NonFiniteError`
        before the update (every process agrees). With the fp16 gradient scaler an inf/NaN
        gradient of a finite loss is the scaler's business: it skips that step and lowers
        its scale, as usual.
        """
        t, o = self.cfg.train, self.cfg.optim
        batch = _move(batch, self.env.device)
        self.model.train()
        with _autocast(self.env.device, t.precision):
            out = self.task.forward(self.model, batch)
        loss = self.task.loss(out, batch)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.optimizer)  # a no-op without fp16
        if o.grad_clip is not None:
            norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip)
        else:
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            norms = [torch.linalg.vector_norm(g.detach().float()) for g in grads]
            norm = torch.linalg.vector_norm(torch.stack(norms)) if norms else loss.new_zeros(())
        flags = torch.stack(
            [~torch.isfinite(loss.detach().float()), ~torch.isfinite(norm.detach().float())]
        ).to(torch.float32)
        bad_loss, bad_grad = (bool(v) for v in _all_reduce(flags.cpu(), self.env, "max"))
        if bad_loss or (bad_grad and not self.scaler.is_enabled()):
            self.optimizer.zero_grad(set_to_none=True)
            what = "training loss" if bad_loss else "gradient norm"
            raise NonFiniteError(
                f"training stopped at step {self.step + 1} (epoch {self.epoch}) with learning "
                f"rate {lr:.4g}: the {what} is not finite (loss {float(loss.detach()):.4g}, "
                f"gradient norm {float(norm.detach()):.4g}); the update was not applied. "
                f"{self._advice()}"
            )
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.schedule.step()
        return loss.detach(), (norm if o.grad_clip is not None else None)

    def _advice(self) -> str:
        """Where the last finite checkpoint is and what to try."""
        o = self.cfg.optim
        where = (
            f"{self.out / 'last.pt'} holds the last saved finite state (step {self.saved_step})"
            if self.saved_step >= 0 and self.env.is_main
            else "no checkpoint was written"
        )
        clip = (
            "enable gradient clipping (optim.grad_clip)"
            if o.grad_clip is None
            else (f"lower gradient clipping (optim.grad_clip, now {o.grad_clip:g})")
        )
        return (
            f"{where}. Try a lower optim.lr (now {o.lr:g}), {clip}, or check the data for "
            "NaN/inf values."
        )

    def _validate(self) -> dict[str, float]:
        """Evaluate, track the best model, step ``plateau``, checkpoint and log."""
        t = self.cfg.train
        metrics = _evaluate(
            self.model,
            self.task,
            self.splits["valid"],
            self.eval_batch,
            self.env,
            t.precision,
            t.progress,
            desc="valid",
        )
        bad = {k: v for k, v in metrics.items() if not math.isfinite(v)}
        if bad:
            listed = ", ".join(f"{k}={v}" for k, v in bad.items())
            raise NonFiniteError(
                f"training stopped at step {self.step} (epoch {self.epoch}) with learning rate "
                f"{self.last_lr:.4g}: validation metrics are not finite ({listed}); this model "
                f"was neither saved nor taken as the best. {self._advice()}"
            )
        self.last_valid = metrics
        value = metrics[self.monitor]
        better = self.best is None or (
            value > self.best if self.task.higher_is_better else value < self.best
        )
        if better:
            self.best, self.best_step, self.bad_evals = value, self.step, 0
            self.best_state = {
                k: v.detach().clone() for k, v in _unwrap(self.model).state_dict().items()
            }
        else:
            self.bad_evals += 1
        self.schedule.observe(value)
        self._save(best=better)
        if self.log is not None:
            row = {"step": self.step, "epoch": self.epoch, "elapsed_s": self.elapsed}
            row.update({f"valid_{k}": v for k, v in metrics.items()})
            self.log.write(row)
        best = f" (best {self.monitor} at step {self.best_step})"
        _say(f"step {self.step} valid: {self.task.format_metrics(metrics)}{best}", self.env)
        return metrics

    def _should_stop(self, started: float, steps_this_run: int) -> str | None:
        """Why training stops now (the same answer on every process), or ``None``."""
        t = self.cfg.train
        if self.step >= self.total_steps:
            return "done"
        if t.early_stopping_patience is not None and self.bad_evals >= t.early_stopping_patience:
            return "early stopping"
        if t.stop_after_steps is not None and steps_this_run >= t.stop_after_steps:
            return "stop_after_steps"
        if t.time_limit_min is not None:
            over = torch.tensor([float(time.time() - started > 60 * t.time_limit_min)])
            if _all_reduce(over, self.env, op="max").item() > 0:
                return "time limit"
        return None

    # ----------------------------------------------------------------------------- fit
    def fit(self) -> dict[str, float]:
        """Train until the end, early stopping, ``stop_after_steps`` or the time limit; see
        :func:`run` for what it returns."""
        from tqdm.auto import tqdm

        t = self.cfg.train
        started = time.time()
        elapsed0 = self.elapsed
        steps_this_run = 0
        mid_step = False
        stop = self._should_stop(started, steps_this_run)
        if self.env.is_main:
            n = {k: (len(v) if v is not None else 0) for k, v in self.splits.items()}
            params = sum(p.numel() for p in self.model.parameters())
            _say(
                f"{self.task.name}: {n['train']} train / {n['valid']} valid / {n['test']} test "
                f"items; model {self.cfg.model.name} ({params:,} parameters) on "
                f"{self.env.device} x{self.env.world_size}; {self.total_steps} steps "
                f"({self.steps_per_epoch} per epoch, batch {self.cfg.data.batch_size})"
            )
        bars = _bars(t.progress, self.env)
        epoch_loss = torch.zeros(2, dtype=torch.float64)  # this epoch's loss sum, steps
        try:
            while stop is None:
                if self.batch_sampler is not None:  # data.balance: atoms
                    self.batch_sampler.set_epoch(self.epoch, self.batch_in_epoch)
                    batching: dict[str, Any] = {"batch_sampler": self.batch_sampler}
                else:
                    self.sampler.set_epoch(self.epoch, self.batch_in_epoch * self.local_batch)
                    batching = {"batch_size": self.local_batch, "sampler": self.sampler}
                loader = DataLoader(
                    self.splits["train"],
                    **batching,
                    collate_fn=self.task.collate,
                    num_workers=self.cfg.data.num_workers,
                    generator=torch.Generator().manual_seed(t.seed + self.epoch),
                )
                bar = tqdm(
                    total=self.steps_per_epoch,
                    initial=self.batch_in_epoch,
                    desc=f"epoch {self.epoch}",
                    disable=not bars,
                    dynamic_ncols=True,
                )
                for batch in loader:
                    lr = self.last_lr = self.schedule.lr()
                    mid_step = True  # model/optimizer ahead of the counters until updated
                    self._redraw()
                    loss, norm = self._train_step(batch, lr)
                    self.step += 1
                    steps_this_run += 1
                    self.batch_in_epoch += 1
                    mid_step = False
                    self.elapsed = elapsed0 + time.time() - started
                    self.window += torch.tensor([float(loss), 1.0], dtype=torch.float64)
                    bar.update(1)
                    bar.set_postfix(loss=f"{float(loss):.4g}", lr=f"{lr:.2e}")
                    epoch_loss += torch.tensor([float(loss), 1.0], dtype=torch.float64)
                    end_of_epoch = self.batch_in_epoch == self.steps_per_epoch
                    if end_of_epoch:
                        if t.progress and not bars:  # no bar (not a terminal): one line
                            mean = float(epoch_loss[0] / epoch_loss[1])
                            whose = " (process 0)" if self.env.distributed else ""
                            _say(
                                f"epoch {self.epoch}: step {self.step}, train loss {mean:.4g}"
                                f"{whose}, lr {lr:.2e}, {self.elapsed:.1f} s",
                                self.env,
                            )
                        epoch_loss.zero_()
                        self.epoch += 1
                        self.batch_in_epoch = 0
                    if self.step % t.log_every == 0 or end_of_epoch:
                        _all_reduce(self.window, self.env)
                        if self.log is not None:
                            row = {
                                "step": self.step,
                                "epoch": self.epoch,
                                "elapsed_s": self.elapsed,
                                "lr": lr,
                                "train_loss": float(self.window[0] / self.window[1]),
                            }
                            if norm is not None:
                                row["grad_norm"] = float(norm)
                            self.log.write(row)
                        self.window.zero_()
                    due = (
                        self.step % t.eval_every == 0 if t.eval_every is not None else end_of_epoch
                    )
                    if due or self.step == self.total_steps:
                        self._validate()
                    elif t.save_every is not None and self.step % t.save_every == 0:
                        self._save()
                    stop = self._should_stop(started, steps_this_run)
                    if stop is not None or end_of_epoch:
                        break
                bar.close()
        except KeyboardInterrupt:
            if not mid_step and self.saved_step != self.step:
                self._save(collective=False)
            _say(
                f"interrupted at step {self.step}; resume with train.resume={self.out}/last.pt",
                self.env,
            )
            raise
        if self.saved_step != self.step:
            self._save()
        finished = stop in ("done", "early stopping")
        _say(f"stopped at step {self.step} ({stop})", self.env)
        results = {
            "step": float(self.step),
            "epoch": float(self.epoch),
            "completed": float(finished),
            "elapsed_s": self.elapsed,
        }
        if not finished:
            return results
        results.update({f"valid_{k}": v for k, v in self.last_valid.items()})
        if self.best is not None:
            results[f"best_valid_{self.monitor}"] = float(self.best)
            results["best_step"] = float(self.best_step)
        if self.splits.get("test") is not None and len(self.splits["test"]):
            test = self._test()
            results.update({f"test_{k}": v for k, v in test.items()})
        if self.env.is_main:
            stored = {**results, "units": self.task.result_units(results)}
            (self.out / "results.json").write_text(json.dumps(stored, indent=2) + "\n")
            if self.log is not None:
                self.log.close()
            if t.plot:
                self._plot()
        _barrier(self.env)
        return results

    def _plot(self) -> None:
        """``learning_curve.png`` and ``rpe/*.png`` of the best model; a plotting problem is
        reported, never fatal to a finished run."""
        try:
            plot_learning_curve(
                self.out / "metrics.csv", self.out / "learning_curve.png", self.task
            )
            model = _unwrap(self.model)
            current = {k: v.detach().clone() for k, v in model.state_dict().items()}
            if self.best_state is not None:
                model.load_state_dict(self.best_state)
            plot_rpe_profiles(model, self.out / "rpe", self.task.position_unit)
            model.load_state_dict(current)
        except Exception as err:  # plots are a by-product: never fail a finished run
            _say(f"plotting failed: {type(err).__name__}: {err}")

    def _test(self) -> dict[str, float]:
        """Test metrics of the best model (``best.pt``), written as the last CSV row."""
        model = _unwrap(self.model)
        current = {k: v.detach().clone() for k, v in model.state_dict().items()}
        best = self.best_state
        if best is None and (self.out / "best.pt").is_file():
            _barrier(self.env)
            best = read_checkpoint(self.out / "best.pt", ("model",))["model"]
        if best is not None:
            model.load_state_dict(best)
        t = self.cfg.train
        metrics = _evaluate(
            model, self.task, self.splits["test"], self.eval_batch, self.env, t.precision
        )
        model.load_state_dict(current)
        if self.log is not None:
            row = {"step": self.step, "epoch": self.epoch, "elapsed_s": self.elapsed}
            row.update({f"test_{k}": v for k, v in metrics.items()})
            self.log.write(row)
        _say(
            f"test (best model, step {self.best_step}): {self.task.format_metrics(metrics)}",
            self.env,
        )
        return metrics


def _check_out_dir(path: Path) -> None:
    """Create ``train.out_dir`` and check that a file can be written there."""
    import tempfile

    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=path, prefix=".write-test-"):
            pass
    except OSError as err:
        reason = err.strerror or str(err)
        raise ValueError(
            f"config key 'train.out_dir': cannot create or write to {str(path)!r} ({reason})"
        ) from err


def _package_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("geolinrpe")
    except PackageNotFoundError:
        return "unknown"


def run(cfg: Config) -> dict[str, float]:
    """Train as ``cfg`` says (see the module docstring) and return the final metrics.

    Returns:
        ``step``, ``epoch``, ``completed`` (1.0 when training ran to its end or stopped
        early, 0.0 after ``stop_after_steps`` or the time limit), ``elapsed_s``; when
        completed also ``valid_<metric>`` (last model), ``best_valid_<monitor>``,
        ``best_step`` and ``test_<metric>`` (best model, when there is a test split).
        Values are in the metric's own unit (:meth:`Task.metric_unit
        <geolinrpe.train.tasks.Task.metric_unit>`: QM9 energies in eV, although printed in
        meV); ``results.json`` holds the same mapping plus ``units`` (key -> unit, ``""``
        for counts and dimensionless values).

    Raises:
        ValueError: a config or data problem, naming the config key, before training starts
            (including a ``train.out_dir`` that cannot be created or written).
        NonFiniteError: a non-finite loss, gradient norm or validation metric; raised before
            the update is applied, so ``last.pt``/``best.pt`` keep finite weights of an
            earlier step.
        CheckpointError: ``train.resume`` names a missing, corrupted or incomplete checkpoint.
    """
    cfg.validate()
    env = _init_distributed(cfg.train.device)
    try:
        return _Trainer(cfg, env).fit()
    finally:
        if env.initialized_here:
            import torch.distributed as dist

            dist.destroy_process_group()


# ------------------------------------------------------------------------ reloading
@dataclass
class LoadedRun:
    """A model rebuilt from a checkpoint, with its config and task (no training data)."""

    cfg: Config
    task: Task
    model: nn.Module
    checkpoint: dict[str, Any]
    device: torch.device


def load_checkpoint(path: str | Path, device: str = "auto") -> LoadedRun:
    """Rebuild the model of a ``last.pt``/``best.pt`` on ``device`` in eval mode.

    The file is read with ``torch.load(weights_only=True)`` and verified
    (:func:`geolinrpe.train.checkpoint.read_checkpoint`: zip CRCs, SHA-256, keys); its
    config is rebuilt with :meth:`Config.from_saved`, so settings that weaken safety
    (:data:`~geolinrpe.train.config.SAFETY_SETTINGS`) are reset with a warning.

    Raises:
        CheckpointError: (a ``ValueError``) the file is missing, truncated, corrupted, not a
            geolinrpe checkpoint, lacks a key, or its model does not match its config; the
            message names the file.
    """
    path = Path(path)
    ckpt = read_checkpoint(path, _MODEL_KEYS, "geolinrpe training checkpoint")
    name = str(path)
    try:
        cfg = Config.from_saved(ckpt["config"], f"checkpoint {name!r}")
    except ValueError as err:
        raise CheckpointError(str(err)) from err
    dev = _select_device(device, 0)
    try:
        task = build_task(cfg, ckpt["task_state"])
        model = build_model(cfg, task)
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise CheckpointError(
            f"checkpoint {name!r}: its model cannot be rebuilt ({type(err).__name__}: {err})"
        ) from err
    model.to(dev).eval()
    return LoadedRun(cfg, task, model, ckpt, dev)


def evaluate(
    loaded: LoadedRun, split: str = "test", batch_size: int | None = None
) -> dict[str, float]:
    """Metrics of a reloaded model on one split (``train``, ``valid`` or ``test``) of its
    config's data (paths as saved in the checkpoint's config)."""
    loaded.cfg.validate()
    datasets = loaded.task.datasets()
    if split not in datasets or datasets[split] is None:
        raise ValueError(f"split {split!r} is not available; choose one of {sorted(datasets)}")
    env = DistEnv(device=loaded.device)
    size = batch_size or loaded.cfg.data.eval_batch_size or loaded.cfg.data.batch_size
    return _evaluate(loaded.model, loaded.task, datasets[split], size, env)


def predict(loaded: LoadedRun, items: list[Any], batch_size: int = 32) -> list[dict[str, Any]]:
    """Prediction rows (:meth:`Task.prediction_rows`) for a list of ``Data`` items, in order."""
    rows: list[dict[str, Any]] = []
    model = loaded.model.eval()
    for start in range(0, len(items), batch_size):
        batch = _move(loaded.task.collate(items[start : start + batch_size]), loaded.device)
        grad = torch.enable_grad() if loaded.task.needs_grad else torch.no_grad()
        with grad:
            out = loaded.task.forward(model, batch)
        rows += loaded.task.prediction_rows(out, batch)
    return rows


def final_test_metrics(results: dict[str, float], out_dir: str | Path) -> dict[str, float]:
    """``test_*`` metrics of a finished run: from :func:`run`'s results or, when a time limit
    stopped it before testing, by evaluating ``best.pt`` (else ``last.pt``) on the test split."""
    found = {k[5:]: v for k, v in results.items() if k.startswith("test_")}
    if found:
        return found
    out_dir = Path(out_dir)
    ckpt = out_dir / "best.pt" if (out_dir / "best.pt").is_file() else out_dir / "last.pt"
    return evaluate(load_checkpoint(ckpt, device="cpu"), "test")
