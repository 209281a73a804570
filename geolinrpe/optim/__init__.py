"""Learned optimizers with RPE attention: the optimizer, a task suite, meta-training, baselines.

``LearnedOptimizer`` (``torch.optim`` interface) and the functional ``learned_step`` share one
update network, ``UpdateNetwork`` (attention over a tensor's entries) or
``TemporalUpdateNetwork`` (attention over each entry's last T features, 1D RPE over lags), both
``LearnedUpdateRule``s that own their state and step; ``meta_train`` fits it on ``tasks`` by
truncated backprop, ES or PES (with a horizon curriculum, meta-gradient clipping and exact
resume); ``tune_learning_rates`` and ``evaluate_optimizers`` (``baselines``) compare it with
tuned Adam, AdamW with cosine decay and SGD with momentum on held-out tasks.
"""

from .baselines import (
    BASELINES,
    Evaluation,
    evaluate_optimizers,
    run_curve,
    summarize,
    tune_learning_rates,
)
from .learned import (
    LearnedOptimizer,
    LearnedUpdateRule,
    UpdateNetwork,
    compute_updates,
    entry_positions,
    init_state,
    learned_step,
)
from .meta import (
    METHODS,
    NETWORKS,
    EvalResult,
    MetaConfig,
    build_network,
    load_checkpoint,
    meta_train,
    plot_curves,
    save_checkpoint,
    train_curve,
    truncation_loss,
)
from .tasks import FAMILIES, Task, TaskSpec, Variant, generate_text, make_task, split_tasks
from .temporal import TemporalUpdateNetwork

__all__ = [
    "BASELINES",
    "Evaluation",
    "evaluate_optimizers",
    "run_curve",
    "summarize",
    "tune_learning_rates",
    "FAMILIES",
    "EvalResult",
    "METHODS",
    "NETWORKS",
    "LearnedOptimizer",
    "LearnedUpdateRule",
    "MetaConfig",
    "Task",
    "TaskSpec",
    "TemporalUpdateNetwork",
    "UpdateNetwork",
    "Variant",
    "build_network",
    "compute_updates",
    "entry_positions",
    "generate_text",
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
]
