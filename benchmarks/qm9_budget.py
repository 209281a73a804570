"""QM9 gap at a fixed wall-clock budget: FLT vs linear attention without RPE vs exact softmax
with the RPE bias vs SchNet.

Each model (``examples/configs/qm9_gap_{flt,linear,exact,schnet}.yaml``) trains for the same
number of minutes (the trainer's ``train.time_limit_min``) on the same split (the first
``--train-size`` molecules of the DimeNet++ training split, seed 0), with the same optimizer
settings except that the schedule is constant after a short warm-up (a time budget has no
known step count for a cosine to end on) and no validation runs during training (all of the
budget goes to optimizer steps). The model at the end of its budget (``last.pt``) is then
evaluated on the same ``--test-size`` test molecules.

Reported per model: test MAE of the gap (meV), optimizer steps, training throughput
(molecules/s over the budget, data loading included) and inference throughput (molecules/s,
forward passes over the test subset, batch ``data.eval_batch_size``), with the machine. The
target "FLT beats linear without RPE and is within 10% of exact softmax with the RPE bias"
(``MAE_flt < MAE_linear`` and ``MAE_flt <= 1.1 * MAE_exact``) is printed as PASS/FAIL.

    python benchmarks/qm9_budget.py --quick --json qm9_budget.json   # 1 minute per model
    python benchmarks/qm9_budget.py --minutes 10                     # 10 minutes per model
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from geolinrpe.train import Config, evaluate, load_checkpoint, run

ROOT = Path(__file__).resolve().parents[1]
MODELS = {
    "flt": ("qm9_gap_flt", "FLT radial RPE, linear attention"),
    "linear": ("qm9_gap_linear", "linear attention, no RPE"),
    "exact": ("qm9_gap_exact", "exact softmax + RPE bias"),
    "schnet": ("qm9_gap_schnet", "SchNet"),
}


def machine() -> dict[str, object]:
    """Where the numbers come from."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpu": cpu,
        "cpu_cores": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


def inference_throughput(ckpt: Path, device: str, repeats: int = 1) -> float:
    """Molecules/s of forward passes (no gradients) over the test split of ``ckpt``'s config."""
    loaded = load_checkpoint(ckpt, device=device)
    test = loaded.task.datasets()["test"]
    size = loaded.cfg.data.eval_batch_size or loaded.cfg.data.batch_size
    loader = DataLoader(test, size, shuffle=False, collate_fn=loaded.task.collate)
    batches = [b.to(loaded.device) for b in loader]
    model = loaded.model.eval()
    with torch.no_grad():
        loaded.task.forward(model, batches[0])  # warm-up
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(repeats):
            for batch in batches:
                loaded.task.forward(model, batch)
        if loaded.device.type == "cuda":
            torch.cuda.synchronize()
        seconds = time.perf_counter() - start
    return repeats * len(test) / seconds


def run_model(key: str, args: argparse.Namespace) -> dict[str, object]:
    """Train one model for the budget, then evaluate ``last.pt`` on the test subset."""
    config, label = MODELS[key]
    out = Path(args.out) / key
    overrides = [
        f"data.path={args.data}",
        f"data.train_size={args.train_size}",
        f"data.valid_size={args.test_size}",
        f"data.test_size={args.test_size}",
        "optim.schedule=constant",
        f"optim.warmup_steps={args.warmup}",
        f"train.out_dir={out}",
        "train.epochs=1000",
        f"train.time_limit_min={args.minutes}",
        "train.eval_every=1000000000",
        "train.progress=false",
        "train.plot=false",
        "train.tensorboard=false",
        f"train.device={args.device}",
    ]
    if args.threads is not None:
        overrides.append(f"train.num_threads={args.threads}")
    cfg = Config.load(ROOT / "examples" / "configs" / f"{config}.yaml", overrides + args.set)
    print(f"== {key}: {label}, {args.minutes} min", flush=True)
    results = run(cfg)
    steps = int(results["step"])
    seconds = float(results["elapsed_s"])
    ckpt = out / "last.pt"
    test = evaluate(load_checkpoint(ckpt, device=args.device), "test")
    infer = inference_throughput(ckpt, args.device)
    row = {
        "model": key,
        "description": label,
        "config": f"examples/configs/{config}.yaml",
        "test_mae_mev": 1000.0 * test["mae"],
        "steps": steps,
        "train_seconds": seconds,
        "train_mol_per_s": steps * cfg.data.batch_size / seconds,
        "infer_mol_per_s": infer,
        "parameters": sum(p.numel() for p in load_checkpoint(ckpt, "cpu").model.parameters()),
    }
    print(
        f"   test MAE {row['test_mae_mev']:.1f} meV, {steps} steps, "
        f"train {row['train_mol_per_s']:.0f} mol/s, inference {infer:.0f} mol/s",
        flush=True,
    )
    return row


