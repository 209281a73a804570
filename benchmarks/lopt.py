"""Learned optimizers (temporal and spatial update networks) against tuned Adam, AdamW with
cosine decay and SGD with momentum on held-out in-distribution and out-of-distribution tasks.

1. Meta-trains each learned update rule (``--networks``, default ``temporal spatial``: the
   :class:`~geolinrpe.optim.temporal.TemporalUpdateNetwork` and today's
   :class:`~geolinrpe.optim.learned.UpdateNetwork`, both with ``rpe="flt-kernel"``) with
   :func:`~geolinrpe.optim.meta.meta_train` on the meta-train split (``--method``: any
   ``MetaConfig.method``, default ``tbptt``), and times it.
2. Tunes each baseline's learning rate per family on meta-validation tasks
   (:func:`~geolinrpe.optim.baselines.tune_learning_rates`: log grids, score: mean of the last 5
   losses at the tuning horizon / initial loss).
3. Trains every test task (``split="in_dist"``) and ood task (``split="ood"``: wider, deeper,
   ``horizon_multiplier`` = 5 times the budget) with every optimizer for ``--steps`` x the
   task's horizon multiplier steps from the same initialisation and minibatches
   (:func:`~geolinrpe.optim.baselines.evaluate_optimizers`), records the loss (mean of the 5
   minibatch losses ending there) and loss / initial loss at steps 50, 200, 1,000 and at each
   task's final step, and prints per split a table per family and optimizer: the mean and
   standard deviation over tasks of the loss and of the relative loss at each step.

Outputs: ``--json PATH``: ``{"machine", "args", "meta_training" (per learned optimizer:
seconds, config, validation history), "tuned_lrs", "eval_seconds", "records" (one per
optimizer, task and step: optimizer, family, split, task, seed, horizon, lr, step, loss,
relative_loss, initial_loss; non-finite losses as null), "summary"}``; ``--plots DIR``:
``curves_in_dist.png`` and ``curves_ood.png`` (mean loss / initial loss against step, one panel
per family, :func:`~geolinrpe.optim.meta.plot_curves`).

``--quick``: 60 inner steps (ood: 300), one task per family and split, families quadratic,
rosenbrock, mlp and conv (``--families`` overrides; charlm is left out because the learned
optimizers cost 0.2 to 0.6 s per step on its test tasks and about 3 s on its ood tasks on a
2-core CPU), 8 meta-steps of meta-batch 1 per network (unroll 60, validation on one task per
family for 20 steps), every other learning rate of the grids: 48 s on 2 CPU cores (spread
over tasks needs ``--tasks 2`` or more). The full run (1,000 steps, ood 5,000; 2 tasks per
family and split; 200 meta-steps of the default ``MetaConfig``) takes hours on a CPU (charlm's
ood tasks alone: 5,000 steps x 3 s per learned optimizer and task).

    python benchmarks/lopt.py [--quick] [--json PATH] [--plots DIR] [--families F ...]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import time
from dataclasses import asdict, fields
from pathlib import Path

import torch

from geolinrpe.optim import MetaConfig, meta_train, plot_curves, split_tasks
from geolinrpe.optim.baselines import (
    BASELINES,
    DEFAULT_GRIDS,
    RECORD_STEPS,
    evaluate_optimizers,
    summarize,
    tune_learning_rates,
)
from geolinrpe.optim.cli import load_config

FAMILIES = ("quadratic", "rosenbrock", "mlp", "conv", "charlm")
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
                text = _cell(r["relative_mean"], r["relative_std"])
                if family != "all":
                    text = _cell(r["loss_mean"], r["loss_std"]) + " / " + text
                if r["diverged"]:
                    text += f" ({r['diverged']}/{r['tasks']} diverged)"
                parts.append(text)
            print(f"| {family} | {optimizer} | " + " | ".join(parts) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None, help="write the records here")
    parser.add_argument("--plots", default=None, help="write learning-curve PNGs to this folder")
    parser.add_argument("--families", nargs="+", default=None)
    parser.add_argument("--networks", nargs="*", default=["temporal", "spatial"])
    parser.add_argument("--method", default="tbptt", help="MetaConfig.method")
    parser.add_argument("--steps", type=int, default=None, help="in-distribution budget")
    parser.add_argument("--tasks", type=int, default=None, help="tasks per family and split")
    parser.add_argument("--meta-steps", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--splits",
        nargs="+",
        default=["test", "ood"],
        choices=["test", "ood"],
        help="held-out splits to evaluate (test = in-distribution)",
    )
    parser.add_argument(
        "--config",
        default=None,
        help="meta-training config (YAML of MetaConfig keys, e.g. "
        "examples/configs/lopt/meta_train.yaml); --families/--networks/--method/--meta-steps "
        "given on the command line override it",
    )
    args = parser.parse_args()
    families = tuple(args.families or (QUICK_FAMILIES if args.quick else FAMILIES))
    steps = args.steps or (60 if args.quick else 1000)
    per_family = args.tasks or (1 if args.quick else 2)
    meta_steps = args.meta_steps or (8 if args.quick else 200)
    start = time.perf_counter()

    learned, meta_info = {}, {}
    for network in args.networks:
        values = dict(
            families=families,
            network=network,
            method=args.method,
            meta_steps=meta_steps,
            valid_every=meta_steps,
            seed=args.seed,
        )
        if args.quick:
            values.update(meta_batch=1, unroll=steps, num_valid_tasks=len(families), valid_steps=20)
        values = {k: v for k, v in values.items() if k in {f.name for f in fields(MetaConfig)}}
        if args.config:  # the file's keys, then what this command line sets explicitly
            given = {"network": network}
            given.update({"families": families} if args.families else {})
            given.update({"method": args.method} if args.method != "tbptt" else {})
            if args.meta_steps:
                given.update(meta_steps=args.meta_steps, valid_every=args.meta_steps)
            cfg = load_config(args.config, values=given)
        else:
            cfg = MetaConfig(**values)
        net, history = meta_train(cfg, log=None)
        label = f"lopt_{network}"
        learned[label] = (net, cfg.lr)
        meta_info[label] = {
            "seconds": history["seconds"],
            "config": asdict(cfg),
            "valid": history.get("valid", []),
        }
        valid = history["valid"][-1][1] if history.get("valid") else math.nan
        print(
            f"{label}: meta-trained ({cfg.method}) {cfg.meta_steps} meta-steps in "
            f"{history['seconds']:.1f} s, validation score {valid:.4f}",
            flush=True,
        )

    tune_start = time.perf_counter()
    grids = {k: v[::2] for k, v in DEFAULT_GRIDS.items()} if args.quick else DEFAULT_GRIDS
    valid_specs = split_tasks("valid", families, per_family * len(families))
    tuned = tune_learning_rates(valid_specs, steps, grids=grids)
    tune_seconds = time.perf_counter() - tune_start
    print(f"tuned learning rates ({tune_seconds:.1f} s): {json.dumps(tuned)}", flush=True)

    splits = {
        split: split_tasks(split, families, per_family * len(families))
        for split in ("test", "ood")
        if split in args.splits
    }
    result = evaluate_optimizers(splits, steps, tuned, learned, at=RECORD_STEPS, seed=args.seed)
    rows = summarize(result.records)
    total = time.perf_counter() - start
    print(
        f"\nmachine: {machine()}; families {', '.join(families)}; {per_family} task(s) per "
        f"family and split; {steps} steps"
        + (f" (ood: x{splits['ood'][0].horizon_multiplier})" if "ood" in splits else "")
        + "; "
        f"total {total:.0f} s"
    )
    print(
        "meta-training seconds: "
        + ", ".join(f"{k} {v['seconds']:.1f}" for k, v in meta_info.items())
        + "; evaluation seconds: "
        + ", ".join(f"{k} {v:.1f}" for k, v in result.seconds.items())
    )
    print_tables(rows)
    if args.plots:
        out = Path(args.plots)
        out.mkdir(parents=True, exist_ok=True)
        for label, curves in result.curves.items():
            plot_curves(curves, out / f"curves_{label}.png")
        print(f"\nplots: {out}/curves_{{{','.join(result.curves)}}}.png")
    if args.json:
        payload = {
            "machine": machine(),
            "args": vars(args),
            "families": families,
            "steps": steps,
            "baselines": list(BASELINES),
            "meta_training": meta_info,
            "tune_seconds": tune_seconds,
            "tuned_lrs": tuned,
            "eval_seconds": result.seconds,
            "total_seconds": total,
            "records": result.records,
            "summary": rows,
        }
        with open(args.json, "w") as fh:
            json.dump(_plain(payload), fh, indent=1)


if __name__ == "__main__":
    main()
