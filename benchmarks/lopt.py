"""Learned optimizers (temporal and spatial update networks) against tuned Adam, AdamW with
cosine decay and SGD with momentum on held-out in-distribution and out-of-distribution tasks.

1. Tunes each baseline's learning rate per family on meta-validation tasks
   (:func:`~geolinrpe.optim.baselines.tune_learning_rates`: log grids, score: mean of the last 5
   losses at the budget / initial loss), for the meta-training families and the unseen ones.
2. Meta-trains each learned update rule (``--networks``, default ``temporal_magnitude
   spatial``: the :class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork` with
   ``learn_direction=False``, learned step sizes on its skip's direction, and today's
   :class:`~geolinrpe.optim.learned.UpdateNetwork`, both with ``rpe="flt-kernel"``; a name
   without ``_magnitude`` meta-trains the network with its direction head, whatever the config
   says) with :func:`~geolinrpe.optim.meta.meta_train` on the meta-train split of ``--families``
   (``--config``: a YAML of ``MetaConfig`` keys; ``--method``; ``--set KEY=VALUE ...``:
   overrides applied last), keeps the network with the best validation score (``best.pt``)
   and times it. With ``--eta adam`` (default) the learned
   optimizer's base learning rate ``eta`` on each family is tuned Adam's from step 1 (its
   ``MetaConfig.family_lrs``): the untrained network *is* that Adam, so both start from the
   same tuning and meta-training has to improve on it; ``--eta config`` keeps the config's.
   ``--checkpoint PATH ...`` evaluates saved networks instead of meta-training.
3. Trains every held-out task with every optimizer from the same initialisation and minibatches
   (:func:`~geolinrpe.optim.baselines.evaluate_optimizers`) for ``--steps`` x the task's horizon
   multiplier steps and records the loss (mean of the 5 minibatch losses ending there) and
   loss / initial loss at steps 50, 200, 1,000 and at each task's final step:

   * ``split="in_dist"``, ``shift="none"``: test tasks of the meta-training families (other
     seeds, widths and half of the data);
   * ``split="ood"``, ``shift="wider, deeper, 5x horizon"``: :func:`~geolinrpe.optim.tasks.
     ood_variant` tasks of ``--ood-families`` (default: all evaluated families);
   * ``split="ood"``, ``shift="unseen family"``: test tasks of ``--unseen-families`` (default
     charlm and qm9 without ``--quick``), tuned for the baselines but never meta-trained on;
     reported per family, not pooled.

   It prints per split a table per family and optimizer (mean and standard deviation over tasks
   of the loss and of the relative loss; ``all`` pools the tasks of the split's meta-training
   families, so its mean loss is the mean of the families' mean losses) and the issue's targets
   (:data:`TARGET_STEPS`: the learned optimizer's pooled in-distribution mean loss below tuned
   Adam's at steps 200 and 1,000).

Outputs: ``--json PATH``: ``{"machine", "load_average", "args", "families",
"unseen_families", "ood_families", "meta_training" (per learned optimizer: seconds,
best_meta_step, checkpoint, config, validation history, meta-loss), "tuned_lrs",
"tune_seconds", "eval_seconds", "targets" ({optimizer, step, loss, adam_loss, relative_loss,
adam_relative_loss, met}), "records" (one per optimizer, task and step: optimizer, family,
split, shift, task, seed, horizon, lr, step, loss, relative_loss, initial_loss, pool;
non-finite losses as null), "summary"}``; ``--plots DIR``: ``curves_in_dist.png``,
``curves_ood.png`` and ``curves_unseen.png`` (mean loss / initial loss against step, one panel
per family, :func:`~geolinrpe.optim.meta.plot_curves`); ``--out DIR``: the meta-training
checkpoints (``DIR/lopt_<network>[_magnitude]/best.pt``, ``checkpoint.pt``).

``--quick``: 60 inner steps (ood: 300), one task per family and split, families quadratic,
rosenbrock, mlp and conv, no unseen families, 8 meta-steps of meta-batch 1 per network (unroll
60, validation on one task per family for 20 steps), every other learning rate of the grids:
about a minute on 2 CPU cores. Costs of the full run on 2 CPU cores (measured per step with the
other core busy): the temporal learned optimizer takes about 6 ms per step on the four small
families, 0.1 to 0.2 s on charlm's and qm9's test tasks and 1.2 to 1.9 s on their ood tasks
(100k to 230k parameters), which is why the ood split defaults to all families but the
recorded run passes ``--ood-families quadratic rosenbrock mlp conv`` (benchmarks/RESULTS.md).

    python benchmarks/lopt.py [--quick] [--json PATH] [--plots DIR] [--config YAML] ...
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import torch

from geolinrpe.optim import MetaConfig, load_checkpoint, meta_train, plot_curves, split_tasks
from geolinrpe.optim.baselines import (
    BASELINES,
    DEFAULT_GRIDS,
    RECORD_STEPS,
    evaluate_optimizers,
    summarize,
    tune_learning_rates,
)
from geolinrpe.optim.cli import load_config
from geolinrpe.optim.meta import NETWORKS
from geolinrpe.optim.tasks import FAMILIES

TRAIN_FAMILIES = ("quadratic", "rosenbrock", "mlp", "conv")
UNSEEN_FAMILIES = ("charlm", "qm9")
QUICK_FAMILIES = ("quadratic", "rosenbrock", "mlp", "conv")


def machine() -> dict:
    info = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _plain(value):
    """JSON-safe: non-finite floats as ``None``, tuples as lists."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def _cell(mean: float, std: float) -> str:
    return "-" if math.isnan(mean) else f"{mean:.4g} ± {std:.2g}"