def check_target(rows: dict[str, dict[str, object]]) -> dict[str, object]:
    """FLT beats linear without RPE and is within 10% of exact softmax with the RPE bias."""
    flt, lin, exact = (float(rows[k]["test_mae_mev"]) for k in ("flt", "linear", "exact"))
    beats = flt < lin
    within = flt <= 1.1 * exact
    return {
        "flt_beats_linear": beats,
        "flt_within_10pct_of_exact": within,
        "flt_over_exact": flt / exact,
        "passed": beats and within,
        "text": (
            f"FLT {flt:.1f} meV vs linear without RPE {lin:.1f} meV: "
            f"{'beats' if beats else 'does NOT beat'} it; vs exact softmax + RPE bias "
            f"{exact:.1f} meV: ratio {flt / exact:.3f} ({'<=' if within else '>'} 1.10)"
        ),
    }


def table(rows: list[dict[str, object]]) -> str:
    """A Markdown table of the results."""
    lines = [
        "| model | test MAE gap (meV) | steps | train (mol/s) | inference (mol/s) | params |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        lines.append(
            f"| {r['description']} (`{r['model']}`) | {r['test_mae_mev']:.1f} | {r['steps']} "
            f"| {r['train_mol_per_s']:.0f} | {r['infer_mol_per_s']:.0f} | {r['parameters']:,} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, object]:
    """Run the comparison; returns what ``--json`` writes."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 minute per model, 500 test mols")
    p.add_argument("--minutes", type=float, default=None, help="budget per model (default 5)")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--out", default="runs/qm9_budget", help="run folders")
    p.add_argument("--data", default=str(ROOT / "data" / "qm9"), help="QM9 cache folder")
    p.add_argument("--train-size", type=int, default=10000)
    p.add_argument("--test-size", type=int, default=None, help="test molecules (1000)")
    p.add_argument("--warmup", type=int, default=50, help="warm-up optimizer steps")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=None, help="torch threads (config: 2)")
    p.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides")
    args = p.parse_args(argv)
    if args.minutes is None:
        args.minutes = 1.0 if args.quick else 5.0
    if args.test_size is None:
        args.test_size = 500 if args.quick else 1000
    info = machine()
    print(
        f"machine: {info['cpu']} ({info['cpu_cores']} cores), GPU {info['gpu']}, "
        f"torch {info['torch']}; {args.minutes} min per model, {args.train_size} train / "
        f"{args.test_size} test molecules",
        flush=True,
    )
    rows = [run_model(key, args) for key in args.models]
    by_key = {r["model"]: r for r in rows}
    report: dict[str, object] = {
        "machine": info,
        "minutes_per_model": args.minutes,
        "train_size": args.train_size,
        "test_size": args.test_size,
        "device": args.device,
        "threads": args.threads if args.threads is not None else "config (2)",
        "rows": rows,
    }
    print()
    print(table(rows))
    if all(k in by_key for k in ("flt", "linear", "exact")):
        target = check_target(by_key)
        report["target"] = target
        print(f"\ntarget: {'PASS' if target['passed'] else 'FAIL'}: {target['text']}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main(sys.argv[1:])
