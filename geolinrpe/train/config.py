r"""Typed training configuration: YAML files plus ``key.subkey=value`` overrides.

A :class:`Config` holds four sections, each a dataclass with typed, documented fields:

* :class:`DataConfig` (``data.*``): the task, where its data lives, splits and batch size;
* :class:`ModelConfig` (``model.*``): the model and its attention/RPE;
* :class:`OptimConfig` (``optim.*``): optimizer, learning-rate schedule, gradient clipping;
* :class:`TrainConfig` (``train.*``): loss, stopping, evaluation, device, precision, output.

Everything that can be checked without touching the data is checked when a config is built
(:meth:`Config.from_dict`, :meth:`Config.load`): unknown keys, wrong types, values outside a
set of choices, non-finite numbers, non-positive sizes, sizes above :data:`MAXIMUM`.
:meth:`Config.validate` (called by :func:`geolinrpe.train.run` before anything is loaded)
also checks that the data paths exist.
Every problem raises :class:`ValueError` naming the dotted key, e.g. ``optim.lr``.

Overrides on the command line (``geolinrpe train cfg.yaml optim.lr=1e-3 data.targets=[gap,homo]
model.rpe=null model.rpe_options.lengthscale=2``) are parsed as YAML values (ints, floats,
booleans, ``null``, ``[lists]``, ``{maps}``) and then checked against the field's type, so
``1e-3`` is a float for a float field and ``gap`` becomes ``[gap]`` for a list field.

Settings a file must not choose (:data:`SAFETY_SETTINGS`: ``data.options.safe``, which
weakens safety, and ``data.options.make_synthetic`` / ``make_molten_salt``, which write files
to ``data.path``)
apply only when the user's own config file or command line sets them (the first with an
:class:`UnsafeSettingWarning`); a config rebuilt from a checkpoint or run folder
(:meth:`Config.from_saved`) has them reset to their safe value, with a warning.

:meth:`Config.to_dict` gives plain data (saved inside every checkpoint);
``Config.from_dict(cfg.to_dict()) == cfg``.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import inspect
import math
import re
import textwrap
import types
import typing
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NamedTuple

import yaml

__all__ = [
    "MAXIMUM",
    "SAFETY_SETTINGS",
    "SafetySetting",
    "TASKS",
    "Config",
    "ConfigKey",
    "DataConfig",
    "ModelConfig",
    "OptimConfig",
    "TrainConfig",
    "UnsafeSettingWarning",
    "config_keys",
    "format_config_keys",
    "parse_override",
]

TaskName = Literal["qm9", "oc20-is2re", "oc20-s2ef", "point-cloud", "patch", "sequence"]
TASKS: tuple[str, ...] = typing.get_args(TaskName)
"""Task names of :mod:`geolinrpe.train.tasks` (``data.task``)."""


@dataclass
class DataConfig:
    """What to learn from (``data.*``).

    Attributes:
        task: one of :data:`TASKS`; decides the dataset, the loss and the metrics.
        path: where the data lives. ``qm9``: the cache folder of
            :class:`~geolinrpe.data.qm9.QM9` (``processed/`` goes there; with
            ``source`` ``pyg-raw``/``xyz`` also ``raw/``). ``oc20-*``: the training file or
            folder (:class:`~geolinrpe.data.oc20.OC20`). ``sequence``: a text file or a
            folder of ``*.py``/``*.txt``/``*.md`` files. Unused for ``point-cloud`` and
            ``patch`` (their data is generated or shipped with scikit-learn).
        valid_path: ``oc20-*``: a separate validation file or folder; ``None`` splits
            ``path`` at random into train/valid/test with ``valid_size``/``test_size``.
        test_path: ``oc20-*``: a separate test file or folder (optional).
        source: ``qm9``: ``qm9pack`` (the CSV files the ``qm9pack`` package ships),
            ``pyg-raw`` or ``xyz``.
        targets: ``qm9``: target names (``gap``, ``homo``, ``U0``, ...; see
            :data:`geolinrpe.data.qm9.TARGETS`), regressed jointly.
        max_molecules: ``qm9``: process only the first ``max_molecules`` molecules in index
            order (small and quick; ``None`` all 130,831 and the DimeNet++ split).
        train_size: use only the first ``train_size`` items of the training split
            (``None``: all). For QM9 the conventional split is made first, so a subset is
            a random sample of the full training set.
        valid_size: items in the validation split (``qm9``/``oc20``/``patch``: taken from
            the split; ``point-cloud``/``sequence``: generated or cut; ``None`` the
            task's default).
        test_size: items in the test split (as ``valid_size``).
        split_seed: seed of every random split (QM9's conventional split uses 42).
        batch_size: the global batch size (graphs or sequences per optimizer step), split
            evenly over the processes of a distributed run.
        balance: how a distributed run shares each step's global batch between its
            processes. ``graphs``: ``batch_size / P`` graphs each (the ``k``-th of every
            ``P`` items of the epoch's order). ``atoms``: the global batch (the same
            items as in one process) is shared so that the processes' atom totals differ
            by at most its largest graph; their numbers of graphs differ, and per-graph
            losses are averaged over the global batch
            (:class:`~geolinrpe.train.trainer.AtomBalancedBatchSampler`). Both give every
            process the same number of steps; one process ignores it.
        eval_batch_size: batch size for evaluation (``None``: ``batch_size``).
        num_workers: DataLoader worker processes per training process.
        options: task-specific dataset options: ``point-cloud``: ``num_classes``,
            ``num_points``, ``noise``, ``rotate``; ``patch``: ``patch_size``;
            ``sequence``: ``seq_len``; ``oc20-*``: ``safe`` (allow-list unpickling) and
            ``make_synthetic`` (write that many simulated systems to ``path`` first when it
            does not exist); ``oc20-s2ef``: ``make_molten_salt: {structures: n, atoms: a}``
            (write ``n`` Na/Cl Ewald boxes of ``a`` ions, :mod:`geolinrpe.data.molten_salt`,
            to ``path`` first when it does not exist).
    """

    task: TaskName = "qm9"
    path: str | None = "data/qm9"
    valid_path: str | None = None
    test_path: str | None = None
    source: Literal["qm9pack", "pyg-raw", "xyz"] = "qm9pack"
    targets: list[str] = field(default_factory=lambda: ["gap"])
    max_molecules: int | None = None
    train_size: int | None = None
    valid_size: int | None = None
    test_size: int | None = None
    split_seed: int = 42
    batch_size: int = 32
    balance: Literal["graphs", "atoms"] = "graphs"
    eval_batch_size: int | None = None
    num_workers: int = 0
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class ModelConfig:
    """The model (``model.*``), built with :func:`geolinrpe.models.build_model`.

    The task adds what follows from the data: ``num_targets``, ``target_mean``,
    ``target_std`` and ``atom_refs`` (regression), the number of classes or the vocabulary.

    Attributes:
        name: ``molecule``, ``point-cloud``, ``patch``, ``sequence`` or ``schnet``.
        embed_dim: channels of the token embeddings.
        num_layers: attention blocks (interaction blocks for ``schnet``).
        num_heads: attention heads.
        rpe: an RPE registry name (:func:`geolinrpe.rpe.names`) or ``None`` for none.
        rpe_options: keyword options of the RPE (e.g. ``lengthscale``, ``num_frequencies``).
        mode: how the RPE combines with attention: ``mask``, ``logit`` or ``product``
            (``None``: the RPE's first mode, ``mask`` for the Fourier families).
        kernel: attention feature map: ``favor+``, ``favor++``, ``relu``, ``elu`` or
            ``identity`` (``None``: the layer's default, ``elu`` in mask mode, ``favor+``
            otherwise).
        num_features: random features of ``favor+``.
        attention: ``linear`` (the O(n) estimator) or ``exact`` (the O(n^2) target).
        options: other keyword arguments of the model (e.g. ``cutoff`` for ``schnet``,
            ``predict_forces``).
    """

    name: str = "molecule"
    embed_dim: int = 128
    num_layers: int = 4
    num_heads: int = 8
    rpe: str | None = "flt-kernel"
    rpe_options: dict[str, Any] = field(default_factory=dict)
    mode: Literal["logit", "mask", "product"] | None = None
    kernel: Literal["favor+", "favor++", "relu", "elu", "identity"] | None = None
    num_features: int = 64
    attention: Literal["linear", "exact"] = "linear"
    options: dict[str, Any] = field(default_factory=dict)


@dataclass
class OptimConfig:
    """Optimizer and learning-rate schedule (``optim.*``).

    Attributes:
        optimizer: ``adamw``, ``adam`` or ``sgd`` (with ``momentum``).
        lr: peak learning rate.
        weight_decay: decoupled (``adamw``) or L2 (``adam``, ``sgd``) weight decay.
        betas: Adam's ``(beta1, beta2)``.
        momentum: SGD momentum.
        schedule: ``cosine`` (linear warm-up then cosine decay to ``min_lr`` at the last
            step), ``plateau`` (multiply by ``plateau_factor`` after ``plateau_patience``
            evaluations without improvement of the monitored metric) or ``constant``
            (after the warm-up).
        warmup_steps: linear warm-up from 0 over this many optimizer steps.
        min_lr: the learning rate at the end of the cosine (and the floor of plateau).
        plateau_factor: learning-rate factor of ``plateau``.
        plateau_patience: evaluations without improvement before ``plateau`` decays.
        grad_clip: clip the global gradient norm to this value (``None``: no clipping).
        rpe_lr_scale: learning-rate factor of the RPE parameters (spectral shells,
            amplitudes, length scales) relative to ``lr``.
    """

    optimizer: Literal["adamw", "adam", "sgd"] = "adamw"
    lr: float = 5e-4
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9
    schedule: Literal["cosine", "plateau", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr: float = 0.0
    plateau_factor: float = 0.5
    plateau_patience: int = 5
    grad_clip: float | None = 10.0
    rpe_lr_scale: float = 1.0


@dataclass
class TrainConfig:
    """How to run the training (``train.*``).

    Attributes:
        out_dir: run folder: ``metrics.csv``, ``last.pt``, ``best.pt``, ``config.yaml``,
            ``learning_curve.png``, ``rpe/*.png``, ``tensorboard/``.
        seed: seeds torch, numpy and random, the model's initialisation and the data order
            (each epoch's order follows from ``(seed, epoch)``).
        epochs: passes over the training split (``max_steps`` may end training earlier).
        max_steps: total optimizer steps (``None``: ``epochs`` times steps per epoch); also
            the horizon of the cosine schedule.
        stop_after_steps: end this invocation after this many optimizer steps of it, with
            ``last.pt`` saved, as a slot of a preemptible queue ends; ``train.resume``
            continues. Schedules still follow ``max_steps``/``epochs``.
        time_limit_min: end this invocation (saving ``last.pt``) once this many minutes of
            training have passed (``None``: no limit).
        eval_every: evaluate on the validation split every this many steps (``None``: at
            the end of every epoch). ``last.pt`` is written at every evaluation.
        save_every: also write ``last.pt`` every this many steps (``None``: only at
            evaluations and when training stops).
        log_every: write the running training loss to ``metrics.csv`` every this many steps.
        redraw_every: draw new random features (the ``favor+`` kernel's projections, the
            RPE's random frequencies or noise) every this many optimizer steps: before step
            ``s`` (0-based) when ``s > 0`` and ``s % redraw_every == 0``, from a generator
            seeded by ``(seed, s)``, so every process draws the same features and a resumed
            run draws as an uninterrupted one (``None``: never; drawn once when the model is
            built).
        monitor: the validation metric for ``best.pt``, early stopping and ``plateau``
            (``None``: the task's main metric, e.g. ``mae``, ``accuracy``, ``perplexity``).
        early_stopping_patience: stop after this many evaluations without improvement of
            ``monitor`` (``None``: never).
        loss: regression loss: ``l1``, ``mse`` or ``huber`` (classification and language
            tasks always use cross-entropy).
        energy_weight: ``oc20-s2ef``: weight of the energy term of the loss.
        force_weight: ``oc20-s2ef``: weight of the force term of the loss.
        device: ``auto`` (CUDA when available), ``cpu`` or ``cuda``.
        precision: ``fp32``; ``bf16`` (autocast on CPU or GPU); ``fp16`` (autocast with a
            gradient scaler, CUDA only).
        resume: continue from a checkpoint: its path, or ``auto`` for ``out_dir/last.pt``
            when it exists (``None``: start afresh; an existing ``metrics.csv`` is replaced).
        progress: show tqdm progress bars.
        tensorboard: also log to TensorBoard when the ``tensorboard`` package is installed.
        plot: draw ``learning_curve.png`` and the learned RPE profiles at the end.
        num_threads: CPU threads of each process (``torch.set_num_threads``). ``None``
            (the default; shipped configs leave it unset) follows torch and
            ``OMP_NUM_THREADS``: the trainer sets nothing, except under ``torchrun`` with
            more than one process on the node and no ``OMP_NUM_THREADS``, where each process
            takes ``max(1, cores // LOCAL_WORLD_SIZE)`` threads (cores: those this process
            may run on), so processes do not oversubscribe the cores. On a machine whose
            cores are shared with other jobs, 1 is often fastest.
        find_unused_parameters: passed to DistributedDataParallel (for models whose
            forward does not use every parameter).
    """

    out_dir: str = "runs/qm9_gap"
    seed: int = 0
    epochs: int = 100
    max_steps: int | None = None
    stop_after_steps: int | None = None
    time_limit_min: float | None = None
    eval_every: int | None = None
    save_every: int | None = None
    log_every: int = 10
    redraw_every: int | None = None
    monitor: str | None = None
    early_stopping_patience: int | None = None
    loss: Literal["l1", "mse", "huber"] = "l1"
    energy_weight: float = 1.0
    force_weight: float = 100.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    resume: str | None = None
    progress: bool = True
    tensorboard: bool = True
    plot: bool = True
    num_threads: int | None = None
    find_unused_parameters: bool = False


_POSITIVE = {
    "data.max_molecules",
    "data.train_size",
    "data.valid_size",
    "data.test_size",
    "data.batch_size",
    "data.eval_batch_size",
    "model.embed_dim",
    "model.num_layers",
    "model.num_heads",
    "model.num_features",
    "train.epochs",
    "train.max_steps",
    "train.stop_after_steps",
    "train.time_limit_min",
    "train.eval_every",
    "train.save_every",
    "train.log_every",
    "train.redraw_every",
    "train.early_stopping_patience",
    "train.num_threads",
    "optim.lr",
    "optim.grad_clip",
    "optim.plateau_patience",
    "optim.rpe_lr_scale",
}
_NON_NEGATIVE = {
    "data.num_workers",
    "optim.weight_decay",
    "optim.warmup_steps",
    "optim.min_lr",
    "optim.momentum",
    "train.energy_weight",
    "train.force_weight",
}

MAXIMUM: dict[str, int | float] = {
    "model.embed_dim": 65_536,
    "model.num_layers": 1_024,
    "model.num_heads": 1_024,
    "model.num_features": 65_536,
    "model.options.hidden_channels": 65_536,
    "model.options.num_filters": 65_536,
    "model.options.num_interactions": 1_024,
    "model.options.num_gaussians": 65_536,
    "model.options.num_radial": 65_536,
    "model.options.sh_channels": 65_536,
    "model.options.sh_lmax": 16,
    "model.options.max_num_neighbors": 65_536,
    "model.options.mlp_ratio": 1_024,
    "model.options.max_len": 16_777_216,
    "model.rpe_options.num_frequencies": 65_536,
    "model.rpe_options.num_features": 65_536,
    "data.batch_size": 16_777_216,
    "data.eval_batch_size": 16_777_216,
    "data.num_workers": 1_024,
}
"""Upper bounds of size options (a typo such as ``model.num_features=1e8`` would otherwise
allocate for minutes); keys under ``model.options``/``model.rpe_options`` apply when set."""


class SafetySetting(NamedTuple):
    """A setting a file must never choose: its safe value (``None``: absent), what another
    value does, and whether the user's own choice of another value is warned about."""

    safe: Any
    risk: str
    warn: bool = True


SAFETY_SETTINGS: dict[str, SafetySetting] = {
    "data.options.safe": SafetySetting(
        True,
        "OC20 LMDB records are unpickled with the allow-list (safe=true); false unpickles them "
        "with pickle, which runs any code a record names",
    ),
    "data.options.make_synthetic": SafetySetting(
        None,
        "writes simulated OC20 files to data.path when that path does not exist",
        warn=False,
    ),
    "data.options.make_molten_salt": SafetySetting(
        None,
        "writes simulated molten-salt boxes to data.path when that path does not exist",
        warn=False,
    ),
}
"""Settings a file must not choose: dotted key -> :class:`SafetySetting`.

They are never taken from a checkpoint or a saved run folder (:meth:`Config.from_saved`
resets them to the safe value with a warning); set on the user's own command line or config
file they apply, with an :class:`UnsafeSettingWarning` for those that weaken safety."""


class UnsafeSettingWarning(UserWarning):
    """A setting of :data:`SAFETY_SETTINGS` is unsafe, or was reset because it came from a
    checkpoint."""


_MISSING = object()


def _get_path(values: dict[str, Any], key: str) -> Any:
    node: Any = values
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


@dataclass
class Config:
    """The whole configuration of a training run: ``data``, ``model``, ``optim``, ``train``.

    Build one with :meth:`load` (YAML file plus overrides) or :meth:`from_dict`; both raise
    :class:`ValueError` naming the key of the first problem.
    """

    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    # ---------------------------------------------------------------------------- building
    @classmethod
    def from_dict(cls, values: dict[str, Any] | None = None) -> Config:
        """A config from nested plain data (as YAML gives it); missing keys keep defaults.

        Raises:
            ValueError: an unknown key, a value of the wrong type or outside its choices,
                or a size that must be positive; the message names the dotted key.
        """
        cfg = _build(cls, values or {}, "")
        cfg.check()
        return cfg

    @classmethod
    def load(cls, path: str | Path | None = None, overrides: Sequence[str] = ()) -> Config:
        """Read a YAML file (``None``: the defaults) and apply ``key.subkey=value`` overrides.

        Raises:
            ValueError: the file is missing or not a YAML mapping, an override is malformed
                or names an unknown key, or a value fails :meth:`from_dict`'s checks.
        """
        values: dict[str, Any] = {}
        if path is not None:
            values = read_yaml_mapping(path, "sections")
        for override in overrides:
            key, value = parse_override(override)
            _set_dotted(values, key, value)
        cfg = cls.from_dict(values)
        where = "the command line" if path is None else f"{str(path)!r} or the command line"
        cfg.warn_unsafe(f"set in {where}")
        return cfg

    @classmethod
    def from_saved(cls, values: dict[str, Any], source: str | Path) -> Config:
        """A config rebuilt from a checkpoint or a saved run folder (``source`` names it),
        with every setting of :data:`SAFETY_SETTINGS` reset to its safe value: a file never
        weakens safety. Each reset is an :class:`UnsafeSettingWarning` naming ``source``,
        the key, and how to opt in on one's own command line or config file.

        Raises:
            ValueError: as :meth:`from_dict`, the message also naming ``source``.
        """
        if not isinstance(values, dict):
            raise ValueError(f"{source}: the stored config is not a mapping")
        values = copy.deepcopy(values)
        for key, (safe, _, _) in SAFETY_SETTINGS.items():
            stored = _get_path(values, key)
            if stored is _MISSING or stored == safe:
                continue
            _reset(values, key, safe)
            using = "no value" if safe is None else f"{key}={safe!r}"
            message = (
                f"{source}: stored setting {key}={stored!r} ignored, using {using} "
                f"(settings that weaken safety are never taken from a checkpoint); to opt "
                f"in, pass {key}={_yaml_word(stored)} on your own command line or set it in "
                "your own config file"
            )
            warnings.warn(message, UnsafeSettingWarning, stacklevel=2)
        try:
            return cls.from_dict(values)
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from err

    def unsafe_settings(self) -> dict[str, Any]:
        """The settings of :data:`SAFETY_SETTINGS` that differ from their safe value."""
        values = self.to_dict()
        found = {}
        for key, (safe, _, _) in SAFETY_SETTINGS.items():
            value = _get_path(values, key)
            if value is not _MISSING and value != safe:
                found[key] = value
        return found

    def safe_settings(self) -> Config:
        """A copy with every setting of :data:`SAFETY_SETTINGS` at its safe value."""
        values = self.to_dict()
        for key, (safe, _, _) in SAFETY_SETTINGS.items():
            if _get_path(values, key) is not _MISSING:
                _reset(values, key, safe)
        return Config.from_dict(values)

    def warn_unsafe(self, where: str) -> None:
        """An :class:`UnsafeSettingWarning` per unsafe setting, saying ``where`` it was set."""
        for key, value in self.unsafe_settings().items():
            if not SAFETY_SETTINGS[key].warn:
                continue
            message = (
                f"config key {key!r} is {_yaml_word(value)} ({where}): "
                f"{SAFETY_SETTINGS[key].risk}; use it only with files you trust"
            )
            warnings.warn(message, UnsafeSettingWarning, stacklevel=3)

    def to_dict(self) -> dict[str, Any]:
        """Nested plain data (dicts, lists, str, int, float, bool, None): YAML- and
        checkpoint-safe."""
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        """The config as a YAML document (sections in order)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, overrides: Sequence[str]) -> Config:
        """A copy with ``key.subkey=value`` overrides applied (checked like :meth:`load`)."""
        values = self.to_dict()
        for override in overrides:
            key, value = parse_override(override)
            _set_dotted(values, key, value)
        cfg = Config.from_dict(values)
        before = self.unsafe_settings()
        if any(before.get(k, _MISSING) != v for k, v in cfg.unsafe_settings().items()):
            cfg.warn_unsafe("set on the command line")
        return cfg

    # -------------------------------------------------------------------------- checking
    def check(self) -> None:
        """Checks that need no files: finite numbers, positive and bounded sizes, targets
        given, consistent options, safety settings of the right type."""
        values = self.to_dict()
        for section, part in values.items():
            for name, value in part.items():
                numbers = value if isinstance(value, list) else [value]
                for number in numbers:
                    if isinstance(number, float) and not math.isfinite(number):
                        raise ValueError(
                            f"config key '{section}.{name}' must be a finite number, got {value!r}"
                        )
        for key, bound in MAXIMUM.items():
            value = _get_path(values, key)
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if not math.isfinite(value) or value > bound:
                    raise ValueError(f"config key {key!r} must be at most {bound:,}, got {value!r}")
        for key, (safe, _, _) in SAFETY_SETTINGS.items():
            value = _get_path(values, key)
            if safe is not None and value is not _MISSING and type(value) is not type(safe):
                raise ValueError(f"config key {key!r} expects {type(safe).__name__}, got {value!r}")
        for key in sorted(_POSITIVE | _NON_NEGATIVE):
            value = self.get(key)
            if value is None:
                continue
            if key in _POSITIVE and not value > 0:
                raise ValueError(f"config key {key!r} must be > 0, got {value!r}")
            if key in _NON_NEGATIVE and value < 0:
                raise ValueError(f"config key {key!r} must be >= 0, got {value!r}")
        if len(self.optim.betas) != 2 or not all(0 <= b < 1 for b in self.optim.betas):
            raise ValueError(
                f"config key 'optim.betas' must be two numbers in [0, 1), got {self.optim.betas}"
            )
        if not 0 < self.optim.plateau_factor < 1:
            raise ValueError(
                f"config key 'optim.plateau_factor' must be in (0, 1), "
                f"got {self.optim.plateau_factor}"
            )
        if self.model.embed_dim % self.model.num_heads:
            raise ValueError(
                f"config key 'model.embed_dim' ({self.model.embed_dim}) must be divisible by "
                f"'model.num_heads' ({self.model.num_heads})"
            )
        if self.data.task == "qm9":
            if not self.data.targets:
                raise ValueError("config key 'data.targets' must name at least one QM9 target")
            from ..data.qm9 import target_index

            for name in self.data.targets:
                try:
                    target_index(name)
                except ValueError as err:
                    raise ValueError(f"config key 'data.targets': {err}") from None
        if self.data.task in ("oc20-is2re", "oc20-s2ef", "sequence") and not self.data.path:
            raise ValueError(f"config key 'data.path' is required for task {self.data.task!r}")
        if self.model.rpe is not None:
            from ..rpe import names, unknown_option

            if self.model.rpe not in names():
                raise ValueError(
                    f"config key 'model.rpe': unknown RPE {self.model.rpe!r}; "
                    f"choose one of {names()} or null"
                )
            for key in self.model.rpe_options:
                problem = unknown_option(self.model.rpe, key)
                if problem is not None:
                    raise ValueError(f"config key 'model.rpe_options.{key}': {problem}")
        self.model_kwargs()

    def validate(self) -> None:
        """:meth:`check` plus the data paths: each must exist (``ValueError`` names the key)."""
        self.check()
        task = self.data.task
        if task == "qm9":
            if self.data.source == "qm9pack":
                from ..data.qm9 import qm9pack_data_dir

                try:
                    folder = qm9pack_data_dir()
                except FileNotFoundError as err:
                    raise ValueError(f"config key 'data.source': {err}") from None
                if not folder.is_dir():
                    raise ValueError(
                        f"config key 'data.source': qm9pack's data folder {folder} is missing"
                    )
            elif not (Path(self.data.path or ".") / "raw").is_dir():
                raise ValueError(
                    f"config key 'data.path': {self.data.path!r} has no raw/ folder with the "
                    f"QM9 files of source {self.data.source!r} (see datasets/qm9/README.md)"
                )
            if not self.data.path:
                raise ValueError("config key 'data.path' (the QM9 cache folder) is required")
        for key in ("data.path", "data.valid_path", "data.test_path"):
            value = self.get(key)
            if value is None or task in ("qm9", "point-cloud", "patch"):
                continue
            generated = ("make_synthetic", "make_molten_salt")
            if key == "data.path" and any(name in self.data.options for name in generated):
                continue  # written on first use
            if not Path(value).exists():
                raise ValueError(f"config key {key!r}: {value!r} does not exist")
        if self.train.resume not in (None, "auto") and not Path(self.train.resume).is_file():
            raise ValueError(f"config key 'train.resume': {self.train.resume!r} does not exist")
        if self.train.device == "cuda" or self.train.precision == "fp16":
            import torch

            if not torch.cuda.is_available():
                key = "train.device" if self.train.device == "cuda" else "train.precision"
                raise ValueError(f"config key {key!r} needs CUDA, which is not available")

    def model_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :func:`geolinrpe.models.build_model` from the ``model``
        section: the common options (``embed_dim`` ... ``attention``) that the model takes,
        plus ``model.options``. The task adds what follows from the data.

        Raises:
            ValueError: an unknown ``model.name``; a common option changed from its default
                that the model does not take (e.g. ``model.rpe`` for ``schnet``); a key of
                ``model.options`` the model does not have.
        """
        from ..models import model_names, model_options

        m = self.model
        if m.name not in model_names():
            raise ValueError(
                f"config key 'model.name': unknown model {m.name!r}; choose one of {model_names()}"
            )
        accepted = model_options(m.name)
        takes = ", ".join(sorted(accepted))
        defaults = ModelConfig()
        kwargs: dict[str, Any] = {}
        for f in dataclasses.fields(ModelConfig):
            if f.name in ("name", "options"):
                continue
            value = getattr(m, f.name)
            if f.name in accepted:
                kwargs[f.name] = dict(value) if isinstance(value, dict) else value
            elif value != getattr(defaults, f.name):
                raise ValueError(
                    f"config key 'model.{f.name}' does not apply to model {m.name!r} (it takes "
                    f"{takes}; set those under model.options)"
                )
        for key, value in m.options.items():
            if key not in accepted:
                close = difflib.get_close_matches(str(key), sorted(accepted), n=1)
                hint = f"; did you mean {close[0]!r}?" if close else ""
                raise ValueError(
                    f"config key 'model.options.{key}': model {m.name!r} has no option "
                    f"{key!r}{hint} (it takes {takes})"
                )
            kwargs[key] = value
        return kwargs

    def get(self, key: str) -> Any:
        """The value at a dotted key (``"optim.lr"``)."""
        node: Any = self
        for part in key.split("."):
            node = node[part] if isinstance(node, dict) else getattr(node, part)
        return node


# ------------------------------------------------------------------------- key listing
class ConfigKey(NamedTuple):
    """One config key as :func:`config_keys` lists it."""

    key: str
    """The dotted key, e.g. ``optim.lr``."""
    type: str
    """Its type as the error messages write it, e.g. ``float | null``."""
    default: Any
    """Its default value."""
    description: str
    """The field's description from its section's docstring (markup removed)."""


def _plain(text: str) -> str:
    """Docstring text without reST markup: ``:class:`~a.B``` -> ``B``, ````x```` -> ``x``."""

    def role(match: re.Match) -> str:
        target = match.group(1)
        return target.rsplit(".", 1)[-1] if target.startswith("~") else target

    text = re.sub(r":[\w.]+:`([^`]*)`", role, text)
    return text.replace("``", "")


def _attribute_docs(cls: type) -> dict[str, str]:
    """Field name -> description, from the ``Attributes:`` section of ``cls``'s docstring."""
    doc = inspect.cleandoc(cls.__doc__ or "")
    _, found, section = doc.partition("Attributes:")
    docs: dict[str, list[str]] = {}
    if not found:
        return {}
    current: list[str] | None = None
    for line in section.splitlines():
        if not line.strip():
            continue
        indent = len(line) - len(line.lstrip())
        if indent == 0:
            break  # the next section
        match = re.match(r"(\w+): (.*)", line.strip())
        if indent <= 4 and match:
            current = docs.setdefault(match.group(1), [match.group(2)])
        elif current is not None:
            current.append(line.strip())
    return {name: _plain(" ".join(parts)) for name, parts in docs.items()}


def config_keys() -> list[ConfigKey]:
    """Every config key, section by section in file order, with its type, default and
    description (from the section dataclasses and their docstrings)."""
    defaults = Config()
    keys = []
    for section in dataclasses.fields(Config):
        cls = typing.get_type_hints(Config)[section.name]
        docs = _attribute_docs(cls)
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            keys.append(
                ConfigKey(
                    f"{section.name}.{f.name}",
                    _type_name(hints[f.name]),
                    getattr(getattr(defaults, section.name), f.name),
                    docs.get(f.name, ""),
                )
            )
    return keys


def format_config_keys(sections: Sequence[str] = (), width: int = 100) -> str:
    """The text ``geolinrpe config`` prints: per key a line ``key: type = default`` (the
    default as one writes it in an override) and its description, indented and wrapped.

    Args:
        sections: only these sections (``data``, ``model``, ``optim``, ``train``); all when
            empty.
        width: wrap descriptions at this many characters.

    Raises:
        ValueError: an unknown section (named, with the known ones).
    """
    names = [f.name for f in dataclasses.fields(Config)]
    for section in sections:
        if section not in names:
            raise ValueError(f"unknown config section {section!r}; choose from {names}")
    lines = []
    for item in config_keys():
        if sections and item.key.split(".")[0] not in sections:
            continue
        lines.append(f"{item.key}: {item.type} = {_yaml_word(item.default)}")
        lines += textwrap.wrap(
            item.description,
            width,
            initial_indent="    ",
            subsequent_indent="    ",
            break_on_hyphens=False,
        )
    return "\n".join(lines)


# ------------------------------------------------------------------------------ helpers
def _yaml_word(value: Any) -> str:
    """``value`` as one would type it in an override (``false``, ``1``, ``abc``)."""
    return yaml.safe_dump(value, default_flow_style=True).strip().removesuffix("...").strip()


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """The mapping a YAML config file holds (``yaml.safe_load``; an empty file is ``{}``).

    Raises:
        ValueError: naming the file when it is missing, not valid YAML, or not a mapping of
            ``what`` (e.g. ``"sections"``).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file {str(path)!r} does not exist")
    try:
        loaded = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"config file {str(path)!r} is not valid YAML: {err}") from err
    if loaded is not None and not isinstance(loaded, dict):
        raise ValueError(f"config file {str(path)!r} must hold a mapping of {what}")
    return loaded or {}


def parse_override(text: str) -> tuple[str, Any]:
    """``"optim.lr=1e-3"`` -> ``("optim.lr", 0.001)``; the value is parsed as YAML.

    Raises:
        ValueError: no ``=``, an empty key, or a value that is not valid YAML.
    """
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key or any(not part for part in key.split(".")):
        raise ValueError(f"override {text!r} is not of the form key.subkey=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as err:
        raise ValueError(f"override {text!r}: the value is not valid YAML ({err})") from err
    return key, value


def _reset(values: dict[str, Any], key: str, safe: Any) -> None:
    """Set ``key`` to its safe value; a safe value of ``None`` removes the key."""
    if safe is not None:
        _set_dotted(values, key, safe)
        return
    *sections, name = key.split(".")
    node = values
    for part in sections:
        node = node[part]
    del node[name]


def _set_dotted(values: dict[str, Any], key: str, value: Any) -> None:
    """Set ``values[a][b][c] = value`` for ``key = "a.b.c"``, creating sections."""
    node = values
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise ValueError(
                f"override {key!r}: {'.'.join(parts[: i + 1])!r} is a value, not a section"
            )
        node = child
    node[parts[-1]] = value


def _build(cls: type, values: Any, prefix: str) -> Any:
    """An instance of dataclass ``cls`` from a mapping, type-checking every field."""
    where = prefix.rstrip(".") or "the config"
    if not isinstance(values, dict):
        raise ValueError(f"config key {where!r} must be a mapping, got {values!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in values:
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=1)
            hint = f"; did you mean {prefix + close[0]!r}?" if close else ""
            raise ValueError(
                f"unknown config key {prefix + str(key)!r}{hint} (known keys of "
                f"{where}: {', '.join(fields)})"
            )
    kwargs = {}
    for name, value in values.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, prefix + name)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return repr(tp).replace("typing.", "")
    return "null" if tp is type(None) else getattr(tp, "__name__", repr(tp))


def _number(value: Any) -> float | None:
    """A float from a YAML number or a numeric string such as ``"1e-3"`` (YAML 1.1 reads
    exponents without a dot as strings); ``None`` otherwise."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


class _Mismatch(Exception):
    pass


def _coerce(value: Any, tp: Any, key: str) -> Any:
    try:
        return _coerce_or_raise(value, tp)
    except _Mismatch:
        raise ValueError(
            f"config key {key!r} expects {_type_name(tp)}, got {value!r} ({type(value).__name__})"
        ) from None


def _coerce_or_raise(value: Any, tp: Any) -> Any:
    """``value`` as type ``tp`` (unions, Literal, list, dict, bool, int, float, str), or
    :class:`_Mismatch`."""
    if tp is Any:
        return value
    if tp is type(None):
        if value is None:
            return None
        raise _Mismatch
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is Literal:
        if value in args and not isinstance(value, bool):
            return value
        raise _Mismatch
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        for arm in args:
            if arm is type(None):
                continue
            try:
                return _coerce_or_raise(value, arm)
            except _Mismatch:
                continue
        raise _Mismatch
    if origin is list:
        items = list(value) if isinstance(value, (list, tuple)) else [value]
        if value is None or isinstance(value, dict):
            raise _Mismatch
        return [_coerce_or_raise(v, args[0]) for v in items] if args else items
    if origin is dict:
        if not isinstance(value, dict) or not all(isinstance(k, str) for k in value):
            raise _Mismatch
        return dict(value)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _Mismatch
    if tp is int:
        number = _number(value)
        if number is None or not number.is_integer():
            raise _Mismatch
        return int(number)
    if tp is float:
        number = _number(value)
        if number is None:
            raise _Mismatch
        return number
    if tp is str:
        if isinstance(value, str):
            return value
        raise _Mismatch
    raise TypeError(f"unsupported config field type {tp!r}")  # a bug in this module