def print_tables(rows: list[dict]) -> None:
    """One markdown table per split: a row per family and optimizer, a column per step."""
    for split in dict.fromkeys(r["split"] for r in rows):
        split_rows = [r for r in rows if r["split"] == split]
        steps = sorted({r["step"] for r in split_rows})
        print(f"\n{split}: loss (mean ± std over tasks) / loss relative to the initial loss")
        header = "| family | optimizer | " + " | ".join(f"step {s}" for s in steps) + " |"
        print(header + "\n|" + "---|" * (2 + len(steps)))
        cells: dict[tuple[str, str], dict[int, dict]] = {}
        for r in split_rows:
            cells.setdefault((r["family"], r["optimizer"]), {})[r["step"]] = r
        for (family, optimizer), by_step in cells.items():
            parts = []
            for s in steps:
                r = by_step.get(s)
                if r is None:
                    parts.append("")
                    continue
                text = _cell(r["loss_mean"], r["loss_std"]) + " / "
                text += _cell(r["relative_mean"], r["relative_std"])
                if r["diverged"]:
                    text += f" ({r['diverged']}/{r['tasks']} diverged)"
                parts.append(text)
            print(f"| {family} | {optimizer} | " + " | ".join(parts) + " |")


TARGET_STEPS = (200, 1000)
"""Issue 17's targets: the learned optimizer's mean in-distribution loss below tuned Adam's at
these steps."""


def network_options(name: str) -> dict:
    """The ``MetaConfig`` keys of a ``--networks`` entry: ``temporal`` or ``spatial`` (the
    update network, with its direction head), or either with ``_magnitude``
    (``learn_direction=False``: the network sets each entry's step size on its linear skip's
    direction, Adam's at the start). They override the config's."""
    network, _, variant = name.partition("_")
    if network not in NETWORKS or variant not in ("", "magnitude"):
        raise ValueError(
            f"--networks entries are <network>[_magnitude] with network in {tuple(NETWORKS)}, "
            f"got {name!r}"
        )
    return {"network": network, "learn_direction": not variant}


