"""Training: typed configs, the training loop, tasks, checkpoints and plots.

* :class:`Config` (:mod:`.config`): ``data``/``model``/``optim``/``train`` sections from YAML
  plus ``key.subkey=value`` overrides, checked before anything runs.
* :func:`run` (:mod:`.trainer`): trains (one process or ``torchrun``), writes ``metrics.csv``,
  ``last.pt``/``best.pt``, plots, and returns the final metrics.
* :mod:`.tasks`: QM9, OC20 IS2RE/S2EF, point clouds, image patches, character sequences.
* :func:`load_checkpoint`, :func:`evaluate`, :func:`predict`: reuse a trained model.

The ``geolinrpe`` command (:mod:`geolinrpe.cli`) wraps these.
"""

from .checkpoint import CheckpointError
from .config import TASKS, Config, DataConfig, ModelConfig, OptimConfig, TrainConfig
from .tasks import Task, build_task
from .trainer import (
    LoadedRun,
    NonFiniteError,
    build_model,
    evaluate,
    final_test_metrics,
    load_checkpoint,
    plot_learning_curve,
    plot_rpe_profiles,
    predict,
    run,
)

__all__ = [
    "TASKS",
    "CheckpointError",
    "Config",
    "DataConfig",
    "LoadedRun",
    "ModelConfig",
    "NonFiniteError",
    "OptimConfig",
    "Task",
    "TrainConfig",
    "build_model",
    "build_task",
    "evaluate",
    "final_test_metrics",
    "load_checkpoint",
    "plot_learning_curve",
    "plot_rpe_profiles",
    "predict",
    "run",
]
