"""Learned optimizers with RPE attention: the optimizer, a task suite, meta-training, baselines.

``LearnedOptimizer`` (``torch.optim`` interface) and the functional ``learned_step`` share one
``UpdateNetwork``; ``meta_train`` fits it on ``tasks`` by truncated backprop or ES; ``evaluate``
and ``tune_learning_rate`` compare it with tuned Adam and SGD with momentum.
"""

from .learned import (
    LearnedOptimizer,
    UpdateNetwork,
    compute_updates,
    entry_positions,
    init_state,
    learned_step,
)
from .meta import (
    EvalResult,
    MetaConfig,
    build_network,
    evaluate,
    load_checkpoint,
    meta_train,
    plot_curves,
    save_checkpoint,
    train_curve,
    truncation_loss,
    tune_learning_rate,
)
from .tasks import FAMILIES, Task, TaskSpec, make_task, split_tasks

__all__ = [
    "FAMILIES",
    "EvalResult",
    "LearnedOptimizer",
    "MetaConfig",
    "Task",
    "TaskSpec",
    "UpdateNetwork",
    "build_network",
    "compute_updates",
    "entry_positions",
    "evaluate",
    "init_state",
    "learned_step",
    "load_checkpoint",
    "make_task",
    "meta_train",
    "plot_curves",
    "save_checkpoint",
    "split_tasks",
    "train_curve",
    "truncation_loss",
    "tune_learning_rate",
]