def label_of(cfg: MetaConfig) -> str:
    """The optimizer label of a meta-training config: ``lopt_<network>[_magnitude]``."""
    return f"lopt_{cfg.network}" + ("" if cfg.learn_direction else "_magnitude")


def meta_config(args, name: str, families: tuple, steps: int, eta: dict | None) -> MetaConfig:
    """The meta-training config of the ``--networks`` entry ``name``: the defaults
    (``--quick``: a tiny run), else ``--config``'s keys, then what this command line sets
    explicitly; with ``eta``, the learned optimizer's ``family_lrs``; last, ``--set``'s
    ``key=value`` overrides."""
    meta_steps = args.meta_steps or (8 if args.quick else 200)
    values = dict(
        families=families,
        **network_options(name),
        method=args.method,
        meta_steps=meta_steps,
        valid_every=meta_steps,
        seed=args.seed,
    )
    if args.quick:
        values.update(meta_batch=1, unroll=steps, num_valid_tasks=len(families), valid_steps=20)
    if eta is not None:
        values["family_lrs"] = dict(eta)  # every tuned family, the unseen ones included
    if not args.config:
        return load_config(None, args.set, values=values)
    given = {**network_options(name), "families": families, "seed": args.seed}
    given.update({"method": args.method} if args.method != "tbptt" else {})
    given.update({"family_lrs": values["family_lrs"]} if eta is not None else {})
    if args.meta_steps:
        given.update(meta_steps=args.meta_steps)
    return load_config(args.config, args.set, values=given)


def _etas(cfg: MetaConfig, eta: dict | None) -> dict:
    """The learned optimizer's base learning rate per family: ``eta``'s (tuned Adam's) where it
    has the family, else the config's."""
    return {f: (eta or {}).get(f, cfg.lr_for(f)) for f in FAMILIES}


def meta_train_all(args, families, steps, eta, out: Path) -> tuple[dict, dict]:
    """Meta-train each ``--networks`` entry (or load ``--checkpoint`` files); return
    ``({label: (net, eta per family)}, {label: meta-training info})``. A meta-trained network
    is the one with the best validation score (``best.pt``; the last one if it never
    validated)."""
    learned, info = {}, {}
    if args.checkpoint:
        for path in args.checkpoint:
            net, cfg, ckpt = load_checkpoint(path)
            label = label_of(cfg)
            learned[label] = (net, _etas(cfg, eta))
            history = ckpt.get("history", {})
            info[label] = {
                "checkpoint": str(path),
                "meta_step": ckpt.get("meta_step"),
                "seconds": history.get("seconds"),
                "config": asdict(cfg),
                "valid": history.get("valid", []),
            }
        return learned, info
    for name in args.networks:
        cfg = meta_config(args, name, families, steps, eta)
        label = label_of(cfg)
        run_dir = out / label
        net, history = meta_train(cfg, out=run_dir, log=lambda line: print(line, flush=True))
        best_step = cfg.meta_steps
        if (run_dir / "best.pt").exists():
            net, _, ckpt = load_checkpoint(run_dir / "best.pt")
            best_step = ckpt["meta_step"]
        learned[label] = (net, _etas(cfg, eta))
        info[label] = {
            "seconds": history["seconds"],
            "best_meta_step": best_step,
            "checkpoint": str(run_dir / "best.pt"),
            "config": asdict(cfg),
            "valid": history.get("valid", []),
            "meta_loss": history["meta_loss"],
        }
        print(
            f"{label}: meta-trained ({cfg.method}, {cfg.objective} objective) {cfg.meta_steps} "
            f"meta-steps in {history['seconds']:.1f} s; best validation at meta-step "
            f"{best_step}",
            flush=True,
        )
    return learned, info


def magnitude_only(net: torch.nn.Module) -> torch.nn.Module:
    """A copy of a learned update rule whose direction head is zeroed: the update direction is
    its linear skip of the features alone (Adam's direction, plus what meta-training put on the
    skip), and the attention only sets each entry's step size ``exp(alpha s)``: after the fact,
    what ``learn_direction=False`` meta-trains from the start."""
    net = copy.deepcopy(net)
    with torch.no_grad():
        net.head.weight[0].zero_()
        net.head.bias[0].zero_()
    return net


