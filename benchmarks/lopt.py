"""Learned optimizer (RPE / no RPE) against tuned Adam and SGD+momentum on held-out tasks.

Meta-trains two UpdateNetworks with the same config (``rpe="flt-kernel"`` and ``rpe=None``),
tunes Adam and SGD+momentum learning rates per family on meta-validation tasks (log grids), then
trains every held-out test task with each optimizer and prints the mean training loss (over the 5
steps ending at each step count) and the same divided by the initial loss, per family and
overall. ``--quick``: fewer meta-steps, tasks and inner steps.

    python benchmarks/lopt.py [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

from geolinrpe.optim import MetaConfig, evaluate, meta_train, split_tasks, tune_learning_rate


def machine() -> str:
    return (
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    families = ("quadratic", "rosenbrock", "mlp", "molecule")
    meta_steps, num_tasks, steps, tune_steps = (
        (60, 8, 100, 50) if args.quick else (300, 16, 200, 100)
    )
    start = time.perf_counter()
    learned = {}
    for label, rpe in (("lopt-rpe", "flt-kernel"), ("lopt-norpe", None)):
        cfg = MetaConfig(
            families=families, rpe=rpe, meta_steps=meta_steps, valid_every=meta_steps, seed=0
        )
        net, history = meta_train(cfg, log=None)
        learned[label] = (net, cfg.lr)
        print(
            f"{label}: meta-trained {meta_steps} steps in {history['seconds']:.0f} s, "
            f"valid {history['valid'][-1][1]:.4f}"
        )
    valid = split_tasks("valid", families, 2 * len(families))
    hand = {name: tune_learning_rate(name, valid, tune_steps) for name in ("adam", "sgdm")}
    result = evaluate(split_tasks("test", families, num_tasks), steps, learned, hand)
    rows = result.table(sorted({steps // 4, steps // 2, steps}))
    print(
        f"\nmachine: {machine()}; {num_tasks} held-out tasks, {steps} steps, "
        f"total {time.perf_counter() - start:.0f} s"
    )
    print(f"tuned lrs: {json.dumps({k: result.lrs[k] for k in hand})}")
    print("| optimizer | family | step | loss | loss / L0 |\n|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['optimizer']} | {r['family']} | {r['step']} | {r['loss']:.4g} | "
            f"{r['normalised']:.4f} |"
        )
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {"machine": machine(), "rows": rows, "lrs": result.lrs, "quick": args.quick},
                fh,
                indent=1,
            )


if __name__ == "__main__":
    main()