def targets(rows: list[dict], learned: Sequence[str], at: Sequence[int] = TARGET_STEPS) -> list:
    """Per learned optimizer and step of ``at``: its mean in-distribution loss (over tasks,
    families pooled) against tuned Adam's, and whether it is below."""
    table = {
        (r["optimizer"], r["step"]): r
        for r in rows
        if r["split"] == "in_dist" and r["family"] == "all"
    }
    out = []
    for label in learned:
        for step in at:
            mine, adam = table.get((label, step)), table.get(("adam", step))
            if mine is None or adam is None:
                continue
            out.append(
                dict(
                    optimizer=label,
                    step=step,
                    loss=mine["loss_mean"],
                    adam_loss=adam["loss_mean"],
                    relative_loss=mine["relative_mean"],
                    adam_relative_loss=adam["relative_mean"],
                    met=bool(mine["loss_mean"] < adam["loss_mean"]) and not mine["diverged"],
                )
            )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--plots", default=None, help="write learning-curve PNGs to this folder")
    parser.add_argument("--families", nargs="+", default=None, help="meta-training families")
    parser.add_argument(
        "--unseen-families",
        nargs="*",
        default=None,
        help="families evaluated on held-out tasks but not meta-trained on (recorded as "
        "split ood, shift 'unseen family'; default charlm qm9 without --quick)",
    )
    parser.add_argument(
        "--ood-families", nargs="*", default=None, help="families of the ood split (default: all)"
    )
    parser.add_argument(
        "--networks",
        nargs="*",
        default=["temporal_magnitude", "spatial"],
        help="update networks to meta-train: temporal or spatial (learn_direction=True), "
        "either with _magnitude (learn_direction=False, e.g. temporal_magnitude)",
    )
    parser.add_argument("--checkpoint", nargs="+", default=None, help="evaluate these instead")
    parser.add_argument("--method", default="tbptt", help="MetaConfig.method")
    parser.add_argument(
        "--eta",
        choices=["adam", "config"],
        default="adam",
        help="the learned optimizer's base learning rate per family: tuned Adam's (the same "
        "tuning, done first) or the config's lr / family_lrs",
    )
    parser.add_argument("--out", default=None, help="meta-training folder (default: temporary)")
    parser.add_argument(
        "--ablate-direction",
        action="store_true",
        help="also evaluate each learned optimizer with its direction head zeroed "
        "(label <name>_magnitude_only: Adam-like direction, learned step sizes)",
    )
    parser.add_argument("--steps", type=int, default=None, help="in-distribution budget")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per family and split")
    parser.add_argument("--meta-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["test", "ood", "unseen"],
        choices=["test", "ood", "unseen"],
        help="held-out splits to evaluate (test: in-distribution; unseen: test tasks of "
        "--unseen-families)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="meta-training config (YAML of MetaConfig keys, e.g. "
        "examples/configs/lopt/meta_train.yaml); --families/--networks/--method/--meta-steps "
        "and --eta adam override it",
    )
    parser.add_argument(
        "--set",
        nargs="+",
        default=[],
        metavar="KEY=VALUE",
        help="MetaConfig overrides applied last (values parsed as YAML), e.g. "
        "valid_metric=mean_loss num_valid_tasks=8",
    )
    args = parser.parse_args()
    families = args.families or (load_config(args.config).families if args.config else None)
    families = tuple(families or (QUICK_FAMILIES if args.quick else TRAIN_FAMILIES))
    unseen = args.unseen_families
    if unseen is None:
        unseen = () if args.quick else UNSEEN_FAMILIES
    unseen = tuple(f for f in unseen if f not in families)
    unseen = unseen if "unseen" in args.splits else ()
    ood_families = tuple(args.ood_families if args.ood_families is not None else families + unseen)
    ood_families = ood_families if "ood" in args.splits else ()
    steps = args.steps or (60 if args.quick else 1000)
    per_family = args.tasks or (1 if args.quick else 2)
    start = time.perf_counter()

    tune_start = time.perf_counter()
    grids = {k: v[::2] for k, v in DEFAULT_GRIDS.items()} if args.quick else DEFAULT_GRIDS
    needs_families = "test" in args.splits or not args.checkpoint  # meta-training uses them
    tuned_families = (families if needs_families else ()) + unseen
    tuned_families += tuple(f for f in ood_families if f not in tuned_families)
    valid_specs = split_tasks("valid", tuned_families, per_family * len(tuned_families))
    tuned = tune_learning_rates(valid_specs, steps, grids=grids)
    tune_seconds = time.perf_counter() - tune_start
    print(f"tuned learning rates ({tune_seconds:.1f} s): {json.dumps(tuned)}", flush=True)

    eta = tuned["adam"] if args.eta == "adam" else None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(args.out or tmp)
        learned, meta_info = meta_train_all(args, families, steps, eta, out)
    if args.ablate_direction:
        for label, (net, etas) in list(learned.items()):
            if net.learn_direction:
                learned[f"{label}_magnitude_only"] = (magnitude_only(net), etas)

    splits = {}
    if "test" in args.splits:
        splits["test"] = split_tasks("test", families, per_family * len(families))
    if unseen:
        splits["unseen"] = split_tasks("test", unseen, per_family * len(unseen))
    if ood_families:
        splits["ood"] = split_tasks("ood", ood_families, per_family * len(ood_families))
    result = evaluate_optimizers(splits, steps, tuned, learned, at=RECORD_STEPS, seed=args.seed)
    for r in result.records:
        if r["split"] == "unseen":  # held-out tasks of families the optimizer never trained on
            r.update(split="ood", shift="unseen family", pool=False)
        else:
            r["shift"] = "none" if r["split"] == "in_dist" else "wider, deeper, 5x horizon"
            r["pool"] = r["family"] in families
    rows = summarize(result.records)
    goals = targets(rows, list(learned))
    total = time.perf_counter() - start
    print(
        f"\nmachine: {machine()}; load average {os.getloadavg()}; meta-training families "
        f"{', '.join(families)}; unseen families {', '.join(unseen) or '-'}; {per_family} "
        f"task(s) per family and split; {steps} steps"
        + (f" (ood: x{splits['ood'][0].horizon_multiplier})" if "ood" in splits else "")
        + f"; total {total:.0f} s"
    )
    print(
        "meta-training seconds: "
        + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in meta_info.items() if v["seconds"])
        + "; evaluation seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
    )
    print_tables(rows)
    for goal in goals:
        print(
            f"target {goal['optimizer']} step {goal['step']}: mean loss {goal['loss']:.4g} vs "
            f"tuned Adam {goal['adam_loss']:.4g} -> {'met' if goal['met'] else 'missed'}"
        )
    if args.plots:
        plots = Path(args.plots)
        plots.mkdir(parents=True, exist_ok=True)
        for label, curves in result.curves.items():
            plot_curves(curves, plots / f"curves_{label}.png")
        print(f"\nplots: {plots}/curves_{{{','.join(result.curves)}}}.png")
    if args.json:
        payload = {
            "machine": machine(),
            "load_average": os.getloadavg(),
            "args": vars(args),
            "families": families,
            "unseen_families": unseen,
            "ood_families": ood_families,
            "steps": steps,
            "baselines": list(BASELINES),
            "meta_training": meta_info,
            "tune_seconds": tune_seconds,
            "tuned_lrs": tuned,
            "eval_seconds": result.seconds,
            "total_seconds": total,
            "targets": goals,
            "records": result.records,
            "summary": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(_plain(payload), fh, indent=1)


if __name__ == "__main__":
    main()
